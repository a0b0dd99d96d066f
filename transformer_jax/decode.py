"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling for
`DecoderLM` and `EncoderDecoder`, and beam search with a length penalty for `EncoderDecoder`.

    out = generate(model, params, prompts, max_new_tokens=64, temperature=0.8, top_p=0.95, eos_id=2)
    out.tokens   # [B, max_new_tokens] int32, pad_id after each row's EOS
    out.lengths  # [B] tokens generated per row (EOS included)

Prompts of different lengths are left-padded into one batch: padding has segment id 0, so
no row attends to it, and positions restart at each row's first real token, so a row decodes
exactly as it would alone. One jitted prefill runs the prompts (only each row's last position
goes through the output layer: [B, V] logits, not [B, P, V]); a `lax.while_loop` then decodes a
token per iteration until every row hit EOS or `max_new_tokens`.

Decoding runs the layers unrolled (`decoding_model`): a model trained with `nn.scan` over
layers has its stacked params sliced per layer inside the jitted call. Scanned, every layer's
KV cache would be a slice of the scan's xs/ys and each step would copy the whole stacked cache;
unrolled, each layer's cache is its own buffer in the loop carry, updated in place by a
`dynamic_update_slice`. A step still reads every slot of its cache, filled or not, so the
cache grows with the tokens (`cache_capacities`: up to three sizes, e.g. 512, 1024, then the
final 2080 slots for a prompt of 32 and 2048 new tokens), one token loop per size, the cache
padded once between them. The cache is created inside the jitted call; the compiled program
is reused by every call with the same model, batch, prompt length and settings.

On a mesh, decode inside the mesh and logical rules with the params placed by their logical
shardings: rows then split over `data`, heads and the KV cache over `tensor`.

    with jax.set_mesh(mesh), nn.logical_axis_rules(get_rules("dp_tp")):   # or TrainSetup.context()
        out = generate(model, sharded_params, prompts, max_new_tokens=64)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30
CACHE_BLOCK = 128  # the first KV cache `generate` makes holds at least this many positions


@dataclasses.dataclass
class Generated:
    tokens: np.ndarray  # [B, N]
    lengths: np.ndarray  # [B]


# -- sampling ---------------------------------------------------------------------------

def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k and outside the top-p nucleus to -inf (0 / 1.0 = off)."""
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, NEG_INF, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BV, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p  # the smallest prefix whose mass reaches top_p (never empty)
        threshold = jnp.min(jnp.where(keep, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold, NEG_INF, logits_BV)
    return logits_BV


def greedy(logits_BV: jax.Array, block: int = 128) -> jax.Array:
    """argmax over the vocabulary [B] (ties and NaN as `jnp.argmax`: the first index), as the
    argmax within the block of `block` columns that holds the first maximum of the block maxima.
    XLA:CPU's argmax, a reduction of (value, index) pairs, runs ~10x slower than a max: on the
    bench model's [8, 32768] logits 0.60 -> 0.11 ms (2.1 -> 0.26 at 32 rows), per decode step."""
    b, v = logits_BV.shape
    if v % block:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    blocks_BNW = logits_BV.reshape(b, v // block, block)
    best_B = jnp.argmax(jnp.max(blocks_BNW, axis=-1), axis=-1)
    row_BW = jnp.take_along_axis(blocks_BNW, best_B[:, None, None], axis=1)[:, 0]
    return (best_B * block + jnp.argmax(row_BW, axis=-1)).astype(jnp.int32)


def sample(rng, logits_BV, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Next tokens [B]: argmax when temperature == 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return greedy(logits_BV)
    logits_BV = filter_logits(logits_BV.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


# -- batching prompts -------------------------------------------------------------------

def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """(tokens [B, P], segment_ids [B, P], positions [B, P], lengths [B]) for left-padded prompts."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise ValueError("every prompt needs at least one token (e.g. bos)")
    p = int(lengths.max())
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    seg = np.zeros((len(prompts), p), np.int32)
    pos = np.zeros((len(prompts), p), np.int32)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        tokens[i, p - n:] = prompt
        seg[i, p - n:] = 1
        pos[i, p - n:] = np.arange(n)
    return tokens, seg, pos, lengths


def init_cache(model, batch: int, length: int, encoded: jax.Array | None = None) -> Any:
    """A zero cache for `batch` rows of `length` positions (shapes from eval_shape: no params made)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _cache_shapes(model, batch, length, encoded))


def _cache_shapes(model, batch, length, encoded=None):
    def make():
        tok = jnp.zeros((batch, length), jnp.int32)
        if encoded is None:
            return model.init(jax.random.key(0), tok, decode=True)["cache"]
        return model.init(jax.random.key(0), jnp.zeros(encoded.shape[:2], jnp.int32), tok, decode=True)["cache"]
    return jax.eval_shape(make)


@functools.lru_cache(maxsize=64)
def decoding_model(model):
    """`model` with its layers unrolled and no remat: the graph `generate` decodes with."""
    cfg = model.config
    if not cfg.scan_layers and cfg.remat == "none":
        return model
    return model.clone(config=dataclasses.replace(cfg, scan_layers=False, remat="none"))


def unstack_layers(params, num_layers: int | None = None):
    """Params of a scanned model (each `layers` subtree stacked on axis 0) as an unrolled
    model's (`layer_0`, `layer_1`, ...). Inside jit the slices cost no copies per step."""
    import flax.linen as nn
    params = nn.meta.unbox(params)

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        out = {}
        for key, sub in tree.items():
            if key == "layers":
                n = jax.tree.leaves(sub)[0].shape[0]
                out.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], sub) for i in range(n)})
            else:
                out[key] = walk(sub)
        return out
    return walk(dict(params))


