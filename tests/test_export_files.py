"""export_onnx end to end: files and their modes, graph properties, fp16 and 8-/4-bit variants
(parity thresholds on the bundled model), errors, the runner's generate API and the CLI."""

import ham_mlx  # noqa: F401

# isort: split
import json
import os
import stat
import subprocess
import sys
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import onnx
import pytest
from conftest import make_model

from ham_mlx import load, stream_generate
from ham_mlx.cli import main
from ham_mlx.export import UnsupportedFeature, export_onnx
from ham_mlx.export.build import build_model
from ham_mlx.export.exporter import ParityWarning
from ham_mlx.export.parity import compare_rows
from ham_mlx.export.runtime import OnnxModel
from ham_mlx.export.runtime import load as load_onnx
from ham_mlx.export.runtime import stream_generate as onnx_stream_generate
from ham_mlx.model_io import default_model_path
from ham_mlx.presets import init_model

PROMPT = "Shall I compare thee to a summer's day?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("models") / "tiny-hybrid", "tiny-hybrid", seed=1)


@pytest.fixture(scope="module")
def fp32(folder, tmp_path_factory):
    return export_onnx(folder, tmp_path_factory.mktemp("onnx") / "fp32")


def test_caches_are_written_in_place(fp32, capfd):
    """Every present key/value comes straight from its TensorScatter (no Identity between), so
    onnxruntime updates the buffer bound to both past and present in place instead of copying it."""
    m = onnx.load(str(fp32.path / "model.onnx"), load_external_data=False)
    made_by = {out: n.op_type for n in m.graph.node for out in n.output}
    present = [o.name for o in m.graph.output if o.name.startswith("present.")]
    kv = [name for name in present if name.endswith((".key", ".value"))]
    assert len(kv) == 6  # ham, attn, ham
    assert {made_by[name] for name in kv} == {"TensorScatter"}
    assert "Identity" not in {made_by[name] for name in present}
    model, tokenizer = load_onnx(fp32.path)
    cache = model.make_cache(capacity=64)
    ids = np.array([tokenizer.encode(PROMPT)])
    model(ids, cache)
    for _ in range(3):
        model(ids[:, -1:], cache)
    assert "in-place optimization not activated" not in capfd.readouterr().err


def test_files_graph_and_checker(fp32):
    path = fp32.path
    names = sorted(f.name for f in path.iterdir())
    assert names == ["model.onnx", "model.onnx.data", "parity.json", "tokenizer.model"]
    # the weights live in the external data file, the graph file is small
    assert (path / "model.onnx.data").stat().st_size > 10 * (path / "model.onnx").stat().st_size
    onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
    m = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert [(o.domain, o.version) for o in m.opset_import] == [("", 24)]
    ops = {n.op_type for n in m.graph.node}
    assert {"Scan", "TensorScatter", "RMSNormalization"} <= ops
    scans = [n for n in m.graph.node if n.op_type == "Scan"]
    assert len(scans) == 3  # ham, gdn, ham; the HAM scans also emit the score
    assert [len(s.output) for s in scans] == [3, 2, 3]
    inputs = [i.name for i in m.graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.conv_state" in inputs and "past_key_values.2.key" in inputs
    assert "past_key_values.1.key" not in inputs  # gdn: no kv cache
    outputs = [o.name for o in m.graph.output]
    assert "debug.0.surprise" in outputs and "debug.3.admitted" in outputs
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["ham.layers"]) == ["ham", "gdn", "attn", "ham"]
    # every parameter comes from the MLX model under its own name
    weights = {i.name for i in m.graph.initializer}
    assert "model.layers.0.attn.q_proj.weight" in weights
    assert "model.layers.0.attn.attn_sink" in weights and "lm_head.weight" in weights


def test_parity_report(fp32):
    r = fp32.report
    assert r["variant"] == "fp32" and r["tokens"] >= 64
    assert r["max_logit_error"] < 1e-4 and r["flips_outside_margin"] == 0
    assert r == json.loads((fp32.path / "parity.json").read_text())
    assert "admission flips" in fp32.lines[0]


