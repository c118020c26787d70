"""rkvlm-assistant: an offline voice-and-vision assistant for Rockchip RK3576 / RK3588 boards."""

__version__ = "0.1.0"
