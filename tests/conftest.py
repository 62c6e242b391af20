"""Shared pytest set-up: CPU only, seeded, quiet MXNet."""
import os
import random

import numpy as np
import pytest

os.environ.setdefault("MXNET_ENGINE_TYPE", "ThreadedEnginePerDevice")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Seed python, numpy and mxnet per test; the seed is shown when a test fails."""
    seed = int(os.environ.get("TEST_SEED", "1234"))
    random.seed(seed)
    np.random.seed(seed)
    import mxnet as mx
    mx.random.seed(seed)
    yield
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(f"test seed: {seed} (set TEST_SEED to reproduce)")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
