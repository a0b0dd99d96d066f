"""Meshes from config: sizes, -1 fill, device order, one-line errors, multi-host detection."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from transformer_jax.config import ConfigError
from transformer_jax.models import get_config
from transformer_jax.parallel import mesh as mesh_lib
from transformer_jax.parallel.mesh import MeshConfig, check_batch, describe_mesh, make_mesh, resolve_sizes
from transformer_jax.parallel.rules import get_rules
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup


@pytest.mark.parametrize("cfg,shape", [
    (MeshConfig(), (8, 1, 1)),
    (MeshConfig(data=-1, fsdp=2, tensor=2), (2, 2, 2)),
    (MeshConfig(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
    (MeshConfig(data=2, fsdp=1, tensor=-1), (2, 1, 4)),
    (MeshConfig(data=4, fsdp=1, tensor=2, preset="dp_tp"), (4, 1, 2)),
])
def test_sizes_and_fill(cfg, shape):
    mesh = make_mesh(cfg)
    assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp", "tensor")
    assert mesh.axis_types == (AxisType.Auto,) * 3  # flax's logical constraints need Auto axes


def test_tensor_is_the_innermost_axis():
    """Neighbouring devices (one host, one slice) share a tensor group."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids.reshape(2, 4), [[0, 1, 2, 3], [4, 5, 6, 7]])
    assert describe_mesh(mesh) == "data=2 x fsdp=1 x tensor=4 over 8 cpu devices, 1 process"


def test_hosts_are_split_over_the_outer_axes():
    assert mesh_lib._split_outer((8, 1, 1), 2) == (2, 1, 1)
    assert mesh_lib._split_outer((2, 2, 2), 4) == (2, 2, 1)
    assert mesh_lib._split_outer((1, 4, 2), 2) == (1, 2, 1)
    assert mesh_lib._split_outer((1, 1, 8), 2) == (1, 1, 2)  # only tensor is left: it must cross hosts
    assert mesh_lib._split_outer((3, 1, 1), 2) is None


@pytest.mark.parametrize("sizes,devices,message", [
    ((4, 1, 4), 8, r"^mesh data=4 x fsdp=1 x tensor=4 needs 16 devices, found 8; choose sizes whose product is 8 "
                   r"\(or -1 to fill\)$"),
    ((-1, 3, 1), 8, r"^mesh data=-1 x fsdp=3 x tensor=1: 8 devices are not divisible by 3; change the fixed mesh "
                    r"sizes$"),
    ((2, 2, 1), 8, r"^mesh data=2 x fsdp=2 x tensor=1 needs 4 devices, found 8"),
])
def test_size_errors_are_one_line(sizes, devices, message):
    with pytest.raises(ConfigError, match=message):
        resolve_sizes(sizes, devices)


@pytest.mark.parametrize("kwargs,message", [
    (dict(data=0), r"^mesh.data=0 must be a positive size or -1"),
    (dict(data=-1, fsdp=-1), r"^mesh data=-1 x fsdp=-1 x tensor=1: at most one axis may be -1$"),
    (dict(preset="zero3"), r"^mesh.preset='zero3' is unknown; choose one of dp, fsdp, tp, dp_tp, fsdp_tp$"),
    (dict(tensor=2, preset="dp"), r"^mesh.tensor=2 is unused by preset 'dp'; set mesh.tensor=1 or a preset that "
                                  r"shards it \(tp, dp_tp, fsdp_tp\)$"),
    (dict(coordinator_address="10.0.0.1:1234"), r"^mesh.coordinator_address, mesh.num_processes and "
                                                r"mesh.process_id go together"),
    (dict(heartbeat_timeout_s=1), r"^mesh.heartbeat_timeout_s=1 is too short; use 2 s or more \(JAX's default is "
                                  r"100\)$"),
])
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MeshConfig(**kwargs)


