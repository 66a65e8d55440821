"""PPO of the policy adapter against a reward model, with every role an adapter on one base.

Roles (``pipeline.roles``): ``policy`` (trainable; from ``ppo.policy_init``, the SFT output by
default), ``reference`` (frozen: a copy of the policy's starting adapter, or the bare base),
``reward`` (frozen adapter + value head from the reward stage) and ``critic`` (trainable adapter
+ value head; by default the reward model's adapter with a zero head). One copy of the base
weights serves all four; a role switch is an adapter switch.

The critic's start matters: a reward model's head was trained on the last token of a finished
response only, and read at every prefix token it can swing by more than the scores spread
(demo: values -7.7..+4.4 along one response scored 2.8; explained variance of the returns
-3.9), so the first steps' advantages follow the critic's errors, not the score, and the policy
drifts before the critic is refit (quickstart: held-out reward 3.22 -> 3.11). So a critic
started from the reward model keeps its adapter but starts with a zero head (``build_roles``):
the first advantages are then the whitened KL-shaped returns. ``value_explained_variance``
(logged each step; a warning at step 1 below -1) shows a critic that starts worse than a
constant.

One step, on every worker:

1. rollout (``pipeline.rollout``): sample ``rollout_batch_size`` prompts (``data.prompt_template``
   applied) and let the policy ``generate`` a response (the YAML's sampling settings), cut after
   the first eos;
2. score (``pipeline.rollout``): re-pack ``prompt + response`` right-padded (the layout the reward
   model was trained on) and compute, without gradients, the policy's and reference's
   log-probabilities of the response tokens (logits divided by the sampling temperature), the
   critic's values, and the reward model's score at the last token (minus ``missing_eos_penalty``
   if no eos, in step 3);
3. the score centred and scaled by the running mean and std of every score so far
   (``normalize_scores``, on by default: with a zero critic an uncentred score becomes a ramp
   over token positions, see ``pipeline.rl_math.score_norm``); per-token rewards
   ``-kl_coef * (log pi - log ref)`` with that score added on the last token (optionally
   whitened), GAE advantages and returns (advantages whitened by default);
4. ``ppo_epochs`` passes over the rollout in ``minibatches`` minibatches: clipped policy loss
   plus ``vf_coef`` times the clipped value loss, one backward reaching policy and critic,
   gradients averaged over workers;
5. update the KL coefficient (fixed, or adaptive towards ``kl.target``).

Everything runs with dropout off (eval mode), so the first minibatch's ratio is exactly 1.
Whitening uses each worker's own rollout batch. Metrics per step: reward (score) mean/std, KL
to the reference, KL coefficient, policy entropy, clip fractions, policy/value losses, approx
KL, response length, tokens/s and peak memory; ROUGE of greedy generations before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from raypeft.pipeline import engine, lm_head_loss, nonfinite_loss, rollout, tracking
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import ConfigError, PPOSpec, RunConfig
from raypeft.pipeline.conversations import is_chat, tokenized_prompts
from raypeft.pipeline.data import PromptCollator
from raypeft.pipeline.inputs import prompt_rows, sft_rows
from raypeft.pipeline.modeling import adapter_config, load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import Warn
from raypeft.pipeline.resources import Throughput, reset_gpu_peaks, worker_memory
from raypeft.pipeline.rl_math import (AdaptiveKLController, FixedKLController, RunningMoments, clipped_policy_loss,
                                      clipped_value_loss, explained_variance, gae, kl_penalised_rewards, masked_mean,
                                      masked_whiten)
from raypeft.pipeline.roles import Roles, has_value_head
from raypeft.pipeline.rollout import Rollout
from raypeft.pipeline.rollout_engine import RolloutEngine
from raypeft.pipeline.stages import common
from raypeft.pipeline.stages.definition import ROUGE_METRICS, AdapterInput, BatchShape, Stage, before_after
from raypeft.pipeline.stages.policy_eval import PolicyEvaluation

NAME = "ppo"
POLICY, REFERENCE, REWARD, CRITIC = "policy", "reference", "reward", "critic"


def build_roles(cfg: RunConfig, base: torch.nn.Module, inputs: dict[str, str | None]) -> Roles:
    """The four PPO roles on one base; ``inputs`` maps policy/reference/reward/critic to folders.

    ``reference`` None: the base with adapters disabled; ``policy`` or ``critic`` None: a fresh
    adapter from the ``adapter`` block (the critic then with a zero value head). A critic started
    from the reward model itself takes its adapter but a zero head: that head scores a finished
    response at its last token and is no value function at the prefix tokens a critic is read at
    (see the module docstring); a critic folder of its own (a value head trained as one) keeps it.
    """
    roles = Roles(base)
    fresh = adapter_config(cfg.adapter, cfg.model)
    roles.add(POLICY, inputs.get("policy") or fresh, trainable=True)
    if inputs.get("reference") is None:
        roles.add_base(REFERENCE)
    else:
        roles.add(REFERENCE, inputs["reference"], trainable=False)
    if inputs.get("reward") is None:
        raise ValueError("ppo.reward_adapter: the PPO stage needs a reward model adapter")
    roles.add(REWARD, inputs["reward"], trainable=False, value_head="file")
    critic = inputs.get("critic")
    if critic is not None:
        own_head = has_value_head(critic) and not same_folder(critic, inputs["reward"])
        roles.add(CRITIC, critic, trainable=True, value_head="file" if own_head else "zero")
    else:
        roles.add(CRITIC, fresh, trainable=True, value_head="zero")
    roles.primary = POLICY
    return roles


def same_folder(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def kl_controller(spec: PPOSpec, coef: float | None = None):
    start = spec.kl.coef if coef is None else coef
    if spec.kl.controller == "fixed":
        return FixedKLController(start)
    return AdaptiveKLController(start, spec.kl.target, spec.kl.horizon)


# ------------------------------------------------------------------------------- rollout

def policy_and_critic(roles: Roles, rows: dict[str, torch.Tensor], temperature: float,
                      chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Policy log-probabilities and entropies and critic values of the response tokens from one
    call of the roles' entry: under DeepSpeed the loss built from both is one engine forward.
    ``chunked``: the policy's figures without full logits (``rollout.policy_terms``)."""
    if chunked:
        *terms, values = roles.run(rows["input_ids"], rows["attention_mask"], rollout.label_request(POLICY, True),
                                   ("values", CRITIC), labels=rollout.response_labels(rows), temperature=temperature)
        logp, entropy = rollout.from_label_outputs(tuple(terms), rows, with_entropy=True)
    else:
        logits, values = roles.run(rows["input_ids"], rows["attention_mask"], ("logits", POLICY), ("values", CRITIC))
        logp, entropy = rollout.response_logprobs(logits, rows, temperature, with_entropy=True)
    return logp, entropy, rollout.gather_positions(values[:, :-1], rows["index"])


