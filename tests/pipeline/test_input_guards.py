"""Issue 19: the guards behind "every bad input caught before Ray", as tables of small cases.

The CLI-level cases of ``raypeft run`` are rows of ``test_bad_input.py``; here are the pieces
those rows rely on (UTF-8 detection, local resource limits, writable folders) and the read-only
commands (``registry``, ``eval``), which must fail in one line, in seconds, and never create a
store.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from raypeft.cli import main
from raypeft.pipeline.config import ConfigError, parse_config
from raypeft.pipeline.ray_cluster import check_local_resources, reachable, shortfall
from raypeft.pipeline.text_encoding import file_utf8_problem, utf8_problem
from raypeft.pipeline.writable import folder_problem

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TEXT = [  # (bytes, expected problem or None)
    ("name: x\n".encode(), None),
    ("name: café\n".encode(), None),
    ("\ufeffname: x\n".encode(), None),  # UTF-8 with a byte-order mark is UTF-8
    ("name: café\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 9, line 1\)"),
    (b"a\nb\nc \xff\n", r"not UTF-8 text \(byte 0xff at offset 6, line 3\)"),
    ("name: x\n".encode("utf-16"), r"UTF-16 text"),
    ("name: x\n".encode("utf-16-be"), r"not UTF-8 text \(a NUL byte at offset 0, line 1; UTF-16\?\)"),
    ("name: x\n".encode("utf-32"), r"UTF-32 text"),
    ("é".encode()[:1], r"not UTF-8 text \(byte 0xc3 at offset 0, line 1\)"),  # cut inside a character
]


@pytest.mark.parametrize("data,expect", TEXT)
def test_utf8_problem(data: bytes, expect: str | None, tmp_path: Path) -> None:
    got = utf8_problem(data)
    assert (got is None) if expect is None else re.match(expect, got or ""), got
    (tmp_path / "f").write_bytes(data)
    whole = file_utf8_problem(tmp_path / "f")
    assert (whole is None) if expect is None else re.match(expect, whole or ""), whole


def test_file_check_reads_in_chunks_across_character_boundaries(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import raypeft.pipeline.text_encoding as te

    monkeypatch.setattr(te, "_CHUNK", 3)  # every multi-byte character straddles some boundary
    (tmp_path / "ok").write_bytes(("héllo\nwörld€😀\n" * 7).encode())
    assert file_utf8_problem(tmp_path / "ok") is None
    (tmp_path / "bad").write_bytes(("héllo\nwörld€\n" * 7).encode() + b"x\xff")
    assert re.match(r"not UTF-8 text \(byte 0xff at offset \d+, line 15\)", file_utf8_problem(tmp_path / "bad"))


RESOURCES = [  # (scaling block, cpus, gpus, expected error or None)
    ({"num_workers": 2}, 2, 0, None),
    ({"num_workers": 3}, 2, 0, r"scaling\.num_workers: 3 workers x 1 CPU each need 3 CPUs; this machine has 2"),
    ({"num_workers": 2, "resources_per_worker": {"CPU": 2}}, 2, 0, r"scaling\.num_workers: 2 workers x 2 CPU"),
    ({"num_workers": 4, "resources_per_worker": {"CPU": 0.5}}, 2, 0, None),
    ({"num_workers": 1, "use_gpu": True}, 8, 0, r"scaling\.num_workers: 1 workers x 1 GPU each need 1 GPUs; .*use_gpu"),
    ({"num_workers": 2, "use_gpu": True}, 8, 2, None),
    ({"num_workers": 4, "use_gpu": True, "resources_per_worker": {"GPU": 0.25}}, 8, 1, None),
    ({"num_workers": 1, "use_gpu": True, "resources_per_worker": {"GPU": 0}}, 8, 1,
     r"scaling\.resources_per_worker\.GPU: use_gpu: true needs a GPU amount above 0"),
    ({"num_workers": 1, "resources_per_worker": {"CPU": 1, "accelerator_x": 1}}, 8, 0,
     r"scaling\.resources_per_worker\.accelerator_x: a custom resource"),
]


@pytest.mark.parametrize("scaling,cpus,gpus,expect", RESOURCES)
def test_local_resources(scaling: dict, cpus: int, gpus: int, expect: str | None) -> None:
    cfg = parse_config({"scaling": scaling})
    if expect is None:
        check_local_resources(cfg, cpus, gpus)
    else:
        with pytest.raises(ConfigError, match=expect):
            check_local_resources(cfg, cpus, gpus)


SHORTFALL = [  # (scaling block, cluster resources now, expected words or None)
    ({"num_workers": 2}, {"CPU": 8.0}, None),
    ({"num_workers": 4, "resources_per_worker": {"CPU": 4}}, {"CPU": 8.0},
     "4 workers x 4 CPU each need 16 CPU, and there are 8"),
    ({"num_workers": 2, "use_gpu": True}, {"CPU": 8.0}, "2 workers x 1 GPU each need 2 GPU, and there are 0"),
    ({"num_workers": 1, "resources_per_worker": {"CPU": 1, "TPU": 1}}, {"CPU": 8.0, "TPU": 4.0}, None),
]


@pytest.mark.parametrize("scaling,have,expect", SHORTFALL)
def test_cluster_shortfall_is_named(scaling: dict, have: dict, expect: str | None) -> None:
    assert shortfall(parse_config({"scaling": scaling}), have) == expect


def test_reachable_is_bounded() -> None:
    started = time.monotonic()
    assert reachable(f"127.0.0.1:{_free_port()}", timeout=2) == "connection refused"
    assert reachable("ray://nohost.invalid:10001", timeout=2) in ("unknown host", "no answer within 2 s")
    assert reachable("no-port-here") == "not host:port"
    assert time.monotonic() - started < 10


def test_folder_problem(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a folder"
    assert "lies under" in folder_problem(tmp_path / "f" / "x")
    assert folder_problem(Path("/proc/raypeft")) == "cannot write in /proc (read-only, or permission denied)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probes left nothing behind


READ_ONLY = [  # (argv after the command, expected line after "raypeft: error: ", what must not appear)
    (["registry", "list", "--tracking-uri", "sqlite:///{tmp}/missing/dir/m.db"],
     r"--tracking-uri: no MLflow store at .*/missing/dir/m\.db .*only reads a store", "missing"),
    (["registry", "list"], r"tracking\.uri: no MLflow store at .*/mlflow\.db", "mlflow.db"),
    (["registry", "promote", "x", "1", "prod", "--tracking-uri", "sqlite:///{tmp}/m.db"],
     r"--tracking-uri: no MLflow store at", "m.db"),
    (["registry", "list", "--tracking-uri", "http://127.0.0.1:{port}"],
     r"--tracking-uri: cannot reach MLflow at http://127\.0\.0\.1:\d+ \(connection refused\)", None),
    (["registry", "list", "--tracking-uri", "ftp://host/x"], r"--tracking-uri: unsupported scheme 'ftp'", None),
    (["registry", "list", "--tracking-uri", "mlflow.db"], r"--tracking-uri: 'mlflow\.db' is not a URI", "mlflow.db"),
    (["eval", QUICKSTART, "--adapter", "models:/x/1", "--set", "tracking.uri=sqlite:///{tmp}/m.db"],
     r"tracking\.uri: no MLflow store at .*/m\.db", "m.db"),
    (["eval", QUICKSTART, "--adapter", "models:/x@prod"], r"tracking\.uri: no MLflow store at .*/mlflow\.db",
     "mlflow.db"),
    (["eval", QUICKSTART, "--adapter", "{tmp}/empty_adapter"],
     r"--adapter .*/empty_adapter: .*/empty_adapter/adapter_model\.safetensors is empty \(0 bytes\)", None),
]


@pytest.mark.parametrize("argv,expect,absent", READ_ONLY, ids=[" ".join(a[:2]) + f"-{i}"
                                                               for i, (a, _, _) in enumerate(READ_ONLY)])
def test_read_only_commands_fail_fast_and_create_no_store(argv: list[str], expect: str, absent: str | None,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "empty_adapter").mkdir()
    (tmp_path / "empty_adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "empty_adapter" / "adapter_model.safetensors").write_bytes(b"")
    port = str(_free_port())
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{port}", port) for a in argv]
    started = time.monotonic()
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert re.match(expect, err[0].removeprefix("raypeft: error: ")), err[0]
    assert time.monotonic() - started < 30
    if absent is not None:
        assert not (tmp_path / absent).exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
