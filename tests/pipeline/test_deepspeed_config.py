"""The YAML's ``deepspeed:`` key: shipped names, paths and mappings, validated on the driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from raypeft.pipeline import deepspeed_configs
from raypeft.pipeline.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", deepspeed_configs.NAMES)
def test_shipped_configs_are_package_data_identical_to_the_documented_copies(name: str) -> None:
    shipped = json.loads(deepspeed_configs.named_config_text(name))
    documented = json.loads((REPO / "configs" / "deepspeed" / f"{name}.json").read_text())
    assert shipped == documented
    assert deepspeed_configs.resolve(name) == shipped


def test_names_paths_mappings_and_null_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_config({}).deepspeed_config() is None
    offload = parse_config({"deepspeed": "zero3_offload"}).deepspeed_config()
    assert offload["zero_optimization"]["stage"] == 3
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert parse_config({"deepspeed": "zero2"}).deepspeed_config()["zero_optimization"]["stage"] == 2
    inline = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}
    cfg = parse_config({"deepspeed": inline})
    resolved = cfg.deepspeed_config()
    assert resolved == inline and resolved is not cfg.deepspeed  # a fresh copy: filling it changes nothing here
    (tmp_path / "mine.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.chdir(tmp_path)
    assert parse_config({"deepspeed": "mine.json"}).deepspeed_config()["zero_optimization"]["stage"] == 2
    assert parse_config({"deepspeed": str(tmp_path / "mine.json")}).deepspeed_config() is not None
    assert deepspeed_configs.summary(offload) == {"engine": "deepspeed", "zero_stage": "3",
                                                  "offload_optimizer": "cpu", "offload_param": "cpu"}
    assert deepspeed_configs.summary(None)["engine"] == "torch"


@pytest.mark.parametrize("value, message", [
    ("zero4", "deepspeed: not a shipped config (zero2, zero3, zero3_offload) and no such file zero4"),
    ("/no/such/ds.json", "deepspeed: not a shipped config"),
    ({"zero_optimization": {"stage": 5}}, "deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "deepspeed: zero_optimization.offload_param needs stage 3, got stage 2"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
     "deepspeed: zero_optimization.offload_optimizer.device must be one of none, cpu, nvme, got 'gpu'"),
    ([3], "deepspeed: expected a shipped config name, a DeepSpeed JSON path, a mapping or null, got [3]"),
])
def test_bad_values_fail_naming_the_field(value, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"deepspeed": value})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_json_files_fail_naming_the_field(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{\"zero_optimization\": ")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"^deepspeed: .*broken\.json is not valid JSON \(.* at line 1"):
        parse_config({"deepspeed": str(tmp_path / "broken.json")})
    with pytest.raises(ConfigError, match=r"^deepspeed: .*list\.json must hold a JSON object, got list"):
        parse_config({"deepspeed": str(tmp_path / "list.json")})


def test_yaml_key_and_override(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    data["deepspeed"] = "zero3"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "run.yaml").deepspeed == "zero3"
    assert load_config(tmp_path / "run.yaml", ["deepspeed=zero3_offload"]).deepspeed == "zero3_offload"
    assert load_config(tmp_path / "run.yaml", ["deepspeed=null"]).deepspeed_config() is None
    with pytest.raises(ConfigError, match="^deepspeed: not a shipped config"):
        load_config(tmp_path / "run.yaml", ["deepspeed=zero9"])


def test_batch_fields_that_contradict_a_stage_fail_before_ray() -> None:
    from raypeft.pipeline.preflight import _check_deepspeed
    from raypeft.pipeline.stages.registry import stage_batch

    cfg = parse_config({"stages": ["sft", "ppo"], "sft": {"batch_size": 4, "grad_accum": 2},
                        "ppo": {"rollout_batch_size": 8, "minibatches": 2}, "scaling": {"num_workers": 2},
                        "deepspeed": "zero3_offload"})
    assert stage_batch(cfg, "sft") == (4, 2) and stage_batch(cfg, "ppo") == (4, 1)
    _check_deepspeed(cfg, ["sft", "ppo"])  # "auto" everywhere: fine
    fixed = cfg.model_copy(update={"deepspeed": {"train_micro_batch_size_per_gpu": 4,
                                                 "zero_optimization": {"stage": 3}}})
    _check_deepspeed(fixed, ["sft"])
    with pytest.raises(ConfigError, match=r"^deepspeed.gradient_accumulation_steps: the file says 1, but the stage "
                                          r"runs 2 .* in stage sft$"):
        _check_deepspeed(fixed.model_copy(update={"deepspeed": {**fixed.deepspeed, "gradient_accumulation_steps": 1}}),
                         ["sft"])
    with pytest.raises(ConfigError, match="train_batch_size: the file says 16, but the stage runs 8 .* in stage ppo"):
        _check_deepspeed(cfg.model_copy(update={"deepspeed": {"train_batch_size": 16}}), ["ppo"])
