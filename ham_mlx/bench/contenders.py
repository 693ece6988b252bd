"""The decode contenders: same width, depth, vocab and MLP, random weights.

- `ham-10%`, `ham-25%`, `ham-50%`: one all-HAM model, each with its own cache. During prefill
  `kv_budget` holds the cached fraction; for the timed decode steps each layer's τ is frozen at the
  controller's current value (a fixed threshold, as a trained model has), so no controller runs.
  The fraction reported is the one measured in the cache (`kv_stats`), not the target.
- `gdn`: all Gated DeltaNet layers (no KV cache).
- `attn`: all softmax-attention layers (MHA, RoPE), ham_mlx's Transformer.
- `llama (mlx-lm)`: mlx-lm's Llama with the same dimensions, the external attention peer.
- `gdn (mlx-lm)`: mlx-lm's own Gated DeltaNet model (`mlx_lm.models.qwen3_5`, every layer linear
  attention) with the GDN model's widths, the external recurrent peer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ham_mlx.cache import HAMCache, kv_stats
from ham_mlx.config import ModelArgs
from ham_mlx.model import Model
from ham_mlx.presets import preset_args

MLX_LM_MISSING = (
    "mlx-lm is not installed, so the mlx-lm Llama peer is skipped. "
    "Install the benchmark extras: pip install 'ham-mlx[bench]' (or: pip install mlx-lm matplotlib)"
)

BUDGET_CHUNK = 256


def have_mlx_lm() -> bool:
    try:
        import mlx_lm.models.llama  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Contender:
    name: str
    kind: str  # "ham", "gdn", "attn", "mlx-lm"
    model: Any
    cache: list[Any]
    target_fraction: float | None = None
    offset: int = 0
    last: mx.array | None = None  # [1] the next token to feed
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_ham_mlx(self) -> bool:
        return self.kind != "mlx-lm"

    def forward(self, tokens: mx.array) -> mx.array:
        """tokens [1, L] -> logits [1, L, V] (lazy), through this contender's cache."""
        if self.is_ham_mlx:
            return self.model(tokens, self.cache)
        return self.model(tokens, cache=self.cache)

    def prefill(self, tokens: mx.array, chunk: int) -> float:
        """Feed tokens [1, n] in chunks; return the seconds it took. HAM caches with a budget use
        chunks of at most BUDGET_CHUNK tokens: the controller adapts τ between calls."""
        if self.target_fraction is not None:
            chunk = min(chunk, BUDGET_CHUNK)
        t = time.perf_counter()
        n = tokens.shape[1]
        for i in range(0, n, chunk):
            logits = self.forward(tokens[:, i : i + chunk])
            mx.eval(logits, [c.state for c in self.cache])
        self.last = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.last)
        self.offset += n
        return time.perf_counter() - t

    def step(self) -> None:
        """One greedy decode step: forward the last token, argmax, evaluate."""
        logits = self.forward(self.last[None])  # [1, 1, V]
        self.last = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(self.last)
        self.offset += 1

    @contextlib.contextmanager
    def fixed_thresholds(self) -> Iterator[None]:
        """Freeze every HAM layer's τ at its budget controller's current value meanwhile."""
        saved = []
        for c in self.cache:
            if isinstance(c, HAMCache) and c.kv_budget is not None:
                c.settle()
                saved.append((c, c.admission))
                c.admission = c.admission.freeze(c.admission.steady_thresholds())
        try:
            yield
        finally:
            for c, admission in saved:
                c.settle()
                c.admission = admission

    # ---- memory -------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of the stored KV entries (not of the preallocated buffers)."""
        if self.is_ham_mlx:
            return sum(s["kv_bytes"] for s in kv_stats(self.cache))
        total = 0
        for c in self.cache:
            if getattr(c, "keys", None) is not None:
                B, N, _, D = c.keys.shape
                per_token = D * c.keys.itemsize + c.values.shape[3] * c.values.itemsize
                total += c.offset * B * N * per_token
        return total

    def state_bytes(self) -> int:
        """Bytes of the fixed-size recurrent state (GDN/HAM: S and the conv inputs)."""
        if not self.is_ham_mlx:  # mlx-lm's recurrent caches (ArraysCache: conv inputs, state)
            caches = [c for c in self.cache if not hasattr(c, "keys")]
            arrays = tree_flatten([c.state for c in caches])
            return sum(a.nbytes for _, a in arrays if isinstance(a, mx.array))
        return sum(s["state_bytes"] for s in kv_stats(self.cache))

    def kv_fraction(self) -> list[float] | None:
        """Measured cached fraction per HAM layer (row 0), None for other kinds."""
        if self.kind != "ham":
            return None
        return [s["kv_fraction"][0] for s in kv_stats(self.cache) if s["type"] == "ham"]


