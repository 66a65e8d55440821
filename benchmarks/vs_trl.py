"""SFT, DPO and GRPO throughput against TRL's trainers on the same model, data and settings.

Both sides train a LoRA adapter (r=16, alpha 32, all linear layers, no dropout) on a Llama built
from a config (random weights; ``perf_common.llama_config``), from the same texts of long-tailed
length (log-normal word counts; a word-level tokenizer built here makes one token per word, so
both sides see the same token ids), with the same micro-batch, ``max_length``, learning rate
(constant), AdamW, gradient clipping at 1.0, no gradient checkpointing and no evaluation:

* ours: the stages' own step, in process (no Ray: the loop a worker runs): SFT through
  ``SFTCollator`` / ``PackedSFTCollator`` (``data.packing``) and the stage's loss (with
  ``chunked_loss: auto``, on CUDA the loss without full logits of ``pipeline/lm_head_loss.py``;
  ``--full-logits`` adds a packed run with the model's own loss, ``--compile`` one with the stage's
  ``compile: true``, ``pipeline/compilation.py``); DPO through
  ``dpo.pair_terms`` over ``Roles`` (reference: the base with the adapter disabled, what TRL uses
  with a peft config), ``PairCollator`` / ``PackedPairCollator``; ``TorchBackend`` steps.
* GRPO, ours: the stage's own step (``grpo.rollout_step``: sampling through the stage's
  ``RolloutEngine``, the sampling policy's and the reference's log-probs, the reward; then
  ``grpo.compute_advantages`` and ``grpo.update``, ``minibatches`` optimiser steps), once with the
  default generation path (Hugging Face ``generate``, unmerged adapter, dynamic cache) and once
  with the engine's levers (``--engine``, default ``fold_adapter``, ``compile``, ``decode_loop:
  own``); TRL: ``GRPOTrainer`` with its Hugging Face ``generate`` path (no vLLM), ``beta`` 0.04
  (the reference: the base with the adapter disabled), ``steps_per_generation`` = our
  ``minibatches``, so that both sample ``--prompts`` x ``--generations`` completions of
  ``--new-tokens`` tokens, score them once and take ``minibatches`` optimiser steps on them. The
  reward on both sides is one cheap function of the decoded text (:func:`distinct_words`); a
  random model's text says nothing, and the reward's cost is not what is compared. A GRPO step
  is one such cycle (two TRL optimiser steps with the default two minibatches).
* TRL: ``SFTTrainer`` (``packing=False``, and ``packing=True``, its best-fit-decreasing
  padding-free packing) and ``DPOTrainer`` (sigmoid loss; its padding-free mode is disabled in
  TRL 1.16), each with a ``peft.LoraConfig``; ``bf16=True`` on CUDA (its default).

Each run gets a fresh process (``--same-process`` to share one): kernels autotuned, cuDNN
attention plans built per shape and allocator blocks of an earlier run would otherwise speed up a
later run on the same shapes. Ours pads widths to a multiple of 64 on CUDA, as the stages do
(``data.pad_to_multiple_of: auto``); TRL pads to none (its default off Neuron).

TRL's packing fills whole rows of ``max_length`` tokens from the dataset, so its packed micro-batch
is set to about the same tokens per step as ours (``ceil(batch x mean length / max_length)``
rows); everything is reported per real (non-padding) token. Timed: the steps after ``--warmup``,
each synchronised; tokens counted at the model's forward with gradients on. Peak GPU memory is
reset before each run. Writes ``benchmarks/results/vs_trl_<stage>_<size>_<device>.json`` / ``.md``.

    pip install trl peft                                             # references only, never raypeft's dependencies
    python benchmarks/vs_trl.py --stages sft,dpo                     # CPU smoke run, tiny Llama
    python benchmarks/vs_trl.py --device cuda --size 1b --batch 16 --max-len 1024 --steps 30
    python benchmarks/vs_trl.py --device cuda --size 1b --stages grpo --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import RESULTS, build_llama, command_line, machine_info, machine_line, pick_device, sync  # noqa: E402

from raypeft.adapters import LoraConfig, get_adapter_model  # noqa: E402
from raypeft.pipeline import compilation  # noqa: E402
from raypeft.pipeline.backends import TorchBackend  # noqa: E402
from raypeft.pipeline.data import IGNORE_INDEX, PairCollator, SFTCollator  # noqa: E402
from raypeft.pipeline.data.packing import PackedPairCollator, PackedSFTCollator  # noqa: E402
from raypeft.pipeline.lm_head_loss import causal_lm_loss, enabled  # noqa: E402
from raypeft.pipeline.roles import Roles  # noqa: E402
from raypeft.pipeline.stages import dpo  # noqa: E402
from raypeft.pipeline.stages.common import auto_pad_multiple  # noqa: E402

LR = 1e-4
WORDS = 2000  # the word-level vocabulary (ids 4.. of the model's vocabulary)
EOS = " </s>"  # in the text, so TRL adds none and both sides tokenize the same ids
H200_BF16_DENSE_TFLOPS = 989.0


def word_tokenizer() -> Any:
    """One token per whitespace-separated word ``w<i>``; ``<pad>``/``<s>``/``</s>``/``<unk>`` are 0-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def lognormal_lengths(n: int, median: int, low: int, high: int, g: torch.Generator) -> list[int]:
    x = torch.exp(torch.randn(n, generator=g) * 0.9 + math.log(median))
    return x.round().clamp(low, high).long().tolist()


