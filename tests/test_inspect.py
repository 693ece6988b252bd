"""`ham-mlx inspect`: the trace against generation's admission, the views, the CLI, Chromium."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx import Model, load, stream_generate
from ham_mlx.cli import main
from ham_mlx.inspector.plot import plot_scores
from ham_mlx.inspector.report import render_html
from ham_mlx.inspector.terminal import marker, render, use_color, wrap
from ham_mlx.inspector.trace import trace
from ham_mlx.presets import init_model, preset_args

HAMLET = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them."""
NASTY = 'ROMEO: <script>alert("x")</script> & Juliet'


@pytest.fixture(scope="module")
def default():
    return load()


@pytest.fixture(scope="module")
def hamlet(default):
    model, tok = default
    return trace(model, tok, HAMLET, prefill_step_size=7, model_name="default")


def test_trace_is_generation_admission(default, hamlet):
    """Stored = score ≥ τ (spec §4.2), scores match an uncached forward, fractions = kv_stats."""
    model, tok = default
    ids = tok.encode(HAMLET)
    assert hamlet.ids == ids and len(hamlet.tokens) == len(ids)
    assert [lt.index for lt in hamlet.layers] == [0, 1, 2, 3]
    assert [lt.threshold for lt in hamlet.layers] == model.thresholds()

    ref: list[mx.array] = []  # independent: one forward without a cache
    model(mx.array([ids]), scores=ref)
    for lt, s in zip(hamlet.layers, ref):
        s = np.array(s[0])
        np.testing.assert_allclose(lt.scores, s, atol=2e-3)  # float16 weights, other chunking
        np.testing.assert_array_equal(lt.admitted, lt.scores >= lt.threshold)
        clear = np.abs(s - lt.threshold) > 2e-3  # away from ties at τ
        np.testing.assert_array_equal(lt.admitted[clear], (s >= lt.threshold)[clear])
        assert 0 < lt.n_admitted < len(ids)

    last = list(stream_generate(model, tok, HAMLET, max_tokens=0, prefill_step_size=7))[-1]
    kv = [s for s in last.kv if s["type"] == "ham"]
    assert [lt.n_admitted for lt in hamlet.layers] == [s["admitted"][0] for s in kv]
    assert [lt.kv_fraction for lt in hamlet.layers] == pytest.approx(last.kv_fraction, abs=0)

    whole = trace(model, tok, HAMLET, prefill_step_size=512)  # chunking changes nothing
    for a, b in zip(hamlet.layers, whole.layers):
        np.testing.assert_array_equal(a.admitted, b.admitted)


def test_threshold_override(default, hamlet):
    model, tok = default
    lower = trace(model, tok, HAMLET, threshold=min(model.thresholds()) - 0.1)
    assert lower.threshold_source == "override"
    for lo, tr in zip(lower.layers, hamlet.layers):
        assert lo.kv_fraction >= tr.kv_fraction
        np.testing.assert_array_equal(lo.admitted, lo.scores >= lo.threshold)
    assert all(lt.kv_fraction == 1.0 for lt in trace(model, tok, HAMLET, threshold=0.0).layers)
    assert all(lt.n_admitted == 0 for lt in trace(model, tok, HAMLET, threshold=2.5).layers)
    per_layer = trace(model, tok, HAMLET, threshold=[0.0, 2.5, 0.0, 2.5])
    assert [lt.kv_fraction for lt in per_layer.layers] == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="4 HAM layers"):
        trace(model, tok, HAMLET, threshold=[0.1, 0.2])


def test_layer_selection_and_models_without_scores(default):
    _, tok = default
    mx.random.seed(0)
    hybrid = Model(preset_args("tiny-hybrid", tok.vocab_size))  # ham gdn attn ham
    t = trace(hybrid, tok, HAMLET)
    assert [(lt.index, lt.kind) for lt in t.layers] == [(0, "ham"), (1, "gdn"), (3, "ham")]
    assert [lt.index for lt in trace(hybrid, tok, HAMLET, layers=[3]).layers] == [3]
    with pytest.raises(ValueError, match=r"layer 2 \('attn'\) has no surprise score; HAM and "
                       "GDN layers: 0, 1, 3"):  # fmt: skip
        trace(hybrid, tok, HAMLET, layers=[2])
    attn = Model(preset_args("tiny-attn", tok.vocab_size))
    with pytest.raises(ValueError, match=r"model a has no HAM or GDN layers \(layer types: attn"):
        trace(attn, tok, HAMLET, model_name="a")


