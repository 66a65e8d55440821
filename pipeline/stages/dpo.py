"""Direct preference optimisation: the offline alternative to reward model + PPO.

The policy adapter (from ``dpo.policy_init``, the SFT output by default) is trained against a
frozen reference on the same base: a frozen copy of the policy's starting adapter (the default,
``reference: policy_init``), the bare base with adapters disabled (``reference: base``), or any
other adapter. Sequence log-probabilities are summed over response tokens (prompt masked);
``ipo`` uses their per-token mean. The loss variants are in ``pipeline.rl_math.dpo_loss``.

Metrics: loss, implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected, their
margin, and pair accuracy (chosen's implicit reward above rejected's), in training windows and
on held-out pairs before, every ``eval_every`` steps and after training. Before any update the
policy equals the reference, so every held-out margin is 0 and accuracy (strictly above) is 0;
``eval_logp_accuracy`` (policy prefers chosen per token) is the comparison that exists before too.
With ``eval.rouge`` the policy's ROUGE on the held-out SFT rows is measured before and after.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raypeft.pipeline import compilation, engine, lm_head_loss, nonfinite_loss, tracking
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import DPOSpec, RunConfig
from raypeft.pipeline.data import IGNORE_INDEX, PairCollator, count_tokens, split_pairs
from raypeft.pipeline.data.packing import PackedPairCollator, sequence_sums
from raypeft.pipeline.inputs import sft_rows
from raypeft.pipeline.modeling import adapter_config, load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import Warn
from raypeft.pipeline.resources import Throughput, reset_gpu_peaks
from raypeft.pipeline.rl_math import dpo_loss, token_logprobs
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import common, pairs
from raypeft.pipeline.stages.definition import ROUGE_METRICS, AdapterInput, BatchShape, Stage, before_after

NAME = "dpo"
POLICY, REFERENCE = "policy", "reference"


def build_roles(cfg: RunConfig, base: torch.nn.Module, policy_init: str | None, reference: str | None) -> Roles:
    """Policy (trainable) and reference (frozen adapter, or the base when ``reference`` is None)."""
    roles = Roles(base)
    roles.add(POLICY, policy_init if policy_init is not None else adapter_config(cfg.adapter, cfg.model),
              trainable=True)
    if reference is None:
        roles.add_base(REFERENCE)
    else:
        roles.add(REFERENCE, reference, trainable=False)
    return roles


def response_logprobs(roles: Roles, role: str, batch: dict[str, torch.Tensor],
                      chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each side's response tokens under ``role``, and their count, in
    ``PairCollator`` order (a packed batch is reduced per side through its ``segments``);
    ``chunked``: projecting only the response positions (``pipeline.lm_head_loss``)."""
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    if chunked:
        logp = roles.label_logprobs(role, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                    batch.get("position_ids"))
    else:
        logits = roles.logits(role, batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))
        logp = token_logprobs(logits[:, :-1], labels.clamp(min=0)) * mask
    if "segments" in batch:  # packed (data.packing): a label belongs to the side of the token it names
        segments, sides = batch["segments"][:, 1:], batch["ends"].shape[0]
        return sequence_sums(logp, segments, sides), sequence_sums(mask.to(logp.dtype), segments, sides).clamp(min=1)
    return logp.sum(-1), mask.sum(-1).clamp(min=1)


def pair_terms(roles: Roles, batch: dict[str, torch.Tensor], beta: float, loss_type: str, chunked: bool = False):
    """Per-pair losses, implicit rewards (chosen, rejected) and the policy's per-token mean
    log-probabilities (chosen, rejected) of a ``PairCollator`` batch."""
    policy, count = response_logprobs(roles, POLICY, batch, chunked)
    with torch.no_grad():
        ref, _ = response_logprobs(roles, REFERENCE, batch, chunked)
    if loss_type == "ipo":  # IPO's objective is on length-normalised log-ratios
        policy_used, ref_used = policy / count, ref / count
    else:
        policy_used, ref_used = policy, ref
    policy_c, policy_r = split_pairs(policy_used)
    ref_c, ref_r = split_pairs(ref_used)
    losses, chosen, rejected = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=beta, loss_type=loss_type)
    mean_c, mean_r = split_pairs((policy / count).detach())
    return losses, chosen, rejected, mean_c, mean_r


