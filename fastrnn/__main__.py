"""python -m fastrnn: check and measure fastrnn against torch.nn on this machine.

Without a CUDA GPU the kernels run in Triton's CPU interpreter, which has to be switched on
before triton is imported (importing fastrnn imports it): so the command restarts itself with
``TRITON_INTERPRET=1`` set.
"""

import argparse
import json
import os
import sys

# Triton 3.9 asks for an explicit choice; fastrnn's kernels are built and checked with fusion on.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

DESCRIPTION = """\
fastrnn: drop-in torch.nn.RNN / LSTM / GRU on fused Triton kernels.

commands:
  parity    forward outputs and every gradient against torch.nn, with the error of each
            against a float64 reference, on this device
  bench     the parity report, then speed against torch.nn side by side: tables, JSON, CSV
            and a PNG plot (the main job)
  explain   which kernels a layer runs on a given GPU, with their tiles and resources

Without a GPU the kernels run in Triton's CPU interpreter (slowly): the reports then check that
everything works, and time nothing of fastrnn's."""

EPILOG = """\
examples:
  python -m fastrnn bench
  python -m fastrnn bench --grid fastrnns --grid flashrnn --out results/
  python -m fastrnn explain --mode LSTM --input-size 512 --hidden-size 1024 --batch 64 \\
      --seq-len 100 --dtype bf16 --gpu H100"""


def _ensure_runnable() -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "fastrnn", *sys.argv[1:]])


def _parser() -> argparse.ArgumentParser:
    from .bench import GRIDS

    parser = argparse.ArgumentParser(prog="python -m fastrnn", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    parity = sub.add_parser("parity", help="parity of outputs and gradients with torch.nn")
    parity.add_argument("--json", default=None, metavar="PATH", help="also write the rows here")
    parity.add_argument("--jsonl", default=None, metavar="PATH",
                        help="append each row here as it completes (one JSON object per line)")
    bench = sub.add_parser("bench", help="parity, then speed against torch.nn (the main job)")
    bench.add_argument("--grid", action="append", default=None, choices=list(GRIDS),
                       help="a named grid (repeatable); default: all but smoke on a GPU, smoke "
                            "on the CPU")
    bench.add_argument("--out", default="fastrnn-bench", metavar="DIR",
                       help="folder for the JSON, CSV and PNG (default: %(default)s)")
    bench.add_argument("--budget", type=float, default=0.25, metavar="SECONDS",
                       help="repetitions per measurement after warm-up (default: %(default)s)")
    bench.add_argument("--max-minutes", type=float, default=None, metavar="M",
                       help="skip the configurations that would start after M minutes (they "
                            "appear as skipped rows)")
    bench.add_argument("--no-parity", action="store_true",
                       help="skip the parity report that runs first")
    bench.add_argument("--suite", default=None, metavar="LINE",
                       help="the test suite's summary line, stored in the JSON")
    from .explain import add_arguments

    add_arguments(sub.add_parser("explain", help="the kernels, tiles and resources of a layer "
                                                 "on a named GPU"))
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "explain":
        from .explain import main as explain_main

        return explain_main(args)
    _ensure_runnable()
    if args.command == "parity":
        from .parity import report, write_json

        def sink(row, path=args.jsonl):
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

        rows = report(sink=sink)
        if args.json:
            write_json(rows, args.json)
        return 0 if all(r["ok"] for r in rows) else 1
    from .bench import run
    from .parity import report

    ok = True
    if not args.no_parity:
        ok = all(r["ok"] for r in report())
        print()
    run(args.grid, out_dir=args.out, budget_s=args.budget, max_minutes=args.max_minutes,
        suite=args.suite)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
