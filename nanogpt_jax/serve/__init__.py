"""nanogpt-serve: OpenAI's completions API over the engine, with continuous batching.

`protocol.py` (the API's objects), `scheduler.py` (slots, the decode thread), `app.py` (the
HTTP routes), `metrics.py` (Prometheus); `nanogpt_jax/commands/serve.py` starts it.
"""
