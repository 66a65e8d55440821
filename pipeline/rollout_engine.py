"""The one generation path of PPO, the GRPO family and held-out evaluation.

``generate(model, adapter, input_ids, attention_mask, ...)`` returns the new tokens of every
left-padded prompt row, ``[B, T]`` right-padded with the pad id, whatever levers are on
(``GenerationSpec``):

- ``batch_size``: rows per ``generate`` call, set apart from the training minibatch (a rollout
  of 512 completions need not fit one KV cache, and a small update minibatch should not make
  generation slow);
- ``fold_adapter``: sample from a folded generation copy of the adapter's weights
  (``adapters.generation_copy``: a dense ``W0 + delta`` per LoRA layer, refreshed before each
  call, swapped in only while generating; the base parameters are never written). Not under
  ZeRO-3 (the weights are partitioned) nor for adapters that do not fold: those sample unmerged;
- ``cache: static`` (a preallocated KV cache) with ``compile`` (transformers compiles the
  decode step; CUDA); virtual-token adapters keep the dynamic cache their prefix lives in;
- ``prompt_bucket``: extra left padding to a multiple of it, so a static cache and a compiled
  step see a few prompt shapes instead of one per batch. Left padding is masked out and the
  position ids follow the mask, so it changes no token;
- ``decode_loop: own``: our decode loop (``pipeline.decode_loop``: a static cache, one CUDA-graphed
  step per token with ``compile``, sampling in the graph, ``drop_finished`` to shrink the batch as
  rows end) instead of ``generate``. It runs the plain transformers model under the adapter, so
  virtual-token adapters (whose prefix ``generate`` feeds), per-row inputs (``task_ids``), ZeRO-3
  (``synced_gpus``), extra ``generate`` keywords and settings it does not implement take
  ``generate``; :meth:`RolloutEngine.own_plan` says which and why.

Greedy decoding through the engine gives today's unmerged tokens (fp32 on CPU: the same tokens;
``tests/pipeline/test_rollout_engine.py``). A later external engine (vLLM behind a Ray actor)
would sit behind the same function.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raypeft.adapters.generation_copy import GenerationCopy, foldable
from raypeft.adapters.model import AdapterModel
from raypeft.adapters.virtual_tokens import PromptLearningConfig
from raypeft.pipeline.config import GenerationSpec
from raypeft.pipeline.decode_loop import DecodeLoop, DecodePlan, plan_decode


def _partitioned(model: nn.Module) -> bool:
    """ZeRO-3 partitions parameters (they carry a ``ds_id``); a folded copy cannot be read from them."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _is_virtual(model: nn.Module, adapter: str | None) -> bool:
    config = getattr(model, "peft_config", {}).get(adapter) if adapter is not None else None
    return isinstance(config, PromptLearningConfig)


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under an ``AdapterModel`` (its forward, for weight-space adapters)."""
    return model.get_base_model() if isinstance(model, AdapterModel) else model


def bucket_left(input_ids: torch.Tensor, attention_mask: torch.Tensor, bucket: int,
                pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to the next multiple of ``bucket`` columns (masked out)."""
    width = input_ids.shape[1]
    extra = (-width) % bucket if bucket > 0 else 0
    if extra == 0:
        return input_ids, attention_mask
    return F.pad(input_ids, (extra, 0), value=pad_id), F.pad(attention_mask, (extra, 0), value=0)


@contextlib.contextmanager
def input_grad_hooks_off(model: nn.Module) -> Iterator[None]:
    """Remove transformers' "make the embeddings' output require grad" hooks while generating.

    k-bit preparation and gradient checkpointing register them (``enable_input_require_grads``)
    so adapters under a frozen base get gradients. Under ``no_grad`` they do nothing, but a
    compiled decode step cannot trace ``requires_grad_()``: it breaks the graph before the first
    layer, dynamo then compiles each decoder layer as its own frame, specialises on the layer
    index and falls back to eager after its recompile limit (measured on an H200 with a 4-bit 1B
    base: half the layers ran eager). The hooks come back after the call.
    """
    owners = [m for m in model.modules() if getattr(m, "_require_grads_hooks", None)]
    for owner in owners:
        owner.disable_input_require_grads()
    try:
        yield
    finally:
        for owner in owners:
            owner.enable_input_require_grads()