@torch.no_grad()
def make_rollout(roles: Roles, prompts: dict[str, torch.Tensor], spec: PPOSpec, tokenizer,
                 chunk: int, generate_kwargs: dict[str, Any] | None = None,
                 rollout_engine: RolloutEngine | None = None, chunked: bool = False) -> Rollout:
    """Sample responses with the policy, then score them with every role (in chunks of ``chunk``).

    ``generate_kwargs``: the backend's (``synced_gpus`` under multi-worker ZeRO-3); ``chunked``:
    the log-probabilities without full logits.
    """
    ro = rollout.sample(roles, POLICY, prompts, spec.generation, tokenizer, generate_kwargs, rollout_engine)
    rollout.score(roles, ro, chunk=chunk, temperature=spec.generation.temperature, policy=POLICY,
                  reference=REFERENCE, reward=REWARD, critic=CRITIC, chunked=chunked)
    return ro


def penalised_scores(ro: Rollout, spec: PPOSpec) -> torch.Tensor:
    """The reward model's scores less ``missing_eos_penalty`` for responses cut without an eos."""
    scores = ro.scores.float()
    if spec.missing_eos_penalty is not None:
        scores = scores - spec.missing_eos_penalty * (~ro.ended).float()
    return scores


def update_score_moments(moments: RunningMoments, scores: torch.Tensor) -> None:
    """Fold one rollout's scores from every worker into ``moments`` (one all-reduce)."""
    s = scores.double()
    moments.update(*engine.all_reduce([s.sum().item(), (s * s).sum().item(), float(s.numel())], op="sum"))


