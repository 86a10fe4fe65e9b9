#!/usr/bin/env python3
"""Reference logits for the tiny fixture models, computed by transformers in float32 (eager attention).

Every sub-folder of tests/golden/ that holds a config.json is a fixture written by the engine's builder
(`cargo test -p quant_engine --test golden -- --ignored regenerate_golden_fixtures`). For each one this
script writes golden.json:

  input_ids     the first 24 tokens of TEXT (tokenized by transformers' tokenizer of the folder)
  logits        {"positions": [...], "rows": [[vocab floats], ...]}: full logits at a few positions
  argmax        the top-1 id at every position, and top2_gap (top-1 minus top-2 logit) beside it
  max_abs       max |logit| at every position
  greedy        transformers' greedy continuation (generate, do_sample=False, 8 new tokens; it ends early
                with the EOS id when the model picks it)
  greedy_text   that continuation decoded with skip_special_tokens=True

Run from anywhere:  python3 tests/golden/make_golden.py
"""
import json
import pathlib
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = pathlib.Path(__file__).resolve().parent
TEXT = (
    "The keeper climbed the ninety-one steps, cleaned the glass, and counted the boats "
    "as they passed the rocks: one, two, three."
)
N_TOKENS = 24
POSITIONS = [0, 1, 5, 11, 17, 23]
NEW_TOKENS = 8


def f32(x):
    # Shortest repr that reads back as the same float32.
    return float(f"{x:.9g}")


def one(folder: pathlib.Path):
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS, f"{folder.name}: text too short ({len(ids)} tokens)"
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x).logits[0].float()
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=tok.pad_token_id,
        )[0][N_TOKENS:].tolist()
    top2 = logits.topk(2, dim=-1)
    golden = {
        "name": folder.name,
        "text": TEXT,
        "input_ids": ids,
        "logits": {
            "positions": POSITIONS,
            "rows": [[f32(v) for v in logits[p].tolist()] for p in POSITIONS],
        },
        "argmax": top2.indices[:, 0].tolist(),
        "top2_gap": [f32(v) for v in (top2.values[:, 0] - top2.values[:, 1]).tolist()],
        "max_abs": [f32(v) for v in logits.abs().max(dim=-1).values.tolist()],
        "greedy": out,
        "greedy_text": tok.decode(out, skip_special_tokens=True),
    }
    text = json.dumps(golden, separators=(",", ":")) + "\n"
    (folder / "golden.json").write_text(text)
    gap = min(golden["top2_gap"])
    print(
        f"{folder.name}: {len(text) // 1024} KiB, max|logit| {max(golden['max_abs']):.3f}, "
        f"smallest top-2 gap {gap:.2e}, greedy {out}"
    )


def main():
    folders = sorted(p.parent for p in HERE.glob("*/config.json"))
    if not folders:
        sys.exit("no fixture folders: run the regenerate_golden_fixtures test first")
    torch.manual_seed(0)
    for f in folders:
        one(f)


if __name__ == "__main__":
    main()
