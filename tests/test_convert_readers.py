"""Checkpoint readers without torch: safetensors (single, sharded) and torch zip files through the
restricted unpickler; malicious and damaged files are refused with errors naming them."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import os
import pickle
import zipfile
from collections import OrderedDict

import mlx.core as mx
import numpy as np
import pytest
from torch_files import Parameter, Tensor, fake_torch_save, torch_pickle, write_torch_zip

from ham_mlx.convert import ConversionError
from ham_mlx.convert.checkpoint import read_file, read_weights
from ham_mlx.convert.safetensors_io import read_safetensors, write_safetensors


def bf16_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def values(t) -> np.ndarray:
    return np.array(t.load().astype(mx.float32))


def test_safetensors_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 5)).astype(np.float32)
    arrays = {
        "f32": w, "f16": w.astype(np.float16), "f64": w.astype(np.float64), "bf16": bf16_bits(w),
        "i64": np.arange(4, dtype=np.int64), "u8": np.arange(3, dtype=np.uint8),
        "scalar": np.array(0.25, dtype=np.float32), "empty": np.zeros((0, 4), np.float32),
    }  # fmt: skip
    write_safetensors(tmp_path / "w.safetensors", arrays, {"bf16": "BF16"})
    t = read_safetensors(tmp_path / "w.safetensors")
    assert t["bf16"].dtype == "BF16" and t["bf16"].load().dtype == mx.bfloat16
    assert t["scalar"].shape == () and values(t["scalar"]) == 0.25
    np.testing.assert_array_equal(values(t["f32"]), w)
    np.testing.assert_array_equal(values(t["f16"]), w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(values(t["f64"]), w)
    bf = values(t["bf16"])
    np.testing.assert_allclose(bf, w, rtol=1e-2)
    np.testing.assert_array_equal(bf16_bits(bf), arrays["bf16"])
    np.testing.assert_array_equal(values(t["i64"]), np.arange(4))
    assert values(t["empty"]).shape == (0, 4)
    # mx.load reads our files the same way (it has no float64)
    write_safetensors(
        tmp_path / "v.safetensors", {"f32": w, "bf16": arrays["bf16"]}, {"bf16": "BF16"}
    )
    ref = mx.load(str(tmp_path / "v.safetensors"))
    np.testing.assert_array_equal(np.array(ref["f32"]), w)
    np.testing.assert_array_equal(np.array(ref["bf16"].astype(mx.float32)), bf)


def test_sharded_safetensors_and_missing_shard(tmp_path):
    a, b = np.ones((2, 2), np.float32), np.zeros(3, np.float32)
    write_safetensors(tmp_path / "s1.safetensors", {"a": a})
    write_safetensors(tmp_path / "s2.safetensors", {"b": b})
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors, files = read_weights(tmp_path)
    assert sorted(tensors) == ["a", "b"] and [f.name for f in files] == [
        "s1.safetensors",
        "s2.safetensors",
    ]
    index["weight_map"]["c"] = "s2.safetensors"  # the index names a tensor its shard lacks
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="'c' in s2.safetensors"):
        read_weights(tmp_path)
    index["weight_map"]["c"] = "s3.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"s3.safetensors: shard named by .* is missing"):
        read_weights(tmp_path)


def test_torch_zip_views_offsets_shared_storages_nested(tmp_path):
    storage = np.arange(24, dtype=np.float32)
    half = np.arange(6, dtype=np.float16)
    sd = OrderedDict(
        full=Tensor(storage, 0, (4, 6), (6, 1)),
        view=Tensor(storage, 2, (3, 2), (1, 6)),  # offset + transposed strides, same storage
        tied=Tensor(storage, 0, (4, 6), (6, 1)),
        param=Parameter(Tensor.of(half.reshape(2, 3))),
        bf16=Tensor(bf16_bits(np.array([1.5, -2.0, 3.25])), 0, (3,), (1,), "BFloat16Storage"),
        ints=Tensor.of(np.array([7, 8], np.int64)),
        scalar=Tensor.of(np.array(0.5, np.float32)),
    )
    expected = {
        "full": storage.reshape(4, 6), "view": storage[2:].reshape(-1)[[0, 6, 1, 7, 2, 8]]
        .reshape(3, 2), "tied": storage.reshape(4, 6), "param": half.reshape(2, 3),
        "bf16": np.array([1.5, -2.0, 3.25]), "ints": np.array([7, 8]), "scalar": np.array(0.5),
    }  # fmt: skip
    for i, (obj, byteorder) in enumerate([
        (sd, "little"), ({"state_dict": sd, "step": 3}, "little"),
        ({"model": {f"module.{k}": v for k, v in sd.items()}, "opt": [1, 2]}, "big"),
    ]):  # fmt: skip
        path = tmp_path / f"c{i}.pt"
        fake_torch_save(obj, path, byteorder=byteorder)
        t = read_file(path)
        assert sorted(t) == sorted(expected), i
        for k, want in expected.items():
            got = values(t[k])
            assert got.shape == want.shape, k
            np.testing.assert_array_equal(got, want.astype(np.float32), err_msg=k)
        assert t["bf16"].dtype == "BF16" and t["ints"].dtype == "I64"
    with zipfile.ZipFile(tmp_path / "c0.pt") as z:  # one storage for full, view and tied
        assert len([n for n in z.namelist() if "/data/" in n]) == 5


def test_unknown_dtypes_name_the_tensor(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {"x": np.zeros(4, np.uint8)})
    raw = (tmp_path / "w.safetensors").read_bytes().replace(b'"U8"', b'"F8"')
    (tmp_path / "w.safetensors").write_bytes(raw)
    t = read_safetensors(tmp_path / "w.safetensors")
    with pytest.raises(ConversionError, match=r"w.safetensors: tensor 'x' has dtype F8"):
        t["x"].load()
    q = Tensor(np.zeros(4, np.int8), 0, (4,), (1,), "QInt8Storage")
    fake_torch_save({"w": q}, tmp_path / "q.pt")
    with pytest.raises(ConversionError, match=r"q.pt: tensor 'w' has dtype QInt8Storage"):
        read_file(tmp_path / "q.pt")["w"].load()
    f8 = Tensor(np.zeros(4, np.int8), 0, (4,), (1,), "Float8Storage")  # not a torch class at all
    fake_torch_save({"w": f8}, tmp_path / "f8.pt")
    with pytest.raises(ConversionError, match=r"f8.pt: refused: .*'torch.Float8Storage'"):
        read_file(tmp_path / "f8.pt")


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {"x": np.ones((8, 8), np.float32)})
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(raw[:-10])
    with pytest.raises(ConversionError, match=r"w.safetensors: tensor 'x'.*truncated"):
        read_safetensors(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(raw[:6])
    with pytest.raises(ConversionError, match="w.safetensors: not a safetensors file"):
        read_safetensors(tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
    with pytest.raises(ConversionError, match="bad header"):
        read_safetensors(tmp_path / "w.safetensors")

    fake_torch_save({"x": Tensor.of(np.ones((64, 64), np.float32))}, tmp_path / "m.bin")
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConversionError, match=r"cut.bin: unreadable zip archive"):
        read_file(tmp_path / "cut.bin")
    data, _ = torch_pickle({"x": Tensor(np.zeros(100, np.float32), 10, (10, 10), (10, 1))})
    write_torch_zip(tmp_path / "short.bin", data, {"0": np.zeros(50, np.float32).tobytes()})
    with pytest.raises(ConversionError, match=r"short.bin: tensor 'x'.*storage of 50"):
        read_file(tmp_path / "short.bin")
    write_torch_zip(tmp_path / "nostore.bin", data, {})
    with pytest.raises(ConversionError, match=r"nostore.bin: tensor 'x': its storage .* missing"):
        read_file(tmp_path / "nostore.bin")
    (tmp_path / "junk.pt").write_bytes(b"hello world")
    with pytest.raises(ConversionError, match="junk.pt: not a torch zip checkpoint"):
        read_file(tmp_path / "junk.pt")
    with zipfile.ZipFile(tmp_path / "script.pt", "w") as z:
        z.writestr("m/constants.pkl", b"")
        z.writestr("m/code/x.py", b"")
    with pytest.raises(ConversionError, match="script.pt: a TorchScript archive"):
        read_file(tmp_path / "script.pt")


class System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class WriteFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


class Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path):
    payloads = {
        "posix.system": lambda path: System(f"touch {path}"),
        "io.open": WriteFile,
        "(__builtin__|builtins).exec": lambda path: Exec(f"open({str(path)!r}, 'w').write('x')"),
    }
    marker = tmp_path / "pwned"
    for name, make in payloads.items():
        control = tmp_path / "control"  # the payload is real: a plain unpickler runs it
        pickle.loads(pickle.dumps(make(control), protocol=2))
        assert control.exists(), name
        control.unlink()
        # hidden inside an otherwise valid state dict, in a well-formed torch zip
        good = Tensor.of(np.ones(3, np.float32))
        data, storages = torch_pickle({"state_dict": {"w": good, "extra": make(marker)}})
        write_torch_zip(tmp_path / "evil.bin", data, {k: a.tobytes() for k, a in storages.values()})
        with pytest.raises(ConversionError, match=rf"evil.bin: refused: .*'{name}'.*nothing"):
            read_file(tmp_path / "evil.bin")
        assert not marker.exists(), name
        # a bare pickle file (the legacy torch format starts the same way) is never unpickled
        (tmp_path / "legacy.pt").write_bytes(pickle.dumps(make(marker), protocol=2))
        with pytest.raises(ConversionError, match="legacy.pt: a legacy .*not unpickled"):
            read_file(tmp_path / "legacy.pt")
        assert not marker.exists(), name
    # BUILD may not set attributes on the allowed functions or stand-ins
    build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x04\x00\x00\x00evilK\x01sb."
    write_torch_zip(tmp_path / "build.bin", build)
    with pytest.raises(ConversionError, match="build.bin: refused: the pickle sets the state"):
        read_file(tmp_path / "build.bin")
    # a persistent id that is not a storage record
    pid = b"\x80\x02X\x04\x00\x00\x00evilQ."
    write_torch_zip(tmp_path / "pid.bin", pid)
    with pytest.raises(ConversionError, match="pid.bin: refused: unknown persistent id 'evil'"):
        read_file(tmp_path / "pid.bin")


def test_which_weight_files_are_read(tmp_path):
    with pytest.raises(ConversionError, match="no such checkpoint"):
        read_weights(tmp_path / "nowhere")
    with pytest.raises(ConversionError, match="no weights found"):
        read_weights(tmp_path)
    fake_torch_save({"a": Tensor.of(np.ones(2, np.float32))}, tmp_path / "x.pt")
    fake_torch_save({"a": Tensor.of(np.ones(2, np.float32))}, tmp_path / "y.pth")
    with pytest.raises(ConversionError, match="several weight files .*x.pt, y.pth"):
        read_weights(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {"b": np.zeros(2, np.float32)})
    assert sorted(read_weights(tmp_path)[0]) == ["b"]  # model.safetensors wins
    fake_torch_save({"a": Tensor.of(np.ones(2, np.float32))}, tmp_path / "sh1.bin")
    fake_torch_save({"a": Tensor.of(np.ones(2, np.float32))}, tmp_path / "sh2.bin")
    index = {"weight_map": {"a": "sh1.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert sorted(read_weights(tmp_path)[0]) == ["b"]  # safetensors before torch files
    (tmp_path / "model.safetensors").unlink()
    assert sorted(read_weights(tmp_path)[0]) == ["a"]
    index = {"weight_map": {"a": "sh1.bin", "a2": "sh2.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="sh2.bin: tensor 'a' is also in .*sh1.bin"):
        read_weights(tmp_path)
