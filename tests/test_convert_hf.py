"""Hugging Face interop: tiny random-weight transformers models (GPT-2, BERT, T5) saved to disk,
imported, compared logit for logit (max abs difference <= 1e-4 in float32, with padding),
exported and reloaded into transformers (logits equal)."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import save_file as torch_save_safetensors
from transformers.models.t5.modeling_t5 import T5Attention

from transformer_jax.config import ConfigError
from transformer_jax.convert import load_hf, read_state_dict, save_hf
from transformer_jax.layers.embeddings import t5_relative_bucket
from transformer_jax.models import build_model, get_config

TOL = 1e-4
VOCAB = 100
B, L = 2, 10
_JIT = {}


def noisy(model):
    """Perturbs every weight (norm scales and biases start at exactly 1 and 0) and sets eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()


def apply(cfg, params, *args, **kwargs):
    if cfg not in _JIT:
        _JIT[cfg] = jax.jit(build_model(cfg).apply, static_argnames=("head",))
    return np.asarray(_JIT[cfg]({"params": params}, *args, **kwargs))


def assert_close(ours, ref, mask=None):
    diff = np.abs(ours - ref)
    diff = diff[mask.astype(bool)] if mask is not None else diff
    assert diff.max() <= TOL, f"max abs difference {diff.max():.3g} > {TOL}"


def assert_matches_init(cfg, params, *args, **kwargs):
    """The imported tree has exactly the paths, shapes and dtypes of build_model(cfg).init."""
    abstract = jax.eval_shape(lambda: build_model(cfg).init(jax.random.key(0), *args, **kwargs))["params"]
    want = jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(abstract))
    got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert got == want


def batch(seed=0, length=L):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (B, length))
    mask = np.ones((B, length), np.int32)
    mask[1, length - 3:] = 0  # right padding in row 1
    return tokens, mask


def write_bin(model, path, rename=lambda k: k):
    """A PyTorch state-dict checkpoint (pytorch_model.bin + config.json), as older models ship."""
    model.config.save_pretrained(path)
    torch.save({rename(k): v for k, v in model.state_dict().items()}, path / "pytorch_model.bin")


def test_t5_relative_bucket_matches_transformers():
    rel = np.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), bidirectional, buckets, distance)
            ours = t5_relative_bucket(jnp.asarray(rel), bidirectional, buckets, distance)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


# -- GPT-2 ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for tied in (True, False):
        cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                           eos_token_id=0, tie_word_embeddings=tied)
        model = noisy(T.GPT2LMHeadModel(cfg))
        path = tmp_path_factory.mktemp(f"gpt2_tied{tied}")
        model.save_pretrained(path)
        out[tied] = (model, path)
    bin_path = tmp_path_factory.mktemp("gpt2_bin")
    write_bin(out[True][0], bin_path)
    out["bin"] = (out[True][0], bin_path)
    return out


@pytest.mark.parametrize("tied,scan", [(True, True), (False, False)])
def test_gpt2_parity_and_round_trip(gpt2_dirs, tmp_path, tied, scan):
    hf_model, path = gpt2_dirs[tied]
    imp = load_hf(path, scan_layers=scan)
    cfg = imp.config
    assert (cfg.family, cfg.vocab_size, cfg.tie_embeddings, cfg.activation) == ("decoder", VOCAB, tied, "gelu_tanh")
    assert imp.unused == ()
    tokens, mask = batch()
    assert_matches_init(cfg, imp.params, tokens)

    ref = hf_logits(hf_model, input_ids=tokens, attention_mask=mask)
    assert_close(apply(cfg, imp.params, tokens, segment_ids=mask), ref, mask)
    # Left padding: transformers needs explicit position ids, as does this library.
    left = np.flip(mask, 1).copy()
    pos = np.clip(np.cumsum(left, 1) - 1, 0, None)
    ref_left = hf_logits(hf_model, input_ids=tokens, attention_mask=left, position_ids=pos)
    assert_close(apply(cfg, imp.params, tokens, segment_ids=left, positions=pos), ref_left, left)

    out = save_hf(tmp_path / "export", cfg, imp.params, hf_config=imp.hf_config)
    reloaded = T.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids=tokens, attention_mask=mask), ref)


