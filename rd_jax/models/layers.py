"""Small NNX building blocks shared by the generator, its text encoder and VAE.

Every parameter carries logical axis names (rd_jax/sharding.py). `Linear`
stores its kernel as [in, out] (the transpose of a torch `nn.Linear.weight`),
so converters from diffusers/transformers copy `weight.T` and `bias` as is.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rd_jax import sharding


def at_least_f32(x: jax.Array) -> jax.Array:
  """x in float32, or wider (float64 stays float64: finite-difference tests)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dense(x: jax.Array, kernel: jax.Array, contract: int = 1) -> jax.Array:
  """x [..., *in] @ kernel [*in, *out] -> [..., *out] (the last `contract`
  axes of x against the first of kernel), as one 2-D matmul of the
  flattened leading axes. The same product as the einsum, but XLA:CPU runs
  a dot over a 3-D activation, forward and backward, 2.7-4.4x slower than
  over its 2-D view (docs/reward_models.md, "Step time"); every model's
  projections go through here."""
  lead, k_in = x.shape[:x.ndim - contract], kernel.shape[:contract]
  if x.shape[x.ndim - contract:] != k_in:
    raise ValueError(f"dense: x {x.shape} does not end in kernel's input "
                     f"axes {k_in} (kernel {kernel.shape})")
  n_in = math.prod(k_in)
  y = x.reshape(-1, n_in) @ kernel.reshape(n_in, -1)
  return y.reshape(lead + kernel.shape[contract:])


class Linear(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out] with logical names `names`."""

  def __init__(self, d_in: int, d_out: int, names: Sequence[str | None],
               *, rngs: nnx.Rngs, use_bias: bool = True,
               init_scale: float = 1.0):
    # Fan-in scaled normal init (as torch's default Linear, up to a constant);
    # init_scale=0 gives the zero-init used for residual-gated outputs.
    std = init_scale / d_in ** 0.5
    self.kernel = sharding.param(
        std * jax.random.normal(rngs.params(), (d_in, d_out)), names)
    self.bias = (sharding.param(jnp.zeros((d_out,)), names[1:])
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned scale (torch.nn.RMSNorm)."""

  def __init__(self, dim: int, name: str, *, eps: float = 1e-6):
    self.eps = eps
    self.weight = sharding.param(jnp.ones((dim,)), (name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = at_least_f32(x)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return (y * self.weight[...]).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """LayerNorm without affine parameters (AdaLN supplies scale and shift)."""
  xf = at_least_f32(x)
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


def remat_policy(name: str):
  """jax.checkpoint policy by config name ('none' = save everything)."""
  policies = {
      "none": jax.checkpoint_policies.everything_saveable,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch":
          jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }
  if name not in policies:
    raise ValueError(f"unknown remat policy {name!r}; use one of "
                     f"{sorted(policies)}")
  return policies[name]


def scan_layers(body, carry, stacked: nnx.Module, policy: str,
                unroll: int = 1):
  """Runs `carry = body(layer, carry)` over a layer stack with lax.scan.

  `stacked` was built with nnx.vmap (leading `layers` axis on every param);
  each scan step merges one layer's slice back into a module, so the
  compiled program holds one copy of the block regardless of depth.
  `unroll` is lax.scan's (layers per loop iteration): 1 keeps that rolled
  loop (real sizes: compile time and program size flat in depth); the
  stack's depth unrolls it, which spares a tiny model on CPU the loop's
  per-layer buffer copies (configs/rm_shapes.py).
  """
  graphdef, state = nnx.split(stacked)

  def step(c, layer_state):
    return body(nnx.merge(graphdef, layer_state), c), None

  policy = remat_policy(policy)
  if policy is not jax.checkpoint_policies.everything_saveable:
    # Not for 'none': jax.checkpoint would still pass every saved residual
    # through an identity reduce_precision (jax PR 22244), which XLA:CPU
    # materialises -- 313 such copies in the RM step.
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)

  carry, _ = jax.lax.scan(step, carry, state, unroll=unroll)
  return carry
