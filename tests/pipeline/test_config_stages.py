"""The reward / dpo / ppo sections and the adapter inputs between stages: validated before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raypeft.pipeline.adapter_inputs import resolve_stage_inputs, stage_fields
from raypeft.pipeline.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("data, expected", [
    ({"stages": ["sft", "sft"]}, "stages: each stage may appear once, 'sft' appears 2 times"),
    ({"stages": ["rlhf"]}, "stages.0: input should be 'sft', 'reward', 'dpo', 'ppo' or 'grpo'"),
    ({"reward": {"init_from": " "}}, "reward.init_from: must not be blank"),
    ({"reward": {"batch_size": 0}}, "reward.batch_size: input should be greater than 0"),
    ({"reward": {"data": {"columns": {"chosn": "a"}}}}, "reward.data.columns.chosn: unknown key; did you mean 'chosen'?"),
    ({"reward": {"data": {"eval_fraction": 1.5}}}, "reward.data.eval_fraction: input should be less than 1"),
    ({"dpo": {"beta": 0}}, "dpo.beta: input should be greater than 0"),
    ({"dpo": {"loss_type": "kto"}}, "dpo.loss_type: input should be 'sigmoid', 'ipo' or 'hinge'"),
    ({"dpo": {"referense": "base"}}, "dpo.referense: unknown key; did you mean 'reference'?"),
    ({"ppo": {"minibatches": 3}}, "ppo.minibatches: must divide ppo.rollout_batch_size (16), got 3"),
    ({"ppo": {"rollout_batch_size": 6, "minibatches": 4}}, "ppo.minibatches: must divide ppo.rollout_batch_size (6)"),
    ({"ppo": {"kl": {"controller": "pid"}}}, "ppo.kl.controller: input should be 'fixed' or 'adaptive'"),
    ({"ppo": {"kl": {"target": 0}}}, "ppo.kl.target: input should be greater than 0"),
    ({"ppo": {"generation": {"temprature": 0.7}}}, "ppo.generation.temprature: unknown key; did you mean 'temperature'?"),
    ({"ppo": {"generation": {"top_p": 1.5}}}, "ppo.generation.top_p: input should be less than or equal to 1"),
    ({"ppo": {"gamma": 1.5}}, "ppo.gamma: input should be less than or equal to 1"),
    ({"ppo": {"cliprange": 0}}, "ppo.cliprange: input should be greater than 0"),
    ({"ppo": {"critic_init": ""}}, "ppo.critic_init: must not be blank"),
    ({"ppo": {"data": {"colum": "x"}}}, "ppo.data.colum: unknown key; did you mean 'column'?"),
])
def test_bad_stage_values_name_the_field(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_defaults_chain_the_stages() -> None:
    cfg = parse_config({"stages": ["sft", "reward", "ppo"]})
    assert cfg.reward.init_from == "sft"
    assert (cfg.ppo.policy_init, cfg.ppo.reference, cfg.ppo.reward_adapter, cfg.ppo.critic_init) == \
        ("sft", "policy_init", "reward", "reward")
    assert stage_fields(cfg, "ppo") == {"policy": ("ppo.policy_init", "sft"), "reference": ("ppo.reference", "sft"),
                                        "reward": ("ppo.reward_adapter", "reward"),
                                        "critic": ("ppo.critic_init", "reward")}
    base_ref = parse_config({"dpo": {"reference": "base"}})
    assert stage_fields(base_ref, "dpo")["reference"] == ("dpo.reference", None)


def _cfg(tmp_path: Path, **sections) -> object:
    return parse_config({"name": "t", "output_dir": str(tmp_path), "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"},
                         **sections})


def _fake_adapter(folder: Path, value_head: bool = False) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    if value_head:
        (folder / "value_head.safetensors").write_bytes(b"")


def test_stage_names_resolve_to_the_workflow_folders(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, stages=["sft", "reward", "ppo"])
    inputs = resolve_stage_inputs(cfg, ["sft", "reward", "ppo"])
    out = tmp_path / "t"
    assert inputs["sft"] == {"init": None}
    assert inputs["reward"] == {"init": str(out / "sft" / "adapter")}
    assert inputs["ppo"] == {"policy": str(out / "sft" / "adapter"), "reference": str(out / "sft" / "adapter"),
                             "reward": str(out / "reward" / "adapter"), "critic": str(out / "reward" / "adapter")}


def test_a_single_stage_needs_its_inputs_on_disk(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, stages=["sft", "reward", "ppo"])
    with pytest.raises(ConfigError, match=r"^ppo.policy_init: no adapter from stage 'sft' at .*run that stage first"):
        resolve_stage_inputs(cfg, ["ppo"])
    _fake_adapter(tmp_path / "t" / "sft" / "adapter")
    _fake_adapter(tmp_path / "t" / "reward" / "adapter")
    with pytest.raises(ConfigError, match=r"^ppo.reward_adapter: .* has no value_head.safetensors"):
        resolve_stage_inputs(cfg, ["ppo"])
    (tmp_path / "t" / "reward" / "adapter" / "value_head.safetensors").write_bytes(b"")
    assert resolve_stage_inputs(cfg, ["ppo"])["ppo"]["reward"] == str(tmp_path / "t" / "reward" / "adapter")


def test_inputs_must_come_from_earlier_stages(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, stages=["ppo", "reward"], ppo={"policy_init": None})
    with pytest.raises(ConfigError, match="^ppo.reward_adapter: 'reward' runs after ppo in this workflow"):
        resolve_stage_inputs(cfg, ["ppo", "reward"])
    cfg = _cfg(tmp_path, stages=["reward"], reward={"init_from": "reward"})
    with pytest.raises(ConfigError, match="^reward.init_from: 'reward' is this stage"):
        resolve_stage_inputs(cfg, ["reward"])


def test_folders_and_registry_uris_are_checked(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, stages=["dpo"], dpo={"policy_init": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="^dpo.policy_init: .*nowhere: not an adapter folder"):
        resolve_stage_inputs(cfg, ["dpo"])
    _fake_adapter(tmp_path / "mine")
    cfg = _cfg(tmp_path, stages=["dpo"], dpo={"policy_init": str(tmp_path / "mine"), "reference": "base"})
    assert resolve_stage_inputs(cfg, ["dpo"])["dpo"] == {"policy": str((tmp_path / "mine").resolve()),
                                                          "reference": None}
    cfg = _cfg(tmp_path, stages=["reward"], reward={"init_from": "models:/no-such-model/1"})
    with pytest.raises(ConfigError, match="^reward.init_from: models:/no-such-model/1: cannot resolve"):
        resolve_stage_inputs(cfg, ["reward"])


@pytest.mark.parametrize("name, stages", [("quickstart.yaml", ["sft", "reward", "ppo"]),
                                          ("quickstart-dpo.yaml", ["sft", "dpo"])])
def test_quickstart_configs_are_the_demo_workflows(name: str, stages: list[str]) -> None:
    cfg = load_config(REPO / "configs" / name)
    assert cfg.stages == stages
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    assert raw["model"]["name_or_path"] == "demo" and raw["data"]["source"] == "demo"


def test_cli_single_stage_without_its_inputs_exits_2_before_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "raypeft.cli", "run", str(REPO / "configs" / "quickstart.yaml"),
                           "--stage", "ppo", "--set", f"output_dir={tmp_path / 'out'}",
                           "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("raypeft: error: ppo.policy_init: no adapter from stage 'sft' at "), line
    assert not (tmp_path / "out").exists()
