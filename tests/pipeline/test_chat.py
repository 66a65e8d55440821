"""The assistant-only loss mask through chat templates of the common model families' shapes.

Each template is written here in the shape of a model family's own (Llama 3, ChatML/Qwen,
Mistral, Gemma, one with a default system prompt); tokenizers are trained here with the
family's special tokens. The expected mask is computed a second, independent way: the
characters each assistant turn must contribute (its reply plus its end-of-turn marker, written
out per family below) are located in the rendered text, and a token is expected in the loss iff
its character offsets overlap one of those spans.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raypeft.pipeline.data import DataError
from raypeft.pipeline.data.chat import ChatTokenizer, check_conversation, read_template, split_last_reply, truncate
from raypeft.pipeline.data.tokenizing import IGNORE_INDEX

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}" + CHATML
)
MISTRAL = (  # v0.1/v0.2 shape: no generation-prompt block, system folded into the first user turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for m in loop_messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{% if loop.first and system %}{{ '[INST] ' + system + '\n\n' + m['content'] + "
    "' [/INST]' }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_V3 = (  # the system prompt goes into the *last* user turn: prefixes are not prefixes
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{% set ns = namespace(last=-1) %}{% for m in loop_messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% if loop.index0 == ns.last and system is defined %}"
    "[INST] {{ system }}\n\n{{ m['content'] }}[/INST]{% else %}[INST] {{ m['content'] }}[/INST]{% endif %}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (  # no system role: the system text opens the first user turn; the assistant is "model"
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ (prefix if loop.first else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_NO_GENERATION_PROMPT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

# What one assistant turn with reply ``c`` must put in the loss, per template.
TURN_TEXT = {
    "llama3": lambda c: c.strip() + "<|eot_id|>",
    "chatml": lambda c: c + "<|im_end|>\n",
    "qwen_default_system": lambda c: c + "<|im_end|>\n",
    "mistral": lambda c: " " + c + "</s>",
    "gemma": lambda c: c.strip() + "<end_of_turn>\n",
}
TEMPLATES = {"llama3": LLAMA3, "chatml": CHATML, "qwen_default_system": QWEN_DEFAULT_SYSTEM, "mistral": MISTRAL,
             "gemma": GEMMA}
SPECIALS = ["<pad>", "<s>", "</s>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]"]
BOS = {"llama3": "<|begin_of_text|>", "mistral": "<s>", "gemma": "<s>", "chatml": "<s>", "qwen_default_system": "<s>"}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi, who are you?"}, {"role": "assistant", "content": "A small model."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green, or red."},
     {"role": "user", "content": "And a third"}, {"role": "assistant", "content": "Yellow is a third colour."}],
]
CORPUS = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant model You are a helpful"] * 3


def _tokenizer(pre_tokenizer, bos: str = "<s>") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def byte_level():
    return {name: _tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), BOS[name]) for name in TEMPLATES}


def _expected_mask(tok, text: str, pieces: list[str], at: int = 0) -> list[bool]:
    """A token is in the loss iff its characters overlap one assistant turn's expected text."""
    spans = []
    for piece in pieces:
        start = text.index(piece, at)
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_mask_token_by_token(byte_level, family, conv, train_on):
    tok = byte_level[family]
    messages = CONVERSATIONS[conv]
    chat = ChatTokenizer(tok, TEMPLATES[family])
    ids, labels = chat.encode(messages, train_on=train_on)
    text = chat.render(messages)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    if train_on == "last":
        replies = replies[-1:]
    pieces = [TURN_TEXT[family](c) for c in replies]
    # "last": the last reply's piece, found from the end of the text
    expected = _expected_mask(tok, text, pieces, at=text.rindex(pieces[0]) if train_on == "last" else 0)
    got = [label != IGNORE_INDEX for label in labels]
    assert got == expected
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, ids))
    # the learned text is the replies with their end markers, and nothing of the prompts
    learned = tok.decode([i for i, g in zip(ids, got) if g])
    assert learned == "".join(pieces)


def test_default_system_prompt_is_never_learned(byte_level):
    chat = ChatTokenizer(byte_level["qwen_default_system"], QWEN_DEFAULT_SYSTEM)
    ids, labels = chat.encode(CONVERSATIONS[0])
    assert "You are a helpful assistant." in chat.render(CONVERSATIONS[0])
    learned = byte_level["qwen_default_system"].decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "A small model.<|im_end|>\n"


def test_truncated_at_length_limit(byte_level):
    tok = byte_level["chatml"]
    chat = ChatTokenizer(tok, CHATML)
    ids, labels = chat.encode(CONVERSATIONS[1])
    first_reply_end = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 2
    for limit in (5, first_reply_end, len(ids) - 3, len(ids), len(ids) + 10):
        cut_ids, cut_labels, was_cut = truncate(ids, labels, limit)
        assert cut_ids == ids[:limit] and cut_labels == labels[:limit]
        assert was_cut == (limit < len(ids))


