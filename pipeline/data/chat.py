"""Conversations as token ids: chat-template rendering and the assistant-only loss mask.

A conversation is a list of ``{"role", "content"}`` messages (``system``, ``user``,
``assistant``). It is rendered to text by a Jinja chat template (the tokenizer's own, or one the
YAML gives) and tokenized once, whole, with ``add_special_tokens=False`` (the template writes bos
itself), so the ids are exactly those the model sees at inference.

Which tokens the loss is on is found **without** ``{% generation %}`` markers, by rendering
prefixes of the conversation and diffing token ids. For an assistant turn ``i``:

* ``before = render(messages[:i], add_generation_prompt=True)``: everything up to where the
  model starts writing (the assistant header included);
* ``after = render(messages[:i + 1])``: everything through the end of that turn (its
  end-of-turn marker included, which the model must learn to emit).

With ``full`` the ids of the whole conversation, the labelled tokens of turn ``i`` are
``full[lcp(ids(before), full) : end)``, where ``lcp`` is the length of the common prefix of two
id lists and ``end = lcp(ids(after), full)``, plus one when the last token of ``after`` merged
with the text that follows it. So any token holding characters of the assistant turn is
labelled, also when the tokenizer merged it across the turn boundary (the header's last
characters with the reply's first, or the end marker with the next header), and nothing else.
This works for any template whose rendering of a prefix is a prefix of the whole rendering
(Llama 3, ChatML/Qwen, Mistral v1/v2, Gemma, templates with a default system prompt); one that
is not (Mistral v3 moves the system prompt into the *last* user turn) is an error for
``train_on: all`` and still exact for ``train_on: last``, whose prefix is the whole
conversation minus its last reply.

Every problem is a :class:`DataError` naming the field, the row and the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raypeft.pipeline.data.errors import DataError, first_line
from raypeft.pipeline.data.tokenizing import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
"""The roles a message may have."""

TrainOn = Literal["all", "last"]
"""Loss on every assistant turn (``all``) or only on the conversation's last one (``last``)."""

Message = dict[str, str]

_PROBE = "raypeft probe reply"


def check_conversation(value: Any, *, field: str, row: int, need_assistant: bool = False) -> list[Message]:
    """``value`` as a list of ``{"role", "content"}`` messages, or a one-line :class:`DataError`.

    Refused: a value that is not a list, an empty list, a message that is not a mapping or lacks
    ``role`` or ``content``, a role outside :data:`ROLES`, content that is not text, and (with
    ``need_assistant``) a conversation without an assistant turn. Extra keys are dropped.
    """
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{field}: row {row} is {type(value).__name__}, not a list of messages")
    if not value:
        raise DataError(f"{field}: row {row} is an empty conversation")
    out: list[Message] = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{field}: row {row} message {j} is {type(msg).__name__}, not a mapping with role "
                            "and content")
        for key in ("role", "content"):
            if msg.get(key) is None:
                raise DataError(f"{field}: row {row} message {j} has no '{key}'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise DataError(f"{field}: row {row} message {j} has unknown role {role!r}; expected one of "
                            f"{', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{field}: row {row} message {j} content is {type(content).__name__}, not text")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{field}: row {row} has no assistant turn to learn from")
    return out


