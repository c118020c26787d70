"""Test double of ``rknnlite.api.RKNNLite`` (rknn-toolkit-lite2), for machines without an NPU.

Same methods and return conventions as the real class: ``load_rknn`` and ``init_runtime``
return 0 or -1, ``inference`` returns a list of float32 arrays or None when it fails, and
``release`` returns None. The ``.rknn`` "model" is a JSON file written by :func:`write_model`:
the input shape the model accepts, the shapes of its outputs, and failure switches. Every
call is recorded in ``calls``; every instance in ``RKNNLite.instances``.

Outputs are deterministic and depend on the image, so a test can follow the data:
output k at flat index i is ``mean(image) / 255 + k + i * 1e-4``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np


def write_model(path: Path, input_size: tuple[int, int], outputs: list[list[int]],
                **switches: bool) -> Path:
    """Write a fake .rknn: input (height, width), output shapes, and failure switches
    (fail_load, fail_init, fail_inference, raise_inference)."""
    spec = {"input": [1, input_size[0], input_size[1], 3], "outputs": outputs, **switches}
    path = Path(path)
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


class RKNNLite:
    NPU_CORE_AUTO = 0
    NPU_CORE_0 = 1
    NPU_CORE_1 = 2
    NPU_CORE_2 = 4
    NPU_CORE_0_1 = 3
    NPU_CORE_0_1_2 = 7
    NPU_CORE_ALL = 0xFFFF

    instances: list["RKNNLite"] = []

    def __init__(self, verbose: bool = False, verbose_file: Optional[str] = None):
        self.verbose = verbose
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.spec: Optional[dict] = None
        self.core_mask: Optional[int] = None
        self.released = False
        self.last_input: Optional[np.ndarray] = None
        self.last_outputs: Optional[list[np.ndarray]] = None
        RKNNLite.instances.append(self)

    def load_rknn(self, path: str) -> int:
        self.calls.append(("load_rknn", {"path": path}))
        try:
            spec = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            print(f"E load_rknn: cannot read {path}")
            return -1
        if spec.get("fail_load"):
            return -1
        self.spec = spec
        return 0

    def init_runtime(self, target=None, device_id=None, async_mode=False,
                     core_mask: int = NPU_CORE_AUTO) -> int:
        self.calls.append(("init_runtime", {"core_mask": core_mask}))
        if self.spec is None or self.spec.get("fail_init"):
            return -1
        valid = {self.NPU_CORE_AUTO, self.NPU_CORE_0, self.NPU_CORE_1, self.NPU_CORE_2,
                 self.NPU_CORE_0_1, self.NPU_CORE_0_1_2, self.NPU_CORE_ALL}
        if core_mask not in valid:
            return -1
        self.core_mask = core_mask
        return 0

    def inference(self, inputs=None, data_type=None, data_format=None, inputs_pass_through=None,
                  get_frame_id=False):
        self.calls.append(("inference", {"n_inputs": len(inputs or []),
                                         "data_format": data_format}))
        if self.spec is None or self.core_mask is None or self.released:
            return None
        if self.spec.get("raise_inference"):
            raise RuntimeError("RKNN inference failed: error code RKNN_ERR_FAIL")
        if self.spec.get("fail_inference") or not inputs or len(inputs) != 1:
            return None
        img = inputs[0]
        want = tuple(self.spec["input"])
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != want:
            got = getattr(img, "shape", None), getattr(img, "dtype", None)
            print(f"E inference: input {got} does not match the model's {want} uint8 NHWC")
            return None
        self.last_input = img.copy()
        base = float(img.mean()) / 255.0
        outs = []
        for k, shape in enumerate(self.spec["outputs"]):
            n = int(np.prod(shape))
            out = (np.arange(n, dtype=np.float64) * 1e-4 + base + k).astype(np.float32)
            outs.append(out.reshape(shape))
        self.last_outputs = outs
        return outs

    def get_sdk_version(self) -> str:
        return "RKNN VERSION:\n  API: fake\n  DRV: fake"

    def release(self) -> None:
        self.calls.append(("release", {}))
        self.released = True
