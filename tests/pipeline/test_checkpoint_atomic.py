"""A crash in the middle of a save never leaves a checkpoint (or a published adapter) that a
resume or a later stage could pick up half-written.

How that holds: a checkpoint is written into a fresh temporary folder and ``checkpoint.json``
is its last file; only a save that returned hands the folder to ``ray.train.report`` (Ray Train
registers a checkpoint only after that report, and resumes only from registered ones); a
restore refuses a folder without the marker. The stage's published adapter is copied into a
hidden staging folder and renamed into place.

The crash is simulated by making a write raise part-way (``torch.save`` of the trainer state,
or the copy of the second adapter file). A checkpoint that was written whole restores exactly,
through the same calls a stage makes (``pipeline.stages.common.report`` / ``restore``).
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ray.train
from raypeft.adapters import LoraConfig, get_adapter_model
from raypeft.adapters.serialization import load_adapter_weights
from raypeft.pipeline import backends, checkpoint, engine
from raypeft.pipeline.stages import common


class Crash(RuntimeError):
    pass


def _model(seed: int = 0):
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    return get_adapter_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))


def _backend(model) -> backends.TorchBackend:
    return backends.TorchBackend(model, lr=1e-3, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                                 total_steps=10, max_grad_norm=None)


class FakeRay:
    """``ray.train.report`` as Ray does it: copy the reported folder into storage, then register it."""

    def __init__(self, storage: Path) -> None:
        self.storage = storage
        self.registered: list[Path] = []

    def report(self, metrics, checkpoint=None) -> None:
        if checkpoint is not None:
            dest = self.storage / f"checkpoint_{len(self.registered):06d}"
            shutil.copytree(checkpoint.path, dest)
            self.registered.append(dest)

    def get_checkpoint(self):
        return ray.train.Checkpoint.from_directory(str(self.registered[-1])) if self.registered else None


@pytest.fixture()
def fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    fake = FakeRay(tmp_path / "storage")
    fake.storage.mkdir()
    monkeypatch.setattr(ray.train, "report", fake.report)
    monkeypatch.setattr(ray.train, "get_checkpoint", fake.get_checkpoint)
    # Temporary folders land here, so the test can see that none is left behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return fake


def _crash_on_state_save(monkeypatch: pytest.MonkeyPatch, module) -> None:
    """The adapter files get written, then the trainer state write dies (disk full, SIGKILL, ...)."""
    def broken_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\x80partial")  # a half-written file is what a crash leaves
        raise Crash(f"died while writing {path}")

    monkeypatch.setattr(module.torch, "save", broken_save)


def test_torch_backend_crash_mid_save_reports_nothing_and_resume_uses_the_last_complete(
        fake_ray: FakeRay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    backend = _backend(model)
    write_adapter = lambda d: model.save_pretrained(str(d))  # noqa: E731
    backends.report_checkpoint(backend, {"step": 5}, is_main=True, write_adapter=write_adapter, state={"step": 5})
    assert len(fake_ray.registered) == 1
    good = {k: v.clone() for k, v in load_adapter_weights(fake_ray.registered[0] / "adapter").items()}

    with torch.no_grad():  # training moved on...
        for p in backend.params:
            p.add_(1.0)
    with monkeypatch.context() as m:  # ...and the next save dies part-way
        _crash_on_state_save(m, backends)
        with pytest.raises(Crash):
            backends.report_checkpoint(backend, {"step": 10}, is_main=True, write_adapter=write_adapter,
                                       state={"step": 10})
    assert len(fake_ray.registered) == 1  # the half checkpoint was never reported
    assert not list((tmp_path / "scratch").iterdir())  # nor left lying around

    resumed = common.latest_checkpoint()
    fresh = _model(seed=1)
    state = _backend(fresh).restore(resumed, read_adapter=lambda d: fresh.load_adapter_state_dict(
        load_adapter_weights(d), "default"))
    assert state["step"] == 5
    now = load_adapter_weights(fake_ray.registered[-1] / "adapter")
    assert all(torch.equal(now[k], good[k]) for k in good)


def test_a_folder_without_the_marker_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a crash leaves inside the temp folder (adapter written, state half-written, no
    ``checkpoint.json``) can never be restored."""
    model = _model()
    backend = _backend(model)
    folder = tmp_path / "half"
    folder.mkdir()
    with monkeypatch.context() as m:
        _crash_on_state_save(m, backends)
        with pytest.raises(Crash):
            backend.save(folder, is_main=True, write_adapter=lambda d: model.save_pretrained(str(d)),
                         state={"step": 3})
    assert (folder / "adapter" / "adapter_model.safetensors").is_file()
    assert not checkpoint.is_complete(folder)
    with pytest.raises(RuntimeError, match="checkpoint is incomplete"):
        backend.restore(folder, read_adapter=lambda d: None)


