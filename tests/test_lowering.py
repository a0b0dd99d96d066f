"""Cross-platform lowering, on CPU: the train step and the decode loop of a small bf16
decoder with attention="auto", lowered for CUDA and for TPU (`jit(f).trace(...).lower(
lowering_platforms=...)` under `platform.target_platform`), hold the kernels `auto`
promises there, and the documented fallback where it cannot use them. Nothing compiles
for or runs on the accelerator: these check what the program asks for.

What cannot be done on CPU, and the nearest thing tested instead:
- jax asks the installed cuDNN for its version while *tracing* a cuDNN attention
  (`check_cudnn_version`, jax/_src/cudnn/fused_attention_stablehlo.py); a CPU jaxlib has no
  CUDA plugin and raises "cuDNN is not detected". The `cudnn_version` fixture states the
  version a GPU host would report (9.8); the rest is jax's real cuDNN lowering.
- On a mesh, jax wraps the cuDNN call in `custom_partitioning`: the lowering holds a
  `CustomSPMDPartitioning` call with the attention's operands, and the `__cudnn$fmha...`
  call appears only when XLA's SPMD partitioner runs inside GPU compilation, which needs a
  CUDA backend. The sharded tests check that wrapper and its operands.
- The 8-device mesh is the 8 fake CPU devices of conftest.py; lowering for another
  platform uses only its shape.
"""
import logging
import re
from collections import Counter

import jax
import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import decode
from transformer_jax.layers.platform import target_platform
from transformer_jax.models import build_model, get_config
from transformer_jax.parallel.mesh import MeshConfig, make_mesh
from transformer_jax.parallel.rules import get_rules
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch

CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"
# Splash's forward block mask for a causal 1024 x 1024 kernel in 512 x 512 blocks: 0 = block
# skipped (all masked), 1 = partly masked, 2 = computed without a mask.
CAUSAL_BLOCKS = "dense<[[[1, 0], [2, 1]]]> : tensor<1x2x2xi8>"


@pytest.fixture
def cudnn_version(monkeypatch):
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 90800)


def model_cfg(**overrides):
    """llama-tiny at bf16, head_dim 64 (d_model 256, 4 heads, 2 kv heads)."""
    kw = dict(d_model=256, num_heads=4, num_kv_heads=2, d_ff=256, vocab_size=512, max_len=2048, dtype="bfloat16")
    return get_config("llama-tiny", **{**kw, **overrides})


def calls(text: str) -> Counter:
    """Custom-call targets and Pallas kernel names in a lowered module."""
    return Counter(re.findall(r"custom_call @([\w$.]+)", text) + re.findall(r'kernel_name = "([^"]+)"', text))


def lower_train_step(platform, length, mesh_shape=(1, 1, 1), **overrides):
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2]), jax.devices()[:n])
    setup = make_train_setup(model_cfg(**overrides), OptimizerConfig(), TaskConfig(task="lm"), mesh,
                             get_rules("fsdp_tp"), total_steps=10)
    batch = synthetic_batch("lm", 8, length, 512, seed=0)  # packed: segment ids and positions
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=setup.batch_sharding), batch)
    with setup.context(), target_platform(platform):
        return setup._train.trace(setup.abstract_state, abstract).lower(lowering_platforms=(platform,)).as_text()


def lower_generate(platform, prompt_len=8, new_tokens=4, mesh_shape=None):
    model = decode.decoding_model(build_model(model_cfg()))
    params = jax.eval_shape(build_model(model_cfg()).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    tokens, seg, pos, lengths = decode.left_pad([[5] * prompt_len, [6] * (prompt_len - 2), [7], [8] * 3])
    args = (model, params, tokens, seg, pos, jnp.asarray(lengths), jax.random.key(0), None, None)
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, top_k=0, top_p=1.0, eos_id=None, pad_id=0)
    if mesh_shape is None:
        with target_platform(platform):
            return decode._generate.trace(*args, **kw).lower(lowering_platforms=(platform,)).as_text()
    import flax.linen as nn
    from transformer_jax.parallel import logical_shardings
    mesh, rules = make_mesh(MeshConfig(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])), get_rules("dp_tp")
    boxed = jax.eval_shape(build_model(model_cfg()).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(boxed))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), target_platform(platform):
        params = jax.device_put(zeros, logical_shardings(boxed, mesh, rules))
        args = (model, params) + args[2:]
        return decode._generate.trace(*args, **kw).lower(lowering_platforms=(platform,)).as_text()


# -- CUDA ----------------------------------------------------------------------------------

def test_train_step_for_cuda_calls_cudnn_forward_and_backward(cudnn_version):
    """bf16, head_dim 64, causal with segment ids (cuDNN takes them as a [B, 1, L, L] bias)."""
    found = calls(lower_train_step("cuda", 256))
    assert found[CUDNN_FWD] == 1 and found[CUDNN_BWD] == 1, found  # one scanned layer body


