"""Build the demo assets once into a cache folder and reuse them afterwards.

Layout of ``<cache>/demo-v1-<hash>/``::

    model/      LlamaForCausalLM (safetensors) + tokenizer: both Auto classes load it
    data/       sft_train.jsonl, sft_eval.jsonl          {"dialogue", "summary"}
                preference_train.jsonl, preference_eval.jsonl   {"prompt", "chosen", "rejected"}
                prompts.jsonl                            {"prompt"}
                raw_text.jsonl                           {"text"} (the warm-up documents)
    settings.json   the DemoSettings it was built from, plus build timings

Several processes may ask at once (Ray workers on one node): one takes a file lock and builds
into a temporary folder next to the target, then renames it into place; the others wait on the
lock and find the finished folder. A folder only ever appears complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from filelock import FileLock

from raypeft.pipeline.demo.corpus import generate_corpus
from raypeft.pipeline.demo.model import save_base, torch_threads, warm_up_base
from raypeft.pipeline.demo.settings import DemoSettings
from raypeft.pipeline.demo.tokenizer import train_tokenizer

# How a stage turns a demo row into model text: ``DEMO_PROMPT_TEMPLATE.format(prompt=dialogue)``,
# then the summary, then eos. Written as one string the two are joined by ``DEMO_RESPONSE_PREFIX``
# ("...Summary: Anna and Ben ..."). The stored summaries carry no leading space, and none is
# needed when prompt and response are tokenized separately: the demo tokenizer adds a prefix
# space to a text that has none, so "Anna ..." and " Anna ..." give the same ids, and
# template ids + summary ids == ids of template + " " + summary.
DEMO_PROMPT_TEMPLATE = "{prompt}\nSummary:"
DEMO_RESPONSE_PREFIX = " "
DEMO_COLUMNS = {"prompt": "dialogue", "response": "summary"}

DATA_FILES = ("sft_train", "sft_eval", "preference_train", "preference_eval", "prompts")
_DONE = "settings.json"


@dataclass(frozen=True)
class DemoAssets:
    root: Path
    model_dir: Path
    data_dir: Path

    def file(self, name: str) -> Path:
        """``data_dir / f"{name}.jsonl"`` for one of :data:`DATA_FILES`."""
        if name not in DATA_FILES:
            raise KeyError(f"unknown demo file {name!r}; expected one of {', '.join(DATA_FILES)}")
        return self.data_dir / f"{name}.jsonl"

    @property
    def settings(self) -> dict:
        return json.loads((self.root / _DONE).read_text())


def default_cache_dir() -> Path:
    env = os.environ.get("RAYPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raypeft"


def _assets(root: Path) -> DemoAssets:
    return DemoAssets(root=root, model_dir=root / "model", data_dir=root / "data")


def _complete(root: Path) -> bool:
    return (root / _DONE).is_file() and (root / "model" / "config.json").is_file()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_demo_assets(target: Path, settings: DemoSettings, *, log: Callable[[str], None] = print) -> dict:
    """Write every asset into ``target`` (created); returns the build timings in seconds."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = generate_corpus(settings)
    data = target / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, rows in corpus.files().items():
        write_jsonl(data / f"{name}.jsonl", rows)
    write_jsonl(data / "raw_text.jsonl", [{"text": t} for t in corpus.raw_documents])
    timings["corpus_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    # The tokenizer sees the prompt format too, so "Summary:" gets whole tokens.
    tok_texts = corpus.raw_documents + [DEMO_PROMPT_TEMPLATE.format(prompt=r["dialogue"]) + " " + r["summary"]
                                        for r in corpus.sft_train]
    tokenizer = train_tokenizer(tok_texts, settings.vocab_size)
    timings["tokenizer_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    with torch_threads(settings.num_threads) as n:
        log(f"[demo] warming up a {settings.num_layers}-layer Llama (hidden {settings.hidden_size}, "
            f"vocab {len(tokenizer)}) for {settings.warmup_steps} steps on {n} threads")
        model = warm_up_base(settings, tokenizer, corpus.raw_documents, log=log)
    timings["warmup_s"] = time.perf_counter() - t2
    save_base(model, tokenizer, target / "model")
    timings["total_s"] = time.perf_counter() - t0
    (target / _DONE).write_text(json.dumps({"settings": settings.to_dict(), "timings": timings}, indent=2))
    return timings


def ensure_demo_assets(cache_dir: Path | str | None = None, *, settings: DemoSettings | None = None,
                       log: Callable[[str], None] = print) -> DemoAssets:
    """The demo model and data, built on first use into ``cache_dir/demo-v1-<hash>`` and reused.

    ``cache_dir`` defaults to ``$RAYPEFT_CACHE`` or ``~/.cache/raypeft``. Safe to call from
    several processes at once.
    """
    settings = settings or DemoSettings()
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = base / settings.cache_key()
    if _complete(root):
        return _assets(root)
    base.mkdir(parents=True, exist_ok=True)
    with FileLock(str(base / f"{settings.cache_key()}.lock")):
        if _complete(root):  # another process built it while we waited
            return _assets(root)
        if root.exists():  # a partial folder cannot come from us (we rename whole), but clear it
            shutil.rmtree(root, ignore_errors=True)
        log(f"[demo] building demo assets into {root} (first use; later runs reuse them)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{settings.cache_key()}-", dir=base))
        try:
            timings = build_demo_assets(tmp, settings, log=log)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"[demo] built in {timings['total_s']:.1f}s (corpus {timings['corpus_s']:.1f}s, "
            f"tokenizer {timings['tokenizer_s']:.1f}s, warm-up {timings['warmup_s']:.1f}s)")
    return _assets(root)
