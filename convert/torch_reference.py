"""A plain-PyTorch HAM language model (no FLA, no kernels): the PyTorch source layout.

It defines the checkpoint layout that `ham_mlx.convert` reads for `model_type: "ham"` (FLA's
parameter names plus the HAM ones, docs/spec.md §3-§5), saves checkpoints in it
(`save_pretrained`: config.json + model.safetensors or pytorch_model.bin), and is written from the
spec as straight-line loops, so that its forward pass checks the MLX model on the same weights.
Full-sequence forward only (no cache). Needs `pip install "ham-mlx[torch]"`.

    from ham_mlx import ModelArgs
    from ham_mlx.convert.torch_reference import HAMForCausalLM
    model = HAMForCausalLM(ModelArgs(hidden_size=256, num_hidden_layers=4, num_heads=4,
                                     head_dim=64, layer_types=["ham", "gdn", "ham", "ham"]))
    ...train...
    model.save_pretrained("my-ham")      # then: ham-mlx convert my-ham my-ham-mlx
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ham_mlx.config import ModelArgs
from ham_mlx.convert.safetensors_io import write_safetensors
from ham_mlx.routers import check_table, get_router

EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ShortConv(nn.Conv1d):
    """Depthwise causal conv + SiLU; weight [C, 1, Kc], tap Kc-1 on the current token."""

    def __init__(self, channels: int, size: int):
        super().__init__(channels, channels, size, groups=channels, padding=size - 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, C]
        T = x.shape[1]
        return F.silu(super().forward(x.transpose(1, 2))[..., :T].transpose(1, 2))


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + EPS)


class GatedDeltaNet(nn.Module):
    """Spec §3 (= FLA 0.6.0's GatedDeltaNet)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, H, HV = args.hidden_size, args.num_heads, args.num_v_heads
        Dk, Dv, Kc = args.head_dim, args.head_v_dim, args.conv_size
        self.H, self.HV, self.Dk, self.Dv = H, HV, Dk, Dv
        self.allow_neg_eigval = args.allow_neg_eigval
        self.use_gate, self.gate_act = args.use_gate, args.output_gate_activation
        self.q_proj = nn.Linear(D, H * Dk, bias=False)
        self.k_proj = nn.Linear(D, H * Dk, bias=False)
        self.v_proj = nn.Linear(D, HV * Dv, bias=False)
        self.a_proj = nn.Linear(D, HV, bias=False)
        self.b_proj = nn.Linear(D, HV, bias=False)
        if self.use_gate:
            self.g_proj = nn.Linear(D, HV * Dv, bias=False)
        self.q_conv1d = ShortConv(H * Dk, Kc)
        self.k_conv1d = ShortConv(H * Dk, Kc)
        self.v_conv1d = ShortConv(HV * Dv, Kc)
        A = torch.empty(HV).uniform_(1, 16)
        dt = torch.exp(torch.rand(HV) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.A_log = nn.Parameter(torch.log(A))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm = RMSNorm(Dv, args.norm_eps)
        self.o_proj = nn.Linear(HV * Dv, D, bias=False)

    def recurrence(self, x: torch.Tensor):
        """x [B, T, D] -> q̂, k̂ [B, T, HV, Dk] (GVA-expanded, q̂ unscaled), v, o, v̂ [B, T, HV, Dv]."""
        B, T, _ = x.shape
        H, HV, Dk, Dv = self.H, self.HV, self.Dk, self.Dv
        q = l2norm(self.q_conv1d(self.q_proj(x)).view(B, T, H, Dk))
        k = l2norm(self.k_conv1d(self.k_proj(x)).view(B, T, H, Dk))
        v = self.v_conv1d(self.v_proj(x)).view(B, T, HV, Dv)
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # [B, T, HV]
        beta = torch.sigmoid(self.b_proj(x)) * (2.0 if self.allow_neg_eigval else 1.0)
        S = x.new_zeros(B, HV, Dv, Dk)
        outs, preds = [], []
        for t in range(T):
            S = S * g[:, t].exp()[..., None, None]  # decay first
            v_hat = torch.einsum("bhvk,bhk->bhv", S, k[:, t])  # the prediction of v_t
            S = S + torch.einsum("bhv,bhk->bhvk", beta[:, t, :, None] * (v[:, t] - v_hat), k[:, t])
            outs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t] * Dk**-0.5))  # read after write
            preds.append(v_hat)
        return q, k, v, torch.stack(outs, 1), torch.stack(preds, 1)

    def rnn_output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        r = self.o_norm(o)
        if self.use_gate:
            gate = self.g_proj(x).view(*o.shape)
            r = r * (torch.sigmoid(gate) if self.gate_act == "sigmoid" else F.silu(gate))
        return r  # [B, T, HV, Dv]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *_, o, _ = self.recurrence(x)
        return self.o_proj(self.rnn_output(x, o).flatten(2))


