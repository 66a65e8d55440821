"""The stage registry: one definition per stage, matching the config's sections, and read by every
part of the driver (input resolution, preflight, the workflow, the CLI) instead of stage names."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from pydantic import Field

from raypeft.cli import _summary
from raypeft.pipeline import launcher, tracking, workflow
from raypeft.pipeline.adapter_inputs import resolve_stage_inputs, stage_fields
from raypeft.pipeline.config import STAGES, ConfigError, DPOSpec, RunConfig, StageSection, parse_config
from raypeft.pipeline.config.run import stage_sections
from raypeft.pipeline.preflight import preflight
from raypeft.pipeline.stages import dpo, grpo, ppo, registry, reward, sft
from raypeft.pipeline.stages.definition import AdapterInput, Stage
from raypeft.pipeline.stages.registry import DEFINED, REGISTRY, build_registry, stage_batch, stage_named
from raypeft.pipeline.workflow import StageOutcome
from raypeft.tune.schema import SweepConfig


class KtoSpec(StageSection):
    """A section a new stage would add (only what the backend needs, plus its inputs)."""

    policy_init: str | None = "sft"
    reference: str = "policy_init"
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: typing.Literal["constant"] = "constant"
    max_grad_norm: float | None = 1.0


class WithKto(RunConfig):
    kto: KtoSpec = KtoSpec()


def _kto_stage() -> Stage:
    return dataclasses.replace(ppo.STAGE, name="kto", section=KtoSpec,
                               inputs=(AdapterInput("policy", "kto.policy_init"),
                                       AdapterInput("reference", "kto.reference", follows="policy")))


# ------------------------------------------------------------------------------ one list

def test_the_registry_covers_every_config_section_and_nothing_else() -> None:
    assert list(REGISTRY) == list(STAGES) == list(stage_sections(RunConfig)) == ["sft", "reward", "dpo", "ppo",
                                                                                 "grpo"]
    for name, stage in REGISTRY.items():
        assert stage.name == name
        assert stage.section is RunConfig.model_fields[name].annotation
        assert stage.train_loop.__module__ == f"raypeft.pipeline.stages.{name}"
    # Every list of stage names a user meets is that one list.
    (stage_literal,) = typing.get_args(RunConfig.model_fields["stages"].annotation)
    assert typing.get_args(stage_literal) == STAGES
    assert typing.get_args(SweepConfig.model_fields["stage"].annotation) == STAGES


def test_a_new_section_is_a_new_stage_name_and_needs_its_definition() -> None:
    assert stage_sections(WithKto) == (*STAGES, "kto")
    with pytest.raises(TypeError, match="^stage section 'kto' of RunConfig has no stage definition: add its "
                                        "module's STAGE to pipeline.stages.registry.DEFINED$"):
        build_registry(DEFINED, WithKto, stage_sections(WithKto))
    grown = build_registry((*DEFINED, _kto_stage()), WithKto, stage_sections(WithKto))
    assert list(grown) == [*STAGES, "kto"]
    cfg = WithKto(kto={"reference": "base"})
    assert grown["kto"].input_fields(cfg) == {"policy": ("kto.policy_init", "sft"),
                                              "reference": ("kto.reference", None)}


@pytest.mark.parametrize("defined, message", [
    (DEFINED[:-1], "stage section 'grpo' of RunConfig has no stage definition"),
    ((*DEFINED, dataclasses.replace(sft.STAGE, name="kto")),
     "stage 'kto' has no config section: add a StageSection field 'kto' to RunConfig"),
    ((*DEFINED, sft.STAGE), "stage 'sft' is defined twice"),
    ((sft.STAGE, dataclasses.replace(reward.STAGE, section=DPOSpec), dpo.STAGE, ppo.STAGE, grpo.STAGE),
     "stage 'reward': its section is DPOSpec, but RunConfig.reward is RewardSpec"),
    ((sft.STAGE, dataclasses.replace(reward.STAGE, inputs=(AdapterInput("init", "reward.init_form"),)), dpo.STAGE,
      ppo.STAGE, grpo.STAGE), "stage 'reward': input 'init' names 'reward.init_form', which is not a config field"),
])
def test_a_stage_missing_a_part_fails_when_the_registry_is_built(defined: tuple, message: str) -> None:
    with pytest.raises(TypeError, match=f"^{message}"):
        build_registry(defined)


def test_a_definition_or_section_missing_a_part_fails_when_it_is_made() -> None:
    with pytest.raises(TypeError, match="^stage dpo: input 'reference' follows 'actor', which is not an input "
                                        "declared before it$"):
        dataclasses.replace(dpo.STAGE, inputs=(AdapterInput("policy", "dpo.policy_init"),
                                               AdapterInput("reference", "dpo.reference", follows="actor")))
    with pytest.raises(TypeError, match=r"^stage dpo: an input role appears twice"):
        dataclasses.replace(dpo.STAGE, inputs=(AdapterInput("policy", "dpo.policy_init"),) * 2)
    with pytest.raises(TypeError, match="^BareSpec: a stage section needs the fields learning_rate, weight_decay"):
        class BareSpec(StageSection):  # noqa: F841 - defining it is the test
            epochs: int = 1


def test_an_unknown_stage_is_an_error_never_another_stages_inputs(tmp_path: Path) -> None:
    cfg = parse_config({"name": "t", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="^stages: unknown stage 'kto'$"):
        stage_named("kto")
    with pytest.raises(ConfigError, match="^stages: unknown stage 'kto'$"):
        resolve_stage_inputs(cfg, ["kto"])
    with pytest.raises(ConfigError, match="^stages: unknown stage 'kto'$"):
        stage_batch(cfg, "kto")


# ------------------------------------------------------------------------------ each part is read

@pytest.fixture()
def fake_dpo(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replaces the dpo stage's definition (nothing else) with one whose every part is recognisable."""
    seen: dict = {"data": [], "warnings": []}

    def check_data(cfg: RunConfig, tokenizer, warn) -> None:
        seen["data"].append((cfg.name, tokenizer is not None))
        warn("fake data check ran")

    def train_loop(payload: dict) -> None:
        raise AssertionError("not run in this test")

    fake = dataclasses.replace(
        dpo.STAGE, train_loop=train_loop, check_data=check_data, batch=lambda cfg: (3, 5),
        inputs=(AdapterInput("policy", "dpo.policy_init"),
                AdapterInput("judge", "reward.init_from", reward_model=True)),
        summary_metrics=("judge_",))
    monkeypatch.setitem(registry.REGISTRY, "dpo", fake)
    seen["stage"] = fake
    return seen


