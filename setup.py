"""Maps the repository's top-level folders onto the ``raypeft`` import package.

The folders keep the names the project is known by (``adapters/``, ``pipeline/``, ``tune/``), but
those names are taken on the package index (AdapterHub's ``adapters`` above all), so they install
as ``raypeft.adapters``, ``raypeft.pipeline`` and ``raypeft.tune``. Sub-packages are found here,
not listed by hand, so a new folder with an ``__init__.py`` ships without touching packaging.
Everything else (metadata, dependencies, entry points) lives in pyproject.toml.
"""

from setuptools import find_packages, setup

LAYERS = ("adapters", "pipeline", "tune")

packages = ["raypeft"]
for layer in LAYERS:
    packages += [f"raypeft.{layer}"] + [f"raypeft.{layer}.{sub}" for sub in find_packages(layer)]

setup(
    packages=packages,
    package_dir={"raypeft": "src/raypeft", **{f"raypeft.{layer}": layer for layer in LAYERS}},
)
