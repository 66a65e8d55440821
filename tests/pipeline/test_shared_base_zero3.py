"""One 4-bit base, four roles, one DeepSpeed ZeRO-3 engine (CPU, one process over gloo).

The PPO roles (policy and critic trainable, reference = adapters off, reward frozen with a head)
sit on one bitsandbytes NF4 base; DeepSpeed ZeRO-3 with CPU offload partitions the quantized
base too. The same updates run through the plain PyTorch backend on an identical model: the
losses and the saved adapters must agree, and the engine must hold the base once.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("bitsandbytes")
pytest.importorskip("deepspeed")

from raypeft.adapters import LoraConfig, prepare_model_for_kbit_training, quantize_linear_layers  # noqa: E402
from raypeft.adapters.quantization import is_quantized_param  # noqa: E402
from raypeft.adapters.serialization import load_adapter_weights  # noqa: E402
from raypeft.pipeline.backends import build_backend  # noqa: E402
from raypeft.pipeline.deepspeed_configs import resolve  # noqa: E402
from raypeft.pipeline.roles import VALUE_HEAD_FILE, Roles  # noqa: E402
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
