"""The adapter-method registry and the field constraints, as the library alone sees them (no pydantic)."""

from __future__ import annotations

import pytest

from raypeft.adapters import (METHODS, AdaptionPromptConfig, BottleneckConfig, LoKrConfig, PromptTuningConfig,
                              method_for_peft_type, method_named, method_names)
from raypeft.adapters.config import registered_peft_types


def test_every_loadable_peft_type_has_exactly_one_method() -> None:
    assert sorted(m.peft_type for m in METHODS) == registered_peft_types()
    for method in METHODS:
        assert method_for_peft_type(method.peft_type.lower()) is method
        assert all(method_named(name) is method for name in method.names)
    assert method_for_peft_type("VERA") is None
    assert method_names()[:5] == ["lora", "prompt", "prefix", "ptuning", "ia3"]


def test_alias_is_the_canonical_method() -> None:
    assert method_named("llama_adapter").name == "adaption_prompt"
    assert "llama_adapter" not in method_names(aliases=False)
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        method_named("nope")


def test_registry_tags_leave_out_unset_and_false_values() -> None:
    lora = method_named("lora")
    assert lora.registry_tags({"r": 4, "lora_alpha": 8, "use_dora": False}) == {"method": "lora", "r": 4, "lora_alpha": 8}
    bottleneck = method_named("bottleneck")
    assert bottleneck.registry_tags(BottleneckConfig().to_dict()) == {
        "method": "bottleneck", "placement": "houlsby", "reduction_factor": 16}
    assert bottleneck.registry_tags({"placement": "pfeiffer", "bottleneck_size": 8}) == {
        "method": "bottleneck", "placement": "pfeiffer", "bottleneck_size": 8}


@pytest.mark.parametrize("build, message", [
    (lambda: LoKrConfig(decompose_factor=0), "LoKrConfig: decompose_factor must be -1 (balanced) or a positive integer, got 0"),
    (lambda: AdaptionPromptConfig(), "AdaptionPromptConfig: adapter_layers must be a positive integer, got None"),
    (lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init_text=" "),
     "PromptTuningConfig: prompt_tuning_init_text must not be blank, got ' '"),
    (lambda: BottleneckConfig(bottleneck_size=4, reduction_factor=2),
     "BottleneckConfig: reduction_factor: set bottleneck_size or reduction_factor, not both, got 2"),
])
def test_declared_constraints_fail_as_one_line(build, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message
