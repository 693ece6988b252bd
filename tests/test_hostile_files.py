"""Hostile checkpoint files: pickle memo bombs, views that repeat one element, deflate bombs,
safetensors headers whose tensors overlap or leave gaps, and indexes that name files outside the
model folder. Time and memory bombs run in a child process under limits (tests/bounded.py)."""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split

import json
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from bounded import run_bounded
from torch_files import Tensor, fake_torch_save, torch_pickle, write_torch_zip

from ham_mlx.convert import ConversionError
from ham_mlx.convert.checkpoint import read_file
from ham_mlx.convert.checkpoint import read_weights as convert_read_weights
from ham_mlx.convert.safetensors_io import read_safetensors, write_safetensors
from ham_mlx.model_io import CheckpointError, load_model, read_weights, save_model
from ham_mlx.presets import init_model

READ_IN_CHILD = """
import resource
from pathlib import Path
from ham_mlx.convert import ConversionError
from ham_mlx.convert.checkpoint import read_file
try:
    for t in read_file(Path({path!r})).values():
        t.load()
    print("READ")
except ConversionError as e:
    print("REFUSED", e)
import sys
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
print("PEAK_BYTES", peak if sys.platform == "darwin" else peak * 1024)
"""


def read_bounded(path, timeout=240):
    """read_file + load every tensor in a child (2 GiB of address space): its stdout lines."""
    p = run_bounded(READ_IN_CHILD.format(path=str(path)), timeout=timeout)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    return lines[0], int(lines[-1].split()[1])


def test_pickle_memo_sharing_is_bounded(tmp_path):
    x = [1.0]
    for _ in range(60):  # 2**60 leaves when every shared reference is followed
        x = [x, x]
    good, storages = torch_pickle({"w": Tensor.of(np.ones(2, np.float32)), "extra": x})
    assert len(good) < 2000
    write_torch_zip(tmp_path / "memo.bin", good, {k: a.tobytes() for k, a in storages.values()})
    result, _ = read_bounded(tmp_path / "memo.bin", timeout=120)
    assert result.startswith("REFUSED") and "memo.bin" in result and "shared" in result, result

    # a dict key that is a tuple of tuples shared 60 levels deep: hashing it is 2**60 work
    key = b"K\x01K\x01\x86q\x00" + b"".join(
        b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(60)
    )
    write_torch_zip(tmp_path / "hash.bin", b"\x80\x02}" + key + b"K\x01s.")
    result, _ = read_bounded(tmp_path / "hash.bin", timeout=120)
    assert result.startswith("REFUSED") and "a dict key or set item that is a tuple" in result
    # one long key shared by every level of a deep nesting: names of 10**8 characters
    long, nested = "k" * 10**6, 1.0
    for _ in range(200):
        nested = {long: nested}
    data, _ = torch_pickle({"w": Tensor.of(np.ones(2, np.float32)), "extra": nested})
    assert len(data) < 2 * 10**6
    write_torch_zip(tmp_path / "names.bin", data, {"0": np.ones(2, np.float32).tobytes()})
    result, _ = read_bounded(tmp_path / "names.bin", timeout=120)
    assert result.startswith("REFUSED") and "shared" in result, result


def test_a_view_that_repeats_one_element_is_refused_before_reading(tmp_path):
    one = Tensor(np.ones(1, np.float32), 0, (40000, 40000), (0, 0))  # 6.4 GB from 4 bytes
    fake_torch_save({"w": one}, tmp_path / "stride0.bin")
    assert (tmp_path / "stride0.bin").stat().st_size < 2000
    with pytest.raises(ConversionError, match=r"stride0.bin: tensor 'w'.*1600000000 elements.*1"):
        read_file(tmp_path / "stride0.bin")
    result, _ = read_bounded(tmp_path / "stride0.bin")
    assert result.startswith("REFUSED"), result
    # a broadcast buffer (torch's expand) with no more elements than its storage still reads
    ids = Tensor(np.arange(6, dtype=np.int64), 0, (1, 6), (0, 1))
    fake_torch_save({"position_ids": ids}, tmp_path / "expand.bin")
    got = read_file(tmp_path / "expand.bin")["position_ids"].load()
    np.testing.assert_array_equal(np.array(got), np.arange(6)[None])


