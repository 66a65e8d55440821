"""Roles over one base: one copy of the base weights, role switches, value heads, checkpoints."""

from __future__ import annotations

import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import is_fake
import transformers

from raypeft.pipeline.backends import TorchBackend
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.roles import VALUE_HEAD_FILE, Roles
from raypeft.pipeline.stages import common, dpo, ppo

VOCAB = 100


def _llama(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture()
def cfg():
    return parse_config({"adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}})


def _perturb(params) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture()
def adapter_folders(tmp_path: Path, cfg) -> dict[str, Path]:
    """An SFT-like adapter and a reward model (adapter + head), trained "by hand" on another base."""
    other = Roles(_llama())
    other.add("sft", adapter_config(cfg.adapter, cfg.model), trainable=True)
    other.add("rm", adapter_config(cfg.adapter, cfg.model), trainable=True, value_head="zero")
    torch.manual_seed(1)
    _perturb(other.trainable_parameters())
    other.save("sft", tmp_path / "sft")
    other.save("rm", tmp_path / "rm")
    return {"sft": tmp_path / "sft", "reward": tmp_path / "rm"}


def _torch_backend(roles: Roles) -> TorchBackend:
    """The plain-PyTorch backend a stage builds over ``roles`` (its save/restore is the checkpoint path)."""
    return TorchBackend(roles, lr=1e-3, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=10,
                        max_grad_norm=None)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _is_tensor(o: object) -> bool:
    """A real tensor with storage; torch.compile leaves dead weakref proxies and fake tensors (also
    as parameters, whose ``data_ptr`` does not raise) in the heap."""
    try:
        return isinstance(o, torch.Tensor) and not is_fake(o) and (o.data_ptr() or True)
    except (ReferenceError, RuntimeError):
        return False


def _copies_in_memory(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """For each tensor, how many *other* live tensors anywhere in the Python heap hold a copy of it."""
    with warnings.catch_warnings():  # isinstance() touches deprecated module attributes
        warnings.simplefilter("ignore")
        live = [o for o in gc.get_objects() if _is_tensor(o)]
    counts = {}
    for name, t in tensors.items():
        counts[name] = sum(1 for o in live if o is not t and o.shape == t.shape and o.dtype == t.dtype
                           and o.data_ptr() != t.data_ptr() and torch.equal(o, t))
    return counts


def test_ppo_roles_share_one_copy_of_the_base(cfg, adapter_folders) -> None:
    # A seed no other test uses: the heap scan below must not count another test's identical model.
    base = _llama(seed=20261122)
    originals = {n: p for n, p in base.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in originals.items()}
    base_numel = sum(p.numel() for p in originals.values())

    roles = ppo.build_roles(cfg, base, {"policy": str(adapter_folders["sft"]), "reference": str(adapter_folders["sft"]),
                                        "reward": str(adapter_folders["reward"]),
                                        "critic": str(adapter_folders["reward"])})
    assert sorted(roles.roles) == ["critic", "policy", "reference", "reward"]
    ids, mask = _batch()
    roles.logits(ppo.POLICY, ids, mask)
    roles.logits(ppo.REFERENCE, ids, mask)
    roles.scores(ppo.REWARD, ids, mask)
    roles.values(ppo.CRITIC, ids, mask)

    census = roles.parameter_census()
    assert census["base_missing"] == 0 and census["other_params"] == 0
    assert census["base_params"] == len(originals) and census["base_numel"] == base_numel
    # Every base storage is reachable exactly once from the roles module, as the original object.
    found = [p for p in roles.parameters() if p.data_ptr() in set(pointers.values())]
    assert len(found) == len(originals)
    assert {id(p) for p in found} == {id(p) for p in originals.values()}
    # Four roles cost four small adapters (+2 heads), not four bases.
    assert census["role_numel"] < 0.2 * base_numel
    # Nowhere in this process is there a second tensor holding a base weight's values.
    weights = {n: p for n, p in originals.items() if p.dim() == 2}
    assert set(_copies_in_memory(weights).values()) == {0}
    spare = weights["model.embed_tokens.weight"].detach().clone()  # the detector does see a copy
    assert _copies_in_memory({"e": weights["model.embed_tokens.weight"]})["e"] == 1
    del spare


def test_role_switches_change_behaviour_not_weights(cfg, adapter_folders) -> None:
    base = _llama()
    ids, mask = _batch()
    with torch.no_grad():
        bare = base(input_ids=ids, attention_mask=mask).logits
    roles = ppo.build_roles(cfg, base, {"policy": str(adapter_folders["sft"]), "reference": None,
                                        "reward": str(adapter_folders["reward"]), "critic": None})
    assert roles.is_base(ppo.REFERENCE)
    with torch.no_grad():
        start = roles.logits(ppo.POLICY, ids, mask)
        _perturb(roles.trainable_parameters(ppo.POLICY))
        moved = roles.logits(ppo.POLICY, ids, mask)
        reference = roles.logits(ppo.REFERENCE, ids, mask)
        critic = roles.values(ppo.CRITIC, ids, mask)
    assert not torch.allclose(start, bare)  # the policy starts from the SFT adapter
    assert not torch.allclose(moved, start)
    assert torch.allclose(reference, bare, atol=1e-6)  # reference: adapters disabled
    assert torch.count_nonzero(critic) == 0  # a fresh critic head starts at zero


def test_one_backward_reaches_policy_and_critic_only(cfg, adapter_folders) -> None:
    roles = ppo.build_roles(cfg, _llama(), {"policy": str(adapter_folders["sft"]),
                                            "reference": str(adapter_folders["sft"]),
                                            "reward": str(adapter_folders["reward"]),
                                            "critic": str(adapter_folders["reward"])})
    # The critic starts with a zero head (build_roles), which passes no gradient to its adapter
    # on the first backward; a critic some steps in does.
    _perturb(roles.trainable_parameters(ppo.CRITIC))
    ids, mask = _batch()
    loss = roles.logits(ppo.POLICY, ids, mask).logsumexp(-1).mean()
    with torch.no_grad():  # frozen roles in between must not freeze the trainable ones
        roles.scores(ppo.REWARD, ids, mask)
        roles.logits(ppo.REFERENCE, ids, mask)
    loss = loss + roles.values(ppo.CRITIC, ids, mask).pow(2).mean()
    loss.backward()
    trainable = {id(p) for p in roles.trainable_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in roles.trainable_parameters())
    for name, p in roles.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None and not p.requires_grad, name
    assert {n.split(".")[-2] for n, p in roles.named_parameters() if id(p) in trainable and "lora" in n} == \
        {"policy", "critic"}
    assert len(roles.trainable_parameters(ppo.CRITIC)) == len(roles.trainable_parameters(ppo.POLICY)) + 2  # + head


def test_value_head_file_round_trip_and_peft_reads_the_folder(cfg, adapter_folders, tmp_path: Path) -> None:
    folder = adapter_folders["reward"]
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", VALUE_HEAD_FILE}
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids, mask = _batch()
    a = Roles(_llama())
    a.add("reward", folder, trainable=False, value_head="file")
    b = Roles(_llama())
    b.add("reward", folder, trainable=False, value_head="file")
    with torch.no_grad():
        sa, sb = a.scores("reward", ids, mask), b.scores("reward", ids, mask)
    assert torch.equal(sa, sb) and sa.shape == (3,) and torch.count_nonzero(sa) == 3
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(_llama(), str(folder))
    ours = Roles(_llama())
    ours.add("reward", folder, trainable=False)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits,
                              ours.logits("reward", ids, mask), atol=1e-5)


def test_reward_input_without_value_head_fails_clearly(cfg, adapter_folders) -> None:
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        ppo.build_roles(cfg, _llama(), {"policy": None, "reference": None, "reward": str(adapter_folders["sft"]),
                                        "critic": None})


def test_scores_read_the_last_non_padding_token(cfg, adapter_folders) -> None:
    roles = Roles(_llama())
    roles.add("reward", adapter_folders["reward"], trainable=False, value_head="file")
    ids, mask = _batch()
    with torch.no_grad():
        every = roles.values("reward", ids, mask)
        scores = roles.scores("reward", ids, mask)
    assert torch.allclose(scores, torch.stack([every[0, 6], every[1, 4], every[2, 2]]))


def test_a_critic_from_the_reward_model_takes_its_adapter_and_a_zero_head(cfg, adapter_folders,
                                                                          tmp_path: Path) -> None:
    """The reward model's head scores a finished response at its last token; read at every prefix
    token as a critic it swung by more than the scores spread (quickstart: explained variance
    -3.9) and PPO's first steps followed its errors. A critic folder of its own keeps its head."""
    ids, mask = _batch()
    inputs = {"policy": str(adapter_folders["sft"]), "reference": str(adapter_folders["sft"]),
              "reward": str(adapter_folders["reward"]), "critic": str(adapter_folders["reward"])}
    roles = ppo.build_roles(cfg, _llama(), inputs)
    with torch.no_grad():
        assert torch.count_nonzero(roles.values(ppo.CRITIC, ids, mask)) == 0
        assert torch.count_nonzero(roles.scores(ppo.REWARD, ids, mask)) == 3  # the reward keeps its head
    reward_weights = roles.model.adapter_state_dict(ppo.REWARD)
    critic_weights = roles.model.adapter_state_dict(ppo.CRITIC)
    assert reward_weights.keys() == critic_weights.keys()
    assert all(torch.equal(reward_weights[k], critic_weights[k]) for k in reward_weights)  # ... and its adapter

    _perturb(roles.trainable_parameters(ppo.CRITIC))  # a critic trained by PPO, saved as its own folder
    roles.save(ppo.CRITIC, tmp_path / "critic")
    with torch.no_grad():
        trained = roles.values(ppo.CRITIC, ids, mask)
    again = ppo.build_roles(cfg, _llama(), {**inputs, "critic": str(tmp_path / "critic")})
    with torch.no_grad():
        assert torch.allclose(again.values(ppo.CRITIC, ids, mask), trained, atol=1e-6)


def test_multi_role_checkpoint_round_trip(cfg, adapter_folders, tmp_path: Path) -> None:
    inputs = {"policy": str(adapter_folders["sft"]), "reference": str(adapter_folders["sft"]),
              "reward": str(adapter_folders["reward"]), "critic": str(adapter_folders["reward"])}
    roles = ppo.build_roles(cfg, _llama(), inputs)
    _perturb(roles.trainable_parameters())
    (tmp_path / "ck").mkdir()
    _torch_backend(roles).save(tmp_path / "ck", is_main=True, write_adapter=common._adapter_io(roles)[0],
                               state={"step": 3, "kl_coef": 0.07})
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()  # the policy, PEFT layout
    assert (tmp_path / "ck" / "roles" / "critic" / VALUE_HEAD_FILE).is_file()
    fresh = ppo.build_roles(cfg, _llama(), inputs)
    state = common.restore(_torch_backend(fresh), tmp_path / "ck", fresh)
    assert state == {"step": 3, "kl_coef": 0.07}
    for p, q in zip(roles.trainable_parameters(), fresh.trainable_parameters()):
        assert torch.equal(p, q)


def test_dpo_reference_is_a_frozen_copy_of_the_policy_start(cfg, adapter_folders) -> None:
    roles = dpo.build_roles(cfg, _llama(), str(adapter_folders["sft"]), str(adapter_folders["sft"]))
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.allclose(roles.logits(dpo.POLICY, ids, mask), roles.logits(dpo.REFERENCE, ids, mask))
        _perturb(roles.trainable_parameters())
        assert not torch.allclose(roles.logits(dpo.POLICY, ids, mask), roles.logits(dpo.REFERENCE, ids, mask))
    assert not any(p.requires_grad for n, p in roles.named_parameters() if ".reference." in n)
