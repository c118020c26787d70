"""Image preprocessing: pad to a square, resize, uint8 NHWC with a batch axis."""

import numpy as np
import pytest

from assistant.vision.preprocess import pad_to_square, pad_value, prepare, resize


def _img(h, w, rgb=(200, 10, 30)):
    return np.tile(np.array(rgb, dtype=np.uint8), (h, w, 1))


def test_pad_value_rounds_like_opencv():
    assert pad_value(127.5) == 128
    assert pad_value(0.0) == 0
    assert pad_value(255.0) == 255
    assert pad_value(300.0) == 255


def test_wide_image_is_centred_between_grey_bands():
    out = pad_to_square(_img(4, 10))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[:3] == 128).all() and (out[7:] == 128).all()
    assert (out[3:7] == (200, 10, 30)).all()


def test_tall_image_is_centred_between_side_bands_of_the_given_colour():
    out = pad_to_square(_img(9, 5), color=0)
    assert out.shape == (9, 9, 3)
    assert (out[:, :2] == 0).all() and (out[:, 7:] == 0).all()
    assert (out[:, 2:7] == (200, 10, 30)).all()


def test_square_image_is_not_padded():
    img = _img(6, 6)
    assert pad_to_square(img) is img


def test_resize_to_width_and_height():
    out = resize(_img(10, 10), 7, 5)
    assert out.shape == (5, 7, 3)
    assert (out == (200, 10, 30)).all()


def test_prepare_gives_a_contiguous_batch_of_one():
    out = prepare(_img(480, 640), 392, 392)
    assert out.shape == (1, 392, 392, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]
    assert (out[0, 0, 0] == 128).all()          # the pad band above the picture
    assert (out[0, 196, 196] == (200, 10, 30)).all()


def test_prepare_keeps_rgb_order():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[..., 0] = 255  # red
    out = prepare(img, 4, 4)
    assert (out[0, ..., 0] == 255).all() and (out[0, ..., 1:] == 0).all()


@pytest.mark.parametrize("bad", [
    np.zeros((4, 4), dtype=np.uint8),
    np.zeros((4, 4, 4), dtype=np.uint8),
    np.zeros((4, 4, 3), dtype=np.float32),
    np.zeros((0, 4, 3), dtype=np.uint8),
    "not an image",
])
def test_bad_images_are_refused_with_what_was_expected(bad):
    with pytest.raises(ValueError, match=r"uint8 array of shape \(H, W, 3\)"):
        prepare(bad, 4, 4)
