"""Packing for SFT and the preference-pair stages: a micro-batch's rows packed into a few rows,
with no attention across rows.

Padding a batch of very different lengths to its longest row computes the padding too: with a
long-tailed length distribution most of a batch can be padding. Packed, the ``B`` tokenized rows
of a micro-batch are placed first-fit-decreasing into bins of at most ``max_tokens`` tokens (a
row longer than that gets a bin of its own), and each bin becomes one row of the batch, its
conversations side by side:

* ``position_ids`` restart at 0 at each conversation's first token, so every conversation sees
  the positions it would see alone;
* there is no ``attention_mask``, and ``use_cache=False``: transformers then reads the
  boundaries off the restarts of ``position_ids`` and builds a block-diagonal causal mask
  (``masking_utils.find_packed_sequence_indices``; it looks only when there is neither a mask
  nor a cache, and a model whose config says ``use_cache: true`` makes a cache even in training),
  so no token attends to another conversation (under FlashAttention the same boundaries give
  variable-length attention);
* the label of each conversation's first token is -100: the shifted causal-LM loss would
  otherwise ask the last token of one conversation to predict the first of the next;
* a bin shorter than the longest is filled with pad tokens whose positions restart too (they
  form a block of their own, attend to nothing real and carry no labels); first-fit-decreasing
  leaves little of that.

Why bins and not one row: without a variable-length attention kernel (CPU, plain SDPA) attention
over a row of ``T`` tokens costs ``T^2`` whatever the mask, so one row of the whole micro-batch
would cost ``(sum len_i)^2``; bins of ``max_tokens`` bound it like the padded batch does.
``max_tokens=None`` gives the single row (no padding at all), for kernels that skip masked
blocks.

The loss is then the same mean over the same labelled tokens as the padded batch (checked in
``tests/pipeline/test_packing.py``); the micro-batch and the optimiser steps are unchanged, so a
packed run follows the unpacked one step for step, minus the padding's compute.

The pair stages (reward, DPO) pack the ``2B`` sides of ``B`` pairs the same way
(:func:`pack_pairs`). Their losses are per sequence, not per token: a DPO log-probability is a sum
over one side's response tokens, a reward is the value head at one side's last token. The batch
therefore also says which sequence each position belongs to (``segments``) and where each one
ends (``ends``), and :func:`sequence_sums` / :func:`at_ends` reduce the packed rows back to one
figure per side, in ``PairCollator`` order, so the losses are the padded batch's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raypeft.pipeline.data.tokenizing import IGNORE_INDEX


def pack_layout(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Bins of row indices, first-fit-decreasing by length into bins of at most ``max_tokens``
    tokens (``None``: one bin holding every row, in order)."""
    if max_tokens is None:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for b, left in enumerate(room):
            if lengths[i] <= left:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max(0, max_tokens - lengths[i]))
    return bins


