#!/usr/bin/env python3
"""Draw the README's quality-against-size plots (SVG, no dependencies) from `smollm2-pareto.csv`.

Usage: pareto.py [CSV] [OUT_PREFIX]   (defaults: the CSV beside this script, writing smollm2-*.svg beside it)

CSV columns: series,label,decoder_bpw,file_mb,kld — one row per file measured with
`quant-studio eval FILE --base SmolLM2-F16.gguf --ctx 512 --chunks 20` (the held-out text). Two plots: KLD against
the decoder layers' bits per weight (how EXL2 is compared), and KLD against the whole file's size (how GGUF
files are compared). KLD is on a log scale.
"""
import csv
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {"llama-quantize mix (imatrix)": "#d62728", "EXL2": "#1f77b4", "GGUF auto mix": "#2ca02c",
          "GGUF auto mix without Q4_1/Q5_1": "#98df8a", "GPTQ": "#9467bd", "AWQ": "#8c564b"}


def plot(rows, xkey, xlabel, out, title):
    W, H, L, R, T, B = 760, 460, 70, 230, 40, 50
    xs = [float(r[xkey]) for r in rows if r[xkey]]
    ys = [float(r["kld"]) for r in rows]
    x0, x1 = min(xs) * 0.97, max(xs) * 1.02
    y0, y1 = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
    px = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    py = lambda y: T + (y1 - math.log10(y)) / (y1 - y0) * (H - T - B)
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{L}" y="22" font-size="14">{title}</text>']
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if y0 <= math.log10(v) <= y1:
                y = py(v)
                s.append(f'<line x1="{L}" x2="{W - R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
                s.append(f'<text x="{L - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
    step = 0.5 if x1 - x0 < 8 else 10
    t = math.ceil(x0 / step) * step
    while t <= x1:
        x = px(t)
        s.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{T}" y2="{H - B}" stroke="#eee"/>')
        s.append(f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{t:g}</text>')
        t += step
    s.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>')
    s.append(f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
             f'text-anchor="middle">KLD against F16 (log)</text>')
    series = []
    for r in rows:
        if r["series"] not in series:
            series.append(r["series"])
    for i, name in enumerate(series):
        pts = sorted((float(r[xkey]), float(r["kld"]), r["label"]) for r in rows if r["series"] == name and r[xkey])
        c = COLORS.get(name, "#333")
        if len(pts) > 1 and name != "llama-quantize mix (imatrix)":
            d = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in pts)
            s.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for x, y, lab in pts:
            s.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}"/>')
            if name == "llama-quantize mix (imatrix)":
                s.append(f'<text x="{px(x) + 5:.1f}" y="{py(y) - 5:.1f}" fill="{c}" font-size="10">{lab}</text>')
        ly = T + 10 + 18 * i
        s.append(f'<circle cx="{W - R + 20}" cy="{ly}" r="4" fill="{c}"/>')
        s.append(f'<text x="{W - R + 30}" y="{ly + 4}" font-size="11">{name}</text>')
    s.append("</svg>")
    with open(out, "w") as f:
        f.write("\n".join(s) + "\n")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "smollm2-pareto.csv")
    prefix = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "smollm2")
    rows = list(csv.DictReader(open(src)))
    plot([r for r in rows if r["series"] in ("EXL2", "llama-quantize mix (imatrix)", "GPTQ", "AWQ")],
         "decoder_bpw", "bits per weight of the decoder layers' linears", prefix + "-by-decoder-bpw.svg",
         "SmolLM2-135M: KLD against decoder bpw (EXL2 vs llama-quantize)")
    plot([r for r in rows if r["series"] != "EXL2" and r["series"] not in ("GPTQ", "AWQ")],
         "file_mb", "file size (MB)", prefix + "-by-file-size.svg",
         "SmolLM2-135M: KLD against GGUF file size (auto mix vs llama-quantize)")


if __name__ == "__main__":
    main()
