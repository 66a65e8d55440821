"""SFT on the embedded demo with each adapter method: ROUGE-L before/after, size, wall time.

    python benchmarks/methods_demo.py                        # every method below
    python benchmarks/methods_demo.py --methods prompt --set sft.learning_rate=0.05

Each method runs ``configs/quickstart.yaml`` through the real workflow (Ray Train, 2 workers,
MLflow in a temporary SQLite store) with the overrides below, which are the settings the
README's table quotes. Writes ``benchmarks/results/methods_demo.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # configs and results; raypeft itself is the installed package

# Virtual-token methods train far fewer parameters from a random start: they need a larger
# learning rate and more passes than LoRA to learn the task format.
METHODS: dict[str, list[str]] = {
    "lora": [],
    # Initialised from the embeddings of a summary-shaped text (Lester et al. 2021: text or
    # vocabulary init beats random init, most of all on small models).
    "prompt": ["adapter={method: prompt, num_virtual_tokens: 20, prompt_tuning_init: TEXT, "
               "prompt_tuning_init_text: 'Summary: Anna and Ben will meet at the cafe on Monday at noon.'}",
               "sft.learning_rate=0.05", "sft.epochs=3"],
    "prefix": ["adapter={method: prefix, num_virtual_tokens: 20}", "sft.learning_rate=0.01", "sft.epochs=2"],
    "ptuning": ["adapter={method: ptuning, num_virtual_tokens: 20, encoder_hidden_size: 128}",
                "sft.learning_rate=0.01", "sft.epochs=2"],
    "dora": ["adapter={method: lora, r: 8, lora_alpha: 16, use_dora: true}"],
    # (IA)^3 scales activations by vectors that start at one: few parameters, so a larger step
    "ia3": ["adapter={method: ia3}", "sft.learning_rate=0.03"],
    "loha": ["adapter={method: loha, r: 8, alpha: 16}"],
    "lokr": ["adapter={method: lokr, r: 8, alpha: 16}"],
    # rank budget from 12 to 8 per module over the stage's steps; the loop adds the orthogonality
    # penalty and runs the allocator
    "adalora": ["adapter={method: adalora, init_r: 12, target_r: 8, lora_alpha: 16, tinit: 10, tfinal: 20}",
                "sft.learning_rate=0.005"],
    "bottleneck": ["adapter={method: bottleneck, bottleneck_size: 32}"],
    # LLaMA-Adapter on all 4 layers: the gates start closed, so the prompt needs a larger step
    "adaption_prompt": ["adapter={method: adaption_prompt, adapter_len: 10, adapter_layers: 4}",
                        "sft.learning_rate=0.01", "sft.epochs=2"],
    # one task (the demo has one): the shared prompt with its rank-1 task modulation, text-initialised
    "multitask_prompt": ["adapter={method: multitask_prompt, num_virtual_tokens: 20, num_tasks: 1, "
                         "prompt_tuning_init: TEXT, "
                         "prompt_tuning_init_text: 'Summary: Anna and Ben will meet at the cafe on Monday at noon.'}",
                         "sft.learning_rate=0.05", "sft.epochs=3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every method")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "methods_demo")
    args = ap.parse_args()

    from raypeft.pipeline.config import load_config
    from raypeft.pipeline.workflow import run_workflow

    import torch

    meta = {"command": "python benchmarks/methods_demo.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, no GPU",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="raypeft-methods-") as tmp:
        for method in args.methods:
            overrides = ["stages=[sft]"] + METHODS[method] + args.set + [
                f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={Path(tmp).as_uri()}/art",
                f"output_dir={tmp}/out", f"name=methods-{method}"]
            started = time.perf_counter()
            try:
                cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
                (outcome,) = run_workflow(cfg)
            except Exception as exc:  # one broken method must not cost the others' figures
                rows.append({"method": method, "overrides": METHODS[method] + args.set,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            else:
                wall = time.perf_counter() - started
                from mlflow import MlflowClient

                m = MlflowClient(cfg.tracking_uri()).get_run(outcome.run_id).data.metrics
                rows.append({
                    "method": method, "overrides": METHODS[method] + args.set,
                    "trainable_params": int(m["trainable_params"]), "adapter_size_bytes": int(m["adapter_size_bytes"]),
                    "rougeL_before": m["rougeL_before"], "rougeL_after": m["rougeL_after"],
                    "train_seconds": m["train_seconds"], "stage_wall_seconds": wall,
                    "tokens_per_s": m["tokens_per_s"], "peak_rss_mib": m["peak_rss_mib"],
                })
            print(json.dumps(rows[-1]), flush=True)
            _write(args.out, meta, rows)  # after every method: a long run leaves partial results
    print(args.out.with_suffix(".md").read_text())


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = [f"`{meta['command']}` ({meta['machine']}, torch {meta['torch']}, {meta['date']})", "",
             "| method | trainable params | adapter size | ROUGE-L before | ROUGE-L after | training s | stage wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['adapter_size_bytes'] / 1024:.0f} KiB | "
                     f"{r['rougeL_before']:.3f} | {r['rougeL_after']:.3f} | {r['train_seconds']:.0f} | "
                     f"{r['stage_wall_seconds']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
