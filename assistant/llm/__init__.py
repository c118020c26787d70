"""LLM backends: ``llamacpp`` (portable, CPU) and ``rkllm`` (the Rockchip NPU)."""
