"""Qwen3.5 checkpoints (transformers' `qwen3_5` / `qwen3_5_text`) -> ham_mlx (spec §5.1).

Both published layouts read: `Qwen3_5ForConditionalGeneration` (`model_type: qwen3_5`, the text
model's config under `text_config`, weights under `model.language_model.`; the vision tower
`model.visual.*` is dropped) and `Qwen3_5ForCausalLM` (`qwen3_5_text`, weights under `model.`).
The multi-token-prediction tensors `mtp.*` are dropped in both.

Linear-attention layers become `gdn` layers: `in_proj_qkv` and the `conv1d` rows split into
q | k | v, `in_proj_z` is the output gate (`g_proj`), `norm` the gated norm (`o_norm`, as is).
Full-attention layers become `attn` layers of the gated variant. The zero-centred norms
(`x̂ · (1 + w)`: block, final, q/k) are stored as `1 + w`, computed in float32.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from ham_mlx.config import ModelArgs
from ham_mlx.convert.mapping import HF_FIELDS, WeightPlan, check_none_missing, drop_tied_head
from ham_mlx.convert.tensors import FLOAT_DTYPES, ConversionError, LazyTensor, check_dtype
from ham_mlx.model import Model

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
# Text-config keys that change no forward pass of the language model.
NEUTRAL = {
    "architectures", "attention_dropout", "dtype", "torch_dtype", "initializer_range",
    "max_position_embeddings", "use_cache", "transformers_version", "mtp_num_hidden_layers",
    "mtp_use_dedicated_embeddings", "full_attention_interval", "layer_types",
    "output_router_logits", "router_aux_loss_coef", "attn_output_gate", "rope_scaling",
    "mamba_ssm_dtype", "mlp_only_layers",
}  # fmt: skip
READ = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
    "linear_num_key_heads", "linear_num_value_heads", "rope_parameters", "rope_theta",
    "partial_rotary_factor", "bos_token_id", "eos_token_id", "pad_token_id",
}  # fmt: skip
# Top-level keys of a `qwen3_5` (vision-language) config besides text_config.
OUTER = {
    "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "tie_word_embeddings", "text_config",
}  # fmt: skip
MIXERS = {"linear_attention": "gdn", "full_attention": "attn"}
DROPPED = re.compile(r"^(mtp\.|model\.visual\.)")
ZERO_CENTRED = re.compile(r"(input_layernorm|post_attention_layernorm|[qk]_norm)\.weight$")
TEXT_DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "head_dim": 256,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "tie_word_embeddings": False,
}  # fmt: skip


def handles(raw: dict[str, Any]) -> bool:
    return raw.get("model_type") in MODEL_TYPES


def text_config(raw: dict[str, Any], file: str) -> dict[str, Any]:
    """The language model's config: `text_config` of a `qwen3_5` config, or the config itself.
    A `qwen3_5` config's top-level `tie_word_embeddings` decides over the nested one."""
    if raw["model_type"] == "qwen3_5_text":
        return dict(raw)
    text = raw.get("text_config")
    if not isinstance(text, dict):
        raise ConversionError(f"{file}: model_type 'qwen3_5' needs a text_config object")
    unknown = sorted(set(raw) - OUTER - NEUTRAL - HF_FIELDS - {"model_type"})
    if unknown:
        raise ConversionError(f"{file}: unknown config key(s) {unknown}")
    text = dict(text)
    if "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return text


