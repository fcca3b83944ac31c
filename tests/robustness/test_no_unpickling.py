"""Security: nothing in analysis/ or dashboard/ unpickles without an explicit weights-only / no-pickle flag."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Lines that load pickles: pickle-family ``load(s)``/``Unpickler``/``open``, ``torch.load`` without
    ``weights_only=True``, ``np.load(allow_pickle=True)``, ``pandas.read_pickle``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        where = f"{filename}:{node.lineno}"
        if owner_name in PICKLERS and attr in {"load", "loads", "Unpickler", "open"}:
            found.append(f"{where} {owner_name}.{attr}")
        elif owner_name == "torch" and attr == "load":
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        elif owner_name in {"np", "numpy"} and attr == "load":
            flag = _keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append(f"{where} np.load(allow_pickle=...)")
        elif attr == "read_pickle":
            found.append(f"{where} read_pickle")
    return found


@pytest.mark.parametrize("snippet", ["import pickle\npickle.load(f)", "torch.load(p)", "torch.load(p, weights_only=False)",
                                     "np.load(p, allow_pickle=True)", "pd.read_pickle(p)", "joblib.load(p)",
                                     "pickle.Unpickler(f).load()"])
def test_the_scanner_catches_each_pattern(snippet):
    assert unsafe_loads(snippet)


@pytest.mark.parametrize("snippet", ["torch.load(p, map_location='cpu', weights_only=True)",
                                     "np.load(p, allow_pickle=False)", "np.load(p)", "json.load(f)"])
def test_the_scanner_passes_safe_loads(snippet):
    assert unsafe_loads(snippet) == []


def test_no_unpickling_in_analysis_or_dashboard():
    files = sorted((ROOT / "analysis").rglob("*.py")) + sorted((ROOT / "dashboard").rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []
