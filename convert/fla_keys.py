"""The keys of an FLA `GatedDeltaNetConfig` (FLA 0.6.0): which ham-mlx reads, ignores or refuses.

A key is ignored only when FLA's forward pass gives the same logits whatever its value (a
training switch, a kernel choice with the same math, file metadata). A key whose value changes
the math is read into `ModelArgs` (`READ`), or refused by name for values that ham-mlx does not
implement (`SUPPORTED_VALUES`). Anything else is unknown and refused by `map_config`.
"""

from __future__ import annotations

from typing import Any

# Read into ModelArgs under the same name (spec §2-§5).
READ: dict[str, str] = {
    "vocab_size": "rows of the embedding and of the head",
    "hidden_size": "model width D",
    "num_hidden_layers": "number of blocks",
    "num_heads": "q/k heads H of a GDN layer",
    "num_v_heads": "value heads HV (null: H)",
    "head_dim": "q/k head size Dk",
    "expand_v": "value head size Dv = head_dim * expand_v",
    "conv_size": "width of the short convolution",
    "use_short_conv": "only true is implemented (see SUPPORTED_VALUES)",
    "use_gate": "the output gate of the GDN branch",
    "output_gate_activation": "SiLU or sigmoid output gate",
    "allow_neg_eigval": "beta = 2 sigmoid(b) instead of sigmoid(b)",
    "norm_eps": "epsilon of every RMSNorm; o_norm's moves the logits visibly",
    "hidden_ratio": "MLP width when intermediate_size is null",
    "intermediate_size": "MLP width",
    "tie_word_embeddings": "the head is the embedding matrix",
    "attn": "the softmax-attention layers and their settings",
    "bos_token_id": "begin-of-sequence id",
    "eos_token_id": "end-of-sequence id",
    "pad_token_id": "padding id",
}  # fmt: skip

# Accepted whatever their value, left out of the converted config, and listed as ignored in the
# conversion summary: none changes a forward pass.
IGNORED: dict[str, str] = {
    "attn_mode": "GDN kernel choice; chunk and fused_recurrent compute the same recurrence",
    "fuse_norm": "fused RMSNorm kernel: the same residual add and RMSNorm as nn.RMSNorm",
    "fuse_swiglu": "fused SwiGLU kernel: the same SiLU(gate) * up as the plain MLP",
    "fuse_cross_entropy": "training loss kernel; the logits are the same",
    "fuse_linear_cross_entropy": "training loss kernel; logits are computed whenever no labels",
    "use_l2warp": "training loss regulariser; the logits are the same",
    "initializer_range": "standard deviation of fresh weights; a checkpoint brings its own",
    "max_position_embeddings": "size of FLA's RoPE table, which grows on demand: no length limit",
    "use_cache": "transformers' generate default; ham-mlx always caches",
    "architectures": "file metadata: the transformers class",
    "auto_map": "file metadata: remote-code classes",
    "transformers_version": "file metadata",
    "dtype": "file metadata: the weights' own dtypes decide (or --dtype)",
    "torch_dtype": "file metadata: the weights' own dtypes decide (or --dtype)",
}  # fmt: skip

# Keys whose value changes the math: the values ham-mlx implements (a missing key means FLA's
# default, the first value). Any other value is refused with the key's name and the reason.
SUPPORTED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "attn_mode": (("chunk", "fused_recurrent"), "FLA's GDN layer has no other kernel"),
    "use_short_conv": ((True,), "a GDN layer without its short convolution is another model"),
    "conv_bias": ((False, None), "short-convolution biases are not implemented"),
    "hidden_act": (("swish", "silu"), "the MLP is SwiGLU; other activations are not implemented"),
    "attnres_block_size": ((None,), "attention residuals are a different architecture"),
}  # fmt: skip


def refused_value(raw: dict[str, Any]) -> str | None:
    """Why a config's value of a math-changing key cannot be converted (None: all supported)."""
    for key, (values, reason) in SUPPORTED_VALUES.items():
        if key in raw and raw[key] not in values:
            expected = " or ".join(repr(v) for v in values)
            return f"{key}={raw[key]!r} is not supported: {reason} (supported: {expected})"
    return None


def ignored_keys(raw: dict[str, Any]) -> list[str]:
    """The keys of a config that conversion accepts and drops, sorted."""
    return sorted(k for k in raw if k in IGNORED)
