"""What the driver knows about a stage: one ``Stage`` value, declared in the stage's own module.

A stage module ends with its ``STAGE = Stage(...)``; ``pipeline.stages.registry`` collects them,
and everything outside the stage (the workflow, preflight, input-adapter resolution, sweeps, the
CLI) asks the registry instead of branching on a stage's name. So a new stage is its module, its
config section (a ``StageSection`` field of ``RunConfig``) and one registry line; a part left out
fails when the registry is imported, not in a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from raypeft.pipeline.config import RunConfig, StageSection
from raypeft.pipeline.evaluation import ROUGE_TYPES
from raypeft.pipeline.preflight_checks import Warn

# A reference input may name, besides any adapter input, the input of the role it ``follows``
# (``policy_init``: a frozen copy of the policy's starting adapter) or ``base`` (every adapter off).
POLICY_INIT = "policy_init"
BASE = "base"

# Metrics ``raypeft run`` prints for every stage (exact keys; the rest of a run's metrics are in MLflow).
ALWAYS_SHOWN = ("train_seconds", "tokens_per_s")

# Metrics every stage logs (``pipeline.stages.common``: resource figures, the published adapter's
# size) and the held-out ROUGE of the stages that generate; a stage's ``metrics`` add its own.
COMMON_METRICS = ("step", "done", "learning_rate", "tokens_per_s", "tokens_per_s_per_worker", "train_seconds",
                  "peak_rss_mib", "peak_gpu_allocated_mib", "peak_gpu_reserved_mib", "workers", "zero_stage",
                  "trainable_params", "total_params", "adapter_size_bytes")
ROUGE_METRICS = tuple(f"{r}_{when}" for r in ROUGE_TYPES for when in ("before", "after"))


def before_after(*names: str) -> tuple[str, ...]:
    """``names`` as logged during training and as the ``_before`` / ``_after`` figures of the stage."""
    return names + tuple(f"{n}_{when}" for n in names for when in ("before", "after"))


BatchShape = tuple[int, int]  # (micro-batch rows per worker, micro-batches per optimiser step)
InputFields = dict[str, tuple[str, str | None]]  # {role: (config field path, value)}


@dataclass(frozen=True)
class AdapterInput:
    """One input adapter of a stage: the role it fills and the config field (a dotted path) naming it.

    ``follows``: this is a reference role, and ``policy_init`` in its field means the input of the
    role named here (``base``: no adapter). ``reward_model``: the input must be given (unless
    ``optional``: the stage has other reward sources) and, when it exists already, carry a value
    head (the output of a reward stage).
    """

    role: str
    field: str
    follows: str | None = None
    reward_model: bool = False
    optional: bool = False

    def raw(self, cfg: RunConfig) -> str | None:
        """The field's value as written in the config."""
        node: Any = cfg
        for part in self.field.split("."):
            node = getattr(node, part)
        return node


@dataclass(frozen=True)
class Stage:
    """One stage, as the driver sees it.

    ``section``: the class of its config section (``RunConfig.<name>``); ``train_loop``: what each
    Ray Train worker runs; ``inputs``: its input adapters, in resolution order; ``batch``: its
    batch shape, which a DeepSpeed config's batch fields must agree with; ``check_data``: loads and
    checks on the driver every row source its loop reads (``tokenizer``: counts or refuses rows
    over ``data.max_length``); ``summary_metrics``: prefixes of the final metrics ``raypeft run``
    prints; ``causal_lm_only``: refuses a ``model.task_type`` other than ``CAUSAL_LM``;
    ``metrics``: the names the loop logs (besides ``COMMON_METRICS``; names with a ``/``, such as
    ``x/rank0`` or per-reward-function figures, are open-ended), which a sweep's metric is
    checked against before any trial trains.
    """

    name: str
    section: type[StageSection]
    train_loop: Callable[[dict[str, Any]], None]
    inputs: tuple[AdapterInput, ...]
    batch: Callable[[RunConfig], BatchShape]
    check_data: Callable[[RunConfig, Any, Warn], None]
    summary_metrics: tuple[str, ...]
    causal_lm_only: bool = True
    metrics: tuple[str, ...] = ()

    def logged_metrics(self) -> frozenset[str]:
        return frozenset(COMMON_METRICS + self.metrics)

    def __post_init__(self) -> None:
        roles = [i.role for i in self.inputs]
        if len(set(roles)) != len(roles):
            raise TypeError(f"stage {self.name}: an input role appears twice in {roles}")
        for i in self.inputs:
            if i.follows is not None and i.follows not in roles[:roles.index(i.role)]:
                raise TypeError(f"stage {self.name}: input '{i.role}' follows '{i.follows}', "
                                "which is not an input declared before it")

    def input_fields(self, cfg: RunConfig) -> InputFields:
        """``{role: (field path, value)}``, a reference's ``policy_init`` / ``base`` already
        rewritten to the followed role's value / None."""
        raw = {i.role: i.raw(cfg) for i in self.inputs}
        out: InputFields = {}
        for i in self.inputs:
            value = raw[i.role]
            if i.follows is not None and value == POLICY_INIT:
                value = raw[i.follows]
            elif i.follows is not None and value == BASE:
                value = None
            out[i.role] = (i.field, value)
        return out

    def summary(self, metrics: dict[str, Any]) -> dict[str, float]:
        """The final metrics worth a line on the terminal: numbers, whole-run (no ``/rank<i>``)."""
        return {k: v for k, v in metrics.items()
                if isinstance(v, (int, float)) and "/rank" not in k
                and (k.startswith(self.summary_metrics) or k in ALWAYS_SHOWN)}
