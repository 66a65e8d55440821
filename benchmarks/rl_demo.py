"""Does the policy stage learn on the embedded demo? One workflow config, several seeds, one table.

    python benchmarks/rl_demo.py configs/quickstart-grpo.yaml --seeds 0 1 2
    python benchmarks/rl_demo.py configs/quickstart-grpo-rm.yaml configs/quickstart.yaml --seeds 0 1 2
    python benchmarks/rl_demo.py configs/quickstart-grpo.yaml --seeds 0 --set grpo.algorithm=rloo --tag rloo

Each (config, seed) is a full ``raypeft run CONFIG --set seed=N`` in a fresh folder (its own
``outputs/`` and SQLite MLflow store), timed wall to wall. The figures are the final metrics each
stage prints (``[raypeft] <stage>: {...}``, the same values its MLflow run holds): SFT ROUGE-L,
the policy stage's held-out reward before and after, its KL to the reference and its ROUGE-L
after. Writes ``benchmarks/results/rl_demo_<config name>[_<tag>].json`` and ``.md``; ``--set`` overrides
go to every run, as ``raypeft run --set``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FINAL = re.compile(r"^\[raypeft\] (\w+): (\{.*\})$")
POLICY_STAGES = ("ppo", "grpo", "dpo")


def run_one(config: Path, seed: int, workdir: Path, overrides: list[str]) -> dict:
    """One whole workflow; the stages' final metrics and the wall time."""
    cmd = [sys.executable, "-m", "raypeft", "run", str(config), *[a for o in overrides for a in ("--set", o)],
           "--set", f"seed={seed}",
           "--set", f"output_dir={workdir / 'outputs'}", "--set", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (workdir / "log.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{config.name} seed {seed}: exit {proc.returncode}; log in {workdir / 'log.txt'}")
    stages = {}
    for line in proc.stdout.splitlines():
        match = FINAL.match(line.strip())
        if match:
            stages[match.group(1)] = ast.literal_eval(match.group(2))
    return {"seed": seed, "wall_seconds": round(wall, 1), "stages": stages}


def row(result: dict) -> dict:
    """The table's figures of one run."""
    stages = result["stages"]
    out = {"seed": result["seed"], "wall_s": result["wall_seconds"]}
    if "sft" in stages:
        out["sft_rougeL"] = stages["sft"].get("rougeL_after")
    if "reward" in stages:
        out["reward_accuracy"] = stages["reward"].get("eval_accuracy_after")
    policy = next((s for s in POLICY_STAGES if s in stages), None)
    if policy is not None:
        m = stages[policy]
        out.update({"stage": policy, "reward_before": m.get("eval_reward_before"),
                    "reward_after": m.get("eval_reward_after"), "kl": m.get("eval_kl_after"),
                    "rougeL_before": m.get("rougeL_before"), "rougeL_after": m.get("rougeL_after")})
    return out


def markdown(name: str, command: str, rows: list[dict]) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)
    lines = [f"# {name}", "", f"`{command}`", "",
             "| seed | whole run | SFT ROUGE-L | held-out reward before -> after | KL to reference | "
             "ROUGE-L before -> after policy stage |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['wall_s'] / 60:.1f} min | {f(r.get('sft_rougeL'))} | "
                     f"{f(r.get('reward_before'))} -> {f(r.get('reward_after'))} | {f(r.get('kl'))} | "
                     f"{f(r.get('rougeL_before'))} -> {f(r.get('rougeL_after'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="", help="suffix of the result files (for runs with --set)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        config = config.resolve()
        name = yaml.safe_load(config.read_text())["name"]
        results = []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix=f"rl-demo-{name}-{seed}-") as tmp:
                result = run_one(config, seed, Path(tmp), args.overrides)
            results.append(result)
            print(json.dumps(row(result)), flush=True)
        rows = [row(r) for r in results]
        command = (f"python benchmarks/rl_demo.py {config.relative_to(ROOT)} --seeds "
                   + " ".join(map(str, args.seeds)) + "".join(f" --set {o}" for o in args.overrides)
                   + (f" --tag {args.tag}" if args.tag else ""))
        meta = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"), "rows": rows, "runs": results}
        stem = f"rl_demo_{name}" + (f"_{args.tag}" if args.tag else "")
        meta["overrides"] = args.overrides
        (RESULTS / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
        (RESULTS / f"{stem}.md").write_text(markdown(name + (f" ({args.tag})" if args.tag else ""), command, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
