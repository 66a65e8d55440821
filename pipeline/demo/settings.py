"""What the demo build is made from: one frozen settings object, hashed into the cache folder name.

Every size, seed and model dimension of the embedded demo lives here, so two builds with the
same :class:`DemoSettings` give the same files (and share one cache folder), and tests can
build a micro version in seconds with :meth:`DemoSettings.micro`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

# Bump when the generator code changes what it writes for the same settings: old caches are
# then ignored instead of being reused with stale contents.
DEMO_FORMAT_VERSION = "demo-v1"


@dataclass(frozen=True)
class DemoSettings:
    seed: int = 0
    # corpus (rows per file)
    sft_train: int = 2000
    sft_eval: int = 200
    preference_train: int = 2000
    preference_eval: int = 200
    prompts: int = 500
    raw_dialogues: int = 4000  # warm-up documents (dialogues alone)
    raw_summaries: int = 4000  # warm-up documents (summary sentences alone)
    # tokenizer (byte-level BPE; the corpus vocabulary is small, so fewer merges may be learnt)
    vocab_size: int = 2048
    # model (Llama architecture)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    # warm-up: full-parameter causal-LM training on the raw documents, packed into blocks
    warmup_steps: int = 250
    warmup_batch_size: int = 16
    warmup_block_size: int = 128
    warmup_lr: float = 3e-3
    num_threads: int = 0  # 0: min(available cores, 8)

    def cache_key(self) -> str:
        """``demo-v1-<hash>``: the folder name of a build with these settings."""
        blob = json.dumps({"version": DEMO_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return f"{DEMO_FORMAT_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def micro(cls, **overrides) -> "DemoSettings":
        """A tiny build for tests: a few dozen rows, a 2-layer model, a handful of warm-up steps."""
        small = dict(sft_train=48, sft_eval=16, preference_train=48, preference_eval=16, prompts=16,
                     raw_dialogues=120, raw_summaries=120, vocab_size=512, hidden_size=32, num_layers=2,
                     num_heads=2, num_kv_heads=1, intermediate_size=64, max_position_embeddings=256,
                     warmup_steps=4, warmup_batch_size=4, warmup_block_size=64)
        small.update(overrides)
        return replace(cls(), **small)
