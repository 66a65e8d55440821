"""``RunConfig``: the whole YAML of a run, its sections and the locations derived from them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from raypeft.pipeline.config.adapters import TASK_ID_STAGES, AdapterSpec, AdaLoraSpec, LoraSpec, MultitaskPromptSpec
from raypeft.pipeline.config.base import StrictModel
from raypeft.pipeline.config.data import DataSpec
from raypeft.pipeline.config.grpo import GRPOSpec
from raypeft.pipeline.config.model import ModelSpec
from raypeft.pipeline.config.stages import DPOSpec, PPOSpec, RewardSpec, SFTSpec, StageSection
from raypeft.pipeline.deepspeed_configs import resolve as resolve_deepspeed


# the stages whose training loop can run the decoder stack compiled (``<stage>.compile``)
COMPILED_STAGES = ("sft", "reward", "dpo")


def check_adapter_setup(cfg: RunConfig) -> str | None:
    """Rules that tie the adapter block to the rest of the file; the first broken one as
    ``"<field path>: <problem>"`` (``None`` when all hold)."""
    adapter = cfg.adapter
    column = cfg.data.columns.task_id
    if column is not None and not isinstance(adapter, MultitaskPromptSpec):
        return f"data.columns.task_id: only adapter.method multitask_prompt reads task ids (method is '{adapter.method}')"
    if isinstance(adapter, MultitaskPromptSpec):
        if column is not None and adapter.task_id is not None:
            return "adapter.task_id: set a fixed task id or data.columns.task_id, not both"
        if (adapter.task_id or 0) >= adapter.num_tasks:
            return f"adapter.task_id: must be below adapter.num_tasks ({adapter.num_tasks}), got {adapter.task_id}"
        others = [s for s in cfg.stages if s not in TASK_ID_STAGES]
        if others:
            return (f"adapter.method: multitask_prompt needs task ids in every batch, which only the "
                    f"{'/'.join(TASK_ID_STAGES)} stage feeds; stages {others} cannot use it")
    if cfg.data.packing:
        if cfg.model.task_type != "CAUSAL_LM":
            return f"data.packing: needs a causal LM (model.task_type: CAUSAL_LM), got {cfg.model.task_type}"
        if hasattr(adapter, "num_virtual_tokens") or adapter.method in ("adaption_prompt", "llama_adapter"):
            return (f"data.packing: needs a weight-space adapter method (lora, ia3, loha, ...); method "
                    f"'{adapter.method}' adds virtual tokens, which would span the packed conversations")
    compiled = [s for s in cfg.stages if s in COMPILED_STAGES and getattr(cfg, s).compile]
    if compiled and getattr(cfg, "deepspeed", None) is not None:
        return (f"{compiled[0]}.compile: not with deepspeed (ZeRO-3 gathers each layer's weights in module hooks, "
                "which split the compiled graph at every layer); use deepspeed: null or compile: false")
    if isinstance(adapter, AdaLoraSpec) and getattr(cfg, "deepspeed", None) is not None:
        return ("deepspeed: adapter.method adalora allocates ranks from the gradients between backward and the "
                "optimiser step, which the DeepSpeed engine does not expose; use deepspeed: null")
    return None



# MLflow's limits on names it stores (registered model and experiment names).
MAX_MLFLOW_NAME = 256
REGISTRY_NAME_FORBIDDEN = ("/", ":", "@")


class EvalSpec(StrictModel):
    """Held-out ROUGE of generated responses, before and after a stage."""

    rouge: bool = True
    max_rows: int | None = Field(default=100, gt=0)
    max_new_tokens: int = Field(default=48, gt=0)
    batch_size: int = Field(default=32, gt=0)


class ScalingSpec(StrictModel):
    """Maps to Ray Train's ``ScalingConfig``: one worker per GPU or per CPU slot."""

    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    # On a cluster short of the workers' resources: how long to wait (asking an autoscaler for
    # them) before the stage fails; None waits as long as it takes.
    resource_wait_s: float | None = Field(default=600.0, gt=0, allow_inf_nan=False)

    @field_validator("resources_per_worker")
    @classmethod
    def _amounts(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        """Ray refuses a negative amount only when it schedules the workers, after the runs exist."""
        for key, amount in (v or {}).items():
            if not key.strip():
                raise ValueError("a resource name may not be blank")
            if amount < 0:
                raise ValueError(f"amounts must be 0 or more ({key}: {amount:g})")
        return v


class FailureSpec(StrictModel):
    max_failures: int = Field(default=0, ge=-1)


class TrackingSpec(StrictModel):
    """MLflow: a local SQLite store by default; a URI here or MLFLOW_TRACKING_URI overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    uri: str | None = None
    experiment: str = "raypeft"
    artifact_location: str | None = None
    register_adapter: bool = Field(default=True, alias="register")
    registered_model_name: str | None = None

    @field_validator("experiment")
    @classmethod
    def _experiment_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank (it names the MLflow experiment)")
        if len(v) > MAX_MLFLOW_NAME:
            raise ValueError(f"at most {MAX_MLFLOW_NAME} characters (MLflow's limit), got {len(v)}")
        return v

    @field_validator("registered_model_name")
    @classmethod
    def _model_name_registrable(cls, v: str | None) -> str | None:
        """MLflow's own rules, checked here: it refuses such a name only after the adapter is published."""
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be blank (null: <name>-<stage>)")
        bad = next((c for c in REGISTRY_NAME_FORBIDDEN if c in v), None)
        if bad is not None:
            raise ValueError(f"may not contain {bad!r} (MLflow refuses '/' and ':' in a registered model name, "
                             "and '@' would end it in a models:/NAME@ALIAS reference)")
        if v.strip() in (".", "..") or v != v.strip():
            raise ValueError("must be a plain name, without leading or trailing spaces, not '.' or '..'")
        if len(v) > MAX_MLFLOW_NAME:
            raise ValueError(f"at most {MAX_MLFLOW_NAME} characters, got {len(v)}")
        return v


class RunConfig(StrictModel):
    name: str = "raypeft"
    # Fed to torch generators as seed * 1000 + step * 7919 + rank and to datasets' shuffles,
    # which take 32-bit seeds: a larger one fails only inside the workers.
    seed: int = Field(default=0, ge=0, lt=2**32)
    output_dir: str = "outputs"
    stages: list[StageName] = Field(default=["sft"], min_length=1)  # StageName: defined below the class
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    adapter: AdapterSpec = LoraSpec()
    sft: SFTSpec = SFTSpec()
    reward: RewardSpec = RewardSpec()
    dpo: DPOSpec = DPOSpec()
    ppo: PPOSpec = PPOSpec()
    grpo: GRPOSpec = GRPOSpec()
    eval: EvalSpec = EvalSpec()
    scaling: ScalingSpec = ScalingSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    # The training engine of every stage: null = plain PyTorch (gradients all-reduced over the
    # workers); a shipped name (zero2, zero3, zero3_offload), a DeepSpeed JSON path or an inline
    # mapping = DeepSpeed with that config (``pipeline.deepspeed_configs``).
    deepspeed: Any = None

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_resolves(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError("expected a shipped config name, a DeepSpeed JSON path, a mapping or null")
        resolve_deepspeed(v)  # a bad name, a missing file or bad JSON fails here, on the driver
        return v

    def deepspeed_config(self) -> dict[str, Any] | None:
        """The resolved DeepSpeed config (a fresh dict), or None for plain PyTorch."""
        return resolve_deepspeed(self.deepspeed)

    @model_validator(mode="after")
    def _adapter_fits_the_run(self) -> "RunConfig":
        problem = check_adapter_setup(self)
        if problem:
            raise PydanticCustomError("cross_field", "{problem}", {"problem": problem})
        return self

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("must be letters, digits, '_', '.', '-' (it names runs and folders)")
        return v

    @field_validator("stages")
    @classmethod
    def _stages_once(cls, v: list[str]) -> list[str]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(f"each stage may appear once, '{repeated[0]}' appears {v.count(repeated[0])} times")
        return v

    # Resolved locations, made absolute on the driver so every worker agrees on them.
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return "sqlite:///" + str(Path("mlflow.db").resolve())

    def tracking_uri_field(self) -> str:
        """Where ``tracking_uri()`` came from, to name it in an error."""
        if not self.tracking.uri and os.environ.get("MLFLOW_TRACKING_URI"):
            return "MLFLOW_TRACKING_URI"
        return "tracking.uri"

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: the YAML's choice; else, for a tracking server
        (http/https), None so the server's own artifact root / proxy applies (a local folder would
        be the job's temporary working dir under ``ray job submit``); else ./mlartifacts."""
        if self.tracking.artifact_location:
            return self.tracking.artifact_location
        if self.tracking_uri().startswith(("http://", "https://")):
            return None
        return Path("mlartifacts").resolve().as_uri()

    def registered_name(self, stage: str) -> str:
        return self.tracking.registered_model_name or f"{self.name}-{stage}"

    def stage_adapter_dir(self, stage: str) -> Path:
        """Where ``stage`` publishes its adapter; a stage-name adapter input resolves here."""
        return self.output_path() / stage / "adapter"


def stage_sections(model: type[StrictModel]) -> tuple[str, ...]:
    """Names of ``model``'s ``StageSection`` fields, in declaration order."""
    return tuple(name for name, f in model.model_fields.items()
                 if isinstance(f.annotation, type) and issubclass(f.annotation, StageSection))


# The stages, in the order of their sections above: the one list of stage names. Also the values
# an adapter-input field (``reward.init_from``, ``ppo.policy_init``, ...) may take besides a folder
# or a ``models:/`` / ``runs:/`` URI: a stage name means that stage's published adapter in this
# workflow (``<output_dir>/<name>/<stage>/adapter``). A new stage is a new section field.
STAGES = stage_sections(RunConfig)
StageName = Literal[STAGES]  # type: ignore[valid-type]  # built from the sections, so never a second list
RunConfig.model_rebuild()  # resolves ``stages: list[StageName]``
