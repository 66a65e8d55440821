"""Roles: named adapters over one shared base model, switched in place.

PPO needs four models -- the policy being trained, a frozen reference, a reward model and a
critic. Loading the base four times would cost four copies of its weights; here the base is
loaded once per worker and each role is an adapter on it (one ``AdapterModel`` holding several
named adapters), plus, for the scalar roles, a small value head. Switching role is
``set_adapter`` (or ``disable_adapter`` for a reference that is the bare base): no weight is
loaded, moved or copied. The reward and DPO stages use the same machinery with fewer roles.

Value heads. A reward model or critic is an adapter plus ``nn.Linear(hidden_size, 1)`` applied
to the base's final hidden state (at the last non-padding token for a reward, at every token
for a critic). The head is saved next to the adapter files as ``value_head.safetensors`` with
two tensors, ``weight`` ``[1, hidden_size]`` and ``bias`` ``[1]``; the adapter folder itself
stays a plain PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that any
PEFT loader accepts, and raypeft loads the head back from the extra file. (PEFT users attach
such a head through ``modules_to_save`` on a sequence-classification model; a causal-LM base has
no module to save, hence the separate file.)

Trainable roles keep ``requires_grad`` across switches: ``AdapterModel.set_adapter`` freezes
every adapter but the active one, so each switch re-enables the parameters of all trainable
roles, which lets one backward pass reach, e.g., both the policy and the critic.

One engine. ``Roles`` is the module a training backend wraps (``pipeline.backends``), and its
``forward`` is the one entry point for role outputs: ``roles(input_ids, attention_mask,
requests=(("logits", "policy"), ("values", "critic")))``. ``logits`` / ``values`` / ``scores``
go through :meth:`attach_entry`'s callable (the DeepSpeed engine once one wraps the roles), so
that every forward whose output reaches a loss passes through the engine: DeepSpeed prepares
its ZeRO gradient reduction from hooks the engine puts on forward outputs, and a loss built
from two roles (PPO's policy and critic) must come from one engine call.

Packed batches (``data.packing`` in the pair stages) pass ``position_ids`` and no attention
mask: the model then reads the sequence boundaries off the restarting positions
(``pipeline.data.packing``).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raypeft.adapters import AdapterConfig, AdapterModel, get_adapter_model
from raypeft.adapters.serialization import load_adapter_weights, save_adapter_weights
from raypeft.pipeline.lm_head_loss import label_terms
from raypeft.pipeline.rl_math import last_token_index

VALUE_HEAD_FILE = "value_head.safetensors"
ROLES_DIR = "roles"

HeadInit = Literal["file", "zero"]
OutputKind = Literal["logits", "values", "scores", "label_logprobs"]
Request = tuple[OutputKind, str]  # (what, role)


class ValueHead(nn.Linear):
    """``hidden_size -> 1``, zero-initialised so a fresh head scores every sequence 0."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__(hidden_size, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1)


def has_value_head(folder: str | Path) -> bool:
    return (Path(folder) / VALUE_HEAD_FILE).is_file()


def save_value_head(head: ValueHead, folder: str | Path) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().contiguous().cpu(),
               "bias": head.bias.detach().float().contiguous().cpu()},
              str(Path(folder) / VALUE_HEAD_FILE), metadata={"format": "pt", "raypeft": "value_head"})


def load_value_head_into(head: ValueHead, folder: str | Path) -> None:
    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {VALUE_HEAD_FILE}: not a reward model or critic adapter "
                                "(the output of a reward stage has one)")
    tensors = load_file(str(path))
    if tuple(tensors.get("weight", torch.empty(0)).shape) != tuple(head.weight.shape):
        got = tuple(tensors["weight"].shape) if "weight" in tensors else "no 'weight'"
        raise ValueError(f"{path}: value head weight has shape {got}, expected {tuple(head.weight.shape)} "
                         "(was it trained on another base model?)")
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])