def words(n: int, g: torch.Generator) -> str:
    return " ".join(f"w{i}" for i in torch.randint(0, WORDS, (n,), generator=g).tolist())


def sft_texts(n: int, median: int, max_len: int, seed: int) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for total in lognormal_lengths(n, median, 8, max_len - 2, g):
        prompt = max(1, total // 3)
        rows.append({"prompt": words(prompt, g), "completion": " " + words(total - prompt, g) + EOS})
    return rows


def prompt_texts(n: int, median: int, max_len: int, seed: int) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt": words(k, g)} for k in lognormal_lengths(n, median, 4, max_len, g)]


def distinct_words(completions: list[str], **_: Any) -> list[float]:
    """The GRPO reward on both sides: the share of distinct words in each completion (TRL's and our
    reward-function signature alike)."""
    return [len(set(c.split())) / max(1, len(c.split())) for c in completions]


def pair_texts(n: int, median: int, max_len: int, seed: int) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(seed)
    third = max_len // 3 - 2
    p, c, r = (lognormal_lengths(n, median, 2, third, g) for _ in range(3))
    return [{"prompt": words(a, g), "chosen": " " + words(b, g) + EOS, "rejected": " " + words(d, g) + EOS}
            for a, b, d in zip(p, c, r)]


# ----------------------------------------------------------------------------------- timing
class StepClock:
    """Synchronised wall time of each step and the real tokens its forward passes with gradients saw."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.tokens, self._t0, self._tok = device, [], [], 0.0, 0
        self.marks: list[float] = []  # seconds into a step at which a phase ended (GRPO: the rollout)

    def begin(self) -> None:
        sync(self.device)
        self._t0, self._tok = time.perf_counter(), 0

    def end(self) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._t0)
        self.tokens.append(self._tok)

    def count(self, n: int) -> None:
        self._tok += int(n)

    def hook(self, module: torch.nn.Module) -> Any:
        """Count the tokens of every forward of ``module`` that builds a graph (not a reference pass)."""
        def pre(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.count(mask.sum() if mask is not None and mask.dim() == 2 else ids.numel())
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def summary(self, warmup: int, items_per_step: int | None = None) -> dict[str, Any]:
        times, tokens = self.times[warmup:], self.tokens[warmup:]
        out = {"steps_timed": len(times), "s_per_step_median": statistics.median(times),
               "tokens_per_s": sum(tokens) / sum(times), "tokens_per_step_mean": statistics.mean(tokens)}
        if items_per_step:
            out["pairs_per_s"] = items_per_step * len(times) / sum(times)
        return out


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def fresh(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def lora() -> LoraConfig:
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def peft_lora() -> Any:
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def backend_for(module: torch.nn.Module, steps: int) -> TorchBackend:
    return TorchBackend(module, lr=LR, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=steps,
                        max_grad_norm=1.0)


# ------------------------------------------------------------------------------------- ours
def ours_sft(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
             texts: list[dict[str, str]], packed: bool, loss: bool | str = "auto",
             compiled: bool = False) -> dict[str, Any]:
    fresh(device)
    model = get_adapter_model(build_llama(args.size, device, dtype, seed=args.seed), lora())
    model.train()
    chunked = enabled(loss, model, device)  # the stage's sft.chunked_loss
    rows = []
    for t in texts:
        p = tok(t["prompt"])["input_ids"]
        c = tok(t["completion"], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c})
    multiple = auto_pad_multiple(device)  # the stage's data.pad_to_multiple_of: auto
    collate = PackedSFTCollator(max_tokens=args.max_len, pad_token_id=0, pad_to_multiple_of=multiple) if packed \
        else SFTCollator(pad_token_id=0, pad_to_multiple_of=multiple)
    backend, clock = backend_for(model, args.steps), StepClock(device)
    profiled = args.profile and packed and loss == "auto"
    with compilation.compiled(model, compiled, dynamic=compile_dynamic(args)):  # the stage's sft.compile
        run_sft_steps(args, model, backend, clock, rows, collate, device, chunked, profiled, compiled)
    return {**clock.summary(args.warmup), **peak_memory(device), "chunked_loss": chunked}


def compile_dynamic(args: argparse.Namespace) -> bool | None:
    return None if args.compile_dynamic == "none" else True


def run_sft_steps(args: argparse.Namespace, model: torch.nn.Module, backend: TorchBackend, clock: StepClock,
                  rows: list[dict[str, Any]], collate: Any, device: torch.device, chunked: bool, profiled: bool,
                  compiled: bool) -> None:
    for step in range(args.steps):
        chunk = rows[step * args.batch:(step + 1) * args.batch]
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
        profiler = torch.profiler.profile(record_shapes=False) if profiled and step == args.steps - 1 \
            else contextlib.nullcontext()
        with profiler:
            clock.begin()
            clock.count(sum(len(r["input_ids"]) for r in chunk))
            with torch.profiler.record_function("sft.forward"):
                loss_value = causal_lm_loss(model, batch) if chunked else model(**batch).loss
            with torch.profiler.record_function("sft.backward"):
                backend.backward(loss_value)
            with torch.profiler.record_function("sft.optimizer"):
                backend.step()
            clock.end()
        if isinstance(profiler, torch.profiler.profile):
            write_profile(profiler, f"profile_sft_{args.size}{'_' + args.tag if args.tag else ''}_{device.type}"
                                    f"{'_compiled' if compiled else ''}.txt", "sft.")


def ours_dpo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
             texts: list[dict[str, str]], packed: bool, loss: bool | str = "auto",
             compiled: bool = False) -> dict[str, Any]:
    fresh(device)
    roles = Roles(build_llama(args.size, device, dtype, seed=args.seed))
    roles.add(dpo.POLICY, lora(), trainable=True)
    roles.add_base(dpo.REFERENCE)
    roles.train()
    chunked = enabled(loss, roles.model, device)  # the stage's dpo.chunked_loss
    rows = []
    for t in texts:
        p = tok(t["prompt"])["input_ids"]
        sides = {s: tok(t[s], add_special_tokens=False)["input_ids"] for s in ("chosen", "rejected")}
        rows.append({f"{s}_{k}": v for s, ids in sides.items()
                     for k, v in (("input_ids", p + ids), ("labels", [IGNORE_INDEX] * len(p) + ids))})
    multiple = auto_pad_multiple(device)  # the stage's data.pad_to_multiple_of: auto
    collate = PackedPairCollator(max_tokens=args.max_len, pad_token_id=0, pad_to_multiple_of=multiple) if packed \
        else PairCollator(pad_token_id=0, pad_to_multiple_of=multiple)
    backend, clock = backend_for(roles, args.steps), StepClock(device)
    with compilation.compiled(roles, compiled, dynamic=compile_dynamic(args)):  # the stage's dpo.compile
        for step in range(args.steps):
            chunk = rows[step * args.batch:(step + 1) * args.batch]
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            clock.begin()
            clock.count(sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in chunk))
            losses = dpo.pair_terms(roles, batch, beta=0.1, loss_type="sigmoid", chunked=chunked)[0]
            backend.backward(losses.mean())
            backend.step()
            clock.end()
    return {**clock.summary(args.warmup, items_per_step=args.batch), **peak_memory(device), "chunked_loss": chunked}


def grpo_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"prompts_per_step": args.prompts, "num_generations": args.generations, "minibatches": args.minibatches,
            "learning_rate": LR, "max_grad_norm": 1.0, "loss_normalisation": "token", "clip_low": 0.2,
            "clip_high": 0.28, "kl": {"coef": 0.04}, "generation": {"max_new_tokens": args.new_tokens},
            "rewards": [{"function": f"{Path(__file__).resolve()}:distinct_words"}]}


def ours_grpo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
              texts: list[dict[str, str]], engine: bool) -> dict[str, Any]:
    from datasets import Dataset

    from raypeft.pipeline import group_rollout
    from raypeft.pipeline.config import parse_config
    from raypeft.pipeline.rewards import load_reward_functions
    from raypeft.pipeline.rollout_engine import RolloutEngine
    from raypeft.pipeline.stages import grpo

    fresh(device)
    roles = Roles(build_llama(args.size, device, dtype, seed=args.seed))
    roles.add(grpo.POLICY, lora(), trainable=True)
    roles.add_base(grpo.REFERENCE)
    roles.primary = grpo.POLICY
    roles.eval()  # as the stage: no dropout anywhere
    settings = grpo_settings(args)
    if engine:
        settings["generation"].update(dict(kv.split("=", 1) for kv in args.engine))
    spec = parse_config({"grpo": settings}).grpo
    functions = load_reward_functions(spec.rewards, "grpo.rewards")
    rows = Dataset.from_list(texts)
    prompt_set = [{"input_ids": tok(t["prompt"])["input_ids"]} for t in texts]
    backend = TorchBackend(roles, lr=LR, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                           total_steps=args.steps * spec.minibatches, max_grad_norm=1.0,
                           clip_groups=[roles.trainable_parameters(grpo.POLICY)])
    # one per stage, as the stage keeps it; rollouts right-padded as the stage pads them
    gen_engine = RolloutEngine(spec.generation, auto_pad_multiple(device))
    gen_engine.reserve(max(len(p["input_ids"]) for p in prompt_set))  # as the stage does
    chunked = enabled(spec.chunked_loss, roles.model, device)  # the stage's grpo.chunked_loss
    clock, parts = StepClock(device), []
    if args.profile and engine:
        grpo.update = phase("grpo.update", grpo.update)
        group_rollout.score_tokens = phase("grpo.score", group_rollout.score_tokens)
        group_rollout.rollout.sample = phase("grpo.sample", group_rollout.rollout.sample)
    for step in range(args.steps):
        profiler = torch.profiler.profile(record_shapes=False) if args.profile and engine and step == args.steps - 1 \
            else contextlib.nullcontext()
        with profiler:
            ro = ours_grpo_step(args, step, roles, spec, functions, rows, prompt_set, tok, device, gen_engine, backend,
                                clock, chunked)
        parts.append({"rollout_s": clock.marks[-1], "new_tokens": int(ro.mask.sum())})
        if isinstance(profiler, torch.profiler.profile):
            write_profile(profiler, f"profile_grpo_{args.size}_{device.type}.txt")
    timed = parts[args.warmup:]
    return {**clock.summary(args.warmup), **peak_memory(device),
            "rollout_s_mean": statistics.mean(p["rollout_s"] for p in timed),
            "new_tokens_per_step_mean": statistics.mean(p["new_tokens"] for p in timed),
            "generation": {k: v for k, v in spec.generation.model_dump().items() if k != "max_new_tokens"},
            "chunked_loss": chunked}


def phase(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` under a profiler label (``--profile``: the step's time by phase)."""
    def labelled(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function(name):
            return fn(*a, **k)
    return labelled


def write_profile(prof: Any, name: str, phases: str = "grpo.") -> None:
    """The profiled step's phases (labels starting with ``phases``; CPU and device time) and its
    top operators by device time."""
    events = prof.key_averages()
    lines = [f"`{command_line()}`", "", "==== phases (total CPU / device ms)"]
    for e in events:
        if e.key.startswith(phases):
            lines.append(f"{e.key}: cpu {e.cpu_time_total / 1e3:.1f} ms, device {e.device_time_total / 1e3:.1f} ms, "
                         f"calls {e.count}")
    lines += ["", "==== operators by self device time",
              events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=60),
              "==== operators by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=20,
                                                               max_name_column_width=60)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]), flush=True)


