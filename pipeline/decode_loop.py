"""Our own decode loop: prefill into a static KV cache, then one fixed-shape step per token.

Why not ``generate``: with a static cache and a compiled forward, transformers' loop still pays per
token for its Python (input preparation, a 4-D mask built outside the compiled forward, logits
processors and stopping criteria as separate launches) and computes every row to the end. Here
everything a token needs -- the forward, the sampling (``pipeline.token_sampling``), padding rows
that already ended, the eos check and the cursor updates -- is one function over tensors whose
shapes and addresses never change, so on CUDA it replays as one graph per step.

How a step is captured: ``torch.compile(decode_step, mode="reduce-overhead", dynamic=False)`` when
``compile`` is on and the model is on CUDA. Inductor fuses the step's small kernels (RMSNorm,
rotary, the mask, the sampling) and CUDA-graph trees record it; the step mutates only tensors
marked as static addresses (the transformers ``StaticCache``'s keys, values and position counter,
and this loop's cursors), which graph trees replay in place. Chosen over capturing
``torch.cuda.CUDAGraph`` by hand because (1) that replays the eager forward's hundreds of
unfused kernels, (2) it needs every op of transformers' forward and mask code to be free of host
syncs, which the compiled path already guarantees (transformers compiles the same forward the
same way for its static-cache ``generate``), and (3) graph trees handle the random-number state
of the sampling across replays. Without compile (CPU, or ``compile: false``) the same function
runs eagerly. The prefill is never compiled (one per batch, shapes vary).

The state (``_Slots``), for a batch of ``b`` rows and a cache of ``C`` positions:

- ``mask [b, C]``: the prompt's left padding is 0, everything after the prompt 1 from the start;
  the static cache masks positions not yet written by causality (each layer's own position counter
  is the query offset), so the mask never changes while decoding;
- ``positions [b, 1]``: as ``generate``: prompt positions count real tokens (``cumsum(mask) - 1``),
  each new token is the last position + 1, so left-padded rows get the positions they would have
  without padding;
- ``tokens [b, 1]``, ``done [b]``, ``history [b, N]`` (the new tokens), ``step [1]`` (the next
  column of ``history``) and ``rows [b]`` (the caller's row in each slot; -1: a filler slot).

Finished rows: a row that has produced an eos gets the pad token from then on (as ``generate``).
Every ``check_every`` steps the host reads how many rows are live (the only sync of the loop): none
-> stop; with ``drop_finished``, if they fit a smaller batch size of the ladder ``b, 2^k < b, ...,
min_rows`` (powers of two, so a few graphs serve every rollout), the live rows' cache, cursors and
history are gathered into that size's slots (filler slots repeat a live row and are marked done)
and decoding continues there: the cost of a step falls with the rows it carries, and with greedy
decoding the tokens are the same as without dropping (each row's computation is independent of
the others). Sampled tokens are drawn per slot, so dropping changes which random numbers a row
gets, not its distribution.

The slots of every batch size are kept from call to call (a graph replays on the addresses it was
recorded with); with replayed graphs a call with fewer rows than a kept size runs at that size,
its filler rows done from the start. :meth:`DecodeLoop.release` frees them.

Supported: decoder-only transformers models whose static cache layers are all full attention and
count their own positions (transformers 5: checked on 5.17, whose forward takes
``past_key_values``, and 5.24, where it is ``cache``; ``adapters.virtual_tokens.cache_name``
picks), greedy or sampling with temperature / top-k / top-p (the settings resolved by
transformers from the call's keywords and the model's generation config, so the defaults are
``generate``'s). Anything else (:func:`plan_decode` says why) is left to ``generate`` by the caller.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import StaticCache
from transformers.cache_utils import StaticLayer
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from raypeft.adapters.virtual_tokens import cache_name
from raypeft.pipeline.decode_attention import grouped_decode_attention
from raypeft.pipeline.token_sampling import SamplingRule, pick_tokens

CHECK_EVERY = 8  # steps between the host's looks at the live rows (each look is one device sync)
# With a compiled step, cache positions come in multiples of this: the step is specialised on the
# cache's shape, and a rollout whose longest prompt outgrows the cache would otherwise recompile
# (about 10 s at 1B on an H200) for every new longest prompt. The stages reserve their longest
# prompt up front (``reserve``); this bounds the recompiles of callers that do not, at the cost of
# at most 127 masked positions that every step reads.
CAPACITY_STEP = 128
MIN_ROWS = 8  # the smallest batch size finished rows are dropped down to
_SUPPORTED_PROCESSORS = (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


@dataclass(frozen=True)
class DecodePlan:
    """What one call decodes: the sampling rule, the stop tokens, the pad token, how many tokens."""

    rule: SamplingRule
    eos: tuple[int, ...]
    pad: int
    max_new_tokens: int


def _static_layers_ok(lm: nn.Module) -> bool:
    """Whether the model's static cache is all full-attention layers that count their positions."""
    probe = StaticCache(config=lm.config, max_cache_len=1)  # allocates nothing until the first update
    return all(type(layer) is StaticLayer and isinstance(getattr(layer, "cumulative_length", None), torch.Tensor)
               for layer in probe.layers)


