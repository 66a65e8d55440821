"""GPU memory table: our adapters vs ``peft`` vs the published PEFT README table.

    python benchmarks/memory_table.py                          # every model, variant and library (GPU)
    python benchmarks/memory_table.py --models t0_3b,llama3_8b --budget-s 540
    python benchmarks/memory_table.py --merge old.json ...     # keep finished cells of an earlier run
    python benchmarks/memory_table.py --tiny --no-subprocess   # tiny configs, runs on a laptop CPU

Models have the architectures and sizes of the published table's (and a Llama-3-8B), randomly
initialised from configs (no hub), built straight on the device in their training dtype.
Variants, each one training cell of ``--warmup`` + ``--steps`` optimiser steps on random tokens:

- ``full``: every weight trains, fp32 (the published recipe), with two exact memory savers:
  activation checkpointing (non-reentrant) and the AdamW step fused into backward (each
  parameter is updated, and its gradient freed, as soon as that gradient is complete: the same
  update as a step after backward when there is no global gradient clipping);
- ``lora``: bf16 frozen base, fp32 LoRA (r=8, alpha=32, dropout=0.1 on the published targets),
  activation checkpointing, AdamW over the adapter only;
- ``lora_zero3_offload``: ``lora`` trained by DeepSpeed ZeRO-3 with parameter and optimizer
  offload to CPU (``configs/deepspeed/zero3_offload.json``) in a one-process group; ours goes
  through ``pipeline.backends.DeepSpeedBackend``;
- ``qlora``: the base's linear layers in bitsandbytes NF4 (double quantization, bf16 compute),
  k-bit preparation, then ``lora``.

Each variant runs with ``ours`` (``adapters``) and ``peft`` (+ transformers, + DeepSpeed), each
(model, variant, library) cell in its own subprocess so that peaks are clean; ``full`` has no
adapter library (``torch``). Peak GPU memory is ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` over the training steps (reset after set-up, as the published script's
``TorchTracemalloc`` does), CPU is the process's peak RSS, and memory is in decimal GB (1e9 bytes,
the largest reading of the published "GB"). An out-of-memory cell is recorded as ``oom``.

A benchmark, not library code: ``peft`` is only a test/benchmark dependency of raypeft.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]  # configs and results; raypeft itself is the installed package

GB = 1e9
VARIANTS = ("full", "lora", "lora_zero3_offload", "qlora")
LIBS = ("ours", "peft")
ZERO3_OFFLOAD_JSON = REPO / "configs" / "deepspeed" / "zero3_offload.json"
LR = 3e-3  # the published example scripts' learning rate

# The published PEFT README table (A100 80GB, batch 8, twitter_complaints; see the peft example
# scripts): GPU / CPU GB per (model, variant); None = "OOM GPU".
PUBLISHED: dict[str, dict[str, dict[str, float | None]]] = {
    "t0_3b": {"full": {"gpu": 47.14, "cpu": 2.96}, "lora": {"gpu": 14.4, "cpu": 2.96},
              "lora_zero3_offload": {"gpu": 9.8, "cpu": 17.8}},
    "mt0_xxl": {"full": {"gpu": None, "cpu": None}, "lora": {"gpu": 56.0, "cpu": 3.0},
                "lora_zero3_offload": {"gpu": 22.0, "cpu": 52.0}},
    "bloom_7b1": {"full": {"gpu": None, "cpu": None}, "lora": {"gpu": 32.0, "cpu": 3.8},
                  "lora_zero3_offload": {"gpu": 18.1, "cpu": 35.0}},
}
GOAL = 0.8  # every cell at least 20% below the published figure


# ----------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture: how to build it (full size or tiny) and where LoRA goes."""

    key: str
    like: str
    seq2seq: bool
    lora_targets: tuple[str, ...]  # peft's default targets for the architecture
    build_config: Callable[[bool], Any]  # tiny -> transformers config

    def model_class(self):
        import transformers

        name = self.build_config(True).__class__.__name__
        return {"T5Config": transformers.T5ForConditionalGeneration,
                "MT5Config": transformers.MT5ForConditionalGeneration,
                "BloomConfig": transformers.BloomForCausalLM,
                "LlamaConfig": transformers.LlamaForCausalLM}[name]


