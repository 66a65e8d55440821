"""Reward-model and DPO steps with and without packing, on pairs of long-tailed lengths.

Each pair is a prompt and two responses whose lengths come from log-normal distributions
(medians ``--median`` tokens for the prompt and for each response, clipped so a side fits
``--max-len``): most sides short, a few long, and chosen and rejected of one pair often of very
different lengths, so a padded batch (``PairCollator``: every side padded to the longest of the
``2B``) computes much padding. Each micro-batch of ``--batch`` pairs is run through the stages'
own functions (``reward.pair_scores`` + Bradley-Terry loss; ``dpo.pair_terms``: policy with
gradients, frozen reference adapter without) padded and packed into bins of ``--max-len`` tokens
(``PackedPairCollator``, what ``data.packing: true`` does with ``data.max_length``), forward +
backward without an optimiser update, so both layouts see the same weights and their per-side
figures (reward scores; the policy's per-token log-probabilities) can be compared batch by
batch. Reported: real tokens/s and pairs/s of each layout, the
ratio, the padding share, and the largest per-side difference (scores / log-probabilities). Writes
``benchmarks/results/packing_pairs_<device>.json`` and ``.md``.

    python benchmarks/packing_pairs.py                      # CPU, tiny Llama
    python benchmarks/packing_pairs.py --device cuda --size 1b --batch 8 --max-len 1024
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

from raypeft.adapters import LoraConfig  # noqa: E402
from raypeft.pipeline.data import IGNORE_INDEX, PairCollator  # noqa: E402
from raypeft.pipeline.data.packing import PackedPairCollator  # noqa: E402
from raypeft.pipeline.rl_math import bradley_terry_loss  # noqa: E402
from raypeft.pipeline.roles import Roles  # noqa: E402
from raypeft.pipeline.stages import dpo, reward  # noqa: E402


def long_tailed_pairs(n: int, median: int, max_len: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def lengths() -> list[int]:
        x = torch.exp(torch.randn(n, generator=g) * 0.9 + torch.log(torch.tensor(float(median))))
        return x.round().clamp(2, max_len // 2).long().tolist()

    rows = []
    for p, c, r in zip(lengths(), lengths(), lengths()):
        prompt = torch.randint(3, vocab, (p,), generator=g).tolist()
        chosen = torch.randint(3, vocab, (c,), generator=g).tolist()
        rejected = torch.randint(3, vocab, (r,), generator=g).tolist()
        rows.append({"chosen_input_ids": prompt + chosen, "chosen_labels": [IGNORE_INDEX] * p + chosen,
                     "rejected_input_ids": prompt + rejected, "rejected_labels": [IGNORE_INDEX] * p + rejected})
    return rows


def build_roles(base: torch.nn.Module, stage: str) -> Roles:
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    roles = Roles(base)
    if stage == "reward":
        roles.add(reward.ROLE, lora, trainable=True, value_head="zero")
        torch.nn.init.normal_(roles.heads[reward.ROLE].weight, std=0.02)
    else:
        roles.add(dpo.POLICY, lora, trainable=True)
        roles.add(dpo.REFERENCE, lora, trainable=False)
    roles.train()
    return roles


def measure_stage(stage: str, args: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype) -> tuple[dict, list[dict[str, list[int]]]]:
    """One stage's padded and packed passes over the same batches: its report entry and the pairs."""
    base = build_llama(args.size, device, dtype, seed=args.seed)
    roles = build_roles(base, stage)
    rows = long_tailed_pairs(args.batch * args.batches, args.median, args.max_len, base.config.vocab_size, args.seed)
    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
    collates = {"padded": PairCollator(pad_token_id=0), "packed": PackedPairCollator(max_tokens=args.max_len)}
    collated = {name: [{k: v.to(device) for k, v in c(b).items()} for b in batches] for name, c in collates.items()}
    figures: dict[str, list[torch.Tensor]] = {name: [] for name in collates}
    peak: dict[str, float] = {}

    def step(batch: dict, name: str) -> None:
        if stage == "reward":
            chosen, rejected = reward.pair_scores(roles, batch)
            loss, per_side = bradley_terry_loss(chosen, rejected), torch.cat([chosen, rejected])
        else:
            losses, _, _, mean_c, mean_r = dpo.pair_terms(roles, batch, beta=0.1, loss_type="sigmoid")
            loss, per_side = losses.mean(), torch.cat([mean_c, mean_r])  # the policy's log-probabilities
        loss.backward()
        roles.zero_grad(set_to_none=True)  # no update: both layouts see the same weights every time
        figures[name].append(per_side.detach().float().cpu())

    def run(name: str):
        def go() -> None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for batch in collated[name]:
                step(batch, name)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
        return go

    times = alternate({name: run(name) for name in collates}, device, repeats=args.repeats, warmup=1)
    real = sum(len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows)
    computed = {name: sum(x["input_ids"].numel() for x in xs) for name, xs in collated.items()}
    n = len(batches)
    gap = max(float((a - b).abs().max()) for a, b in zip(figures["padded"][:n], figures["packed"][:n]))
    seconds = {k: statistics.median(v) for k, v in times.items()}
    return {
        "tokens_per_s": {k: real / t for k, t in seconds.items()},
        "pairs_per_s": {k: len(rows) / t for k, t in seconds.items()},
        "speedup_packed": seconds["padded"] / seconds["packed"],
        "padding_share": {k: 1 - real / v for k, v in computed.items()},
        "seconds_per_pass": seconds,
        "peak_gpu_allocated_gib": peak or None,
        "max_per_side_gap": gap,
    }, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="tiny", help="perf_common.llama_config size: tiny, small, 1b, 8b")
    ap.add_argument("--stages", default="reward,dpo")
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--median", type=int, default=32, help="median tokens of a prompt and of a response")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches (each alternates the order)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report: dict = {"stages": {}}
    rows: list[dict[str, list[int]]] = []
    for stage in args.stages.split(","):
        report["stages"][stage], rows = measure_stage(stage, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    batches = len(rows) // args.batch

    sides = [len(r[f"{s}_input_ids"]) for r in rows for s in ("chosen", "rejected")]
    report["meta"] = {"command": command_line(), **machine_info(device), "size": args.size, "dtype": str(dtype),
                      "batch": args.batch, "batches": batches, "repeats": args.repeats,
                      "median": args.median, "max_len": args.max_len}
    report["side_lengths"] = {"mean": statistics.mean(sides), "median": statistics.median(sides),
                              "p90": sorted(sides)[int(0.9 * len(sides))], "max": max(sides)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"packing_pairs_{device.type}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    meta, lengths = report["meta"], report["side_lengths"]
    md = [f"### Reward and DPO packing, Llama-like '{args.size}' ({meta['dtype']}, LoRA r=8 all-linear) "
          f"({device.type})", "", f"`{meta['command']}`", "",
          machine_line(meta), "",
          f"{len(rows)} pairs in batches of {args.batch}; side lengths (prompt + response) median {lengths['median']}, "
          f"mean {lengths['mean']:.0f}, p90 {lengths['p90']}, max {lengths['max']}.", "",
          "| stage | layout | real tokens/s | pairs/s | vs padded | padding computed | peak GPU GiB | "
          "largest per-side gap |", "|---|---|---|---|---|---|---|---|"]
    for stage, r in report["stages"].items():
        for k, label in (("padded", "padded (PairCollator)"), ("packed", f"packed, bins of {args.max_len}")):
            ratio = 1.0 if k == "padded" else r["speedup_packed"]
            gib = f"{r['peak_gpu_allocated_gib'][k]:.2f}" if r["peak_gpu_allocated_gib"] else "-"
            gap = "-" if k == "padded" else f"{r['max_per_side_gap']:.1e}"
            md.append(f"| {stage} | {label} | {r['tokens_per_s'][k]:.0f} | {r['pairs_per_s'][k]:.1f} | {ratio:.2f}x | "
                      f"{100 * r['padding_share'][k]:.0f}% | {gib} | {gap} |")
    md += ["", "A step is forward + backward through the stage's own functions (no optimiser update, so both layouts "
           "see the same weights); medians of the passes, whose order flips every round. The per-side gap is the "
           "largest difference between the layouts of a reward score (reward) or of the policy's per-token "
           "log-probability of a side (DPO)."]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