def test_config_from_overrides():
    cfg = MeshConfig().apply_overrides(["fsdp=2", "tensor=2", "preset=fsdp_tp"])
    assert cfg.sizes == (-1, 2, 2)
    with pytest.raises(ConfigError, match="mesh.tensor=3 must be an integer|must be an integer"):
        MeshConfig().override("tensor", "three")


def test_global_batch_and_heads_must_divide_the_mesh():
    mesh = make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    with pytest.raises(ConfigError, match=r"^global batch 12 is not divisible by data\*fsdp=8; use a multiple of 8 "
                                          r"or change the mesh$"):
        check_batch(12, mesh)
    check_batch(16, mesh)
    cfg = get_config("gpt2-tiny", d_model=96, num_heads=12)
    with pytest.raises(ValueError, match=r"^num_heads=12 is not divisible by tensor=8 \(parameter .*\); "
                                         r"change the model or the mesh$"):
        make_train_setup(cfg, OptimizerConfig(), TaskConfig(), make_mesh(MeshConfig(data=1, tensor=8)),
                         get_rules("fsdp_tp"), total_steps=10)


def test_distributed_environment_detection(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert mesh_lib._distributed_env() is None
    assert mesh_lib.maybe_initialize_distributed(MeshConfig()) is False  # one process: nothing to do
    assert not mesh_lib.distributed_requested(MeshConfig())
    assert mesh_lib.distributed_requested(MeshConfig(coordinator_address="h:1", num_processes=2, process_id=0))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert mesh_lib._distributed_env() is None  # a one-task SLURM job is a single process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert mesh_lib._distributed_env() == "slurm"
    assert mesh_lib.distributed_requested(MeshConfig())
    assert not mesh_lib.distributed_requested(MeshConfig(distributed="off"))
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1k-0,t1k-1")
    assert mesh_lib._distributed_env() == "tpu"
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert mesh_lib._distributed_env() is None  # a single-host TPU VM
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert mesh_lib._distributed_env() == "openmpi"
    assert mesh_lib._env_triple() is None
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ConfigError, match=r"^JAX_NUM_PROCESSES='4' and JAX_PROCESS_ID='x' must be integers$"):
        mesh_lib._env_triple()
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert mesh_lib._env_triple() == ("10.0.0.1:1234", 4, 3)
    assert mesh_lib.maybe_initialize_distributed(MeshConfig(distributed="off")) is False
    assert jax.process_count() == 1


# What srun sets in each task, node 1 of a 2-node job with 8 GPUs per node.
_NODE1 = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_NTASKS": "16", "SLURM_NODEID": "1",
          "SLURM_GPUS_ON_NODE": "8", "SLURM_STEP_GPUS": "0,1,2,3,4,5,6,7", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}
