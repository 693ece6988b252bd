"""`ham-mlx inspect`: what each HAM layer chose to store, and where each GDN layer's state failed
to predict, in the terminal and as an HTML report."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DESCRIPTION = """\
Show what each HAM layer stored in its KV cache for a prompt, and where each GDN layer's state
failed to predict it.

The prompt is prefilled in chunks into real caches, as in generation; a token is stored when
its surprise score (how badly the layer's RNN predicted its value) is at least the layer's
threshold τ. The terminal shows the text once per layer with the stored tokens highlighted
(ANSI colours on a terminal unless NO_COLOR is set, [brackets] otherwise) and each layer's KV
fraction (admitted / seen). --html OUT also writes a self-contained HTML report (hover a token
for its score and τ) and OUT's .png: the score along the text, one panel per layer.

GDN layers (any model: FLA Gated DeltaNet checkpoints, hybrids) have no router, no τ and no KV
cache, and store nothing. For them the score is the cosine surprise of the layer's own state,
1 - cos(v̂, v) with v̂ = α·S·k (the min over value heads): the quantity a cosine HAM layer would
compare with τ. Tokens whose surprise is at least --gdn-level are marked.

examples:
  ham-mlx inspect --prompt "To be, or not to be, that is the question"
  ham-mlx inspect --file hamlet.txt --threshold 0.3 --html report.html
  ham-mlx inspect --model models/small --file notes.txt --layers 0,3 --table
  ham-mlx inspect --model models/gdn-340m --file notes.txt --gdn-level 0.7
"""


def layer_list(text: str) -> list[int]:
    """'0,3' -> [0, 3]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer indices like 0,3, got {text!r}") from None


def read_prompt(a: argparse.Namespace) -> str:
    if a.prompt is not None:
        return a.prompt
    path = Path(a.file)
    if not path.is_file():
        raise FileNotFoundError(f"--file {path}: not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--file {path}: not UTF-8 text ({e})") from None


def cmd_inspect(a: argparse.Namespace) -> int:
    from ham_mlx.inspector.plot import plot_scores, require_matplotlib
    from ham_mlx.inspector.report import render_html
    from ham_mlx.inspector.terminal import render, use_color
    from ham_mlx.inspector.trace import trace
    from ham_mlx.model_io import default_model_path, load

    html = None if a.html is None else Path(a.html)
    if html is not None:
        if html.suffix.lower() == ".png":
            raise ValueError(f"--html {html}: give the .html path; the plot goes beside it")
        require_matplotlib()
    prompt = read_prompt(a)
    name = a.model if a.model is not None else f"{default_model_path().name} (bundled)"
    model, tokenizer = load(a.model)
    if a.threshold is not None and not model.ham_layers:
        raise ValueError(
            f"--threshold: model {name} has no HAM layers; GDN layers have no τ "
            "(--gdn-level sets the level their view marks)"
        )
    t = trace(model, tokenizer, prompt, threshold=a.threshold, layers=a.layers,
              max_tokens=a.max_tokens, prefill_step_size=a.prefill_step_size,
              model_name=name, gdn_level=a.gdn_level)  # fmt: skip
    if t.dropped:
        print(f"ham-mlx inspect: warning: the prompt has {len(t.ids) + t.dropped} tokens; "
              f"inspecting the first {len(t.ids)} (--max-tokens)", file=sys.stderr)  # fmt: skip
    width = shutil.get_terminal_size((100, 24)).columns
    print(render(t, use_color(sys.stdout), width, a.table))
    if html is not None:
        png = html.with_suffix(".png")
        html.parent.mkdir(parents=True, exist_ok=True)
        plot_scores(t, png)
        html.write_text(render_html(t, png.read_bytes()), encoding="utf-8")
        print(f"\nwrote {html} and {png}")
    return 0


def add_parser(sub) -> None:
    """Register the `inspect` subcommand on the CLI's subparsers."""
    from ham_mlx.cli import int_at_least, thresholds
    from ham_mlx.inspector.trace import GDN_LEVEL, MAX_TOKENS

    p = sub.add_parser(
        "inspect", help="show which tokens each HAM layer stored in its KV cache, and why "
        "(and where GDN layers failed to predict)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--model", metavar="DIR", help="model folder (default: the bundled model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="text to inspect")
    src.add_argument("--file", metavar="F", help="UTF-8 text file to inspect")
    p.add_argument(
        "--threshold", type=thresholds, default=None, metavar="T[,T..]",
        help="τ for all HAM layers, or comma-separated per HAM layer (default: the trained τ)",
    )  # fmt: skip
    p.add_argument(
        "--layers", type=layer_list, default=None, metavar="I[,I..]",
        help="model-layer indices of the HAM and GDN layers to show, e.g. 0,3 (default: all)",
    )  # fmt: skip
    p.add_argument(
        "--gdn-level", type=float, default=GDN_LEVEL, metavar="L",
        help=f"GDN layers: mark the tokens whose surprise is at least L ({GDN_LEVEL})",
    )  # fmt: skip
    p.add_argument(
        "--html", default=None, metavar="OUT",
        help="write an HTML report to OUT and the score plot beside it (OUT with .png)",
    )  # fmt: skip
    p.add_argument(
        "--max-tokens", type=int_at_least(1), default=MAX_TOKENS, metavar="N",
        help=f"inspect at most this many prompt tokens; the rest is dropped ({MAX_TOKENS})",
    )  # fmt: skip
    p.add_argument("--prefill-step-size", type=int_at_least(1), default=512, metavar="N",
                   help="prompt chunk size (512)")  # fmt: skip
    p.add_argument("--table", action="store_true", help="also print every token's score per layer")
    p.set_defaults(func=cmd_inspect)
