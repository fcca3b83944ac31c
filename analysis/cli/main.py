"""The ``quantlens`` command line.

Every verb exits 0 on success and 2 on bad input with one line naming the file or field;
a user mistake never prints a traceback. Bad input is an ``analysis.errors.InputError`` (or a
named file that is missing or of the wrong kind); any other exception is a bug and keeps its
traceback (exit code 1).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import sys
from pathlib import Path

from analysis.cli.demo_verb import add_demo, cmd_demo
from analysis.cli.library_log import library_log
from analysis.cli.paths import UsageError, input_file, output_file, output_folder
from analysis.cli.runtime_verbs import register as register_runtime_verbs
from analysis.cli.search_verb import register as register_search_verb
from analysis.quant.formats import OBSERVERS
from analysis.errors import InputError


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="measure per-layer INT8/INT4 sensitivity and write a Run",
                       description="Quantize each layer in turn, measure the task metric, and write a Run folder.")
    p.add_argument("model", help="demo:digits, demo:minilm, a .onnx file, a Hugging Face model folder (config.json + "
                                 "safetensors), a TorchScript archive (.pt from torch.jit.save), or "
                                 "package.module:factory returning a torch.nn.Module")
    p.add_argument("--task", default=None, help="bundled task (digits) or an .npz with 'inputs' [and 'labels']; "
                                                "default: the demo's own task")
    p.add_argument("--out", required=True, help="Run folder to create (absent or empty)")
    p.add_argument("--formats", default="int8,int4",
                   help="comma-separated formats: int8, int4, int8-dyn (dynamic int8, MatMul/Linear only; "
                        "default: int8,int4)")
    p.add_argument("--calib", type=int, default=None, help="number of calibration samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--observer", choices=OBSERVERS, default="minmax", help="activation range observer")
    p.add_argument("--group-size", type=int, default=None, help="weight group size for group-wise formats (default 32)")
    p.add_argument("--metric", default=None,
                   help="accuracy | agreement | cosine | embedding | nmse, or package.module:function for your own, "
                        "called per batch as fn(y_fp32, y_quant, labels) -> per-sample scores (default: from the "
                        "labels and the output, avoiding a metric that cannot move on it)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the task's kind (repeatable), e.g. text_column=sentence")
    p.add_argument("--output", default=None, metavar="NAME",
                   help="the model output to compare when the model has several (default: all of them)")
    p.add_argument("--weights", default=None, help="state dict (.safetensors or .pt, loaded weights-only) for the factory")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for small models)")
    p.add_argument("--no-incremental", action="store_true", help="full forward per job (no downstream-only reuse)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing Run at --out")
    p.add_argument("--resume", action="store_true", help="finish an interrupted Run at --out; finished jobs are kept")
    p.add_argument("--executor", choices=("serial", "process", "ray"), default="serial",
                   help="where jobs run: this process, a local process pool, or Ray (default serial)")
    p.add_argument("--workers", type=int, default=2, help="processes or Ray actors for --executor process|ray (default 2)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local cluster)")
    p.add_argument("--random-policies", type=int, default=8,
                   help="random mixed policies measured whole, to calibrate and validate projections (default 8)")
    p.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency measurement")
    p.add_argument("--latency-budget", type=float, default=None, metavar="SECONDS",
                   help="most seconds for the latency measurement; layers not timed by then are recorded as not "
                        "measured (default: no limit)")
    p.add_argument("--latency-method", choices=("profile", "pairs"), default="profile",
                   help="per-layer latency from one profiled run of each uniform model (profile, default) or from one "
                        "single-layer model per layer and format timed against FP32 (pairs: slower, the check)")
    p.add_argument("--verify-policies", type=int, default=4, metavar="K",
                   help="verify the uniform policies and K of the random mixed ones in onnxruntime, so projections "
                        "are fitted to the model as shipped (default 4; 0: projections stay the engine's)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="most jobs per unit of work and of persistence (default: 8 serial; process|ray cut at least 8 "
                        "chunks of balanced cost, 3 per worker beyond that)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_analyze_flags(args) -> None:
    """Flags the engine checks only with a plain ValueError or RuntimeError (a caller's bug in the
    Python API); on the command line they are bad input that names the flag."""
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be at least 1")
    g = args.group_size
    if g is not None and (g < 2 or g & (g - 1)):
        raise UsageError(f"--group-size {g}: must be a power of two >= 2")
    if args.verify_policies < 0:
        raise UsageError(f"--verify-policies {args.verify_policies}: must be 0 or more")
    if args.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray: Ray is not installed (pip install 'quantlens[ray]')")
    b = args.latency_budget
    if b is not None:
        if not (math.isfinite(b) and b > 0):
            raise UsageError(f"--latency-budget {b:g}: must be a positive number of seconds")
        if args.no_latency:
            raise UsageError("--latency-budget: nothing to budget with --no-latency")
    output_folder(args.out, "--out")
    if args.weights:
        input_file(args.weights, "a state dict file", "--weights")


def task_options(items: list[str]) -> dict[str, str]:
    """``--task-option KEY=VALUE`` items as a dict; a malformed or repeated item is one line naming it."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key or any(c.isspace() for c in key):
            raise UsageError(f"--task-option {item!r}: expected KEY=VALUE")
        if key in out:
            raise UsageError(f"--task-option {key}: given twice ({out[key]!r} and {value!r})")
        out[key] = value
    return out


