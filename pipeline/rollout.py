"""Online-RL rollouts over roles on one base (``pipeline.roles``): sample, re-pack, score.

1. sample: the policy role ``generate``s a response to each left-padded prompt (the YAML's
   sampling settings), cut after its first eos;
2. re-pack: ``prompt + response`` right-padded, the layout a reward model is trained on;
3. score, without gradients and in chunks: log-probabilities of the response tokens under the
   policy and the reference (logits divided by the sampling temperature), the reward model's
   score at the last token and, for a stage with a critic, the critic's value at each token.

PPO uses all of it (``pipeline.stages.ppo``); a critic-free online stage scores without a critic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raypeft.pipeline.config import GenerationSpec
from raypeft.pipeline.rl_math import entropy_from_logits, token_logprobs
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.rollout_engine import RolloutEngine


@dataclass
class Rollout:
    """One batch of sampled responses, re-packed right-padded, with what an online-RL update needs.

    ``input_ids``/``attention_mask``: ``[B, L]`` prompt + response; per-token tensors are
    ``[B, T]`` in response order; ``index[b, t]`` is the position in ``logits[:, :-1]`` that
    predicts response token ``t`` of row ``b`` (and where a critic's value for it is read).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


def pack(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generated: torch.Tensor, eos_id: int,
         pad_id: int, width_multiple: int | None = None) -> Rollout:
    """Re-pack left-padded prompts and their generated continuations as right-padded rows.

    A response ends after its first ``eos_id`` (kept); a row that never emits one keeps all its
    tokens and is marked not ``ended``. ``width_multiple``: the rows' width is rounded up to a
    multiple of it (masked padding), so the scoring and update forwards see a few shapes rather
    than a new one per rollout (``data.pad_to_multiple_of``; on a GPU each new shape costs a cuDNN
    attention plan, as in SFT and DPO). Every figure reads real positions only, so it changes none.
    """
    rows, starts, lengths, ended = [], [], [], []
    for p_ids, p_mask, gen in zip(prompt_ids.tolist(), prompt_mask.tolist(), generated.tolist()):
        prompt = [t for t, m in zip(p_ids, p_mask) if m]
        stop = gen.index(eos_id) + 1 if eos_id in gen else len(gen)
        response = gen[:stop]
        rows.append(prompt + response)
        starts.append(len(prompt))
        lengths.append(len(response))
        ended.append(eos_id in gen)
    width, steps = max(len(r) for r in rows), max(lengths)
    if width_multiple:
        width = -(-width // width_multiple) * width_multiple
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    tokens = torch.full((len(rows), steps), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), steps), dtype=torch.long)
    index = torch.zeros((len(rows), steps), dtype=torch.long)
    for b, (row, start, n) in enumerate(zip(rows, starts, lengths)):
        ids[b, :len(row)] = torch.tensor(row)
        attn[b, :len(row)] = 1
        tokens[b, :n] = torch.tensor(row[start:start + n])
        mask[b, :n] = 1
        index[b, :n] = torch.arange(start - 1, start - 1 + n)
    return Rollout(ids, attn, index, tokens, mask, torch.tensor(ended))


def gather_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, t], ...]`` for ``x`` of shape ``[B, L, ...]``."""
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def response_logprobs(logits: torch.Tensor, rows: dict[str, torch.Tensor], temperature: float,
                      with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and entropies) of the response tokens from full-sequence ``logits``, ``[B, T]``."""
    picked = gather_positions(logits[:, :-1], rows["index"]) / temperature
    logp = token_logprobs(picked, rows["tokens"])
    return logp, (entropy_from_logits(picked) if with_entropy else None)


def response_labels(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L]`` labels of the response tokens at their positions (-100 elsewhere): what
    ``Roles``' label outputs take to project only the response positions."""
    labels = torch.full_like(rows["input_ids"], -100)
    keep = rows["mask"].bool()
    batch = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)
    labels[batch[keep], rows["index"][keep] + 1] = rows["tokens"][keep]
    return labels


def label_request(role: str, with_entropy: bool) -> tuple[str, str]:
    """The ``Roles`` request of the response tokens' log-probabilities (and entropies) of ``role``."""
    return ("label_logprobs_entropy" if with_entropy else "label_logprobs", role)


def from_label_outputs(outputs: tuple[torch.Tensor, ...], rows: dict[str, torch.Tensor],
                       with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, T]`` response-order log-probabilities (and entropies) from a label request's
    ``[B, L-1]`` outputs (the first one or two of ``outputs``)."""
    logp = gather_positions(outputs[0], rows["index"])
    return logp, (gather_positions(outputs[1], rows["index"]) if with_entropy else None)


def policy_terms(roles: Roles, role: str, rows: dict[str, torch.Tensor], temperature: float,
                 with_entropy: bool = False, chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities (and entropies) of the response tokens under ``role``, ``[B, T]``.

    ``chunked``: project only the response positions through the LM head, in chunks
    (``pipeline.lm_head_loss``), instead of every position's full-vocabulary logits: the same
    figures (within float rounding) for a fraction of the memory (the stages' ``chunked_loss``)."""
    if chunked:
        outputs = roles.run(rows["input_ids"], rows["attention_mask"], label_request(role, with_entropy),
                            labels=response_labels(rows), temperature=temperature)
        return from_label_outputs(outputs, rows, with_entropy)
    logits = roles.logits(role, rows["input_ids"], rows["attention_mask"])
    return response_logprobs(logits, rows, temperature, with_entropy)


