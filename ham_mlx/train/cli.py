"""`ham-mlx train` and `ham-mlx tokenizer` subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_train(a: argparse.Namespace) -> int:
    from ham_mlx.train.config import TrainConfig
    from ham_mlx.train.trainer import Trainer

    cfg = TrainConfig.from_file(a.config)
    if a.steps is not None:
        cfg.steps = a.steps
    if a.out_dir is not None:
        cfg.out_dir = a.out_dir
    cfg.validate()  # again, with the overrides
    trainer = Trainer(cfg)
    result = trainer.fit(resume=a.resume)
    if trainer.rank == 0:
        print(json.dumps(result, indent=2))
    return 0


def cmd_tokenizer_train(a: argparse.Namespace) -> int:
    from ham_mlx.tokenizer import train_tokenizer

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([str(p) for p in a.input], str(out.with_suffix("")), a.vocab_size)
    print(f"wrote {out.with_suffix('.model')} ({tok.vocab_size} pieces)")
    return 0


def cmd_tokenizer_encode(a: argparse.Namespace) -> int:
    from ham_mlx.tokenizer import Tokenizer
    from ham_mlx.train.data import token_path, write_token_file

    tok = Tokenizer.from_file(a.tokenizer)
    texts = [Path(p).read_text(encoding="utf-8") for p in a.input]
    cut = [int(len(t) * (1 - a.valid_fraction)) for t in texts]
    out = write_token_file(tok, [t[:c] for t, c in zip(texts, cut)], a.out)
    print(f"wrote {out}")
    if a.valid_fraction > 0:
        valid = str(token_path(a.out))[: -len(".bin")] + ".valid"
        print(f"wrote {write_token_file(tok, [t[c:] for t, c in zip(texts, cut)], valid)}")
    return 0


def valid_fraction(text: str) -> float:
    """An argparse type: a fraction in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def add_parsers(sub) -> None:
    from ham_mlx.cli import int_at_least

    t = sub.add_parser(
        "train", help="train a model from a YAML/JSON config (see docs/training.md)",
        description="Train a HAM (or GDN / attention) model. Data-parallel over processes when "
        "launched with `mlx.launch -n N ham-mlx train ...`.",
    )  # fmt: skip
    t.add_argument("--config", required=True, help="YAML or JSON training config")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint (broken ones are named "
                   "and skipped)")  # fmt: skip
    t.add_argument("--steps", type=int_at_least(1), default=None,
                   help="override the config's steps")  # fmt: skip
    t.add_argument("--out-dir", default=None, help="override the config's out_dir")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer or encode text with one")
    ksub = k.add_subparsers(dest="tokenizer_command", required=True)
    kt = ksub.add_parser("train", help="train a BPE tokenizer whose decode(encode(x)) == x")
    kt.add_argument("--input", nargs="+", required=True, type=Path, help="UTF-8 text files")
    kt.add_argument("--vocab-size", type=int_at_least(1), default=4096, help="pieces (4096)")
    kt.add_argument("--out", required=True, help="output path (.model)")
    kt.set_defaults(func=cmd_tokenizer_train)
    ke = ksub.add_parser("encode", help="encode text files into a memory-mapped token file")
    ke.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    ke.add_argument("--input", nargs="+", required=True, type=Path, help="UTF-8 text files")
    ke.add_argument("--out", required=True, help="output token file (.bin, with .json beside)")
    ke.add_argument("--valid-fraction", type=valid_fraction, default=0.05,
                    help="the last fraction of each file goes to OUT.valid.bin (0.05)")  # fmt: skip
    ke.set_defaults(func=cmd_tokenizer_encode)