class Roles(nn.Module):
    """One base model carrying every role of a stage as a named adapter.

    Build with :meth:`add` (an adapter from a folder or a fresh one from a config, trainable or
    frozen, with or without a value head) and :meth:`add_base` (a role served by the bare base
    with adapters disabled). Run a role inside ``with roles.use(name):``.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.model: AdapterModel | None = None
        self.heads = nn.ModuleDict()
        self._pending_base = [base]  # a list, so nn.Module does not register it twice
        self._base_param_ids = frozenset(id(p) for p in base.parameters())
        self._adapter_roles: dict[str, bool] = {}  # role -> trainable
        self._base_roles: set[str] = set()
        self._trainable: dict[str, list[nn.Parameter]] = {}
        self.primary: str | None = None  # the role a checkpoint's ``adapter/`` folder holds
        # The engine that wraps this module, if any, in a list so that nn.Module does not register
        # it as a child of what it wraps (empty: role outputs come from this module's own call).
        self._entry: list[Callable[..., tuple[torch.Tensor, ...]]] = []

    # ------------------------------------------------------------------ building
    @property
    def roles(self) -> list[str]:
        return [*self._adapter_roles, *self._base_roles]

    def _base_module(self) -> nn.Module:
        return self.model.get_base_model() if self.model is not None else self._pending_base[0]

    def hidden_size(self) -> int:
        config = self._base_module().config
        size = next((getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if getattr(config, k, None)),
                    None)
        if size is None:
            raise ValueError("the base model's config names no hidden size (hidden_size / n_embd / d_model)")
        return int(size)

    def add(self, role: str, source: str | Path | AdapterConfig, *, trainable: bool,
            value_head: HeadInit | None = None, head_from: str | Path | None = None) -> None:
        """Add ``role``: the adapter saved in folder ``source``, or a fresh one from config ``source``.

        ``value_head="file"`` loads the head from ``head_from`` (default ``source``);
        ``"zero"`` starts a zero head. A trainable role's adapter and head go to the optimiser.
        """
        if role in self.roles:
            raise ValueError(f"role {role!r} already exists")
        if isinstance(source, AdapterConfig):
            if self.model is None:
                self.model = get_adapter_model(self._pending_base.pop(), source, adapter_name=role)
            else:
                self.model.add_adapter(role, source)
        else:
            if self.model is None:
                self.model = AdapterModel.from_pretrained(self._pending_base.pop(), str(source), adapter_name=role,
                                                          is_trainable=trainable)
            else:
                self.model.load_adapter(str(source), role, is_trainable=trainable)
        if not trainable:
            self.model.peft_config[role].inference_mode = True
        self._adapter_roles[role] = trainable
        self.model.set_adapter(role)
        own = [p for p in self.model.parameters() if p.requires_grad] if trainable else []
        if value_head is not None:
            device = next(self._base_module().parameters()).device
            head = ValueHead(self.hidden_size()).to(device)
            if value_head == "file":
                load_value_head_into(head, head_from if head_from is not None else source)
            head.requires_grad_(trainable)
            self.heads[role] = head
            if trainable:
                own += list(head.parameters())
        if trainable:
            if not own:
                raise RuntimeError(f"role {role!r} is trainable but its adapter has no trainable parameters")
            self._trainable[role] = own
            self.primary = self.primary or role
        self._restore_trainable()

    def add_base(self, role: str) -> None:
        """A role served by the base model alone (every adapter disabled): the usual reference."""
        if role in self.roles:
            raise ValueError(f"role {role!r} already exists")
        self._base_roles.add(role)

    def _restore_trainable(self) -> None:
        for params in self._trainable.values():
            for p in params:
                p.requires_grad_(True)

    def trainable_parameters(self, role: str | None = None) -> list[nn.Parameter]:
        """The optimiser's parameters: every trainable role's (adapter and head), or one role's."""
        if role is not None:
            return list(self._trainable.get(role, []))
        return [p for params in self._trainable.values() for p in params]

    def is_base(self, role: str) -> bool:
        return role in self._base_roles

    @contextmanager
    def use(self, role: str) -> Iterator[AdapterModel]:
        """Run the block with ``role`` active; yields the shared ``AdapterModel``."""
        if self.model is None:
            raise RuntimeError("no adapter role has been added")
        if role in self._base_roles:
            with self.model.disable_adapter():
                yield self.model
            return
        if role not in self._adapter_roles:
            raise ValueError(f"unknown role {role!r}; have {self.roles}")
        if self.model.active_adapter != role:
            self.model.set_adapter(role)
            self._restore_trainable()
        yield self.model

    # ------------------------------------------------------------------ forward helpers
    def attach_entry(self, entry: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        """Compute role outputs through ``entry`` (the training engine wrapping this module)."""
        self._entry[:] = [] if entry is self else [entry]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                requests: tuple[Request, ...], position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
        """Each requested ``(kind, role)`` output for one batch, in order (kinds: logits, values,
        scores, label_logprobs, and label_logprobs_entropy, which adds two outputs: the
        log-probabilities and the entropies; both label kinds divide the logits by ``temperature``)."""
        outputs: list[torch.Tensor] = []
        for kind, role in requests:
            if kind == "logits":
                outputs.append(self._logits(role, input_ids, attention_mask, position_ids))
            elif kind == "values":
                outputs.append(self._values(role, input_ids, attention_mask, position_ids))
            elif kind in ("label_logprobs", "label_logprobs_entropy"):
                logp, entropy = self._label_terms(role, input_ids, attention_mask, position_ids, labels, temperature,
                                                  with_entropy=kind == "label_logprobs_entropy")
                outputs.extend((logp,) if entropy is None else (logp, entropy))
            elif kind == "scores":
                outputs.append(self._scores(role, input_ids, attention_mask))
            else:
                raise ValueError(f"unknown role output {kind!r}; expected logits, values, scores, label_logprobs "
                                 "or label_logprobs_entropy")
        return tuple(outputs)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            *requests: Request, position_ids: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, temperature: float | None = None) -> tuple[torch.Tensor, ...]:
        """Several role outputs from one call of the entry (one engine forward, one backward hook)."""
        entry = self._entry[0] if self._entry else self
        extra = {k: v for k, v in (("position_ids", position_ids), ("labels", labels), ("temperature", temperature))
                 if v is not None}
        return entry(input_ids, attention_mask, requests=tuple(requests), **extra)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, hidden: bool,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = _model_inputs(input_ids, attention_mask, position_ids)
        if hidden:
            kwargs["output_hidden_states"] = True
            if _accepts(self._base_module(), "logits_to_keep"):
                kwargs["logits_to_keep"] = 1  # the value head needs no vocabulary projection
        out = self.model(**kwargs)
        n = input_ids.shape[1]
        # Virtual-token adapters prepend positions: keep the ones aligned with input_ids.
        if hidden:
            return out.hidden_states[-1][:, -n:]
        return out.logits[:, -n:]

    def logits(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[B, L, V]`` of ``role`` (right-padded inputs, or packed ones with
        ``position_ids`` and no mask)."""
        return self.run(input_ids, attention_mask, ("logits", role), position_ids=position_ids)[0]

    def values(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The value head of ``role`` at every position, ``[B, L]``."""
        return self.run(input_ids, attention_mask, ("values", role), position_ids=position_ids)[0]

    def label_logprobs(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L-1]`` float32 log-probabilities of the labelled next tokens under ``role`` (0 where
        ``labels[:, 1:]`` is -100), without the full-vocabulary logits (``pipeline.lm_head_loss``)."""
        return self.run(input_ids, attention_mask, ("label_logprobs", role), position_ids=position_ids,
                        labels=labels)[0]

    def scores(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One scalar per row: the value head at the last non-padding token, ``[B]``."""
        return self.run(input_ids, attention_mask, ("scores", role))[0]

    def _logits(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        with self.use(role):
            return self._forward(input_ids, attention_mask, hidden=False, position_ids=position_ids)

    def _values(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if role not in self.heads:
            raise ValueError(f"role {role!r} has no value head")
        with self.use(role):
            return self.heads[role](self._forward(input_ids, attention_mask, hidden=True, position_ids=position_ids))

    def _label_terms(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None, labels: torch.Tensor | None, temperature: float, *,
                     with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if labels is None:
            raise ValueError("label_logprobs needs the labels")
        with self.use(role):
            return label_terms(self.model, _model_inputs(input_ids, attention_mask, position_ids), labels,
                               temperature=temperature, with_entropy=with_entropy)

    def _scores(self, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if role not in self.heads:
            raise ValueError(f"role {role!r} has no value head")
        with self.use(role):
            hidden = self._forward(input_ids, attention_mask, hidden=True)
            last = last_token_index(attention_mask)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.heads[role](hidden[rows, last])

    # ------------------------------------------------------------------ files
    def save(self, role: str, folder: str | Path) -> None:
        """Write ``role`` as a PEFT adapter folder (its head as ``value_head.safetensors``)."""
        folder = Path(folder)
        weights = self.model.adapter_state_dict(role)
        save_adapter_weights(weights, folder)
        config = self.model.peft_config[role].copy(inference_mode=True)
        base_name = getattr(self._base_module(), "name_or_path", None)
        if config.base_model_name_or_path is None and isinstance(base_name, str):
            config.base_model_name_or_path = base_name
        config.save_pretrained(folder)
        if role in self.heads:
            save_value_head(self.heads[role], folder)

    def load_weights(self, role: str, folder: str | Path) -> None:
        """Copy saved weights (adapter and head) into the existing ``role``."""
        self.model.load_adapter_state_dict(load_adapter_weights(os.fspath(folder)), role)
        if role in self.heads:
            load_value_head_into(self.heads[role], folder)

    def trainable_roles(self) -> list[str]:
        return [r for r, t in self._adapter_roles.items() if t]

    def save_trainables(self, folder: Path, adapter_dir: str) -> None:
        """Checkpoint layout: the primary role in ``folder/adapter_dir``, others in ``folder/roles/<role>``."""
        for role in self.trainable_roles():
            self.save(role, folder / adapter_dir if role == self.primary else folder / ROLES_DIR / role)

    def load_trainables(self, folder: Path, adapter_dir: str) -> None:
        for role in self.trainable_roles():
            self.load_weights(role, folder / adapter_dir if role == self.primary else folder / ROLES_DIR / role)

    # ------------------------------------------------------------------ accounting
    def is_role_parameter(self, name: str) -> bool:
        """Whether parameter ``name`` (of this module) belongs to a role's adapter or head."""
        return name.startswith("heads.") or any(f".{role}." in name for role in self._adapter_roles)

    def parameter_census(self) -> dict[str, int]:
        """Counts that show the base is held once.

        ``base_params``: distinct base parameters reachable from this module (all of them, or
        ``base_missing`` says how many are gone); ``other_params``: parameters that are neither
        base nor role (a copied layer would land here); element counts of base and role weights.
        """
        base_found: set[int] = set()
        census = {"base_numel": 0, "role_numel": 0, "other_params": 0}
        for name, p in self.named_parameters():
            if id(p) in self._base_param_ids:
                if id(p) not in base_found:
                    census["base_numel"] += p.numel()
                base_found.add(id(p))
            elif self.is_role_parameter(name):
                census["role_numel"] += p.numel()
            else:
                census["other_params"] += 1
        census["base_params"] = len(base_found)
        census["base_missing"] = len(self._base_param_ids) - len(base_found)
        return census


def _model_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> dict:
    """The model's keyword arguments for one batch; a packed one (``position_ids``) runs without a
    cache, or transformers would not read the sequence boundaries off the restarting positions."""
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs.update(position_ids=position_ids, use_cache=False)
    return inputs


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