def token_values(roles: Roles, role: str, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The value head of ``role`` at each response token's predicting position, ``[B, T]``."""
    values = roles.values(role, rows["input_ids"], rows["attention_mask"])[:, :-1]
    return gather_positions(values, rows["index"])


@torch.no_grad()
def sample(roles: Roles, policy: str, prompts: dict[str, torch.Tensor], generation: GenerationSpec, tokenizer,
           generate_kwargs: dict[str, Any] | None = None, engine: RolloutEngine | None = None) -> Rollout:
    """Responses of role ``policy`` to ``prompts`` (left-padded), re-packed on the prompts' device.

    ``generate_kwargs``: the backend's (``synced_gpus`` under multi-worker ZeRO-3); ``engine``: the
    stage's rollout engine (it keeps a folded copy of the policy between steps), else a fresh one.
    """
    g = generation
    engine = engine if engine is not None else RolloutEngine(g)
    adapter = None if roles.is_base(policy) else policy
    with roles.use(policy) as model:
        generated = engine.generate(model, adapter, prompts["input_ids"], prompts["attention_mask"],
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    sampling=dict(do_sample=True, temperature=g.temperature, top_k=g.top_k,
                                                  top_p=g.top_p),
                                    generate_kwargs=generate_kwargs).cpu()
    device = prompts["input_ids"].device
    ro = pack(prompts["input_ids"].cpu(), prompts["attention_mask"].cpu(), generated, tokenizer.eos_token_id,
              tokenizer.pad_token_id, engine.width_multiple)
    for name in ("input_ids", "attention_mask", "index", "tokens", "mask", "ended"):
        setattr(ro, name, getattr(ro, name).to(device))
    return ro


_FIGURES = ("logprobs", "ref_logprobs", "scores", "values")  # Rollout fields scoring fills, per role below


def chunk_figures(roles: Roles, rows: dict[str, torch.Tensor], *, temperature: float, chunked: bool,
                  policy: str | None = None, reference: str | None = None, reward: str | None = None,
                  critic: str | None = None) -> dict[str, torch.Tensor]:
    """The scoring figures of one chunk of rows for the roles given (None: not wanted): the
    response tokens' log-probabilities under ``policy`` (``logprobs``) and ``reference``
    (``ref_logprobs``; ``chunked``: without full logits, :func:`policy_terms`), the reward
    model's ``scores [B]`` and the critic's ``values``, one forward per role."""
    figures: dict[str, torch.Tensor] = {}
    for name, role in zip(_FIGURES, (policy, reference, reward, critic)):
        if role is None:
            continue
        if name == "scores":
            figures[name] = roles.scores(role, rows["input_ids"], rows["attention_mask"])
        elif name == "values":
            figures[name] = token_values(roles, role, rows)
        else:
            figures[name] = policy_terms(roles, role, rows, temperature, chunked=chunked)[0]
    return figures


@torch.no_grad()
def score_chunks(roles: Roles, ro: Rollout, *, chunk: int, temperature: float, chunked: bool = False,
                 **role_names: str | None) -> None:
    """Fill the :func:`chunk_figures` of ``role_names`` (policy, reference, reward, critic) into
    ``ro`` in place, ``chunk`` rows per forward; per-token figures are zero past each response's end."""
    device = ro.input_ids.device
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, ro.input_ids.shape[0], chunk):
        rows = ro.rows(torch.arange(start, min(start + chunk, ro.input_ids.shape[0]), device=device))
        for name, value in chunk_figures(roles, rows, temperature=temperature, chunked=chunked,
                                         **role_names).items():
            parts.setdefault(name, []).append(value)
    mask = ro.mask.float()
    for name, chunks in parts.items():
        value = torch.cat(chunks)
        setattr(ro, name, value * mask if value.dim() == 2 else value)


def score(roles: Roles, ro: Rollout, *, chunk: int, temperature: float, policy: str, reference: str, reward: str,
          critic: str | None = None, chunked: bool = False) -> None:
    """Fill ``ro.logprobs``, ``ro.ref_logprobs``, ``ro.scores`` (and ``ro.values`` with a ``critic``)
    in place, ``chunk`` rows per forward (:func:`score_chunks`). ``chunked``: the log-probabilities
    without full logits."""
    score_chunks(roles, ro, chunk=chunk, temperature=temperature, chunked=chunked, policy=policy,
                 reference=reference, reward=reward, critic=critic)
