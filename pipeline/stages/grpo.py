"""Critic-free, group-sampled policy optimisation (GRPO, Dr. GRPO, RLOO, REINFORCE++) with
programmable rewards, every role an adapter on one base.

Roles (``pipeline.roles``): ``policy`` (trainable; from ``grpo.policy_init``), ``reference``
(frozen: a copy of the policy's start, or the bare base) and, with ``grpo.reward_adapter``,
``reward`` (a reward stage's adapter + value head). No critic is ever built.

One step, on every worker:

1. sample (``pipeline.group_rollout``): ``prompts_per_step`` prompt rows, each repeated
   ``num_generations`` times (a group, rows ``p*G .. p*G+G-1``), one ``generate`` call;
2. reward: every function of ``grpo.rewards`` on the decoded completions and their rows' other
   columns, plus the reward model's score, weighted into one total per completion; a completion
   no source scored (all returned None) drops its group;
3. advantages (``pipeline.rl_math.group_advantages``) within this worker's whole groups:
   ``grpo`` ``(r - mean) / std``, ``dr_grpo`` ``r - mean``, ``rloo`` ``r - mean of the others``;
   ``reinforce_pp``: returns of per-token rewards (score on the last token, ``- kl.coef * k1``
   on each token), whitened over the response tokens of *every* worker (one all-reduce of the
   sums, then of the squared deviations: the whole batch's mean and population std), with the
   group mean subtracted from the scores first when ``num_generations > 1``;
   ``filter_zero_variance`` leaves groups whose rewards are all equal out of the loss (the
   batch shrinks: DAPO's refill by sampling more prompts is not done);
4. ``update_epochs`` passes in ``minibatches`` minibatches of whole groups: the clipped surrogate
   (``pipeline.rl_math.surrogate``: ``clip_low`` / ``clip_high``, ``loss_normalisation``), plus
   ``kl.coef`` times the k1/k3 KL to the reference (not for ``reinforce_pp``, whose KL is in the
   reward). The normalisation is that of the global minibatch, all workers together: each
   worker's loss is scaled by ``world_size * local / global`` units (rows; tokens for
   ``token``, as DAPO's token-level mean needs the global token count), so the averaged
   gradient is exactly the formula's over every kept completion.

With ``kl.coef: 0`` no training step runs the reference; with one inner pass and one minibatch
the sampling policy's log-probs are not recomputed either (the update's forward is that policy,
ratio 1). Everything runs with dropout off. Metrics per step: reward mean/std per source and
total (``reward/<label>/mean|std|skipped``), group reward std, zero-variance and skipped group
fractions, KL (the loss's per-token estimator, mean over the update's tokens; only with
``kl.coef > 0``), entropy, completion length, clip fractions below/above, loss, tokens/s, peak
memory; held-out reward of every source (``eval_reward/<label>``, total ``eval_reward``) and
sequence KL to the reference (k1 summed over the completion: the one use of the reference
when ``kl.coef`` is 0) before and after; ROUGE of greedy generations before and after.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raypeft.pipeline import engine, group_rollout, lm_head_loss, nonfinite_loss, rollout, tracking
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import ConfigError, GRPOSpec, RunConfig
from raypeft.pipeline.config.grpo import REWARD_MODEL_LABEL, SFT_ROWS_SOURCE
from raypeft.pipeline.conversations import is_chat, messages_column, tokenized_prompts
from raypeft.pipeline.data import DataError, PromptCollator
from raypeft.pipeline.data.chat_rows import split_sft_rows
from raypeft.pipeline.group_rollout import GroupRollout
from raypeft.pipeline.inputs import prompt_rows, sft_rows
from raypeft.pipeline.modeling import adapter_config, load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import Warn
from raypeft.pipeline.resources import Throughput, reset_gpu_peaks, worker_memory
from raypeft.pipeline.rewards import RewardFunction, RewardScores, check_reward_functions, load_reward_functions
from raypeft.pipeline.rewards.loading import CALL_KEYWORDS
from raypeft.pipeline.rl_math import (GROUP_ESTIMATORS, KLPenalty, clipped_surrogate_loss, filter_groups, group_std,
                                      kl_k1, masked_mean, reinforce_pp_advantages)
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.rollout_engine import RolloutEngine
from raypeft.pipeline.stages import common
from raypeft.pipeline.stages.definition import ROUGE_METRICS, AdapterInput, BatchShape, Stage, before_after
from raypeft.pipeline.stages.policy_eval import PolicyEvaluation

NAME = "grpo"
POLICY, REFERENCE, REWARD = "policy", "reference", "reward"


def build_roles(cfg: RunConfig, base: torch.nn.Module, inputs: dict[str, str | None]) -> Roles:
    """Policy, reference and (with a reward adapter) reward roles on one base; never a critic."""
    roles = Roles(base)
    roles.add(POLICY, inputs.get("policy") or adapter_config(cfg.adapter, cfg.model), trainable=True)
    if inputs.get("reference") is None:
        roles.add_base(REFERENCE)
    else:
        roles.add(REFERENCE, inputs["reference"], trainable=False)
    if inputs.get("reward") is not None:
        roles.add(REWARD, inputs["reward"], trainable=False, value_head="file")
    roles.primary = POLICY
    return roles


def group_rows(cfg: RunConfig):
    """The prompt rows (every column kept): ``grpo.data.source`` ``sft`` reads the ``data`` block's
    train rows (conversations become the prompt before their last reply, under
    ``data.columns.prompt``, and that reply, under ``data.columns.response``), anything else is a
    prompt source like PPO's."""
    spec = cfg.grpo.data
    if spec.source != SFT_ROWS_SOURCE:
        rows = prompt_rows(cfg, spec, "grpo.data")
    else:
        rows = sft_rows(cfg)[0]
        if is_chat(cfg):  # conversations -> the prompt before the last reply, and that reply as the reference
            rows = split_sft_rows(rows, messages_column=messages_column(cfg, rows), prompt_column=cfg.data.columns.prompt,
                                  response_column=cfg.data.columns.response)
        if spec.column not in rows.column_names:
            raise DataError(f"grpo.data.column: column '{spec.column}' not found in the data block's rows "
                            f"(grpo.data.source: sft); present: {', '.join(rows.column_names)}")
        if spec.max_rows is not None and len(rows) > spec.max_rows:
            rows = rows.select(range(spec.max_rows))
    clash = [c for c in rows.column_names if c in CALL_KEYWORDS]
    if clash:
        raise DataError(f"grpo.data.source: a column may not be named '{clash[0]}' (reward functions get the "
                        "prompts and completions under those names)")
    return rows


