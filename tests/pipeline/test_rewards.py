"""Programmable rewards: loading sources (and their one-line errors), calling, weighting, built-ins."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from raypeft.pipeline.config import ConfigError
from raypeft.pipeline.rewards import (RewardFunctionError, RewardSource, check_reward_functions, exact_match,
                                      expand_to_completions, format_check, load_reward_function, load_reward_functions,
                                      normalise_answer, rouge_l, score_completions)

FIELD = "grpo.rewards"

MODULE = '''
def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]

def by_answer(completions, answer):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

def some_none(completions, **kwargs):
    return [None if c.startswith("?") else 1.0 for c in completions]

def flaky(completions, **kwargs):
    return [1.0 / (len(c) - 3) for c in completions]   # ZeroDivisionError on a 3-character completion

def batch_only(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("too many at once")
    return [0.0]

def multiline(completions, **kwargs):
    raise ValueError("first line\\nsecond line")

def too_few(completions, **kwargs):
    return [0.0] * (len(completions) - 1)

def scalar(completions, **kwargs):
    return 1.0

def text(completions, **kwargs):
    return ["good" for _ in completions]

def nan(completions, **kwargs):
    return [float("nan") for _ in completions]

def as_tensor(completions, **kwargs):
    import torch
    return torch.ones(len(completions))

def no_completions(prompts):
    return [0.0 for _ in prompts]

def with_option(completions, scale=1.0, **kwargs):
    return [scale * len(c) for c in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture()
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``my_rewards.py`` both importable as ``my_rewards`` and reachable as a file."""
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def _load(*sources: str | RewardSource, base_dir: Path | None = None):
    specs = [s if isinstance(s, RewardSource) else RewardSource(s) for s in sources]
    return load_reward_functions(specs, FIELD, base_dir)


