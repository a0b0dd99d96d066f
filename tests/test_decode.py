"""Decoding: greedy equals repeated full forwards, sampling is seeded, filters never leak,
batched prompts decode like each alone, beam search with one beam is greedy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_jax import decode
from transformer_jax.models import build_model, get_config


@pytest.fixture(scope="module")
def lm():
    cfg = get_config("llama-tiny")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return model, params


@pytest.fixture(scope="module")
def seq2seq():
    cfg = get_config("t5-tiny")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 4), jnp.int32))["params"]
    return model, params


def test_greedy_equals_argmax_of_full_forwards(lm):
    model, params = lm
    prompts = [[5, 6, 7, 8, 9], [3, 4]]
    out = decode.generate(model, params, prompts, max_new_tokens=6)
    forward = jax.jit(lambda t: model.apply({"params": params}, t))
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(jnp.argmax(forward(jnp.asarray([seq]))[0, -1])))
        assert out.tokens[row].tolist() == seq[len(prompt):]
    assert list(decode.stream(model, params, prompts[0], max_new_tokens=6)) == out.tokens[0].tolist()


def test_batched_prompts_equal_each_alone_and_sampling_is_seeded(lm):
    model, params = lm
    prompts = [[9, 8, 7, 6, 5, 4], [11], [12, 13, 14]]
    kw = dict(max_new_tokens=5, temperature=1.0, top_k=50, seed=3)
    batched = decode.generate(model, params, prompts, **kw)
    np.testing.assert_array_equal(batched.tokens, decode.generate(model, params, prompts, **kw).tokens)
    assert not np.array_equal(batched.tokens, decode.generate(model, params, prompts, **dict(kw, seed=4)).tokens)
    greedy = decode.generate(model, params, prompts, max_new_tokens=5)
    for row, prompt in enumerate(prompts):
        alone = decode.generate(model, params, [prompt], max_new_tokens=5)
        np.testing.assert_array_equal(greedy.tokens[row], alone.tokens[0])


def test_stops_at_eos(lm):
    model, params = lm
    first = decode.generate(model, params, [[5, 6]], max_new_tokens=6).tokens[0].tolist()
    k = max(i for i in range(6) if first[i] not in first[:i])  # the last token that is new
    out = decode.generate(model, params, [[5, 6]], max_new_tokens=6, eos_id=first[k], pad_id=0)
    assert out.lengths[0] == k + 1 and out.tokens[0, :k + 1].tolist() == first[:k + 1]
    assert (out.tokens[0, k + 1:] == 0).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.integers(1, 20), top_p=st.floats(0.05, 1.0))
def test_top_k_and_top_p_never_emit_excluded_tokens(seed, top_k, top_p):
    logits = jax.random.normal(jax.random.key(seed), (4, 64)) * 3
    draws = jax.vmap(lambda k: decode.sample(k, logits, temperature=1.0, top_k=top_k, top_p=top_p))(
        jax.random.split(jax.random.key(seed + 1), 32))  # [32, 4]
    probs = np.asarray(jax.nn.softmax(logits, -1))
    for row in range(4):
        order = np.argsort(-probs[row])
        allowed = set(order[:top_k].tolist())
        mass_before = np.cumsum(probs[row][order]) - probs[row][order]
        allowed &= set(order[mass_before < top_p].tolist())
        assert set(np.asarray(draws[:, row]).tolist()) <= allowed


def test_bad_sampling_settings(lm):
    model, params = lm
    for kw, message in [(dict(top_p=0.0), "top_p=0.0 must be in"), (dict(temperature=-1), "temperature=-1 must be"),
                        (dict(top_k=-2), "top_k=-2 must be >= 0"), (dict(max_new_tokens=0), "max_new_tokens=0")]:
        with pytest.raises(ValueError, match=message):
            decode.generate(model, params, [[1]], **{"max_new_tokens": 3, **kw})
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        decode.generate(model, params, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        decode.generate(build_model(get_config("gpt2-tiny")), None, [[1] * 60], max_new_tokens=10)


def test_encoder_decoder_greedy_and_beam_of_one_agree(seq2seq):
    model, params = seq2seq
    inputs = [[5, 6, 7, 8], [9, 10]]
    greedy = decode.generate(model, params, [[1], [1]], inputs=inputs, max_new_tokens=5)
    beam1 = decode.beam_search(model, params, inputs, beam_size=1, max_new_tokens=5, eos_id=2, bos_id=1)
    np.testing.assert_array_equal(greedy.tokens, beam1.tokens)
    # Greedy matches the argmax of full teacher-forced forwards.
    fwd = jax.jit(lambda i, d: model.apply({"params": params}, i, d))
    seq = [1]
    for _ in range(5):
        seq.append(int(jnp.argmax(fwd(jnp.asarray([inputs[0]]), jnp.asarray([seq]))[0, -1])))
    assert greedy.tokens[0].tolist() == seq[1:]


def test_beam_search_finds_a_likelier_sequence_than_greedy(seq2seq):
    """With 4 beams and no length penalty the best hypothesis scores at least greedy's log-prob."""
    model, params = seq2seq
    inputs = [[5, 6, 7, 8], [9, 10, 11]]
    fwd = jax.jit(lambda i, d: model.apply({"params": params}, i, d))
    def logprob(inp, out):
        dec = jnp.asarray([[1] + out[:-1]])
        lp = jax.nn.log_softmax(fwd(jnp.asarray([inp]), dec)[0])
        return float(sum(lp[t, tok] for t, tok in enumerate(out)))
    greedy = decode.generate(model, params, [[1], [1]], inputs=inputs, max_new_tokens=4)
    beam = decode.beam_search(model, params, inputs, beam_size=4, max_new_tokens=4, alpha=0.0, eos_id=2, bos_id=1)
    for row, inp in enumerate(inputs):
        assert logprob(inp, beam.tokens[row].tolist()) >= logprob(inp, greedy.tokens[row].tolist()) - 1e-4