@pytest.mark.parametrize(
    "variant", [{"dtype": "fp16"}, {"quantize": "int8"}, {"quantize": "int4"}],
    ids=["fp16", "int8", "int4"],
)  # fmt: skip
def test_variants(folder, fp32, tmp_path, variant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ParityWarning)  # random weights: see the bundled model
        result = export_onnx(folder, tmp_path / "v", **variant)
    r = result.report
    m = onnx.load(str(result.path / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    if "dtype" in variant:
        assert r["bytes"] < 0.6 * fp32.report["bytes"]
        assert r["relative_logit_error"] < 1e-2
        types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
        assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
        assert types["past_key_values.0.conv_state"] == onnx.TensorProto.FLOAT  # count: exact
    else:
        bits = {"int8": 8, "int4": 4}[variant["quantize"]]
        assert r["bytes"] < (0.4 if bits == 8 else 0.3) * fp32.report["bytes"]
        assert {"MatMulNBits", "GatherBlockQuantized"} <= ops  # tied head and embeddings share
        assert not ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
        float_weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
        for i in (0, 3):  # the small projections stay float
            for proj in ("a_proj", "b_proj", "kv_gate_proj"):
                assert f"model.layers.{i}.attn.{proj}.weight" in float_weights
        q = r["quantization"]
        assert q["bits"] == bits and q["block_size"] == 32
        names = {t["name"] for t in q["tensors"]}
        assert "model.layers.0.attn.q_proj.weight" in names and "lm_head.weight" in names
        assert not any("a_proj" in n or "kv_gate" in n for n in names)
        # random weights, tiny width: one admission flip (a token within 1e-3 of τ) moves the
        # logits of a whole row, so quality thresholds are checked on the trained bundled model
        assert 0 < r["relative_logit_error"] < 1 and r["top1_agreement"] > 0.3
        assert json.loads(dict((p.key, p.value) for p in m.metadata_props)["ham.quantize"]) == (
            variant["quantize"])  # fmt: skip
    onnx.checker.check_model(str(result.path / "model.onnx"), full_check=True)


@pytest.fixture(scope="module")
def bundled_model():
    return load(default_model_path())


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_parity_on_the_bundled_model(bundled_model, quantize, tmp_path):
    """The trained bundled model: 8-bit weights hold parity (>= 97% top-1, no admission flip, so
    no warning); 4-bit weights stay within measured bounds, and the exporter warns. Either way a
    row's result depends on that row alone: in a padded batch it is the row run by itself on the
    same export (no per-call activation scale couples tokens; measured difference 0.0)."""
    model, tok = bundled_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export_onnx(model, tmp_path / quantize, tokenizer=tok, quantize=quantize)
    r = result.report
    fp32_bytes = 6.5e6  # the bundled model's fp32 export
    if quantize == "int8":
        assert r["top1_agreement"] >= 0.97 and r["admission_flips"] == 0, r
        assert r["relative_logit_error"] < 0.02 and r["bytes"] < 0.35 * fp32_bytes
        assert result.warnings == [] and not [w for w in caught if w.category is ParityWarning]
    else:
        assert r["top1_agreement"] >= 0.85 and r["admission_flips"] <= 4, r
        # measured 0.171 (93% top-1, 1 flip); the logits of a better-trained model are sharper
        assert r["relative_logit_error"] < 0.25 and r["bytes"] < 0.22 * fp32_bytes
        flagged = [str(w.message) for w in caught if w.category is ParityWarning]
        assert len(flagged) == len(result.warnings) >= 1
        assert any("under 97%" in w or "admission decisions differ" in w for w in flagged)
    om = OnnxModel(result.path)
    prompts = [tok.encode(t) for t in ("ROMEO:\nBut, soft!", "JULIET:\nO Romeo, Romeo!", "All:")]
    batch = compare_rows(model, om, prompts, "right", n_generate=8)
    assert min(row["top1_agreement"] for row in batch["per_row"]) >= (
        0.9 if quantize == "int8" else 0.6)  # fmt: skip
    T = max(map(len, prompts))
    ids = np.array([p + [0] * (T - len(p)) for p in prompts])
    mask = (np.arange(T)[None] < np.array([[len(p)] for p in prompts])).astype(np.int64)
    logits = om(ids, om.make_cache(3, 64), attention_mask=mask)
    for b, p in enumerate(prompts):
        alone = om(np.array([p]), om.make_cache(1, 64))[0]
        np.testing.assert_allclose(logits[b, : len(p)], alone, rtol=0, atol=1e-5)


def test_file_modes(folder, tmp_path):
    """An export is readable by everyone like every other ham-mlx output (0755 folders, 0644
    files under the usual umask 022), and follows a stricter umask like a plain open()."""
    old = os.umask(0o022)
    try:
        out = export_onnx(folder, tmp_path / "modes", genai=True, context_length=64).path
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        files = list(out.iterdir())
        assert "model.onnx.data" in {f.name for f in files} and len(files) >= 7
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
        os.umask(0o027)
        out = export_onnx(folder, tmp_path / "strict", report=False).path
        assert stat.S_IMODE(out.stat().st_mode) == 0o750
        assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o640}
    finally:
        os.umask(old)


def test_runner_generates_like_mlx(folder, fp32):
    model, tok = load(folder)
    om, otok = load_onnx(fp32.path)
    ref = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=20, prefill_step_size=5)]
    got = list(onnx_stream_generate(om, otok, PROMPT, max_tokens=20, prefill_step_size=5))
    assert [r.token for r in got] == ref
    last = got[-1]
    assert last.finish_reason in ("length", "stop") and last.prompt_tokens == len(
        tok.encode(PROMPT)
    )
    assert [s["type"] for s in last.kv] == ["ham", "gdn", "attn", "ham"]
    assert last.kv[0]["seen"] == len(tok.encode(PROMPT)) + len(got) - 1
    assert "admitted" in last.summary()
    # seeded sampling draws the same tokens (the samplers are ham_mlx's)
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    ref = [r.token for r in stream_generate(model, tok, PROMPT, **kw)]
    assert [r.token for r in onnx_stream_generate(om, otok, PROMPT, **kw)] == ref


