"""`ham-mlx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

cli (the subcommand) → app (routes, OpenAI objects) → engine (the one thread that runs the model:
one batch through mlx-lm's BatchGenerator, prompt scoring, prefix reuse); prefix (cache snapshots
reused by later prompts), sampling (per-request samplers), tokens (token text and bytes, the
/tokenize rules), schemas (request bodies), chat (chat templates), stop (stop strings), errors
(OpenAI error bodies), request_log (one line per request).
"""
