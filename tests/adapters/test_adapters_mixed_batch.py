"""Mixed-adapter batches: each row of one forward/generate uses its own adapter (``adapter_names``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from raypeft.adapters import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    BottleneckConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PromptTuningConfig,
    get_adapter_model,
)
from raypeft.adapters.lora import LoraLinear

TOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _model(base, configs: dict):
    """``base`` copy carrying ``configs`` (name -> config), every adapter non-trivial."""
    torch.manual_seed(0)
    names = list(configs)
    model = _quiet(get_adapter_model, copy.deepcopy(base), configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        _quiet(model.add_adapter, name, configs[name])
    with torch.no_grad():  # zero-initialised parts (gates, up-projections) made non-zero
        for pname, param in model.named_parameters():
            if "adaption_gate" in pname or "adapter_up" in pname:
                param.normal_(0, 0.5)
    return model.eval()


def _alone(model, name: str, fn):
    """``fn()`` with only ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return fn()
    model.set_adapter(name)
    return fn()


def _check_rows(model, input_ids, names):
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names).logits
        for i, name in enumerate(names):
            alone = _alone(model, name, lambda: model(input_ids=input_ids[i : i + 1]).logits)
            assert (mixed[i : i + 1] - alone).abs().max() <= TOL, name
    return mixed


LLAMA_CASES = {
    "lora_ranks_targets_dora": {
        "a": LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        "b": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, use_dora=True),
        "c": LoraConfig(r=3, target_modules=["embed_tokens", "v_proj"], init_lora_weights=False),
    },
    "lora_modules_to_save": {
        "a": LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"]),
        "b": LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False, modules_to_save=["lm_head"]),
    },
    "ia3": {
        "a": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                       init_ia3_weights=False),
        "b": IA3Config(init_ia3_weights=False),
    },
    "loha": {
        "a": LoHaConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False),
        "b": LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False),
    },
    "lokr": {
        "a": LoKrConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False),
        "b": LoKrConfig(r=4, target_modules=["up_proj"], init_weights=False),
    },
    "adalora": {
        "a": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False),
        "b": AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["v_proj"], init_lora_weights=False),
    },
    "bottleneck": {
        "a": BottleneckConfig(bottleneck_size=4, init_weights=False),
        "b": BottleneckConfig(bottleneck_size=2, placement="pfeiffer", non_linearity="gelu", init_weights=False),
    },
    "llama_adapter": {
        "a": AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
        "b": AdaptionPromptConfig(adapter_len=5, adapter_layers=1),
    },
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_rows_equal_each_row_alone(case, llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES[case])
    names = list(LLAMA_CASES[case])
    batch = torch.cat([input_ids, input_ids.flip(0)])[: len(names) + 1]
    rows = (names + ["__base__"])[: batch.shape[0]]
    rows = [rows[-1]] + rows[:-1]  # base first: routing must not depend on order
    mixed = _check_rows(model, batch, rows)
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(input_ids=batch).logits
    for i, name in enumerate(rows):  # every adapter really changes its rows
        assert ((mixed[i] - base_logits[i]).abs().max() > 1e-4) == (name != "__base__"), name


def test_gpt2_conv1d_and_same_adapter_in_several_rows(gpt2_base, input_ids):
    configs = {
        "a": LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
        "b": LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False),
    }
    model = _model(gpt2_base, configs)
    batch = torch.cat([input_ids, input_ids, input_ids])[:5]
    _check_rows(model, batch, ["b", "a", "b", "__base__", "a"])


def test_generate_rows_equal_each_row_alone(llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES["lora_ranks_targets_dora"])
    names = ["c", "__base__", "a", "b"]
    batch = torch.cat([input_ids, input_ids.flip(0)])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=batch, adapter_names=names, **kw)
        for i, name in enumerate(names):
            alone = _alone(model, name, lambda: model.generate(input_ids=batch[i : i + 1], **kw))
            assert torch.equal(mixed[i : i + 1], alone), name
        # beam search and several returned sequences expand every row in place
        beams = model.generate(input_ids=batch, adapter_names=names, num_beams=2, num_return_sequences=2, **kw)
        for i, name in enumerate(names):
            alone = _alone(model, name, lambda: model.generate(
                input_ids=batch[i : i + 1], num_beams=2, num_return_sequences=2, **kw))
            assert torch.equal(beams[2 * i : 2 * i + 2], alone), name


def test_llama_adapter_generate_with_cache(llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES["llama_adapter"])
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=["b", "a"], **kw)
        for i, name in enumerate(["b", "a"]):
            alone = _alone(model, name, lambda: model.generate(input_ids=input_ids[i : i + 1], **kw))
            assert torch.equal(mixed[i : i + 1], alone), name


def test_gradients_reach_each_rows_adapter(llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES["lora_ranks_targets_dora"])
    model.train()
    names = ["a", "b", "a", "__base__"]
    batch = torch.cat([input_ids, input_ids.flip(0)])
    weights = torch.randn(4, batch.shape[1], 100, generator=torch.Generator().manual_seed(0))

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    for p in model.parameters():
        p.requires_grad_(False)
    adapter_params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapter_params:
        p.requires_grad_(True)
    (model(input_ids=batch, adapter_names=names).logits * weights).sum().backward()
    mixed = grads()
    for name in ("a", "b"):  # the same loss, split by adapter and run one adapter at a time
        rows = [i for i, n in enumerate(names) if n == name]
        model.set_adapter(name)
        for p in adapter_params:
            p.requires_grad_(True)
        (model(input_ids=batch[rows]).logits * weights[rows]).sum().backward()
        for key, grad in grads().items():
            if f".{name}." in key or key.endswith(f".{name}"):
                assert torch.allclose(mixed[key], grad, atol=1e-5), key
    assert any(".c." in k for k in mixed) is False  # adapter c has no rows: no gradient at all


