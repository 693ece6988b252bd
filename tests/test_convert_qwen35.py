"""transformers' Qwen3.5 as the external oracle: converted Qwen3.5 checkpoints against its numbers.

The fixtures in tests/fixtures/qwen35/ were written and computed by transformers' own
`Qwen3_5ForCausalLM` and `Qwen3_5ForConditionalGeneration` (scripts/make_qwen35_fixtures.py);
these tests need neither torch nor transformers. Logits of a prefill and of single-token decode
steps within 1e-4 in float32; then the export of a converted model against the MLX model under
onnxruntime and onnxruntime-genai.
"""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import onnx
import pytest
from mlx.utils import tree_flatten

from ham_mlx import load_model
from ham_mlx.convert import ConversionError, convert
from ham_mlx.convert.safetensors_io import read_safetensors
from ham_mlx.export.build import build_model
from ham_mlx.export.parity import compare, compare_rows
from ham_mlx.export.runtime import OnnxModel
from ham_mlx.model_io import read_config, read_weights

FIXTURES = Path(__file__).parent / "fixtures" / "qwen35"
NAMES = sorted(json.loads((FIXTURES / "fixtures.json").read_text())["fixtures"])
TOL = 1e-4


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen35")
    done, summaries = {}, {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in done:
            done[key] = out / f"{name}-{len(done)}"
            summaries[done[key]] = convert(FIXTURES / name, done[key], **kw)
        return done[key]

    get.summary = summaries.get
    return get


def oracle(name):
    return mx.load(str(FIXTURES / name / "oracle.safetensors"))


def max_err(a, b) -> float:
    a, b = (np.array(mx.array(x).astype(mx.float32), dtype=np.float64) for x in (a, b))
    return float(np.abs(a - b).max())


def run(model, o):
    """Prefill logits and the decode steps' logits, one cache."""
    cache = model.make_cache()
    logits = model(o["input_ids"], cache)
    ids = o["decode_ids"]
    steps = [model(ids[:, s : s + 1], cache) for s in range(ids.shape[1])]
    return logits, mx.concatenate(steps, axis=1)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_match_transformers(name, converted):
    model = load_model(converted(name, dtype="float32"))
    o = oracle(name)
    logits, steps = run(model, o)
    assert max_err(logits, o["logits"]) < TOL
    assert max_err(steps, o["decode_logits"]) < TOL
    # the one-shot forward and a prompt fed in two chunks agree too
    whole = mx.concatenate([o["input_ids"], o["decode_ids"]], axis=1)
    assert max_err(model(whole)[:, -1], steps[:, -1]) < TOL
    cache, T = model.make_cache(), o["input_ids"].shape[1]
    model(o["input_ids"][:, : T // 3], cache)
    assert max_err(model(o["input_ids"][:, T // 3 :], cache), o["logits"][:, T // 3 :]) < TOL


def test_config_and_weights_mapping(converted):
    args = read_config(converted("text_gva", dtype="float32"))
    assert args.layer_types == ["gdn", "gdn", "gdn", "attn"]
    assert (args.num_heads, args.num_v_heads, args.head_dim, args.head_v_dim) == (2, 4, 16, 24)
    assert args.output_gate_activation == "silu" and args.use_gate and not args.tie_word_embeddings
    attn = args.attn
    assert (attn["head_dim"], attn["num_heads"], attn["num_kv_heads"]) == (24, 4, 2)
    assert attn["output_gate"] == "sigmoid" and attn["qk_norm"]
    assert attn["partial_rotary_factor"] == 0.25
    folder = converted("vl_tied", dtype="float32")
    args = read_config(folder)
    assert args.tie_word_embeddings and args.layer_types == ["gdn", "attn", "gdn", "attn"]
    text = "\n".join(converted.summary(folder).notes)
    assert "dropped 21 vision tower tensors" in text and "dropped 2 multi-token" in text
    w = read_weights(folder)
    assert "lm_head.weight" not in w and not any("visual" in k or "mtp" in k for k in w)
    src = read_safetensors(FIXTURES / "vl_tied/model.safetensors")
    src = {k: t.numpy() for k, t in src.items()}
    p = "model.language_model.layers."
    # zero-centred norms are stored as 1 + w; the gated GDN norm as is
    np.testing.assert_allclose(
        np.array(w["model.layers.1.attn.q_norm.weight"]),
        1 + src[p + "1.self_attn.q_norm.weight"],
        rtol=0,
        atol=1e-7,
    )
    np.testing.assert_array_equal(np.array(w["model.layers.0.attn.o_norm.weight"]),
                                  src[p + "0.linear_attn.norm.weight"])  # fmt: skip
    qkv, conv = src[p + "0.linear_attn.in_proj_qkv.weight"], src[p + "0.linear_attn.conv1d.weight"]
    np.testing.assert_array_equal(np.array(w["model.layers.0.attn.k_proj.weight"]), qkv[64:128])
    np.testing.assert_array_equal(  # torch [C, 1, Kc] -> MLX [C, Kc, 1], rows of v
        np.array(w["model.layers.0.attn.v_conv1d.weight"]), conv[128:].transpose(0, 2, 1)
    )


def test_a_converted_folder_converts_to_itself(converted, tmp_path):
    folder = converted("text_gva", dtype="float32")
    convert(folder, tmp_path / "again")
    a, b = read_weights(folder), read_weights(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.array(a[k]), np.array(b[k]), err_msg=k)
    assert read_config(folder).to_dict() == read_config(tmp_path / "again").to_dict()


def test_bfloat16_shards_keep_their_dtype(converted):
    folder = converted("text_bf16_sharded")
    summary = converted.summary(folder)
    assert summary.dtype == "bfloat16" and len(summary.source_files) > 1
    w = read_weights(folder)
    assert w["model.layers.0.attn.q_proj.weight"].dtype == mx.bfloat16
    assert w["model.layers.0.attn.A_log"].dtype == mx.float32
    model = load_model(folder)
    o = oracle("text_bf16_sharded")
    logits, _ = run(model, o)
    err = np.abs(np.array(logits.astype(mx.float32)) - np.array(o["logits"]))
    assert err.mean() < 0.03 and err.max() < 0.5, (err.mean(), err.max())  # bfloat16 activations


MUTATIONS = {
    # a known porting slip, applied to the loaded model: each must move the logits past TOL
    "no output gate": lambda m: setattr(m.layers[3].attn, "gated", False),
    "full rope": lambda m: setattr(m.layers[3].attn.rope, "dims", 24),
    "norm scale w, not 1 + w": lambda m: m.load_weights(
        [("model.layers.1.attn_norm.weight", m.layers[1].attn_norm.weight - 1)], strict=False
    ),
    "no k norm": lambda m: m.layers[3].attn.pop("k_norm"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_detail_moves_the_logits(mutation, converted):
    model = load_model(converted("text_gva", dtype="float32"))
    if mutation == "no output gate":  # q_proj keeps the gate rows: read only the queries
        q = model.layers[3].attn.q_proj.weight.reshape(4, 2, 24, 64)[:, 0].reshape(96, 64)
        model.layers[3].attn.q_proj.weight = q
    MUTATIONS[mutation](model)
    o = oracle("text_gva")
    assert max_err(model(o["input_ids"]), o["logits"]) > 100 * TOL


def edited(tmp_path, name, config=None, weights=None):
    """A copy of a fixture with its config.json or its (single-file) weights edited."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    if config:
        raw = json.loads((folder / "config.json").read_text())
        config(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    if weights:
        from ham_mlx.convert.safetensors_io import write_safetensors

        file = folder / "model.safetensors"
        tensors = {k: t.numpy() for k, t in read_safetensors(file).items()}
        weights(tensors)
        write_safetensors(file, tensors)
    return folder


def text(raw):
    return raw.get("text_config", raw)


BAD = {
    "attention biases": ("text_gva", lambda r: r.update(attention_bias=True), None),
    "rope_type 'yarn'": ("text_gva", lambda r: r["rope_parameters"].update(rope_type="yarn"),
                         None),
    "unknown config key(s) ['sliding_window']": (
        "vl_tied", lambda r: text(r).update(sliding_window=4), None),
    "needs a text_config": ("vl_tied", lambda r: r.pop("text_config"), None),
    "a gdn tensor in layer 2": ("text_gva", lambda r: r.update(
        layer_types=["linear_attention"] * 2 + ["full_attention"] * 2), None),
    "model.layers.0.linear_attn.extra.weight": ("text_gva", None, lambda t: t.update(
        {"model.layers.0.linear_attn.extra.weight": np.zeros((2, 2), np.float32)})),
    "rows, the config needs": ("text_gva", lambda r: r.update(linear_num_value_heads=2), None),
    "lm_head.weight differs": ("vl_tied", None, lambda t: t.update(
        {"lm_head.weight": np.ones((96, 64), np.float32)})),
}  # fmt: skip


@pytest.mark.parametrize("message", list(BAD))
def test_bad_checkpoints_are_refused_by_name(message, tmp_path):
    name, config, weights = BAD[message]
    folder = edited(tmp_path, name, config, weights)
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_4bit_conversion_generates(converted):
    folder = converted("vl_tied", dtype="float32", quantize=True, q_bits=4, q_group_size=32)
    assert read_config(folder).quantization == {"group_size": 32, "bits": 4}
    model = load_model(folder)
    o = oracle("vl_tied")
    logits, steps = run(model, o)
    assert np.isfinite(np.array(steps)).all()
    agree = np.mean(np.argmax(np.array(logits), -1) == np.argmax(np.array(o["logits"]), -1))
    assert agree > 0.2, agree  # 4 bits in groups of 32 on random weights; chance is 1/96


@pytest.mark.parametrize("name", ["text_gva", "vl_tied"])
def test_export_matches_mlx_under_onnxruntime(name, converted, tmp_path):
    model = load_model(converted(name, dtype="float32"))
    names = {n for n, _ in tree_flatten(model.parameters())}
    assert any(n.endswith("attn.q_norm.weight") for n in names)
    proto, _ = build_model(model, layout="compact")
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "model.onnx"))
    om = OnnxModel(tmp_path / "model.onnx")
    ids = np.random.default_rng(1).integers(3, 96, (2, 20))
    r = compare(model, om, ids, chunks=[7, 13], n_generate=24)
    assert r["max_logit_error"] < TOL, r["max_logit_error"]
    prompts = [list(range(5, 17)), list(range(20, 25)), list(range(40, 49))]
    for padding in ("right", "left"):
        r = compare_rows(model, om, prompts, padding=padding, n_generate=8)
        assert r["max_logit_error"] < TOL, (padding, r["max_logit_error"])


def test_genai_generates_like_mlx(converted, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    from ham_mlx.export import export_onnx
    from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

    model = load_model(converted("text_gva", dtype="float32"))
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    out = export_onnx(model, tmp_path / "onnx", tokenizer=tok, genai=True, context_length=64,
                      report=False).path  # fmt: skip
    gm = og.Model(str(out))
    prompt = np.array([[5, 17, 33, 60, 7, 81]], dtype=np.int32)
    params = og.GeneratorParams(gm)
    params.set_search_options(max_length=30, do_sample=False, batch_size=1)
    gen = og.Generator(gm, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    cache = model.make_cache()
    logits = model(mx.array(prompt), cache)[:, -1]
    want = []
    for _ in range(len(got)):
        want.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[want[-1]]]), cache)[:, -1]
    assert got == want


@pytest.mark.slow
def test_conversion_holds_one_copy_of_the_weights(tmp_path):
    """A ~0.4 GB bfloat16 checkpoint of Qwen3.5-0.8B's layer shapes (examples/qwen35_sizes.py,
    written one tensor at a time), converted in its own process: the process's peak RSS is the
    checkpoint's size plus the interpreter, not two copies."""
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "examples" / "qwen35_sizes.py"
    args = ["--size", "small", "--work", str(tmp_path), "--skip-speed", "--dtypes", "bfloat16"]
    run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = re.search(r"convert bfloat16\s+peak RSS\s+(\d+) MB\s+checkpoint\s+(\d+) MB", run.stdout)
    rss, ckpt = int(m[1]), int(m[2])
    assert ckpt > 300, run.stdout
    assert rss < 1.4 * ckpt + 150, run.stdout  # two copies would be 2 * ckpt + the interpreter
