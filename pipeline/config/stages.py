"""The per-stage sections (``sft``, ``reward``, ``dpo``, ``ppo``; ``grpo`` in ``pipeline.config.grpo``):
optimisation settings and the adapter inputs of each stage.

Every section derives from ``StageSection``: a ``RunConfig`` field of such a type is what makes
its name a stage (``pipeline.config.run.STAGES``), and the stage's definition
(``pipeline.stages.registry``) must exist under that name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from raypeft.pipeline.config.base import StrictModel, adapter_ref
from raypeft.pipeline.config.data import PairDataSpec, PromptDataSpec


# What the training backend of every stage reads from the stage's section
# (``pipeline.stages.common.make_backend``).
BACKEND_FIELDS = ("learning_rate", "weight_decay", "warmup_steps", "lr_scheduler", "max_grad_norm")


class StageSection(StrictModel):
    """Base of every stage's section: one lacking a ``BACKEND_FIELDS`` field fails when its class
    is defined, not later in a worker."""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        missing = [f for f in BACKEND_FIELDS if f not in cls.model_fields]
        if missing:
            raise TypeError(f"{cls.__name__}: a stage section needs the fields {', '.join(missing)}")


ChunkedLoss = bool | Literal["auto"]  # YAML reads on/off as booleans


class SFTSpec(StageSection):
    """Optimisation settings of the SFT stage (per worker batch size)."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    # The loss without the full-vocabulary logits (pipeline/lm_head_loss.py): only labelled positions
    # projected, in chunks. true / false, or auto: on when the workers train on GPUs (where the logits'
    # memory is what runs out), off on CPU (small vocabularies, where the chunk loop costs more than it saves).
    chunked_loss: ChunkedLoss = "auto"
    # torch.compile the decoder stack for the training loop (pipeline/compilation.py): fewer, fused
    # kernels where a small model's step is bound by launching them; the first steps compile.
    compile: bool = False


