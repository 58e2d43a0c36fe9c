"""InternViT: the vision encoder of InternVL, Flax NNX.

Matches Hugging Face's `InternVLVisionModel`: a 14-px patch embedding, a class
token, learned absolute position embeddings (bicubically resized, exactly as
torch's `interpolate(mode='bicubic', align_corners=False)`, when the input
resolution differs from the trained one), and pre-norm blocks with layer
scale. InternViT-300M uses LayerNorm and QKV bias; InternViT-6B uses RMSNorm,
no bias and QK-normalisation (RMSNorm over all heads together). Dropout is
omitted: this is an inference/fine-tuning forward with rates 0.

Einsum letters: as in llm.py, plus C channels, Y/X patch-grid rows/cols,
I/J pixel row/col inside a patch, E the 1+num_patches position slots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rd_jax import sharding
from rd_jax.models.layers import dense, scan_layers
from rd_jax.models.llm import attend, cast, normal, ones, rms_norm, zeros


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float) -> jax.Array:
  """LayerNorm over the last axis, statistics in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(
      x.dtype)


@functools.lru_cache(maxsize=None)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize (A=-0.75,
  align_corners=False, edge indices clamped)."""
  a = -0.75
  scale = n_in / n_out
  w = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    src = (o + 0.5) * scale - 0.5
    base = int(np.floor(src))
    t = src - base
    for k, dist in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
      if dist <= 1:
        weight = ((a + 2) * dist - (a + 3)) * dist * dist + 1
      else:
        weight = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
      w[o, min(max(base + k, 0), n_in - 1)] += weight
  return w.astype(np.float32)


def sincos_2d(grid: int, dim: int, temperature: float = 100.0) -> np.ndarray:
  """[grid * grid, dim] 2-D sin-cos position table (big_vision's
  posemb_sincos_2d, row-major over the patch grid): dim/4 frequencies
  temperature^(-k / (dim/4 - 1)) each for sin(x), cos(x), sin(y), cos(y).
  The lowest frequency (1/temperature) is near-linear in x and y, so a
  linear readout recovers a patch's column and row."""
  if dim % 4:
    raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, "
                     f"got {dim}")
  y, x = np.mgrid[:grid, :grid]
  k = max(dim // 4 - 1, 1)
  omega = temperature ** (-np.arange(dim // 4) / k)
  xs = np.outer(x.ravel(), omega)
  ys = np.outer(y.ravel(), omega)
  return np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)],
                        1).astype(np.float32)