def _cfg(tmp_path: Path, **sections) -> RunConfig:
    return parse_config({"name": "t", "output_dir": str(tmp_path), "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"},
                         "stages": ["dpo"], **sections})


def test_input_resolution_reads_the_declared_inputs(fake_dpo: dict, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, dpo={"policy_init": None}, reward={"init_from": None})
    assert stage_fields(cfg, "dpo") == {"policy": ("dpo.policy_init", None), "judge": ("reward.init_from", None)}
    with pytest.raises(ConfigError,
                       match=r"^reward\.init_from: the DPO stage needs a reward model \(e\.g\. 'reward'\)$"):
        resolve_stage_inputs(cfg, ["dpo"])
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^reward\.init_from: .*judge has no value_head\.safetensors"):
        resolve_stage_inputs(cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"init_from": str(judge)})}),
                             ["dpo"])
    (judge / "value_head.safetensors").write_bytes(b"")
    resolved = resolve_stage_inputs(cfg.model_copy(update={"reward": cfg.reward.model_copy(
        update={"init_from": str(judge)})}), ["dpo"])
    assert resolved == {"dpo": {"policy": None, "judge": str(judge)}}


def test_preflight_runs_the_declared_data_check_and_batch_shape(fake_dpo: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.REGISTRY, "dpo", dataclasses.replace(fake_dpo["stage"], inputs=(
        AdapterInput("policy", "dpo.policy_init"),)))
    cfg = _cfg(tmp_path, dpo={"policy_init": None})
    assert preflight(cfg, warn=fake_dpo["warnings"].append) == {"dpo": {"policy": None}}
    assert fake_dpo["data"] == [("t", True)] and fake_dpo["warnings"] == ["fake data check ran"]
    assert stage_batch(cfg, "dpo") == (3, 5)
    ds = cfg.model_copy(update={"deepspeed": {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}})
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu: the file says 4, but the stage runs 3.* "
                                          r"in stage dpo$"):
        preflight(ds, warn=fake_dpo["warnings"].append)


def test_preflight_asks_each_stage_whether_it_needs_a_causal_lm(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, stages=["sft"], model={"task_type": "SEQ_2_SEQ_LM"})
    monkeypatch.setitem(registry.REGISTRY, "sft", dataclasses.replace(sft.STAGE, causal_lm_only=True))
    with pytest.raises(ConfigError, match=r"^stages: the sft stage needs a causal LM \(model\.task_type: CAUSAL_LM\), "
                                          r"got SEQ_2_SEQ_LM$"):
        preflight(cfg)


def test_the_cli_prints_the_declared_summary_metrics(fake_dpo: dict) -> None:
    metrics = {"judge_score": 0.123456, "eval_accuracy_after": 1.0, "train_seconds": 2.0, "tokens_per_s": 9.0,
               "tokens_per_s/rank0": 5.0, "tokens_per_s_per_worker": 4.5, "judge_note": "text"}
    assert _summary(StageOutcome("dpo", "run", Path("x"), metrics)) == {
        "judge_score": 0.1235, "train_seconds": 2.0, "tokens_per_s": 9.0}
    ppo_metrics = {"rouge1_after": 0.5, "eval_reward_after": 1.0, "eval_kl_after": 0.1, "eval_accuracy_after": 0.7,
                   "eval_response_length_after": 9.0}
    assert _summary(StageOutcome("ppo", "run", Path("x"), ppo_metrics)) == {
        "rouge1_after": 0.5, "eval_reward_after": 1.0, "eval_kl_after": 0.1}


def test_the_workflow_runs_the_declared_loop(fake_dpo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Started(Exception):
        pass

    def fit(loop, payload, cfg, **kwargs):
        raise Started(loop)

    monkeypatch.setattr(launcher, "fit", fit)
    cfg = _cfg(tmp_path)
    with tracking.quiet_mlflow():
        experiment = tracking.connect(cfg.tracking_uri(), "registry-test", (tmp_path / "artifacts").as_uri())
        parent = tracking.start_run(experiment, "parent")
        with pytest.raises(Started) as info:
            workflow.run_stage(cfg, "dpo", experiment_id=experiment, parent_run_id=parent, inputs={"policy": None})
    assert info.value.args[0] is fake_dpo["stage"].train_loop
