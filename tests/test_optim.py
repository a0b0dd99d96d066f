"""AdamW from config: schedules, the weight-decay mask, equality with optax.adamw, clipping."""
import functools

import chex
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers
from hypothesis import given, settings, strategies as st

from transformer_jax.config import ConfigError
from transformer_jax.models import build_model, get_config
from transformer_jax.train import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from transformer_jax.train.optim import frozen_mask, muon_dims


def test_schedules_at_their_landmarks():
    base = dict(learning_rate=1e-3, warmup_steps=10, end_ratio=0.1)
    cos = jax.jit(jax.vmap(make_schedule(OptimizerConfig(schedule="cosine", **base), 110)))
    lin = jax.jit(jax.vmap(make_schedule(OptimizerConfig(schedule="linear", **base), 110)))
    const = jax.jit(jax.vmap(make_schedule(OptimizerConfig(schedule="constant", **base), 110)))
    steps = jnp.array([0, 4, 9, 10, 60, 110, 500])
    np.testing.assert_allclose(cos(steps), [1e-4, 5e-4, 1e-3, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)
    np.testing.assert_allclose(lin(steps), [1e-4, 5e-4, 1e-3, 1e-3, 0.55e-3, 1e-4, 1e-4], rtol=1e-5)
    np.testing.assert_allclose(const(steps), [1e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-5)
    no_warmup = make_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=0, schedule="cosine"), 100)
    assert float(no_warmup(0)) == pytest.approx(1e-3)  # the first step already trains


@functools.cache
def _schedule(kind, warmup, total):
    return jax.jit(jax.vmap(make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=warmup, schedule=kind,
                                                          end_ratio=0.1), total)))


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["cosine", "linear", "constant"]), warmup=st.sampled_from([0, 1, 7, 50]),
       total=st.sampled_from([1, 60, 400]))
def test_schedule_rises_then_never_rises_and_stays_in_range(kind, warmup, total):
    steps = jnp.arange(0, total + 20)
    lr = np.asarray(_schedule(kind, warmup, total)(steps))
    assert np.all(lr > 0) and np.all(lr <= 1.0 + 1e-6)
    peak = int(np.argmax(lr))
    assert np.all(np.diff(lr[:peak + 1]) >= 0) and np.all(np.diff(lr[peak:]) <= 1e-7)
    if kind != "constant" and total > warmup:
        np.testing.assert_allclose(lr[total:], 0.1, rtol=1e-5)  # end_ratio from total_steps on


def _params(name):
    cfg = get_config(name)
    model = build_model(cfg)
    args = (jnp.ones((1, 4), jnp.int32),) * (2 if cfg.family == "encoder_decoder" else 1)
    kw = {"head": "mlm"} if cfg.family == "encoder" else {}
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kw))["params"]


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_decay_mask_takes_kernels_only_by_default(name):
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(_params(name), ("norm", "bias", "embedding")))[0]
    decayed = {jax.tree_util.keystr(p) for p, m in flat if m}
    kept = {jax.tree_util.keystr(p) for p, m in flat if not m}
    assert decayed and all(p.endswith("['kernel']") for p in decayed)
    assert all(not p.endswith("['kernel']") for p in kept)
    assert any("embedding" in p for p in kept) and any(p.endswith("['scale']") for p in kept)
    everything = decay_mask(_params(name), ())
    assert all(jax.tree.leaves(everything))
    only_norms = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(
        decay_mask(_params(name), ("norm",)))[0] if not m}
    assert only_norms and all(p.endswith("['scale']") for p in only_norms)


def test_equals_optax_adamw_with_clipping_and_mask():
    cfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant", b1=0.8, b2=0.9, eps=1e-6,
                          weight_decay=0.3, clip_norm=0.5)
    params = {"dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.ones(4)},
              "norm": {"scale": jnp.full(4, 2.0)}}
    mask = decay_mask(params, cfg.decay_exclude)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(3e-3, b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.3,
                                                                  mask=mask))
    tx, lr = make_optimizer(cfg), make_schedule(cfg, 10)

    @jax.jit
    def both(p, q, s, r, g, step):
        d, s = tx.update(g, s, p)
        u, r = ref.update(g, r, q)
        return jax.tree.map(lambda x, y: x - lr(step) * y, p, d), optax.apply_updates(q, u), s, r

    p = q = params
    s, r = tx.init(p), ref.init(q)
    for step in range(4):
        g = jax.tree.map(lambda x: jnp.sin(x * (step + 1)) * 3.0, p)  # norm ~4: clipped to 0.5
        p, q, s, r = both(p, q, s, r, g, step)
    chex.assert_trees_all_close(p, q, rtol=1e-6, atol=1e-7)
    assert float(p["norm"]["scale"][0]) != 2.0


