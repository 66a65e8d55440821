"""The adapter registry (list, promote, models:/ resolution) and ``raypeft eval``, on a SQLite store.

The adapters are made in-process on the embedded demo base (no Ray): a LoRA adapter with
non-zero weights for the ROUGE path and a reward adapter with a zero value head, whose held-out
pair accuracy and loss are known exactly (every margin is 0: accuracy 0, loss ln 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raypeft.adapters import get_adapter_model
from raypeft import cli
from raypeft.pipeline import model_registry, tracking
from raypeft.pipeline.config import LoraSpec, ModelSpec, load_config
from raypeft.pipeline.evaluate_adapter import evaluate_adapter
from raypeft.pipeline.modeling import adapter_config, load_base_model
from raypeft.pipeline.roles import Roles

REPO = Path(__file__).resolve().parents[2]
NAME = "regtest-sft"


def _lora_folder(path: Path) -> Path:
    torch.manual_seed(0)
    model = get_adapter_model(load_base_model(ModelSpec()), adapter_config(LoraSpec(r=4, lora_alpha=8), ModelSpec()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a trained-looking adapter: not the base model in disguise
    model.save_pretrained(str(path))
    return path


def _reward_folder(path: Path) -> Path:
    roles = Roles(load_base_model(ModelSpec()))
    roles.add("reward", adapter_config(LoraSpec(r=2), ModelSpec()), trainable=True, value_head="zero")
    roles.save("reward", path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    lora, rm = _lora_folder(root / "lora"), _reward_folder(root / "rm")
    with tracking.quiet_mlflow():
        exp = tracking.connect(uri, "regtest", (root / "artifacts").as_uri())
        versions = []
        for i, (folder, stage) in enumerate([(lora, "sft"), (lora, "sft"), (rm, "reward")]):
            run_id = tracking.start_run(exp, f"run{i}")
            tracking.log_metrics(run_id, {"rougeL_after": 0.1 * (i + 1), "trainable_params": 1000.0 + i})
            source = tracking.log_adapter(run_id, folder)
            tracking.end_run(run_id)
            name = NAME if stage == "sft" else "regtest-reward"
            versions.append(tracking.register_adapter(name, source, run_id,
                                                      tags={"method": "lora", "r": 4, "stage": stage},
                                                      alias="best" if i == 1 else None))
    return {"uri": uri, "lora": lora, "rm": rm, "versions": versions}


def test_list_shows_versions_aliases_tags_and_metrics(store: dict) -> None:
    rows = model_registry.list_versions(store["uri"])
    assert [(r.name, r.version) for r in rows] == [("regtest-reward", 1), (NAME, 2), (NAME, 1)]
    by_version = {(r.name, r.version): r for r in rows}
    assert by_version[(NAME, 2)].aliases == ["best"] and by_version[(NAME, 1)].aliases == []
    assert by_version[(NAME, 2)].tags["r"] == "4"
    assert by_version[(NAME, 2)].metrics["rougeL_after"] == pytest.approx(0.2)
    text = model_registry.format_versions(model_registry.list_versions(store["uri"], NAME))
    header, *lines = text.splitlines()
    assert header.split() == ["name", "version", "aliases", "stage", "method", "r", "rougeL_after", "trainable_params"]
    assert lines[0].split() == [NAME, "2", "best", "sft", "lora", "4", "0.2000", "1,001"]


def test_promote_moves_an_alias_and_models_uris_resolve_to_the_adapter(store: dict) -> None:
    model_registry.promote(store["uri"], NAME, 1, "prod")
    assert {r.version: r.aliases for r in model_registry.list_versions(store["uri"], NAME)} == {2: ["best"], 1: ["prod"]}
    model_registry.promote(store["uri"], NAME, 2, "prod")
    assert {r.version: r.aliases for r in model_registry.list_versions(store["uri"], NAME)} == {2: ["best", "prod"], 1: []}
    want = (store["lora"] / "adapter_model.safetensors").read_bytes()
    for ref in (f"models:/{NAME}@prod", f"models:/{NAME}/1", f"models:/{NAME}@best"):
        folder = tracking.resolve_adapter(ref, tracking_uri=store["uri"])
        assert (folder / "adapter_model.safetensors").read_bytes() == want, ref


def test_registry_errors_exit_2_with_one_line(store: dict, capsys: pytest.CaptureFixture) -> None:
    uri = store["uri"]
    assert cli.main(["registry", "promote", NAME, "9", "prod", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == f"raypeft: error: {NAME}/9: no such registered model version at {uri}"
    assert cli.main(["registry", "list", "--name", "nosuch", "--tracking-uri", uri]) == 2
    assert "--name nosuch: no registered model of that name" in capsys.readouterr().err
    assert cli.main(["registry", "promote", NAME, "1", "staging", "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.strip() == f"[raypeft] {NAME}@staging -> version 1"
    assert cli.main(["registry", "list", "--tracking-uri", uri]) == 0
    assert "staging" in capsys.readouterr().out


def _eval_config(uri: str):
    return load_config(REPO / "configs" / "quickstart.yaml",
                       [f"tracking.uri={uri}", "eval.max_rows=6", "eval.max_new_tokens=6",
                        "reward.data.max_eval_rows=12"])


def test_eval_of_a_registered_adapter_matches_its_folder(store: dict, capsys: pytest.CaptureFixture) -> None:
    cfg = _eval_config(store["uri"])
    _, direct = evaluate_adapter(cfg, str(store["lora"]))
    folder, registered = evaluate_adapter(cfg, f"models:/{NAME}/1")
    assert folder != store["lora"]
    assert registered == direct
    assert set(direct) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "eval_rows"} and direct["eval_rows"] == 6
    assert 0.0 <= direct["rougeL"] <= 1.0
    code = cli.main(["eval", str(REPO / "configs" / "quickstart.yaml"), "--adapter", f"models:/{NAME}/1",
                     "--set", f"tracking.uri={store['uri']}", "--set", "eval.max_rows=6",
                     "--set", "eval.max_new_tokens=6"])
    assert code == 0
    assert f"'rougeL': {round(direct['rougeL'], 4)}" in capsys.readouterr().out


def test_eval_of_a_reward_adapter_reports_pair_accuracy(store: dict) -> None:
    _, metrics = evaluate_adapter(_eval_config(store["uri"]), "models:/regtest-reward/1")
    assert metrics["eval_pairs"] == 12
    assert metrics["eval_accuracy"] == 0.0  # a zero head ties every pair, and ties count as wrong
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_eval_bad_adapter_reference_exits_2(store: dict, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    args = ["eval", str(REPO / "configs" / "quickstart.yaml"), "--set", f"tracking.uri={store['uri']}", "--adapter"]
    assert cli.main(args + [f"models:/{NAME}@nosuch"]) == 2
    assert f"models:/{NAME}@nosuch: cannot resolve" in capsys.readouterr().err
    assert cli.main(args + [str(tmp_path)]) == 2
    assert "not an adapter folder (no adapter_config.json)" in capsys.readouterr().err
