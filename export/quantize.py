"""Weight-only quantization of an exported graph: each MatMul with a constant weight becomes
onnxruntime's `MatMulNBits` (com.microsoft, what onnxruntime-genai's own model builder emits):
8-bit or 4-bit integers in blocks of 32 along K, one float scale and one zero point per block and
output column (4 bits: the clipping range of least squared error per block). With
`accuracy_level` 4 onnxruntime quantizes each token's activations per block of that token alone,
so a token's result never depends on the other tokens of its call (chunking), its batch
neighbours or the pads beside it. The embedding table becomes `GatherBlockQuantized`, over the
tied output head's blocks when the head is tied.

Why not onnxruntime's dynamic int8 (`quantize_dynamic`, the previous `--quantize int8`): it
quantizes every activation tensor with one scale per call, so each token's rounding depends on the
largest activation of the whole call, across rows and pads; that error dominates the weights' own
(2-7x on the `small` preset, up to 3% relative on o_proj and down_proj, whose inputs have
outliers), and it moves HAM scores enough to flip admissions, after which a row's cache differs
for good (docs/export.md).

Kept in float (`KEEP_FLOAT`): the small projections whose outputs set the recurrence's decay and
write strength and the HAM gate (`a_proj`, `b_proj`, `kv_gate_proj`, a few hundred bytes each)
and the learned router, whose score decides admission.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute on each token's activations (see quantize_weights)
SHRINKS = tuple(np.linspace(0.98, 0.6, 20))  # 4 bits: clipping ranges tried per block
# Sensitive small projections (decay, write strength, the HAM gate) and the router stay float.
KEEP_FLOAT = (r"\.a_proj\.weight$", r"\.b_proj\.weight$", r"\.kv_gate_proj\.weight$", r"\.router\.")


@dataclass
class QuantizedTensor:
    name: str
    shape: tuple[int, int]  # (K, N) of the MatMul
    bits: int
    relative_error: float  # ||W - dequantized|| / ||W||


def quantize_blocks(w: np.ndarray, bits: int, block_size: int = BLOCK_SIZE):
    """Asymmetric block-wise quantization of w [K, N] along K, in MatMulNBits' layout.

    Returns (packed [N, k_blocks, block_size * bits / 8] uint8, scales [N, k_blocks] float32,
    zero_points uint8: [N, k_blocks] for 8 bits, [N, ceil(k_blocks / 2)] packed for 4 bits,
    dequantized [K, N] float32). Each block's range includes 0, so zero is exact; its zero point is
    an integer in [0, 2^bits - 1]; values pack low nibble first."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: expected 4 or 8")
    K, N = w.shape
    k_blocks = -(-K // block_size)
    wt = np.zeros((N, k_blocks * block_size), dtype=np.float32)
    wt[:, :K] = w.T
    blocks = wt.reshape(N, k_blocks, block_size)
    qmax = 2**bits - 1
    lo0 = np.minimum(blocks.min(axis=2), 0.0)
    hi0 = np.maximum(blocks.max(axis=2), 0.0)

    def rounded(shrink: float):
        scale = ((hi0 - lo0) * shrink / qmax).astype(np.float32)
        scale[scale == 0] = 1.0
        zp = np.clip(np.round(-lo0 * shrink / scale), 0, qmax).astype(np.int32)
        q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, qmax)
        deq = (q - zp[..., None]) * scale[..., None]
        return q.astype(np.uint8), scale, zp, ((deq - blocks) ** 2).sum(axis=2)

    q, scale, zp, err = rounded(1.0)
    for shrink in SHRINKS if bits < 8 else ():  # the clipping range with the least error
        q2, scale2, zp2, err2 = rounded(shrink)
        better = err2 < err
        q[better], scale[better], zp[better], err[better] = (
            q2[better], scale2[better], zp2[better], err2[better])  # fmt: skip
    deq = ((q.astype(np.float32) - zp[..., None]) * scale[..., None]).reshape(N, -1)[:, :K].T
    if bits == 8:
        return q, scale, zp.astype(np.uint8), np.ascontiguousarray(deq)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zpad = np.zeros((N, k_blocks + (k_blocks & 1)), dtype=np.uint8)
    zpad[:, :k_blocks] = zp
    zpacked = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale, zpacked, np.ascontiguousarray(deq)