def test_clipping_rescales_gradients_before_adam():
    tx = make_optimizer(OptimizerConfig(b1=0.0, b2=0.5, eps=1e-12, weight_decay=0.0, clip_norm=1.0))
    g1, g2 = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.3, -0.4])}  # norms 5 (clipped to 1) and 0.5

    @jax.jit
    def two_steps(g1, g2):
        s = tx.init(g1)
        _, s = tx.update(g1, s, g1)
        return tx.update(g2, s, g2)[0]["w"]

    c1, c2 = np.array([0.6, 0.8]), np.array([0.3, -0.4])
    nu = (0.5 * 0.5 * c1 ** 2 + 0.5 * c2 ** 2) / (1 - 0.5 ** 2)  # Adam's bias-corrected second moment
    np.testing.assert_allclose(two_steps(g1, g2), c2 / np.sqrt(nu), rtol=1e-5)
    unclipped = (0.5 * 0.5 * np.array([3.0, 4.0]) ** 2 + 0.5 * c2 ** 2) / 0.75
    assert not np.allclose(c2 / np.sqrt(nu), c2 / np.sqrt(unclipped), rtol=1e-2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(learning_rate=-1.0), r"^optim.learning_rate=-1.0 must be >= 0$"),
    (dict(b2=1.0), r"^optim.b2=1.0 must be in \[0, 1\)$"),
    (dict(end_ratio=2.0), r"^optim.end_ratio=2.0 must be in \[0, 1\]$"),
    (dict(decay_exclude=("norms",)), r"^optim.decay_exclude has unknown kind\(s\) \['norms'\]; choose from "
                                     r"\['bias', 'embedding', 'norm'\]$"),
    (dict(clip_norm=0.0), r"^optim.clip_norm=0.0 must be > 0 \(or none for no clipping\)$"),
    (dict(grad_accum_steps=0), r"^optim.grad_accum_steps=0 must be >= 1$"),
    (dict(schedule="step"), r"^OptimizerConfig.schedule='step' is not one of 'cosine', 'linear', 'constant'$"),
    (dict(freeze=("enc(",)), r"^optim.freeze pattern 'enc\(' is not a regex: missing \), unterminated subpattern"),
])
def test_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**kwargs)


def test_config_overrides_parse():
    cfg = OptimizerConfig().apply_overrides(["clip_norm=none", "decay_exclude=[\"norm\"]", "learning_rate=1e-3"])
    assert cfg.clip_norm is None and cfg.decay_exclude == ("norm",) and cfg.learning_rate == 1e-3
    with pytest.raises(ConfigError, match="total_steps=0 must be >= 1"):
        make_schedule(cfg, 0)


def _tree():
    return {"enc": {"kernel": jnp.linspace(-1, 1, 12).reshape(3, 4), "bias": jnp.ones(4),
                    "lora_a": jnp.ones((3, 2)), "lora_b": jnp.zeros((2, 4))},
            "classifier": {"kernel": jnp.full((4, 2), 0.5)}}


def test_freeze_gives_zero_update_no_decay_and_no_adam_state():
    cfg = OptimizerConfig(weight_decay=0.5, decay_exclude=(), freeze=("^enc/(kernel|bias)$",))
    params = _tree()
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    tx = make_optimizer(cfg)
    d, s = jax.jit(tx.update)(grads, tx.init(params), params)
    assert not np.any(d["enc"]["kernel"]) and not np.any(d["enc"]["bias"])  # decay 0.5 would move them
    # The others get exactly AdamW's direction, with moments kept for them alone.
    trained = {"enc": {k: params["enc"][k] for k in ("lora_a", "lora_b")}, "classifier": params["classifier"]}
    plain = make_optimizer(cfg.replace(freeze=()))
    want, _ = plain.update(jax.tree.map(lambda x: jnp.full_like(x, 0.3), trained), plain.init(trained), trained)
    chex.assert_trees_all_close(d["classifier"], want["classifier"], rtol=1e-6)
    chex.assert_trees_all_close(d["enc"]["lora_a"], want["enc"]["lora_a"], rtol=1e-6)
    assert len(jax.tree.leaves(s)) == 1 + 2 * 3  # Adam's count, mu and nu of the 3 trained leaves


