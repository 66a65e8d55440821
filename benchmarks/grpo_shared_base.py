"""GRPO steps on one NF4 Llama base: today's generation path against the rollout engine, one run.

    python benchmarks/grpo_shared_base.py --size 1b --engine fold_adapter=true --engine compile=true --engine decode_loop=own
    python benchmarks/grpo_shared_base.py --size 8b --steps 3 --engine fold_adapter=true --engine compile=true --engine decode_loop=own
    python benchmarks/grpo_shared_base.py --device cpu --size tiny --intermediate 128 --prompts 2 --generations 2 --new-tokens 8 --steps 2   # dry run

The base as in ``ppo_shared_base.py`` (random init with the size's Llama shapes, bitsandbytes
NF4 with double quantization, prepared for k-bit training as the pipeline does). Roles as the
GRPO stage builds them with a reward adapter: the policy (trainable LoRA r=16 on every linear
layer), the reference (the base itself, adapters off) and a reward model (a frozen LoRA + value
head); no critic. One step is the stage's own functions: ``rollout.sample`` through the stage's
``RolloutEngine`` (``--prompts`` prompts x ``--generations`` completions), ``group_rollout.score_tokens``
(the sampling policy's and the reference's log-probs, the reward model's scores),
``grpo.compute_advantages`` and ``grpo.update`` (``minibatches`` optimiser steps, plain PyTorch
backend). The reward is the reward model's score alone (programmable rewards work on decoded text;
a random model's text says nothing).

Timed: seconds per step and the split into generation, scoring and update, for ``--steps`` steps
of the default generation path, then the same with the ``--engine`` levers (the first step of
each excluded from the mean: compilation, and the default path's first call as well).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import Report, sync  # noqa: E402
from ppo_shared_base import GIB, bytes_on, peaks, quantized_base, reset, width_multiple  # noqa: E402


def grpo_roles(base: torch.nn.Module, rank: int):
    from raypeft.adapters import LoraConfig
    from raypeft.pipeline.roles import Roles
    from raypeft.pipeline.stages import grpo

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    roles = Roles(base)
    roles.add(grpo.POLICY, lora, trainable=True)
    roles.add_base(grpo.REFERENCE)
    roles.add(grpo.REWARD, lora, trainable=False, value_head="zero")
    roles.primary = grpo.POLICY
    with torch.no_grad():  # a reward model that tells completions apart (a zero head scores all alike)
        head = roles.heads[grpo.REWARD]
        head.weight.normal_(0.0, 0.02, generator=torch.Generator(head.weight.device).manual_seed(7))
    return roles.eval()


def grpo_steps(roles, spec, backend, prompts, steps: int, device: torch.device, seed: int,
               chunked: bool = False, width_multiple: int | None = None) -> list[dict]:
    from raypeft.pipeline import group_rollout, rollout
    from raypeft.pipeline.rewards.scoring import RewardScores
    from raypeft.pipeline.rollout_engine import RolloutEngine
    from raypeft.pipeline.stages import grpo

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    # one per stage: its folded copy and compiled step persist
    engine = RolloutEngine(spec.generation, width_multiple)
    need_ref = spec.kl.coef > 0
    need_old = spec.update_epochs > 1 or spec.minibatches > 1
    out = []
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1000 + step)
        ro = rollout.sample(roles, grpo.POLICY, prompts, spec.generation, tokenizer, None, engine)
        sync(device)
        t1 = time.perf_counter()
        chunk = max(1, ro.input_ids.shape[0] // spec.minibatches)
        group_rollout.score_tokens(roles, ro, chunk=chunk, temperature=spec.generation.temperature,
                                   policy=grpo.POLICY if need_old else None,
                                   reference=grpo.REFERENCE if need_ref else None, reward=grpo.REWARD,
                                   chunked=chunked)
        n = ro.input_ids.shape[0]
        total = ro.scores.detach().double().cpu()
        scores = RewardScores({"reward_model": total.tolist()}, total, torch.ones(n, dtype=torch.bool))
        ro.advantages, kept = grpo.compute_advantages(spec, scores, ro)
        sync(device)
        t2 = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1000 + step * 7919)
        sums = grpo.update(roles, ro, kept.keep_rows.to(ro.mask.device), spec, backend, generator, 1, step=step + 1,
                           chunked=chunked)
        sync(device)
        t3 = time.perf_counter()
        tokens = int(ro.attention_mask.sum().item())
        record = {"step": step + 1, "seconds": t3 - t0, "generate_s": t1 - t0, "score_s": t2 - t1,
                  "update_s": t3 - t2, "tokens": tokens, "tokens_per_s": tokens / (t3 - t0),
                  "new_tokens": int(ro.mask.sum().item()), "reward_mean": float(total.mean()),
                  "loss": sums["loss"] / max(sums["updates"], 1)}
        out.append(record)
        print(f"[bench] step {step + 1}: {record['seconds']:.2f}s (generate {record['generate_s']:.2f}, score "
              f"{record['score_s']:.2f}, update {record['update_s']:.2f}), {tokens} tokens, reward "
              f"{record['reward_mean']:.3f}", flush=True)
    return out


def mean(steps: list[dict], key: str) -> float:
    timed = steps[1:] or steps
    return sum(s[key] for s in timed) / len(timed)


def main() -> None:
    from raypeft.pipeline import lm_head_loss
    from raypeft.pipeline.backends import TorchBackend
    from raypeft.pipeline.config import parse_config
    from raypeft.pipeline.stages import grpo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", help="perf_common.llama_config shapes (8b, 1b, tiny, ...)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8, help="grpo.prompts_per_step")
    parser.add_argument("--generations", type=int, default=8, help="grpo.num_generations")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=None,
                        help="override the MLP width (CPU dry runs: bitsandbytes' CPU kernel wants multiples of 64)")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--chunked-loss", default="auto",
                        help="grpo.chunked_loss of the engine run (true/false/auto; the default path: false)")
    parser.add_argument("--width-multiple", default="auto",
                        help="the engine run's rollout width multiple (auto: the stage's, 64 on a GPU; none; or N)")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="also time the steps with these grpo.generation engine settings (repeatable)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    reset(device)
    before = bytes_on(device)
    base = quantized_base(args.size, device, dtype, seed=0, intermediate=args.intermediate)
    base_bytes = bytes_on(device) - before
    roles = grpo_roles(base, args.rank)
    spec = parse_config({"grpo": {"prompts_per_step": args.prompts, "num_generations": args.generations,
                                  "minibatches": args.minibatches, "learning_rate": 1e-5,
                                  "generation": {"max_new_tokens": args.new_tokens},
                                  "kl": {"coef": 0.04}}}).grpo
    backend = TorchBackend(roles, lr=spec.learning_rate, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                           total_steps=2 * args.steps * spec.minibatches, max_grad_norm=spec.max_grad_norm,
                           clip_groups=[roles.trainable_parameters(grpo.POLICY)])
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(1))
    ids = ids.repeat_interleave(args.generations, dim=0)  # each prompt's group, as group_rollout lays it out
    prompts = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}

    report = Report("grpo_shared_base", device, f"GRPO steps on one NF4 {args.size} Llama",
                    ["generation path", "s / step", "generate s", "score s", "update s", "tokens/s",
                     "peak allocated (GiB)", "peak reserved (GiB)"], suffix=args.suffix)
    report.notes.append(
        f"{args.size} Llama shapes, NF4 + double quant, bf16 compute ({base_bytes / GIB:.2f} GiB base); policy LoRA "
        f"r={args.rank} all-linear, reference = base, reward model = frozen LoRA + value head; {args.prompts} prompts "
        f"x {args.generations} completions, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
        f"{spec.minibatches} minibatches, 1 epoch, KL coef {spec.kl.coef}; means over steps 2..{args.steps}")

    chunked = lm_head_loss.enabled(yaml.safe_load(args.chunked_loss), roles.model, device)
    multiple = width_multiple(args.width_multiple, device)
    runs = [("default generation path, full logits", {}, False, None)]
    if args.engine:
        label = ", ".join(args.engine + [f"chunked_loss={str(chunked).lower()}", f"width_multiple={multiple}"])
        runs.append((f"rollout engine ({label})",
                     {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.engine)}, chunked,
                     multiple))
    seconds = {}
    for label, levers, chunks, row_multiple in runs:
        run_spec = spec.model_copy(update={"generation": spec.generation.model_copy(update=levers)})
        reset(device)
        steps = grpo_steps(roles, run_spec, backend, prompts, args.steps, device, seed=0, chunked=chunks,
                           width_multiple=row_multiple)
        p = peaks(device)
        seconds[label] = mean(steps, "seconds")
        report.add([label, seconds[label], mean(steps, "generate_s"), mean(steps, "score_s"), mean(steps, "update_s"),
                    mean(steps, "tokens_per_s"), p.get("peak_allocated_gib", float("nan")),
                    p.get("peak_reserved_gib", float("nan"))],
                   {"path": label, "engine": levers, "chunked_loss": chunks, "steps": steps, **p})
    if len(runs) == 2:
        report.notes.append(f"rollout engine: {seconds[runs[0][0]] / seconds[runs[1][0]]:.2f}x faster per GRPO step "
                            "than the default generation path with full-vocabulary logits (today's path) in the same "
                            "run (the engine's steps continue from the policy the default path's steps left)")
    report.write()


if __name__ == "__main__":
    main()
