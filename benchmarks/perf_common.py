"""Shared harness of the ``perf_*`` benchmarks: ours (raypeft ``adapters``) against ``peft``.

Every comparison runs both implementations in one process, on the same inputs and the same
adapter weights, after warm-up, *alternating* (ours, peft, peft, ours, ...) so that drift in a
shared machine's load hits both alike. Reported: per-side medians and the ratio ours / peft
(< 1 means we are faster or smaller). The machine, library versions and the command line go
into every result file (JSON + a markdown table under ``benchmarks/results/``).

A benchmark script, not library code: ``peft`` is only a test/benchmark dependency of raypeft.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]  # configs and results; raypeft itself is the installed package

RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
# glibc keeps freed memory for reuse unless big blocks are mmapped; a fixed threshold makes the
# process RSS follow live tensors, so an RSS delta measures what a step really holds.
_MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reexec_for_rss() -> None:
    """Restart this script with a fixed mmap threshold (CPU memory figures); no-op on re-entry."""
    if os.environ.get(_MMAP_ENV) is None:
        env = dict(os.environ, **{_MMAP_ENV: "65536"})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------------------------- environment
def machine_info(device: torch.device) -> dict[str, Any]:
    import peft
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "load_average_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 - optional
        pass
    return info


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def pick_device(name: str, cpu_threads: int | None = None) -> torch.device:
    """The device to run on. On CPU, ``cpu_threads`` (default: env ``BENCH_THREADS`` or 1) caps
    torch's threads: on a machine shared with other jobs a multi-threaded op waits for its most
    delayed thread, so one thread gives far steadier timings (both sides get the same)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads or int(os.environ.get("BENCH_THREADS", "1")))
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- timing
def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def alternate(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved; the order flips every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(time_once(fns[name], device))
    return times


def summarize(times: dict[str, list[float]], ours: str = "ours", ref: str = "peft") -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in times.items()}
    pair = [a / b for a, b in zip(times[ours], times[ref])]
    return {
        "median_s": med,
        "ratio": med[ours] / med[ref],
        "paired_ratio_median": statistics.median(pair),
        "repeats": len(times[ours]),
        "spread_s": {k: [min(v), max(v)] for k, v in times.items()},
    }


# ---------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class RssPeak:
    """Peak RSS above the RSS at entry, sampled every ``interval`` s by a thread (torch ops run
    without the GIL, so the sampler sees the step's intermediate peaks)."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.interval = interval
        self.delta = 0

    def __enter__(self) -> RssPeak:
        self._stop = threading.Event()
        self._start = _rss_bytes()
        self._peak = self._start

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.delta = self._peak - self._start


def measure_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Peak memory one call of ``fn`` adds: CUDA allocated/reserved above the call's start, or the
    CPU RSS delta. In MiB."""
    if device.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        reserved_before = torch.cuda.memory_reserved(device)
        fn()
        torch.cuda.synchronize(device)
        return {
            "peak_allocated_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20,
            "peak_reserved_mib": (torch.cuda.max_memory_reserved(device) - reserved_before) / 2**20,
            "total_peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        }
    with RssPeak() as peak:
        fn()
    return {"rss_delta_mib": peak.delta / 2**20}


def alternate_memory(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Median of ``repeats`` interleaved memory measurements per function."""
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(measure_memory(fns[name], device))
    return {k: {m: statistics.median(s[m] for s in v) for m in v[0]} for k, v in samples.items()}


def memory_ratios(mem: dict[str, dict[str, float]], ours: str = "ours", ref: str = "peft") -> dict[str, float]:
    return {k: (mem[ours][k] / mem[ref][k] if mem[ref][k] else float("nan")) for k in mem[ours]}


# ---------------------------------------------------------------------------------- output
@dataclass
class Report:
    """Rows of one benchmark, written as ``results/<name>_<device>.json`` and ``.md``."""

    name: str
    device: torch.device
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    suffix: str = ""

    def add(self, row: list[Any], record: dict[str, Any]) -> None:
        """Record a row and rewrite the files, so a run cut short keeps what it measured."""
        self.rows.append(row)
        self.records.append(record)
        print(" | ".join(_fmt(c) for c in row), flush=True)
        self.write()

    def write(self) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = f"{self.name}_{self.device.type}{self.suffix}"
        info = machine_info(self.device)
        payload = {
            "benchmark": self.name,
            "command": command_line(),
            "machine": info,
            "notes": self.notes,
            "results": self.records,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        lines = [f"### {self.title} ({self.device.type})", "", f"`{command_line()}`", ""]
        lines.append(machine_line(info))
        lines += ["", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
        return RESULTS / f"{stem}.md"


def machine_line(info: dict[str, Any]) -> str:
    """The ``Machine: ...`` line of a result file, from :func:`machine_info`'s keys."""
    keys = ("gpu", "cpu", "cpu_count", "torch_threads", "torch", "transformers", "peft", "cuda")
    return ("Machine: " + ", ".join(f"{k}={info[k]}" for k in keys if k in info)
            + f"; load average at start {tuple(round(x, 1) for x in info['load_average_at_start'])}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


# ---------------------------------------------------------------------------------- models
def llama_config(size: str, vocab: int | None = None) -> Any:
    """Llama-architecture configs built locally (no hub): ``tiny``/``small`` for CPU runs,
    ``1b`` (Llama-3.2-1B shapes) and ``8b`` (Llama-3.1-8B shapes) for GPU runs."""
    import transformers

    shapes = {
        "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=4096),
        "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8192),
        "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256),
    }
    if size not in shapes:
        raise ValueError(f"model size must be one of {sorted(shapes)}, got {size!r}")
    kwargs = dict(shapes[size], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    return transformers.LlamaConfig(**kwargs)


def build_llama(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = llama_config(size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in ``dtype``: no float32 copy of an 8B model
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def copy_trainable(src: torch.nn.Module, dst: torch.nn.Module) -> int:
    """Copy ``src``'s trainable tensors into ``dst`` by name (raypeft and peft share PEFT's layout),
    so both sides start from identical adapter weights. Returns how many were copied."""
    dst_params = dict(dst.named_parameters())
    n = 0
    with torch.no_grad():
        for name, param in src.named_parameters():
            if not param.requires_grad:
                continue
            if name not in dst_params:
                raise KeyError(f"copy_trainable: {name!r} has no counterpart in the peft model")
            dst_params[name].copy_(param.to(dst_params[name].dtype))
            n += 1
    if n == 0:
        raise ValueError("copy_trainable: the source model has no trainable tensor")
    return n
