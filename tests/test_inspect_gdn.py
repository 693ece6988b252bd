"""`ham-mlx inspect` on GDN layers: the cosine surprise of the layer's own state, shown for
all-GDN and hybrid models, clearly labelled as storing nothing."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from ham_mlx import Model, load
from ham_mlx.cli import main
from ham_mlx.inspector.report import render_html
from ham_mlx.inspector.terminal import render
from ham_mlx.inspector.trace import GDN_LEVEL, trace
from ham_mlx.presets import init_model
from ham_mlx.routers import head_surprise, token_score

HAMLET = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,"""
HAM_ONLY = ("kv_gate_proj", "kv_norm", "attn_log_scale", "attn_sink", "threshold", "router")


@pytest.fixture(scope="module")
def default():
    return load()


@pytest.fixture(scope="module")
def as_gdn(default):
    """The bundled all-HAM model (cosine router) with every layer a plain GDN layer: the same
    weights without the HAM-only ones."""
    model, _ = default
    n = model.args.num_hidden_layers
    args = dataclasses.replace(
        model.args, layer_types=["gdn"] * n, ham_threshold=0.5, ham_kv_target=None
    )
    gdn = Model(args)
    weights = [(k, v) for k, v in tree_flatten(model.parameters())
               if not any(f".attn.{n}" in k for n in HAM_ONLY)]  # fmt: skip
    gdn.load_weights(weights, strict=True)
    mx.eval(gdn.parameters())
    return gdn


def uncached_scores(model: Model, ids: list[int]) -> dict[int, np.ndarray]:
    """Each GDN layer's cosine surprise from one uncached pass over the whole prompt."""
    h = model.model.embeddings(mx.array([ids]))
    out = {}
    for i, block in enumerate(model.layers):
        if block.layer_type == "gdn":
            rec = block.attn.recurrence(block.attn_norm(h), None)
            out[i] = np.array(token_score(head_surprise(rec.v_hat, rec.v, "cosine"))[0])
        h = block(h)
    return out


def test_gdn_score_is_what_a_cosine_ham_layer_thresholds(default, as_gdn):
    """Layer 0 sees the same input in both models: the GDN layer's score equals the HAM
    layer's router score, token for token."""
    model, tok = default
    ham = trace(model, tok, HAMLET, prefill_step_size=7)
    gdn = trace(as_gdn, tok, HAMLET, prefill_step_size=7)
    assert [lt.kind for lt in gdn.layers] == ["gdn"] * len(gdn.layers)
    np.testing.assert_allclose(gdn.layers[0].scores, ham.layers[0].scores, atol=1e-5)
    assert gdn.layers[0].scores[0] == pytest.approx(1.0)  # the empty state predicts nothing
    for lt in gdn.layers:
        assert lt.threshold == GDN_LEVEL
        np.testing.assert_array_equal(lt.admitted, lt.scores >= GDN_LEVEL)
    high = trace(as_gdn, tok, HAMLET, gdn_level=0.9)
    assert [lt.n_admitted for lt in high.layers] == [int((lt.scores >= 0.9).sum())
                                                      for lt in gdn.layers]  # fmt: skip


@pytest.mark.parametrize("step", [1, 5, 512])
def test_gdn_scores_do_not_depend_on_chunking(default, step):
    """Chunked prefill into real caches (the state read before each chunk, then left for the
    block) gives the scores of one uncached pass, in every GDN layer of a hybrid."""
    _, tok = default
    mx.random.seed(1)
    from ham_mlx.presets import preset_args

    hybrid = Model(preset_args("tiny-hybrid", tok.vocab_size))  # ham gdn attn ham
    ids = tok.encode(HAMLET)
    t = trace(hybrid, tok, HAMLET, prefill_step_size=step)
    want = uncached_scores(hybrid, ids)
    got = {lt.index: lt.scores for lt in t.layers if lt.kind == "gdn"}
    assert got.keys() == want.keys() == {1}
    np.testing.assert_allclose(got[1], want[1], atol=1e-4)


def test_views_say_that_gdn_layers_store_nothing(default, as_gdn):
    _, tok = default
    t = trace(as_gdn, tok, HAMLET, model_name="gdn")
    out = render(t, color=False, width=80, table=True)
    assert "layer 0 (gdn, nothing stored)  surprise ≥ level 0.5000" in out
    assert "cosine surprise of the layer's own state" in out and "it stores nothing" in out
    assert "KV fraction (admitted / seen)" not in out and "τ trained" not in out
    assert "τ / gdn level" in out
    page = render_html(t)
    assert "GDN layer, nothing stored" in page and "(gdn: nothing is stored)" in page


def test_cli_on_all_gdn_and_hybrid_folders(tmp_path, capsys):
    gdn = init_model(tmp_path / "gdn", "tiny-gdn")
    html = tmp_path / "gdn.html"
    argv = ["inspect", "--model", str(gdn), "--prompt", HAMLET, "--html", str(html)]
    assert main([*argv, "--gdn-level", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "layer 0 (gdn, nothing stored)  surprise ≥ level 0.8000" in out
    assert "layer 1 (gdn, nothing stored)" in out and "it stores nothing" in out
    assert "nothing is stored" in html.read_text()
    assert main(["inspect", "--model", str(gdn), "--prompt", "x", "--threshold", "0.3"]) == 2
    assert "has no HAM layers; GDN layers have no τ" in capsys.readouterr().err

    hybrid = init_model(tmp_path / "hybrid", "tiny-hybrid")
    assert main(["inspect", "--model", str(hybrid), "--prompt", HAMLET, "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "layer 0 (ham)  τ 0.3000" in out and "layer 3 (ham)  τ 0.3000" in out
    assert "layer 1 (gdn, nothing stored)" in out and "KV fraction (admitted / seen)" in out
    assert main(["inspect", "--model", str(hybrid), "--prompt", "x", "--layers", "2"]) == 2
    assert "layer 2 ('attn') has no surprise score" in capsys.readouterr().err


def test_cli_on_a_converted_fla_hybrid_with_tokenizer_json(tmp_path, capsys):
    """FLA's own hybrid checkpoint (gdn attn gdn, its config as FLA saved it), converted, with
    only a tokenizer.json beside it."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ham_mlx.convert import convert

    folder = convert(Path(__file__).parent / "fixtures" / "fla" / "hybrid", tmp_path / "m").path
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=90, special_tokens=["<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(HAMLET.splitlines() * 4, trainer)
    assert tok.get_vocab_size() <= 96  # the checkpoint's vocab_size
    tok.save(str(folder / "tokenizer.json"))
    assert main(["inspect", "--model", str(folder), "--prompt", HAMLET, "--table"]) == 0
    out = capsys.readouterr().out
    assert "layer 0 (gdn, nothing stored)" in out and "layer 2 (gdn, nothing stored)" in out
    assert "layer 1" not in out.split("GDN surprise")[1]  # the attn layer has no score
