"""Manual check (not run in CI: it needs torch, transformers and compressed-tensors): AWQ folders we wrote load
unchanged in transformers on the CPU and score like our engine.

    python -m venv venv && . venv/bin/activate
    pip install torch transformers safetensors compressed-tensors   # checked: torch 2.15, transformers 5.25,
                                                                    # compressed-tensors 0.20.1
    pip install gptqmodel                                           # for the AutoAWQ GEMM folder (optional)
    quant-studio quantize F16_HF_DIR --format awq-ct --group-size 64 --out AWQ_DIR   # or --format awq
    python tests/awq_py/transformers_check.py AWQ_DIR F16_HF_DIR TEXT_FILE [N_TOKENS]
    quant-studio eval AWQ_DIR --base F16_HF_DIR --text TEXT_FILE --ctx N_TOKENS --chunks 1

The folder is loaded with `AutoModelForCausalLM.from_pretrained(AWQ_DIR)` as any user would (compressed-tensors
folders decompress through the library's own pack-quantized compressor; AutoAWQ GEMM folders go through
transformers' AWQ integration, which needs gptqmodel). The script prints the PPL over the second half of the
first N_TOKENS tokens (llama-perplexity's scored positions, as `eval --chunks 1` scores them), the KLD against the
F16 folder, and how far each decoder linear's weight, as transformers holds it after loading, is from our
numpy dequantiser's (`tests/awq_py/dequantize_awq.py`, which `engine/tests/awq_py.rs` pins to our engine).
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def dense_weight(model, prefix):
    """The weight transformers computes with for one linear, as an f32 array (decompressing if needed)."""
    mod = model.get_submodule(prefix)
    w = getattr(mod, "weight", None)
    if w is not None and w.dtype.is_floating_point and w.dim() == 2 and w.shape[1] > 1:
        return w.detach().float().numpy()
    # Packed modules: multiply the identity to read the effective weight.
    eye = torch.eye(mod.in_features, dtype=torch.float16 if w is None else torch.float32)
    with torch.no_grad():
        out = mod(eye.to(next(model.parameters()).dtype))
    if getattr(mod, "bias", None) is not None:
        out = out - mod.bias
    return out.float().numpy().T


def ct_decompressed(awq_dir, base_dir, qc):
    """The source model with every packed linear replaced by compressed-tensors' own decompression of ours."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme.model_validate(group)
    tensors = {}
    for f in sorted(x for x in os.listdir(awq_dir) if x.endswith(".safetensors")):
        with safe_open(os.path.join(awq_dir, f), "pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
    for name in [k for k in tensors if k.endswith(".weight_packed")]:
        p = name[: -len(".weight_packed")]
        sd = {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".weight_")}
        model.get_submodule(p).weight.data = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    # Everything else (the norms AWQ folded its scales into) as stored in our folder.
    own = dict(model.named_parameters())
    for k, v in tensors.items():
        if k in own:
            own[k].data = v.to(own[k].dtype)
    return model


def main():
    awq_dir, base_dir, text_file = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    qc = json.load(open(os.path.join(awq_dir, "config.json")))["quantization_config"]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loader = "transformers.from_pretrained"
    try:
        q = AutoModelForCausalLM.from_pretrained(awq_dir, dtype=torch.float16, device_map="cpu")
    except RuntimeError as e:
        if qc["quant_method"] != "compressed-tensors" or "mismatched" not in str(e):
            raise
        # transformers 5.x builds asymmetric pack-quantized modules on the meta device without packing their
        # zero points (compressed-tensors' meta path keeps [out, groups]) and then refuses the packed
        # [out*B/32, groups] tensors that compressed-tensors' own compressor writes (and vLLM reads) —
        # llm-compressor#1618. Decompress with the library's own compressor instead, module by module.
        q = ct_decompressed(awq_dir, base_dir, qc)
        loader = "compressed-tensors PackedQuantizationCompressor.decompress (transformers refuses asym, see #1618)"
    kinds = sorted({type(m).__name__ for m in q.modules() if "proj" in type(m).__name__.lower()
                    or "Linear" in type(m).__name__})
    # Weights as loaded vs our numpy dequantiser.
    with tempfile.TemporaryDirectory() as dq:
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "dequantize_awq.py"), awq_dir, dq],
                       check=True)
        worst, checked = 0.0, 0
        for f in sorted(os.listdir(dq)):
            prefix = f[: -len(".f32")]
            ours = np.fromfile(os.path.join(dq, f), dtype="<f4")
            theirs = dense_weight(q, prefix).reshape(-1)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            checked += 1
    tok = AutoTokenizer.from_pretrained(awq_dir)
    ids = tok(open(text_file, encoding="utf-8").read(), return_tensors="pt").input_ids[:, :n]
    with torch.no_grad():
        lq = F.log_softmax(q(ids).logits[0].float(), -1)
        lb = F.log_softmax(base(ids).logits[0].float(), -1)
    first = n // 2  # as llama-perplexity: logits at positions n/2 .. n-2 predict tokens n/2+1 .. n-1
    target = ids[0, first + 1:]

    def ppl(lp):
        return float(torch.exp(-lp[first:-1].gather(1, target[:, None])[:, 0].mean()))

    kld = (lb.exp() * (lb - lq)).sum(-1)[first:-1]
    print(json.dumps({"quant_method": qc["quant_method"], "loader": loader, "module_types": kinds,
                      "linears_checked": checked, "max_abs_diff_vs_numpy_dequantiser": worst,
                      "tokens": int(ids.shape[1]), "ppl_transformers": ppl(lq), "ppl_base": ppl(lb),
                      "kld_mean": float(kld.mean()),
                      "same_top": float((lq.argmax(-1) == lb.argmax(-1))[first:-1].float().mean())}, indent=1))


if __name__ == "__main__":
    main()
