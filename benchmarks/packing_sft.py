"""SFT tokens/s with and without packing, on a long-tailed distribution of row lengths.

Rows get lengths from a log-normal distribution (median ``--median`` tokens, clipped to
``[8, --max-len]``): most rows short, a few long, as in chat data. Each micro-batch of
``--batch`` rows is trained on three ways per round (the order flips every round): padded to
its longest row (``SFTCollator``, the unpacked run), packed into bins of ``--max-len`` tokens
(``PackedSFTCollator(max_tokens=max_len)``, what ``data.packing: true`` does with
``data.max_length``), and packed into one padding-free row (``max_tokens=None``); packed rows
restart their position ids per conversation and attend block-diagonally. A step is forward +
backward of a LoRA adapter (all linear layers) on a Llama built from a config
(``perf_common.llama_config``), without an optimiser update, so every layout always sees the
same weights and their losses can be compared batch by batch. Reported: real (non-padding)
tokens per second of each, the ratio to padded, the share of padding computed, and the largest
loss difference on the same batch (it must be ~0). Writes
``benchmarks/results/packing_sft_<device>.json`` and ``.md``.

    python benchmarks/packing_sft.py                 # CPU, tiny Llama, 12 batches of 16
    python benchmarks/packing_sft.py --device cuda --size 1b --batch 8 --max-len 1024   # batch 32 x 2048: OOM on an H200 (fp32 logits)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import (RESULTS, alternate, build_llama, command_line, machine_info, machine_line,  # noqa: E402
                         pick_device)

from raypeft.adapters import LoraConfig, get_adapter_model  # noqa: E402
from raypeft.pipeline.data import IGNORE_INDEX, SFTCollator  # noqa: E402
from raypeft.pipeline.data.packing import PackedSFTCollator  # noqa: E402


def long_tailed_rows(n: int, median: int, max_len: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.9 + torch.log(torch.tensor(float(median))))
    lengths = lengths.round().clamp(8, max_len).long().tolist()
    rows = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = max(1, length // 3)
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", help="perf_common.llama_config size: tiny, small, 1b, 8b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--median", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches (each alternates the order)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_llama(args.size, device, dtype, seed=args.seed)
    model = get_adapter_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    rows = long_tailed_rows(args.batch * args.batches, args.median, args.max_len, base.config.vocab_size, args.seed)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    collates = {"padded": SFTCollator(pad_token_id=0), "packed": PackedSFTCollator(max_tokens=args.max_len),
                "one_row": PackedSFTCollator(max_tokens=None)}
    losses: dict[str, list[float]] = {name: [] for name in collates}

    def step(batch: dict, name: str) -> None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)  # no update: both layouts see the same weights every time
        losses[name].append(loss.item())

    real_tokens = sum(len(r["input_ids"]) for r in rows)
    collated = {name: [c(b) for b in batches] for name, c in collates.items()}
    computed = {name: sum(x["input_ids"].numel() for x in xs) for name, xs in collated.items()}

    def run(name: str):
        def go() -> None:
            for batch in collated[name]:
                step(batch, name)
        return go

    times = alternate({name: run(name) for name in collates}, device, repeats=args.repeats, warmup=1)
    tok_s = {k: real_tokens / statistics.median(v) for k, v in times.items()}
    n = len(batches)
    loss_gap = max(abs(a - b) for name in ("packed", "one_row")
                   for a, b in zip(losses["padded"][:n], losses[name][:n]))
    lengths = [len(r["input_ids"]) for r in rows]
    report = {
        "meta": {"command": command_line(), **machine_info(device), "size": args.size, "dtype": str(dtype),
                 "batch": args.batch, "batches": n, "repeats": args.repeats, "median_len": args.median,
                 "max_len": args.max_len},
        "lengths": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                    "p90": sorted(lengths)[int(0.9 * len(lengths))], "max": max(lengths)},
        "real_tokens": real_tokens,
        "tokens_computed": computed,
        "padding_share": {k: 1 - real_tokens / v for k, v in computed.items()},
        "tokens_per_s": tok_s,
        "speedup_over_padded": {k: tok_s[k] / tok_s["padded"] for k in ("packed", "one_row")},
        "seconds_per_pass": {k: statistics.median(v) for k, v in times.items()},
        "max_loss_gap_same_batch": loss_gap,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"packing_sft_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    meta = report["meta"]
    md = [f"### SFT packing, Llama-like '{args.size}' ({meta['dtype']}, LoRA r=8 all-linear) ({device.type})", "",
          f"`{meta['command']}`", "",
          machine_line(meta), "",
          f"Rows: {len(rows)} in batches of {args.batch}; lengths log-normal, median {report['lengths']['median']}, "
          f"mean {report['lengths']['mean']:.0f}, p90 {report['lengths']['p90']}, max {report['lengths']['max']}.", "",
          "| layout | real tokens/s | vs padded | padding computed | s per pass |", "|---|---|---|---|---|"]
    names = {"padded": "padded to each batch's longest row (SFTCollator)",
             "packed": f"packed, bins of {args.max_len} tokens (data.packing: true)",
             "one_row": "packed, one row per batch (max_tokens=None)"}
    for k, label in names.items():
        ratio = 1.0 if k == "padded" else report["speedup_over_padded"][k]
        md.append(f"| {label} | {tok_s[k]:.0f} | {ratio:.2f}x | {100 * report['padding_share'][k]:.0f}% | "
                  f"{report['seconds_per_pass'][k]:.2f} |")
    md += ["", f"Largest loss difference to the padded batch, same batch: {loss_gap:.1e}. A step is forward + "
           "backward (no optimiser update, so every layout sees the same weights); medians of the passes, whose "
           "order flips every round."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
