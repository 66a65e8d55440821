"""What raypeft will load: safetensors only unless the YAML opts in, and no remote code unless asked.

* adapter weights: ``adapter_model.bin`` (a pickle) is refused by the library and by the CLI;
  with ``model.allow_pickle_adapters: true`` it is read once with ``torch.load(weights_only=True)``
  and converted, so workers read safetensors; a pickle that is more than tensors stays refused.
* ``model.trust_remote_code``: a model folder that ships its own Python is refused (and its code
  never imported) unless the YAML turns it on; every transformers loader gets the YAML's value.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raypeft.adapters import AdapterModel, LoraConfig, get_adapter_model
from raypeft.adapters.serialization import load_adapter_weights
from raypeft.pipeline import launcher
from raypeft.cli import main
from raypeft.pipeline.config import ModelSpec, load_config
from raypeft.pipeline.modeling import load_base_model

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.fixture(scope="module")
def pickled_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA adapter for the demo base whose weights are only ``adapter_model.bin``."""
    folder = tmp_path_factory.mktemp("pickled") / "adapter"
    torch.manual_seed(0)
    model = get_adapter_model(load_base_model(ModelSpec()), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights="gaussian"))
    model.save_pretrained(str(folder))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    torch.save(weights, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return folder, weights


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*args, **kwargs):
        raise AssertionError("Ray must not start in these tests")

    monkeypatch.setattr(launcher, "init_ray", trap)
    monkeypatch.setattr(launcher, "fit", trap)


