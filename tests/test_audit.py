"""`mosaic audit`: a run explained round by round, `--verify` against every kind of tampering, and
the self-contained HTML report rendered in headless Chromium.

One tiny 3-round run is built per module (round 1: an invalid proposal revised; round 2: a
valid one; round 3: refused twice, the heuristic fallback runs); each tampering case works on a
copy of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from scripted import ScriptedPlanner
from typer.testing import CliRunner

from mosaic.audit import AuditLog
from mosaic.cli import app
from mosaic.schemas import AuditReport, RoundDiff, RunVerification
from mosaic.tools.audit_report import build_audit_report, diff_rounds
from mosaic.tools.html_report import PLOT_IDS, TIMELINE_ID, render_html_report, write_html_report
from mosaic.tools.verify_run import verify_run

pytestmark = pytest.mark.slow

GOOD = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2}, "method": "sft",
        "rationale": "scripted: safety first"}
SECOND = {**GOOD, "mixture": {"safety": 0.2, "boundary": 0.4, "instruction": 0.4},
          "rationale": "scripted: rebalance"}
BAD = {**GOOD, "mixture": {"safety": 0.7, "boundary": 0.7}}


@pytest.fixture(scope="module")
def run_dir(tiny_run_config, tmp_path_factory) -> Path:
    from mosaic.agents.runner import run_loop

    root = tmp_path_factory.mktemp("audited")
    cfg = tiny_run_config.model_copy(update={
        "run_dir": str(root / "run"),
        "loop": tiny_run_config.loop.model_copy(update={"rounds": 3}),
        "planner": tiny_run_config.planner.model_copy(update={"max_revisions": 1})})
    planner = ScriptedPlanner([json.dumps(BAD), json.dumps(GOOD), json.dumps(SECOND),
                               json.dumps(BAD), "not json"], fallback=GOOD,
                              rationale="from the script")
    run_loop(cfg, planner=planner)
    return Path(cfg.run_dir)


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    """A copy of the module's run to tamper with."""
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})


def flat(text: str) -> str:
    return " ".join(text.split())


def _lines(run: Path) -> list[bytes]:
    return (run / "audit.jsonl").read_bytes().split(b"\n")[:-1]


