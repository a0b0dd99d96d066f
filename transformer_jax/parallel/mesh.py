"""The device mesh from config, on one host or many.

    cfg = MeshConfig(data=-1, fsdp=1, tensor=1, preset="fsdp_tp")
    maybe_initialize_distributed(cfg)   # jax.distributed on a TPU pod, a SLURM job, or explicit settings
    mesh = make_mesh(cfg)               # axes (data, fsdp, tensor); -1 fills with the remaining devices
    rules = get_rules(cfg.preset)

Device order keeps `tensor` (the innermost, most talkative axis) inside a host: on CPU/GPU
jax orders devices process by process, and with several processes (or TPU slices) the
mesh is built as a hybrid mesh whose outer (`data` first, then `fsdp`) axes cross hosts.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Literal

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from transformer_jax.config import Config, ConfigError
from transformer_jax.parallel.rules import PRESETS

AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Config):
    data: int = -1  # -1: all devices left after the other axes
    fsdp: int = 1
    tensor: int = 1
    preset: str = "fsdp_tp"  # logical-axis rules (parallel/rules.py); fsdp_tp uses every axis given a size > 1
    # Multi-host. "auto": initialise jax.distributed when coordinator_address is set (or the
    # environment sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or the job is
    # a multi-host TPU, a SLURM job of several tasks or an Open MPI run; "off": never.
    distributed: Literal["auto", "off"] = "auto"
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None
    # A process that sends no heartbeat for this long is dead: JAX's runtime then ends the
    # others (the trainer's parent says so in one line, train/supervise.py). Bounds how long
    # a hung host holds the job.
    heartbeat_timeout_s: int = 100

    def validate(self) -> None:
        sizes = self.sizes
        for name, size in zip(AXES, sizes):
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{name}={size} must be a positive size or -1 (fill with the remaining devices)")
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh {_describe(sizes)}: at most one axis may be -1")
        if self.preset not in PRESETS:
            raise ConfigError(f"mesh.preset={self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        used = {axis for _, axes in PRESETS[self.preset] for axis in ((axes,) if isinstance(axes, str) else axes or ())}
        for name, size in zip(AXES, sizes):
            if size > 1 and name not in used:
                raise ConfigError(f"mesh.{name}={size} is unused by preset {self.preset!r}; set mesh.{name}=1 or a "
                                  f"preset that shards it ({', '.join(p for p in PRESETS if _uses(p, name))})")
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(x is not None for x in explicit) and not all(x is not None for x in explicit):
            raise ConfigError("mesh.coordinator_address, mesh.num_processes and mesh.process_id go together; "
                              "set all three or none (none: auto-detect TPU/SLURM)")
        if self.heartbeat_timeout_s < 2:
            raise ConfigError(f"mesh.heartbeat_timeout_s={self.heartbeat_timeout_s} is too short; use 2 s or more "
                              "(JAX's default is 100)")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def _uses(preset: str, axis: str) -> bool:
    return any(axis == a or (isinstance(a, tuple) and axis in a) for _, a in PRESETS[preset])


def _describe(sizes) -> str:
    return " x ".join(f"{n}={s}" for n, s in zip(AXES, sizes))


def resolve_sizes(sizes: tuple[int, ...], num_devices: int) -> tuple[int, ...]:
    """Fills a -1 with the remaining devices; one-line errors when the product does not fit."""
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {_describe(sizes)}: {num_devices} devices are not divisible by {known}; "
                              "change the fixed mesh sizes")
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {_describe(sizes)} needs {math.prod(sizes)} devices, found {num_devices}; "
                          f"choose sizes whose product is {num_devices} (or -1 to fill)")
    return sizes


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor), Auto axis types (flax's logical constraints need them)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = resolve_sizes(cfg.sizes, len(devices))
    granules = _granules(devices)
    if len(granules) > 1:
        dcn = _split_outer(sizes, len(granules))
        if dcn is None:
            raise ConfigError(f"mesh {_describe(sizes)} cannot be split over {len(granules)} hosts/slices of "
                              f"{len(devices) // len(granules)} devices; make data*fsdp a multiple of the host count")
        ici = tuple(s // d for s, d in zip(sizes, dcn))
        from jax.experimental import mesh_utils
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=devices[0].platform != "tpu")
        return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _granules(devices) -> list:
    """Groups of devices joined by fast links: TPU slices, else processes (GPU nodes, CPU hosts)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if devices[0].platform == "tpu":
        return sorted(slices)
    return sorted({d.process_index for d in devices})


