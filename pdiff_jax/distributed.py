"""Multi-process start-up: the one place that calls `jax.distributed.initialize`.

Single-process runs skip it. With an explicit coordinator (flags or the PDIFF_COORDINATOR /
PDIFF_NUM_PROCESSES / PDIFF_PROCESS_ID environment variables) every process joins it; on Cloud
TPU, Slurm and Kubernetes, `PDIFF_DISTRIBUTED=auto` lets JAX find the cluster by itself.
On CPU the processes talk through gloo collectives.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  coordinator_address = coordinator_address or os.environ.get("PDIFF_COORDINATOR") or None
  if num_processes is None and os.environ.get("PDIFF_NUM_PROCESSES"):
    num_processes = int(os.environ["PDIFF_NUM_PROCESSES"])
  if process_id is None and os.environ.get("PDIFF_PROCESS_ID"):
    process_id = int(os.environ["PDIFF_PROCESS_ID"])
  auto = os.environ.get("PDIFF_DISTRIBUTED", "") == "auto"
  if coordinator_address is None and not auto:
    return
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs --num_processes and --process_id "
                     "(or PDIFF_NUM_PROCESSES and PDIFF_PROCESS_ID)")
  if coordinator_address is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is not in 0 .. {num_processes - 1} (--num_processes)")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used by the CPU backend only
  if auto:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  log.info("process %d of %d; %d local / %d global devices (%s)", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count(),
           jax.devices()[0].device_kind)
