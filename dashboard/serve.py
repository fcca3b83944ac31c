"""Serve the dashboard: ``streamlit run dashboard/app.py`` with QuantLens' settings as flags.

The flags mirror ``.streamlit/config.toml`` so the settings hold from any working
directory (Streamlit reads that file from the current directory only).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).with_name("app.py")
SETTINGS: dict[str, str] = {
    "server.headless": "true",
    "server.enableXsrfProtection": "true",
    "server.enableCORS": "true",
    "server.maxUploadSize": "1",
    "server.fileWatcherType": "none",
    "browser.gatherUsageStats": "false",
    "client.toolbarMode": "minimal",
    "theme.base": "light",
    "theme.primaryColor": "#3B6FB6",
    "theme.backgroundColor": "#FFFFFF",
    "theme.secondaryBackgroundColor": "#F3F5F8",
    "theme.textColor": "#1F2430",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def command(run_dirs: list[str], port: int, host: str = "127.0.0.1", headless: bool = True) -> list[str]:
    """The ``streamlit run`` command line that serves ``run_dirs``."""
    flags = {**SETTINGS, "server.port": str(port), "server.address": host,
             "server.headless": "true" if headless else "false"}
    args = [sys.executable, "-m", "streamlit", "run", str(APP)]
    for k, v in flags.items():
        args += [f"--{k}", v]
    return [*args, "--", *(str(Path(d).resolve()) for d in run_dirs)]


def url_of(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def serve(run_dirs: list[str], port: int | None = None, host: str = "127.0.0.1", headless: bool = True) -> int:
    """Serve the dashboard on ``run_dirs`` until interrupted; returns the server's exit code."""
    port = port or free_port(host)
    print(f"QuantLens dashboard: {url_of(host, port)}  (Ctrl+C to stop)", flush=True)
    proc = subprocess.Popen(command(run_dirs, port, host, headless))

    def _interrupt(signum, frame):  # a SIGTERM to this process stops the server too, not only Ctrl+C
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return stop_server(proc, timeout=10)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.kill()


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """Ask a server process to stop, kill it if it has not within ``timeout`` s; returns its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def start_server(run_dirs: list[str], port: int | None = None, host: str = "127.0.0.1",
                 timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start a server in the background and wait until it answers; returns (process, URL).

    Raises:
        RuntimeError: the server exited or did not answer ``/_stcore/health`` within ``timeout`` s.
    """
    port = port or free_port(host)
    log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(command(run_dirs, port, host), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = url_of(host, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"dashboard server exited with code {proc.returncode}: {err[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"dashboard server did not answer at {url} within {timeout:.0f} s")