def weight_bytes(model: Any, embedding: mx.array, tied: bool) -> tuple[int, int]:
    """(parameters, bytes of weights one decode step reads): all weights, but of an untied
    embedding table only the one row looked up."""
    params = tree_flatten(model.parameters())
    n = sum(v.size for _, v in params)
    total = sum(v.nbytes for _, v in params)
    if not tied:
        total -= embedding.nbytes - embedding.nbytes // embedding.shape[0]
    return n, total


def decode_args(preset: str, vocab_size: int, layer_type: str) -> ModelArgs:
    """The preset's dimensions with every layer of one type (attention: MHA, head size D/H)."""
    base = preset_args(preset, vocab_size)
    attn = {"num_heads": base.num_heads, "num_kv_heads": base.num_heads, "rope_theta": 10000.0}
    return preset_args(
        preset, vocab_size, layer_types=[layer_type] * base.num_hidden_layers, attn=attn
    )


def llama_model(args: ModelArgs) -> Any:
    """mlx-lm's Llama with the same width, depth, heads, MLP and vocab (random weights)."""
    from mlx_lm.models import llama

    la = llama.ModelArgs(
        model_type="llama",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.attn["num_heads"],
        num_key_value_heads=args.attn["num_kv_heads"],
        rms_norm_eps=args.norm_eps,
        vocab_size=args.vocab_size,
        rope_theta=args.attn["rope_theta"],
        tie_word_embeddings=args.tie_word_embeddings,
    )
    return llama.Model(la)


def qwen3_5_gdn_model(args: ModelArgs) -> Any:
    """mlx-lm's Qwen3.5 model with only Gated DeltaNet layers (full_attention_interval beyond the
    depth) and the widths of `args` (heads, head sizes, MLP, vocab; random weights)."""
    from mlx_lm.models import qwen3_5

    text = {
        "model_type": "qwen3_5_text", "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "num_hidden_layers": args.num_hidden_layers,
        "num_attention_heads": args.num_heads, "num_key_value_heads": args.num_heads,
        "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        "linear_num_key_heads": args.num_heads, "linear_num_value_heads": args.num_v_heads,
        "linear_key_head_dim": args.head_dim, "linear_value_head_dim": args.head_v_dim,
        "linear_conv_kernel_dim": args.conv_size, "tie_word_embeddings": args.tie_word_embeddings,
        "full_attention_interval": args.num_hidden_layers + 1,
    }  # fmt: skip
    model = qwen3_5.Model(qwen3_5.ModelArgs.from_dict({**text, "model_type": "qwen3_5"}))
    model.language_model.model.fa_idx = None  # no attention layer, so no attention mask
    return model


def peer_embedding(model: Any) -> mx.array:
    """The token embedding of an mlx-lm model (Llama or Qwen3.5)."""
    return model.model.embed_tokens.weight


def build_contenders(
    preset: str, vocab_size: int, fractions: list[float], with_mlx_lm: bool, seed: int = 0
) -> list[Contender]:
    out = []
    mx.random.seed(seed)
    ham = Model(decode_args(preset, vocab_size, "ham"))
    mx.eval(ham.parameters())
    for f in fractions:
        out.append(Contender(f"ham-{f:.0%}", "ham", ham, ham.make_cache(kv_budget=f), f))
    for kind in ("gdn", "attn"):
        model = Model(decode_args(preset, vocab_size, kind))
        mx.eval(model.parameters())
        out.append(Contender(kind, kind, model, model.make_cache()))
    if with_mlx_lm:
        from mlx_lm.models.cache import make_prompt_cache

        llama = llama_model(decode_args(preset, vocab_size, "attn"))
        mx.eval(llama.parameters())
        out.append(Contender("llama (mlx-lm)", "mlx-lm", llama, make_prompt_cache(llama)))
        gdn = qwen3_5_gdn_model(decode_args(preset, vocab_size, "gdn"))
        mx.eval(gdn.parameters())
        out.append(Contender("gdn (mlx-lm)", "mlx-lm", gdn, make_prompt_cache(gdn)))
    for c in out:
        if c.is_ham_mlx:
            emb, tied = c.model.model.embeddings.weight, c.model.args.tie_word_embeddings
        else:
            emb, tied = peer_embedding(c.model), preset_args(preset, vocab_size).tie_word_embeddings
        n, nbytes = weight_bytes(c.model, emb, tied)
        c.info = {"parameters": n, "step_weight_bytes": nbytes}
    return out
