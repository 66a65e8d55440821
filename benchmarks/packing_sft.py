"""SFT tokens/s with and without packing, on a long-tailed distribution of row lengths.

Rows get lengths from a log-normal distribution (median ``--median`` tokens, clipped to
``[8, --max-len]``): most rows short, a few long, as in chat data. Each micro-batch of
``--batch`` rows is trained on twice per round, alternating which goes first: padded to its
longest row (``SFTCollator``, the unpacked run) and packed into one padding-free row
(``PackedSFTCollator``: position ids restart per row, block-diagonal attention). A step is
forward + backward of a LoRA adapter (all linear layers) on a Llama built from a config
(``perf_common.llama_config``), without an optimiser update, so both layouts always see the same
weights and their losses can be compared batch by batch. Reported: real (non-padding) tokens per second of each,
their ratio, the share of padding in the padded batches, and the two losses of the same batches
(they must agree). Writes ``benchmarks/results/packing_sft_<device>.json`` and ``.md``.

    python benchmarks/packing_sft.py                 # CPU, tiny Llama, 12 batches of 16
    python benchmarks/packing_sft.py --device cuda --size 1b --batch 32 --max-len 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import RESULTS, alternate, build_llama, command_line, machine_info, pick_device  # noqa: E402

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
    padded_collate, packed_collate = SFTCollator(pad_token_id=0), PackedSFTCollator()
    losses: dict[str, list[float]] = {"padded": [], "packed": []}

    def step(batch: dict, name: str) -> None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)  # no update: both layouts see the same weights every time
        losses[name].append(loss.item())

    real_tokens = sum(len(r["input_ids"]) for r in rows)
    padded_tokens = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    collated = [(padded_collate(b), packed_collate(b)) for b in batches]

    def run(name: str):
        def go() -> None:
            for padded, packed in collated:
                step(padded if name == "padded" else packed, name)
        return go

    times = alternate({"padded": run("padded"), "packed": run("packed")}, device, repeats=args.repeats, warmup=1)
    tok_s = {k: real_tokens / statistics.median(v) for k, v in times.items()}
    n = len(batches)
    loss_gap = max(abs(a - b) for a, b in zip(losses["padded"][:n], losses["packed"][:n]))
    lengths = [len(r["input_ids"]) for r in rows]
    report = {
        "meta": {"command": command_line(), **machine_info(device), "size": args.size, "dtype": str(dtype),
                 "batch": args.batch, "batches": n, "repeats": args.repeats, "median_len": args.median,
                 "max_len": args.max_len},
        "lengths": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                    "p90": sorted(lengths)[int(0.9 * len(lengths))], "max": max(lengths)},
        "real_tokens": real_tokens,
        "padded_tokens_computed": padded_tokens,
        "padding_share": 1 - real_tokens / padded_tokens,
        "tokens_per_s": tok_s,
        "speedup_packed_over_padded": tok_s["packed"] / tok_s["padded"],
        "seconds_per_pass": {k: statistics.median(v) for k, v in times.items()},
        "max_loss_gap_same_batch": loss_gap,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"packing_sft_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    meta = report["meta"]
    md = [f"### SFT packing, Llama-like '{args.size}' ({meta['dtype']}, LoRA r=8 all-linear) ({device.type})", "",
          f"`{meta['command']}`", "",
          f"Machine: cpu_count={meta['cpu_count']}, torch_threads={meta['torch_threads']}, torch={meta['torch']}, "
          f"transformers={meta['transformers']}; load average at start {tuple(round(x, 1) for x in meta['load_average_at_start'])}",
          "",
          f"Rows: {len(rows)} in batches of {args.batch}; lengths log-normal, median {report['lengths']['median']}, "
          f"mean {report['lengths']['mean']:.0f}, p90 {report['lengths']['p90']}, max {report['lengths']['max']}; "
          f"padding is {100 * report['padding_share']:.0f}% of the padded batches' tokens.", "",
          "| layout | real tokens/s | s per pass over the batches |", "|---|---|---|",
          f"| padded (SFTCollator) | {tok_s['padded']:.0f} | {report['seconds_per_pass']['padded']:.2f} |",
          f"| packed (PackedSFTCollator) | {tok_s['packed']:.0f} | {report['seconds_per_pass']['packed']:.2f} |", "",
          f"Packed / padded: **{report['speedup_packed_over_padded']:.2f}x** tokens/s; largest loss difference on "
          f"the same batch {loss_gap:.1e}. A step is forward + backward (no optimiser update, so both layouts see "
          "the same weights); medians of the passes, which alternate which layout goes first."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
