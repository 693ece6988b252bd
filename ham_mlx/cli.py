"""The `ham-mlx` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def thresholds(text: str) -> float | list[float]:
    """'0.4' -> 0.4; '0.3,0.5' -> [0.3, 0.5] (one per HAM layer)."""
    values = [float(x) for x in text.split(",")]
    return values[0] if len(values) == 1 else values


def cmd_generate(a: argparse.Namespace) -> int:
    from ham_mlx.generate import stream_generate
    from ham_mlx.model_io import load

    model, tokenizer = load(a.model)
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    last = None
    for last in stream_generate(
        model, tokenizer, prompt,
        max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
        min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
        threshold=a.threshold, kv_budget=a.kv_budget, max_kv_tokens=a.max_kv_tokens,
        kv_policy=a.kv_policy, prefill_step_size=a.prefill_step_size,
    ):  # fmt: skip
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print("-" * 20, file=sys.stderr)
        print(last.summary(), file=sys.stderr)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from mlx.utils import tree_flatten

    from ham_mlx.model_io import load_model

    model = load_model(a.model)
    params = dict(tree_flatten(model.parameters()))
    n_params = sum(v.size for v in params.values())
    n_bytes = sum(v.nbytes for v in params.values())
    args = model.args
    if a.json:
        info = {"config": args.to_dict(), "parameters": n_params, "bytes": n_bytes,
                "thresholds": model.thresholds()}  # fmt: skip
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {a.model}")
    print(f"parameters   {n_params:,} ({n_bytes / 1e6:.1f} MB)")
    print(f"layers       {args.num_hidden_layers}: {' '.join(args.layer_types)}")
    print(f"width        hidden {args.hidden_size}, heads {args.num_heads} q/k, "
          f"{args.num_v_heads} v, head_dim {args.head_dim}/{args.head_v_dim}")  # fmt: skip
    print(f"vocab        {args.vocab_size}")
    if args.ham_layers:
        taus = ", ".join(f"{t:.4g}" for t in model.thresholds())
        print(f"router       {args.ham_router}; thresholds {taus}")
    print("config")
    for k, v in args.to_dict().items():
        print(f"  {k}: {json.dumps(v)}")
    return 0


def cmd_init(a: argparse.Namespace) -> int:
    from ham_mlx.presets import init_model

    overrides = {}
    if a.threshold is not None:
        overrides["ham_threshold"] = a.threshold
    path = init_model(a.path, a.preset, seed=a.seed, **overrides)
    print(f"wrote a random-weights '{a.preset}' model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ham_mlx.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="ham-mlx",
        description="Hybrid Associative Memory (HAM) language models on MLX.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, with HAM memory statistics")
    g.add_argument("--model", required=True, help="model folder (config.json, weights, tokenizer)")
    g.add_argument("--prompt", help="prompt text (default: read standard input)")
    g.add_argument("--max-tokens", type=int, default=256, help="tokens to generate (256)")
    g.add_argument("--temp", type=float, default=0.0, help="temperature; 0 is greedy (0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x top (0)")
    g.add_argument("--repetition-penalty", type=float, default=None, help="e.g. 1.1 (off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument(
        "--threshold", type=thresholds, default=None,
        help="surprise threshold τ for all HAM layers, or comma-separated per layer; "
        "lower keeps more tokens (more memory, better recall)",
    )  # fmt: skip
    g.add_argument(
        "--kv-budget", type=float, default=None,
        help="target fraction of tokens kept per HAM layer; τ adapts online to hold it",
    )  # fmt: skip
    g.add_argument("--max-kv-tokens", type=int, default=None, help="hard cap per HAM layer")
    g.add_argument(
        "--kv-policy", choices=("evict", "reject"), default="evict",
        help="when the cap is reached: evict the lowest score, or reject new tokens",
    )  # fmt: skip
    g.add_argument("--prefill-step-size", type=int, default=512, help="prompt chunk size (512)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="print a model's config, parameter count, layers, thresholds")
    i.add_argument("model", help="model folder")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    n = sub.add_parser("init", help="write a random-weights model folder from a preset")
    n.add_argument("path", help="folder to create (replaced atomically if it exists)")
    n.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size (tiny)")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed (0)")
    n.add_argument("--threshold", type=thresholds, default=None, help="initial τ (0.5)")
    n.set_defaults(func=cmd_init)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ham-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
