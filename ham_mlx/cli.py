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


def sampling_args(a: argparse.Namespace) -> dict:
    """The generation options shared by the MLX and the onnxruntime paths."""
    return dict(
        max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
        min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
        max_kv_tokens=a.max_kv_tokens, prefill_step_size=a.prefill_step_size,
    )  # fmt: skip


def print_stream(stream) -> None:
    """Text to stdout as it comes; the statistics line to stderr."""
    last = None
    for last in stream:
        print(last.text, end="", flush=True)
    print()
    if last is not None:
        print("-" * 20, file=sys.stderr)
        print(last.summary(), file=sys.stderr)
        rejected = [sum(s.get("rejected", [])) for s in last.kv if s["type"] == "ham"]
        if any(rejected):
            print(f"full HAM caches rejected {rejected} surprising tokens", file=sys.stderr)


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = a.prompt if a.prompt is not None else sys.stdin.read()
    if a.onnx is not None:  # the exported model on onnxruntime
        from ham_mlx.export.runtime import load as load_onnx
        from ham_mlx.export.runtime import stream_generate as stream_onnx

        for flag, value in (("--threshold", a.threshold), ("--kv-budget", a.kv_budget)):
            if value is not None:
                raise ValueError(
                    f"{flag}: with --onnx τ is baked in at export (export --threshold)"
                )
        model, tokenizer = load_onnx(a.onnx)
        print_stream(stream_onnx(model, tokenizer, prompt, **sampling_args(a)))
        return 0
    from ham_mlx.generate import stream_generate
    from ham_mlx.model_io import load

    model, tokenizer = load(a.model)
    controls = dict(threshold=a.threshold, kv_budget=a.kv_budget, kv_policy=a.kv_policy)
    print_stream(stream_generate(model, tokenizer, prompt, **sampling_args(a), **controls))
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


EXPORT_HELP = """\
Export a model folder to ONNX (opset 24, standard ops) and check it against the MLX model.

OUT_DIR gets model.onnx + model.onnx.data (weights), tokenizer.model and parity.json; the
exporter prints the parity report: the largest logit difference from the MLX model and the
admission decisions that differ, over a prompt and 64 generated tokens. One graph serves
prompt and generation; run it with `ham-mlx generate --onnx OUT_DIR`.

Capacity: the HAM layers' caches hold --max-kv admitted tokens (default: as many as the
generation needs); once full, further surprising tokens are not cached (like the MLX model
with --max-kv-tokens N --kv-policy reject). Attention layers need a slot per token.

--genai also writes genai_config.json, tokenizer.json and tokenizer_config.json so that
stock onnxruntime-genai runs the folder; genai sizes every cache to max_length
(--context-length).

examples:
  ham-mlx export models/small onnx/small
  ham-mlx export models/small onnx/small-int8 --quantize int8 --max-kv 512
  ham-mlx export models/small onnx/small-genai --genai --context-length 2048
"""


def cmd_export(a: argparse.Namespace) -> int:
    from ham_mlx.export import export_onnx

    result = export_onnx(
        a.model, a.out, threshold=a.threshold, max_kv_tokens=a.max_kv, dtype=a.dtype,
        quantize=a.quantize, genai=a.genai, context_length=a.context_length,
        report=not a.no_report,
    )  # fmt: skip
    for line in result.lines:
        print(line)
    print(f"wrote {result.path}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from ham_mlx.bench.run import main as bench_main

    return bench_main(a)


CONVERT_HELP = """\
Convert a PyTorch checkpoint folder into a ham_mlx model folder.

SRC is an HF-style folder: config.json with model_type "gated_deltanet" (FLA's
GatedDeltaNetForCausalLM, optionally with softmax-attention layers through "attn") or "ham",
and weights as model.safetensors, shards + model.safetensors.index.json, pytorch_model.bin
(+ index), or a single .pt/.pth. Torch files are read without torch, and their pickle is
never allowed to run code: anything but tensors and dicts is refused.

Supported: GDN and attention layers, HAM layers (any router), grouped value heads,
allow_neg_eigval, tied embeddings, sliding windows, use_gate=false, sigmoid output gates.
Refused, by name: attnres_block_size, conv biases, qkv biases / qk norms, other model types,
unknown config keys or parameters.

DST is written into a temporary folder beside it and then renamed: a failed or interrupted
conversion leaves no partial DST. Tokenizer files found in SRC are copied.

examples:
  ham-mlx convert fla-gdn-340m models/gdn-340m
  ham-mlx convert my-ham models/my-ham-4bit -q --q-bits 4 --q-group-size 64
"""


def cmd_convert(a: argparse.Namespace) -> int:
    from ham_mlx.convert import convert

    summary = convert(
        a.src, a.dst, dtype=a.dtype, quantize=a.quantize, q_bits=a.q_bits,
        q_group_size=a.q_group_size, overwrite=a.overwrite,
    )  # fmt: skip
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ham_mlx.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="ham-mlx",
        description="Hybrid Associative Memory (HAM) language models on MLX.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, with HAM memory statistics")
    g.add_argument(
        "--model", default=None,
        help="model folder (config.json, weights, tokenizer); default: the bundled small model",
    )  # fmt: skip
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
    g.add_argument(
        "--onnx", default=None, metavar="DIR",
        help="run an exported folder (ham-mlx export) on onnxruntime instead of --model; "
        "--max-kv-tokens sizes its HAM caches (full caches reject)",
    )  # fmt: skip
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

    c = sub.add_parser(
        "convert", help="convert a PyTorch checkpoint (FLA Gated DeltaNet / hybrids, HAM)",
        description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    c.add_argument("src", help="checkpoint folder: config.json + weights (or one weight file)")
    c.add_argument("dst", help="ham_mlx model folder to write (atomically)")
    c.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="weight dtype (default: the checkpoint's); A_log, dt_bias, threshold "
                   "stay float32")  # fmt: skip
    c.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    c.add_argument("--q-bits", type=int, choices=(4, 8), default=4, help="bits per weight (4)")
    c.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64,
                   help="weights per quantization group (64)")  # fmt: skip
    c.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    c.set_defaults(func=cmd_convert)

    x = sub.add_parser(
        "export", help="export a model folder to ONNX (+ onnxruntime-genai), with a parity report",
        description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    x.add_argument("model", help="model folder (config.json, weights, tokenizer.model)")
    x.add_argument("out", help="folder to write (replaced atomically)")
    x.add_argument("--max-kv", type=int, default=None, help="HAM cache capacity for the runner")
    x.add_argument(
        "--threshold",
        type=thresholds,
        default=None,
        help="τ baked in instead of the trained one (one, or one per HAM layer)",
    )
    x.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights (fp32)")
    x.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="dynamic int8 weights for the MatMuls (from fp32)",
    )
    x.add_argument("--genai", action="store_true", help="write an onnxruntime-genai folder")
    x.add_argument(
        "--context-length",
        type=int,
        default=4096,
        help="genai max_length: each genai cache holds this many tokens (4096)",
    )
    x.add_argument("--no-report", action="store_true", help="skip the parity check with MLX")
    x.set_defaults(func=cmd_export)

    from ham_mlx.bench.run import DESCRIPTION, add_arguments

    b = sub.add_parser(
        "bench", help="benchmark decode/prefill speed and memory against same-size baselines",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(b)
    b.set_defaults(func=cmd_bench)

    from ham_mlx.train.cli import add_parsers as add_training_parsers

    add_training_parsers(sub)

    from ham_mlx.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)

    from ham_mlx.inspector.cli import add_parser as add_inspect_parser

    add_inspect_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ham-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
