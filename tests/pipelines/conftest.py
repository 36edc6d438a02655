import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for all pipeline tests (starting Ray costs seconds and ~1.5 GB)."""
    import ray

    from pipelines.ray_runtime import ensure_ray

    # Ray workers import the stand-in stages and scorers of this folder by module name.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()
