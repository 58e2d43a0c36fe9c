"""Small prompt encoder trained with the generator (ShapesWorld default).

Stands in for T5 (token states -> MMDiT `context_embedder`) and CLIP (pooled
vector -> `time_text_embed.text_embedder`). Real-size generators take those
precomputed embeddings instead; both paths produce the same `TextCond`.

Pre-LN transformer encoder with learned positions, layers stacked with scan.
Einsum letters: B batch, S query length, T key length, D embed, H heads,
K head_dim.
"""
from __future__ import annotations

import functools
import json
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rd_jax import sharding
from rd_jax.models.layers import Linear, gelu_tanh, scan_layers


class TextCond(NamedTuple):
  """Generator text conditioning (a pytree with batch axis 0).

  txt [B, L, J] token states, txt_mask [B, L] (1 = real token),
  pooled [B, P] sentence vector.
  """
  txt: jax.Array
  txt_mask: jax.Array
  pooled: jax.Array


class LayerNorm(nnx.Module):

  def __init__(self, d: int):
    self.scale = sharding.param(jnp.ones((d,)), ("norm",))
    self.bias = sharding.param(jnp.zeros((d,)), ("norm",))

  def __call__(self, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * self.scale + self.bias


class EncoderBlock(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.dim
    self.heads = cfg.heads
    self.ln1, self.ln2 = LayerNorm(d), LayerNorm(d)
    self.qkv = Linear(d, 3 * d, ("embed", "heads"), rngs=rngs)
    self.out = Linear(d, d, ("heads", "embed"), rngs=rngs)
    self.mlp_in = Linear(d, 4 * d, ("embed", "mlp"), rngs=rngs)
    self.mlp_out = Linear(4 * d, d, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x, mask):
    b, s, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, -1)
    q, k, v = (a.reshape(b, s, self.heads, -1) for a in (q, k, v))
    logits = jnp.einsum("bshk,bthk->bhst", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask[:, None, None, :], logits, -1e9)
    a = jnp.einsum("bhst,bthk->bshk", jax.nn.softmax(logits, -1), v)
    x = x + self.out(a.reshape(b, s, d))
    return x + self.mlp_out(gelu_tanh(self.mlp_in(self.ln2(x))))


class TextEncoder(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.remat = cfg.remat
    self.unroll = cfg.get("scan_unroll", 1)  # layers.scan_layers
    self.embed = sharding.param(
        0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.dim)),
        ("vocab", "embed"))
    self.pos = sharding.param(
        0.02 * jax.random.normal(rngs.params(), (cfg.max_len, cfg.dim)),
        (None, "embed"))

    @nnx.split_rngs(splits=cfg.layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
      return EncoderBlock(cfg, rngs=r)

    self.layers = make(rngs)
    self.ln_f = LayerNorm(cfg.dim)

  def __call__(self, ids, mask):
    """ids [B, L] int32, mask [B, L] -> TextCond (J = P = dim)."""
    mask = mask.astype(bool)
    x = jnp.take(self.embed[...], ids, axis=0) + self.pos[:ids.shape[1]]
    x = scan_layers(lambda blk, h: blk(h, mask), x, self.layers, self.remat,
                    self.unroll)
    x = self.ln_f(x)
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1)
    return TextCond(x, mask.astype(jnp.int32), pooled)


@functools.lru_cache(maxsize=8)
def _graph_from_json(cfg_json: str):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  return nnx.split(nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0))),
                   nnx.Param)


def _graph(cfg):
  return _graph_from_json(cfg.to_json())


def init(cfg, rng: jax.Array) -> dict:
  _, state = nnx.split(TextEncoder(cfg, rngs=nnx.Rngs(params=rng)), nnx.Param)
  return nnx.to_pure_dict(state)


def logical_specs(cfg) -> dict:
  return nnx.to_pure_dict(sharding.logical_specs(_graph(cfg)[1]))


def apply(cfg, params: dict, ids: jax.Array, mask: jax.Array) -> TextCond:
  return nnx.merge(_graph(cfg)[0], params)(ids, mask)


def param_count(cfg) -> int:
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.to_pure_dict(_graph(cfg)[1])))
