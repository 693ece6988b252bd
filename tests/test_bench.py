"""`ham-mlx bench --quick` on tiny sizes: the outputs exist and are well-formed (no timing is
asserted: benchmarks are not tests)."""

import json

import pytest

from ham_mlx.bench import targets
from ham_mlx.bench.contenders import have_mlx_lm
from ham_mlx.cli import main

try:
    import matplotlib  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

TINY = [
    "bench", "--quick", "--preset", "tiny", "--vocab", "61", "--contexts", "16,40",
    "--fractions", "0.25,0.5", "--steps", "2", "--repeats", "1", "--warmup", "1",
    "--prefill-lengths", "16,32", "--prefill-repeats", "1", "--probe-mb", "4",
    "--onnx-contexts", "16,40", "--parts", "probe,decode,prefill,onnx",
    "--prompt-lengths", "24,40", "--peer-max-length", "24",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--out", str(out)] + ([] if have_mlx_lm() else ["--no-mlx-lm"])
    assert main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_json_has_every_part(run):
    _, r = run
    assert r["command"].startswith("ham-mlx bench --quick")
    assert r["machine"]["cores"] >= 1 and r["machine"]["mlx"]
    assert r["probe"]["read_gbps"] > 0 and r["probe"]["mlx_matmul_gflops"] > 0
    peers = ["llama (mlx-lm)", "gdn (mlx-lm)"] if have_mlx_lm() else []
    models = ["ham-25%", "ham-50%", "gdn", "attn"] + peers
    assert [(d["context"], d["model"]) for d in r["decode"]] == [
        (c, m) for c in (16, 40) for m in models
    ]
    for d in r["decode"]:
        assert d["tok_s"] > 0 and len(d["samples_ms"]) == 2
        assert d["tokens_in_cache"] >= d["context"]
        assert d["step_bytes"] >= d["step_weight_bytes"] > 0
        assert 0 < d["roofline_fraction"]
        if d["kind"] == "ham":
            assert 0 <= d["kv_fraction"] <= 1 and d["kv_bytes"] > 0 and d["state_bytes"] > 0
        elif d["kind"] == "gdn" or d["model"] == "gdn (mlx-lm)":
            assert d["kv_bytes"] == 0 and d["state_bytes"] > 0
        else:
            assert d["kv_bytes"] > 0
    whole = [(p["T"], p["model"]) for p in r["prefill"]["model"]]
    ham = ["ham-10%", "ham-25%"]
    assert whole == [(24, m) for m in ["gdn", *ham, *peers[1:]]] + [(40, m) for m in ["gdn", *ham]]
    for p in r["prefill"]["model"]:
        assert p["tok_s"] > 0 and p["roofline_fraction"] > 0 and len(p["samples_s"]) == 1
        assert p["product_flops"] / p["T"] > 2 * 61 * 64  # at least the head's weights
        assert (p["kv_fraction"] is not None) == (p["kind"] == "ham")
    methods = {(p["method"], p["T"]) for p in r["prefill"]["scan"]}
    assert len(methods) == 6
    assert len(r["prefill"]["attention"]) == 2 * 2 * 2  # methods x lengths x fractions
    assert r["onnx"]["status"] == "measured"
    rows = r["onnx"]["rows"]
    assert [(x["context"], x["runtime"]) for x in rows] == [
        (c, m) for c in (16, 40) for m in ("mlx", "onnxruntime")
    ]
    for x in rows:  # the same computation in both runtimes
        assert x["admitted_equal"] and x["max_abs_logit_diff"] < 1e-3
        assert x["tok_s"] > 0 and x["prefill_tok_s"] > 0
    assert {t["status"] for t in r["targets"]} <= {"met", "missed", "not measured"}


def test_markdown_report_has_the_tables(run):
    out, r = run
    md = (out / "report.md").read_text()
    headings = ["# ham-mlx bench", "## Decode", "## Prefill: whole models",
                "## Prefill: gated-delta scan",
                "## Prefill: attention over admitted tokens",
                "## onnxruntime vs MLX (same model, same τ)", "## Speed targets"]  # fmt: skip
    for heading in headings:
        assert heading in md
    assert "| model | params | tok/s @16 | tok/s @40 |" in md
    for line in md.splitlines():
        if line.startswith("|"):
            assert line.endswith("|")


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")
def test_plots_are_png(run):
    out, _ = run
    for name in ("decode.png", "prefill.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000


def test_targets_read_the_measurements():
    row = dict(kind="ham", target_fraction=0.1, kv_fraction=0.1, parameters=120e6,
               roofline_fraction=0.6)  # fmt: skip
    decode = [
        {**row, "context": 16384, "model": "ham-10%", "tok_s": 30.0, "kv_bytes": 10},
        {**row, "context": 16384, "model": "attn", "kind": "attn", "tok_s": 10.0, "kv_bytes": 100},
        {**row, "context": 16384, "model": "llama (mlx-lm)", "kind": "mlx-lm", "tok_s": 25.0,
         "kv_bytes": 100},
    ]  # fmt: skip
    t = targets.evaluate({"decode": decode, "prefill": {}})
    status = {x["target"].split(",")[0]: x["status"] for x in t}
    assert status["At 16k context"] == "missed"  # 1.2x llama < 1.5x
    assert status["At 512 context"] == "not measured"
    decode[2]["tok_s"] = 15.0
    assert targets.evaluate({"decode": decode})[0]["status"] == "met"


def test_prefill_targets_read_the_measurements():
    def row(model, T, tok_s, roof=0.5):
        return {"model": model, "T": T, "tok_s": tok_s, "kv_fraction": 0.1,
                "roofline_fraction": roof}  # fmt: skip

    rows = [row("gdn", 16384, 100.0), row("ham-10%", 16384, 80.0), row("ham-25%", 16384, 60.0),
            row("gdn", 2048, 100.0), row("ham-10%", 2048, 79.0), row("gdn", 4096, 100.0, 0.7),
            row("ham-10%", 4096, 90.0, 0.69), row("gdn (mlx-lm)", 4096, 25.0)]  # fmt: skip
    speed = targets.prefill_speed(rows)
    assert speed["status"] == "missed"
    assert "ham-10% (cached 0.100) at 2048: 0.79x" in speed["detail"]
    rows[4]["tok_s"] = 80.0
    assert targets.prefill_speed(rows)["status"] == "met"
    assert targets.prefill_speed(rows[:3])["status"] == "not measured"
    assert targets.prefill_roofline(rows)["status"] == "missed"
    rows[6]["roofline_fraction"] = 0.7
    assert targets.prefill_roofline(rows)["detail"] == "gdn 70%, ham-10% 70%"
    decode = [{"context": 512, "model": "gdn", "tok_s": 30.0},
              {"context": 512, "model": "gdn (mlx-lm)", "tok_s": 24.0}]  # fmt: skip
    peer = targets.gdn_peer(rows, decode)
    assert peer["status"] == "met" and peer["detail"].startswith("prefill 4.00x")
    decode[1]["tok_s"] = 26.0
    assert targets.gdn_peer(rows, decode)["status"] == "missed"
    # prefill met, decode not run: not a miss (a prefill-only run says so)
    assert targets.gdn_peer(rows, [])["status"] == "not measured"
    rows[-1]["tok_s"] = 30.0  # prefill 3.33x: a miss whatever decode says
    assert targets.gdn_peer(rows, [])["status"] == "missed"


def test_onnx_target_reads_the_slowest_context():
    rows = [
        {"context": 512, "runtime": "mlx", "tok_s": 10.0},
        {"context": 512, "runtime": "onnxruntime", "tok_s": 12.0},
        {"context": 2048, "runtime": "mlx", "tok_s": 10.0},
        {"context": 2048, "runtime": "onnxruntime", "tok_s": 9.0},
    ]
    t = targets.onnx({"status": "measured", "rows": rows})
    assert t["status"] == "missed" and t["detail"] == "1.20x at 512, 0.90x at 2048"
    rows[3]["tok_s"] = 10.0
    assert targets.onnx({"status": "measured", "rows": rows})["status"] == "met"
    assert targets.onnx({})["status"] == "not measured"


def test_bad_part_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--parts", "decode,gpu"])
    assert "unknown part 'gpu'" in capsys.readouterr().err
