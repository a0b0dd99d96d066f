"""Two processes of 4 CPU devices each (gloo collectives) train on one 8-device mesh whose
`data` axis spans them, each feeding only its own rows, and get one process's losses."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from transformer_jax.models import get_config
from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch

MODEL = dict(d_model=64, num_heads=8, d_ff=128, scan_layers=False)
OPTIM = dict(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-4)

_CHILD = textwrap.dedent("""
    import json, os, sys
    import jax
    import numpy as np
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from transformer_jax import data
    from transformer_jax.models import get_config
    from transformer_jax.parallel import MeshConfig, describe_mesh, get_rules, make_mesh, maybe_initialize_distributed
    from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch
    port, pid, model, optim = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    cfg = MeshConfig(data=2, fsdp=2, tensor=2, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                     process_id=pid)
    assert maybe_initialize_distributed(cfg) and jax.process_count() == 2 and jax.local_device_count() == 4
    mesh = make_mesh(cfg)
    setup = make_train_setup(get_config("gpt2-tiny", **model), OptimizerConfig(**optim), TaskConfig(task="lm"),
                             mesh, get_rules(cfg.preset), total_steps=10, seed=0)
    state = setup.init_state()
    data_coord = np.indices(mesh.devices.shape)[0].ravel()  # each device's position on `data`
    mine = {int(i) for i, d in zip(data_coord, mesh.devices.ravel()) if d.process_index == pid}
    out = {"mesh": describe_mesh(mesh), "losses": [], "grad_norms": [], "data_index": sorted(mine)}
    for i in range(3):
        full = synthetic_batch("lm", 8, 16, 256, seed=i)            # the global batch...
        local = {k: v[4 * pid:4 * pid + 4] for k, v in full.items()}  # ...of which this process reads its half
        state, m = setup.train_step(state, data.make_global_batch(local, setup.batch_sharding))
        out["losses"].append(float(m["loss"]))
        out["grad_norms"].append(float(m["grad_norm"]))
    print(json.dumps(out), flush=True)
    jax.distributed.shutdown()
""")


def test_two_processes_train_like_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(i), json.dumps(MODEL), json.dumps(OPTIM)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True) for i in (0, 1)]
    try:
        # Meanwhile, the same run in this one process (8 devices).
        setup = make_train_setup(get_config("gpt2-tiny", **MODEL), OptimizerConfig(**OPTIM), TaskConfig(task="lm"),
                                 make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), get_rules("fsdp_tp"), total_steps=10)
        state, want = setup.init_state(), []
        for i in range(3):
            state, m = setup.train_step(state, synthetic_batch("lm", 8, 16, 256, seed=i))
            want.append((float(m["loss"]), float(m["grad_norm"])))
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    for pid, r in enumerate(results):
        assert r["mesh"] == "data=2 x fsdp=2 x tensor=2 over 8 cpu devices, 2 processes"
        assert r["data_index"] == [pid]  # `data` spans the processes: each holds one data slice
        np.testing.assert_allclose(r["losses"], [w[0] for w in want], rtol=1e-5)
        np.testing.assert_allclose(r["grad_norms"], [w[1] for w in want], rtol=1e-5)
    assert jax.process_count() == 1
