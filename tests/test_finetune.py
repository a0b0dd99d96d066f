"""Fine-tuning: init_from a real checkpoint (backbone restored bit-exactly, only the new head
fresh), frozen parameters, LoRA (starts equal to its base, trains only adapters, merges into
the base model's kernels, and gives the same numbers on a 2x2x2 fsdp_tp mesh as on one device).

Setups are cached per configuration and shared across tests (compiles dominate the run time).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from transformer_jax.checkpoint import CheckpointConfig, Checkpointer, init_from
from transformer_jax.config import ConfigError
from transformer_jax.models import build_model, get_config, merge_lora
from transformer_jax.parallel.mesh import MeshConfig, make_mesh
from transformer_jax.parallel.rules import get_rules
from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch

# bert-tiny whose heads, mlp and embed divide the 2x2x2 mesh; unrolled layers compile fastest.
MODEL = dict(d_model=64, num_heads=8, d_ff=128, num_classes=4, scan_layers=False)
LORA = dict(lora_rank=4, lora_alpha=8.0)
# eps=1e-4 as in test_step.py: sharded and one-device Adam updates then agree to 1e-5.
OPTIM = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1e-4)
HEAD = ("classifier/out/bias", "classifier/out/kernel", "classifier/pooler/bias", "classifier/pooler/kernel")


def flat(tree) -> dict[str, np.ndarray]:
    """'a/b/kernel' -> host array."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def setup_for(task="classify", shape=(1, 1, 1), optim=OPTIM, seed=0, **model):
    return _setup(task, shape, optim, seed, tuple(sorted(model.items())))


@functools.cache
def _setup(task, shape, optim, seed, model):
    model = dict(model)
    mesh = make_mesh(MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices()[:int(np.prod(shape))])
    cfg = get_config("bert-tiny", **dict(MODEL, **model))
    return make_train_setup(cfg, optim, TaskConfig(task=task), mesh, get_rules("fsdp_tp"), total_steps=10, seed=seed)


def batch(task="classify", seed=0):
    return synthetic_batch(task, 8, 16, 256, num_classes=4, seed=seed)


def trained(task="classify", shape=(1, 1, 1), optim=OPTIM, steps=3, **model):
    """(params at init, params after `steps` steps), host copies."""
    return _trained(task, shape, optim, steps, tuple(sorted(model.items())))


@functools.cache
def _trained(task, shape, optim, steps, model):
    setup = setup_for(task, shape, optim, **dict(model))
    state = setup.init_state()
    first = jax.device_get(state.params)
    for i in range(steps):
        state, m = setup.train_step(state, batch(task, seed=i))
        assert m["skipped"] == 0 and np.isfinite(m["loss"])
    return first, jax.device_get(state.params)


@functools.cache
def logits_fn(**model):
    """jitted (params, tokens) -> class logits of bert-tiny with `model` overrides."""
    net = build_model(get_config("bert-tiny", **dict(MODEL, **model)))
    return jax.jit(lambda p, t: net.apply({"params": p}, t, head="classify"))


TOKENS = jnp.asarray(batch()["inputs"])


def test_init_from_restores_the_backbone_and_only_the_head_is_fresh(tmp_path):
    state = setup_for("mlm", seed=1).init_state()
    # Every leaf moved off any initialiser's values (ones, zeros), as pretraining would.
    state = state.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 * jax.random.normal(jax.random.key(len(jax.tree_util.keystr(p))), x.shape), state.params))
    with Checkpointer(tmp_path / "pre" / "checkpoints", CheckpointConfig(async_save=False)) as ckpt:
        ckpt.save(2, state)
    saved = flat(state.params)

    for extra, fresh_extra in (({}, ()), (LORA, "lora")):
        setup = setup_for("classify", **extra)
        fresh = setup.init_state()
        params, report = init_from(tmp_path / "pre", fresh.params)
        got, new = flat(params), flat(setup.init_state().params)  # a second fresh init: same seed
        lora = tuple(p for p in got if p.endswith(("lora_a", "lora_b")))
        assert bool(lora) == (fresh_extra == "lora")
        assert set(report.fresh) == set(HEAD + lora) and report.mismatched == ()
        assert set(report.unused) == {p for p in saved if p.startswith("mlm_head/")}
        for path, x in got.items():
            if path in report.fresh:  # the head (and adapters): a fresh init with the setup's seed
                np.testing.assert_array_equal(x, new[path], err_msg=path)
            else:  # the backbone: the checkpoint's bits, not the fresh init's
                assert x.dtype == saved[path].dtype
                np.testing.assert_array_equal(x, saved[path], err_msg=path)
                assert not np.array_equal(x, new[path]), path
        assert params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"].sharding == \
            fresh.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"].sharding


FROZEN = OPTIM.replace(freeze=("^embedder/", "^encoder/layer_0/"), weight_decay=0.5)