def ours_grpo_step(args: argparse.Namespace, step: int, roles: Roles, spec: Any, functions: list[Any], rows: Any,
                   prompt_set: list[dict[str, Any]], tok: Any, device: torch.device, gen_engine: Any,
                   backend: TorchBackend, clock: StepClock, chunked: bool) -> Any:
    from raypeft.pipeline.data import PromptCollator
    from raypeft.pipeline.stages import grpo

    ids = list(range(step * args.prompts, (step + 1) * args.prompts))
    torch.manual_seed(args.seed * 100003 + step)
    clock.begin()
    group, scores = grpo.rollout_step(roles, prompt_set, rows, ids, functions, spec, tok,
                                      PromptCollator(pad_token_id=0), device, {}, old_logprobs=True,
                                      reference=True, num_generations=spec.num_generations,
                                      rollout_engine=gen_engine, chunked=chunked)
    ro = group.rollout
    sync(device)
    clock.marks.append(time.perf_counter() - clock._t0)
    ro.advantages, kept = grpo.compute_advantages(spec, scores, ro)
    generator = torch.Generator().manual_seed(args.seed * 1000 + step)
    grpo.update(roles, ro, kept.keep_rows.to(device), spec, backend, generator, 1, step=step + 1, chunked=chunked)
    clock.count(ro.attention_mask.sum())
    clock.end()
    return ro