def map_config(raw: dict[str, Any], file: str) -> ModelArgs:
    """A Qwen3.5 config.json as ham_mlx ModelArgs (`gdn` and gated `attn` layers)."""

    def fail(key: str, msg: str) -> ConversionError:
        return ConversionError(f"{file}: {key}={text.get(key)!r}: {msg}")

    text = text_config(raw, file)
    unknown = sorted(set(text) - READ - NEUTRAL - HF_FIELDS - {"model_type"})
    if unknown:
        raise ConversionError(
            f"{file}: unknown config key(s) {unknown}: ham-mlx cannot tell whether they change "
            "the model"
        )
    text = {**TEXT_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}
    if text["hidden_act"] not in ("silu", "swish"):
        raise fail("hidden_act", "only 'silu' is supported")
    if text["attention_bias"]:
        raise fail("attention_bias", "attention biases are not supported")
    if text.get("mlp_only_layers"):
        raise fail("mlp_only_layers", "mixture-of-experts layers are not supported")
    if text.get("mamba_ssm_dtype", "float32") != "float32":
        raise fail("mamba_ssm_dtype", "the recurrent state is always float32 here")
    if text.get("attn_output_gate", True) is not True:
        raise fail("attn_output_gate", "Qwen3.5 attention always has its output gate")
    rope = dict(text.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise fail("rope_parameters", f"rope_type {rope_type!r} is not supported ('default')")
    theta = rope.get("rope_theta", text.get("rope_theta", 10000.0))
    rotary = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    n = text.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        raise fail("num_hidden_layers", "must be a positive integer")
    kinds = text.get("layer_types")
    if kinds is None:
        every = text.get("full_attention_interval", 4)
        kinds = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                 for i in range(n)]  # fmt: skip
    bad = [k for k in kinds if k not in MIXERS]
    if bad or len(kinds) != n:
        raise fail("layer_types", f"expected {n} entries of {tuple(MIXERS)}")
    Dk, Dv = text["linear_key_head_dim"], text["linear_value_head_dim"]
    expand_v = Dv / Dk if isinstance(Dk, int) and isinstance(Dv, int) and Dk > 0 else 0
    if not expand_v or int(Dk * expand_v) != Dv:
        raise fail("linear_value_head_dim", f"cannot be written as linear_key_head_dim={Dk} "
                   "times a ratio")  # fmt: skip
    eos = text.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    params = dict(
        model_type="ham", vocab_size=text.get("vocab_size"), hidden_size=text.get("hidden_size"),
        num_hidden_layers=n, intermediate_size=text.get("intermediate_size"),
        num_heads=text["linear_num_key_heads"], num_v_heads=text["linear_num_value_heads"],
        head_dim=Dk, expand_v=expand_v, conv_size=text["linear_conv_kernel_dim"],
        use_gate=True, output_gate_activation="silu", norm_eps=text["rms_norm_eps"],
        hidden_act="silu", tie_word_embeddings=bool(text["tie_word_embeddings"]),
        attn={
            "num_heads": text.get("num_attention_heads"),
            "num_kv_heads": text.get("num_key_value_heads"), "head_dim": text["head_dim"],
            "rope_theta": float(theta), "partial_rotary_factor": rotary,
            "output_gate": "sigmoid", "qk_norm": True, "window_size": None, "qkv_bias": False,
        },
        bos_token_id=text.get("bos_token_id"), eos_token_id=eos,
        pad_token_id=text.get("pad_token_id"), layer_types=[MIXERS[k] for k in kinds],
    )  # fmt: skip
    if "attn" not in params["layer_types"]:
        params["attn"] = None
    try:
        return ModelArgs(**params)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{file}: {e}") from None


def dropped(tensors: dict[str, LazyTensor]) -> list[str]:
    """One line per group of source tensors that the language model does not use."""
    groups = {"model.visual.": "vision tower", "mtp.": "multi-token prediction"}
    out = []
    for prefix, what in groups.items():
        n = sum(k.startswith(prefix) for k in tensors)
        if n:
            out.append(f"dropped {n} {what} tensors ({prefix}*)")
    return out


class Rows:
    """Row slices of one source tensor, read once for all of them (the last one read is kept)."""

    def __init__(self, tensor: LazyTensor) -> None:
        self.tensor = tensor
        self.cached: np.ndarray | None = None
        self.left = 0

    def part(self, name: str, start: int, stop: int) -> LazyTensor:
        self.left += 1

        def read() -> np.ndarray:
            if self.cached is None:
                self.cached = self.tensor.numpy()
            rows = self.cached[start:stop].copy()
            self.left -= 1
            if self.left == 0:
                self.cached = None
            return rows

        t = self.tensor
        return LazyTensor(t.file, f"{t.name}[{start}:{stop}]", t.dtype,
                          (stop - start, *t.shape[1:]), read)  # fmt: skip


def one_plus(t: LazyTensor) -> LazyTensor:
    """A zero-centred norm weight w as the plain weight 1 + w, float32."""

    def read() -> np.ndarray:
        w = t.numpy()
        if t.dtype == "BF16":
            w = (w.astype(np.uint32) << 16).view(np.float32)
        return 1.0 + w.astype(np.float32)

    return LazyTensor(t.file, t.name, "F32", t.shape, read)


