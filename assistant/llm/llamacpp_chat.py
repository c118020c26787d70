"""The model's own chat template (Jinja, from the GGUF), rendered the way the backend needs it.

The backend keeps the conversation in the KV cache and evaluates only what a new turn adds:
the rendering of (history + new user message) minus the text already in the cache. That
works for any template where a longer conversation renders as an extension of a shorter
one (ChatML, SmolVLM, InternVL, Qwen-VL); when it does not, the backend notices and
re-evaluates the conversation instead.

Images are written into the text as mtmd's media marker; the backend splits on it. Message
text is rendered between provenance marks (``llamacpp_text``) so that it is tokenised as
text, whatever it spells.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from assistant.llm.llamacpp_text import Span, split_spans, spans, strip_marks, wrap

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MEDIA_MARKER = "<__media__>"  # mtmd's default marker; the backend checks the library agrees
_SYS_PROBE = "SYSTEMPROBE7Q"
_USER_PROBE = "USERPROBE7Q"


class TemplateProblem(Exception):
    """The template cannot render our messages."""


@dataclass
class TurnText:
    """A turn as text: the new message list, the full prompt, and what the cache lacks."""

    messages: list[dict]
    prompt: str
    texts: list[list[Span]]  # what to evaluate, split where images go (len = images + 1)
    replay: bool         # the prompt does not extend the cache: evaluate from the system prompt


def clean(text: str) -> str:
    """User text with the media marker removed, so it cannot pose as an image."""
    return strip_marks((text or "").replace(MEDIA_MARKER, "")).strip()


def _mark(message: dict) -> dict:
    """The message with its text between provenance marks (the persona is trusted)."""
    def marked(text: str) -> str:
        if message["role"] == "system":
            return strip_marks(text)
        head = MEDIA_MARKER + "\n"
        if message["role"] == "user" and text.startswith(head):
            return head + wrap(text[len(head):])    # the backend's own image marker
        return wrap(text)

    content = message["content"]
    if isinstance(content, str):
        content = marked(content)
    else:
        content = [dict(p, text=marked(p["text"])) if p.get("type") == "text" else p
                   for p in content]
    return dict(message, content=content)


class ChatFormat:
    """Renders messages with the model's template, or ChatML when it has none that works."""

    def __init__(self, template: Optional[str], bos_text: str, eos_text: str):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda v, indent=None, **_: json.dumps(v, ensure_ascii=False,
                                                                       indent=indent)
        self._env = env
        self._extra = {"bos_token": bos_text, "eos_token": eos_text}
        self.source = "model"
        self.parts_content = False
        self._tmpl: Any = None
        if template:
            try:
                self._tmpl = env.from_string(template)
                self.parts_content = self._probe()
            except (jinja2.TemplateError, TemplateProblem, TypeError, KeyError, IndexError) as e:
                log.warning("the model's chat template cannot be used (%s); using ChatML", e)
                self._tmpl = None
        if self._tmpl is None:
            self._tmpl = env.from_string(CHATML)
            self.source = "chatml"
            self.parts_content = False

    def _probe(self) -> bool:
        """Whether message content must be a list of parts (True) or a string (False)."""
        for parts in (False, True):
            msgs = [self._msg("system", _SYS_PROBE, parts), self._msg("user", _USER_PROBE, parts)]
            try:
                out = self._render(msgs, True)
            except Exception:
                continue
            if _SYS_PROBE in out and _USER_PROBE in out:
                return parts
        raise TemplateProblem("neither string nor list-of-parts content renders")

    @staticmethod
    def _msg(role: str, text: str, parts: bool) -> dict:
        return {"role": role, "content": [{"type": "text", "text": text}] if parts else text}

    def message(self, role: str, text: str) -> dict:
        """A message in the shape this template accepts."""
        return self._msg(role, text, self.parts_content)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self._tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 **self._extra)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The prompt text; BackendError-free: template errors become TemplateProblem."""
        return strip_marks(self.render_marked(messages, add_generation_prompt))

    def render_marked(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The prompt with every message's text between provenance marks."""
        try:
            return self._render([_mark(m) for m in messages], add_generation_prompt)
        except Exception as e:
            raise TemplateProblem(str(e)) from None

    def system_prefix(self, system: Optional[dict]) -> str:
        """Text of the system prompt alone, if every conversation starts with it; else ''."""
        if system is None:
            return ""
        try:
            alone = self.render([system], False)
            with_user = self.render([system, self.message("user", _USER_PROBE)], True)
        except TemplateProblem:
            return ""
        if with_user.startswith(alone):
            return alone
        log.info("the chat template does not render the system prompt on its own; it is "
                 "evaluated with the first question instead")
        return ""

    def plan(self, history: list[dict], user_text: str, with_image: bool, cached: str,
             system_text: str) -> TurnText:
        """Render history + the user's message; ``cached`` is the text already evaluated."""
        content = clean(user_text)
        if with_image:
            content = MEDIA_MARKER + "\n" + content
        msgs = history + [self.message("user", content)]
        marked = self.render_marked(msgs, add_generation_prompt=True)
        prompt = strip_marks(marked)
        replay = not prompt.startswith(cached)
        base = system_text if replay else cached
        if not prompt.startswith(base):
            raise TemplateProblem("the rendered conversation does not start with the system prompt")
        return TurnText(msgs, prompt, split_spans(spans(marked, len(base)), MEDIA_MARKER), replay)

    def answer_message(self, turn: TurnText, answer: str) -> dict:
        """The answer as a history message that renders as what the cache holds.

        Templates write e.g. "Assistant: " + content while the model generated " The..."
        after "Assistant:"; storing the stripped text keeps the next turn an extension.
        """
        cached = turn.prompt + answer
        for content in dict.fromkeys((answer, answer.lstrip(), answer.strip())):
            msg = self.message("assistant", content)
            try:
                if self.render(turn.messages + [msg], False).startswith(cached):
                    return msg
            except TemplateProblem:
                break
        return self.message("assistant", answer.strip())
