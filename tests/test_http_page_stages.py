"""The page's bar of where a spoken turn's wait went (assistant/stages.py), in a real browser:
the turn's timings reach the page through the live events when the turn is recorded."""

from __future__ import annotations

import asyncio

import pytest

from assistant.conversation import Request
from assistant.stages import stages
from assistant.turn import Turn
from test_http_page import CHROMIUM, DRIVER, VOICE_Q, browser, site, wait_until  # noqa: F401

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver")


def test_stages_add_up_to_the_wait():
    t = {"last_word_to_first_audio_ms": 1910.0, "first_audio_ms": 1217.0,
         "first_sentence_ms": 639.0, "asr_ms": 41.0}
    st = stages(t)
    assert st == {"wait": 693.0, "asr": 41.0, "llm": 598.0, "tts": 578.0, "total": 1910.0}
    assert sum(st[k] for k in ("wait", "asr", "llm", "tts")) == pytest.approx(st["total"])
    assert stages({"first_audio_ms": 10.0}) is None       # no spoken question: no bar


async def spoken_turn(conv):
    """A voice turn as the voice loop makes it: the last word 0.7 s before the cut, whisper
    done 50 ms after it, then the answer; its first sound 0.3 s after the first clause."""
    turn = Turn()
    turn.last_word = turn.speech_end - 0.7
    turn.took("asr", 0.05)
    async for _ in conv.ask(Request(VOICE_Q), turn):
        pass
    turn.mark("first_sentence")
    await asyncio.sleep(0.3)
    turn.mark("first_audio")
    turn.intent = "question"
    conv.record(turn)
    return turn


def test_each_spoken_answer_shows_its_bar(site, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(site.server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "state").text == "listening", what="listening")
    turn = site.loop.run(spoken_turn(site.conv))
    segs = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "article.turn .stages .seg"),
                      what="the bar")
    assert [s.get_attribute("class").split()[-1] for s in segs] == ["wait", "asr", "llm", "tts"]
    st = stages(turn.summary())
    widths = {s.get_attribute("class").split()[-1]: s.size["width"] for s in segs}
    # Drawn in proportion: the 0.7 s wait is wider than whisper's 50 ms, the TTS's 0.3 s too.
    assert widths["wait"] > widths["tts"] > widths["asr"]
    label = browser.find_element(By.CSS_SELECTOR, "article.turn .stages .total").text
    assert label == f"{st['total'] / 1000:.2f} s to the first sound"
    # A reload keeps it (the recent turns carry their stages).
    browser.refresh()
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "article.turn .stages .seg.tts"),
               what="the bar after a reload")
