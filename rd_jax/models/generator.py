"""The text-to-image/video generator: text encoder + MMDiT (+ VAE), pure API.

Parameters are one plain dict {'text': ..., 'dit': ...}. Samples live in
"model space": pixels scaled to [-1, 1] (`space='pixel'`, the ShapesWorld
default) or VAE latents (`space='latent'`; real sizes, where the text
encoders are external and `encode_text` is replaced by precomputed T5/CLIP
embeddings packed into a `TextCond`).

    params = generator.init(cfg, rng)
    cond = generator.encode_text(cfg, params, ids, mask)
    v = generator.velocity(cfg, params, x_t, t, cond)
    x0, x0_traj = flow.sample(params, noise, cond, schedule,
                              velocity_fn=generator.velocity_fn(cfg))
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from rd_jax.models import mmdit, text_encoder, vae
from rd_jax.models.text_encoder import TextCond


def dit_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MMDiT's config: `cfg.dit`, with `channels` more input channels
  when `cfg.first_frame_concat` puts frame 0 on every frame's channels."""
  if not cfg.get("first_frame_concat"):
    return cfg.dit
  dit = ml_collections.ConfigDict(cfg.dit.to_dict())
  dit.cond_channels = dit.channels
  return dit


def init(cfg: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """{'dit': ..., 'text': ...}; no 'text' when the encoders are external
  (`cfg.text` is None)."""
  k_text, k_dit = jax.random.split(rng)
  out = {"dit": mmdit.init(dit_config(cfg), k_dit)}
  if cfg.text is not None:
    out["text"] = text_encoder.init(cfg.text, k_text)
  return out


def logical_specs(cfg: ml_collections.ConfigDict) -> dict:
  out = {"dit": mmdit.logical_specs(dit_config(cfg))}
  if cfg.text is not None:
    out["text"] = text_encoder.logical_specs(cfg.text)
  return out


def param_count(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  out = {"dit": mmdit.param_count(dit_config(cfg))}
  if cfg.text is not None:
    out["text"] = text_encoder.param_count(cfg.text)
  return out


def encode_text(cfg, params: dict, ids: jax.Array,
                mask: jax.Array) -> TextCond:
  """Prompt ids [B, L] (mask [B, L]) -> TextCond. An all-zero mask row is the
  empty prompt, i.e. the unconditional input of classifier-free guidance."""
  if cfg.text is None:
    raise ValueError("this generator config has external text encoders "
                     "(model.text=None); pass precomputed T5/CLIP embeddings "
                     "as a TextCond instead of prompt ids")
  return text_encoder.apply(cfg.text, params["text"], ids, mask)


def unconditional(cond: TextCond) -> TextCond:
  """The empty-prompt condition: no text tokens visible, pooled vector 0."""
  return TextCond(cond.txt, jnp.zeros_like(cond.txt_mask),
                  jnp.zeros_like(cond.pooled))


PREDICTIONS = ("velocity", "sample")
# x-prediction: v = (x_t − x̂0) / max(t, T_MIN); the clip bounds the
# loss weight 1/t² near t = 0 and the Heun step's evaluation at t = 0.
T_MIN = 0.05


def velocity(cfg, params: dict, x: jax.Array, t: jax.Array, cond: TextCond,
             guidance: jax.Array | None = None) -> jax.Array:
  """v(x_t, t | text) for x [B, (T,) H, W, C] in model space.

  `cfg.prediction` says what the MMDiT's output is: 'velocity' (v = ε − x0,
  Flux) or 'sample' (x̂0, converted here to v; JiT, Li & He 2025: a clean
  image is easier to predict than noise when each token carries many
  pixels, as in pixel space with large patches). `cfg.first_frame_concat`
  (videos): frame 0 of x is also given on every frame's channels, as
  Stable Video Diffusion gives its conditioning frame, so each token sees
  the pixels of the given frame it continues.
  """
  x_in = x
  if cfg.get("first_frame_concat"):
    if x.ndim != 5:
      raise ValueError(f"model.first_frame_concat needs videos [B, T, H, W, "
                       f"C]; got shape {x.shape}: set it only on a video "
                       f"stage's model")
    # Frame 0 beside every frame: the clean given frame in I2V (sampling
    # and training hold it there), a noisy one in T2V.
    x_in = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], x.shape)], -1)
  out = mmdit.apply(dit_config(cfg), params["dit"], x_in, t, cond.txt,
                    cond.txt_mask, cond.pooled, guidance)
  prediction = cfg.get("prediction", "velocity")
  if prediction == "velocity":
    return out
  if prediction != "sample":
    raise ValueError(f"unknown model.prediction {prediction!r}; use one of "
                     f"{PREDICTIONS}")
  tt = jnp.maximum(t.astype(x.dtype), T_MIN).reshape(
      t.shape + (1,) * (x.ndim - 1))
  return (x - out.astype(x.dtype)) / tt


def velocity_fn(cfg, guidance: float | None = None):
  """`velocity` as the (params, x, t, cond) callable `flow.sample` takes;
  `guidance` feeds Flux-dev's distilled-guidance embedding."""
  def fn(params, x, t, cond):
    g = None if guidance is None else jnp.full(t.shape, guidance, x.dtype)
    return velocity(cfg, params, x, t, cond, g)
  return fn


def latent(cfg) -> bool:
  return cfg.get("space", "pixel") == "latent"


def sample_shape(st, batch: int) -> tuple[int, ...]:
  """Shape of a stage's samples (and noise) in model space:
  [B, (T,) R, R, 3] pixels, or [B, (T,) R/f, R/f, C] VAE latents (f = the
  VAE's downsampling factor)."""
  frames = (st.frames,) if st.get("frames") else ()
  if latent(st.model):
    side = st.resolution // 2 ** (len(st.model.vae.block_out_channels) - 1)
    return (batch,) + frames + (side, side, st.model.dit.channels)
  return (batch,) + frames + (st.resolution, st.resolution, 3)


def decode_unit(cfg, vae_params, x: jax.Array) -> jax.Array:
  """Model space -> reward-model pixels in [0, 1], differentiable: the VAE
  decode of latents (`vae_params` frozen, in their own dtype), or
  `to_unit` of pixels (`vae_params` unused)."""
  if not latent(cfg):
    return to_unit(x)
  dtype = jax.tree.leaves(vae_params)[0].dtype
  img = vae.decode(cfg.vae, vae_params, x.astype(dtype))
  return jnp.clip((img.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def to_model_space(pixels_uint8: jax.Array) -> jax.Array:
  return pixels_uint8.astype(jnp.float32) / 127.5 - 1.0


def to_unit(x: jax.Array) -> jax.Array:
  """Model space -> reward-model pixels in [0, 1] (differentiable)."""
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def to_pixels(x: jax.Array) -> jax.Array:
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnums=1)
def resize(pixels: jax.Array, size: int) -> jax.Array:
  """uint8 [..., H, W, 3] -> float [..., size, size, 3], area-averaged."""
  *lead, h, w, c = pixels.shape
  if h % size or w % size:
    raise ValueError(f"cannot area-resize {h}x{w} to {size}x{size}")
  x = pixels.astype(jnp.float32).reshape(*lead, size, h // size, size,
                                         w // size, c)
  return x.mean((-4, -2))
