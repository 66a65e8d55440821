"""Rollout generation: today's path against the rollout engine's levers, side by side in one run.

    python benchmarks/perf_rollout.py --device cuda --size 1b            # one H200: 3 min without the own loop
    python benchmarks/perf_rollout.py --device cuda --size 1b --stop-every 0,128 --profile own   # + rows that end
    python benchmarks/perf_rollout.py --device cuda --size 8b --repeats 1
    python benchmarks/perf_rollout.py --device cuda --size 8b --nf4 --variants today,own --repeats 1   # NF4 base
    python benchmarks/perf_rollout.py --device cpu --size tiny --batch 8 --prompt-len 32 --new 32

A random-initialised Llama of the given shape (bf16 on GPU, fp32 on CPU), LoRA r=16 on every
linear layer (B non-zero, as after training); with ``--nf4`` the base's linear layers are
bitsandbytes NF4 (double quantization, compute in the model dtype) and prepared for k-bit training
as the pipeline's ``model.quantization`` does (the folded copy is then a dense ``dequant(W0) + delta``
in the compute dtype), ``--batch`` prompts of ``--prompt-len`` tokens,
``--new`` sampled tokens at temperature 1. Each variant runs
``pipeline.rollout_engine.RolloutEngine.generate`` with its ``GenerationSpec`` levers; one untimed
warm-up call (compilation; for a variant that drops finished rows, a second one whose rows end
early, so every batch size of its ladder is compiled before timing), then ``--repeats`` timed
calls (median), each after ``torch.manual_seed(0)``.

``--stop-every``: comma-separated regimes. 0: eos never stops a row, every variant generates
``--batch x --new`` tokens (the issue's table). L > 0: ``vocab / L`` token ids are stop tokens,
so on this near-uniform random model a row ends after about L tokens (geometric lengths, capped
at ``--new``), as rollouts of different lengths do; that is where dropping finished rows pays.
tokens/s counts the tokens kept (each row up to and with its eos) over the call's time, prefill
included; ms per step is the call's time over the decode steps it ran (its output width). Peak
GPU memory allocated/reserved over the timed calls. ``--profile VARIANT`` writes the top CUDA (or
CPU) ops of one more call of that variant per regime to
``results/profile_rollout_<variant>_<size>_stop<L>_<device>.txt``.
The own-loop variants only run on CUDA with a compiled, graph-captured step; on CPU they run the
same loop eagerly (compile applies to CUDA only), which checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import RESULTS, Report, build_llama, command_line, pick_device, sync  # noqa: E402

from raypeft.adapters import (LoraConfig, get_adapter_model, prepare_model_for_kbit_training,  # noqa: E402
                              quantize_linear_layers)
from raypeft.pipeline.config import GenerationSpec  # noqa: E402
from raypeft.pipeline.rollout_engine import RolloutEngine  # noqa: E402

_FOLDED_STATIC = {"fold_adapter": True, "cache": "static", "compile": True, "prompt_bucket": 64}
VARIANTS = {  # name: (what it is, GenerationSpec levers)
    "today": ("unmerged LoRA, dynamic cache", {}),
    "folded": ("folded copy, dynamic cache", {"fold_adapter": True}),
    "static": ("unmerged LoRA, static cache + compile", {"cache": "static", "compile": True, "prompt_bucket": 64}),
    "folded-static": ("folded copy, static cache + compile", _FOLDED_STATIC),
    "own": ("folded copy, own loop, CUDA-graphed step", {**_FOLDED_STATIC, "decode_loop": "own"}),
    "own-drop": ("folded copy, own loop, CUDA-graphed step, drops finished rows",
                 {**_FOLDED_STATIC, "decode_loop": "own", "drop_finished": True}),
    "own-eager": ("folded copy, own loop, eager step (what the graph saves)",
                  {"fold_adapter": True, "prompt_bucket": 64, "decode_loop": "own"}),
    "own-unstacked": ("folded copy, own loop, CUDA-graphed step, query/key/value and gate/up not stacked",
                      {**_FOLDED_STATIC, "decode_loop": "own", "fuse_projections": False}),
    "own-repeat-kv": ("folded copy, own loop, CUDA-graphed step, transformers' sdpa (KV heads copied per query head)",
                      {**_FOLDED_STATIC, "decode_loop": "own", "grouped_attention": False}),
}
LOOP_SETTINGS = ("grouped_attention",)  # levers of the DecodeLoop itself, not GenerationSpec fields
DEFAULT_VARIANTS = "today,folded,static,folded-static,own,own-drop"


def stop_tokens(vocab: int, every: int) -> list[int]:
    """``vocab // every`` ids spread over the vocabulary (above the special ids 0-2); none for 0."""
    if every <= 0:
        return [vocab + 7]  # an id the model never produces
    count = max(1, vocab // every)
    return sorted({3 + (i * (vocab - 3)) // count for i in range(count)})


def kept_tokens(out: torch.Tensor, stops: list[int]) -> int:
    """Tokens of all rows up to and with each row's first stop token."""
    hits = torch.isin(out, torch.tensor(stops, device=out.device))
    lengths = torch.where(hits.any(1), hits.int().argmax(1) + 1, out.shape[1])
    return int(lengths.sum())


def make_call(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, levers: dict, new: int,
              stops: list[int]) -> Callable[..., torch.Tensor]:
    """One seeded ``RolloutEngine.generate`` call of a fresh engine with ``levers`` (its engine as
    ``call.engine``); ``call(stops=...)`` overrides the stop tokens."""
    spec = {k: v for k, v in levers.items() if k not in LOOP_SETTINGS}
    engine = RolloutEngine(GenerationSpec(max_new_tokens=new, **spec))
    for key in LOOP_SETTINGS:
        if key in levers:
            setattr(engine.loop, key, levers[key])

    def call(stops: list[int] = stops) -> torch.Tensor:
        torch.manual_seed(0)
        return engine.generate(model, "policy", ids, mask, pad_token_id=0, eos_token_id=stops,
                               sampling={"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0})

    call.engine = engine  # type: ignore[attr-defined]
    return call


def refresh_times(engine: RolloutEngine, device: torch.device, repeats: int = 3) -> tuple[float | None, float | None]:
    """Median ms of refreshing the engine's folded copy (part of every timed call that folds) and,
    for comparison, of the same fold written as the four full-size passes the refresh made before
    it became one ``addmm`` (``B @ A``, ``* s``, a float32 upcast, an add); None without a copy."""
    copy_ = engine._copies.get("policy")
    if copy_ is None:
        return None, None

    def four_pass() -> None:
        with torch.no_grad():
            for _, _, layer, folded in copy_._slots:
                a, b = layer._lora_pair("policy")
                base = layer._dense_weight_oi()
                torch.add(base, ((b @ a) * layer.scaling["policy"]).float(), out=folded.weight)

    out = []
    for fn in (copy_.refresh, four_pass):
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(1000 * (time.perf_counter() - t0))
        out.append(statistics.median(times))
    copy_.refresh()
    return out[0], out[1]


def measure(name: str, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, every: int,
            args: argparse.Namespace, device: torch.device) -> tuple[list, dict, Callable[..., torch.Tensor]]:
    """The report row and JSON record of variant ``name`` in stop regime ``every`` (speed-up left
    1), and its warmed-up call (for a profile)."""
    what, levers = VARIANTS[name]
    vocab = model.config.vocab_size
    stops = stop_tokens(vocab, every)
    call = make_call(model, ids, mask, levers, args.new, stops)
    engine = call.engine
    t0 = time.perf_counter()
    out = call()
    if levers.get("drop_finished"):  # rows that end early: every batch size of the ladder compiles now
        call(stops=stop_tokens(vocab, 8))
    sync(device)
    first = time.perf_counter() - t0
    assert out.shape[0] == args.batch and (every or out.shape[1] == args.new), out.shape
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, kept, steps = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = call()
        sync(device)
        times.append(time.perf_counter() - t0)
        kept.append(kept_tokens(out, stops))
        steps.append(out.shape[1])
    refresh_ms, four_pass_ms = refresh_times(engine, device)
    rate = statistics.median(k / t for k, t in zip(kept, times))
    step_ms = statistics.median(1000 * t / n for t, n in zip(times, steps))
    alloc = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else float("nan")
    row = [f"{name}: {what}", every, engine.last_path, rate, step_ms, 1.0, alloc, reserved, first,
           float("nan") if refresh_ms is None else refresh_ms, float("nan") if four_pass_ms is None else four_pass_ms]
    record = {"variant": name, "what": what, "levers": levers, "stop_every": every, "path": engine.last_path,
              "tokens_per_s": rate, "ms_per_step": step_ms, "speedup": 1.0, "peak_allocated_gib": alloc,
              "peak_reserved_gib": reserved, "first_call_s": first, "times_s": times, "kept_tokens": kept,
              "steps": steps, "batch_sizes": list(engine.loop.sizes) if engine.last_path == "own" else None,
              "refresh_ms": refresh_ms, "refresh_four_pass_ms": four_pass_ms}
    return row, record, call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated names of VARIANTS ({', '.join(VARIANTS)})")
    parser.add_argument("--stop-every", default="0", help="comma-separated mean row lengths; 0: rows never end")
    parser.add_argument("--profile", default="", help="a variant to profile once more (torch.profiler)")
    parser.add_argument("--nf4", action="store_true", help="quantize the base's linear layers to NF4")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_llama(args.size, device, dtype)
    if args.nf4:
        quantize_linear_layers(base, 4, quant_type="nf4", double_quant=True, compute_dtype=dtype,
                               quant_storage=torch.uint8)
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=True, keep_in_fp32="norms")
        if device.type == "cuda":
            torch.cuda.empty_cache()
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
    report = Report("rollout", device, f"Rollout generation, {args.size} Llama shape{', NF4 base' if args.nf4 else ''}, "
                    "LoRA r=16 all-linear, "
                    f"batch {args.batch} x {args.prompt_len} prompt + up to {args.new} new tokens",
                    ["variant", "stop every", "path", "tokens/s", "ms per step", "speed-up", "peak alloc GiB",
                     "peak reserved GiB", "first call s", "refresh ms", "four-pass refresh ms"],
                    suffix=f"_{args.size}{'_nf4' if args.nf4 else ''}")
    report.notes.append("today = the PPO/GRPO sampling path before the engine (unmerged LoRA, HF dynamic cache)")
    report.notes.append("refresh ms: the folded copy's refresh, part of every timed call that folds (one addmm per "
                        "weight); four-pass: the same fold as the matmul, scale, float32 upcast and add it was before")
    report.notes.append("stop every L: vocab/L stop tokens, rows end after about L tokens; 0: rows never end. "
                        "speed-up is against today in the same regime")
    chosen = [v for v in args.variants.split(",") if v]
    for every in [int(x) for x in args.stop_every.split(",") if x]:
        base_rate = None
        for name in chosen:
            what = VARIANTS[name][0]
            try:
                row, record, call = measure(name, model, ids, mask, every, args, device)
            except Exception as err:  # noqa: BLE001 - one failed variant must not cost the others' GPU time
                traceback.print_exc()
                error = f"{type(err).__name__}: {err}"
                report.add([f"{name}: {what}", every, f"failed: {error[:200]}"] + [float("nan")] * 8,
                           {"variant": name, "what": what, "stop_every": every, "error": error})
                continue
            base_rate = base_rate or record["tokens_per_s"]
            record["speedup"] = row[5] = record["tokens_per_s"] / base_rate
            report.add(row, record)
            if name == args.profile:
                profile(call, device, RESULTS / f"profile_rollout_{name}_{args.size}_stop{every}_{device.type}.txt")
            call.engine.loop.release()
            del call
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


def profile(call: Callable[[], torch.Tensor], device: torch.device, path: Path) -> None:
    """The top ops of one call by self time, as a table in ``path``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{command_line()}\n\n" + prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    print(f"profile written to {path}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
