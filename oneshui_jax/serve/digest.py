"""A 128-bit checksum of a parameter tree computed on the device (the served request path).

Serving a deletion request (paper section 3, 1-SHUI, at test time) chains its receipts by
parameters: ``params_digest_before`` / ``params_digest_after`` of a receipt are
:func:`params_digest_hex` of the model before and after the request, and only 16 bytes come to
the host. It is a checksum, NOT a cryptographic hash (see :func:`params_digest`): the sha256 of
the saved parameters (``checkpoints.params_hash``, on the host) stays the integrity check of
checkpoints and of the chain of requests.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oneshui_jax import sharding
from oneshui_jax.checkpoints import Params, leaf_name

DIGEST_WORDS = 4  # uint32 words: 128 bits, 32 hex digits
_GOLDEN = np.uint32(0x9E3779B1)
_LANE_KEYS = tuple(np.uint32(k) for k in (0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1))
_LANE_ODD = tuple(np.uint32(k) for k in (0xCC9E2D51, 0x1B873593, 0x7FEB352D, 0x846CA68B))


def _fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    shift = jax.lax.shift_right_logical
    x = x ^ shift(x, np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ shift(x, np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ shift(x, np.uint32(16))


def _words(x: jax.Array) -> jax.Array:
    """The bit pattern of ``x`` as a flat uint32 vector (64-bit elements give two words each,
    8- and 16-bit ones are zero-extended; bool as 0/1)."""
    dtype = np.dtype(x.dtype)
    if dtype == np.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    if dtype.kind not in "biuf" and dtype.name not in ("bfloat16",) and not dtype.name.startswith(
            "float8"):
        raise TypeError(f"params_digest: unsupported leaf dtype {dtype} (real numbers, integers "
                        "and bool only)")
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned)  # [..., 2] for 64-bit elements
    return bits.astype(jnp.uint32).reshape(-1)


def _leaf_seed(index: int, name: str, dtype: Any, shape: tuple[int, ...]) -> np.uint32:
    """A per-leaf constant from its position in name order, name, dtype and shape (static)."""
    text = f"{index}|{name}|{np.dtype(dtype).name}|{tuple(shape)}".encode()
    return np.uint32(int.from_bytes(hashlib.sha256(text).digest()[:4], "little"))


def _leaf_digest(words: jax.Array, seed: np.uint32) -> jax.Array:
    """uint32[DIGEST_WORDS] of one leaf: word ``j`` is the wrapping sum over elements of a
    hash keyed by lane ``j`` and the element's position, a bijection of the element's bits
    (an exact integer reduction: any order or sharding gives the same words; sums only, as
    cross-device reductions offer no xor)."""
    position = _fmix32(jnp.arange(words.shape[0], dtype=jnp.uint32) * _GOLDEN + seed)
    keys = jnp.asarray(_LANE_KEYS, jnp.uint32)
    lane_position = _fmix32(position[:, None] ^ keys)  # [n, lanes]
    hashed = _fmix32((words[:, None] ^ lane_position) * jnp.asarray(_LANE_ODD, jnp.uint32)
                     + keys)
    return jnp.sum(hashed, axis=0, dtype=jnp.uint32)


@jax.jit
def params_digest(params: Params) -> jax.Array:
    """A 128-bit checksum of a parameter tree, computed on the device: uint32[4].

    Covers every leaf's bits, name (dotted key path), dtype, shape and place in name order,
    like ``checkpoints.params_hash``; compiled once per tree structure and shapes. Only the four
    words leave the device (:func:`params_digest_hex`). Integer arithmetic and wrapping sums
    only, so the words are exact: the same on every backend, however the leaves are sharded or
    placed, and equal for equal bits (``-0.0`` and ``0.0``, or two NaN payloads, differ).

    A checksum, NOT a cryptographic hash: each element is mixed with its position, leaf and
    lane (MurmurHash3's finaliser, a bijection of its bits), then summed. Changing one element
    of one leaf always changes all four words (each lane's hash of that element changes).
    Other accidental changes (swapped elements or leaves, many elements) are caught unless each
    of the four words collides, about 2**-32 per word for unrelated changes; the words are not
    independent, so do not count on 2**-128. Collisions are easy to construct on purpose (every
    step is invertible or linear): ``checkpoints.params_hash`` (sha256, on the host) remains
    the integrity check of checkpoints and of the request chain.
    """
    named, _ = jax.tree_util.tree_flatten_with_path(params)
    leaves = sorted(((leaf_name(path), leaf) for path, leaf in named), key=lambda item: item[0])
    out = jnp.zeros(DIGEST_WORDS, jnp.uint32)
    for index, (name, leaf) in enumerate(leaves):
        seed = _leaf_seed(index, name, leaf.dtype, leaf.shape)
        leaf_words = _leaf_digest(_words(leaf), seed)
        keys = _fmix32(jnp.asarray(_LANE_KEYS, jnp.uint32) + seed)
        out = out + _fmix32(leaf_words ^ keys)  # one leaf's change changes every summed word
    return _fmix32(out ^ np.uint32(len(leaves)))


def digest_hex(words: Any) -> str:
    """``params_digest`` words as 32 hex digits (fetches them to the host)."""
    return "".join(f"{int(w):08x}" for w in sharding.local_value(words).astype(np.uint32))


def params_digest_hex(params: Params) -> str:
    """:func:`params_digest` of ``params`` as 32 hex digits: 16 bytes come to the host."""
    return digest_hex(params_digest(params))