# -- the decode loop --------------------------------------------------------------------

def _last_position_logits(next_fun, args, kwargs, context):
    """A flax interceptor: `Embedder.logits` sees only the last position's hidden state, so a
    prefill of P tokens projects one row per sequence onto the vocabulary instead of P."""
    from transformer_jax.models.embedder import Embedder
    if isinstance(context.module, Embedder) and context.method_name == "logits":
        args = (args[0][:, -1:],) + tuple(args[1:])
    return next_fun(*args, **kwargs)


def _decoder_apply(model, params, cache, tokens, seg, pos, encoded, encoded_seg):
    """Logits [B, 1, V] of the last position and the new cache, for either family."""
    import flax.linen as nn
    with nn.intercept_methods(_last_position_logits):
        if encoded is None:
            logits, mut = model.apply({"params": params, "cache": cache}, tokens, segment_ids=seg, positions=pos,
                                      decode=True, mutable=["cache"])
        else:
            logits, mut = model.apply({"params": params, "cache": cache}, encoded, tokens,
                                      encoded_segment_ids=encoded_seg, segment_ids=seg, positions=pos, decode=True,
                                      method="decode", mutable=["cache"])
    return logits, mut["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id",
                                             "pad_id", "caps"))
def _generate(model, params, tokens, seg, pos, lengths, rng, encoded, encoded_seg, *, max_new_tokens,
              temperature, top_k, top_p, eos_id, pad_id, caps=None):
    """`model` runs scanned or unrolled as given; `generate` passes `decoding_model(model)`.
    `caps`: the cache sizes of the token loops (default `cache_capacities`)."""
    b, p = tokens.shape
    params = unstack_layers(params)
    caps = caps or cache_capacities(p, max_new_tokens)
    cache = init_cache(model, b, caps[0], encoded)
    logits, cache = _decoder_apply(model, params, cache, tokens, seg, pos, encoded, encoded_seg)  # prefill
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    n_out = jnp.zeros((b,), jnp.int32)

    def body(carry):
        i, cache, last_logits, done, out, n_out, rng = carry
        rng, key = jax.random.split(rng)
        nxt = sample(key, last_logits, temperature=temperature, top_k=top_k, top_p=top_p)
        nxt = jnp.where(done, pad_id, nxt)
        out = out.at[:, i].set(nxt)
        n_out = n_out + (~done).astype(jnp.int32)
        done = done | (nxt == eos_id) if eos_id is not None else done
        step_pos = (lengths + i)[:, None]
        logits, cache = _decoder_apply(model, params, cache, nxt[:, None], jnp.ones((b, 1), jnp.int32), step_pos,
                                       encoded, encoded_seg)
        return i + 1, cache, logits[:, -1], done, out, n_out, rng

    carry = (jnp.int32(0), cache, logits[:, -1], done, out, n_out, rng)
    for j, cap in enumerate(caps):  # iteration i writes slot p + i: this cache holds i < cap - p
        if j:
            carry = carry[:1] + (_grow_cache(model, carry[1], b, caps[j - 1], cap, encoded),) + carry[2:]
        carry = jax.lax.while_loop(lambda c, end=cap - p: (c[0] < end) & ~jnp.all(c[3]), body, carry)
    _, _, _, _, out, n_out, _ = carry
    return out, n_out


