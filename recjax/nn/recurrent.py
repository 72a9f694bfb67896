"""Padding-aware recurrent encoders (GRU, LSTM) over left-padded item sequences.

Sequences are left-padded (valid = False before the first item, the latest item at index L-1).
Each layer runs a flax cell over time with `nn.scan` and holds its carry through padding:

  c~_t, y_t = cell(c_{t-1}, x_t)
  c_t       = c~_t  if valid_t  else c_{t-1}           (c_0 = 0)
  out_t     = hidden part of c_t                        (h_t; the LSTM carry is (c_t, h_t))

so the state after a sequence's first real item is that of a fresh cell, whatever the padding
(and the inputs at padded steps) were: a sequence padded to any length gives the same outputs at
its real positions, and padded steps receive exactly zero gradient. Outputs at padded positions
are the held state (all zeros before the first real item): finite, and to be ignored (their loss
weight is 0). Layer k + 1 reads layer k's outputs; no dropout between layers (PyTorch's default).

Cells (flax's, parameter names as flax's):
  - "gru": `nn.GRUCell`, PyTorch's GRU equations (Cho et al. 2014, as `torch.nn.GRU`):
      r = sigmoid(W_ir x + b_ir + W_hr h),  z = sigmoid(W_iz x + b_iz + W_hz h)
      n = tanh(W_in x + b_in + r * (W_hn h + b_hn)),  h' = (1 - z) n + z h
  - "lstm": `nn.OptimizedLSTMCell` (the four gate matmuls fused; parameters as `nn.LSTMCell`):
      i, f, o = sigmoid(W_i. x + W_h. h + b_h.),  g = tanh(W_ig x + W_hg h + b_hg)
      c' = f c + i g,  h' = o tanh(c')

Initialisation `weight_init="xavier_uniform"` (default) follows RecBole's GRU4Rec, which applies
`torch.nn.init.xavier_uniform_` to the *stacked* `[G*H, d_in]` / `[G*H, H]` weights of G gates:
every per-gate kernel here is U(-a, a) with a = sqrt(6 / (fan_in + G*H)), so the distribution is
PyTorch's. Biases start at 0. `weight_init="flax"` keeps flax's cell defaults (LeCun-normal input
kernels, orthogonal recurrent kernels).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from recjax.nn.init import Initializer

CELLS = ("gru", "lstm")
INITS = ("xavier_uniform", "flax")
_NUM_GATES = {"gru": 3, "lstm": 4}


def stacked_xavier_uniform(num_gates: int) -> Initializer:
  """Glorot-uniform of a `[d_in, H]` gate kernel as one block of a stacked `[d_in, G*H]` matrix.

  U(-a, a) with a = sqrt(6 / (d_in + G*H)): `torch.nn.init.xavier_uniform_` on PyTorch's
  `weight_ih_l0 [G*H, d_in]` (or `weight_hh_l0 [G*H, H]`) restricted to one gate.
  """

  def init(key, shape, dtype=jnp.float32):
    limit = math.sqrt(6.0 / (shape[0] + num_gates * shape[-1]))
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


def _hidden(cell: str, carry):
  """The output part of a carry: h (GRU) or the h of (c, h) (LSTM), `[B, H]`."""
  return carry[1] if cell == "lstm" else carry


class _MaskedStep(nn.Module):
  """One time step of one layer: the cell's update where `valid`, the previous carry elsewhere."""

  cell: str
  hidden_size: int
  weight_init: str

  @nn.compact
  def __call__(self, carry, inputs):
    """carry: `[B, H]` (GRU) or `([B, H], [B, H])` (LSTM); inputs: x `[B, d_in]`, valid `[B]` bool.

    Returns: (the new carry, its hidden part `[B, H]`).
    """
    x, valid = inputs
    kwargs = {}
    if self.weight_init == "xavier_uniform":
      gates = stacked_xavier_uniform(_NUM_GATES[self.cell])
      kwargs = dict(kernel_init=gates, recurrent_kernel_init=gates)
    cell_cls = nn.GRUCell if self.cell == "gru" else nn.OptimizedLSTMCell
    new_carry, _ = cell_cls(features=self.hidden_size, name="cell", **kwargs)(carry, x)
    carry = jax.tree.map(lambda new, old: jnp.where(valid[:, None], new, old), new_carry, carry)
    return carry, _hidden(self.cell, carry)


class RecurrentEncoder(nn.Module):
  """A stack of `num_layers` padding-aware GRU / LSTM layers (see the module docstring).

  Attributes:
    cell: "gru" or "lstm".
    hidden_size: H, the width of every layer's state.
    num_layers: stacked layers; layer k + 1 reads layer k's outputs.
    weight_init: "xavier_uniform" (RecBole / PyTorch stacked Glorot-uniform) or "flax" (flax defaults).
    unroll: time steps per iteration of the scan loop (`nn.scan(unroll=...)`).

  Parameters live under `layer_{k}/cell/...` with flax's cell parameter names.
  """

  cell: str = "gru"
  hidden_size: int = 128
  num_layers: int = 1
  weight_init: str = "xavier_uniform"
  unroll: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Args: x `[B, L, d_in]`, valid `[B, L]` bool (False = padding, left-padded).

    Returns: `[B, L, H]`, the top layer's state after each position (the held state at padding).
    """
    if self.cell not in CELLS:
      raise ValueError(f"unknown recurrent cell {self.cell!r}; expected one of {CELLS}")
    if self.weight_init not in INITS:
      raise ValueError(f"unknown recurrent weight_init {self.weight_init!r}; expected one of {INITS}")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    scan = nn.scan(
      _MaskedStep,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=1,
      out_axes=1,
      unroll=self.unroll,
    )
    valid = valid.astype(bool)
    batch = x.shape[0]
    for k in range(self.num_layers):
      zeros = jnp.zeros((batch, self.hidden_size), x.dtype)
      carry = (zeros, zeros) if self.cell == "lstm" else zeros
      layer = scan(cell=self.cell, hidden_size=self.hidden_size, weight_init=self.weight_init, name=f"layer_{k}")
      _, x = layer(carry, (x, valid))  # [B, L, H]
    return x  # [B, L, H]