def _validate(tmp_path: Path, *sets: str) -> int:
    args = ["validate", QUICKSTART, "--set", "stages=[sft]", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def test_library_refuses_pickled_weights_unless_asked(pickled_adapter) -> None:
    folder, weights = pickled_adapter
    with pytest.raises(ValueError, match="is a pickle file; refusing to load it"):
        load_adapter_weights(folder)
    with pytest.raises(ValueError, match="is a pickle file"):
        AdapterModel.from_pretrained(load_base_model(ModelSpec()), str(folder))
    loaded = load_adapter_weights(folder, allow_pickle=True)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_allowed_pickle_is_converted_to_safetensors_on_the_driver(pickled_adapter, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, no_ray) -> None:
    from raypeft.pipeline.preflight import preflight

    folder, weights = pickled_adapter
    monkeypatch.chdir(tmp_path)
    cfg = load_config(QUICKSTART, ["stages=[sft]", f"adapter.init_from={folder}", "model.allow_pickle_adapters=true",
                                   f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    converted = Path(preflight(cfg)["sft"]["init"])
    assert converted != folder
    assert sorted(p.name for p in converted.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    got = load_file(str(converted / "adapter_model.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    assert (folder / "adapter_model.bin").is_file()  # the user's folder is left alone
    assert _validate(tmp_path, f"adapter.init_from={folder}", "model.allow_pickle_adapters=true") == 0


class _RunsCode:
    """Unpickling this calls ``open(path, "w")``: what a hostile pickle would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_with_code_is_refused_even_when_pickles_are_allowed(pickled_adapter, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture, no_ray) -> None:
    folder, weights = pickled_adapter
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    (hostile / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    sentinel = tmp_path / "pwned"
    torch.save({**weights, "extra": _RunsCode(str(sentinel))}, hostile / "adapter_model.bin")
    monkeypatch.chdir(tmp_path)
    rc = _validate(tmp_path, f"adapter.init_from={hostile}", "model.allow_pickle_adapters=true")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith(f"raypeft: error: adapter.init_from: {hostile}/adapter_model.bin holds more than "
                              "tensors, refused even with model.allow_pickle_adapters"), err
    assert not sentinel.exists()


def _custom_code_model(folder: Path, sentinel: Path) -> None:
    """A model folder whose config names its own Python classes (``auto_map``); importing the
    configuration module creates ``sentinel``, so the test can tell whether it ran."""
    from raypeft.pipeline.demo import ensure_demo_assets

    folder.mkdir()
    config = json.loads((ensure_demo_assets().model_dir / "config.json").read_text())
    config.update(model_type="sentinel_llama", architectures=["SentinelForCausalLM"],
                  auto_map={"AutoConfig": "configuration_sentinel.SentinelConfig",
                            "AutoModelForCausalLM": "modeling_sentinel.SentinelForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_sentinel.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()\n"
        "from transformers import LlamaConfig\n\n\n"
        "class SentinelConfig(LlamaConfig):\n    model_type = 'sentinel_llama'\n")
    (folder / "modeling_sentinel.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_sentinel import SentinelConfig\n\n\n"
        "class SentinelForCausalLM(LlamaForCausalLM):\n    config_class = SentinelConfig\n")


def test_remote_code_runs_only_when_the_yaml_turns_it_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture, no_ray) -> None:
    from raypeft.pipeline.demo import ensure_demo_assets

    sentinel = tmp_path / "code-ran"
    model = tmp_path / "custom-model"
    _custom_code_model(model, sentinel)
    monkeypatch.chdir(tmp_path)
    common = [f"model.name_or_path={model}", f"model.tokenizer={ensure_demo_assets().model_dir}"]

    rc = _validate(tmp_path, *common)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err[-1].startswith(f"raypeft: error: model.name_or_path: cannot load '{model}'"), err
    assert "model.trust_remote_code: true" in err[-1]
    assert not sentinel.exists(), "the model's own code ran although trust_remote_code is off"

    assert _validate(tmp_path, *common, "model.trust_remote_code=true") == 0, capsys.readouterr().err
    assert sentinel.exists()  # proof that the flag reaches transformers


@pytest.mark.parametrize("trust", [False, True])
def test_every_transformers_loader_gets_the_yaml_value(trust: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from raypeft.pipeline import modeling

    seen: list[tuple[str, object]] = []

    def spy(name, real):
        def wrapped(*args, **kwargs):
            seen.append((name, kwargs.get("trust_remote_code", "missing")))
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(modeling.AutoTokenizer, "from_pretrained",
                        spy("tokenizer", transformers.AutoTokenizer.from_pretrained))
    monkeypatch.setattr(modeling.AutoConfig, "from_pretrained", spy("config", transformers.AutoConfig.from_pretrained))
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained",
                        spy("model", transformers.AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_config",
                        spy("skeleton", transformers.AutoModelForCausalLM.from_config))
    spec = ModelSpec(trust_remote_code=trust)
    modeling.load_tokenizer(spec)
    modeling.load_base_model(spec)
    modeling.skeleton_model(spec)
    assert {name for name, _ in seen} == {"tokenizer", "model", "config", "skeleton"}
    assert all(value is trust for _, value in seen), seen  # transformers' own nested calls included


def test_no_transformers_loader_in_the_package_forgets_trust_remote_code() -> None:
    """Source check: every ``*.from_pretrained`` / ``from_config`` call in pipeline/ and tune/ that
    is not our own ``AdapterModel`` passes ``trust_remote_code`` explicitly."""
    offenders = []
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tune").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("from_pretrained", "from_config")):
                continue
            receiver = ast.unparse(node.func.value)
            if receiver in ("AdapterModel", "cls") or receiver.endswith("Config") and receiver != "AutoConfig":
                continue
            if not any(k.arg == "trust_remote_code" for k in node.keywords):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {receiver}.{node.func.attr}")
    assert not offenders, offenders


def test_workers_only_read_safetensors() -> None:
    """Source check: nothing in pipeline/ or tune/ unpickles except with weights_only=True."""
    offenders = []
    files = [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tune").rglob("*.py")]
    assert any(f.name == "checkpoint.py" for f in files)  # the scan sees the code that restores checkpoints
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "pickle.load", "pickle.loads"):
                weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("load_adapter_weights"):
                if any(k.arg == "allow_pickle" for k in node.keywords) and path.name != "adapter_inputs.py":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: allow_pickle outside adapter_inputs.py")
    assert not offenders, offenders
