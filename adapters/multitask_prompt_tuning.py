"""Multitask prompt tuning (Wang et al. 2023): one shared prompt, modulated per task by a low-rank matrix.

Task ``t``'s virtual tokens are the shared prompt ``P`` (``num_virtual_tokens x token_dim``) times,
element-wise, the rank-``num_ranks`` product of the task's factors:

    ``prompt_t = P * (prefix_task_cols[t] @ prefix_task_rows[t])``

Every row of a batch picks its task through ``task_ids`` (a ``(batch,)`` long tensor) passed to
``forward`` and ``generate``. Config fields and the checkpoint follow ``peft``'s
``MultitaskPromptTuningConfig`` / ``MultitaskPromptEmbedding``: the file holds
``prompt_embeddings`` (the shared ``P``), ``prefix_task_cols`` ``(num_tasks, rows, num_ranks)`` and
``prefix_task_rows`` ``(num_tasks, num_ranks, token_dim)``.

Initialisation (``prompt_tuning_init``): ``RANDOM``/``TEXT``/``SAMPLE_VOCAB`` as in prompt tuning
(the task factors ~ N(0, 0.02)); or from a source-training checkpoint
``prompt_tuning_init_state_dict_path`` (a safetensors file): ``AVERAGE_SOURCE_TASKS`` (shared prompt +
the mean of the source tasks' factors), ``EXACT_SOURCE_TASK`` (shared prompt + the factors of task
``prompt_tuning_init_task``) or ``ONLY_SOURCE_SHARED`` (the shared prompt only). The single-task
inits need ``num_tasks=1``, as the source factors are copied into a one-task adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from .config import register_config
from .constraints import param
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .virtual_tokens import PROMPT_EMBEDDINGS_KEY

COLS_KEY = "prefix_task_cols"
ROWS_KEY = "prefix_task_rows"
_SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
_INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB", *_SOURCE_INITS)
_FACTOR_STD = 0.02  # PEFT's (and the paper's code) init of the task factors


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """PEFT's ``MultitaskPromptTuningConfig``: ``num_tasks`` tasks sharing one prompt, each with a
    rank-``num_ranks`` multiplicative modulation; see the module docstring for the inits."""

    PEFT_TYPE: ClassVar[str] = "MULTITASK_PROMPT_TUNING"

    prompt_tuning_init: str = param("RANDOM", choices=_INIT_CHOICES)
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = param(0, ge=0)
    num_ranks: int | None = param(1, gt=0, required=True)
    num_tasks: int | None = param(1, gt=0, required=True)

    def __post_init__(self) -> None:
        init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        # PromptTuningConfig's own checks know only its inits; the source inits start from RANDOM there
        self.prompt_tuning_init = "RANDOM" if init in _SOURCE_INITS else init
        super().__post_init__()
        self.prompt_tuning_init = init
        if init in _SOURCE_INITS and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(
                f"MultitaskPromptTuningConfig: prompt_tuning_init={init!r} needs prompt_tuning_init_state_dict_path"
            )
        if init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK") and self.num_tasks != 1:
            raise ValueError(
                f"MultitaskPromptTuningConfig: prompt_tuning_init={init!r} builds a single-task adapter; "
                f"num_tasks must be 1, got {self.num_tasks!r}"
            )

    def create_prompt_encoder(self, word_embeddings: nn.Module) -> MultitaskPromptEmbedding:
        return MultitaskPromptEmbedding(self, word_embeddings)


def _read_source(path: str) -> dict[str, torch.Tensor]:
    """The source-training checkpoint (safetensors only: pickles can run code)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MultitaskPromptTuningConfig: prompt_tuning_init_state_dict_path {path!r} does not exist")
    if not path.endswith(".safetensors"):
        raise ValueError(
            f"MultitaskPromptTuningConfig: prompt_tuning_init_state_dict_path must be a .safetensors file, got {path!r}"
        )
    return load_file(path)


