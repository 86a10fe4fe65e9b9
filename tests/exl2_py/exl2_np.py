#!/usr/bin/env python3
"""Independent EXL2 packer and dequantiser in numpy, written from ExLlamaV2's layout as documented in
shared/reference/exl2.md §1.2 and §2 (q_weight bitstreams per column, q_scale nibbles, q_scale_max, q_groups,
q_invperm), for `engine/tests/exl2_py.rs`. Uses numpy only.

  exl2_np.py dequant MODEL_DIR OUT_DIR
      Reads every *.safetensors of MODEL_DIR (no index, as ExLlamaV2's loader does) and writes, for every linear P
      with P.q_weight, OUT_DIR/P.f32: W[N', K] (PyTorch orientation, padded rows included) as little-endian
      float32, computed in fp16 exactly as the reconstruct kernel does:
        s = f16(f16((nib+1)^2) * f16(q_scale_max / 256)),  w = f16((q - 2^(b-1)) * s).

  exl2_np.py pack SRC_DIR OUT_DIR
      Makes an EXL2 folder from the float fixture at SRC_DIR (F32/F16 safetensors): every decoder linear and
      the (tied or not) output head packed with a seeded random act-order permutation and mixed bit widths
      8/6/5/4/3/2 in groups of 32 rows, a simple max-based scale search, q_invperm int32; embeddings and norms
      fp16; written as output.safetensors (ExLlamaV2's name); then OUT_DIR/dequant/P.f32 as in `dequant`.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

DT = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I16": np.int16, "I64": np.int64, "U8": np.uint8,
      "BF16": np.uint16}
NAME = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32", np.dtype(np.int32): "I32",
        np.dtype(np.int16): "I16"}


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
            arr = (arr.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        out[name] = arr
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": NAME[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_folder(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(read_safetensors(os.path.join(folder, f)))
    return out


def group_layout(q_groups, words):
    """[(bits, first word row, rows)] from the q_groups pairs and q_weight's height."""
    pairs = q_groups.astype(np.int64).reshape(-1, 2)
    out = []
    for g, (b, start) in enumerate(pairs):
        end = pairs[g + 1][1] if g + 1 < len(pairs) else words
        out.append((int(b), int(start), int((end - start) * 32 // b)))
    return out


def dequant(t, prefix):
    qw = t[prefix + ".q_weight"].view(np.uint32).astype(np.uint64)
    qs = t[prefix + ".q_scale"].view(np.uint32)
    qsm = t[prefix + ".q_scale_max"].astype(np.float16)
    groups = group_layout(t[prefix + ".q_groups"], qw.shape[0])
    invperm = t[prefix + ".q_invperm"].astype(np.int64)
    perm = np.argsort(invperm)
    n_pad = qw.shape[1]
    K = sum(r for _, _, r in groups)
    wq_perm = np.zeros((K, n_pad), dtype=np.float16)
    row = 0
    cols = np.arange(n_pad)
    for g, (b, start, rows) in enumerate(groups):
        nib = (qs[g][cols // 8] >> (4 * (cols % 8)).astype(np.uint32)) & 15
        m = np.float16(qsm[g] / np.float16(256))
        s = (((nib + 1) ** 2).astype(np.float16) * m).astype(np.float16)
        for i in range(rows):
            pos = i * b
            w0, sh = start + pos // 32, pos % 32
            v = qw[w0]
            if sh + b > 32:
                v = v | (qw[w0 + 1] << np.uint64(32))
            q = ((v >> np.uint64(sh)) & np.uint64((1 << b) - 1)).astype(np.int64)
            wq_perm[row + i] = ((q - (1 << (b - 1))).astype(np.float16) * s).astype(np.float16)
        row += rows
    w = np.zeros((n_pad, K), dtype=np.float32)
    w[:, perm] = wq_perm.astype(np.float32).T
    return w


def cmd_dequant(model_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    t = read_folder(model_dir)
    for name in t:
        if name.endswith(".q_weight"):
            p = name[: -len(".q_weight")]
            dequant(t, p).astype("<f4").tofile(os.path.join(out_dir, p + ".f32"))


def pack_linear(w, rng, pattern):
    """w [N, K] float → the five EXL2 tensors."""
    N, K = w.shape
    n_pad = (N + 31) // 32 * 32
    wp = np.zeros((n_pad, K), dtype=np.float32)
    wp[:N] = w
    perm = rng.permutation(K)
    x = wp[:, perm].T                          # [K, N'] permuted rows
    bits = [pattern[min(i, len(pattern) - 1)] for i in range(K // 32)]
    bits.sort(reverse=True)
    words, scales, maxes, qgroups = [], [], [], []
    word_row = 0
    for g, b in enumerate(bits):
        rows = x[32 * g: 32 * (g + 1)]
        maxq, z = (1 << b) - 1, 1 << (b - 1)
        base = np.abs(rows).max(axis=0) / (maxq / 2) + 1e-12
        M = base.max()
        code = np.clip(np.rint(16 * np.sqrt(base / M)), 1, 16).astype(np.int64)
        qsm = np.float16(max(M, 6.2e-5))
        m = np.float16(qsm / np.float16(256))
        s = ((code ** 2).astype(np.float16) * m).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint(rows / s) + z, 0, maxq).astype(np.uint64)     # [32, N']
        # LSB-first bitstream per column: 32 rows of b bits = b words.
        acc = np.zeros(n_pad, dtype=object)
        stream = [0] * n_pad
        for c in range(n_pad):
            v = 0
            for i in range(32):
                v |= int(q[i, c]) << (i * b)
            stream[c] = v
        for j in range(b):
            words.append(np.array([(stream[c] >> (32 * j)) & 0xFFFFFFFF for c in range(n_pad)], dtype=np.uint32))
        sw = np.zeros(n_pad // 8, dtype=np.uint32)
        for c in range(n_pad):
            sw[c // 8] |= np.uint32((code[c] - 1) << (4 * (c % 8)))
        scales.append(sw)
        maxes.append(qsm)
        qgroups += [b, word_row]
        word_row += b
        del acc
    invperm = np.argsort(perm).astype(np.int32)
    return {
        "q_weight": np.stack(words).view(np.int32),
        "q_scale": np.stack(scales).view(np.int32),
        "q_scale_max": np.array(maxes, dtype=np.float16),
        "q_groups": np.array(qgroups, dtype=np.int16),
        "q_invperm": invperm,
    }


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATTERNS = [[8, 6, 4, 2], [6, 5, 3], [4, 4, 3, 2], [5, 2], [3], [8, 4], [2]]


def cmd_pack(src_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(7)
    t = read_folder(src_dir)
    cfg = json.load(open(os.path.join(src_dir, "config.json")))
    out = {}
    for name, a in t.items():
        a = a.astype(np.float32)
        proj = name.split(".")[-2] if name.endswith(".weight") else ""
        if proj in LINEARS:
            for k, v in pack_linear(a, rng, PATTERNS[LINEARS.index(proj)]).items():
                out[name[: -len("weight")] + k] = v
        elif name != "lm_head.weight":
            out[name] = a.astype(np.float16)
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"]).astype(np.float32)
    for k, v in pack_linear(head, rng, [6, 4]).items():
        out["lm_head." + k] = v
    write_safetensors(os.path.join(out_dir, "output.safetensors"), out)
    cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.2.7", "bits": 4.0, "head_bits": 6}
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=4)
    for f in os.listdir(src_dir):
        if f.endswith(".json") and f != "config.json" and not f.endswith("index.json"):
            shutil.copy(os.path.join(src_dir, f), os.path.join(out_dir, f))
    cmd_dequant(out_dir, os.path.join(out_dir, "dequant"))


if __name__ == "__main__":
    {"dequant": cmd_dequant, "pack": cmd_pack}[sys.argv[1]](*sys.argv[2:])
