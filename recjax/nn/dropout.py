"""Dropout whose masks come from a cheap counter-based hash instead of threefry.

On CPU, threefry random bits dominate a SASRec step: one layer's attention-probability mask at
B=2048, L=50 takes ~250 ms, more than the layer's matmuls. Here each element's 32 random bits are

    h = fmix32(fmix32(i * 0x9E3779B9 + s0) ^ s1)

for the element's flat index i and two 32-bit seeds (s0, s1) drawn from the "dropout" key, where
fmix32 is MurmurHash3's finaliser (an invertible avalanche mix). XLA fuses this into the
elementwise loop that applies the mask, so a mask costs a few integer ops per element. The bits
depend only on the key, the shape and the flat index, so a sharded computation draws exactly the
same mask as a single-device one. Quality is what dropout needs (the keep rate is exact to 2^-32
and neighbouring elements are decorrelated by the avalanche); it is not a general-purpose RNG.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _fmix32(x: jnp.ndarray) -> jnp.ndarray:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
  """uint32 random bits of `shape` from a PRNG key (raw uint32 or typed)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  seed_key = jax.random.wrap_key_data(key.reshape(-1)[:2].astype(jnp.uint32), impl="threefry2x32")   # any key's impl
  seeds = jax.random.bits(seed_key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)   # wraps past 2^32 elements; masks then repeat
  return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


def dropout(x: jnp.ndarray, rate: float, key: jax.Array) -> jnp.ndarray:
  """Zeroes each element with probability `rate`, scales the rest by 1 / (1 - rate)."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  threshold = jnp.uint32(min(int(round(rate * 2.0**32)), 2**32 - 1))
  keep = hash_bits(key, x.shape) >= threshold
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nn.Module):
  """`nn.Dropout` with hash masks; draws its key from the "dropout" stream."""

  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate <= 0.0:
      return x
    return dropout(x, self.rate, self.make_rng("dropout"))
