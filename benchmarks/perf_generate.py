"""Greedy generation through an unmerged LoRA adapter, ours vs peft: new tokens per second.

    python benchmarks/perf_generate.py                          # CPU: "small" Llama, fp32
    python benchmarks/perf_generate.py --device cuda --size 1b  # GPU: Llama-3.2-1B shapes, bf16
    python benchmarks/perf_generate.py --adapters 4 --batches 4,8  # mixed batch: row i uses adapter i % 4

LoRA r=16, alpha=32 on every linear layer of the blocks, not merged (the adapter runs at every
decoding step, as when serving several adapters or evaluating during training). Both sides hold
the same base and adapter weights; every call generates exactly ``--new`` tokens per row
(``min_new_tokens = max_new_tokens``) from the same random prompts, with the KV cache on.

With ``--adapters K`` (K > 1) both models hold K LoRA adapters with different random weights and
every call serves one mixed batch: ``generate(..., adapter_names=[...])`` with row ``i`` on
adapter ``i % K`` (peft's mixed-batch inference against ours, see adapters/mixed_batch.py).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch

from perf_common import Report, alternate, build_llama, copy_trainable, pick_device, summarize

from raypeft import adapters


def _copy_all_lora(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Every adapter's LoRA tensors (active or not) from ``src`` into ``dst`` by PEFT name."""
    dst_params = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for name, param in src.named_parameters():
            if ".lora_" in name:
                dst_params[name].copy_(param.to(dst_params[name].dtype))
                n += 1
    return n


def build_pair(size: str, device: torch.device, dtype: torch.dtype, r: int, n_adapters: int = 1):
    import peft

    base = build_llama(size, device, dtype)
    base.config.use_cache = True
    other = copy.deepcopy(base)
    kw = dict(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    ours = adapters.get_adapter_model(base, adapters.LoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(other, peft.LoraConfig(**kw), autocast_adapter_dtype=False)
        for k in range(1, n_adapters):
            torch.manual_seed(1000 + k)  # each extra adapter gets its own random A and B
            ours.add_adapter(f"a{k}", adapters.LoraConfig(**kw))
            ref.add_adapter(f"a{k}", peft.LoraConfig(**kw))
    if n_adapters > 1:
        _copy_all_lora(ours, ref)
    else:
        copy_trainable(ours, ref)
    return ours.eval(), ref.eval()


def adapter_names_for(batch: int, n_adapters: int) -> list[str] | None:
    """Row ``i`` on adapter ``i % n_adapters`` (the first one is named "default"); None: one adapter."""
    if n_adapters <= 1:
        return None
    return [("default" if i % n_adapters == 0 else f"a{i % n_adapters}") for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None, help="tiny | small | 1b | 8b (default: small on CPU, 1b on GPU)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4 CPU; 1,8 GPU)")
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--new", type=int, default=None)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--adapters", type=int, default=1,
                        help="K > 1: K LoRA adapters, one mixed batch per call (row i on adapter i %% K)")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    size = args.size or ("1b" if gpu else "small")
    prompt_len = args.prompt or (128 if gpu else 32)
    new = args.new or 32
    batches = [int(b) for b in (args.batches or ("1,8" if gpu else "1,4")).split(",")]
    repeats = args.repeats or (6 if gpu else 8)
    ours, ref = build_pair(size, device, dtype, args.r, args.adapters)
    mixed = args.adapters > 1
    what = (f"mixed batch over {args.adapters} unmerged LoRA adapters (row i on adapter i % {args.adapters})"
            if mixed else "unmerged LoRA")
    report = Report(
        f"generate_mixed{args.adapters}_{size}" if mixed else f"generate_{size}",
        device,
        f"Greedy generation, {what}, r={args.r} on all linear layers, Llama-like '{size}' "
        f"({str(dtype).replace('torch.', '')}, prompt {prompt_len}, {new} new tokens)",
        ["batch", "ours tok/s", "peft tok/s", "time ratio", "paired", "same tokens"],
    )
    report.suffix = args.suffix
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, ours.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, use_cache=True, pad_token_id=0)
        names = adapter_names_for(batch, args.adapters)
        if names is not None:
            if batch < args.adapters:
                parser.error(f"--batches: a mixed batch needs at least --adapters={args.adapters} rows, got {batch}")
            kwargs["adapter_names"] = names
        with torch.inference_mode():
            out_ours = ours.generate(**kwargs)
            out_ref = ref.generate(**kwargs)
        same = (out_ours == out_ref).float().mean().item()

        def run(model: torch.nn.Module) -> None:
            with torch.inference_mode():
                model.generate(**kwargs)

        start = time.time()
        times = alternate({"ours": lambda: run(ours), "peft": lambda: run(ref)}, device, repeats, warmup=1)
        summary = summarize(times)
        med = summary["median_s"]
        tokens = batch * new
        report.add(
            [batch, tokens / med["ours"], tokens / med["peft"], summary["ratio"], summary["paired_ratio_median"], same],
            {"batch": batch, "prompt": prompt_len, "new_tokens": new, "size": size, "r": args.r, "dtype": str(dtype),
             "adapters": args.adapters,
             "tokens_per_s": {"ours": tokens / med["ours"], "peft": tokens / med["peft"]},
             "same_token_fraction": same, "wall_s": time.time() - start, **summary},
        )
    report.notes.append("time ratio = median generate() time ours / peft (< 1: ours faster); tok/s = batch x new / median.")
    report.notes.append(
        "same tokens = fraction of output ids equal between the two (random weights: near-ties in argmax can flip "
        "under different but equally exact rounding orders)."
    )
    if not gpu:
        report.notes.append("CPU shared with other jobs: noisy; runs alternate ours/peft.")
    print(report.write())


if __name__ == "__main__":
    main()