def add_advantages(ro: Rollout, spec: PPOSpec, kl_coef: float, moments: RunningMoments | None = None) -> None:
    """KL-penalised rewards, GAE advantages and returns (whitened as configured), in place.

    ``moments``: the running score moments ``ppo.normalize_scores`` centres and scales by."""
    scores = penalised_scores(ro, spec)
    if moments is not None:
        scores = moments.normalise(scores)
    rewards, kl = kl_penalised_rewards(scores, ro.logprobs, ro.ref_logprobs, ro.mask, kl_coef)
    if spec.whiten_rewards:
        rewards = masked_whiten(rewards, ro.mask, shift_mean=False)
    advantages, returns = gae(rewards, ro.values, ro.mask, spec.gamma, spec.lam)
    if spec.whiten_advantages:
        advantages = masked_whiten(advantages, ro.mask)
    ro.rewards, ro.kl, ro.advantages, ro.returns = rewards, kl, advantages, returns


def ppo_update(roles: Roles, ro: Rollout, spec: PPOSpec, backend: Backend,
               generator: torch.Generator, step: int = 0, chunked: bool = False) -> dict[str, float]:
    """``ppo_epochs`` x ``minibatches`` optimiser steps of ``backend`` on one rollout; returns mean
    statistics. Clipping is the backend's (per role under plain PyTorch: see ``train_loop``);
    ``step`` (1-based) names the PPO step if a loss turns NaN/inf (``pipeline.nonfinite_loss``)."""
    n = ro.input_ids.shape[0]
    size = n // spec.minibatches
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                     "value_clip_fraction", "approx_kl", "entropy")}
    for _ in range(spec.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(ro.input_ids.device)
        for start in range(0, n, size):
            rows = ro.rows(order[start:start + size])
            logp, entropy, values = policy_and_critic(roles, rows, spec.generation.temperature, chunked)
            pol = clipped_policy_loss(logp, rows["logprobs"], rows["advantages"], rows["mask"], spec.cliprange)
            v_loss, v_clip = clipped_value_loss(values, rows["values"], rows["returns"], rows["mask"],
                                                spec.cliprange_value)
            nonfinite_loss.check_finite(pol.loss + spec.vf_coef * v_loss, stage=NAME, step=step)
            backend.backward(pol.loss + spec.vf_coef * v_loss)
            backend.step()
            for key, value in (("policy_loss", pol.loss.detach()), ("value_loss", v_loss.detach()),
                               ("clip_fraction", pol.clip_fraction),
                               ("value_clip_fraction", v_clip), ("approx_kl", pol.approx_kl),
                               ("entropy", masked_mean(entropy.detach(), rows["mask"]))):
                stats[key].append(float(value))
    return {k: sum(v) / len(v) for k, v in stats.items()}


@torch.no_grad()
def evaluate(roles: Roles, prompts, collate: PromptCollator, spec: PPOSpec, tokenizer, worker: engine.Worker,
             seed: int, backend: Backend | None = None,
             rollout_engine: RolloutEngine | None = None, chunked: bool = False) -> dict[str, float]:
    """Mean reward, KL to the reference and response length of sampled responses to the held-out
    prompts (sharded over workers; sampling seeded, so a repeat on the same policy is identical;
    padded prompts, which keep ZeRO-3 workers in lockstep, are sampled and left out)."""
    size = spec.rollout_batch_size
    shard = common.eval_shard(len(prompts), worker, size, backend)
    sums = [0.0, 0.0, 0.0, 0.0]  # reward, kl, length, rows
    torch.manual_seed(seed + worker.rank)
    chunk = size // spec.minibatches
    generate_kwargs = backend.generate_kwargs() if backend is not None else {}
    for i in range(0, len(shard), size):
        ids = shard[i:i + size]
        batch = common.to_device(collate([prompts[j if j is not None else 0] for j in ids]), worker.device)
        ro = make_rollout(roles, batch, spec, tokenizer, chunk, generate_kwargs, rollout_engine, chunked)
        keep = torch.tensor([j is not None for j in ids], device=ro.mask.device)
        kl = ((ro.logprobs - ro.ref_logprobs) * ro.mask).sum(1)[keep]
        sums = [a + b for a, b in zip(sums, [ro.scores[keep].sum().item(), kl.sum().item(),
                                             ro.mask[keep].sum().item(), float(len(kl))])]
    reward, kl, length, n = engine.all_reduce(sums, op="sum")
    n = max(n, 1.0)
    return {"eval_reward": reward / n, "eval_kl": kl / n, "eval_response_length": length / n}


def rollout_stats(ro: Rollout, kl_coef: float) -> dict[str, float]:
    mask = ro.mask.float()
    kl_seq = ro.kl.sum(1)
    return {"reward_mean": ro.scores.mean().item(), "reward_std": ro.scores.std(unbiased=False).item(),
            "kl": kl_seq.mean().item(), "kl_coef": kl_coef, "non_score_reward": (-kl_coef * kl_seq).mean().item(),
            "response_length": mask.sum(1).mean().item(), "eos_fraction": ro.ended.float().mean().item(),
            "value_mean": masked_mean(ro.values, mask).item(), "return_mean": masked_mean(ro.returns, mask).item(),
            "value_explained_variance": explained_variance(ro.values, ro.returns, mask).item()}


# ------------------------------------------------------------------------------- worker

def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    spec = cfg.ppo
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    roles = build_roles(cfg, load_base_model(cfg.model, common.base_device(cfg, worker)), payload["inputs"])
    roles.eval()  # no dropout anywhere: rollout and update see the same functions
    prompt_room = cfg.data.max_length - spec.generation.max_new_tokens
    if prompt_room < 8:
        raise ValueError(f"ppo.generation.max_new_tokens: {spec.generation.max_new_tokens} leaves "
                         f"{prompt_room} of data.max_length={cfg.data.max_length} for the prompt")
    prompts = tokenized_prompts(cfg, prompt_rows(cfg, spec.data, "ppo.data"), tokenizer, column=spec.data.column,
                                max_length=prompt_room, field="ppo.data")
    if spec.eval_prompts >= len(prompts):
        raise ValueError(f"ppo.eval_prompts: {spec.eval_prompts} held-out prompts leave none of {len(prompts)} "
                         "for training")
    longest_prompt = max(map(len, prompts["input_ids"]), default=0)  # held-out prompts included
    eval_prompts = prompts.select(range(len(prompts) - spec.eval_prompts, len(prompts)))
    prompts = prompts.select(range(len(prompts) - spec.eval_prompts))
    collate = PromptCollator(pad_token_id=tokenizer.pad_token_id)
    steps_per_epoch, _ = common.total_steps(len(prompts), spec.rollout_batch_size, worker, epochs=1.0,
                                            max_steps=None, batch_field="ppo.rollout_batch_size")
    total = spec.max_steps

    # Counted before the backend exists: ZeRO-3 partitions every tensor when it takes the model.
    census = roles.parameter_census()
    n_train = common.count_parameters(roles.trainable_parameters())
    # The schedule counts optimiser updates: ppo_epochs x minibatches per PPO step. Under plain
    # PyTorch each role is clipped on its own: the critic's early, large value errors must not
    # shrink the policy's step (DeepSpeed clips the global norm).
    updates = spec.ppo_epochs * spec.minibatches
    backend = common.make_backend(cfg, roles, worker, NAME, batch_shape(cfg), total_steps=total * updates,
                                  warmup_steps=spec.warmup_steps * updates,
                                  clip_groups=[roles.trainable_parameters(POLICY), roles.trainable_parameters(CRITIC)])
    generate_kwargs = backend.generate_kwargs()
    state: dict[str, Any] = {"step": 0, "kl_coef": spec.kl.coef}
    resumed = common.resume_folder(payload)
    if resumed is not None:
        state = common.restore(backend, resumed, roles)
        engine.say(f"[ppo] resumed from step {state['step']}")
    kl_ctl = kl_controller(spec, state["kl_coef"])
    moments = RunningMoments.from_state(state.get("score_moments")) if spec.normalize_scores else None

    held_out = sft_rows(cfg)[1] if cfg.eval.rouge else None
    if worker.is_main:
        logger.log({"trainable_params": n_train, "prompts": len(prompts),
                    "base_params": census["base_params"], "base_params_missing": census["base_missing"],
                    "non_base_non_role_params": census["other_params"]}, step=0)
    gen_engine = RolloutEngine(spec.generation, common.pad_multiple(cfg, worker))
    gen_engine.gather_with(backend.whole_model)  # generation.gather_weights under ZeRO-3
    gen_engine.reserve(longest_prompt)
    chunked = lm_head_loss.enabled(spec.chunked_loss, roles.model, worker.device)  # response positions only
    if worker.is_main:
        logger.log({"chunked_loss": float(chunked)}, step=0)
    reward_eval = (lambda: evaluate(roles, eval_prompts, collate, spec, tokenizer, worker, cfg.seed, backend,
                                    gen_engine, chunked)) if spec.eval_prompts else None
    report = PolicyEvaluation(NAME, cfg, roles, POLICY, tokenizer, worker, backend, logger, held_out, reward_eval,
                              gen_engine)
    report.before(state)

    throughput = Throughput()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + worker.rank)
    chunk = spec.rollout_batch_size // spec.minibatches
    step = state["step"]
    while step < total:
        t0 = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        ids = common.epoch_batches(len(prompts), spec.rollout_batch_size, worker, cfg.seed, epoch)[within]
        batch = common.to_device(collate([prompts[j] for j in ids]), worker.device)
        torch.manual_seed(cfg.seed * 100003 + step * 97 + worker.rank)  # sampling: reproducible per step
        ro = make_rollout(roles, batch, spec, tokenizer, chunk, generate_kwargs, gen_engine, chunked)
        if moments is not None:
            update_score_moments(moments, penalised_scores(ro, spec))
            state["score_moments"] = moments.state()
        add_advantages(ro, spec, kl_ctl.value, moments)
        figures = rollout_stats(ro, kl_ctl.value)
        if moments is not None:
            figures.update(score_norm_mean=moments.mean, score_norm_std=moments.std)
        update_stats = ppo_update(roles, ro, spec, backend, generator, step=step + 1, chunked=chunked)
        n_tokens = int(ro.attention_mask.sum().item())
        throughput.add(n_tokens)
        step += 1
        state["step"] = step

        keys = list(figures) + list(update_stats)
        means = engine.all_reduce([figures[k] for k in figures] + [update_stats[k] for k in update_stats], op="mean")
        metrics = dict(zip(keys, means))
        kl_ctl.update(metrics["kl"], spec.rollout_batch_size * worker.world_size)
        state["kl_coef"] = kl_ctl.value
        memory = engine.all_gather(worker_memory(worker.device))
        metrics.update({k: max(m[k] for m in memory) for k in memory[0]})
        metrics["tokens_per_s"] = engine.all_reduce([n_tokens / (time.perf_counter() - t0)], op="sum")[0]
        metrics["learning_rate"] = backend.lr()
        if step == 1 and worker.is_main and metrics["value_explained_variance"] < -1.0:
            engine.say(f"[ppo] warning: the critic's start explains {metrics['value_explained_variance']:.2f} of the "
                       "returns' variance (below 0: worse than a constant), and its errors drown the advantages "
                       "until it is refit (ppo.critic_init: null starts a fresh critic with a zero head)")
        if step % spec.log_every == 0 or step == total:
            logger.log(metrics, step=step)
            if worker.is_main:
                engine.say(f"[ppo] step {step}/{total} reward {metrics['reward_mean']:.3f} "
                           f"kl {metrics['kl']:.3f} (coef {metrics['kl_coef']:.3f}) entropy {metrics['entropy']:.3f} "
                           f"clip {metrics['clip_fraction']:.3f} vloss {metrics['value_loss']:.3f} "
                           f"len {metrics['response_length']:.1f}")
        if reward_eval is not None and spec.eval_every and step % spec.eval_every == 0 and step < total:
            logger.log(reward_eval(), step=step)
        if step % spec.checkpoint_every == 0 and step < total:
            logger.flush()
            common.report(worker, backend, {"step": step}, roles, state)

    final = report.finish(state, step, started, throughput)
    common.report(worker, backend, {"step": step, "done": 1, **final}, roles, state)


