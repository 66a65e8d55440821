"""The ``grpo`` section: critic-free, group-sampled policy optimisation with programmable rewards.

One stage, four advantage estimators chosen by ``algorithm`` (``pipeline.rl_math.group_advantages``):
``grpo`` (group mean and std), ``dr_grpo`` (group mean only), ``rloo`` (leave-one-out mean),
``reinforce_pp`` (returns whitened over the whole batch of every worker). The reward of a
completion is the weighted sum of the ``rewards`` functions (``pipeline.rewards``) and, with
``reward_adapter``, of a learned reward model's score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from raypeft.pipeline.config.base import StrictModel, adapter_ref
from raypeft.pipeline.config.data import PromptDataSpec
from raypeft.pipeline.config.stages import ChunkedLoss, GenerationSpec, StageSection

ALGORITHMS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
# The metrics label of the learned reward model's score (beside each function's own label).
REWARD_MODEL_LABEL = "reward_model"
# ``grpo.data.source`` value: the train rows of the ``data`` block (what SFT trains on), every
# column kept, so a reward function can compare a completion with the row's reference answer.
SFT_ROWS_SOURCE = "sft"


def _absolute_file_source(source: str) -> str:
    """``path/to/file.py:function`` with the path made absolute (the driver's working directory):
    workers run elsewhere and get the config, not the driver's cwd. Other sources unchanged."""
    target, sep, attr = source.rpartition(":")
    if not sep or not (target.endswith(".py") or "/" in target or "\\" in target):
        return source
    path = Path(target).expanduser()
    return source if path.is_absolute() else f"{path.resolve()}:{attr}"


class RewardFunctionSpec(StrictModel):
    """One reward function: ``module:function``, ``path/to/file.py:function`` or a built-in's name
    (``rouge_l``, ``exact_match``, ``format_check``), its weight in the total, its metrics label
    (default: the function's name) and fixed keyword options (``kwargs``)."""

    function: str
    weight: float = 1.0
    name: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("function")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank ('module:function', 'path/to/file.py:function' or a built-in)")
        return _absolute_file_source(v.strip())

    @field_validator("name")
    @classmethod
    def _label(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank (null: the function's own name)")
        return v


class GroupKLSpec(StrictModel):
    """KL to the reference, added to each token's loss (``reinforce_pp``: to each token's reward).

    ``coef: 0`` switches it off, and then no training step runs the reference at all.
    """

    coef: float = Field(default=0.0, ge=0)
    estimator: Literal["k1", "k3"] = "k3"


class GRPOSpec(StageSection):
    """Group-sampled policy optimisation of the policy adapter; no critic.

    A run needs at least one reward source (``rewards`` or ``reward_adapter``): checked in
    preflight, as the defaults of a section that is not run have none.

    Each of ``max_steps`` steps, every worker takes ``prompts_per_step`` prompts and samples
    ``num_generations`` completions for each (a group, kept whole on that worker), scores them,
    computes advantages within its groups, then runs ``update_epochs`` passes over the rollout in
    ``minibatches`` minibatches of whole groups. ``clip_low`` / ``clip_high``: the ratio's clip
    range below / above 1 (``clip_high`` > ``clip_low``: DAPO's clip-higher; null: symmetric).
    ``loss_normalisation``: ``sequence`` (GRPO), ``token`` (DAPO) or ``constant`` (Dr. GRPO;
    divides by ``generation.max_new_tokens``). ``filter_zero_variance``: leave groups whose
    rewards are all equal out of the loss. The last ``eval_prompts`` prompt rows are held out:
    the mean reward of every source on them (one sampled completion each) and the KL to the
    reference are measured before and after training.

    ``data``: prompt rows; ``column`` is the prompt, every other column of a row goes to the reward
    functions under its own name (e.g. a reference ``summary``). ``source: sft`` reads the train
    rows of the ``data`` block (what SFT trains on; the held-out ROUGE rows stay disjoint),
    ``demo`` the demo's prompts (no reference column), anything else a file or hub dataset.
    """

    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    policy_init: str | None = "sft"
    reference: str = "policy_init"
    rewards: list[RewardFunctionSpec] = Field(default_factory=list)
    reward_adapter: str | None = None
    reward_adapter_weight: float = Field(default=1.0, allow_inf_nan=False)
    data: PromptDataSpec = PromptDataSpec()
    num_generations: int = Field(default=8, gt=0)
    prompts_per_step: int = Field(default=4, gt=0)
    minibatches: int = Field(default=1, gt=0)
    update_epochs: int = Field(default=1, gt=0)
    max_steps: int = Field(default=20, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    generation: GenerationSpec = GenerationSpec()
    clip_low: float = Field(default=0.2, gt=0, lt=1)
    clip_high: float | None = Field(default=0.28, gt=0)
    loss_normalisation: Literal["sequence", "token", "constant"] = "sequence"
    kl: GroupKLSpec = GroupKLSpec()
    gamma: float = Field(default=1.0, ge=0, le=1)
    filter_zero_variance: bool = False
    # The policy's and reference's log-probabilities of the completion tokens (scoring and update)
    # projecting only the completion positions, as DPO's; auto: on for GPU workers.
    chunked_loss: ChunkedLoss = "auto"
    eval_prompts: int = Field(default=64, ge=0)
    eval_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=10, gt=0)

    @field_validator("policy_init", "reference", "reward_adapter")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return adapter_ref(v)

    @field_validator("minibatches")
    @classmethod
    def _minibatches_divide(cls, v: int, info) -> int:
        prompts = info.data.get("prompts_per_step")
        if prompts is not None and prompts % v:
            raise ValueError(f"must divide grpo.prompts_per_step ({prompts}) so every minibatch holds whole groups")
        return v

    @model_validator(mode="after")
    def _sources_and_groups(self) -> "GRPOSpec":
        problem = self._problem()
        if problem:
            raise PydanticCustomError("cross_field", "{problem}", {"problem": problem})
        return self

    def _problem(self) -> str | None:
        if self.algorithm != "reinforce_pp" and self.num_generations < 2:
            return (f"grpo.num_generations: {self.algorithm} needs at least 2 completions per prompt (the group "
                    f"is the baseline), got {self.num_generations}")
        labels = [r.name or r.function.rpartition(":")[2] for r in self.rewards]
        if self.reward_adapter is not None and REWARD_MODEL_LABEL in labels:
            i = labels.index(REWARD_MODEL_LABEL)
            return (f"grpo.rewards[{i}].name: '{REWARD_MODEL_LABEL}' labels the grpo.reward_adapter's score; "
                    "give the function another name")
        return None