def _split_outer(sizes, n: int) -> tuple[int, ...] | None:
    """How many hosts each axis spans: `data` first, then `fsdp`, then `tensor`."""
    dcn = []
    for s in sizes:
        g = math.gcd(s, n)
        dcn.append(g)
        n //= g
    return tuple(dcn) if n == 1 else None


def check_batch(global_batch: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """The batch axis is split over data*fsdp (and into grad_accum_steps microbatches): the
    global batch must divide it."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ConfigError(f"global batch {global_batch} is not divisible by data*fsdp={n}; "
                          f"use a multiple of {n} or change the mesh")
    k = grad_accum_steps
    if global_batch % (k * n):
        raise ConfigError(f"global batch {global_batch} is not divisible by optimizer.grad_accum_steps={k} x "
                          f"data*fsdp={n}; use a train.global_batch_size that is a multiple of {k * n}")


# -- multi-host -------------------------------------------------------------------------

def _distributed_env() -> str | None:
    """Which multi-process launcher this process runs under, if any (jax reads the rest)."""
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1:
        return "slurm"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        return "tpu"
    return None


def _env_triple() -> tuple[str, int, int] | None:
    """JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, when a launcher sets all three."""
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    if not all(n in os.environ for n in names):
        return None
    try:
        return os.environ[names[0]], int(os.environ[names[1]]), int(os.environ[names[2]])
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES={os.environ[names[1]]!r} and JAX_PROCESS_ID={os.environ[names[2]]!r} "
                          "must be integers") from None


def _gpu_list(value: str | None) -> list[str] | None:
    """A GPU list variable ("0,1,2,3", UUIDs); None when unset, [] for none (SLURM's "NoDevFiles")."""
    if value is None:
        return None
    return [g for g in value.split(",") if g.strip() and g.strip() != "NoDevFiles"]


def _tasks_on_this_node(env: Mapping[str, str]) -> int:
    """How many tasks of this step run on this node: SLURM_STEP_TASKS_PER_NODE ("8(x2)" or
    "2,1"; srun sets it) at SLURM_NODEID, else SLURM_NTASKS_PER_NODE, else 1."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):
            n, _, times = part.partition("(x")
            counts += [int(n)] * (int(times.rstrip(")")) if times else 1)
        node = int(env.get("SLURM_NODEID", 0))
        return counts[node] if node < len(counts) else counts[0]
    return int(env.get("SLURM_NTASKS_PER_NODE", 1))


def local_device_ids_for_slurm(env: Mapping[str, str]) -> list[int] | None:
    """The GPU ordinals this SLURM task should drive, for `jax.distributed.initialize`.

    Left to itself jax uses `[SLURM_LOCALID]`, right only when every task of a node sees all
    of its GPUs and drives one. The layouts:
      - one task per node (`--ntasks-per-node=1`): all the GPUs it sees;
      - one task per GPU with `--gpus-per-task=1` (or any `--gpu-bind` that gives each task
        its own GPUs): each task sees only its own, as ordinal 0: all it sees, [0];
      - k tasks sharing a node's n visible GPUs (`--ntasks-per-node=k --gpus-per-node=n`,
        no binding): task i drives ordinals i*n/k ... (i+1)*n/k - 1.
    Ordinals count the GPUs CUDA sees: CUDA_VISIBLE_DEVICES (SLURM sets it per task, or per
    node, from the allocation); without it, the physical ids in SLURM_STEP_GPUS/SLURM_JOB_GPUS.
    None where the job has no GPU information (a CPU job: jax's default is harmless)."""
    if "SLURM_JOB_ID" not in env:
        return None
    visible = _gpu_list(env.get("CUDA_VISIBLE_DEVICES"))
    if visible is not None:
        ordinals = list(range(len(visible)))
    else:
        physical = _gpu_list(env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS"))
        if not physical:
            return None
        ordinals = [int(g) for g in physical]
    if not ordinals:
        return None
    tasks = _tasks_on_this_node(env)
    per_task = env.get("SLURM_GPUS_PER_TASK")  # "2" or "a100:2"
    per_task = int(per_task.rpartition(":")[2]) if per_task else None
    if tasks == 1 or len(ordinals) < tasks or (per_task is not None and len(ordinals) <= per_task):
        return ordinals  # this task's own GPUs
    if len(ordinals) % tasks:
        raise ConfigError(f"{tasks} SLURM tasks share {len(ordinals)} GPUs on this node, which does not divide; "
                          "use srun --gpus-per-task=N, or a task count that divides the GPUs")
    share, local = len(ordinals) // tasks, int(env["SLURM_LOCALID"])
    return ordinals[local * share:(local + 1) * share]


def _already_initialized() -> bool:
    from jax._src import distributed
    return distributed.global_state.client is not None


def distributed_requested(cfg: MeshConfig) -> bool:
    """Whether `maybe_initialize_distributed(cfg)` would start a multi-process job (touches no device)."""
    return cfg.distributed != "off" and (cfg.coordinator_address is not None or _env_triple() is not None
                                         or _distributed_env() is not None)


def maybe_initialize_distributed(cfg: MeshConfig) -> bool:
    """Calls `jax.distributed.initialize` when the config or the environment asks for it.

    Must run before anything touches devices. Returns True when this process is part of a
    multi-process job (initialised here or before)."""
    if _already_initialized():
        return True
    if cfg.distributed == "off":
        return False
    explicit = ((cfg.coordinator_address, cfg.num_processes, cfg.process_id)
                if cfg.coordinator_address is not None else _env_triple())
    # Which GPUs this process drives: under SLURM jax would take [SLURM_LOCALID] (right only
    # for one task per GPU that sees them all), even with an explicit coordinator, so pass them.
    if explicit is not None:
        local_device_ids = local_device_ids_for_slurm(os.environ)
        log.info("jax.distributed.initialize(%s, %d, %d, local_device_ids=%s)", *explicit, local_device_ids)
        jax.distributed.initialize(*explicit, local_device_ids=local_device_ids,
                                   heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
        _tell_parent()
        return True
    env = _distributed_env()
    if env is None:
        return False
    local_device_ids = local_device_ids_for_slurm(os.environ) if env == "slurm" else None
    log.info("jax.distributed.initialize(local_device_ids=%s) for a %s job", local_device_ids, env)
    # jax reads the rest from the environment
    jax.distributed.initialize(local_device_ids=local_device_ids, heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    _tell_parent()
    return True


def _tell_parent() -> None:
    from transformer_jax import supervise  # the trainer's parent names this process if JAX aborts it
    supervise.tell_parent(jax.process_index(), jax.process_count())


def describe_mesh(mesh: Mesh) -> str:
    """'data=2 x fsdp=2 x tensor=2 over 8 cpu devices, 1 process'."""
    n = np.prod(list(mesh.shape.values()))
    procs = len({d.process_index for d in mesh.devices.flat})
    return (f"{_describe([mesh.shape[a] for a in AXES])} over {n} {mesh.devices.flat[0].platform} devices, "
            f"{procs} process{'es' if procs > 1 else ''}")
