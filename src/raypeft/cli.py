"""``raypeft``: the command line, above the three layers (it imports pipeline and tune).

Exit codes, the same for every command: 0 done; 2 bad input (config, data, adapter reference,
tracking store), reported as one line before anything is started or written; 1 a failure while
training (one line here, the traceback in the Ray log); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from raypeft.pipeline import launcher, model_registry
from raypeft.pipeline.config import ConfigError, RunConfig, load_config
from raypeft.pipeline.data import DataError
from raypeft.pipeline.evaluate_adapter import evaluate_adapter
from raypeft.pipeline.failures import failure_line
from raypeft.pipeline.preflight import preflight
from raypeft.pipeline.preflight_checks import probe_tracking
from raypeft.pipeline.stages.registry import stage_named
from raypeft.pipeline.tracking import TrackingError
from raypeft.pipeline.workflow import StageOutcome, run_workflow
from raypeft.tune.schema import load_sweep
from raypeft.tune.sweep import prepare, run_sweep

# What a user can get wrong before anything starts: one line, exit 2.
INPUT_ERRORS = (ConfigError, DataError, TrackingError)


def _overrides(parser: argparse.ArgumentParser, what: str = "a config field, e.g. --set adapter.r=16") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override {what} (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypeft", description="Distributed PEFT instruction tuning and RLHF on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow (its stages in order) from a YAML config")
    run.add_argument("config", help="path to the YAML config")
    _overrides(run)
    run.add_argument("--stage", action="append", default=None,
                     help="run only this stage (repeatable); its inputs must already exist")
    run.add_argument("--fresh", action="store_true",
                     help="start over: do not resume a workflow that a crash or Ctrl-C stopped part-way")

    check = sub.add_parser("validate", help="check a config, its model, adapter targets and data; start nothing")
    check.add_argument("config")
    _overrides(check)

    sweep = sub.add_parser("sweep", help="Ray Tune sweep of one stage over adapter method, rank, alpha, ...")
    sweep.add_argument("config", help="path to the sweep YAML")
    _overrides(sweep, "a sweep field, or a base config field as config.<key>=value")

    ev = sub.add_parser("eval", help="held-out ROUGE (or reward accuracy) of an adapter: folder or models:/ URI")
    ev.add_argument("config", help="the run config naming the base model, data and eval settings")
    ev.add_argument("--adapter", required=True, help="a folder, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/")
    _overrides(ev)

    reg = sub.add_parser("registry", help="registered adapters: list versions, promote an alias")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    listing = reg_sub.add_parser("list", help="versions with aliases, tags and key metrics")
    listing.add_argument("--name", default=None, help="only this registered model")
    promote = reg_sub.add_parser("promote", help="point ALIAS of NAME at VERSION")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("alias")
    for parser in (listing, promote):
        parser.add_argument("--tracking-uri", default=None,
                            help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return p


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.command == "validate":
        preflight(cfg)
        print(f"{args.config}: ok")
        return 0
    for outcome in run_workflow(cfg, args.stage, fresh=args.fresh):
        print(f"[raypeft] {outcome.stage}: {_summary(outcome)}")
    return 0


def _summary(outcome: StageOutcome) -> dict[str, float]:
    """The metrics worth a line on the terminal, as the stage's definition names them (the rest
    are in MLflow)."""
    return {k: round(v, 4) for k, v in stage_named(outcome.stage).summary(outcome.metrics).items()}


def _sweep(args: argparse.Namespace) -> int:
    sweep, base_items = load_sweep(args.config, args.overrides)
    outcome = run_sweep(prepare(sweep, args.config, base_items))
    return 0 if outcome.best is not None else 1  # no trial finished: a failure


def _eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    folder, metrics = evaluate_adapter(cfg, args.adapter)
    shown = {k: round(v, 4) for k, v in metrics.items()}
    print(f"[raypeft] eval {args.adapter} ({folder}): {shown}")
    return 0


def _registry(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or RunConfig().tracking_uri()
    field = "--tracking-uri" if args.tracking_uri else RunConfig().tracking_uri_field()
    probe_tracking(uri, write=False, field=field)  # bounded, and a missing store is not created
    if args.registry_command == "list":
        print(model_registry.format_versions(model_registry.list_versions(uri, args.name)))
    else:
        model_registry.promote(uri, args.name, args.version, args.alias)
        print(f"[raypeft] {args.name}@{args.alias} -> version {args.version}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    # command: (handler, what a failure after start-up is called on the error line)
    "run": (_run, "stage failed"),
    "validate": (_run, "validate failed"),
    "sweep": (_sweep, "sweep failed"),
    "eval": (_eval, "eval failed"),
    "registry": (_registry, "registry failed"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and map what it raised to an exit code and one line on stderr."""
    args = build_parser().parse_args(argv)
    handler, failed = COMMANDS[args.command]
    try:
        return handler(args)
    except INPUT_ERRORS as exc:
        print(f"raypeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        launcher.shutdown_ray()  # no stray workers; the MLflow runs were ended KILLED on the way out
        print("raypeft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a training failure: its root cause in one line, the traceback in the Ray log
        print(f"raypeft: {failed}: {failure_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
