"""Llama-family decoder LLM (the language half of InternVL), Flax NNX.

Covers what the InternVL2.5 LLMs need in their Hugging Face form: Qwen2 /
Qwen2.5 (QKV bias, GQA, tied or untied embeddings) and InternLM2 / Llama
(optional bias on every attention projection and on the MLP). RMSNorm,
SwiGLU, RoPE (rotate-half layout, as in HF) with `default`, `linear` and
`dynamic` (NTK) scaling.

Einsum dimension letters (used in this file and in vit.py):
  B batch, T query tokens, S key tokens, D model width, N query heads,
  K key/value heads, G query heads per kv head (N = K*G), H head dim,
  F MLP width, V vocabulary.

The decoder layers are one `DecoderLayer` vmapped at init (params carry a
leading `layers` axis) and run with `layers.scan_layers` (lax.scan under the
config's remat policy: none | full | dots | dots_no_batch).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rd_jax import sharding
from rd_jax.models.layers import dense, scan_layers

_INIT_STD = 0.02  # HF initializer_range; real weights come from the converter.


def normal(rngs: nnx.Rngs, shape, dtype) -> jax.Array:
  return _INIT_STD * jax.random.normal(rngs.params(), shape, dtype)


def zeros(shape, dtype) -> jax.Array:
  return jnp.zeros(shape, dtype)


def ones(shape, dtype) -> jax.Array:
  return jnp.ones(shape, dtype)


def cast(p: nnx.Param, dtype) -> jax.Array:
  return p[...].astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """HF RMSNorm: normalise in fp32, cast back, then scale ([..., D] -> same)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | None) -> jax.Array:
  """Softmax attention with grouped kv heads.

  q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] (True = attend) or
  None. Query head n uses kv head n // G, as HF's `repeat_kv`. Softmax in
  fp32. Returns [B, T, N, H].

  Computed as batched 3-D dots, [B*K, G*T, H] x [B*K, S, H]: the same
  product as einsum("btkgh,bskh->bkgts"), whose 5-D dots and softmax
  XLA:CPU ran 1.5x slower forward and backward (the default RM's layer at
  32 x 128 tokens: 23.5 -> 16 ms), with the backward written out
  (`_attention`; docs/reward_models.md, "Step time").
  """
  b, t, n, h = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv

  def heads_first(x):  # [B, S, K, H] -> [B*K, S, H]
    return x.transpose(0, 2, 1, 3).reshape(b * kv, s, h)

  q = q.reshape(b, t, kv, g, h).transpose(0, 2, 3, 1, 4).reshape(
      b * kv, g * t, h)
  out = _attention(q, heads_first(k), heads_first(v), mask)
  return out.reshape(b, kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(
      b, t, n, h)


def _keep(mask, z: int, q_len: int):
  """attend's mask [B, T, S] -> [B*K, G*T, S] for the [Z, Q, S] logits, built
  where it is used (a saved [Z, Q, S] copy would cost a quarter of the
  probabilities' memory)."""
  b, t, s = mask.shape
  kv, g = z // b, q_len // t
  return jnp.broadcast_to(jnp.tile(mask, (1, g, 1))[:, None],
                          (b, kv, q_len, s)).reshape(z, q_len, s)


def _attention_fwd(q, k, v, mask):
  """[Z, Q, H] x [Z, S, H] (x [Z, S, H]) -> ([Z, Q, H], residuals)."""
  logits = jnp.einsum("zqh,zsh->zqs", q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(_keep(mask, *q.shape[:2]), logits,
                       jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("zqs,zsh->zqh", probs.astype(v.dtype), v)
  return out, (q, k, v, mask, probs)


def _attention_bwd(res, d_out):
  """The softmax backward in one expression, dS = P * (dP - rowsum(dP * P)):
  what autodiff of the forward gives, which XLA:CPU ran as separate
  broadcasts, selects and reductions (the RM step: docs/reward_models.md,
  "Step time", stop 48). The dots take their operands' dtype (bf16 at the
  real sizes) and accumulate in fp32."""
  q, k, v, mask, probs = res
  f32 = jnp.float32
  d_v = jnp.einsum("zqs,zqh->zsh", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum("zqh,zsh->zqs", d_out, v, preferred_element_type=f32)
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, -1, keepdims=True))
  d_logits = d_logits * q.shape[-1] ** -0.5
  if mask is not None:  # a row that attends to nothing has uniform probs
    d_logits = jnp.where(_keep(mask, *q.shape[:2]), d_logits, 0.0)
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("zqs,zsh->zqh", d_logits, k, preferred_element_type=f32)
  d_k = jnp.einsum("zqs,zqh->zsh", d_logits, q, preferred_element_type=f32)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v, None


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _attention_fwd(q, k, v, mask)[0]


_attention.defvjp(_attention_fwd, _attention_bwd)


def rope_inv_freq(cfg: ml_collections.ConfigDict,
                  positions: jax.Array) -> jax.Array:
  """Inverse RoPE frequencies [H/2] (or [B, H/2] for `dynamic`).

  `dynamic` (NTK) follows HF: the base grows only when the longest sequence
  (max position + 1) exceeds `max_position_embeddings`; below that it is
  exactly the default rope.
  """
  dim = cfg.head_dim
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  if cfg.rope_type in ("default", "linear"):
    return 1.0 / (cfg.rope_theta ** exponent)
  if cfg.rope_type == "dynamic":
    seq = jnp.max(positions).astype(jnp.float32) + 1.0
    grown = cfg.rope_theta * (
        cfg.rope_factor * seq / cfg.max_position_embeddings
        - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
    base = jnp.where(seq > cfg.max_position_embeddings, grown,
                     cfg.rope_theta)
    return 1.0 / (base ** exponent)
  raise ValueError(f"rope_type {cfg.rope_type!r} is not supported; use "
                   "'default', 'linear' or 'dynamic'")


def rope_tables(cfg: ml_collections.ConfigDict, positions: jax.Array,
                dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, T, H] for integer positions [B, T] (HF rotate-half layout)."""
  pos = positions.astype(jnp.float32)
  if cfg.rope_type == "linear":
    pos = pos / cfg.rope_factor
  freqs = pos[..., None] * rope_inv_freq(cfg, positions)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, T, N, H]; cos, sin: [B, T, H]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nnx.Module):
  """Causal GQA self-attention with RoPE and optional biases."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype,
               rngs: nnx.Rngs):
    d, n, kv, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = param_dtype
    self.dtype = dtype
    self.q = sharding.param(normal(rngs, (d, n, h), pd),
                            ("embed", "heads", "head_dim"))
    self.k = sharding.param(normal(rngs, (d, kv, h), pd),
                            ("embed", "kv_heads", "head_dim"))
    self.v = sharding.param(normal(rngs, (d, kv, h), pd),
                            ("embed", "kv_heads", "head_dim"))
    self.o = sharding.param(normal(rngs, (n, h, d), pd),
                            ("heads", "head_dim", "embed"))
    if cfg.qkv_bias:
      self.q_bias = sharding.param(zeros((n, h), pd), ("heads", "head_dim"))
      self.k_bias = sharding.param(zeros((kv, h), pd), ("kv_heads", "head_dim"))
      self.v_bias = sharding.param(zeros((kv, h), pd), ("kv_heads", "head_dim"))
    if cfg.o_bias:
      self.o_bias = sharding.param(zeros((d,), pd), ("embed",))

  def __call__(self, x, cos, sin, mask):
    """x: [B, T, D] -> [B, T, D]."""
    dt = self.dtype
    q = dense(x, cast(self.q, dt))
    k = dense(x, cast(self.k, dt))
    v = dense(x, cast(self.v, dt))
    if hasattr(self, "q_bias"):
      q = q + cast(self.q_bias, dt)
      k = k + cast(self.k_bias, dt)
      v = v + cast(self.v_bias, dt)
    q = sharding.shard_activation(apply_rope(q, cos, sin),
                                  ("act_batch", "act_len", "act_heads", None))
    k = apply_rope(k, cos, sin)
    out = dense(attend(q, k, v, mask), cast(self.o, dt), 2)
    if hasattr(self, "o_bias"):
      out = out + cast(self.o_bias, dt)
    return out


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype,
               rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.mlp_dim, param_dtype
    self.dtype = dtype
    self.gate = sharding.param(normal(rngs, (d, f), pd), ("embed", "mlp"))
    self.up = sharding.param(normal(rngs, (d, f), pd), ("embed", "mlp"))
    self.down = sharding.param(normal(rngs, (f, d), pd), ("mlp", "embed"))
    if cfg.mlp_bias:
      self.gate_bias = sharding.param(zeros((f,), pd), ("mlp",))
      self.up_bias = sharding.param(zeros((f,), pd), ("mlp",))
      self.down_bias = sharding.param(zeros((d,), pd), ("embed",))

  def __call__(self, x):
    """x: [B, T, D] -> [B, T, D]."""
    dt = self.dtype
    gate = dense(x, cast(self.gate, dt))
    up = dense(x, cast(self.up, dt))
    if hasattr(self, "gate_bias"):
      gate, up = gate + cast(self.gate_bias, dt), up + cast(self.up_bias, dt)
    hidden = sharding.shard_activation(jax.nn.silu(gate) * up,
                                       ("act_batch", "act_len", "act_mlp"))
    out = dense(hidden, cast(self.down, dt))
    if hasattr(self, "down_bias"):
      out = out + cast(self.down_bias, dt)
    return out


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.eps = cfg.norm_eps
    self.attn_norm = sharding.param(ones((d,), param_dtype), ("norm",))
    self.attn = Attention(cfg, dtype, param_dtype, rngs)
    self.mlp_norm = sharding.param(ones((d,), param_dtype), ("norm",))
    self.mlp = MLP(cfg, dtype, param_dtype, rngs)

  def __call__(self, x, cos, sin, mask):
    y = rms_norm(x, self.attn_norm[...], self.eps)
    x = x + self.attn(y, cos, sin, mask)
    x = x + self.mlp(rms_norm(x, self.mlp_norm[...], self.eps))
    return sharding.shard_activation(x, ("act_batch", "act_len", "act_embed"))


class Decoder(nnx.Module):
  """Token embedding, scanned decoder layers, final RMSNorm, LM head.

  cfg: the `text` sub-config (keys: `internvl.text_config`).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, dtype, param_dtype,
               remat: str, rngs: nnx.Rngs, unroll: int = 1):
    self.cfg_rope = ml_collections.FrozenConfigDict({
        k: cfg[k] for k in ("head_dim", "rope_theta", "rope_type",
                            "rope_factor", "max_position_embeddings")})
    self.dtype, self.remat, self.eps = dtype, remat, cfg.norm_eps
    self.unroll = unroll
    self.tie_embeddings = cfg.tie_embeddings
    d, v = cfg.hidden_size, cfg.vocab_size
    self.embed = sharding.param(normal(rngs, (v, d), param_dtype),
                                ("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_layers(rngs):
      return DecoderLayer(cfg, dtype, param_dtype, rngs)

    self.layers = make_layers(rngs)
    self.final_norm = sharding.param(ones((d,), param_dtype), ("norm",))
    if not cfg.tie_embeddings:
      self.lm_head = sharding.param(normal(rngs, (d, v), param_dtype),
                                    ("embed", "vocab"))

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """[B, L] int -> [B, L, D] in the compute dtype."""
    return jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)

  def __call__(self, embeds: jax.Array, attention_mask: jax.Array | None,
               positions: jax.Array | None) -> jax.Array:
    """Input embeddings [B, L, D] -> final-norm hidden states [B, L, D].

    attention_mask: [B, L], 1 for real tokens (keys with 0 are never
    attended); positions: [B, L] RoPE positions, default 0..L-1 (as HF
    when no position_ids are given).
    """
    b, length, _ = embeds.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = jnp.tril(jnp.ones((length, length), bool))[None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, :]
    mask = jnp.broadcast_to(mask, (b, length, length))
    cos, sin = rope_tables(self.cfg_rope, positions, self.dtype)
    x = sharding.shard_activation(embeds.astype(self.dtype),
                                  ("act_batch", "act_len", "act_embed"))
    x = scan_layers(lambda layer, h: layer(h, cos, sin, mask), x,
                    self.layers, self.remat, self.unroll)
    return rms_norm(x, self.final_norm[...], self.eps)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, P, D] -> [B, P, V] (fp32 accumulation)."""
    if self.tie_embeddings:
      return jnp.einsum("bpd,vd->bpv", hidden, cast(self.embed, self.dtype),
                        preferred_element_type=jnp.float32)
    return jnp.einsum("bpd,dv->bpv", hidden, cast(self.lm_head, self.dtype),
                      preferred_element_type=jnp.float32)
