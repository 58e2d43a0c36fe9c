"""AutoencoderKL (diffusers layout) in Flax NNX: the latent space of the
real-size generator (Flux's 16-channel VAE; configs/generator_shapes.py
`size=flux_dev`). The ShapesWorld default works in pixel space instead.

Module names follow diffusers' AutoencoderKL one to one (conv kernels are
torch weights permuted [out, in, kh, kw] -> [kh, kw, in, out]):

  encoder.conv_in, encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,
  conv2,conv_shortcut}, encoder.down_blocks.{i}.downsamplers.0.conv,
  encoder.mid_block.{resnets.{0,1}, attentions.0.{group_norm,to_q,to_k,to_v,
  to_out.0 -> to_out}}, encoder.conv_norm_out, encoder.conv_out,
  quant_conv, post_quant_conv, decoder.(same, with up_blocks.{i}.upsamplers)

Images are NHWC in [-1, 1]. Convolutions are different per resolution, so
blocks are not scan-stacked (no repeated identical layers to stack).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rd_jax import sharding
from rd_jax.models.layers import Linear


class Conv(nnx.Module):

  def __init__(self, c_in: int, c_out: int, k: int, *, rngs: nnx.Rngs,
               stride: int = 1, padding="SAME"):
    self.stride, self.padding = stride, padding
    std = 1.0 / (k * k * c_in) ** 0.5
    self.kernel = sharding.param(
        std * jax.random.normal(rngs.params(), (k, k, c_in, c_out)),
        ("kernel_h", "kernel_w", "conv_in", "conv_out"))
    self.bias = sharding.param(jnp.zeros((c_out,)), ("conv_out",))

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...].astype(x.dtype), (self.stride,) * 2, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):

  def __init__(self, c: int, groups: int, eps: float = 1e-6):
    self.groups, self.eps = groups, eps
    self.weight = sharding.param(jnp.ones((c,)), ("norm",))
    self.bias = sharding.param(jnp.zeros((c,)), ("norm",))

  def __call__(self, x):
    *lead, c = x.shape
    g = x.astype(jnp.float32).reshape(*lead, self.groups, c // self.groups)
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = g.mean(axes, keepdims=True)
    var = jnp.square(g - mean).mean(axes, keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (g * self.weight[...] + self.bias[...]).astype(x.dtype)


class ResnetBlock(nnx.Module):

  def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(c_in, groups)
    self.conv1 = Conv(c_in, c_out, 3, rngs=rngs)
    self.norm2 = GroupNorm(c_out, groups)
    self.conv2 = Conv(c_out, c_out, 3, rngs=rngs)
    self.conv_shortcut = (Conv(c_in, c_out, 1, rngs=rngs)
                          if c_in != c_out else None)

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over H·W positions (diffusers Attention)."""

  def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
    self.group_norm = GroupNorm(c, groups)
    names = ("conv_in", "conv_out")
    self.to_q = Linear(c, c, names, rngs=rngs)
    self.to_k = Linear(c, c, names, rngs=rngs)
    self.to_v = Linear(c, c, names, rngs=rngs)
    self.to_out = Linear(c, c, names, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    n = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(n), self.to_k(n), self.to_v(n)
    a = jax.nn.softmax(jnp.einsum("bsc,btc->bst", q, k) / np.sqrt(c), -1)
    return x + self.to_out(jnp.einsum("bst,btc->bsc", a, v)).reshape(x.shape)


class MidBlock(nnx.Module):

  def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(c, c, groups, rngs=rngs)
                             for _ in range(2)])
    self.attentions = nnx.List([AttnBlock(c, groups, rngs=rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    return self.resnets[1](self.attentions[0](x))


class Resample(nnx.Module):
  """Downsample (asymmetric pad + stride-2 conv) or nearest-2× upsample+conv."""

  def __init__(self, c: int, up: bool, *, rngs: nnx.Rngs):
    self.up = up
    self.conv = Conv(c, c, 3, rngs=rngs, stride=1 if up else 2,
                     padding="SAME" if up else ((0, 1), (0, 1)))

  def __call__(self, x):
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)
    return self.conv(x)


class Block(nnx.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D."""

  def __init__(self, c_in: int, c_out: int, n: int, groups: int,
               resample: str | None, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock(c_in if i == 0 else c_out, c_out,
                                         groups, rngs=rngs)
                             for i in range(n)])
    self.downsamplers = nnx.List(
        [Resample(c_out, False, rngs=rngs)] if resample == "down" else [])
    self.upsamplers = nnx.List(
        [Resample(c_out, True, rngs=rngs)] if resample == "up" else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for s in (*self.downsamplers, *self.upsamplers):
      x = s(x)
    return x


class Encoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    ch, g = tuple(cfg.block_out_channels), cfg.norm_num_groups
    self.conv_in = Conv(cfg.in_channels, ch[0], 3, rngs=rngs)
    self.down_blocks = nnx.List([
        Block(ch[max(i - 1, 0)], c, cfg.layers_per_block, g,
              "down" if i < len(ch) - 1 else None, rngs=rngs)
        for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], g, rngs=rngs)
    self.conv_norm_out = GroupNorm(ch[-1], g)
    self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for blk in self.down_blocks:
      x = blk(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = Conv(cfg.latent_channels, ch[0], 3, rngs=rngs)
    self.mid_block = MidBlock(ch[0], g, rngs=rngs)
    self.up_blocks = nnx.List([
        Block(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g,
              "up" if i < len(ch) - 1 else None, rngs=rngs)
        for i, c in enumerate(ch)])
    self.conv_norm_out = GroupNorm(ch[-1], g)
    self.conv_out = Conv(ch[-1], cfg.in_channels, 3, rngs=rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for blk in self.up_blocks:
      x = blk(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    lat = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = (Conv(2 * lat, 2 * lat, 1, rngs=rngs)
                       if cfg.use_quant_conv else None)
    self.post_quant_conv = (Conv(lat, lat, 1, rngs=rngs)
                            if cfg.use_post_quant_conv else None)


@functools.lru_cache(maxsize=4)
def _graph(cfg_json: str):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  return nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg,
                                                        rngs=nnx.Rngs(0))),
                   nnx.Param)


def init(cfg, rng: jax.Array) -> dict:
  _, state = nnx.split(AutoencoderKL(cfg, rngs=nnx.Rngs(params=rng)),
                       nnx.Param)
  return nnx.to_pure_dict(state)


def param_count(cfg) -> int:
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.to_pure_dict(_graph(cfg.to_json())[1])))


def logical_specs(cfg) -> dict:
  return nnx.to_pure_dict(sharding.logical_specs(_graph(cfg.to_json())[1]))


def encode(cfg, params: dict, x: jax.Array, rng: jax.Array | None = None
           ) -> jax.Array:
  """Images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, L]
  (posterior mean, or a sample when `rng` is given)."""
  model = nnx.merge(_graph(cfg.to_json())[0], params)
  moments = model.encoder(x)
  if model.quant_conv is not None:
    moments = model.quant_conv(moments)
  mean, logvar = jnp.split(moments, 2, -1)
  z = mean
  if rng is not None:
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    z = mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
  return (z - cfg.shift_factor) * cfg.scaling_factor


def decode(cfg, params: dict, z: jax.Array) -> jax.Array:
  """Scaled latents -> images in [-1, 1] (differentiable; ReFL decodes x̂0)."""
  model = nnx.merge(_graph(cfg.to_json())[0], params)
  z = z / cfg.scaling_factor + cfg.shift_factor
  if model.post_quant_conv is not None:
    z = model.post_quant_conv(z)
  return model.decoder(z)
