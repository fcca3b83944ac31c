"""The ``apply`` and ``verify`` verbs: a policy becomes a real quantized ONNX model, then a measurement."""
from __future__ import annotations

import sys

from analysis.cli.paths import input_file, output_file


def _add_apply(sub) -> None:
    p = sub.add_parser("apply", help="write the quantized ONNX model for a policy",
                       description="Build a quantized ONNX model (onnxruntime integer kernels) for POLICY on the "
                                   "Run's model. The model and its data must be at hand.")
    p.add_argument("run", help="Run folder")
    p.add_argument("policy", help="policy JSON (quantlens.policy/1)")
    p.add_argument("--out", required=True, help="the .onnx file to write")


def _cmd_apply(args) -> int:
    from analysis.runtime.verify import apply_policy

    input_file(args.policy, "a policy file")
    output_file(args.out, "--out")
    a = apply_policy(args.run, args.policy, args.out)
    for note in a.notes:
        print(f"note: {note}", file=sys.stderr)
    counts: dict[str, int] = {}
    for k in a.kernels.values():
        counts[k] = counts.get(k, 0) + 1
    n_fp32 = sum(1 for f in a.formats.values() if f == "fp32")
    print(f"wrote {a.path} ({a.file_bytes / 1e6:.3f} MB): " + ", ".join(f"{n}x {k}" for k, n in sorted(counts.items()))
          + f", {n_fp32} layer(s) fp32")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="measure a policy's metric, size and latency in onnxruntime",
                       description="Apply POLICY, run it in onnxruntime on the Run's evaluation data, and store the "
                                   "measurement in the Run's policies table beside the projection.")
    p.add_argument("run", help="Run folder")
    p.add_argument("policy", help="policy JSON (quantlens.policy/1)")
    p.add_argument("--name", default=None, help="name of the stored row (default verified-N; same name replaces)")
    p.add_argument("--kind", choices=("user", "search"), default="user")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _cmd_verify(args) -> int:
    from analysis.store.run import load_run
    from analysis.api import verify_policy

    input_file(args.policy, "a policy file")
    run = load_run(args.run)
    say = None if args.quiet else (lambda s: print(f"verify: {s}", file=sys.stderr))
    r = verify_policy(run, args.policy, say, name=args.name, kind=args.kind, threads=args.threads)
    for note in r["notes"]:
        print(f"note: {note}", file=sys.stderr)
    m = run.meta["metric"]["name"]
    band = r["projected_band"]
    proj = (f"projected {r['projected_metric']:.4f}" + (f" ± {band:.4f}" if band == band else "")
            if r["projected_metric"] == r["projected_metric"] else "no projection")
    print(f"{r['name']}: {m} {r['metric']:.4f} measured ({proj}); size {r['bytes'] / 1e6:.3f} MB "
          f"(fp32 {run.meta['baseline']['bytes'] / 1e6:.3f} MB); latency {r['latency_ms']:.3f} ms "
          f"(fp32 {r['fp32_latency_ms']:.3f} ms, same run); {r['measured_on']}")
    print(f"stored in {run.path / 'policies.parquet'}")
    return 0


def register(commands: dict) -> None:
    """Add the verbs to the CLI's command table (``{name: (add_parser, handler)}``)."""
    commands["apply"] = (_add_apply, _cmd_apply)
    commands["verify"] = (_add_verify, _cmd_verify)
