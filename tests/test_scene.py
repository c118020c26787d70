"""Scene memory on its own: change detection, jobs tied to their speech, idle watching."""

from __future__ import annotations

import asyncio

import numpy as np

from assistant.config import VisionConfig
from assistant.vision.base import Camera
from assistant.vision.scene import Scene, difference, thumbnail
from doubles import CountingEncoder


class SwitchCamera(Camera):
    """Shows whatever picture the test sets; counts snapshots."""

    name = "switch"

    def __init__(self):
        self.picture = scene_picture(0)
        self.shots = 0

    def open(self):
        pass

    def snapshot(self):
        self.shots += 1
        noise = np.random.default_rng(self.shots).integers(-3, 4, self.picture.shape)
        return np.clip(self.picture.astype(int) + noise, 0, 255).astype(np.uint8)


def scene_picture(k: int) -> np.ndarray:
    img = np.full((48, 64, 3), 40 + 60 * k, np.uint8)
    img[10:30, 8 + 10 * k:28 + 10 * k] = 250
    return img


def test_thumbnails_tell_a_new_scene_from_noise():
    a, b = scene_picture(0), scene_picture(1)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-4, 5, a.shape), 0, 255)
    assert difference(thumbnail(a), thumbnail(noisy.astype(np.uint8))) < 0.02
    assert difference(thumbnail(a), thumbnail(b)) > 0.1


def test_an_unchanged_scene_is_not_encoded_and_a_new_one_is():
    cam, enc = SwitchCamera(), CountingEncoder()
    scene = Scene(cam, enc, VisionConfig())

    async def go():
        first = await scene.take(None)                 # nothing in the context yet
        same = await scene.take(first.shot)
        cam.picture = scene_picture(2)
        new = await scene.take(first.shot)
        return first, same, new

    first, same, new = asyncio.run(go())
    scene.close()
    assert first.changed and first.embedding is not None
    assert not same.changed and same.embedding is None
    assert new.changed and new.embedding is not None
    assert enc.calls == 2 and "MainThread" not in enc.threads


def test_a_job_belongs_to_its_speech():
    """A job discarded with its speech never answers a later question."""
    cam, enc = SwitchCamera(), CountingEncoder()
    scene = Scene(cam, enc, VisionConfig())

    async def go():
        old = scene.start(None)                        # speech that turns out to be a cough
        scene.discard(old)
        cam.picture = scene_picture(3)
        job = scene.start(None)                        # the question's own speech
        return await scene.take(None, job)

    res = asyncio.run(go())
    scene.close()
    assert res.embedding is not None
    assert abs(float(res.embedding.data.mean()) - scene_picture(3).mean()) < 3


def test_idle_watching_encodes_a_settled_change_once_and_yields_to_a_turn():
    cam, enc = SwitchCamera(), CountingEncoder()
    scene = Scene(cam, enc, VisionConfig(watch_interval_s=0.02))
    state = {"idle": True}

    async def go():
        held = (await scene.take(None)).shot          # the conversation's image
        watch = asyncio.create_task(scene.watch(lambda: state["idle"], lambda: held))
        await asyncio.sleep(0.3)                       # the same scene: nothing to do
        calls_same = enc.calls
        cam.picture = scene_picture(1)                 # the scene changes and stays
        await asyncio.sleep(0.4)
        calls_changed = enc.calls
        state["idle"] = False                          # a person speaks: hands off
        shots = cam.shots
        await asyncio.sleep(0.2)
        shots_busy = cam.shots - shots
        # The question about the changed scene finds it encoded.
        res = await scene.take(held)
        watch.cancel()
        return calls_same, calls_changed, shots_busy, res

    calls_same, calls_changed, shots_busy, res = asyncio.run(go())
    scene.close()
    assert calls_same == 1                             # only the first take encoded
    assert calls_changed == 2                          # one encode for the settled change
    assert scene.idle_encodes == 1
    assert shots_busy == 0
    assert res.changed and res.reused and res.encode_s == 0 and enc.calls == 2


def test_a_lost_camera_is_found_again_while_idle_and_status_says_so():
    from assistant.daemon import DeviceStatus
    from assistant.errors import DeviceError

    class Flaky(SwitchCamera):
        gone = False
        opens = 0

        def open(self):
            self.opens += 1
            if self.gone:
                raise DeviceError("camera /dev/video0 not found: is it plugged in?")

        def snapshot(self):
            if self.gone:
                raise DeviceError("camera /dev/video0 stopped answering")
            return super().snapshot()

    cam = Flaky()
    scene = Scene(cam, CountingEncoder(), VisionConfig(watch_interval_s=0.02))
    sent: list[str] = []
    status = DeviceStatus(scene, sent.append, "camera")

    async def go():
        watch = asyncio.create_task(scene.watch(lambda: True, lambda: None))
        await asyncio.sleep(0.1)
        cam.gone = True                                # unplugged
        await asyncio.sleep(0.3)
        status.poll()
        down = scene.state
        cam.gone = False                               # plugged back
        await asyncio.sleep(1.5)                       # the next retry, after its back-off
        status.poll()
        watch.cancel()
        return down

    down = asyncio.run(go())
    scene.close()
    assert down == "down" and scene.state == "ready"
    assert sent[0].startswith("STATUS=camera unavailable:") and sent[-1] == "STATUS=listening"
    assert cam.opens >= 1                              # reopened, not retried every look