# ------------------------------------------------------------------------------- advantages

def global_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the masked entries of every worker (population std, in two
    all-reduces: the mean, then the squared deviations); zero where ``mask`` is 0, and everywhere
    when all masked entries are equal (no signal, and no rounding residue blown up)."""
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    total, count = engine.all_reduce([float((x64 * m).sum()), float(m.sum())], op="sum")
    if count == 0:
        return torch.zeros_like(x)
    mean = total / count
    spread = engine.all_gather((float(x64[m.bool()].max()), float(x64[m.bool()].min())) if m.any() else None)
    highs = [s[0] for s in spread if s is not None]
    lows = [s[1] for s in spread if s is not None]
    if max(highs) == min(lows):
        return torch.zeros_like(x)
    (squares,) = engine.all_reduce([float((((x64 - mean) ** 2) * m).sum())], op="sum")
    std = (squares / count) ** 0.5
    return ((x64 - mean) / (std + eps) * m).to(x.dtype)


def compute_advantages(spec: GRPOSpec, scores: RewardScores, ro: rollout.Rollout) -> tuple[torch.Tensor, Any]:
    """``(advantages, group filter)``: ``[N]`` per completion (``[N, T]`` per token for
    ``reinforce_pp``), zero outside the kept groups; see the module docstring."""
    g = spec.num_generations
    valid = scores.valid.to(ro.mask.device)
    total = torch.where(valid, scores.total.to(ro.mask.device), torch.zeros_like(scores.total.to(ro.mask.device)))
    total = total.float()
    kept = filter_groups(total, g, drop_zero_variance=spec.filter_zero_variance, valid=valid)
    keep = kept.keep_rows.to(ro.mask.device)
    if spec.algorithm in GROUP_ESTIMATORS:
        return GROUP_ESTIMATORS[spec.algorithm](total, g) * keep.float(), kept
    kl = None
    if spec.kl.coef and ro.ref_logprobs is not None and ro.logprobs is not None:
        kl = kl_k1(ro.logprobs, ro.ref_logprobs)
    _, returns = reinforce_pp_advantages(total, ro.mask, kl=kl, kl_coef=spec.kl.coef, gamma=spec.gamma,
                                         num_generations=g if g > 1 else None)
    return global_whiten(returns, ro.mask * keep.unsqueeze(1)), kept


# ------------------------------------------------------------------------------- update

def loss_scale(spec: GRPOSpec, rows: int, tokens: int, global_rows: float, global_tokens: float,
               world_size: int) -> float:
    """What a worker's minibatch loss is multiplied by so that the workers' averaged gradient is the
    loss of the global minibatch: ``world_size * local / global`` units (tokens for ``token``
    normalisation, completions otherwise)."""
    local, whole = (tokens, global_tokens) if spec.loss_normalisation == "token" else (rows, global_rows)
    return world_size * local / whole if whole else 0.0


def update(roles: Roles, ro: rollout.Rollout, keep_rows: torch.Tensor, spec: GRPOSpec, backend: Backend,
           generator: torch.Generator, world_size: int, step: int = 0, chunked: bool = False) -> dict[str, float]:
    """``update_epochs`` x ``minibatches`` optimiser steps on one group rollout; returns the sums of
    the statistics and the count of minibatches that had kept rows (``updates``). ``chunked``: the
    policy's log-probabilities without full logits (``rollout.policy_terms``).

    Every worker runs the same number of forwards and optimiser steps (ZeRO-3 gathers per
    forward; gradients are all-reduced per step): a worker without kept rows in a minibatch runs
    one row with a zero loss; a minibatch without kept rows on any worker is skipped by all.
    """
    g = spec.num_generations
    n_groups = ro.input_ids.shape[0] // g
    per_minibatch = n_groups // spec.minibatches
    penalty = KLPenalty(spec.kl.coef, spec.kl.estimator) if spec.algorithm != "reinforce_pp" else None
    device = ro.input_ids.device
    sums = {k: 0.0 for k in ("loss", "clip_fraction_low", "clip_fraction_high", "approx_kl", "entropy", "kl",
                             "updates", "kl_updates")}
    for _ in range(spec.update_epochs):
        order = torch.randperm(n_groups, generator=generator).tolist()
        for start in range(0, n_groups, per_minibatch):
            idx = torch.tensor([p * g + i for p in order[start:start + per_minibatch] for i in range(g)], device=device)
            kept = idx[keep_rows[idx]]
            rows_n, tokens_n = int(kept.numel()), int(ro.mask[kept].sum())
            global_rows, global_tokens = engine.all_reduce([rows_n, tokens_n], op="sum")
            if global_rows == 0:
                continue
            batch = ro.rows(kept if rows_n else idx[:1])
            logp, entropy = rollout.policy_terms(roles, POLICY, batch, spec.generation.temperature, with_entropy=True,
                                                 chunked=chunked)
            old = batch["logprobs"] if "logprobs" in batch else logp.detach()
            out = clipped_surrogate_loss(logp, old, batch["advantages"], batch["mask"], clip_low=spec.clip_low,
                                         clip_high=spec.clip_high, normalisation=spec.loss_normalisation,
                                         max_length=spec.generation.max_new_tokens, kl_penalty=penalty,
                                         ref_logprobs=batch.get("ref_logprobs"))
            loss = out.loss * loss_scale(spec, rows_n, tokens_n, global_rows, global_tokens, world_size)
            nonfinite_loss.check_finite(loss, stage=NAME, step=step)
            backend.backward(loss)
            backend.step()
            if rows_n:
                sums["updates"] += 1
                for key, value in (("loss", out.loss.detach()), ("clip_fraction_low", out.clip_fraction_low),
                                   ("clip_fraction_high", out.clip_fraction_high), ("approx_kl", out.approx_kl),
                                   ("entropy", masked_mean(entropy.detach(), batch["mask"]))):
                    sums[key] += float(value)
                if out.kl is not None:
                    sums["kl"] += float(out.kl)
                    sums["kl_updates"] += 1
    return sums


def update_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Whole-run means of the update statistics (over every worker's minibatches with kept rows)."""
    keys = list(sums)
    totals = dict(zip(keys, engine.all_reduce([sums[k] for k in keys], op="sum")))
    out = {}
    if totals["updates"]:
        out = {k: totals[k] / totals["updates"] for k in ("loss", "clip_fraction_low", "clip_fraction_high",
                                                         "approx_kl", "entropy")}
    if totals["kl_updates"]:
        out["kl"] = totals["kl"] / totals["kl_updates"]
    out["updates"] = totals["updates"]
    return out