@torch.no_grad()
def evaluate(roles: Roles, dataset, collate: PairCollator | PackedPairCollator, worker: engine.Worker, cfg: RunConfig,
             batch_size: int, backend: Backend | None = None) -> dict[str, float]:
    """Held-out loss, implicit-reward accuracy and margin, and ``eval_logp_accuracy``: how often
    the policy gives the chosen response the higher per-token log-probability (meaningful before
    training too, when every implicit reward is 0). Rows are sharded over workers (padded rows,
    which keep ZeRO-3 workers in lockstep, are scored and left out)."""
    roles.eval()
    chunked = lm_head_loss.enabled(cfg.dpo.chunked_loss, roles.model, worker.device)
    sums = [0.0] * 7  # loss, correct, margin, chosen, rejected, logp-correct, rows
    shard = common.eval_shard(len(dataset), worker, batch_size, backend)
    for i in range(0, len(shard), batch_size):
        ids = shard[i:i + batch_size]
        batch = common.to_device(collate([dataset[j if j is not None else 0] for j in ids]), worker.device)
        terms = pair_terms(roles, batch, cfg.dpo.beta, cfg.dpo.loss_type, chunked)
        keep = torch.tensor([j is not None for j in ids], device=terms[0].device)
        losses, chosen, rejected, mean_c, mean_r = (t[keep] for t in terms)
        margin = chosen - rejected
        sums = [a + b for a, b in zip(sums, [losses.sum().item(), (margin > 0).float().sum().item(),
                                             margin.sum().item(), chosen.sum().item(), rejected.sum().item(),
                                             (mean_c > mean_r).float().sum().item(), float(len(margin))])]
    loss, correct, margin, chosen, rejected, logp_correct, n = engine.all_reduce(sums, op="sum")
    roles.train()
    n = max(n, 1.0)
    return {"eval_loss": loss / n, "eval_accuracy": correct / n, "eval_margin": margin / n,
            "eval_reward_chosen": chosen / n, "eval_reward_rejected": rejected / n,
            "eval_logp_accuracy": logp_correct / n}


