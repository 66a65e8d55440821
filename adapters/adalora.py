"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

Each adapted module learns an SVD-shaped update

    ``dW = P diag(E) Q * lora_alpha / (ranknum + 1e-5)``

with ``Q = lora_A`` (``(r, in)``, right singular vectors), ``E = lora_E`` (``(r, 1)``, singular
values) and ``P = lora_B`` (``(out, r)``, left singular vectors); ``ranknum`` is the initial rank
``init_r`` (fixed, never saved). Forward adds ``dropout(x) (Q * E)^T P^T`` times that scale.
``E`` starts at zero, ``P``/``Q`` at ``N(0, 0.02^2)``, so a fresh adapter changes nothing.

Training adds two things, both driven by the training loop (this library has no trainer):

* :func:`orthogonal_regularization` -- ``orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F)``
  over the adapted modules, added to the loss, keeping ``P`` and ``Q`` near-orthogonal so ``E``
  behaves like singular values;
* :func:`update_and_allocate` -- called every step after ``optimizer.step()`` and before
  ``zero_grad()``. A :class:`RankAllocator` keeps, per parameter entry, an EMA of the sensitivity
  ``|w * dL/dw|`` (``beta1``) and of its deviation (``beta2``); a triplet ``(P_:i, E_i, Q_i:)`` scores
  ``s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = EMA sensitivity * EMA uncertainty``. The
  total rank budget falls cubically from ``init_r * n`` after ``tinit`` steps to ``target_r * n`` at
  ``total_step - tfinal``; every ``deltaT`` steps the lowest-scoring triplets beyond the budget get
  ``E_i = 0``. From ``total_step - tfinal`` on the final pattern is frozen and re-applied each step.

The kept triplets are recorded in the config's ``rank_pattern`` (``{"<module path>.lora_E": [bool,
...]}``), and the saved tensors hold only those rows -- exactly as PEFT writes an AdaLoRA adapter:
keys ``base_model.model.<module path>.lora_A`` / ``lora_B`` / ``lora_E`` (no ``.weight``), and a
file with a ``rank_pattern`` loads into modules of the reduced ranks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, register_config
from .constraints import FieldRule, param
from .injection import adapter_layers
from .layer import AdapterLayer
from .layer_utils import (
    adapter_factory_kwargs,
    freeze_unless_active,
    is_conv1d,
    linear_features,
    refuse_quantized_merge,
    require_linear_like,
    sorted_list,
)

RANKNUM_EPS = 1e-5
_BIAS_CHOICES = ("none", "all", "lora_only")
# PEFT's AdaLoRA defaults per model type (facts, so that an unset config resolves as in PEFT)
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
# keys of PEFT's AdaLoraConfig (inherited from LoraConfig) that would change the model if set
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "use_dora": False,
    "lora_bias": False,
    "loftq_config": {},
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
}

GradGetter = Callable[[torch.Tensor], "torch.Tensor | None"]


def _pattern_key(key: str) -> str:
    """``"<module path>.lora_E"`` from a rank_pattern key that may still carry an adapter name."""
    head, sep, _ = key.rpartition(".lora_E")
    return head + sep if sep else key