def _write_lines(run: Path, lines: list[bytes]) -> None:
    (run / "audit.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def _seq_of(run: Path, event: str, round_: int) -> int:
    for raw in _lines(run):
        e = json.loads(raw)
        if e["event"] == event and e["round"] == round_:
            return e["seq"]
    raise AssertionError(f"no {event} in round {round_}")


# ---- the report --------------------------------------------------------------------------------


def test_the_report_explains_every_round(run_dir):
    report = build_audit_report(run_dir)
    assert report.log_ok and not report.warnings
    assert [(r.round, r.status) for r in report.rounds] == [
        (0, "baseline"), (1, "done"), (2, "done"), (3, "done")]
    r1, r2, r3 = report.rounds[1:]
    # what the planner saw: the previous round's eval report, worst slices with CI + reliability
    assert r1.saw_round == 0 and r2.saw_round == 1 and r3.saw_round == 2
    assert {o.objective for o in r1.saw} == {"safety", "boundary", "instruction"}
    worst = r1.saw[0].worst_slices
    assert worst and all(s.reliability in ("low", "medium", "high") for s in worst)
    assert [s.mean for s in worst] == sorted(s.mean for s in worst)
    # round 1: an invalid proposal, its verdict and feedback, then the revision that ran
    assert [p.verdict.status for p in r1.proposals] == ["invalid", "ok"]
    assert any("weights_not_summing" in f for f in r1.proposals[0].feedback)
    assert r1.proposals[1].proposal.rationale == "from the script"
    assert r1.executed.decided_by == "planner" and r1.executed.action.mixture == GOOD["mixture"]
    # round 3: refused after the revision, the heuristic fallback executed
    assert r3.refusal is not None and r3.fallback["source"] == "heuristic planner"
    assert r3.executed.decided_by == "fallback" and r3.executed.source == "heuristic planner"
    # manifest: rows and tokens per objective and bucket, focus rows
    m = r1.manifest
    assert m.total_tokens <= m.budget == 4000
    assert sum(u.tokens for u in m.objectives.values()) == m.total_tokens
    assert sum(b.rows for b in m.buckets) == m.total_rows
    # score changes per objective and slice with CIs, eval and held-out, against what it saw
    splits = {(c.split, c.slice is None) for c in r2.changes}
    assert splits == {("eval", True), ("eval", False), ("heldout", True), ("heldout", False)}
    f = next(c for c in r2.changes if c.split == "eval" and c.slice is None)
    assert f.before == report.rounds[1].scores[f.objective] and f.before_ci is not None
    # the archive decision
    assert r1.archive is not None and r1.archive.round == 1
    assert r3.train is not None and r3.train.train_rows == r3.manifest.total_rows


def test_audit_cli_prints_rounds_diff_and_json(run_dir):
    out = invoke("audit", run_dir)
    assert out.exit_code == 0, out.output
    text = flat(out.output)
    for needle in ("round 1 · done · decided by planner", "what the planner read: round 0",
                   "proposal 0 by planner (scripted): verdict invalid",
                   "revision feedback: [weights_not_summing]", "refused after 2 proposals",
                   "fallback: heuristic planner", "executed: decided by fallback",
                   "training set:", "score changes from round 2", "archive:",
                   "hash chain intact"):
        assert needle in text, needle
    one = invoke("audit", run_dir, "--round", 2)
    assert one.exit_code == 0 and "round 2 · done" in flat(one.output)
    assert "round 1 · done" not in flat(one.output)

    as_json = invoke("audit", run_dir, "--json")
    report = AuditReport.model_validate_json(as_json.output)
    assert report.schema_version == 1 and len(report.rounds) == 4

    diff = invoke("audit", run_dir, "--diff", 1, 2, "--json")
    d = RoundDiff.model_validate_json(diff.output)
    assert {c.path for c in d.action} >= {"mixture.safety", "mixture.boundary"}
    assert next(c for c in d.action if c.path == "mixture.safety").b == 0.2
    assert d.scores and d == diff_rounds(build_audit_report(run_dir), 1, 2)
    shown = invoke("audit", run_dir, "--diff", 1, 2)
    assert shown.exit_code == 0 and "mixture.safety" in shown.output

    missing = invoke("audit", run_dir, "--round", 9)
    assert missing.exit_code == 2 and "round 9 is not in" in flat(missing.output)
    not_a_run = invoke("audit", run_dir / "round_1")
    assert not_a_run.exit_code == 2 and "not a MOSAIC run folder" in flat(not_a_run.output)


def test_unknown_and_human_events_show_generically(copy):
    # What chat will log: shown by author and data without code of its own.
    note = "<script>alert(1)</script> [red]ok[/red]"
    AuditLog(copy).append("human_decision", {"decision": "reject", "reason": note},
                          round=3, author="human", event_id="r3/human/0")
    report = build_audit_report(copy)
    event = report.rounds[3].events[-1]
    assert (event.event, event.author) == ("human_decision", "human")
    text = flat(invoke("audit", copy, "--round", 3).output)
    # printed literally: neither rich markup nor HTML
    assert f'human_decision by human: {{"decision": "reject", "reason": "{note}"}}' in text
    html = render_html_report(report)
    assert "human_decision" in html and "by human" in html and "a-human" in html
    assert "[red]ok[/red]" in html and "<script" not in html.lower()
    assert verify_run(copy).ok  # a properly appended entry keeps the chain intact


# ---- --verify ----------------------------------------------------------------------------------


def test_verify_passes_on_a_good_run(run_dir):
    result = verify_run(run_dir)
    assert result.ok, result.problem
    assert any("re-checked against config.yaml" in c for c in result.checked)
    assert any("train.parquet sha256 = output_hash" in c for c in result.checked)
    out = invoke("audit", run_dir, "--verify")
    assert out.exit_code == 0 and "verified:" in out.output
    as_json = RunVerification.model_validate_json(invoke("audit", run_dir, "--verify",
                                                         "--json").output)
    assert as_json.ok and as_json.entries == len(_lines(run_dir))


def _fails(run: Path, *needles: str) -> str:
    result = verify_run(run)
    assert not result.ok
    for needle in needles:
        assert needle in result.problem, (needle, result.problem)
    out = invoke("audit", run, "--verify")
    assert out.exit_code == 1
    assert "verification FAILED" in flat(out.output)
    return result.problem


def test_verify_names_an_edited_line(copy):
    n = _seq_of(copy, "verdict", 2)
    lines = _lines(copy)
    lines[n - 1] = lines[n - 1].replace(b'"status": "ok"', b'"status": "invalid"')
    _write_lines(copy, lines)
    _fails(copy, f"audit.jsonl line {n} (seq {n}, verdict, round 2) was changed")


def test_verify_names_an_edited_last_line(copy):
    lines = _lines(copy)
    last = json.loads(lines[-1])
    last["data"]["rounds"] = 99
    lines[-1] = json.dumps(last, sort_keys=True).encode()
    _write_lines(copy, lines)
    n = len(lines)
    _fails(copy, f"audit.jsonl line {n} (seq {n}, run_finished) was changed")


def test_verify_names_a_deleted_line(copy):
    n = _seq_of(copy, "manifest", 1)
    lines = _lines(copy)
    del lines[n - 1]
    _write_lines(copy, lines)
    _fails(copy, f"audit.jsonl line {n} (seq {n + 1},", "deleted, inserted or moved")


def test_verify_names_reordered_lines(copy):
    n = _seq_of(copy, "executed", 2)
    lines = _lines(copy)
    lines[n - 1], lines[n] = lines[n], lines[n - 1]
    _write_lines(copy, lines)
    _fails(copy, f"audit.jsonl line {n} (seq {n + 1},")


def test_verify_names_a_truncated_log(copy):
    lines = _lines(copy)
    _write_lines(copy, lines[:-2])
    _fails(copy, f"line {len(lines) - 1} and after were removed (truncated)")


def test_verify_names_a_log_cut_mid_line(copy):
    data = (copy / "audit.jsonl").read_bytes()
    (copy / "audit.jsonl").write_bytes(data[:-40])
    _fails(copy, f"audit.jsonl line {len(_lines(copy)) + 1}: torn")


def test_verify_names_a_manifest_over_budget(copy):
    path = copy / "round_2" / "dataset" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["total_tokens"] = manifest["budget"] + 1
    path.write_text(json.dumps(manifest))
    _fails(copy, "round_2/dataset/manifest.json: total_tokens 4,001 exceeds the budget 4,000")


def test_verify_names_a_manifest_edited_consistently(copy):
    # Bucket rows and the total edited together still disagree with the audit log.
    path = copy / "round_1" / "dataset" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["buckets"][0]["rows"] += 5
    manifest["total_rows"] += 5
    path.write_text(json.dumps(manifest))
    seq = _seq_of(copy, "manifest", 1)
    _fails(copy, "round_1/dataset/manifest.json: total_rows",
           f"differs from audit.jsonl line {seq} (seq {seq}, manifest, round 1)")


def test_verify_names_a_manifest_edit_in_a_field_nothing_else_records(copy):
    path = copy / "round_1" / "dataset" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["notes"].append("edited by hand")
    path.write_text(json.dumps(manifest))
    _fails(copy, "round_1/dataset/manifest.json: differs from the fingerprint dataset.done.json")


def test_verify_names_an_altered_training_file(copy):
    path = copy / "round_2" / "dataset" / "train.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _fails(copy, "round_2/dataset/train.parquet: sha256 differs from manifest.output_hash")


def test_verify_names_a_training_file_and_manifest_altered_together(copy):
    import hashlib

    path = copy / "round_2" / "dataset" / "train.parquet"
    data = path.read_bytes() + b"\0"
    path.write_bytes(data)
    man = copy / "round_2" / "dataset" / "manifest.json"
    manifest = json.loads(man.read_text())
    manifest["output_hash"] = hashlib.sha256(data).hexdigest()
    man.write_text(json.dumps(manifest))
    _fails(copy, "round_2/dataset/manifest.json: output_hash", "differs from audit.jsonl line")


def test_verify_names_an_altered_adapter(copy):
    path = copy / "round_3" / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0")
    _fails(copy, "round_3/adapter/adapter_model.safetensors: differs from the fingerprint "
                 "adapter.done.json recorded")


def test_verify_names_a_missing_train_result(copy):
    (copy / "round_1" / "adapter" / "train_result.json").unlink()
    _fails(copy, "round_1/adapter/train_result.json: missing")


def test_verify_rechecks_executed_actions_against_the_saved_config(copy):
    # A ceiling the executed round-1 action (safety 0.5) breaks: the re-check names its entry.
    path = copy / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["limits"]["ceilings"] = {"safety": 0.3}
    path.write_text(yaml.safe_dump(config))
    seq = _seq_of(copy, "executed", 1)
    problem = _fails(copy, f"audit.jsonl line {seq} (seq {seq}, executed, round 1): the executed "
                           f"action fails the check")
    assert "above_ceiling" in problem


def test_verify_names_an_executed_action_that_differs_from_the_round_folder(copy):
    path = copy / "round_2" / "action.json"
    held = json.loads(path.read_text())
    action = json.loads(held["raw"])
    action["mixture"] = {"safety": 0.3, "boundary": 0.3, "instruction": 0.4}
    path.write_text(json.dumps({"raw": json.dumps(action)}))
    _fails(copy, "round_2/action.json: differs from the executed action in audit.jsonl line")


def test_verify_passes_on_a_run_stopped_between_deciding_and_building(copy):
    # As a run killed right after logging round 3's executed action leaves it.
    from mosaic.audit import line_hash
    from mosaic.tools.archive import add_point, load_archive, new_archive, save_archive

    n = _seq_of(copy, "executed", 3)
    lines = _lines(copy)[:n]
    _write_lines(copy, lines)
    (copy / "audit.head.json").write_text(json.dumps({"count": n, "last": line_hash(lines[-1])}))
    for name in ("dataset", "adapter", "eval", "heldout"):
        shutil.rmtree(copy / "round_3" / name)
    # The archive and round summary as they were before round 3 was built: rebuilt from the
    # earlier rounds' points, byte for byte what round 2's archive node wrote.
    (copy / "round_3" / "round.json").unlink()
    store = load_archive(copy)
    rebuilt = new_archive(store.objectives, store.reference)
    for point in store.points[:3]:
        rebuilt, _ = add_point(rebuilt, point)
    save_archive(rebuilt, copy)
    result = verify_run(copy)
    assert result.ok, result.problem
    assert "round 3: executed but not built yet (the run stopped here)" in result.checked
    report = build_audit_report(copy)
    assert report.rounds[-1].status == "incomplete" and report.rounds[-1].executed is not None


# ---- the HTML report -----------------------------------------------------------------------------


def test_the_html_report_is_one_self_contained_file(run_dir, tmp_path):
    out = invoke("audit", run_dir, "--html", tmp_path / "r.html")
    assert out.exit_code == 0, out.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    for plot_id in PLOT_IDS:
        start = html.index(f'id="{plot_id}"')
        assert "<svg" in html[start:start + 400], plot_id
    assert f'id="{TIMELINE_ID}"' in html
    lowered = html.lower()
    for fetch in ("<script", "<link", "<img", "<iframe", "<object", "<embed", "@import",
                  "@font-face", "src="):
        assert fetch not in lowered, fetch
    # references stay inside the page: url(#clip) and href="#anchor" only
    assert not re.findall(r"url\(\s*['\"]?(?!#)", lowered)
    assert not re.findall(r"href=[\"'](?!#)", lowered)
    # the decision timeline: every step with its author
    for needle in ("refusal", "fallback", "heuristic planner", "decided by fallback",
                   "by planner", "by system"):
        assert needle in html, needle
    # svg ids are unique across the page (matplotlib's are salted per plot)
    ids = re.findall(r'<[^>]+\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids))


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome", "headless_shell"):
        if path := shutil.which(name):
            return path
    return None


def _screenshot(browser: str, html: Path, png: Path, width: int, height: int) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--no-first-run", "--disable-extensions", "--mute-audio",
                    f"--user-data-dir={png.parent / 'chromium-profile'}",
                    f"--window-size={width},{height}", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert png.is_file()


def _box_stats(png: Path) -> tuple[tuple[int, int, int, int] | None, float, int]:
    """(bounding box of non-white pixels, grey-level variance inside it, distinct colours)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(float)
    ink = (img < 245).any(axis=2)
    if not ink.any():
        return None, 0.0, 0
    ys, xs = np.nonzero(ink)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    inside = img[box[1]:box[3], box[0]:box[2]]
    colours = len(np.unique(inside.reshape(-1, 3)[::7].astype(int), axis=0))
    return box, float(inside.mean(axis=2).var()), colours


def test_the_html_report_renders_non_blank_plots_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no headless Chromium on this machine (Debian: apt-get install -y chromium; "
                    ".ci/run installs it)")
    report = build_audit_report(run_dir)
    page = write_html_report(report, tmp_path / "report.html")
    html = page.read_text(encoding="utf-8")
    full = tmp_path / "full.png"
    _screenshot(browser, page, full, 1400, 4200)
    box, var, _ = _box_stats(full)
    assert box is not None and var > 100
    # Each plot alone: the same page and CSS, everything else hidden and the plot pinned to the
    # top-left corner, so its box is whatever ink the screenshot holds.
    for element_id in [*PLOT_IDS, TIMELINE_ID]:
        isolate = (f"<style>body * {{ visibility: hidden !important; }} "
                   f"#{element_id}, #{element_id} * {{ visibility: visible !important; }} "
                   f"#{element_id} {{ position: fixed !important; top: 0; left: 0; margin: 0; "
                   f"border: 0 !important; }}</style></head>")
        one = tmp_path / f"{element_id}.html"
        one.write_text(html.replace("</head>", isolate, 1), encoding="utf-8")
        png = tmp_path / f"{element_id}.png"
        _screenshot(browser, one, png, 1400, 1400)
        box, var, colours = _box_stats(png)
        assert box is not None, f"{element_id}: nothing drawn"
        width, height = box[2] - box[0], box[3] - box[1]
        assert width > 300 and height > 80, (element_id, box)
        assert var > 200 and colours >= 4, (element_id, var, colours)


def test_mosaic_run_writes_the_report_into_the_run_folder(copy):
    (copy / "report.html").unlink(missing_ok=True)
    out = invoke("run", "--resume", copy)  # a finished run: reprinted, nothing recomputed
    assert out.exit_code == 0, out.output
    html = (copy / "report.html").read_text(encoding="utf-8")
    assert all(f'id="{plot_id}"' in html for plot_id in PLOT_IDS)
    assert "report:" in out.output


# ---- a reopen cannot launder the log (issue 16) ----------------------------------------------


def _cut(run: Path, n: int) -> list[bytes]:
    """The log without its last `n` lines, the head left as it was (what an attacker or a bad
    restore leaves); returns the lines kept."""
    lines = _lines(run)[:-n]
    _write_lines(run, lines)
    return lines


def _name(line: int, raw: bytes) -> str:
    e = json.loads(raw)
    where = f", round {e['round']}" if e.get("round") is not None else ""
    return f"line {line} (seq {e['seq']}, {e['event']}{where})"


def test_a_truncated_log_refuses_every_reopen_and_keeps_its_head(copy):
    from mosaic.audit import AuditRefused

    head = (copy / "audit.head.json").read_bytes()
    kept = _cut(copy, 2)
    last_good = _name(len(kept), kept[-1])
    for args in (("run", "--resume", copy), ("chat", copy)):
        out = invoke(*args)
        assert out.exit_code == 2, (args, out.output)
        text = flat(out.output)
        assert f"the last good entry is {last_good}" in text, text
        assert "--repair-audit" in text and "Traceback" not in text
    with pytest.raises(AuditRefused, match=re.escape(f"the last good entry is {last_good}")):
        AuditLog(copy)  # any writer, not only the command line
    # nothing rewrote the head: the truncation is still there for --verify to name
    assert (copy / "audit.head.json").read_bytes() == head
    _fails(copy, f"line {len(kept) + 1} and after were removed (truncated)")


def test_a_missing_head_or_an_edited_last_line_refuses_to_reopen(copy, tmp_path):
    from mosaic.audit import AuditError, AuditRefused, repair_log

    edited = tmp_path / "edited"
    shutil.copytree(copy, edited)
    (copy / "audit.head.json").unlink()
    out = invoke("run", "--resume", copy)
    assert out.exit_code == 2 and "audit.head.json is missing" in flat(out.output)

    lines = _lines(edited)
    last = json.loads(lines[-1])
    last["data"]["rounds"] = 99
    lines[-1] = json.dumps(last, sort_keys=True).encode()
    _write_lines(edited, lines)
    with pytest.raises(AuditRefused, match="was changed after it was written"):
        AuditLog(edited)
    # an edit is not a lost tail: the repair flag does not accept it
    with pytest.raises(AuditError, match="restore audit.jsonl"):
        repair_log(edited)
    out = invoke("run", "--resume", edited, "--repair-audit")
    assert out.exit_code == 2 and "was changed after it was written" in flat(out.output)


def test_a_deleted_log_in_a_folder_with_results_refuses_to_reopen(copy):
    from mosaic.audit import AuditRefused

    (copy / "audit.jsonl").unlink()
    (copy / "audit.head.json").unlink()
    out = invoke("run", "--resume", copy)
    assert out.exit_code == 2, out.output
    assert "holds results (archive.json, round_0" in flat(out.output)
    assert "audit log is gone" in flat(out.output)
    with pytest.raises(AuditRefused, match="the log was deleted or emptied"):
        AuditLog(copy)
    assert not (copy / "audit.jsonl").exists()  # the refusal wrote nothing
    _fails(copy, "audit.jsonl does not exist")


def test_the_repair_flag_accepts_a_shortened_log_and_is_logged(copy):
    head = json.loads((copy / "audit.head.json").read_text())
    kept = _cut(copy, 2)
    out = invoke("run", "--resume", copy, "--repair-audit")
    assert out.exit_code == 0, out.output
    text = flat(out.output)
    assert f"its head recorded {head['count']} entries, {len(kept)} are left (2 lost" in text
    entry = json.loads(_lines(copy)[len(kept)])
    assert (entry["event"], entry["author"], entry["seq"]) == ("audit_repaired", "human",
                                                               len(kept) + 1)
    assert entry["data"]["lost"] == 2 and entry["data"]["head_count"] == head["count"]
    assert entry["data"]["head_last"] == head["last"]
    assert entry["data"]["last_good"] == _name(len(kept), kept[-1])
    assert "archive.json" in entry["files"]  # the folder as the person accepted it
    result = verify_run(copy)
    assert result.ok, result.problem
    assert len(result.repairs) == 1 and "2 lost" in result.repairs[0]
    shown = flat(invoke("audit", copy, "--verify").output)
    assert "repaired" in shown and "--repair-audit by human" in shown
    again = invoke("run", "--resume", copy)  # repaired once: reopens without the flag
    assert again.exit_code == 0, again.output


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_archive(run: Path) -> str:
    def change(a):
        a["points"][1]["eval"]["safety"] = 4.99
    _edit_json(run / "archive.json", change)
    return "archive.json"


def _edit_slice_mean(run: Path) -> str:
    # A slice mean only: every f (which the scores check compares) stays as logged.
    def change(r):
        r["reports"]["safety"]["slices"][0]["mean"] = 5.0
    _edit_json(run / "round_2" / "eval" / "eval_report.json", change)
    return "round_2/eval/eval_report.json"


def _edit_responses(run: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = run / "round_1" / "eval" / "boundary" / "responses.parquet"
    rows = pq.read_table(path).to_pylist()
    rows[0]["messages"][-1]["content"] = "a reply nobody generated"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return "round_1/eval/boundary/responses.parquet"


def _edit_samples(run: Path) -> str:
    import pyarrow.parquet as pq

    path = run / "round_3" / "heldout" / "instruction" / "samples.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(1), path)  # one judged sample dropped
    return "round_3/heldout/instruction/samples.parquet"


def _edit_proposal(run: Path) -> str:
    def change(p):
        p["rationale"] = "a better story, told afterwards"
    _edit_json(run / "round_2" / "proposals" / "0.json", change)
    return "round_2/proposals/0.json"


def _edit_round_summary(run: Path) -> str:
    def change(r):
        r["scores"]["safety"] = 4.99
    _edit_json(run / "round_1" / "round.json", change)
    return "round_1/round.json"


@pytest.mark.parametrize("edit", [_edit_archive, _edit_slice_mean, _edit_responses,
                                  _edit_samples, _edit_proposal, _edit_round_summary],
                         ids=lambda f: f.__name__.removeprefix("_edit_"))
def test_verify_names_an_edited_file_the_report_or_the_planner_reads(copy, edit):
    rel = edit(copy)
    problem = _fails(copy, f"{rel}: sha256 differs from the digest audit.jsonl line")
    assert "recorded: the file was changed after it was logged" in problem


def test_verify_recomputes_every_recorded_file(run_dir):
    result = verify_run(run_dir)
    recorded = {rel for raw in _lines(run_dir) for rel in json.loads(raw)["files"]}
    assert result.files == len(recorded) > 0
    for rel in ("archive.json", "round_0/eval/eval_report.json", "round_1/proposals/1.json",
                "round_2/eval/safety/report.json", "round_2/eval/safety/responses.parquet",
                "round_2/heldout/safety/samples.parquet", "round_3/dataset/train.parquet",
                "round_3/adapter/adapter_model.safetensors", "round_3/round.json"):
        assert rel in recorded, rel


def _forge(run: Path, seq: int, change) -> None:
    """Edit line `seq`, re-hash every line after it and rewrite the head: a consistent forgery
    that the chain alone cannot tell from the real log."""
    from mosaic.audit import GENESIS, line_hash

    lines = _lines(run)
    entries = [json.loads(raw) for raw in lines]
    change(entries[seq - 1])
    prev = line_hash(lines[seq - 2]) if seq > 1 else GENESIS
    for i in range(seq - 1, len(lines)):
        entries[i]["prev"] = prev
        lines[i] = json.dumps(entries[i], sort_keys=True, ensure_ascii=False).encode()
        prev = line_hash(lines[i])
    _write_lines(run, lines)
    (run / "audit.head.json").write_text(json.dumps({"count": len(lines), "last": prev}))


def test_expect_catches_a_consistently_rehashed_forgery(copy):
    out = invoke("audit", copy, "--anchor")
    assert out.exit_code == 0, out.output
    anchor = out.output.strip()
    n, digest = anchor.split(":")
    assert int(n) == len(_lines(copy)) and len(digest) == 64
    ok = invoke("audit", copy, "--verify", "--expect", anchor)
    assert ok.exit_code == 0 and "matches the anchor" in ok.output
    # the run grows after the anchor was taken: the anchored line still vouches for its past
    AuditLog(copy).append("human_decision", {"decision": "approve"}, round=3, author="human")
    assert verify_run(copy, expect=anchor).ok

    seq = _seq_of(copy, "verdict", 1)
    _forge(copy, seq, lambda e: e["data"].update(status="ok", problems=[]))
    assert verify_run(copy).ok  # the forgery is consistent: nothing else catches it
    problem = _fails_expect(copy, anchor)
    assert f"line {n} " in problem and "does not hash to the anchor" in problem
    # a forged, shorter history does not reach the anchored line at all
    _write_lines(copy, _lines(copy)[:int(n) - 3])
    _forge(copy, 1, lambda e: None)
    assert "names line" in _fails_expect(copy, anchor)
    bad = invoke("audit", copy, "--verify", "--expect", "not-a-digest")
    assert bad.exit_code == 2 and "N:<64 hex digits>" in flat(bad.output)


def _fails_expect(run: Path, anchor: str) -> str:
    result = verify_run(run, expect=anchor)
    assert not result.ok
    out = invoke("audit", run, "--verify", "--expect", anchor)
    assert out.exit_code == 1 and "verification FAILED" in flat(out.output)
    return result.problem


def test_an_hmac_key_signs_the_head_and_verify_checks_it(copy, tmp_path, monkeypatch):
    from mosaic.audit import AuditRefused, verify_log

    monkeypatch.setenv("MOSAIC_AUDIT_HMAC_KEY", "k3y-of-the-team")
    # A run started with the key: every append signs the head.
    signed = tmp_path / "signed"
    log = AuditLog(signed)
    log.append("run_started", {"rounds": 1, "planner": "heuristic"})
    log.append("run_finished", {"rounds": 1, "front": [0]})
    head = json.loads((signed / "audit.head.json").read_text())
    assert len(head["hmac"]) == 64
    check = verify_log(signed)
    assert check.ok and check.signed

    # rewritten without the key: forged line, re-hashed chain, the old signature kept
    _forge(signed, 2, lambda e: e["data"].update(rounds=7))
    forged = json.loads((signed / "audit.head.json").read_text())
    (signed / "audit.head.json").write_text(json.dumps({**forged, "hmac": head["hmac"]}))
    assert "HMAC signature does not match" in verify_log(signed).problem
    with pytest.raises(AuditRefused, match="HMAC signature does not match"):
        AuditLog(signed)
    (signed / "audit.head.json").write_text(json.dumps(forged))  # the signature stripped
    assert "is not signed, but MOSAIC_AUDIT_HMAC_KEY is set" in verify_log(signed).problem
    # another key, or none at all, cannot vouch for a signed head either
    (signed / "audit.head.json").write_text(json.dumps({**forged, "hmac": head["hmac"]}))
    assert "does not match" in verify_log(signed, environ={"MOSAIC_AUDIT_HMAC_KEY": "x"}).problem
    assert "MOSAIC_AUDIT_HMAC_KEY is not set" in verify_log(signed, environ={}).problem

    # the CLI on a real run: an unsigned head under a key fails, a signed one verifies
    out = invoke("audit", copy, "--verify")
    assert out.exit_code == 1 and "is not signed" in flat(out.output)
    lines = _lines(copy)
    count, last = len(lines), hashlib.sha256(lines[-1]).hexdigest()

    def sign(key: bytes) -> None:  # as documented: HMAC-SHA256 of "mosaic-audit-head\0N\0last"
        mac = hmac.new(key, f"mosaic-audit-head\0{count}\0{last}".encode(), "sha256")
        (copy / "audit.head.json").write_text(json.dumps({"count": count, "last": last,
                                                          "hmac": mac.hexdigest()}))
    sign(b"k3y-of-the-team")
    out = invoke("audit", copy, "--verify")
    assert out.exit_code == 0 and "head signature (HMAC) matches" in flat(out.output)
    sign(b"another key")
    out = invoke("audit", copy, "--verify")
    assert out.exit_code == 1 and "HMAC signature does not match" in flat(out.output)


# ---- typed, versioned records ----------------------------------------------------------------


def test_writers_refuse_data_that_does_not_fit_the_event_record(tmp_path):
    log = AuditLog(tmp_path / "run")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\].*RunStarted"):
        log.append("run_started", {"rounds": 1, "planner": "heuristic", "colour": "red"})
    with pytest.raises(ValueError, match="RunStarted: rounds"):
        log.append("run_started", {"rounds": "many", "planner": "heuristic"})
    with pytest.raises(ValueError, match="unknown audit event 'gossip'"):
        log.append("gossip", {})
    assert not (tmp_path / "run" / "audit.jsonl").exists()  # nothing half-written


def test_every_entry_of_a_run_parses_with_its_record(run_dir):
    from mosaic.audit import read_entries
    from mosaic.audit_events import ENTRY_VERSION, EVENT_MODELS, UnknownEvent

    entries = read_entries(run_dir)
    kinds = set()
    for e in entries:
        assert e.v == ENTRY_VERSION
        payload = e.payload()
        assert not isinstance(payload, UnknownEvent) and not payload.model_extra
        assert type(payload) is EVENT_MODELS[e.event]
        kinds.add(e.event)
    assert {"baseline", "proposal", "verdict", "revision", "refusal", "fallback", "executed",
            "manifest", "trained", "scores", "archive", "run_started",
            "run_finished"} <= kinds


def test_an_old_log_without_versions_or_digests_still_reads_and_verifies(copy):
    # As a run written before records were typed left it: no `v`, no `files`.
    from mosaic.audit import GENESIS, line_hash

    prev, lines = GENESIS, []
    for raw in _lines(copy):
        e = json.loads(raw)
        del e["v"], e["files"]
        e["prev"] = prev
        lines.append(json.dumps(e, sort_keys=True, ensure_ascii=False).encode())
        prev = line_hash(lines[-1])
    _write_lines(copy, lines)
    (copy / "audit.head.json").write_text(json.dumps({"count": len(lines), "last": prev}))
    result = verify_run(copy)
    assert result.ok, result.problem
    assert any(f"{len(lines)} entries predate file digests" in c for c in result.checked)
    report = build_audit_report(copy)
    assert report.log_ok and not report.warnings and len(report.rounds) == 4
    AuditLog(copy).append("human_decision", {"decision": "approve"}, round=3, author="human")
    assert verify_run(copy).ok  # a v2 entry appended to a v1 log
