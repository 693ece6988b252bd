"""Config values of the wrong type, NaN, or absurdly large are refused by key and value before
anything is derived or allocated; config.json files that are not JSON objects name the file."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import time

import pytest

from ham_mlx.config import ConfigError, ModelArgs
from ham_mlx.model_io import CheckpointError, load_model

NAN = float("nan")


@pytest.mark.parametrize("fields, shown", [
    ({"num_heads": 0}, "num_heads=0"),
    ({"layer_types": ["attn"] * 4, "attn": {"num_heads": 0}}, "attn.num_heads=0"),
    ({"layer_types": ["attn"] * 4, "attn": {"num_heads": 2, "num_kv_heads": 0}},
     "attn.num_kv_heads=0"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000"),
    ({"intermediate_size": 10**12}, "intermediate_size=1000000000000"),
    ({"hidden_size": 65536, "hidden_ratio": 64}, "intermediate_size=2796288"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000"),
    ({"layer_types": ["ham"] * 10**6, "num_hidden_layers": 4}, "layer_types=['ham', "),
    ({"hidden_ratio": "4"}, "hidden_ratio='4'"),
    ({"hidden_ratio": NAN}, "hidden_ratio=nan"),
    ({"norm_eps": "x"}, "norm_eps='x'"),
    ({"norm_eps": NAN}, "norm_eps=nan"),
    ({"expand_v": float("inf")}, "expand_v=inf"),
    ({"head_dim": 64.0}, "head_dim=64.0"),
    ({"vocab_size": True}, "vocab_size=True"),
    ({"use_gate": "yes"}, "use_gate='yes'"),
    ({"ham_threshold": NAN}, "ham_threshold=nan"),
    ({"ham_threshold": [0.5, NAN, 0.5, 0.5]}, "ham_threshold=[0.5, nan"),
    ({"ham_kv_target": NAN}, "ham_kv_target=nan"),
    ({"eos_token_id": "3"}, "eos_token_id='3'"),
    ({"layer_types": ["attn"] * 4, "attn": {"num_heads": 2, "rope_theta": NAN}},
     "attn.rope_theta=nan"),
    ({"attn": [2]}, "attn=[2]"),
], ids=lambda v: None if isinstance(v, dict) else v.split("=")[0])  # fmt: skip
def test_bad_values_name_the_key_and_the_value(fields, shown):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^config: " + shown.replace("[", r"\[")):
        ModelArgs(**fields)
    assert time.perf_counter() - start < 1.0


def write_config(folder, raw: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(raw)


@pytest.mark.parametrize("raw, match", [
    ("[" * 100000 + "]" * 100000, r"invalid JSON \(RecursionError"),
    ('{"model_type": "ham", "norm_eps": NaN}', r"config: norm_eps=nan"),
    ('{"model_type": "ham", "num_heads": 0}', r"config: num_heads=0"),
    ('{"model_type": "ham", "ham_threshold": NaN}', r"config: ham_threshold=nan"),
    ("[1]", r"expected a JSON object"),
], ids=["deep", "nan-eps", "zero-heads", "nan-threshold", "array"])  # fmt: skip
def test_config_files_name_the_file(tmp_path, raw, match):
    write_config(tmp_path / "m", raw)
    with pytest.raises(CheckpointError, match=r"m/config.json: .*" + match):
        load_model(tmp_path / "m")


def test_mixer_types_under_both_names_must_agree():
    with pytest.raises(ConfigError, match=r"config: layer_types=5 disagrees with mixer_types"):
        ModelArgs.from_dict({"mixer_types": ["ham"] * 4, "layer_types": 5})


def test_sane_configs_still_read(tmp_path):
    args = ModelArgs(hidden_ratio=4, expand_v=1, ham_threshold=[0.1, -0.2, 3.0, 0.5])
    assert args.intermediate_size == 1536
    back = ModelArgs.from_dict(json.loads(json.dumps(args.to_config())))
    assert back.to_config() == args.to_config()


@pytest.mark.parametrize("fields, shown", [
    ({"attn": {"layers": [0], "num_heads": 0}}, "attn.num_heads=0"),
    ({"vocab_size": 10**12}, "vocab_size=1000000000000"),
    ({"num_hidden_layers": 10**6}, "num_hidden_layers=1000000"),
    ({"hidden_ratio": "4"}, "hidden_ratio='4'"),
], ids=["zero-attn-heads", "huge-vocab", "many-layers", "str-ratio"])  # fmt: skip
def test_convert_refuses_bad_fla_configs_by_key(tmp_path, fields, shown):
    from ham_mlx.convert import ConversionError, convert

    config = {"model_type": "gated_deltanet", "hidden_size": 64, "num_heads": 2, "head_dim": 16,
              "num_hidden_layers": 2, "vocab_size": 100, **fields}  # fmt: skip
    write_config(tmp_path / "src", json.dumps(config))
    with pytest.raises(ConversionError, match=r"src/config.json: .*" + shown):
        convert(tmp_path / "src", tmp_path / "dst")
