"""A whole training step of a Llama-architecture model, ours vs peft: tokens/s and peak memory.

    python benchmarks/perf_train_step.py                                  # CPU: "small" Llama, 4 x 128 tokens, fp32
    python benchmarks/perf_train_step.py --device cuda --size 1b          # GPU: Llama-3.2-1B shapes, 4 x 512, bf16
    python benchmarks/perf_train_step.py --device cuda --size 8b --methods lora
    python benchmarks/perf_train_step.py --device cuda --methods qlora    # NF4 base (bitsandbytes), bf16 compute

A step is forward with labels, backward, AdamW step, zero_grad -- the same optimizer over the
same trainable tensors on both sides. Methods: ``lora`` (r=16, alpha=32, every linear layer of the
blocks, dropout 0), ``lora_dropout`` (the same with dropout 0.05), ``prompt`` (prompt tuning, 20
virtual tokens), ``prefix`` (prefix tuning, 20 virtual tokens), ``lora_fp32`` (float32 adapters on the bf16 base:
peft's default ``autocast_adapter_dtype=True`` against our ``adapter_dtype=torch.float32``), ``qlora`` (LoRA on a bitsandbytes
NF4 base, meant for GPU). Both sides start from the same random base model and identical adapter weights; the
first step's losses are compared before timing.

Memory: GPU -- peak allocated and reserved above the step's start (``torch.cuda`` statistics,
cache emptied first); CPU -- peak RSS above the step's start, sampled by a thread (the script
re-executes itself with a fixed glibc mmap threshold so that RSS follows live tensors).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings

import torch

from perf_common import (
    Report,
    alternate,
    alternate_memory,
    build_llama,
    copy_trainable,
    memory_ratios,
    pick_device,
    reexec_for_rss,
    summarize,
)

from raypeft import adapters

METHODS = ("lora", "lora_dropout", "lora_fp32", "prompt", "prefix", "qlora")


def configs(method: str) -> tuple[object, object]:
    """(ours, peft) configs with identical fields."""
    import peft

    if method in ("lora", "qlora", "lora_dropout", "lora_fp32"):
        kw = dict(r=16, lora_alpha=32, lora_dropout=0.05 if method == "lora_dropout" else 0.0,
                  target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
        return adapters.LoraConfig(**kw), peft.LoraConfig(**kw)
    if method == "prompt":
        kw = dict(num_virtual_tokens=20, task_type="CAUSAL_LM")
        return adapters.PromptTuningConfig(**kw), peft.PromptTuningConfig(**kw)
    if method == "prefix":
        kw = dict(num_virtual_tokens=20, task_type="CAUSAL_LM")
        return adapters.PrefixTuningConfig(**kw), peft.PrefixTuningConfig(**kw)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def build_pair(method: str, size: str, device: torch.device, dtype: torch.dtype):
    import peft

    base = build_llama(size, device, dtype)
    if method == "qlora":
        # two quantizations of the same weights: identical NF4 tensors, no deepcopy of Params4bit
        other = copy.deepcopy(base)
        adapters.quantize_linear_layers(base, 4, compute_dtype=dtype)
        adapters.quantize_linear_layers(other, 4, compute_dtype=dtype)
    else:
        other = copy.deepcopy(base)
    ours_cfg, peft_cfg = configs(method)
    # lora_fp32: float32 adapters on a low-precision base, peft's default (autocast_adapter_dtype)
    fp32 = method == "lora_fp32"
    ours = adapters.get_adapter_model(base, ours_cfg, adapter_dtype=torch.float32 if fp32 else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(other, peft_cfg, autocast_adapter_dtype=fp32)
    copy_trainable(ours, ref)
    return ours, ref


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-5):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, sum(p.numel() for p in params)


def profile_step(fns: dict, device: torch.device, path: str, rows: int = 25) -> None:
    """torch.profiler tables (self time per op) of one step of each side, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as out:
        for name, fn in fns.items():
            fn()
            with profile(activities=activities, record_shapes=False) as prof:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
            out.write(f"==== {name}: one training step, ops by {sort}\n{table}\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None, help="tiny | small | 1b | 8b (default: small on CPU, 1b on GPU)")
    parser.add_argument("--methods", default=None, help="comma-separated, default lora,lora_dropout,prompt,prefix")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="write torch.profiler tables for the lora method")
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--deadline", type=float, default=None, help="stop starting new methods after this many s")
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        reexec_for_rss()
    dtype = torch.bfloat16 if gpu else torch.float32
    size = args.size or ("1b" if gpu else "small")
    seq = args.seq or (512 if gpu else 128)
    methods = (args.methods or "lora,lora_dropout,prompt,prefix").split(",")
    repeats = args.repeats or (20 if gpu else 15)
    report = Report(
        f"train_step_{size}",
        device,
        f"Training step, Llama-like '{size}' ({str(dtype).replace('torch.', '')}, batch x seq = {args.batch} x {seq})",
        ["method", "trainable", "ours tok/s", "peft tok/s", "time ratio", "paired", "mem ours MiB",
         "mem peft MiB", "mem ratio", "reserved ratio"],
    )
    report.suffix = args.suffix
    start = time.time()
    for method in methods:
        if args.deadline and time.time() - start > args.deadline:
            report.notes.append(f"{method}: skipped, past the {args.deadline:.0f} s deadline")
            continue
        ours, ref = build_pair(method, size, device, dtype)
        ours.train()
        ref.train()
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, ours.config.vocab_size, (args.batch, seq), generator=gen).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        torch.manual_seed(0)
        loss_ours = ours(**batch).loss.item()
        torch.manual_seed(0)
        loss_ref = ref(**batch).loss.item()
        step_ours, n_ours = make_step(ours, batch)
        step_ref, n_ref = make_step(ref, batch)
        fns = {"ours": step_ours, "peft": step_ref}
        times = alternate(fns, device, repeats, warmup=2)
        summary = summarize(times)
        mem = alternate_memory(fns, device, repeats=3)
        mratio = memory_ratios(mem)
        tokens = args.batch * seq
        med = summary["median_s"]
        mem_key = "peak_allocated_mib" if gpu else "rss_delta_mib"
        report.add(
            [method, n_ours, tokens / med["ours"], tokens / med["peft"], summary["ratio"],
             summary["paired_ratio_median"], mem["ours"][mem_key], mem["peft"][mem_key], mratio[mem_key],
             mratio.get("peak_reserved_mib", math.nan)],
            {"method": method, "size": size, "batch": args.batch, "seq": seq, "dtype": str(dtype),
             "trainable_ours": n_ours, "trainable_peft": n_ref, "first_loss": {"ours": loss_ours, "peft": loss_ref},
             "tokens_per_s": {"ours": tokens / med["ours"], "peft": tokens / med["peft"]}, **summary,
             "memory_mib": mem, "memory_ratio": mratio},
        )
        if n_ours != n_ref:
            report.notes.append(f"{method}: trainable counts differ (ours {n_ours}, peft {n_ref})")
        if abs(loss_ours - loss_ref) > 1e-2 * max(1.0, abs(loss_ref)):
            report.notes.append(f"{method}: first-step losses differ: ours {loss_ours:.5f}, peft {loss_ref:.5f}")
        if args.profile and method in ("lora", "qlora"):
            from perf_common import RESULTS

            RESULTS.mkdir(parents=True, exist_ok=True)
            try:
                profile_step(fns, device, str(RESULTS / f"profile_train_step_{size}_{method}_{device.type}{args.suffix}.txt"))
            except Exception as exc:  # noqa: BLE001 - a profiler failure must not cost the timings
                report.notes.append(f"{method}: profiling failed: {exc!r}")
        del ours, ref, fns, step_ours, step_ref
        if gpu:
            torch.cuda.empty_cache()
    report.notes.append("time ratio = median step time ours / peft (< 1: ours faster); paired = median of per-round ratios.")
    report.notes.append(
        "mem = peak " + ("CUDA memory allocated" if gpu else "process RSS") + " above the step's start, median of 3; "
        "reserved ratio = the same for the CUDA caching allocator's reserved memory."
    )
    report.notes.append(
        "peft with autocast_adapter_dtype=False so both sides hold adapters in the model dtype, except lora_fp32 "
        "(float32 adapters on both sides)."
    )
    if not gpu:
        report.notes.append(f"CPU shared with other jobs ({os.cpu_count()} cores): noisy; steps alternate ours/peft.")
    print(report.write())


if __name__ == "__main__":
    main()
