"""Starting (or joining) Ray for pipeline stages.

Local by default, with bounded CPUs and no dashboard, so a scheduled run on a shared machine
takes only what it is given. When `RAY_ADDRESS` is set (`ray job submit` sets it, or export it
by hand), the stages join that cluster instead and Ray Data spreads the work over its nodes.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("pipelines")

DEFAULT_LOCAL_CPUS = 2


def ensure_ray(num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it is already initialised.

    Args:
        num_cpus: CPUs of the local instance (default 2, or MUSE_RAY_CPUS); ignored on a cluster.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    else:
        cpus = num_cpus or int(os.environ.get("MUSE_RAY_CPUS", DEFAULT_LOCAL_CPUS))
        log.info("starting a local Ray instance with %d CPUs", cpus)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    # Block order in, block order out: scoring output files are then the same on every run.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
