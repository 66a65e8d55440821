"""raypeft: distributed instruction tuning and RLHF on Ray, with its own PEFT library.

The three layers install under this package although their folders sit at the repository root
(``setup.py`` maps them): ``raypeft.adapters`` (the PEFT library, no Ray or MLflow),
``raypeft.pipeline`` (stages, engine, tracking) and ``raypeft.tune`` (Ray Tune sweeps).
``raypeft.cli`` is the ``raypeft`` command and sits above all three.
"""

__version__ = "0.1.0"
