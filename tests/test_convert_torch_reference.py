"""The plain-PyTorch HAM reference against the MLX model on the same weights, and the readers
against torch's own files. Needs torch (CI installs the CPU build); skipped without it."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import copy
import json
import math
from collections import OrderedDict

import mlx.core as mx
import numpy as np
import pytest
from torch_files import Parameter, Tensor, fake_torch_save

from ham_mlx import ModelArgs, kv_stats, load_model
from ham_mlx.convert import convert
from ham_mlx.convert.checkpoint import read_file
from ham_mlx.model_io import read_weights

torch = pytest.importorskip("torch", reason="torch is not installed (pip install 'ham-mlx[torch]')")
from ham_mlx.convert.torch_reference import HAMForCausalLM  # noqa: E402

torch.set_num_threads(1)  # tiny tensors; threads would only contend with MLX's BLAS threads

ATTN = {"num_heads": 2, "num_kv_heads": 1, "rope_theta": 10000.0}
CONFIGS = {
    "cosine-mixed-gva": dict(
        layer_types=["ham", "gdn", "attn", "ham"], num_v_heads=4,
        attn={**ATTN, "window_size": 6}, ham_router="cosine",
    ),
    "learned-tied-sigmoid": dict(
        layer_types=["ham", "attn", "ham"], attn=ATTN, ham_router="learned",
        tie_word_embeddings=True, output_gate_activation="sigmoid",
    ),
    "gated-attn": dict(  # spec §5.1: head_dim, q/k norms, partial RoPE, sigmoid output gate
        layer_types=["gdn", "attn"], attn={**ATTN, "head_dim": 24, "qk_norm": True,
        "partial_rotary_factor": 0.5, "output_gate": "sigmoid"},
    ),
    "l2-nogate-negeig": dict(
        layer_types=["gdn", "ham"], ham_router="l2", use_gate=False, allow_neg_eigval=True,
        conv_size=2, expand_v=1.0,
    ),
}  # fmt: skip


def make_args(name: str) -> ModelArgs:
    kw = CONFIGS[name]
    return ModelArgs(vocab_size=61, hidden_size=32, num_heads=2, head_dim=16, ham_router_hidden=8,
                     num_hidden_layers=len(kw["layer_types"]), **kw)  # fmt: skip


@torch.no_grad()
def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        elif name.endswith("embeddings.weight"):
            scale = p.shape[1] ** -0.5 if model.args.tie_word_embeddings else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale)
        elif "conv1d" in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        elif name.endswith(("attn_sink", "attn_log_scale", "fc2.bias")):
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@torch.no_grad()
def set_thresholds_between_scores(model, ids):
    """τ per HAM layer in a wide gap between observed scores near their median, so that fp32 vs
    fp64 rounding cannot flip an admission and about half the tokens are admitted."""
    ham = [b.attn for b in model.model.layers if b.layer_type == "ham"]
    for i, layer in enumerate(ham):
        routing = []
        copy.deepcopy(model).double()(ids, routing)
        s = np.unique(routing[i][0].numpy().ravel())
        gaps = [(abs(j - len(s) / 2), j) for j in range(1, len(s)) if s[j] - s[j - 1] > 1e-3]
        _, j = min(gaps)
        layer.threshold.fill_(float(s[j - 1] + s[j]) / 2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_reference_matches_mlx(tmp_path, name):
    torch.manual_seed(0)
    model = randomize(HAMForCausalLM(make_args(name)))
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    set_thresholds_between_scores(model, ids)
    model.save_pretrained(tmp_path / "torch")
    convert(tmp_path / "torch", tmp_path / "mlx")
    mlx_model = load_model(tmp_path / "mlx")
    routing = []
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(ids, routing).numpy()
    cache = mlx_model.make_cache()
    out = np.array(mlx_model(mx.array(ids.numpy()), cache))
    print(
        f"{name}: max |mlx - torch| {np.abs(out - ref).max():.2e}, |logit| {np.abs(ref).max():.2f}"
    )
    assert np.abs(out - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert 1.0 < np.abs(ref).max() < 30  # O(1) logits: the comparison discriminates
    admitted = [s["admitted"] for s in kv_stats(cache) if s["type"] == "ham"]
    want = [m.sum(1).tolist() for _, m in routing]
    assert admitted == want and all(0 < sum(a) < 48 for a in admitted)
    assert mlx_model.thresholds() == pytest.approx(
        [float(b.attn.threshold) for b in model.model.layers if b.layer_type == "ham"]
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bin_and_safetensors_give_identical_mlx_weights(tmp_path, dtype):
    torch.manual_seed(0)
    model = randomize(HAMForCausalLM(make_args("learned-tied-sigmoid")))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "st", format="safetensors")
    model.save_pretrained(tmp_path / "bin", format="bin")
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    convert(tmp_path / "st", tmp_path / "a")
    convert(tmp_path / "bin", tmp_path / "b")
    a, b = read_weights(tmp_path / "a"), read_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(
            np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32)), err_msg=k
        )
    assert a["model.layers.0.attn.A_log"].dtype == mx.float32
    assert a["model.norm.weight"].dtype == getattr(mx, dtype)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["ham_router"] == "learned" and cfg["mixer_types"] == ["ham", "attn", "ham"]


def test_reader_matches_torch_load_on_real_torch_files(tmp_path):
    w = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    sd = OrderedDict(
        w=w, t=w.t(), rows=w[2:4], cols=w[:, 3:7], strided=w[::2, ::3],
        half=torch.randn(3, 4).half(), bf16=torch.randn(5).bfloat16(),
        param=torch.nn.Parameter(torch.randn(2, 2)), longs=torch.arange(5), flag=torch.tensor(True),
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3),
    )  # fmt: skip
    for i, obj in enumerate([sd, {"state_dict": sd, "epoch": 3}, {"model": sd}]):
        torch.save(obj, tmp_path / f"m{i}.pt")
        got = read_file(tmp_path / f"m{i}.pt")
        assert sorted(got) == sorted(sd)
        for k, want in sd.items():
            a = np.array(got[k].load().astype(mx.float32))
            np.testing.assert_array_equal(a, want.detach().float().numpy(), err_msg=k)


def test_fake_torch_files_are_real_torch_files(tmp_path):
    """The helper that writes torch files without torch writes what torch.load reads."""
    storage = np.arange(12, dtype=np.float32)
    obj = {"state_dict": OrderedDict(a=Tensor(storage, 1, (2, 3), (1, 4)),
                                     p=Parameter(Tensor.of(np.ones(3, np.float16))))}  # fmt: skip
    for order in ("little", "big"):
        fake_torch_save(obj, tmp_path / "f.pt", byteorder=order)
        sd = torch.load(tmp_path / "f.pt", weights_only=True)["state_dict"]
        want = storage[[1, 5, 9, 2, 6, 10]].reshape(2, 3)  # offset 1, strides (1, 4)
        np.testing.assert_array_equal(sd["a"].numpy(), want)
        assert isinstance(sd["p"], torch.nn.Parameter) and sd["p"].dtype == torch.float16
