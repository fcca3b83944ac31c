"""serve(): the command line carries .streamlit/config.toml's settings, so any working directory works."""
from __future__ import annotations

import tomllib
from pathlib import Path

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
