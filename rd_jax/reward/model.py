"""RewardDance reward functions on InternVL (DESIGN.md §2.1), pure and jit-able.

    params = init(rm, rng)
    q = sequences.encode(tok, questions, num_images=2 * T, ...)   # once
    r = pairwise_reward(rm, params, ref_images, cand_images, q)   # [B]
    r = pointwise_reward(rm, params, images, q)                   # [B]
    r = regressive_reward(rm, params, images, q)                  # [B]

Images are float in [0, 1] (uint8 is accepted and divided by 255), laid out
[B, H, W, 3] for images or [B, T, H, W, 3] for videos (T = rm.frames frames,
each one InternVL image in the sequence). They are resized (bilinear) to the
vision tower's resolution and ImageNet-normalised *inside* the reward, so the
reward is differentiable with respect to the pixels (ReFL needs that). Every
function also takes one unbatched example (question [L], images [H, W, 3])
and so can be `jax.vmap`ped.

`rm` (ConfigDict, see configs/rm_shapes.py): model (the InternVL config),
yes_id, no_id, readout ('two_token' | 'full_vocab'), frames (None | T).
params: {'vlm': InternVL params (nnx.State), 'head': {'w': [D], 'b': []}}
(the scalar head is used by the regressive baseline only).

Einsum letters: B batch, D LLM width, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from rd_jax.models import internvl, vit

READOUTS = ("two_token", "full_vocab")


def _float(dtype):
  """At least fp32 (fp64 stays fp64: finite-difference tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _is_matrix(path, x) -> bool:
  """A weight matrix (>= 2 dims besides the stacked `layers` axis)."""
  stacked = any(getattr(k, "key", None) == "layers" for k in path)
  return x.ndim - int(stacked) >= 2


def init(rm: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """Random reward-model params: the InternVL backbone and a scalar head.

  rm.init_scale (default 1) multiplies every matrix of the backbone's
  HF-style init (std 0.02, tuned for widths ~1000). Only matrices: the
  layer-stacked params under `layers` carry a leading layer axis, so a norm
  scale or ViT layer-scale there is [layers, D] and is left alone (scaling
  it too made init_scale=4 blow up the residual stream).
  rm.vision_init_scale (default 0: the same as init_scale) is the ViT's
  own: at the ShapesWorld widths the recipe's ViT starts at twice the
  LLM's scale, which reads the images sooner in the caption stage
  (docs/reward_models.md, stop 54).

  rm.vision_pos_sincos (default 0: keep the random init) > 0 starts the
  ViT's patch position embeddings at that amplitude times a 2-D sin-cos
  table (vit.sincos_2d; the class slot keeps its init). From random
  weights the position table is tiny next to the patch embedding (std
  0.08 against ~2 per channel at the ShapesWorld sizes), and an object's
  token carries almost none of its position; with the table it does, and
  the caption VLM names relations above chance, though the pairwise RMs
  started from it do not gain (docs/reward_models.md): off by default.
  """
  d = rm.model.text.hidden_size
  vlm = internvl.init(rm.model, rng)
  scale = rm.get("init_scale", 1.0)
  vision_scale = rm.get("vision_init_scale", 0.0) or scale

  def rescale(path, x):
    if not _is_matrix(path, x):
      return x
    vision = getattr(path[0], "key", None) == "vision"
    return x * (vision_scale if vision else scale)

  if scale != 1.0 or vision_scale != 1.0:
    vlm = jax.tree_util.tree_map_with_path(rescale, vlm)
  amplitude = rm.get("vision_pos_sincos", 0.0)
  if amplitude:
    pos = vlm["vision"]["pos"]
    grid = rm.model.vision.image_size // rm.model.vision.patch_size
    table = amplitude * vit.sincos_2d(grid, pos.shape[-1])
    pos.value = jnp.concatenate(
        [pos[...][:1], jnp.asarray(table, pos.dtype)], 0)
  return {"vlm": vlm,
          "head": {"w": jnp.zeros((d,), jnp.float32),
                   "b": jnp.zeros((), jnp.float32)}}


def resized(images: jax.Array, image_size: int) -> jax.Array:
  """[..., H, W, 3] in [0, 1] (or uint8) -> float [..., S, S, 3] in [0, 1]."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(_float(images.dtype))
  lead, (h, w) = images.shape[:-3], images.shape[-3:-1]
  if (h, w) != (image_size, image_size):
    images = jax.image.resize(images, lead + (image_size, image_size, 3),
                              "bilinear", antialias=h > image_size)
  return images


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
  """[..., H, W, 3] in [0, 1] (or uint8) -> normalised [..., 3, S, S]."""
  images = resized(images, image_size)
  mean = jnp.asarray(internvl.IMAGENET_MEAN, images.dtype)
  std = jnp.asarray(internvl.IMAGENET_STD, images.dtype)
  return jnp.moveaxis((images - mean) / std, -1, -3)


def embed_images(rm, params, images: jax.Array) -> jax.Array:
  """[..., H, W, 3] -> projected image tokens [..., P, D] (reusable)."""
  x = preprocess(images, rm.model.vision.image_size)
  lead = x.shape[:-3]
  feats = internvl.image_features(rm.model, params["vlm"],
                                  x.reshape(-1, *x.shape[-3:]))
  return feats.reshape(*lead, *feats.shape[1:])


def logits_and_hidden(rm, params, question: dict, image_embeds: jax.Array,
                      positions: jax.Array | None = None):
  """Logits [B, P, V] and hidden [B, P, D] at positions [B, P] (default:
  read_pos). image_embeds: [B, I, P_img, D], I images per sequence."""
  if positions is None:
    positions = question["read_pos"][:, None]
  return internvl.logits_at(
      rm.model, params["vlm"], question["input_ids"], None, positions,
      image_embeds=image_embeds, attention_mask=question["attention_mask"],
      return_hidden=True)


def readout(logits: jax.Array, yes_id: int, no_id: int,
            kind: str = "two_token") -> jax.Array:
  """P("yes") from answer-position logits [..., V].

  two_token: softmax over {yes, no} = sigmoid(l_yes - l_no) (default);
  full_vocab: softmax over the whole vocabulary.
  """
  logits = logits.astype(_float(logits.dtype))
  if kind == "two_token":
    return jax.nn.sigmoid(logits[..., yes_id] - logits[..., no_id])
  if kind == "full_vocab":
    return jax.nn.softmax(logits, -1)[..., yes_id]
  raise ValueError(f"unknown readout {kind!r}; one of {READOUTS}")


def margin(logits: jax.Array, yes_id: int, no_id: int) -> jax.Array:
  """s = l_yes - l_no (the pointwise generative Bradley-Terry score)."""
  logits = logits.astype(_float(logits.dtype))
  return logits[..., yes_id] - logits[..., no_id]


def _batch(question: dict, *images):
  """Adds a batch axis to an unbatched example (for vmap); returns unbatch."""
  if question["input_ids"].ndim == 2:
    return question, images, lambda x: x
  return (jax.tree.map(lambda x: x[None], question),
          tuple(x[None] for x in images), lambda x: x[0])


def per_sequence(rm, x: jax.Array) -> jax.Array:
  """[B, (T,) H, W, 3] -> [B, T, H, W, 3] (T = 1 for images)."""
  return x if rm.get("frames") else x[:, None]


def _generative(rm, params, question, embeds, kind):
  logits, _ = logits_and_hidden(rm, params, question, embeds)
  return readout(logits[:, 0], rm.yes_id, rm.no_id, kind or rm.readout)


def pairwise_reward(rm, params, ref_images: jax.Array,
                    cand_images: jax.Array, question: dict, *,
                    symmetric: bool = False,
                    readout_kind: str | None = None) -> jax.Array:
  """r(ref, cand) = P("yes": image 2 (cand) is better than image 1 (ref)).

  question: `sequences.encode(..., num_images=2T)` arrays. symmetric=True
  returns 1/2 [r(ref, cand) + 1 - r(cand, ref)] (position-debiased).
  -> [B] (or a scalar for one unbatched example).
  """
  question, (ref, cand), unbatch = _batch(question, ref_images, cand_images)
  # Each at the RM's size first: the two may differ (a 448 px reference,
  # a 1024 px sample).
  s = rm.model.vision.image_size
  ref, cand = (resized(per_sequence(rm, x), s) for x in (ref, cand))
  t = ref.shape[1]
  feats = embed_images(rm, params, jnp.concatenate([ref, cand], 1))
  r = _generative(rm, params, question, feats, readout_kind)
  if symmetric:
    swapped = jnp.concatenate([feats[:, t:], feats[:, :t]], 1)
    r = 0.5 * (r + 1.0 - _generative(rm, params, question, swapped,
                                     readout_kind))
  return unbatch(r)


def pointwise_reward(rm, params, images: jax.Array, question: dict, *,
                     readout_kind: str | None = None) -> jax.Array:
  """r(x) = P("yes" | x, prompt, instruction) -> [B]."""
  question, (x,), unbatch = _batch(question, images)
  feats = embed_images(rm, params, per_sequence(rm, x))
  return unbatch(_generative(rm, params, question, feats, readout_kind))


def regressive_score(params, hidden: jax.Array) -> jax.Array:
  """Scalar head on the last prompt token's hidden state [..., D]."""
  head = params["head"]
  hidden = hidden.astype(_float(hidden.dtype))
  return jnp.einsum("...d,d->...", hidden, head["w"]) + head["b"]


def regressive_reward(rm, params, images: jax.Array,
                      question: dict) -> jax.Array:
  """The regressive baseline's scalar reward (unbounded) -> [B]."""
  question, (x,), unbatch = _batch(question, images)
  feats = embed_images(rm, params, per_sequence(rm, x))
  _, hidden = logits_and_hidden(rm, params, question, feats)
  return unbatch(regressive_score(params, hidden[:, 0]))