def _t0_3b(tiny: bool):
    from transformers import T5Config

    # T0_3B is fine-tuned from the LM-adapted T5 v1.1 XL: gated-GELU, untied head (2.85B parameters).
    size = (dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=256) if tiny else
            dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, vocab_size=32128))
    return T5Config(**size, num_decoder_layers=size["num_layers"], feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1)


def _mt0_xxl(tiny: bool):
    from transformers import MT5Config

    size = (dict(d_model=64, d_ff=160, d_kv=16, num_heads=4, num_layers=2, vocab_size=256) if tiny else
            dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=250112))
    return MT5Config(**size, num_decoder_layers=size["num_layers"], feed_forward_proj="gated-gelu",
                     tie_word_embeddings=False, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1)


def _bloom_7b1(tiny: bool):
    from transformers import BloomConfig

    size = dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=256) if tiny else dict(
        hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880)
    return BloomConfig(**size, hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)


def _llama3_8b(tiny: bool):
    from transformers import LlamaConfig

    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256) if tiny else
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256))
    return LlamaConfig(**size, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, use_cache=False, pad_token_id=0)


MODELS: dict[str, ModelSpec] = {
    "t0_3b": ModelSpec("t0_3b", "bigscience/T0_3B", True, ("q", "v"), _t0_3b),
    "bloom_7b1": ModelSpec("bloom_7b1", "bigscience/bloomz-7b1", False, ("query_key_value",), _bloom_7b1),
    "mt0_xxl": ModelSpec("mt0_xxl", "bigscience/mt0-xxl", True, ("q", "v"), _mt0_xxl),
    "llama3_8b": ModelSpec("llama3_8b", "meta-llama/Meta-Llama-3-8B", False, ("q_proj", "v_proj"), _llama3_8b),
}


def build_base(spec: ModelSpec, tiny: bool, dtype: torch.dtype, device: torch.device):
    """The randomly initialised model, created directly on ``device`` in ``dtype`` (no fp32 CPU copy)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = spec.build_config(tiny)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = spec.model_class()(config)
    finally:
        torch.set_default_dtype(previous)
    model.config.use_cache = False
    return model.train()


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (exact: the same gradients, recomputed)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ----------------------------------------------------------------------------- data

def make_batch(spec: ModelSpec, vocab: int, batch: int, seq_len: int, target_len: int,
               device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    """Random tokens of the stated shape and the number of tokens one step processes."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, seq_len), generator=gen)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.seq2seq:
        out["labels"] = torch.randint(2, vocab, (batch, target_len), generator=gen)
        tokens = batch * (seq_len + target_len)
    else:
        out["labels"] = ids.clone()
        tokens = batch * seq_len
    return {k: v.to(device) for k, v in out.items()}, tokens


# ----------------------------------------------------------------------------- one cell

def _lora_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": list(spec.lora_targets)}


def _task_type(spec: ModelSpec) -> str:
    return "SEQ_2_SEQ_LM" if spec.seq2seq else "CAUSAL_LM"


def _attach_lora(model, spec: ModelSpec, lib: str):
    """LoRA with fp32 adapter weights on either library (peft's default autocasts adapters to fp32)."""
    if lib == "ours":
        from raypeft.adapters import LoraConfig, get_adapter_model

        return get_adapter_model(model, LoraConfig(task_type=_task_type(spec), **_lora_kwargs(spec)),
                                 adapter_dtype=torch.float32)
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(task_type=_task_type(spec), **_lora_kwargs(spec)))


def _quantize(model) -> None:
    """NF4 + double quantization, bf16 compute: the bitsandbytes ``Linear4bit`` layers that
    ``BitsAndBytesConfig(load_in_4bit=True, ...)`` gives, made in memory (there is no checkpoint
    to load). Like transformers' quantizer it leaves the output head and the model's
    ``_keep_in_fp32_modules`` (T5's ``wo``, whose forward casts its input to the weight's dtype)
    unquantized, in bf16."""
    from raypeft.adapters import quantize_linear_layers

    skip = ["lm_head", *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    quantize_linear_layers(model, 4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16,
                           quant_storage=torch.uint8, skip_modules=skip)


def kbit_keep_in_fp32(spec: ModelSpec) -> str:
    """Our k-bit preparation's fp32 set: the pipeline's ``"norms"`` (norms and head) for causal LMs;
    ``"all"`` for T5-family models, whose attention feeds a position bias made in the embeddings'
    dtype to SDPA next to queries in the norms' dtype, so the two must match."""
    return "all" if spec.seq2seq else "norms"


def _fused_adamw(params: list[torch.nn.Parameter]) -> list[torch.optim.Optimizer]:
    """One AdamW per parameter, stepped from its post-accumulate-grad hook, gradient freed at once."""
    optimizers = []
    for param in params:
        opt = torch.optim.AdamW([param], lr=LR, foreach=False)

        def hook(p: torch.Tensor, opt: torch.optim.Optimizer = opt) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)

        param.register_post_accumulate_grad_hook(hook)
        optimizers.append(opt)
    return optimizers


