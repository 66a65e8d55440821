"""Checkpoints move both ways between raypeft and peft with identical logits."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch

from raypeft.adapters import AdapterModel, LoraConfig, get_adapter_model

peft = pytest.importorskip("peft")

TOL = 1e-5
DEFAULTS = dict(r=4, lora_alpha=8, init_lora_weights=False)

LLAMA_CASES = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "all_linear": dict(target_modules="all-linear"),
    "regex": dict(target_modules=r".*layers\.1\.(self_attn\.(k|o)_proj|mlp\.down_proj)"),
    "rslora_dropout": dict(target_modules=["up_proj", "gate_proj"], use_rslora=True, r=6, lora_alpha=3, lora_dropout=0.1),
    "embedding_and_modules_to_save": dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
    "layers_to_transform": dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "patterns": dict(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32}),
}
GPT2_CASES = {
    "c_attn": dict(target_modules=["c_attn"]),
    "all_linear_bias_all": dict(target_modules="all-linear", bias="all"),
    "lora_only_bias": dict(target_modules=["c_fc", "c_proj"], bias="lora_only"),
    "embedding": dict(target_modules=["wte", "c_attn"]),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _perturb_biases(model: torch.nn.Module) -> None:
    """Give trainable biases a value of their own, as training would, so saving them matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)


def _to_peft(base, kwargs, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    ours = _quiet(get_adapter_model, copy.deepcopy(base), LoraConfig(**{**DEFAULTS, **kwargs}))
    _perturb_biases(ours)
    ours.eval()
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
    ours_out = fwd(ours, input_ids)
    assert (ours_out - fwd(base, input_ids)).abs().max() > 1e-3, "adapter had no effect; the test would prove nothing"
    assert (ours_out - fwd(theirs, input_ids)).abs().max() <= TOL


def _from_peft(base, kwargs, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    theirs = _quiet(
        peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**{**DEFAULTS, **kwargs})
    )
    _perturb_biases(theirs)
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = _quiet(AdapterModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    theirs_out = fwd(theirs, input_ids)
    assert (theirs_out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - theirs_out).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_raypeft_to_peft(case, llama_base, input_ids, fwd, tmp_path):
    _to_peft(llama_base, LLAMA_CASES[case], input_ids, fwd, tmp_path)


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_peft_to_raypeft(case, llama_base, input_ids, fwd, tmp_path):
    _from_peft(llama_base, LLAMA_CASES[case], input_ids, fwd, tmp_path)


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_gpt2_raypeft_to_peft(case, gpt2_base, input_ids, fwd, tmp_path):
    _to_peft(gpt2_base, GPT2_CASES[case], input_ids, fwd, tmp_path)


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_gpt2_peft_to_raypeft(case, gpt2_base, input_ids, fwd, tmp_path):
    _from_peft(gpt2_base, GPT2_CASES[case], input_ids, fwd, tmp_path)


def test_sequence_classification_head_is_saved_both_ways(llama_cls_base, input_ids, fwd, tmp_path):
    kwargs = dict(target_modules=["v_proj"], task_type="SEQ_CLS")
    torch.manual_seed(1)
    ours = get_adapter_model(copy.deepcopy(llama_cls_base), LoraConfig(r=4, init_lora_weights=False, **kwargs))
    assert ours.peft_config["default"].modules_to_save == ["classifier", "score"]
    with torch.no_grad():
        ours.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    ours.eval().save_pretrained(tmp_path / "ours")
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_cls_base), str(tmp_path / "ours")).eval()
    assert (fwd(ours, input_ids) - fwd(theirs, input_ids)).abs().max() <= TOL

    _quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    back = AdapterModel.from_pretrained(copy.deepcopy(llama_cls_base), tmp_path / "theirs").eval()
    assert (fwd(back, input_ids) - fwd(theirs, input_ids)).abs().max() <= TOL


def test_t5_seq2seq_round_trip(t5_base, tmp_path):
    ids = torch.randint(1, 100, (2, 6))
    dec = torch.randint(1, 100, (2, 4))
    torch.manual_seed(1)
    ours = get_adapter_model(
        copy.deepcopy(t5_base), LoraConfig(target_modules=["q", "v"], init_lora_weights=False, task_type="SEQ_2_SEQ_LM")
    ).eval()
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(t5_base), str(tmp_path)).eval()
    with torch.no_grad():
        a = ours(input_ids=ids, decoder_input_ids=dec).logits
        b = theirs(input_ids=ids, decoder_input_ids=dec).logits
        c = t5_base(input_ids=ids, decoder_input_ids=dec).logits
    assert (a - c).abs().max() > 1e-3
    assert (a - b).abs().max() <= TOL


def test_saved_keys_match_peft_state_dict(llama_base, gpt2_base):
    """Same model, same config: raypeft's adapter_state_dict keys are exactly peft's."""
    for base, kwargs in (
        (llama_base, dict(target_modules="all-linear", modules_to_save=["lm_head"])),
        (gpt2_base, dict(target_modules=["c_attn", "c_proj"], bias="all")),
    ):
        ours = _quiet(get_adapter_model, copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**kwargs))
        peft_sd = _quiet(peft.get_peft_model_state_dict, theirs)
        ours_sd = ours.adapter_state_dict()
        assert set(ours_sd) == set(peft_sd)
        assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)


def test_saved_config_is_readable_by_peft(llama, tmp_path):
    model = get_adapter_model(
        llama, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True, task_type="CAUSAL_LM")
    )
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["inference_mode"] is True
    cfg = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora, list(cfg.target_modules)) == (4, 16, True, ["q_proj"])
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
