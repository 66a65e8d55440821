"""Conversational rows of every stage as token ids, through one chat template.

The row formats (``data.format: chat``):

* SFT: a column of whole conversations (``columns.messages``), or a prompt column of message
  lists with a response column of assistant replies (a string or a list of assistant messages);
* pairs (reward, DPO): chosen and rejected as whole conversations, or a prompt conversation with
  chosen and rejected replies;
* prompts (PPO, GRPO, evaluation): a column of message lists; generation continues from the
  template's generation prompt.

Rendering and the loss mask are :mod:`raypeft.pipeline.data.chat`'s; this module reads the
columns, checks each row (one-line :class:`DataError` naming the column and the row) and
applies ``max_length``.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.data.chat import (ChatTokenizer, Message, TrainOn, as_reply, check_conversation, split_last_reply,
                                        truncate)
from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.tokenizing import IGNORE_INDEX, Truncation, TruncationReport, map_rows, require_columns


def sft_conversation(row: dict[str, Any], row_index: int, *, messages_column: str | None, prompt_column: str,
                     response_column: str, field: str = "data.columns") -> list[Message]:
    """One SFT row as a conversation: its messages column, or prompt messages + response reply."""
    if messages_column is not None:
        return check_conversation(row[messages_column], field=f"{field}.messages", row=row_index,
                                  need_assistant=True)
    prompt = check_conversation(row[prompt_column], field=f"{field}.prompt", row=row_index)
    return prompt + as_reply(row[response_column], field=f"{field}.response", row=row_index)


def tokenize_chat_sft(
    ds: Dataset,
    chat: ChatTokenizer,
    *,
    messages_column: str | None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    max_length: int,
    train_on: TrainOn = "all",
    truncation: Truncation = "left-prompt",
) -> tuple[Dataset, TruncationReport]:
    """``input_ids`` and ``labels`` of conversational SFT rows (loss on assistant turns only).

    A conversation longer than ``max_length`` keeps its first ``max_length`` tokens (the system
    prompt and the first turns survive; ``truncation: error`` refuses it instead); a row left
    with no token to learn from is dropped (it would only add a zero-weight row).
    """
    columns = [messages_column] if messages_column is not None else [prompt_column, response_column]
    require_columns(ds, columns)
    truncated = [0]

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out_ids, out_labels = [], []
        for k, idx in enumerate(indices):
            row = {c: batch[c][k] for c in columns}
            messages = sft_conversation(row, idx, messages_column=messages_column, prompt_column=prompt_column,
                                        response_column=response_column)
            ids, labels = chat.encode(messages, train_on=train_on, row=idx)
            if len(ids) > max_length:
                if truncation == "error":
                    raise DataError(f"data.max_length: row {idx} has {len(ids)} tokens, more than "
                                    f"max_length={max_length}; set data.truncation: left-prompt or raise data.max_length")
                truncated[0] += 1
                ids, labels, _ = truncate(ids, labels, max_length)
            if all(t == IGNORE_INDEX for t in labels[1:]):
                continue
            out_ids.append(ids)
            out_labels.append(labels)
        return {"input_ids": out_ids, "labels": out_labels}

    out = map_rows(ds, fn, chat.tokenizer, "tokenize chat sft", messages_column, prompt_column, response_column,
                   chat.template, max_length, train_on, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0])


def eval_prompts(rows: Dataset, chat: ChatTokenizer, *, messages_column: str | None, prompt_column: str,
                 response_column: str) -> tuple[list[str], list[str]]:
    """``(prompt texts, references)`` of held-out conversational rows: the conversation before its
    last assistant turn rendered with the generation prompt, and that turn's text."""
    columns = [messages_column] if messages_column is not None else [prompt_column, response_column]
    values = {c: list(rows[c]) for c in columns}
    texts, references = [], []
    for i in range(len(rows)):
        messages = sft_conversation({c: values[c][i] for c in columns}, i, messages_column=messages_column,
                                    prompt_column=prompt_column, response_column=response_column)
        prompt, reference = split_last_reply(messages, field="data.columns", row=i)
        texts.append(chat.generation_prompt(prompt, row=i))
        references.append(reference)
    return texts, references


def tokenize_chat_prompts(ds: Dataset, chat: ChatTokenizer, *, prompt_column: str, max_length: int,
                          field: str) -> Dataset:
    """Prompt ids for generation (PPO, GRPO): each row's conversation rendered with the template's
    generation prompt, so sampling continues as the assistant. Too long a prompt keeps its end
    (the generation prompt and the latest turns), with the template's first token kept when it is
    the tokenizer's bos. ``prompt_text`` holds the conversation's last user turn."""
    require_columns(ds, [prompt_column])
    bos = getattr(chat.tokenizer, "bos_token_id", None)

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids, texts = [], []
        for value, idx in zip(batch[prompt_column], indices):
            messages = check_conversation(value, field=field, row=idx)
            row_ids = chat.encode_prompt(messages, row=idx)
            if len(row_ids) > max_length:
                head = row_ids[:1] if bos is not None and row_ids[0] == bos else []
                row_ids = head + row_ids[len(row_ids) - (max_length - len(head)):]
            ids.append(row_ids)
            users = [m["content"] for m in messages if m["role"] == "user"]
            texts.append(users[-1] if users else messages[-1]["content"])
        return {"input_ids": ids, "prompt_text": texts}

    return map_rows(ds, fn, chat.tokenizer, "tokenize chat prompts", prompt_column, chat.template, max_length)