# -------------------------------------------------------------------------------------- TRL
def trl_common(args: argparse.Namespace, device: torch.device, out: str, batch: int) -> dict[str, Any]:
    return dict(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False, bf16=device.type == "cuda",
                use_cpu=device.type == "cpu", logging_steps=10**6, report_to="none", save_strategy="no",
                eval_strategy="no", seed=args.seed, dataloader_num_workers=0, disable_tqdm=True, max_length=args.max_len)


def run_trainer(trainer: Any, clock: StepClock) -> None:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            clock.begin()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            clock.end()

    trainer.add_callback(Clock())
    handle = clock.hook(trainer.model)
    trainer.train()
    handle.remove()


def trl_sft(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
            texts: list[dict[str, str]], packed: bool, mean_len: float) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    fresh(device)
    model = build_llama(args.size, device, dtype, seed=args.seed)
    batch = max(1, math.ceil(args.batch * mean_len / args.max_len)) if packed else args.batch
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(**trl_common(args, device, out, batch), packing=packed, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(texts), processing_class=tok,
                             peft_config=peft_lora())
        run_trainer(trainer, clock)
    return {**clock.summary(args.warmup), **peak_memory(device), "micro_batch_rows": batch}


def trl_dpo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
            texts: list[dict[str, str]]) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    fresh(device)
    model = build_llama(args.size, device, dtype, seed=args.seed)
    clock = StepClock(device)
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(**trl_common(args, device, out, args.batch), beta=0.1, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(texts), processing_class=tok,
                             peft_config=peft_lora())
        run_trainer(trainer, clock)
    return {**clock.summary(args.warmup, items_per_step=args.batch), **peak_memory(device)}


