"""Shared machinery of the pytest-benchmark suites (test_bench_<cell>.py).

Each benchmark times one phase of one provider on one configuration, with
``torch.cuda.synchronize()`` inside the timed function and warm-up rounds excluded; the GPU,
torch, triton and cuDNN versions go into ``extra_info``. Without a GPU the suites are a smoke
check: tiny shapes under the Triton interpreter, meant for ``--benchmark-disable``.

    python -m pytest bench --benchmark-only            # on a GPU
    python -m pytest bench --benchmark-disable         # smoke check (CI)
"""

import dataclasses

import pytest
import torch

from fastrnn import bench as fb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS = ("fastrnn", "torch.nn")
PHASES = ("fwd", "bwd", "fwd+bwd")


def configs(mode: str) -> list:
    """A few expert-recognised points per cell type on a GPU; tiny shapes without one."""
    if DEVICE.type != "cuda":
        return [c for c in fb.GRIDS["smoke"]() if c.mode == mode][:1]
    picks = []
    for grid in ("fastrnns", "cudnn-sample", "flashrnn", "small-batch", "haste", "variants"):
        found = [c for c in fb.GRIDS[grid]() if c.mode == mode]
        picks += found[:1]
    return picks


def config_id(config) -> str:
    return f"{config.grid}:{config.label().replace(' ', '-')}"


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.fixture(scope="session")
def environment():
    return fb.environment(DEVICE)


def run_benchmark(benchmark, environment, config, provider, phase):
    if phase != "fwd" and "fwd+bwd" not in config.phases:
        pytest.skip(f"{config.grid} is an inference grid")
    case = fb.build_case(config, provider, DEVICE)
    benchmark.group = f"{config.grid}:{config.label()}:{phase}"
    benchmark.extra_info.update({k: environment[k] for k in (
        "device", "torch", "triton", "cudnn", "commit", "fp32_tf32") if k in environment})
    benchmark.extra_info.update(dataclasses.asdict(config))
    benchmark.extra_info.update(provider=provider, phase=phase)
    rounds, warmup = (20, 3) if DEVICE.type == "cuda" else (1, 0)
    if phase == "fwd":
        def fwd():
            case.forward()
            _sync()
        benchmark.pedantic(fwd, rounds=rounds, warmup_rounds=warmup, iterations=1)
    elif phase == "bwd":
        def setup():  # the forward that builds the graph is not timed
            outs = case.forward_for_backward()
            _sync()
            return (outs,), {}

        def bwd(outs):
            case.backward(outs)
            _sync()
        benchmark.pedantic(bwd, setup=setup, rounds=rounds, warmup_rounds=warmup)
    else:
        def step():
            case.step()
            _sync()
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    if phase != "fwd":  # the timed function really ran backward
        assert all(p.grad is not None for p in case.module.parameters())
