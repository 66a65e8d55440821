"""The sweep file: schema errors, --set handling and the checks made before Ray starts (no Ray)."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import yaml

from raypeft import cli
from raypeft.pipeline.config import ConfigError, load_config
from raypeft.tune.schema import SweepError, load_sweep, parse_sweep
from raypeft.tune.sweep import prepare

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _minimal(**extra) -> dict:
    return {"base_config": QUICKSTART, "search_space": {"adapter.r": {"grid": [4, 8]}}, **extra}


@pytest.mark.parametrize("data, message", [
    ({"search_space": {"adapter.r": {"grid": [4]}}}, "base_config: required"),
    (_minimal(search_space={}), "search_space: dictionary should have at least 1 item"),
    (_minimal(search_space={"adapter.r": {"grid": [4], "choice": [8]}}),
     "search_space.adapter.r: give exactly one of grid, choice, uniform, loguniform, randint; got grid and choice"),
    (_minimal(search_space={"adapter.r": {"when": {"adapter.method": ["lora"]}}}),
     "search_space.adapter.r: give exactly one of grid, choice, uniform, loguniform, randint; got none"),
    (_minimal(search_space={"adapter.r": {"grid": []}}), "search_space.adapter.r: grid needs at least one value"),
    (_minimal(search_space={"sft.learning_rate": {"uniform": [0.2, 0.1]}}),
     "search_space.sft.learning_rate: uniform needs [low, high] with low < high, got [0.2, 0.1]"),
    (_minimal(search_space={"sft.learning_rate": {"loguniform": [0, 0.1]}}),
     "search_space.sft.learning_rate: loguniform needs low > 0"),
    (_minimal(search_space={"sft.learning_rate": [{"grid": [1e-3]}, {"grid": [1e-2], "gird": 1}]}),
     "search_space.sft.learning_rate[1].gird: unknown key; known keys: grid, choice"),
    (_minimal(search_space={"adapter r": {"grid": [4]}}),
     "search_space: 'adapter r' is not a dotted config field"),
    (_minimal(search_alg="hyperopt"), "search_alg: input should be 'grid', 'random' or 'optuna', got 'hyperopt'"),
    (_minimal(scheduler={"type": "asha", "reduction_factor": 1}),
     "scheduler.reduction_factor: input should be greater than 1, got 1"),
    (_minimal(scheduler={"typ": "asha"}), "scheduler.typ: unknown key; known keys: type, metric"),
    (_minimal(resources={"gpus_per_worker": -0.5}), "resources.gpus_per_worker: input should be greater than or"),
    (_minimal(registry={"alias": "v3"}), "registry.alias: must be letters"),
    (_minimal(num_samples=0), "num_samples: input should be greater than 0, got 0"),
    (_minimal(stage="pretrain"), "stage: input should be 'sft', 'reward', 'dpo', 'ppo' or 'grpo'"),
    (_minimal(name="my sweep"), "name: must be letters"),
    (_minimal(mtric="rougeL_after"), "mtric: unknown key; known keys: name, base_config"),
])
def test_schema_errors_are_one_line_naming_the_field(data: dict, message: str) -> None:
    with pytest.raises(SweepError) as err:
        parse_sweep(data)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.yaml")
    with pytest.raises(SweepError, match=r"YAML syntax error at line 2, column 11: mapping values"):
        load_sweep(_write(tmp_path, "name: x\nstage: sft: reward\n"))


def test_duplicate_key_in_a_sweep_file_is_one_line_naming_key_and_lines(tmp_path: Path) -> None:
    """Sweep files are read as strictly as run configs: a key written twice is not "last wins"."""
    path = _write(tmp_path, "name: x\nstage: sft\nsearch_space:\n  adapter.r: {grid: [4, 8]}\n"
                            "  adapter.r: {grid: [16]}\n")
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == (f"{path}: YAML syntax error at line 5, column 3: duplicate key 'adapter.r' "
                              "(first at line 4)")
    with pytest.raises(ConfigError) as same:  # the run-config reader, word for word
        load_config(path)
    assert str(same.value) == str(err.value)


def test_set_edits_the_sweep_and_config_prefix_goes_to_the_base(tmp_path: Path) -> None:
    path = _write(tmp_path, _minimal())
    sweep, base_items = load_sweep(path, ["num_samples=3", "search_space.adapter.r.grid=[2, 16]",
                                          "search_space.sft.learning_rate.loguniform=[1.0e-4, 1.0e-2]",
                                          "scheduler.type=asha", "config.sft.max_steps=5", "config.seed=3"])
    assert sweep.num_samples == 3 and sweep.scheduler.type == "asha"
    assert sweep.search_space["adapter.r"][0].grid == [2, 16]
    assert sweep.search_space["sft.learning_rate"][0].loguniform == (1e-4, 1e-2)
    assert base_items == ["sft.max_steps=5", "seed=3"]
    with pytest.raises(SweepError, match="--set nokey: expected dotted.key=value"):
        load_sweep(path, ["nokey"])


def test_quickstart_sweep_file_is_valid_and_has_six_trials() -> None:
    path = REPO / "configs" / "sweep-quickstart.yaml"
    sweep, base_items = load_sweep(path)
    assert base_items == []
    prep = prepare(sweep, path)
    assert prep.trial_count == 6
    methods = [p["adapter.method"] for p in prep.points]
    assert methods == ["lora", "lora", "prefix", "prefix", "prompt", "prompt"]
    assert prep.base_cfg.stages == ["sft"]
    assert prep.base_data["tracking"]["uri"].startswith("sqlite:///")


@pytest.mark.parametrize("extra, message", [
    ({"base_config": "no/such.yaml"}, "base_config: "),
    ({"overrides": ["sft.batch_size=0"]}, "base_config (quickstart.yaml): sft.batch_size: input should be greater"),
    ({"search_space": {"adapter.num_virtual_tokens": {"grid": [8]}}},
     "search_space.adapter.num_virtual_tokens: applies to no trial: 'num_virtual_tokens' is not a field of any "
     "adapter method in this sweep (lora)"),
    ({"search_space": {"sft.batch_size": {"grid": [8], "when": {"seed": [99]}}}},
     "search_space.sft.batch_size: applies to no trial: its 'when' conditions never hold"),
    ({"search_space": {"adapter.r": {"grid": [4, 0]}}},
     "search_space: the trial [r=0] is not a valid config: adapter.r: input should be greater than 0, got 0"),
    ({"search_space": {"sft.learning_rate": {"uniform": [-1.0, 1.0]}}, "search_alg": "random"},
     "search_space: the trial [learning_rate=-1] is not a valid config: sft.learning_rate: input should be greater"),
    ({"search_space": {"adapter.target_modules": {"grid": [["q_proj"], ["nosuch_proj"]]}}},
     "search_space: the trial [target_modules=['nosuch_proj']]: adapter.target_modules:"),
    ({"search_space": {"sft.nosuch": {"grid": [1]}}}, "search_space: the trial [nosuch=1] is not a valid config: "
                                                      "sft.nosuch: unknown key"),
])
def test_prepare_checks_every_trial_config_before_ray(tmp_path: Path, extra: dict, message: str) -> None:
    path = _write(tmp_path, _minimal(**extra))
    sweep, base_items = load_sweep(path)
    with pytest.raises(SweepError) as err:
        prepare(sweep, path, base_items)
    assert str(err.value).startswith(message), str(err.value)


def test_optuna_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("optuna."):
            raise ImportError("No module named 'optuna'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    path = _write(tmp_path, _minimal(search_alg="optuna"))
    sweep, _ = load_sweep(path)
    with pytest.raises(SweepError, match=r"search_alg: optuna is not installed; pip install 'raypeft\[optuna\]'"):
        prepare(sweep, path)


def test_cli_bad_sweep_exits_2_with_one_line_and_starts_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _minimal(search_space={"adapter.method": {"grid": ["lora", "nosuch"]}}))
    assert cli.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raypeft: error: search_space.adapter.method: unknown method 'nosuch'")
    assert "\n" not in err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()
