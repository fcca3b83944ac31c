"""The report page's own JavaScript, run with node: what the page projects for given policies."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

NODE = shutil.which("node")


def script(page: str, id_: str) -> str:
    """The text of the page's ``<script id=...>`` element."""
    return re.search(rf'<script[^>]*id="{id_}"[^>]*>(.*?)</script>', page, re.S).group(1)


def page_projections(page: str, policies: list[list[int]], folder: Path) -> list[dict]:
    """``qlProject`` of the page's script and data for each policy (format codes), run by node in ``folder``."""
    (folder / "app.js").write_text(script(page, "ql-app"))
    (folder / "data.json").write_text(script(page, "ql-data"))
    (folder / "codes.json").write_text(json.dumps(policies))
    (folder / "run.js").write_text(
        "const {qlProject} = require('./app.js'); const fs = require('fs');\n"
        "const m = JSON.parse(fs.readFileSync('data.json')).model;\n"
        "const codes = JSON.parse(fs.readFileSync('codes.json'));\n"
        "console.log(JSON.stringify(codes.map(c => qlProject(m, c))));\n")
    out = subprocess.run([NODE, "run.js"], cwd=folder, capture_output=True, text=True, check=True).stdout
    return json.loads(out)
