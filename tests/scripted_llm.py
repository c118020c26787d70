"""A scripted LLM behind the real LLMBackend interface, for pipeline and memory tests.

Test-only: it is not a selectable backend. It streams a chosen answer word by word from its
own thread (as native runtimes do), honours abort and keep_history, counts tokens as one per
word, and fails like a real backend when the context is full.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from assistant.errors import BackendError, ContextFullError
from assistant.llm.base import ImageEmbedding, LLMBackend, TurnStats


class ScriptedLLM(LLMBackend):
    name = "scripted"

    def __init__(self, answers: Optional[list[str]] = None, context: int = 4096,
                 piece_delay: float = 0.0, system_tokens: int = 10, think_s: float = 0.0):
        self.answers = list(answers or ["The answer is forty two."])
        self.ctx = context
        self.piece_delay = piece_delay
        self.think_s = think_s          # before the first piece, like a slow prefill
        self.system_tokens = system_tokens
        self.used = system_tokens
        self.calls: list[dict] = []
        self.fail_next: Optional[str] = None
        self.clears = 0
        self.histories: list[list[tuple[str, str]]] = []   # every load_history, in order
        self.loaded = False
        self.closed = False
        self._abort = threading.Event()
        self.running = threading.Event()

    def load(self) -> None:
        self.loaded = True

    def count_tokens(self, text: str) -> int:
        return max(1, len(text.split()))

    def run_turn(self, text: str, image: Optional[ImageEmbedding], keep_history: bool,
                 on_piece: Callable[[str], None], options=None) -> TurnStats:
        assert not self.running.is_set(), "entered by two turns at once"
        self.running.set()
        self._abort.clear()
        try:
            if not keep_history:
                self.used = self.system_tokens
            self.calls.append({"text": text, "image": image, "keep_history": keep_history,
                               "thread": threading.current_thread().name})
            if self.fail_next:
                msg, self.fail_next = self.fail_next, None
                raise BackendError(msg)
            answer = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
            prompt = self.count_tokens(text) + (image.n_tokens if image is not None else 0)
            words = answer.split(" ")
            if self.used + prompt + len(words) > self.ctx:
                raise ContextFullError(f"context full: {self.used} + {prompt} > {self.ctx}")
            self.used += prompt
            st = TurnStats(prompt_tokens=prompt)
            if self.think_s:
                self._abort.wait(self.think_s)
            for i, w in enumerate(words):
                if self._abort.is_set():
                    st.aborted = True
                    break
                if self.piece_delay:
                    time.sleep(self.piece_delay)
                on_piece(w if i == 0 else " " + w)
                st.generated_tokens += 1
                self.used += 1
            st.context_used = self.used
            return st
        finally:
            self.running.clear()

    def abort(self) -> None:
        self._abort.set()

    def clear(self) -> None:
        self.clears += 1
        self.used = self.system_tokens

    def load_history(self, exchanges) -> None:
        self.histories.append(list(exchanges))
        self.used = self.system_tokens + self.history_cost(exchanges)

    def turn_cost(self, text, image=None) -> int:
        # What run_turn charges: one token a word, the image's tokens, a short answer.
        return self.count_tokens(text) + (image.n_tokens if image is not None else 0) + 12

    def history_cost(self, exchanges) -> int:
        return sum(self.count_tokens(q) + self.count_tokens(a) for q, a in exchanges)

    @property
    def context_size(self) -> int:
        return self.ctx

    @property
    def tokens_used(self) -> int:
        return self.used

    def close(self) -> None:
        self.closed = True
