"""mlx-lm interop: drive a ham_mlx model with mlx-lm's own generation loop.

Whole folders: every folder ham_mlx writes names its mlx-lm module in `config.json`
(`model_file`, see `ham_mlx.mlx_lm_model`), so `mlx_lm.load(folder, trust_remote_code=True)` and
mlx-lm's console scripts with `--trust-remote-code` load model and tokenizer by themselves.

In memory: `Model` and its caches follow mlx-lm's model contract, so
`mlx_lm.generate.stream_generate` runs a loaded HAM model as it is; it only needs an mlx-lm
`TokenizerWrapper`, which `mlx_lm_tokenizer` builds from a folder's `tokenizer.json` +
`tokenizer_config.json` (or, when a folder has only `tokenizer.model`, from that). It reads no
`config.json` through transformers, so it also serves folders written before the mixer list
moved to the `mixer_types` key (transformers >= 5 rejects a `layer_types` key with our entries).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ham_mlx.hf_tokenizer import build_hf_tokenizer, tokenizer_config
from ham_mlx.model_io import TOKENIZER, CheckpointError, read_config

HF_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_hf_tokenizer(path: str | Path) -> Any:
    """A transformers `PreTrainedTokenizerFast` for a model folder."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    if all((folder / name).is_file() for name in HF_FILES):
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    spm_file = folder / TOKENIZER
    if not spm_file.is_file():
        raise CheckpointError(f"{folder}: no {' + '.join(HF_FILES)} and no {TOKENIZER}")
    config = tokenizer_config(spm_file)
    config.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(spm_file), **config)


def mlx_lm_tokenizer(path: str | Path) -> Any:
    """An `mlx_lm.tokenizer_utils.TokenizerWrapper` for a model folder (sentencepiece streaming
    detokenizer; EOS from the tokenizer config)."""
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, TokenizerWrapper

    hf = load_hf_tokenizer(path)
    eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
    if (Path(path) / "config.json").is_file():
        model_eos = read_config(path).eos_token_id
        if model_eos is not None and model_eos not in eos:
            eos.append(model_eos)
    return TokenizerWrapper(hf, SPMStreamingDetokenizer, eos_token_ids=eos)
