"""Objective types (plug-ins), judges, L3 -> L2 -> L1 aggregation and failure reports.

`eval/` knows nothing about training or planning. Importing it registers the built-in types.
"""

from mosaic.config import ConfigError, EndpointConfig, MosaicConfig
from mosaic.eval import agentic, ifeval, jailbreak, overrefusal  # noqa: F401  (registers the types)
from mosaic.eval import agentdojo  # noqa: F401,E402  (registers the "agentdojo" call scorer; imports agentdojo lazily)
from mosaic.eval.base import (FocusKey, ObjectiveType, get_objective_type, objective_type_names,
                              register_objective_type)
from mosaic.eval.judge import Judge

__all__ = ["FocusKey", "ObjectiveType", "build_judge", "check_objective_types", "get_objective_type",
           "judge_model_warnings", "objective_type_names", "register_objective_type"]


def check_objective_types(config: MosaicConfig, source: str = "the configuration") -> MosaicConfig:
    """Raise ConfigError (naming source, field and the known types) if an objective's type is
    not registered; return the config unchanged otherwise."""
    known = objective_type_names()
    bad = [f"  - objectives.{name}.type: unknown type {obj.type!r}; expected one of {known}"
           for name, obj in config.objectives.items() if obj.type not in known]
    if bad:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *bad]))
    return config


def build_judge(config: MosaicConfig, *, request_cache: bool = True,
                record_endpoint_errors: bool = False) -> Judge:
    """The configured judge: rule-based (default, offline), the LLM judge, the embedding judge
    (offline, for real text), or a guard model with its fallback judge. `request_cache=False`
    turns off the LLM judge's per-request disk cache (for callers that cache whole rows
    themselves); `record_endpoint_errors` makes a request that fails for good that sample's
    failure instead of an exception."""
    judge = config.judge
    cache_dir = judge.cache_dir if request_cache else None

    def make(kind: str, endpoint: EndpointConfig | None) -> Judge:
        if kind == "llm":
            from mosaic.eval.llm_judge import LLMJudge

            assert endpoint is not None  # the config validators guarantee it
            return LLMJudge(endpoint, cache_dir, record_endpoint_errors=record_endpoint_errors)
        if kind == "embedding":
            from mosaic.eval.embedding_judge import EmbeddingJudge

            return EmbeddingJudge(judge.heads)
        from mosaic.eval.rule_judge import RuleJudge

        return RuleJudge()

    if judge.kind == "guard":
        from mosaic.eval.guard_judge import GuardJudge

        assert judge.endpoint is not None and judge.guard is not None
        fallback = (None if judge.guard.fallback == "none"
                    else make(judge.guard.fallback, judge.guard.fallback_endpoint))
        return GuardJudge(judge.endpoint, judge.guard, fallback,
                          record_endpoint_errors=record_endpoint_errors)
    return make(judge.kind, judge.endpoint)


def judge_model_warnings(config: MosaicConfig) -> list[str]:
    """Why the configured judge may not be trusted on the configured model's replies: a judge
    measured on the sandbox's text only (the rule judge, or a guard falling back to it) judging
    a model that is not the sandbox's base model, whose replies are not sandbox text."""
    judge = config.judge
    sandbox_only = judge.kind == "rule" or (judge.kind == "guard" and judge.guard is not None
                                            and judge.guard.fallback == "rule")
    served = config.inference.backend == "openai" and config.inference.endpoint is not None
    if not sandbox_only or (config.model.base == "sandbox" and not served):
        return []
    from mosaic.eval.rule_judge import RANGE_NOTE

    model = config.inference.endpoint.model if served else config.model.base  # type: ignore[union-attr]
    return [f"the rule judge labels the replies of {model}, which is not the sandbox's base "
            f"model; its atoms are measured on sandbox text only. {RANGE_NOTE} Check a judge on "
            f"your own labels with `mosaic judge-agreement --labels`, and prefer judge.kind: llm "
            f"or guard for a real model."]
