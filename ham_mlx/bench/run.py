"""`ham-mlx bench`: options, the order of the parts, and the terminal output."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from ham_mlx.cli import DeprecatedAlias

PARTS = ("probe", "decode", "prefill", "onnx")
QUICK = {
    "preset": "small", "vocab": 2048, "contexts": [256, 1024], "steps": 4, "repeats": 3,
    "prefill_lengths": [256, 1024], "prefill_repeats": 2, "probe_mb": 64, "onnx_contexts": [256],
}  # fmt: skip
DEFAULTS = {
    "preset": "base", "vocab": 32000, "contexts": [512, 2048, 8192, 16384], "steps": 4,
    "repeats": 10, "prefill_lengths": [512, 1024, 4096], "prefill_repeats": 3, "probe_mb": 256,
    "onnx_contexts": [512, 2048],
}  # fmt: skip
OTHER_DEFAULTS = {"fractions": [0.1, 0.25, 0.5], "warmup": 2, "chunk": 1024, "onnx_fraction": 0.25}

DESCRIPTION = """\
Benchmark HAM generation against same-size baselines on this machine, and check the speed
targets on the measured numbers.

Parts (--parts, comma-separated; default all four):
  probe    memory read bandwidth (best run of a numpy and an MLX float32 matvec over
           --probe-mb MiB, all cores), copy bandwidth and MLX float32 matmul GFLOP/s.
  decode   decode tokens/s and KV-cache bytes at each --contexts length for same-size models
           (same width, depth, MLP, vocab; random weights; float32; batch 1): all-HAM at each
           --fractions of tokens cached (kv_budget during prefill, then τ frozen for the timed
           steps; the fraction reported is the measured one), all-GDN, all-attention, and
           mlx-lm's Llama (needs mlx-lm). Each step's bytes (weights + KV + state) over the
           probe's bandwidth give the roofline.
  prefill  tokens/s against --prefill-lengths of one layer's gated-delta scan (chunked,
           sequential, mx.fast.gated_delta_update) and of attention over admitted tokens
           (masked-dense vs admitted-only, at each --fractions).
  onnx     onnxruntime vs MLX on the same all-HAM model (the decode preset): τ per layer set
           for --onnx-fraction cached, exported with it baked in; prefill (in chunks of
           --prefill-step-size) and greedy decode tok/s at each --onnx-contexts, with the max
           logit difference and whether both runtimes admitted the same tokens.

Targets (each reported as met, missed or not measured; same-run ratios, never asserted):
  - at 16k context, HAM with <= 25% cached decodes >= 2x all-attention and >= 1.5x mlx-lm's
    Llama, with <= 0.3x their KV bytes;
  - at 512 context, HAM decodes >= 0.8x mlx-lm's Llama tokens/s;
  - the chunked gated-delta scan is >= 5x the sequential one at T = 4096, and faster than
    mx.fast.gated_delta_update on CPU;
  - decoding a >= 100M-parameter model reaches >= 50% of the bandwidth roofline;
  - onnxruntime decodes at least as fast as MLX on CPU, on the same model.

Output in --out: results.json (everything, with raw samples), report.md (tables and the
targets: met / missed), decode.png and prefill.png (needs matplotlib).

