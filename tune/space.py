"""Conditional search spaces: which swept fields apply to a trial, and the space as Tune or Optuna see it.

A swept field applies to a trial only when it makes sense there:

* ``adapter.<field>`` applies when the trial's adapter method has that field. The methods and
  their fields are read from ``pipeline.config``'s specs (built from the adapter-method
  registry), so ``adapter.r`` and
  ``adapter.lora_alpha`` follow the LoRA family and ``adapter.num_virtual_tokens`` the
  virtual-token methods, including methods added to the union later;
* a spec with ``when: {field: [values]}`` applies when those fields (swept or from the base
  config) hold one of the values; the first applicable spec of a field wins.

Grids are expanded over applicable fields only, so ``method x r`` never runs the same prompt
tuning trial once per rank. Tune (grid/random) gets that grid as one ``grid_search`` over point
indices plus its own samplers for the drawn fields; Optuna gets a define-by-run function that
asks only for the fields that apply. Either way a trial's sampled config goes through
``resolve`` to the ``{dotted field: value}`` it actually runs with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ray import tune

from raypeft.pipeline.config import ADAPTER_SPECS, RunConfig
from raypeft.tune.schema import ParamSpec, SweepError

METHOD_KEY = "adapter.method"
POINT_KEY = "grid_point"  # the Tune config entry holding the index of a trial's grid point
_SCALARS = (str, int, float, bool, type(None))


def adapter_methods() -> dict[str, frozenset[str]]:
    """``{method: fields of its spec}`` for every name ``adapter.method`` accepts (aliases included)."""
    return {method: frozenset(spec.model_fields) for method, spec in ADAPTER_SPECS.items()}


def adapter_field(key: str) -> str | None:
    """``adapter.r`` -> ``r``; None for keys outside the adapter block and for the method itself."""
    if not key.startswith("adapter.") or key == METHOD_KEY:
        return None
    return key.split(".")[1]


_MISSING = object()


def lookup(data: Any, key: str, default: Any = None) -> Any:
    """The value at a dotted key of a nested mapping (``default`` where the path does not exist)."""
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def plain(value: Any) -> Any:
    """Numpy scalars (what Tune's samplers return) as Python values, so configs stay YAML-clean."""
    return value.item() if hasattr(value, "item") and not isinstance(value, _SCALARS + (list, dict)) else value


@dataclass
class Alternative:
    kind: str
    values: list[Any]
    when: dict[str, list[Any]] = field(default_factory=dict)

    def representatives(self) -> list[Any]:
        """Values that stand for the whole domain when checking configs before Ray starts."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        return [low, high - 1] if self.kind == "randint" else [low, high]


@dataclass
class Param:
    key: str
    alternatives: list[Alternative]

    def name(self, index: int) -> str:
        """The name a sampler uses for alternative ``index`` (``key``, ``key#1``, ...)."""
        return self.key if index == 0 else f"{self.key}#{index}"


@dataclass
class SearchSpace:
    """An ordered, validated search space; picklable, so trial actors can resolve their configs."""

    params: list[Param]
    base: dict[str, Any]       # the base run config as plain data, for conditions on unswept fields
    methods: dict[str, frozenset[str]]

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, specs: dict[str, list[ParamSpec]], base_cfg: RunConfig, search_alg: str) -> "SearchSpace":
        """Check the space against the base config and the search algorithm; raise ``SweepError``."""
        methods = adapter_methods()
        base = base_cfg.model_dump(mode="json", by_alias=True)
        params = [Param(key, [Alternative(s.kind, list(s.values), dict(s.when or {})) for s in alts])
                  for key, alts in specs.items()]
        # Fields without conditions first (the method before anything), so conditions only
        # ever read fields that are already decided.
        params.sort(key=lambda p: (p.key != METHOD_KEY, any(a.when for a in p.alternatives)))
        space = cls(params, base, methods)
        space._check(search_alg)
        return space

    def _check(self, search_alg: str) -> None:
        swept = {p.key: p for p in self.params}
        method = swept.get(METHOD_KEY)
        if method is not None:
            for alt in method.alternatives:
                if alt.when:
                    raise SweepError(f"search_space.{METHOD_KEY}: 'when' is not allowed on the method "
                                     "(other fields depend on it)")
                for value in alt.values if alt.kind in ("grid", "choice") else []:
                    if value not in self.methods:
                        raise SweepError(f"search_space.{METHOD_KEY}: unknown method {value!r}; expected one of "
                                         f"{', '.join(self.methods)}")
                if alt.kind not in ("grid", "choice"):
                    raise SweepError(f"search_space.{METHOD_KEY}: a method is picked with grid or choice, "
                                     f"not {alt.kind}")
            if self.base["adapter"].get("init_from"):
                raise SweepError(f"search_space.{METHOD_KEY}: the base config continues adapter.init_from="
                                 f"{self.base['adapter']['init_from']!r}, so every trial would load that adapter's "
                                 "method; set config adapter.init_from=null to sweep methods")
        for p in self.params:
            where = f"search_space.{p.key}"
            for alt in p.alternatives:
                for key in alt.when:
                    if key == p.key:
                        raise SweepError(f"{where}.when.{key}: a field cannot depend on itself")
                    if key in swept and any(a.when for a in swept[key].alternatives):
                        raise SweepError(f"{where}.when.{key}: {key} has conditions of its own; a condition "
                                         "may only read fields that have none")
                    if key not in swept and lookup(self.base, key, _MISSING) is _MISSING:
                        raise SweepError(f"{where}.when.{key}: neither a swept field nor a field of the base config")
                if search_alg == "grid" and alt.kind != "grid":
                    raise SweepError(f"{where}: search_alg grid enumerates values; '{alt.kind}' needs "
                                     "search_alg random or optuna")
                if search_alg == "optuna" and alt.kind in ("grid", "choice"):
                    bad = [v for v in alt.values if not isinstance(v, _SCALARS)]
                    if bad:
                        raise SweepError(f"{where}: optuna takes scalar choices only, got {bad[0]!r}")
                if search_alg != "optuna" and alt.kind == "grid":
                    for dep in self._depends_on(p, alt):
                        kinds = {a.kind for a in swept[dep].alternatives} if dep in swept else {"grid"}
                        if kinds != {"grid"}:
                            raise SweepError(f"{where}: a grid cannot depend on {dep}, which is drawn at random "
                                             f"({'/'.join(sorted(kinds - {'grid'}))}); make {dep} a grid too")

    def _depends_on(self, param: Param, alt: Alternative) -> list[str]:
        deps = list(alt.when)
        if adapter_field(param.key) is not None:
            deps.append(METHOD_KEY)
        return deps

    # ------------------------------------------------------------------ conditions
    def value(self, key: str, assignment: dict[str, Any]) -> Any:
        return assignment[key] if key in assignment else lookup(self.base, key)

    def active(self, param: Param, assignment: dict[str, Any]) -> int | None:
        """The index of the first alternative of ``param`` that applies, or None."""
        for i, alt in enumerate(param.alternatives):
            if any(self.value(k, assignment) not in allowed for k, allowed in alt.when.items()):
                continue
            fld = adapter_field(param.key)
            if fld is not None:
                method = self.value(METHOD_KEY, assignment)
                if fld not in self.methods.get(method, frozenset()):
                    continue
            return i
        return None

    def methods_in_play(self) -> list[str]:
        method = next((p for p in self.params if p.key == METHOD_KEY), None)
        if method is None:
            return [self.base["adapter"]["method"]]
        return list(dict.fromkeys(v for a in method.alternatives for v in a.values))

    # ------------------------------------------------------------------ enumeration
    def _expand(self, kinds: Iterable[str], start: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        kinds = set(kinds)
        points: list[dict[str, Any]] = start if start is not None else [{}]
        for param in self.params:
            grown: list[dict[str, Any]] = []
            for point in points:
                i = self.active(param, point)
                if i is None or param.alternatives[i].kind not in kinds:
                    grown.append(point)
                else:
                    grown.extend({**point, param.key: v} for v in param.alternatives[i].values)
            points = grown
        return points

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid fields that apply together (no duplicates)."""
        return self._expand({"grid"})

    def check_assignments(self, limit: int = 2000) -> list[dict[str, Any]]:
        """Assignments that together touch every value a trial may get (grids and choices in full,
        ranges at both ends), for validating trial configs on the driver."""
        points = self._expand({"grid", "choice"})
        out: list[dict[str, Any]] = []
        for point in points:
            out.append(point)
            for param in self.params:
                i = self.active(param, point)
                if i is None or param.key in point:
                    continue
                out.extend({**point, param.key: v} for v in param.alternatives[i].representatives())
            if len(out) >= limit:
                break
        return out[:limit]

    # ------------------------------------------------------------------ samplers
    def tune_param_space(self, points: list[dict[str, Any]]) -> dict[str, Any]:
        """Tune's ``param_space`` for grid/random search: grid point indices plus the drawn fields."""
        space: dict[str, Any] = {}
        if any(points):
            space[POINT_KEY] = tune.grid_search(list(range(len(points))))
        for param in self.params:
            for i, alt in enumerate(param.alternatives):
                if alt.kind == "choice":
                    space[param.name(i)] = tune.choice(list(alt.values))
                elif alt.kind == "uniform":
                    space[param.name(i)] = tune.uniform(*alt.values)
                elif alt.kind == "loguniform":
                    space[param.name(i)] = tune.loguniform(*alt.values)
                elif alt.kind == "randint":
                    space[param.name(i)] = tune.randint(*alt.values)
        return space

    def optuna_define(self) -> "OptunaDefine":
        """An Optuna define-by-run function: only the fields that apply are suggested."""
        return OptunaDefine(self)

    def resolve(self, config: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
        """A trial's sampled config as ``{dotted field: value}``, inapplicable fields dropped."""
        assignment: dict[str, Any] = dict(points[config[POINT_KEY]]) if POINT_KEY in config else {}
        for param in self.params:
            if param.key in assignment:
                continue
            i = self.active(param, assignment)
            if i is not None and param.name(i) in config:
                assignment[param.key] = plain(config[param.name(i)])
        return assignment

    def trial_count(self, search_alg: str, num_samples: int) -> int:
        if search_alg == "optuna":
            return num_samples
        return len(self.grid_points()) * num_samples


class OptunaDefine:
    """Optuna's define-by-run callable over a ``SearchSpace`` (a module-level class, because
    Tune checkpoints the searcher, and with it this callable, with the standard pickle)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> None:
        assignment: dict[str, Any] = {}
        for param in self.space.params:
            i = self.space.active(param, assignment)
            if i is None:
                continue
            alt, name = param.alternatives[i], param.name(i)
            if alt.kind in ("grid", "choice"):
                assignment[param.key] = trial.suggest_categorical(name, list(alt.values))
            elif alt.kind == "randint":
                assignment[param.key] = trial.suggest_int(name, alt.values[0], alt.values[1] - 1)
            else:
                assignment[param.key] = trial.suggest_float(name, *alt.values, log=alt.kind == "loguniform")
        return None


def describe(params: dict[str, Any]) -> str:
    """A short trial label: ``lora r=4 lora_alpha=8 learning_rate=0.002``."""
    parts = []
    for key, value in params.items():
        shown = f"{value:.3g}" if isinstance(value, float) and not math.isnan(value) else str(value)
        parts.append(shown if key == METHOD_KEY else f"{key.rsplit('.', 1)[-1]}={shown}")
    return " ".join(parts)
