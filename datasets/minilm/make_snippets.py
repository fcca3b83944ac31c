"""Recipe for ``snippets.json``: prose paragraphs of Python's own help topics.

Source: ``pydoc_data.topics`` of CPython 3.11.7 (the text behind ``help('assert')``, taken
from the Python Language Reference; PSF License Version 2). Run from the repository root:

    .venv/bin/python datasets/minilm/make_snippets.py

The steps, each a plain rule so the set can be rebuilt and checked:
1. split every topic into paragraphs at blank lines; drop code blocks (indented lines),
   headings (underlined with *** / === / ---) and grammar rules (``::=``);
2. join each paragraph's lines with single spaces;
3. keep paragraphs of 25 words or more that fit in 128 tokens with [CLS] and [SEP]
   (so no snippet is truncated);
4. drop exact duplicates (case-insensitive) and near duplicates (word-set Jaccard >= 0.6
   with a paragraph kept before; topics repeat paragraphs, which would make
   nearest-neighbour retrieval trivially stable);
5. shuffle with numpy's default_rng(0) and keep the first ``N_KEEP``.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

N_KEEP = 384
MIN_WORDS = 25
MAX_TOKENS = 128
JACCARD_MAX = 0.6
OUT = Path(__file__).resolve().parent / "snippets.json"


def paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [l for l in block.splitlines() if l.strip()]
        if not lines or any(l.startswith((" ", "\t")) for l in lines):
            continue  # code, grammar or a quoted example
        if re.fullmatch(r"[*=\-~^]{3,}", lines[-1].strip()) or "::=" in block:
            continue
        out.append(" ".join(" ".join(lines).split()))
    return out


def main() -> None:
    import pydoc_data.topics

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from analysis.data.minilm import minilm_tokenizer

    tok = minilm_tokenizer(max_length=10_000)
    kept, seen, word_sets = [], set(), []
    for topic in sorted(pydoc_data.topics.topics):
        for p in paragraphs(pydoc_data.topics.topics[topic]):
            words = p.lower().split()
            if len(words) < MIN_WORDS or p.lower() in seen:
                continue
            if len(tok.encode(p).ids) > MAX_TOKENS:
                continue
            ws = set(words)
            if any(len(ws & o) / len(ws | o) >= JACCARD_MAX for o in word_sets):
                continue
            seen.add(p.lower())
            word_sets.append(ws)
            kept.append({"topic": topic, "text": p})
    order = np.random.default_rng(0).permutation(len(kept))[:N_KEEP]
    chosen = [kept[i] for i in order]
    OUT.write_text(json.dumps({
        "source": f"pydoc_data.topics, CPython {sys.version.split()[0]} (Python Language Reference; PSF License Version 2)",
        "recipe": "datasets/minilm/make_snippets.py",
        "eligible": len(kept),
        "topics": [c["topic"] for c in chosen],
        "snippets": [c["text"] for c in chosen],
    }, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(kept)} eligible paragraphs, kept {len(chosen)} -> {OUT}")


if __name__ == "__main__":
    main()