def test_tokenizer_merging_across_the_turn_boundary():
    """No pre-tokenizer: BPE learns merges over the header/reply and reply/end-marker boundaries;
    a token that holds characters of the reply is in the loss, one holding none is not."""
    template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}|{% endfor %}" \
               "{% if add_generation_prompt %}assistant:{% endif %}"
    convs = [[{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"},
              {"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]]
    text = "user:ping|assistant:pong|" * 2
    chars = sorted(set(text))
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *chars, ":p", "|u"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "p"), ("|", "u")]))
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    chat = ChatTokenizer(hf, template)
    ids, labels = chat.encode(convs[0])
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    pieces = [t for t in hf.convert_ids_to_tokens(ids)]
    # the vocabulary really merges across a boundary (else this test would test nothing)
    assert ":p" in pieces and "|u" in pieces, pieces
    spans = [(m_start, m_start + len("pong|")) for m_start in
             [i for i in range(len(text)) if text.startswith("pong|", i)]]
    expected = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    assert [t != IGNORE_INDEX for t in labels] == expected


QWEN3_THINK = (  # an empty think block before the last reply only, after the generation prompt
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_text_a_template_adds_after_the_generation_prompt_is_learned(byte_level):
    tok = byte_level["chatml"]
    ids, labels = ChatTokenizer(tok, QWEN3_THINK).encode(CONVERSATIONS[1], train_on="last")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == \
        "<think>\n\n</think>\n\nYellow is a third colour.<|im_end|>\n"


def test_template_that_moves_the_system_prompt(byte_level):
    tok = byte_level["mistral"]
    chat = ChatTokenizer(tok, MISTRAL_V3)
    with pytest.raises(DataError, match=r"row 0: the template renders the first 2 messages differently"):
        chat.encode(CONVERSATIONS[1], train_on="all")
    ids, labels = chat.encode(CONVERSATIONS[1], train_on="last")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == " Yellow is a third colour.</s>"


def test_generation_prompt(byte_level):
    tok = byte_level["llama3"]
    chat = ChatTokenizer(tok, LLAMA3)
    prompt = CONVERSATIONS[1][:-1]
    ids = chat.encode_prompt(prompt)
    full, labels = chat.encode(CONVERSATIONS[1])
    start = max(i for i, t in enumerate(labels) if t == IGNORE_INDEX and any(u != IGNORE_INDEX for u in labels[i:]))
    assert ids == full[:start + 1]
    bad = ChatTokenizer(byte_level["chatml"], CHATML_NO_GENERATION_PROMPT, field="ppo.data.column")
    with pytest.raises(DataError, match=r"^data.chat_template: the template has no generation prompt .*ppo.data.column row 0"):
        bad.encode_prompt(prompt)
    with pytest.raises(DataError, match="no generation prompt"):
        ChatTokenizer(byte_level["chatml"], CHATML_NO_GENERATION_PROMPT).encode(CONVERSATIONS[0])


@pytest.mark.parametrize("value, problem", [
    ("hello", r"row 7 is str, not a list of messages"),
    ([], r"row 7 is an empty conversation"),
    ([{"content": "x"}], r"row 7 message 0 has no 'role'"),
    ([{"role": "user"}], r"row 7 message 0 has no 'content'"),
    ([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
     r"row 7 message 1 has unknown role 'bot'; expected one of system, user, assistant"),
    ([{"role": "user", "content": 3}], r"row 7 message 0 content is int, not text"),
    ([{"role": "user", "content": "x"}], r"row 7 has no assistant turn"),
])
def test_bad_conversations(value, problem):
    with pytest.raises(DataError, match=r"^data.columns.messages: " + problem):
        check_conversation(value, field="data.columns.messages", row=7, need_assistant=True)


def test_template_errors(byte_level, tmp_path):
    tok = byte_level["mistral"]
    with pytest.raises(DataError, match=r"^data.chat_template: cannot render data.columns.messages row 3: "
                                        r"TemplateError: Conversation roles must alternate"):
        ChatTokenizer(tok, MISTRAL).encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "assistant", "content": "c"}], row=3)
    with pytest.raises(DataError, match=r"^data.chat_template: the tokenizer .* has no chat template"):
        ChatTokenizer(tok)
    path = tmp_path / "t.jinja"
    path.write_text(CHATML)
    assert read_template(str(path)) == CHATML
    assert read_template(CHATML) == CHATML
    with pytest.raises(DataError, match=r"^data.chat_template: file not found"):
        read_template(str(tmp_path / "missing.jinja"))


def test_split_last_reply():
    prompt, reply = split_last_reply(CONVERSATIONS[1], field="f", row=0)
    assert reply == "Yellow is a third colour." and prompt == CONVERSATIONS[1][:-1]