def test_gpt2_bin_sharded_and_bfloat16_checkpoints_import_alike(gpt2_dirs, tmp_path):
    hf_model, path = gpt2_dirs[True]
    a, b = load_hf(path), load_hf(gpt2_dirs["bin"][1])
    assert a.config == b.config and b.unused == ()  # the .bin's tied lm_head copy is recognised
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)

    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    jax.tree.map(np.testing.assert_array_equal, a.params, load_hf(tmp_path / "sharded").params)

    T.GPT2LMHeadModel.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    wte = load_hf(tmp_path / "bf16").params["embedder"]["token"]["embedding"]
    np.testing.assert_array_equal(wte, hf_model.transformer.wte.weight.detach().bfloat16().float().numpy())


def test_safetensors_import_needs_neither_torch_nor_transformers(gpt2_dirs):
    code = ("import sys; sys.modules['torch'] = sys.modules['transformers'] = None\n"
            "from transformer_jax.convert import load_hf\n"
            f"print(load_hf({str(gpt2_dirs[True][1])!r}).config.num_layers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr[-2000:]


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_export_of_a_model_initialised_here(tmp_path, name):
    """Boxed params straight from init, scanned layers, a library preset: transformers agrees."""
    cfg = get_config(name, vocab_size=VOCAB, max_len=32)
    tokens, mask = batch(7)
    head = {"head": "mlm"} if cfg.family == "encoder" else {}
    params = jax.jit(lambda: build_model(cfg).init(jax.random.key(0), tokens, **head))()["params"]
    ours = apply(cfg, nn.meta.unbox(params), tokens, segment_ids=mask, **head)
    out = save_hf(tmp_path / "export", cfg, params)
    auto = T.GPT2LMHeadModel if cfg.family == "decoder" else T.BertForMaskedLM
    assert_close(ours, hf_logits(auto.from_pretrained(out).eval(), input_ids=tokens, attention_mask=mask), mask)


def test_gpt2_vocab_padding_and_export_strips_it(gpt2_dirs, tmp_path):
    hf_model, path = gpt2_dirs[True]
    imp = load_hf(path, pad_vocab_to=64)
    assert (imp.config.vocab_size, imp.vocab_size) == (128, VOCAB)
    table = imp.params["embedder"]["token"]["embedding"]
    assert table.shape == (128, 32) and not table[VOCAB:].any()
    tokens, mask = batch(1)
    ours = apply(imp.config, imp.params, tokens, segment_ids=mask)
    ref = hf_logits(hf_model, input_ids=tokens, attention_mask=mask)
    assert_close(ours[..., :VOCAB], ref, mask)
    assert not ours[..., VOCAB:].any()  # zero rows give zero logits

    out = save_hf(tmp_path / "export", imp.config, imp.params, hf_config=imp.hf_config)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    reloaded = T.GPT2LMHeadModel.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids=tokens, attention_mask=mask), ref)


# -- BERT -------------------------------------------------------------------------------------------
def bert_config(**kw):
    return T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, **kw)


@pytest.mark.parametrize("fmt", ["safetensors", "legacy_bin"])
def test_bert_mlm_parity_and_round_trip(tmp_path, fmt):
    torch.manual_seed(1)
    hf_model = noisy(T.BertForMaskedLM(bert_config()))
    if fmt == "safetensors":
        hf_model.save_pretrained(tmp_path / "hf")
    else:  # an old-style state dict: LayerNorm gamma/beta names and an explicit tied decoder copy
        write_bin(hf_model, tmp_path / "hf", lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma")
                  .replace("LayerNorm.bias", "LayerNorm.beta"))
    imp = load_hf(tmp_path / "hf", pad_vocab_to=64 if fmt == "legacy_bin" else None)
    cfg = imp.config
    assert (cfg.family, cfg.norm_position, cfg.embed_norm, cfg.activation) == ("encoder", "post", True, "gelu")
    assert imp.unused == ()
    tokens, mask = batch(2)
    types = np.random.default_rng(3).integers(0, 2, tokens.shape)
    assert_matches_init(cfg, imp.params, tokens, head="mlm")

    ref = hf_logits(hf_model, input_ids=tokens, attention_mask=mask, token_type_ids=types)
    ours = apply(cfg, imp.params, tokens, segment_ids=mask, token_types=types, head="mlm")
    assert_close(ours[..., :VOCAB], ref, mask)

    out = save_hf(tmp_path / "export", cfg, imp.params, hf_config=imp.hf_config)
    reloaded = T.BertForMaskedLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids=tokens, attention_mask=mask, token_type_ids=types), ref)


