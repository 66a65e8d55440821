"""Programmable rewards: Python functions named in the YAML, weighted, each logged on its own.

The contract of a reward function, the whole of it:

* it is called with keyword arguments only, each a list with one entry per completion:
  ``prompts``, ``completions`` and every other column of the completion's dataset row (a
  reference answer, a test case, ...) under the column's name, plus the fixed options of its
  YAML entry (``kwargs``). A function that takes ``**kwargs`` gets everything; otherwise only
  the names it lists;
* it returns one number (or None: "no opinion, skip this completion") per completion, in order.

Anything else (an exception, a wrong length, a string, NaN) stops the stage with one line
naming the function and the dataset row. A source that does not load is a ``ConfigError``
before Ray starts (``check_reward_functions``).

* ``builtin``: the functions that ship with raypeft (ROUGE-L, exact match, a format check);
* ``loading``: sources (``module:function``, ``path/to/file.py:function``, a built-in's name)
  to callables, and the preflight check;
* ``scoring``: calling them on a batch, the weighted total and the per-function metrics.
"""

from raypeft.pipeline.rewards.builtin import BUILTIN_REWARDS, exact_match, format_check, normalise_answer, rouge_l
from raypeft.pipeline.rewards.loading import (
    RewardFunction,
    RewardSource,
    RewardSourceSpec,
    check_reward_functions,
    load_reward_function,
    load_reward_functions,
)
from raypeft.pipeline.rewards.scoring import RewardFunctionError, RewardScores, expand_to_completions, score_completions

__all__ = [
    "BUILTIN_REWARDS", "RewardFunction", "RewardFunctionError", "RewardScores", "RewardSource", "RewardSourceSpec",
    "check_reward_functions", "exact_match", "expand_to_completions", "format_check", "load_reward_function",
    "load_reward_functions", "normalise_answer", "rouge_l", "score_completions",
]
