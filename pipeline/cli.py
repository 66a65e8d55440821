"""``raypeft``: the command line.

Exit codes: 0 done; 2 bad input (config, data, adapter reference, tracking store), reported as
one line before anything is started or written; 1 a failure while training.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypeft", description="Distributed PEFT instruction tuning and RLHF on Ray")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow (its stages in order) from a YAML config")
    run.add_argument("config", help="path to the YAML config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set adapter.r=16 (repeatable)")
    run.add_argument("--stage", action="append", default=None,
                     help="run only this stage (repeatable); its inputs must already exist")
    check = sub.add_parser("validate", help="check a config, its model, adapter targets and data; start nothing")
    check.add_argument("config")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_registry_commands(sub)
    return p


def _add_registry_commands(sub) -> None:
    """``sweep`` (Ray Tune, in the tune package), ``eval`` and ``registry list|promote``."""
    sweep = sub.add_parser("sweep", help="Ray Tune sweep of one stage over adapter method, rank, alpha, ...")
    sweep.add_argument("config", help="path to the sweep YAML")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a sweep field, or a base config field as config.<key>=value (repeatable)")
    ev = sub.add_parser("eval", help="held-out ROUGE (or reward accuracy) of an adapter: folder or models:/ URI")
    ev.add_argument("config", help="the run config naming the base model, data and eval settings")
    ev.add_argument("--adapter", required=True, help="a folder, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
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


def _registry_command(args: argparse.Namespace) -> int:
    """``eval`` and ``registry``: input errors exit 2 with one line, like ``run``."""
    from pipeline import registry
    from pipeline.config import RunConfig

    try:
        if args.command == "eval":
            from pipeline.evaluate_adapter import evaluate_adapter

            cfg = load_config(args.config, args.overrides)
            folder, metrics = evaluate_adapter(cfg, args.adapter)
            shown = {k: round(v, 4) for k, v in metrics.items()}
            print(f"[raypeft] eval {args.adapter} ({folder}): {shown}")
            return 0
        uri = args.tracking_uri or RunConfig().tracking_uri()
        if args.registry_command == "list":
            print(registry.format_versions(registry.list_versions(uri, args.name)))
        else:
            registry.promote(uri, args.name, args.version, args.alias)
            print(f"[raypeft] {args.name}@{args.alias} -> version {args.version}")
        return 0
    except _input_errors() as exc:
        print(f"raypeft: error: {exc}", file=sys.stderr)
        return 2


def _input_errors() -> tuple[type[BaseException], ...]:
    from pipeline.data import DataError
    from pipeline.tracking import TrackingError

    return (ConfigError, DataError, TrackingError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        # tune/ sits above pipeline/: it is reached by name at run time, never imported statically.
        return importlib.import_module("tune.cli").sweep_command(args.config, args.overrides)
    if args.command in ("eval", "registry"):
        return _registry_command(args)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "validate":
            from pipeline.workflow import preflight

            preflight(cfg)
            print(f"{args.config}: ok")
            return 0
        if args.stage:
            unknown = [s for s in args.stage if s not in cfg.stages]
            if unknown:
                raise ConfigError(f"--stage {unknown[0]}: not a stage of this config (stages: {', '.join(cfg.stages)})")
        from pipeline.workflow import run_workflow

        outcomes = run_workflow(cfg, args.stage)
    except _input_errors() as exc:
        print(f"raypeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raypeft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a training failure: one line here, the traceback is in the Ray log
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"raypeft: stage failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    for o in outcomes:
        shown = {k: round(v, 4) for k, v in o.metrics.items()
                 if isinstance(v, (int, float)) and "/rank" not in k
                 and ("rouge" in k or k.startswith(("eval_accuracy", "eval_margin", "eval_reward", "eval_kl"))
                      or k in ("train_seconds", "tokens_per_s"))}
        print(f"[raypeft] {o.stage}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