def trl_grpo(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tok: Any,
             texts: list[dict[str, str]]) -> dict[str, Any]:
    """One GRPO step = ``steps_per_generation`` optimiser steps: the first samples and scores the
    whole generation batch, the rest reuse it; timed as their sum."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    fresh(device)
    model = build_llama(args.size, device, dtype, seed=args.seed)
    per_step = args.prompts * args.generations // args.minibatches
    clock = StepClock(device)
    common = trl_common(args, device, "", per_step)
    common.pop("max_length")
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(**{**common, "output_dir": out, "max_steps": args.steps * args.minibatches},
                         num_generations=args.generations, steps_per_generation=args.minibatches,
                         max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.04,
                         num_iterations=1, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", shuffle_dataset=False,
                         log_completions=False)
        trainer = GRPOTrainer(model=model, reward_funcs=distinct_words, args=cfg,
                              train_dataset=Dataset.from_list(texts), processing_class=tok, peft_config=peft_lora())
        run_trainer(trainer, clock)
    # fold the optimiser steps into GRPO steps (each generation's minibatches)
    m = args.minibatches
    clock.times = [sum(clock.times[i:i + m]) for i in range(0, len(clock.times), m)]
    clock.tokens = [sum(clock.tokens[i:i + m]) for i in range(0, len(clock.tokens), m)]
    return {**clock.summary(args.warmup), **peak_memory(device)}


# ------------------------------------------------------------------------------------ report
def mfu(tokens_per_s: float, params: int, device: torch.device) -> float | None:
    """Model FLOPs utilisation of a frozen-base adapter step: 4 x N FLOPs per token, N the weights
    of every linear layer and the LM head (forward 2N, backward through the activations 2N; no
    weight gradients of the base), attention not counted, over the H200's dense bf16 peak."""
    if device.type != "cuda":
        return None
    return tokens_per_s * 4 * params / (H200_BF16_DENSE_TFLOPS * 1e12)


