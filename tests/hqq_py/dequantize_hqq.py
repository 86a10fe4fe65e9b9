#!/usr/bin/env python3
"""Independent HQQ dequantiser, written from the published layout (shared/reference/hf-formats.md §5: hqq's
BitPack and Quantizer.dequantize, HQQLinear's encoded state dict), for `engine/tests/hqq_py.rs`.

Usage: dequantize_hqq.py MODEL_DIR OUT_DIR

Reads model.safetensors (or the shards of model.safetensors.index.json) with numpy only, and for every layer P
with P.W_q writes OUT_DIR/P.f32: W[out, in] as little-endian float32. The packed matrix's row k holds, in
fields from the top bits down, rows k, k + step, k + 2·step, … of the grouped code matrix (8 bits: 1 field,
4: 2, 2: 4, 1: 8 in uint8; 3: 10 in int32 with the rows padded to a multiple of 10, the padding cut off);
W_grouped = (codes − zero)·scale with each step rounded to the compute dtype, scale/zero one per group
([groups, 1] for axis 1, [1, groups] for axis 0); the grouped matrix reshaped to `shape`.
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "U8": np.uint8, "I64": np.int64, "BF16": np.uint16}


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
        arr = np.frombuffer(data[a:b], dtype=DT[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr
    return out


def read_weights(model):
    single = os.path.join(model, "model.safetensors")
    if os.path.isfile(single):
        return read_safetensors(single)
    index = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(read_safetensors(os.path.join(model, shard)))
    return out


def text(a):
    return "".join(chr(int(c)) for c in a.reshape(-1))


def unpack(wq, nbits):
    fields = {8: 1, 4: 2, 2: 4, 1: 8, 3: 10}[nbits]
    w = wq.astype(np.uint64)
    blocks = [(w >> np.uint64(nbits * (fields - 1 - j))) & np.uint64((1 << nbits) - 1) for j in range(fields)]
    return np.concatenate(blocks, axis=0).astype(np.float32)


def main():
    model, out_dir = sys.argv[1], sys.argv[2]
    qc = json.load(open(os.path.join(model, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "hqq"
    t = read_weights(model)
    for name in sorted(t):
        if not name.endswith(".W_q"):
            continue
        p = name[: -len(".W_q")]
        nbits = int(t[p + ".nbits"])
        gs = int(t[p + ".group_size"])
        axis = int(t[p + ".axis"])
        shape = [int(x) for x in t[p + ".shape"]]
        compute = text(t[p + ".compute_dtype"])
        assert text(t[p + ".packing"]) == {8: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}[nbits]
        numel = shape[0] * shape[1]
        rows = numel // gs if axis == 1 else gs
        q = unpack(t[p + ".W_q"], nbits)[:rows]
        if compute == "torch.float16":
            rnd = lambda x: x.astype(np.float16).astype(np.float32)
        elif compute == "torch.float32":
            rnd = lambda x: x
        else:
            raise ValueError(compute)
        zero = t[p + ".zero"].astype(np.float32)
        scale = t[p + ".scale"].astype(np.float32)
        w = rnd(rnd(q - zero) * scale).reshape(shape)
        np.ascontiguousarray(w, dtype="<f4").tofile(os.path.join(out_dir, p + ".f32"))


if __name__ == "__main__":
    main()