def test_bert_classifier_parity_and_round_trip(tmp_path):
    torch.manual_seed(2)
    hf_model = noisy(T.BertForSequenceClassification(bert_config(num_labels=3)))
    hf_model.save_pretrained(tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    assert imp.config.num_classes == 3 and imp.unused == ()
    assert set(imp.params) == {"embedder", "encoder", "classifier"}
    tokens, mask = batch(4)
    assert_matches_init(imp.config, imp.params, tokens, head="classify")

    ref = hf_logits(hf_model, input_ids=tokens, attention_mask=mask)
    assert_close(apply(imp.config, imp.params, tokens, segment_ids=mask, head="classify"), ref)

    out = save_hf(tmp_path / "export", imp.config, imp.params, hf_config=imp.hf_config)
    reloaded = T.BertForSequenceClassification.from_pretrained(out).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids=tokens, attention_mask=mask), ref)


# -- T5 ---------------------------------------------------------------------------------------------
def t5_model(version):
    """v1.0 (t5-small style): ReLU, lm_head tied to `shared`, decoder output scaled by d_model**-0.5.
    v1.1 (flan-t5 style): gated GELU, its own lm_head, no scaling, more decoder than encoder layers."""
    torch.manual_seed(3)
    v11 = version == "v1.1"
    cfg = T.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3 if v11 else 2,
                     num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     feed_forward_proj="gated-gelu" if v11 else "relu", tie_word_embeddings=not v11)
    model = noisy(T.T5ForConditionalGeneration(cfg))
    if v11:  # transformers 5 always ties lm_head to shared; a real v1.1 checkpoint has its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    return model


def save_t5(model, version, path):
    if version == "v1.0":
        model.save_pretrained(path)
        return
    # As flan-t5 ships: every tensor (tied embedding copies included) and tie_word_embeddings=false.
    path.mkdir()
    torch_save_safetensors({k: v.clone().contiguous() for k, v in model.state_dict().items()},
                           path / "model.safetensors", metadata={"format": "pt"})
    hf = model.config.to_dict()
    hf.pop("scale_decoder_outputs")
    (path / "config.json").write_text(json.dumps(dict(hf, tie_word_embeddings=False)))


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_t5_parity_and_round_trip(tmp_path, version):
    hf_model = t5_model(version)
    save_t5(hf_model, version, tmp_path / "hf")
    imp = load_hf(tmp_path / "hf")
    cfg = imp.config
    v10 = version == "v1.0"
    assert (cfg.activation, cfg.tie_embeddings, cfg.scale_tied_logits) == (("relu", True, True) if v10
                                                                           else ("geglu", False, False))
    assert imp.unused == ()
    inputs, mask = batch(5, length=12)
    targets = np.random.default_rng(6).integers(0, VOCAB, (B, 7))
    assert_matches_init(cfg, imp.params, inputs, targets)

    ref = hf_logits(hf_model, input_ids=inputs, attention_mask=mask, decoder_input_ids=targets)
    assert_close(apply(cfg, imp.params, inputs, targets, input_segment_ids=mask), ref)

    out = save_hf(tmp_path / "export", cfg, imp.params, hf_config=imp.hf_config)
    reloaded = T.T5ForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_array_equal(
        hf_logits(reloaded, input_ids=inputs, attention_mask=mask, decoder_input_ids=targets), ref)


# -- errors -----------------------------------------------------------------------------------------
def test_errors_name_the_setting(tmp_path, gpt2_dirs):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(ConfigError, match="model_type='falcon'"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_state_dict(tmp_path)

    odd = tmp_path / "odd"
    odd.mkdir()
    hf = json.loads((gpt2_dirs[True][1] / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(dict(hf, scale_attn_by_inverse_layer_idx=True)))
    (odd / "model.safetensors").symlink_to(gpt2_dirs[True][1] / "model.safetensors")
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        load_hf(odd)

    with pytest.raises(ConfigError, match="cannot export as GPT-2: position='sinusoidal'"):
        save_hf(tmp_path / "out", get_config("gpt2-tiny", position="sinusoidal"), {})
    imp = load_hf(gpt2_dirs[True][1])
    with pytest.raises(ConfigError, match="model_type='bert'"):
        save_hf(tmp_path / "out", imp.config, imp.params, hf_config={"model_type": "bert"})
