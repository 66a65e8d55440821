"""One 4-bit base, four roles, one DeepSpeed ZeRO-3 engine (CPU, one process over gloo).

The PPO roles (policy and critic trainable, reference = adapters off, reward frozen with a head)
sit on one bitsandbytes NF4 base; DeepSpeed ZeRO-3 with CPU offload partitions the quantized
base too. The same updates run through the plain PyTorch backend on an identical model: the
losses and the saved adapters must agree, and the engine must hold the base once.

``generation.gather_weights``: the rollout engine samples on weights gathered once per call
instead of per layer per token. Against the engine without it (ZeRO-3's per-module gathering,
``synced_gpus``) and the plain model before DeepSpeed took it: the same sampled tokens under one
seed; no ZeRO-3 fetch during the gathered call, where the other path fetches every layer at every
token; the parameters partitioned again after it, and training steps after it equal to those
without it.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("bitsandbytes")
pytest.importorskip("deepspeed")

from raypeft.adapters import LoraConfig, prepare_model_for_kbit_training, quantize_linear_layers  # noqa: E402
from raypeft.adapters.quantization import is_quantized_param  # noqa: E402
from raypeft.adapters.serialization import load_adapter_weights  # noqa: E402
from raypeft.pipeline import rollout  # noqa: E402
from raypeft.pipeline.backends import build_backend  # noqa: E402
from raypeft.pipeline.config import GenerationSpec  # noqa: E402
from raypeft.pipeline.deepspeed_configs import resolve  # noqa: E402
from raypeft.pipeline.roles import VALUE_HEAD_FILE, Roles  # noqa: E402
from raypeft.pipeline.rollout_engine import RolloutEngine  # noqa: E402
from raypeft.pipeline.stages import common, ppo  # noqa: E402

VOCAB, STEPS = 128, 3


@pytest.fixture(scope="module")
def one_process_group():
    """A one-rank gloo group, as Ray Train sets up for a single worker; one per module, because
    DeepSpeed keeps the groups it saw and a second group in one process would not be them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _roles(storage: torch.dtype) -> Roles:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    quantize_linear_layers(base, 4, compute_dtype=torch.float32, quant_storage=storage)
    prepare_model_for_kbit_training(base, use_gradient_checkpointing=False, keep_in_fp32="norms")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian")
    roles = Roles(base)
    roles.add(ppo.POLICY, lora, trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.add(ppo.REWARD, lora, trainable=False, value_head="zero")
    roles.add(ppo.CRITIC, lora, trainable=True, value_head="zero")
    roles.primary = ppo.POLICY
    return roles


def _rows() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    index = torch.arange(5, 10).repeat(4, 1)  # logits[:, 5:10] predict tokens 6..10
    return {"input_ids": ids, "attention_mask": mask, "index": index, "tokens": ids[:, 6:11]}


def _train(roles: Roles, ds_config, tmp: Path):
    backend = build_backend(roles, deepspeed_config=ds_config, micro_batch_size=4, grad_accum=1, world_size=1,
                            lr=2e-2, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=STEPS,
                            max_grad_norm=None, dtype="float32")
    roles.attach_entry(backend.module)
    rows, losses = _rows(), []
    for _ in range(STEPS):
        logp, _, values = ppo.policy_and_critic(roles, rows, temperature=1.0)
        loss = -logp.mean() + (values - 1.0).pow(2).mean()
        backend.backward(loss)
        backend.step()
        losses.append(loss.item())
    with torch.no_grad():
        ref = roles.logits(ppo.REFERENCE, rows["input_ids"], rows["attention_mask"])
        score = roles.scores(ppo.REWARD, rows["input_ids"], rows["attention_mask"])
        with roles.use(ppo.POLICY) as model:
            sampled = model.generate(input_ids=rows["input_ids"][:, :4], attention_mask=rows["attention_mask"][:, :4],
                                     max_new_tokens=3, do_sample=False, pad_token_id=0, **backend.generate_kwargs())
    # What common.report does in a stage, without Ray: the backend writes the checkpoint folder.
    backend.save(tmp, is_main=True, write_adapter=common._adapter_io(roles)[0], state={"step": STEPS})
    return backend, losses, ref, score, sampled


@pytest.mark.slow
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.uint8], ids=["bf16-storage", "uint8-storage"])
def test_four_roles_on_one_4bit_base_train_the_same_under_zero3_offload(storage, tmp_path: Path,
                                                                        one_process_group) -> None:
    plain = _train(_roles(storage), None, tmp_path / "plain")
    roles = _roles(storage)
    census = roles.parameter_census()
    ds = resolve("zero3_offload")
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these tiny tensors
    backend, losses, ref, score, sampled = _train(roles, ds, tmp_path / "zero3")
    assert backend.describe() == {"engine": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu",
                                  "offload_param": "cpu"}
    assert losses == pytest.approx(plain[1], abs=1e-4)
    assert losses[-1] < losses[0]
    assert torch.allclose(ref, plain[2], atol=1e-4) and torch.allclose(score, plain[3], atol=1e-4)
    assert torch.equal(sampled, plain[4])

    # One base, partitioned by the engine, the packed 4-bit weights included; nothing copied.
    assert census["base_missing"] == 0 and census["other_params"] == 0
    quantized = [p for p in roles.parameters() if is_quantized_param(p)]
    assert quantized and all(hasattr(p, "ds_id") and p.data.numel() == 0 and p.ds_numel > 0 for p in quantized)
    assert roles.parameter_census()["base_params"] == census["base_params"]

    # The checkpoint's adapters were gathered from the partitions: full shapes, the same values.
    for sub in ("adapter", f"roles/{ppo.CRITIC}"):
        a = load_adapter_weights(tmp_path / "plain" / sub)
        b = load_adapter_weights(tmp_path / "zero3" / sub)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert (tmp_path / "zero3" / "roles" / ppo.CRITIC / VALUE_HEAD_FILE).is_file()
    assert sum("optim_states" in p.name for p in (tmp_path / "zero3" / "deepspeed" / "state").iterdir()) == 1


