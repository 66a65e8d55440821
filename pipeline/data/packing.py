"""Packing for SFT: a micro-batch's rows packed into a few rows, with no attention across rows.

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


def pack_rows(rows: Sequence[Mapping[str, Sequence[int]]], *, max_tokens: int | None = None,
              pad_token_id: int = 0) -> dict[str, Any]:
    """``input_ids``, ``labels`` and ``position_ids`` (each ``(bins, longest bin)``) of tokenized
    SFT rows packed by :func:`pack_layout` (``input_ids`` and ``labels`` of equal length, as a
    causal LM's are), and ``use_cache=False``: the model's keyword arguments for one forward."""
    if not rows:
        raise ValueError("pack_rows: empty batch")
    for r in rows:
        if len(r["input_ids"]) != len(r["labels"]):
            raise ValueError("pack_rows: a packed row needs labels as long as its input_ids (causal LM rows)")
    bins = pack_layout([len(r["input_ids"]) for r in rows], max_tokens)
    packed: list[tuple[list[int], list[int], list[int]]] = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            row_ids, row_labels = list(rows[i]["input_ids"]), list(rows[i]["labels"])
            if not row_ids:
                continue
            ids += row_ids
            labels += [IGNORE_INDEX] + row_labels[1:]
            positions += range(len(row_ids))
        packed.append((ids, labels, positions))
    width = max(len(ids) for ids, _, _ in packed)
    out = {k: torch.full((len(packed), width), v, dtype=torch.long)
           for k, v in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX), ("position_ids", 0))}
    for b, (ids, labels, positions) in enumerate(packed):
        n = len(ids)
        out["input_ids"][b, :n] = torch.tensor(ids, dtype=torch.long)
        out["labels"][b, :n] = torch.tensor(labels, dtype=torch.long)
        out["position_ids"][b, :n] = torch.tensor(positions, dtype=torch.long)
        out["position_ids"][b, n:] = torch.arange(width - n)  # the tail padding: a block of its own
    return {**out, "use_cache": False}


class PackedSFTCollator:
    """The packing counterpart of :class:`~raypeft.pipeline.data.collate.SFTCollator`: a
    micro-batch as bins of at most ``max_tokens`` tokens (see the module docstring)."""

    def __init__(self, max_tokens: int | None = None, pad_token_id: int = 0) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        self.max_tokens = max_tokens
        self.pad_token_id = int(pad_token_id)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pack_rows(rows, max_tokens=self.max_tokens, pad_token_id=self.pad_token_id)
