"""FLA configs as FLA writes them: training and kernel switches are accepted and listed as ignored,
keys whose value would change the math are refused by name."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from ham_mlx import load_model
from ham_mlx.convert import ConversionError, convert, fla_keys

FLA = Path(__file__).parent / "fixtures" / "fla"
NAMES = sorted(json.loads((FLA / "fixtures.json").read_text())["fixtures"])
# Every training/kernel switch away from FLA's default, and a RoPE table shorter than the input.
SWITCHED = {
    "attn_mode": "fused_recurrent", "fuse_norm": False, "fuse_swiglu": False,
    "fuse_cross_entropy": False, "fuse_linear_cross_entropy": True, "use_l2warp": True,
    "initializer_range": 0.5, "max_position_embeddings": 8, "use_cache": False,
}  # fmt: skip


def fla_copy(tmp_path: Path, name: str, **changes) -> Path:
    dst = tmp_path / f"src-{name}"
    shutil.copytree(FLA / name, dst, ignore=shutil.ignore_patterns("oracle.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize("name", NAMES)
def test_every_key_fla_writes_is_classified(name):
    """Each key of the configs FLA 0.6.0 saved is read, ignored or checked, never unknown."""
    cfg = json.loads((FLA / name / "config.json").read_text())
    known = set(fla_keys.READ) | set(fla_keys.IGNORED) | set(fla_keys.SUPPORTED_VALUES)
    assert sorted(set(cfg) - known - {"model_type"}) == []


def test_switches_are_ignored_and_listed(tmp_path):
    """The switches do not change the converted folder nor FLA's logits; the summary names them."""
    src = fla_copy(tmp_path, "hybrid", **SWITCHED)
    summary = convert(src, tmp_path / "out")
    assert set(SWITCHED) <= set(summary.ignored_keys)
    text = " ".join(str(summary).split())  # the line wraps
    assert "ignored architectures, attn_mode," in text and "use_l2warp" in text
    plain = convert(FLA / "hybrid", tmp_path / "plain")
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (plain.path / f).read_bytes()
    oracle = mx.load(str(FLA / "hybrid" / "oracle.safetensors"))
    assert oracle["input_ids"].shape[1] > SWITCHED["max_position_embeddings"]
    logits = load_model(tmp_path / "out")(oracle["input_ids"])
    assert float(np.abs(np.array(logits) - np.array(oracle["logits"])).max()) < 2e-4


REFUSED = {
    "attn_mode": "fused_chunk",
    "use_short_conv": False,
    "hidden_act": "gelu",
    "conv_bias": True,
    "attnres_block_size": 4,
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_math_changing_values_are_refused_by_name(tmp_path, key):
    src = fla_copy(tmp_path, "gdn", **{key: REFUSED[key]})
    with pytest.raises(ConversionError, match=rf"config.json: {key}={REFUSED[key]!r} is not"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_convert_prints_ignored_keys(tmp_path):
    src = fla_copy(tmp_path, "gdn", **SWITCHED)
    run = subprocess.run(
        [sys.executable, "-m", "ham_mlx.cli", "convert", str(src), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    line = next(x for x in run.stdout.splitlines() if x.startswith("ignored"))
    assert "fuse_norm" in run.stdout and "use_cache" in run.stdout, line
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "ham"
