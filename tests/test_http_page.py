"""The web page in a real browser: Debian's chromium and chromium-driver through selenium.

The server runs in-process (its own loop thread) over a scripted model that answers word by
word, a file camera and an encoder double. The test loads the page, sees a voice turn
appear live, types a question and sees the answer stream in, checks the camera snapshot
and the phone layout, and saves the screenshot the README shows (docs/page.png).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.config import CameraConfig, Config, HttpConfig
from assistant.conversation import Conversation, Request
from assistant.demo import draw_scene
from assistant.http.server import HttpServer, make_gate
from assistant.turn import Turn
from assistant.vision.camera import make_camera
from assistant.vision.scene import Scene
from scripted_llm import ScriptedLLM
from test_http_support import FakeEncoder, LoopThread

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (make system-deps as root, or "
           "apt-get install chromium chromium-driver)")

VOICE_Q = "What do you see on the table?"
VOICE_A = "I see a red apple on a wooden table, next to a blue cup."
TYPED_Q = "What colour is the cup?"
TYPED_A = "The cup is blue, and it stands to the right of the apple."


@pytest.fixture
def site(tmp_path):
    draw_scene(tmp_path / "scene.jpg")
    cfg = dataclasses.replace(Config(), http=HttpConfig(listen="127.0.0.1:0"),
                              camera=CameraConfig(source=str(tmp_path / "scene.jpg")))
    llm = ScriptedLLM([VOICE_A, TYPED_A], piece_delay=0.12)
    cam = make_camera(cfg.camera)
    cam.open()
    loop = LoopThread()

    async def build():
        conv = Conversation(cfg, llm, scene=Scene(cam, FakeEncoder(), cfg.vision),
                            gate=make_gate(cfg))
        server = HttpServer(cfg, conv, SimpleNamespace(asr=None, voices=None), has_mic=True)
        await server.start()
        return conv, server
    conv, server = loop.run(build())
    yield SimpleNamespace(conv=conv, server=server, loop=loop, llm=llm)
    loop.run(server.stop())
    loop.close()
    cam.close()


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1100,720",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    except Exception as e:   # a broken install: say why
        pytest.skip(f"chromium could not be started: {e}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_until(fn, timeout=20.0, what="the condition"):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:   # the element is not there yet
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def voice_turn(conv, question):
    turn = Turn()
    async for _ in conv.ask(Request(question), turn):
        pass
    conv.record(turn)


def answer_of(driver, source):
    return driver.execute_script(
        "const t = document.querySelector(`article.turn[data-source='${arguments[0]}']`);"
        "return t ? [t.querySelector('.a').textContent, t.classList.contains('done')] : null;",
        source)


def test_the_page_shows_voice_and_typed_turns_live(site, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(site.server.url + "/")
    wait_until(lambda: browser.find_element(By.ID, "state").text == "listening", what="listening")

    # A voice turn (the conversation's voice front-end) appears as it happens.
    site.loop.submit(voice_turn(site.conv, VOICE_Q))
    seen = []
    wait_until(lambda: seen.append(answer_of(browser, "voice")) or (seen[-1] and seen[-1][1]),
               what="the voice answer")
    assert seen[-1][0] == VOICE_A
    partial = [s[0] for s in seen if s and s[0] and not s[1]]
    assert any(0 < len(p) < len(VOICE_A) and VOICE_A.startswith(p) for p in partial), seen
    q = browser.find_element(By.CSS_SELECTOR, "article[data-source='voice'] .qt").text
    assert q == VOICE_Q
    # The camera's snapshot of that turn is shown.
    wait_until(lambda: browser.execute_script(
        "const i = document.getElementById('camera'); return i.complete && i.naturalWidth > 0"),
        what="the camera snapshot")

    # Type a question: the answer streams in.
    box = browser.find_element(By.ID, "question")
    box.send_keys(TYPED_Q)
    browser.find_element(By.ID, "send").click()
    seen = []
    wait_until(lambda: seen.append(answer_of(browser, "http")) or (seen[-1] and seen[-1][1]),
               what="the typed answer")
    assert seen[-1][0] == TYPED_A
    partial = [s[0] for s in seen if s and s[0] and not s[1]]
    assert any(0 < len(p) < len(TYPED_A) and TYPED_A.startswith(p) for p in partial), seen
    assert browser.find_element(By.CSS_SELECTOR, "article[data-source='http'] .qt").text == TYPED_Q
    assert browser.find_element(By.ID, "error").is_displayed() is False
    # Each answer can be played.
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.done button.play")) == 2
    wait_until(lambda: browser.find_element(By.ID, "state").text == "listening", what="idle")

    # The screenshot for the README (docs/page.png) when asked for; the suite leaves the
    # checkout alone otherwise.
    shot = (REPO / "docs" / "page.png" if os.environ.get("RKVLM_SAVE_SCREENSHOT")
            else tmp_path / "page.png")
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # A reload shows the conversation so far.
    browser.refresh()
    wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "article.turn.done")) == 2,
               what="the turns after a reload")

    # On a phone: nothing wider than the screen, the box still there.
    browser.set_window_size(390, 844)
    time.sleep(0.3)
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    assert browser.find_element(By.ID, "question").is_displayed()
