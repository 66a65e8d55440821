"""What ``pip install .`` gives a user: one ``raypeft`` package, no generic top-level names.

The wheel is built from a copy of the tree (so the checkout gains no ``build/`` folder) and
installed without dependencies into a fresh venv, offline. That venv has no access to the
project's venv at first, so the checks that ``raypeft`` comes from the wheel cannot be fooled by
the project's editable install (its import hook lives in a ``.pth`` file of the project's venv);
only then is the project's site-packages appended (a plain path line in a ``.pth``: the editable
hook in there is not run) so torch, ray and the rest resolve without a network. Every command runs
from a temporary folder with no ``PYTHONPATH``, so the repository is not on the path either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the build reads (pyproject.toml, setup.py's package_dir mapping, the README as long description).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "src", "adapters", "pipeline", "tune")
GENERIC_NAMES = ("adapters", "pipeline", "tune")
DEEPSPEED_CONFIGS = sorted(p.name for p in (REPO / "pipeline" / "deepspeed_configs").glob("*.json"))


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout[-2000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pkg")
    tree = root / "tree"
    tree.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=skip)
        else:
            shutil.copy2(src, tree / name)
    for licence in REPO.glob("LICEN[CS]E*"):
        shutil.copy2(licence, tree / licence.name)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(dist), str(tree)], cwd=root)
    (built,) = dist.glob("raypeft-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system or project site-packages) with the wheel installed, offline."""
    where = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", str(where)], cwd=where.parent)
    _run([str(where / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=where.parent)
    return where


def _site_packages(venv: Path) -> Path:
    out = _run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               cwd=venv)
    return Path(out.strip())


def test_the_wheel_holds_only_the_raypeft_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    (dist_info,) = tops - {"raypeft"}
    assert dist_info.startswith("raypeft-") and dist_info.endswith(".dist-info"), tops
    for layer in GENERIC_NAMES:
        assert f"raypeft/{layer}/__init__.py" in names
    assert DEEPSPEED_CONFIGS == ["zero2.json", "zero3.json", "zero3_offload.json"]
    for config in DEEPSPEED_CONFIGS:
        assert f"raypeft/pipeline/deepspeed_configs/{config}" in names
    assert "raypeft/pipeline/data/__init__.py" in names and "raypeft/pipeline/config/loading.py" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "raypeft = raypeft.cli:main" in entry_points


def test_installed_wheel_imports_as_raypeft_from_anywhere(venv: Path, tmp_path: Path) -> None:
    site = _site_packages(venv)
    assert site.is_relative_to(venv)
    for name in GENERIC_NAMES:
        assert not (site / name).exists() and not (site / f"{name}.py").exists(), f"top-level {name} installed"
    assert (site / "raypeft" / "adapters" / "__init__.py").is_file()
    python = str(venv / "bin" / "python")

    # Before the dependencies are reachable: the raypeft this venv imports is the wheel's.
    where = _run([python, "-c", "import raypeft; print(raypeft.__file__)"], cwd=tmp_path).strip()
    assert Path(where) == site / "raypeft" / "__init__.py"

    # Now the project's dependencies (torch, ray, ...) through a plain path line, after this venv's own.
    project_site = sysconfig.get_paths()["purelib"]
    (site / "zz_project_dependencies.pth").write_text(project_site + "\n")
    probe = ("import raypeft, raypeft.adapters, raypeft.pipeline, raypeft.tune, raypeft.cli\n"
             "from raypeft.adapters import LoraConfig, get_adapter_model, AdapterModel\n"
             "from importlib.resources import files\n"
             "for m in (raypeft, raypeft.adapters, raypeft.pipeline, raypeft.tune, raypeft.cli):\n"
             "    print(m.__file__)\n"
             "print(sorted(p.name for p in files('raypeft.pipeline.deepspeed_configs').iterdir()"
             " if p.name.endswith('.json')))\n")
    lines = _run([python, "-c", probe], cwd=tmp_path).strip().splitlines()
    for path in lines[:-1]:
        assert Path(path).is_relative_to(site / "raypeft"), path
    assert lines[-1] == repr(DEEPSPEED_CONFIGS)

    help_text = _run([str(venv / "bin" / "raypeft"), "--help"], cwd=tmp_path)
    assert "usage: raypeft" in help_text and "run" in help_text and "sweep" in help_text
