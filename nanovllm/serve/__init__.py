"""The OpenAI-compatible HTTP server over the engine (``python -m nanovllm serve``)."""