@register_config
@dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA hyper-parameters with PEFT's names and defaults.

    Schedule: ``init_r`` (starting rank per module), ``target_r`` (average final rank), ``tinit``
    (warm-up steps at full budget), ``tfinal`` (final steps at the frozen pattern), ``deltaT`` (steps
    between re-allocations), ``total_step`` (required), ``beta1``/``beta2`` (EMA factors),
    ``orth_reg_weight``. The LoRA part: ``lora_alpha`` (the update is scaled by
    ``lora_alpha / init_r``), ``lora_dropout``, targeting fields, ``bias``, ``modules_to_save``,
    ``init_lora_weights`` (``False``: every factor ``N(0, 1)``, for tests). ``r`` exists for PEFT's
    file format only and is ignored (``init_r`` is the rank). ``rank_pattern`` is written by the
    allocator.
    """

    PEFT_TYPE: ClassVar[str] = "ADALORA"
    ADAPTER_PREFIX: ClassVar[str] = "lora_"

    FIELD_RULES: ClassVar[tuple[FieldRule, ...]] = (
        FieldRule("total_step", ("tinit", "tfinal"), lambda v, ref: None if v["tinit"] < v["total_step"] - v["tfinal"]
                  else f"must exceed {ref('tinit')} + {ref('tfinal')} ({v['tinit']} + {v['tfinal']}), "
                       "or there is no budgeting phase"),
    )

    init_r: int = param(12, gt=0)
    target_r: int = param(8, gt=0)
    tinit: int = param(0, ge=0)
    tfinal: int = param(0, ge=0)
    deltaT: int = param(1, gt=0)  # noqa: N815 - PEFT's field name
    beta1: float = param(0.85, gt=0.0, lt=1.0)
    beta2: float = param(0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = param(0.5, ge=0.0)
    total_step: int | None = param(None, gt=0)  # required here; the pipeline fills it from the stage
    rank_pattern: dict[str, list[bool]] | None = None
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = param(8, gt=0)
    lora_dropout: float = param(0.0, ge=0.0, lt=1.0)
    fan_in_fan_out: bool = False
    bias: str = param("none", choices=_BIAS_CHOICES)
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.total_step is None:
            raise ValueError("AdaLoraConfig: total_step must be a positive integer, got None")
        self.lora_dropout = float(self.lora_dropout)
        if not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"AdaLoraConfig: init_lora_weights must be true or false, got {self.init_lora_weights!r}")
        self.target_modules = sorted_list(self.target_modules)
        self.exclude_modules = sorted_list(self.exclude_modules)
        self.layers_to_transform = sorted_list(self.layers_to_transform)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("AdaLoraConfig: layers_to_transform needs target_modules as a list, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("AdaLoraConfig: layers_pattern only has an effect together with layers_to_transform")
        if self.rank_pattern is not None:
            pattern: dict[str, list[bool]] = {}
            for key, mask in dict(self.rank_pattern).items():
                if not isinstance(mask, (list, tuple)):
                    raise ValueError(f"AdaLoraConfig: rank_pattern[{key!r}] must be a list of booleans, got {mask!r}")
                pattern[_pattern_key(key)] = [bool(v) for v in mask]
            self.rank_pattern = pattern

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        for key, default in _UNSUPPORTED_IF_SET.items():
            value = data.get(key, default)
            if value not in (default, None, False, [], {}):
                raise ValueError(f"AdaLoraConfig: {key}={value!r} is not supported by this library")

    # ------------------------------------------------------------------ targets
    def find_target_modules(self, model: nn.Module) -> list[str]:
        """PEFT's AdaLoRA defaults fill an unset ``target_modules`` (recorded in the config)."""
        if not self.target_modules:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            if model_type not in DEFAULT_TARGET_MODULES:
                raise ValueError(
                    f"AdaLoraConfig: target_modules is not set and there is no default for model_type {model_type!r}; "
                    f"defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}"
                )
            self.target_modules = list(DEFAULT_TARGET_MODULES[model_type])
        return super().find_target_modules(model)

    def saved_mask(self, module_name: str) -> list[bool] | None:
        """The kept-triplet mask ``rank_pattern`` records for ``module_name`` (``None``: all kept)."""
        if not self.rank_pattern:
            return None
        return self.rank_pattern.get(f"{module_name}.lora_E")

    # ------------------------------------------------------------------ layer factory
    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        require_linear_like(target, module_name, "AdaLoRA")
        layer = AdaLoraLayer(target)
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        if not isinstance(layer, AdaLoraLayer):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not an AdaLoRA layer")
        self.fan_in_fan_out = layer.is_conv1d
        mask = self.saved_mask(module_name)
        # a file written after rank allocation holds only the kept triplets (PEFT resizes on load too)
        rank = self.init_r if mask is None else sum(mask)
        layer.add_adapter(
            adapter_name,
            r=rank,
            ranknum=float(self.init_r),
            lora_alpha=float(self.lora_alpha),
            dropout=float(self.lora_dropout),
            init=self.init_lora_weights,
        )

    def layer_class(self) -> type[AdapterLayer]:
        return AdaLoraLayer


