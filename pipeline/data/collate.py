"""Collators: pad a list of tokenized rows into tensors, inside the Ray Train workers.

Pure torch. Right padding for training, left padding for generation; the attention mask comes
from the row lengths, never from the pad id (pad often equals eos).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.tokenizing import IGNORE_INDEX


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return ((n + multiple - 1) // multiple) * multiple


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str, multiple: int | None,
         length: int | None = None) -> torch.Tensor:
    width = _round_up(length if length is not None else max((len(s) for s in seqs), default=0), multiple)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(s, dtype=torch.long)
        if side == "left":
            out[i, width - len(s):] = t
        else:
            out[i, :len(s)] = t
    return out


def _mask(seqs: Sequence[Sequence[int]], width: int, side: str) -> torch.Tensor:
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            out[i, width - len(s):] = 1
        else:
            out[i, :len(s)] = 1
    return out


class _Collator:
    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None,
                 padding_side: Literal["right", "left"] = "right") -> None:
        if pad_token_id is None:
            raise DataError("model.tokenizer: the tokenizer has no pad token (set one, e.g. eos)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def _ids_and_mask(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _pad(seqs, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        return ids, _mask(seqs, ids.shape[1], self.padding_side)


class SFTCollator(_Collator):
    """Pad tokenized SFT rows into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Right padding by default (training); ``padding_side="left"`` for batched generation.
    ``labels`` are padded with -100 on the same side, to their own longest row (the same width
    as ``input_ids`` for causal LMs; seq2seq labels have their own length). The attention mask
    comes from the row lengths, not the pad id, since pad often equals eos.
    """

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("SFTCollator: empty batch")
        seqs = [r["input_ids"] for r in rows]
        ids, mask = self._ids_and_mask(seqs)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            same = all(len(a) == len(b) for a, b in zip(labels, seqs))
            batch["labels"] = _pad(labels, IGNORE_INDEX, self.padding_side, self.pad_to_multiple_of,
                                   length=ids.shape[1] if same else None)
        return batch


class PairCollator(_Collator):
    """Pad preference rows into one batch of ``2B`` rows: the B chosen, then the B rejected.

    One forward pass of the reward model (or policy, for DPO) scores both sides; split its
    output back with :meth:`split` / :func:`split_pairs`. Chosen and rejected share one width.
    """

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PairCollator: empty batch")
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        ids, mask = self._ids_and_mask(seqs)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "chosen_labels" in rows[0]:
            labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
            batch["labels"] = _pad(labels, IGNORE_INDEX, self.padding_side, self.pad_to_multiple_of,
                                   length=ids.shape[1])
        return batch

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_pairs(x)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` halves along dim 0 of a tensor computed on a :class:`PairCollator` batch."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs: a pair batch has an even number of rows, got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


class PromptCollator(_Collator):
    """Left-pad prompt rows for generation: ``input_ids`` and ``attention_mask``.

    With ``keep_text=True`` the batch also carries ``prompt_text`` (a list of str), so callers
    that move every value to a device should leave it off.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, *,
                 keep_text: bool = False) -> None:
        super().__init__(pad_token_id, pad_to_multiple_of, padding_side="left")
        self.keep_text = keep_text

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("PromptCollator: empty batch")
        ids, mask = self._ids_and_mask([r["input_ids"] for r in rows])
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.keep_text and "prompt_text" in rows[0]:
            batch["prompt_text"] = [r["prompt_text"] for r in rows]
        return batch


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Non-pad input tokens in a collated batch (for tokens/s): the attention mask's sum, or the
    positions a packed pair batch assigns to a sequence (``segments``).

    Without either every position of ``input_ids`` counts. Seq2seq decoder tokens (``labels``)
    are not included.
    """
    segments = batch.get("segments")
    if segments is not None:
        return int((segments >= 0).sum().item())
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum().item())
    return int(batch["input_ids"].numel())
