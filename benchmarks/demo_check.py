"""Does the embedded demo teach something? LoRA SFT (with the reference ``peft``) vs the bare base.

    python benchmarks/demo_check.py                 # build (or reuse) the assets, SFT, ROUGE
    python benchmarks/demo_check.py --fresh         # time a from-scratch asset build first
    python benchmarks/demo_check.py --reward        # also a LoRA reward model's pair accuracy

Acceptance: ROUGE-L (greedy, held-out sft_eval rows) rises by at least 0.2 over the base model
with no adapter. A benchmark script, not library code: ``peft`` is only a test/benchmark
dependency of raypeft.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from raypeft.pipeline.demo import DEMO_PROMPT_TEMPLATE, DemoSettings, ensure_demo_assets
from raypeft.pipeline.demo.model import torch_threads
from raypeft.pipeline.evaluation import generate_responses, rouge_scores


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sft_features(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """``<s> template(dialogue)`` + summary + ``</s>``; loss on the summary and eos only."""
    prompts = tokenizer([DEMO_PROMPT_TEMPLATE.format(prompt=r["dialogue"]) for r in rows])["input_ids"]
    responses = tokenizer([r["summary"] for r in rows], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompts, responses):
        r = r + [tokenizer.eos_token_id]
        out.append((p + r, [-100] * len(p) + r))
    return out


def collate(batch, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def evaluate(model, tokenizer, rows, args) -> tuple[dict[str, float], list[str], float]:
    t = time.perf_counter()
    prompts = [DEMO_PROMPT_TEMPLATE.format(prompt=r["dialogue"]) for r in rows]
    preds = generate_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                               batch_size=args.eval_batch_size)
    return rouge_scores(preds, [r["summary"] for r in rows]), preds, time.perf_counter() - t


def sft_check(assets, args) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    base = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    eval_rows = read_jsonl(assets.file("sft_eval"))[: args.eval_rows]
    train = sft_features(tokenizer, read_jsonl(assets.file("sft_train")))

    before, before_preds, t_before = evaluate(base, tokenizer, eval_rows, args)
    print(f"base    ROUGE {fmt(before)}  ({t_before:.1f}s to generate {len(eval_rows)})")

    torch.manual_seed(args.seed)
    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, args.steps, 10))
    rng = random.Random(args.seed)
    order: list[int] = []
    model.train()
    t = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order = list(range(len(train)))
            rng.shuffle(order)
        batch = collate([train[order.pop()] for _ in range(args.batch_size)], tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"  step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t:.0f}s)")
    t_train = time.perf_counter() - t

    after, after_preds, t_after = evaluate(model, tokenizer, eval_rows, args)
    print(f"LoRA    ROUGE {fmt(after)}  ({t_after:.1f}s to generate)")
    for r, b, a in list(zip(eval_rows, before_preds, after_preds))[:3]:
        print(f"--- dialogue:\n{r['dialogue']}\n  reference: {r['summary']}\n  base:      {b}\n  LoRA:      {a}")
    gain = after["rougeL"] - before["rougeL"]
    print(f"ROUGE-L {before['rougeL']:.3f} -> {after['rougeL']:.3f} (+{gain:.3f}); LoRA r={args.r} all-linear, "
          f"{n_train} trainable params, {args.steps} steps x {args.batch_size}, lr {args.lr}: {t_train:.1f}s")
    return {"rougeL_before": before["rougeL"], "rougeL_after": after["rougeL"], "gain": gain,
            "train_s": t_train}


def reward_check(assets, args) -> dict:
    """A LoRA reward model (Bradley-Terry on chosen vs rejected) and its held-out pair accuracy."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(assets.model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear",
                                             task_type="SEQ_CLS"))
    train = read_jsonl(assets.file("preference_train"))
    held = read_jsonl(assets.file("preference_eval"))

    def scores(rows, side):
        texts = [DEMO_PROMPT_TEMPLATE.format(prompt=r["prompt"]) + " " + r[side] + tokenizer.eos_token for r in rows]
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.squeeze(-1)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine(s, args.reward_steps, 10))
    rng = random.Random(args.seed)
    model.train()
    t = time.perf_counter()
    for step in range(args.reward_steps):
        rows = rng.sample(train, args.batch_size)
        loss = -torch.nn.functional.logsigmoid(scores(rows, "chosen") - scores(rows, "rejected")).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"  reward step {step + 1}/{args.reward_steps} loss {loss.item():.3f} ({time.perf_counter() - t:.0f}s)")
    model.eval()
    with torch.no_grad():
        wins = [(scores(held[i:i + 50], "chosen") > scores(held[i:i + 50], "rejected")).float()
                for i in range(0, len(held), 50)]
    acc = torch.cat(wins).mean().item()
    print(f"reward model held-out pair accuracy {acc:.3f} ({len(held)} pairs, {time.perf_counter() - t:.0f}s)")
    return {"reward_accuracy": acc}


def fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in scores.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $RAYPEFT_CACHE or ~/.cache/raypeft")
    ap.add_argument("--fresh", action="store_true", help="build the assets into a new temporary folder (timed)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=100)
    ap.add_argument("--eval-batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reward", action="store_true", help="also train and score a LoRA reward model")
    ap.add_argument("--reward-steps", type=int, default=150)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a DemoSettings field (experiments; changes the cache folder)")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(DemoSettings(), key))
        overrides[key] = kind(value)
    settings = replace(DemoSettings(), **overrides)

    with tempfile.TemporaryDirectory(prefix="raypeft-demo-check-") as tmp:
        cache = Path(tmp) if args.fresh else args.cache_dir
        t = time.perf_counter()
        assets = ensure_demo_assets(cache, settings=settings)
        print(f"assets ready in {time.perf_counter() - t:.1f}s at {assets.root}")
        if "timings" in assets.settings:
            print("build timings:", {k: round(v, 1) for k, v in assets.settings["timings"].items()})
        with torch_threads(0) as n:
            print(f"torch threads: {n}")
            result = sft_check(assets, args)
            if args.reward:
                result.update(reward_check(assets, args))
    ok = result["gain"] >= 0.2
    print(("PASS" if ok else "FAIL") + f": ROUGE-L gain {result['gain']:+.3f} (need >= 0.2)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