def deflated_zip(path, tensors: dict, mib: int) -> None:
    """A torch zip whose storage "0" is `mib` MiB of zeros, deflated (a few MB on disk)."""
    data, _ = torch_pickle(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        with z.open("archive/data/0", "w", force_zip64=True) as f:
            zeros = bytes(1 << 20)
            for _ in range(mib):
                f.write(zeros)


def test_a_deflate_bomb_is_decompressed_only_as_far_as_the_tensor_needs(tmp_path):
    storage = np.zeros(4, np.float32)  # the pickle's record; the member holds 512 MiB
    end = (512 << 20) // 4 - 4  # the last four elements: everything before is inflated, dropped
    tensors = {"w": Tensor(storage, 0, (2, 2), (2, 1)), "tail": Tensor(storage, end, (4,), (1,))}
    deflated_zip(tmp_path / "bomb.bin", tensors, 512)
    assert (tmp_path / "bomb.bin").stat().st_size < 4 << 20
    result, peak = read_bounded(tmp_path / "bomb.bin")
    assert result == "READ"
    # inflating the member whole peaks at about 1070 MiB; a bounded read at 90 MiB alone (up to
    # about 420 MiB seen inside the full suite, whose environment the child inherits)
    assert peak < 640 << 20, f"peak RSS {peak >> 20} MiB for two tensors of 16 bytes"
    # a sparse view would have to inflate everything between its elements
    sparse = {"w": Tensor(storage, 0, (2,), (10**7,))}
    deflated_zip(tmp_path / "sparse.bin", sparse, 64)
    with pytest.raises(ConversionError, match=r"sparse.bin: tensor 'w': a view that spans "
                       r"10000001 elements of a compressed storage for 2"):  # fmt: skip
        read_file(tmp_path / "sparse.bin")


@pytest.mark.parametrize("field", ["version", "method"])
def test_zip_features_zipfile_cannot_read_are_a_conversion_error(tmp_path, field):
    """A zip "version needed to extract" above 6.3, or an unknown compression method, makes
    zipfile raise NotImplementedError (when it lists or opens the member)."""
    path = tmp_path / "odd.bin"
    fake_torch_save({"w": Tensor(np.arange(4, dtype=np.float32), 0, (4,), (1,))}, path)
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")  # the first member's central directory record
    if field == "version":
        raw[central + 6 : central + 8] = (64).to_bytes(2, "little")
    else:  # the data.pkl member's method, in its central and its local record
        raw[central + 10 : central + 12] = (99).to_bytes(2, "little")
        raw[8:10] = (99).to_bytes(2, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match="odd.bin"):
        read_file(path)


def test_storage_smaller_than_the_tensor_extent_is_refused(tmp_path):
    data, _ = torch_pickle({"x": Tensor(np.zeros(100, np.float32), 0, (4, 4), (4, 1))})
    with zipfile.ZipFile(tmp_path / "short.bin", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/data/0", np.zeros(10, np.float32).tobytes())
    with pytest.raises(ConversionError, match=r"short.bin: tensor 'x'.*storage of 10"):
        read_file(tmp_path / "short.bin")


def header_file(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def both_refuse(path, match: str) -> None:
    """The converter's reader and the loader's check refuse the file the same way."""
    with pytest.raises(ConversionError, match=match):
        read_safetensors(path)
    with pytest.raises(CheckpointError, match=match):
        read_weights(path.parent)


F32 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header, data, match", [
    ({"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [0, 8]}}, 8,
     r"'a' and 'b' overlap"),
    ({"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [4, 12]}}, 12,
     r"'a' and 'b' overlap"),
    ({"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [16, 24]}}, 24,
     r"gap of 8 bytes before 'b'"),
    ({"a": {**F32, "data_offsets": [0, 8]}}, 16, r"8 bytes after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, 8, r"'a'.*shape \[2.5\]"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, r"'a'.*shape \['2'\]"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, r"'a'.*shape \[-2\]"),
    ({"a": {"dtype": "F32", "shape": True, "data_offsets": [0, 8]}}, 8, r"'a'.*shape True"),
    ({"a": {**F32, "data_offsets": [0.0, 8]}}, 8, r"'a'.*data_offsets \[0.0, 8\]"),
    ({"a": {**F32, "data_offsets": [8, 0]}}, 8, r"'a'.*data_offsets \[8, 0\]"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, r"'a'.*8 bytes.*\[3\]"),
    ({"a": {"dtype": "F32", "shape": [1 << 62, 4], "data_offsets": [0, 8]}}, 8, r"'a'"),
    ({"__metadata__": {"x": 1}, "a": {**F32, "data_offsets": [0, 8]}}, 8, r"metadata"),
    ({"a": [1, 2]}, 8, r"'a'"),
], ids=["same", "overlap", "gap", "tail", "float-dim", "str-dim", "negative-dim", "bool-shape",
        "float-offset", "reversed", "size", "huge-shape", "metadata", "not-an-entry"])  # fmt: skip
def test_safetensors_headers_must_tile_the_data(tmp_path, header, data, match):
    header_file(tmp_path / "model.safetensors", header, bytes(data))
    both_refuse(tmp_path / "model.safetensors", match)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return init_model(tmp_path_factory.mktemp("m") / "tiny", "tiny-hybrid", seed=1)


def shard_folder(tmp_path, folder, name="model"):
    """A copy of `folder` whose weights are split over two shards with an index."""
    model = load_model(folder)
    return save_model(model, tmp_path / name, max_shard_bytes=1 << 16)


def test_index_entries_outside_the_folder_are_refused(tmp_path, folder):
    sharded = shard_folder(tmp_path, folder)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    (sharded / first).rename(outside)
    for entry in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors"):
        wm = {k: (entry if v == first else v) for k, v in index["weight_map"].items()}
        (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(CheckpointError, match=r"index.json: .*outside the model folder"):
            load_model(sharded)
        with pytest.raises(ConversionError, match=r"index.json: .*outside the model folder"):
            convert_read_weights(sharded)


def test_symlinks_inside_the_folder_are_followed(tmp_path, folder):
    """The Hugging Face cache layout: snapshot entries are links to ../../blobs/<hash>."""
    sharded = shard_folder(tmp_path, folder)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sharded.glob("*.safetensors"):
        f.rename(blobs / f.name)
        f.symlink_to(blobs / f.name)
    model = load_model(sharded)
    assert model.args.num_hidden_layers > 0
    assert len(convert_read_weights(sharded)[0]) > 0


@pytest.mark.parametrize("index, match", [
    ({"weight_map": ["a", "b"]}, r"weight_map must map tensor names to file names"),
    ({"weight_map": {"a": ["x.safetensors"]}}, r"'a'.*\['x.safetensors'\].*not a file name"),
    ({"weight_map": {"a": 3}}, r"'a'.*3.*not a file name"),
    ({"weight_map": {"a": ""}}, r"'a'.*''.*not a file name"),
    ({"weight_map": {}}, r"weight_map is empty"),
    ({"other": 1}, r"no weight_map"),
    ([], r"not a JSON object"),
    ("[" * 100000, r"invalid JSON"),
], ids=["list", "list-value", "int-value", "empty-name", "empty", "missing", "array",
        "deep"])  # fmt: skip
def test_malformed_indexes_name_the_index(tmp_path, index, match):
    raw = index if isinstance(index, str) else json.dumps(index)
    (tmp_path / "model.safetensors.index.json").write_text(raw)
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: .*{match}"):
        read_weights(tmp_path)
    with pytest.raises(ConversionError, match=rf"model.safetensors.index.json: .*{match}"):
        convert_read_weights(tmp_path)


def test_load_refuses_integer_and_float8_weights(tmp_path, folder):
    model = load_model(folder)
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    key = "model.embeddings.weight"
    for dtype, name in ((mx.int32, "int32"), (mx.uint8, "uint8")):
        bad = tmp_path / name
        save_model(model, bad)
        w = dict(weights)
        w[key] = w[key].astype(dtype)
        mx.save_safetensors(str(bad / "model.safetensors"), w)
        with pytest.raises(CheckpointError, match=rf"'{key}'.*{name}.*floating point"):
            load_model(bad)
    f8 = tmp_path / "f8"
    save_model(model, f8)
    arrays = {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    arrays[key] = np.zeros(weights[key].shape, np.uint8)
    write_safetensors(f8 / "model.safetensors", arrays, {key: "F8_E4M3"})
    with pytest.raises(CheckpointError, match=rf"'{key}'.*(F8_E4M3|float8|uint8)"):
        load_model(f8)
