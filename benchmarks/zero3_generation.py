"""Sampling under DeepSpeed ZeRO-3: per-module gathering at every token against the whole model
gathered once per call (``generation.gather_weights``), on ``--world-size`` ranks.

    python benchmarks/zero3_generation.py                                   # CPU, 2 ranks over gloo
    python benchmarks/zero3_generation.py --size small --batch 8 --new 32 --repeats 3

Each rank builds the same Llama from a config (random weights, float32 on CPU, bf16 on CUDA)
with a policy LoRA (r=16, every linear layer) in ``Roles``, hands it to a ZeRO-3 ``DeepSpeedBackend``
(``--preset``, default ``zero3_offload``: parameters partitioned and offloaded to the CPU, as the
pipeline's preset) and samples ``--batch`` prompts of ``--prompt-len`` tokens for ``--new``
tokens through the stage's ``RolloutEngine``: once with ZeRO-3's own per-module gathering
(``synced_gpus``, as the stages sample by default) and once with ``gather_weights: true``
(DeepSpeed's ``unwrap_model_for_generation``: the whole module gathered, its hooks lifted). The
two alternate ``--repeats`` times after one untimed call each; medians. Also counted: how many
times ZeRO-3 fetched a module's parameters during one call. Rank 0 writes
``benchmarks/results/zero3_generation_<device>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import Report, build_llama, sync  # noqa: E402


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(args.world_size), "LOCAL_RANK": str(rank)})
    cuda = args.device == "cuda"
    if not cuda:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.world_size))
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world_size)
    warnings.filterwarnings("ignore")

    from raypeft.adapters import LoraConfig
    from raypeft.pipeline import rollout
    from raypeft.pipeline.backends import build_backend
    from raypeft.pipeline.config import GenerationSpec
    from raypeft.pipeline.deepspeed_configs import resolve
    from raypeft.pipeline.roles import Roles
    from raypeft.pipeline.rollout_engine import RolloutEngine

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    roles = Roles(build_llama(args.size, torch.device("cpu"), dtype, seed=0))
    roles.add("policy", LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), trainable=True)
    roles.primary = "policy"
    roles.eval()
    full_bytes = sum(p.numel() * p.element_size() for p in roles.parameters())
    ds = resolve(args.preset)
    backend = build_backend(roles, deepspeed_config=ds, micro_batch_size=args.batch, grad_accum=1,
                            world_size=args.world_size, lr=1e-4, weight_decay=0.0, scheduler="constant",
                            warmup_steps=0, total_steps=1, max_grad_norm=None,
                            dtype="bfloat16" if cuda else "float32")
    roles.attach_entry(backend.module)
    coordinator = backend.optimizer.parameter_offload.get_param_coordinator()
    fetch = coordinator.fetch_sub_module
    fetches = [0]

    def counting(*a, **k):
        fetches[0] += 1
        return fetch(*a, **k)

    coordinator.fetch_sub_module = counting
    vocab = roles.model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own prompts, as data-parallel workers
    ids = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).to(device)
    prompts = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    engines = {}
    for gather in (False, True):
        engines[gather] = RolloutEngine(GenerationSpec(max_new_tokens=args.new, gather_weights=gather))
        engines[gather].gather_with(backend.whole_model)
    times: dict[bool, list[float]] = {False: [], True: []}
    counts: dict[bool, int] = {}
    tokens: dict[bool, int] = {}
    for i in range(args.repeats + 1):
        for gather in ((False, True) if i % 2 == 0 else (True, False)):
            fetches[0] = 0
            dist.barrier()
            sync(device)
            t0 = time.perf_counter()
            ro = rollout.sample(roles, "policy", prompts, engines[gather].spec, tokenizer,
                                backend.generate_kwargs(), engines[gather])
            sync(device)
            dist.barrier()  # the call ends when the slowest rank has its samples
            if i:
                times[gather].append(time.perf_counter() - t0)
            counts[gather], tokens[gather] = fetches[0], int(ro.mask.sum())
    if rank == 0:
        report(args, device, times, counts, tokens, full_bytes)
    dist.barrier()
    dist.destroy_process_group()


def report(args: argparse.Namespace, device: torch.device, times: dict[bool, list[float]], counts: dict[bool, int],
           tokens: dict[bool, int], full_bytes: int) -> None:
    rep = Report("zero3_generation", device, f"Sampling under DeepSpeed ZeRO-3 ({args.preset}), {args.world_size} "
                 f"ranks, Llama '{args.size}'", ["path", "s per call (median)", "new tokens/s per rank",
                                                  "ZeRO-3 module fetches per call (rank 0)", "speed-up"])
    base = statistics.median(times[False])
    for gather, label in ((False, "per-module gathering at every token (synced_gpus)"),
                          (True, "gather_weights: true (whole model once per call)")):
        t = statistics.median(times[gather])
        rep.add([label, t, tokens[gather] / t, counts[gather], base / t],
                {"gather_weights": gather, "seconds": times[gather], "fetches": counts[gather],
                 "new_tokens_rank0": tokens[gather]})
    rep.notes.append(f"{args.batch} prompts x {args.prompt_len} tokens per rank, {args.new} sampled new tokens, "
                     f"LoRA r=16 on every linear layer; {args.repeats} timed calls of each after one untimed, "
                     "alternating; a call is timed until every rank has its samples")
    rep.notes.append(f"memory: with gather_weights every rank holds the whole model while it samples "
                     f"({full_bytes / 2**20:,.0f} MiB here) instead of its 1/{args.world_size} partition "
                     "plus the layers in flight")
    rep.write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--size", default="tiny", help="perf_common.llama_config shapes")
    ap.add_argument("--preset", default="zero3_offload", help="a pipeline DeepSpeed preset with ZeRO stage 3")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args, port), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
