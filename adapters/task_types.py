"""Task types, spelled exactly as PEFT writes them into ``adapter_config.json``.

Its own module because targeting (which head ``all-linear`` leaves alone) and the configs both
read them, and targeting must not depend on the config classes it serves.
"""

from __future__ import annotations

from typing import ClassVar


class TaskType:
    """Task type constants, spelled exactly as PEFT writes them into ``adapter_config.json``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    ALL: ClassVar[tuple[str, ...]] = (
        SEQ_CLS,
        SEQ_2_SEQ_LM,
        CAUSAL_LM,
        TOKEN_CLS,
        QUESTION_ANS,
        FEATURE_EXTRACTION,
    )