class Router(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, 1, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.silu(self.fc1(h))))[..., 0]  # [B, T]


def cosine_score(layer: HAMAttention, x, v, v_hat) -> torch.Tensor:
    """min over value heads of 1 - cos(v_hat, v): s_t [B, T] from v, v_hat [B, T, HV, Dv]."""
    cos = (v_hat * v).sum(-1) / torch.sqrt((v_hat.pow(2).sum(-1) + EPS) * (v.pow(2).sum(-1) + EPS))
    return (1 - cos).min(-1).values


def l2_score(layer: HAMAttention, x, v, v_hat) -> torch.Tensor:
    """min over value heads of ‖v - v_hat‖² / ‖v‖²: s_t [B, T]."""
    return ((v - v_hat).pow(2).sum(-1) / (v.pow(2).sum(-1) + EPS)).min(-1).values


def learned_score(layer: HAMAttention, x, v, v_hat) -> torch.Tensor:
    """The layer's learned router on its input x [B, T, D]: r_t [B, T]."""
    return layer.router(x)


# s_t of each router kind (ham_mlx.routers.ROUTERS): (layer, x, v, v_hat) -> [B, T].
SCORES = {"cosine": cosine_score, "l2": l2_score, "learned": learned_score}
check_table(SCORES, "convert.torch_reference.SCORES")