class AdaLoraLayer(AdapterLayer):
    """SVD-form adapters around ``nn.Linear`` (bitsandbytes' quantized Linear included) or GPT-2 ``Conv1D``.

    ``rank_mask[name]`` (set by the allocator) marks the triplets still in the budget; masked
    triplets have ``E = 0`` and are left out of the saved tensors.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_E")
    other_param_names: ClassVar[tuple[str, ...]] = (
        "r",
        "ranknum",
        "lora_alpha",
        "scaling",
        "lora_dropout",
        "rank_mask",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.ranknum: dict[str, float] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_mask: dict[str, torch.Tensor] = {}
        self.is_conv1d = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)

    def add_adapter(
        self, adapter_name: str, *, r: int, ranknum: float, lora_alpha: float, dropout: float, init: bool
    ) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        if r < 0:
            raise ValueError(f"AdaLoRA rank must be >= 0, got {r}")
        factory = adapter_factory_kwargs(self.base_layer)
        lora_a = torch.empty(r, self.in_features, **factory)
        lora_e = torch.empty(r, 1, **factory)
        lora_b = torch.empty(self.out_features, r, **factory)
        if init:
            nn.init.zeros_(lora_e)
            nn.init.normal_(lora_a, mean=0.0, std=0.02)
            nn.init.normal_(lora_b, mean=0.0, std=0.02)
        else:
            for tensor in (lora_a, lora_e, lora_b):
                nn.init.normal_(tensor)
        self.lora_A[adapter_name] = nn.Parameter(lora_a)
        self.lora_E[adapter_name] = nn.Parameter(lora_e)
        self.lora_B[adapter_name] = nn.Parameter(lora_b)
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.r[adapter_name] = r
        self.ranknum[adapter_name] = ranknum
        self.lora_alpha[adapter_name] = lora_alpha
        # PEFT: lora_alpha, or the rank when lora_alpha is 0
        self.scaling[adapter_name] = lora_alpha if lora_alpha > 0 else float(r)
        freeze_unless_active(self, adapter_name, self.adapter_tensors(adapter_name).values())
        self._refresh()

    # ------------------------------------------------------------------ rank masks
    def apply_rank_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Keep only the triplets where ``mask`` is true: zero the others' singular values."""
        mask = mask.detach().to(torch.bool).flatten()
        if mask.numel() != self.r[adapter_name]:
            raise ValueError(f"rank mask of adapter {adapter_name!r} has {mask.numel()} entries, rank is {self.r[adapter_name]}")
        self.rank_mask[adapter_name] = mask.cpu()
        values = self.lora_E[adapter_name]
        with torch.no_grad():
            values.masked_fill_(~mask.to(values.device)[:, None], 0.0)

    def saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Only the kept triplets, as PEFT saves an allocated AdaLoRA adapter (copies when masked)."""
        tensors = self.adapter_tensors(adapter_name)
        mask = self.rank_mask.get(adapter_name)
        if mask is None or bool(mask.all()) or not tensors:
            return tensors
        keep = mask.to(tensors["lora_A"].device)
        return {
            "lora_A": tensors["lora_A"][keep],
            "lora_B": tensors["lora_B"][:, keep],
            "lora_E": tensors["lora_E"][keep],
        }

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.rank_mask.pop(adapter_name, None)

    # ------------------------------------------------------------------ weights
    def update_scale(self, adapter_name: str) -> float:
        """The factor on ``P diag(E) Q``: ``scaling / (ranknum + 1e-5)``."""
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + RANKNUM_EPS)

    def delta_oi(self, adapter_name: str) -> torch.Tensor:
        """``P diag(E) Q`` times its scale, as ``(out, in)``."""
        a, b, e = self.lora_A[adapter_name], self.lora_B[adapter_name], self.lora_E[adapter_name]
        return (b @ (a * e)) * self.update_scale(adapter_name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.delta_oi(adapter_name)
        return delta.T if self.is_conv1d else delta

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if any(n in self.adapter_names and n not in self.merged_adapters for n in names):
            refuse_quantized_merge(self.base_layer, "AdaLoRA")
        super().merge(names)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._grouped_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters:
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = x if x.dtype == a.dtype else x.to(a.dtype)
            h = self.lora_dropout[name](h)
            update = F.linear(F.linear(h, a * e), b) * self.update_scale(name)
            result = result + update.to(result.dtype)
        return result


# ---------------------------------------------------------------------- training-loop functions
def _adapter_model(model: nn.Module) -> nn.Module:
    """The :class:`~adapters.model.AdapterModel` inside DDP / DeepSpeed wrappers (``.module``)."""
    seen = 0
    while not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")) and hasattr(model, "module"):
        model = model.module  # type: ignore[assignment]
        seen += 1
        if seen > 8:
            break
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        raise TypeError(f"expected an AdapterModel (or a wrapper of one), got {type(model).__name__}")
    return model


def _resolve(model: nn.Module, adapter_name: str | None) -> tuple[nn.Module, str, AdaLoraConfig]:
    """``(adapted root, adapter name, config)`` for the given or active AdaLoRA adapter."""
    wrapped = _adapter_model(model)
    name = adapter_name or wrapped.active_adapter  # type: ignore[attr-defined]
    config = wrapped.peft_config.get(name)  # type: ignore[attr-defined]
    if config is None:
        raise ValueError(f"unknown adapter {name!r}; have {list(wrapped.peft_config)}")  # type: ignore[attr-defined]
    if not isinstance(config, AdaLoraConfig):
        raise ValueError(f"adapter {name!r} is a {type(config).__name__}, not an AdaLoRA adapter")
    return wrapped.get_base_model(), name, config  # type: ignore[attr-defined,operator]


def adalora_layers(root: nn.Module, adapter_name: str) -> Iterator[tuple[str, AdaLoraLayer]]:
    """Every AdaLoRA layer under ``root`` holding ``adapter_name``, with its module path."""
    for name, layer in adapter_layers(root):
        if isinstance(layer, AdaLoraLayer) and adapter_name in layer.lora_A:
            yield name, layer


def orthogonal_regularization(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """``orth_reg_weight * mean over modules and factors of ||Q Q^T - I||_F and ||P^T P - I||_F``.

    Add it to the task loss each step (``loss = out.loss + orthogonal_regularization(model)``);
    PEFT adds the same term inside its forward when labels are given. ``adapter_name`` defaults to
    the active adapter.
    """
    root, name, config = _resolve(model, adapter_name)
    terms: list[torch.Tensor] = []
    for _, layer in adalora_layers(root, name):
        a, b = layer.lora_A[name], layer.lora_B[name]
        for gram in (a @ a.T, b.T @ b):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye, ord="fro"))
    if not terms:
        device = next((p.device for p in root.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return float(config.orth_reg_weight) * torch.stack(terms).mean()


class RankAllocator:
    """AdaLoRA's budget schedule and importance-based triplet masking for one adapter.

    Usually reached through :func:`update_and_allocate`, which keeps one allocator per model and
    adapter. ``grad_getter`` maps a parameter to its full gradient when it is not in ``.grad``
    (DeepSpeed keeps gradients in its own buffers: pass ``deepspeed.utils.safe_get_full_grad``).
    """

    def __init__(
        self,
        root: nn.Module,
        config: AdaLoraConfig,
        adapter_name: str,
        grad_getter: GradGetter | None = None,
    ) -> None:
        self.root = root
        self.config = config
        self.adapter_name = adapter_name
        self.grad_getter = grad_getter
        if config.inference_mode:
            raise ValueError(
                f"AdaLoRA adapter {adapter_name!r} is in inference mode (not trainable); rank allocation "
                "needs its gradients -- load it with is_trainable=True"
            )
        self.layers = sorted(adalora_layers(root, adapter_name), key=lambda item: item[0])
        if not self.layers:
            raise ValueError(f"no AdaLoRA layer holds adapter {adapter_name!r}")
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in self.layers)
        self.target_bgt = int(config.target_r) * len(self.layers)
        if self.target_bgt > self.init_bgt:
            raise ValueError(
                f"AdaLoraConfig: target_r ({config.target_r}) exceeds the current average rank "
                f"({self.init_bgt / len(self.layers):g}); the budget can only shrink"
            )
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget the importance statistics (done once the final pattern is fixed)."""
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(total rank budget, whether to re-mask now)`` at ``step`` (PEFT's cubic schedule)."""
        c = self.config
        assert c.total_step is not None
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * remaining**3 + self.target_bgt)
        return budget, step % c.deltaT == 0

    def _params(self) -> Iterator[tuple[tuple[str, str], nn.Parameter]]:
        for module_name, layer in self.layers:
            for attr in ("lora_A", "lora_B", "lora_E"):
                yield (module_name, attr), getattr(layer, attr)[self.adapter_name]

    def update_ipt(self) -> None:
        """Fold this step's sensitivities ``|w * grad|`` into the EMAs (parameters without a gradient are skipped)."""
        beta1, beta2 = float(self.config.beta1), float(self.config.beta2)
        with torch.no_grad():
            for key, weight in self._params():
                grad = self.grad_getter(weight) if self.grad_getter is not None else weight.grad
                if grad is None:
                    continue
                ipt = (weight * grad.to(weight.dtype)).abs()
                avg = self.exp_avg_ipt.get(key)
                unc = self.exp_avg_unc.get(key)
                if avg is None or unc is None or avg.shape != ipt.shape:
                    avg, unc = torch.zeros_like(ipt), torch.zeros_like(ipt)
                avg = beta1 * avg + (1 - beta1) * ipt
                unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()
                self.exp_avg_ipt[key], self.exp_avg_unc[key] = avg, unc

    def _score(self, key: tuple[str, str], like: torch.Tensor) -> torch.Tensor:
        avg = self.exp_avg_ipt.get(key)
        unc = self.exp_avg_unc.get(key)
        if avg is None or unc is None:
            return torch.zeros_like(like, dtype=torch.float32)
        return (avg * unc).float()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module, the importance of each triplet: ``s(E_i) + mean_j s(Q_ij) + mean_j s(P_ji)``."""
        scores: dict[str, torch.Tensor] = {}
        name = self.adapter_name
        for module_name, layer in self.layers:
            a, b, e = layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
            score_e = self._score((module_name, "lora_E"), e).view(-1)
            score_a = self._score((module_name, "lora_A"), a).mean(dim=1)
            score_b = self._score((module_name, "lora_B"), b).mean(dim=0)
            scores[module_name] = (score_e + (score_a + score_b)).cpu()
        return scores

    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero ``E`` of every triplet scoring at or below the ``(init_bgt - budget)``-th lowest score;
        return the new rank pattern (``{"<module path>.lora_E": [kept, ...]}``)."""
        scores = self.triplet_scores()
        n_masked = self.init_bgt - budget
        everything = torch.cat(list(scores.values())) if scores else torch.zeros(0)
        threshold: float | None = None
        if n_masked > 0 and everything.numel() > 0:
            threshold = float(torch.kthvalue(everything, k=min(n_masked, everything.numel())).values)
        pattern: dict[str, list[bool]] = {}
        for module_name, layer in self.layers:
            score = scores[module_name]
            keep = torch.ones_like(score, dtype=torch.bool) if threshold is None else score > threshold
            layer.apply_rank_mask(self.adapter_name, keep)
            pattern[f"{module_name}.lora_E"] = keep.tolist()
        return pattern

    def mask_using_rank_pattern(self, rank_pattern: dict[str, list[bool]]) -> None:
        """Re-apply a fixed pattern (the final phase: masked singular values must stay zero)."""
        for module_name, layer in self.layers:
            mask = rank_pattern.get(f"{module_name}.lora_E")
            if mask is not None and len(mask) == layer.r[self.adapter_name]:
                layer.apply_rank_mask(self.adapter_name, torch.tensor(mask, dtype=torch.bool))

    def step(self, global_step: int) -> int:
        """One training step's worth of allocation (see :func:`update_and_allocate`); returns the budget."""
        c = self.config
        assert c.total_step is not None
        final_step = c.total_step - c.tfinal
        if global_step < final_step:
            self.update_ipt()
            budget, mask_now = self.budget_schedule(global_step)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(budget)
            return budget
        if global_step == final_step:
            c.rank_pattern = self.mask_to_budget(self.target_bgt)
            self.reset_ipt()
            return self.target_bgt
        if c.rank_pattern:
            self.mask_using_rank_pattern(c.rank_pattern)
        return self.target_bgt