@pytest.mark.parametrize("overrides, reason", [
    (dict(dtype="float32"), "dtype float32 is not bfloat16/float16"),
    (dict(d_model=512, num_heads=2, num_kv_heads=1), "head_dim 256 is not a multiple of 8 <= 128"),
])
def test_train_step_for_cuda_falls_back_where_cudnn_cannot(cudnn_version, caplog, overrides, reason):
    with caplog.at_level(logging.INFO, logger="transformer_jax.layers.dot_product"):
        found = calls(lower_train_step("cuda", 256, **overrides))
    assert not any(name.startswith("__cudnn") for name in found), found
    assert f"attention implementation=xla: cudnn not usable ({reason})" in caplog.text


def test_sharded_train_step_for_cuda_partitions_the_cudnn_call(cudnn_version):
    """fsdp_tp on (2, 2, 2): the cuDNN attention (forward and backward) is a custom_partitioning
    call over one data replica's [4, 256, 4, 64] bf16 q and [4, 1, 256, 256] segment-mask bias (the
    step is manual over `data`, a shard_map; fsdp and tensor stay with the partitioner)."""
    text = lower_train_step("cuda", 256, mesh_shape=(2, 2, 2))
    assert calls(text)["CustomSPMDPartitioning"] == 2
    fwd = next(line for line in text.splitlines() if "@CustomSPMDPartitioning" in line)
    assert "tensor<4x256x4x64xbf16>" in fwd and "tensor<4x1x256x256xbf16>" in fwd


def test_decode_for_cuda_prefills_with_cudnn_and_steps_with_the_einsum(cudnn_version, caplog):
    """The prompt (8 positions, offset by the cache index) goes through cuDNN's forward with a
    mask bias, once per (unrolled) layer; the one-token steps run `cached_step_attention`'s
    einsums over the cache (no kernel is selected for them: one cuDNN call per layer in all,
    the prefill's); no backward anywhere."""
    with caplog.at_level(logging.INFO, logger="transformer_jax.layers.dot_product"):
        found = calls(lower_generate("cuda"))
    assert found[CUDNN_FWD] == 2 and found[CUDNN_BWD] == 0, found  # llama-tiny: 2 layers, prefill only
    assert "attention implementation=cudnn" in caplog.text
    assert "Lq x Lk = 1 x" not in caplog.text and "got 1/" not in caplog.text  # the steps select nothing


def test_sharded_decode_lowers_for_cuda_and_tpu(cudnn_version):
    """dp_tp on (4, 1, 2): the decode loop lowers for both platforms, cuDNN prefill partitioned."""
    assert calls(lower_generate("cuda", mesh_shape=(4, 1, 2)))["CustomSPMDPartitioning"] == 2
    assert "tpu_custom_call" not in calls(lower_generate("tpu", mesh_shape=(4, 1, 2)))


# -- TPU -----------------------------------------------------------------------------------

def test_train_step_for_tpu_runs_splash_with_segment_ids_and_causal_block_skipping():
    text = lower_train_step("tpu", 1024)
    found = calls(text)
    assert found["tpu_custom_call"] == 3, found  # forward, dK/dV, dQ
    for kernel in ("splash_mha_fwd_segmented", "splash_mha_dkv_segmented", "splash_mha_dq_segmented"):
        assert any(name.startswith(kernel) for name in found), (kernel, found)
    assert CAUSAL_BLOCKS in text  # the upper-right 512 x 512 block is never computed


def test_sharded_train_step_for_tpu_runs_splash_per_shard():
    """fsdp_tp on (2, 2, 2): splash runs inside shard_map over the batch and head axes."""
    text = lower_train_step("tpu", 1024, mesh_shape=(2, 2, 2))
    assert calls(text)["tpu_custom_call"] == 3 and CAUSAL_BLOCKS in text


@pytest.mark.parametrize("length, overrides, reason", [
    (1024, dict(dtype="float32"), "dtype float32 is not bfloat16"),
    (256, {}, "one 512 x 512 tile or less"),
])
def test_train_step_for_tpu_falls_back_where_splash_does_not_apply(caplog, length, overrides, reason):
    with caplog.at_level(logging.INFO, logger="transformer_jax.layers.dot_product"):
        found = calls(lower_train_step("tpu", length, **overrides))
    assert "tpu_custom_call" not in found, found
    assert f"splash not used ({reason}" in caplog.text


def test_decode_for_tpu_uses_the_einsum():
    """Splash's causal mask cannot be offset by the cache index: decoding uses `xla`."""
    assert "tpu_custom_call" not in calls(lower_generate("tpu"))


def test_target_platform_rejects_unknown_names():
    with pytest.raises(ValueError, match="target_platform='gpu' is unknown"):
        with target_platform("gpu"):
            pass
