"""The `ham-mlx` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence


def thresholds(text: str) -> float | list[float]:
    """'0.4' -> 0.4; '0.3,0.5' -> [0.3, 0.5] (one per HAM layer)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, or numbers like 0.3,0.5, got {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def seed_value(text: str) -> int:
    """An argparse type: a random seed, an integer in [0, 2**64)."""
    value = int_at_least(0)(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be < 2**64, got {value}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value}")
    return value


class DeprecatedAlias(argparse.Action):
    """An old option name, hidden from --help: it stores into the new option's dest and warns."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}",
              file=sys.stderr)  # fmt: skip
        setattr(namespace, self.dest, values)


def package_version() -> str:
    """The installed distribution's version (the package's own when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ham-mlx")
    except PackageNotFoundError:
        from ham_mlx import __version__

        return __version__


# ---- generate and chat: shared options ------------------------------------------------------


ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def stop_text(text: str) -> str:
    """A --stop value: the escapes \\n, \\t and \\\\ as a shell cannot easily type them."""
    if not text:
        raise argparse.ArgumentTypeError("give a non-empty text")
    return re.sub(r"\\[nt\\]", lambda m: ESCAPES[m.group()], text)


def add_sampling_arguments(g: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g.add_argument("--max-tokens", type=int_at_least(0), default=max_tokens, metavar="N",
                   help=f"tokens to generate ({max_tokens})")  # fmt: skip
    g.add_argument("--temp", type=float, default=0.0, metavar="T",
                   help="temperature; 0 is greedy (0)")  # fmt: skip
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling mass (1.0 = off; needs --temp > 0)")  # fmt: skip
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="keep the k most likely tokens (0 = off; needs --temp > 0)")  # fmt: skip
    g.add_argument("--min-p", type=float, default=0.0, metavar="P",
                   help="drop tokens below min-p x top (0 = off; needs --temp > 0)")  # fmt: skip
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="e.g. 1.1 (off)")  # fmt: skip
    g.add_argument("--seed", type=seed_value, default=None, metavar="N",
                   help="random seed for sampling (needs --temp > 0)")  # fmt: skip
    g.add_argument(
        "--stop", action="append", type=stop_text, default=[], metavar="STR",
        help="stop before this text (repeatable; \\n, \\t and \\\\ are a newline, a tab and a "
        "backslash); the text and what follows are not printed",
    )  # fmt: skip


def add_memory_arguments(g: argparse.ArgumentParser) -> None:
    """The HAM controls (spec §7), as generate and chat take them."""
    g.add_argument(
        "--threshold", type=thresholds, default=None, metavar="T[,T..]",
        help="surprise threshold τ for all HAM layers, or comma-separated per layer; "
        "lower keeps more tokens (more memory, better recall)",
    )  # fmt: skip
    g.add_argument(
        "--kv-budget", type=fraction, default=None, metavar="F",
        help="target fraction of tokens kept per HAM layer, in (0, 1]; τ adapts online to hold "
        "it (instead of --threshold)",
    )  # fmt: skip
    g.add_argument("--max-kv-tokens", type=int_at_least(1), default=None, metavar="N",
                   help="hard cap per HAM layer")  # fmt: skip
    g.add_argument(
        "--kv-policy", choices=("evict", "reject"), default=None,
        help="when the --max-kv-tokens cap is reached: evict the lowest score, or reject new "
        "tokens (evict)",
    )  # fmt: skip
    g.add_argument("--prefill-step-size", type=int_at_least(1), default=512, metavar="N",
                   help="prompt chunk size (512)")  # fmt: skip