def test_frozen_parameters_are_bit_identical_after_steps():
    before, after = trained(optim=FROZEN)
    before, after = flat(before), flat(after)
    frozen = [p for p in before if p.startswith(("embedder/", "encoder/layer_0/"))]
    assert len(frozen) > 10
    for p in frozen:
        np.testing.assert_array_equal(after[p], before[p], err_msg=p)
    moved = [p for p in before if p not in frozen and not np.array_equal(after[p], before[p])]
    assert {p for p in before if "layer_1" in p and p.endswith("kernel")} <= set(moved)
    assert set(HEAD) <= set(moved)
    # No Adam moments are kept for frozen parameters.
    setup = setup_for(optim=FROZEN)
    n_params, n_opt = len(jax.tree.leaves(setup.abstract_state.params)), len(jax.tree.leaves(
        setup.abstract_state.opt_state))
    assert n_opt == 2 * (n_params - len(frozen)) + 1  # mu, nu per trained leaf, and the count
    assert setup.trainable_count < setup.param_count


def test_a_freeze_pattern_matching_nothing_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"^optim.freeze pattern '\^decoder/' matches no parameter; paths look like"):
        setup_for(optim=OPTIM.replace(freeze=("^decoder/",)))


def test_lora_at_init_gives_the_base_models_logits():
    lora = jax.device_get(setup_for(**LORA).init_state().params)
    base = {k: v for k, v in flat(lora).items() if not k.endswith(("lora_a", "lora_b"))}
    assert len(base) < len(flat(lora))
    base_tree = merge_lora(lora, get_config("bert-tiny", **MODEL, **LORA))  # B = 0: kernels unchanged
    assert flat(base_tree).keys() == base.keys()
    for k, v in flat(base_tree).items():
        np.testing.assert_array_equal(v, base[k], err_msg=k)
    np.testing.assert_array_equal(logits_fn(**LORA)(lora, TOKENS), logits_fn()(base_tree, TOKENS))


def test_lora_trains_only_adapters_and_the_head_then_merges():
    before, after = trained(**LORA)
    b, a = flat(before), flat(after)
    adapters = [p for p in b if p.endswith(("lora_a", "lora_b"))]
    # query, key, value, out, wi, wo in each of the 2 layers, A and B each
    assert len(adapters) == 2 * 6 * 2
    for p in b:
        if p in adapters or p in HEAD:
            assert not np.array_equal(a[p], b[p]), f"{p} did not train"
        else:
            np.testing.assert_array_equal(a[p], b[p], err_msg=f"{p} is not frozen")
    cfg = get_config("bert-tiny", **MODEL, **LORA)
    merged = merge_lora(after, cfg)
    assert all(not k.endswith(("lora_a", "lora_b")) for k in flat(merged))
    want = logits_fn(**LORA)(after, TOKENS)
    got = logits_fn()(merged, TOKENS)  # the lora_rank=0 model
    assert float(jnp.abs(want - logits_fn()(merge_lora(before, cfg), TOKENS)).max()) > 1e-3  # adapters matter
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_merge_lora_on_scanned_layers():
    cfg = get_config("bert-tiny", **dict(MODEL, scan_layers=True), **LORA)
    net = build_model(cfg)
    params = nn.unbox(jax.jit(lambda k: net.init(k, TOKENS, head="classify"))(jax.random.key(3))["params"])
    params = jax.tree_util.tree_map_with_path(  # nonzero B everywhere
        lambda p, x: jax.random.normal(jax.random.key(len(str(p))), x.shape) * 0.1 if "lora_b" in str(p) else x, params)
    kernel = params["encoder"]["layers"]["self_attention"]["out"]
    assert kernel["lora_a"].shape == (2, 8, 8, 4) and kernel["lora_b"].shape == (2, 4, 64)  # [layers, ...]
    want = jax.jit(lambda p: net.apply({"params": p}, TOKENS, head="classify"))(params)
    base = build_model(cfg.replace(lora_rank=0))
    got = jax.jit(lambda p: base.apply({"params": p}, TOKENS, head="classify"))(merge_lora(params, cfg))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_lora_on_a_sharded_mesh_equals_one_device():
    one, sharded = trained(steps=2, **LORA)[1], trained(shape=(2, 2, 2), steps=2, **LORA)[1]
    scale = max(float(np.abs(x).max()) for x in flat(one).values())
    for p, x in flat(one).items():
        np.testing.assert_allclose(flat(sharded)[p], x, rtol=1e-5, atol=1e-5 * scale, err_msg=p)
    # Adapters carry the kernel's logical axis names: A is split like its input, B like its output.
    spec = lambda leaf: setup_for(shape=(2, 2, 2), **LORA).state_shardings.params["encoder"]["layer_0"][leaf[0]][
        leaf[1]][leaf[2]].spec  # noqa: E731
    assert spec(("self_attention", "query", "kernel")) == P("fsdp", "tensor", None)
    assert spec(("self_attention", "query", "lora_a")) == P("fsdp", None)
    assert spec(("self_attention", "query", "lora_b")) == P(None, "tensor", None)
    assert spec(("mlp", "wo", "lora_a")) == P("tensor", None)
