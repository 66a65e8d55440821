"""Every adapter method as ``adapter.method`` in the YAML: its fields, errors, library config and hooks."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from raypeft.pipeline.config import ConfigError, load_config, parse_config
from raypeft.pipeline.modeling import adapter_config

REPO = Path(__file__).resolve().parents[2]

# method -> (YAML fields, library config class, fields checked on it, registry tags)
METHODS = {
    "lora": ({"r": 4, "use_dora": True}, "LoraConfig", {"r": 4, "use_dora": True, "target_modules": "all-linear"},
             {"method": "lora", "r": 4, "lora_alpha": 8, "use_dora": True}),  # PEFT's lora_alpha default
    "ia3": ({}, "IA3Config", {"target_modules": None, "feedforward_modules": None, "init_ia3_weights": True},
            {"method": "ia3"}),
    "loha": ({"r": 4, "alpha": 8, "rank_dropout": 0.1}, "LoHaConfig", {"r": 4, "alpha": 8, "rank_dropout": 0.1},
             {"method": "loha", "r": 4, "alpha": 8}),
    "lokr": ({"r": 2, "decompose_both": True, "decompose_factor": 4}, "LoKrConfig",
             {"r": 2, "decompose_both": True, "decompose_factor": 4}, {"method": "lokr", "r": 2, "alpha": 8}),
    "adalora": ({"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2}, "AdaLoraConfig",
                {"init_r": 6, "target_r": 2, "total_step": 4, "orth_reg_weight": 0.5},
                {"method": "adalora", "init_r": 6, "target_r": 2}),
    "bottleneck": ({"bottleneck_size": 16, "placement": "pfeiffer"}, "BottleneckConfig",
                   {"bottleneck_size": 16, "placement": "pfeiffer", "non_linearity": "relu"},
                   {"method": "bottleneck", "placement": "pfeiffer", "bottleneck_size": 16}),
    "adaption_prompt": ({"adapter_len": 4, "adapter_layers": 2}, "AdaptionPromptConfig",
                        {"adapter_len": 4, "adapter_layers": 2},
                        {"method": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2}),
    "multitask_prompt": ({"num_virtual_tokens": 5, "num_tasks": 3, "num_ranks": 2, "task_id": 1},
                         "MultitaskPromptTuningConfig", {"num_virtual_tokens": 5, "num_tasks": 3, "num_ranks": 2},
                         {"method": "multitask_prompt", "num_virtual_tokens": 5, "num_tasks": 3}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_maps_to_its_library_config(method: str) -> None:
    fields, class_name, expected, tags = METHODS[method]
    cfg = parse_config({"adapter": {"method": method, **fields}})
    lib = adapter_config(cfg.adapter, cfg.model)
    assert type(lib).__name__ == class_name
    for key, value in expected.items():
        assert getattr(lib, key) == value, key
    assert cfg.adapter.registry_tags() == tags
    assert "task_id" not in cfg.adapter.adapter_kwargs() and "init_from" not in cfg.adapter.adapter_kwargs()


def test_llama_adapter_is_an_alias_of_adaption_prompt() -> None:
    cfg = parse_config({"adapter": {"method": "llama_adapter", "adapter_layers": 3}})
    assert cfg.adapter.method == "adaption_prompt" and cfg.adapter.adapter_len == 10
    assert type(adapter_config(cfg.adapter, cfg.model)).__name__ == "AdaptionPromptConfig"
    again = parse_config(cfg.model_dump())  # what a worker re-validates
    assert again.adapter.method == "adaption_prompt"


@pytest.mark.parametrize("data, expected", [
    ({"adapter": {"method": "ia3", "r": 4}}, "adapter.r: unknown key; it is not a field of method 'ia3'"),
    ({"adapter": {"method": "loha", "alpah": 4}}, "adapter.alpah: unknown key; did you mean 'alpha'?"),
    ({"adapter": {"method": "lokr", "decompose_factor": 0}},
     "adapter.decompose_factor: must be -1 (balanced) or a positive integer"),
    ({"adapter": {"method": "lokr", "init_weights": "kaiming"}}, "adapter.init_weights: input should be True, False or 'lycoris'"),
    ({"adapter": {"method": "adalora", "init_r": 4, "target_r": 8}},
     "adapter.target_r: must not exceed adapter.init_r (4): the rank budget only shrinks"),
    ({"adapter": {"method": "adalora", "tinit": 5, "tfinal": 5, "total_step": 10}},
     "adapter.total_step: must exceed adapter.tinit + adapter.tfinal (5 + 5)"),
    ({"adapter": {"method": "adalora", "beta1": 1.0}}, "adapter.beta1: input should be less than 1"),
    ({"adapter": {"method": "bottleneck", "bottleneck_size": 8, "reduction_factor": 4}},
     "adapter.reduction_factor: set adapter.bottleneck_size or adapter.reduction_factor, not both"),
    ({"adapter": {"method": "bottleneck", "placement": "parallel"}},
     "adapter.placement: input should be 'houlsby' or 'pfeiffer'"),
    ({"adapter": {"method": "bottleneck", "non_linearity": "tanh"}},
     "adapter.non_linearity: input should be 'relu', 'gelu' or 'silu'"),
    ({"adapter": {"method": "adaption_prompt"}}, "adapter.adapter_layers: field required"),
    ({"adapter": {"method": "llama_adapter", "adapter_layers": 0}},
     "adapter.adapter_layers: input should be greater than 0"),
    ({"adapter": {"method": "multitask_prompt", "num_tasks": 0}}, "adapter.num_tasks: input should be greater than 0"),
    ({"adapter": {"method": "multitask_prompt", "num_tasks": 2, "task_id": 2}},
     "adapter.task_id: must be below adapter.num_tasks (2), got 2"),
    ({"adapter": {"method": "multitask_prompt", "task_id": 0}, "data": {"columns": {"task_id": "task"}}},
     "adapter.task_id: set a fixed task id or data.columns.task_id, not both"),
    ({"adapter": {"method": "multitask_prompt"}, "stages": ["sft", "dpo"]},
     "adapter.method: multitask_prompt needs task ids in every batch, which only the sft stage feeds"),
    ({"data": {"columns": {"task_id": "task"}}},
     "data.columns.task_id: only adapter.method multitask_prompt reads task ids (method is 'lora')"),
    ({"adapter": {"method": "adalora"}, "deepspeed": "zero2"}, "deepspeed: adapter.method adalora allocates ranks"),
])
def test_bad_method_fields_name_field_and_problem(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_library_checks_surface_as_one_config_line(tmp_path: Path) -> None:
    cfg = parse_config({"adapter": {"method": "multitask_prompt", "num_tasks": 2,
                                    "prompt_tuning_init": "EXACT_SOURCE_TASK",
                                    "prompt_tuning_init_state_dict_path": "src.safetensors"}})
    assert Path(cfg.adapter.prompt_tuning_init_state_dict_path).is_absolute()  # workers run elsewhere
    with pytest.raises(ConfigError, match=r"^adapter: MultitaskPromptTuningConfig: .* num_tasks must be 1"):
        adapter_config(cfg.adapter, cfg.model)


def test_yaml_override_selects_each_method() -> None:
    for method, (fields, *_rest) in METHODS.items():
        inline = ", ".join(f"{k}: {json.dumps(v)}" for k, v in {"method": method, **fields}.items())
        cfg = load_config(REPO / "configs" / "quickstart.yaml", ["stages=[sft]", f"adapter={{{inline}}}"])
        assert cfg.adapter.method == method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_fits_the_demo_model_before_ray_starts(method: str) -> None:
    from raypeft.pipeline.modeling import check_adapter_targets

    fields = METHODS[method][0]
    cfg = parse_config({"adapter": {"method": method, **fields}})
    check_adapter_targets(cfg.adapter, cfg.model)  # builds it on the demo's weightless skeleton
    bad = parse_config({"adapter": {"method": "adaption_prompt", "adapter_layers": 9}})
    with pytest.raises(ConfigError, match="adapter_layers=9 but the model has only 4"):
        check_adapter_targets(bad.adapter, bad.model)


# ---------------------------------------------------------------------- the loop's hooks
def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def test_adalora_hooks_fill_total_step_regularise_and_allocate() -> None:
    from raypeft.adapters import get_adapter_model, orthogonal_regularization
    from raypeft.pipeline.adapter_hooks import AdaLoraHooks, adapter_hooks
    from raypeft.pipeline.modeling import adapter_config

    cfg = parse_config({"adapter": {"method": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2,
                                    "target_modules": ["q_proj", "v_proj"]}})
    model = get_adapter_model(_tiny_llama(), adapter_config(cfg.adapter, cfg.model))
    hooks = adapter_hooks(model, cfg, total_steps=8, train_rows=[None] * 4)
    assert isinstance(hooks, AdaLoraHooks) and model.peft_config["default"].total_step == 8
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(1, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    for step in range(8):
        extra = hooks.loss_extra()
        assert torch.allclose(extra, orthogonal_regularization(model))
        loss = model(input_ids=data, labels=data, **hooks.inputs([0, 1, 2, 3])).loss + extra
        loss.backward()
        hooks.before_step(step)
        optimizer.step()
        hooks.after_step(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    kept = [sum(mask) for mask in pattern.values()]
    assert len(kept) == 4 and sum(kept) == 2 * 4  # target_r on average, from step total - tfinal on
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    mask = torch.tensor(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert torch.all(layer.lora_E["default"][~mask] == 0)
    fixed = parse_config({"adapter": {"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 50,
                                      "target_modules": ["q_proj"]}})
    other = get_adapter_model(_tiny_llama(), adapter_config(fixed.adapter, fixed.model))
    adapter_hooks(other, fixed, total_steps=8, train_rows=[])
    assert other.peft_config["default"].total_step == 50  # the YAML's own value is kept
    short = parse_config({"adapter": {"method": "adalora", "tinit": 3, "tfinal": 3, "target_modules": ["q_proj"]}})
    with pytest.raises(ValueError, match=r"adapter.tinit / adapter.tfinal: the AdaLoRA schedule has 5 steps"):
        adapter_hooks(get_adapter_model(_tiny_llama(), adapter_config(short.adapter, short.model)), short,
                      total_steps=5, train_rows=[])


def test_task_ids_from_a_column_or_a_fixed_id() -> None:
    from datasets import Dataset

    from raypeft.adapters import LoraConfig, get_adapter_model
    from raypeft.pipeline.adapter_hooks import AdapterHooks, TaskIdHooks, adapter_hooks, row_task_ids

    rows = Dataset.from_dict({"dialogue": ["a", "b", "c"], "summary": ["x", "y", "z"], "task": [2, 0, 1]})
    column = parse_config({"adapter": {"method": "multitask_prompt", "num_virtual_tokens": 2, "num_tasks": 3},
                           "data": {"columns": {"task_id": "task"}}})
    model = get_adapter_model(_tiny_llama(), adapter_config(column.adapter, column.model))
    hooks = adapter_hooks(model, column, total_steps=3, train_rows=rows)
    assert isinstance(hooks, TaskIdHooks)
    assert hooks.inputs([2, 0])["task_ids"].tolist() == [1, 2]
    assert hooks.loss_extra() == 0.0
    fixed = parse_config({"adapter": {"method": "multitask_prompt", "num_virtual_tokens": 2, "num_tasks": 3,
                                      "task_id": 2}})
    assert row_task_ids(model, fixed, rows) == [2, 2, 2]
    bad_rows = Dataset.from_dict({"task": [0, 3]})
    with pytest.raises(ValueError, match=r"data.columns.task_id: row 1 of column 'task' holds 3; expected an "
                                         r"integer in \[0, 3\)"):
        row_task_ids(model, column, bad_rows)
    lora = get_adapter_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert row_task_ids(lora, fixed, rows) is None
    assert type(adapter_hooks(lora, parse_config({}), total_steps=3, train_rows=rows)) is AdapterHooks


def test_generate_responses_hands_each_batch_its_rows_inputs() -> None:
    from raypeft.pipeline.evaluation import generate_responses

    seen: list[list[int]] = []

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, attention_mask, task_ids, **kwargs):
            seen.append(task_ids.tolist())
            return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), 5)], dim=1)

    class Tok:
        pad_token_id, eos_token_id, padding_side = 0, 1, "right"

        def __call__(self, texts, return_tensors, padding):
            width = max(len(t) for t in texts)
            ids = torch.tensor([[0] * (width - len(t)) + [7] * len(t) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids != 0).long()}

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["ok" for _ in rows]

        def decode(self, row, skip_special_tokens=True):
            return "ok"

    prompts = ["a", "bbb", "cc", "dddd"]  # generated longest first: 3, 1, 2, 0
    out = generate_responses(Recorder(), Tok(), prompts, max_new_tokens=1, batch_size=2, device="cpu",
                             row_inputs={"task_ids": torch.tensor([10, 11, 12, 13])})
    assert seen == [[13, 11], [12, 10]] and len(out) == 4
