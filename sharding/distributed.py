"""Multi-host runs on JAX's own distributed runtime (TPU pod slices, GPU clusters).

Every host runs the same command; `jax.distributed.initialize` connects them, after
which `jax.devices()` lists the devices of all hosts and one mesh spans them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from jft.errors import JftError

# What jax.distributed.initialize raises when auto-detection finds no cluster.
_NOTHING_DETECTED = "coordinator_address should be defined."


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the cluster; True when there are several processes.

    With no arguments, JAX detects the cluster (Cloud TPU pod slices, SLURM, Open MPI,
    Kubernetes, or JAX_COORDINATOR_ADDRESS and friends in the environment); finding
    none means a single-process run. Explicit arguments must come all together.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise JftError("--coordinator-address, --num-processes and --process-id go together; "
                       "give all three, or none to let JAX detect the cluster")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as error:
        if coordinator_address is None and str(error) == _NOTHING_DETECTED:
            return False
        raise JftError(f"jax.distributed.initialize failed: {error}") from None
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Process 0 writes logs, metrics and plots; every process joins the computation."""
    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """True on every process when it is True on any (a SIGTERM that reached one host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array(flag))))


def from_main(value: bool) -> bool:
    """Process 0's value, on every process."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.array(value)))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
