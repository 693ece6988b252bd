"""Model configuration: FLA `GatedDeltaNetConfig` field names plus the HAM fields (spec §2, §5)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from ham_mlx.config_values import INTS, check_values
from ham_mlx.routers import DEFAULT_ROUTER, ROUTERS, get_router

LAYER_TYPES = ("ham", "gdn", "attn")
GATE_ACTIVATIONS = ("swish", "silu", "sigmoid")
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
ATTN_DEFAULTS = {
    "num_kv_heads": None,
    "qkv_bias": False,
    "window_size": None,
    "rope_theta": 10000.0,
}
# attn.output_gate: none, or a sigmoid gate read from q_proj beside each query head (spec §5).
ATTN_OUTPUT_GATES = (None, "sigmoid")
# Fields of FLA configs that do not change the math of a forward pass.
IGNORED_FLA_FIELDS = {
    "architectures", "attn_mode", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
    "fuse_linear_cross_entropy", "use_l2warp",
    "initializer_range", "max_position_embeddings", "use_cache", "torch_dtype",
    "dtype", "transformers_version", "auto_map",
}  # fmt: skip
# Keys that mlx-lm's loader reads or adds (`model_file` names the folder's module for
# `trust_remote_code`); they describe the folder, not the model, and are not kept in `extra`.
MLX_LM_FIELDS = {"model_file", "quantization_config", "quantize_activations"}
# config.json key of `ModelArgs.layer_types`. It was "layer_types" until transformers 5 began to
# validate that key (its attention kinds only), which made AutoTokenizer refuse every folder.
MIXER_TYPES_KEY = "mixer_types"
OLD_MIXER_TYPES_KEY = "layer_types"


class ConfigError(ValueError):
    """A configuration value that the model cannot use."""


@dataclass
class ModelArgs:
    """Configuration of a HAM / GDN / attention hybrid language model.

    Field names follow FLA's `GatedDeltaNetConfig` so that FLA `config.json` files read unchanged;
    the `ham_*` fields and `layer_types` are ours (see docs/spec.md). In `config.json` the field
    `layer_types` is written under the key `mixer_types` (`to_config` / `from_dict`).
    """

    model_type: str = "ham"
    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 4
    num_heads: int = 4
    num_v_heads: int | None = None
    head_dim: int = 64
    expand_v: float = 2.0
    conv_size: int = 4
    use_short_conv: bool = True
    use_gate: bool = True
    output_gate_activation: str = "swish"
    allow_neg_eigval: bool = False
    norm_eps: float = 1e-6
    hidden_ratio: float = 4
    hidden_act: str = "swish"  # the MLP activation; only SwiGLU (swish/silu) is implemented
    intermediate_size: int | None = None
    tie_word_embeddings: bool = False
    attn: dict[str, Any] | None = None
    bos_token_id: int | None = 2
    eos_token_id: int | None = 3
    pad_token_id: int | None = 0
    layer_types: list[str] | None = None
    ham_router: str = DEFAULT_ROUTER  # a name in ham_mlx.routers.ROUTERS
    ham_threshold: float | list[float] = 0.5
    ham_router_hidden: int = 64
    ham_kv_target: float | list[float] | None = None
    quantization: dict[str, int] | None = None  # {"group_size": 64, "bits": 4}: mlx.nn.quantize
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                     ConfigError)  # fmt: skip
        if self.num_v_heads is None:
            self.num_v_heads = self.num_heads
        if self.attn is not None:
            self.attn = {**ATTN_DEFAULTS, **self.attn}
            if self.attn["num_kv_heads"] is None:
                self.attn["num_kv_heads"] = self.attn.get("num_heads")
        if self.layer_types is None:
            attn_layers = set(self.attn.get("layers", [])) if self.attn else set()
            default = "gdn" if self.model_type == "gated_deltanet" else "ham"
            self.layer_types = [
                "attn" if i in attn_layers else default for i in range(self.num_hidden_layers)
            ]
        else:
            self.layer_types = list(self.layer_types)
        if self.intermediate_size is None:
            inter = int(self.hidden_size * self.hidden_ratio * 2 / 3)
            self.intermediate_size = 256 * ((inter + 255) // 256)
        self.validate()

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        """Build from a `config.json` dict (`mixer_types`) or a `to_dict` one (`layer_types`);
        unknown keys are kept in `extra` with a warning, mlx-lm's loader keys are dropped."""
        params = config_fields(params)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in params.items() if k in names}
        unknown = {k: v for k, v in params.items() if k not in names | MLX_LM_FIELDS}
        surprising = sorted(set(unknown) - IGNORED_FLA_FIELDS)
        if surprising:
            warnings.warn(f"config: ignoring unknown keys {surprising}", stacklevel=2)
        return cls(**known, extra=unknown)

    def to_dict(self) -> dict[str, Any]:
        """Every field by its Python name (`layer_types`); `from_dict` reads it back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    def to_config(self) -> dict[str, Any]:
        """The `config.json` form: `to_dict` with `layer_types` under the key `mixer_types`."""
        return {
            (MIXER_TYPES_KEY if k == OLD_MIXER_TYPES_KEY else k): v
            for k, v in self.to_dict().items()
        }

    # Derived sizes (spec §2).
    @property
    def head_v_dim(self) -> int:
        return int(self.head_dim * self.expand_v)

    @property
    def ham_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "ham"]

    def layer_thresholds(self) -> list[float]:
        """Initial threshold of every HAM layer, in layer order."""
        n = len(self.ham_layers)
        t = self.ham_threshold
        return [float(x) for x in t] if isinstance(t, (list, tuple)) else [float(t)] * n

    def layer_kv_targets(self) -> list[float] | None:
        if self.ham_kv_target is None:
            return None
        t = self.ham_kv_target
        n = len(self.ham_layers)
        return [float(x) for x in t] if isinstance(t, (list, tuple)) else [float(t)] * n

    def validate(self) -> None:
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"config: {key}={getattr(self, key, None)!r}: {msg}")

        if self.model_type not in ("ham", "gated_deltanet"):
            fail("model_type", "expected 'ham' (or FLA's 'gated_deltanet')")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                fail(key, "must be a positive integer")
        if not isinstance(self.num_v_heads, int) or self.num_v_heads % self.num_heads:
            fail("num_v_heads", f"must be a positive multiple of num_heads={self.num_heads}")
        if self.head_v_dim <= 0 or self.head_dim * self.expand_v != self.head_v_dim:
            fail("expand_v", "head_dim * expand_v must be a positive integer")
        if not isinstance(self.conv_size, int) or self.conv_size < 1:
            fail("conv_size", "must be an integer >= 1")
        if not self.use_short_conv:
            fail("use_short_conv", "only models with the short convolution are supported")
        if self.output_gate_activation not in GATE_ACTIVATIONS:
            fail("output_gate_activation", f"expected one of {GATE_ACTIVATIONS}")
        if self.hidden_act not in ("swish", "silu"):
            fail("hidden_act", "only 'swish' (SwiGLU MLP) is supported")
        if not self.norm_eps > 0:
            fail("norm_eps", "must be > 0")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"needs {self.num_hidden_layers} entries (num_hidden_layers)")
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            fail("layer_types", f"unknown layer type {bad[0]!r}; expected one of {LAYER_TYPES}")
        if "attn" in self.layer_types:
            self._validate_attn()
        if not isinstance(self.ham_router, str) or self.ham_router not in ROUTERS:
            fail("ham_router", f"expected one of {tuple(ROUTERS)}")
        if get_router(self.ham_router).learned and self.ham_router_hidden <= 0:
            fail("ham_router_hidden", "must be a positive integer for a learned router")
        n_ham = len(self.ham_layers)
        if isinstance(self.ham_threshold, (list, tuple)) and len(self.ham_threshold) != n_ham:
            fail("ham_threshold", f"a per-layer list needs one value per HAM layer ({n_ham})")
        targets = self.layer_kv_targets() or []
        if isinstance(self.ham_kv_target, (list, tuple)) and len(targets) != n_ham:
            fail("ham_kv_target", f"a per-layer list needs one value per HAM layer ({n_ham})")
        if any(not 0.0 <= t <= 1.0 for t in targets):
            fail("ham_kv_target", "fractions must lie in [0, 1]")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < self.vocab_size:
                fail(key, f"must lie in [0, vocab_size={self.vocab_size})")
        if not 0 < self.intermediate_size <= INTS["intermediate_size"][1]:
            fail("intermediate_size", f"must be an integer in [1, {INTS['intermediate_size'][1]}]")
        q = self.quantization
        if q is not None and (
            not isinstance(q, dict)
            or set(q) - {"group_size", "bits", "mode"}
            or q.get("group_size") not in QUANT_GROUP_SIZES
            or q.get("bits") not in QUANT_BITS
            or q.get("mode", "affine") != "affine"
        ):
            fail("quantization", f"expected {{'group_size': one of {QUANT_GROUP_SIZES}, "
                 f"'bits': one of {QUANT_BITS}}}")  # fmt: skip

    def _validate_attn(self) -> None:
        attn = self.attn
        if not attn or "num_heads" not in attn:
            raise ConfigError("config: layer_types has 'attn' layers but attn.num_heads is not set")
        heads, kv_heads = attn["num_heads"], attn["num_kv_heads"]
        hd = attn.get("head_dim")
        if hd is None and self.hidden_size % heads:
            raise ConfigError(f"config: attn.num_heads={heads} must divide hidden_size")
        if hd is not None and (not isinstance(hd, int) or hd <= 0 or hd % 2):
            raise ConfigError(f"config: attn.head_dim={hd!r} must be a positive even integer")
        if heads % kv_heads:
            raise ConfigError(f"config: attn.num_kv_heads={kv_heads} must divide attn.num_heads")
        if attn["qkv_bias"]:
            raise ConfigError("config: attn.qkv_bias=True is not supported")
        if attn.get("qk_norm") not in (None, False, True):
            raise ConfigError(f"config: attn.qk_norm={attn['qk_norm']!r} must be true or false")
        if attn.get("output_gate") not in ATTN_OUTPUT_GATES:
            raise ConfigError(
                f"config: attn.output_gate={attn['output_gate']!r}: expected one of "
                f"{ATTN_OUTPUT_GATES}"
            )
        f = attn.get("partial_rotary_factor", 1.0)
        ok = isinstance(f, (int, float)) and 0 < f <= 1
        rotary = int((hd or self.hidden_size // heads) * f) if ok else 0
        if rotary == 0 or (f != 1.0 and rotary % 2):
            raise ConfigError(
                f"config: attn.partial_rotary_factor={f!r} must lie in (0, 1] and give an even "
                "number of rotated dimensions"
            )
        w = attn["window_size"]
        if w is not None and (not isinstance(w, int) or w < 1):
            raise ConfigError(f"config: attn.window_size={w!r} must be a positive integer or null")
        if "layers" in attn:
            declared = sorted(attn["layers"])
            actual = [i for i, t in enumerate(self.layer_types) if t == "attn"]
            if declared != actual:
                raise ConfigError(
                    f"config: attn.layers={declared} disagrees with layer_types (attn at {actual})"
                )


def config_fields(params: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """A `config.json` dict with ModelArgs field names: `mixer_types` -> `layer_types`.

    source: the file being read; with it, the old key `layer_types` in a file that lacks
    `mixer_types` is logged once per file as deprecated (it still reads)."""
    if MIXER_TYPES_KEY not in params:
        if source is not None and OLD_MIXER_TYPES_KEY in params:
            warn_old_key(source)
        return dict(params)
    out = {k: v for k, v in params.items() if k != MIXER_TYPES_KEY}
    old = out.pop(OLD_MIXER_TYPES_KEY, None)
    mixers = params[MIXER_TYPES_KEY]
    if old is not None and _as_list(old) != _as_list(mixers or []):
        raise ConfigError(
            f"config: {OLD_MIXER_TYPES_KEY}={old!r} disagrees with {MIXER_TYPES_KEY}={mixers!r} "
            f"(the old key; remove it)"
        )
    out[OLD_MIXER_TYPES_KEY] = mixers
    return out


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


_warned: set[str] = set()


def warn_old_key(source: str) -> None:
    """One line, once per file and process: the old `layer_types` key still reads."""
    if source in _warned:
        return
    _warned.add(source)
    logging.getLogger("ham_mlx").warning(
        f"{source}: the config key {OLD_MIXER_TYPES_KEY!r} is deprecated, it is now "
        f"{MIXER_TYPES_KEY!r} (transformers rejects ours under the old name); saving the "
        "folder with ham_mlx writes the new key"
    )
