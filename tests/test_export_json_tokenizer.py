"""A model folder whose only tokenizer is tokenizer.json exports, and the export generates."""

import shutil

import pytest

from ham_mlx import generate, load
from ham_mlx.export import export_onnx
from ham_mlx.export import runtime as ort_runtime
from ham_mlx.model_io import default_model_path


@pytest.fixture(scope="module")
def json_only_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("json-only") / "model"
    shutil.copytree(default_model_path(), folder)
    (folder / "tokenizer.model").unlink()
    return folder


@pytest.mark.parametrize("genai", [False, True], ids=["plain", "genai"])
def test_export_of_a_tokenizer_json_folder_generates_as_mlx_does(json_only_folder, tmp_path, genai):
    out = tmp_path / "onnx"
    export_onnx(json_only_folder, out, genai=genai, report=False)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.model").exists()
    model, tokenizer = load(json_only_folder)
    expected = generate(model, tokenizer, "To be, or not", max_tokens=12)
    onnx_model, onnx_tokenizer = ort_runtime.load(out)
    assert ort_runtime.generate(onnx_model, onnx_tokenizer, "To be, or not", max_tokens=12) == (
        expected
    )
