"""The NPU vision encoder against the RKNNLite test double (tests/fakes/rknnlite)."""

import sys
from pathlib import Path

import numpy as np
import pytest

from assistant.config import Config, LlmConfig, RkllmConfig, RknnEncoderConfig, VisionConfig
from assistant.errors import BackendError, ModelMissingError
from assistant.vision.rknn_encoder import RknnEncoder, probe_rknnlite

FAKES = Path(__file__).resolve().parent / "fakes"


@pytest.fixture
def rknnlite(monkeypatch):
    """The double's module, importable as ``rknnlite.api``."""
    monkeypatch.syspath_prepend(str(FAKES))
    import rknnlite.api as api
    return api


@pytest.fixture
def encoders():
    made = []
    yield made
    for enc in made:
        enc.close()


def make(encoders, rknnlite, tmp_path, family="qwen2-vl", outputs=None, input_size=None,
         core_mask="auto", pad_color=127.5, **switches):
    size = input_size or {"qwen3-vl": 448, "internvl3": 448, "minicpm-v": 448}.get(family, 392)
    outputs = outputs or [[1, 196, 1536]]
    model = rknnlite.write_model(tmp_path / "vision.rknn", (size, size), outputs, **switches)
    enc = RknnEncoder(RknnEncoderConfig(model=str(model), core_mask=core_mask,
                                        pad_color=pad_color), family)
    encoders.append(enc)
    return enc


def last_rknn(rknnlite):
    return rknnlite.RKNNLite.instances[-1]


@pytest.mark.parametrize("family, outputs, shape", [
    ("qwen2-vl", [[1, 196, 1536]], (196, 1536)),
    ("qwen2.5-vl", [[196, 2048]], (196, 2048)),
    ("minicpm-v", [[1, 64, 3584]], (64, 3584)),
    ("internvl3", [[1, 1, 256, 896]], (256, 896)),
])
def test_shape_is_read_from_the_model(encoders, rknnlite, tmp_path, family, outputs, shape):
    enc = make(encoders, rknnlite, tmp_path, family, outputs)
    enc.load()
    assert (enc.n_tokens, enc.dim) == shape
    emb = enc.encode(np.zeros((480, 640, 3), dtype=np.uint8))
    assert emb.data.shape == shape and emb.data.dtype == np.float32
    assert emb.data.flags["C_CONTIGUOUS"]
    assert (emb.width, emb.height) == (enc.family.input_size,) * 2


def test_several_outputs_are_joined_per_token(encoders, rknnlite, tmp_path):
    # Qwen3-VL: the embedding and three DeepStack layers, 2048 wide each (2B).
    enc = make(encoders, rknnlite, tmp_path, "qwen3-vl", [[1, 196, 2048]] * 4)
    enc.load()
    emb = enc.encode(np.full((448, 448, 3), 51, dtype=np.uint8))
    assert emb.data.shape == (196, 8192)
    outs = last_rknn(rknnlite).last_outputs
    for k in range(4):
        np.testing.assert_array_equal(emb.data[5, k * 2048:(k + 1) * 2048], outs[k][0, 5])


def test_the_encoder_gets_the_prepared_image(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path)
    enc.load()
    frame = np.full((300, 600, 3), 10, dtype=np.uint8)
    emb = enc.encode(frame)
    fed = last_rknn(rknnlite).last_input
    assert fed.shape == (1, 392, 392, 3) and fed.dtype == np.uint8
    assert (fed[0, 0, 0] == 128).all() and (fed[0, 196, 196] == 10).all()
    # The double's output starts at mean(image) / 255: the encoding follows the frame.
    assert emb.data[0, 0] == pytest.approx(fed.mean() / 255, abs=1e-6)


def test_pad_colour_comes_from_the_config(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path, pad_color=0.0)
    enc.load()
    enc.encode(np.full((100, 200, 3), 10, dtype=np.uint8))
    assert (last_rknn(rknnlite).last_input[0, 0, 0] == 0).all()


@pytest.mark.parametrize("mask, value", [
    ("auto", 0), ("0", 1), ("1", 2), ("2", 4), ("0_1", 3), ("0_1_2", 7)])
