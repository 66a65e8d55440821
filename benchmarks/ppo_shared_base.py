"""PPO with all four roles on one 4-bit Llama-3-8B-like base on one GPU, and what sharing saves.

    python benchmarks/ppo_shared_base.py                                   # one GPU, Llama-3.1-8B shapes
    python benchmarks/ppo_shared_base.py --device cpu --size tiny --steps 1 --batch 4 --new-tokens 8   # dry run
    python benchmarks/ppo_shared_base.py --size 1b --no-copies --steps 3 --engine fold_adapter=true --engine cache=static --engine compile=true

The base is built from ``LlamaConfig`` with Llama-3.1-8B's shapes (random init, bf16, no hub),
quantized to bitsandbytes NF4 (double quantization, bf16 compute; the head stays unquantized)
and prepared for k-bit training as ``model.quantization`` does in the pipeline
(``keep_in_fp32="norms"``). The four PPO roles are adapters on it (``pipeline.roles.Roles``:
policy and critic trainable LoRA r=16 on every linear layer + a value head for the critic,
reference = adapters disabled, reward = a frozen LoRA + value head), and ``--steps`` PPO steps
run the stage's own functions (``make_rollout``, ``add_advantages``, ``ppo_update`` through the
plain PyTorch backend) on random prompts: ``--batch`` prompts of ``--prompt-len`` tokens,
``--new-tokens`` sampled tokens each, 2 minibatches, 1 PPO epoch.

Reported: peak CUDA memory allocated / reserved over the PPO steps (peak counters reset after
the set-up), seconds per step, tokens/s. Then "one model per role": three more quantized bases
(what a reference, a reward model and a critic of their own would hold) are built and kept on
the GPU, and one more PPO step is measured with them resident: the peak the same step would
need if each role had its own copy of the base (activations are the same: the roles run one
after another).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import Report, llama_config, sync  # noqa: E402

GIB = 2 ** 30


def quantized_base(size: str, device: torch.device, dtype: torch.dtype, seed: int,
                   intermediate: int | None = None) -> torch.nn.Module:
    """A random-init Llama of ``size`` shapes in NF4, prepared for k-bit training like the pipeline's."""
    from transformers import LlamaForCausalLM

    from raypeft.adapters import prepare_model_for_kbit_training, quantize_linear_layers

    config = llama_config(size)
    if intermediate:
        config.intermediate_size = intermediate
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built directly in ``dtype`` on ``device``: no float32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    quantize_linear_layers(model, 4, quant_type="nf4", double_quant=True, compute_dtype=dtype,
                           quant_storage=torch.uint8)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, keep_in_fp32="norms")
    model.config.use_cache = True  # generation; training forwards in the roles never ask for a cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


