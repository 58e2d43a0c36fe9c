"""Flux-style MMDiT: the flow-matching generator (text-to-image/-video, I2V).

Layout follows diffusers' `FluxTransformer2DModel` module for module, so a
converter maps every diffusers tensor onto exactly one parameter here
(Linear kernels are `weight.T`; stacked layers add a leading `layers` axis):

  x_embedder, context_embedder, proj_out          same names
  time_text_embed.{timestep,guidance,text}_embedder.linear_{1,2}
  transformer_blocks.{i}.X          -> transformer_blocks.X[i]
    norm1.linear, norm1_context.linear,
    attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_add_out},
    attn.to_out.0 -> attn.to_out, attn.norm_{q,k,added_q,added_k}.weight,
    ff.net.0.proj -> ff.proj_in, ff.net.2 -> ff.proj_out (same for ff_context)
  single_transformer_blocks.{i}.X   -> single_transformer_blocks.X[i]
    norm.linear, proj_mlp, proj_out, attn.{to_q,to_k,to_v,norm_q,norm_k}
  norm_out.linear

Patchify (`_pack_latents` of the diffusers Flux pipeline) lives here too: a
p×p patch of C channels becomes one token of p·p·C features ordered (c, y, x),
so Flux's 16-channel latents with p=2 give its 64 `in_channels`.
`cond_channels` (default 0) extra input channels per pixel, concatenated to
the state by the caller, widen only `x_embedder`, as diffusers'
`in_channels` > `out_channels` do for FLUX.1-Fill (384 in, 64 out); the
output keeps `channels`.

Video: frames are patchified independently; tokens cover T×(H/p)×(W/p) and
the first RoPE axis indexes time (images use t=0, as Flux does).

Einsum letters: B batch, S query length, T key length, D embed,
H heads, K head_dim.
"""
from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rd_jax import sharding
from rd_jax.models.llm import attend
from rd_jax.models.layers import (Linear, RMSNorm, at_least_f32, gelu_tanh,
                                  layer_norm, scan_layers)

# ---------------------------------------------------------------- embeddings


