"""convert(): atomic, reproducible, dtypes, tokenizer files, quantized models, the CLI."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import randomize

import ham_mlx.convert.pipeline as pipeline
from ham_mlx import Model, generate, load, load_model, save_model
from ham_mlx.cli import main
from ham_mlx.convert import ConversionError, convert
from ham_mlx.convert.safetensors_io import read_safetensors, write_safetensors
from ham_mlx.model_io import read_weights
from ham_mlx.presets import preset_args
from ham_mlx.tokenizer import Tokenizer, bundled_tokenizer_path

FLA = Path(__file__).parent / "fixtures" / "fla"


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_converting_twice_gives_identical_output(tmp_path):
    convert(FLA / "hybrid", tmp_path / "a")
    convert(FLA / "hybrid", tmp_path / "b")
    convert(FLA / "hybrid", tmp_path / "b", overwrite=True)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert not leftovers(tmp_path)


def test_failed_or_interrupted_conversion_leaves_no_partial_destination(tmp_path, monkeypatch):
    real_save = pipeline.save_model

    def save_then_fail(model, path, *a, **kw):
        real_save(model, path, *a, **kw)  # the weights are written, then something goes wrong
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "save_model", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        convert(FLA / "gdn", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)

    monkeypatch.setattr(pipeline, "save_model", real_save)
    convert(FLA / "gdn", tmp_path / "out")
    before = files(tmp_path / "out")
    src = tmp_path / "src"
    shutil.copytree(FLA / "gdn", src)
    (src / "tokenizer_config.json").write_text("{}")

    def disk_full(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "out", overwrite=True)
    assert files(tmp_path / "out") == before and not leftovers(tmp_path)


def test_destination_checks(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="out: already exists"):
        convert(FLA / "gdn", tmp_path / "out")
    src = tmp_path / "src"
    shutil.copytree(FLA / "gdn", src)
    with pytest.raises(ConversionError, match="would replace the source"):
        convert(src, src, overwrite=True)
    with pytest.raises(ConversionError, match="would replace the source"):
        convert(src, tmp_path, overwrite=True)
    assert (src / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="dtype='float8'"):
        convert(src, tmp_path / "x", dtype="float8")
    with pytest.raises(ConversionError, match="q_bits=3"):
        convert(src, tmp_path / "x", quantize=True, q_bits=3)
    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"src/config.json: not found"):
        convert(src, tmp_path / "x")


def test_dtypes(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FLA / "gdn", src)
    file = src / "model.safetensors"
    arrays = {k: t.numpy() for k, t in read_safetensors(file).items()}
    bits = {k: (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for k, a in arrays.items()}  # fmt: skip
    write_safetensors(file, bits, {k: "BF16" for k in bits})
    convert(src, tmp_path / "bf16")  # default: the checkpoint's dtype
    convert(src, tmp_path / "f16", dtype="float16")
    for name, dtype in (("bf16", mx.bfloat16), ("f16", mx.float16)):
        w = read_weights(tmp_path / name)
        for k, v in w.items():
            want = mx.float32 if k.split(".")[-1] in ("A_log", "dt_bias") else dtype
            assert v.dtype == want, (name, k, v.dtype)
        assert json.loads((tmp_path / name / "config.json").read_text())["quantization"] is None
    convert(FLA / "gdn", tmp_path / "f32")
    assert read_weights(tmp_path / "f32")["model.norm.weight"].dtype == mx.float32


def test_tokenizer_files_are_copied_and_checked(tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(FLA / "gdn", src, ignore=shutil.ignore_patterns("oracle.safetensors"))
    summary = convert(src, tmp_path / "none")
    assert "no tokenizer.model" in str(summary)
    (src / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConversionError, match="src/tokenizer.model is not a sentencepiece"):
        convert(src, tmp_path / "bad")
    shutil.copy(bundled_tokenizer_path(), src / "tokenizer.model")  # 2048 pieces > vocab 96
    with pytest.raises(ConversionError, match="2048 pieces but the model's vocab_size is 96"):
        convert(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_tokenizer_json_is_checked_against_the_embeddings(tmp_path):
    """A folder whose tokenizer is tokenizer.json: the tokenizer must load and fit vocab_size."""
    from ham_mlx.model_io import default_model_path

    src = tmp_path / "src"
    shutil.copytree(FLA / "gdn", src, ignore=shutil.ignore_patterns("oracle.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_path() / name, src / name)  # 2048 ids > vocab 96
    with pytest.raises(ConversionError, match="tokenizer.json: token ids up to 2047 but the "
                                              "model's vocab_size is 96"):  # fmt: skip
        convert(src, tmp_path / "bad")
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConversionError, match="tokenizer.json"):
        convert(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_fla_fields_ignored_by_the_config_reader_are_the_converters():
    from ham_mlx.config import IGNORED_FLA_FIELDS
    from ham_mlx.convert import fla_keys

    assert set(fla_keys.IGNORED) <= IGNORED_FLA_FIELDS


def ham_source(tmp_path, tie=False, **kw) -> Path:
    """A small HAM/GDN/attn model with the bundled tokenizer, saved as a ham_mlx folder."""
    tok = Tokenizer.from_file(bundled_tokenizer_path())
    args = preset_args("tiny-hybrid", tok.vocab_size, tie_word_embeddings=tie, **kw)
    mx.random.seed(0)
    model = randomize(Model(args))
    return save_model(model, tmp_path / "src", tok)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_models_load_and_generate(tmp_path, bits):
    src = ham_source(tmp_path, tie=bits == 8)
    summary = convert(src, tmp_path / "q", quantize=True, q_bits=bits, q_group_size=64)
    assert summary.quantization == {"group_size": 64, "bits": bits}
    assert "tokenizer.model" in summary.tokenizer_files
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": bits}
    model, tok = load(tmp_path / "q")
    ham = model.layers[0].attn
    assert isinstance(ham.q_proj, nn.QuantizedLinear) and isinstance(ham.o_proj, nn.QuantizedLinear)
    assert isinstance(model.model.embeddings, nn.QuantizedEmbedding)
    for small in (ham.a_proj, ham.b_proj, ham.kv_gate_proj):
        assert type(small) is nn.Linear  # kept: tiny and precision-sensitive
    assert ham.A_log.dtype == ham.dt_bias.dtype == ham.threshold.dtype == mx.float32
    text = generate(model, tok, "To be, or not", max_tokens=12, temperature=0.0)
    assert isinstance(text, str) and len(text) > 0
    full = load_model(src)
    ids = mx.array([tok.encode("Now is the winter of our discontent")])
    a, b = np.array(full(ids)), np.array(model(ids))
    rel = np.abs(a - b).max() / np.abs(a).max()
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    print(f"{bits}-bit: max error {rel:.3f} of the largest logit, correlation {corr:.4f}")
    assert rel < (0.05 if bits == 8 else 1.0) and corr > (0.999 if bits == 8 else 0.9)
    assert summary.parameters == sum(
        v.size for _, v in __import__("mlx.utils").utils.tree_flatten(full.parameters())
    )


def test_single_file_and_sharded_sources(tmp_path):
    convert(FLA / "negeig_tied_sigmoid-bin" / "pytorch_model.bin", tmp_path / "file")
    convert(FLA / "negeig_tied_sigmoid", tmp_path / "folder")
    assert files(tmp_path / "file") == files(tmp_path / "folder")
    src = tmp_path / "sharded"
    src.mkdir()
    shutil.copy(FLA / "gdn" / "config.json", src)
    tensors = {k: t.numpy() for k, t in read_safetensors(FLA / "gdn" / "model.safetensors").items()}
    names, weight_map = sorted(tensors), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(src / file, {k: tensors[k] for k in part})
        weight_map.update({k: file for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert(src, tmp_path / "from-shards")
    convert(FLA / "gdn", tmp_path / "from-one")
    assert files(tmp_path / "from-shards") == files(tmp_path / "from-one")
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="model-00002-of-00002.safetensors: shard named by"):
        convert(src, tmp_path / "x")


def test_quantized_source_is_refused(tmp_path):
    convert(FLA / "gdn", tmp_path / "q", quantize=True, q_bits=8, q_group_size=32)
    with pytest.raises(ConversionError, match="already quantized"):
        convert(tmp_path / "q", tmp_path / "again")


def test_cli_convert(tmp_path, capsys):
    assert main(["convert", str(FLA / "window_nogate"), str(tmp_path / "out"), "--dtype",
                 "bfloat16"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "layers       2: attn gdn" in out and "bfloat16" in out
    assert main(["convert", str(FLA / "gdn"), str(tmp_path / "out")]) == 2
    assert "ham-mlx convert: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = capsys.readouterr().out
    assert "attnres_block_size" in help_text and "--q-group-size" in help_text


def test_progress_line(tmp_path, capsys):
    convert(FLA / "gdn", tmp_path / "out", progress=True)
    assert "reading weights 100%" in capsys.readouterr().err
