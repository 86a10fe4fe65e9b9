#!/usr/bin/env python3
"""Independent bitsandbytes 4-bit (NF4/FP4, with or without double quantization) dequantiser, written from
the published layout (shared/reference/hf-formats.md §4: what transformers saves for a load_in_4bit model),
for `engine/tests/bnb_py.rs`.

Usage: dequantize_bnb.py MODEL_DIR OUT_DIR

Reads config.json's quantization_config and model.safetensors (or the shards of
model.safetensors.index.json) with numpy only, and for every layer P with P.weight.quant_state.* writes
OUT_DIR/P.f32: W[out, in] as little-endian float32, where the flattened weight's element i is
quant_map[code_i] * absmax[i // blocksize] (code_i: the high nibble of byte i//2 for even i, the low for odd),
absmax = nested_quant_map[absmax_code] * nested_absmax[b // nested_blocksize] + nested_offset when double
quantized, the product rounded to the quant state's dtype.
"""
import json
import os
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "U8": np.uint8, "I64": np.int64}


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
    single = os.path.join(model, "model.safetensors")
    if os.path.isfile(single):
        return read_safetensors(single)
    index = json.load(open(os.path.join(model, "model.safetensors.index.json")))
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(read_safetensors(os.path.join(model, shard)))
    return out


def round_to(x, dtype):
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        # Round to nearest even on the upper 16 bits.
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    raise ValueError(dtype)


def main():
    model, out_dir = sys.argv[1], sys.argv[2]
    qc = json.load(open(os.path.join(model, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"]
    t = read_weights(model)
    marker = ".weight.quant_state.bitsandbytes__"
    for name in sorted(t):
        if marker not in name:
            continue
        p = name.split(marker)[0]
        state = json.loads(bytes(t[name]).decode("utf-8"))
        assert state["quant_type"] == name.split(marker)[1] == qc["bnb_4bit_quant_type"]
        out_f, in_f = state["shape"]
        n = out_f * in_f
        packed = t[p + ".weight"].reshape(-1)
        codes = np.empty(packed.size * 2, dtype=np.uint8)
        codes[0::2] = packed >> 4
        codes[1::2] = packed & 0x0F
        codes = codes[:n]
        qmap = t[p + ".weight.quant_map"].astype(np.float32)
        if "nested_blocksize" in state:
            nb = state["nested_blocksize"]
            acodes = t[p + ".weight.absmax"].astype(np.int64)
            nmap = t[p + ".weight.nested_quant_map"].astype(np.float32)
            nabs = t[p + ".weight.nested_absmax"].astype(np.float32)
            blocks = np.arange(acodes.size) // nb
            absmax = nmap[acodes] * nabs[blocks] + np.float32(state["nested_offset"])
        else:
            absmax = t[p + ".weight.absmax"].astype(np.float32)
        w = qmap[codes] * absmax[np.arange(n) // state["blocksize"]]
        w = round_to(w.astype(np.float32), state["dtype"]).reshape(out_f, in_f)
        np.ascontiguousarray(w, dtype="<f4").tofile(os.path.join(out_dir, p + ".f32"))


if __name__ == "__main__":
    main()