def _init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _zero3_trainer(model, lib: str, micro_batch: int, dtype: str):
    """(module to call, backward+step function) for a ZeRO-3 CPU-offload engine over ``model``."""
    from raypeft.pipeline.backends import build_backend, fill_deepspeed_config, load_deepspeed_config

    if lib == "ours":
        backend = build_backend(model, deepspeed_config=str(ZERO3_OFFLOAD_JSON), micro_batch_size=micro_batch,
                                grad_accum=1, world_size=1, lr=LR, weight_decay=0.0, scheduler="constant",
                                warmup_steps=0, total_steps=1, max_grad_norm=None, dtype=dtype)

        def update(loss: torch.Tensor) -> None:
            backend.backward(loss)
            backend.step()

        return backend.module, update, backend
    import deepspeed

    ds = fill_deepspeed_config(load_deepspeed_config(str(ZERO3_OFFLOAD_JSON)), micro_batch_size=micro_batch,
                               grad_accum=1, world_size=1, max_grad_norm=None, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                           optimizer=torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
                                           config=ds, dist_init_required=False)

    def update(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()

    return engine, update, engine


def _setup(spec: ModelSpec, variant: str, lib: str, tiny: bool, device: torch.device, micro_batch: int):
    """Build the cell's model and return (callable model, update(loss), keep-alive objects)."""
    if variant == "full":
        model = build_base(spec, tiny, torch.float32, device)
        enable_checkpointing(model)
        keep = _fused_adamw([p for p in model.parameters() if p.requires_grad])

        def update(loss: torch.Tensor) -> None:
            loss.backward()  # the optimiser steps inside backward

        return model, update, keep

    base = build_base(spec, tiny, torch.bfloat16, device)
    if variant == "qlora":
        _quantize(base)
        if lib == "ours":
            from raypeft.adapters import prepare_model_for_kbit_training

            # What pipeline.modeling.load_base_model does for a quantized base (see kbit_keep_in_fp32).
            prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                            keep_in_fp32=kbit_keep_in_fp32(spec))
        else:
            import peft

            peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                                 gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in base.parameters():
            p.requires_grad_(False)
        enable_checkpointing(base)  # what pipeline.modeling.load_base_model does for a bf16 base
        base.enable_input_require_grads()
    model = _attach_lora(base, spec, lib)
    model.train()
    if variant == "lora_zero3_offload":
        _init_single_process_group(device)
        return _zero3_trainer(model, lib, micro_batch, "bfloat16")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def update(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, update, opt


def _count(model) -> tuple[int, int]:
    """(trainable, total) parameters; ZeRO-3 partitions and packed 4-bit weights counted whole."""
    trainable = total = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            n = getattr(p, "ds_numel", None) or p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2  # two 4-bit values per stored byte
            total += n
            trainable += n if p.requires_grad else 0
    return trainable, total


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_cell(model_key: str, variant: str, lib: str, *, tiny: bool, batch: int, seq_len: int, target_len: int,
             warmup: int, steps: int, device: str) -> dict[str, Any]:
    """Train one (model, variant, library) cell and measure it; never raises (errors are recorded)."""
    spec = MODELS[model_key]
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    row: dict[str, Any] = {"model": model_key, "like": spec.like, "variant": variant, "lib": lib,
                           "batch": batch, "seq_len": seq_len, "target_len": target_len if spec.seq2seq else None,
                           "warmup_steps": warmup, "steps": steps}
    if variant == "qlora" and lib == "ours":
        row["kbit_keep_in_fp32"] = kbit_keep_in_fp32(spec)
    started = time.perf_counter()
    stage = "setup"
    try:
        module, update, keep = _setup(spec, variant, lib, tiny, dev, batch)
        row["trainable_params"], row["total_params"] = _count(module)
        batch_t, tokens = make_batch(spec, spec.build_config(tiny).vocab_size, batch, seq_len, target_len, dev)
        if cuda:
            torch.cuda.synchronize()
            row["setup_peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row["gpu_allocated_before_train_gb"] = torch.cuda.memory_allocated() / GB
        row["setup_s"] = time.perf_counter() - started
        stage = "train"
        losses = []
        t0 = time.perf_counter()
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            loss = module(**batch_t).loss
            update(loss)
            losses.append(float(loss.detach().float()))
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        row.update(status="ok", losses=losses, step_s=elapsed / max(steps, 1),
                   tokens_per_s=tokens * steps / elapsed if steps and elapsed > 0 else None)
        if cuda:
            row["peak_gpu_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
            row["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
        del keep
    except Exception as exc:  # noqa: BLE001 - every failure becomes a table cell, the run goes on
        row["status"] = "oom" if _is_oom(exc) else "error"
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if cuda:
            row["peak_gpu_allocated_gb_at_failure"] = torch.cuda.max_memory_allocated() / GB
    finally:
        row["peak_cpu_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
        row["wall_s"] = time.perf_counter() - started
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    # The one-process group stays up for later in-process cells: DeepSpeed keeps a handle to it.
    return row


# ----------------------------------------------------------------------------- orchestration

def cell_plan(models: list[str], variants: list[str], libs: list[str]) -> list[tuple[str, str, str]]:
    """Cheap, decisive cells first within a model; ``full`` has no adapter library."""
    order = ["lora", "qlora", "lora_zero3_offload", "full"]
    plan = []
    for m in models:
        for v in sorted(variants, key=order.index):
            for lib in (["torch"] if v == "full" else libs):
                plan.append((m, v, lib))
    return plan


def _run_in_subprocess(cell: tuple[str, str, str], args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    model, variant, lib = cell
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", f"{model}:{variant}:{lib}",
           "--cell-out", str(result_path), *_shared_flags(args)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        if result_path.stat().st_size:
            return json.loads(result_path.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        status = "oom" if any("out of memory" in t.lower() for t in tail) else "error"
        return {"model": model, "variant": variant, "lib": lib, "status": status,
                "error": f"worker exited {proc.returncode}: {' | '.join(tail)[:400]}",
                "wall_s": time.perf_counter() - started}
    except subprocess.TimeoutExpired:
        return {"model": model, "variant": variant, "lib": lib, "status": "timeout",
                "error": f"no result within {timeout:.0f} s", "wall_s": time.perf_counter() - started}
    finally:
        result_path.unlink(missing_ok=True)


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--target-len", str(args.target_len),
             "--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device]
    return flags + (["--tiny"] if args.tiny else [])


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "deepspeed", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - a missing package is reported, not fatal
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def _cell_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["model"], row["variant"], row["lib"]


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, variant): ours, peft, ours/peft ratios, the published bar and the verdict."""
    by_key = {_cell_key(r): r for r in rows}
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for variant in [v for v in VARIANTS if any(r["model"] == model and r["variant"] == v for r in rows)]:
            ours = by_key.get((model, variant, "torch" if variant == "full" else "ours"))
            ref = by_key.get((model, variant, "peft"))
            pub = PUBLISHED.get(model, {}).get(variant)
            line: dict[str, Any] = {"model": model, "variant": variant, "ours": _brief(ours), "peft": _brief(ref),
                                    "published_gpu_gb": None if pub is None else pub["gpu"],
                                    "published_cpu_gb": None if pub is None else pub["cpu"]}
            for metric in ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb", "peak_cpu_rss_gb", "tokens_per_s"):
                a, b = (ours or {}).get(metric), (ref or {}).get(metric)
                if ours and ref and ours.get("status") == ref.get("status") == "ok" and a and b:
                    line[f"ratio_{metric}"] = a / b
            line["verdict"] = _verdict(ours, pub)
            lines.append(line)
    return lines


def _brief(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    keys = ("status", "peak_gpu_allocated_gb", "peak_gpu_reserved_gb", "peak_cpu_rss_gb", "tokens_per_s", "error")
    return {k: row.get(k) for k in keys if row.get(k) is not None}


def _verdict(ours: dict[str, Any] | None, pub: dict[str, float | None] | None) -> str:
    """Against the published GPU figure: 'beats' (<= 80% of it), 'misses', or why there is none."""
    if pub is None:
        return "no published figure"
    if ours is None:
        return "not run"
    if ours.get("status") == "ok" and ours.get("peak_gpu_allocated_gb") is None:
        return "no GPU measurement (CPU run)"
    if pub["gpu"] is None:
        return ("fits where published OOM" if ours.get("status") == "ok" else
                "OOM, as published" if ours.get("status") == "oom" else f"{ours.get('status')}")
    if ours.get("status") != "ok":
        return f"{ours.get('status')} (published {pub['gpu']} GB)"
    ratio = ours["peak_gpu_allocated_gb"] / pub["gpu"]
    return f"{'beats' if ratio <= GOAL else 'misses'} the bar ({ratio:.0%} of published)"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if row.get("status") != "ok":
        return str(row.get("status", "?")).upper()
    return (f"{_fmt(row.get('peak_gpu_allocated_gb'))} / {_fmt(row.get('peak_gpu_reserved_gb'))} GPU, "
            f"{_fmt(row['peak_cpu_rss_gb'], 1)} CPU, {_fmt(row.get('tokens_per_s'), 0)} tok/s")


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    out = ["# GPU memory: raypeft adapters vs peft vs the published PEFT table", "",
           f"- command: `{meta['command']}`",
           *([f"- assembled from {len(meta['runs'])} runs on the same device, each later one keeping the earlier "
              "ones' finished cells (`--merge`): " + "; ".join(f"`{c}`" for c in meta["runs"])]
             if len(meta.get("runs", [])) > 1 else []),
           f"- device: {meta['device']}; versions: "
           + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
           f"- batch {meta['batch']}, sequence length {meta['seq_len']} (seq2seq: {meta['seq_len']} source + "
           f"{meta['target_len']} target tokens), {meta['warmup']} warm-up + {meta['steps']} timed steps, "
           f"random tokens, models randomly initialised from configs{' (TINY configs)' if meta['tiny'] else ''}",
           "- published bar: PEFT README, one A100 80GB, batch 8, ought/raft twitter_complaints (causal "
           "scripts pad to 64 tokens; seq2seq pads each batch to its longest tweet), fp32 weights; the goal is "
           "every GPU cell at least 20% below it",
           "- memory in decimal GB (1e9 bytes); GPU = peak allocated / peak reserved over the training steps; "
           "CPU = peak RSS of the cell's process; cells marked OOM ran out of GPU memory",
           "- full: fp32 weights and AdamW as published, plus two exact savers: non-reentrant activation "
           "checkpointing and the AdamW step fused into backward (no gradient buffer; the same update without "
           "global clipping): 12 bytes a parameter, so 7B and larger cannot fit 80 GB",
           "- lora: r=8, alpha=32, dropout=0.1 on peft's default targets, fp32 adapter weights, bf16 frozen base "
           "(the published runs kept the base in fp32), activation checkpointing; lora_zero3_offload adds "
           "configs/deepspeed/zero3_offload.json (ours through pipeline.backends.DeepSpeedBackend, peft through "
           "deepspeed.initialize) in a one-process group",
           "- qlora: both columns start from the same in-memory NF4 base (bitsandbytes Linear4bit, double "
           "quantization, bf16 compute; head and T5's `wo` left unquantized as transformers does), since "
           "transformers' quantizer needs a checkpoint on disk; peft's k-bit preparation then upcasts every "
           "unquantized tensor to fp32, ours (`keep_in_fp32=\"norms\"`, the pipeline's) only norms and head "
           "(`\"all\"` on T5-family models)", "",
           "| model | variant | ours (GPU alloc / reserved, CPU, tokens/s) | peft | ours/peft GPU alloc | "
           "ours/peft tok/s | published GPU / CPU | vs published |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_key = {_cell_key(r): r for r in report["cells"]}
    for line in report["summary"]:
        m, v = line["model"], line["variant"]
        ours = by_key.get((m, v, "torch" if v == "full" else "ours"))
        ref = by_key.get((m, v, "peft"))
        pub = (f"{_fmt(line['published_gpu_gb']) if line['published_gpu_gb'] is not None else 'OOM'} / "
               f"{_fmt(line['published_cpu_gb'])}" if (m in PUBLISHED and v in PUBLISHED[m]) else "-")
        out.append(f"| {m} | {v} | {_cell_text(ours)} | {'n/a (no adapter)' if v == 'full' else _cell_text(ref)} | "
                   f"{_fmt(line.get('ratio_peak_gpu_allocated_gb'))} | {_fmt(line.get('ratio_tokens_per_s'))} | "
                   f"{pub} | {line['verdict']} |")
    failures = [r for r in report["cells"] if r.get("status") not in ("ok", None) and r.get("error")]
    if failures:
        out += ["", "Failed cells:", ""]
        out += [f"- {r['model']} / {r['variant']} / {r['lib']}: {r['status']}: {r['error']}" for r in failures]
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    report = {"meta": meta, "cells": rows, "summary": summarise(rows)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "memory_table.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "memory_table.md").write_text(render_markdown(report))
    return report


def _parse_list(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; expected a comma list of {list(allowed)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--libs", default=",".join(LIBS))
    p.add_argument("--batch", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="default 64 (tiny: 16)")
    p.add_argument("--target-len", type=int, default=None, help="seq2seq label length; default 8 (tiny: 4)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (tiny: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; default 3 (tiny: 1)")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CPU-friendly)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--merge", default=None, help="an earlier memory_table.json: its ok/oom cells are kept, not rerun")
    p.add_argument("--budget-s", type=float, default=None, help="start no new cell after this many seconds")
    p.add_argument("--cell-timeout-s", type=float, default=420.0)
    p.add_argument("--no-subprocess", action="store_true", help="run every cell in this process (tests)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # worker mode: model:variant:lib
    p.add_argument("--cell-out", default=None, help=argparse.SUPPRESS)
    return p


def _fill_defaults(args: argparse.Namespace) -> None:
    tiny = args.tiny
    for name, big, small in (("batch", 8, 2), ("seq_len", 64, 16), ("target_len", 8, 4), ("warmup", 2, 1),
                             ("steps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else big)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = build_parser().parse_args(argv)
    _fill_defaults(args)
    cell_kwargs = dict(tiny=args.tiny, batch=args.batch, seq_len=args.seq_len, target_len=args.target_len,
                       warmup=args.warmup, steps=args.steps, device=args.device)
    if args.cell:  # worker: one cell, result to --cell-out
        model, variant, lib = args.cell.split(":")
        row = run_cell(model, variant, lib, **cell_kwargs)
        Path(args.cell_out).write_text(json.dumps(row))
        return None

    models = _parse_list(args.models, list(MODELS), "models")
    variants = _parse_list(args.variants, VARIANTS, "variants")
    libs = _parse_list(args.libs, LIBS, "libs")
    rows: list[dict[str, Any]] = []
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    runs = [command]
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        rows = [r for r in earlier["cells"] if r.get("status") in ("ok", "oom")]
        previous = earlier.get("meta", {})
        runs = list(previous.get("runs") or [previous.get("command", "?")]) + runs
    done = {_cell_key(r) for r in rows}
    meta = {"command": command, "runs": runs,
            "device": device_name(args.device), "versions": _versions(), "tiny": args.tiny, "batch": args.batch,
            "seq_len": args.seq_len, "target_len": args.target_len, "warmup": args.warmup, "steps": args.steps,
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out_dir = Path(args.out)
    started = time.perf_counter()
    report = write_report(out_dir, rows, meta)
    for cell in cell_plan(models, variants, libs):
        if cell in done:
            continue
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - started)
        if left is not None and left < 20:
            rows.append({"model": cell[0], "variant": cell[1], "lib": cell[2], "status": "skipped",
                         "error": "time budget spent"})
            continue
        if args.no_subprocess:
            row = run_cell(*cell, **cell_kwargs)
        else:
            timeout = args.cell_timeout_s if left is None else min(args.cell_timeout_s, left)
            row = _run_in_subprocess(cell, args, timeout)
        rows = [r for r in rows if _cell_key(r) != cell] + [row]
        print(json.dumps({k: row.get(k) for k in ("model", "variant", "lib", "status", "peak_gpu_allocated_gb",
                                                  "peak_gpu_reserved_gb", "peak_cpu_rss_gb", "tokens_per_s",
                                                  "wall_s", "error")}), flush=True)
        report = write_report(out_dir, rows, meta)
    report = write_report(out_dir, rows, meta)
    print(render_markdown(report))
    return report


if __name__ == "__main__":
    main()
