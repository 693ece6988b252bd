"""`ham-mlx serve`: an OpenAI-compatible HTTP server for a model folder."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

SERVE_HELP = """\
Serve a model over HTTP with OpenAI's API (FastAPI + uvicorn + mlx-lm's batch generator;
pip install "ham-mlx[serve]").

endpoints:
  GET  /v1/models             the served model (its id: the folder name, or --model-id)
  POST /v1/completions        prompt: text, token ids, or a list of them (one choice each)
  POST /v1/chat/completions   messages: system/developer, user, assistant
  GET  /health                {"status": "ok", "model", "waiting": queued, "running": in batch,
                              "prefix_cache": {"snapshots", "bytes", "hits", "reused_tokens"}}
  POST /tokenize, /detokenize, GET /tokenizer_info   the model's tokenizer (vLLM's shapes)

Supported fields: max_tokens (max_completion_tokens), temperature (default 1, as OpenAI's; 0 is
greedy), top_p, seed, stop, stream, stream_options {"include_usage": true}, and top_k, min_p,
repetition_penalty; completions: logprobs (0-20 alternatives per token), echo (the prompt
before the completion; with logprobs the prompt tokens' log-probabilities too, the first one
null, what evaluation harnesses score text with; max_tokens 0 scores only); chat: logprobs,
top_logprobs (0-20). Other fields are ignored.

With "stream": true the answer comes as server-sent events in OpenAI's chunk format, ending
with "data: [DONE]"; with stream_options {"include_usage": true} a last chunk before it has
"choices": [] and the usage.

HAM's memory controls are extra request fields (openai client: extra_body={...}):
  threshold       surprise threshold τ, one number or one per HAM layer (lower keeps more)
  kv_budget       target fraction of tokens kept per HAM layer, in (0, 1]
  max_kv_tokens   cap per HAM layer; kv_policy "evict" (default) or "reject" when full
"usage" reports, besides the token counts and prompt_tokens_details.cached_tokens (prompt
tokens reused from an earlier request), kv_fraction (admitted fraction per HAM layer),
kv_bytes and full_kv_bytes (a full cache's size).

Chat prompts use the chat_template of the folder's tokenizer_config.json when it has one,
otherwise the built-in template: one "System: ..." / "User: ..." / "Assistant: ..." line per
message, then "Assistant:"; the reply stops before a new "User:" line.

Continuous batching: one worker thread runs every request in one batch (mlx-lm's
BatchGenerator over HAM's batched caches); a request joins the batch as soon as it arrives, up
to --max-batch at once, and gives the tokens it would give alone. Requests whose max_kv_tokens
or kv_policy differ from the running batch's wait until it drains (HAM caches of different
capacities cannot share a batch); requests beyond --max-batch wait too, up to --max-queue.
A prompt is read in chunks of --prefill-step-size tokens between decoding steps; kv_budget and
max_kv_tokens with "evict" adapt between such calls, so with them an answer can differ from
`ham-mlx generate`'s (which reads the whole prompt in one call when it is shorter).

Prefix reuse: the caches' state after a prompt (and after each answer, and where prompts
diverge) is kept, up to --prefix-cache-mb, and a later prompt that begins with the same tokens
starts from it (requests with kv_budget, or max_kv_tokens with "evict", do not take part: their
output would depend on it). The output is the same with or without it.

Errors are OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}): a prompt longer
than --max-prompt-tokens, text that is not valid Unicode, more than 4 stop strings or one longer
than 1024 characters get a 400. A client that hangs up ends its request (streamed or not).
SIGTERM or Ctrl-C stop the server at once: running and queued requests end with a 503 error,
and the process exits 0.

examples:
  ham-mlx serve
  ham-mlx serve --model models/small --port 8000 --max-batch 16 --max-queue 64
  curl localhost:8080/v1/completions -H 'content-type: application/json' \\
    -d '{"prompt": "O Romeo", "max_tokens": 32, "kv_budget": 0.1}'
  lm_eval --model local-completions --tasks hellaswag \\
    --model_args base_url=http://127.0.0.1:8080/v1/completions,model=ham-mlx-default,num_concurrent=8
"""

log = logging.getLogger("ham_mlx.serve")
MAX_PROMPT_TOKENS = 32768


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

    if min(a.max_tokens_limit, a.default_max_tokens, a.max_batch, a.prefill_step_size,
           a.max_prompt_tokens) < 1:  # fmt: skip
        raise ValueError("--max-tokens-limit, --default-max-tokens, --max-batch, "
                         "--prefill-step-size, --max-prompt-tokens: >= 1")  # fmt: skip
    if a.max_queue < 0 or a.prefix_cache_mb < 0:
        raise ValueError("--max-queue, --prefix-cache-mb: >= 0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    model, tokenizer = load(a.model)
    folder = Path(a.model).resolve() if a.model else default_model_path()
    model_id = a.model_id or (folder.name if a.model else "ham-mlx-default")
    template = load_chat_template(folder)
    engine = Engine(
        model, tokenizer, a.max_queue, max_batch=a.max_batch,
        prefill_step_size=a.prefill_step_size, prefix_cache_bytes=int(a.prefix_cache_mb * 2**20),
    )  # fmt: skip
    app = create_app(
        engine, model_id, template,
        max_tokens_limit=a.max_tokens_limit, default_max_tokens=a.default_max_tokens,
        max_prompt_tokens=a.max_prompt_tokens,
    )  # fmt: skip
    log.info(
        "serving '%s' (%s); chat template: %s; batch: up to %d requests; prefix reuse: %g MiB",
        model_id, folder, template.source, a.max_batch, a.prefix_cache_mb,
    )  # fmt: skip
    started = run(app, engine, a.host, a.port)
    code = 0 if started else 1
    if engine.busy:  # inside one long model call: every request has been answered; don't wait
        log.info("stopped (the generation worker was still in a model call)")
        sys.stderr.flush()
        os._exit(code)
    log.info("stopped")
    return code


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
    s.add_argument("--max-batch", type=int, default=8,
                   help="requests generated at once in one batch (8)")  # fmt: skip
    s.add_argument("--max-queue", type=int, default=0,
                   help="requests that may wait for a place in the batch; more get 503 "
                   "(0: no limit)")  # fmt: skip
    s.add_argument("--max-prompt-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help="longest prompt, in tokens; longer ones get a 400 "
                   f"({MAX_PROMPT_TOKENS})")  # fmt: skip
    s.add_argument("--prefill-step-size", type=int, default=512,
                   help="prompt tokens read per model call (512)")  # fmt: skip
    s.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for cache snapshots reused by later prompts with the same "
                   "beginning, in MiB (256; 0: no reuse)")  # fmt: skip
    s.set_defaults(func=cmd_serve)
