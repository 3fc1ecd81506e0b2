"""Time every kernel strategy over (cell, hidden size, batch, dtype) on a GPU: the measurements
``fastrnn.ops.select`` is tuned from.

    python bench/tune_strategies.py --out strategies.json [--max-seconds 60]

For each problem it times fastrnn's forward (inference) and training step under each strategy
that can run it on this GPU (``dispatch.plan``), and torch.nn beside them, and prints the fastest
strategy per problem and what selection picks. The JSON holds every measurement, with the device,
versions and commit. ``--max-seconds`` stops starting new problems after that long.
"""

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn import _modes  # noqa: E402
from fastrnn import bench as fb  # noqa: E402
from fastrnn.ops import dispatch, select  # noqa: E402

MODES = {"LSTM": _modes.LSTM, "GRU": _modes.GRU, "RNN_TANH": _modes.RNN_TANH}


def applicable(mode: str, H: int, B: int, dtype: torch.dtype, device) -> list[str]:
    problem = select.Problem(MODES[mode], B, H, H, 1, dtype, select.precision(dtype, device))
    return [s for s, why in dispatch.why_not(problem, select.describe(device)).items()
            if why is None]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", default="64,128,256,512,1024")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--modes", default="LSTM,GRU,RNN_TANH")
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--max-seconds", type=float, default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_strategies.py measures on a CUDA GPU")
    device = torch.device("cuda")
    env = fb.environment(device)
    records = []
    start = time.perf_counter()

    def save():
        with open(a.out, "w") as f:
            json.dump({**env, "records": records}, f, indent=1)

    for mode, H, B, dtype in itertools.product(
            a.modes.split(","), map(int, a.hidden.split(",")), map(int, a.batch.split(",")),
            a.dtypes.split(",")):
        if a.max_seconds is not None and time.perf_counter() - start > a.max_seconds:
            print(f"stopped after {a.max_seconds} s", flush=True)
            break
        config = fb.Config("tune", mode, a.T, B, H, H, dtype=dtype)
        torch_dtype = getattr(torch, dtype)
        chosen = dispatch.select_strategy(MODES[mode], H, H, B, torch_dtype, device)
        best = {}
        for strategy in applicable(mode, H, B, torch_dtype, device) + ["torch.nn"]:
            provider = "torch.nn" if strategy == "torch.nn" else "fastrnn"
            try:
                case = fb.build_case(config, provider, device)
                for phase, fn in (("fwd", case.forward), ("fwd+bwd", case.step)):
                    with dispatch.force_strategy(None if strategy == "torch.nn" else strategy):
                        ms = fb.time_ms(fn, device, budget_s=a.budget)
                    records.append({"mode": mode, "H": H, "B": B, "T": a.T, "dtype": dtype,
                                    "strategy": strategy, "chosen": chosen, "phase": phase,
                                    "median_ms": ms})
                    if strategy != "torch.nn" and (phase not in best or ms < best[phase][1]):
                        best[phase] = (strategy, ms)
            except Exception as e:  # recorded, and the sweep goes on
                records.append({"mode": mode, "H": H, "B": B, "T": a.T, "dtype": dtype,
                                "strategy": strategy, "chosen": chosen,
                                "error": f"{type(e).__name__}: {str(e)[:200]}"})
        save()
        print(f"{mode:<9} H={H:<5} B={B:<4} {dtype:<9} chosen {chosen:<12} fastest " + "  ".join(
            f"{ph}: {s} {ms:.3f} ms" for ph, (s, ms) in best.items()), flush=True)
    save()


if __name__ == "__main__":
    main()
