"""Data parallelism over every device and JAX's multi-host runtime.

One mesh axis, ``data``, with ``AxisType.Auto`` (DESIGN.md "Sharding": the ViT fails under
Explicit axes). A batch is split along it; parameters and optimiser states are replicated. A
step compiled with ``jax.jit`` follows the shardings of its inputs, so the same step runs
data-parallel when its batch is sharded and its parameters replicated: XLA partitions the
computation and all-reduces the gradients. The global batch stays the configured batch, so a run
equals the single-device run up to float reassociation.

``config.mesh.data`` chooses the mesh: ``-1`` every device (the default), ``1`` one device (no
placement at all: the single-device code path), ``n`` the first ``n`` local devices.

Several processes (hosts) run one program on ``jax.distributed`` (``initialize``): every process
holds the whole mesh in its jitted computations, each reads only its own rows of a global batch
(``pipeline.PipelineConfig.shard_by_process``) and ``shard_batch(..., process_rows=True)`` makes
the global array from them. Only the primary process (index 0) writes files other than orbax
checkpoints, which every process saves collectively.

The functions here take and return arrays; with a one-device mesh they return their input, so
callers place data unconditionally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from oneshui_jax.errors import ConfigError

AXIS = "data"
_MESH: Mesh | None = None  # None: one device, nothing is placed


def mesh_size_for(data: int) -> int:
    """The number of devices ``config.mesh.data`` asks for (ConfigError if impossible)."""
    count = jax.device_count()
    if data == -1:
        return count
    if data < 1 and data != -1:
        raise ConfigError(f"config.mesh.data must be -1 (every device) or a positive number of "
                          f"devices, got {data}")
    if data > count:
        raise ConfigError(f"config.mesh.data={data} asks for more devices than there are "
                          f"({count}: {jax.devices()[0].platform}); use -1 for all of them")
    if jax.process_count() > 1 and data != count:
        raise ConfigError(f"config.mesh.data={data}: a run on {jax.process_count()} processes "
                          f"uses every device ({count}); use -1")
    return data


def setup(data: int = -1) -> Mesh | None:
    """Makes the mesh of ``config.mesh.data`` the current one; returns it (None: one device)."""
    global _MESH
    n = mesh_size_for(int(data))
    if n == 1:
        _MESH = None
    else:
        devices = np.asarray(jax.devices()[:n])
        _MESH = Mesh(devices, (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
        logging.info("data parallelism over %d %s devices (%d process%s)", n,
                     devices[0].platform, jax.process_count(),
                     "" if jax.process_count() == 1 else "es")
    return _MESH


def size() -> int:
    """Devices along the data axis (1 without a mesh)."""
    return 1 if _MESH is None else _MESH.devices.size


def check_batch_size(batch_size: int, what: str) -> None:
    """A ConfigError unless ``batch_size`` splits evenly over the mesh (and the processes)."""
    n = size()
    if batch_size % n:
        raise ConfigError(f"{what}={batch_size} does not split over the {n} devices of "
                          f"config.mesh.data; expected a multiple of {n} (or "
                          "--config.mesh.data=1)")


def replicated() -> NamedSharding | None:
    return None if _MESH is None else NamedSharding(_MESH, P())


def replicate(tree: Any) -> Any:
    """``tree`` with every array replicated over the mesh (unchanged without one)."""
    if _MESH is None:
        return tree
    sharding = replicated()
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    if jax.process_count() > 1:  # every process holds the same host value; each places its part
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.device_put(x, sharding)


def batch_sharding(ndim: int, axis: int = 0) -> NamedSharding | None:
    """The sharding that splits dimension ``axis`` of an ``ndim``-dimensional array."""
    if _MESH is None:
        return None
    return NamedSharding(_MESH, P(*([None] * axis + [AXIS] + [None] * (ndim - axis - 1))))


def shard_batch(batch: Any, *, axis: int = 0, process_rows: bool = False) -> Any:
    """``batch`` (a pytree of host arrays) split over the mesh along ``axis``.

    Leaves whose ``axis`` does not split evenly over the devices (a request's 5 portraits on 8
    devices) are replicated instead: correct, only not parallel. With ``process_rows`` each
    process passes its own rows of the global batch (``PipelineConfig.shard_by_process``), in
    process order; otherwise every process passes the whole batch.
    """
    if _MESH is None:
        return batch
    multi = process_rows and jax.process_count() > 1

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim <= axis:
            return _put(x, replicated())
        rows = x.shape[axis] * (jax.process_count() if multi else 1)
        if rows % size():
            if multi:
                raise ConfigError(f"a batch of {rows} rows does not split over the {size()} "
                                  "devices of the processes; expected a multiple")
            return _put(x, replicated())
        sharding = batch_sharding(x.ndim, axis)
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        return _put(x, sharding)

    return jax.tree.map(place, batch)


def to_host(tree: Any) -> Any:
    """Every array of ``tree`` as a numpy array holding its global value. On several processes
    the parts other processes hold are gathered (only what is passed: per-example outputs)."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(get, tree)


