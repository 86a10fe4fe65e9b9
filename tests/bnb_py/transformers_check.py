"""Manual check (not run in CI: it needs torch, ~5 GB): a bitsandbytes 4-bit folder we wrote loads unchanged
in transformers + bitsandbytes (CPU backend), its packed tensors are byte for byte what bitsandbytes' own
quantize_4bit makes from the same fp16 weights, and it scores like our engine.

    python -m venv venv && . venv/bin/activate
    pip install torch transformers accelerate safetensors bitsandbytes   # checked: torch 2.15, transformers
                                                                        # 5.25, bitsandbytes 0.50.2
    quant-studio convert SmolLM2-F16.gguf --dtype f16 --out F16_HF_DIR
    quant-studio quantize F16_HF_DIR --format nf4 [--double-quant] --out BNB_DIR
    python tests/bnb_py/transformers_check.py BNB_DIR F16_HF_DIR TEXT_FILE [N_TOKENS]
    quant-studio eval BNB_DIR --base F16_HF_DIR --text TEXT_FILE --ctx N_TOKENS --chunks 1

Prints how many packed tensors equal bitsandbytes' own, the PPL of both models and the KL-divergence of the
4-bit model from the source over the second half of the first N tokens (what llama-perplexity and our `eval`
score for one chunk of N), and the share of positions where the top token agrees.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer


def tensors(folder):
    out = {}
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    for f in files:
        with safe_open(os.path.join(folder, f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def same_as_bitsandbytes(bnb_dir, base_dir, qc):
    """Quantize each source linear with bitsandbytes and compare with what we stored."""
    import bitsandbytes.functional as bf
    ours, base = tensors(bnb_dir), tensors(base_dir)
    equal, total, worst = 0, 0, 0.0
    for k, w in base.items():
        if k + ".absmax" not in ours:
            continue
        total += 1
        q, st = bf.quantize_4bit(w.to(torch.float16), blocksize=64, quant_type=qc["bnb_4bit_quant_type"],
                                 compress_statistics=qc["bnb_4bit_use_double_quant"], quant_storage=torch.uint8)
        same = torch.equal(q.reshape(-1), ours[k].reshape(-1))
        if qc["bnb_4bit_use_double_quant"]:
            same = same and torch.equal(st.absmax.reshape(-1), ours[k + ".absmax"].reshape(-1))
            worst = max(worst, abs(float(st.offset) - json.loads(bytes(
                ours[k + ".quant_state.bitsandbytes__" + qc["bnb_4bit_quant_type"]].tolist()))["nested_offset"]))
        else:
            same = same and torch.equal(st.absmax.float().reshape(-1), ours[k + ".absmax"].reshape(-1))
        equal += int(same)
    return equal, total, worst


def main():
    bnb_dir, base_dir, text_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    qc = json.load(open(os.path.join(bnb_dir, "config.json")))["quantization_config"]
    equal, total, worst_offset = same_as_bitsandbytes(bnb_dir, base_dir, qc)
    tok = AutoTokenizer.from_pretrained(bnb_dir)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[:, :n]
    q = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map="cpu", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        lq = F.log_softmax(q(ids).logits[0].float(), -1)
        lb = F.log_softmax(b(ids).logits[0].float(), -1)
    first = n // 2  # as llama-perplexity: logits at positions n/2 .. n-2 predict tokens n/2+1 .. n-1
    target = ids[0, first + 1:]

    def ppl(lp):
        return float(torch.exp(-lp[first:-1].gather(1, target[:, None])[:, 0].mean()))

    kld = (lb.exp() * (lb - lq)).sum(-1)[first:-1]
    same = (lq.argmax(-1) == lb.argmax(-1))[first:-1].float().mean()
    print(json.dumps({"quant_type": qc["bnb_4bit_quant_type"], "double_quant": qc["bnb_4bit_use_double_quant"],
                      "packed_equal_to_bitsandbytes": f"{equal}/{total}",
                      "max_nested_offset_diff": worst_offset,
                      "loaded_as": type(q.model.layers[0].mlp.down_proj).__name__,
                      "tokens": int(ids.shape[1]), "ppl_4bit": ppl(lq), "ppl_base": ppl(lb),
                      "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
                      "same_top": float(same)}, indent=1))


if __name__ == "__main__":
    main()