# ------------------------------------------------------------------------------- rollout and evaluation

def rollout_step(roles: Roles, prompt_set, rows, ids: list[int], functions: list[RewardFunction], spec: GRPOSpec,
                 tokenizer, collate: PromptCollator, device: torch.device, generate_kwargs: dict[str, Any],
                 *, old_logprobs: bool, reference: bool, num_generations: int,
                 rollout_engine: RolloutEngine | None = None, chunked: bool = False) -> tuple[GroupRollout, RewardScores]:
    """Sample the groups of prompt rows ``ids``, score their tokens (``chunked``: without full
    logits) and rewards."""
    group = group_rollout.sample_groups(roles, POLICY, prompt_set, rows, ids, num_generations=num_generations,
                                        prompt_column=spec.data.column, generation=spec.generation,
                                        tokenizer=tokenizer, collate=collate, device=device,
                                        generate_kwargs=generate_kwargs, engine=rollout_engine)
    chunk = max(1, len(group.row_ids) // spec.minibatches)
    has_rm = REWARD in roles.roles
    group_rollout.score_tokens(roles, group.rollout, chunk=chunk, temperature=spec.generation.temperature,
                               policy=POLICY if old_logprobs else None, reference=REFERENCE if reference else None,
                               reward=REWARD if has_rm else None, chunked=chunked)
    scores = group_rollout.score_rewards(group, functions, group.rollout.scores if has_rm else None,
                                         spec.reward_adapter_weight, REWARD_MODEL_LABEL)
    return group, scores


@torch.no_grad()
def evaluate(roles: Roles, prompt_set, rows, eval_ids: list[int], functions: list[RewardFunction], spec: GRPOSpec,
             tokenizer, collate: PromptCollator, worker: engine.Worker, seed: int,
             backend: Backend | None = None, rollout_engine: RolloutEngine | None = None,
             chunked: bool = False) -> dict[str, float]:
    """Mean reward of every source and of the total (``eval_reward``), KL to the reference (sum over
    the response, k1) and completion length, for one sampled completion of each held-out prompt
    (sharded over workers; seeded, so a repeat on the same policy samples the same; padded
    prompts, which keep ZeRO-3 workers in lockstep, are sampled and left out)."""
    size = spec.prompts_per_step * spec.num_generations
    shard = common.eval_shard(len(eval_ids), worker, size, backend)
    torch.manual_seed(seed + worker.rank)
    generate_kwargs = backend.generate_kwargs() if backend is not None else {}
    per_label: dict[str, list[float | None]] = {}
    kl_sum, length_sum, n = 0.0, 0.0, 0
    for i in range(0, len(shard), size):
        part = shard[i:i + size]
        ids = [eval_ids[j] if j is not None else eval_ids[0] for j in part]
        group, scores = rollout_step(roles, prompt_set, rows, ids, functions, spec, tokenizer, collate, worker.device,
                                     generate_kwargs, old_logprobs=True, reference=True, num_generations=1,
                                     rollout_engine=rollout_engine, chunked=chunked)
        keep = [j is not None for j in part]
        ro = group.rollout
        kl = ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1)
        lengths = ro.mask.sum(1)
        for b, k in enumerate(keep):
            if k:
                kl_sum += float(kl[b])
                length_sum += float(lengths[b])
                n += 1
        labels = {**scores.per_function, "total": [float(t) if v else None for t, v in
                                                    zip(scores.total.tolist(), scores.valid.tolist())]}
        for label, values in labels.items():
            per_label.setdefault(label, []).extend(v for v, k in zip(values, keep) if k)
    gathered = engine.all_gather((per_label, kl_sum, length_sum, n))
    n_all = max(sum(p[3] for p in gathered), 1)
    out = {"eval_kl": sum(p[1] for p in gathered) / n_all, "eval_completion_length": sum(p[2] for p in gathered) / n_all}
    labels = [k for p in gathered for k in p[0]]
    for label in dict.fromkeys(labels):
        values = [v for p in gathered for v in p[0].get(label, []) if v is not None]
        if values:
            out["eval_reward" if label == "total" else f"eval_reward/{label}"] = sum(values) / len(values)
    return out


