"""The YAML schema of a raypeft run, validated at the boundary.

Every field a user can write lives in this package, typed, so that a bad file fails on the driver
before Ray starts, with one line naming the field path, what was expected and what was found
(``ConfigError``). Stage code receives the validated model and never re-checks types.

* ``base``: ``ConfigError`` and the strict base model;
* ``model``, ``data``, ``adapters``, ``stages``: the sections;
* ``run``: ``RunConfig``, the whole file, and the rules that tie sections together;
* ``loading``: strict YAML, ``--set`` overrides and one-line errors.
"""

from raypeft.pipeline.config.adapters import (
    ADAPTER_SPECS,
    AdaLoraSpec,
    AdapterSpec,
    AdaptionPromptSpec,
    BottleneckSpec,
    IA3Spec,
    LoHaSpec,
    LoKrSpec,
    LoraSpec,
    MultitaskPromptSpec,
    PrefixSpec,
    PromptSpec,
    PTuningSpec,
)
from raypeft.pipeline.config.base import ConfigError
from raypeft.pipeline.config.data import Columns, DataSpec, PairColumns, PairDataSpec, PromptDataSpec
from raypeft.pipeline.config.grpo import GRPOSpec, GroupKLSpec, RewardFunctionSpec
from raypeft.pipeline.config.loading import apply_overrides, load_config, parse_config
from raypeft.pipeline.config.model import ModelSpec, QuantizationSpec
from raypeft.pipeline.config.run import STAGES, EvalSpec, RunConfig, ScalingSpec, StageName, TrackingSpec
from raypeft.pipeline.config.stages import (DPOSpec, GenerationSpec, KLSpec, PPOSpec, RewardSpec, SFTSpec,
                                             StageSection)

__all__ = [
    "ADAPTER_SPECS", "STAGES", "AdaLoraSpec", "AdapterSpec", "AdaptionPromptSpec", "BottleneckSpec", "Columns",
    "ConfigError", "DPOSpec", "DataSpec", "EvalSpec", "GRPOSpec", "GenerationSpec", "GroupKLSpec", "IA3Spec",
    "KLSpec", "LoHaSpec", "LoKrSpec", "LoraSpec", "ModelSpec", "MultitaskPromptSpec", "PPOSpec", "PTuningSpec",
    "PairColumns", "PairDataSpec", "PrefixSpec", "PromptDataSpec", "PromptSpec", "QuantizationSpec",
    "RewardFunctionSpec", "RewardSpec", "RunConfig", "SFTSpec", "ScalingSpec", "StageName", "StageSection",
    "TrackingSpec", "apply_overrides", "load_config", "parse_config",
]
