"""Packing for SFT: a micro-batch's rows in one row, with no padding and no attention across rows.

Padding a batch of very different lengths to its longest row computes the padding too: with a
long-tailed length distribution most of a batch can be padding. Packed, the ``B`` tokenized rows
of a micro-batch are concatenated into one row of ``T = sum(len_i)`` tokens (shape ``(1, T)``):

* ``position_ids`` restart at 0 at each row's first token, so every row sees the positions it
  would see alone;
* there is no ``attention_mask``, and ``use_cache=False``: transformers then reads the row
  boundaries off the restarts of ``position_ids`` and builds a block-diagonal causal mask
  (``masking_utils.find_packed_sequence_indices``; it looks only when there is neither a mask
  nor a cache, and a model whose config says ``use_cache: true`` makes a cache even in training),
  so no token attends to another row (under FlashAttention the same boundaries give
  variable-length attention);
* the label of each row's first token is -100: the shifted causal-LM loss would otherwise ask
  the last token of one row to predict the first of the next.

The loss is then the same mean over the same labelled tokens as the padded batch (checked in
``tests/pipeline/test_packing.py``); the micro-batch and the optimiser steps are unchanged, so a
packed run follows the unpacked one step for step, minus the padding's compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from raypeft.pipeline.data.tokenizing import IGNORE_INDEX


def pack_rows(rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
    """``input_ids``, ``labels`` and ``position_ids``, each ``(1, sum of row lengths)``, of tokenized
    SFT rows (``input_ids`` and ``labels`` of equal length, as a causal LM's are), and
    ``use_cache=False``: the model's keyword arguments for one packed forward."""
    if not rows:
        raise ValueError("pack_rows: empty batch")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for r in rows:
        row_ids, row_labels = list(r["input_ids"]), list(r["labels"])
        if len(row_ids) != len(row_labels):
            raise ValueError("pack_rows: a packed row needs labels as long as its input_ids (causal LM rows)")
        if not row_ids:
            continue
        ids += row_ids
        labels += [IGNORE_INDEX] + row_labels[1:]
        positions += range(len(row_ids))
    as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions), "use_cache": False}


class PackedSFTCollator:
    """The packing counterpart of :class:`~raypeft.pipeline.data.collate.SFTCollator`: one
    padding-free row per micro-batch (see the module docstring)."""

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return pack_rows(rows)
