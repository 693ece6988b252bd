"""Generate the FLA 0.6.0 oracle fixtures in tests/fixtures/fla/ (run by hand; not in CI).

FLA itself computes every expected number: its `GatedDeltaNetForCausalLM` runs on the CPU with the
real Triton kernels in Triton's interpreter (`patch_fla_for_cpu`). For each
configuration this writes `<name>/config.json` + `<name>/model.safetensors` (FLA's own
`save_pretrained`: the source layout that `ham-mlx convert` reads) and `<name>/oracle.safetensors`:

    input_ids [B, T], logits [B, T, V]           one prefill forward (chunk kernel when T > 64)
    decode_ids [B, S], decode_logits [B, S, V]   S single-token steps after the prefill
    {prefill,decode}.{i}.recurrent_state         [B, HV, Dv, Dk] (V-first, as FLA's layer keeps it)
    {prefill,decode}.{i}.conv_state.{q,k,v}      [B, C, Kc]: the last Kc raw projected inputs
    {prefill,decode}.{i}.attn_state.{k,v}        [B, T', Nkv * hd]: keys after RoPE (last W)

Environment (pinned; torch 2.13.0 CPU comes from a local file here), in a separate venv:

    python3 -m venv --system-site-packages /tmp/flavenv
    /tmp/flavenv/bin/pip install torch==2.13.0 triton==3.9.0 flash-linear-attention==0.6.0 \
        fla-core==0.6.0 transformers==5.24.0
    /tmp/flavenv/bin/python scripts/make_fla_fixtures.py            # ~2 minutes on 2 cores

Weights are re-randomised (norm weights in [0.5, 1.5], projections ~ N(0, 1/fan_in), embeddings
~ N(0, 1), or N(0, 1/D) when tied to the head) so that logits are O(1) and the fixtures catch
real bugs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton / fla are imported

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

VERSIONS = {"torch": "2.13.0", "triton": "3.9.0", "flash-linear-attention": "0.6.0",
            "fla-core": "0.6.0", "transformers": "5.24.0"}  # fmt: skip
B, DECODE_STEPS = 2, 5
BASE = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=96,
            intermediate_size=96, norm_eps=1e-6, fuse_cross_entropy=False)  # fmt: skip
ATTN = {"num_heads": 4, "num_kv_heads": 2, "rope_theta": 10000.0}
CONFIGS = {
    # name: (config overrides, prefill length T, what it covers)
    "gdn": ({}, 80, "plain GDN, chunk kernel (T > 64)"),
    "gva": ({"num_heads": 2, "num_v_heads": 4}, 80, "grouped value heads (HV = 2 H)"),
    "negeig_tied_sigmoid": (
        {"allow_neg_eigval": True, "tie_word_embeddings": True,
         "output_gate_activation": "sigmoid", "conv_size": 3},
        48, "allow_neg_eigval, tied embeddings, sigmoid output gate, Kc = 3, fused-recurrent "
        "kernel (T <= 64)",
    ),
    "hybrid": (
        {"num_hidden_layers": 3, "attn": {**ATTN, "layers": [1]}},
        80, "gdn / attn (GQA, RoPE) / gdn",
    ),
    "window_nogate": (
        {"attn": {**ATTN, "num_kv_heads": 1, "window_size": 12, "rope_theta": 500.0,
                  "layers": [0]},
         "use_gate": False},
        80, "sliding-window attention (W = 12, MQA) then GDN with use_gate=False",
    ),
}  # fmt: skip
TORCH_BIN_COPY = "negeig_tied_sigmoid"  # also written as pytorch_model.bin (tied: shared storage)


def patch_fla_for_cpu() -> None:
    """Run FLA's real Triton kernels in the Triton interpreter on the CPU."""
    prune = Autotuner.prune_configs
    Autotuner.prune_configs = lambda self, *a, **k: prune(self, *a, **k)[:1]

    import fla.ops.common.chunk_delta_h as chunk_delta_h

    class Index(int):  # the interpreter hands the kernel a Python int for `i_t.to(tl.int64)`
        def to(self, dtype):
            return self

    chunk_delta_h.range = lambda *a: (Index(i) for i in range(*a))

    import fla.layers.attn as fla_attn

    fla_attn.flash_attn_func = torch_flash_attn