def as_reply(value: Any, *, field: str, row: int) -> list[Message]:
    """A completion column's value as assistant messages: a string is one assistant message,
    a list is checked as messages (every one of them must be an assistant turn)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    msgs = check_conversation(value, field=field, row=row)
    for j, m in enumerate(msgs):
        if m["role"] != "assistant":
            raise DataError(f"{field}: row {row} message {j} has role {m['role']!r}; a completion holds "
                            "assistant turns only")
    return msgs


def read_template(value: str | None) -> str | None:
    """A YAML ``chat_template`` value as template text: a path to an existing file is read,
    anything else is the template itself."""
    if value is None:
        return None
    if "{" not in value and "\n" not in value:
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"data.chat_template: file not found: {path.resolve()}")
        return path.read_text(encoding="utf-8")
    return value


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class ChatTokenizer:
    """Renders conversations through one chat template and tokenizes them.

    ``template``: Jinja text that overrides the tokenizer's own (``None``: the tokenizer's).
    ``field``: the config field errors name (the column being read).
    """

    tokenizer: Any
    template: str | None = None
    field: str = "data.columns.messages"
    _probed: bool = False

    def __post_init__(self) -> None:
        if self.template is None and not getattr(self.tokenizer, "chat_template", None):
            name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
            raise DataError(f"data.chat_template: the tokenizer ({name}) has no chat template; give one in the "
                            "YAML (data.chat_template: inline Jinja or a file)")

    # ----------------------------------------------------------------------------- rendering

    def render(self, messages: list[Message], *, add_generation_prompt: bool = False, row: int = 0) -> str:
        """The template's text for ``messages``; a template error is a :class:`DataError`."""
        if not messages:
            return ""
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:
            raise DataError(f"data.chat_template: cannot render {self.field} row {row}: "
                            f"{type(exc).__name__}: {first_line(exc)}") from exc
        if not isinstance(text, str):
            raise DataError(f"data.chat_template: rendering {self.field} row {row} gave {type(text).__name__}, "
                            "not text")
        return text

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _reply_start(self, messages: list[Message], before: str, after: str, full_text: str, content: str, i: int,
                     row: int) -> None:
        """Check that the rendering of a prefix is a prefix of the whole, and that a template
        whose generation prompt adds nothing does not write a header before the reply (it would
        then be learned and never prompted for). Text a template writes after a generation prompt
        that does add a header (Qwen3's empty ``<think></think>``) is the model's to write: allowed."""
        for part in (before, after):
            if not full_text.startswith(part):
                raise DataError(f"data.chat_template: {self.field} row {row}: the template renders the first {i} "
                                "messages differently inside the whole conversation, so turn boundaries cannot be "
                                "found (set data.train_on: last, or use a template that renders prefixes as prefixes)")
        rest = after[len(before):]
        at = rest.find(content.strip()) if content.strip() else -1
        if at > 0 and rest[:at].strip() and before == self.render(messages[:i], row=row):
            raise DataError(f"data.chat_template: the template has no generation prompt for an assistant turn "
                            f"({self.field} row {row}: {rest[:at].strip()!r} comes after the "
                            "add_generation_prompt=True rendering and before the reply); add an "
                            "{% if add_generation_prompt %} block that writes the assistant header")

    def generation_prompt(self, messages: list[Message], *, row: int = 0) -> str:
        """``messages`` rendered with the generation prompt, i.e. the text a reply continues.

        The first call checks the template once with a probe reply: a template whose generation
        prompt misses the assistant header (ChatML without its ``add_generation_prompt`` block)
        is refused, since generation would then not start an assistant turn.
        """
        text = self.render(messages, add_generation_prompt=True, row=row)
        if not self._probed:
            probe = messages + [{"role": "assistant", "content": _PROBE}]
            whole = self.render(probe, row=row)
            self._reply_start(messages, text, whole, whole, _PROBE, len(messages), row)
            self._probed = True
        return text

    # ----------------------------------------------------------------------------- encoding

    def encode(self, messages: list[Message], *, train_on: TrainOn = "all", row: int = 0) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a whole conversation: labels are the ids on the assistant
        turns chosen by ``train_on`` (their end-of-turn markers included) and -100 elsewhere.

        ``messages`` must hold an assistant turn that is not the first message.
        """
        full_text = self.render(messages, row=row)
        full = self.ids(full_text)
        labels = [IGNORE_INDEX] * len(full)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{self.field}: row {row} has no assistant turn to learn from")
        if train_on == "last":
            turns = turns[-1:]
        for i in turns:
            if i == 0:
                raise DataError(f"{self.field}: row {row} message 0 is an assistant turn; a conversation starts "
                                "with a system or user turn")
            before = self.render(messages[:i], add_generation_prompt=True, row=row)
            after = full_text if i == len(messages) - 1 else self.render(messages[:i + 1], row=row)
            self._reply_start(messages, before, after, full_text, messages[i]["content"], i, row)
            start = _lcp(self.ids(before), full)
            after_ids = full if after is full_text else self.ids(after)
            end = _lcp(after_ids, full)
            if end < len(after_ids):  # the turn's last token merged with what follows it
                end += 1
            for t in range(start, min(end, len(full))):
                labels[t] = full[t]
        return full, labels

    def encode_prompt(self, messages: list[Message], *, row: int = 0) -> list[int]:
        """Ids of ``messages`` followed by the generation prompt (where a reply starts)."""
        return self.ids(self.generation_prompt(messages, row=row))


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int], bool]:
    """Cut a conversation at ``max_length`` tokens, keeping its start (the system prompt and the
    first turns) and cutting the labels with it; ``(ids, labels, was_cut)``."""
    if len(ids) <= max_length:
        return ids, labels, False
    return ids[:max_length], labels[:max_length], True


def split_last_reply(messages: list[Message], *, field: str, row: int) -> tuple[list[Message], str]:
    """``(prompt messages, reference reply)``: the conversation before its last assistant turn
    and that turn's text (held-out evaluation generates the one and scores against the other)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            if i == 0:
                break
            return messages[:i], messages[i]["content"]
    raise DataError(f"{field}: row {row} has no assistant turn after a user turn to evaluate against")
