"""`mllm serve`: the OpenAI-compatible HTTP app (app.py), the continuous-batching decode engine
(engine.py), the request / response schema (schema.py) and log-probabilities in the API's shape
(logprobs.py)."""

from __future__ import annotations

from mllm.serve.app import run_server

__all__ = ["run_server"]