def cache_capacities(prompt_len: int, max_new_tokens: int, first: int | None = None) -> tuple[int, ...]:
    """The KV cache sizes `generate` decodes with, one token loop each: prompt + max_new_tokens,
    after at most two powers of two of at least `first` (CACHE_BLOCK) slots, above the prompt
    and 1.25x below the total. A step attends over every slot of its cache, filled or not: with
    sizes T/4, T/2 and T a decode of T >> prompt tokens reads 31% fewer slots than with T from
    the first step. Each size is one more loop to compile, and each growth copies the cache once."""
    total = prompt_len + max_new_tokens
    size, sizes = max(first or CACHE_BLOCK, 1 << prompt_len.bit_length()), []
    while size * 5 // 4 < total:
        sizes.append(size)
        size *= 2
    return tuple(sizes[-2:]) + (total,)


def _grow_cache(model, cache, batch: int, old: int, new: int, encoded):
    """`cache` of `old` positions padded to `new` (zeros: empty slots of segment 0); the leaves
    that do not depend on the length (cache indices, cross-attention keys) pass as they are."""
    def pad(x, was, will):
        if was.shape == will.shape:
            return x
        (axis,) = [a for a, (u, v) in enumerate(zip(was.shape, will.shape)) if u != v]
        return jnp.pad(x, [(0, will.shape[axis] - was.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])
    return jax.tree.map(pad, cache, _cache_shapes(model, batch, old, encoded), _cache_shapes(model, batch, new, encoded))


def generate(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0, seed: int = 0,
             inputs: Sequence[Sequence[int]] | None = None) -> Generated:
    """Continues each prompt. For an `EncoderDecoder`, `inputs` are the encoder's token lists and
    `prompts` the decoder's starts (e.g. `[[bos]] * B`)."""
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, seg, pos, lengths = left_pad(prompts, pad_id)
    b, p = tokens.shape
    cfg = model.config
    total = p + max_new_tokens
    if cfg.position == "learned" and total > cfg.max_len:
        raise ValueError(f"prompt length {p} + max_new_tokens={max_new_tokens} exceeds max_len={cfg.max_len} "
                         "of the learned position table; shorten the prompt or max_new_tokens")
    encoded = encoded_seg = None
    if cfg.family == "encoder_decoder":
        if inputs is None:
            raise ValueError("an EncoderDecoder needs `inputs` (the encoder's token lists)")
        enc_tok, encoded_seg, enc_pos, _ = _right_pad(inputs, pad_id)
        encoded = _encode(model, params, enc_tok, encoded_seg, enc_pos)
    out, n = _generate(decoding_model(model), params, tokens, seg, pos, jnp.asarray(lengths), jax.random.key(seed), encoded,
                       encoded_seg, max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                       top_p=float(top_p), eos_id=eos_id, pad_id=pad_id,
                       caps=cache_capacities(p, max_new_tokens))
    return Generated(np.asarray(out), np.asarray(n))


def stream(model, params, prompt: Sequence[int], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, eos_id: int | None = None, seed: int = 0) -> Iterator[int]:
    """Yields a `DecoderLM`'s tokens one at a time as they are decoded (for the CLI)."""
    _check_sampling(temperature, top_k, top_p, max_new_tokens)
    tokens, seg, pos, lengths = left_pad([prompt])
    model = decoding_model(model)
    params = _unstack_jit(params)
    cache = init_cache(model, 1, tokens.shape[1] + max_new_tokens)
    step = functools.partial(_step_jit, model)
    logits, cache = step(params, cache, tokens, seg, pos, None, None)
    rng = jax.random.key(seed)
    for i in range(max_new_tokens):
        rng, key = jax.random.split(rng)
        nxt = sample(key, logits[:, -1], temperature=temperature, top_k=top_k, top_p=top_p)
        tok = int(nxt[0])
        yield tok
        if tok == eos_id:
            return
        logits, cache = step(params, cache, nxt[:, None], jnp.ones((1, 1), jnp.int32),
                             jnp.asarray([[int(lengths[0]) + i]]), None, None)


_unstack_jit = jax.jit(unstack_layers)
_step_jit = jax.jit(_decoder_apply, static_argnums=0, donate_argnums=2)


def _check_sampling(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")


def _right_pad(seqs, pad_id):
    lengths = np.array([len(s) for s in seqs], np.int32)
    n = int(lengths.max())
    tokens = np.full((len(seqs), n), pad_id, np.int32)
    seg = np.zeros((len(seqs), n), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        seg[i, :len(s)] = 1
    pos = np.broadcast_to(np.arange(n, dtype=np.int32), tokens.shape) * seg
    return tokens, seg, pos, lengths


@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, params, tokens, seg, pos):
    return model.apply({"params": params}, tokens, segment_ids=seg, positions=pos, method="encode")


# -- beam search (EncoderDecoder) -------------------------------------------------------

def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "alpha", "eos_id", "bos_id",
                                             "pad_id"))
