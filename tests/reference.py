"""An independent float64 numpy re-implementation of the GDN and HAM layers, written from
docs/spec.md §3-§4 with explicit loops. It shares no code with ham_mlx."""

from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def short_conv(x, w):
    """x [B, T, C], w [C, Kc] (tap Kc-1 is the current token), zero history; then SiLU."""
    B, T, C = x.shape
    Kc = w.shape[1]
    y = np.zeros_like(x)
    for t in range(T):
        for i in range(Kc):
            s = t - Kc + 1 + i
            if s >= 0:
                y[:, t] += w[:, i] * x[:, s]
    return silu(y)


def ham_layer(p: dict, x: np.ndarray, cfg: dict, tau: float | None) -> dict:
    """One GDN (tau=None) or HAM layer on x [B, T, D] with parameters p (numpy, torch layout of
    the conv weights: [C, Kc]). Returns dict(y, score, admitted)."""
    B, T, D = x.shape
    H, HV, Dk, Dv = cfg["H"], cfg["HV"], cfg["Dk"], cfg["Dv"]
    eps = cfg["eps"]
    q = short_conv(x @ p["q_proj"].T, p["q_conv"]).reshape(B, T, H, Dk)
    k = short_conv(x @ p["k_proj"].T, p["k_conv"]).reshape(B, T, H, Dk)
    v = short_conv(x @ p["v_proj"].T, p["v_conv"]).reshape(B, T, HV, Dv)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    g = -np.exp(p["A_log"]) * softplus(x @ p["a_proj"].T + p["dt_bias"])  # [B, T, HV]
    beta = sigmoid(x @ p["b_proj"].T) * (2.0 if cfg["neg_eig"] else 1.0)
    rep = HV // H
    o = np.zeros((B, T, HV, Dv))
    v_hat = np.zeros((B, T, HV, Dv))
    for b in range(B):
        for j in range(HV):
            S = np.zeros((Dv, Dk))
            kj, qj = k[b, :, j // rep], q[b, :, j // rep] * Dk**-0.5
            for t in range(T):
                S = np.exp(g[b, t, j]) * S
                v_hat[b, t, j] = S @ kj[t]
                S = S + beta[b, t, j] * np.outer(v[b, t, j] - v_hat[b, t, j], kj[t])
                o[b, t, j] = S @ qj[t]
    r = rms_norm(o, p["o_norm"], eps)
    if "g_proj" in p:
        gate = (x @ p["g_proj"].T).reshape(B, T, HV, Dv)
        r = r * (sigmoid(gate) if cfg["gate_act"] == "sigmoid" else silu(gate))
    out = {"score": None, "admitted": None}
    if tau is not None:
        if cfg["router"] == "cosine":
            num = np.sum(v_hat * v, -1)
            den = np.sqrt((np.sum(v_hat**2, -1) + 1e-6) * (np.sum(v**2, -1) + 1e-6))
            score = np.min(1.0 - num / den, axis=-1)  # [B, T]
        elif cfg["router"] == "l2":
            score = np.min(np.sum((v - v_hat) ** 2, -1) / (np.sum(v**2, -1) + 1e-6), axis=-1)
        else:
            hidden = silu(x @ p["router_fc1"].T)
            score = sigmoid(hidden @ p["router_fc2"].T + p["router_fc2_bias"])[..., 0]
        admitted = score >= tau
        o_kv = np.zeros((B, T, HV, Dv))
        for b in range(B):
            for j in range(HV):
                scale = np.exp(p["attn_log_scale"][j])
                for t in range(T):
                    keys = [s for s in range(t + 1) if admitted[b, s]]
                    logits = [scale * q[b, t, j // rep] @ k[b, s, j // rep] for s in keys]
                    if cfg["router"] == "learned":
                        logits = [z + np.log(max(score[b, s], 1e-6)) for z, s in zip(logits, keys)]
                    logits = np.array(logits + [p["attn_sink"][j]])
                    w = np.exp(logits - logits.max())
                    w = w / w.sum()
                    for s, ws in zip(keys, w[:-1]):
                        o_kv[b, t, j] += ws * v[b, s, j]
        gate_kv = sigmoid(x @ p["kv_gate_proj"].T)[..., None]
        r = r + gate_kv * rms_norm(o_kv, p["kv_norm"], eps)
        out.update(score=score, admitted=admitted)
    out["y"] = r.reshape(B, T, HV * Dv) @ p["o_proj"].T
    return out


def layer_params(layer) -> dict:
    """numpy float64 copies of a ham_mlx GatedDeltaNet/HAMAttention layer's parameters."""
    import mlx.core as mx

    def f(a):
        return np.array(a.astype(mx.float32), dtype=np.float64)

    p = {
        name: f(getattr(layer, name).weight)
        for name in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "o_proj")
    }
    for name in ("q_conv", "k_conv", "v_conv"):
        p[name] = f(getattr(layer, name + "1d").weight)[:, :, 0]
    p["A_log"], p["dt_bias"] = f(layer.A_log), f(layer.dt_bias)
    p["o_norm"] = f(layer.o_norm.weight)
    if "g_proj" in layer:
        p["g_proj"] = f(layer.g_proj.weight)
    if "kv_norm" in layer:
        p["kv_norm"] = f(layer.kv_norm.weight)
        p["kv_gate_proj"] = f(layer.kv_gate_proj.weight)
        p["attn_log_scale"], p["attn_sink"] = f(layer.attn_log_scale), f(layer.attn_sink)
    if "router" in layer:
        p["router_fc1"] = f(layer.router.fc1.weight)
        p["router_fc2"] = f(layer.router.fc2.weight)
        p["router_fc2_bias"] = f(layer.router.fc2.bias)
    return p
