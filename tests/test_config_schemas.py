"""Config loading (YAML -> MOSAIC__ environment -> validated) and the exported record schemas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from mosaic.config import ConfigError, EndpointConfig, MosaicConfig, dump_config, load_config
from mosaic.eval import check_objective_types
from mosaic.schemas import DataAction, FailureReport, SampleRecord, json_schemas

ROOT = Path(__file__).resolve().parents[1]
SANDBOX = ROOT / "configs" / "sandbox.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# ---- config ----------------------------------------------------------------------------------


def test_sandbox_config_loads():
    cfg = load_config(SANDBOX, environ={})
    assert isinstance(cfg, MosaicConfig)
    assert {n: o.type for n, o in cfg.objectives.items()} == {
        "safety": "jailbreak", "boundary": "overrefusal", "instruction": "ifeval"}
    assert cfg.budget.max_tokens > 0 and cfg.loop.rounds >= 1
    # The resolved dump is itself a valid config (it is what a run folder keeps).
    again = MosaicConfig.model_validate(__import__("yaml").safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("yaml_text, field, expectation", [
    ("objectives: {s: {type: jailbreak}}\ntraining: {lora_r: 0}\n",
     "training.lora_r", "greater than or equal to 1"),
    ("objectives: {s: {type: jailbreak}}\ntraining: {lora_rank: 8}\n",
     "training.lora_rank", "unknown field"),
    ("objectives: {s: {type: jailbreak, target: 7}}\n", "objectives.s.target", "less than or equal to 5"),
    ("objectives: {s: {type: jailbreak}}\ninference: {backend: tgi}\n", "inference.backend",
     "'transformers', 'openai' or 'vllm'"),
    ("objectives: {s: {type: no_such_type}}\n", "unknown type 'no_such_type'", "expected one of"),
    ("objectives: {s: {type: jailbreak}}\nlimits: {floors: {other: 0.2}}\n", "limits.floors",
     "unknown objective 'other'"),
])
def test_wrong_field_names_file_field_and_expectation(tmp_path, yaml_text, field, expectation):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        # Objective type names are plug-ins: `mosaic.eval` checks them after loading.
        check_objective_types(load_config(path, environ={}), str(path))
    message = str(err.value)
    assert str(path) in message and field in message and expectation in message, message


def test_unreadable_configs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "objectives: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_environment_overrides_win_over_yaml():
    env = {"MOSAIC__loop__rounds": "2", "MOSAIC__objectives__safety__target": "4.0",
           "MOSAIC__budget__max_tokens": "1000", "UNRELATED": "x"}
    cfg = load_config(SANDBOX, environ=env)
    assert (cfg.loop.rounds, cfg.objectives["safety"].target, cfg.budget.max_tokens) == (2, 4.0, 1000)
    assert cfg.objectives["safety"].type == "jailbreak"  # siblings of an override survive
    explicit = load_config(SANDBOX, environ=env, overrides={"loop": {"rounds": 3}})
    assert explicit.loop.rounds == 3
    with pytest.raises(ConfigError, match="loop.rounds"):
        load_config(SANDBOX, environ={"MOSAIC__loop__rounds": "many"})


def test_config_is_frozen():
    cfg = load_config(SANDBOX, environ={})
    with pytest.raises(ValidationError):
        cfg.loop.rounds = 9


def test_api_key_never_appears_in_the_dumped_config(monkeypatch):
    monkeypatch.setenv("MOSAIC_TEST_KEY", "sk-test-secret-123")
    env = {"MOSAIC__judge__kind": "llm", "MOSAIC__judge__endpoint__model": "judge-model",
           "MOSAIC__judge__endpoint__base_url": "http://127.0.0.1:9/v1",
           "MOSAIC__judge__endpoint__api_key_env": "MOSAIC_TEST_KEY"}
    cfg = load_config(SANDBOX, environ=env)
    assert cfg.judge.endpoint.api_key() == "sk-test-secret-123"  # read at use time only
    dumped = dump_config(cfg)
    assert "sk-test-secret-123" not in dumped
    assert "MOSAIC_TEST_KEY" in dumped  # the variable's name is what the run keeps
    # A key cannot be smuggled into the config itself.
    with pytest.raises(ConfigError, match="judge.endpoint.api_key: unknown field"):
        load_config(SANDBOX, environ={**env, "MOSAIC__judge__endpoint__api_key": "sk-test-secret-123"})


def test_config_errors_do_not_echo_a_rejected_key():
    env = {"MOSAIC__judge__kind": "llm", "MOSAIC__judge__endpoint__model": "m",
           "MOSAIC__judge__endpoint__api_key": "sk-test-secret-123"}
    with pytest.raises(ConfigError) as err:
        load_config(SANDBOX, environ=env)
    assert "sk-test-secret-123" not in str(err.value)


KEY = "sk-test-SECRET123"


def test_a_yaml_syntax_error_names_line_and_column_but_quotes_no_content(tmp_path):
    path = write(tmp_path, 'objectives: {s: {type: jailbreak}}\njudge:\n  kind: llm\n'
                           f'  endpoint: {{model: m, api_key: "{KEY}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert str(path) in message and "not valid YAML" in message and "line " in message
    assert "SECRET123" not in message and "api_key" not in message


def test_api_key_env_must_name_a_variable_and_is_not_echoed(tmp_path):
    path = write(tmp_path, "objectives: {s: {type: jailbreak}}\n"
                           f"judge: {{kind: llm, endpoint: {{model: m, api_key_env: {KEY}}}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert "judge.endpoint.api_key_env" in message and "NAME of an environment variable" in message
    assert "SECRET123" not in message
    for bad in ("", "1ABC", "MY KEY", "sk-x"):
        with pytest.raises(ValidationError):
            EndpointConfig(model="m", api_key_env=bad)
    assert load_config(SANDBOX, environ={"MOSAIC__judge__endpoint__model": "m",
                                         "MOSAIC__judge__endpoint__api_key_env": "_My_Key2"})


def test_a_wrong_type_value_that_looks_like_a_key_is_not_echoed():
    with pytest.raises(ConfigError) as err:
        load_config(SANDBOX, environ={"MOSAIC__seed": KEY})
    message = str(err.value)
    assert "seed: Input should be a valid integer" in message
    assert "[set by environment variable MOSAIC__seed]" in message and "SECRET123" not in message
    # Ordinary wrong values are still shown: they are what the person needs to see.
    with pytest.raises(ConfigError, match=r"\(got 'many'\)"):
        load_config(SANDBOX, environ={"MOSAIC__loop__rounds": "many"})


def test_config_files_and_overrides_that_cannot_be_read_are_config_errors(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\nobjectives: {s: {type: jailbreak}}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(invalid byte at offset 9\)"):
        load_config(latin1, environ={})
    with pytest.raises(ConfigError) as err:
        load_config(SANDBOX, environ={"MOSAIC__budget__max_tokens": "[1,2"})
    message = str(err.value)
    assert "MOSAIC__budget__max_tokens: not a valid YAML value" in message and "[1,2" not in message


def test_a_bad_environment_override_names_the_variable():
    with pytest.raises(ConfigError) as err:
        load_config(SANDBOX, environ={"MOSAIC__loop__rounds": "-3"})
    assert "loop.rounds" in str(err.value)
    assert "environment variable MOSAIC__loop__rounds" in str(err.value)


def test_llm_roles_need_an_endpoint(tmp_path):
    with pytest.raises(ConfigError, match="needs an `endpoint`"):
        load_config(SANDBOX, environ={"MOSAIC__planner__kind": "llm"})


# ---- schemas ---------------------------------------------------------------------------------


def _refs(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


RECORDS = ["SampleRecord", "FailureReport", "EvalReport", "DataAction", "ActionVerdict",
           "DatasetManifest", "TrainResult", "RoundResult"]


def test_every_record_exports_a_self_contained_json_schema():
    schemas = json_schemas()
    assert set(RECORDS) <= set(schemas)
    for name, schema in schemas.items():
        json.dumps(schema)  # serialisable as is
        assert schema["title"] == name and schema["type"] == "object"
        assert schema.get("additionalProperties") is False, f"{name} must forbid unknown fields"
        for ref in _refs(schema):
            assert ref.startswith("#/$defs/") and ref.split("/")[-1] in schema["$defs"], (name, ref)
    assert schemas["DataAction"]["required"] == ["mixture"]


@pytest.mark.parametrize("name", RECORDS)
def test_every_record_carries_a_schema_version(name):
    assert "schema_version" in json_schemas()[name]["properties"]


def test_data_action_rejects_extra_fields_and_non_finite_thresholds():
    ok = {"mixture": {"safety": 0.5, "boundary": 0.5}, "quality_threshold": 4.0}
    assert DataAction.model_validate(ok).quality_threshold == 4.0
    with pytest.raises(ValidationError, match="budget"):
        DataAction.model_validate({**ok, "budget": 10**9})  # an action cannot carry a budget
    with pytest.raises(ValidationError, match="extra"):
        DataAction.model_validate({**ok, "objectives": {"safety": {"focus_ratio": 0.5, "code": "x"}}})
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError, match="finite"):
            DataAction.model_validate({**ok, "quality_threshold": bad})
    with pytest.raises(ValidationError, match="finite"):
        DataAction.model_validate_json('{"mixture": {"a": 1.0}, "quality_threshold": NaN}')
    with pytest.raises(ValidationError):
        DataAction.model_validate({**ok, "method": "rlhf"})


def test_records_round_trip_through_json():
    rec = SampleRecord(id="x", objective="safety",
                       messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       l1={"slice": "complexity_1", "score": 5, "valid": True, "weight": 1, "failure": False})
    assert SampleRecord.model_validate_json(rec.model_dump_json()) == rec
    with pytest.raises(ValidationError):
        SampleRecord.model_validate({**rec.model_dump(), "messages": [{"role": "bot", "content": "q"}]})
    with pytest.raises(ValidationError):
        FailureReport.model_validate({"objective": "s", "objective_type": "jailbreak", "round": 0,
                                      "f": None, "n": 0, "n_valid": 0, "score_distribution": {},
                                      "slices": [], "extra": 1})
