#!/usr/bin/env python3
"""Independent AutoAWQ GEMM and compressed-tensors pack-quantized packer, written from the published layouts
(shared/reference/hf-formats.md §3; compressed-tensors' pack_to_int32), for `engine/tests/awq_py.rs`: it makes
a checkpoint the way AutoAWQ (or llm-compressor) lays one out, for our reader to load.

Usage: pack_awq.py SRC_DIR OUT_DIR GROUP_SIZE [gemm | ct BITS | ct-sym BITS]

ct: weight_packed [out, ceil(in*B/32)] int32, element j of a row at bit j*B of the row's bit stream, stored as
q + 2^(B-1) of the signed code; weight_zero_point packed the same way along the output dimension
([ceil(out*B/32), groups]); weight_scale [out, groups] fp16; weight_shape int64. ct-sym: no zero point,
s = max|w| / (2^(B-1) - 1), q = clamp(round(w/s), -2^(B-1), 2^(B-1) - 1).

SRC_DIR is a Hugging Face folder with one F16/F32 model.safetensors. Every decoder linear is quantized on
AutoAWQ's grid (per group of GROUP_SIZE inputs of each output row, in fp16: s = max(max − min, 1e-5)/15,
z = clamp(−round(min/s), 0, 15), q = clamp(round(w/s) + z, 0, 15)), packed (qweight [in, out/8], qzeros
[in/gs, out/8] int32 with nibble order [0,2,4,6,1,3,5,7], raw zeros; scales [in/gs, out] fp16) and written with
the rest of the tensors unchanged; config.json gets AutoAWQ's quantization_config; the other files are copied.
OUT_DIR/dequant/P.f32 holds what a loader computes: W[n, k] = f16(scale · (q − z)), as little-endian float32.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def read(path):
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


def write(path, tensors):
    names = sorted(tensors)
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for k in names:
        a = np.ascontiguousarray(tensors[k])
        dtype = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
                 np.dtype(np.int64): "I64"}[a.dtype]
        b = a.tobytes()
        header[k] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def pack(q):
    """[rows, cols] codes → [rows, cols/8] int32, column 8c + ORDER[i] in nibble i."""
    rows, cols = q.shape
    out = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i, m in enumerate(ORDER):
        out |= q[:, m::8].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def pack_bits(v, bits):
    """[rows, cols] unsigned codes → [rows, ceil(cols*bits/32)] int32, element j at bit j*bits."""
    rows, cols = v.shape
    words = (cols * bits + 31) // 32
    out = np.zeros((rows, words + 1), dtype=np.uint64)
    for j in range(cols):
        bit = j * bits
        w, off = bit // 32, bit % 32
        x = v[:, j].astype(np.uint64) << np.uint64(off)
        out[:, w] |= x & np.uint64(0xFFFFFFFF)
        out[:, w + 1] |= x >> np.uint64(32)
    return out[:, :words].astype(np.uint32).view(np.int32)


def ct_linear(w16, gs, bits, sym):
    n, k = w16.shape
    g = w16.reshape(n, k // gs, gs)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        s = (np.maximum(np.abs(g).max(-1), 1e-5) / qmax).astype(np.float16).astype(np.float32)
        q = np.clip(np.round(g / s[..., None]), -(qmax + 1), qmax)
        z = np.zeros_like(s)
    else:
        qmax = 2 ** bits - 1
        lo, hi = g.min(-1), g.max(-1)
        s = (np.maximum(hi - lo, 1e-5) / qmax).astype(np.float16).astype(np.float32)
        z = np.clip(-np.round(lo / s), 0, qmax)
        q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, qmax)
        q, z = q - 2 ** (bits - 1), z - 2 ** (bits - 1)   # signed, as compressed-tensors stores them
    q, z = q.astype(np.int64), z.astype(np.int64)           # integers, as stored (no −0)
    off = 2 ** (bits - 1)
    parts = {"weight_packed": pack_bits((q.reshape(n, k) + off).astype(np.uint8), bits),
             "weight_scale": s.astype(np.float16),
             "weight_shape": np.array([n, k], dtype=np.int64)}
    if not sym:
        parts["weight_zero_point"] = pack_bits((z + off).astype(np.uint8).T.copy(), bits).T.copy()
    deq = (s[..., None] * (q - z[..., None]).astype(np.float32)).reshape(n, k)
    return parts, deq


def main():
    src, out, gs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layout = sys.argv[4] if len(sys.argv) > 4 else "gemm"
    bits = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    os.makedirs(os.path.join(out, "dequant"), exist_ok=True)
    t = read(os.path.join(src, "model.safetensors"))
    res = {}
    for name, w in t.items():
        mod = name.rsplit(".", 2)
        if not (name.startswith("model.layers.") and name.endswith(".weight") and mod[-2] in LINEARS):
            res[name] = w
            continue
        p = name[: -len(".weight")]
        w16 = w.astype(np.float16).astype(np.float32)          # [out, in]
        n, k = w16.shape
        if layout != "gemm":
            parts, deq = ct_linear(w16, gs, bits, layout == "ct-sym")
            for suffix, v in parts.items():
                res[p + "." + suffix] = v
            deq.astype(np.float16).astype("<f4").tofile(os.path.join(out, "dequant", p + ".f32"))
            continue
        g = w16.reshape(n, k // gs, gs)
        lo, hi = g.min(-1), g.max(-1)
        s = (np.maximum(hi - lo, 1e-5) / 15).astype(np.float16).astype(np.float32)   # [out, groups]
        z = np.clip(-np.round(lo / s), 0, 15)
        q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15).reshape(n, k).astype(np.uint8)
        res[p + ".qweight"] = pack(q.T.copy())                  # [in, out/8]
        res[p + ".qzeros"] = pack(z.T.astype(np.uint8).copy())  # [groups, out/8]
        res[p + ".scales"] = s.T.astype(np.float16).copy()      # [groups, out]
        deq = (s[..., None] * (q.reshape(n, k // gs, gs).astype(np.float32) - z[..., None])).reshape(n, k)
        deq.astype(np.float16).astype("<f4").tofile(os.path.join(out, "dequant", p + ".f32"))
    write(os.path.join(out, "model.safetensors"), res)
    cfg = json.load(open(os.path.join(src, "config.json")))
    if layout == "gemm":
        cfg["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": gs, "bits": 4,
                                      "version": "gemm", "modules_to_not_convert": None}
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
                "num_bits": bits, "type": "int", "symmetric": layout == "ct-sym", "strategy": "group",
                "group_size": gs, "dynamic": False}}}}
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in os.listdir(src):
        if f.endswith(".json") and f != "config.json" and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), os.path.join(out, f))


if __name__ == "__main__":
    main()
