"""Conditional search spaces: applicable fields, duplicate-free grids, samplers, trial configs (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypeft.pipeline.config import load_config, parse_config
from raypeft.tune.schema import SweepError, parse_sweep
from raypeft.tune.space import METHOD_KEY, POINT_KEY, SearchSpace, adapter_methods, describe
from raypeft.tune.trials import trial_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(REPO / "configs" / "quickstart.yaml", ["stages=[sft]"])


def _space(search_space: dict, base_cfg, search_alg: str = "grid") -> SearchSpace:
    sweep = parse_sweep({"base_config": "x.yaml", "search_space": search_space, "search_alg": search_alg})
    return SearchSpace.build(sweep.search_space, base_cfg, search_alg)


def test_methods_and_their_fields_come_from_the_config_union() -> None:
    methods = adapter_methods()
    assert {"lora", "prompt", "prefix", "ptuning"} <= set(methods)
    assert {"r", "lora_alpha"} <= methods["lora"]
    assert "num_virtual_tokens" in methods["prompt"] and "r" not in methods["prompt"]
    assert "num_virtual_tokens" not in methods["lora"]


def test_method_grid_expands_rank_only_for_lora_and_tokens_only_for_virtual_token_methods(base_cfg) -> None:
    space = _space({"adapter.method": {"grid": ["lora", "prefix", "prompt"]},
                    "adapter.r": {"grid": [4, 16]},
                    "adapter.lora_alpha": {"grid": [32]},
                    "adapter.num_virtual_tokens": {"grid": [8, 32]}}, base_cfg)
    points = space.grid_points()
    assert points == [
        {"adapter.method": "lora", "adapter.r": 4, "adapter.lora_alpha": 32},
        {"adapter.method": "lora", "adapter.r": 16, "adapter.lora_alpha": 32},
        {"adapter.method": "prefix", "adapter.num_virtual_tokens": 8},
        {"adapter.method": "prefix", "adapter.num_virtual_tokens": 32},
        {"adapter.method": "prompt", "adapter.num_virtual_tokens": 8},
        {"adapter.method": "prompt", "adapter.num_virtual_tokens": 32},
    ]  # 6 trials, not 3 x 2 x 2 = 12 with duplicates
    assert space.trial_count("grid", num_samples=2) == 12


def test_when_lists_pick_the_first_applicable_spec(base_cfg) -> None:
    space = _space({"adapter.method": {"grid": ["lora", "prompt"]},
                    "sft.learning_rate": [{"grid": [1e-3, 2e-3], "when": {"adapter.method": ["lora"]}},
                                          {"grid": [3e-2], "when": {"adapter.method": ["prompt", "prefix"]}}]},
                   base_cfg)
    assert space.grid_points() == [
        {"adapter.method": "lora", "sft.learning_rate": 1e-3},
        {"adapter.method": "lora", "sft.learning_rate": 2e-3},
        {"adapter.method": "prompt", "sft.learning_rate": 3e-2},
    ]


def test_unswept_method_comes_from_the_base_config(base_cfg) -> None:
    # quickstart.yaml is LoRA: r applies, and a when on the base method's value holds.
    space = _space({"adapter.r": {"grid": [2, 4]},
                    "sft.batch_size": {"grid": [8], "when": {"adapter.method": ["lora"]}}}, base_cfg)
    assert space.grid_points() == [{"adapter.r": 2, "sft.batch_size": 8}, {"adapter.r": 4, "sft.batch_size": 8}]


def test_tune_param_space_and_resolve_drop_inapplicable_draws(base_cfg) -> None:
    space = _space({"adapter.method": {"grid": ["lora", "prompt"]},
                    "adapter.r": {"choice": [4, 8]},
                    "adapter.num_virtual_tokens": {"randint": [4, 9]},
                    "sft.learning_rate": {"loguniform": [1e-4, 1e-2]}}, base_cfg, "random")
    points = space.grid_points()
    assert points == [{"adapter.method": "lora"}, {"adapter.method": "prompt"}]
    ps = space.tune_param_space(points)
    assert ps[POINT_KEY] == {"grid_search": [0, 1]}
    assert {"adapter.r", "adapter.num_virtual_tokens", "sft.learning_rate"} <= set(ps)
    # A config as Tune's variant generator would hand it over: every field drawn.
    config = {POINT_KEY: 1, "adapter.r": 8, "adapter.num_virtual_tokens": 6, "sft.learning_rate": 5e-4}
    assert space.resolve(config, points) == {"adapter.method": "prompt", "adapter.num_virtual_tokens": 6,
                                             "sft.learning_rate": 5e-4}
    config[POINT_KEY] = 0
    assert space.resolve(config, points) == {"adapter.method": "lora", "adapter.r": 8, "sft.learning_rate": 5e-4}


def test_tune_samplers_draw_inside_the_declared_ranges(base_cfg) -> None:
    from ray.tune.search.variant_generator import generate_variants

    space = _space({"adapter.r": {"randint": [2, 5]}, "sft.learning_rate": {"uniform": [0.1, 0.2]}},
                   base_cfg, "random")
    ps = space.tune_param_space(space.grid_points())
    for _ in range(20):
        _, config = next(generate_variants(ps))
        params = space.resolve(config, space.grid_points())
        assert 2 <= params["adapter.r"] < 5 and isinstance(params["adapter.r"], int)
        assert 0.1 <= params["sft.learning_rate"] <= 0.2 and type(params["sft.learning_rate"]) is float


class _FakeOptunaTrial:
    """Records what a define-by-run function asks for; answers with the first choice / the low end."""

    def __init__(self) -> None:
        self.asked: dict[str, tuple] = {}

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("categorical", tuple(choices))
        return choices[-1]

    def suggest_int(self, name, low, high):
        self.asked[name] = ("int", low, high)
        return low

    def suggest_float(self, name, low, high, log=False):
        self.asked[name] = ("float", low, high, log)
        return low


def test_optuna_define_by_run_asks_only_for_applicable_fields(base_cfg) -> None:
    space = _space({"adapter.method": {"choice": ["lora", "prompt"]},
                    "adapter.r": {"randint": [4, 17]},
                    "adapter.num_virtual_tokens": {"choice": [8, 16]},
                    "sft.learning_rate": [{"loguniform": [1e-4, 1e-2], "when": {"adapter.method": ["lora"]}},
                                          {"uniform": [0.01, 0.05], "when": {"adapter.method": ["prompt"]}}]},
                   base_cfg, "optuna")
    trial = _FakeOptunaTrial()
    space.optuna_define()(trial)  # the fake answers "prompt" for the method
    assert trial.asked == {"adapter.method": ("categorical", ("lora", "prompt")),
                           "adapter.num_virtual_tokens": ("categorical", (8, 16)),
                           "sft.learning_rate#1": ("float", 0.01, 0.05, False)}
    params = space.resolve({"adapter.method": "prompt", "adapter.num_virtual_tokens": 16,
                            "sft.learning_rate#1": 0.02}, [])
    assert params == {"adapter.method": "prompt", "adapter.num_virtual_tokens": 16, "sft.learning_rate": 0.02}
    assert describe(params) == "prompt num_virtual_tokens=16 learning_rate=0.02"


def test_check_assignments_cover_grids_choices_and_range_ends(base_cfg) -> None:
    space = _space({"adapter.method": {"grid": ["lora", "prompt"]},
                    "adapter.r": {"randint": [2, 9]},
                    "sft.learning_rate": {"loguniform": [1e-4, 1e-2]}}, base_cfg, "random")
    checked = space.check_assignments()
    assert {"adapter.method": "lora", "adapter.r": 2} in checked
    assert {"adapter.method": "lora", "adapter.r": 8} in checked  # randint's high is exclusive
    assert {"adapter.method": "prompt", "sft.learning_rate": 1e-2} in checked
    assert not any(a.get("adapter.method") == "prompt" and "adapter.r" in a for a in checked)


def test_trial_data_switches_method_and_keeps_only_its_fields(base_cfg) -> None:
    base = {"name": "q", "adapter": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
            "sft": {"learning_rate": 1e-3}, "tracking": {"register": True, "experiment": "e"}}
    methods = adapter_methods()
    data = trial_data(base, {"adapter.method": "prompt", "adapter.num_virtual_tokens": 8, "sft.learning_rate": 0.03},
                      methods, stage="sft", output_dir="/tmp/trial",
                      resources={"num_workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.5, "trial_cpus": 0})
    assert data["adapter"] == {"method": "prompt", "num_virtual_tokens": 8}
    assert base["adapter"]["r"] == 8  # the base is not touched
    cfg = parse_config(data)
    assert cfg.adapter.method == "prompt" and cfg.sft.learning_rate == 0.03
    assert cfg.stages == ["sft"] and cfg.output_dir == "/tmp/trial"
    assert cfg.tracking.register_adapter is False and cfg.tracking.experiment == "e"
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu
    assert cfg.scaling.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    same = trial_data(base, {"adapter.r": 4}, methods, stage="sft", output_dir="/tmp/t", resources=None)
    assert same["adapter"] == {"method": "lora", "r": 4, "lora_alpha": 16, "target_modules": "all-linear"}
    assert "scaling" not in same


@pytest.mark.parametrize("search_space, search_alg, message", [
    ({METHOD_KEY: {"grid": ["lora", "nosuch"]}}, "grid",
     "search_space.adapter.method: unknown method 'nosuch'; expected one of"),
    ({METHOD_KEY: {"grid": ["lora"], "when": {"sft.batch_size": [8]}}}, "grid",
     "search_space.adapter.method: 'when' is not allowed on the method"),
    ({METHOD_KEY: {"uniform": [0, 1]}}, "random", "a method is picked with grid or choice, not uniform"),
    ({"sft.learning_rate": {"loguniform": [1e-4, 1e-2]}}, "grid",
     "search_space.sft.learning_rate: search_alg grid enumerates values; 'loguniform' needs search_alg random"),
    ({METHOD_KEY: {"choice": ["lora", "prompt"]}, "adapter.r": {"grid": [4, 8]}}, "random",
     "search_space.adapter.r: a grid cannot depend on adapter.method, which is drawn at random (choice)"),
    ({"adapter.target_modules": {"choice": [["q_proj"], ["v_proj"]]}}, "optuna",
     "search_space.adapter.target_modules: optuna takes scalar choices only"),
    ({"sft.batch_size": {"grid": [8], "when": {"sft.nosuch": [1]}}}, "grid",
     "search_space.sft.batch_size.when.sft.nosuch: neither a swept field nor a field of the base config"),
    ({"sft.batch_size": {"grid": [8], "when": {"sft.batch_size": [8]}}}, "grid",
     "search_space.sft.batch_size.when.sft.batch_size: a field cannot depend on itself"),
    ({"sft.batch_size": {"grid": [8], "when": {"sft.epochs": [1]}},
      "sft.epochs": {"grid": [1], "when": {"seed": [0]}}}, "grid",
     "sft.epochs has conditions of its own"),
])
def test_space_errors_name_the_field(base_cfg, search_space, search_alg, message) -> None:
    with pytest.raises(SweepError) as err:
        _space(search_space, base_cfg, search_alg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sweeping_methods_over_an_init_adapter_is_refused() -> None:
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["stages=[sft]", "adapter.init_from=/some/adapter"])
    with pytest.raises(SweepError, match="adapter.init_from=null to sweep methods"):
        _space({METHOD_KEY: {"grid": ["lora", "prompt"]}}, cfg)


def test_optuna_searcher_suggests_applicable_fields_and_waits_for_the_final_metric(base_cfg, tmp_path) -> None:
    pytest.importorskip("optuna")
    from raypeft.tune.optuna_search import FinalMetricOptunaSearch

    space = _space({"adapter.method": {"choice": ["lora", "prompt"]},
                    "adapter.r": {"randint": [2, 9]},
                    "adapter.num_virtual_tokens": {"choice": [8, 16]},
                    "sft.learning_rate": {"loguniform": [1e-4, 1e-1]}}, base_cfg, "optuna")
    searcher = FinalMetricOptunaSearch(space=space.optuna_define(), metric="rougeL_after", mode="max", seed=0)
    methods = set()
    for i in range(10):
        params = space.resolve(searcher.suggest(f"t{i}"), [])
        methods.add(params["adapter.method"])
        assert ("adapter.r" in params) == (params["adapter.method"] == "lora")
        assert ("adapter.num_virtual_tokens" in params) == (params["adapter.method"] == "prompt")
        assert 1e-4 <= params["sft.learning_rate"] <= 1e-1
        # An intermediate result carries train_loss but not the final metric: skipped, not a KeyError.
        searcher.on_trial_result(f"t{i}", {"train_loss": 2.0, "step": 2, "training_iteration": 1})
        searcher.on_trial_complete(f"t{i}", {"rougeL_after": 0.01 * i, "training_iteration": 2})
    assert methods == {"lora", "prompt"}
    searcher.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints it with the standard pickle
    assert (tmp_path / "searcher.pkl").stat().st_size > 0
