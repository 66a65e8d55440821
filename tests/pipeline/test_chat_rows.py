"""Conversational SFT rows through the data layer, and the demo's chat template.

The tokenizer is the demo's (``train_tokenizer`` on a few sentences, with its chat template);
no cache or hub is touched.
"""

from __future__ import annotations

import pytest
from datasets import Dataset

from raypeft.pipeline.data import IGNORE_INDEX, DataError
from raypeft.pipeline.data.chat import ChatTokenizer
from raypeft.pipeline.data.chat_rows import (eval_prompts, split_sft_rows, tokenize_chat_pairs, tokenize_chat_prompts,
                                             tokenize_chat_sft)
from raypeft.pipeline.demo import DEMO_CHAT_TEMPLATE, DEMO_SYSTEM_PROMPT, as_conversation
from raypeft.pipeline.demo.tokenizer import train_tokenizer, with_demo_template

DIALOGUES = [("Anna: Are we meeting at noon?\nBen: Yes, at the cafe.", "Anna and Ben will meet at noon."),
             ("Carl: I lost my keys.\nDana: Check the car.", "Carl lost his keys."),
             ("Eve: The report is late.\nFrank: I will finish it tonight.", "Frank will finish the report tonight.")]


@pytest.fixture(scope="module")
def tok():
    texts = [d + "\n" + s for d, s in DIALOGUES] * 5 + [DEMO_SYSTEM_PROMPT, "User: Assistant:"] * 5
    return train_tokenizer(texts, vocab_size=300)


def _learned(tok, labels):
    return tok.convert_ids_to_tokens([t for t in labels if t != IGNORE_INDEX])


def test_demo_tokenizer_has_the_template(tok):
    assert tok.chat_template == DEMO_CHAT_TEMPLATE
    tok.chat_template = None
    assert with_demo_template(tok).chat_template == DEMO_CHAT_TEMPLATE  # builds from before the template


def test_demo_template_learns_reply_and_eos_only(tok):
    chat = ChatTokenizer(tok)
    row = as_conversation(*DIALOGUES[0])["messages"]
    text = chat.render(row)
    assert text == (f"<s>{DEMO_SYSTEM_PROMPT}\nUser: {DIALOGUES[0][0]}\nAssistant: {DIALOGUES[0][1]}</s>")
    ids, labels = chat.encode(row)
    assert tok.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True) == DIALOGUES[0][1]
    assert _learned(tok, labels)[-1] == "</s>"
    prompt = chat.encode_prompt(row[:-1])
    assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX


def test_messages_and_prompt_completion_columns_agree(tok):
    chat = ChatTokenizer(tok)
    convs = [as_conversation(d, s)["messages"] for d, s in DIALOGUES]
    as_messages, report = tokenize_chat_sft(Dataset.from_list([{"messages": c} for c in convs]), chat,
                                            messages_column="messages", max_length=256)
    split = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1]["content"]} for c in convs])
    as_columns, _ = tokenize_chat_sft(split, chat, messages_column=None, prompt_column="prompt",
                                      response_column="completion", max_length=256)
    listed = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    as_lists, _ = tokenize_chat_sft(listed, chat, messages_column=None, prompt_column="prompt",
                                    response_column="completion", max_length=256)
    assert report.truncated == 0
    assert as_messages["input_ids"] == as_columns["input_ids"] == as_lists["input_ids"]
    assert as_messages["labels"] == as_columns["labels"] == as_lists["labels"]
    for c, ids in zip(convs, as_messages["input_ids"]):
        assert ids == chat.encode(c)[0]


def test_multi_turn_last_only(tok):
    chat = ChatTokenizer(tok)
    conv = [{"role": "user", "content": "Anna: hi"}, {"role": "assistant", "content": "Anna said hi."},
            {"role": "user", "content": "Ben: hi"}, {"role": "assistant", "content": "Ben said hi."}]
    ds = Dataset.from_list([{"messages": conv}])
    all_turns, _ = tokenize_chat_sft(ds, chat, messages_column="messages", max_length=256, train_on="all")
    last, _ = tokenize_chat_sft(ds, chat, messages_column="messages", max_length=256, train_on="last")
    learned_all = tok.decode([t for t in all_turns[0]["labels"] if t != IGNORE_INDEX])
    learned_last = tok.decode([t for t in last[0]["labels"] if t != IGNORE_INDEX])
    assert learned_all.replace(" ", "") == "Annasaidhi.</s>Bensaidhi.</s>"
    assert learned_last.replace(" ", "") == "Bensaidhi.</s>"


