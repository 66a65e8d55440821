"""The embedded demo: a generated dialogue-summary corpus and a tiny warmed-up Llama, offline.

``ensure_demo_assets()`` builds them once (about a minute on a laptop CPU) into
``$RAYPEFT_CACHE`` or ``~/.cache/raypeft`` and returns their paths.
"""

from raypeft.pipeline.demo.assets import (DATA_FILES, DEMO_COLUMNS, DEMO_PROMPT_TEMPLATE, DEMO_RESPONSE_PREFIX, DemoAssets,
                                  build_demo_assets, default_cache_dir, ensure_demo_assets)
from raypeft.pipeline.demo.corpus import DEMO_SYSTEM_PROMPT, as_conversation, as_prompt_conversation
from raypeft.pipeline.demo.settings import DEMO_FORMAT_VERSION, DemoSettings
from raypeft.pipeline.demo.tokenizer import DEMO_CHAT_TEMPLATE, with_demo_template

__all__ = [
    "DEMO_CHAT_TEMPLATE",
    "DEMO_SYSTEM_PROMPT",
    "as_conversation",
    "as_prompt_conversation",
    "with_demo_template",
    "DATA_FILES",
    "DEMO_COLUMNS",
    "DEMO_FORMAT_VERSION",
    "DEMO_PROMPT_TEMPLATE",
    "DEMO_RESPONSE_PREFIX",
    "DemoAssets",
    "DemoSettings",
    "build_demo_assets",
    "default_cache_dir",
    "ensure_demo_assets",
]
