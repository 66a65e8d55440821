"""Offline evaluation: ROUGE of generated text, and batched generation of responses.

``rouge_scores`` computes what ``evaluate.load("rouge")`` reports (F-measures with the Porter
stemmer), but directly with ``rouge_score`` so nothing is fetched from the hub, and as a plain
mean over rows (``evaluate`` reports a bootstrap estimate of that mean by default).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

_scorer = None


def _rouge_scorer():
    global _scorer
    if _scorer is None:
        # Imported on first use: rouge_score (with nltk) takes ~1.6 s to import, which every
        # driver start would pay (the CLI imports the stages); only the scoring workers need it.
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return _scorer


def rouge_scores(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures of ``predictions`` against ``references``.

    A reference may also be a list of strings (several references for one prediction): the
    best-scoring one counts, as in ``evaluate``. No rows give 0.0 for every score.
    """
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"rouge_scores: {len(predictions)} predictions but {len(references)} references")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    if not predictions:
        return totals
    scorer = _rouge_scorer()
    for pred, ref in zip(predictions, references):
        if isinstance(ref, str):
            scores = scorer.score(ref, pred)
        else:
            scores = scorer.score_multi(list(ref), pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}


@contextmanager
def _padding(tokenizer: Any, side: str) -> Iterator[None]:
    """Pad on ``side`` (and with eos if the tokenizer has no pad token) for the block, then restore."""
    before = getattr(tokenizer, "padding_side", None)
    borrowed_pad = tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    tokenizer.padding_side = side
    if borrowed_pad:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        if before is not None:
            tokenizer.padding_side = before
        if borrowed_pad:
            tokenizer.pad_token = None


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _cut(ids: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i]
    return ids


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    is_seq2seq: bool = False,
    do_sample: bool = False,
    device: torch.device | str | None = None,
    row_inputs: dict[str, torch.Tensor] | None = None,
    engine: Any = None,
    adapter: str | None = None,
    add_special_tokens: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's response to each prompt, in order: only the new text, cut at eos, stripped.

    ``row_inputs`` holds per-prompt tensors (first dimension ``len(prompts)``) that ``generate``
    gets for the prompts of each batch, e.g. multitask prompt tuning's ``task_ids``.

    Causal LMs get the prompts left-padded (the tokenizer's ``padding_side`` is switched for
    the call and restored), with the tokenizer's special tokens (``<s>`` for Llama) as in
    training. Seq2seq models get the prompt as encoder input and their decoded output is the
    response. Works with anything that has ``generate`` (a transformers model or an adapter
    wrapper that forwards it). Prompts are generated longest first in batches of
    ``batch_size`` (less padding), and returned in the order given. The model runs in eval
    mode without gradients and is put back in train mode afterwards if it was.

    ``engine``: a causal LM's generation goes through this ``pipeline.rollout_engine.RolloutEngine``
    (its batch size, folded adapter ``adapter``, cache and buckets) instead of a plain ``generate``.

    ``add_special_tokens=False`` for prompts that already carry them (a rendered chat template
    writes its own bos).
    """
    if batch_size <= 0:
        raise ValueError(f"generate_responses: batch_size must be positive, got {batch_size}")
    if not prompts:
        return []
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None and batch_size > 1:
        raise ValueError("generate_responses: the tokenizer has neither a pad nor an eos token to pad batches with")
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    # Finished rows are padded up to the longest row: padding is never part of the text.
    stop = eos | ({int(pad_id)} if pad_id is not None else set())
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)

    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad(), _padding(tokenizer, "right" if is_seq2seq else "left"):
            for start in range(0, len(order), batch_size):
                ids = order[start:start + batch_size]
                # the keyword only when it differs from the default: any callable tokenizer works
                enc = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True,
                                **({} if add_special_tokens else {"add_special_tokens": False}))
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_id)
                if eos:
                    kwargs["eos_token_id"] = sorted(eos)
                kwargs.update(generate_kwargs)
                kwargs.update({k: v[ids].to(device) for k, v in (row_inputs or {}).items()})
                if engine is not None and not is_seq2seq:
                    rows = {k: v[ids].to(device) for k, v in (row_inputs or {}).items()}
                    new = engine.generate(model, adapter, enc["input_ids"], enc["attention_mask"], pad_token_id=pad_id,
                                          eos_token_id=kwargs.pop("eos_token_id", None),
                                          sampling={"do_sample": do_sample},
                                          generate_kwargs=generate_kwargs, row_inputs=rows,
                                          max_new_tokens=max_new_tokens).tolist()
                    for i, row in zip(ids, new):
                        outputs[i] = tokenizer.decode(_cut(row, stop), skip_special_tokens=True).strip()
                    continue
                out = model.generate(**enc, **kwargs)
                if is_seq2seq:
                    start_id = _decoder_start(model)
                    new = [row.tolist() for row in out]
                    new = [r[1:] if r and start_id is not None and r[0] == start_id else r for r in new]
                else:
                    new = out[:, enc["input_ids"].shape[1]:].tolist()
                for i, row in zip(ids, new):
                    text = tokenizer.decode(_cut(row, stop), skip_special_tokens=True)
                    outputs[i] = text.strip()
    finally:
        if was_training:
            model.train()
    return outputs


def _decoder_start(model: Any) -> int | None:
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(cfg, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    return None