def _cmd_analyze(args) -> int:
    from analysis.engine.allocator import keep_freed_memory
    from analysis.api import analyze

    keep_freed_memory()

    from analysis.models.loading import DEMO_TASKS, ModelError

    task = args.task or DEMO_TASKS.get(args.model)
    if task is None:
        if args.model.startswith("demo:"):
            raise ModelError(f"unknown demo model '{args.model}'; known: {', '.join(DEMO_TASKS)}")
        raise UsageError("--task: required for models other than the demos")
    _check_analyze_flags(args)
    # the engine's own options, passed only when given
    extra = {k: v for k, v in (("task_options", task_options(args.task_option)), ("output", args.output)) if v}
    run = analyze(args.model, task, args.out, formats=args.formats, calib=args.calib, seed=args.seed,
                  observer=args.observer, group_size=args.group_size, metric=args.metric, weights=args.weights,
                  incremental=not args.no_incremental, overwrite=args.overwrite, threads=args.threads,
                  progress=not args.quiet, executor=args.executor, workers=args.workers,
                  ray_address=args.ray_address, resume=args.resume, chunk_size=args.chunk_size,
                  random_policies=args.random_policies, latency=not args.no_latency,
                  verify_policies=args.verify_policies, latency_budget=args.latency_budget,
                  latency_method=args.latency_method, **extra)
    print(summary(run))
    print(f"wrote {run.path}")
    return 0


