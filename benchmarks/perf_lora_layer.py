"""One LoRA linear layer, ours vs peft: forward (no grad) and forward + backward.

    python benchmarks/perf_lora_layer.py                       # CPU: 1024-wide layers, 4 x 128 tokens, fp32
    python benchmarks/perf_lora_layer.py --device cuda         # GPU: 4096 x 4096, r = 8/16/64, 4 x 512, bf16
    python benchmarks/perf_lora_layer.py --device cuda --compile --suffix _compile   # 4096x4096 r=16, also compiled

Both layers wrap the same frozen base ``nn.Linear`` weights with the same ``A``/``B`` (dropout 0,
``lora_alpha = 2 r``); the script checks that outputs and gradients agree before timing.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from perf_common import Report, alternate, copy_trainable, pick_device, summarize

from raypeft.adapters import LoraConfig, get_adapter_model


def make_layers(n_in: int, n_out: int, r: int, device: torch.device, dtype: torch.dtype, dropout: float):
    """The LoRA layer each library puts around one ``nn.Linear``, through the public entry points
    (``get_adapter_model`` / ``get_peft_model`` on a one-layer model), with identical ``A``/``B``."""
    import peft

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(n_in, n_out, bias=False, device=device, dtype=dtype))
    kwargs = dict(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"], init_lora_weights=False)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kwargs))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs), autocast_adapter_dtype=False)
    copy_trainable(ours, ref)
    return ours.base_model.model[0], ref.base_model.model[0]


def check_equal(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    """Largest relative difference of outputs and LoRA gradients (must be rounding-level)."""
    worst = 0.0
    outs = []
    for layer in (ours, ref):
        xx = x.detach().clone().requires_grad_(True)
        y = layer(xx)
        y.float().pow(2).mean().backward()
        outs.append([y.detach(), xx.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad])
        layer.zero_grad(set_to_none=True)
    for a, b in zip(*outs):
        worst = max(worst, ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--compile", action="store_true",
        help="only the first shape, also timed with both layers under torch.compile (compiling takes tens of s)",
    )
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    device = pick_device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        shapes = [(4096, 4096, 16), (4096, 4096, 8), (4096, 4096, 64), (4096, 14336, 16), (14336, 4096, 16)]
        batch, seq = 4, 512
    else:
        shapes = [(1024, 1024, 16), (1024, 1024, 8), (1024, 1024, 64), (1024, 2816, 16)]
        batch, seq = 4, 128
    repeats = args.repeats or (50 if gpu else 30)
    if args.compile:
        shapes = shapes[:1]
    report = Report(
        "lora_layer",
        device,
        f"LoRA linear layer, ours vs peft ({str(dtype).replace('torch.', '')}, batch x seq = {batch} x {seq}, "
        f"dropout {args.dropout})",
        ["in x out", "r", "mode", "ours ms", "peft ms", "ratio ours/peft", "paired ratio"],
    )
    report.suffix = args.suffix
    for n_in, n_out, r in shapes:
        modes = ["fwd (no grad)", "fwd+bwd"] + (["fwd+bwd compiled"] if args.compile else [])
        ours, ref = make_layers(n_in, n_out, r, device, dtype, args.dropout)
        ours.train(args.dropout > 0)
        ref.train(args.dropout > 0)
        x = torch.randn(batch, seq, n_in, device=device, dtype=dtype)
        diff = check_equal(ours, ref, x)
        xg = x.clone().requires_grad_(True)
        for mode in modes:
            if mode == "fwd (no grad)":

                def run(layer: nn.Module) -> None:
                    with torch.no_grad():
                        layer(x)

                fns = {"ours": lambda: run(ours), "peft": lambda: run(ref)}
            else:
                layers = {"ours": ours, "peft": ref}
                if mode == "fwd+bwd compiled":
                    layers = {k: torch.compile(v) for k, v in layers.items()}

                def step(layer: nn.Module) -> None:
                    y = layer(xg)
                    y.backward(torch.ones_like(y))
                    xg.grad = None

                fns = {k: (lambda layer=v: step(layer)) for k, v in layers.items()}
            times = alternate(fns, device, repeats, warmup=3)
            summary = summarize(times)
            med = summary["median_s"]
            report.add(
                [f"{n_in}x{n_out}", r, mode, med["ours"] * 1e3, med["peft"] * 1e3, summary["ratio"],
                 summary["paired_ratio_median"]],
                {"in": n_in, "out": n_out, "r": r, "mode": mode, "batch": batch, "seq": seq, "dtype": str(dtype),
                 "max_rel_diff_vs_peft": diff, **summary},
            )
    report.notes.append("ratio = median(ours) / median(peft); paired ratio = median over rounds of ours/peft.")
    report.notes.append("Timings alternate ours/peft (order flipped each round) after warm-up, same inputs and weights.")
    if not gpu:
        report.notes.append("CPU machine shared with other jobs (2 cores): expect noise; the paired ratio is more robust.")
    print(report.write())


if __name__ == "__main__":
    main()
