"""Command line: ``python -m fastrnn bench`` and ``python -m fastrnn parity``.

Without a CUDA GPU the kernels run in Triton's CPU interpreter, which has to be switched on
before triton is imported (importing fastrnn imports it): so the command restarts itself with
``TRITON_INTERPRET=1`` set.
"""

import argparse
import os
import sys


def _ensure_runnable() -> None:
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "fastrnn", *sys.argv[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("parity", help="parity of outputs and gradients with torch.nn on this device")
    bench = sub.add_parser("bench", help="parity and speed against torch.nn, side by side: "
                                         "tables, JSON, CSV and a PNG plot")
    bench.add_argument("--grid", action="append", default=None,
                       help="a named grid (repeatable): fastrnns, cudnn-sample, haste, flashrnn, "
                            "small-batch, variants, smoke; default: all but smoke on a GPU, "
                            "smoke on the CPU")
    bench.add_argument("--out", default="fastrnn-bench", help="folder for the JSON, CSV and PNG")
    bench.add_argument("--budget", type=float, default=0.25,
                       help="seconds of repetitions per measurement (after warm-up)")
    bench.add_argument("--no-parity", action="store_true",
                       help="skip the gradient parity report that runs first")
    args = parser.parse_args(argv)
    _ensure_runnable()
    if args.command == "parity":
        from .parity import report

        rows = report()
        return 0 if all(r["ok"] for r in rows) else 1
    if args.command == "bench":
        from .bench import GRIDS, run
        from .parity import report

        for grid in args.grid or ():
            if grid not in GRIDS:
                parser.error(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
        ok = True
        if not args.no_parity:
            ok = all(r["ok"] for r in report())
            print()
        run(args.grid, out_dir=args.out, budget_s=args.budget)
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
