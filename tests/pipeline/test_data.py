"""The data layer: loading, column checks, tokenization layouts, collators, splits.

Everything is local: files written into tmp_path and tokenizers trained here on a few
sentences with the ``tokenizers`` library (no hub access).
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from raypeft.pipeline.data import (
    IGNORE_INDEX,
    DataError,
    PairCollator,
    PromptCollator,
    SFTCollator,
    TruncationReport,
    check_columns,
    count_tokens,
    load_rows,
    split_pairs,
    split_train_eval,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)

ROWS = [
    {"dialogue": "Anna: Are we meeting at noon?\nBen: Yes, at the cafe.", "summary": " Anna and Ben will meet at noon."},
    {"dialogue": "Carl: I lost my keys.\nDana: Check the car.", "summary": " Carl lost his keys."},
    {"dialogue": "Eve: The report is late.\nFrank: I will finish it tonight.", "summary": " Frank will finish the report."},
]
CORPUS = [r["dialogue"] + "\nSummary:" + r["summary"] for r in ROWS] * 3 + [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny tokenizer for tests",
]
TEMPLATE = "{prompt}\nSummary:"


# ------------------------------------------------------------------------------- fixtures

def _tokenizer(post: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE (like GPT-2) with <bos>/<eos>/<pad>; ``post`` picks which specials it adds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    if post == "bos":  # causal LM that prepends bos (Llama-like)
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    elif post == "eos":  # seq2seq that appends eos (T5-like)
        tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer("bos")


@pytest.fixture(scope="module")
def tok_plain() -> PreTrainedTokenizerFast:
    return _tokenizer("none")


@pytest.fixture(scope="module")
def tok_t5() -> PreTrainedTokenizerFast:
    return _tokenizer("eos")


@pytest.fixture()
def rows() -> Dataset:
    return Dataset.from_list(ROWS)


def _write_jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path: Path, rows=ROWS) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _write_parquet(path: Path, rows=ROWS) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------- loading

@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.json.gz", "d.csv", "d.parquet"])
def test_load_each_format(tmp_path: Path, name: str):
    path = tmp_path / name
    if name == "d.json":
        path.write_text(json.dumps(ROWS))
    elif name == "d.json.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    elif name.endswith(".csv"):
        _write_csv(path)
    elif name.endswith(".parquet"):
        _write_parquet(path)
    else:
        _write_jsonl(path)
    ds = load_rows(str(path))
    assert len(ds) == 3
    assert ds.column_names == ["dialogue", "summary"]
    assert ds[0]["summary"] == ROWS[0]["summary"]  # leading space and newlines survive
    assert ds[0]["dialogue"] == ROWS[0]["dialogue"]


def test_file_format_overrides_extension(tmp_path: Path):
    path = _write_jsonl(tmp_path / "rows.txt")
    assert len(load_rows(str(path), file_format="jsonl")) == 3
    with pytest.raises(DataError, match=r"^data.source: unknown file format of .*rows.txt"):
        load_rows(str(path))
    with pytest.raises(DataError, match=r"^data.source: unknown file format 'xml'; expected one of json"):
        load_rows(str(path), file_format="xml")


def test_load_slice_of_train(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl")
    assert len(load_rows(str(path), split="train[:2]")) == 2


def test_load_directory_and_glob(tmp_path: Path):
    d = tmp_path / "shards"
    d.mkdir()
    _write_jsonl(d / "part-a.jsonl", ROWS[:2])
    _write_jsonl(d / "part-b.jsonl", ROWS[2:])
    ds = load_rows(str(d))
    assert len(ds) == 3
    assert sorted(ds["summary"]) == sorted(r["summary"] for r in ROWS)
    assert len(load_rows(str(d / "part-*.jsonl"))) == 3
    assert len(load_rows(str(d / "*-a.jsonl"))) == 2
    assert len(load_rows(str(d / "*"))) == 3  # a glob without an extension is still local
    with pytest.raises(DataError, match=r"^data.source: no files match .*nothing-\*.jsonl"):
        load_rows(str(d / "nothing-*.jsonl"))
    with pytest.raises(DataError, match=r"^data.source: split 'validation' not found in .*shards"):
        load_rows(str(d), split="validation")


def test_directory_named_by_split(tmp_path: Path):
    _write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    _write_jsonl(tmp_path / "validation.jsonl", ROWS[2:])
    assert len(load_rows(str(tmp_path))) == 2
    assert load_rows(str(tmp_path), split="validation")["summary"] == [ROWS[2]["summary"]]
    with pytest.raises(DataError, match=r"no files for split 'test' .*; splits present: train, validation"):
        load_rows(str(tmp_path), split="test")


def test_directory_with_split_folders(tmp_path: Path):
    for split, part in (("train", ROWS[:2]), ("validation", ROWS[2:])):
        (tmp_path / split).mkdir()
        _write_parquet(tmp_path / split / "part-0000.parquet", part)
    assert len(load_rows(str(tmp_path))) == 2
    assert len(load_rows(str(tmp_path), split="validation")) == 1
    assert len(load_rows(str(tmp_path), split="train[:1]")) == 1


def test_directory_mixed_formats_and_empty(tmp_path: Path):
    _write_jsonl(tmp_path / "a.jsonl")
    _write_csv(tmp_path / "b.csv")
    with pytest.raises(DataError, match=r"mixes formats \(csv, json\); set data.file_format"):
        load_rows(str(tmp_path))
    assert len(load_rows(str(tmp_path), file_format="csv")) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"^data.source: no .json, .jsonl, .parquet or .csv files in"):
        load_rows(str(empty))


def test_saved_dataset_directory(tmp_path: Path):
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(tmp_path / "dd")
    assert len(load_rows(str(tmp_path / "dd"))) == 3
    assert len(load_rows(str(tmp_path / "dd"), split="test")) == 1


def test_data_files_with_builder(tmp_path: Path):
    a = _write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = _write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    assert len(load_rows("json", data_files=[str(a), str(b)])) == 3
    with pytest.raises(DataError, match=r"^data.source: file not found: .*missing.jsonl"):
        load_rows("json", data_files=[str(a), str(tmp_path / "missing.jsonl")])


def test_missing_file(tmp_path: Path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError) as exc:
        load_rows(str(missing), where="data.train")
    assert str(exc.value) == f"data.train: file not found: {missing}"
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("w.jsonl", "\n\n"), ("e.json", "[]"), ("h.csv", "a,b\n")])
def test_empty_file(tmp_path: Path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        load_rows(str(path), where="data.eval_source")
    assert str(exc.value) == f"data.eval_source: {path} has no rows"


def test_malformed_file_is_one_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError) as exc:
        load_rows(str(path))
    assert str(exc.value).startswith(f"data.source: could not read {path}")
    assert "\n" not in str(exc.value)


def test_local_split_other_than_train_is_an_error(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl")
    with pytest.raises(DataError, match=r"split 'validation' does not apply to .*d.jsonl"):
        load_rows(str(path), split="validation")


def test_hub_id_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    ds = load_rows("knkarthick/dialogsum", split="validation", subset="default")
    assert len(ds) == 3
    assert calls == [("knkarthick/dialogsum", (), {"name": "default", "split": "validation"})]
    load_rows("owner/name", trust_remote_code=True)
    assert calls[-1] == ("owner/name", (), {"split": "train", "trust_remote_code": True})


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def fake(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.raises(DataError, match=r"^data.source: could not read owner/ds: Couldn't reach 'owner/ds'") as exc:
        load_rows("owner/ds")
    assert "\n" not in str(exc.value)


def test_hub_empty_split_is_an_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: Dataset.from_dict({"x": []}))
    with pytest.raises(DataError, match=r"^data.source: owner/ds has no rows$"):
        load_rows("owner/ds")


# ------------------------------------------------------------------------------- columns and splits

def test_check_columns(tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl")
    ds = load_rows(str(path))
    check_columns(ds, {"prompt": "dialogue", "response": "summary"}, where="data.source")
    with pytest.raises(DataError) as exc:
        check_columns(ds, {"prompt": "dialog", "response": "summary"}, where="data.source")
    assert str(exc.value) == (f"data.columns.prompt: column 'dialog' not found in data.source ({path}); "
                              "present: dialogue, summary")
    # The origin survives a train/eval split.
    train, _ = split_train_eval(ds, eval_rows=1, seed=0)
    with pytest.raises(DataError, match=rf"column 'text' not found in data.source \({path}\); present: dialogue"):
        check_columns(train, {"response": "text"}, where="data.source")


def test_check_columns_without_origin(rows):
    with pytest.raises(DataError, match=r"^data.columns.response: column 'x' not found in here; present: dialogue, summary$"):
        check_columns(rows, {"response": "x"}, where="here")


def test_split_train_eval_deterministic_and_disjoint():
    ds = Dataset.from_dict({"i": list(range(100))})
    train, held = split_train_eval(ds, eval_fraction=0.1, eval_rows=None, seed=3)
    assert (len(train), len(held)) == (90, 10)
    assert set(train["i"]).isdisjoint(held["i"]) and set(train["i"]) | set(held["i"]) == set(range(100))
    assert train["i"] == sorted(train["i"])  # original order kept
    again_train, again_held = split_train_eval(ds, eval_fraction=0.1, eval_rows=None, seed=3)
    assert again_held["i"] == held["i"] and again_train["i"] == train["i"]
    other = split_train_eval(ds, eval_fraction=0.1, eval_rows=None, seed=4)[1]
    assert other["i"] != held["i"]
    assert len(split_train_eval(ds, eval_fraction=None, eval_rows=7, seed=0)[1]) == 7
    assert len(split_train_eval(Dataset.from_dict({"i": [1, 2, 3]}), eval_fraction=0.01, seed=0)[1]) == 1


def test_split_train_eval_errors():
    ds = Dataset.from_dict({"i": [1, 2, 3]})
    with pytest.raises(DataError, match="exactly one of"):
        split_train_eval(ds, eval_fraction=0.1, eval_rows=1, seed=0)
    with pytest.raises(DataError, match="exactly one of"):
        split_train_eval(ds, eval_fraction=None, eval_rows=None, seed=0)
    with pytest.raises(DataError, match=r"^data.eval_rows: 3 held-out rows leave no training rows"):
        split_train_eval(ds, eval_rows=3, seed=0)


# ------------------------------------------------------------------------------- SFT tokenization

def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["tok", "tok_plain"])
def test_sft_causal_layout_and_masking(rows, which, request):
    tok = request.getfixturevalue(which)
    out, report = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                               prompt_template=TEMPLATE, max_length=512)
    assert report == TruncationReport(rows=3, truncated=0)
    assert out.column_names == ["input_ids", "labels"]
    bos = [tok.bos_token_id] if which == "tok" else []
    for row, src in zip(out, ROWS):
        prompt = bos + _enc(tok, TEMPLATE.format(prompt=src["dialogue"]))
        response = _enc(tok, src["summary"])  # the response tokenized alone, leading space kept
        assert row["input_ids"] == prompt + response + [tok.eos_token_id]
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
        assert len(row["labels"]) == len(row["input_ids"])
        assert tok.decode(response) == src["summary"]


def test_sft_no_eos(rows, tok):
    out, _ = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary", max_length=512,
                          add_eos=False)
    assert out[0]["input_ids"][-len(_enc(tok, ROWS[0]["summary"])):] == _enc(tok, ROWS[0]["summary"])
    assert tok.eos_token_id not in out[0]["input_ids"]


def test_sft_left_prompt_truncation_keeps_response(rows, tok):
    full, _ = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                           prompt_template=TEMPLATE, max_length=512)
    lengths = [len(r) for r in full["input_ids"]]
    max_length = sorted(lengths)[1]  # the longest row is over, the others fit
    out, report = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                               prompt_template=TEMPLATE, max_length=max_length)
    assert report == TruncationReport(rows=3, truncated=sum(n > max_length for n in lengths))
    assert report.truncated >= 1
    for row, before in zip(out, full):
        assert len(row["input_ids"]) <= max_length
        n_resp = sum(label != IGNORE_INDEX for label in before["labels"])
        assert row["input_ids"][0] == tok.bos_token_id  # bos kept
        assert row["labels"][-n_resp:] == before["labels"][-n_resp:]  # response + eos intact
        assert row["input_ids"][-n_resp:] == before["input_ids"][-n_resp:]
        # the prompt kept is the END of the original prompt (its start was dropped)
        kept_prompt = row["input_ids"][1:-n_resp]
        orig_prompt = before["input_ids"][1:-n_resp]
        assert orig_prompt[len(orig_prompt) - len(kept_prompt):] == kept_prompt
        assert row["labels"][:len(row["input_ids"]) - n_resp] == [IGNORE_INDEX] * (len(row["input_ids"]) - n_resp)


def test_sft_response_longer_than_max_length(tok):
    long = Dataset.from_list([{"p": "hello", "r": " the quick brown fox jumps over the lazy dog" * 3}])
    out, report = tokenize_sft(long, tok, prompt_column="p", response_column="r", max_length=12)
    row = out[0]
    assert report.truncated == 1 and len(row["input_ids"]) == 12
    assert row["input_ids"][0] == tok.bos_token_id
    # one prompt token survives (the end of the prompt), the response loses its end and its eos
    assert row["labels"][:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert row["input_ids"][1] == _enc(tok, "hello")[-1]
    assert row["labels"][2:] == _enc(tok, long[0]["r"])[:10]


def test_sft_error_mode(rows, tok):
    with pytest.raises(DataError, match=r"^data.max_length: row 0 has \d+ tokens \(prompt \d+, response \d+\), "
                                        r"more than max_length=10; set data.truncation: left-prompt"):
        tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary", max_length=10,
                     truncation="error")
    _, report = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary", max_length=512,
                             truncation="error")
    assert report.truncated == 0


def test_sft_error_names_the_first_long_row(tok):
    ds = Dataset.from_list([{"p": "hi", "r": " ok"}, {"p": "the quick brown fox jumps over the lazy dog", "r": " no"}])
    with pytest.raises(DataError, match=r"row 1 has"):
        tokenize_sft(ds, tok, prompt_column="p", response_column="r", max_length=9, truncation="error")


def test_sft_seq2seq_layout(rows, tok_t5):
    tok = tok_t5
    out, report = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                               prompt_template=TEMPLATE, max_length=512, is_seq2seq=True)
    assert report.truncated == 0
    for row, src in zip(out, ROWS):
        assert row["input_ids"] == tok(TEMPLATE.format(prompt=src["dialogue"]))["input_ids"]
        assert row["input_ids"][-1] == tok.eos_token_id
        assert row["labels"] == _enc(tok, src["summary"]) + [tok.eos_token_id]
        assert IGNORE_INDEX not in row["labels"]
    short, report = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                                 prompt_template=TEMPLATE, max_length=10, is_seq2seq=True)
    assert report.truncated == 3
    for row, before in zip(short, out):
        assert len(row["input_ids"]) == 10 and row["input_ids"][-1] == tok.eos_token_id
        assert row["input_ids"][:-1] == before["input_ids"][-10:-1]  # end of the prompt kept
        assert row["labels"] == before["labels"][:10]


def test_sft_causal_does_not_insert_trailing_specials(rows, tok_t5):
    out, _ = tokenize_sft(rows, tok_t5, prompt_column="dialogue", response_column="summary", max_length=512)
    prompt = _enc(tok_t5, ROWS[0]["dialogue"])
    assert out[0]["input_ids"][:len(prompt) + 1] == prompt + _enc(tok_t5, ROWS[0]["summary"])[:1]


def test_sft_bad_template_and_missing_column(rows, tok):
    with pytest.raises(DataError, match=r"^data.prompt_template: cannot format"):
        tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary",
                     prompt_template='{"x": {prompt}}', max_length=64)
    with pytest.raises(DataError, match=r"column 'nope' not found; present: dialogue, summary"):
        tokenize_sft(rows, tok, prompt_column="nope", response_column="summary", max_length=64)


def test_sft_is_fast(tok):
    ds = Dataset.from_list(ROWS * 700)  # ~2000 rows, like the demo
    start = time.perf_counter()
    out, _ = tokenize_sft(ds, tok, prompt_column="dialogue", response_column="summary",
                          prompt_template=TEMPLATE, max_length=64)
    assert len(out) == 2100
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------------- pairs and prompts

def test_pairs_layout(tok):
    ds = Dataset.from_list([{"q": ROWS[0]["dialogue"], "good": ROWS[0]["summary"], "bad": " Nothing."}])
    out, report = tokenize_pairs(ds, tok, prompt_column="q", chosen_column="good", rejected_column="bad",
                                 prompt_template=TEMPLATE, max_length=512)
    assert report.truncated == 0
    assert out.column_names == ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    prompt = [tok.bos_token_id] + _enc(tok, TEMPLATE.format(prompt=ROWS[0]["dialogue"]))
    row = out[0]
    for side, text in (("chosen", ROWS[0]["summary"]), ("rejected", " Nothing.")):
        resp = _enc(tok, text) + [tok.eos_token_id]
        assert row[f"{side}_input_ids"] == prompt + resp
        assert row[f"{side}_labels"] == [IGNORE_INDEX] * len(prompt) + resp


def test_pairs_truncation_shares_the_prompt(tok):
    ds = Dataset.from_list([{"q": ROWS[0]["dialogue"], "good": ROWS[0]["summary"], "bad": " No."}])
    max_length = 1 + 3 + len(_enc(tok, ROWS[0]["summary"])) + 1  # bos, 3 prompt tokens, chosen, eos
    out, report = tokenize_pairs(ds, tok, prompt_column="q", chosen_column="good", rejected_column="bad",
                                 prompt_template=TEMPLATE, max_length=max_length)
    assert report == TruncationReport(rows=1, truncated=1)
    row = out[0]
    n_c = sum(x != IGNORE_INDEX for x in row["chosen_labels"])
    n_r = sum(x != IGNORE_INDEX for x in row["rejected_labels"])
    assert len(row["chosen_input_ids"]) == max_length
    assert row["chosen_input_ids"][:-n_c] == row["rejected_input_ids"][:-n_r]  # same prompt tokens
    assert len(row["chosen_input_ids"][:-n_c]) == 4 and row["chosen_input_ids"][0] == tok.bos_token_id
    assert row["rejected_input_ids"][-n_r:] == _enc(tok, " No.") + [tok.eos_token_id]
    assert row["chosen_input_ids"][-n_c:] == _enc(tok, ROWS[0]["summary"]) + [tok.eos_token_id]
    with pytest.raises(DataError, match=r"row 0 has .*chosen"):
        tokenize_pairs(ds, tok, prompt_column="q", chosen_column="good", rejected_column="bad",
                       prompt_template=TEMPLATE, max_length=max_length, truncation="error")


def test_prompts_left_truncated(rows, tok):
    out = tokenize_prompts(rows, tok, prompt_column="dialogue", prompt_template=TEMPLATE, max_length=512)
    assert out.column_names == ["input_ids", "prompt_text"]
    assert out["prompt_text"] == [r["dialogue"] for r in ROWS]
    full = out[0]["input_ids"]
    assert full == [tok.bos_token_id] + _enc(tok, TEMPLATE.format(prompt=ROWS[0]["dialogue"]))
    short = tokenize_prompts(rows, tok, prompt_column="dialogue", prompt_template=TEMPLATE, max_length=6)
    assert short[0]["input_ids"] == [tok.bos_token_id] + full[-5:]


# ------------------------------------------------------------------------------- collators

def test_sft_collator_right_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_tokens(batch) == 4


def test_sft_collator_left_padding_and_multiple():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [2, 8], "labels": [-100, 8]}]
    batch = SFTCollator(pad_token_id=2, pad_to_multiple_of=4, padding_side="left")(rows)
    assert batch["input_ids"].tolist() == [[2, 5, 6, 7], [2, 2, 2, 8]]
    # the attention mask comes from lengths, so a real token equal to the pad id (eos as pad) counts
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 8]]
    assert count_tokens(batch) == 5


def test_sft_collator_seq2seq_labels_own_width():
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [9]}, {"input_ids": [1], "labels": [7, 8]}]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[9, -100], [7, 8]]


def test_collator_on_tokenized_rows(rows, tok):
    out, _ = tokenize_sft(rows, tok, prompt_column="dialogue", response_column="summary", max_length=512)
    batch = SFTCollator(pad_token_id=tok.pad_token_id)([out[i] for i in range(3)])
    lengths = [len(r) for r in out["input_ids"]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert count_tokens(batch) == sum(lengths)


def test_collator_requires_pad_id():
    with pytest.raises(DataError, match="no pad token"):
        SFTCollator(pad_token_id=None)


def test_pair_collator_shapes_and_split():
    rows = [
        {"chosen_input_ids": [1, 2, 3], "chosen_labels": [-100, 2, 3], "rejected_input_ids": [1, 4], "rejected_labels": [-100, 4]},
        {"chosen_input_ids": [1, 5], "chosen_labels": [-100, 5], "rejected_input_ids": [1, 6, 7, 8], "rejected_labels": [-100, 6, 7, 8]},
    ]
    batch = PairCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (4, 4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 5, 0, 0], [1, 4, 0, 0], [1, 6, 7, 8]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert batch["labels"][3].tolist() == [-100, 6, 7, 8] and batch["labels"][0].tolist() == [-100, 2, 3, -100]
    chosen, rejected = PairCollator.split(batch["input_ids"])
    assert chosen.tolist() == [[1, 2, 3, 0], [1, 5, 0, 0]] and rejected.tolist() == [[1, 4, 0, 0], [1, 6, 7, 8]]
    scores = torch.arange(4.0)
    c, r = split_pairs(scores)
    assert c.tolist() == [0.0, 1.0] and r.tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="even number"):
        split_pairs(torch.zeros(3))


def test_prompt_collator_left_pads(rows, tok):
    out = tokenize_prompts(rows, tok, prompt_column="dialogue", prompt_template=TEMPLATE, max_length=512)
    batch = PromptCollator(pad_token_id=tok.pad_token_id)([out[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask"}
    width = batch["input_ids"].shape[1]
    for i, ids in enumerate(out["input_ids"]):
        assert batch["input_ids"][i, width - len(ids):].tolist() == ids
        assert batch["input_ids"][i, :width - len(ids)].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
    assert batch["input_ids"][:, -1].tolist() == [out[i]["input_ids"][-1] for i in range(3)]
    texts = PromptCollator(pad_token_id=0, keep_text=True)([out[0]])["prompt_text"]
    assert texts == [ROWS[0]["dialogue"]]