def plan_weights(args: ModelArgs, model: Model, tensors: dict[str, LazyTensor]) -> WeightPlan:
    """Map Qwen3.5 tensors to ham_mlx names, checking every name, shape and dtype."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    prefix = "model.language_model." if any(k.startswith("model.language_model.")
                                            for k in tensors) else "model."  # fmt: skip
    H, HV, Dk, Dv = args.num_heads, args.num_v_heads, args.head_dim, args.head_v_dim
    splits = {"q": (0, H * Dk), "k": (H * Dk, 2 * H * Dk), "v": (2 * H * Dk, 2 * H * Dk + HV * Dv)}
    sources: dict[str, LazyTensor] = {}
    transpose: set[str] = set()
    for key, t in tensors.items():
        if DROPPED.match(key) or key.endswith("rotary_emb.inv_freq"):
            continue
        check_dtype(t.dtype, t.where)
        if t.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{t.where}: dtype {t.dtype}, expected a floating-point type")
        if key == "lm_head.weight":
            sources[key] = t
            continue
        if not key.startswith(prefix):
            raise ConversionError(f"{t.where}: unknown tensor (not a Qwen3.5 language model's)")
        name = key[len(prefix) :]
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if m is None:
            names = {"embed_tokens.weight": "model.embeddings.weight",
                     "norm.weight": "model.norm.weight"}  # fmt: skip
            if name not in names:
                raise ConversionError(f"{t.where}: unknown tensor")
            sources[names[name]] = one_plus(t) if name == "norm.weight" else t
            continue
        i, rest = int(m[1]), m[2]
        out = f"model.layers.{i}."
        if i >= args.num_hidden_layers:
            raise ConversionError(f"{t.where}: layer {i}, the config has {args.num_hidden_layers}")
        kind = args.layer_types[i]
        if rest.startswith(("linear_attn.", "self_attn.")):
            found = "gdn" if rest.startswith("linear_attn.") else "attn"
            if found != kind:
                raise ConversionError(
                    f"{t.where}: a {found} tensor in layer {i}, which the config makes {kind!r}"
                )
        if rest == "input_layernorm.weight":
            sources[out + "attn_norm.weight"] = one_plus(t)
        elif rest == "post_attention_layernorm.weight":
            sources[out + "mlp_norm.weight"] = one_plus(t)
        elif rest.startswith("mlp."):
            sources[out + rest] = t
        elif rest.startswith("self_attn."):
            sources[out + "attn." + rest[len("self_attn.") :]] = (
                one_plus(t) if ZERO_CENTRED.search(rest) else t
            )
        elif rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
            want = splits["v"][1]
            if t.shape[0] != want:
                raise ConversionError(f"{t.where}: {t.shape[0]} rows, the config needs {want}")
            rows = Rows(t)
            conv = rest.endswith("conv1d.weight")
            for x, (a, b) in splits.items():
                target = out + (f"attn.{x}_conv1d.weight" if conv else f"attn.{x}_proj.weight")
                sources[target] = rows.part(key, a, b)
                if conv:
                    transpose.add(target)
        else:
            renames = {
                "linear_attn.in_proj_z.weight": "attn.g_proj.weight",
                "linear_attn.in_proj_a.weight": "attn.a_proj.weight",
                "linear_attn.in_proj_b.weight": "attn.b_proj.weight",
                "linear_attn.out_proj.weight": "attn.o_proj.weight",
                "linear_attn.norm.weight": "attn.o_norm.weight",
                "linear_attn.A_log": "attn.A_log",
                "linear_attn.dt_bias": "attn.dt_bias",
            }
            if rest not in renames:
                raise ConversionError(f"{t.where}: unknown tensor")
            sources[out + renames[rest]] = t
    if args.tie_word_embeddings:
        drop_tied_head(sources, "embed_tokens.weight")
    unknown = sorted(set(sources) - set(expected))
    if unknown:
        raise ConversionError(f"{sources[unknown[0]].where}: unknown parameter ({unknown[:5]})")
    check_none_missing(expected, sources)
    for name, t in sources.items():
        want = expected[name]
        shape = (t.shape[0], t.shape[2], t.shape[1]) if name in transpose else t.shape
        if shape != want:
            raise ConversionError(f"{t.where}: shape {t.shape}, the config needs {want}")
    return WeightPlan(sources, transpose)