def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    spec = cfg.dpo
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    inputs = payload["inputs"]
    base = load_base_model(cfg.model, common.base_device(cfg, worker))
    roles = build_roles(cfg, base, inputs.get("policy"), inputs.get("reference"))
    setup = pairs.prepare(cfg, NAME, spec, roles, tokenizer, worker, payload)
    train_set, eval_set, collate, backend, state = (setup.train_set, setup.eval_set, setup.collate,
                                                    setup.backend, setup.state)
    steps_per_epoch, total = setup.steps_per_epoch, setup.total
    if worker.is_main:
        logger.log({**setup.first_metrics, "reference_is_base": float(roles.is_base(REFERENCE))}, step=0)
    if "eval_before" not in state:
        state["eval_before"] = evaluate(roles, eval_set, collate, worker, cfg, spec.batch_size * 2, backend)
        logger.log(state["eval_before"], step=0)
    held_out = sft_rows(cfg)[1] if cfg.eval.rouge else None
    if cfg.eval.rouge and "rouge_before" not in state:
        with roles.use(POLICY) as model:
            state["rouge_before"] = common.held_out_rouge(model, tokenizer, held_out, cfg, worker, backend)
        logger.log({f"{k}_before": v for k, v in state["rouge_before"].items()}, step=0)

    chunked = lm_head_loss.enabled(spec.chunked_loss, roles.model, worker.device)  # response positions only
    if worker.is_main:
        logger.log({"chunked_loss": float(chunked)}, step=0)
    roles.train()
    throughput = Throughput()
    started = time.perf_counter()
    window: list[list[float]] = []
    step = state["step"]
    with compilation.compiled(backend.module, spec.compile):
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            for ids in common.epoch_batches(len(train_set), spec.batch_size, worker, cfg.seed, epoch)[within:]:
                batch = common.to_device(collate([train_set[j] for j in ids]), worker.device)
                losses, chosen, rejected, _, _ = pair_terms(roles, batch, spec.beta, spec.loss_type, chunked)
                loss = losses.mean()
                nonfinite_loss.check_finite(loss, stage=NAME, step=step + 1)
                backend.backward(loss)
                backend.step()
                margin = chosen - rejected
                window.append([loss.item(), (margin > 0).float().mean().item(), margin.mean().item(),
                               chosen.mean().item(), rejected.mean().item()])
                throughput.add(count_tokens(batch))
                step += 1
                state["step"] = step

                if step % spec.log_every == 0 or step == total:
                    means = [sum(col) / len(col) for col in zip(*window)]
                    loss_m, acc_m, margin_m, chosen_m, rejected_m, tok_s = engine.all_reduce(
                        means + [throughput.window()], op="mean")
                    window = []
                    logger.log({"train_loss": loss_m, "train_accuracy": acc_m, "train_margin": margin_m,
                                "reward_chosen": chosen_m, "reward_rejected": rejected_m,
                                "learning_rate": backend.lr(),
                                "tokens_per_s": tok_s * worker.world_size, "epoch": step / steps_per_epoch}, step=step)
                    if worker.is_main:
                        engine.say(f"[dpo] step {step}/{total} loss {loss_m:.4f} acc {acc_m:.3f} margin {margin_m:.3f}")
                if spec.eval_every and step % spec.eval_every == 0 and step < total:
                    logger.log(evaluate(roles, eval_set, collate, worker, cfg, spec.batch_size * 2, backend),
                               step=step)
                if step % spec.checkpoint_every == 0 and step < total:
                    logger.flush()
                    common.report(worker, backend, {"step": step}, roles, state)
                if step >= total:
                    break

    final: dict[str, float] = {"train_seconds": time.perf_counter() - started}
    after = evaluate(roles, eval_set, collate, worker, cfg, spec.batch_size * 2, backend)
    logger.log(after, step=step)
    final.update({f"{k}_after": v for k, v in after.items()})
    final.update({f"{k}_before": v for k, v in state["eval_before"].items()})
    if cfg.eval.rouge:
        with roles.use(POLICY) as model:
            rouge_after = common.held_out_rouge(model, tokenizer, held_out, cfg, worker, backend)
        final.update({f"{k}_after": v for k, v in rouge_after.items()})
        final.update({f"{k}_before": v for k, v in state["rouge_before"].items()})
    final.update(common.resource_figures(worker, throughput, backend))
    if worker.is_main:
        engine.say(f"[dpo] held-out accuracy {state['eval_before']['eval_accuracy']:.3f} -> "
                   f"{after['eval_accuracy']:.3f}, margin {after['eval_margin']:.3f}")
    logger.log(final, step=step)
    logger.flush()
    common.report(worker, backend, {"step": step, "done": 1, **final}, roles, state)


# ------------------------------------------------------------------------------- driver side

def batch_shape(cfg: RunConfig) -> BatchShape:
    return pairs.batch_shape(cfg.dpo)


def check_data(cfg: RunConfig, tokenizer: Any, warn: Warn) -> None:
    """The SFT rows the policy's held-out ROUGE reads (with ``eval.rouge``), then the pairs."""
    if cfg.eval.rouge:
        sft_rows(cfg)
    pairs.check_pair_data(cfg, NAME, cfg.dpo, tokenizer, warn)


STAGE = Stage(
    name=NAME, section=DPOSpec, train_loop=train_loop,
    inputs=(AdapterInput(POLICY, "dpo.policy_init"), AdapterInput(REFERENCE, "dpo.reference", follows=POLICY)),
    batch=batch_shape, check_data=check_data,
    summary_metrics=("rouge", "eval_accuracy", "eval_margin", "eval_reward"),
    metrics=ROUGE_METRICS + ("train_loss", "train_accuracy", "train_margin", "reward_chosen", "reward_rejected",
                             "epoch", "train_pairs", "eval_pairs", "truncated_pairs", "reference_is_base", "chunked_loss")
    + before_after("eval_loss", "eval_accuracy", "eval_margin", "eval_reward_chosen", "eval_reward_rejected",
                   "eval_logp_accuracy"),
)
