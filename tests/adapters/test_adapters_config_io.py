"""Configs, targeting errors, file formats, state-dict round trips and import hygiene."""

from __future__ import annotations

import ast
import copy
import json
import pathlib
import warnings

import pytest
import torch

from raypeft.adapters import AdapterConfig, AdapterModel, LoraConfig, TaskType, get_adapter_model, load_config
from raypeft.adapters.config import config_class_for, registered_peft_types

peft = pytest.importorskip("peft")

ADAPTERS_DIR = pathlib.Path(__file__).resolve().parents[2] / "adapters"


# ---------------------------------------------------------------------- config
def test_config_round_trip(tmp_path):
    cfg = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        bias="lora_only",
        use_rslora=True,
        modules_to_save=["lm_head"],
        layers_to_transform=[0, 2],
        layers_pattern="layers",
        rank_pattern={"q_proj": 4},
        alpha_pattern={"v_proj": 8},
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path="some/base",
        revision="main",
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 16 and data["task_type"] == "CAUSAL_LM"
    for loaded in (LoraConfig.from_pretrained(tmp_path), AdapterConfig.from_pretrained(tmp_path), load_config(tmp_path)):
        assert isinstance(loaded, LoraConfig)
        assert loaded == cfg


def test_loading_a_peft_written_config(tmp_path):
    peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM", lora_dropout=0.1
    ).save_pretrained(str(tmp_path))
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_version" in data and "lora_bias" in data  # keys we do not model
    cfg = load_config(tmp_path)
    assert isinstance(cfg, LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.fan_in_fan_out, cfg.lora_dropout) == (
        4,
        16,
        ["c_attn"],
        True,
        0.1,
    )
    assert cfg.task_type == "CAUSAL_LM" and cfg.peft_type == "LORA"
    assert "peft_version" not in cfg.to_dict()


def test_unsupported_peft_features_are_refused(tmp_path):
    peft.LoraConfig(target_modules=["q_proj"], lora_bias=True).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="lora_bias"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init_lora_weights="pissa"), "init_lora_weights"),
        (dict(task_type="NOPE"), "invalid task_type"),
        (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_registry():
    assert "LORA" in registered_peft_types()
    assert config_class_for("lora") is LoraConfig
    with pytest.raises(ValueError, match="unsupported peft_type"):
        config_class_for("NOT_A_METHOD")


def test_missing_config_is_a_clear_error(tmp_path, llama):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        AdapterModel.from_pretrained(llama, tmp_path)


# ---------------------------------------------------------------------- targeting
def test_target_matching_nothing_lists_available_names(llama):
    with pytest.raises(ValueError) as info:
        get_adapter_model(llama, LoraConfig(target_modules=["q_proj", "foo"]))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("target_modules: no module matches 'foo'; available: ")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"):
        assert name in message
    # nothing was left half-injected
    assert not any("lora_" in n for n, _ in llama.named_parameters())


def test_regex_matching_nothing(llama):
    with pytest.raises(ValueError, match=r"no module matches '\.\*nothing'; available: "):
        get_adapter_model(llama, LoraConfig(target_modules=".*nothing"))


def test_suffix_matching_is_by_whole_name_segment(llama):
    # "proj" is a suffix of "q_proj" as a string but not as a module name
    with pytest.raises(ValueError, match="no module matches 'proj'"):
        get_adapter_model(llama, LoraConfig(target_modules=["proj"]))


def test_all_linear_skips_output_head(llama, gpt2):
    model = get_adapter_model(llama, LoraConfig(target_modules="all-linear"))
    root = model.get_base_model()
    assert type(root.lm_head) is torch.nn.Linear
    assert type(root.model.layers[0].mlp.down_proj).__name__ == "LoraLinear"
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        g = get_adapter_model(gpt2, LoraConfig(target_modules="all-linear"))
    assert g.peft_config["default"].fan_in_fan_out is True
    assert type(g.get_base_model().lm_head) is torch.nn.Linear


def test_layers_to_transform(llama):
    model = get_adapter_model(llama, LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]))
    layers = model.get_base_model().model.layers
    assert type(layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(layers[1].self_attn.q_proj).__name__ == "LoraLinear"


def test_default_targets_for_known_model_type(llama):
    model = get_adapter_model(llama, LoraConfig())
    attn = model.get_base_model().model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == "LoraLinear" and type(attn.v_proj).__name__ == "LoraLinear"
    assert type(attn.k_proj) is torch.nn.Linear


# ---------------------------------------------------------------------- files and state dicts
def test_state_dict_round_trip_and_rename(llama, llama_base, input_ids, fwd):
    model = get_adapter_model(llama, LoraConfig(target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    state = model.adapter_state_dict()
    assert all(k.startswith("base_model.model.") for k in state)
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in state
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    assert all(t.device.type == "cpu" for t in state.values())
    expected = fwd(model, input_ids)
    # load under another name into a fresh model
    fresh = get_adapter_model(
        copy.deepcopy(llama_base), LoraConfig(target_modules=["q_proj", "embed_tokens"]), adapter_name="renamed"
    )
    assert (fwd(fresh, input_ids) - expected).abs().max() > 1e-3
    result = fresh.load_adapter_state_dict(state, "renamed")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(fwd(fresh, input_ids), expected)
    # the copy is detached from the live parameters
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].zero_()
    assert torch.equal(fwd(model, input_ids), expected)


def test_shape_mismatch_names_the_layer(llama, llama_base, tmp_path):
    get_adapter_model(llama, LoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
    other = copy.deepcopy(llama_base)
    # a "different base": q_proj of layer 0 takes 64 inputs
    other.model.layers[0].self_attn.q_proj = torch.nn.Linear(64, 32, bias=False)
    with pytest.raises(ValueError) as info:
        AdapterModel.from_pretrained(other, tmp_path)
    assert str(info.value) == (
        "adapter for a different base? base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight: "
        "saved (8, 32) vs model (8, 64)"
    )


def test_missing_adapter_weights_raise(llama, llama_base):
    model = get_adapter_model(llama, LoraConfig(target_modules=["q_proj"]))
    state = model.adapter_state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(ValueError, match="lacks 1 adapter weight"):
        model.load_adapter_state_dict(state)


def test_pickle_weights_refused_unless_allowed(llama, llama_base, tmp_path, input_ids, fwd):
    model = get_adapter_model(llama, LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    expected = fwd(model, input_ids)
    torch.save(model.adapter_state_dict(), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="pickle"):
        AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path, allow_pickle=True)
    assert torch.equal(fwd(loaded, input_ids), expected)


def test_folder_without_weights(llama, tmp_path):
    LoraConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        AdapterModel.from_pretrained(llama, tmp_path)


def test_adapter_dtype_override(llama):
    model = get_adapter_model(llama.to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]), adapter_dtype=torch.float32)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------- hygiene
FORBIDDEN = {"peft", "ray", "deepspeed", "mlflow", "datasets", "pipeline", "tune"}


def test_adapters_imports_no_forbidden_package():
    for path in ADAPTERS_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & FORBIDDEN, f"{path.name} imports {roots & FORBIDDEN}"
