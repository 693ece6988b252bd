"""`ham-mlx eval {ppl,niah,mqar}`: score a model folder (or an exported one with --onnx) and write
eval-TASK.json, .md and .png into --out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

DESCRIPTION = """\
Tasks:
  ppl   perplexity of a text or token file (.bin + .json), fed through the caches in chunks as
        generation prefills, with each HAM layer's KV fraction (default input: the held-out
        Shakespeare text shipped with ham_mlx)
  niah  needle in a haystack (RULER style): --niah single | multikey | passkey, at --lengths and
        --depths; exact match of the answer's digits
  mqar  multi-query associative recall (for models trained on MQAR)
"""


def comma_list(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected values like 1,2,3, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def add_parser(sub) -> None:
    from ham_mlx.cli import int_at_least, seed_value, thresholds
    from ham_mlx.eval.niah import TASKS

    e = sub.add_parser(
        "eval", help="evaluate a model: perplexity, needle in a haystack, MQAR recall",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    e.add_argument("task", choices=["ppl", "niah", "mqar"])
    src = e.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    src.add_argument("--onnx", default=None, help="an exported folder, run on onnxruntime")
    e.add_argument("--out", default="eval", help="folder for the report files (./eval)")
    e.add_argument("--prefill-step-size", type=int_at_least(1), default=512,
                   help="tokens per call when feeding a context (512)")  # fmt: skip
    e.add_argument("--threshold", type=thresholds, default=None,
                   help="τ for every HAM layer, or one per layer (MLX only)")  # fmt: skip
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--seed", type=seed_value, default=0)
    g = e.add_argument_group("ppl")
    g.add_argument(
        "--input",
        default=None,
        help="UTF-8 text, or a token file NAME.bin (default: the shipped held-out text)",
    )
    g.add_argument("--max-tokens", type=int_at_least(2), default=8192,
                   help="score at most this many tokens of the input (8192)")  # fmt: skip
    n = e.add_argument_group("niah")
    n.add_argument("--niah", choices=TASKS, default="single", help="needle task (single)")
    n.add_argument("--lengths", type=comma_list(int), default=(256, 512, 1024),
                   help="context lengths in tokens (256,512,1024)")  # fmt: skip
    n.add_argument("--depths", type=comma_list(float), default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="needle depths in [0, 1] (0,0.25,0.5,0.75,1)")  # fmt: skip
    n.add_argument("--samples", type=int_at_least(1), default=4,
                   help="samples per length and depth (4)")  # fmt: skip
    m = e.add_argument_group("mqar")
    m.add_argument("--mqar-vocab", type=int_at_least(4), default=256)
    m.add_argument("--mqar-pairs", type=int_at_least(1), default=16)
    m.add_argument("--mqar-seq-len", type=int_at_least(2), default=128)
    m.add_argument("--mqar-batches", type=int_at_least(1), default=4)
    e.set_defaults(func=cmd_eval, check=check_eval, parser=e)


def check_eval(a: argparse.Namespace, error) -> None:
    if a.onnx is not None and a.threshold is not None:
        error("--threshold applies to MLX models; an export carries its trained τ")
    if a.task == "niah":
        if any(n < 16 for n in a.lengths):
            error(f"--lengths {','.join(map(str, a.lengths))}: each must be >= 16 tokens")
        if any(not 0 <= d <= 1 for d in a.depths):
            error(f"--depths {','.join(map(str, a.depths))}: each must lie in [0, 1]")


def load_runner(a: argparse.Namespace) -> tuple[Any, Any, str]:
    """(runner, tokenizer, model path) for --model / --onnx / the bundled model."""
    from ham_mlx.eval.runner import MLXRunner, OnnxRunner

    if a.onnx is not None:
        from ham_mlx.export.runtime import load as load_onnx

        model, tokenizer = load_onnx(a.onnx)
        return OnnxRunner(model), tokenizer, str(a.onnx)
    from ham_mlx.model_io import default_model_path, load

    path = a.model or default_model_path()
    model, tokenizer = load(path)
    controls = {} if a.threshold is None else {"threshold": a.threshold}
    return MLXRunner(model, controls), tokenizer, str(path)


def read_ids(path: str | None, tokenizer, limit: int) -> tuple[np.ndarray, str]:
    """Token ids of a token file or a text file (BOS first), at most `limit`."""
    from ham_mlx.eval.haystack import HAYSTACK_FILE
    from ham_mlx.train.data import TokenFile

    source = Path(path) if path else HAYSTACK_FILE
    if source.suffix == ".bin" or source.with_name(source.name + ".json").is_file():
        return np.asarray(TokenFile(source).tokens[:limit], dtype=np.int64), str(source)
    if not source.is_file():
        raise FileNotFoundError(f"--input {source}: not found")
    text = source.read_text(encoding="utf-8")
    return np.asarray(tokenizer.encode(text, add_bos=True)[:limit], dtype=np.int64), str(source)


def cmd_eval(a: argparse.Namespace) -> int:
    from ham_mlx.eval import mqar_accuracy, needle_retrieval, perplexity
    from ham_mlx.eval.report import write_report

    runner, tokenizer, path = load_runner(a)
    progress = not a.no_progress
    if a.task == "ppl":
        ids, source = read_ids(a.input, tokenizer, a.max_tokens)
        if ids.size and int(ids.max()) >= runner.vocab_size:
            raise ValueError(f"--input {source}: token id {int(ids.max())} is out of range "
                             f"[0, {runner.vocab_size})")  # fmt: skip
        result = {"input": source, **perplexity(runner, ids, a.prefill_step_size, progress)}
        line = (f"{result['tokens']} tokens: {result['nats_per_token']:.4f} nats/token, "
                f"perplexity {result['perplexity']:.2f}")  # fmt: skip
    elif a.task == "niah":
        result = needle_retrieval(runner, tokenizer, a.niah, a.lengths, a.depths, a.samples,
                                  a.seed, a.prefill_step_size, progress)  # fmt: skip
        result["niah"] = result.pop("task")
        overall = [r for r in result["accuracy"] if r["depth"] == "all"]
        line = ", ".join(f"{r['length']} tokens: {r['accuracy']:.2f}" for r in overall)
        line = f"{a.niah} accuracy: {line}"
    else:
        result = mqar_accuracy(runner, a.mqar_vocab, a.mqar_pairs, a.mqar_seq_len,
                               batches=a.mqar_batches, seed=a.seed, chunk=a.prefill_step_size,
                               progress=progress)  # fmt: skip
        line = f"recall accuracy {result['accuracy']:.4f} over {result['sequences']} sequences"
    kv = result.get("kv_fraction")
    if kv:
        line += " | KV fraction " + "/".join(f"{f:.3f}" for f in kv)
    result = {"task": a.task, "model": path, **result}
    files = write_report(result, a.out)
    print(line)
    for f in files:
        print(f"wrote {f}", file=sys.stderr)
    return 0