def test_terminal_view(hamlet, monkeypatch):
    out = render(hamlet, color=False, width=60)
    for tok in hamlet.tokens:
        assert tok.strip() in out
    assert "KV fraction (admitted / seen):" in out
    for lt in hamlet.layers:
        assert (
            f"layer {lt.index}  {lt.kv_fraction:.3f}  ({lt.n_admitted}/{len(lt.admitted)})" in out
        )
        assert f"τ {lt.threshold:.4f}" in out
    assert "\x1b[" not in out and "[<s>]" in out  # BOS: score 1, always stored
    assert out.count("[") == sum(lt.n_admitted for lt in hamlet.layers) + out.count("[token]")
    colored = render(hamlet, color=True, width=60, table=True)
    assert "\x1b[30;48;5;" in colored and "[<s>]" not in colored
    assert colored.count("*") == sum(lt.n_admitted for lt in hamlet.layers)  # the score table

    tty = io.StringIO()
    tty.isatty = lambda: True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert use_color(tty) and not use_color(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color(tty)


def test_wrap_breaks_between_words_within_width():
    text = "The slings and arrows of outrageous fortune, or to take arms\nagainst a sea"
    tokens = re.findall(r" ?[^ \n]{1,4}|\n", text)  # word pieces, like sentencepiece's
    stored = [i % 3 == 0 for i in range(len(tokens))]
    lines = wrap(tokens, stored, *marker(0, False), width=24)
    assert all(len(line) <= 24 for line in lines)
    plain = [line.replace("[", "").replace("]", "").replace("↵", "") for line in lines]
    assert " ".join(plain).split() == text.split()  # no word split across lines


class Tags(HTMLParser):
    """The start tags of a page and the text of its token spans."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[str] = []
        self.tokens: list[str] = []
        self.open: list[bool] = []  # open spans: is it a token span?
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "span":
            self.open.append(dict(attrs).get("class", "").startswith("tok"))
            if self.open[-1]:
                self.tokens.append("")

    def handle_endtag(self, tag):
        if tag == "span":
            self.open.pop()

    def handle_data(self, data):
        if any(self.open):
            self.tokens[-1] += data


def test_html_escapes_and_shows_numbers(default):
    model, tok = default
    t = trace(model, tok, NASTY, model_name="<b>m&m</b>")
    page = render_html(t)
    parsed = Tags(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert "".join(parsed.tokens[: len(t.ids)]) == "<s>" + NASTY  # the text, as text
    assert "&lt;b&gt;m&amp;m&lt;/b&gt;" in page
    lt = t.layers[0]
    assert page.count('class="tok') == len(t.ids) * len(t.layers)
    assert f"score {lt.scores[0]:.4f} ≥ τ {lt.threshold:.4f}: stored" in page
    assert "not stored" in page and f"{lt.kv_fraction:.3f}" in page


def test_plot_has_one_panel_per_layer(default, hamlet, tmp_path):
    fig = plot_scores(hamlet, tmp_path / "scores.png")
    assert len(fig.axes) == 4
    assert (tmp_path / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, tok = default
    mx.random.seed(0)
    hybrid = Model(preset_args("tiny-hybrid", tok.vocab_size))
    assert len(plot_scores(trace(hybrid, tok, HAMLET * 4)).axes) == 3  # > labelled tokens


def test_cli_end_to_end(tmp_path, capsys):
    html = tmp_path / "out" / "report.html"
    assert main(["inspect", "--prompt", NASTY, "--html", str(html), "--threshold", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "KV fraction (admitted / seen):" in out and "τ set by --threshold" in out
    assert "Juliet" in out and str(html) in out
    page = html.read_text()
    assert "&lt;" in page and "&amp;" in page and "script" not in Tags(page).tags
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the plot, embedded
    assert html.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    prompt = tmp_path / "hamlet.txt"
    prompt.write_text(HAMLET)
    argv = ["inspect", "--file", str(prompt), "--layers", "0,3", "--max-tokens", "10"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "inspecting the first 10 (--max-tokens)" in cap.err
    assert "layer 3 (ham)" in cap.out and "layer 1 (ham)" not in cap.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--file", "/nonexistent/hamlet.txt"], "--file /nonexistent/hamlet.txt: not found"),
        (["--prompt", "x", "--layers", "9"], "layer 9 does not exist"),
        (["--prompt", "x", "--html", "r.png"], "give the .html path"),
    ],
    ids=["empty", "missing-file", "bad-layer", "png-as-html"],
)
def test_cli_errors(argv, message, capsys):
    assert main(["inspect", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_model_without_scored_layers(tmp_path, capsys):
    folder = init_model(tmp_path / "attn", "tiny-attn")
    assert main(["inspect", "--model", str(folder), "--prompt", "Romeo"]) == 2
    err = capsys.readouterr().err
    assert f"model {folder} has no HAM or GDN layers (layer types: attn, attn)" in err


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_renders_in_headless_chromium(hamlet, tmp_path):
    from matplotlib.image import imread

    page = tmp_path / "report.html"
    page.write_text(render_html(hamlet, plot_png(hamlet, tmp_path)), encoding="utf-8")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    url = page.resolve().as_uri()
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,900", url],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    pixels = imread(shot)[..., :3]  # [900, 1200, 3]
    assert pixels.shape == (900, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50 and pixels.std() > 0.05
    dump = ["chromium", *flags, "--dump-dom", url]
    dom = subprocess.run(dump, check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<span class="tok st"') == sum(lt.n_admitted for lt in hamlet.layers)
    assert dom.count('<span class="tok') == len(hamlet.ids) * len(hamlet.layers)
    assert "What each HAM layer stored" in dom and "data:image/png;base64," in dom


def plot_png(t, folder):
    plot_scores(t, folder / "plot.png")
    return (folder / "plot.png").read_bytes()
