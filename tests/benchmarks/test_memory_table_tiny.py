"""benchmarks/memory_table.py on tiny configs, on CPU: every variant trains, both libraries, and the
JSON/markdown report carries the fields the GPU table is read from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "memory_table.py"


def _run(tmp_path: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--no-subprocess", "--device", "cpu", "--out", str(tmp_path),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((tmp_path / "memory_table.json").read_text())


def test_tiny_llama_every_variant_both_libraries(tmp_path: Path) -> None:
    report = _run(tmp_path, "--models", "llama3_8b")
    meta = report["meta"]
    assert meta["tiny"] is True and meta["batch"] == 2 and meta["seq_len"] == 16
    assert "memory_table.py" in meta["command"] and meta["device"].startswith("CPU")
    assert {"torch", "transformers", "peft", "deepspeed", "bitsandbytes"} <= set(meta["versions"])

    cells = {(c["variant"], c["lib"]): c for c in report["cells"]}
    assert set(cells) == {("full", "torch"), ("lora", "ours"), ("lora", "peft"), ("qlora", "ours"),
                          ("qlora", "peft"), ("lora_zero3_offload", "ours"), ("lora_zero3_offload", "peft")}
    for key, cell in cells.items():
        assert cell["status"] == "ok", (key, cell.get("error"))
        assert cell["peak_cpu_rss_gb"] > 0 and cell["tokens_per_s"] > 0
        assert len(cell["losses"]) == 2 and all(loss == loss for loss in cell["losses"])  # finite, not NaN
        assert 0 < cell["trainable_params"] <= cell["total_params"]
    # LoRA trains a sliver of the model; full fine-tuning trains all of it; both libraries put the
    # same LoRA (r=8 on q/v) on the same base.
    assert cells[("full", "torch")]["trainable_params"] == cells[("full", "torch")]["total_params"]
    assert cells[("lora", "ours")]["trainable_params"] == cells[("lora", "peft")]["trainable_params"]
    assert cells[("lora", "ours")]["trainable_params"] < cells[("lora", "ours")]["total_params"] / 10
    assert cells[("qlora", "ours")]["kbit_keep_in_fp32"] == "norms"

    summary = {s["variant"]: s for s in report["summary"]}
    assert set(summary) == {"full", "lora", "lora_zero3_offload", "qlora"}
    assert summary["lora"]["ratio_tokens_per_s"] > 0  # ours/peft ratios are computed where both ran
    assert summary["lora"]["verdict"] == "no published figure"  # Llama-3 is not in the published table

    table = (tmp_path / "memory_table.md").read_text()
    assert "| llama3_8b | qlora |" in table and "ours/peft GPU alloc" in table


@pytest.mark.slow  # three script launches, about 20 s on two cores
def test_merge_keeps_finished_cells_and_bad_names_fail(tmp_path: Path) -> None:
    first = _run(tmp_path / "a", "--models", "t0_3b", "--variants", "lora", "--libs", "ours")
    assert [c["status"] for c in first["cells"]] == ["ok"]
    assert first["summary"][0]["verdict"] == "no GPU measurement (CPU run)"  # T0_3B has a published bar
    merged = _run(tmp_path / "b", "--models", "t0_3b", "--variants", "lora", "--libs", "ours,peft",
                  "--merge", str(tmp_path / "a" / "memory_table.json"))
    cells = {c["lib"]: c for c in merged["cells"]}
    assert set(cells) == {"ours", "peft"}
    assert cells["ours"]["losses"] == first["cells"][0]["losses"]  # kept, not rerun

    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--models", "gpt5"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "--models: unknown ['gpt5']" in proc.stderr


pytestmark = pytest.mark.filterwarnings("ignore")
