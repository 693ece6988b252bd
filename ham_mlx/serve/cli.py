"""`ham-mlx serve`: an OpenAI-compatible HTTP server for a model folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SERVE_HELP = """\
Serve a model over HTTP with OpenAI's API (FastAPI + uvicorn; pip install "ham-mlx[serve]").

endpoints:
  GET  /v1/models             the served model (its id: the folder name, or --model-id)
  POST /v1/completions        prompt: text or token ids
  POST /v1/chat/completions   messages: system/developer, user, assistant
  GET  /health                {"status": "ok", "model": ..., "waiting": queued requests}

With "stream": true the answer comes as server-sent events in OpenAI's chunk format, ending
with "data: [DONE]". Supported fields: max_tokens (max_completion_tokens), temperature (default
1, as OpenAI's; 0 is greedy), top_p, seed, stop, stream, and top_k, min_p, repetition_penalty;
other fields are ignored.

HAM's memory controls are extra request fields (openai client: extra_body={...}):
  threshold       surprise threshold τ, one number or one per HAM layer (lower keeps more)
  kv_budget       target fraction of tokens kept per HAM layer, in (0, 1]
  max_kv_tokens   cap per HAM layer; kv_policy "evict" (default) or "reject" when full
"usage" reports, besides the token counts, kv_fraction (admitted fraction per HAM layer),
kv_bytes and full_kv_bytes (a full cache's size); a stream sends it in its last chunk.

Chat prompts use the chat_template of the folder's tokenizer_config.json when it has one,
otherwise the built-in template: one "System: ..." / "User: ..." / "Assistant: ..." line per
message, then "Assistant:"; the reply stops before a new "User:" line.

One worker thread runs all generations, one at a time, first come first served. Errors are
OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}). SIGTERM or Ctrl-C stop
the server at once: running and queued requests end with a 503 error, and the process exits 0.

examples:
  ham-mlx serve
  ham-mlx serve --model models/small --port 8000 --max-queue 16
  curl localhost:8080/v1/completions -H 'content-type: application/json' \\
    -d '{"prompt": "O Romeo", "max_tokens": 32, "kv_budget": 0.1}'
"""

log = logging.getLogger("ham_mlx.serve")


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from ham_mlx.serve.app import create_app
        from ham_mlx.serve.server import run
    except ModuleNotFoundError as e:
        print(f"ham-mlx serve: error: {e.name} is not installed; pip install 'ham-mlx[serve]'",
              file=sys.stderr)  # fmt: skip
        return 2
    from ham_mlx.model_io import default_model_path, load
    from ham_mlx.serve.chat import load_chat_template
    from ham_mlx.serve.engine import Engine

    if a.max_tokens_limit < 1 or a.default_max_tokens < 1 or a.max_queue < 0:
        raise ValueError("--max-tokens-limit, --default-max-tokens: >= 1; --max-queue: >= 0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    model, tokenizer = load(a.model)
    folder = Path(a.model).resolve() if a.model else default_model_path()
    model_id = a.model_id or (folder.name if a.model else "ham-mlx-default")
    template = load_chat_template(folder)
    engine = Engine(model, tokenizer, a.max_queue)
    app = create_app(
        engine, model_id, template,
        max_tokens_limit=a.max_tokens_limit, default_max_tokens=a.default_max_tokens,
    )  # fmt: skip
    log.info("serving '%s' (%s); chat template: %s", model_id, folder, template.source)
    started = run(app, engine, a.host, a.port)
    log.info("stopped")
    return 0 if started else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `serve` subcommand on the CLI's subparsers."""
    s = sub.add_parser(
        "serve", help="serve a model with an OpenAI-compatible HTTP API (completions, chat)",
        description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    s.add_argument("--model", default=None,
                   help="model folder; default: the bundled small model")  # fmt: skip
    s.add_argument("--model-id", default=None,
                   help="the model's name in the API (default: the folder's name, or "
                   "'ham-mlx-default')")  # fmt: skip
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (127.0.0.1: this machine only; 0.0.0.0: all)")  # fmt: skip
    s.add_argument("--port", type=int, default=8080, help="TCP port (8080)")
    s.add_argument("--max-tokens-limit", type=int, default=4096,
                   help="largest max_tokens a request may ask for (4096)")  # fmt: skip
    s.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of requests that give none (256)")  # fmt: skip
    s.add_argument("--max-queue", type=int, default=0,
                   help="requests that may wait behind the running one; more get 503 "
                   "(0: no limit)")  # fmt: skip
    s.set_defaults(func=cmd_serve)
