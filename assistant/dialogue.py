"""Conversation memory: what the LLM's context holds, and what happens when it fills.

The history itself lives in the backend's KV cache (keep_history); this module keeps the
budget. Before a turn it checks that the question, the image tokens and a full answer fit
(``llm.max_new_tokens``); when they do not, ``llm.on_context_full`` decides: ``clear``
forgets the history and goes on (the person is told), ``error`` refuses the turn. Each turn
is also appended to an optional JSON-lines transcript.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from assistant.config import LlmConfig
from assistant.errors import ContextFullError
from assistant.llm.base import ImageEmbedding, LLMBackend

log = logging.getLogger(__name__)

# Chat-template tokens around a turn (role markers, newlines) that count_tokens does not see.
_TEMPLATE_OVERHEAD = 16


@dataclass
class Exchange:
    question: str
    answer: str
    with_image: bool
    at: float = field(default_factory=time.time)


class Conversation:
    def __init__(self, cfg: LlmConfig, backend: LLMBackend, transcript: Optional[Path] = None):
        self.cfg = cfg
        self.backend = backend
        self.transcript = transcript
        self.exchanges: list[Exchange] = []

    def needed(self, text: str, image: Optional[ImageEmbedding]) -> int:
        """Tokens the next turn may take, answer included."""
        n = self.backend.count_tokens(text) + _TEMPLATE_OVERHEAD + self.cfg.max_new_tokens
        if image is not None:
            n += image.n_tokens + 4  # image start / end tags
        return n

    def fits(self, text: str, image: Optional[ImageEmbedding]) -> bool:
        used = self.backend.tokens_used if self.cfg.keep_history else 0
        return used + self.needed(text, image) <= self.backend.context_size

    def make_room(self, text: str, image: Optional[ImageEmbedding]) -> bool:
        """Apply the context policy before a turn. Returns True if the history was cleared.

        Raises ContextFullError when the turn cannot run: the policy is ``error``, or the
        turn alone is larger than the whole context.
        """
        if self.fits(text, image):
            return False
        need = self.needed(text, image)
        if need > self.backend.context_size:
            raise ContextFullError(
                f"this question needs about {need} tokens (answer included) but the context "
                f"holds {self.backend.context_size}: raise llm.max_context_len or lower "
                f"llm.max_new_tokens")
        if self.cfg.on_context_full == "error":
            raise ContextFullError(
                f"the conversation fills the context ({self.backend.tokens_used} of "
                f"{self.backend.context_size} tokens): say \"clear\" to start over, or set "
                f"llm.on_context_full: clear")
        log.info("context full (%d of %d tokens used, %d needed): clearing the history",
                 self.backend.tokens_used, self.backend.context_size, need)
        self.clear()
        return True

    def clear(self) -> None:
        self.backend.clear()
        self.exchanges.clear()

    def record(self, question: str, answer: str, with_image: bool, **extra) -> None:
        ex = Exchange(question, answer, with_image)
        if self.cfg.keep_history:
            self.exchanges.append(ex)
        if self.transcript is None:
            return
        row = {"time": ex.at, "question": question, "answer": answer, "image": with_image, **extra}
        try:
            self.transcript.parent.mkdir(parents=True, exist_ok=True)
            with self.transcript.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:  # a full disk must not end the conversation
            log.warning("cannot append to the transcript %s: %s (logging.transcript)", self.transcript, e)