def timestep_proj(t: jax.Array, dim: int = 256,
                  max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [B] -> [B, dim] (cos first, as Flux's time_proj)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


class MLPEmbedder(nnx.Module):
  """linear_1 -> SiLU -> linear_2 (TimestepEmbedding / text projection)."""

  def __init__(self, d_in: int, d: int, *, rngs: nnx.Rngs):
    self.linear_1 = Linear(d_in, d, ("channels", "embed"), rngs=rngs)
    self.linear_2 = Linear(d, d, ("embed", None), rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class TimeTextEmbed(nnx.Module):
  """temb = MLP(t) [+ MLP(guidance)] + MLP(pooled text)."""

  def __init__(self, d: int, pooled_dim: int, guidance: bool, *,
               rngs: nnx.Rngs):
    self.timestep_embedder = MLPEmbedder(256, d, rngs=rngs)
    self.guidance_embedder = (MLPEmbedder(256, d, rngs=rngs)
                              if guidance else None)
    self.text_embedder = MLPEmbedder(pooled_dim, d, rngs=rngs)

  def __call__(self, t, pooled, guidance=None):
    # Flux feeds t·1000 (the diffusion-step scale) to the sinusoid.
    emb = self.timestep_embedder(timestep_proj(t * 1000).astype(pooled.dtype))
    if self.guidance_embedder is not None:
      if guidance is None:
        raise ValueError("this config has guidance_embeds=True; pass a "
                         "guidance scale per sample")
      emb = emb + self.guidance_embedder(
          timestep_proj(guidance * 1000).astype(pooled.dtype))
    return emb + self.text_embedder(pooled)


class AdaLNLinear(nnx.Module):
  """SiLU(temb) -> n·D modulation vectors (AdaLayerNormZero{,Single}, norm_out)."""

  def __init__(self, d: int, n: int, *, rngs: nnx.Rngs):
    self.n = n
    # Zero init: every block starts as the identity (DiT's adaLN-Zero).
    self.linear = Linear(d, n * d, ("embed", "mlp"), rngs=rngs,
                         init_scale=0.0)

  def __call__(self, temb):
    return jnp.split(self.linear(jax.nn.silu(temb)), self.n, axis=-1)


def modulate(x, shift, scale):
  return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


# ---------------------------------------------------------------- attention


def rope(ids: jax.Array, axes_dim, theta: float = 10000.0):
  """Flux 3-axis RoPE angles: ids [S, 3] -> (cos, sin) [S, K/2]."""
  angles = []
  for i, d in enumerate(axes_dim):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles.append(ids[:, i, None].astype(jnp.float32) *
                  jnp.asarray(freqs, jnp.float32))
  angles = jnp.concatenate(angles, -1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, K]."""
  xf = at_least_f32(x).reshape(*x.shape[:-1], -1, 2)
  re, im = xf[..., 0], xf[..., 1]
  c, s = cos[None, :, None], sin[None, :, None]
  out = jnp.stack([re * c - im * s, re * s + im * c], -1)
  return out.reshape(x.shape).astype(x.dtype)


def attention(q, k, v, key_mask):
  """Softmax attention; q,k,v [B, S, H, K], key_mask [B, S] bool: the
  shared `llm.attend` (one kv head per query head) under a key mask."""
  b, s = key_mask.shape
  return attend(q, k, v, jnp.broadcast_to(key_mask[:, None, :], (b, s, s)))


class Attention(nnx.Module):
  """FluxAttention: joint (double-stream) or pre-only (single-stream)."""

  def __init__(self, d: int, heads: int, head_dim: int, joint: bool, *,
               rngs: nnx.Rngs):
    inner = heads * head_dim
    self.heads, self.head_dim = heads, head_dim
    self.to_q = Linear(d, inner, ("embed", "heads"), rngs=rngs)
    self.to_k = Linear(d, inner, ("embed", "heads"), rngs=rngs)
    self.to_v = Linear(d, inner, ("embed", "heads"), rngs=rngs)
    self.norm_q = RMSNorm(head_dim, "head_dim")
    self.norm_k = RMSNorm(head_dim, "head_dim")
    if joint:
      self.add_q_proj = Linear(d, inner, ("embed", "heads"), rngs=rngs)
      self.add_k_proj = Linear(d, inner, ("embed", "heads"), rngs=rngs)
      self.add_v_proj = Linear(d, inner, ("embed", "heads"), rngs=rngs)
      self.norm_added_q = RMSNorm(head_dim, "head_dim")
      self.norm_added_k = RMSNorm(head_dim, "head_dim")
      self.to_out = Linear(inner, d, ("heads", "embed"), rngs=rngs)
      self.to_add_out = Linear(inner, d, ("heads", "embed"), rngs=rngs)

  def _qkv(self, x, q, k, v, nq, nk):
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, self.head_dim)
    return nq(split(q(x))), nk(split(k(x))), split(v(x))

  def __call__(self, x, cos, sin, key_mask, context=None):
    """x [B, S, D] (context [B, L, D] first in the joint sequence)."""
    q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q,
                        self.norm_k)
    if context is not None:
      cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj,
                             self.add_v_proj, self.norm_added_q,
                             self.norm_added_k)
      q, k, v = (jnp.concatenate(p, 1) for p in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attention(q, k, v, key_mask)
    out = out.reshape(*out.shape[:2], -1)
    if context is None:
      return out
    n_txt = context.shape[1]
    return self.to_out(out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class FeedForward(nnx.Module):
  """GELU-tanh MLP, D -> ratio·D -> D (diffusers FeedForward net.0/net.2)."""

  def __init__(self, d: int, ratio: float, *, rngs: nnx.Rngs):
    self.proj_in = Linear(d, int(d * ratio), ("embed", "mlp"), rngs=rngs)
    self.proj_out = Linear(int(d * ratio), d, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.proj_out(gelu_tanh(self.proj_in(x)))


# ---------------------------------------------------------------- blocks


class TransformerBlock(nnx.Module):
  """Double-stream block: separate weights per stream, joint attention."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.num_attention_heads * cfg.attention_head_dim
    self.norm1 = AdaLNLinear(d, 6, rngs=rngs)
    self.norm1_context = AdaLNLinear(d, 6, rngs=rngs)
    self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                          joint=True, rngs=rngs)
    self.ff = FeedForward(d, cfg.mlp_ratio, rngs=rngs)
    self.ff_context = FeedForward(d, cfg.mlp_ratio, rngs=rngs)

  def __call__(self, x, c, temb, cos, sin, key_mask):
    sh, sc, g, sh2, sc2, g2 = self.norm1(temb)
    csh, csc, cg, csh2, csc2, cg2 = self.norm1_context(temb)
    a, ca = self.attn(modulate(x, sh, sc), cos, sin, key_mask,
                      context=modulate(c, csh, csc))
    x = x + g[:, None] * a
    x = x + g2[:, None] * self.ff(modulate(x, sh2, sc2))
    c = c + cg[:, None] * ca
    c = c + cg2[:, None] * self.ff_context(modulate(c, csh2, csc2))
    return x, c


class SingleTransformerBlock(nnx.Module):
  """Single-stream block on [text; image]: parallel attention + MLP."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    d = cfg.num_attention_heads * cfg.attention_head_dim
    f = int(d * cfg.mlp_ratio)
    self.norm = AdaLNLinear(d, 3, rngs=rngs)
    self.proj_mlp = Linear(d, f, ("embed", "mlp"), rngs=rngs)
    # One kernel over [attn; mlp] inputs, as diffusers' proj_out.
    self.proj_out = Linear(d + f, d, ("mlp", "embed"), rngs=rngs)
    self.attn = Attention(d, cfg.num_attention_heads, cfg.attention_head_dim,
                          joint=False, rngs=rngs)

  def __call__(self, h, temb, cos, sin, key_mask):
    shift, scale, gate = self.norm(temb)
    n = modulate(h, shift, scale)
    mlp = gelu_tanh(self.proj_mlp(n))
    a = self.attn(n, cos, sin, key_mask)
    return h + gate[:, None] * self.proj_out(jnp.concatenate([a, mlp], -1))


def _stack(cls, cfg, n: int, rngs: nnx.Rngs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make(r):
    return cls(cfg, rngs=r)
  return make(rngs)


class MMDiT(nnx.Module):
  """FluxTransformer2DModel on packed tokens."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
      raise ValueError(f"axes_dims_rope {tuple(cfg.axes_dims_rope)} must sum "
                       f"to attention_head_dim={cfg.attention_head_dim}")
    if cfg.num_layers < 1 or cfg.num_single_layers < 1:
      raise ValueError("num_layers and num_single_layers must be >= 1")
    self.axes_dims_rope = tuple(cfg.axes_dims_rope)
    self.remat, self.dtype = cfg.remat, cfg.dtype
    self.unroll = cfg.get("scan_unroll", 1)  # layers.scan_layers
    d = cfg.num_attention_heads * cfg.attention_head_dim
    feat = cfg.patch_size ** 2 * cfg.channels
    feat_in = cfg.patch_size ** 2 * (cfg.channels + cfg.get("cond_channels", 0))
    self.x_embedder = Linear(feat_in, d, ("patch", "embed"), rngs=rngs)
    self.context_embedder = Linear(cfg.joint_attention_dim, d,
                                   ("channels", "embed"), rngs=rngs)
    self.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim,
                                         cfg.guidance_embeds, rngs=rngs)
    self.transformer_blocks = _stack(TransformerBlock, cfg, cfg.num_layers,
                                     rngs)
    self.single_transformer_blocks = _stack(SingleTransformerBlock, cfg,
                                            cfg.num_single_layers, rngs)
    self.norm_out = AdaLNLinear(d, 2, rngs=rngs)
    # Zero init: the untrained model predicts v = 0.
    self.proj_out = Linear(d, feat, ("embed", "patch"), rngs=rngs,
                           init_scale=0.0)

  def __call__(self, tokens, img_ids, txt, txt_mask, pooled, t,
               guidance=None):
    """tokens [B, N, p·p·C], img_ids [N, 3], txt [B, L, J], txt_mask [B, L],
    pooled [B, P], t [B] in [0, 1] -> velocity tokens [B, N, p·p·C]."""
    dt = jnp.dtype(self.dtype)
    act = ("act_batch", "act_len", "act_embed")
    x = sharding.shard_activation(self.x_embedder(tokens.astype(dt)), act)
    c = sharding.shard_activation(self.context_embedder(txt.astype(dt)), act)
    temb = self.time_text_embed(t, pooled.astype(dt), guidance)
    n_txt = txt.shape[1]
    ids = jnp.concatenate([jnp.zeros((n_txt, 3), img_ids.dtype), img_ids])
    cos, sin = rope(ids, self.axes_dims_rope)
    key_mask = jnp.concatenate(
        [txt_mask.astype(bool), jnp.ones(tokens.shape[:2], bool)], 1)

    def double(block, xc):
      x, c = block(*xc, temb, cos, sin, key_mask)
      return sharding.shard_activation(x, act), sharding.shard_activation(
          c, act)

    x, c = scan_layers(double, (x, c), self.transformer_blocks, self.remat,
                       self.unroll)
    h = jnp.concatenate([c, x], 1)
    h = scan_layers(
        lambda b, h: sharding.shard_activation(
            b(h, temb, cos, sin, key_mask), act),
        h, self.single_transformer_blocks, self.remat, self.unroll)
    x = h[:, n_txt:]
    scale, shift = self.norm_out(temb)
    return at_least_f32(self.proj_out(modulate(x, shift, scale)))


# ---------------------------------------------------------------- patchify


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, (T,) H, W, C] -> tokens [B, (T·)(H/p)(W/p), C·p·p], features (c,y,x)."""
  *lead, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by patch {p}")
  x = x.reshape(*lead, h // p, p, w // p, p, c)
  n = len(lead)
  x = jnp.moveaxis(x, n + 4, n + 1)  # [..., h/p, c, p, w/p, p]
  x = jnp.moveaxis(x, n + 3, n + 1)  # [..., h/p, w/p, c, p, p]
  b = lead[0]
  return x.reshape(b, -1, c * p * p)


def unpatchify(tokens: jax.Array, shape, p: int) -> jax.Array:
  """Inverse of `patchify`; `shape` is the pixel/latent shape [B,(T,)H,W,C]."""
  *lead, h, w, c = shape
  x = tokens.reshape(*lead, h // p, w // p, c, p, p)
  n = len(lead)
  x = jnp.moveaxis(x, n + 2, n + 4)  # [..., h/p, w/p, p, p, c]
  x = jnp.moveaxis(x, n + 2, n + 1)  # [..., h/p, p, w/p, p, c]
  return x.reshape(shape)


def position_ids(shape, p: int) -> jax.Array:
  """RoPE ids [N, 3] = (frame, row, col) of each token of `patchify`."""
  *lead, h, w, _ = shape
  frames = lead[1] if len(lead) == 2 else 1
  t, y, x = np.meshgrid(np.arange(frames), np.arange(h // p),
                        np.arange(w // p), indexing="ij")
  return jnp.asarray(np.stack([t, y, x], -1).reshape(-1, 3), jnp.int32)


# ---------------------------------------------------------------- pure API


@functools.lru_cache(maxsize=8)
def _graph(cfg_json: str):
  cfg = ml_collections.ConfigDict(json.loads(cfg_json))
  model = nnx.eval_shape(lambda: MMDiT(cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model, nnx.Param)


def abstract(cfg):
  """(graphdef, abstract nnx.State of params) without allocating."""
  return _graph(cfg.to_json())


def init(cfg, rng: jax.Array) -> dict:
  """Random parameters as a plain nested dict of arrays."""
  _, state = nnx.split(MMDiT(cfg, rngs=nnx.Rngs(params=rng)), nnx.Param)
  return nnx.to_pure_dict(state)


def param_count(cfg) -> int:
  return sum(int(np.prod(x.shape)) for x in
             jax.tree.leaves(nnx.to_pure_dict(abstract(cfg)[1])))


def logical_specs(cfg) -> dict:
  """Logical PartitionSpec per parameter, same tree as `init`'s output."""
  return nnx.to_pure_dict(sharding.logical_specs(abstract(cfg)[1]))


def apply(cfg, params: dict, x: jax.Array, t: jax.Array, txt: jax.Array,
          txt_mask: jax.Array, pooled: jax.Array,
          guidance: jax.Array | None = None) -> jax.Array:
  """Velocity v(x_t, t) [B, (T,) H, W, channels] of x [B, (T,) H, W,
  channels + cond_channels]."""
  model = nnx.merge(abstract(cfg)[0], params)
  tokens = patchify(x, cfg.patch_size)
  v = model(tokens, position_ids(x.shape, cfg.patch_size), txt, txt_mask,
            pooled, t, guidance)
  return unpatchify(v, x.shape[:-1] + (cfg.channels,), cfg.patch_size)
