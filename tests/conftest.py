"""Suite-wide conventions: `gpu` tests run only where CUDA is, everything else on the CPU."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster per test module, sized like this 2-core machine (actors ask for
    fractional CPUs); torn down afterwards so modules do not share actors or state."""
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another cluster
    yield
    ray.shutdown()
