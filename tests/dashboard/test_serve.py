"""serve(): the command line carries .streamlit/config.toml's settings, so any working directory works."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

from analysis.store.synthetic import synthetic_run
from dashboard.serve import APP, SETTINGS, command, free_port

ROOT = Path(__file__).resolve().parents[2]


def test_flags_mirror_config_toml():
    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    flat = {f"{section}.{k}": str(v).lower() if isinstance(v, bool) else str(v)
            for section, values in cfg.items() for k, v in values.items()}
    flat.pop("server.address")  # passed from serve()'s host argument
    assert flat == SETTINGS
    assert SETTINGS["server.enableXsrfProtection"] == "true"


def test_command_line(tmp_path):
    cmd = command([str(tmp_path)], 8123, "127.0.0.1")
    assert cmd[1:4] == ["-m", "streamlit", "run"] and cmd[4] == str(APP)
    assert cmd[cmd.index("--server.port") + 1] == "8123"
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[-2:] == ["--", str(tmp_path.resolve())]


def test_free_port():
    assert 0 < free_port() < 65536


def test_serve_stops_its_server_on_sigterm(tmp_path):
    """`quantlens dashboard` killed with SIGTERM leaves no server behind."""
    run = synthetic_run(tmp_path / "run", 5, seed=0, n_random=0)
    port = free_port()
    code = f"from dashboard.serve import serve; raise SystemExit(serve([{str(run.path)!r}], port={port}))"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        parent.kill()
        raise AssertionError("the server did not come up")
    assert parent.stdout.readline().decode().startswith(f"QuantLens dashboard: http://127.0.0.1:{port}")
    os.kill(parent.pid, signal.SIGTERM)
    parent.wait(timeout=20)
    time.sleep(0.5)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
        up = True
    except OSError:
        up = False
    assert not up, "the streamlit server outlived serve()"
