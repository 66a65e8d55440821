"""The sweep's summary: one row per trial, as a printed table, a CSV and a plot.

Rows are built from what MLflow holds for each trial's child run (so a failed or early-stopped
trial still shows whatever it logged) and from the trial's resolved config (method, rank,
alpha, virtual tokens, learning rate, including values the trial took from the base config).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMPLETED, FAILED, STOPPED = "completed", "failed", "early-stopped"


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    method: str | None = None
    r: int | None = None
    alpha: float | None = None
    tokens: int | None = None
    lr: float | None = None
    metric: float | None = None
    trainable_params: float | None = None
    adapter_bytes: float | None = None
    memory_mib: float | None = None
    train_s: float | None = None
    wall_s: float | None = None
    run_id: str | None = None
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def usable(self) -> bool:
        """A candidate for the best adapter: finished, published, with a finite metric."""
        return self.status == COMPLETED and self.metric is not None and math.isfinite(self.metric)


def ranked(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Usable trials best first, then the rest (failed and stopped) in trial order."""
    good = sorted((r for r in rows if r.usable()), key=lambda r: r.metric, reverse=mode == "max")
    rest = sorted((r for r in rows if not r.usable()), key=lambda r: r.trial_id)
    return good + rest


def _fmt(value: Any, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value) and kind != "metric"):
        return "-"
    if kind == "metric":
        return f"{value:.4f}"
    if kind == "lr":
        return f"{value:.2g}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "kib":
        return f"{value / 1024:,.1f}"
    if kind == "s":
        return f"{value:.1f}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def columns(metric: str, memory_label: str = "memory MiB") -> list[tuple[str, str, str]]:
    """``(header, attribute, format)`` of every summary column."""
    return [("trial", "trial_id", ""), ("status", "status", ""), ("method", "method", ""), ("r", "r", ""),
            ("alpha", "alpha", ""), ("tokens", "tokens", ""), ("lr", "lr", "lr"), (metric, "metric", "metric"),
            ("trainable params", "trainable_params", "int"), ("adapter KiB", "adapter_bytes", "kib"),
            (memory_label, "memory_mib", "int"), ("train s", "train_s", "s"), ("wall s", "wall_s", "s")]


def markdown_table(rows: list[TrialRow], metric: str, memory_label: str = "memory MiB") -> str:
    cols = columns(metric, memory_label)
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(getattr(row, a), k) for _, a, k in cols) + " |")
    return "\n".join(lines)


def write_csv(rows: list[TrialRow], metric: str, path: Path) -> Path:
    cols = columns(metric)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([h for h, _, _ in cols] + ["mlflow run", "error"])
        for row in rows:
            writer.writerow([getattr(row, a) if getattr(row, a) is not None else "" for _, a, _ in cols]
                            + [row.run_id or "", row.error or ""])
    return path


def plot(rows: list[TrialRow], metric: str, path: Path, title: str) -> Path | None:
    """``metric`` against trainable parameters (log scale), one colour per method; None if there is
    no point to draw or matplotlib is missing (``mlflow-skinny`` installs come without it)."""
    points = [r for r in rows if r.metric is not None and math.isfinite(r.metric) and r.trainable_params]
    if not points:
        return None
    try:
        import matplotlib
    except ImportError:
        return None

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r.method or "?" for r in points))
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        mine = [r for r in points if (r.method or "?") == method]
        ax.scatter([r.trainable_params for r in mine], [r.metric for r in mine], s=60, color=colours(i % 10),
                   label=method, edgecolors="black", linewidths=0.5,
                   marker="o" if all(r.status == COMPLETED for r in mine) else "D")
        for r in mine:
            label = f"r={r.r}" if r.r is not None else (f"t={r.tokens}" if r.tokens is not None else "")
            if label:
                ax.annotate(label, (r.trainable_params, r.metric), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the point labels
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(title="method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