def plan_decode(lm: nn.Module, *, sampling: dict[str, Any], eos_token_id: int | list[int] | None, pad_token_id: int,
                max_new_tokens: int) -> DecodePlan | str:
    """The plan for these ``generate`` keywords on transformers model ``lm``, or why the own loop
    cannot run them (a one-line reason; the caller then uses ``generate``)."""
    if getattr(lm.config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    try:
        if not _static_layers_ok(lm):
            return ("a static cache with sliding-window or other layers, or one that does not count its own "
                    "positions (transformers before 5)")
        config, _ = lm._prepare_generation_config(None, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                                                  eos_token_id=eos_token_id, **sampling)
        mode = config.get_generation_mode()
        processors = lm._get_logits_processor(generation_config=config, input_ids_seq_length=1, device="cpu")
    except Exception as err:  # noqa: BLE001 - whatever transformers rejects, generate reports it better
        return f"transformers could not resolve the generation settings ({type(err).__name__}: {err})"
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        return f"generation mode {mode.value}"
    if (config.num_return_sequences or 1) != 1 or config.max_time is not None or config.stop_strings is not None:
        return "num_return_sequences, max_time or stop_strings"
    unsupported = [type(p).__name__ for p in processors if not isinstance(p, _SUPPORTED_PROCESSORS)]
    if unsupported:
        return f"logits processors {', '.join(unsupported)}"
    found = {type(p): p for p in processors}
    rule = SamplingRule(
        do_sample=mode == GenerationMode.SAMPLE,
        temperature=float(found[TemperatureLogitsWarper].temperature) if TemperatureLogitsWarper in found else 1.0,
        top_k=int(found[TopKLogitsWarper].top_k) if TopKLogitsWarper in found else 0,
        top_p=float(found[TopPLogitsWarper].top_p) if TopPLogitsWarper in found else 1.0)
    eos = config.eos_token_id
    eos = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    if pad is None:
        return "neither a pad nor an eos token"
    return DecodePlan(rule, eos, int(pad), int(config.max_new_tokens))


def batch_ladder(rows: int, min_rows: int = MIN_ROWS) -> list[int]:
    """Batch sizes a decode of ``rows`` rows may drop to, largest first: ``rows``, then the powers
    of two below it down to ``min_rows``."""
    sizes, size = [rows], 1
    while size < rows:
        if size >= min_rows:
            sizes.append(size)
        size *= 2
    return sorted(set(sizes), reverse=True)


@dataclass
class _Slots:
    """One batch size's decode state; each tensor keeps its address from call to call."""

    cache: StaticCache
    mask: torch.Tensor  # [b, C] bool
    tokens: torch.Tensor  # [b, 1] long: each row's last token
    positions: torch.Tensor  # [b, 1] long: the position of the next token
    done: torch.Tensor  # [b] bool
    history: torch.Tensor  # [b, N] long: the new tokens so far
    step: torch.Tensor  # [1] long: the history column the next token goes to
    rows: torch.Tensor  # [b] long: the caller's row per slot, -1 for a filler

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def _record(s: _Slots, picked: torch.Tensor, eos: torch.Tensor, pad: int) -> None:
    """Store the step's tokens ``picked [b]`` (pad for rows already done) and move the cursors on."""
    picked = torch.where(s.done, torch.full_like(picked, pad), picked)
    s.history.index_copy_(1, s.step, picked[:, None])
    s.done.logical_or_((picked[:, None] == eos[None, :]).any(-1))
    s.tokens.copy_(picked[:, None])
    s.positions.add_(1)
    s.step.add_(1)


def cache_capacity(positions: int, *, compiled: bool) -> int:
    """Cache positions to allocate for ``positions`` (prompt width + new tokens): exactly that when
    the step runs eagerly, the next multiple of :data:`CAPACITY_STEP` when it is compiled."""
    return -(-positions // CAPACITY_STEP) * CAPACITY_STEP if compiled else positions


def decode_step(lm: nn.Module, cache_kw: str, s: _Slots, eos: torch.Tensor, pad: int, rule: SamplingRule) -> None:
    """One token for every slot, in place: the function a CUDA graph replays."""
    out = lm(input_ids=s.tokens, attention_mask=s.mask, position_ids=s.positions, use_cache=True, logits_to_keep=1,
             **{cache_kw: s.cache})
    _record(s, pick_tokens(out.logits[:, -1], rule), eos, pad)


class DecodeLoop:
    """The own loop with its per-batch-size state and compiled step, kept between calls so a
    captured graph is replayed, not re-recorded.

    ``compile``: compile the step (CUDA graphs) when the model is on CUDA; ``drop_finished``: move
    live rows to a smaller batch when they fit one; ``check_every``/``min_rows``: see the module;
    ``pad_to_kept``: decode a call with fewer rows than a kept batch size at that size (None: when
    the step is a replayed graph); ``grouped_attention``: attend from each key/value head's query
    group over the unexpanded cache (``pipeline.decode_attention``; off: transformers' ``sdpa``,
    which copies the cache per query head under compile -- kept for benchmarks to compare).
    """

    def __init__(self, *, compile: bool = False, drop_finished: bool = False, check_every: int = CHECK_EVERY,
                 min_rows: int = MIN_ROWS, pad_to_kept: bool | None = None, grouped_attention: bool = True) -> None:
        if check_every < 1 or min_rows < 1:
            raise ValueError(f"check_every and min_rows must be at least 1, got {check_every}, {min_rows}")
        self.compile, self.drop_finished = compile, drop_finished
        self.grouped_attention = grouped_attention
        self.check_every, self.min_rows = check_every, min_rows
        self.pad_to_kept = pad_to_kept
        self._slots: dict[int, _Slots] = {}
        self._owner: tuple[int, torch.dtype, torch.device] | None = None
        self._capacity = 0  # C: cache positions of every slot set
        self._reserved = 0  # positions a compiled step's cache holds at least (reserve)
        self._width = 0  # N: history columns of every slot set
        self._compiled: Any = None
        self.steps = 0  # decode steps run by the last call, prefill excluded (benchmarks read it)
        self.sizes: list[int] = []  # batch size of each decode step group of the last call

    # ------------------------------------------------------------------ state
    def release(self) -> None:
        """Free every cache and cursor (the next call allocates them again and re-records its graphs)."""
        self._slots.clear()
        self._owner, self._capacity, self._width = None, 0, 0

    def reserve(self, positions: int) -> None:
        """Size a compiled step's cache for ``positions`` (the longest prompt + new tokens a run will
        see) from the first call: the cache never shrinks, so a run whose prompts grow would reach
        that size anyway, recompiling on the way; an eager step ignores it."""
        self._reserved = max(self._reserved, int(positions))

    def _fit(self, lm: nn.Module, capacity: int, width: int, device: torch.device) -> None:
        """Drop every slot set unless it serves this model and is large enough (grown, never shrunk)."""
        owner = (id(lm), lm.dtype, device)
        if owner != self._owner or capacity > self._capacity or width > self._width:
            self._slots.clear()
            self._owner = owner
            self._capacity, self._width = max(capacity, self._capacity), max(width, self._width)

    def _slots_for(self, lm: nn.Module, size: int, device: torch.device) -> _Slots:
        s = self._slots.get(size)
        if s is None:
            s = self._slots[size] = _Slots(
                cache=StaticCache(config=lm.config, max_cache_len=self._capacity),
                mask=torch.ones(size, self._capacity, dtype=torch.bool, device=device),
                tokens=torch.zeros(size, 1, dtype=torch.long, device=device),
                positions=torch.zeros(size, 1, dtype=torch.long, device=device),
                done=torch.zeros(size, dtype=torch.bool, device=device),
                history=torch.zeros(size, self._width, dtype=torch.long, device=device),
                step=torch.zeros(1, dtype=torch.long, device=device),
                rows=torch.arange(size, device=device))
            for t in (s.mask, s.tokens, s.positions, s.done, s.history, s.step):
                torch._dynamo.mark_static_address(t)
        return s

    def _batch_size(self, rows: int, *, replays: bool) -> int:
        """The batch size a call of ``rows`` rows decodes at: with replayed graphs, the smallest
        kept size that holds them (a smaller last chunk reuses the graphs of the full chunks: on a
        memory-bound GPU the filler rows cost less than compiling and recording a new size), else
        ``rows`` (``pad_to_kept`` overrides)."""
        pad = replays if self.pad_to_kept is None else self.pad_to_kept
        kept = [size for size in self._slots if size >= rows]
        return min(kept) if pad and kept else rows

    def _step_fn(self, device: torch.device) -> Any:
        if not (self.compile and device.type == "cuda"):
            return decode_step
        if self._compiled is None:
            # one graph per (batch size, sampling rule): more than dynamo's default 8 recompiles
            name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
            self._compiled = torch.compile(decode_step, mode="reduce-overhead", dynamic=False)
        return self._compiled

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 plan: DecodePlan) -> torch.Tensor:
        """New tokens ``[B, T]`` (``T <= plan.max_new_tokens``: up to the last row's eos) for
        left-padded prompts ``input_ids [B, P]``; pad after each row's eos, as ``generate``."""
        with grouped_decode_attention(lm) if self.grouped_attention else contextlib.nullcontext():
            return self._generate(lm, input_ids, attention_mask, plan)

    def _generate(self, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  plan: DecodePlan) -> torch.Tensor:
        rows, width = input_ids.shape
        new, device = plan.max_new_tokens, input_ids.device
        step = self._step_fn(device)
        compiled = step is not decode_step
        self._fit(lm, cache_capacity(max(width + new, self._reserved if compiled else 0), compiled=compiled), new,
                  device)
        size = self._batch_size(rows, replays=step is not decode_step)
        if size > rows:  # filler rows (copies of the first, done from the start) fill a kept batch size
            input_ids = torch.cat([input_ids, input_ids[:1].expand(size - rows, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(size - rows, -1)])
        s = self._slots_for(lm, size, device)
        eos = torch.tensor(plan.eos or (-1,), dtype=torch.long, device=device)  # -1 never matches
        cache_kw = cache_name(lm)
        result = torch.full((rows, new), plan.pad, dtype=torch.long, device=device)

        # prefill (eager): the prompt into the cache, the first new token from its last position
        mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        s.cache.reset()
        s.mask.fill_(True)
        s.mask[:, :width] = mask
        s.done.zero_()
        s.done[rows:] = True
        s.history.fill_(plan.pad)
        s.step.zero_()
        s.rows.copy_(torch.arange(size, device=device))
        s.rows[rows:] = -1
        out = lm(input_ids=input_ids, attention_mask=s.mask, position_ids=positions, use_cache=True,
                 logits_to_keep=1, **{cache_kw: s.cache})
        s.positions.copy_(positions[:, -1:])
        _record(s, pick_tokens(out.logits[:, -1], plan.rule), eos, plan.pad)
        del out

        ladder = batch_ladder(size, self.min_rows) if self.drop_finished else [size]
        self.steps, self.sizes = 0, [size]
        for t in range(1, new):
            if (t - 1) % self.check_every == 0:
                live = int((~s.done).sum())
                if live == 0:
                    break
                target = min(size for size in ladder if size >= live)
                if target < s.size:
                    s = self._drop_finished(lm, s, target, result, device)
                    self.sizes.append(target)
            if step is not decode_step:
                torch.compiler.cudagraph_mark_step_begin()
            step(lm, cache_kw, s, eos, plan.pad, plan.rule)
            self.steps += 1
        _flush(s, result, s.rows >= 0, new)
        return _trim(result, eos, plan.eos)

    def _drop_finished(self, lm: nn.Module, s: _Slots, size: int, result: torch.Tensor,
                       device: torch.device) -> _Slots:
        """The live rows of ``s`` moved into the ``size`` slots (fillers after them); finished rows
        are written to ``result`` first."""
        _flush(s, result, s.done & (s.rows >= 0), result.shape[1])
        keep = torch.nonzero(~s.done).flatten()
        live = keep.numel()
        index = torch.cat([keep, keep[:1].expand(size - live)])
        d = self._slots_for(lm, size, device)
        for big, small in zip(s.cache.layers, d.cache.layers):
            if not small.is_initialized:  # shapes, dtype and device from the big cache, no data
                small.lazy_initialization(big.keys[:size, :, :0], big.values[:size, :, :0])
            torch.index_select(big.keys, 0, index, out=small.keys)
            torch.index_select(big.values, 0, index, out=small.values)
            small.cumulative_length.copy_(big.cumulative_length)
        for name in ("mask", "tokens", "positions", "history"):
            torch.index_select(getattr(s, name), 0, index, out=getattr(d, name))
        d.done.copy_(s.done.index_select(0, index))
        d.done[live:] = True
        d.rows.copy_(s.rows.index_select(0, index))
        d.rows[live:] = -1
        d.step.copy_(s.step)
        return d


def _flush(s: _Slots, result: torch.Tensor, which: torch.Tensor, new: int) -> None:
    """Copy the history of the slots ``which [b]`` (bool) into their caller rows of ``result``."""
    result[s.rows[which]] = s.history[which, :new]


def _trim(result: torch.Tensor, eos: torch.Tensor, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """``result`` cut after the column where the last row produced its eos (``generate``'s width)."""
    if not eos_ids:
        return result
    hits = (result[:, :, None] == eos[None, None, :]).any(-1)
    lengths = torch.where(hits.any(1), hits.int().argmax(1) + 1, result.shape[1])
    return result[:, :int(lengths.max())]