# ------------------------------------------------------------------------------- driver side

def batch_shape(cfg: RunConfig) -> BatchShape:
    """One optimiser step per minibatch of the rollout batch."""
    return cfg.ppo.rollout_batch_size // cfg.ppo.minibatches, 1


def check_data(cfg: RunConfig, tokenizer: Any, warn: Warn) -> None:
    """The SFT rows held-out ROUGE reads (with ``eval.rouge``), the prompts, room for a prompt
    beside the longest response within ``data.max_length``, and enough prompts for the held-out
    ones and one rollout batch on every worker."""
    if cfg.eval.rouge:
        sft_rows(cfg)
    rows = prompt_rows(cfg, cfg.ppo.data, "ppo.data")
    n_rows = len(rows)
    if cfg.ppo.generation.max_new_tokens > cfg.data.max_length - 8:
        raise ConfigError(f"ppo.generation.max_new_tokens: {cfg.ppo.generation.max_new_tokens} leaves no room "
                          f"for a prompt within data.max_length={cfg.data.max_length}")
    if cfg.ppo.eval_prompts >= n_rows:
        raise ConfigError(f"ppo.eval_prompts: {cfg.ppo.eval_prompts} held-out prompts leave none of the {n_rows} "
                          "prompt rows of ppo.data.source for training")
    common.require_batches(n_rows - cfg.ppo.eval_prompts, cfg.ppo.rollout_batch_size, cfg.scaling.num_workers,
                           field="ppo.rollout_batch_size",
                           rows=f"ppo.data.source ({n_rows} rows less ppo.eval_prompts={cfg.ppo.eval_prompts})")
    if is_chat(cfg):  # every conversation and the template's generation prompt, before Ray starts
        tokenized_prompts(cfg, rows, tokenizer, column=cfg.ppo.data.column,
                          max_length=cfg.data.max_length - cfg.ppo.generation.max_new_tokens, field="ppo.data")


STAGE = Stage(
    name=NAME, section=PPOSpec, train_loop=train_loop,
    inputs=(AdapterInput(POLICY, "ppo.policy_init"), AdapterInput(REFERENCE, "ppo.reference", follows=POLICY),
            AdapterInput(REWARD, "ppo.reward_adapter", reward_model=True), AdapterInput(CRITIC, "ppo.critic_init")),
    batch=batch_shape, check_data=check_data, summary_metrics=("rouge", "eval_reward", "eval_kl"),
    metrics=ROUGE_METRICS + ("reward_mean", "reward_std", "kl", "kl_coef", "non_score_reward", "response_length",
                             "eos_fraction", "value_mean", "return_mean", "value_explained_variance", "policy_loss",
                             "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy", "prompts",
                             "base_params", "base_params_missing", "non_base_non_role_params", "chunked_loss")
    + before_after("eval_reward", "eval_kl", "eval_response_length"),
)