def step_metrics(group: GroupRollout, scores: RewardScores, kept, spec: GRPOSpec) -> dict[str, float]:
    """Whole-batch rollout figures of one step (every worker's completions)."""
    everyone = group_rollout.gather_rewards(scores)
    out = everyone.metrics("reward")
    ro = group.rollout
    total = torch.where(scores.valid, scores.total, torch.zeros_like(scores.total)).float()
    complete = scores.valid.view(-1, spec.num_generations).all(1)
    stds = group_std(total, spec.num_generations)[complete]
    local = [float(stds.sum()), float(complete.sum()), kept.zero_variance_fraction, kept.skipped_fraction,
             float(ro.mask.sum(1).float().mean()), float(ro.ended.float().mean())]
    std_sum, n_complete, zero_var, skipped, length, eos = engine.all_reduce(local[:2], op="sum") + \
        engine.all_reduce(local[2:], op="mean")
    out.update({"reward_mean": out.get("reward/total/mean", float("nan")),
                "reward_std": out.get("reward/total/std", float("nan")),
                "group_reward_std": std_sum / n_complete if n_complete else 0.0,
                "zero_variance_group_fraction": zero_var, "skipped_group_fraction": skipped,
                "completion_length": length, "eos_fraction": eos})
    return out


# ------------------------------------------------------------------------------- worker