def test_core_mask(encoders, rknnlite, tmp_path, mask, value):
    enc = make(encoders, rknnlite, tmp_path, core_mask=mask)
    enc.load()
    rk = last_rknn(rknnlite)
    assert ("init_runtime", {"core_mask": value}) in rk.calls
    assert rk.calls[0] == ("load_rknn", {"path": str(tmp_path / "vision.rknn")})


def test_an_encoder_of_another_model_is_refused_at_load(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path, "qwen2-vl", [[1, 196, 2048]])
    with pytest.raises(BackendError) as e:
        enc.load()
    assert "2048" in str(e.value) and "vision.rknn" in str(e.value)
    assert last_rknn(rknnlite).released


def test_a_wrong_input_size_is_a_clear_error(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path, "qwen2-vl", input_size=448)
    with pytest.raises(BackendError, match="392x392"):
        enc.load()
    assert last_rknn(rknnlite).released


@pytest.mark.parametrize("switch, words", [
    ("fail_load", "could not load"),
    ("fail_init", "NPU cores"),
    ("fail_inference", "returned nothing"),
    ("raise_inference", "RKNN_ERR_FAIL"),
])
def test_runtime_failures(encoders, rknnlite, tmp_path, switch, words):
    enc = make(encoders, rknnlite, tmp_path, **{switch: True})
    with pytest.raises(BackendError, match=words):
        enc.load()
    assert last_rknn(rknnlite).released
    with pytest.raises(BackendError, match="not loaded"):
        enc.encode(np.zeros((4, 4, 3), dtype=np.uint8))


def test_missing_model(encoders, rknnlite, tmp_path):
    enc = RknnEncoder(RknnEncoderConfig(model=str(tmp_path / "nope.rknn")), "qwen2-vl")
    with pytest.raises(ModelMissingError, match="vision.rknn.model"):
        enc.load()
    with pytest.raises(ModelMissingError, match="not set"):
        RknnEncoder(RknnEncoderConfig(), "qwen2-vl").load()


def test_without_rknnlite_one_message_says_where_it_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rknnlite", None)
    monkeypatch.setitem(sys.modules, "rknnlite.api", None)
    enc = RknnEncoder(RknnEncoderConfig(model=str(tmp_path / "v.rknn")), "qwen2-vl")
    with pytest.raises(BackendError) as e:
        enc.load()
    msg = str(e.value)
    assert "aarch64" in msg and "vision.encoder: llamacpp" in msg and "llm.backend: llamacpp" in msg


def test_probe_for_check(rknnlite, monkeypatch):
    assert probe_rknnlite() == "rknnlite importable"  # the double has no package metadata
    monkeypatch.setitem(sys.modules, "rknnlite.api", None)
    with pytest.raises(BackendError, match="aarch64"):
        probe_rknnlite()


def test_bad_frame_is_a_backend_error(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path)
    enc.load()
    with pytest.raises(BackendError, match="camera frame"):
        enc.encode(np.zeros((10, 10), dtype=np.uint8))


def test_close_releases_once(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path)
    enc.load()
    rk = last_rknn(rknnlite)
    enc.close()
    enc.close()
    assert [c for c in rk.calls if c[0] == "release"] == [("release", {})]


def test_load_is_idempotent(encoders, rknnlite, tmp_path):
    enc = make(encoders, rknnlite, tmp_path)
    before = len(rknnlite.RKNNLite.instances)
    enc.load()
    enc.load()
    assert len(rknnlite.RKNNLite.instances) == before + 1


def test_from_config_uses_the_llm_family_and_config_relative_paths(rknnlite, tmp_path,
                                                                   encoders):
    rknnlite.write_model(tmp_path / "enc.rknn", (392, 392), [[1, 196, 2048]])
    cfg = Config(vision=VisionConfig(encoder="rknn", rknn=RknnEncoderConfig(model="enc.rknn")),
                 llm=LlmConfig(rkllm=RkllmConfig(family="qwen2.5-vl")),
                 source=str(tmp_path / "config.yaml"))
    enc = RknnEncoder.from_config(cfg)
    encoders.append(enc)
    enc.load()
    assert enc.family.name == "qwen2.5-vl" and enc.dim == 2048
