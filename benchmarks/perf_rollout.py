"""Rollout generation: today's path against the rollout engine's levers, side by side in one run.

    python benchmarks/perf_rollout.py --device cuda --size 1b            # one H200: about 3 minutes
    python benchmarks/perf_rollout.py --device cuda --size 8b --batch 64
    python benchmarks/perf_rollout.py --device cpu --size tiny --batch 8 --prompt-len 32 --new 32

A random-initialised Llama of the given shape (bf16 on GPU, fp32 on CPU), LoRA r=16 on every
linear layer (B non-zero, as after training), ``--batch`` prompts of ``--prompt-len`` tokens,
``--new`` sampled tokens (temperature 1, eos never stops a row: every variant generates the same
number of tokens). Each variant runs ``pipeline.rollout_engine.RolloutEngine.generate`` with its
``GenerationSpec`` levers; one untimed warm-up call (compilation), then ``--repeats`` timed calls
(median). tokens/s counts new tokens of all rows; ms per decode step is the call's time over
``--new``. Peak GPU memory allocated/reserved over the timed calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import Report, build_llama, pick_device, sync  # noqa: E402

from raypeft.adapters import LoraConfig, get_adapter_model  # noqa: E402
from raypeft.pipeline.config import GenerationSpec  # noqa: E402
from raypeft.pipeline.rollout_engine import RolloutEngine  # noqa: E402

VARIANTS = {  # name: (what it is, GenerationSpec levers)
    "today": ("unmerged LoRA, dynamic cache", {}),
    "folded": ("folded copy, dynamic cache", {"fold_adapter": True}),
    "static": ("unmerged LoRA, static cache + compile", {"cache": "static", "compile": True, "prompt_bucket": 64}),
    "folded-static": ("folded copy, static cache + compile",
                      {"fold_adapter": True, "cache": "static", "compile": True, "prompt_bucket": 64}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_llama(args.size, device, dtype)
    base.config.use_cache = True
    model = get_adapter_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), adapter_name="policy")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    report = Report("rollout", device, f"Rollout generation, {args.size} Llama shape, LoRA r=16 all-linear, "
                    f"batch {args.batch} x {args.prompt_len} prompt + {args.new} new tokens",
                    ["variant", "tokens/s", "ms per step", "speed-up", "peak alloc GiB", "peak reserved GiB",
                     "first call s"], suffix=f"_{args.size}")
    report.notes.append("today = the PPO/GRPO sampling path before the engine (unmerged LoRA, HF dynamic cache)")
    base_rate = None
    chosen = [v for v in args.variants.split(",") if v]
    for name in chosen:
        what, levers = VARIANTS[name]
        engine = RolloutEngine(GenerationSpec(max_new_tokens=args.new, **levers))

        def call(engine: RolloutEngine = engine) -> torch.Tensor:
            return engine.generate(model, "policy", ids, mask, pad_token_id=0, eos_token_id=vocab + 7,
                                   sampling={"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0})

        t0 = time.perf_counter()
        out = call()
        sync(device)
        first = time.perf_counter() - t0
        assert out.shape == (args.batch, args.new), out.shape
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            sync(device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rate = args.batch * args.new / t
        base_rate = base_rate or rate
        alloc = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
        report.add([f"{name}: {what}", rate, 1000 * t / args.new, rate / base_rate, alloc, reserved, first],
                   {"variant": name, "what": what, "levers": levers, "tokens_per_s": rate,
                    "ms_per_step": 1000 * t / args.new,
                    "speedup": rate / base_rate, "peak_allocated_gib": alloc, "peak_reserved_gib": reserved,
                    "first_call_s": first, "times_s": times})
        del engine, call
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
