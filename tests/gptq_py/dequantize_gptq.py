#!/usr/bin/env python3
"""Independent GPTQ (v1 "gptq" checkpoint) dequantiser, written from the published layout
(shared/reference/hf-formats.md §2: AutoGPTQ/GPTQModel packing), for `engine/tests/gptq_py.rs`.

Usage: dequantize_gptq.py MODEL_DIR OUT_DIR

Reads config.json's quantization_config and model.safetensors (or the shards that
model.safetensors.index.json's weight_map names) with numpy only (the safetensors header is parsed by hand),
and for every layer P with P.qweight writes OUT_DIR/P.f32: W[out, in] as little-endian
float32, W[n, k] = f32(scales[g_idx[k], n]) * (q[k, n] - (zs[g_idx[k], n] + 1)).
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "BF16": None}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=DT[info["dtype"]]).reshape(info["shape"])
    return out


def read_weights(model):
    """Every tensor of the folder: model.safetensors, or the shards of model.safetensors.index.json."""
    single = os.path.join(model, "model.safetensors")
    if os.path.isfile(single):
        return read_safetensors(single)
    index = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    weight_map = index["weight_map"]
    out = {}
    total = 0
    for shard in sorted(set(weight_map.values())):
        assert "/" not in shard and shard.endswith(".safetensors"), shard
        t = read_safetensors(os.path.join(model, shard))
        for name, a in t.items():
            assert weight_map.get(name) == shard, f"{name} is in {shard}, index says {weight_map.get(name)}"
            assert name not in out, f"{name} is stored twice"
            out[name] = a
            total += a.nbytes
    assert set(out) == set(weight_map), "index and shards list different tensors"
    assert index["metadata"]["total_size"] == total, (index["metadata"]["total_size"], total)
    return out


def unpack(words, bits, count):
    """Unpack `count` values along axis 0 of uint32 `words` ([count*bits/32, cols])."""
    words = words.astype(np.uint64)
    cols = words.shape[1]
    out = np.zeros((count, cols), dtype=np.uint64)
    if bits in (2, 4, 8):
        pf = 32 // bits
        for i in range(count):
            out[i] = (words[i // pf] >> np.uint64(bits * (i % pf))) & np.uint64((1 << bits) - 1)
        return out
    assert bits == 3
    for i in range(count):
        run, r = divmod(i, 32)
        bitpos = 3 * r              # position in the 96-bit run
        w, s = divmod(bitpos, 32)
        v = words[run * 3 + w] >> np.uint64(s)
        if s > 29:                  # straddles into the next word
            v = v | (words[run * 3 + w + 1] << np.uint64(32 - s))
        out[i] = v & np.uint64(7)
    return out


def main():
    model, out_dir = sys.argv[1], sys.argv[2]
    qc = json.load(open(os.path.join(model, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc.get("checkpoint_format", "gptq") == "gptq"
    bits = int(qc["bits"])
    t = read_weights(model)
    for name in sorted(t):
        if not name.endswith(".qweight"):
            continue
        p = name[: -len(".qweight")]
        qweight = t[p + ".qweight"].view(np.uint32)
        qzeros = t[p + ".qzeros"].view(np.uint32)
        scales = t[p + ".scales"].astype(np.float32)
        g_idx = t[p + ".g_idx"].astype(np.int64)
        k = g_idx.shape[0]
        n = scales.shape[1]
        q = unpack(qweight, bits, k).astype(np.float32)             # [in, out]
        zs = unpack(qzeros.T.copy(), bits, n).T.astype(np.float32)  # [groups, out]
        z = zs + np.float32(1)
        w = scales[g_idx] * (q - z[g_idx])                           # [in, out]
        np.ascontiguousarray(w.T, dtype="<f4").tofile(os.path.join(out_dir, p + ".f32"))


if __name__ == "__main__":
    main()
