"""Time every kernel strategy over (cell, hidden size, batch, dtype) on a GPU: the measurements
that ``fastrnn.select_strategy`` is tuned from.

    python bench/tune_strategies.py --out bench/results/strategies-<device>-<date>.json

For each problem it times fastrnn's forward (inference) and training step under each strategy
that applies, and torch.nn beside them, and prints the fastest strategy per problem. The JSON
holds every measurement, with the device, versions and commit.
"""

import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastrnn import bench as fb  # noqa: E402
from fastrnn import force_strategy  # noqa: E402
from fastrnn.ops import cooperative  # noqa: E402
from fastrnn import _modes  # noqa: E402

MODES = {"LSTM": _modes.LSTM, "GRU": _modes.GRU, "RNN_TANH": _modes.RNN_TANH}


def applicable(mode, H, B, device):
    out = ["stepwise"]
    if _modes.NUM_GATES[MODES[mode]] * max(16, H) ** 2 <= 4 * 16384:  # up to 2x the default cut
        out.append("persistent")
    if cooperative.plan(MODES[mode], H, H, B, 1, device) is not None:
        out.append("cooperative")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", default="32,64,128,256,512,1024")
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--budget", type=float, default=0.15)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_strategies.py measures on a CUDA GPU")
    device = torch.device("cuda")
    env = fb.environment(device)
    records = []
    for mode, H, B, dtype in itertools.product(
            MODES, map(int, a.hidden.split(",")), map(int, a.batch.split(",")),
            a.dtypes.split(",")):
        config = fb.Config("tune", mode, a.T, B, H, H, dtype=dtype)
        best = {}
        for strategy in applicable(mode, H, B, device) + ["torch.nn"]:
            provider = "torch.nn" if strategy == "torch.nn" else "fastrnn"
            case = fb.build_case(config, provider, device)
            for phase, fn in (("fwd", case.forward), ("fwd+bwd", case.step)):
                with force_strategy(None if strategy == "torch.nn" else strategy):
                    ms = fb.time_ms(fn, device, budget_s=a.budget)
                records.append({"mode": mode, "H": H, "B": B, "T": a.T, "dtype": dtype,
                                "strategy": strategy, "phase": phase, "median_ms": ms})
                if strategy != "torch.nn" and (phase not in best or ms < best[phase][1]):
                    best[phase] = (strategy, ms)
        print(f"{mode:<9} H={H:<5} B={B:<4} {dtype:<9} " + "  ".join(
            f"{ph}: {s} {ms:.3f} ms" for ph, (s, ms) in best.items()), flush=True)
    with open(a.out, "w") as f:
        json.dump({**env, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
