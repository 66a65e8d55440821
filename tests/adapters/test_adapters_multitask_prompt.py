"""Multitask prompt tuning: per-row task prompts, the formula, source inits, files, PEFT interop both ways."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from raypeft.adapters import AdapterModel, MultitaskPromptTuningConfig, get_adapter_model, load_config

peft = pytest.importorskip("peft")

TOL = 1e-5
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _model(base, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = MultitaskPromptTuningConfig(num_virtual_tokens=kw.pop("n", 4), num_tasks=kw.pop("tasks", 3),
                                         num_ranks=kw.pop("ranks", 2), **kw)
    return get_adapter_model(copy.deepcopy(base), config).eval()


@pytest.fixture
def batch():
    return torch.randint(1, 100, (3, 6), generator=torch.Generator().manual_seed(7))


# ---------------------------------------------------------------------- the formula
def test_task_prompt_formula_and_forward(llama_base, batch):
    model = _model(llama_base)
    encoder = model.prompt_encoder["default"]
    shared = encoder.embedding.weight
    cols, rows = encoder.prefix_task_cols, encoder.prefix_task_rows
    assert tuple(cols.shape) == (3, 4, 2) and tuple(rows.shape) == (3, 2, 32)
    task_ids = torch.tensor([2, 0, 2])
    with torch.no_grad():
        prompts = torch.stack([shared * (cols[t] @ rows[t]) for t in task_ids.tolist()])
        assert torch.allclose(encoder.task_prompts(task_ids), prompts, atol=1e-7)
        embeds = torch.cat([prompts, llama_base.get_input_embeddings()(batch)], dim=1)
        expected = llama_base(inputs_embeds=embeds).logits
        ours = model(input_ids=batch, task_ids=task_ids).logits
    assert ours.shape == (3, 4 + 6, 100)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_task_ids_select_each_rows_prompt(llama_base, batch):
    model = _model(llama_base, seed=1)
    task_ids = torch.tensor([1, 0, 2])
    with torch.no_grad():
        mixed = model(input_ids=batch, task_ids=task_ids).logits
        for i, task in enumerate(task_ids.tolist()):
            alone = model(input_ids=batch[i : i + 1], task_ids=torch.tensor([task])).logits
            assert torch.allclose(mixed[i : i + 1], alone, atol=1e-6)
        same_rows = batch[:1].expand(3, -1)
        per_task = model(input_ids=same_rows, task_ids=torch.arange(3)).logits
    assert (per_task[0] - per_task[1]).abs().max() > 1e-4 and (per_task[1] - per_task[2]).abs().max() > 1e-4
    with torch.no_grad():
        generated = model.generate(input_ids=batch, task_ids=task_ids, **GEN)
        for i, task in enumerate(task_ids.tolist()):
            alone = model.generate(input_ids=batch[i : i + 1], task_ids=torch.tensor([task]), **GEN)
            assert torch.equal(generated[i : i + 1], alone)
        # beam search repeats every row; its task id goes with it
        beams = model.generate(input_ids=batch, task_ids=task_ids, num_beams=2, num_return_sequences=2, **GEN)
        alone = model.generate(input_ids=batch[2:3], task_ids=task_ids[2:3], num_beams=2, num_return_sequences=2,
                               **GEN)
        assert torch.equal(beams[4:6], alone)


def test_task_id_errors(llama_base, batch):
    model = _model(llama_base)
    with pytest.raises(ValueError, match="needs task_ids"):
        model(input_ids=batch)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        model(input_ids=batch, task_ids=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="task_ids has 2 entries for a batch of 3 rows"):
        model(input_ids=batch, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=0)
    with pytest.raises(ValueError, match="needs prompt_tuning_init_state_dict_path"):
        MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS")
    with pytest.raises(ValueError, match="num_tasks must be 1"):
        MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=2, prompt_tuning_init="EXACT_SOURCE_TASK",
                                    prompt_tuning_init_state_dict_path="x.safetensors")


# ---------------------------------------------------------------------- files and interop
def test_save_load_round_trip(llama_base, batch, tmp_path):
    model = _model(llama_base, seed=2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MULTITASK_PROMPT_TUNING" and saved["num_tasks"] == 3 and saved["num_ranks"] == 2
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "prompt_embeddings": (4, 32), "prefix_task_cols": (3, 4, 2), "prefix_task_rows": (3, 2, 32)}
    assert isinstance(load_config(tmp_path), MultitaskPromptTuningConfig)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    task_ids = torch.tensor([0, 2, 1])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch, task_ids=task_ids).logits,
                           model(input_ids=batch, task_ids=task_ids).logits)


def test_raypeft_to_peft(llama_base, batch, tmp_path, greedy_by_forward):
    ours = _model(llama_base, seed=3)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path)).eval()
    task_ids = torch.tensor([2, 1, 0])
    with torch.no_grad():
        expected = ours(input_ids=batch, task_ids=task_ids).logits
        assert (_quiet(theirs, input_ids=batch, task_ids=task_ids).logits - expected).abs().max() <= TOL
        assert torch.equal(greedy_by_forward(theirs, batch, GEN["max_new_tokens"], min_new_tokens=GEN["min_new_tokens"],
                                             task_ids=task_ids),
                           ours.generate(input_ids=batch, task_ids=task_ids, **GEN))


def test_peft_to_raypeft(llama_base, batch, tmp_path, greedy_by_forward):
    torch.manual_seed(4)
    config = peft.MultitaskPromptTuningConfig(num_virtual_tokens=5, num_tasks=2, num_ranks=3, task_type="CAUSAL_LM")
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), config).eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    task_ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = _quiet(theirs, input_ids=batch, task_ids=task_ids).logits
        assert (ours(input_ids=batch, task_ids=task_ids).logits - expected).abs().max() <= TOL
        assert torch.equal(ours.generate(input_ids=batch, task_ids=task_ids, **GEN),
                           greedy_by_forward(theirs, batch, GEN["max_new_tokens"], min_new_tokens=GEN["min_new_tokens"],
                                             task_ids=task_ids))


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_inits_match_peft(init, llama_base, tmp_path):
    """Target-task adapters initialised from a source-training checkpoint, as PEFT does it."""
    _model(llama_base, seed=5).save_pretrained(tmp_path / "source")
    path = str(tmp_path / "source" / "adapter_model.safetensors")
    source = load_file(path)
    kw = dict(num_virtual_tokens=4, num_tasks=1 if init != "ONLY_SOURCE_SHARED" else 3, num_ranks=2,
              prompt_tuning_init=init, prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2)
    torch.manual_seed(6)
    ours = get_adapter_model(copy.deepcopy(llama_base), MultitaskPromptTuningConfig(**kw))
    torch.manual_seed(6)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base),
                    peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **kw))
    mine, peft_enc = ours.prompt_encoder["default"], theirs.prompt_encoder["default"]
    assert torch.equal(mine.embedding.weight, source["prompt_embeddings"])
    for key in ("prefix_task_cols", "prefix_task_rows"):
        assert torch.equal(getattr(mine, key), getattr(peft_enc, key)), key
    if init == "EXACT_SOURCE_TASK":
        assert torch.equal(mine.prefix_task_cols[0], source["prefix_task_cols"][2])
    elif init == "AVERAGE_SOURCE_TASKS":
        assert torch.allclose(mine.prefix_task_rows[0], source["prefix_task_rows"].mean(0))


# ---------------------------------------------------------------------- training
def test_training_updates_only_the_tasks_in_the_batch(llama_base):
    model = _model(llama_base, seed=0, n=6, tasks=3, ranks=2)
    model.train()
    encoder = model.prompt_encoder["default"]
    before = encoder.prefix_task_rows.detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in encoder.parameters()}
    optimizer = torch.optim.SGD(params, lr=0.5)
    data = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    task_ids = torch.tensor([0, 2, 0, 2])
    losses = []
    for _ in range(10):
        loss = model(input_ids=data, labels=data, task_ids=task_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = encoder.prefix_task_rows.detach()
    assert torch.equal(after[1], before[1])  # task 1 never appeared
    assert (after[0] - before[0]).abs().max() > 0 and (after[2] - before[2]).abs().max() > 0
