"""mllm: from raw public text to a trained decoder-only GPT, in one CLI."""

__version__ = "0.1.0"
