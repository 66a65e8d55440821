"""The embedded demo: deterministic corpus, a tokenizer that round-trips, a cached, loadable base."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypeft.pipeline.demo import DATA_FILES, DEMO_PROMPT_TEMPLATE, DemoSettings, ensure_demo_assets
from raypeft.pipeline.demo.corpus import generate_corpus
from raypeft.pipeline.demo.tokenizer import train_tokenizer

MICRO = DemoSettings.micro()


def test_corpus_is_deterministic_and_splits_are_disjoint() -> None:
    a, b = generate_corpus(MICRO), generate_corpus(MICRO)
    assert a.files() == b.files() and a.raw_documents == b.raw_documents
    other = generate_corpus(DemoSettings.micro(seed=1))
    assert other.sft_train != a.sft_train
    train = {r["dialogue"] for r in a.sft_train}
    held_out = {r["dialogue"] for r in a.sft_eval} | {r["prompt"] for r in a.preference_eval}
    assert not train & held_out
    assert len(a.sft_train) == MICRO.sft_train and len(a.prompts) == MICRO.prompts


def test_held_out_split_does_not_move_when_train_grows() -> None:
    bigger = generate_corpus(DemoSettings.micro(sft_train=80))
    assert bigger.sft_eval == generate_corpus(MICRO).sft_eval


def test_preference_rejected_differs_from_chosen() -> None:
    corpus = generate_corpus(MICRO)
    for row in corpus.preference_train:
        assert row["chosen"] != row["rejected"] and row["prompt"]


def test_raw_documents_never_show_the_task_format() -> None:
    # The warm-up must teach the language, not the "Summary:" task SFT is meant to teach.
    assert not any("Summary:" in doc for doc in generate_corpus(MICRO).raw_documents)


def test_tokenizer_round_trips_and_splits_prompt_and_response_cleanly() -> None:
    corpus = generate_corpus(MICRO)
    tok = train_tokenizer(corpus.raw_documents, 512)
    row = corpus.sft_train[0]
    prompt = DEMO_PROMPT_TEMPLATE.format(prompt=row["dialogue"])
    assert tok.decode(tok(row["dialogue"], add_special_tokens=False)["input_ids"]) == row["dialogue"]
    joined = tok(prompt + " " + row["summary"], add_special_tokens=False)["input_ids"]
    parts = tok(prompt, add_special_tokens=False)["input_ids"] + tok(row["summary"], add_special_tokens=False)["input_ids"]
    assert joined == parts
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.pad_token_id is not None and tok.eos_token_id is not None


def test_assets_are_built_once_cached_and_loadable(tmp_path: Path) -> None:
    logs: list[str] = []
    results = []

    def build() -> None:
        results.append(ensure_demo_assets(tmp_path, settings=MICRO, log=logs.append))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1]
    assets = results[0]
    assert sum("building demo assets" in line for line in logs) == 1  # the second caller waited
    assert assets.root.name == MICRO.cache_key()
    for name in DATA_FILES:
        assert assets.file(name).is_file()
    first = json.loads(assets.file("sft_train").read_text().splitlines()[0])
    assert set(first) == {"dialogue", "summary"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    assert model.config.num_hidden_layers == MICRO.num_layers
    with torch.no_grad():
        out = model(**tok(["Anna: hi"], return_tensors="pt"))
    assert out.logits.shape[-1] == len(tok)

    logs.clear()
    assert ensure_demo_assets(tmp_path, settings=MICRO, log=logs.append) == assets
    assert logs == []  # reused, nothing rebuilt


def test_failed_build_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import raypeft.pipeline.demo.assets as assets_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets_mod, "build_demo_assets", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo_assets(tmp_path, settings=MICRO, log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_cache_key_changes_with_settings() -> None:
    assert DemoSettings().cache_key() != MICRO.cache_key()
    assert DemoSettings().cache_key() == DemoSettings().cache_key()
