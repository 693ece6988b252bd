"""FLA `GatedDeltaNetForCausalLM` and HAM checkpoints -> ham_mlx: the config and the weights.

Parameter names are already ham_mlx's (spec §3-§5), so the mapping is checks plus layout:
depthwise conv weights go from torch's `[C, 1, Kc]` to MLX's `[C, Kc, 1]`, a tied checkpoint's
`lm_head.weight` is dropped, RoPE's `inv_freq` is recomputed. Everything that would change the
math and that ham_mlx does not implement is refused by name, never dropped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlx.utils import tree_flatten

from ham_mlx.config import ModelArgs
from ham_mlx.config_values import MAX_LAYERS
from ham_mlx.convert import fla_keys
from ham_mlx.convert.tensors import FLOAT_DTYPES, ConversionError, LazyTensor, check_dtype
from ham_mlx.model import Model

MODEL_TYPES = ("gated_deltanet", "ham")
# Keys that transformers writes into configs; none changes a forward pass.
HF_FIELDS = {
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "add_cross_attention", "bad_words_ids", "begin_suppress_tokens", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
    "early_stopping", "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "id2label", "is_decoder",
    "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
    "output_attentions", "output_hidden_states", "output_scores", "prefix", "problem_type",
    "pruned_heads", "remove_invalid_values", "repetition_penalty", "return_dict",
    "return_dict_in_generate", "sep_token_id", "suppress_tokens", "task_specific_params",
    "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tokenizer_class", "top_k", "top_p",
    "torchscript", "typical_p", "use_bfloat16", "keys_to_ignore_at_inference",
}  # fmt: skip
# FLA GatedDeltaNetConfig fields that leave the forward pass unchanged (with the reasons there).
FLA_NEUTRAL = set(fla_keys.IGNORED)
# FLA GatedDeltaNetConfig fields that ham_mlx implements (same names in ModelArgs).
FLA_FIELDS = set(fla_keys.READ)
ARGS_FIELDS = {f.name for f in dataclasses.fields(ModelArgs)} - {"extra", "quantization"}
# Parameters of FLA features that ham_mlx does not implement, with the feature's name.
UNSUPPORTED_PARAMS = [
    (re.compile(r"\.[qkv]_conv1d\.bias$"), "short-convolution biases (conv_bias=True)"),
    (re.compile(r"\.attn\.[qkvo]_proj\.bias$"), "attention projection biases (qkv_bias)"),
    (re.compile(r"\.attn\.[qk]_norm\."), "attention q/k norms (qk_norm)"),
    (re.compile(r"(attn_res|mlp_res|^model\.res)_(proj|norm)\."),
     "attention residuals (attnres_block_size)"),
]  # fmt: skip


def map_config(raw: dict[str, Any], file: str) -> ModelArgs:
    """A checkpoint's config.json (FLA gated_deltanet or HAM) as ham_mlx ModelArgs."""

    def fail(msg: str) -> ConversionError:
        return ConversionError(f"{file}: {msg}")

    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise fail(
            f"model_type={model_type!r} is not supported; ham-mlx converts FLA Gated DeltaNet "
            "checkpoints ('gated_deltanet', with optional attention layers), Qwen3.5 "
            "('qwen3_5', 'qwen3_5_text') and HAM ('ham')"
        )
    refused = fla_keys.refused_value(raw)
    if refused:
        raise fail(refused)
    if raw.get("quantization") is not None:
        raise fail(
            f"quantization={raw['quantization']!r}: the source is already quantized; convert "
            "from the unquantized checkpoint"
        )
    known = FLA_FIELDS if model_type == "gated_deltanet" else ARGS_FIELDS
    neutral = FLA_NEUTRAL | HF_FIELDS | set(fla_keys.SUPPORTED_VALUES) | {"quantization"}
    unknown = sorted(set(raw) - known - neutral - {"model_type"})
    if unknown:
        raise fail(
            f"unknown config key(s) {unknown}: ham-mlx cannot tell whether they change the "
            "model; remove them from config.json if they do not"
        )
    params = {k: v for k, v in raw.items() if k in known}
    if params.get("hidden_ratio") is None:
        params.pop("hidden_ratio", None)  # FLA: None means 4
    if "attn" in params:
        params["attn"] = merge_attn_specs(params["attn"], fail)
    if model_type == "gated_deltanet":
        attn = params.get("attn") or {}
        if attn and not isinstance(attn.get("layers"), list):
            raise fail(f"attn={attn!r}: FLA needs attn.layers, the list of attention layers")
        attn_layers = set(attn.get("layers", []))
        n = raw.get("num_hidden_layers", 21)
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= MAX_LAYERS:
            raise fail(f"num_hidden_layers={n!r}: must be an integer in [1, {MAX_LAYERS}]")
        params["layer_types"] = ["attn" if i in attn_layers else "gdn" for i in range(n)]
        if raw.get("num_v_heads") is None:
            params.pop("num_v_heads", None)
        params.setdefault("bos_token_id", 1)  # FLA's defaults
        params.setdefault("eos_token_id", 2)
        params.setdefault("pad_token_id", None)
        params.setdefault("head_dim", 256)
        params.setdefault("num_heads", 6)
        params.setdefault("hidden_size", 2048)
        params.setdefault("num_hidden_layers", n)
    params["model_type"] = "ham"
    try:
        return ModelArgs(**params)
    except (TypeError, ValueError) as e:
        raise fail(str(e)) from None