# ------------------------------------------------------------------ sampling on gathered weights
# (here, not in a module of its own: DeepSpeed keeps the first process group it saw in a process)

GEN_VOCAB, NEW = 96, 6
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=2)


def _policy_roles() -> Roles:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(LlamaConfig(vocab_size=GEN_VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    roles = Roles(base)
    roles.add(ppo.POLICY, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"),
              trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.primary = ppo.POLICY
    return roles.eval()


def _gen_prompts() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, GEN_VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :5] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _sample_with(roles: Roles, engine: RolloutEngine, generate_kwargs: dict) -> torch.Tensor:
    torch.manual_seed(5)
    ro = rollout.sample(roles, ppo.POLICY, _gen_prompts(), engine.spec, TOKENIZER, generate_kwargs, engine)
    return ro.input_ids


def _two_updates(roles: Roles, backend) -> list[float]:
    rows = {"input_ids": torch.randint(3, GEN_VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)),
            "attention_mask": torch.ones(4, 10, dtype=torch.long), "index": torch.arange(3, 8).repeat(4, 1)}
    rows["tokens"] = rows["input_ids"][:, 4:9]
    losses = []
    for _ in range(2):
        logp, _ = rollout.policy_terms(roles, ppo.POLICY, rows, temperature=1.0)
        loss = -logp.mean()
        backend.backward(loss)
        backend.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_gathered_generation_samples_the_same_without_per_token_gathers(one_process_group) -> None:
    spec = GenerationSpec(max_new_tokens=NEW, gather_weights=True)
    plain_roles = _policy_roles()
    expected = _sample_with(plain_roles, RolloutEngine(spec), {})  # before DeepSpeed: the reference tokens

    results = {}
    for gather in (False, True):
        roles = _policy_roles()
        ds = resolve("zero3_offload")
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these tiny tensors
        backend = build_backend(roles, deepspeed_config=ds, micro_batch_size=4, grad_accum=1, world_size=1,
                                lr=1e-2, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=4,
                                max_grad_norm=None, dtype="float32")
        roles.attach_entry(backend.module)
        engine = RolloutEngine(spec.model_copy(update={"gather_weights": gather}))
        engine.gather_with(backend.whole_model)
        coordinator = backend.optimizer.parameter_offload.get_param_coordinator()
        fetches = []
        fetch = coordinator.fetch_sub_module
        coordinator.fetch_sub_module = lambda *a, **k: (fetches.append(1), fetch(*a, **k))[1]
        tokens = _sample_with(roles, engine, {"synced_gpus": True})
        coordinator.fetch_sub_module = fetch
        assert engine.last_gathered is gather and engine.last_path == "hf"
        partitioned = [p for p in roles.parameters() if hasattr(p, "ds_id")]
        assert partitioned and all(p.data.numel() == 0 for p in partitioned if not p.ds_persist)  # released again
        results[gather] = (tokens, len(fetches), _two_updates(roles, backend))

    assert torch.equal(results[True][0], expected) and torch.equal(results[False][0], expected)
    assert results[True][1] == 0  # no module gathered anything while sampling
    assert results[False][1] >= NEW * 2  # ZeRO-3 fetched (at least) each layer at every token
    assert results[True][2] == pytest.approx(results[False][2], abs=1e-6)  # training after it is unchanged
    assert results[True][2][1] < results[True][2][0]


def test_the_setting_is_off_by_default_and_a_no_op_without_zero3() -> None:
    assert GenerationSpec().gather_weights is False
    roles = _policy_roles()
    engine = RolloutEngine(GenerationSpec(max_new_tokens=3, gather_weights=True))
    entered = []
    engine.gather_with(lambda: entered.append(1) or torch.no_grad())
    _sample_with(roles, engine, {})
    assert entered == [] and engine.last_gathered is False  # nothing partitioned: nothing to gather
