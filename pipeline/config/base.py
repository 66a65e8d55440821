"""What every config section shares: the one-line error type and the strict base model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config problem, phrased as one line: ``<field path>: <problem>``."""


class StrictModel(BaseModel):
    """Unknown keys are errors, and no float field takes NaN or infinity (``epochs: .inf`` would
    pass a ``gt=0`` bound and then train forever, or fail inside Ray on ``math.ceil``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)




def adapter_ref(value: str | None) -> str | None:
    """An adapter input: a stage name, a folder, or ``models:/...`` / ``runs:/...`` (checked in preflight)."""
    if value is not None and not value.strip():
        raise ValueError("must not be blank (a stage name, a folder, or a models:/ URI; null for none)")
    return value

