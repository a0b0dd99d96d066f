"""Shared helpers for model tests: tiny configs, inputs and a forward call per family."""
import jax
import jax.numpy as jnp

from transformer_jax.models import build_model, get_config

TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "transformer-tiny"]


def tokens(key, shape, vocab=256):
    return jax.random.randint(jax.random.key(key), shape, 1, vocab)


def inputs_for(cfg, batch=2, length=16):
    """Positional model inputs: (tokens,) or (inputs, decoder_inputs) for encoder-decoders."""
    t = tokens(1, (batch, length), cfg.vocab_size)
    if cfg.family == "encoder_decoder":
        return (t, tokens(2, (batch, length // 2), cfg.vocab_size))
    return (t,)


def init_and_apply(name, batch=2, length=16, **overrides):
    cfg = get_config(name, **overrides)
    model = build_model(cfg)
    args = inputs_for(cfg, batch, length)
    variables = jax.jit(model.init)(jax.random.key(0), *args)
    return cfg, model, variables, args


def stack_unrolled(params):
    """Converts unrolled-layer params (layer_0, layer_1, ...) into the scanned layout ("layers")."""
    if not isinstance(params, dict):
        return params
    if "layer_0" in params:
        return stack_unrolled({"_": params})["_"]
    out = {}
    for k, v in params.items():
        if isinstance(v, dict) and "layer_0" in v:
            n = len([x for x in v if x.startswith("layer_")])
            out[k] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[v[f"layer_{i}"] for i in range(n)])}
        else:
            out[k] = stack_unrolled(v)
    return out


_JITTED = {}


def jit_apply(model):
    """`model.apply`, jitted once per (model class, config); the tests compile, never run eagerly."""
    key = (type(model), model.config)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(model.apply, static_argnames=("head", "method", "decode", "mutable", "deterministic"))
    return _JITTED[key]


def compiled_lm_step(cfg, batch: int, length: int):
    """The compiled train step of `cfg` on a causal-LM batch, on one device (AdamW, fsdp_tp rules)."""
    from transformer_jax.parallel import MeshConfig, get_rules, make_mesh
    from transformer_jax.train import OptimizerConfig, TaskConfig, make_train_setup, synthetic_batch
    data = synthetic_batch("lm", batch, length, cfg.vocab_size, fill=1.0)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    setup = make_train_setup(cfg, OptimizerConfig(learning_rate=1e-3, warmup_steps=0), TaskConfig(task="lm"),
                             mesh, get_rules("fsdp_tp"), total_steps=10)
    return setup.compiled_train_step(data)