def pair_conversations(row: dict[str, Any], idx: int, *, prompt_column: str | None, chosen_column: str,
                       rejected_column: str, field: str) -> tuple[list[Message], list[Message]]:
    """``(chosen, rejected)`` whole conversations of a preference row: a shared prompt conversation
    plus two replies, or (no prompt column) two whole conversations that end in an assistant turn."""
    sides = []
    for column in (chosen_column, rejected_column):
        if prompt_column is not None:
            prompt = check_conversation(row[prompt_column], field=f"{field}.prompt", row=idx)
            sides.append(prompt + as_reply(row[column], field=f"{field}.{column}", row=idx))
        else:
            conv = check_conversation(row[column], field=f"{field}.{column}", row=idx, need_assistant=True)
            if conv[-1]["role"] != "assistant":
                raise DataError(f"{field}.{column}: row {idx} does not end with an assistant turn")
            sides.append(conv)
    return sides[0], sides[1]


def tokenize_chat_pairs(
    ds: Dataset,
    chat: ChatTokenizer,
    *,
    prompt_column: str | None,
    chosen_column: str,
    rejected_column: str,
    max_length: int,
    truncation: Truncation = "left-prompt",
    field: str = "reward.data.columns",
) -> tuple[Dataset, TruncationReport]:
    """Preference pairs (reward, DPO) of conversations: ``chosen_/rejected_input_ids`` and
    ``_labels`` with the loss mask on each side's last assistant turn (what the pair compares).

    A side over ``max_length`` keeps its first ``max_length`` tokens (the shared prompt renders to
    the same tokens on both sides, so both keep it whole while it fits); ``truncation: error``
    refuses the pair instead. A pair counts as truncated once.
    """
    columns = [c for c in (prompt_column, chosen_column, rejected_column) if c is not None]
    require_columns(ds, columns)
    truncated = [0]

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [],
                                "rejected_input_ids": [], "rejected_labels": []}
        for k, idx in enumerate(indices):
            row = {c: batch[c][k] for c in columns}
            chosen, rejected = pair_conversations(row, idx, prompt_column=prompt_column, chosen_column=chosen_column,
                                                  rejected_column=rejected_column, field=field)
            cut = False
            for side, messages in (("chosen", chosen), ("rejected", rejected)):
                ids, labels = chat.encode(messages, train_on="last", row=idx)
                if len(ids) > max_length:
                    if truncation == "error":
                        raise DataError(f"data.max_length: row {idx} {side} side has {len(ids)} tokens, more than "
                                        f"max_length={max_length}; set data.truncation: left-prompt or raise "
                                        "data.max_length")
                    ids, labels, cut = *truncate(ids, labels, max_length)[:2], True
                out[f"{side}_input_ids"].append(ids)
                out[f"{side}_labels"].append(labels)
            truncated[0] += cut
        return out

    out = map_rows(ds, fn, chat.tokenizer, "tokenize chat pairs", prompt_column, chosen_column, rejected_column,
                   chat.template, max_length, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0])


def split_sft_rows(ds: Dataset, *, messages_column: str | None, prompt_column: str, response_column: str) -> Dataset:
    """SFT conversations as prompt rows for the policy stages: ``prompt_column`` the conversation
    before its last assistant turn, ``response_column`` that turn's text (a reference a reward
    function can read); other columns are kept. GRPO's ``data.source: sft`` reads these."""
    columns = [messages_column] if messages_column is not None else [prompt_column, response_column]
    require_columns(ds, columns)

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompts, replies = [], []
        for k, idx in enumerate(indices):
            messages = sft_conversation({c: batch[c][k] for c in columns}, idx, messages_column=messages_column,
                                        prompt_column=prompt_column, response_column=response_column)
            prompt, reply = split_last_reply(messages, field="data.columns", row=idx)
            prompts.append(prompt)
            replies.append(reply)
        return {prompt_column: prompts, response_column: replies}

    dropped = [messages_column] if messages_column is not None and messages_column not in (prompt_column,
                                                                                            response_column) else []
    return ds.map(fn, batched=True, with_indices=True, remove_columns=dropped, keep_in_memory=True,
                  load_from_cache_file=False, desc="split sft conversations",
                  new_fingerprint=f"{ds._fingerprint}-split-{messages_column}-{prompt_column}-{response_column}")