_ALLOCATORS: weakref.WeakKeyDictionary[nn.Module, dict[str, RankAllocator]] = weakref.WeakKeyDictionary()


def get_rank_allocator(
    model: nn.Module, adapter_name: str | None = None, grad_getter: GradGetter | None = None
) -> RankAllocator:
    """The allocator of ``model``'s (active) AdaLoRA adapter, created on first use."""
    root, name, config = _resolve(model, adapter_name)
    wrapped = _adapter_model(model)
    per_model = _ALLOCATORS.setdefault(wrapped, {})
    allocator = per_model.get(name)
    if allocator is None or allocator.root is not root or allocator.config is not config:
        allocator = RankAllocator(root, config, name, grad_getter=grad_getter)
        per_model[name] = allocator
    elif grad_getter is not None:
        allocator.grad_getter = grad_getter
    return allocator


def update_and_allocate(
    model: nn.Module,
    global_step: int,
    adapter_name: str | None = None,
    grad_getter: GradGetter | None = None,
) -> int:
    """Advance AdaLoRA's rank allocation by one training step; return the current rank budget.

    Call it every step after ``optimizer.step()`` and before ``optimizer.zero_grad()`` (it reads the
    gradients). Before ``total_step - tfinal`` it updates the importance EMAs and, every ``deltaT``
    steps after ``tinit``, masks the triplets beyond the scheduled budget; at ``total_step - tfinal``
    it fixes the final pattern (``target_r`` per module on average) in ``config.rank_pattern``; after
    that it re-applies that pattern. ``model`` is the :class:`~adapters.model.AdapterModel` (a DDP or
    DeepSpeed wrapper around it is unwrapped); ``adapter_name`` defaults to the active adapter.
    """
    return get_rank_allocator(model, adapter_name, grad_getter).step(int(global_step))
