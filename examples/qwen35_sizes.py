"""Qwen3.5 at its published sizes, with random weights: conversion memory, then speed beside mlx-lm.

1. Writes a `Qwen3_5ForConditionalGeneration`-layout checkpoint (bfloat16, as published) with the
   published config of Qwen3.5-0.8B or -2B and random weights, one tensor at a time.
2. Converts it with `ham-mlx convert` to float32, bfloat16 and 4-bit (group 64, float32
   activations: the fast path of a CPU), each in its own process, and reports that process's
   peak RSS against the checkpoint's size.
3. Loads each converted folder and mlx-lm's `qwen3_5` model from the same checkpoint in the same
   dtype (mlx-lm quantized with the same predicate: every linear layer and the embedding whose
   input is a multiple of 64, except the a/b projections), and times, in one process, a
   `--prefill`-token prefill (the cache evaluated, then the last token's logits, as mlx-lm's
   generate does) and `--decode` greedy decode steps after it.

    python examples/qwen35_sizes.py --size 0.8B --work /tmp/qwen35 --prefill 2048 --decode 32
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import ham_mlx  # first: it loads OpenBLAS before mlx.core

# isort: split
import mlx.core as mx
import numpy as np

# Published text configs (huggingface.co/Qwen/Qwen3.5-0.8B and -2B, config.json text_config).
SIZES = {
    "0.8B": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24),
    "2B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24),
    # not published: 0.8B's layers, 8 of them and a 32k vocabulary (about 0.2 GB), for tests
    "small": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=8,
        vocab_size=32768,
        eos_token_id=2,
    ),
}
COMMON = dict(
    model_type="qwen3_5_text", vocab_size=248320, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
    rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False, attn_output_gate=True,
    tie_word_embeddings=True, max_position_embeddings=262144, mtp_num_hidden_layers=1,
    mtp_use_dedicated_embeddings=False, eos_token_id=248044, dtype="bfloat16",
    rope_parameters={"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                     "rope_type": "default", "rope_theta": 10000000,
                     "partial_rotary_factor": 0.25},
)  # fmt: skip


def text_config(size: str) -> dict:
    c = {**COMMON, **SIZES[size]}
    n = c["num_hidden_layers"]
    c["layer_types"] = ["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                        for i in range(n)]  # fmt: skip
    return c


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the language model, by its checkpoint name."""
    D, V, F = c["hidden_size"], c["vocab_size"], c["intermediate_size"]
    H, HV = c["linear_num_key_heads"], c["linear_num_value_heads"]
    Dk, Dv, Kc = c["linear_key_head_dim"], c["linear_value_head_dim"], c["linear_conv_kernel_dim"]
    N, Nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = "model.language_model."
    out = {p + "embed_tokens.weight": (V, D), p + "norm.weight": (D,)}
    for i, kind in enumerate(c["layer_types"]):
        q = f"{p}layers.{i}."
        out |= {q + "input_layernorm.weight": (D,), q + "post_attention_layernorm.weight": (D,),
                q + "mlp.gate_proj.weight": (F, D), q + "mlp.up_proj.weight": (F, D),
                q + "mlp.down_proj.weight": (D, F)}  # fmt: skip
        if kind == "linear_attention":
            a, C = q + "linear_attn.", 2 * H * Dk + HV * Dv
            out |= {a + "in_proj_qkv.weight": (C, D), a + "in_proj_z.weight": (HV * Dv, D),
                    a + "in_proj_a.weight": (HV, D), a + "in_proj_b.weight": (HV, D),
                    a + "conv1d.weight": (C, 1, Kc), a + "A_log": (HV,), a + "dt_bias": (HV,),
                    a + "norm.weight": (Dv,), a + "out_proj.weight": (D, HV * Dv)}  # fmt: skip
        else:
            a = q + "self_attn."
            out |= {a + "q_proj.weight": (2 * N * hd, D), a + "k_proj.weight": (Nkv * hd, D),
                    a + "v_proj.weight": (Nkv * hd, D), a + "o_proj.weight": (D, N * hd),
                    a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)}  # fmt: skip
    return out


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("A_log"):
        return np.log(rng.uniform(1, 16, shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        return rng.normal(-2, 1, shape).astype(np.float32)
    if name.endswith("linear_attn.norm.weight"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("norm.weight"):  # zero-centred
        return rng.uniform(-0.1, 0.1, shape).astype(np.float32)
    fan_in = shape[-1] if len(shape) == 2 else shape[-1] * shape[1]
    x = rng.standard_normal(shape, dtype=np.float32)
    return x * np.float32(fan_in**-0.5 if "embed" not in name else shape[-1] ** -0.5)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def write_checkpoint(folder: Path, size: str, seed: int = 0) -> int:
    """config.json + model.safetensors (bfloat16; A_log, dt_bias float32), one tensor in memory
    at a time. Returns the weights' bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    text = text_config(size)
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "tie_word_embeddings": True, "text_config": text}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = shapes(text)
    for name, shape in names.items():
        f32 = name.endswith(("A_log", "dt_bias"))
        n = int(np.prod(shape)) * (4 if f32 else 2)
        header[name] = {"dtype": "F32" if f32 else "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(seed)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name, shape in names.items():
            x = random_tensor(name, shape, rng)
            f.write((x if name.endswith(("A_log", "dt_bias")) else bf16_bits(x)).tobytes())
    return offset


CONVERT = """
import sys, time
import ham_mlx
from ham_mlx.convert import convert
src, dst, dtype, quantize = sys.argv[1:5]
t = time.perf_counter()
convert(src, dst, dtype=dtype, quantize=quantize == "1", q_bits=4, q_group_size=64, overwrite=True)
# VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(int(hwm.split()[1]), time.perf_counter() - t)
"""


def convert_measured(src: Path, dst: Path, dtype: str, quantize: bool) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a conversion in a fresh process (Linux)."""
    args = [sys.executable, "-c", CONVERT, str(src), str(dst), dtype, "1" if quantize else "0"]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"conversion to {dtype} failed:\n{run.stderr[-3000:]}")
    out = run.stdout.split()
    return int(out[-2]) / 1024, float(out[-1])


def time_model(model, make_cache, ids, n_decode: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for ids [1, T] then n_decode greedy steps."""
    cache = make_cache()
    t = time.perf_counter()
    model(ids[:, :-1], cache=cache)
    mx.eval([c.state for c in cache])
    y = mx.argmax(model(ids[:, -1:], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    prefill = ids.shape[1] / (time.perf_counter() - t)
    y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)  # one warm-up step
    mx.eval(y)
    t = time.perf_counter()
    for _ in range(n_decode):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
    return prefill, n_decode / (time.perf_counter() - t)


def mlx_lm_model(src: Path, dtype: str):
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    model, _ = load_model(src)
    if dtype in ("float32", "4bit"):
        model.set_dtype(mx.float32)
    if dtype == "4bit":

        def predicate(path: str, m: nn.Module) -> bool:
            keep = path.endswith(("in_proj_a", "in_proj_b"))
            return hasattr(m, "to_quantized") and not keep and m.weight.shape[-1] % 64 == 0

        nn.quantize(model, 64, 4, class_predicate=predicate)
    mx.eval(model.parameters())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.8B")
    parser.add_argument("--work", default="/tmp/qwen35-sizes")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16,4bit")
    parser.add_argument("--skip-speed", action="store_true")
    a = parser.parse_args()
    work = Path(a.work)
    src = work / f"qwen3.5-{a.size}-random"
    if not (src / "model.safetensors").is_file():
        t = time.perf_counter()
        n = write_checkpoint(src, a.size)
        print(f"wrote {src} ({n / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = (src / "model.safetensors").stat().st_size / 2**20
    dtypes = a.dtypes.split(",")
    rows = []
    for dtype in dtypes:
        dst = work / f"ham-{a.size}-{dtype}"
        rss, secs = convert_measured(src, dst, "float32" if dtype == "4bit" else dtype,
                                     dtype == "4bit")  # fmt: skip
        out = sum(f.stat().st_size for f in dst.glob("*.safetensors")) / 2**20
        rows.append((dtype, rss, secs, out))
        print(f"convert {dtype:9s} peak RSS {rss:7.0f} MB  checkpoint {ckpt:6.0f} MB  "
              f"output {out:6.0f} MB  {secs:5.1f} s", flush=True)  # fmt: skip
    if a.skip_speed:
        return
    from mlx_lm.models.cache import make_prompt_cache

    V = text_config(a.size)["vocab_size"]
    ids = mx.array(np.random.default_rng(1).integers(0, V, (1, a.prefill)))
    print(f"\n{a.size}, prefill {a.prefill} tokens, then {a.decode} decode steps; tokens/s")
    print(f"{'dtype':9s} {'impl':8s} {'prefill':>9s} {'decode':>8s}", flush=True)
    for dtype in dtypes:
        model = ham_mlx.load_model(work / f"ham-{a.size}-{dtype}")
        p, d = time_model(model, model.make_cache, ids, a.decode)
        print(f"{dtype:9s} {'ham-mlx':8s} {p:9.1f} {d:8.2f}", flush=True)
        del model
        model = mlx_lm_model(src, dtype)
        p, d = time_model(model, lambda m=model: make_prompt_cache(m), ids, a.decode)
        print(f"{dtype:9s} {'mlx-lm':8s} {p:9.1f} {d:8.2f}", flush=True)
        del model
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"(this process's peak RSS {peak:.0f} MB)")


if __name__ == "__main__":
    main()