def test_decoding_on_a_mesh_equals_one_device(lm, monkeypatch):
    """dp_tp on (data=4, tensor=2): rows split over data, heads and the KV cache over tensor
    (grown once, 8 -> 11 slots); the same tokens as one device, and the compiled loops really
    hold tensor-parallel all-reduces."""
    import flax.linen as nn
    from transformer_jax.parallel import logical_shardings
    from transformer_jax.parallel.mesh import MeshConfig, make_mesh
    from transformer_jax.parallel.rules import get_rules

    model, params = lm
    prompts = [[5, 6, 7, 8, 9], [3, 4], [7], [9, 9, 9]]
    monkeypatch.setattr(decode, "CACHE_BLOCK", 4)
    assert decode.cache_capacities(5, 6) == (8, 11)
    want = decode.generate(model, params, prompts, max_new_tokens=6, temperature=0.7, seed=3)
    mesh, rules = make_mesh(MeshConfig(data=4, fsdp=1, tensor=2)), get_rules("dp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
        sharded = jax.device_put(params, logical_shardings(abstract, mesh, rules))
        got = decode.generate(model, sharded, prompts, max_new_tokens=6, temperature=0.7, seed=3)
        tokens, seg, pos, lengths = decode.left_pad(prompts)
        hlo = decode._generate.lower(decode.decoding_model(model), sharded, tokens, seg, pos, jnp.asarray(lengths), jax.random.key(3),
                                     None, None, max_new_tokens=6, temperature=0.7, top_k=0, top_p=1.0, eos_id=None,
                                     pad_id=0).compile().as_text()
    assert any(s.spec and "tensor" in str(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, sharded)))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert "all-reduce" in hlo


@pytest.mark.parametrize("prompts", [[[5, 6, 7], [8, 9]], [[5, 6, 7]]])
def test_generate_compiles_once_and_updates_the_cache_in_place(lm, prompts):
    """A second call of the same shapes reuses the compiled loop (no host trace), the
    compiled loops neither copy nor transpose a layer's whole KV cache [B, K, S, D] at any of
    its sizes (each step writes its token's keys/values into the carried buffer, after reading
    it: at batch 1 XLA had copied it four times per layer and step), and the prefill projects
    only each row's last position onto the vocabulary."""
    model, params = lm
    b = len(prompts)
    decode.generate(model, params, prompts, max_new_tokens=34)
    compiled = decode._generate._cache_size()
    decode.generate(model, params, [[1, 2, 3], [4]][:b], max_new_tokens=34)
    assert decode._generate._cache_size() == compiled
    tokens, seg, pos, lengths = decode.left_pad(prompts)
    caps = (16, 32, 37)  # three token loops
    hlo = decode._generate.lower(decode.decoding_model(model), params, tokens, seg, pos, jnp.asarray(lengths),
                                 jax.random.key(0), None, None, max_new_tokens=34, temperature=0.0, top_k=0, top_p=1.0,
                                 eos_id=None, pad_id=0, caps=caps).compile().as_text()
    assert hlo.count("dynamic-update-slice") >= len(caps)
    for slots in caps:
        cache = f"f32[{b},2,{slots},8]"  # batch b, 2 kv heads, head_dim 8
        assert cache in hlo
        moves = [line for line in hlo.splitlines()
                 if (m := re.match(r"\s*(?:ROOT )?%([\w.-]+) = (\S+) (\w+)\(", line)) and m[2].startswith(cache)
                 and ("transpose" in m[1] or m[3] in ("copy", "transpose"))]
        assert not moves, moves[:3]
    v = model.config.vocab_size
    assert f"f32[{b},{v}]" in hlo  # the last position's logits
    assert f"f32[{3 * b},{v}]" not in hlo and f"f32[{b},3,{v}]" not in hlo  # not all 3 prompt positions