def _error(*sources: str | RewardSource, base_dir: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _load(*sources, base_dir=base_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ loading


def test_load_by_module_path_file_path_and_builtin_name(reward_module: Path) -> None:
    by_module = load_reward_function("my_rewards:length_reward", "f")
    assert by_module(completions=["ab", "abc"]) == [2.0, 3.0]
    by_relative_file = load_reward_function("my_rewards.py:length_reward", "f", base_dir=reward_module.parent)
    by_absolute_file = load_reward_function(f"{reward_module}:length_reward", "f")
    assert by_relative_file(completions=["abcd"]) == [4.0]
    assert by_absolute_file is by_relative_file  # one module per file, loaded once
    assert load_reward_function("rouge_l", "f") is rouge_l
    assert load_reward_function("raypeft.pipeline.rewards.builtin:exact_match", "f") is exact_match
    loaded = _load("my_rewards:length_reward", RewardSource("format_check", 0.5, name="fmt"))
    assert [(f.name, f.weight, f.source) for f in loaded] == [("length_reward", 1.0, "my_rewards:length_reward"),
                                                              ("fmt", 0.5, "format_check")]


def test_missing_module_function_or_file_is_a_config_error(reward_module: Path) -> None:
    assert _error("no_such_module_xyz:fn") == (f"{FIELD}[0].function: no module named 'no_such_module_xyz' "
                                              "(a module on the Python path, or path/to/file.py:function)")
    assert _error("rouge_l", "my_rewards:length_rewrd") == (
        f"{FIELD}[1].function: 'my_rewards' has no function 'length_rewrd'; did you mean 'length_reward'?")
    assert _error("my_rewards:NOT_A_FUNCTION") == (f"{FIELD}[0].function: 'my_rewards:NOT_A_FUNCTION' "
                                                   "is not callable (it is 3)")
    missing = reward_module.parent / "nope.py"
    assert _error(f"{missing}:fn") == f"{FIELD}[0].function: file '{missing}' does not exist"
    assert _error("nope.py:fn", base_dir=reward_module.parent) == (
        f"{FIELD}[0].function: file '{missing}' does not exist")
    assert _error("rouge_1") == (f"{FIELD}[0].function: 'rouge_1' is neither 'module:function', "
                                 "'path/to/file.py:function' nor a built-in reward; did you mean 'rouge_l'?")
    assert _error("my_rewards:") == (f"{FIELD}[0].function: expected 'module:function' or "
                                     "'path/to/file.py:function', got 'my_rewards:'")


def test_a_module_that_fails_to_import_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_dep_rewards.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "syntax_rewards.py").write_text("def f(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _error("broken_dep_rewards:f") == (f"{FIELD}[0].function: importing 'broken_dep_rewards' failed: "
                                              "ModuleNotFoundError: No module named 'no_such_dependency_xyz'")
    message = _error(f"{tmp_path / 'syntax_rewards.py'}:f")
    assert message.startswith(f"{FIELD}[0].function: loading '{tmp_path / 'syntax_rewards.py'}' failed: SyntaxError")


def test_signature_weight_and_name_checks(reward_module: Path) -> None:
    assert _error("my_rewards:no_completions") == (
        f"{FIELD}[0].function: a reward function must take a 'completions' keyword (and may take 'prompts', "
        "the row's columns by name, or **kwargs)")
    assert _error(RewardSource("my_rewards:by_answer", kwargs={"scale": 2})) == (
        f"{FIELD}[0].kwargs.scale: the function takes no argument 'scale'")
    assert _error(RewardSource("rouge_l"), RewardSource("my_rewards:length_reward", name="rouge_l")) == (
        f"{FIELD}[1].name: 'rouge_l' already labels {FIELD}[0]; set a distinct name for the metrics")
    assert _error(RewardSource("rouge_l", name="total")).startswith(f"{FIELD}[0].name: 'total' is the weighted sum's")
    assert _error(RewardSource("rouge_l", weight=math.inf)) == f"{FIELD}[0].weight: must be a finite number, got inf"
    with pytest.raises(ConfigError, match=r"^grpo.rewards: needs at least one reward function$"):
        _load()


def test_check_reward_functions_is_the_preflight(reward_module: Path) -> None:
    check_reward_functions([RewardSource("rouge_l", kwargs={"reference_column": "summary"}),
                            RewardSource(f"{reward_module}:length_reward", weight=-0.1)], FIELD)
    with pytest.raises(ConfigError, match=r"^grpo.rewards\[1\].function: no module named 'nope_xyz'"):
        check_reward_functions([RewardSource("rouge_l"), RewardSource("nope_xyz:f")], FIELD)


# ------------------------------------------------------------------------------ scoring


def _score(source: str, completions: list[str], **columns):
    return score_completions(_load(source), ["p"] * len(completions), completions, columns)


@pytest.mark.parametrize("source, message", [
    ("my_rewards:too_few", "reward function 'too_few' returned 2 values for 3 completions (rows 0-2)"),
    ("my_rewards:scalar", "reward function 'scalar' returned float for rows 0-2; "
                          "expected a list of 3 floats (None to skip)"),
    ("my_rewards:text", "reward function 'text' returned a str 'good' for row 0; expected a float or None"),
    ("my_rewards:nan", "reward function 'nan' returned nan (return None to skip a completion) for row 0; "
                       "expected a float or None"),
])
def test_wrong_shape_or_type_stops_with_one_line(reward_module: Path, source: str, message: str) -> None:
    with pytest.raises(RewardFunctionError) as info:
        _score(source, ["aaaa", "bbbbb", "c"])
    assert str(info.value) == message


def test_a_raising_function_is_named_with_its_row(reward_module: Path) -> None:
    functions = _load("my_rewards:flaky")
    with pytest.raises(RewardFunctionError) as info:
        score_completions(functions, ["p"] * 3, ["abcd", "abcde", "abc"], {})
    assert str(info.value) == "reward function 'flaky' raised on row 2: ZeroDivisionError: float division by zero"
    with pytest.raises(RewardFunctionError) as info:  # dataset rows named when the stage passes them
        score_completions(functions, ["p"] * 4, ["abcd", "abcd", "abc", "abcd"], {}, row_ids=[7, 7, 8, 8])
    assert str(info.value) == ("reward function 'flaky' raised on row 8 (completion 2): "
                               "ZeroDivisionError: float division by zero")
    with pytest.raises(RewardFunctionError) as info:
        score_completions(_load("my_rewards:batch_only"), ["p"] * 2, ["a", "b"], {}, row_ids=[3, 4])
    assert str(info.value) == ("reward function 'batch_only' raised on rows 3-4 (no single row reproduces it): "
                               "RuntimeError: too many at once")
    with pytest.raises(RewardFunctionError) as info:  # a multi-line message is cut to its first line
        score_completions(_load("my_rewards:multiline"), ["p"], ["a"], {})
    assert str(info.value) == "reward function 'multiline' raised on row 0: ValueError: first line"


def test_none_skips_a_completion(reward_module: Path) -> None:
    functions = _load("my_rewards:some_none", RewardSource("my_rewards:length_reward", weight=0.0))
    scores = score_completions(functions, ["p"] * 3, ["?a", "bb", "?"], {})
    assert scores.per_function["some_none"] == [None, 1.0, None]
    assert scores.total.tolist() == [0.0, 1.0, 0.0]  # length_reward still scored them (weight 0)
    assert scores.valid.tolist() == [True, True, True]
    alone = score_completions(_load("my_rewards:some_none"), ["p"] * 3, ["?a", "bb", "?"], {})
    assert alone.valid.tolist() == [False, True, False]
    assert math.isnan(alone.total[0].item()) and alone.total[1].item() == 1.0
    metrics = alone.metrics()
    assert metrics["reward/some_none/skipped"] == pytest.approx(2 / 3)
    assert metrics["reward/some_none/mean"] == 1.0 and metrics["reward/some_none/std"] == 0.0
    assert metrics["reward/total/skipped"] == pytest.approx(2 / 3) and metrics["reward/total/mean"] == 1.0


def test_weighted_total_and_per_function_metrics(reward_module: Path) -> None:
    functions = _load(RewardSource("my_rewards:length_reward", weight=2.0),
                      RewardSource("my_rewards:by_answer", weight=-0.5),
                      RewardSource("my_rewards:with_option", weight=1.0, name="scaled", kwargs={"scale": 0.1}))
    scores = score_completions(functions, ["p"] * 2, ["yes", "no"], {"answer": ["yes", "maybe"], "id": [1, 2]})
    assert scores.per_function == {"length_reward": [3.0, 2.0], "by_answer": [1.0, 0.0],
                                   "scaled": pytest.approx([0.3, 0.2])}
    assert scores.total.tolist() == pytest.approx([2 * 3 - 0.5 * 1 + 0.3, 2 * 2 + 0.2])
    metrics = scores.metrics(prefix="rollout/reward")
    assert metrics["rollout/reward/length_reward/mean"] == 2.5
    assert metrics["rollout/reward/length_reward/std"] == 0.5  # population std
    assert metrics["rollout/reward/by_answer/mean"] == 0.5
    assert metrics["rollout/reward/total/mean"] == pytest.approx((5.8 + 4.2) / 2)
    assert metrics["rollout/reward/total/std"] == pytest.approx(0.8)
    labels = ("length_reward", "by_answer", "scaled", "total")
    assert set(metrics) == {f"rollout/reward/{label}/{stat}" for label in labels for stat in ("mean", "std", "skipped")}


def test_columns_reach_functions_by_name(reward_module: Path) -> None:
    # by_answer names its column; it does not take **kwargs, so the other columns are not passed.
    scores = _score("my_rewards:by_answer", ["x", "y"], answer=["x", "z"], other=[0, 0])
    assert scores.per_function["by_answer"] == [1.0, 0.0]
    with pytest.raises(RewardFunctionError) as info:
        _score("my_rewards:by_answer", ["x", "y"], reference=["x", "z"])
    assert str(info.value) == ("reward function 'by_answer' needs a column 'answer' the rows do not have "
                               "(columns: reference) at rows 0-1")
    assert _score("my_rewards:as_tensor", ["x", "y"]).per_function["as_tensor"] == [1.0, 1.0]


def test_batch_lengths_are_checked() -> None:
    functions = _load("format_check")
    with pytest.raises(ValueError, match="score_completions: summary has 1 values for 2 completions"):
        score_completions(functions, ["p", "p"], ["a.", "b."], {"summary": ["s"]})
    with pytest.raises(ValueError, match="may not be named 'prompts'"):
        score_completions(functions, ["p"], ["a."], {"prompts": ["s"]})


def test_expand_to_completions_keeps_groups_together() -> None:
    assert expand_to_completions({"prompt": ["a", "b"], "ref": [1, 2]}, 3) == {
        "prompt": ["a", "a", "a", "b", "b", "b"], "ref": [1, 1, 1, 2, 2, 2]}


# ------------------------------------------------------------------------------ built-ins


def test_rouge_l_against_a_reference_column() -> None:
    refs = ["ann and bob will meet at the park", "ann and bob will meet at the park", None,
            ["bob will cook", "ann and bob will meet"]]
    out = rouge_l(["ann and bob will meet at the park", "the cat sat", "x", "ann and bob will meet"],
                  reference_column="summary", summary=refs)
    assert out[0] == pytest.approx(1.0) and out[2] is None and out[3] == pytest.approx(1.0)
    # LCS "the" of 3 vs 8 tokens: P 1/3, R 1/8, F = 2PR / (P + R)
    assert out[1] == pytest.approx(2 * (1 / 3) * (1 / 8) / (1 / 3 + 1 / 8))
    with pytest.raises(KeyError, match="no column 'reference'.*summary"):
        rouge_l(["a"], summary=["a"])


def test_exact_match_is_normalised() -> None:
    assert normalise_answer("  The  Answer, is: 42! ") == "answer is 42"
    out = exact_match(["The answer is 42.", "answer is 41", "Paris", "x"], reference_column="ref",
                      ref=["answer is 42", "answer is 42", ["London", "paris"], None])
    assert out == [1.0, 0.0, 1.0, None]


def test_format_check_scores_each_rule() -> None:
    out = format_check(["Ann will meet Bob.", "Ann will meet Bob", "one\ntwo.", "", "word " * 70 + "."],
                       min_words=2, max_words=60)
    assert out == pytest.approx([1.0, 2 / 3, 2 / 3, 0.0, 2 / 3])
    assert format_check(["no end"], end_chars="", single_line=False) == [1.0]


def test_numpy_and_tensor_outputs_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "np_rewards.py"
    path.write_text("import numpy as np\n\n"
                    "def f(completions, **kw):\n    return np.arange(len(completions), dtype=np.float32)\n")
    scores = score_completions(_load(f"{path}:f"), ["p"] * 3, ["a", "b", "c"], {})
    assert scores.per_function["f"] == [0.0, 1.0, 2.0]
    assert isinstance(scores.total, torch.Tensor) and scores.total.dtype == torch.float64
    path = tmp_path / "np_scalar_rewards.py"
    path.write_text("import numpy as np\n\n"
                    "def g(completions, **kw):\n    return [np.float32(0.5), np.int64(2), True]\n")
    assert score_completions(_load(f"{path}:g"), ["p"] * 3, ["a", "b", "c"], {}).per_function["g"] == [0.5, 2.0, 1.0]