def check_sampling(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    if a.temp < 0:
        error(f"--temp must be >= 0, got {a.temp}")
    if a.temp == 0:
        unused = [flag for flag, on in (("--top-p", a.top_p != 1.0), ("--top-k", a.top_k != 0),
                                        ("--min-p", a.min_p != 0.0), ("--seed", a.seed is not None))
                  if on]  # fmt: skip
        if unused:
            error(f"{', '.join(unused)}: {'they apply' if len(unused) > 1 else 'it applies'} "
                  "to sampling, and --temp 0 (the default) is greedy decoding; give --temp > 0")


def check_memory(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    if a.threshold is not None and a.kv_budget is not None:
        error("--threshold and --kv-budget conflict: --kv-budget sets τ itself, adapting it "
              "online to keep that fraction; give one of them")  # fmt: skip
    if a.kv_policy is not None and a.max_kv_tokens is None:
        error(f"--kv-policy {a.kv_policy}: the policy applies when the --max-kv-tokens cap is "
              "reached, and no cap is given; add --max-kv-tokens N")  # fmt: skip


def memory_controls(a: argparse.Namespace) -> dict:
    return dict(threshold=a.threshold, kv_budget=a.kv_budget, max_kv_tokens=a.max_kv_tokens,
                kv_policy=a.kv_policy or "evict")  # fmt: skip


def sampling_args(a: argparse.Namespace) -> dict:
    """The generation options shared by the MLX and the onnxruntime paths."""
    return dict(
        max_tokens=a.max_tokens, temperature=a.temp, top_p=a.top_p, top_k=a.top_k,
        min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
        max_kv_tokens=a.max_kv_tokens, prefill_step_size=a.prefill_step_size,
    )  # fmt: skip


def print_summary(last) -> None:
    """A generation's statistics line (and rejected tokens, if any) to stderr."""
    print(last.summary(), file=sys.stderr, flush=True)
    rejected = [sum(s.get("rejected", [])) for s in last.kv if s["type"] == "ham"]
    if any(rejected):
        print(f"full HAM caches rejected {rejected} surprising tokens", file=sys.stderr)


def print_stream(stream, stop: Sequence[str] = ()) -> None:
    """Text to stdout as it comes, cut before the first stop string; the statistics to stderr."""
    from ham_mlx.serve.stop import StopText

    cut = StopText(list(stop)) if stop else None
    last = None
    try:
        for last in stream:
            text, hit = cut.add(last.text) if cut else (last.text, False)
            print(text, end="", flush=True)
            if hit:
                break
        else:
            if cut:
                print(cut.flush(), end="")
    finally:
        stream.close()
    print(flush=True)
    if last is not None:
        print("-" * 20, file=sys.stderr)
        print_summary(last)


# ---- generate -------------------------------------------------------------------------------


def read_prompt(a: argparse.Namespace) -> str:
    """--prompt TEXT; --prompt - or no --prompt: standard input (saying so on a terminal)."""
    if a.prompt is not None and a.prompt != "-":
        return a.prompt
    if sys.stdin.isatty():
        print(f"ham-mlx {a.command}: reading the prompt from standard input, end it with Ctrl-D "
              "(or give --prompt TEXT)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt on standard input is not {e.encoding}: byte "
                         f"{e.object[e.start]:#04x} ({e.reason})") from None  # fmt: skip


def check_model_has_ham(a: argparse.Namespace, model) -> None:
    """The HAM controls on a model without HAM layers: an argparse error (they would do nothing)."""
    flags = [f for f, v in (("--threshold", a.threshold), ("--kv-budget", a.kv_budget),
                            ("--max-kv-tokens", a.max_kv_tokens)) if v is not None]  # fmt: skip
    if flags and not model.ham_layers:
        types = ", ".join(dict.fromkeys(model.args.layer_types))
        verb = "apply" if len(flags) > 1 else "applies"
        a.parser.error(f"{', '.join(flags)} {verb} to HAM layers, and this model has none "
                       f"(layer types: {types})")  # fmt: skip


def check_generate(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    if a.onnx is not None:
        if a.model is not None:
            error("--model and --onnx: give one (--model runs an MLX model folder, --onnx an "
                  "exported folder on onnxruntime)")  # fmt: skip
        for flag, value in (("--threshold", a.threshold), ("--kv-budget", a.kv_budget)):
            if value is not None:
                error(f"{flag} does not apply with --onnx: τ is baked into the graph at export "
                      "(ham-mlx export --threshold)")  # fmt: skip
        if a.kv_policy == "evict":
            error("--kv-policy evict does not apply with --onnx: the exported graph can only "
                  "reject tokens once a HAM cache is full (--kv-policy reject, what it does "
                  "anyway); run the MLX model (--model) to evict")  # fmt: skip
    check_memory(a, error)
    check_sampling(a, error)


def chat_prompt(folder, system_prompt: str, prompt: str) -> tuple[str, list[str]]:
    """The prompt as one user turn after the system prompt, in the folder's chat format; and
    the format's stop strings."""
    from ham_mlx.chat import load_formatter

    if not prompt:
        raise ValueError("the prompt is empty: give at least one token of text")
    formatter = load_formatter(folder)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    turn = {"role": "user", "content": prompt.strip()}  # `echo ... |` ends it with a newline
    return formatter.render([*messages, turn]), formatter.stop


def cmd_generate(a: argparse.Namespace) -> int:
    prompt = read_prompt(a)
    stop = list(a.stop)
    if a.system_prompt is not None:
        from ham_mlx.model_io import default_model_path

        folder = a.onnx or a.model or default_model_path()
        prompt, template_stop = chat_prompt(folder, a.system_prompt, prompt)
        stop += [s for s in template_stop if s not in stop]
    if a.onnx is not None:  # the exported model on onnxruntime
        from ham_mlx.export.runtime import load as load_onnx
        from ham_mlx.export.runtime import stream_generate as stream_onnx

        model, tokenizer = load_onnx(a.onnx)
        print_stream(stream_onnx(model, tokenizer, prompt, **sampling_args(a)), stop)
        return 0
    from ham_mlx.generate import stream_generate
    from ham_mlx.model_io import load

    model, tokenizer = load(a.model)
    check_model_has_ham(a, model)
    controls = dict(threshold=a.threshold, kv_budget=a.kv_budget, kv_policy=a.kv_policy or "evict")
    stream = stream_generate(model, tokenizer, prompt, **sampling_args(a), **controls)
    print_stream(stream, stop)
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from mlx.utils import tree_flatten

    from ham_mlx.model_io import default_model_path, load_model

    folder = a.model if a.model is not None else default_model_path()
    model = load_model(folder)
    params = dict(tree_flatten(model.parameters()))
    n_params = sum(v.size for v in params.values())
    n_bytes = sum(v.nbytes for v in params.values())
    args = model.args
    if a.json:
        info = {"config": args.to_dict(), "parameters": n_params, "bytes": n_bytes,
                "thresholds": model.thresholds()}  # fmt: skip
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {folder}{'' if a.model is not None else ' (bundled)'}")
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


def check_init(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    from ham_mlx.presets import preset_args

    if a.threshold is not None and not preset_args(a.preset, 4096).ham_layers:
        error(f"--threshold sets the τ of HAM layers, and preset {a.preset!r} has none")


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

Capacity: the HAM layers' caches hold --max-kv-tokens admitted tokens (default: as many as the
generation needs); once full, further surprising tokens are not cached (like the MLX model
with --max-kv-tokens N --kv-policy reject). Attention layers need a slot per token.

--genai also writes genai_config.json, tokenizer.json and tokenizer_config.json so that
stock onnxruntime-genai runs the folder; genai sizes every cache to max_length
(--context-length).

examples:
  ham-mlx export models/small onnx/small
  ham-mlx export models/small onnx/small-int8 --quantize int8 --max-kv-tokens 512
  ham-mlx export models/small onnx/small-genai --genai --context-length 2048
"""


EXPORT_DTYPES = {"float32": "fp32", "float16": "fp16", "fp32": "fp32", "fp16": "fp16"}


def check_export(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    if a.context_length is not None and not a.genai:
        error("--context-length sizes the onnxruntime-genai caches: it applies with --genai only "
              "(ham-mlx's own runner sizes its HAM caches with --max-kv-tokens)")  # fmt: skip
    if a.quantize is not None and EXPORT_DTYPES[a.dtype] != "fp32":
        error(f"--quantize {a.quantize} starts from float32 weights: drop --dtype {a.dtype}")


def cmd_export(a: argparse.Namespace) -> int:
    from ham_mlx.export import export_onnx

    result = export_onnx(
        a.model, a.out, threshold=a.threshold, max_kv_tokens=a.max_kv_tokens,
        dtype=EXPORT_DTYPES[a.dtype], quantize=a.quantize, genai=a.genai,
        context_length=a.context_length or 4096,
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
GatedDeltaNetForCausalLM, optionally with softmax-attention layers through "attn"), "ham",
or "qwen3_5" / "qwen3_5_text" (Qwen3.5's dense models; the vision tower is dropped),
and weights as model.safetensors, shards + model.safetensors.index.json, pytorch_model.bin
(+ index), or a single .pt/.pth. Torch files are read without torch, and their pickle is
never allowed to run code: anything but tensors and dicts is refused.

Supported: GDN and attention layers, HAM layers (any router), grouped value heads,
allow_neg_eigval, tied embeddings, sliding windows, use_gate=false, sigmoid output gates.
Refused, by name: attnres_block_size, conv biases, qkv biases, other model types,
unknown config keys or parameters.

DST is written into a temporary folder beside it and then renamed: a failed or interrupted
conversion leaves no partial DST. Tokenizer files found in SRC are copied.

examples:
  ham-mlx convert fla-gdn-340m models/gdn-340m
  ham-mlx convert my-ham models/my-ham-4bit -q --q-bits 4 --q-group-size 64
"""


def check_convert(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    for flag, value in (("--q-bits", a.q_bits), ("--q-group-size", a.q_group_size)):
        if value is not None and not a.quantize:
            error(f"{flag} applies to quantized weights: add -q/--quantize")


def cmd_convert(a: argparse.Namespace) -> int:
    from ham_mlx.convert import convert

    summary = convert(
        a.src, a.dst, dtype=a.dtype, quantize=a.quantize, q_bits=a.q_bits or 4,
        q_group_size=a.q_group_size or 64, overwrite=a.overwrite,
    )  # fmt: skip
    print(summary)
    return 0


GENERATE_HELP = """\
Generate text from a prompt, then print the HAM memory statistics (to stderr).

The prompt comes from --prompt, or from standard input (--prompt -, or no --prompt). With
--system-prompt it is formatted as one chat turn: the chat template of the model folder's
tokenizer_config.json, else plain "System: ..." / "User: ..." lines and "Assistant:".

examples:
  ham-mlx generate --prompt "O Romeo" --max-tokens 100
  ham-mlx generate --prompt "O Romeo" --temp 0.8 --top-p 0.95 --seed 1 --stop '\\n\\n'
  ham-mlx generate --prompt "O Romeo" --max-kv-tokens 64 --kv-policy reject
  echo "Tell me of Verona." | ham-mlx generate --prompt - --system-prompt "You are a poet."
  ham-mlx generate --onnx onnx/small --prompt "O Romeo" --max-kv-tokens 64
"""


def build_parser() -> argparse.ArgumentParser:
    from ham_mlx.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="ham-mlx",
        description="Hybrid Associative Memory (HAM) language models on MLX.",
    )
    p.add_argument("--version", action="version", version=f"ham-mlx {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser(
        "generate", help="generate text from a prompt, with HAM memory statistics",
        description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    g.add_argument(
        "--model", default=None, metavar="DIR",
        help="model folder (config.json, weights, tokenizer); default: the bundled small model",
    )  # fmt: skip
    g.add_argument("--prompt", metavar="TEXT",
                   help="prompt text; - (or no --prompt): read standard input")  # fmt: skip
    g.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="format the prompt as a chat turn after this system message, with the "
                   "model's chat template ('' for no system message)")  # fmt: skip
    add_sampling_arguments(g)
    add_memory_arguments(g)
    g.add_argument(
        "--onnx", default=None, metavar="DIR",
        help="run an exported folder (ham-mlx export) on onnxruntime instead of --model; "
        "--max-kv-tokens sizes its HAM caches (full caches reject)",
    )  # fmt: skip
    g.set_defaults(func=cmd_generate, check=check_generate, parser=g)

    from ham_mlx.chat import DESCRIPTION as CHAT_HELP
    from ham_mlx.chat import cmd_chat

    h = sub.add_parser(
        "chat", help="chat in the terminal, the model's memory kept between turns",
        description=CHAT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    h.add_argument(
        "--model", default=None, metavar="DIR",
        help="model folder (config.json, weights, tokenizer); default: the bundled small model",
    )  # fmt: skip
    h.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="system message at the start of the conversation")  # fmt: skip
    add_sampling_arguments(h)
    add_memory_arguments(h)
    h.set_defaults(func=cmd_chat, check=check_chat, parser=h)

    i = sub.add_parser("info", help="print a model's config, parameter count, layers, thresholds")
    i.add_argument("model", nargs="?", default=None,
                   help="model folder (default: the bundled model)")  # fmt: skip
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_info)

    n = sub.add_parser("init", help="write a random-weights model folder from a preset")
    n.add_argument("path", help="folder to create (replaced atomically if it exists)")
    n.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="size (tiny)")
    n.add_argument("--seed", type=int, default=0, help="initialisation seed (0)")
    n.add_argument("--threshold", type=thresholds, default=None, metavar="T[,T..]",
                   help="initial τ, one or one per HAM layer (0.5)")  # fmt: skip
    n.set_defaults(func=cmd_init, check=check_init, parser=n)

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
    c.add_argument("--q-bits", type=int, choices=(4, 8), default=None,
                   help="bits per weight, with -q (4)")  # fmt: skip
    c.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=None,
                   help="weights per quantization group, with -q (64)")  # fmt: skip
    c.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    c.set_defaults(func=cmd_convert, check=check_convert, parser=c)

    x = sub.add_parser(
        "export", help="export a model folder to ONNX (+ onnxruntime-genai), with a parity report",
        description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    x.add_argument("model", help="model folder (config.json, weights, tokenizer.model)")
    x.add_argument("out", help="folder to write (replaced atomically)")
    x.add_argument("--max-kv-tokens", type=int_at_least(1), default=None, metavar="N",
                   help="HAM cache capacity per layer for ham-mlx's runner (default: as many as "
                   "the generation needs)")  # fmt: skip
    x.add_argument("--max-kv", type=int_at_least(1), dest="max_kv_tokens",
                   action=DeprecatedAlias, new="--max-kv-tokens")  # fmt: skip
    x.add_argument(
        "--threshold", type=thresholds, default=None, metavar="T[,T..]",
        help="τ baked in instead of the trained one (one, or one per HAM layer)",
    )  # fmt: skip
    x.add_argument("--dtype", choices=("float32", "float16", "fp32", "fp16"), default="float32",
                   help="weights (float32)")  # fmt: skip
    x.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="quantize the MatMul weights, block-wise (onnxruntime MatMulNBits; "
                   "from float32)")  # fmt: skip
    x.add_argument("--genai", action="store_true", help="write an onnxruntime-genai folder")
    x.add_argument(
        "--context-length", type=int_at_least(1), default=None, metavar="N",
        help="with --genai: max_length, each genai cache holds this many tokens (4096)",
    )  # fmt: skip
    x.add_argument("--no-report", action="store_true", help="skip the parity check with MLX")
    x.set_defaults(func=cmd_export, check=check_export, parser=x)

    from ham_mlx.bench.run import DESCRIPTION, add_arguments, check_arguments

    b = sub.add_parser(
        "bench", help="benchmark decode/prefill speed and memory against same-size baselines",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_arguments(b)
    b.set_defaults(func=cmd_bench, check=check_arguments, parser=b)

    from ham_mlx.train.cli import add_parsers as add_training_parsers

    add_training_parsers(sub)

    from ham_mlx.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)

    from ham_mlx.inspector.cli import add_parser as add_inspect_parser

    add_inspect_parser(sub)

    from ham_mlx.eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return p


def check_chat(a: argparse.Namespace, error: Callable[[str], None]) -> None:
    if a.max_tokens < 1:
        error("--max-tokens must be >= 1 for a reply")
    check_memory(a, error)
    check_sampling(a, error)


def stop_writing_stdout() -> None:
    """The reader of stdout went away: send what is still buffered nowhere, so that the flush at
    exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; argparse exits with status 2 on a usage error (and a conflict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    check = getattr(args, "check", None)
    if check is not None:
        check(args, args.parser.error)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except (ValueError, FileNotFoundError) as e:
        print(f"ham-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ham-mlx generate ... | head`: stop quietly, as a shell tool does
        stop_writing_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
