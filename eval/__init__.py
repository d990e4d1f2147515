"""Objective types (plug-ins), judges, L3 -> L2 -> L1 aggregation and failure reports.

`eval/` knows nothing about training or planning. Importing it registers the built-in types.
"""

from mosaic.config import ConfigError, MosaicConfig
from mosaic.eval import ifeval, jailbreak, overrefusal  # noqa: F401  (registers the types)
from mosaic.eval.base import (FocusKey, ObjectiveType, get_objective_type, objective_type_names,
                              register_objective_type)
from mosaic.eval.judge import Judge

__all__ = ["FocusKey", "ObjectiveType", "build_judge", "check_objective_types", "get_objective_type",
           "objective_type_names", "register_objective_type"]


def check_objective_types(config: MosaicConfig, source: str = "the configuration") -> MosaicConfig:
    """Raise ConfigError (naming source, field and the known types) if an objective's type is
    not registered; return the config unchanged otherwise."""
    known = objective_type_names()
    bad = [f"  - objectives.{name}.type: unknown type {obj.type!r}; expected one of {known}"
           for name, obj in config.objectives.items() if obj.type not in known]
    if bad:
        raise ConfigError("\n".join([f"invalid configuration in {source}:", *bad]))
    return config


def build_judge(config: MosaicConfig) -> Judge:
    """The configured judge: rule-based (default, offline), the LLM judge, or the embedding
    judge (offline, for real text)."""
    if config.judge.kind == "llm":
        from mosaic.eval.llm_judge import LLMJudge

        assert config.judge.endpoint is not None  # the config validator guarantees it
        return LLMJudge(config.judge.endpoint, config.judge.cache_dir)
    if config.judge.kind == "embedding":
        from mosaic.eval.embedding_judge import EmbeddingJudge

        return EmbeddingJudge(config.judge.heads)
    from mosaic.eval.rule_judge import RuleJudge

    return RuleJudge()
