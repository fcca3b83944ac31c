"""The ``search`` verb: the best policy under a budget, written as a policy file."""
from __future__ import annotations

import sys
from pathlib import Path

from analysis.cli.paths import output_file


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="find the best mixed-precision policy under a budget",
                       description="Exact optimum of the Run's projection (mixed-integer program): the best projected "
                                   "metric within a size or latency budget, or the smallest / fastest model within "
                                   "a metric drop.")
    p.add_argument("run", help="Run folder")
    g = p.add_argument_group("budget (at least one)")
    g.add_argument("--max-size-mb", type=float, default=None, help="model size budget in MB (10^6 bytes)")
    g.add_argument("--max-latency-ms", type=float, default=None, help="end-to-end latency budget (needs measured latency)")
    g.add_argument("--max-drop", type=float, default=None,
                   help="largest projected metric drop from FP32, in metric units (0.01 = one point of accuracy)")
    p.add_argument("--minimize", choices=("size", "latency"), default="size", help="with --max-drop alone (default size)")
    p.add_argument("--no-groups", action="store_true", help="let layers that read one tensor take different formats")
    p.add_argument("--allow-slower", action="store_true",
                   help="also consider policies projected slower than FP32 (left out by default where latency was measured)")
    p.add_argument("--out", required=True, help="policy JSON to write")


def _cmd_search(args) -> int:
    from analysis.store.atomic import write_text_atomic
    from analysis.store.policy import FORMAT_CODE, policy_from_codes
    from analysis.project.projection import Projector
    from analysis.store.run import load_run
    from analysis.project.groups import coupled_groups
    from analysis.project.search import SearchError, best_policy

    if args.max_size_mb is None and args.max_latency_ms is None and args.max_drop is None:
        raise SearchError("give a budget: --max-size-mb, --max-latency-ms or --max-drop")
    output_file(args.out, "--out")
    run = load_run(args.run)
    if run.status != "complete":
        print(f"note: the Run is {run.status}; searching over the jobs finished so far", file=sys.stderr)
    p = Projector(run)
    res = best_policy(p, max_bytes=None if args.max_size_mb is None else args.max_size_mb * 1e6,
                      max_latency_ms=args.max_latency_ms, max_drop=args.max_drop, minimize=args.minimize,
                      groups=None if args.no_groups else coupled_groups(run), allow_slower=args.allow_slower)
    policy = policy_from_codes(run, res.codes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, policy.to_json())
    pr = res.projection
    m = run.meta["metric"]["name"]
    band = f" ± {pr.band:.4f}" if pr.band is not None else " (error unknown: no measured policy to validate against)"
    counts = {f: int((res.codes == FORMAT_CODE[f]).sum()) for f in p.formats}
    lat = f", latency {pr.latency_ms:.3f} ms" if pr.latency_ms is not None else ""
    print(f"projected {m} {pr.metric:.4f}{band} (fp32 {run.meta['baseline']['metric']:.4f}); size "
          f"{pr.bytes / 1e6:.3f} MB ({pr.size_ratio:.2f}x smaller){lat}; layers: "
          + ", ".join(f"{n} {f}" for f, n in counts.items()))
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    if pr.extrapolated:
        print("note: beyond every measured point; verify it (quantlens verify) before trusting the number", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def register(commands: dict) -> None:
    commands["search"] = (_add_search, _cmd_search)
