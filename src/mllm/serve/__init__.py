"""`mllm serve`: the OpenAI-compatible HTTP app (app.py), the continuous-batching decode engine
(engine.py) and the request / response schema (schema.py)."""

from __future__ import annotations

from mllm.serve.app import run_server

__all__ = ["run_server"]
