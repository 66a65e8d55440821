"""The Model Registry of adapters, as ``raypeft registry list`` and ``raypeft registry promote`` see it.

Every stage (and every sweep's best trial) registers its adapter as a version of a registered
model, tagged with method, rank / virtual tokens, stage, base model and, for a sweep, the
sweep's name. Listing joins each version with its aliases and with the key metrics of the run
that produced it; promoting points an alias (``prod``, ``best``, ...) at a version, so stages
and ``raypeft eval`` can name ``models:/NAME@ALIAS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from raypeft.pipeline.tracking import TrackingError

# The figures that say how good an adapter is, in the order shown (those a run lacks are skipped).
KEY_METRICS = ("rougeL_after", "eval_accuracy_after", "eval_reward_after", "eval_kl_after",
               "trainable_params", "adapter_size_bytes")
TAG_COLUMNS = ("stage", "method", "r", "lora_alpha", "num_virtual_tokens", "sweep")


@dataclass
class VersionInfo:
    name: str
    version: int
    aliases: list[str]
    tags: dict[str, str]
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def _client(tracking_uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def list_versions(tracking_uri: str, name: str | None = None) -> list[VersionInfo]:
    """Every version of every registered model (or of ``name``), newest first within a model."""
    client = _client(tracking_uri)
    try:
        if name is not None:
            models = [client.get_registered_model(name)]
        else:
            models = []
            token = None
            while True:
                page = client.search_registered_models(max_results=100, page_token=token)
                models.extend(page)
                token = page.token
                if not token:
                    break
    except MlflowException as exc:
        if name is not None and "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            raise TrackingError(f"--name {name}: no registered model of that name at {tracking_uri}") from None
        raise TrackingError(f"registry: cannot read {tracking_uri}: {exc.message.splitlines()[0]}") from None
    out: list[VersionInfo] = []
    for model in sorted(models, key=lambda m: m.name):
        aliases_of: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_of.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name = '{model.name}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            metrics: dict[str, float] = {}
            if mv.run_id:
                try:
                    metrics = dict(client.get_run(mv.run_id).data.metrics)
                except MlflowException:
                    metrics = {}
            out.append(VersionInfo(model.name, int(mv.version), sorted(aliases_of.get(str(mv.version), [])),
                                   dict(mv.tags or {}), mv.run_id, metrics))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) >= 1:
            return f"{int(value):,}"
        return f"{value:.4f}"
    return str(value)


def format_versions(rows: list[VersionInfo]) -> str:
    """A plain-text table: one line per version, key metrics as columns where any row has them."""
    if not rows:
        return "no registered adapters"
    metric_cols = [m for m in KEY_METRICS if any(m in r.metrics for r in rows)]
    tag_cols = [t for t in TAG_COLUMNS if any(t in r.tags for r in rows)]
    header = ["name", "version", "aliases", *tag_cols, *metric_cols]
    table = [[r.name, str(r.version), ",".join(r.aliases) or "-", *(_fmt(r.tags.get(t)) for t in tag_cols),
              *(_fmt(r.metrics.get(m)) for m in metric_cols)] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in table]
    return "\n".join(lines)


def promote(tracking_uri: str, name: str, version: int | str, alias: str) -> None:
    """Point ``alias`` of ``name`` at ``version`` (moving it if it pointed elsewhere)."""
    client = _client(tracking_uri)
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise TrackingError(f"{name}/{version}: no such registered model version at {tracking_uri}") from None
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as exc:
        raise TrackingError(f"alias {alias!r}: {exc.message.splitlines()[0]}") from None