def resize_position_embeddings(pos: jax.Array, grid_h: int,
                               grid_w: int) -> jax.Array:
  """[1 + n*n, D] trained table -> [1 + grid_h*grid_w, D] (class slot kept)."""
  n = int(round((pos.shape[0] - 1) ** 0.5))
  if n * n == grid_h * grid_w and grid_h == grid_w:
    return pos
  table = pos[1:].reshape(n, n, -1).astype(jnp.float32)
  table = jnp.einsum("yi,xj,ijd->yxd", _bicubic_matrix(n, grid_h),
                     _bicubic_matrix(n, grid_w), table,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate(
      [pos[:1], table.reshape(grid_h * grid_w, -1).astype(pos.dtype)], 0)


class Norm(nnx.Module):
  """LayerNorm (scale + bias) or RMSNorm (scale only) over [..., dims]."""

  def __init__(self, shape: tuple[int, ...], names, kind: str, eps: float,
               param_dtype):
    if kind not in ("layer_norm", "rms_norm"):
      raise ValueError(f"norm_type {kind!r}: use 'layer_norm' or 'rms_norm'")
    self.kind, self.eps, self.ndim = kind, eps, len(shape)
    self.scale = sharding.param(ones(shape, param_dtype), names)
    if kind == "layer_norm":
      self.bias = sharding.param(zeros(shape, param_dtype), names)

  def __call__(self, x):
    lead = x.shape[:x.ndim - self.ndim]
    flat = x.reshape(*lead, -1)
    scale = self.scale[...].reshape(-1)
    if self.kind == "rms_norm":
      return rms_norm(flat, scale, self.eps).reshape(x.shape)
    return layer_norm(flat, scale, self.bias[...].reshape(-1),
                      self.eps).reshape(x.shape)


class VisionLayer(nnx.Module):
  """x + λ1·attn(norm(x)), then + λ2·mlp(norm(.)); bidirectional attention."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype,
               rngs: nnx.Rngs):
    d, n, f, pd = cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, param_dtype
    h = d // n
    self.dtype = dtype
    self.norm1 = Norm((d,), ("norm",), cfg.norm_type, cfg.norm_eps, pd)
    self.q = sharding.param(normal(rngs, (d, n, h), pd),
                            ("embed", "heads", "head_dim"))
    self.k = sharding.param(normal(rngs, (d, n, h), pd),
                            ("embed", "heads", "head_dim"))
    self.v = sharding.param(normal(rngs, (d, n, h), pd),
                            ("embed", "heads", "head_dim"))
    if cfg.qkv_bias:
      self.q_bias = sharding.param(zeros((n, h), pd), ("heads", "head_dim"))
      self.k_bias = sharding.param(zeros((n, h), pd), ("heads", "head_dim"))
      self.v_bias = sharding.param(zeros((n, h), pd), ("heads", "head_dim"))
    if cfg.qk_norm:
      # HF normalises q and k over the full width (all heads at once), with
      # eps fixed at 1e-6 regardless of the block norm's eps.
      self.q_norm = Norm((n, h), ("heads", "head_dim"), "rms_norm", 1e-6, pd)
      self.k_norm = Norm((n, h), ("heads", "head_dim"), "rms_norm", 1e-6, pd)
    self.o = sharding.param(normal(rngs, (n, h, d), pd),
                            ("heads", "head_dim", "embed"))
    self.o_bias = sharding.param(zeros((d,), pd), ("embed",))
    self.scale1 = sharding.param(
        jnp.full((d,), cfg.layer_scale_init, pd), ("norm",))
    self.norm2 = Norm((d,), ("norm",), cfg.norm_type, cfg.norm_eps, pd)
    self.fc1 = sharding.param(normal(rngs, (d, f), pd), ("embed", "mlp"))
    self.fc1_bias = sharding.param(zeros((f,), pd), ("mlp",))
    self.fc2 = sharding.param(normal(rngs, (f, d), pd), ("mlp", "embed"))
    self.fc2_bias = sharding.param(zeros((d,), pd), ("embed",))
    self.scale2 = sharding.param(
        jnp.full((d,), cfg.layer_scale_init, pd), ("norm",))

  def __call__(self, x):
    """x: [B, T, D] -> [B, T, D]."""
    dt = self.dtype
    y = self.norm1(x)
    q = dense(y, cast(self.q, dt))
    k = dense(y, cast(self.k, dt))
    v = dense(y, cast(self.v, dt))
    if hasattr(self, "q_bias"):
      q = q + cast(self.q_bias, dt)
      k = k + cast(self.k_bias, dt)
      v = v + cast(self.v_bias, dt)
    if hasattr(self, "q_norm"):
      q, k = self.q_norm(q), self.k_norm(k)
    att = dense(attend(q, k, v, None), cast(self.o, dt), 2)
    x = x + cast(self.scale1, dt) * (att + cast(self.o_bias, dt))
    y = dense(self.norm2(x), cast(self.fc1, dt))
    y = sharding.shard_activation(
        jax.nn.gelu(y + cast(self.fc1_bias, dt), approximate=False),
        ("act_batch", "act_len", "act_mlp"))
    y = dense(y, cast(self.fc2, dt)) + cast(
        self.fc2_bias, dt)
    x = x + cast(self.scale2, dt) * y
    return sharding.shard_activation(x, ("act_batch", "act_len", "act_embed"))


class InternViT(nnx.Module):
  """Patch embedding + class token + position embedding + scanned layers.

  cfg: the `vision` sub-config (keys: `internvl.vision_config`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype,
               remat: str, rngs: nnx.Rngs, unroll: int = 1):
    d, p, c, pd = cfg.hidden_size, cfg.patch_size, cfg.num_channels, param_dtype
    grid = cfg.image_size // p
    self.dtype, self.remat, self.patch = dtype, remat, p
    self.unroll = unroll
    self.num_layers = cfg.num_layers
    self.patch_kernel = sharding.param(normal(rngs, (c, p, p, d), pd),
                                       ("channels", "patch", "patch", "embed"))
    self.patch_bias = sharding.param(zeros((d,), pd), ("embed",))
    self.cls = sharding.param(zeros((d,), pd), ("embed",))
    self.pos = sharding.param(normal(rngs, (1 + grid * grid, d), pd),
                              (None, "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return VisionLayer(cfg, dtype, param_dtype, rngs)

    self.layers = make_layers(rngs)
    # HF applies a final LayerNorm only when not mean pooling (InternVL's
    # checkpoints mean-pool, i.e. no final norm).
    if not cfg.use_mean_pooling:
      self.final_norm = Norm((d,), ("norm",), "layer_norm", cfg.norm_eps, pd)

  def __call__(self, pixels: jax.Array, feature_layer: int = -1) -> jax.Array:
    """pixels [B, C, H, W] (normalised) -> tokens [B, 1 + H/14 * W/14, D].

    feature_layer: -1 = output of the last layer (after the final norm if
    any); otherwise HF's `hidden_states[feature_layer]`, where index 0 is
    the embedding output and i the output of layer i (no final norm).
    """
    b, c, height, width = pixels.shape
    p, dt = self.patch, self.dtype
    gy, gx = height // p, width // p
    patches = pixels.astype(dt).reshape(b, c, gy, p, gx, p)
    x = jnp.einsum("bcyixj,cijd->byxd", patches, cast(self.patch_kernel, dt))
    x = x.reshape(b, gy * gx, -1) + cast(self.patch_bias, dt)
    cls = jnp.broadcast_to(cast(self.cls, dt), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + resize_position_embeddings(self.pos[...], gy, gx).astype(dt)
    x = sharding.shard_activation(x, ("act_batch", "act_len", "act_embed"))
    if feature_layer == -1:
      x = scan_layers(lambda layer, h: layer(h), x, self.layers, self.remat,
                      self.unroll)
      return self.final_norm(x) if hasattr(self, "final_norm") else x
    depth = feature_layer % (self.num_layers + 1)
    if depth == 0:
      return x
    graphdef, state = nnx.split(self.layers)
    first = nnx.merge(graphdef, jax.tree.map(lambda a: a[:depth], state))
    return scan_layers(lambda layer, h: layer(h), x, first, self.remat,
                       self.unroll)