def summary(run) -> str:
    """A plain-text table of a Run: baseline, uniform formats, the most sensitive layers."""
    m = run.meta
    name = m["metric"]["name"]
    lines = [f"model {m['model']['name']} ({m['model']['params']:,} params, {m['model']['n_layers']} quantizable layers), "
             f"task {m['data']['task']} ({m['data']['n_eval']} eval samples), sweep path {m['sweep']['path']} "
             f"in {m['sweep']['seconds']:.1f} s",
             f"{'policy':<12} {name:>10} {m['metric']['loss']:>14} {'size MB':>9}",
             f"{'fp32':<12} {m['baseline']['metric']:>10.4f} {m['baseline']['loss']:>14.5f} {m['baseline']['bytes'] / 1e6:>9.3f}"]
    if m["metric"].get("chosen_because"):
        lines.insert(1, f"metric {name}, as {m['metric']['chosen_because']}")
    for fmt, u in m["uniform"].items():
        note = f"  ({len(u['skipped_layers'])} layer(s) kept fp32)" if u["skipped_layers"] else ""
        lines.append(f"{'all-' + fmt:<12} {u['metric']:>10.4f} {u['loss']:>14.5f} {u['bytes'] / 1e6:>9.3f}{note}")
    s, with_kl = most_sensitive_rows(run)
    worse = "drop" if run.higher_is_better else "rise"
    lines.append(f"most sensitive (largest {name} {worse} with only that layer quantized"
                 f"{'; ties by KL to fp32' if with_kl else ''}):")
    for _, r in s.iterrows():
        kl = f"  KL {r['kl']:.2e}" if with_kl else ""
        lines.append(f"  {r['layer']:<24} {r['format']:<8} {name} {r['metric_delta']:+.4f}{kl}  "
                     f"output SQNR {r['output_sqnr_db']:.1f} dB")
    outputs = m["model"].get("outputs") or {}
    compared = [o for o in outputs.get("outputs", []) if o.get("compared")]
    if compared and (len(outputs["outputs"]) > 1 or any(o.get("batch_axis") not in (0, None) for o in compared)):
        lines.append("compared: " + ", ".join(f"{o['name']} ({', '.join(map(str, o['shape']))})" for o in compared)
                     + f" ({outputs.get('elements_per_sample')} values per sample)")
    for note in outputs.get("notes", []):
        lines.append(f"outputs: {note}")
    missing = m["model"].get("not_analysed") or []
    if missing:
        lines.append(f"not analysed ({len(missing)} layer(s), FP32 in every policy): "
                     + "; ".join(f"{x['layer']}: {x['reason']}" for x in missing[:5]) + (" ..." if len(missing) > 5 else ""))
    untimed = (m.get("latency") or {}).get("not_measured")
    if untimed:
        lines.append(f"latency: {untimed['reason']}; a policy that quantizes any of the other {untimed['count']} "
                     f"(layer, format) pairs has no projected latency")
    return "\n".join(lines)


def most_sensitive_rows(run, n: int = 5):
    """The ``n`` measured (layer, format) rows that moved the Run's metric most the wrong way, and whether KL
    (where the metric has one, finite on every row) breaks ties; otherwise the loss change does."""
    s = run.sensitivity[run.sensitivity["status"] == "ok"]
    harm = -s["metric_delta"] if run.higher_is_better else s["metric_delta"]
    with_kl = len(s) > 0 and bool(s["kl"].notna().all()) and bool(s["kl"].map(math.isfinite).all())
    tie = s["kl"] if with_kl else s["loss_delta"]
    ranked = s.assign(_harm=harm, _tie=tie).sort_values(["_harm", "_tie"], ascending=False, kind="stable")
    return ranked.head(n).drop(columns=["_harm", "_tie"]), with_kl


def _add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="serve the dashboard on one or more Runs")
    p.add_argument("runs", nargs="*", help="Run folders (default: every Run under ./runs)")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")


def _cmd_dashboard(args) -> int:
    from analysis.store.run import RunError, load_run
    from dashboard.serve import serve

    runs = args.runs or sorted(str(p.parent) for p in Path("runs").glob("*/run.json"))
    if not runs:
        raise UsageError("no Run given and none found under ./runs (run `quantlens analyze` or `quantlens demo` first)")
    for r in runs:
        load_run(r)  # a bad folder is a one-line error here, not in the browser
    return serve(runs, port=args.port, host=args.host)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report (or a Markdown summary) of a Run",
                       description="One HTML file that opens offline: provenance, sensitivity, frontier, the chosen "
                                   "policy with in-page toggles, histograms, the projection's validation.")
    p.add_argument("run", help="Run folder")
    p.add_argument("--policy", default=None, help="policy JSON to show (default: the best known policy)")
    p.add_argument("--format", choices=("html", "md"), default="html", help="html (default) or md (pull-request summary)")
    p.add_argument("--out", required=True, help="file to write")