def torch_flash_attn(q, k, v, causal=True, window_size=(-1, -1)):
    """flash_attn_func in torch: q [B, Tq, N, hd], k/v [B, Tk, Nkv, hd]; causal, bottom-right
    aligned; window (W-1, 0) keeps W keys including the current one; GQA."""
    Tq, N, hd = q.shape[1], q.shape[2], q.shape[3]
    Tk, Nkv = k.shape[1], k.shape[2]
    k, v = (a.repeat_interleave(N // Nkv, dim=2) for a in (k, v))
    z = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(hd)
    qpos = torch.arange(Tq)[:, None] + (Tk - Tq)
    kpos = torch.arange(Tk)[None, :]
    mask = kpos <= qpos
    if window_size[0] >= 0:
        mask = mask & (kpos >= qpos - window_size[0])
    p = torch.softmax(z.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


@torch.no_grad()
def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tied = model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith("embeddings.weight"):  # tied: it is also the head, keep logits O(1)
            p.copy_(torch.randn(p.shape, generator=g) / (math.sqrt(p.shape[1]) if tied else 1))
        elif "conv1d" in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        # A_log and dt_bias keep FLA's initialisation


def layer_states(cache, n_layers: int, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n_layers):
        s = cache[i]
        if s.get("recurrent_state") is not None:
            out[f"{prefix}.{i}.recurrent_state"] = s["recurrent_state"]
        if s.get("conv_state") is not None:
            for name, c in zip("qkv", s["conv_state"]):
                out[f"{prefix}.{i}.conv_state.{name}"] = c
        if s.get("attn_state") is not None:
            for name, a in zip("kv", s["attn_state"]):
                out[f"{prefix}.{i}.attn_state.{name}"] = a
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def make_fixture(name: str, out: Path, seed: int) -> dict:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    from safetensors.torch import save_file

    overrides, T, about = CONFIGS[name]
    config = GatedDeltaNetConfig(**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = GatedDeltaNetForCausalLM(config).float().eval()
    randomize(model, seed)
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    for f in folder.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    if name == TORCH_BIN_COPY:
        copy = out / f"{name}-bin"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        shutil.copy(folder / "config.json", copy / "config.json")
        torch.save(model.state_dict(), copy / "pytorch_model.bin")

    g = torch.Generator().manual_seed(seed + 1)
    V = config.vocab_size
    ids = torch.randint(0, V, (B, T), generator=g)
    decode_ids = torch.randint(0, V, (B, DECODE_STEPS), generator=g)
    t0 = time.time()
    with torch.no_grad():
        res = model(input_ids=ids, use_cache=True)
        cache = res.past_key_values
        oracle = {"input_ids": ids, "logits": res.logits.float()}
        oracle.update(layer_states(cache, config.num_hidden_layers, "prefill"))
        steps = []
        for s in range(DECODE_STEPS):
            r = model(input_ids=decode_ids[:, s : s + 1], past_key_values=cache, use_cache=True)
            cache = r.past_key_values
            steps.append(r.logits.float())
        oracle["decode_ids"] = decode_ids
        oracle["decode_logits"] = torch.cat(steps, 1)
        oracle.update(layer_states(cache, config.num_hidden_layers, "decode"))
    save_file({k: v.contiguous() for k, v in oracle.items()}, str(folder / "oracle.safetensors"))
    logits = oracle["logits"]
    info = {
        "about": about, "seed": seed, "batch": B, "prefill_tokens": T,
        "decode_steps": DECODE_STEPS,
        "prefill_kernel": "chunk" if T > 64 else "fused_recurrent",
        "logits_std": round(float(logits.std()), 3),
        "logits_abs_max": round(float(logits.abs().max()), 3),
    }  # fmt: skip
    print(f"{name:22s} {time.time() - t0:5.1f} s {json.dumps(info)}", flush=True)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "tests/fixtures/fla")
    p.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to make")
    a = p.parse_args()
    import fla
    import transformers
    import triton

    found = {
        "torch": torch.__version__.split("+")[0],
        "triton": triton.__version__,
        "flash-linear-attention": fla.__version__,
        "transformers": transformers.__version__,
    }
    for pkg, v in found.items():
        if v != VERSIONS[pkg]:
            raise SystemExit(f"{pkg} {v} is installed; these fixtures pin {VERSIONS[pkg]}")
    patch_fla_for_cpu()
    a.out.mkdir(parents=True, exist_ok=True)
    meta_file = a.out / "fixtures.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta["versions"] = VERSIONS
    meta.setdefault("fixtures", {})
    for i, name in enumerate(sorted(CONFIGS)):
        if a.only and name not in a.only:
            continue
        meta["fixtures"][name] = make_fixture(name, a.out, seed=1000 + i)
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