def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    spec = cfg.grpo
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    roles = build_roles(cfg, load_base_model(cfg.model, common.base_device(cfg, worker)), payload["inputs"])
    roles.eval()  # no dropout anywhere: sampling and update see the same functions
    functions = load_reward_functions(spec.rewards, "grpo.rewards") if spec.rewards else []
    prompt_room = cfg.data.max_length - spec.generation.max_new_tokens
    if prompt_room < 8:
        raise ValueError(f"grpo.generation.max_new_tokens: {spec.generation.max_new_tokens} leaves "
                         f"{prompt_room} of data.max_length={cfg.data.max_length} for the prompt")
    rows = group_rows(cfg)
    prompt_set = tokenized_prompts(cfg, rows, tokenizer, column=spec.data.column, max_length=prompt_room,
                                   field="grpo.data")
    n_train = len(rows) - spec.eval_prompts
    if n_train <= 0:
        raise ValueError(f"grpo.eval_prompts: {spec.eval_prompts} held-out prompts leave none of {len(rows)} "
                         "for training")
    eval_ids = list(range(n_train, len(rows)))
    collate = PromptCollator(pad_token_id=tokenizer.pad_token_id)
    steps_per_epoch, _ = common.total_steps(n_train, spec.prompts_per_step, worker, epochs=1.0, max_steps=None,
                                            batch_field="grpo.prompts_per_step")
    total = spec.max_steps

    census = roles.parameter_census()  # before the backend: ZeRO-3 partitions what it takes
    n_params = common.count_parameters(roles.trainable_parameters())
    updates = spec.update_epochs * spec.minibatches
    backend = common.make_backend(cfg, roles, worker, NAME, batch_shape(cfg), total_steps=total * updates,
                                  warmup_steps=spec.warmup_steps * updates)
    generate_kwargs = backend.generate_kwargs()
    state: dict[str, Any] = {"step": 0}
    resumed = common.resume_folder(payload)
    if resumed is not None:
        state = common.restore(backend, resumed, roles)
        engine.say(f"[grpo] resumed from step {state['step']}")

    held_out = sft_rows(cfg)[1] if cfg.eval.rouge else None
    if worker.is_main:
        logger.log({"trainable_params": n_params, "prompts": n_train, "base_params": census["base_params"],
                    "base_params_missing": census["base_missing"], "non_base_non_role_params": census["other_params"],
                    "reference_is_base": float(roles.is_base(REFERENCE))}, step=0)
    gen_engine = RolloutEngine(spec.generation, common.pad_multiple(cfg, worker))
    gen_engine.gather_with(backend.whole_model)  # generation.gather_weights under ZeRO-3
    gen_engine.reserve(max(map(len, prompt_set["input_ids"]), default=0))
    chunked = lm_head_loss.enabled(spec.chunked_loss, roles.model, worker.device)  # completion positions only
    if worker.is_main:
        logger.log({"chunked_loss": float(chunked)}, step=0)
    reward_eval = (lambda: evaluate(roles, prompt_set, rows, eval_ids, functions, spec, tokenizer, collate, worker,
                                    cfg.seed, backend, gen_engine, chunked)) if spec.eval_prompts else None
    report = PolicyEvaluation(NAME, cfg, roles, POLICY, tokenizer, worker, backend, logger, held_out, reward_eval,
                              gen_engine)
    report.before(state)

    throughput = Throughput()
    started = time.perf_counter()
    need_ref = spec.kl.coef > 0
    # The sampling policy's log-probs: the ratio's denominator after the first update, and
    # REINFORCE++'s per-token KL reward.
    need_old = spec.update_epochs > 1 or spec.minibatches > 1 or (need_ref and spec.algorithm == "reinforce_pp")
    step = state["step"]
    while step < total:
        t0 = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        ids = common.epoch_batches(n_train, spec.prompts_per_step, worker, cfg.seed, epoch)[within]
        torch.manual_seed(cfg.seed * 100003 + step * 97 + worker.rank)  # sampling: reproducible per step
        group, scores = rollout_step(roles, prompt_set, rows, ids, functions, spec, tokenizer, collate, worker.device,
                                     generate_kwargs, old_logprobs=need_old, reference=need_ref,
                                     num_generations=spec.num_generations, rollout_engine=gen_engine,
                                     chunked=chunked)
        ro = group.rollout
        ro.advantages, kept = compute_advantages(spec, scores, ro)
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + step * 7919 + worker.rank)
        sums = update(roles, ro, kept.keep_rows.to(ro.mask.device), spec, backend, generator, worker.world_size,
                      step=step + 1, chunked=chunked)
        n_tokens = int(ro.attention_mask.sum().item())
        throughput.add(n_tokens)
        step += 1
        state["step"] = step

        metrics = step_metrics(group, scores, kept, spec)
        metrics.update(update_metrics(sums))
        memory = engine.all_gather(worker_memory(worker.device))
        metrics.update({k: max(m[k] for m in memory) for k in memory[0]})
        metrics["tokens_per_s"] = engine.all_reduce([n_tokens / (time.perf_counter() - t0)], op="sum")[0]
        metrics["learning_rate"] = backend.lr()
        if step % spec.log_every == 0 or step == total:
            logger.log(metrics, step=step)
            if worker.is_main:
                engine.say(f"[grpo] step {step}/{total} reward {metrics['reward_mean']:.3f} "
                           f"group std {metrics['group_reward_std']:.3f} "
                           f"zero-var {metrics['zero_variance_group_fraction']:.2f} "
                           + (f"kl {metrics['kl']:.4f} " if "kl" in metrics else "")
                           + f"entropy {metrics.get('entropy', float('nan')):.3f} "
                           f"clip {metrics.get('clip_fraction_low', 0.0):.3f}/{metrics.get('clip_fraction_high', 0.0):.3f} "
                           f"len {metrics['completion_length']:.1f}")
        if reward_eval is not None and spec.eval_every and step % spec.eval_every == 0 and step < total:
            logger.log(reward_eval(), step=step)
        if step % spec.checkpoint_every == 0 and step < total:
            logger.flush()
            common.report(worker, backend, {"step": step}, roles, state)

    final = report.finish(state, step, started, throughput)
    common.report(worker, backend, {"step": step, "done": 1, **final}, roles, state)


