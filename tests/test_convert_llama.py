"""Llama / Mistral / Qwen2 interop: tiny random transformers models saved to disk (float32 and
bfloat16 shards), imported and compared logit for logit (<= 1e-4 in float32), greedy-decoded with
the KV cache against transformers' `generate`, exported and reloaded into transformers."""
import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T

from transformer_jax import decode
from transformer_jax.config import ConfigError
from transformer_jax.convert import load_hf, save_hf
from transformer_jax.models import build_model, get_config

TOL = 1e-4
VOCAB = 96
_JIT = {}
_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    # Llama 3.1: GQA, untied head, rope_theta 500000 with llama3 scaling (original context 16: every band used)
    "llama3": lambda: T.LlamaConfig(**_SIZES, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    # Llama 2 style: multi-head, tied head, linear scaling
    "llama2_tied": lambda: T.LlamaConfig(**dict(_SIZES, num_key_value_heads=4), tie_word_embeddings=True,
                                         rope_scaling=dict(rope_type="linear", factor=2.0)),
    "mistral": lambda: T.MistralConfig(**_SIZES, sliding_window=5, head_dim=16),  # head_dim * heads != hidden
    "qwen2": lambda: T.Qwen2Config(**_SIZES, tie_word_embeddings=True),
}


def noisy(model, std=0.3):
    """Every weight random (norm scales and biases start at exactly 1 and 0): logits of order 1."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (transformers model, its float32 save_pretrained directory)."""
    out = {}
    for name, make in FAMILIES.items():
        model = noisy(T.AutoModelForCausalLM.from_config(make(), attn_implementation="eager"))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = model, path
    return out


def hf_logits(model, tokens, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw).logits.numpy()


def apply(cfg, params, tokens, **kw):
    if cfg not in _JIT:
        _JIT[cfg] = jax.jit(build_model(cfg).apply)
    return np.asarray(_JIT[cfg]({"params": params}, jnp.asarray(tokens), **kw))


def tokens(seed=0, batch=2, length=24):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_dirs, family):
    model, path = hf_dirs[family]
    imp = load_hf(path)
    assert imp.unused == ()
    x = tokens()
    diff = np.abs(apply(imp.config, imp.params, x) - hf_logits(model, x)).max()
    print(f"{family}: max abs logit difference {diff:.3g}")
    assert diff <= TOL


def test_configs_carry_each_family_feature(hf_dirs):
    cfgs = {f: load_hf(p).config for f, (_, p) in hf_dirs.items()}
    assert cfgs["llama3"].rope_scaling.kind == "llama3" and cfgs["llama3"].rope_theta == 500000.0
    assert cfgs["llama3"].kv_heads == 2 and not cfgs["llama3"].tie_embeddings
    assert cfgs["llama2_tied"].rope_scaling.kind == "linear" and cfgs["llama2_tied"].tie_embeddings
    assert cfgs["mistral"].sliding_window == 5 and cfgs["mistral"].dim_per_head == 16
    assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].use_bias


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_decode_matches_hf_generate(hf_dirs, family):
    """Left-padded prompts of two lengths, 16 new tokens with the KV cache: the same tokens as
    transformers' greedy generate (Mistral's window of 5 is passed many times over)."""
    model, path = hf_dirs[family]
    imp = load_hf(path)
    prompts = [list(tokens(1, 1, 7)[0]), list(tokens(2, 1, 3)[0])]
    n = 16
    ours = decode.generate(build_model(imp.config), imp.params, prompts, max_new_tokens=n, eos_id=2)
    width = max(map(len, prompts))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=n, pad_token_id=0, eos_token_id=2)[:, width:].numpy()
    for i in range(2):
        k = int(ours.lengths[i])
        np.testing.assert_array_equal(ours.tokens[i, :k], ref[i, :k])
        assert k == n or ref[i, k - 1] == 2


def test_bf16_sharded_checkpoint(tmp_path):
    """bfloat16 weights in 3+ shards with an index: imported exactly (as float32), logits match the
    float32 model holding the same bf16-rounded weights; a missing shard is a one-line error."""
    model = noisy(T.LlamaForCausalLM(FAMILIES["llama3"]()))
    with torch.no_grad():
        for p in model.parameters():  # parameters only: `.to(bfloat16)` would round the rope buffer too
            p.copy_(p.bfloat16().float())
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    imp = load_hf(tmp_path)
    assert imp.unused == ()
    x = tokens()
    assert np.abs(apply(imp.config, imp.params, x) - hf_logits(model, x)).max() <= TOL
    (tmp_path / shards[1]).unlink()
    with pytest.raises(ConfigError, match=f"not in .*{shards[1]}"):
        load_hf(tmp_path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_reloads_in_transformers(hf_dirs, tmp_path, family):
    model, path = hf_dirs[family]
    imp = load_hf(path)
    out = save_hf(tmp_path / "export", imp.config, imp.params, hf_config=imp.hf_config)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    x = tokens(3)
    assert np.abs(hf_logits(reloaded, x) - hf_logits(model, x)).max() <= 1e-5


@pytest.mark.parametrize("preset", [dict(), dict(sliding_window=4), dict(qkv_bias=True, tie_embeddings=False)])
def test_export_of_our_own_model_picks_the_architecture(tmp_path, preset):
    """A model trained here (no hf_config): llama, mistral (a window) or qwen2 (q/k/v biases),
    LoRA adapters merged on the way out; transformers' logits equal ours."""
    cfg = get_config("llama-tiny", vocab_size=VOCAB, lora_rank=2, lora_alpha=2.0, **preset)
    x = tokens(4)
    params = build_model(cfg).init(jax.random.key(0), jnp.asarray(x))["params"]
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(1), p.shape), params)  # B != 0
    out = save_hf(tmp_path / "export", cfg, params)
    want = "qwen2" if preset.get("qkv_bias") else "mistral" if "sliding_window" in preset else "llama"
    assert json.loads((out / "config.json").read_text())["model_type"] == want
    reloaded = T.AutoModelForCausalLM.from_pretrained(out).eval()
    assert np.abs(hf_logits(reloaded, x) - apply(cfg, params, x)).max() <= TOL


def test_errors_name_the_setting(hf_dirs, tmp_path):
    _, path = hf_dirs["llama3"]
    hf = json.loads((path / "config.json").read_text())

    def load(**changes):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps(dict(hf, **changes)))
        (d / "model.safetensors").symlink_to(path / "model.safetensors")
        return load_hf(d)

    with pytest.raises(ConfigError, match="rope_type='yarn' is not supported"):
        load(rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4))
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        load(hidden_act="gelu")
    with pytest.raises(ConfigError, match="attention_bias"):
        load(attention_bias=True)
    with pytest.raises(ConfigError, match="mixes sliding and full"):
        load(model_type="mistral", sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ConfigError, match="cannot export .*qkv_bias=True"):
        save_hf(tmp_path / "x", get_config("llama-tiny", qkv_bias=True), {}, hf_config={"model_type": "llama"})
