"""Manual check (not run in CI: it needs torch, ~5 GB): a GPTQ folder we wrote loads unchanged in transformers
(with gptqmodel's pure-torch kernel on CPU) and scores like our engine.

    python -m venv venv && . venv/bin/activate
    pip install torch transformers optimum accelerate safetensors gptqmodel   # checked: torch 2.15, transformers
                                                                             # 5.24, optimum 2.3, gptqmodel 7.7
    python tests/gptq_py/transformers_check.py GPTQ_DIR F16_HF_DIR TEXT_FILE [N_TOKENS]
    quant-studio eval GPTQ_DIR --base F16_HF_DIR --text TEXT_FILE --ctx N_TOKENS --chunks 1

Prints PPL of both models and the KL-divergence of the GPTQ model from the source over the second half of the
first N tokens (what llama-perplexity and our `eval` score for one chunk of N), and the share of positions where
the top token agrees. `backend="torch"` only picks the kernel: gptqmodel's default AVX-512 CPU kernel refuses
layers whose width is not a multiple of the group size (SmolLM2's 576 with groups of 128).
"""
import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig


def main():
    gptq_dir, base_dir, text_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    tok = AutoTokenizer.from_pretrained(gptq_dir)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[:, :n]
    q = AutoModelForCausalLM.from_pretrained(
        gptq_dir, device_map="cpu", dtype=torch.float16,
        quantization_config=GPTQConfig(bits=4, backend="torch"))
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
    print(json.dumps({"tokens": int(ids.shape[1]), "ppl_gptq": ppl(lq), "ppl_base": ppl(lb),
                      "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
                      "same_top": float(same)}, indent=1))


if __name__ == "__main__":
    main()
