"""`ham-mlx serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn).

cli (the subcommand) → app (routes, OpenAI objects) → engine (the one thread that runs the model);
schemas (request bodies), chat (chat templates), stop (stop strings), errors (OpenAI error
bodies), request_log (one line per request).
"""