def _beam_search(model, params, encoded, encoded_seg, cache, *, beam_size, max_new_tokens, alpha, eos_id, bos_id,
                 pad_id):
    b = encoded.shape[0] // beam_size
    k = beam_size
    params = unstack_layers(params)
    unflat = lambda x: x.reshape((b, k) + x.shape[1:])  # noqa: E731
    # Only beam 0 is live at the start, so the first expansion does not pick k copies.
    scores = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (b, 1))  # [B, K] sum of log-probs
    seqs = jnp.full((b, k, max_new_tokens), pad_id, jnp.int32)
    finished = jnp.zeros((b, k), bool)
    last = jnp.full((b * k, 1), bos_id, jnp.int32)

    def step(i, carry):
        cache, scores, seqs, finished, last = carry
        logits, cache = _decoder_apply(model, params, cache, last, jnp.ones_like(last), jnp.full_like(last, i),
                                       encoded, encoded_seg)
        logp = unflat(jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)))  # [B, K, V]
        v = logp.shape[-1]
        # A finished beam extends only with pad at no cost, keeping its score.
        pad_only = jnp.full((v,), NEG_INF).at[pad_id].set(0.0)
        logp = jnp.where(finished[..., None], pad_only, logp)
        cand = (scores[..., None] + logp).reshape(b, k * v)
        # Rank by length-penalised score; finished beams are frozen at their length.
        lengths = jnp.where(finished, jnp.sum(seqs != pad_id, -1), i + 1).astype(jnp.float32)
        ranked = cand / jnp.repeat(length_penalty(lengths, alpha), v, axis=-1)
        _, idx = jax.lax.top_k(ranked, k)  # [B, K]
        beam, tok = idx // v, (idx % v).astype(jnp.int32)
        scores = jnp.take_along_axis(cand, idx, -1)
        seqs = jnp.take_along_axis(seqs, beam[..., None], 1)
        was_finished = jnp.take_along_axis(finished, beam, 1)
        seqs = seqs.at[:, :, i].set(jnp.where(was_finished, pad_id, tok))
        finished = was_finished | (tok == eos_id)
        gather = (beam + jnp.arange(b)[:, None] * k).reshape(-1)
        cache = jax.tree.map(lambda c: c[gather] if c.ndim and c.shape[0] == b * k else c, cache)
        return cache, scores, seqs, finished, tok.reshape(b * k, 1)

    cache, scores, seqs, finished, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                                         (cache, scores, seqs, finished, last))
    lengths = jnp.sum(seqs != pad_id, -1)
    final = scores / length_penalty(lengths.astype(jnp.float32), alpha)
    best = jnp.argmax(final, -1)
    return jnp.take_along_axis(seqs, best[:, None, None], 1)[:, 0], jnp.take_along_axis(lengths, best[:, None], 1)[:, 0]


def beam_search(model, params, inputs: Sequence[Sequence[int]], *, beam_size: int = 4, max_new_tokens: int,
                alpha: float = 0.6, eos_id: int, bos_id: int, pad_id: int = 0) -> Generated:
    """Best of `beam_size` hypotheses per input by length-penalised log-probability."""
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be >= 1")
    if model.config.family != "encoder_decoder":
        raise ValueError("beam_search is for EncoderDecoder models; use generate() for a DecoderLM")
    enc_tok, enc_seg, enc_pos, _ = _right_pad(inputs, pad_id)
    encoded = _encode(model, params, enc_tok, enc_seg, enc_pos)
    encoded = jnp.repeat(encoded, beam_size, axis=0)
    enc_seg = jnp.repeat(jnp.asarray(enc_seg), beam_size, axis=0)
    cache = init_cache(decoding_model(model), encoded.shape[0], max_new_tokens, encoded)
    seqs, lengths = _beam_search(decoding_model(model), params, encoded, enc_seg, cache, beam_size=beam_size,
                                 max_new_tokens=max_new_tokens, alpha=float(alpha), eos_id=eos_id, bos_id=bos_id,
                                 pad_id=pad_id)
    return Generated(np.asarray(seqs), np.asarray(lengths))
