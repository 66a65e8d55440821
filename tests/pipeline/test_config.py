"""The YAML boundary: every bad input is one line naming the field, nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from raypeft.pipeline.config import ConfigError, apply_overrides, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"adapter": {"r": 0}}, "adapter.r: input should be greater than 0, got 0"),
        ({"adapter": {"r": -3}}, "adapter.r: input should be greater than 0"),
        ({"adapter": {"r": "eight"}}, "adapter.r: input should be a valid integer"),
        ({"adapter": {"rr": 4}}, "adapter.rr: unknown key; did you mean 'r'?"),
        ({"adapter": {"lora_dropout": 1.0}}, "adapter.lora_dropout: input should be less than 1"),
        ({"adapter": {"lora_dropout": -0.1}}, "adapter.lora_dropout: input should be greater than or equal to 0"),
        ({"adapter": {"num_virtual_tokens": 8}}, "adapter.num_virtual_tokens: unknown key; it is not a field of method 'lora'"),
        ({"adapter": {"method": "nope"}}, "adapter.method: unknown method 'nope'; expected one of lora, prompt, prefix, ptuning, ia3"),
        ({"adapter": {"method": "prompt", "r": 8}}, "adapter.r: unknown key; it is not a field of method 'prompt'"),
        ({"adapter": {"method": "prefix", "num_virtual_tokens": 0}},
         "adapter.num_virtual_tokens: input should be greater than 0, got 0"),
        ({"adapter": {"method": "ptuning", "encoder_reparameterization_type": "GRU"}},
         "adapter.encoder_reparameterization_type: input should be 'MLP' or 'LSTM'"),
        ({"adapter": {"method": "prompt", "prompt_tuning_init": "WORDS"}},
         "adapter.prompt_tuning_init: input should be 'RANDOM', 'TEXT' or 'SAMPLE_VOCAB'"),
        ({"adapter": {"method": "prefix", "num_virtual_tokns": 4}},
         "adapter.num_virtual_tokns: unknown key; did you mean 'num_virtual_tokens'?"),
        ({"adapter": {"bias": "some"}}, "adapter.bias: input should be 'none', 'all' or 'lora_only'"),
        ({"sft": {"learning_rate": 0}}, "sft.learning_rate: input should be greater than 0"),
        ({"sft": {"batch_size": 2.5}}, "sft.batch_size: input should be a valid integer"),
        ({"sft": {"epocs": 1}}, "sft.epocs: unknown key; did you mean 'epochs'?"),
        ({"scalling": {}}, "scalling: unknown key; did you mean 'scaling'?"),
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers: input should be greater than 0"),
        ({"data": {"prompt_template": "no placeholder"}}, "data.prompt_template: must contain '{prompt}'"),
        ({"data": {"max_length": 4}}, "data.max_length: input should be greater than 8"),
        ({"data": {"columns": {"promt": "x"}}}, "data.columns.promt: unknown key; did you mean 'prompt'?"),
        ({"model": {"task_type": "SEQ_CLS"}}, "model.task_type: input should be 'CAUSAL_LM' or 'SEQ_2_SEQ_LM'"),
        ({"stages": []}, "stages: list should have at least 1 item after validation"),
        ({"stages": ["train"]}, "stages.0: input should be 'sft'"),
        ({"name": "has space"}, "name: must be letters, digits"),
        ({"tracking": {"register": "maybe"}}, "tracking.register: input should be a valid boolean"),
    ],
)
def test_bad_values_name_field_and_problem(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_defaults_are_a_valid_lora_sft_run() -> None:
    cfg = parse_config({})
    assert cfg.adapter.method == "lora" and cfg.stages == ["sft"]
    assert cfg.adapter.adapter_kwargs()["r"] == 8


def test_method_defaults_to_lora_when_omitted() -> None:
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}})
    assert cfg.adapter.method == "lora" and cfg.adapter.r == 4


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nadapter:\n  r: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+, column \d+"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        load_config(tmp_path / "list.yaml")


def test_set_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nadapter:\n  r: 4\n")
    cfg = load_config(path, ["adapter.r=16", "adapter.target_modules=[q_proj, v_proj]", "sft.learning_rate=1e-3",
                             "tracking.register=false"])
    assert cfg.adapter.r == 16
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    assert cfg.sft.learning_rate == pytest.approx(1e-3)
    assert cfg.tracking.register_adapter is False


@pytest.mark.parametrize("override, expected", [
    ("adapter.r", "--set adapter.r: expected dotted.key=value"),
    ("name.x=1", "--set name.x=1: 'name' is a str, not a section"),
    ("a..b=1", "--set a..b=1: empty key segment"),
])
def test_bad_overrides(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({"name": "n"}, [override])
    assert str(info.value) == expected


def test_tracking_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_config({}).tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert parse_config({}).tracking_uri() == "http://127.0.0.1:5000"
    assert parse_config({"tracking": {"uri": "sqlite:////x.db"}}).tracking_uri() == "sqlite:////x.db"


def test_shipped_configs_are_valid() -> None:
    """Every run config under configs/ loads; sweep files (they name a ``base_config``) are
    checked by tests/tune/test_tune_schema.py."""
    configs = [p for p in sorted((REPO / "configs").glob("*.yaml"))
               if "base_config" not in yaml.safe_load(p.read_text())]
    assert configs, "configs/ holds no run config"
    for path in configs:
        load_config(path)


@pytest.mark.parametrize("method, config_class, fields", [
    ("prompt", "PromptTuningConfig", {"num_virtual_tokens": 12}),
    ("prefix", "PrefixTuningConfig", {"num_virtual_tokens": 6, "prefix_projection": True, "encoder_hidden_size": 32}),
    ("ptuning", "PromptEncoderConfig", {"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM"}),
])
def test_virtual_token_methods_map_to_library_configs(method: str, config_class: str, fields: dict) -> None:
    from raypeft.pipeline.modeling import adapter_config

    cfg = parse_config({"adapter": {"method": method, **fields}, "model": {"task_type": "SEQ_2_SEQ_LM"}})
    lib = adapter_config(cfg.adapter, cfg.model)
    assert type(lib).__name__ == config_class
    assert lib.task_type == "SEQ_2_SEQ_LM"
    for key, value in fields.items():
        assert getattr(lib, key) == value
    assert cfg.adapter.registry_tags() == {"method": method, "num_virtual_tokens": fields["num_virtual_tokens"]}


def test_prompt_tuning_text_init_needs_text_and_uses_the_model_tokenizer() -> None:
    from raypeft.pipeline.modeling import adapter_config

    cfg = parse_config({"model": {"name_or_path": "/models/m", "tokenizer": "/models/tok"},
                        "adapter": {"method": "prompt", "prompt_tuning_init": "TEXT",
                                    "prompt_tuning_init_text": "Summarize the chat"}})
    lib = adapter_config(cfg.adapter, cfg.model)
    assert lib.tokenizer_name_or_path == "/models/tok" and lib.prompt_tuning_init_text == "Summarize the chat"
    bare = parse_config({"adapter": {"method": "prompt", "prompt_tuning_init": "TEXT"}})
    with pytest.raises(ConfigError, match="adapter.prompt_tuning_init_text: required"):
        adapter_config(bare.adapter, bare.model)


def test_quantization_block_maps_to_bitsandbytes_config() -> None:
    import torch

    from raypeft.pipeline.modeling import quantization_config

    cfg = parse_config({"model": {"quantization": {"bits": 4, "bnb_4bit_quant_type": "fp4",
                                                   "bnb_4bit_quant_storage": "bfloat16"}}})
    q = quantization_config(cfg.model)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and q.bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(parse_config({"model": {"quantization": {"bits": 8}}}).model).load_in_8bit
    assert quantization_config(parse_config({}).model) is None
    with pytest.raises(ConfigError, match="model.quantization.bits: input should be 4 or 8"):
        parse_config({"model": {"quantization": {"bits": 3}}})
