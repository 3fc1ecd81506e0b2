"""Command line: ``python -m fastrnn parity``.

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
    args = parser.parse_args(argv)
    _ensure_runnable()
    if args.command == "parity":
        from .parity import report

        rows = report()
        return 0 if all(r["ok"] for r in rows) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
