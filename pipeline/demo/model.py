"""The demo base: a tiny Llama warmed up on the demo language, saved with its tokenizer.

The warm-up is full-parameter causal-LM training on the raw documents (dialogues and
summaries as separate texts, each ``<s> text </s>``, packed into fixed blocks). It teaches the
words and the chat format, not the ``Summary:`` task: that is what the SFT stage adds.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from raypeft.pipeline.demo.settings import DemoSettings


def llama_config(settings: DemoSettings, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )


@contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Run with ``n`` intra-op threads (0: the usable cores, at most 8), then restore."""
    if n <= 0:
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS, Windows
            n = os.cpu_count() or 1
        n = max(1, min(n, 8))
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def pack_documents(tokenizer: PreTrainedTokenizerBase, documents: list[str], block_size: int) -> torch.Tensor:
    """``<s> doc </s>`` for every document, concatenated and cut into ``[n, block_size]``."""
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc in ids:
        stream += [tokenizer.bos_token_id, *doc, tokenizer.eos_token_id]
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"demo warm-up: {len(stream)} tokens do not fill one block of {block_size}")
    return torch.tensor(stream[: n * block_size]).view(n, block_size)


def warm_up_base(settings: DemoSettings, tokenizer: PreTrainedTokenizerBase, documents: list[str], *,
                 log: Callable[[str], None] = print) -> LlamaForCausalLM:
    """A freshly initialised Llama trained briefly on ``documents``; deterministic from the seed."""
    torch.manual_seed(settings.seed)
    model = LlamaForCausalLM(llama_config(settings, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    blocks = pack_documents(tokenizer, documents, settings.warmup_block_size)
    gen = torch.Generator().manual_seed(settings.seed)
    steps, bs = settings.warmup_steps, settings.warmup_batch_size
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=settings.warmup_lr, betas=(0.9, 0.98))
    warm = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    order = torch.randperm(len(blocks), generator=gen)
    cursor, started, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
    for step in range(steps):
        if cursor + bs > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor:cursor + bs]]
        cursor += bs
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
            log(f"[demo] warm-up step {step + 1}/{steps} loss {loss_sum / loss_n:.3f} "
                f"({time.perf_counter() - started:.0f}s)")
            loss_sum, loss_n = 0.0, 0
    model.eval()
    return model


def save_base(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """Model (safetensors) and tokenizer in one folder, loadable with the Auto classes."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