def quantize_weights(
    proto: onnx.ModelProto,
    bits: int,
    block_size: int = BLOCK_SIZE,
    keep_float: tuple[str, ...] = KEEP_FLOAT,
    accuracy_level: int = ACCURACY_LEVEL,
    overrides: tuple[tuple[str, int], ...] = (),
    embeddings: bool = True,
) -> tuple[onnx.ModelProto, list[QuantizedTensor]]:
    """`proto` with every MatMul whose B is a float32 2-D initializer (or the Transpose of one: a
    tied head) replaced by MatMulNBits, and (embeddings) every Gather from a float32 2-D
    initializer by GatherBlockQuantized, which reads the tied head's blocks when there is one;
    weights whose name matches a `keep_float` pattern stay float. overrides: (pattern, bits) for
    the weights to quantize with other bits.

    accuracy_level 4 (the default) lets onnxruntime's CPU kernels quantize each token's
    activations to int8 per block of K (symmetric, one scale per block of that token alone, so
    still token-local); 0 computes in float from the dequantized weights (onnxruntime 1.32 has no
    fast 8-bit kernel for that: decoding is then ~3x slower than float)."""
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    made_by = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    keep = [re.compile(p) for p in keep_float]
    done: list[QuantizedTensor] = []
    new_inits: list[onnx.TensorProto] = []
    blocks_of: dict[str, tuple[str, str, str, int]] = {}  # [N, K] source -> (q, scales, zp, bits)

    def quantizable(name: str | None) -> bool:
        init = inits.get(name)
        return (
            init is not None
            and init.data_type == onnx.TensorProto.FLOAT
            and len(init.dims) == 2
            and not any(p.search(name) for p in keep)
        )

    def add_blocks(w_kn: np.ndarray, base: str, source: str | None) -> tuple[str, str, str, int]:
        nbits = next((b for p, b in overrides if re.search(p, base)), bits)
        packed, scales, zp, deq = quantize_blocks(w_kn, nbits, block_size)
        names = (f"{base}.q{nbits}", f"{base}.scales", f"{base}.zero_points")
        new_inits.extend(numpy_helper.from_array(a, n) for a, n in zip((packed, scales, zp), names))
        err = float(np.linalg.norm(w_kn - deq) / max(np.linalg.norm(w_kn), 1e-30))
        done.append(QuantizedTensor(base, w_kn.shape, nbits, err))
        if source is not None:
            blocks_of[source] = (*names, nbits)
        return (*names, nbits)

    nodes, drop_nodes = [], set()
    for node in graph.node:  # MatMul -> MatMulNBits
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        b = node.input[1]
        source, transposed = b, False
        if b not in inits and b in made_by and made_by[b].op_type == "Transpose":
            t = made_by[b]
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"]
            if t.input[0] in inits and perm in ([], [[1, 0]]):
                source, transposed = t.input[0], True
        if not quantizable(source):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[source])
        w = w.T if transposed else w  # [K, N]
        tied = transposed and source.endswith("embeddings.weight")
        q, sc, zp, nbits = add_blocks(w, "lm_head.weight" if tied else source,
                                      source if transposed else None)  # fmt: skip
        attrs = dict(K=w.shape[0], N=w.shape[1], bits=nbits, block_size=block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        nodes.append(helper.make_node(
            "MatMulNBits", [node.input[0], q, sc, zp], list(node.output),
            name=node.name + f"_Q{nbits}", domain=MS_DOMAIN, **attrs,
        ))  # fmt: skip
        if transposed:
            uses[b] -= 1
            if uses[b] == 0:
                drop_nodes.add(made_by[b].name)
    if embeddings:  # Gather -> GatherBlockQuantized (the head's blocks when tied)
        for i, node in enumerate(nodes):
            axis = [a.i for a in node.attribute if a.name == "axis"]
            if node.op_type != "Gather" or axis not in ([], [0]) or not quantizable(node.input[0]):
                continue
            table = node.input[0]
            D = inits[table].dims[1]
            if D % block_size:
                continue
            if table in blocks_of:
                q, sc, zp, nbits = blocks_of[table]
            else:
                q, sc, zp, nbits = add_blocks(numpy_helper.to_array(inits[table]).T, table, table)
            shape = f"{q}.rows_shape"
            new_inits.append(numpy_helper.from_array(np.array([0, -1], dtype=np.int64), shape))
            rows = f"{q}.rows"
            nodes[i : i + 1] = [
                helper.make_node("Reshape", [q, shape], [rows], name=node.name + "_rows"),
                helper.make_node(
                    "GatherBlockQuantized", [rows, node.input[1], sc, zp], list(node.output),
                    name=node.name + f"_Q{nbits}", domain=MS_DOMAIN, gather_axis=0,
                    quantize_axis=1, block_size=block_size, bits=nbits,
                ),
            ]  # fmt: skip
    nodes = [n for n in nodes if n.name not in drop_nodes]
    used = {i for n in nodes for i in n.input} | {i for n in nodes for i in _subgraph_inputs(n)}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return proto, done


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for n in g.node:
                names.update(n.input)
                names |= _subgraph_inputs(n)
    return names
