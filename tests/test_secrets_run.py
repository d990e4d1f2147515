"""No secret reaches a terminal or the run folder (issue 16, item 5): a real `mosaic run` whose
LLM planner talks to a local server that echoes the credentials it was sent in normal 200
replies, with keys planted in every form a key takes (short, Basic, URL userinfo, URL query,
the raw key in a 200 reply, its masked and base64 forms). Every byte of stdout, stderr and every
file of the run folder (config.yaml, audit log, checkpoint database, report.html, proposals)
is scanned: zero hits."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from openai_server import Text
from typer.testing import CliRunner

from mosaic.cli import app

SHORT_KEY = "kQ7zX"  # the planner's key: shorter than any key-shaped pattern
LONG_KEY = "LongKeyZq0123456789abcdefXYZ"  # the chat endpoint's key (never sent)
USER, PASSWORD = "alice", "PW-userinfo-77"
QUERY_KEY = "QK-query-88"
MASKED = f"{LONG_KEY[:4]}...{LONG_KEY[-4:]}"
B64_LONG = base64.b64encode(LONG_KEY.encode()).decode()
B64_BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
PLANTED = {"short": SHORT_KEY, "long": LONG_KEY, "userinfo": PASSWORD, "query": QUERY_KEY,
           "masked": MASKED, "base64": B64_LONG.rstrip("="), "basic": B64_BASIC.rstrip("=")}
ACTION = {"mixture": {"safety": 0.5, "boundary": 0.3, "instruction": 0.2}, "method": "sft"}
# What the server says back in a 200 reply: the header it got (Bearer + short key), the path
# and every other form of the keys.
ECHO = (f"You sent {{authorization}} to {{path}}. Your key is {SHORT_KEY}. Other keys: "
        f"{LONG_KEY}, shown as {MASKED}, encoded {B64_LONG}; Authorization: Basic {B64_BASIC}; "
        f"http://{USER}:{PASSWORD}@example.test/v1?api_key={QUERY_KEY}")


def _hits(blob: bytes) -> list[str]:
    return [form for form, value in PLANTED.items() if value.encode() in blob]


@pytest.mark.slow
def test_no_planted_key_in_any_form_reaches_the_terminal_or_the_run_folder(
        openai_server, tiny_run_config, tmp_path):
    openai_server.responder = lambda body: Text(
        json.dumps({**ACTION, "rationale": ECHO}), echo=True)
    settings = tiny_run_config.model_dump(mode="json")
    settings.update(run_dir=str(tmp_path / "run"), loop={"rounds": 1})
    for objective in settings["objectives"].values():
        objective["heldout"] = None  # the eval sets are enough to carry the run; faster
    settings["planner"] = {"kind": "llm", "max_revisions": 0,
                           "endpoint": {"base_url": openai_server.base_url, "model": "p",
                                        "api_key_env": "PLANNER_KEY", "timeout_s": 30,
                                        "max_retries": 0}}
    # Never contacted in a run: its URL and key are in the settings only.
    settings["chat"] = {"endpoint": {
        "base_url": f"http://{USER}:{PASSWORD}@127.0.0.1:9/v1?api_key={QUERY_KEY}",
        "model": "c", "api_key_env": "CHAT_KEY"}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOSAIC__")}
    env.update(PLANNER_KEY=SHORT_KEY, CHAT_KEY=LONG_KEY, COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "mosaic", "run", str(config)], cwd=tmp_path,
                          env=env, capture_output=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out.decode(errors="replace")[-3000:]

    # Output without a terminal is a log: one line per stage with its figures, no library
    # progress bars or FutureWarnings (issue 16, item 8).
    text = out.decode(errors="replace")
    assert "Loading weights" not in text and "FutureWarning" not in text, text[-3000:]
    assert re.search(r"baseline · baseline done in [\d.]+s: eval \w+ \d\.\d{3}", text), text
    assert re.search(r"round 1/1 · build done in [\d.]+s: [\d,]+ rows, [\d,]+ tokens", text)
    assert re.search(r"round 1/1 · train done in [\d.]+s: [\d,]+ rows, [\d,]+ tokens, "
                     r"[\d,]+ steps, final loss", text)
    assert re.search(r"round 1/1 · evaluate done in [\d.]+s: eval \w+ \d", text)

    # The server did receive and echo them: the scan below is not vacuous.
    sent = [r for r in openai_server.requests if r.answer == "text"]
    assert sent and sent[0].headers["authorization"] == f"Bearer {SHORT_KEY}"
    assert _hits(ECHO.encode()) == list(PLANTED)
    assert _hits(out) == [], out.decode(errors="replace")[-3000:]
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "audit.jsonl", "checkpoints.sqlite", "report.html"} <= names, \
        (names, out.decode(errors="replace")[-3000:])
    leaked = {str(p.relative_to(run)): _hits(p.read_bytes()) for p in files}
    assert {p: h for p, h in leaked.items() if h} == {}
    # The echo did reach the run, redacted: the planner's rationale is in the audit log.
    audit = (run / "audit.jsonl").read_text()
    assert "Your key is <redacted>" in audit and "Bearer <redacted>" in audit
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["chat"]["endpoint"]["base_url"] == "http://***@127.0.0.1:9/v1?api_key=***"


def test_mosaic_config_shows_url_credentials_as_stars_and_resume_asks_for_them(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    url = f"https://{USER}:{PASSWORD}@llm.example/v1?api_key={QUERY_KEY}&region=eu"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "objectives": {"safety": {"type": "jailbreak"}},
        "judge": {"kind": "llm", "endpoint": {"base_url": url, "model": "m"}}}))
    result = CliRunner().invoke(app, ["config", str(config)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "base_url: https://***@llm.example/v1?api_key=***&region=eu" in result.output
    assert _hits(result.output.encode()) == []

    # A run folder holds the masked URL; a client on it refuses to send anything, and resuming
    # names the variable that gives the URL again.
    from mosaic.config import dump_config, load_config
    from mosaic.llm import EndpointError, make_client
    from mosaic.run_store import saved_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(config, environ={})))
    saved = saved_config(run)
    with pytest.raises(EndpointError, match=r"credentials masked \(\*\*\*\)"):
        make_client(saved.judge.endpoint)
    from mosaic.cli import _saved_run

    _saved_run(run)
    note = " ".join(capsys.readouterr().out.split())
    assert "judge.endpoint.base_url had credentials" in note
    assert "MOSAIC__judge__endpoint__base_url=" in note
    given = load_config(run / "config.yaml", environ={"MOSAIC__judge__endpoint__base_url": url})
    assert given.judge.endpoint.base_url == url  # the override restores it


def test_redact_forms(monkeypatch):
    import mosaic.redact as redact_module
    from mosaic.redact import redact, register_secrets

    monkeypatch.setattr(redact_module, "_registered", set())  # this test's keys stay here

    register_secrets(["z9Q", LONG_KEY])
    basic = base64.b64encode(b"u:" + LONG_KEY.encode()).decode()
    cases = {
        "key z9Q.": "key <redacted>.",  # any length, where it stands alone
        "buzz9Qs stays": "buzz9Qs stays",  # not inside another word
        f"Authorization: Basic {basic}": "Authorization: Basic <redacted>",
        "a basic question": "a basic question",  # the everyday word is not a credential
        f"{LONG_KEY[:4]}****{LONG_KEY[-4:]}": "<redacted>",
        f"{LONG_KEY[:4]}\u2026{LONG_KEY[-4:]}": "<redacted>",
        base64.urlsafe_b64encode(LONG_KEY.encode()).decode().rstrip("="): "<redacted>",
        "see https://tok3n@h.example/x?sig=abc&q=1": "see https://***@h.example/x?sig=***&q=1",
    }
    for text, want in cases.items():
        assert redact(text) == want, text