def four_roles(base: torch.nn.Module, rank: int):
    from raypeft.adapters import LoraConfig
    from raypeft.pipeline.roles import Roles
    from raypeft.pipeline.stages import ppo

    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM")
    roles = Roles(base)
    roles.add(ppo.POLICY, lora, trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.add(ppo.REWARD, lora, trainable=False, value_head="zero")
    roles.add(ppo.CRITIC, lora, trainable=True, value_head="zero")
    roles.primary = ppo.POLICY
    with torch.no_grad():  # a reward model that tells responses apart (a zero head scores all alike)
        head = roles.heads[ppo.REWARD]
        head.weight.normal_(0.0, 0.02, generator=torch.Generator(head.weight.device).manual_seed(7))
    return roles.eval()  # as the PPO stage: no dropout, rollout and update see the same functions


def width_multiple(setting: str, device: torch.device) -> int | None:
    """``--width-multiple``: "auto" as the stages' ``data.pad_to_multiple_of`` (64 on a GPU, none on
    CPU), "none", or a number."""
    from raypeft.pipeline.stages.common import auto_pad_multiple

    if setting == "auto":
        return auto_pad_multiple(device)
    return None if setting == "none" else int(setting)


def bytes_on(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def ppo_steps(roles, spec, backend, prompts, steps: int, device: torch.device, seed: int,
              chunked: bool = False, width_multiple: int | None = None) -> list[dict]:
    from raypeft.pipeline.rl_math import RunningMoments
    from raypeft.pipeline.rollout_engine import RolloutEngine
    from raypeft.pipeline.stages import ppo

    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    generator = torch.Generator().manual_seed(seed)
    out = []
    moments = RunningMoments()  # ppo.normalize_scores, as the stage does
    # one per stage: its folded copy and compiled step persist
    engine = RolloutEngine(spec.generation, width_multiple)
    for step in range(steps):
        sync(device)
        t0 = time.perf_counter()
        torch.manual_seed(seed * 1000 + step)
        ro = ppo.make_rollout(roles, prompts, spec, tokenizer, chunk=spec.rollout_batch_size // spec.minibatches,
                              rollout_engine=engine, chunked=chunked)
        ppo.update_score_moments(moments, ppo.penalised_scores(ro, spec))
        ppo.add_advantages(ro, spec, spec.kl.coef, moments)
        stats = ppo.rollout_stats(ro, spec.kl.coef)
        update = ppo.ppo_update(roles, ro, spec, backend, generator, chunked=chunked)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = int(ro.attention_mask.sum().item())
        out.append({"step": step + 1, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                    "reward_mean": stats["reward_mean"], "kl": stats["kl"], "policy_loss": update["policy_loss"],
                    "value_loss": update["value_loss"]})
        print(f"[bench] step {step + 1}: {seconds:.1f}s, {tokens} tokens, reward {stats['reward_mean']:.3f}, "
              f"kl {stats['kl']:.3f}, peak {torch.cuda.max_memory_allocated(device) / GIB if device.type == 'cuda' else 0:.2f} GiB",
              flush=True)
    return out


def peaks(device: torch.device) -> dict[str, float]:
    out = {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if device.type == "cuda":
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    return out


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    from raypeft.pipeline import lm_head_loss
    from raypeft.pipeline.backends import TorchBackend
    from raypeft.pipeline.config import parse_config
    from raypeft.pipeline.stages import ppo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="8b", help="perf_common.llama_config shapes (8b, 1b, tiny, ...)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="prompts per PPO step (ppo.rollout_batch_size)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-copies", action="store_true", help="skip the one-model-per-role measurement")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="override the MLP width (CPU dry runs: bitsandbytes' CPU kernel wants multiples of 64)")
    parser.add_argument("--dtype", default=None, help="base dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--suffix", default="")
    parser.add_argument("--chunked-loss", default="auto",
                        help="ppo.chunked_loss of the engine run (true/false/auto; the default path: false)")
    parser.add_argument("--width-multiple", default="auto",
                        help="the engine run's rollout width multiple (auto: the stage's, 64 on a GPU; none; or N)")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="also time the shared-base steps with these ppo.generation engine settings "
                             "(repeatable; e.g. fold_adapter=true cache=static compile=true)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    reset(device)
    t0 = time.perf_counter()
    before = bytes_on(device)
    base = quantized_base(args.size, device, dtype, seed=0, intermediate=args.intermediate)
    base_bytes = bytes_on(device) - before
    build_s = time.perf_counter() - t0
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in base.parameters())
    print(f"[bench] NF4 base built in {build_s:.0f}s: {base_bytes / GIB:.2f} GiB on {device}", flush=True)
    roles = four_roles(base, args.rank)
    census = roles.parameter_census()
    spec = parse_config({"ppo": {"rollout_batch_size": args.batch, "minibatches": 2, "ppo_epochs": 1,
                                 "learning_rate": 1e-5, "generation": {"max_new_tokens": args.new_tokens},
                                 "kl": {"controller": "fixed", "coef": 0.05}}}).ppo
    backend = TorchBackend(roles, lr=spec.learning_rate, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                           total_steps=args.steps, max_grad_norm=spec.max_grad_norm,
                           clip_groups=[roles.trainable_parameters(ppo.POLICY), roles.trainable_parameters(ppo.CRITIC)])
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    roles_bytes = bytes_on(device) - before - base_bytes

    report = Report("ppo_shared_base", device, f"PPO, four roles on one NF4 {args.size} Llama",
                    ["layout", "bases on the device", "peak allocated (GiB)", "peak reserved (GiB)",
                     "one NF4 base (GiB)", "s / PPO step", "tokens/s"], suffix=args.suffix)
    report.notes.append(
        f"{args.size} Llama shapes ({n_params / 1e9:.2f}B parameters incl. the packed 4-bit ones as stored), NF4 + "
        f"double quant, bf16 compute; LoRA r={args.rank} all-linear on policy, reward, critic; {args.batch} prompts "
        f"x {args.prompt_len} tokens, {args.new_tokens} new tokens, 2 minibatches, 1 PPO epoch; base built in "
        f"{build_s:.0f}s; roles' adapters and heads {roles_bytes / GIB:.3f} GiB; one copy of the "
        f"base in the roles module: {census['base_params']} base tensors, {census['base_missing']} missing, "
        f"{census['other_params']} foreign")

    reset(device)
    shared = ppo_steps(roles, spec, backend, prompts, args.steps, device, seed=0)
    shared_peaks = peaks(device)
    mean_s = sum(s["seconds"] for s in shared[1:] or shared) / len(shared[1:] or shared)
    mean_tok = sum(s["tokens_per_s"] for s in shared[1:] or shared) / len(shared[1:] or shared)
    report.add(["shared base (raypeft roles)", 1, shared_peaks.get("peak_allocated_gib", float("nan")),
                shared_peaks.get("peak_reserved_gib", float("nan")), base_bytes / GIB, mean_s, mean_tok],
               {"layout": "shared", "steps": shared, **shared_peaks, "base_gib": base_bytes / GIB,
                "roles_gib": roles_bytes / GIB})

    if args.engine:
        levers = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.engine)}
        fast = spec.model_copy(update={"generation": spec.generation.model_copy(update=levers)})
        reset(device)
        chunked = lm_head_loss.enabled(yaml.safe_load(args.chunked_loss), roles.model, device)
        multiple = width_multiple(args.width_multiple, device)
        steps = ppo_steps(roles, fast, backend, prompts, args.steps, device, seed=0, chunked=chunked,
                          width_multiple=multiple)
        fast_peaks = peaks(device)
        timed = steps[1:] or steps
        fast_s = sum(s["seconds"] for s in timed) / len(timed)
        label = ", ".join(args.engine + [f"chunked_loss={str(chunked).lower()}", f"width_multiple={multiple}"])
        report.add([f"shared base, rollout engine ({label})", 1,
                    fast_peaks.get("peak_allocated_gib", float("nan")), fast_peaks.get("peak_reserved_gib", float("nan")),
                    base_bytes / GIB, fast_s, sum(s["tokens_per_s"] for s in timed) / len(timed)],
                   {"layout": "shared_engine", "engine": levers, "chunked_loss": chunked, "width_multiple": multiple,
                    "steps": steps,
                    **fast_peaks})
        report.notes.append(f"rollout engine ({label}): {mean_s / fast_s:.2f}x faster per PPO step than the default "
                            "generation path with full-vocabulary logits (today's path) in the same run (first step "
                            "excluded: compile; the engine's steps continue from the policy the default path's steps "
                            "left)")

    if not args.no_copies:
        copies = []
        for seed in (1, 2, 3):  # a reference, a reward model and a critic of their own
            copies.append(quantized_base(args.size, device, dtype, seed=seed, intermediate=args.intermediate))
            print(f"[bench] extra base {seed} resident: {bytes_on(device) / GIB:.2f} GiB allocated", flush=True)
        reset(device)
        again = ppo_steps(roles, spec, backend, prompts, 1, device, seed=1)
        copy_peaks = peaks(device)
        report.add(["one model per role (3 more bases resident)", 4,
                    copy_peaks.get("peak_allocated_gib", float("nan")), copy_peaks.get("peak_reserved_gib", float("nan")),
                    base_bytes / GIB, again[0]["seconds"], again[0]["tokens_per_s"]],
                   {"layout": "per_role", "steps": again, **copy_peaks})
        if device.type == "cuda":
            saved = copy_peaks["peak_allocated_gib"] - shared_peaks["peak_allocated_gib"]
            report.notes.append(f"sharing saves {saved:.1f} GiB of peak allocated memory "
                                f"({saved / copy_peaks['peak_allocated_gib']:.0%} of the one-model-per-role peak; "
                                f"3 x {base_bytes / GIB:.2f} GiB base = {3 * base_bytes / GIB:.1f} GiB)")
        del copies
    report.write()


if __name__ == "__main__":
    main()