class _PairStageSpec(StageSection):
    """Optimisation settings shared by the reward and DPO stages (``batch_size``: pairs per worker)."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    data: PairDataSpec = PairDataSpec()
    # torch.compile the decoder stack for the training loop and its evaluations, as sft.compile.
    compile: bool = False


class RewardSpec(_PairStageSpec):
    """Reward model: an adapter plus a scalar value head, Bradley-Terry loss on chosen/rejected.

    ``init_from`` is the adapter it starts from (default: the SFT stage's output); null starts a
    fresh adapter from the ``adapter`` block on the bare base. The value head always starts at zero.
    """

    init_from: str | None = "sft"

    @field_validator("init_from")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return adapter_ref(v)


class DPOSpec(_PairStageSpec):
    """Direct preference optimisation of the policy adapter against a frozen reference.

    ``policy_init``: the adapter the policy starts from (default: the SFT output; null: a fresh
    adapter). ``reference``: ``policy_init`` (a frozen copy of that adapter, or the bare base when
    the policy starts fresh), ``base`` (all adapters disabled), or any adapter input.
    """

    policy_init: str | None = "sft"
    reference: str = "policy_init"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    learning_rate: float = Field(default=5e-4, gt=0)
    chunked_loss: ChunkedLoss = "auto"  # the policy/reference log-probabilities without full logits, as SFT's

    @field_validator("policy_init", "reference")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return adapter_ref(v)


class GenerationSpec(StrictModel):
    """How an online stage samples responses (``generate`` settings; log-probs use the same
    temperature) and how the rollout engine (``pipeline.rollout_engine``) runs them.

    The engine settings change speed and memory, never the distribution sampled from:
    ``batch_size`` rows per ``generate`` call (None: the whole rollout batch at once; independent
    of the training minibatches); ``fold_adapter`` samples from a folded generation copy of the
    policy's weights (``W0 + delta``, a dense copy in the compute dtype; LoRA family only, not
    under ZeRO-3; other adapters sample unmerged), in which ``fuse_projections`` stacks the sibling
    projections a layer feeds one input (query/key/value, gate/up) into one matrix each
    (``adapters.generation_copy.SharedInput``); ``cache: static`` preallocates the KV cache,
    which ``compile`` lets transformers compile the decode step over (CUDA); ``prompt_bucket``
    left-pads prompts to a multiple of it so a static cache sees few distinct shapes.
    ``decode_loop``: ``hf`` calls transformers' ``generate``; ``own`` runs ``pipeline.decode_loop``
    (prefill into a static cache, then one fixed-shape step per token, a CUDA graph with
    ``compile``; ``cache`` does not apply to it) wherever it supports the call, else ``generate``;
    ``drop_finished`` (own loop only) moves the live rows to a smaller batch once they fit one.
    ``gather_weights`` (DeepSpeed ZeRO-3 only): gather the whole model on every rank once per
    ``generate`` call, instead of layer by layer at every token, and let each rank sample without
    waiting for the others (no ``synced_gpus``); every rank then holds the full weights while it
    samples, so it is off by default.
    """

    max_new_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    batch_size: int | None = Field(default=None, gt=0)
    fold_adapter: bool = False
    fuse_projections: bool = True
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    prompt_bucket: int = Field(default=0, ge=0)
    decode_loop: Literal["hf", "own"] = "hf"
    drop_finished: bool = False
    gather_weights: bool = False

    @field_validator("drop_finished")
    @classmethod
    def _drop_needs_own_loop(cls, v: bool, info) -> bool:
        if v and info.data.get("decode_loop") != "own":
            raise ValueError("needs decode_loop: own (generate keeps every row to the end)")
        return v


class KLSpec(StrictModel):
    """The per-token KL penalty to the reference: a fixed coefficient or an adaptive one.

    Adaptive (Ziegler et al. 2019) moves ``coef`` so the sequence KL tracks ``target`` (nats),
    at a speed set by ``horizon`` (in sampled sequences).
    """

    controller: Literal["fixed", "adaptive"] = "adaptive"
    coef: float = Field(default=0.05, ge=0)
    target: float = Field(default=6.0, gt=0)
    horizon: int = Field(default=10000, gt=0)


class PPOSpec(StageSection):
    """PPO of the policy adapter against the reward role, with a critic role for the values.

    Each of ``max_steps`` steps samples ``rollout_batch_size`` prompts per worker, scores the
    responses, then runs ``ppo_epochs`` passes over them in ``minibatches`` minibatches.
    ``critic_init``: the adapter the critic starts from (default: the reward model's, with a zero
    value head: the reward head scores whole responses, not the partial ones a critic is read at;
    a critic folder of its own keeps its head); null: a fresh adapter from the ``adapter`` block
    and a zero value head. The last
    ``eval_prompts`` prompts are held out: the policy's mean reward and KL on them are measured
    before training, every ``eval_every`` steps and after. ``normalize_scores``: the reward
    model's scores (after ``missing_eos_penalty``) centred and scaled by their running mean and
    std over all rollouts so far, before the KL shaping (``pipeline.rl_math.score_norm`` says why
    a zero critic needs it).
    """

    policy_init: str | None = "sft"
    reference: str = "policy_init"
    reward_adapter: str = "reward"
    critic_init: str | None = "reward"
    data: PromptDataSpec = PromptDataSpec()
    max_steps: int = Field(default=20, gt=0)
    rollout_batch_size: int = Field(default=16, gt=0)
    minibatches: int = Field(default=2, gt=0)
    ppo_epochs: int = Field(default=4, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    generation: GenerationSpec = GenerationSpec()
    kl: KLSpec = KLSpec()
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    cliprange: float = Field(default=0.2, gt=0)
    cliprange_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    normalize_scores: bool = True
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(default=None, ge=0)
    # The policy's and reference's log-probabilities of the response tokens (scoring and update)
    # projecting only the response positions, as DPO's; auto: on for GPU workers.
    chunked_loss: ChunkedLoss = "auto"
    eval_prompts: int = Field(default=64, ge=0)
    eval_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=10, gt=0)

    @field_validator("policy_init", "reference", "reward_adapter", "critic_init")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return adapter_ref(v)

    @field_validator("minibatches")
    @classmethod
    def _minibatches_divide(cls, v: int, info) -> int:
        batch = info.data.get("rollout_batch_size")
        if batch is not None and batch % v:
            raise ValueError(f"must divide ppo.rollout_batch_size ({batch})")
        return v