def test_live_round_trip_restores_adapter_optimiser_schedule_and_state(
        fake_ray: FakeRay, tmp_path: Path) -> None:
    """What a stage does: ``common.report`` after some steps, then, in a restarted worker group,
    ``common.latest_checkpoint`` + ``common.restore`` into a fresh model and backend."""
    worker = engine.Worker(rank=0, world_size=1, device=torch.device("cpu"))
    model = _model()
    backend = backends.TorchBackend(model, lr=1e-2, weight_decay=0.0, scheduler="linear", warmup_steps=1,
                                    total_steps=10, max_grad_norm=1.0)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):  # Adam moments and a moved schedule, so the restore has something to restore
        backend.backward(model(input_ids=ids, labels=ids).loss)
        backend.step()
    state = {"step": 3, "rouge_before": {"rougeL": 0.25}}
    common.report(worker, backend, {"train_loss": 1.0}, model, state)
    assert len(fake_ray.registered) == 1 and checkpoint.is_complete(fake_ray.registered[0])
    assert checkpoint.checkpoint_step(fake_ray.registered[0]) == 3

    fresh = _model()  # the same base, reloaded from its source; its fresh adapter differs from the trained one
    fresh_backend = backends.TorchBackend(fresh, lr=1e-2, weight_decay=0.0, scheduler="linear", warmup_steps=1,
                                          total_steps=10, max_grad_norm=1.0)
    assert not all(torch.equal(p, q) for p, q in zip(backend.params, fresh_backend.params))
    resumed = common.latest_checkpoint()
    assert common.restore(fresh_backend, resumed, fresh) == state
    for p, q in zip(backend.params, fresh_backend.params):
        assert torch.equal(p, q)
    assert fresh_backend.scheduler.state_dict() == backend.scheduler.state_dict()
    assert fresh_backend.lr() == backend.lr()
    saved, loaded = backend.optimizer.state_dict()["state"], fresh_backend.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        assert all(torch.equal(saved[k][name], loaded[k][name]) for name in saved[k])
    # Both go on identically from here.
    for b, m in ((backend, model), (fresh_backend, fresh)):
        b.backward(m(input_ids=ids, labels=ids).loss)
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(backend.params, fresh_backend.params))


class _Result:
    """The part of a Ray Train ``Result`` that publishing reads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.checkpoint = SimpleNamespace(as_directory=self._as_directory)

    @contextmanager
    def _as_directory(self):
        yield str(self.folder)


def _adapter_checkpoint(root: Path, seed: int) -> Path:
    _model(seed).save_pretrained(str(root / "adapter"))
    (root / "adapter" / "README.md").write_text(f"adapter {seed}\n")  # a second file to crash on
    return root


def test_publishing_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raypeft.pipeline.workflow import _publish_adapter

    out = tmp_path / "run" / "sft" / "adapter"
    _publish_adapter(_Result(_adapter_checkpoint(tmp_path / "c1", seed=1)), out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    real_copy = shutil.copyfile  # what copytree's copy2 calls for each file's bytes
    copied: list[str] = []

    def dies_on_second_file(src, dst, *args, **kwargs):  # noqa: ANN001
        if copied:
            Path(dst).write_bytes(b"half")
            raise Crash("died while copying")
        copied.append(src)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", dies_on_second_file)
    with pytest.raises(Crash):
        _publish_adapter(_Result(_adapter_checkpoint(tmp_path / "c2", seed=2)), out)
    monkeypatch.setattr(shutil, "copyfile", real_copy)

    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # the previous adapter, untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # no staging folder left

    _publish_adapter(_Result(_adapter_checkpoint(tmp_path / "c3", seed=3)), out)
    assert (out / "README.md").read_text() == "adapter 3\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]  # the old one is gone too


def test_publishing_clears_what_a_killed_driver_left_half_done(tmp_path: Path) -> None:
    """A driver SIGKILLed mid-publish leaves a staging folder or an old copy; the next publish
    (which holds the output folder's lock, so no one else is writing) removes them."""
    from raypeft.pipeline.workflow import _publish_adapter

    out = tmp_path / "out" / "sft" / "adapter"
    out.parent.mkdir(parents=True)
    (out.parent / ".adapter-abc123").mkdir()
    (out.parent / ".adapter-abc123" / "adapter_model.safetensors").write_bytes(b"half")
    (out.parent / ".adapter-old-4242").mkdir()
    _publish_adapter(_Result(_adapter_checkpoint(tmp_path / "c1", seed=1)), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter"]
