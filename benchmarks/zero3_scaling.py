"""The SFT stage under Ray Train + DeepSpeed ZeRO-3 on 1 and on 2 GPUs: per-GPU memory, same adapter.

    python benchmarks/zero3_scaling.py                              # GPU host with 2 GPUs (nvidia-h200-x2)
    python benchmarks/zero3_scaling.py --cpu --size tiny --steps 2  # dry run on a laptop CPU (gloo)

A Llama with Llama-3.2-1B's layer shapes (hidden 2048, 16 layers, GQA 32/8, MLP 8192) and the
demo tokenizer's vocabulary, randomly initialised from its config (no hub) and saved once, is
fine-tuned by the real SFT stage (``pipeline.workflow.run_workflow``, LoRA r=16 on every linear
layer, demo corpus, bf16) with ``deepspeed:`` = the shipped ``zero3`` config plus
``stage3_max_live_parameters`` / ``stage3_max_reuse_distance`` = 1e8 (DeepSpeed's default 1e9 would
let a 1B model stay gathered whole, hiding the partitioning), once per GPU count, on the same
rows in the same order: ``sft.batch_size`` 1 and ``grad_accum`` = global batch / GPUs, so every
optimiser step averages the same per-row losses whatever the GPU count. Reported per GPU count,
from the stage's own MLflow figures: peak allocated / reserved CUDA memory of each worker, peak
CPU RSS, tokens/s per worker; then how far the adapters (and loss curves) of the runs differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import ROOT, Report, llama_config  # noqa: E402

GIB = 2 ** 30


def _save_base(size: str, workdir: Path, dtype: torch.dtype, device: torch.device) -> tuple[Path, int, int]:
    """A random-init Llama of ``size`` shapes with the demo tokenizer, saved to ``workdir/model``."""
    from transformers import AutoTokenizer

    from raypeft.pipeline.demo import ensure_demo_assets

    demo = ensure_demo_assets()
    tokenizer = AutoTokenizer.from_pretrained(str(demo.model_dir))
    from transformers import LlamaForCausalLM

    config = llama_config(size, vocab=int(math.ceil(len(tokenizer) / 64) * 64))
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in ``dtype`` on ``device``: no float32 copy on the host
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    folder = workdir / "model"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder, n_params, n_bytes


def _zero3() -> dict:
    from raypeft.pipeline.deepspeed_configs import resolve

    ds = resolve("zero3")
    ds["zero_optimization"].update(stage3_max_live_parameters=int(1e8), stage3_max_reuse_distance=int(1e8))
    return ds


def _run(n: int, args, model_dir: Path, workdir: Path, dtype: str):
    from mlflow import MlflowClient

    from raypeft.pipeline.config import load_config
    from raypeft.pipeline.workflow import run_workflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    resources = {"CPU": 1} if args.cpu else {"GPU": 1, "CPU": 4}
    overrides = [
        "stages=[sft]", f"name=zero3-{n}x", f"output_dir={workdir / 'out'}", f"model.name_or_path={model_dir}",
        f"model.dtype={dtype}", f"data.max_length={args.max_length}", f"data.max_train_rows={args.rows}",
        "adapter.r=16", "adapter.lora_alpha=32", "adapter.lora_dropout=0.0", "adapter.target_modules=all-linear",
        "adapter.init_lora_weights=gaussian",
        f"sft.max_steps={args.steps}", "sft.batch_size=1", f"sft.grad_accum={args.global_batch // n}",
        "sft.learning_rate=1e-3", "sft.lr_scheduler=constant", "sft.warmup_steps=0", "sft.log_every=1",
        "sft.checkpoint_every=1000000", "eval.rouge=false",
        f"scaling.num_workers={n}", f"scaling.use_gpu={not args.cpu}",
        f"scaling.resources_per_worker={json.dumps(resources)}",
        f"deepspeed={json.dumps(_zero3())}", f"tracking.uri={uri}", "tracking.register=false",
        f"tracking.artifact_location={(workdir / 'art').as_uri()}",
    ]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    started = time.perf_counter()
    (outcome,) = run_workflow(cfg, log=print)
    wall = time.perf_counter() - started
    client = MlflowClient(uri)
    losses = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "train_loss"), key=lambda m: m.step)]
    keep = workdir / f"adapter-{n}x"
    shutil.copytree(outcome.adapter_dir, keep, dirs_exist_ok=True)
    return outcome.metrics, losses, keep, wall


def _compare(a: Path, b: Path) -> dict[str, float]:
    from raypeft.adapters.serialization import load_adapter_weights

    wa, wb = load_adapter_weights(a), load_adapter_weights(b)
    if wa.keys() != wb.keys():
        raise RuntimeError(f"adapters {a} and {b} hold different tensors")
    diff = torch.cat([(wa[k].float() - wb[k].float()).reshape(-1) for k in wa])
    ref = torch.cat([wa[k].float().reshape(-1) for k in wa])
    b_keys = [k for k in wa if "lora_B" in k]  # B starts at zero: its value is what training did
    b_diff = torch.cat([(wa[k].float() - wb[k].float()).reshape(-1) for k in b_keys])
    b_ref = torch.cat([wa[k].float().reshape(-1) for k in b_keys])
    return {"max_abs_diff": diff.abs().max().item(), "relative_l2_diff": (diff.norm() / ref.norm()).item(),
            "lora_B_relative_l2_diff": (b_diff.norm() / b_ref.norm()).item(), "tensors": len(wa)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1b", help="perf_common.llama_config shapes (1b, tiny, ...)")
    parser.add_argument("--gpus", default="1,2", help="GPU (or CPU worker) counts to run, the first is the reference")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimiser step over all workers")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=512, help="demo rows to train on")
    parser.add_argument("--cpu", action="store_true", help="dry run: gloo workers on the CPU, float32")
    parser.add_argument("--workdir", default="/tmp/raypeft-zero3-scaling")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    counts = [int(x) for x in args.gpus.split(",")]
    if any(args.global_batch % n for n in counts):
        parser.error(f"--global-batch {args.global_batch} must be divisible by every count in --gpus {args.gpus}")
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and torch.cuda.device_count() < max(counts):
        parser.error(f"--gpus {args.gpus} needs {max(counts)} GPUs, this machine has {torch.cuda.device_count()}")
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    # The offline GPU bundle has Ray without its dashboard's packages: start Ray here without it
    # (pipeline.launcher.init_ray then joins this instance instead of asking for a dashboard).
    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=True)

    dtype = "float32" if args.cpu else "bfloat16"
    t0 = time.perf_counter()
    model_dir, n_params, n_bytes = _save_base(args.size, workdir, getattr(torch, dtype), device)
    print(f"[bench] base: {n_params / 1e9:.3f}B parameters, {n_bytes / GIB:.2f} GiB in {dtype}, "
          f"built and saved in {time.perf_counter() - t0:.0f}s", flush=True)

    report = Report("zero3_scaling", device, f"SFT stage, Ray Train + DeepSpeed ZeRO-3, {args.size} Llama",
                    ["GPUs" if device.type == "cuda" else "workers", "peak allocated / GPU (GiB)",
                     "peak reserved / GPU (GiB)", "base / GPU (GiB)", "peak CPU RSS / worker (GiB)",
                     "tokens/s / worker", "train s", "final loss"], suffix=args.suffix)
    report.notes.append(f"model: {args.size} Llama shapes, {n_params / 1e9:.3f}B parameters, {dtype}, random init; "
                        f"LoRA r=16 all-linear; {args.steps} steps of {args.global_batch} rows (batch 1 x grad_accum "
                        f"{args.global_batch} / workers), max_length {args.max_length}; deepspeed = {json.dumps(_zero3())}")
    runs = {}
    for n in counts:
        metrics, losses, adapter, wall = _run(n, args, model_dir, workdir, dtype)
        ranks = range(n)

        def per_rank(key: str) -> list[float]:
            return [metrics.get(f"{key}/rank{r}", float("nan")) for r in ranks]

        alloc, reserved = per_rank("peak_gpu_allocated_mib"), per_rank("peak_gpu_reserved_mib")
        rss, tok = per_rank("peak_rss_mib"), per_rank("tokens_per_s")
        runs[n] = {"losses": losses, "adapter": str(adapter), "wall_s": wall,
                   "peak_gpu_allocated_mib_per_rank": alloc, "peak_gpu_reserved_mib_per_rank": reserved,
                   "peak_rss_mib_per_rank": rss, "tokens_per_s_per_rank": tok,
                   "train_seconds": metrics.get("train_seconds"), "zero_stage": metrics.get("zero_stage")}
        report.add([n, max(alloc) / 1024, max(reserved) / 1024, n_bytes / n / GIB, max(rss) / 1024,
                    sum(tok) / n, metrics.get("train_seconds", float("nan")), losses[-1] if losses else float("nan")],
                   {"workers": n, **runs[n]})
    first = counts[0]
    for n in counts[1:]:
        diff = _compare(Path(runs[first]["adapter"]), Path(runs[n]["adapter"]))
        loss_diff = max(abs(a - b) for a, b in zip(runs[first]["losses"], runs[n]["losses"]))
        report.records.append({"compare": f"{first}x vs {n}x", **diff, "max_loss_diff": loss_diff})
        report.notes.append(f"adapter {n} vs {first} workers: max |diff| {diff['max_abs_diff']:.2e}, relative L2 "
                            f"{diff['relative_l2_diff']:.2e} (lora_B, the trained part: "
                            f"{diff['lora_B_relative_l2_diff']:.2e}); loss curves differ by at most {loss_diff:.2e}")
        ratio = max(runs[n]["peak_gpu_allocated_mib_per_rank"]) / max(runs[first]["peak_gpu_allocated_mib_per_rank"])
        report.notes.append(f"peak allocated per GPU, {n} vs {first}: x{ratio:.2f}")
    report.write()
    print(json.dumps({k: v for k, v in runs.items()}, indent=1, default=str))
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