def test_lora_runs_the_base_once_and_each_adapter_once(llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES["lora_ranks_targets_dora"])
    layer = model.get_base_model().model.layers[0].self_attn.v_proj
    assert isinstance(layer, LoraLinear)
    calls = {"base": [], "a": [], "c": []}
    layer.base_layer.register_forward_hook(lambda m, i, o: calls["base"].append(i[0].shape[0]))
    layer.lora_A["a"].register_forward_hook(lambda m, i, o: calls["a"].append(i[0].shape[0]))
    layer.lora_A["c"].register_forward_hook(lambda m, i, o: calls["c"].append(i[0].shape[0]))
    batch = torch.cat([input_ids, input_ids, input_ids])
    with torch.no_grad():
        model(input_ids=batch, adapter_names=["a", "c", "a", "b", "__base__", "a"])
    assert calls == {"base": [6], "a": [3], "c": [1]}  # b does not adapt v_proj


def test_errors(llama_base, input_ids):
    model = _model(llama_base, {"a": LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)})
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]"):
        model(input_ids=input_ids, adapter_names=["a", "nope"])
    with pytest.raises(ValueError, match="2 entries for a batch of 3 rows"):
        model(input_ids=torch.cat([input_ids, input_ids[:1]]), adapter_names=["a", "a"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=input_ids, adapter_names="a")
    model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="'p' is a virtual-token adapter"):
        model(input_ids=input_ids, adapter_names=["a", "p"])
    model.set_adapter("a")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(input_ids=input_ids, adapter_names=["a", "__base__"])
    model.unmerge_adapter()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=input_ids, adapter_names=["a", "__base__"])
    with torch.no_grad():  # inference under checkpointing is fine: nothing is recomputed
        model(input_ids=input_ids, adapter_names=["a", "__base__"])
    # routing never outlives the call
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer._routing is None


def test_matches_peft_mixed_batch_inference(llama_base, input_ids, tmp_path):
    peft = pytest.importorskip("peft")
    configs = {
        "default": LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
        "b": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    }
    model = _model(llama_base, configs)
    model.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path)).eval()
    _quiet(theirs.load_adapter, str(tmp_path / "b"), "b")
    batch = torch.cat([input_ids, input_ids.flip(0)])
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        ours = model(input_ids=batch, adapter_names=names).logits
        expected = _quiet(theirs, input_ids=batch, adapter_names=names).logits
    assert (ours - expected).abs().max() <= TOL


def test_row_groups_are_slices_for_runs_and_indices_otherwise():
    from raypeft.adapters.routing import RowRouting

    cpu = torch.device("cpu")
    stacked = RowRouting(["a", "a", "__base__", "__base__", "b", "b"]).groups(6, cpu)
    assert stacked == [("a", slice(0, 2)), ("__base__", slice(2, 4)), ("b", slice(4, 6))]
    assert RowRouting(["a", "b"]).groups(6, cpu) == [("a", slice(0, 3)), ("b", slice(3, 6))]  # rows expanded x3
    mixed = RowRouting(["a", "b", "a"]).groups(3, cpu)
    assert mixed[0][0] == "a" and torch.equal(mixed[0][1], torch.tensor([0, 2])) and mixed[1] == ("b", slice(1, 2))


@pytest.mark.parametrize("case", ["lora_ranks_targets_dora", "lora_modules_to_save", "ia3", "llama_adapter"])
def test_rows_stacked_by_adapter_equal_each_row_alone(case, llama_base, input_ids):
    """Each adapter's rows together: row runs are views, and LoRA adds its product into them
    with one GEMM."""
    model = _model(llama_base, LLAMA_CASES[case])
    names = list(LLAMA_CASES[case]) + ["__base__"]
    batch = torch.cat([input_ids, input_ids.flip(0)] * len(names))[: 2 * len(names)]
    _check_rows(model, batch, [n for n in names for _ in range(2)])


def test_gradients_with_rows_stacked_by_adapter(llama_base, input_ids):
    model = _model(llama_base, LLAMA_CASES["lora_ranks_targets_dora"])
    model.train()
    names = ["a", "a", "b", "b", "__base__", "__base__"]
    batch = torch.cat([input_ids, input_ids.flip(0), input_ids])
    weights = torch.randn(6, batch.shape[1], 100, generator=torch.Generator().manual_seed(0))
    adapter_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for p in model.parameters():
        p.requires_grad_(False)

    def train_adapters():
        for p in adapter_params.values():
            p.requires_grad_(True)

    train_adapters()
    (model(input_ids=batch, adapter_names=names).logits * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in adapter_params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for name, rows in (("a", slice(0, 2)), ("b", slice(2, 4))):
        model.set_adapter(name)
        train_adapters()
        (model(input_ids=batch[rows]).logits * weights[rows]).sum().backward()
        for key, p in adapter_params.items():
            if p.grad is not None and (f".{name}." in key or key.endswith(f".{name}")):
                assert torch.allclose(mixed[key], p.grad, atol=1e-5), key
        model.zero_grad(set_to_none=True)
    assert any(".a." in k for k in mixed) and any(".b." in k for k in mixed)