Install the extras first: pip install 'ham-mlx[bench]'  (mlx-lm and matplotlib).
The full default run (preset base, contexts to 16k) takes about 22-40 minutes on 2 cores;
--quick (preset small, short contexts) about a minute."""


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parts_list(text: str) -> list[str]:
    parts = [x.strip() for x in text.split(",") if x.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown part {bad[0]!r}; choose from {PARTS}")
    return parts


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ham_mlx.presets import PRESETS

    d = DEFAULTS
    p.add_argument(
        "--parts",
        type=parts_list,
        default=list(PARTS),
        help="parts to run, comma-separated: probe,decode,prefill,onnx (all)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test in about a minute: {QUICK} (explicit options win)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help=f"model size for decode and the layer shapes of prefill ({d['preset']})",
    )
    p.add_argument("--vocab", type=int, default=None, help=f"vocabulary size ({d['vocab']})")
    p.add_argument(
        "--contexts",
        type=int_list,
        default=None,
        help=f"decode context lengths ({','.join(map(str, d['contexts']))})",
    )
    p.add_argument(
        "--fractions",
        type=float_list,
        default=None,
        help="HAM cached fractions (0.1,0.25,0.5)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"timed decode steps per model per round ({d['steps']})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"decode rounds; medians over all their steps ({d['repeats']})",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps per context (2)")
    p.add_argument(
        "--prefill-step-size",
        type=int,
        default=None,
        metavar="N",
        help="prompt chunk size when filling the decode and onnx contexts (1024)",
    )
    p.add_argument("--chunk", type=int, dest="prefill_step_size", action=DeprecatedAlias,
                   new="--prefill-step-size")  # fmt: skip
    p.add_argument(
        "--prefill-lengths",
        type=int_list,
        default=None,
        help=f"op prefill lengths ({','.join(map(str, d['prefill_lengths']))})",
    )
    p.add_argument(
        "--prefill-repeats",
        type=int,
        default=None,
        help=f"timed runs per op and length ({d['prefill_repeats']})",
    )
    p.add_argument(
        "--probe-mb",
        type=int,
        default=None,
        help=f"MiB streamed by the bandwidth probe ({d['probe_mb']})",
    )
    p.add_argument(
        "--onnx-contexts",
        type=int_list,
        default=None,
        help=f"onnx part: context lengths ({','.join(map(str, d['onnx_contexts']))})",
    )
    p.add_argument(
        "--onnx-fraction", type=float, default=None, help="onnx part: HAM cached fraction (0.25)"
    )
    p.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm Llama peer")
    p.add_argument("--seed", type=int, default=0, help="weights and tokens seed (0)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="output folder (bench-results)")  # fmt: skip


# Which parts use an option: one given for parts that do not run is refused.
USED_BY = {
    "preset": ("decode", "prefill", "onnx"), "vocab": ("decode", "prefill", "onnx"),
    "contexts": ("decode",), "fractions": ("decode", "prefill"), "steps": ("decode", "onnx"),
    "repeats": ("decode", "onnx"), "warmup": ("decode", "onnx"),
    "prefill_step_size": ("decode", "onnx"), "prefill_lengths": ("prefill",),
    "prefill_repeats": ("prefill",), "probe_mb": ("probe",), "onnx_contexts": ("onnx",),
    "onnx_fraction": ("onnx",), "no_mlx_lm": ("decode",),
}  # fmt: skip


def check_arguments(a: argparse.Namespace, error) -> None:
    """An option for parts that do not run (--parts) is an argparse error."""
    for key, parts in USED_BY.items():
        value = getattr(a, key)
        if value is None or value is False or any(p in a.parts for p in parts):
            continue
        error(f"--{key.replace('_', '-')} applies to the {' and '.join(parts)} part"
              f"{'s' if len(parts) > 1 else ''}, and --parts {','.join(a.parts)} runs none of "
              "them")  # fmt: skip


def resolve(a: argparse.Namespace) -> dict[str, Any]:
    """Options with defaults filled in: explicit ones, then --quick's, then the full run's."""
    base = {**DEFAULTS, **(QUICK if a.quick else {})}
    o = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    given = {"fractions": a.fractions, "warmup": a.warmup, "chunk": a.prefill_step_size,
             "onnx_fraction": a.onnx_fraction}  # fmt: skip
    o.update({k: v if v is not None else OTHER_DEFAULTS[k] for k, v in given.items()})
    o.update(parts=a.parts, quick=a.quick, no_mlx_lm=a.no_mlx_lm, seed=a.seed,
             out=str(a.out))  # fmt: skip
    for key in ("contexts", "prefill_lengths", "onnx_contexts"):
        if any(n < 1 for n in o[key]):
            raise ValueError(f"--{key.replace('_', '-')}: lengths must be positive")
    if o["chunk"] < 1 or o["warmup"] < 0:
        raise ValueError("--prefill-step-size must be >= 1, --warmup >= 0")
    if any(not 0 < f <= 1 for f in [*o["fractions"], o["onnx_fraction"]]):
        raise ValueError("--fractions, --onnx-fraction: each fraction must lie in (0, 1]")
    for key in ("steps", "repeats", "prefill_repeats", "probe_mb", "vocab"):
        if o[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    return o


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(a: argparse.Namespace) -> int:
    from ham_mlx.bench import contenders, decode, machine, onnx, prefill, probe, report, targets

    o = resolve(a)
    results: dict[str, Any] = {
        "command": "ham-mlx " + shlex.join(getattr(a, "argv", ["bench"])),
        "options": o, "notes": [],
    }  # fmt: skip
    results["machine"] = machine.machine_info()
    print(machine.describe(results["machine"]))
    if results["machine"]["openblas"] is None and sys.platform.startswith("linux"):
        results["notes"].append(
            "OpenBLAS was not loaded: MLX uses its slow reference BLAS"
            " (docs/benchmarks.md, Linux speed)"
        )
    if "probe" in o["parts"]:
        log("probe: memory bandwidth and matmul throughput")
        results["probe"] = probe.probe(o["probe_mb"])
        p = results["probe"]
        print(
            f"read {p['read_gbps']:.1f} GB/s (numpy {p['numpy_matvec_gbps']:.1f}, MLX "
            f"{p['mlx_matvec_gbps']:.1f}) | copy {p['copy_gbps']:.1f} GB/s | MLX matmul "
            f"{p['mlx_matmul_gflops']:.0f} GFLOP/s"
        )
    if "decode" in o["parts"]:
        with_peer = not o["no_mlx_lm"] and contenders.have_mlx_lm()
        if not o["no_mlx_lm"] and not with_peer:
            print(contenders.MLX_LM_MISSING, file=sys.stderr)
            results["notes"].append(contenders.MLX_LM_MISSING)
        log(f"decode: preset {o['preset']}, contexts {o['contexts']}")
        models = contenders.build_contenders(
            o["preset"], o["vocab"], o["fractions"], with_peer, o["seed"]
        )
        read = results.get("probe", {}).get("read_gbps")
        results["decode"] = decode.run_decode(
            models, o["contexts"], o["steps"], o["repeats"], o["warmup"], o["chunk"], o["vocab"],
            read, log, o["seed"],
        )  # fmt: skip
        del models
    if "prefill" in o["parts"]:
        args = contenders.decode_args(o["preset"], o["vocab"], "ham")
        log(f"prefill: scan and attention ops, lengths {o['prefill_lengths']}")
        results["prefill"] = {
            "scan": prefill.run_scan(args, o["prefill_lengths"], o["prefill_repeats"], log),
            "attention": prefill.run_attention(
                args, o["prefill_lengths"], o["fractions"], o["prefill_repeats"], log
            ),
        }
    if "onnx" in o["parts"]:
        log(f"onnx: onnxruntime vs MLX, preset {o['preset']}, contexts {o['onnx_contexts']}")
        results["onnx"] = onnx.run_onnx(
            o["preset"], o["vocab"], o["onnx_contexts"], o["onnx_fraction"], o["steps"],
            o["repeats"], o["warmup"], o["chunk"], log, o["seed"],
        )  # fmt: skip
        if results["onnx"]["status"] != "measured":
            log(f"onnx: {results['onnx']['status']}")
    results["targets"] = targets.evaluate(results)
    results["machine"]["load_average_end"] = machine.machine_info()["load_average"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(report.MATPLOTLIB_MISSING, file=sys.stderr)
        results["notes"].append(report.MATPLOTLIB_MISSING)
    paths = report.write(results, Path(o["out"]))
    print()
    print(report.headline_table(results))
    print()
    for t in results["targets"]:
        print(f"[{t['status']}] {t['target']}: {t['detail']}")
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0