_ALL8 = "0,1,2,3,4,5,6,7"
SLURM_LAYOUTS = {
    # srun --ntasks-per-node=1 (the sbatch's --per-node): one process drives the node's 8 GPUs.
    "per_node": (dict(_NODE1, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS_PER_NODE="1",
                      SLURM_STEP_TASKS_PER_NODE="1(x2)", CUDA_VISIBLE_DEVICES=_ALL8), list(range(8))),
    # srun --ntasks-per-node=8 --gpus-per-task=1, devices constrained by cgroups: each task sees its GPU as 0.
    "per_gpu_gpus_per_task": (dict(_NODE1, SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NTASKS_PER_NODE="8",
                                   SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_GPUS_PER_TASK="1",
                                   CUDA_VISIBLE_DEVICES="0"), [0]),
    # the same without device cgroups: CUDA_VISIBLE_DEVICES names the physical GPU, still ordinal 0 to CUDA.
    "per_gpu_gpus_per_task_no_cgroup": (dict(_NODE1, SLURM_PROCID="11", SLURM_LOCALID="3",
                                             SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_GPUS_PER_TASK="1",
                                             CUDA_VISIBLE_DEVICES="3"), [0]),
    # srun --ntasks-per-node=2 --gpus-per-task=4: four of its own each.
    "two_tasks_four_gpus_each": (dict(_NODE1, SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_LOCALID="1",
                                      SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_GPUS_PER_TASK="h100:4",
                                      CUDA_VISIBLE_DEVICES="4,5,6,7"), [0, 1, 2, 3]),
    # --gpus-per-task=1 overridden by --gpu-bind=none: every task sees all 8 again.
    "gpus_per_task_unbound": (dict(_NODE1, SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                                   SLURM_GPUS_PER_TASK="1", CUDA_VISIBLE_DEVICES=_ALL8), [3]),
    # srun --ntasks-per-node=8 --gpu-bind=single:1 (binding without --gpus-per-task): one GPU each.
    "per_gpu_gpu_bind": (dict(_NODE1, SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                              CUDA_VISIBLE_DEVICES="5"), [0]),
    # srun --ntasks-per-node=8 with the job's --gpus-per-node=8, no binding: all tasks see all 8.
    "per_gpu_shared": (dict(_NODE1, SLURM_PROCID="11", SLURM_LOCALID="3", SLURM_NTASKS_PER_NODE="8",
                            SLURM_STEP_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES=_ALL8), [3]),
    # srun --ntasks-per-node=4, no binding: two GPUs per task.
    "two_per_task_shared": (dict(_NODE1, SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1",
                                 SLURM_STEP_TASKS_PER_NODE="4(x2)", CUDA_VISIBLE_DEVICES=_ALL8), [2, 3]),
    # no CUDA_VISIBLE_DEVICES (GRES without env): physical ids from the step's allocation.
    "per_node_physical_ids": (dict(_NODE1, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0",
                                   SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_STEP_GPUS="4,5,6,7"), [4, 5, 6, 7]),
    # uneven tasks ("2,1"): node 1 runs one task, which takes the node.
    "uneven_tasks": (dict(_NODE1, SLURM_NTASKS="3", SLURM_PROCID="2", SLURM_LOCALID="0",
                          SLURM_STEP_TASKS_PER_NODE="2,1", CUDA_VISIBLE_DEVICES="0,1"), [0, 1]),
    # a CPU job (no GPUs allocated): jax's own default stands.
    "cpu_job": ({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
                 "SLURM_STEP_TASKS_PER_NODE": "2"}, None),
    "no_gpus_allocated": (dict(_NODE1, SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="1(x2)",
                               CUDA_VISIBLE_DEVICES="NoDevFiles", SLURM_STEP_GPUS=""), None),
    "not_slurm": ({"CUDA_VISIBLE_DEVICES": _ALL8}, None),
}


@pytest.mark.parametrize("layout", SLURM_LAYOUTS)
def test_local_device_ids_for_each_slurm_layout(layout):
    env, expected = SLURM_LAYOUTS[layout]
    assert mesh_lib.local_device_ids_for_slurm(env) == expected


def test_slurm_tasks_that_do_not_divide_the_gpus_are_one_line():
    env = dict(_NODE1, SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="3(x2)",
               CUDA_VISIBLE_DEVICES=_ALL8)
    with pytest.raises(ConfigError, match=r"^3 SLURM tasks share 8 GPUs on this node, which does not divide; "):
        mesh_lib.local_device_ids_for_slurm(env)


def test_slurm_initialize_gets_the_layouts_device_ids(monkeypatch):
    """What reaches jax.distributed.initialize (recorded: a real one would wait for 2 processes)."""
    env, expected = SLURM_LAYOUTS["per_node"]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    assert mesh_lib.maybe_initialize_distributed(MeshConfig()) is True
    explicit = MeshConfig(coordinator_address="gpu1:1234", num_processes=2, process_id=1)
    assert mesh_lib.maybe_initialize_distributed(explicit) is True  # an explicit coordinator, still under SLURM
    assert calls == [((), {"local_device_ids": expected, "heartbeat_timeout_seconds": 100}),
                     (("gpu1:1234", 2, 1), {"local_device_ids": expected, "heartbeat_timeout_seconds": 100})]
