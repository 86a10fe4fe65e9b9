#!/usr/bin/env python3
"""Independent AWQ dequantiser, written from the published layouts (shared/reference/hf-formats.md §3: AutoAWQ's
GEMM packing; compressed-tensors' pack-quantized unpack_from_int32 and dequantize), for `engine/tests/awq_py.rs`.

Usage: dequantize_awq.py MODEL_DIR OUT_DIR

Reads model.safetensors (or the shards of model.safetensors.index.json) with numpy only and, as config.json's
quantization_config says, for every quantized linear P writes OUT_DIR/P.f32: W[out, in] as little-endian
float32 —
  awq (GEMM): qweight [in, out/8] / qzeros [in/gs, out/8] int32, output column 8c + [0,2,4,6,1,3,5,7][i] in
    nibble i of word c; scales [in/gs, out] fp16; W[n, k] = f16(scale · (q − z));
  compressed-tensors pack-quantized: weight_packed [out, ceil(in·B/32)] int32, element j at bit j·B of the
    row's little-endian bit stream, minus 2^(B−1); weight_zero_point packed likewise along the output
    dimension; weight_scale [out, groups]; W = round_to_scale_dtype((q − z) · scale).
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "U8": np.uint8, "I64": np.int64, "BF16": np.uint16}
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


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
        out[name] = (info["dtype"], np.frombuffer(data[a:b], dtype=DT[info["dtype"]]).reshape(info["shape"]))
    return out


def read_model(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) \
        else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(read_safetensors(os.path.join(folder, f)))
    return out


def unpack_gemm(words):
    """[rows, cols/8] int32 → [rows, cols] codes."""
    w = words.view(np.uint32)
    rows, c8 = w.shape
    q = np.zeros((rows, c8 * 8), dtype=np.int32)
    for i, m in enumerate(ORDER):
        q[:, m::8] = (w >> np.uint32(4 * i)) & 15
    return q


def unpack_bits(words, bits, cols):
    """[rows, W] int32 → [rows, cols] unsigned fields, element j at bit j·bits."""
    w = words.view(np.uint32).astype(np.uint64)
    rows = w.shape[0]
    w = np.concatenate([w, np.zeros((rows, 1), dtype=np.uint64)], axis=1)
    q = np.zeros((rows, cols), dtype=np.int64)
    for j in range(cols):
        bit = j * bits
        i, off = bit // 32, bit % 32
        both = w[:, i] | (w[:, i + 1] << np.uint64(32))
        q[:, j] = ((both >> np.uint64(off)) & np.uint64((1 << bits) - 1)).astype(np.int64)
    return q


def to_f32(dtype, a):
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def round_to(dtype, x):
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16           # round to nearest even
        return (u.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def main():
    folder, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    qc = json.load(open(os.path.join(folder, "config.json")))["quantization_config"]
    t = read_model(folder)
    if qc["quant_method"] == "awq":
        for name in [k for k in t if k.endswith(".qweight")]:
            p = name[: -len(".qweight")]
            q = unpack_gemm(t[p + ".qweight"][1])             # [in, out]
            z = unpack_gemm(t[p + ".qzeros"][1])              # [groups, out]
            s = t[p + ".scales"][1].astype(np.float32)        # [groups, out]
            k, n = q.shape
            gs = k // s.shape[0]
            g = np.arange(k) // gs
            w = (s[g] * (q - z[g]).astype(np.float32)).astype(np.float16).astype(np.float32).T
            np.ascontiguousarray(w, dtype="<f4").tofile(os.path.join(out, p + ".f32"))
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized", qc
        (scheme,) = [g["weights"] for g in qc["config_groups"].values()]
        bits = scheme["num_bits"]
        for name in [k for k in t if k.endswith(".weight_packed")]:
            p = name[: -len(".weight_packed")]
            n, k = (int(v) for v in t[p + ".weight_shape"][1])
            q = unpack_bits(t[p + ".weight_packed"][1], bits, k) - 2 ** (bits - 1)
            sdt, s = t[p + ".weight_scale"]
            s = to_f32(sdt, s)                                 # [out, groups]
            groups = s.shape[1]
            if p + ".weight_zero_point" in t:
                zp = t[p + ".weight_zero_point"][1]            # [ceil(out*B/32), groups]
                z = unpack_bits(zp.T.copy(), bits, n).T - 2 ** (bits - 1)   # [out, groups]
            else:
                z = np.zeros((n, groups), dtype=np.int64)
            g = np.arange(k) // (k // groups)
            w = round_to(sdt, (q - z[:, g]).astype(np.float32) * s[:, g])
            np.ascontiguousarray(w, dtype="<f4").tofile(os.path.join(out, p + ".f32"))


if __name__ == "__main__":
    main()
