"""Ray Tune sweeps over adapter method, rank, alpha and any config field (drives ``pipeline`` stages).

* ``schema``: the sweep YAML (``SweepConfig``, ``load_sweep``, one-line ``SweepError``s);
* ``space``: conditional search spaces (fields that apply per method, duplicate-free grids,
  Tune's ``param_space`` and Optuna's define-by-run function);
* ``trials``: one trial's run config and the Tune trainable that runs it as a pipeline stage;
* ``callbacks``: Ray Train reports forwarded to Ray Tune (for ASHA);
* ``searchers`` / ``optuna_search``: search algorithm and scheduler objects;
* ``summary``: the per-trial table, CSV and plot; ``sweep``: the driver; ``cli``: ``raypeft sweep``.

Layering: tune imports pipeline (and adapters through it); pipeline never imports tune.
"""
