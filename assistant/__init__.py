"""rkvlm-assistant: an offline voice-and-vision assistant for Rockchip RK3576 / RK3588 boards."""

import os as _os

__version__ = "0.1.0"

# onnxruntime's telemetry (piper, Smart Turn): off before any session exists, or it writes a
# device id under $XDG_CACHE_HOME/Microsoft (root-owned /var/cache/Microsoft after root's
# `check`; "Failed to persist telemetry device ID" in the service's log). 1.32 reads the first
# name, later releases the second; a person's own setting wins.
for _name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    _os.environ.setdefault(_name, "1")
del _name