def _cmd_report(args) -> int:
    from analysis.store.policy import PolicyError, from_json
    from analysis.report.render import write_report
    from analysis.store.run import load_run

    output_file(args.out, "--out")
    run = load_run(args.run)
    policy = None
    if args.policy:
        if not input_file(args.policy, "a policy file", "--policy").is_file():
            raise PolicyError(f"{args.policy}: no such policy file")
        try:
            policy = from_json(Path(args.policy).read_bytes())
        except PolicyError as e:
            raise PolicyError(f"{args.policy}: {e}") from None
    source = Path(args.policy).name if args.policy else None
    try:
        out = write_report(run, args.out, fmt=args.format, policy=policy, policy_source=source)
    except PolicyError as e:  # a policy for another model: refused as apply and verify refuse it
        raise PolicyError(f"{args.policy}: {e}") from None
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


def _add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="zip a Run into one .qlrun file to share",
                       description="A zip of run.json and the tables (no model weights unless --with-model).")
    p.add_argument("run", help="Run folder")
    p.add_argument("--out", required=True, help="bundle file to write (e.g. run.qlrun)")
    p.add_argument("--with-model", action="store_true", help="include the model file (.onnx / .safetensors)")


def _cmd_bundle(args) -> int:
    from analysis.store.bundle import write_bundle

    output_file(args.out, "--out")
    out = write_bundle(args.run, args.out, with_model=args.with_model)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    return 0


COMMANDS = {"analyze": (_add_analyze, _cmd_analyze), "demo": (add_demo, cmd_demo),  # analysis/cli/demo_verb.py
            "dashboard": (_add_dashboard, _cmd_dashboard),
            "report": (_add_report, _cmd_report), "bundle": (_add_bundle, _cmd_bundle)}
register_runtime_verbs(COMMANDS)  # apply, verify (analysis/cli/runtime_verbs.py)
register_search_verb(COMMANDS)  # search (analysis/cli/search_verb.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantlens", description="Which layers can go to INT8 or INT4, and what it costs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


# a file or folder the user named is missing, of the wrong kind or not theirs to write: their mistake,
# not ours; every other OSError (disk full, a broken mount) keeps its traceback
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
# the Run folder whose quantlens.log takes a verb's library chatter (analysis/cli/library_log.py)
LOGGED_RUN_ARG = {"analyze": "out", "apply": "run", "verify": "run", "search": "run", "report": "run"}


def _os_error_line(e: OSError) -> str:
    return f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a non-UTF-8 file name prints as an escape, never fails the verb
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 on a bad flag
    log, said = None, False
    run_arg = LOGGED_RUN_ARG.get(args.command)
    try:
        with library_log(args.command, getattr(args, run_arg)) if run_arg else contextlib.nullcontext() as log:
            return COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        hint = " (finished jobs are saved: rerun with --resume)" if args.command == "analyze" else ""
        said = _say(f"quantlens {args.command}: interrupted{hint}", log)
        return 130
    except RuntimeError as e:
        from analysis.engine.executors import ExecutorError

        if not isinstance(e, ExecutorError):
            raise
        said = _say(f"quantlens {args.command}: error: {e}", log)
        return 1
    except InputError as e:
        said = _say(f"quantlens {args.command}: error: {e}", log)
        return 2
    except USER_OS_ERRORS as e:
        said = _say(f"quantlens {args.command}: error: {_os_error_line(e)}", log)
        return 2
    finally:
        if log is not None and log.path is not None and not said:
            print(f"note: library warnings and messages are in {log.path}", file=sys.stderr)


def _say(line: str, log) -> bool:
    """Print the verb's one error line, naming the log of library messages in it when there is one."""
    where = f" (library messages: {log.path})" if log is not None and log.path is not None else ""
    print(line + where, file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
