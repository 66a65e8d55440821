"""A small byte-level BPE tokenizer trained on the demo corpus, wrapped for ``transformers``.

Byte-level with a prefix space, like GPT-2/RoBERTa, so any text encodes (no unknown bytes) and
a response tokenized on its own starts with a space token (``" Anna"``): ``prompt + response``
concatenated as separate token lists decodes as ``"...Summary: Anna ..."``.

Every *line* gets that prefix space, not only the text's first: the text is first split after
each newline. So a speaker at the start of a chat line (``"\nBen:"``) is the same token
``" Ben"`` as the name inside a sentence or a summary, which lets a tiny model copy names from
the chat into the summary. The decoder removes the spaces it added (the one after each newline
and the leading one), so ``decode(encode(text)) == text`` for any text that neither starts with
a space nor has a space right after a newline (those lose that one space).

``add_special_tokens=True`` prepends ``<s>`` only (Llama layout); ``</s>`` ends training
examples and stops generation; ``<pad>`` pads on the right by default. Its chat template
(:data:`DEMO_CHAT_TEMPLATE`) renders conversations as "User:" / "Assistant:" lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3

# The demo's chat template: bos, the system text on its own line, then "User: ..." and
# "Assistant: ..." lines; an assistant turn ends with eos. The newline goes *before* a turn's
# header, so an assistant turn is exactly " reply</s>" in tokens (what the loss is on) and
# generation stops at eos as in the text format. Written into new builds; ``with_demo_template``
# gives it to tokenizers of builds made before it existed.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}Assistant:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts`` and wrap it with bos/eos/pad/unk set."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=True),
    ])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="right", truncation_side="left", model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = DEMO_CHAT_TEMPLATE
    return wrapped


def with_demo_template(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The demo tokenizer with :data:`DEMO_CHAT_TEMPLATE` when its build predates it (the cache
    key does not change with the template, so older builds are reused as they are)."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    tokenizer.save_pretrained(str(folder))