def test_bad_input_is_refused(fp32):
    om, tok = load_onnx(fp32.path)
    with pytest.raises(ValueError, match="empty"):
        next(onnx_stream_generate(om, tok, ""))
    with pytest.raises(ValueError, match="empty"):
        om(np.zeros((1, 0), np.int64), om.make_cache(1, 8))
    with pytest.raises(ValueError, match="out of range"):
        om(np.array([[5, 10_000]]), om.make_cache(1, 8))
    # the attention layer needs a slot per token: a short capacity is reported before running
    with pytest.raises(ValueError, match="capacity 10 cannot hold the requested generation"):
        next(onnx_stream_generate(om, tok, PROMPT, max_tokens=20, capacity=10))
    cache = om.make_cache(1, 4)
    om(np.array([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="capacity 4 of attention layer 2"):
        om(np.array([[4, 5]]), cache)


def test_unsupported_module_is_named(tmp_path):
    class Mystery(nn.Module):
        def __call__(self, x):
            return x

    model = make_model(("ham", "gdn"))
    model.layers[1].mlp = Mystery()
    with pytest.raises(UnsupportedFeature, match=r"model\.layers\.1\.mlp: Mystery has no ONNX"):
        build_model(model)


def test_mlx_quantized_model_exports_dequantized(tmp_path):
    model = make_model(("ham", "attn"), hidden_size=64, head_dim=32)
    nn.quantize(model, group_size=32, bits=4)
    assert isinstance(model.layers[0].attn.q_proj, nn.QuantizedLinear)
    proto, _ = build_model(model)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    ids = np.random.default_rng(0).integers(0, 61, (1, 12))
    ref = np.array(model(mx.array(ids)))
    got = OnnxModel(tmp_path / "model.onnx")(ids, OnnxModel(tmp_path / "model.onnx").make_cache())
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_export_arguments_are_checked(folder, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        export_onnx(folder, tmp_path / "x", quantize="int3")
    with pytest.raises(ValueError, match="fp32"):
        export_onnx(folder, tmp_path / "x", dtype="fp16", quantize="int8")
    with pytest.raises(ValueError, match="threshold"):
        export_onnx(folder, tmp_path / "x", threshold=[0.1, 0.2, 0.3])
    assert not (tmp_path / "x").exists()


def test_cli_export_and_generate(folder, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["export", str(folder), str(out), "--max-kv-tokens", "4", "--threshold", "0.1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "admission flips" in printed and f"wrote {out}" in printed
    om = OnnxModel(out)
    assert om.max_kv_tokens == 4 and om.thresholds == [0.1, 0.1]
    code = main(["generate", "--onnx", str(out), "--prompt", PROMPT, "--max-tokens", "8"])
    assert code == 0
    err = capsys.readouterr().err
    assert "admitted 4/4" in err and "rejected" in err  # τ 0.1 fills a 4-token cache
    with pytest.raises(SystemExit) as exit_:  # τ is baked in: an argparse error
        main(["generate", "--onnx", str(out), "--prompt", "x", "--threshold", "0.3"])
    assert exit_.value.code == 2 and "baked into the graph" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "ham_mlx.cli", "export", "--help"], capture_output=True, text=True
    ).stdout
    assert "--genai" in help_text and "Capacity" in help_text
