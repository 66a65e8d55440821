"""Every registered adapter method round-trips YAML -> spec -> library config -> adapter_config.json ->
reloaded config -> registry tag, so a method added to the registry is checked end to end here."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
import transformers

from raypeft.adapters import METHODS, get_adapter_model, load_config, method_for_peft_type
from raypeft.pipeline.config import ADAPTER_SPECS, parse_config
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.workflow import _registry_tags

# peft_types this library writes that PEFT itself has no method for
OURS_ONLY = {"BOTTLENECK"}


def _tiny_llama() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _minimal_block(name: str) -> dict:
    """The method's YAML block with only the keys it requires (1 for each required integer)."""
    spec = ADAPTER_SPECS[name]
    block: dict = {"method": name}
    for key, info in spec.model_fields.items():
        if info.is_required():
            assert int in (info.annotation, *typing.get_args(info.annotation)), f"{name}.{key}: pick a value here"
            block[key] = 1
    return block


ALL_NAMES = [name for method in METHODS for name in method.names]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_method_round_trips_to_its_registry_tag(name: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    method = METHODS[[i for i, m in enumerate(METHODS) if name in m.names][0]]
    cfg = parse_config({"adapter": _minimal_block(name), "stages": ["sft"]})
    assert cfg.adapter.method == method.name  # an alias validates to its canonical name
    lib = adapter_config(cfg.adapter, cfg.model)
    assert type(lib) is method.config_class

    model = get_adapter_model(_tiny_llama(), lib)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == method.peft_type
    assert saved["peft_type"] in {t.value for t in peft.PeftType} | OURS_ONLY
    for key in method.user_fields:  # what the YAML set is what the file says (unset ones: from the model)
        if getattr(cfg.adapter, key) is not None and key != "target_modules":
            assert saved[key] == getattr(cfg.adapter, key), key

    reloaded = load_config(tmp_path)
    assert type(reloaded) is method.config_class
    assert reloaded.to_dict() == saved
    assert method_for_peft_type(saved["peft_type"]) is method

    tags = _registry_tags(cfg, tmp_path)
    assert tags == cfg.adapter.registry_tags() and tags["method"] == method.name
    # a stage continuing this adapter under another YAML method is tagged with the adapter's method
    other = parse_config({"adapter": {"method": "prompt" if method.name == "lora" else "lora"}})
    assert _registry_tags(other, tmp_path)["method"] == method.name


def test_every_config_class_the_library_loads_has_a_yaml_method() -> None:
    from raypeft.adapters.config import registered_peft_types

    assert sorted(m.peft_type for m in METHODS) == registered_peft_types()
    assert set(ADAPTER_SPECS) == set(ALL_NAMES)


@pytest.mark.parametrize("data, expected", [
    ({"adapter": {"method": "prompt", "prompt_tuning_init_text": "  "}},
     "adapter.prompt_tuning_init_text: must not be blank, got '  '"),
    ({"adapter": {"method": "ptuning", "encoder_num_layers": 0}},
     "adapter.encoder_num_layers: input should be greater than 0, got 0"),
    ({"adapter": {"method": "lokr", "alpha": 0}}, "adapter.alpha: input should be greater than 0, got 0"),
    ({"adapter": {"method": "lora", "target_modules": None}}, "adapter.target_modules"),
])
def test_library_constraints_are_the_yaml_constraints(data: dict, expected: str) -> None:
    from raypeft.pipeline.config import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value).startswith(expected), str(info.value)


def test_yaml_defaults_are_the_library_defaults() -> None:
    for method in METHODS:
        spec, fields = ADAPTER_SPECS[method.name], method.config_class.__dataclass_fields__
        for key in method.user_fields:
            info = spec.model_fields[key]
            if info.is_required():
                continue
            library = method.user_defaults.get(key, fields[key].default)
            assert info.default == library, f"{method.name}.{key}: YAML {info.default!r} vs library {library!r}"