@pytest.mark.parametrize("prompt_len, new", [(1, 1), (3, 1), (5, 200), (127, 1), (128, 1), (200, 3000), (32, 2048)])
def test_cache_capacities_grow_from_above_the_prompt_to_the_total(prompt_len, new):
    total = prompt_len + new
    caps = decode.cache_capacities(prompt_len, new)
    assert caps[0] > prompt_len and caps[-1] == total and len(caps) <= 3  # room for the first step's key
    assert all(c >= decode.CACHE_BLOCK and c & (c - 1) == 0 and 1.25 * c < total for c in caps[:-1])
    assert all(2 * a == b for a, b in zip(caps[:-2], caps[1:-1])) and all(b <= 2.5 * a for a, b in zip(caps, caps[1:]))
    assert (decode.cache_capacities(32, 2048) == (512, 1024, 2080)) and decode.cache_capacities(32, 64) == (96,)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "mistral-window", "t5-tiny"])
def test_a_growing_cache_decodes_as_one_cache_of_the_final_size(name, monkeypatch):
    """The cache grown twice (16, 32, then the 47 or 42 slots needed: RoPE or learned positions, a sliding
    window, T5's relative bias with its cross-attention cache, left-padded rows, sampling and
    EOS carried across the loops) gives the tokens of one cache of the final size."""
    cfg = get_config("llama-tiny", sliding_window=5) if name == "mistral-window" else get_config(name)
    model = build_model(cfg)
    seq2seq = cfg.family == "encoder_decoder"
    dec = jnp.ones((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), *((jnp.ones((1, 8), jnp.int32), dec) if seq2seq else (dec,)))
    prompts, kw = [[5, 6, 7, 8, 9, 10, 11], [3, 4]], dict(max_new_tokens=40, temperature=0.8, seed=2)
    if seq2seq:
        prompts, kw = [[1], [1, 7]], dict(kw, inputs=[[5, 6, 7, 8], [9, 10]])
    out = {}
    for block in (8, 10**6):
        monkeypatch.setattr(decode, "CACHE_BLOCK", block)
        out[block] = decode.generate(model, params["params"], prompts, **kw)
        eos = int(out[block].tokens[1, 20])
        out[block, "eos"] = decode.generate(model, params["params"], prompts, eos_id=eos, **kw)
    assert decode.cache_capacities(7, 40, first=8) == (16, 32, 47) and decode.cache_capacities(7, 40) == (47,)
    np.testing.assert_array_equal(out[8].tokens, out[10**6].tokens)
    np.testing.assert_array_equal(out[8, "eos"].tokens, out[10**6, "eos"].tokens)
    np.testing.assert_array_equal(out[8, "eos"].lengths, out[10**6, "eos"].lengths)
    assert out[8, "eos"].lengths[1] <= 21


def test_bf16_decoding_runs_batched_and_starts_with_the_forward_argmax():
    """bf16 params and compute at batch 2 (XLA:CPU cannot run a batched bf16 x bf16 -> f32
    dot; the `xla` kernel computes in f32 there)."""
    cfg = get_config("llama-tiny", dtype="bfloat16", param_dtype="bfloat16")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    out = decode.generate(model, params, prompts, max_new_tokens=4)
    assert out.tokens.shape == (2, 4) and (out.lengths == 4).all()
    first = jnp.argmax(model.apply({"params": params}, jnp.asarray(prompts))[:, -1], -1)
    np.testing.assert_array_equal(out.tokens[:, 0], np.asarray(first))


@pytest.mark.parametrize("v", [256, 384, 100])
def test_greedy_is_argmax_with_ties_and_nan(v):
    """Two-pass argmax: the first maximum, as `jnp.argmax` gives, also where ties cross blocks
    and where a row holds NaN (argmax's maximum); a vocabulary not a multiple of the block too."""
    rng = np.random.default_rng(v)
    logits = rng.integers(0, 4, (64, v)).astype(np.float32)  # many ties, in several blocks
    logits[3, rng.integers(0, v, 3)] = np.nan
    logits[5] = -np.inf
    got = jax.jit(decode.greedy)(jnp.asarray(logits))
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), -1))
    assert got.dtype == jnp.int32


def test_one_row_decoding_reads_the_tied_output_layer_as_a_gemv():
    """At batch 1 the tied output layer is a dot of the table against the row ([V, 1]), which
    XLA:CPU gives its GEMV, not a vector-matrix dot fused with the final norm into an
    elementwise loop (1.6x slower on the bench model's table)."""
    model = build_model(get_config("gpt2-tiny"))
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    tokens, seg, pos, lengths = decode.left_pad([[5, 6, 7]])
    hlo = decode._generate.lower(decode.decoding_model(model), params, tokens, seg, pos, jnp.asarray(lengths),
                                 jax.random.key(0), None, None, max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0,
                                 eos_id=None, pad_id=0).compile().as_text()
    v = model.config.vocab_size
    assert re.search(rf"= f32\[{v},1\]\{{1,0\}} dot\(", hlo), "no [V, 1] GEMV of the table"
    fused = [c for c in hlo.split("\n\n") if " dot(" in c and f"f32[{v}]" in c.split("\n")[0]]
    assert not fused, fused[0][:300]
