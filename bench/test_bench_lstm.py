"""LSTM: fastrnn against torch.nn, forward, backward and forward+backward timed separately."""

import pytest

from .conftest import PHASES, PROVIDERS, config_id, configs, run_benchmark

CONFIGS = configs("LSTM")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_bench_lstm(benchmark, environment, config, provider, phase):
    run_benchmark(benchmark, environment, config, provider, phase)
