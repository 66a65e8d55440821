"""Ray Tune sweeps over adapter method, rank and alpha (drives ``pipeline`` stages).

The sweep runner lands with its own issue; this package exists so the layering
(tune -> pipeline -> adapters) is fixed from the start.
"""
