"""The grpo stage without Ray: its config section (one-line errors), its preflight checks, the group
layout through sampling and scoring, advantages and the global loss normalisation."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from datasets import Dataset

from raypeft.pipeline import group_rollout, rollout
from raypeft.pipeline.adapter_inputs import resolve_stage_inputs
from raypeft.pipeline.config import ConfigError, GenerationSpec, parse_config
from raypeft.pipeline.data import PromptCollator
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.rewards import RewardFunction, RewardScores
from raypeft.pipeline.rl_math import aggregate_token_loss, grpo_advantages, reinforce_pp_advantages
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import grpo

EOS, PAD = 2, 0
ROUGE = {"function": "rouge_l", "kwargs": {"reference_column": "summary"}}


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("section, expected", [
    ({"algorithm": "ppo"}, "grpo.algorithm: input should be 'grpo', 'dr_grpo', 'rloo' or 'reinforce_pp', got 'ppo'"),
    ({"num_generations": 1}, "grpo.num_generations: grpo needs at least 2 completions per prompt (the group is the "
                             "baseline), got 1"),
    ({"algorithm": "rloo", "num_generations": 1}, "grpo.num_generations: rloo needs at least 2 completions"),
    ({"num_generations": 0}, "grpo.num_generations: input should be greater than 0"),
    ({"minibatches": 3}, "grpo.minibatches: must divide grpo.prompts_per_step (4) so every minibatch holds whole "
                         "groups, got 3"),
    ({"loss_normalisation": "tokens"}, "grpo.loss_normalisation: input should be 'sequence', 'token' or 'constant'"),
    ({"kl": {"estimator": "k2"}}, "grpo.kl.estimator: input should be 'k1' or 'k3'"),
    ({"kl": {"coef": -0.1}}, "grpo.kl.coef: input should be greater than or equal to 0"),
    ({"kl": {"cof": 0.1}}, "grpo.kl.cof: unknown key; did you mean 'coef'?"),
    ({"clip_low": 1.0}, "grpo.clip_low: input should be less than 1"),
    ({"clip_high": 0}, "grpo.clip_high: input should be greater than 0"),
    ({"rewards": [{"function": " "}]}, "grpo.rewards.0.function: must not be blank"),
    ({"rewards": [{"function": "rouge_l", "name": ""}]}, "grpo.rewards.0.name: must not be blank"),
    ({"rewards": [{"function": "rouge_l", "wieght": 2}]}, "grpo.rewards.0.wieght: unknown key"),
    ({"reward_adapter": "reward", "rewards": [{"function": "rouge_l", "name": "reward_model"}]},
     "grpo.rewards[0].name: 'reward_model' labels the grpo.reward_adapter's score; give the function another name"),
    ({"reward_adapter": " "}, "grpo.reward_adapter: must not be blank"),
    ({"reward_adapter_weight": float("inf")}, "grpo.reward_adapter_weight: input should be a finite number"),
    ({"generation": {"temprature": 0.7}}, "grpo.generation.temprature: unknown key; did you mean 'temperature'?"),
    ({"filter_zero_variance": "maybe"}, "grpo.filter_zero_variance: input should be a valid boolean"),
    ({"data": {"colum": "x"}}, "grpo.data.colum: unknown key; did you mean 'column'?"),
])
def test_bad_grpo_values_name_the_field_in_one_line(section: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"stages": ["sft", "grpo"], "grpo": section})
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_defaults_and_what_the_algorithms_accept() -> None:
    cfg = parse_config({"stages": ["sft", "grpo"], "grpo": {"rewards": [ROUGE]}})
    spec = cfg.grpo
    assert (spec.algorithm, spec.policy_init, spec.reference, spec.reward_adapter) == ("grpo", "sft", "policy_init",
                                                                                         None)
    assert (spec.clip_low, spec.clip_high, spec.loss_normalisation, spec.kl.coef) == (0.2, 0.28, "sequence", 0.0)
    assert grpo.batch_shape(cfg) == (32, 1)
    assert parse_config({"grpo": {"algorithm": "reinforce_pp", "num_generations": 1}}).grpo.num_generations == 1
    assert parse_config({"grpo": {"prompts_per_step": 6, "minibatches": 3}}).grpo.minibatches == 3


def test_a_reward_file_becomes_an_absolute_path_on_the_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"grpo": {"rewards": [{"function": "rewards/mine.py:score"}, {"function": "json:dumps"},
                                             {"function": "rouge_l"}]}})
    assert [r.function for r in cfg.grpo.rewards] == [f"{tmp_path}/rewards/mine.py:score", "json:dumps", "rouge_l"]
    again = parse_config(cfg.model_dump(mode="json", by_alias=True))  # a worker validates the dumped config
    assert again.grpo.rewards == cfg.grpo.rewards


def test_the_reward_adapter_input_is_optional_but_must_be_a_reward_model(tmp_path: Path) -> None:
    base = {"name": "t", "output_dir": str(tmp_path), "stages": ["sft", "grpo"]}
    inputs = resolve_stage_inputs(parse_config({**base, "grpo": {"rewards": [ROUGE]}}), ["sft", "grpo"])
    out = tmp_path / "t"
    assert inputs["grpo"] == {"policy": str(out / "sft" / "adapter"), "reference": str(out / "sft" / "adapter"),
                              "reward": None}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ConfigError, match=r"^grpo.reward_adapter: .* has no value_head.safetensors, so it is not a "
                                          r"reward model"):
        resolve_stage_inputs(parse_config({**base, "grpo": {"reward_adapter": str(plain)}}), ["sft", "grpo"])


# ------------------------------------------------------------------------------ preflight (check_data)

def _rows(path: Path, n: int, **extra) -> str:
    path.write_text("".join(json.dumps({"dialogue": f"A: hi {i}\nB: bye {i}", "summary": f"A greets B {i}.",
                                        **extra}) + "\n" for i in range(n)))
    return str(path)


def _cfg(tmp_path: Path, **grpo_section):
    return parse_config({"stages": ["grpo"], "eval": {"rouge": False}, "scaling": {"num_workers": 2},
                         "data": {"source": _rows(tmp_path / "train.jsonl", 40),
                                  "eval_source": _rows(tmp_path / "eval.jsonl", 4),
                                  "columns": {"prompt": "dialogue", "response": "summary"}},
                         "grpo": {"data": {"source": "sft", "column": "dialogue"}, "eval_prompts": 8,
                                  **grpo_section}})


def test_check_data_accepts_the_sft_rows_with_a_reference_column(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, rewards=[ROUGE, {"function": "format_check", "weight": 0.1}])
    grpo.check_data(cfg, None, lambda _: None)
    rows = grpo.group_rows(cfg)
    assert rows.column_names == ["dialogue", "summary"] and len(rows) == 40


@pytest.mark.parametrize("section, expected", [
    ({}, "grpo.rewards: needs at least one reward function (e.g. {function: rouge_l}) or a grpo.reward_adapter"),
    ({"rewards": [{"function": "rouge"}]},
     "grpo.rewards[0].function: 'rouge' is neither 'module:function', 'path/to/file.py:function' nor a built-in "
     "reward; did you mean 'rouge_l'?"),
    ({"rewards": [{"function": "raypeft_no_such_module:f"}]}, "grpo.rewards[0].function: no module named"),
    ({"rewards": [{"function": "rouge_l", "kwargs": {"reference_column": "answer"}}]},
     "grpo.rewards[0]: 'rouge_l' kwargs.reference_column names column 'answer', which the prompt rows do not have "
     "(columns besides the prompt: summary)"),
    ({"rewards": [ROUGE], "data": {"source": "sft", "column": "dialog"}},
     "grpo.data.column: column 'dialog' not found in the data block's rows (grpo.data.source: sft); present: "
     "dialogue, summary"),
    ({"rewards": [ROUGE], "eval_prompts": 36},
     "grpo.eval_prompts: 36 held-out of 40 prompt rows leave 4 for training, fewer than one step needs "
     "(grpo.prompts_per_step 4 x 2 workers)"),
    ({"rewards": [ROUGE], "generation": {"max_new_tokens": 250}},
     "grpo.generation.max_new_tokens: 250 leaves no room for a prompt within data.max_length=256"),
])
def test_check_data_refuses_in_one_line(tmp_path: Path, section: dict, expected: str) -> None:
    cfg = _cfg(tmp_path, **section)
    with pytest.raises(ValueError) as info:
        grpo.check_data(cfg, None, lambda _: None)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


def test_a_reward_function_needing_a_missing_column_fails_in_preflight(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("def score(completions, answer):\n    return [0.0] * len(completions)\n")
    cfg = _cfg(tmp_path, rewards=[{"function": f"{tmp_path / 'mine.py'}:score"}])
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[0\]: 'score' needs a column 'answer', which the prompt "
                                          r"rows do not have \(columns besides the prompt: summary\)$"):
        grpo.check_data(cfg, None, lambda _: None)


# ------------------------------------------------------------------------------ group layout

class _EchoModel:
    """``generate`` answers row ``b`` with ``[last prompt token, 10 + b, eos]``: the completion names
    its prompt and its place in the batch."""

    def generate(self, *, input_ids, attention_mask, max_new_tokens, **_):
        rows = input_ids.shape[0]
        new = torch.stack([input_ids[:, -1], 10 + torch.arange(rows), torch.full((rows,), EOS)], dim=1)
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


class _EchoRoles:
    @contextmanager
    def use(self, role):
        yield _EchoModel()

    def is_base(self, role):
        return False


class _Tokenizer:
    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(f"t{t}" for t in row if t not in (PAD, EOS)) for row in rows]


def test_groups_stay_in_prompt_order_through_sampling_and_scoring() -> None:
    p, g = 3, 4
    rows = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(6)], "answer": [f"t{100 + i}" for i in range(6)]})
    prompt_set = [{"input_ids": [5] * (1 + i % 2) + [100 + i]} for i in range(6)]  # ragged: left padding
    ids = [4, 1, 2]
    group = group_rollout.sample_groups(_EchoRoles(), "policy", prompt_set, rows, ids, num_generations=g,
                                        prompt_column="prompt", generation=GenerationSpec(max_new_tokens=3),
                                        tokenizer=_Tokenizer(), collate=PromptCollator(pad_token_id=PAD),
                                        device=torch.device("cpu"))
    assert group.num_groups == p and group.row_ids == [4] * g + [1] * g + [2] * g
    assert group.prompts == [f"prompt {i}" for i in ids for _ in range(g)]
    assert group.columns == {"answer": [f"t{100 + i}" for i in ids for _ in range(g)]}
    assert group.completions == [f"t{100 + ids[n // g]} t{10 + n}" for n in range(p * g)]
    assert group.rollout.tokens.shape == (p * g, 3) and group.rollout.ended.all()

    def first_word_matches(completions, answer):  # the completion's prompt marker vs its row's column
        return [float(c.split()[0] == a) + n / 100 for n, (c, a) in enumerate(zip(completions, answer))]

    functions = [RewardFunction(name="match", source="test", weight=2.0, fn=first_word_matches, kwargs={},
                                parameters=frozenset({"completions", "answer"}),
                                required=frozenset({"completions", "answer"}))]
    scores = group_rollout.score_rewards(group, functions)
    assert scores.per_function["match"] == [1.0 + n / 100 for n in range(p * g)]
    assert scores.total.tolist() == pytest.approx([2 * (1.0 + n / 100) for n in range(p * g)])
    # The reward model's score joins the total under its own label, in the same order.
    with_model = group_rollout.score_rewards(group, functions, torch.arange(p * g, dtype=torch.float32), 0.5)
    assert with_model.per_function["reward_model"] == [float(n) for n in range(p * g)]
    assert with_model.total.tolist() == pytest.approx([2 * (1.0 + n / 100) + 0.5 * n for n in range(p * g)])
    # Group p's advantages come from rows p*G .. p*G+G-1 only: equal gaps inside each group.
    adv = grpo_advantages(scores.total.float(), g).view(p, g)
    assert torch.allclose(adv, adv[0].expand(p, g), atol=1e-5)


def _tiny_roles(reward: bool) -> tuple[Roles, dict]:
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}})
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roles = Roles(transformers.LlamaForCausalLM(config).eval())
    fresh = adapter_config(cfg.adapter, cfg.model)
    roles.add(grpo.POLICY, fresh, trainable=True)
    roles.add_base(grpo.REFERENCE)
    if reward:
        roles.add(grpo.REWARD, fresh, trainable=False, value_head="zero")
    roles.eval()
    prompts = torch.randint(3, 16, (8, 4), generator=torch.Generator().manual_seed(1))
    return roles, {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}


def test_score_tokens_runs_only_the_forwards_the_update_needs() -> None:
    roles, batch = _tiny_roles(reward=True)
    generation = GenerationSpec(max_new_tokens=5)
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(3)
    full = rollout.sample(roles, grpo.POLICY, batch, generation, tokenizer)
    rollout.score(roles, full, chunk=4, temperature=1.0, policy=grpo.POLICY, reference=grpo.REFERENCE,
                  reward=grpo.REWARD)
    torch.manual_seed(3)
    lean = rollout.sample(roles, grpo.POLICY, batch, generation, tokenizer)
    group_rollout.score_tokens(roles, lean, chunk=4, temperature=1.0, policy=None, reference=None, reward=None)
    assert lean.logprobs is None and lean.ref_logprobs is None and lean.scores is None
    group_rollout.score_tokens(roles, lean, chunk=3, temperature=1.0, policy=grpo.POLICY, reference=grpo.REFERENCE,
                               reward=grpo.REWARD)
    for name in ("tokens", "logprobs", "ref_logprobs", "scores"):
        assert torch.allclose(getattr(lean, name).float(), getattr(full, name).float(), atol=1e-5), name


# ------------------------------------------------------------------------------ advantages and loss scale

def _scores(total: list[float | None]) -> RewardScores:
    valid = [t is not None for t in total]
    return RewardScores({}, torch.tensor([t if t is not None else float("nan") for t in total], dtype=torch.float64),
                        torch.tensor(valid))


def _rollout(lengths: list[int], width: int = 4) -> rollout.Rollout:
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    return rollout.Rollout(input_ids=mask, attention_mask=mask, index=mask, tokens=mask, mask=mask,
                           ended=torch.ones(len(lengths), dtype=torch.bool))


def test_group_advantages_drop_flat_and_unscored_groups() -> None:
    spec = parse_config({"grpo": {"num_generations": 2, "filter_zero_variance": True}}).grpo
    ro = _rollout([2, 3, 1, 4, 2, 2])
    adv, kept = grpo.compute_advantages(spec, _scores([1.0, 0.0, 0.5, 0.5, 2.0, None]), ro)
    assert kept.keep_rows.tolist() == [True, True, False, False, False, False]
    assert adv.tolist() == pytest.approx([0.7071, -0.7071, 0, 0, 0, 0], abs=1e-4)
    assert (kept.zero_variance_fraction, kept.skipped_fraction) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    keep_flat = spec.model_copy(update={"filter_zero_variance": False})
    _, kept = grpo.compute_advantages(keep_flat, _scores([1.0, 0.0, 0.5, 0.5, 2.0, None]), ro)
    assert kept.keep_rows.tolist() == [True, True, True, True, False, False]


def test_reinforce_pp_on_one_worker_is_the_reference_whitening() -> None:
    spec = parse_config({"grpo": {"algorithm": "reinforce_pp", "num_generations": 2, "gamma": 0.9}}).grpo
    ro = _rollout([2, 3, 1, 4])
    scores = torch.tensor([1.0, 0.2, 0.7, -0.3])
    adv, kept = grpo.compute_advantages(spec, _scores(scores.tolist()), ro)
    expected, _ = reinforce_pp_advantages(scores, ro.mask, gamma=0.9, num_generations=2)
    assert adv.shape == (4, 4) and torch.allclose(adv, expected, atol=1e-5)
    assert grpo.global_whiten(torch.full((2, 3), 0.3), torch.ones(2, 3)).abs().max() == 0  # no signal: zeros


def test_the_loss_scale_makes_the_averaged_gradient_the_global_minibatch_loss() -> None:
    """Two workers with unequal kept rows / tokens: the mean of their scaled losses is the formula's
    loss over both minibatches together, for every normalisation."""
    torch.manual_seed(0)
    losses = [torch.randn(3, 5), torch.randn(5, 5)]
    masks = [_rollout([5, 2, 4], 5).mask, _rollout([1, 5, 3, 3, 2], 5).mask]
    for norm in ("sequence", "token", "constant"):
        spec = parse_config({"grpo": {"loss_normalisation": norm}}).grpo
        rows = [m.shape[0] for m in masks]
        tokens = [int(m.sum()) for m in masks]
        scaled = [aggregate_token_loss(l, m, norm, 5) * grpo.loss_scale(spec, r, t, sum(rows), sum(tokens), 2)
                  for l, m, r, t in zip(losses, masks, rows, tokens)]
        whole = aggregate_token_loss(torch.cat(losses), torch.cat(masks), norm, 5)
        assert float(sum(scaled) / 2) == pytest.approx(float(whole), rel=1e-5), norm
    assert grpo.loss_scale(spec, 0, 0, 0, 0, 2) == 0.0
