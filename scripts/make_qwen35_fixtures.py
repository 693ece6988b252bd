"""Generate the Qwen3.5 oracle fixtures in tests/fixtures/qwen35/ (run by hand; not in CI).

transformers' own Qwen3.5 classes compute every expected number, in float32 on the CPU. For each
configuration this writes the checkpoint folder as `save_pretrained` writes it (`config.json`,
`model.safetensors` or shards with an index: the layout `ham-mlx convert` reads) and
`oracle.safetensors`:

    input_ids [B, T], logits [B, T, V]           one prefill forward (chunked rule when T > 64)
    decode_ids [B, S], decode_logits [B, S, V]   S single-token steps after the prefill

Needs torch (CPU) and transformers >= 5.25 (`pip install -e .[test]`):

    python3 scripts/make_qwen35_fixtures.py            # a few seconds

Weights are re-randomised so that logits are O(1) and every part matters: zero-centred norm
weights w ~ U(-0.5, 0.5) (the scale is 1 + w), gated-norm weights ~ U(0.5, 1.5), projections
~ N(0, 1/fan_in), embeddings ~ N(0, 1) (N(0, 1/D) when tied to the head).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.models.qwen3_5 import (
    Qwen3_5Config,
    Qwen3_5ForCausalLM,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
)

B, DECODE_STEPS = 2, 4
TEXT = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=24, linear_conv_kernel_dim=4,
    linear_key_head_dim=16, linear_value_head_dim=24, linear_num_key_heads=2,
    linear_num_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=16,
              out_hidden_size=64)  # fmt: skip
CONFIGS = {
    # name: (layout, text overrides, prefill length T, weight dtype, shard, what it covers)
    "text_gva": (
        "text", {}, 70, torch.float32, None,
        "Qwen3_5ForCausalLM, 3 GDN : 1 attn, HV = 2 H, Dv = 24, head_dim 24 != 64/4, "
        "rotary 6 of 24, chunked rule (T > 64)",
    ),
    "vl_tied": (
        "vl",
        {"tie_word_embeddings": True, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 40, "linear_key_head_dim": 32, "linear_value_head_dim": 40,
         "linear_num_key_heads": 2, "linear_num_value_heads": 2, "layer_types":
         ["linear_attention", "full_attention", "linear_attention", "full_attention"],
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                             "partial_rotary_factor": 0.5,
                             "mrope_section": [2, 3, 0], "mrope_interleaved": True}},
        40, torch.float32, None,
        "Qwen3_5ForConditionalGeneration (vision tower and mtp.* dropped), tied head, "
        "Dv = 40, head_dim 40, rotary 20 of 40, GDN 1 : 1 attn",
    ),
    "text_bf16_sharded": (
        "text", {"linear_conv_kernel_dim": 3}, 24, torch.bfloat16, "60KB",
        "bfloat16 weights in shards with an index, Kc = 3 (oracle: float32 from those weights)",
    ),
}  # fmt: skip


def randomise(model: torch.nn.Module, tied: bool, D: int) -> None:
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "visual" in name:
            continue
        if name.endswith("linear_attn.norm.weight"):
            x = 0.5 + torch.rand(p.shape, generator=g)
        elif name.endswith("norm.weight"):  # zero-centred: the scale is 1 + w
            x = torch.rand(p.shape, generator=g) - 0.5
        elif name.endswith("A_log"):
            x = torch.log(1 + 15 * torch.rand(p.shape, generator=g))
        elif name.endswith("dt_bias"):
            x = torch.randn(p.shape, generator=g) - 2
        elif "embed_tokens" in name:
            x = torch.randn(p.shape, generator=g) / (math.sqrt(D) if tied else 1)
        else:
            fan_in = p.shape[-1] if p.ndim == 2 else p.shape[-1] * p.shape[1]
            x = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        with torch.no_grad():
            p.copy_(x.to(p.dtype))


def build(layout: str, text: dict) -> torch.nn.Module:
    if layout == "text":
        return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    config = Qwen3_5Config(text_config=text, vision_config=VISION,
                           tie_word_embeddings=text.get("tie_word_embeddings", False))  # fmt: skip
    return Qwen3_5ForConditionalGeneration(config)


@torch.no_grad()
def run(model, ids: torch.Tensor, decode_ids: torch.Tensor):
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    steps = []
    for s in range(decode_ids.shape[1]):
        o = model(input_ids=decode_ids[:, s : s + 1], past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        steps.append(o.logits)
    return out.logits, torch.cat(steps, dim=1)


def make(name: str, spec: tuple, out: Path, seed: int) -> dict:
    layout, overrides, T, dtype, shard, about = spec
    text = {**TEXT, **overrides}
    torch.manual_seed(seed)
    model = build(layout, text).float().eval()
    randomise(model, text.get("tie_word_embeddings", False), text["hidden_size"])
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    model.to(dtype).save_pretrained(folder, max_shard_size=shard or "1GB")
    model.float()  # the oracle runs on the saved (possibly bf16-rounded) weights, in float32
    if layout == "vl":  # published checkpoints also carry the multi-token-prediction head
        file = folder / "model.safetensors"
        weights = load_file(file)
        weights["mtp.fc.weight"] = torch.randn(8, 8).to(dtype)
        weights["mtp.layers.0.input_layernorm.weight"] = torch.zeros(8).to(dtype)
        save_file(weights, file, metadata={"format": "pt"})
    V = text["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    decode_ids = torch.randint(3, V, (B, DECODE_STEPS), generator=g)
    logits, decode_logits = run(model, ids, decode_ids)
    save_file({"input_ids": ids.int(), "logits": logits.float().contiguous(),
               "decode_ids": decode_ids.int(),
               "decode_logits": decode_logits.float().contiguous()},
              folder / "oracle.safetensors")  # fmt: skip
    return {"about": about, "layout": layout, "prefill_tokens": T, "decode_steps": DECODE_STEPS,
            "batch": B, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
            "logits_std": round(float(logits.std()), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "tests/fixtures/qwen35"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    info = {name: make(name, spec, out, 2000 + i) for i, (name, spec) in enumerate(CONFIGS.items())}
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "fixtures": info}
    (out / "fixtures.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