# ------------------------------------------------------------------------------- driver side

def batch_shape(cfg: RunConfig) -> BatchShape:
    """One optimiser step per minibatch of whole groups."""
    spec = cfg.grpo
    return spec.prompts_per_step * spec.num_generations // spec.minibatches, 1


def check_data(cfg: RunConfig, tokenizer: Any, warn: Warn) -> None:
    """A reward source; every reward function loads and finds its columns in the prompt rows; the
    rows (and the SFT rows held-out ROUGE reads); room for a prompt beside the longest completion;
    enough rows for the held-out prompts and one step on every worker."""
    spec = cfg.grpo
    if not spec.rewards and spec.reward_adapter is None:
        raise ConfigError("grpo.rewards: needs at least one reward function (e.g. {function: rouge_l}) or a "
                          "grpo.reward_adapter")
    if spec.rewards:
        check_reward_functions(spec.rewards, "grpo.rewards")
    if cfg.eval.rouge:
        sft_rows(cfg)
    rows = group_rows(cfg)
    if is_chat(cfg):  # every conversation and the template's generation prompt, before Ray starts
        tokenized_prompts(cfg, rows, tokenizer, column=spec.data.column,
                          max_length=cfg.data.max_length - spec.generation.max_new_tokens, field="grpo.data")
    columns = [c for c in rows.column_names if c != spec.data.column]
    for i, fn in enumerate(load_reward_functions(spec.rewards, "grpo.rewards") if spec.rewards else []):
        missing = sorted(fn.required - set(CALL_KEYWORDS) - set(columns))
        named = [f"kwargs.{k}" for k, v in fn.kwargs.items() if k.endswith("_column") and isinstance(v, str)
                 and v not in columns]
        if missing or named:
            what = f"needs a column '{missing[0]}'" if missing else \
                f"{named[0]} names column '{fn.kwargs[named[0][7:]]}'"
            raise ConfigError(f"grpo.rewards[{i}]: '{fn.name}' {what}, which the prompt rows do not have "
                              f"(columns besides the prompt: {', '.join(columns) or 'none'})")
    if spec.generation.max_new_tokens > cfg.data.max_length - 8:
        raise ConfigError(f"grpo.generation.max_new_tokens: {spec.generation.max_new_tokens} leaves no room "
                          f"for a prompt within data.max_length={cfg.data.max_length}")
    n_train = len(rows) - spec.eval_prompts
    need = spec.prompts_per_step * cfg.scaling.num_workers
    if n_train < need:
        raise ConfigError(f"grpo.eval_prompts: {spec.eval_prompts} held-out of {len(rows)} prompt rows leave "
                          f"{max(n_train, 0)} for training, fewer than one step needs (grpo.prompts_per_step "
                          f"{spec.prompts_per_step} x {cfg.scaling.num_workers} workers)")


STAGE = Stage(
    name=NAME, section=GRPOSpec, train_loop=train_loop,
    inputs=(AdapterInput(POLICY, "grpo.policy_init"), AdapterInput(REFERENCE, "grpo.reference", follows=POLICY),
            AdapterInput(REWARD, "grpo.reward_adapter", reward_model=True, optional=True)),
    batch=batch_shape, check_data=check_data, summary_metrics=("rouge", "eval_reward", "eval_kl"),
    metrics=ROUGE_METRICS + ("reward_mean", "reward_std", "group_reward_std", "zero_variance_group_fraction",
                             "skipped_group_fraction", "completion_length", "eos_fraction", "loss", "clip_fraction_low",
                             "clip_fraction_high", "approx_kl", "entropy", "kl", "updates", "prompts", "base_params",
                             "base_params_missing", "non_base_non_role_params", "reference_is_base", "chunked_loss")
    + before_after("eval_reward", "eval_kl", "eval_completion_length"),
)
