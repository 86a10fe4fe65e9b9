#!/usr/bin/env python3
"""Makes rust-book.txt, Quant Studio's bundled calibration text, from the HTML of "The Rust Programming
Language" that rustup installs with the rust-docs component (`rustup component add rust-docs`).

Usage: extract_rust_book.py [BOOK_HTML_DIR] [OUT] [MAX_BYTES] [FIRST_CHAPTER]

The held-out evaluation text, rust-book-heldout.txt, is made with MAX_BYTES 120000 and FIRST_CHAPTER 16
(chapters the calibration text, which stops early in chapter 10, never reaches).

Keeps the prose, lists and code listings of chapters 1-21 in reading order (no navigation, no
"Filename:" captions), one blank line between blocks. Standard library only.
"""
import glob
import html
import os
import re
import sys
from html.parser import HTMLParser

BLOCKS = {"p", "pre", "li", "h1", "h2", "h3", "h4", "blockquote", "tr"}


class Main(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0          # inside <main>
        self.skip = 0           # inside nav/script/style/buttons
        self.blocks, self.cur, self.pre = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.depth += 1
        if not self.depth:
            return
        if tag in ("script", "style", "nav", "button", "noscript"):
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.flush()

    def handle_endtag(self, tag):
        if tag == "main":
            self.flush()
            self.depth -= 1
        if not self.depth:
            return
        if tag in ("script", "style", "nav", "button", "noscript"):
            self.skip -= 1
        if tag in BLOCKS:
            self.flush()
        if tag == "pre":
            self.pre -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.cur.append(data)

    def flush(self):
        text = "".join(self.cur)
        self.cur = []
        if self.pre:
            text = text.strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text and not text.startswith("Filename:"):
            self.blocks.append(text)


def main():
    book = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
        "~/.rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book")
    out = sys.argv[2] if len(sys.argv) > 2 else "rust-book.txt"
    max_bytes = int(sys.argv[3]) if len(sys.argv) > 3 else 400_000
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    files = sorted(f for f in glob.glob(os.path.join(book, "ch*.html"))
                   if re.match(r"ch(0[1-9]|1\d|2[01])-", os.path.basename(f))
                   and int(os.path.basename(f)[2:4]) >= first)
    parts, size = [], 0
    for f in files:
        p = Main()
        p.feed(open(f, encoding="utf-8").read())
        chapter = "\n\n".join(p.blocks) + "\n\n"
        if size + len(chapter.encode()) > max_bytes:
            break
        parts.append(chapter)
        size += len(chapter.encode())
    open(out, "w", encoding="utf-8").write("".join(parts).rstrip("\n") + "\n")
    print(f"{out}: {size} bytes from {len(parts)} of {len(files)} pages")


if __name__ == "__main__":
    main()