class MultitaskPromptEmbedding(PromptEmbedding):
    """``embedding`` (the shared prompt) plus the per-task factors ``prefix_task_cols`` / ``prefix_task_rows``."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        source_init = config.prompt_tuning_init in _SOURCE_INITS
        super().__init__(config.copy(prompt_tuning_init="RANDOM") if source_init else config, word_embeddings)
        rows, dim = config.total_virtual_tokens, int(config.token_dim)
        tasks, ranks = int(config.num_tasks), int(config.num_ranks)
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, _FACTOR_STD, size=(tasks, rows, ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(0.0, _FACTOR_STD, size=(tasks, ranks, dim)))
        if source_init and not config.inference_mode:
            self._init_from_source(config)

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        source = _read_source(str(config.prompt_tuning_init_state_dict_path))
        values = {"embedding.weight": source[PROMPT_EMBEDDINGS_KEY]}
        if config.prompt_tuning_init != "ONLY_SOURCE_SHARED":
            cols, rows = source[COLS_KEY], source[ROWS_KEY]
            if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = int(config.prompt_tuning_init_task or 0)
                if not 0 <= task < cols.shape[0]:
                    raise ValueError(
                        f"MultitaskPromptTuningConfig: prompt_tuning_init_task={task} but the source has "
                        f"{cols.shape[0]} tasks"
                    )
                cols, rows = cols[task : task + 1], rows[task : task + 1]
            values.update({COLS_KEY: cols, ROWS_KEY: rows})
        own = dict(self.named_parameters())
        for key, value in values.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"source prompt for a different adapter? {key}: source {tuple(value.shape)} vs {tuple(own[key].shape)}"
                )
            with torch.no_grad():
                own[key].copy_(value)

    # ------------------------------------------------------------------ prompts
    def task_prompts(self, task_ids: torch.Tensor) -> torch.Tensor:
        """``P * (cols[t] @ rows[t])`` for each ``t`` in ``task_ids``: ``(len(task_ids), rows, token_dim)``."""
        num_tasks = self.prefix_task_cols.shape[0]
        if int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks:
            raise ValueError(f"task_ids must lie in [0, {num_tasks}), got {task_ids.tolist()}")
        task_ids = task_ids.to(self.prefix_task_cols.device)
        modulation = torch.matmul(self.prefix_task_cols[task_ids], self.prefix_task_rows[task_ids])
        return self.embedding.weight.unsqueeze(0) * modulation

    def prompts(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("multitask prompt tuning needs task_ids (one task index per row) in forward/generate")
        if not isinstance(task_ids, torch.Tensor):
            task_ids = torch.as_tensor(task_ids)
        task_ids = task_ids.long().reshape(-1)
        if task_ids.shape[0] != batch_size:
            raise ValueError(f"task_ids has {task_ids.shape[0]} entries for a batch of {batch_size} rows")
        return self.task_prompts(task_ids)

    # ------------------------------------------------------------------ files
    def saved_state(self) -> dict[str, torch.Tensor]:
        """PEFT's checkpoint content: the shared prompt and both task factors (detached CPU copies)."""
        tensors = {
            PROMPT_EMBEDDINGS_KEY: self.embedding.weight,
            COLS_KEY: self.prefix_task_cols,
            ROWS_KEY: self.prefix_task_rows,
        }
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    def load_saved(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        missing = [k for k in (PROMPT_EMBEDDINGS_KEY, COLS_KEY, ROWS_KEY) if k not in state_dict]
        if missing:
            raise ValueError(f"multitask prompt checkpoint lacks {missing} (has {sorted(state_dict)[:5]})")
        targets = {
            PROMPT_EMBEDDINGS_KEY: self.embedding.weight,
            COLS_KEY: self.prefix_task_cols,
            ROWS_KEY: self.prefix_task_rows,
        }
        for key, target in targets.items():
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"adapter for a different base? {key}: saved {tuple(value.shape)} vs model {tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(value.to(device=target.device, dtype=target.dtype))
        return [k for k in state_dict if k not in targets]