def merge_attn_specs(attn: Any, fail) -> dict[str, Any] | None:
    """FLA allows a list of attention specs (one per group of layers); ham_mlx has one."""
    if attn is None or isinstance(attn, dict):
        return dict(sorted(attn.items())) if attn else attn
    if not isinstance(attn, list) or not all(isinstance(s, dict) for s in attn):
        raise fail(f"attn={attn!r} must be a dict or a list of dicts")
    if not attn:
        return None
    settings = [{k: v for k, v in s.items() if k != "layers"} for s in attn]
    if any(s != settings[0] for s in settings):
        raise fail(
            f"attn: {len(attn)} attention specifications with different settings {settings}; "
            "ham-mlx supports one attention configuration for all attention layers"
        )
    layers = sorted(i for s in attn for i in s.get("layers", []))
    return dict(sorted({**settings[0], "layers": layers}.items()))


@dataclass
class WeightPlan:
    """Where each ham_mlx parameter comes from."""

    sources: dict[str, LazyTensor]  # ham_mlx name -> source tensor
    transpose: set[str]  # names whose torch [C, 1, Kc] conv layout becomes [C, Kc, 1]


def layer_kind(keys: set[str], i: int) -> str | None:
    p = f"model.layers.{i}.attn."
    if not any(k.startswith(p) for k in keys):
        return None
    if p + "A_log" not in keys:
        return "attn"
    return "ham" if p + "kv_gate_proj.weight" in keys else "gdn"


def plan_weights(args: ModelArgs, model: Model, tensors: dict[str, LazyTensor]) -> WeightPlan:
    """Check the source tensors against the model and say how to map each one."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    source = dict(tensors)
    qk_norm = bool(args.attn and args.attn.get("qk_norm"))  # a ham folder's gated attention
    for name in list(source):
        if re.search(r"\.attn\.rotary\.inv_freq$", name):
            del source[name]  # a buffer torch recomputes; so do we
        for pattern, feature in UNSUPPORTED_PARAMS:
            if pattern.search(name) and not (qk_norm and "qk_norm" in feature):
                raise ConversionError(f"{source[name].where}: {feature} are not supported")
    keys = set(source)
    for i, declared in enumerate(args.layer_types):
        found = layer_kind(keys, i)
        if found is not None and found != declared:
            file = next(t.file for k, t in source.items() if k.startswith(f"model.layers.{i}."))
            raise ConversionError(
                f"{file}: layer {i} has {found} parameters but the config says it is {declared!r}"
            )
    if args.tie_word_embeddings:
        drop_tied_head(source, "model.embeddings.weight")
    unknown = sorted(set(source) - set(expected))
    if unknown:
        raise ConversionError(
            f"{source[unknown[0]].where}: unknown parameter (not in a {'/'.join(args.layer_types)} "
            f"model of this config); {len(unknown)} unknown: {unknown[:5]}"
        )
    check_none_missing(expected, source)
    transpose = set()
    for name, t in source.items():
        check_dtype(t.dtype, t.where)
        if t.dtype not in FLOAT_DTYPES:
            raise ConversionError(f"{t.where}: dtype {t.dtype}, expected a floating-point type")
        want = expected[name]
        if "conv1d" in name and len(want) == 3 and t.shape == (want[0], want[2], want[1]) != want:
            transpose.add(name)
        elif t.shape != want:
            raise ConversionError(f"{t.where}: shape {t.shape}, the config needs {want}")
    return WeightPlan(source, transpose)


def drop_tied_head(source: dict[str, LazyTensor], embedding_name: str) -> None:
    """A tied checkpoint may still carry lm_head.weight: drop it if it equals the embedding
    (named `embedding_name` in the error, as the checkpoint calls it)."""
    if "lm_head.weight" not in source:
        return
    head, emb = source.pop("lm_head.weight"), source.get("model.embeddings.weight")
    if emb is None or not np.array_equal(head.numpy(), emb.numpy()):
        raise ConversionError(
            f"{head.where}: tie_word_embeddings is true but lm_head.weight differs from "
            f"{embedding_name}"
        )


def check_none_missing(expected: dict[str, tuple[int, ...]], source: dict[str, LazyTensor]) -> None:
    missing = sorted(set(expected) - set(source))
    if missing:
        raise ConversionError(
            f"checkpoint: missing parameter {missing[0]!r} ({len(missing)} missing: {missing[:5]})"
        )
