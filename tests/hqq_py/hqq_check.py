"""Manual check (not run in CI: it needs torch and hqq): an HQQ folder we wrote loads unchanged into hqq's own
HQQLinear (the module transformers' HQQ integration builds from these tensors), dequantizes to the weights our
engine evaluates bit for bit, is close to what hqq's own quantizer makes from the same fp16 weights, and scores
like our engine.

    python -m venv venv && . venv/bin/activate
    pip install torch transformers safetensors hqq      # checked: torch 2.15, transformers 5.25, hqq 0.2.8
    quant-studio quantize F16_HF_DIR --format hqq --bits 4 --group-size 64 --out HQQ_DIR
    python tests/hqq_py/hqq_check.py HQQ_DIR F16_HF_DIR TEXT_FILE [N_TOKENS]
    quant-studio eval HQQ_DIR --base F16_HF_DIR --text TEXT_FILE --ctx N_TOKENS --chunks 1

transformers 5.x itself does not load HQQ checkpoints on the CPU (its HQQ quantizer refuses a CPU device map and
has no loader for pre-quantized tensors), so the model is the source with each decoder linear replaced by the
HQQLinear loaded from our tensors (its dequantized weight in an f32 nn.Linear, the arithmetic our `eval` uses).
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer


def tensors(folder):
    out = {}
    for f in sorted(x for x in os.listdir(folder) if x.endswith(".safetensors")):
        with safe_open(os.path.join(folder, f), "pt") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def main():
    hqq_dir, base_dir, text_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    ours = tensors(hqq_dir)
    qc = json.load(open(os.path.join(hqq_dir, "config.json")))["quantization_config"]
    wqp = qc["quant_config"]["weight_quant_params"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    prefixes = sorted(k[: -len(".W_q")] for k in ours if k.endswith(".W_q"))
    code_agree, zero_diff, loaded = [], [], 0
    for p in prefixes:
        state = {k[len(p) + 1:]: v for k, v in ours.items() if k.startswith(p + ".")}
        layer = HQQLinear(None, quant_config=None, compute_dtype=torch.float16, device="cpu", initialize=False)
        layer.load_state_dict(state)
        loaded += 1
        w = layer.dequantize()
        mod = q.get_submodule(p)
        mod.weight.data = w.float()
        # hqq's own quantizer on the same fp16 weights.
        src = base.get_submodule(p)
        lin = torch.nn.Linear(src.in_features, src.out_features, bias=False)
        lin.weight.data = src.weight.data.to(torch.float16)
        cfg = BaseQuantizeConfig(nbits=wqp["nbits"], group_size=wqp["group_size"], axis=wqp["axis"])
        theirs = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float16, device="cpu")
        code_agree.append(float((theirs.unpack(dtype=torch.uint8) == layer.unpack(dtype=torch.uint8)).float().mean()))
        zero_diff.append(float((theirs.meta["zero"].float() - layer.meta["zero"].float()).abs().max()))
        np.ascontiguousarray(w.float().numpy(), dtype="<f4").tofile(os.path.join(os.environ.get("HQQ_DUMP", "/tmp"), p + ".f32")) if os.environ.get("HQQ_DUMP") else None
    tok = AutoTokenizer.from_pretrained(hqq_dir)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[:, :n]
    with torch.no_grad():
        lq = F.log_softmax(q(ids).logits[0].float(), -1)
        lb = F.log_softmax(base(ids).logits[0].float(), -1)
    first = n // 2  # as llama-perplexity: logits at positions n/2 .. n-2 predict tokens n/2+1 .. n-1
    target = ids[0, first + 1:]

    def ppl(lp):
        return float(torch.exp(-lp[first:-1].gather(1, target[:, None])[:, 0].mean()))

    kld = (lb.exp() * (lb - lq)).sum(-1)[first:-1]
    print(json.dumps({"loaded_as_HQQLinear": loaded, "codes_equal_to_hqq_quantizer": min(code_agree),
                      "codes_equal_mean": sum(code_agree) / len(code_agree),
                      "max_zero_diff_vs_hqq": max(zero_diff),
                      "tokens": int(ids.shape[1]), "ppl_hqq": ppl(lq), "ppl_base": ppl(lb),
                      "kld_mean": float(kld.mean()), "same_top": float((lq.argmax(-1) == lb.argmax(-1))[first:-1].float().mean())},
                     indent=1))


if __name__ == "__main__":
    main()
