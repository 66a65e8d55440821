"""The before/after figures every online policy stage (PPO, the GRPO family) reports.

Both stages measure the same two things around their training loop: ROUGE of greedy generations
on the held-out SFT rows (``eval.rouge``) and the stage's own held-out reward evaluation (mean
reward and KL to the reference on ``eval_prompts`` prompts). The "before" figures are kept in the
checkpointed ``state``, so a resumed run reports the start of the whole run, not of the restart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from raypeft.pipeline import engine, tracking
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import RunConfig
from raypeft.pipeline.resources import Throughput
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.rollout_engine import RolloutEngine
from raypeft.pipeline.stages import common


@dataclass
class PolicyEvaluation:
    stage: str
    cfg: RunConfig
    roles: Roles
    policy: str
    tokenizer: Any
    worker: engine.Worker
    backend: Backend
    logger: tracking.RunLogger
    held_out: Any  # the SFT eval rows when cfg.eval.rouge, else None
    reward_eval: Callable[[], dict[str, float]] | None  # None when the stage has no held-out prompts
    rollout_engine: RolloutEngine | None = None  # the stage's generation path, for ROUGE too

    def rouge(self) -> dict[str, float]:
        with self.roles.use(self.policy) as model:
            return common.held_out_rouge(model, self.tokenizer, self.held_out, self.cfg, self.worker, self.backend,
                                         self.rollout_engine, self.policy)

    def before(self, state: dict[str, Any]) -> None:
        """Measure and log (at step 0) what is not yet in ``state``."""
        if self.cfg.eval.rouge and "rouge_before" not in state:
            state["rouge_before"] = self.rouge()
            self.logger.log({f"{k}_before": v for k, v in state["rouge_before"].items()}, step=0)
        if self.reward_eval is not None and "eval_before" not in state:
            state["eval_before"] = self.reward_eval()
            self.logger.log(state["eval_before"], step=0)
            if self.worker.is_main:
                engine.say(f"[{self.stage}] held-out reward "
                           f"{state['eval_before'].get('eval_reward', float('nan')):.3f} before training")

    def finish(self, state: dict[str, Any], step: int, started: float, throughput: Throughput) -> dict[str, float]:
        """The stage's final figures (``<metric>_before`` / ``_after``, time, throughput, memory), logged
        at ``step``; the caller reports them with the last checkpoint."""
        final: dict[str, float] = {"train_seconds": time.perf_counter() - started}
        if self.reward_eval is not None:
            after = self.reward_eval()
            self.logger.log(after, step=step)
            final.update({f"{k}_after": v for k, v in after.items()})
            final.update({f"{k}_before": v for k, v in state["eval_before"].items()})
            if self.worker.is_main:
                engine.say(f"[{self.stage}] held-out reward "
                           f"{state['eval_before'].get('eval_reward', float('nan')):.3f} -> "
                           f"{after.get('eval_reward', float('nan')):.3f}, KL to reference {after['eval_kl']:.3f}")
        if self.cfg.eval.rouge:
            final.update({f"{k}_after": v for k, v in self.rouge().items()})
            final.update({f"{k}_before": v for k, v in state["rouge_before"].items()})
        final.update(common.resource_figures(self.worker, throughput, self.backend))
        self.logger.log(final, step=step)
        self.logger.flush()
        return final
