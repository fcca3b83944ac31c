"""``quantlens demo``: the dashboard at once, MiniLM analysed in a background process that a stopped
server stops cleanly (the Run resumes), and one writer per Run folder.

The background machinery is exercised on digits (seconds); MiniLM itself is only started and
stopped here (its full sweep takes minutes: benchmarks and the README measure it)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.cli.demo_verb import finished, log_of, start_background, stop_background
from analysis.store.run import load_run
from analysis.store.writer import RunBusy, hold_writer, run_writer
from dashboard.serve import free_port

QUANTLENS = str(Path(sys.executable).parent / "quantlens")


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (code {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def _jobs(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "jobs").glob("*.json")}


def test_one_writer_per_run_folder(tmp_path):
    out = tmp_path / "minilm"
    with hold_writer(out, "first") as note:
        assert run_writer(out)["pid"] == os.getpid() == note["pid"]
        with pytest.raises(RunBusy, match=rf"process {os.getpid()} \(first\) is writing this Run"):
            with hold_writer(out, "second"):
                pass
    assert run_writer(out) is None and not out.exists()  # nothing written by merely holding it
    with hold_writer(out, "later"):  # free again
        pass


def test_analyze_beside_another_writer_is_one_line_exit_2_naming_the_run_and_its_pid(tmp_path, capsys):
    """``quantlens analyze --resume`` (what the dashboard suggests for a partial Run) while the demo's sweep
    writes the Run: refused before it reads or cleans anything in it."""
    import numpy as np

    from analysis import analyze
    from analysis.cli.main import main

    rng = np.random.default_rng(0)
    npz = tmp_path / "x.npz"
    np.savez(npz, inputs=rng.normal(size=(40, 64)).astype(np.float32), labels=rng.integers(0, 10, 40))
    out = tmp_path / "r"
    analyze("factories:tiny_mlp", str(npz), out, progress=False, latency=False, verify_policies=0)
    before = _jobs(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom analysis.store.writer import hold_writer\n"
         "with hold_writer(sys.argv[1], 'quantlens demo minilm'):\n    print('held', flush=True)\n    sys.stdin.read()",
         str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        code = main(["analyze", "factories:tiny_mlp", "--task", str(npz), "--out", str(out), "--resume", "--quiet",
                     "--no-latency", "--verify-policies", "0"])
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert code == 2 and len(err) == 1, err
    assert str(out) in err[0] and f"process {holder.pid} (quantlens demo minilm) is writing this Run" in err[0]
    assert _jobs(out) == before and run_writer(out) is None


def test_the_engine_sweep_goes_on_under_a_hold_of_the_same_thread(tmp_path):
    from analysis.engine.analyze import sweep_to_run

    out = tmp_path / "d"
    with hold_writer(out, "quantlens demo digits") as note:
        sweep_to_run("demo:digits", "digits", out, formats=("int8",), threads=1, progress=False, random_policies=0,
                     calib=32)
        assert run_writer(out) == note  # the demo's note, not replaced by the sweep's
    assert run_writer(out) is None


@pytest.mark.slow
def test_stopped_background_analysis_resumes_without_redoing_jobs(tmp_path):
    runs = tmp_path / "runs"
    proc = start_background("digits", runs)
    _wait(lambda: len(_jobs(runs / "digits")) >= 8 if (runs / "digits" / "jobs").is_dir() else False, 180,
          "first chunk of jobs", proc)
    assert run_writer(runs / "digits")["pid"] == proc.pid
    assert stop_background(proc) == 130  # the same clean stop as Ctrl+C
    before = _jobs(runs / "digits")
    run = load_run(runs / "digits")
    assert run.status == "partial" and 8 <= len(before) < run.meta["progress"]["total"]
    assert run_writer(runs / "digits") is None
    assert "the next `quantlens demo` resumes" in log_of("digits", runs).read_text()

    again = start_background("digits", runs)
    assert again.wait(timeout=300) == 0, log_of("digits", runs).read_text()[-2000:]
    run = load_run(runs / "digits")
    assert finished(run, "digits") and run.meta["sweep"]["resumed"] is True
    after = _jobs(runs / "digits")
    assert {k: after[k] for k in before} == before  # finished jobs kept, not recomputed
    assert len(after) == run.meta["progress"]["total"]
    assert "digits done" in log_of("digits", runs).read_text()


def test_a_second_background_analysis_leaves_the_run_to_the_first(tmp_path):
    runs = tmp_path / "runs"
    with hold_writer(runs / "digits", "quantlens demo (first)"):
        proc = start_background("digits", runs)
        assert proc.wait(timeout=120) == 0
    assert "(quantlens demo (first)) is writing this Run" in log_of("digits", runs).read_text()
    assert not (runs / "digits").exists()


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_demo_serves_at_once_and_a_stopped_server_stops_the_background_analysis(tmp_path, digits_run):
    runs = tmp_path / "runs"
    shutil.copytree(digits_run.path, runs / "digits")  # analysed already: the demo serves it as it is
    port = free_port()
    demo = subprocess.Popen([QUANTLENS, "demo", "--runs", str(runs), "--port", str(port)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: _health(f"http://127.0.0.1:{port}"), 90, "dashboard", demo)
        _wait(lambda: run_writer(runs / "minilm") is not None, 60, "background MiniLM analysis", demo)
        child = run_writer(runs / "minilm")["pid"]
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    out = demo.stdout.read().decode(errors="replace")
    assert "demo Run found" in out and "in the background" in out, out
    assert not _health(f"http://127.0.0.1:{port}")
    _wait(lambda: run_writer(runs / "minilm") is None, 5, "writer note removed")
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
    assert "stopped; finished jobs are saved" in log_of("minilm", runs).read_text()
    if (runs / "minilm").exists():  # stopped after the model loaded: a partial Run that the next demo resumes
        assert load_run(runs / "minilm").status == "partial"


def _alive(pid: int) -> bool:
    """A process that runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sighup_to_the_demo_leaves_no_background_process(tmp_path, digits_run):
    """The terminal closed (SIGHUP), here before the dashboard even answers: the background sweep is stopped
    the clean way, not left running unseen with the Run's lock."""
    runs = tmp_path / "runs"
    shutil.copytree(digits_run.path, runs / "digits")
    demo = subprocess.Popen([QUANTLENS, "demo", "--runs", str(runs), "--port", str(free_port())], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    child = None
    try:
        _wait(lambda: run_writer(runs / "minilm") is not None, 60, "background MiniLM analysis", demo)
        child = run_writer(runs / "minilm")["pid"]
        demo.send_signal(signal.SIGHUP)
        demo.wait(timeout=60)
        _wait(lambda: not _alive(child), 30, "background analysis stopped")
    finally:
        try:  # the demo's group: the dashboard server too, should the demo have gone without stopping it
            os.killpg(demo.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if child is not None and _alive(child):
            os.killpg(child, signal.SIGKILL)  # the background process leads its own session
    assert run_writer(runs / "minilm") is None
    assert "stopped; finished jobs are saved" in log_of("minilm", runs).read_text()


def test_a_background_analysis_stops_itself_when_its_demo_is_killed(tmp_path):
    """SIGKILL leaves the demo no chance to stop its background sweep: the sweep notices and stops itself."""
    runs = tmp_path / "runs"
    starter = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                                "from analysis.cli.demo_verb import start_background\n"
                                "start_background('digits', Path(sys.argv[1]))\ntime.sleep(600)", str(runs)],
                               start_new_session=True)
    child = None
    try:
        _wait(lambda: run_writer(runs / "digits") is not None, 60, "background analysis", starter)
        child = run_writer(runs / "digits")["pid"]
        starter.kill()
        starter.wait()
        _wait(lambda: not _alive(child), 30, "background analysis stopped by itself")
    finally:
        if starter.poll() is None:
            starter.kill()
        if child is not None and _alive(child):
            os.killpg(child, signal.SIGKILL)
    assert run_writer(runs / "digits") is None
    assert "stopped; finished jobs are saved" in log_of("digits", runs).read_text()


def test_demo_no_serve_without_a_name_starts_nothing_in_the_background(tmp_path, digits_run):
    runs = tmp_path / "runs"
    shutil.copytree(digits_run.path, runs / "digits")
    r = subprocess.run([QUANTLENS, "demo", "--runs", str(runs), "--no-serve"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "demo Run found" in r.stdout and "in the background while serving" in r.stderr
    assert not (runs / "minilm").exists() and not log_of("minilm", runs).exists()
