#!/usr/bin/env python3
"""Reference logits for SmolLM2-135M-Instruct's Q4_1 GGUF, computed by transformers in float32.

The GGUF's tensors are dequantised with gguf-py (llama.cpp's own Python package), Q/K rows are put back
in Hugging Face order (the inverse of convert_hf_to_gguf's permute), and the weights are loaded into a
LlamaForCausalLM built from the GGUF's metadata; the prompt is tokenized by transformers' GGUF tokenizer.
Writes tests/golden/smollm2/golden.json:

  input_ids     the prompt's ids
  max_abs       max |logit| at every position
  top           the 10 best (id, logit) pairs at every position
  probe_ids     every 97th id; probe_rows: the logits of those ids at probe_positions
  greedy        greedy continuation (16 new tokens, or up to EOS)

Run:  python3 tests/golden/make_smollm2_golden.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import pathlib
import sys

import gguf
import numpy as np
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT = pathlib.Path.home() / ".cache/quant-studio/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "<|im_start|>user\nWrite one sentence about lighthouses and the sea.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PROBE_POSITIONS = [0, 7, -1]
NEW_TOKENS = 16


def field(r, key):
    return r.fields[key].contents()


def f32(x):
    return float(f"{x:.9g}")


def main():
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    r = gguf.GGUFReader(str(path))
    n_head = int(field(r, "llama.attention.head_count"))
    n_kv = int(field(r, "llama.attention.head_count_kv"))
    hidden = int(field(r, "llama.embedding_length"))
    cfg = LlamaConfig(
        vocab_size=int(field(r, "llama.vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(field(r, "llama.feed_forward_length")),
        num_hidden_layers=int(field(r, "llama.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=hidden // n_head,
        max_position_embeddings=int(field(r, "llama.context_length")),
        rms_norm_eps=float(field(r, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(r, "llama.rope.freq_base")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in r.tensors),
        bos_token_id=1,
        eos_token_id=2,
    )
    names = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            base, layer = parts[2], parts[1]
            name = f"model.layers.{layer}.{names[base]}.{parts[-1]}"
        else:
            base = parts[0]
            name = f"{names[base]}.{parts[-1]}"
        if base in ("attn_q", "attn_k"):
            heads = n_head if base == "attn_q" else n_kv
            rows, cols = w.shape
            w = w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    model.tie_weights()

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float()
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW_TOKENS,
            eos_token_id=2, pad_token_id=2,
        )[0][len(ids):].tolist()
    probe_ids = list(range(0, cfg.vocab_size, 97))
    top = logits.topk(10, dim=-1)
    golden = {
        "prompt": PROMPT,
        "input_ids": ids,
        "max_abs": [f32(v) for v in logits.abs().max(dim=-1).values.tolist()],
        "top": [
            [[i, f32(v)] for i, v in zip(ii, vv)]
            for ii, vv in zip(top.indices.tolist(), top.values.tolist())
        ],
        "probe_ids": probe_ids,
        "probe_positions": [p % len(ids) for p in PROBE_POSITIONS],
        "probe_rows": [[f32(logits[p, i].item()) for i in probe_ids] for p in PROBE_POSITIONS],
        "greedy": out,
        "greedy_text": tok.decode(out, skip_special_tokens=True),
    }
    dest = HERE / "smollm2"
    dest.mkdir(exist_ok=True)
    text = json.dumps(golden, separators=(",", ":")) + "\n"
    (dest / "golden.json").write_text(text)
    print(f"{len(ids)} prompt tokens, {len(text) // 1024} KiB, greedy {out!r} = {golden['greedy_text']!r}")


if __name__ == "__main__":
    main()