def test_lora_freezes_everything_but_adapters_and_lora_train():
    mask = lambda cfg, lora: {"/".join(k.key for k in p): f for p, f in  # noqa: E731
                              jax.tree_util.tree_flatten_with_path(frozen_mask(_tree(), cfg, lora))[0]}
    assert not any(mask(OptimizerConfig(), False).values())
    assert mask(OptimizerConfig(), True) == {"enc/kernel": True, "enc/bias": True, "enc/lora_a": False,
                                             "enc/lora_b": False, "classifier/kernel": False}
    only_adapters = mask(OptimizerConfig(lora_train=()), True)
    assert only_adapters["classifier/kernel"] and not only_adapters["enc/lora_b"]
    assert mask(OptimizerConfig(freeze=("lora_b",)), True)["enc/lora_b"]  # freeze wins
    with pytest.raises(ConfigError, match=r"^optim.freeze pattern 'decoder' matches no parameter; paths look like "
                                          r"\['classifier/kernel', 'enc/bias', 'enc/kernel'\]$"):
        frozen_mask(_tree(), OptimizerConfig(freeze=("enc", "decoder")))


def _unboxed(name, **overrides):
    model = build_model(get_config(name, **overrides))
    tokens = jnp.zeros((1, 8), jnp.int32)
    return flax.linen.unbox(model.init(jax.random.key(0), tokens)["params"])


@pytest.mark.parametrize("scan", [True, False])
def test_muon_takes_the_layers_kernels_as_input_by_output_matrices(scan):
    params = _unboxed("llama-tiny", scan_layers=scan)
    flat = jax.tree_util.tree_flatten_with_path(muon_dims(params),
                                                is_leaf=lambda d: d is None or isinstance(d, MuonDimensionNumbers))[0]
    dims = {jax.tree_util.keystr(p): d for p, d in flat}
    muon = {p for p, d in dims.items() if d is not None}
    assert muon and all(p.endswith("['kernel']") and ("['layers']" in p or "['layer_" in p) for p in muon)
    assert all(d is None for p, d in dims.items() if "embed" in p or "norm" in p or "head" in p)
    lead = 1 if scan else 0
    q = next(d for p, d in dims.items() if "['query']" in p)
    out = next(d for p, d in dims.items() if "['out']" in p)
    wo = next(d for p, d in dims.items() if "['wo']" in p)
    assert (tuple(q.reduction_axis), tuple(q.output_axis)) == ((lead,), (lead + 1, lead + 2))  # embed -> heads, dim
    assert (tuple(out.reduction_axis), tuple(out.output_axis)) == ((lead, lead + 1), (lead + 2,))
    assert (tuple(wo.reduction_axis), tuple(wo.output_axis)) == ((lead,), (lead + 1,))


def test_muon_orthogonalizes_each_layers_matrix_and_adams_the_rest():
    cfg = OptimizerConfig(optimizer="muon", learning_rate=2e-3, muon_learning_rate=0.03, weight_decay=0.0,
                          clip_norm=None)
    params = _unboxed("gpt2-tiny")  # scanned: query kernel [layers, embed, heads, head_dim]
    leaves, tree = jax.tree.flatten(params)
    grads = tree.unflatten([jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)])  # full rank
    tx = make_optimizer(cfg)
    direction, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g_q = grads["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    d_q = direction["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    L, D, H, K = g_q.shape
    ref = optax.chain(optax.contrib.scale_by_muon(), optax.contrib._muon.scale_by_shape(MuonDimensionNumbers()))
    for i in range(L):
        g2 = g_q[i].reshape(D, H * K)
        r, _ = ref.update(g2, ref.init(g2))
        np.testing.assert_allclose(d_q[i].reshape(D, H * K), r * 0.03 / 2e-3, rtol=1e-3, atol=3e-4)  # f32 NS
    s = np.linalg.svd(np.asarray(d_q[0]).reshape(D, H * K), compute_uv=False)
    assert s.max() / s.min() < 2.0  # Newton-Schulz: all singular values near one (times the lr ratio)
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    emb = grads["embedder"]["token"]["embedding"]
    np.testing.assert_allclose(direction["embedder"]["token"]["embedding"], adam.update(emb, adam.init(emb))[0],
                               rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(muon_learning_rate=-0.1), r"^optim.muon_learning_rate=-0.1 must be a finite number >= 0, e.g. 0.02$"),
    (dict(muon_momentum=1.0), r"^optim.muon_momentum=1.0 must be in \[0, 1\)$"),
])
def test_muon_config_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**kwargs)
