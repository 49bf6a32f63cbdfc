"""Build CLIP's BPE tokenizer files (vocab.json, merges.txt) from open_clip's `bpe_simple_vocab_16e6.txt.gz`.

The Stable Diffusion families all tokenize with OpenAI CLIP's BPE, and a single-file checkpoint does not hold
it. The hub that serves `openai/clip-vit-large-patch14` is often out of reach; the package index is not, and
open_clip_torch ships the merges list. The vocabulary is built as CLIP's own `SimpleTokenizer` builds it: the
256 byte symbols in `bytes_to_unicode` order, their end-of-word forms, one token per merge, then the two
specials — 49,408 ids in all.

    .venv/bin/pip download open_clip_torch --no-deps -d /tmp/oc && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    .venv/bin/python scripts/build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz models/clip
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

MERGES = 49152 - 256 - 2
"""CLIP uses the first 48,894 merges of the file (its first line is a header)."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character table, which CLIP's vocabulary starts with."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [line for line in lines[1:] if line.strip()][:MERGES]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe", type=Path, help="open_clip's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out", type=Path, help="folder for vocab.json and merges.txt")
    args = parser.parse_args()
    vocab, merges = build(args.bpe)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges → {args.out}")


if __name__ == "__main__":
    main()