class HAMAttention(GatedDeltaNet):
    """Spec §4: the GDN branch, the surprise score, attention over the admitted tokens."""

    def __init__(self, args: ModelArgs, threshold: float):
        super().__init__(args)
        D, HV, Dk, Dv = args.hidden_size, args.num_v_heads, args.head_dim, args.head_v_dim
        self.router_kind = get_router(args.ham_router)
        self.kv_gate_proj = nn.Linear(D, HV, bias=False)
        self.kv_norm = RMSNorm(Dv, args.norm_eps)
        self.attn_log_scale = nn.Parameter(torch.full((HV,), math.log(math.sqrt(Dk))))
        self.attn_sink = nn.Parameter(torch.zeros(HV))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        if self.router_kind.learned:
            self.router = Router(D, args.ham_router_hidden)

    def score(self, x, v, v_hat) -> torch.Tensor:
        """s_t [B, T]: min over value heads of the surprise, or the learned router's r_t."""
        return SCORES[self.router_kind.name](self, x, v, v_hat)

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; appends (score [B, T], admitted [B, T]) to `routing`."""
        B, T, _ = x.shape
        q, k, v, o, v_hat = self.recurrence(x)
        s = self.score(x, v, v_hat)  # [B, T]
        admitted = s >= self.threshold  # [B, T]
        if routing is not None:
            routing.append((s, admitted))
        z = torch.einsum("bthd,bshd->bhts", q, k) * self.attn_log_scale.exp()[:, None, None]
        if self.router_kind.key_bias_column:
            z = z + torch.log(s.clamp(min=1e-6))[:, None, None, :]
        t = torch.arange(T, device=x.device)
        visible = (t[None, :] <= t[:, None])[None, None] & admitted[:, None, None, :]
        z = z.masked_fill(~visible, float("-inf"))
        sink = self.attn_sink[None, :, None, None].expand(B, -1, T, 1)
        p = torch.softmax(torch.cat([z, sink.to(z.dtype)], -1), -1)[..., :T]  # sink has value 0
        o_kv = torch.einsum("bhts,bshd->bthd", p, v)  # [B, T, HV, Dv]
        kv = torch.sigmoid(self.kv_gate_proj(x))[..., None] * self.kv_norm(o_kv)
        return self.o_proj((self.rnn_output(x, o) + kv).flatten(2))


def rope(x: torch.Tensor, theta: float, dims: int | None = None) -> torch.Tensor:
    """NeoX (half-split) rotary embedding of x [B, T, N, hd] at positions 0..T-1, of the first
    `dims` features (default all; the rest pass unchanged)."""
    if dims is not None and dims < x.shape[-1]:
        return torch.cat([rope(x[..., :dims], theta), x[..., dims:]], -1)
    T, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # [T, hd/2]
    cos, sin = ang.cos().to(x.dtype)[:, None], ang.sin().to(x.dtype)[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nn.Module):
    """FLA's softmax attention: GQA, NeoX RoPE, optional window of W keys (spec §5); the gated
    variant (spec §5.1): head_dim, q/k norms, partial RoPE, a sigmoid output gate."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        cfg, D = args.attn, args.hidden_size
        self.N, self.Nkv = cfg["num_heads"], cfg["num_kv_heads"]
        self.hd = cfg.get("head_dim") or D // self.N
        self.window, self.theta = cfg["window_size"], cfg["rope_theta"]
        self.rotary = int(self.hd * cfg.get("partial_rotary_factor", 1.0))
        self.gated = cfg.get("output_gate") == "sigmoid"
        if cfg.get("qk_norm"):
            self.q_norm = RMSNorm(self.hd, args.norm_eps)
            self.k_norm = RMSNorm(self.hd, args.norm_eps)
        self.q_proj = nn.Linear(D, self.N * self.hd * (2 if self.gated else 1), bias=False)
        self.k_proj = nn.Linear(D, self.Nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(D, self.Nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.N * self.hd, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.N, -1)  # per head [query | gate] when gated
        q, gate = (q[..., : self.hd], q[..., self.hd :].flatten(2)) if self.gated else (q, None)
        k = self.k_proj(x).view(B, T, self.Nkv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, self.theta, self.rotary), rope(k, self.theta, self.rotary)
        v = self.v_proj(x).view(B, T, self.Nkv, self.hd)
        k, v = (a.repeat_interleave(self.N // self.Nkv, dim=2) for a in (k, v))
        z = torch.einsum("bthd,bshd->bhts", q, k) * self.hd**-0.5
        t = torch.arange(T, device=x.device)
        mask = t[None, :] <= t[:, None]
        if self.window is not None:
            mask = mask & (t[None, :] > t[:, None] - self.window)
        p = torch.softmax(z.masked_fill(~mask, float("-inf")), -1)
        o = torch.einsum("bhts,bshd->bthd", p, v).flatten(2)
        return self.o_proj(o if gate is None else o * torch.sigmoid(gate))


class GatedMLP(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str, threshold: float | None):
        super().__init__()
        self.layer_type = layer_type
        self.attn_norm = RMSNorm(args.hidden_size, args.norm_eps)
        if layer_type == "ham":
            self.attn = HAMAttention(args, threshold)
        elif layer_type == "gdn":
            self.attn = GatedDeltaNet(args)
        else:
            self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.hidden_size, args.norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size)

    def forward(self, x: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + (self.attn(h, routing) if self.layer_type == "ham" else self.attn(h))
        return x + self.mlp(self.mlp_norm(x))


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        taus = iter(args.layer_thresholds())
        self.layers = nn.ModuleList(
            Block(args, t, next(taus) if t == "ham" else None) for t in args.layer_types
        )
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)


class HAMForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if (
                name.endswith("proj.weight")
                or name.endswith("embeddings.weight")
                or "lm_head" in name
            ):
                nn.init.normal_(p, std=0.02)

    def forward(self, input_ids: torch.Tensor, routing: list | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. `routing`, if a list, receives each HAM layer's
        (score [B, T], admitted [B, T]) in layer order."""
        h = self.model.embeddings(input_ids)
        for layer in self.model.layers:
            h = layer(h, routing)
        h = self.model.norm(h)
        if self.args.tie_word_embeddings:
            return h @ self.model.embeddings.weight.T
        return self.lm_head(h)

    def config_dict(self) -> dict:
        cfg = self.args.to_config()
        cfg["ham_threshold"] = [float(b.attn.threshold) for b in self.model.layers
                                if b.layer_type == "ham"] or cfg["ham_threshold"]  # fmt: skip
        cfg.pop("quantization", None)
        return cfg

    def save_pretrained(self, path: str | Path, format: str = "safetensors") -> Path:
        """Write config.json and model.safetensors (format="safetensors") or
        pytorch_model.bin (format="bin", torch.save of the state dict)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config_dict(), indent=2) + "\n")
        state = self.state_dict()
        if format == "bin":
            torch.save(state, path / "pytorch_model.bin")
        elif format == "safetensors":
            arrays, dtypes = state_dict_numpy(state)
            write_safetensors(path / "model.safetensors", arrays, dtypes)
        else:
            raise ValueError(f"format={format!r}: expected 'safetensors' or 'bin'")
        return path


def state_dict_numpy(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict]:
    """numpy arrays (bfloat16 as its uint16 bits) and the safetensors dtype overrides."""
    arrays, dtypes = {}, {}
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            arrays[k], dtypes[k] = t.view(torch.int16).numpy().view(np.uint16), "BF16"
        else:
            arrays[k] = t.numpy()
    return arrays, dtypes
