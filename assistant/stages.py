"""Where a spoken turn's time went, from the person's last word to the first sound of the
answer: four stages that add up to that wait, from the turn's timings (``Turn.summary``).
The web page draws them as a bar under each answer; ``bench/board_table.py --plot`` draws
the bench's medians the same way."""

from __future__ import annotations

from typing import Optional

# (key, what it is), in the order they happen.
STAGES = (("wait", "end-of-turn wait"), ("asr", "speech recognition left after the cut"),
          ("llm", "the model up to the first clause"), ("tts", "speech synthesis up to the first sound"))


def stages(timings: dict) -> Optional[dict]:
    """{"wait", "asr", "llm", "tts": ms, "total": ms} from a turn's timings_ms; None for a
    turn with no spoken question or no sound (a typed question, a failed turn)."""
    total = timings.get("last_word_to_first_audio_ms")
    audio = timings.get("first_audio_ms")
    clause = timings.get("first_sentence_ms")
    if total is None or audio is None or clause is None:
        return None
    asr = max(0.0, min(timings.get("asr_ms") or 0.0, clause))
    out = {"wait": max(0.0, total - audio), "asr": asr, "llm": max(0.0, clause - asr),
           "tts": max(0.0, audio - clause)}
    out = {k: round(v, 1) for k, v in out.items()}
    out["total"] = round(total, 1)
    return out
