"""ROUGE computed offline, and batched generation that returns only the new text, in order."""

from __future__ import annotations

import pytest
import torch
from rouge_score import rouge_scorer
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from raypeft.pipeline.demo import DemoSettings
from raypeft.pipeline.demo.corpus import generate_corpus
from raypeft.pipeline.demo.tokenizer import train_tokenizer
from raypeft.pipeline.config import GenerationSpec
from raypeft.pipeline.evaluation import generate_responses, rouge_scores
from raypeft.pipeline.rollout_engine import RolloutEngine


def test_rouge_matches_rouge_score_with_stemming() -> None:
    preds = ["the cats are running home", "Anna meets Ben at the cafe"]
    refs = ["the cat runs home", "Ben will meet Anna at the park"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    expected = {k: sum(scorer.score(r, p)[k].fmeasure for p, r in zip(preds, refs)) / 2
                for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    got = rouge_scores(preds, refs)
    assert got == pytest.approx(expected)
    # Stemming: "running"/"runs" and "cats"/"cat" count as matches.
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)


def test_rouge_edge_cases() -> None:
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert rouge_scores(["same text"], ["same text"])["rougeL"] == pytest.approx(1.0)
    assert rouge_scores(["a b"], [["x y", "a b"]])["rouge1"] == pytest.approx(1.0)  # best reference counts
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(generate_corpus(DemoSettings.micro()).raw_documents, 300)


def _llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_batched_left_padded_generation_equals_one_by_one(tokenizer) -> None:
    model = _llama(tokenizer)
    prompts = ["Anna: Do you want coffee?\nSummary:", "Ben: hi\nSummary:", "Clara: See you at the park on Monday"]
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_responses(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # restored after the call
    # Only new text: greedy continuation of the prompt, decoded without the prompt.
    enc = tokenizer(prompts[1], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    assert single[1] == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generation_through_the_own_decode_loop_gives_the_same_texts(tokenizer) -> None:
    """Held-out ROUGE generates through the stage's rollout engine: with ``decode_loop: own`` (and
    finished rows dropped) the texts are ``generate``'s."""
    model = _llama(tokenizer)
    prompts = ["Anna: Do you want coffee?\nSummary:", "Ben: hi\nSummary:", "Clara: See you at the park on Monday",
               "Dan: no\nSummary:", "Eve: where is the cafe?"]
    plain = generate_responses(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    engine = RolloutEngine(GenerationSpec(decode_loop="own", drop_finished=True))
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=8, batch_size=4, engine=engine) == plain
    assert engine.last_path == "own"


def test_training_mode_is_restored(tokenizer) -> None:
    model = _llama(tokenizer).train()
    generate_responses(model, tokenizer, ["Anna: hi"], max_new_tokens=2, batch_size=1)
    assert model.training


def test_seq2seq_generation(tokenizer) -> None:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=tokenizer.pad_token_id)
    model = T5ForConditionalGeneration(cfg).eval()
    prompts = ["Anna: hi", "Ben: See you on Monday at the cafe"]
    batched = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=2, is_seq2seq=True)
    single = [generate_responses(model, tokenizer, [p], max_new_tokens=5, batch_size=1, is_seq2seq=True)[0]
              for p in prompts]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_bad_batch_size(tokenizer) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(_llama(tokenizer), tokenizer, ["x"], max_new_tokens=1, batch_size=0)
