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
    "prompt_lengths": [256, 1024], "peer_max_length": 1024,
}  # fmt: skip
DEFAULTS = {
    "preset": "base", "vocab": 32000, "contexts": [512, 2048, 8192, 16384], "steps": 4,
    "repeats": 10, "prefill_lengths": [512, 1024, 4096], "prefill_repeats": 3, "probe_mb": 256,
    "onnx_contexts": [512, 2048], "prompt_lengths": [2048, 4096, 16384], "peer_max_length": 4096,
}  # fmt: skip
OTHER_DEFAULTS = {"fractions": [0.1, 0.25, 0.5], "warmup": 2, "chunk": 1024, "onnx_fraction": 0.25,
                  "prompt_fractions": [0.1, 0.25]}  # fmt: skip

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
           mlx-lm's two peers (need mlx-lm): its Llama and its Gated DeltaNet model
           (qwen3_5 with only linear-attention layers, the widths of all-GDN). Each step's
           bytes (weights + KV + state) over the probe's bandwidth give the roofline.
  prefill  whole-model prefill tokens/s at each --prompt-lengths, from an empty cache in
           chunks of --prefill-step-size: all-GDN, all-HAM with each layer's τ fixed to
           admit each --prompt-fractions of the prompt, and mlx-lm's Gated DeltaNet model (up to
           --peer-max-length); the FLOPs of the weight products over the probe's matmul
           GFLOP/s give the prefill roofline. Then one layer's ops against --prefill-lengths:
           the gated-delta scan (chunked, sequential, mx.fast.gated_delta_update) and
           attention over admitted tokens (masked-dense vs admitted-only, at each --fractions).
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
  - prefill: HAM-10% >= 0.75x all-GDN at 16k and >= 0.8x at 2k, HAM-25% >= 0.55x at 16k;
    all-GDN and HAM-10% at 4k reach >= 70% of the matmul roofline;
  - against mlx-lm's Gated DeltaNet model: prefill >= 4x at 4k, decode >= 1.2x;
  - onnxruntime decodes at least as fast as MLX on CPU, on the same model.

Output in --out: results.json (everything, with raw samples), report.md (tables and the
targets: met / missed), decode.png and prefill.png (needs matplotlib).