class RolloutEngine:
    """Generation settings plus the folded copies it keeps between calls (one per adapter name).

    ``width_multiple``: how ``rollout.sample`` lays out what it sampled for scoring and the update
    (rows right-padded to a multiple of it; the stages pass ``data.pad_to_multiple_of``); it does
    not change generation.
    """

    def __init__(self, spec: GenerationSpec, width_multiple: int | None = None) -> None:
        self.spec = spec
        self.width_multiple = width_multiple
        self._copies: dict[str, GenerationCopy] = {}
        self.loop = DecodeLoop(compile=spec.compile, drop_finished=spec.drop_finished)
        self.last_path = ""  # "own" or "hf": how the last call generated (tests and benchmarks read it)
        self.last_gathered = False  # whether the last call ran on weights gathered once (gather_weights)
        self._whole_model: Callable[[], contextlib.AbstractContextManager] | None = None

    def gather_with(self, whole_model: Callable[[], contextlib.AbstractContextManager]) -> None:
        """The training backend's ``whole_model`` (``pipeline.backends``): with ``gather_weights``,
        a call on ZeRO-3 partitioned weights runs inside it, once per call."""
        self._whole_model = whole_model

    def reserve(self, prompt_tokens: int) -> None:
        """Tell the own loop the longest prompt a run will sample for (its compiled step then
        allocates the cache it needs once, instead of recompiling as longer prompts turn up)."""
        bucket = self.spec.prompt_bucket
        width = -(-prompt_tokens // bucket) * bucket if bucket > 0 else prompt_tokens
        self.loop.reserve(width + self.spec.max_new_tokens)

    def folds(self, model: nn.Module, adapter: str | None, generate_kwargs: dict[str, Any]) -> bool:
        """Whether this call samples from a folded copy."""
        return (self.spec.fold_adapter and adapter is not None and not generate_kwargs.get("synced_gpus")
                and not _partitioned(model) and foldable(model, adapter))

    def own_plan(self, model: nn.Module, adapter: str | None, *, sampling: dict[str, Any],
                 eos_token_id: int | list[int] | None, pad_token_id: int, max_new_tokens: int,
                 generate_kwargs: dict[str, Any] | None = None,
                 row_inputs: dict[str, torch.Tensor] | None = None) -> DecodePlan | str:
        """The own loop's plan for this call, or why it goes through ``generate`` (a reason)."""
        if self.spec.decode_loop != "own":
            return "decode_loop: hf"
        if _is_virtual(model, adapter):
            return "a virtual-token adapter (generate feeds its prefix)"
        if row_inputs:
            return f"per-row inputs {sorted(row_inputs)}"
        if _partitioned(model) or (generate_kwargs or {}).get("synced_gpus"):
            return "ZeRO-3 partitioned weights (synced generation)"
        other = sorted(k for k in (generate_kwargs or {}) if k != "synced_gpus")
        if other:
            return f"generate keywords {other}"
        return plan_decode(_transformers_model(model), sampling=sampling, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, max_new_tokens=max_new_tokens)

    def _copy(self, model: nn.Module, adapter: str) -> GenerationCopy:
        copy = self._copies.get(adapter)
        if copy is None:
            copy = self._copies[adapter] = GenerationCopy(model, adapter, fuse_projections=self.spec.fuse_projections)
        else:
            copy.refresh()
        return copy

    @torch.no_grad()
    def generate(self, model: nn.Module, adapter: str | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 *, pad_token_id: int, eos_token_id: int | list[int] | None, sampling: dict[str, Any],
                 generate_kwargs: dict[str, Any] | None = None, row_inputs: dict[str, torch.Tensor] | None = None,
                 max_new_tokens: int | None = None) -> torch.Tensor:
        """New tokens ``[B, T]`` (right-padded with ``pad_token_id``) for left-padded prompts.

        ``adapter``: the active adapter of ``model`` (None: the bare base); ``sampling``: the
        ``generate`` keywords that choose tokens (``do_sample``, ``temperature``, ...);
        ``row_inputs``: per-row tensors ``generate`` takes besides the prompt (``task_ids``).
        """
        spec = self.spec
        new = max_new_tokens if max_new_tokens is not None else spec.max_new_tokens
        gather = spec.gather_weights and self._whole_model is not None and _partitioned(model)
        self.last_gathered = gather
        if gather:  # every rank samples on whole weights: no rank waits for another's forward passes
            generate_kwargs = {k: v for k, v in (generate_kwargs or {}).items() if k != "synced_gpus"}
        plan = self.own_plan(model, adapter, sampling=sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             max_new_tokens=new, generate_kwargs=generate_kwargs, row_inputs=row_inputs)
        own = isinstance(plan, DecodePlan)
        self.last_path = "own" if own else "hf"
        extra = dict(generate_kwargs or {})
        virtual = _is_virtual(model, adapter)
        if spec.cache == "static" and not virtual:
            extra.update(cache_implementation="static", disable_compile=not spec.compile)
        size = spec.batch_size or input_ids.shape[0]
        fold = self.folds(model, adapter, extra)
        copy = self._copy(model, adapter) if fold else None
        outputs: list[torch.Tensor] = []
        hooks_off = input_grad_hooks_off(model) if spec.compile else contextlib.nullcontext()
        whole = self._whole_model() if gather else contextlib.nullcontext()
        with whole, hooks_off:  # once per call, not per chunk: it walks the module tree
            for start in range(0, input_ids.shape[0], size):
                ids, mask = input_ids[start:start + size], attention_mask[start:start + size]
                ids, mask = bucket_left(ids, mask, spec.prompt_bucket, pad_token_id)
                rows = {k: v[start:start + size] for k, v in (row_inputs or {}).items()}
                with copy.swapped_in() if copy is not None else contextlib.nullcontext():
                    if own:
                        outputs.append(self.loop.generate(_transformers_model(model), ids, mask, plan))
                    else:
                        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                             pad_token_id=pad_token_id, eos_token_id=eos_token_id, **sampling, **rows,
                                             **extra)
                        outputs.append(out[:, ids.shape[1]:])
        width = max(o.shape[1] for o in outputs)
        return torch.cat([F.pad(o, (0, width - o.shape[1]), value=pad_token_id) for o in outputs])