def _pack_sequences(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], max_tokens: int | None,
                    pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """``(input_ids, labels)`` sequences laid out by :func:`pack_layout`: ``input_ids``,
    ``labels`` (each sequence's first label -100), ``position_ids`` (restarting per sequence and
    for the tail padding), ``segments`` (the sequence index of each position, -1 on padding) and
    ``ends`` (``[len(seqs), 2]``: bin and position of each sequence's last token). The width is
    rounded up to ``pad_to_multiple_of`` (fewer distinct shapes for kernels that plan per shape)."""
    bins = pack_layout([len(ids) for ids, _ in seqs], max_tokens)
    width = max(sum(len(seqs[i][0]) for i in members) for members in bins)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out = {k: torch.full((len(bins), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("position_ids", 0),
                        ("segments", -1))}
    out["ends"] = torch.full((len(seqs), 2), -1, dtype=torch.long)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            ids, labels = seqs[i]
            n = len(ids)
            if n == 0:
                continue
            out["input_ids"][b, at:at + n] = torch.tensor(list(ids), dtype=torch.long)
            out["labels"][b, at + 1:at + n] = torch.tensor(list(labels)[1:], dtype=torch.long)
            out["position_ids"][b, at:at + n] = torch.arange(n)
            out["segments"][b, at:at + n] = i
            out["ends"][i, 0], out["ends"][i, 1] = b, at + n - 1
            at += n
        out["position_ids"][b, at:] = torch.arange(width - at)  # the tail padding: a block of its own
    return out


def _checked(ids: Sequence[int], labels: Sequence[int], what: str) -> tuple[Sequence[int], Sequence[int]]:
    if len(ids) != len(labels):
        raise ValueError(f"{what}: a packed row needs labels as long as its input_ids (causal LM rows)")
    return ids, labels


def pack_rows(rows: Sequence[Mapping[str, Sequence[int]]], *, max_tokens: int | None = None,
              pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """``input_ids``, ``labels`` and ``position_ids`` (each ``(bins, longest bin)``) of tokenized
    SFT rows packed by :func:`pack_layout` (``input_ids`` and ``labels`` of equal length, as a
    causal LM's are), and ``use_cache=False``: the model's keyword arguments for one forward."""
    if not rows:
        raise ValueError("pack_rows: empty batch")
    out = _pack_sequences([_checked(r["input_ids"], r["labels"], "pack_rows") for r in rows], max_tokens,
                          pad_token_id, pad_to_multiple_of)
    del out["segments"], out["ends"]
    return {**out, "use_cache": False}


def pack_pairs(rows: Sequence[Mapping[str, Sequence[int]]], *, max_tokens: int | None = None,
               pad_token_id: int = 0, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Preference pairs (``chosen_*``/``rejected_*`` ids and labels) packed like SFT rows.

    The ``2B`` sequences are numbered as :class:`~raypeft.pipeline.data.collate.PairCollator`
    stacks them (the ``B`` chosen sides, then the ``B`` rejected ones), so ``split_pairs`` applies
    to anything reduced per sequence. Beside the model inputs (``input_ids``, ``position_ids``;
    no ``attention_mask``) the batch carries ``labels``, ``segments`` (sequence index per
    position, -1 on padding) for :func:`sequence_sums`, and ``ends`` (``[2B, 2]``: bin and
    position of each sequence's last token, where a reward model reads its score) for
    :func:`at_ends`. Every sequence sees only its own tokens at its own positions, so each
    per-sequence figure equals the padded batch's up to rounding (``tests/pipeline/test_packing.py``).
    """
    if not rows:
        raise ValueError("pack_pairs: empty batch")
    seqs = [_checked(r[f"{side}_input_ids"], r[f"{side}_labels"], "pack_pairs")
            for side in ("chosen", "rejected") for r in rows]
    if any(len(ids) == 0 for ids, _ in seqs):
        raise ValueError("pack_pairs: a pair side with no tokens")
    return _pack_sequences(seqs, max_tokens, pad_token_id, pad_to_multiple_of)


def sequence_sums(values: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` sums of ``values`` (``[bins, T]``) per sequence index in ``segments`` (same shape;
    -1 positions left out): per-sequence log-probabilities of a packed batch, differentiably."""
    keep = segments >= 0
    return values.new_zeros(count).index_add(0, segments[keep], values[keep])


def at_ends(values: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``values`` (``[bins, T]``) at each sequence's last token (``ends`` of :func:`pack_pairs`)."""
    return values[ends[:, 0], ends[:, 1]]


def _check_sizes(max_tokens: int | None, pad_to_multiple_of: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")


class PackedSFTCollator:
    """The packing counterpart of :class:`~raypeft.pipeline.data.collate.SFTCollator`: a
    micro-batch as bins of at most ``max_tokens`` tokens (see the module docstring)."""

    def __init__(self, max_tokens: int | None = None, pad_token_id: int = 0,
                 pad_to_multiple_of: int | None = None) -> None:
        _check_sizes(max_tokens, pad_to_multiple_of)
        self.max_tokens, self.pad_to_multiple_of = max_tokens, pad_to_multiple_of
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pack_rows(rows, max_tokens=self.max_tokens, pad_token_id=self.pad_token_id,
                         pad_to_multiple_of=self.pad_to_multiple_of)


class PackedPairCollator:
    """The packing counterpart of :class:`~raypeft.pipeline.data.collate.PairCollator` (reward,
    DPO): a micro-batch's ``2B`` sides in bins of at most ``max_tokens`` tokens (:func:`pack_pairs`)."""

    def __init__(self, max_tokens: int | None = None, pad_token_id: int = 0,
                 pad_to_multiple_of: int | None = None) -> None:
        _check_sizes(max_tokens, pad_to_multiple_of)
        self.max_tokens, self.pad_to_multiple_of = max_tokens, pad_to_multiple_of
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return pack_pairs(rows, max_tokens=self.max_tokens, pad_token_id=self.pad_token_id,
                          pad_to_multiple_of=self.pad_to_multiple_of)