def write(stage: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          runs: dict[str, dict[str, Any]], lengths: dict[str, float], params: int, failed: dict[str, str]) -> None:
    for r in runs.values():
        r["mfu"] = mfu(r["tokens_per_s"], params, device) if stage != "grpo" else None  # GRPO: mostly generation
    pairs = [("ours padded", "trl padded"), ("ours packed", "trl packed"), ("ours packed", "trl padded"),
             ("ours engine", "trl"), ("ours default", "trl")]
    ratios = {f"{a} / {b}": {"throughput": runs[a]["tokens_per_s"] / runs[b]["tokens_per_s"],
                             "speed_up": runs[b]["s_per_step_median"] / runs[a]["s_per_step_median"],
                             **({"peak_allocated": runs[a]["peak_allocated_gib"] / runs[b]["peak_allocated_gib"]}
                                if "peak_allocated_gib" in runs[a] else {})}
              for a, b in pairs if a in runs and b in runs}
    report = {"meta": {"command": command_line(), **machine_info(device), "size": args.size, "dtype": str(dtype),
                       "batch": args.batch, "max_len": args.max_len, "steps": args.steps, "warmup": args.warmup,
                       "median_words": args.median, "base_params": params,
                       **({"prompts": args.prompts, "generations": args.generations, "new_tokens": args.new_tokens,
                           "minibatches": args.minibatches, "prompt_median": args.prompt_median}
                          if stage == "grpo" else {}),
                       "trl": __import__("trl").__version__, "peft": __import__("peft").__version__},
              "lengths": lengths, "runs": runs, "failed": failed, "ratios": ratios}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"vs_trl_{stage}_{args.size}{'_' + args.tag if args.tag else ''}_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    meta = report["meta"]
    unit = "pairs/s" if stage == "dpo" else "rows"
    md = [f"### {stage.upper()} against TRL {meta['trl']} (peft {meta['peft']}), Llama-like '{args.size}' "
          f"({meta['dtype']}), LoRA r=16 all-linear ({device.type})", "", f"`{meta['command']}`", "",
          machine_line(meta), "",
          (f"{args.prompts} prompts x {args.generations} completions of {args.new_tokens} new tokens per step (no "
           f"stop: a random model rarely samples eos), {args.minibatches} minibatches, KL coef 0.04; "
           if stage == "grpo" else
           f"Micro-batch {args.batch} {'pairs' if stage == 'dpo' else 'rows'}, max_length {args.max_len}, ") +
          f"{args.steps} steps of which the first {args.warmup} untimed; "
          f"{'prompt' if stage == 'grpo' else 'sequence'} lengths mean "
          f"{lengths['mean']:.0f}, median {lengths['median']:.0f}, max {lengths['max']:.0f} tokens.", "",
          "| run | real tokens/s | " + ("pairs/s | " if stage == "dpo" else "") +
          "s per step | tokens per step | peak GPU alloc GiB | peak reserved GiB | MFU |",
          "|---|---|" + ("---|" if stage == "dpo" else "") + "---|---|---|---|---|"]
    for name, r in runs.items():
        md.append(f"| {name} | {r['tokens_per_s']:,.0f} | " + (f"{r['pairs_per_s']:.1f} | " if stage == "dpo" else "")
                  + f"{r['s_per_step_median']:.3f} | {r['tokens_per_step_mean']:,.0f} | "
                  f"{r.get('peak_allocated_gib', float('nan')):.2f} | {r.get('peak_reserved_gib', float('nan')):.2f} | "
                  + (f"{100 * r['mfu']:.1f}% |" if r["mfu"] is not None else "- |"))
    for name, why in failed.items():
        md.append(f"| {name} | {why} |" + " |" * (6 if stage == "dpo" else 5))
    md += ["", "| comparison | throughput ratio | speed-up per step | peak allocated ratio |", "|---|---|---|---|"]
    for name, r in ratios.items():
        md.append(f"| {name} | {r['throughput']:.2f}x | {r['speed_up']:.2f}x | "
                  + (f"{r['peak_allocated']:.2f}" if "peak_allocated" in r else "-") + " |")
    if stage == "grpo":
        md += ["", "ours engine: grpo.generation " + ", ".join(f"{k}={v}" for k, v in
                                                           runs.get("ours engine", {}).get("generation", {}).items()
                                                           if k in ("fold_adapter", "compile", "decode_loop", "cache",
                                                                    "drop_finished", "prompt_bucket")) + "; "
               "real tokens: prompt + completion tokens of each step's training forwards; rollout s (ours): "
               + ", ".join(f"{n} {r['rollout_s_mean']:.2f}" for n, r in runs.items() if "rollout_s_mean" in r) + "."]
    md += [] if stage == "grpo" else ["", f"MFU: real tokens/s x 4 x {params:,} linear-layer weights (LM head included) / "
           f"{H200_BF16_DENSE_TFLOPS:.0f} TFLOP/s "
           f"(dense bf16 peak); attention FLOPs not counted. Units: {unit}."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def stage_texts(stage: str, args: argparse.Namespace) -> tuple[list[dict[str, str]], list[int]]:
    """The stage's texts (deterministic from the arguments) and the token length of each sequence."""
    n = args.batch * args.steps
    if stage == "grpo":
        texts = prompt_texts(args.prompts * args.steps, args.prompt_median, args.max_len, args.seed)
        return texts, [len(t["prompt"].split()) for t in texts]
    if stage == "sft":
        texts = sft_texts(n, args.median, args.max_len, args.seed)
        return texts, [len(t["prompt"].split()) + len(t["completion"].split()) for t in texts]
    texts = pair_texts(n, max(2, args.median // 3), args.max_len, args.seed)
    return texts, [len(t["prompt"].split()) + len(t[s].split()) for t in texts for s in ("chosen", "rejected")]


# name -> (function, keywords) of each run a stage can have
RUNS: dict[str, dict[str, tuple[Callable[..., dict[str, Any]], dict[str, Any]]]] = {
    "sft": {"ours padded": (ours_sft, {"packed": False}), "ours packed": (ours_sft, {"packed": True}),
            "ours packed, full logits": (ours_sft, {"packed": True, "loss": False}),
            "ours packed, compiled": (ours_sft, {"packed": True, "compiled": True}),
            "trl padded": (trl_sft, {"packed": False}), "trl packed": (trl_sft, {"packed": True})},
    "dpo": {"ours padded": (ours_dpo, {"packed": False}), "ours packed": (ours_dpo, {"packed": True}),
            "ours packed, full logits": (ours_dpo, {"packed": True, "loss": False}),
            "ours packed, compiled": (ours_dpo, {"packed": True, "compiled": True}),
            "trl padded": (trl_dpo, {})},
    "grpo": {"ours default": (ours_grpo, {"engine": False}), "ours engine": (ours_grpo, {"engine": True}),
             "trl": (trl_grpo, {})},
}


def run_one(stage: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run, from the arguments alone (what a fresh process needs)."""
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts, lens = stage_texts(stage, args)
    fn, kwargs = RUNS[stage][name]
    if fn is trl_sft:
        kwargs = {**kwargs, "mean_len": statistics.mean(lens)}
    return fn(args, device, dtype, word_tokenizer(), texts, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--runs", default="ours,trl", help="which sides: ours, trl or both")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--median", type=int, default=96, help="median words (tokens) of an SFT row; a third for pairs")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=8, help="GRPO: prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="GRPO: completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="GRPO: new tokens per completion")
    ap.add_argument("--minibatches", type=int, default=2, help="GRPO: optimiser steps per generation")
    ap.add_argument("--prompt-median", type=int, default=64, help="GRPO: median prompt words (tokens)")
    ap.add_argument("--engine", action="append", default=None, metavar="KEY=VALUE",
                    help="GRPO: grpo.generation settings of 'ours engine' (repeatable; default fold_adapter=true, "
                         "compile=true on CUDA, decode_loop=own)")
    ap.add_argument("--profile", action="store_true",
                    help="profile the last step of 'ours engine' (GRPO) or of 'ours packed' and its compiled run "
                         "(SFT) into results/profile_<stage>_<size>[_<tag>]_<device>[_compiled].txt")
    ap.add_argument("--names", default=None,
                    help="only these runs, separated by ';' (e.g. 'ours packed;ours packed, compiled')")
    ap.add_argument("--compile-dynamic", default="none", choices=["none", "true"],
                    help="the compiled runs' dynamic= (none: torch's default, the stages' setting; true: symbolic "
                         "shapes from the first trace)")
    ap.add_argument("--compile", action="store_true",
                    help="also run ours packed with the decoder stack under torch.compile (sft/dpo.compile)")
    ap.add_argument("--tag", default="", help="added to the result files' names (e.g. b64)")
    ap.add_argument("--full-logits", action="store_true",
                    help="also run ours packed with the full-vocabulary logits (chunked_loss: false)")
    ap.add_argument("--same-process", action="store_true",
                    help="run everything in this process (by default each run gets a fresh one, so that no run "
                         "finds kernels, cuDNN plans or allocator blocks an earlier run left)")
    args = ap.parse_args()
    device = pick_device(args.device)
    if args.engine is None:
        args.engine = ["fold_adapter=true", "decode_loop=own"] + (["compile=true"] if device.type == "cuda" else [])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sides = set(args.runs.split(","))
    # the weights a token is multiplied by: every linear layer, the LM head included (tied or not)
    params = sum(m.weight.numel() for m in build_llama(args.size, torch.device("meta"), dtype).modules()
                 if isinstance(m, torch.nn.Linear))
    spawn = multiprocessing.get_context("spawn")
    for stage in args.stages.split(","):
        if stage not in RUNS:
            raise SystemExit(f"--stages: unknown stage {stage!r} (sft, dpo, grpo)")
        names = [n for n in RUNS[stage] if n.split()[0] in sides and (args.full_logits or "full logits" not in n)
                 and (args.compile or "compiled" not in n) and (args.names is None or n in args.names.split(";"))]
        runs: dict[str, dict[str, Any]] = {}
        failed: dict[str, str] = {}
        for name in names:
            print(f"[{stage}] {name} ...", flush=True)
            try:
                if args.same_process:
                    runs[name] = run_one(stage, name, args)
                else:
                    with spawn.Pool(1) as pool:
                        runs[name] = pool.apply(run_one, (stage, name, args))
            except torch.OutOfMemoryError as e:  # reported as such; the other runs go on
                failed[name] = f"out of memory: {str(e).splitlines()[0][:160]}"
                fresh(device)
            print(f"[{stage}] {name}: {runs.get(name) or failed[name]}", flush=True)
        _, lens = stage_texts(stage, args)
        lengths = {"mean": statistics.mean(lens), "median": statistics.median(lens), "max": max(lens)}
        write(stage, args, device, dtype, runs, lengths, params, failed)


if __name__ == "__main__":
    main()