def test_too_long_rows(tok):
    chat = ChatTokenizer(tok)
    convs = [as_conversation(d, s)["messages"] for d, s in DIALOGUES]
    ds = Dataset.from_list([{"messages": c} for c in convs])
    full, _ = tokenize_chat_sft(ds, chat, messages_column="messages", max_length=256)
    n = len(full[0]["input_ids"])
    prompt = len(chat.encode_prompt(convs[0][:-1]))
    cut, report = tokenize_chat_sft(ds, chat, messages_column="messages", max_length=n - 2)
    assert report.truncated >= 1
    assert cut[0]["input_ids"] == full[0]["input_ids"][:n - 2] and cut[0]["labels"] == full[0]["labels"][:n - 2]
    # a conversation cut before its reply has nothing to learn: dropped, not trained on as a zero row
    dropped, report = tokenize_chat_sft(ds.select([0]), chat, messages_column="messages", max_length=prompt)
    assert len(dropped) == 0 and report.truncated == 1
    with pytest.raises(DataError, match=r"^data.max_length: row 0 has \d+ tokens, more than max_length=\d+"):
        tokenize_chat_sft(ds, chat, messages_column="messages", max_length=n - 2, truncation="error")


def test_eval_prompts(tok):
    chat = ChatTokenizer(tok)
    ds = Dataset.from_list([as_conversation(d, s) for d, s in DIALOGUES])
    texts, refs = eval_prompts(ds, chat, messages_column="messages", prompt_column="prompt",
                               response_column="response")
    assert refs == [s for _, s in DIALOGUES]
    assert texts[0] == f"<s>{DEMO_SYSTEM_PROMPT}\nUser: {DIALOGUES[0][0]}\nAssistant:"


def test_prompts_continue_from_the_generation_prompt(tok):
    chat = ChatTokenizer(tok)
    convs = [as_conversation(d, s)["messages"][:2] for d, s in DIALOGUES]
    out = tokenize_chat_prompts(Dataset.from_list([{"prompt": c} for c in convs]), chat, prompt_column="prompt",
                                max_length=256, field="ppo.data.column")
    for c, row in zip(convs, out):
        assert row["input_ids"] == chat.encode_prompt(c)
        assert tok.decode(row["input_ids"]).endswith("Assistant:")
    assert out["prompt_text"] == [d for d, _ in DIALOGUES]
    short = tokenize_chat_prompts(Dataset.from_list([{"prompt": convs[0]}]), chat, prompt_column="prompt",
                                  max_length=12, field="ppo.data.column")
    full = chat.encode_prompt(convs[0])
    assert short[0]["input_ids"] == [tok.bos_token_id] + full[-11:]  # bos kept, the end (generation prompt) kept
    with pytest.raises(DataError, match=r"^ppo.data.column: row 0 is str, not a list of messages"):
        tokenize_chat_prompts(Dataset.from_list([{"prompt": "text"}]), chat, prompt_column="prompt", max_length=64,
                              field="ppo.data.column")


def test_pairs_from_prompt_and_replies_or_whole_conversations(tok):
    chat = ChatTokenizer(tok)
    prompt = as_conversation(*DIALOGUES[0])["messages"][:2]
    good, bad = DIALOGUES[0][1], "The weather was cold."
    split = Dataset.from_list([{"prompt": prompt, "chosen": good, "rejected": [{"role": "assistant", "content": bad}]}])
    whole = Dataset.from_list([{"chosen": prompt + [{"role": "assistant", "content": good}],
                                "rejected": prompt + [{"role": "assistant", "content": bad}]}])
    a, report = tokenize_chat_pairs(split, chat, prompt_column="prompt", chosen_column="chosen",
                                    rejected_column="rejected", max_length=256)
    b, _ = tokenize_chat_pairs(whole, chat, prompt_column=None, chosen_column="chosen", rejected_column="rejected",
                               max_length=256)
    assert a[0] == b[0] and report.truncated == 0
    n = len(chat.encode_prompt(prompt))
    assert a[0]["chosen_input_ids"][:n] == a[0]["rejected_input_ids"][:n]  # one shared prompt
    assert tok.decode([t for t in a[0]["rejected_labels"] if t != IGNORE_INDEX], skip_special_tokens=True) == bad
    cut, report = tokenize_chat_pairs(split, chat, prompt_column="prompt", chosen_column="chosen",
                                      rejected_column="rejected", max_length=n + 3)
    assert report.truncated == 1 and len(cut[0]["chosen_input_ids"]) == n + 3
    no_reply = Dataset.from_list([{"chosen": prompt, "rejected": prompt}])
    with pytest.raises(DataError, match=r"^reward.data.columns.chosen: row 0 has no assistant turn"):
        tokenize_chat_pairs(no_reply, chat, prompt_column=None, chosen_column="chosen", rejected_column="rejected",
                            max_length=256)


def test_sft_conversations_as_prompt_rows(tok):
    convs = [as_conversation(d, s)["messages"] for d, s in DIALOGUES]
    ds = Dataset.from_list([{"messages": c, "extra": i} for i, c in enumerate(convs)])
    rows = split_sft_rows(ds, messages_column="messages", prompt_column="dialogue", response_column="summary")
    assert sorted(rows.column_names) == ["dialogue", "extra", "summary"]
    assert rows["summary"] == [s for _, s in DIALOGUES] and rows["extra"] == [0, 1, 2]
    assert rows[0]["dialogue"] == convs[0][:-1]
