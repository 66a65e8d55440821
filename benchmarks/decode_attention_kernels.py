"""One decode token's grouped attention over a static cache, kernel by kernel (which to use).

    python benchmarks/decode_attention_kernels.py            # one GPU: 1b and 8b shapes, batch 64, cache 384

The shapes the own decode loop's step sees (``pipeline.decode_attention``): queries packed as
``[b, H_kv, groups, d]``, the unexpanded cache ``[b, H_kv, C, d]``, a boolean mask ``[b, 1, 1, C]``
(left padding). Each candidate runs compiled and, on CUDA, captured in one CUDA graph of ``--calls``
calls (as in the graph-replayed step: no launch overhead), timed over 10 replays; the error is the largest difference from float32 attention. Candidates: SDPA as
torch picks (cuDNN on an H200), SDPA restricted to the memory-efficient or math kernels, and plain
matmul + float32 softmax + matmul; and transformers' path (``repeat_kv`` then SDPA) for scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_common import Report, pick_device  # noqa: E402

SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # query heads, key/value heads, head dim


def sdpa_default(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_efficient(q, k, v, mask):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_math(q, k, v, mask):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def matmul_softmax(q, k, v, mask):
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(probs, v)


def repeat_kv_sdpa(q, k, v, mask):  # transformers' sdpa under compile, for scale (unpacked queries)
    b, hkv, g, d = q.shape
    k = k[:, :, None].expand(b, hkv, g, k.shape[2], d).reshape(b, hkv * g, k.shape[2], d)
    v = v[:, :, None].expand(b, hkv, g, v.shape[2], d).reshape(b, hkv * g, v.shape[2], d)
    return F.scaled_dot_product_attention(q.reshape(b, hkv * g, 1, d), k, v, attn_mask=mask).reshape(b, hkv, g, d)


CANDIDATES = {"sdpa (torch's pick)": sdpa_default, "sdpa efficient": sdpa_efficient, "sdpa math": sdpa_math,
              "matmul + fp32 softmax": matmul_softmax, "repeat_kv + sdpa (transformers)": repeat_kv_sdpa}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cache", type=int, default=384)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = Report("decode_attention_kernels", device,
                    f"One decode token's grouped attention, batch {args.batch}, cache {args.cache}, {dtype}",
                    ["shape", "kernel", "us per layer", "GB/s of K+V read", "max abs error vs fp32"])
    for size, (heads, kv_heads, dim) in SHAPES.items():
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(args.batch, kv_heads, heads // kv_heads, dim, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(args.batch, kv_heads, args.cache, dim, device=device, dtype=dtype, generator=g)
                for _ in range(2))
        mask = torch.ones(args.batch, 1, 1, args.cache, dtype=torch.bool, device=device)
        mask[: args.batch // 2, ..., :40] = False  # left padding on half the rows
        mask[..., 300:] = False  # not yet written
        exact = sdpa_math(q.float(), k.float(), v.float(), mask)
        kv_bytes = 2 * k.numel() * k.element_size()
        for name, fn in CANDIDATES.items():
            step = torch.compile(fn, dynamic=False)
            try:
                for _ in range(5):
                    out = step(q, k, v, mask)
            except Exception as err:  # noqa: BLE001 - a kernel this device lacks (efficient attention on CPU)
                message = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
                report.add([size, f"{name}: failed {message}", float("nan"), float("nan"), float("nan")],
                           {"size": size, "kernel": name, "error": message})
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(args.calls):
                        step(q, k, v, mask)
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                us = 1000 * start.elapsed_time(end) / (10 * args.calls)
            else:
                import time
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    step(q, k, v, mask)
                us = 1e6 * (time.perf_counter() - t0) / args.calls
            error = float((out.float() - exact).abs().max())
            report.add([size, name, us, kv_bytes / us / 1e3, error],
                       {"size": size, "kernel": name, "us": us, "kv_bytes": kv_bytes, "max_abs_error": error})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
