"""``raypeft sweep SWEEP.yaml [--set key=value ...]``: a Ray Tune sweep over one pipeline stage.

``pipeline.cli`` dispatches here through importlib (the pipeline never imports tune); this
module also runs alone as ``python -m tune.cli``. ``--set`` edits the sweep file
(``--set num_samples=4``, ``--set search_space.adapter.r.grid=[4,8]``); ``--set config.<key>=v``
edits the base run config of every trial (``--set config.sft.max_steps=20``).

Exit codes as for ``raypeft run``: 0 done (at least one trial finished), 2 bad input before
anything started, 1 a failure while running (or no trial finished).
"""

from __future__ import annotations

import argparse
import sys


def sweep_command(path: str, overrides: list[str]) -> int:
    from pipeline.data import DataError
    from pipeline.tracking import TrackingError
    from tune.schema import ConfigError, load_sweep
    from tune.sweep import prepare, run_sweep

    try:
        sweep, base_items = load_sweep(path, overrides)
        outcome = run_sweep(prepare(sweep, path, base_items))
    except (ConfigError, DataError, TrackingError) as exc:
        print(f"raypeft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raypeft: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"raypeft: sweep failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    return 0 if outcome.best is not None else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raypeft sweep", description="Ray Tune sweep over one pipeline stage")
    p.add_argument("sweep", help="path to the sweep YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field, or a base config field as config.<key>=value (repeatable)")
    args = p.parse_args(argv)
    return sweep_command(args.sweep, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
