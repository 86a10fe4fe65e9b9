#!/usr/bin/env python3
"""Independent read-back of GGUF files with gguf-py (pip install gguf numpy), for `engine/tests/gguf_py.rs`.

Usage: dequantize_all.py OUT_DIR FILE.gguf...

For every FILE writes OUT_DIR/<stem>.json:
  {"kv": {key: {"type": GGUF type name, "value": scalar | string | {"len": n, "head": first 8}}},
   "tensors": [{"name", "type", "ne", "data": "<stem>.<i>.f32"}]}
and each tensor dequantized by gguf-py's own dequantizers (gguf.quants.dequantize) as little-endian f32.
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize


def plain(v):
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8")
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def main():
    out_dir = sys.argv[1]
    for path in sys.argv[2:]:
        stem = os.path.splitext(os.path.basename(path))[0]
        r = GGUFReader(path)
        kv = {}
        for name, f in r.fields.items():
            if name.startswith("GGUF."):
                continue
            ty = f.types[0]
            c = f.contents()
            if ty == GGUFValueType.ARRAY:
                c = [plain(x) for x in c]
                kv[name] = {"type": f"ARRAY[{f.types[1].name}]", "value": {"len": len(c), "head": c[:8]}}
            else:
                kv[name] = {"type": ty.name, "value": plain(c)}
        tensors = []
        for i, t in enumerate(r.tensors):
            values = dequantize(t.data, t.tensor_type).astype("<f4", copy=False).reshape(-1)
            data = f"{stem}.{i}.f32"
            values.tofile(os.path.join(out_dir, data))
            tensors.append({"name": t.name, "type": t.tensor_type.name,
                            "ne": [int(d) for d in t.shape], "data": data})
        with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
            json.dump({"kv": kv, "tensors": tensors}, fh)


if __name__ == "__main__":
    main()