def gather_rows(x: np.ndarray, process_rows: bool) -> np.ndarray:
    """A host array of this process's rows of a global batch, as the global batch's rows (in
    process order); unchanged on one process or when every process holds every row."""
    if not process_rows or jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def local_value(x: Any) -> np.ndarray:
    """One copy of a replicated array on the host, without gathering it from other devices or
    processes (used to hash parameters); any other array is fetched whole."""
    if isinstance(x, jax.Array) and x.is_fully_replicated and len(x.addressable_shards):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------
# Several processes


def is_primary() -> bool:
    """True in the process that writes metadata, reports, plots and progress bars."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches ``name`` (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")


def distributed_settings(coordinator_address: str | None, num_processes: int | None,
                         process_id: int | None,
                         environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The arguments of ``jax.distributed.initialize``: the flags, else SLURM's variables.

    Explicit flags must come together (address, count and id); without them JAX reads the
    cluster from the environment (SLURM: ``SLURM_*``), and an environment it does not know is
    one ConfigError saying which flags to give.
    """
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    set_ = {k: v for k, v in given.items() if v is not None}
    if set_ and len(set_) < 3:
        missing = ", ".join(f"--{k}" for k in given if k not in set_)
        raise ConfigError(f"--distributed with explicit settings needs all three of "
                          f"--coordinator_address, --num_processes and --process_id; missing "
                          f"{missing}")
    if set_:
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes="
                              f"{num_processes})")
        return given
    if all(v in environ for v in SLURM_VARIABLES):
        return {}  # jax.distributed's SLURM cluster detection
    raise ConfigError("--distributed found no cluster: give --coordinator_address=HOST:PORT, "
                      "--num_processes and --process_id, or run under SLURM (srun)")


HEARTBEAT_TIMEOUT_S = 10  # a process silent this long is taken for dead and the others stop


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Joins the processes of a multi-host run (``jax.distributed.initialize``). On CPU the
    collectives go through gloo (``launch/local_multiprocess.sh`` runs P processes here).

    A process that dies (a crash, a kill, a lost host) stops sending heartbeats; after
    ``heartbeat_timeout_s`` the coordination service tells the others, which stop instead of
    waiting in a collective (JAX's default of 100 s made a crash look like a hang). A
    collective whose peer is gone fails at once (``main`` prints one line for it); a process
    that only hears it from the coordination service (the coordinator itself died) is ended by
    JAX with its fatal log (JAX 0.10 passes no callback for it to ``initialize``'s client).

    JAX's preemption service is off: it caught SIGTERM in C++ and the run went on to its end;
    SIGTERM is handled as Ctrl-C is (``interrupts``)."""
    kwargs = distributed_settings(coordinator_address, num_processes, process_id)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU client only
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=heartbeat_timeout_s)
    logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