Install the extras first: pip install 'ham-mlx[bench]'  (mlx-lm and matplotlib).
The full default run (preset base, contexts and prompts to 16k) takes about an hour on 2 cores;
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
        help="prompt chunk size of prefill, and when filling the decode and onnx contexts (1024)",
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
        help=f"timed runs per op and length, and whole-model rounds ({d['prefill_repeats']})",
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
    p.add_argument(
        "--prompt-lengths",
        type=int_list,
        default=None,
        help=f"whole-model prefill lengths ({','.join(map(str, d['prompt_lengths']))})",
    )
    p.add_argument(
        "--prompt-fractions",
        type=float_list,
        default=None,
        help="whole-model prefill: HAM cached fractions (0.1,0.25)",
    )
    p.add_argument(
        "--peer-max-length",
        type=int,
        default=None,
        help=f"longest prompt for mlx-lm's Gated DeltaNet model ({d['peer_max_length']})",
    )
    p.add_argument("--no-mlx-lm", action="store_true", help="skip the mlx-lm peers")
    p.add_argument("--seed", type=int, default=0, help="weights and tokens seed (0)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="output folder (bench-results)")  # fmt: skip


# Which parts use an option: one given for parts that do not run is refused.
USED_BY = {
    "preset": ("decode", "prefill", "onnx"), "vocab": ("decode", "prefill", "onnx"),
    "contexts": ("decode",), "fractions": ("decode", "prefill"), "steps": ("decode", "onnx"),
    "repeats": ("decode", "onnx"), "warmup": ("decode", "onnx"),
    "prefill_step_size": ("decode", "prefill", "onnx"), "prefill_lengths": ("prefill",),
    "prefill_repeats": ("prefill",), "probe_mb": ("probe",), "onnx_contexts": ("onnx",),
    "onnx_fraction": ("onnx",), "no_mlx_lm": ("decode", "prefill"),
    "prompt_lengths": ("prefill",), "prompt_fractions": ("prefill",),
    "peer_max_length": ("prefill",),
}  # fmt: skip


def check_arguments(a: argparse.Namespace, error) -> None:
    """An option for parts that do not run (--parts) is an argparse error."""
    for key, parts in USED_BY.items():
        value = getattr(a, key)
        if value is None or value is False or any(p in a.parts for p in parts):
            continue
        names = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
        error(f"--{key.replace('_', '-')} applies to the {names} part"
              f"{'s' if len(parts) > 1 else ''}, and --parts {','.join(a.parts)} runs none of "
              "them")  # fmt: skip


def resolve(a: argparse.Namespace) -> dict[str, Any]:
    """Options with defaults filled in: explicit ones, then --quick's, then the full run's."""
    base = {**DEFAULTS, **(QUICK if a.quick else {})}
    o = {k: (getattr(a, k) if getattr(a, k) is not None else v) for k, v in base.items()}
    given = {"fractions": a.fractions, "warmup": a.warmup, "chunk": a.prefill_step_size,
             "onnx_fraction": a.onnx_fraction, "prompt_fractions": a.prompt_fractions}  # fmt: skip
    o.update({k: v if v is not None else OTHER_DEFAULTS[k] for k, v in given.items()})
    o.update(parts=a.parts, quick=a.quick, no_mlx_lm=a.no_mlx_lm, seed=a.seed,
             out=str(a.out))  # fmt: skip
    for key in ("contexts", "prefill_lengths", "onnx_contexts", "prompt_lengths"):
        if any(n < 1 for n in o[key]):
            raise ValueError(f"--{key.replace('_', '-')}: lengths must be positive")
    if o["chunk"] < 1 or o["warmup"] < 0:
        raise ValueError("--prefill-step-size must be >= 1, --warmup >= 0")
    if any(not 0 < f <= 1 for f in [*o["fractions"], *o["prompt_fractions"], o["onnx_fraction"]]):
        raise ValueError(
            "--fractions, --prompt-fractions, --onnx-fraction: each fraction must lie in (0, 1]"
        )
    for key in ("steps", "repeats", "prefill_repeats", "probe_mb", "vocab", "peer_max_length"):
        if o[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    return o


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(a: argparse.Namespace) -> int:
    from ham_mlx.bench import (
        contenders,
        decode,
        machine,
        model_prefill,
        onnx,
        prefill,
        probe,
        report,
        targets,
    )

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
    with_peer = not o["no_mlx_lm"] and contenders.have_mlx_lm()
    if {"decode", "prefill"} & set(o["parts"]) and not o["no_mlx_lm"] and not with_peer:
        print(contenders.MLX_LM_MISSING, file=sys.stderr)
        results["notes"].append(contenders.MLX_LM_MISSING)
    if "decode" in o["parts"]:
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
        log(f"prefill: whole models, preset {o['preset']}, lengths {o['prompt_lengths']}")
        models = model_prefill.build_prefillers(
            o["preset"], o["vocab"], o["prompt_fractions"], with_peer, o["peer_max_length"],
            o["seed"],
        )  # fmt: skip
        gflops = results.get("probe", {}).get("mlx_matmul_gflops")
        whole = model_prefill.run_model_prefill(
            models, o["prompt_lengths"], o["prefill_repeats"], o["chunk"], o["vocab"], gflops,
            log, o["seed"],
        )  # fmt: skip
        del models
        args = contenders.decode_args(o["preset"], o["vocab"], "ham")
        log(f"prefill: scan and attention ops, lengths {o['prefill_lengths']}")
        results["prefill"] = {
            "model": whole,
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
