"""InternVL (the RewardDance reward model's backbone) as pure functions.

    params = init(cfg, rng)                      # nnx.State, logical axis names
    logits = forward(cfg, params, input_ids, pixel_values)          # [B, L, V]
    logits = logits_at(cfg, params, input_ids, pixel_values, read_positions)
    hidden = hidden_states(cfg, params, input_ids, pixel_values)    # [B, L, D]
    feats = image_features(cfg, params, pixel_values)   # reusable image_embeds
    tiles = dynamic_tiles(image)       # host-side InternVL tiling [n, 3, S, S]
    cfg, params = rd_jax.convert.internvl.load(path)   # converted or HF dir

Architecture ("ViT-MLP-LLM", as Hugging Face's
`InternVLForConditionalGeneration`): InternViT (vit.py) encodes every image
tile to 1 + (S/14)^2 tokens; the class token is dropped; pixel shuffle (0.5)
folds 2x2 neighbouring tokens into one of 4x the width; the projector
(LayerNorm -> Linear -> GELU -> Linear) maps them to the LLM width; these
features replace, in order, the embeddings of the `<IMG_CONTEXT>` tokens
(`cfg.image_token_id`): of the whole batch (row-major, HF) for [N, 3, S, S]
pixels, or of each sequence for [B, I, 3, S, S], so any number of images per
sequence works (pairwise: 2, video: T frames, dynamic tiling: tiles +
thumbnail). The decoder LLM (llm.py) then runs causally.

cfg (ml_collections, built by configs/internvl.py or the converter) keys:
  vision.*          InternViT: hidden_size, num_layers, num_heads, mlp_dim,
                    norm_type (layer_norm|rms_norm), norm_eps, qk_norm,
                    qkv_bias, image_size, patch_size, num_channels,
                    use_mean_pooling (False = final LayerNorm),
                    layer_scale_init
  text.*            LLM: vocab_size, hidden_size, num_layers, num_heads,
                    num_kv_heads, head_dim, mlp_dim, norm_eps, rope_theta,
                    rope_type (default|linear|dynamic), rope_factor,
                    max_position_embeddings, qkv_bias, o_bias, mlp_bias,
                    tie_embeddings
  downsample_ratio  pixel-shuffle ratio (0.5)
  image_token_id    id of `<IMG_CONTEXT>`
  vision_feature_layer  -1 = last layer (HF semantics otherwise)
  projector_norm_eps    LayerNorm eps of the projector (torch default 1e-5)
  dtype, param_dtype    compute / parameter dtypes ('float32', 'bfloat16')
  remat                 'none' | 'full' | 'dots' | 'dots_no_batch'
  scan_unroll           layers per loop iteration of both layer stacks
                        (lax.scan's unroll): 1 = a rolled loop (default),
                        >= num_layers = unrolled (faster CPU steps for the
                        tiny ShapesWorld models; same params and values)

Einsum letters: B batch, P pixel-shuffle output tokens / read positions,
C 4x vision width, D LLM width, V vocabulary.
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
from rd_jax.models import llm, vit
from rd_jax.models.layers import dense

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vision_config(**kw) -> ml_collections.ConfigDict:
  """InternViT config (defaults: a tiny smoke size); keys override."""
  base = dict(hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
              norm_type="layer_norm", norm_eps=1e-6, qk_norm=False,
              qkv_bias=True, image_size=448, patch_size=14, num_channels=3,
              use_mean_pooling=True, layer_scale_init=0.1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def text_config(**kw) -> ml_collections.ConfigDict:
  """Decoder LLM config (defaults: a tiny smoke size); keys override."""
  base = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, mlp_dim=128, norm_eps=1e-6,
              rope_theta=1e6, rope_type="default", rope_factor=2.0,
              max_position_embeddings=32768, qkv_bias=True, o_bias=False,
              mlp_bias=False, tie_embeddings=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def model_config(vision: ml_collections.ConfigDict,
                 text: ml_collections.ConfigDict, **kw
                 ) -> ml_collections.ConfigDict:
  """The full InternVL config: vision + text sub-configs and VLM keys."""
  base = dict(vision=vision, text=text, downsample_ratio=0.5,
              image_token_id=151667, vision_feature_layer=-1,
              vision_feature_select_strategy="default",
              projector_norm_eps=1e-5, dtype="float32",
              param_dtype="float32", remat="none", scan_unroll=1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _dtype(name: str):
  return jnp.dtype(name)


def pixel_shuffle(x: jax.Array, ratio: float) -> jax.Array:
  """[N, n*n, C] row-major patch tokens -> [N, (n*r)^2, C/r^2].

  Each output token concatenates an f x f block (f = 1/r) of inputs in the
  channel order (block row, block col, channel): HF's view/permute sequence.
  """
  f = int(round(1 / ratio))
  num, tokens, ch = x.shape
  n = int(round(tokens ** 0.5))
  if n * n != tokens or n % f:
    raise ValueError(f"pixel shuffle needs a square grid divisible by {f}; "
                     f"got {tokens} tokens")
  x = x.reshape(num, n // f, f, n // f, f, ch).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(num, (n // f) ** 2, f * f * ch)


class Projector(nnx.Module):
  """LayerNorm -> Linear -> GELU -> Linear, vision (x4) width -> LLM width."""

  def __init__(self, in_dim: int, out_dim: int, eps: float, dtype,
               param_dtype, rngs: nnx.Rngs):
    pd = param_dtype
    self.dtype, self.eps = dtype, eps
    self.norm_scale = sharding.param(llm.ones((in_dim,), pd), ("norm",))
    self.norm_bias = sharding.param(llm.zeros((in_dim,), pd), ("norm",))
    # The 4x-wide input stays replicated; the hidden (LLM-width) dim is the
    # sharded "mlp" dim of this two-layer MLP.
    self.fc1 = sharding.param(llm.normal(rngs, (in_dim, out_dim), pd),
                              (None, "mlp"))
    self.fc1_bias = sharding.param(llm.zeros((out_dim,), pd), ("mlp",))
    self.fc2 = sharding.param(llm.normal(rngs, (out_dim, out_dim), pd),
                              ("mlp", "embed"))
    self.fc2_bias = sharding.param(llm.zeros((out_dim,), pd), ("embed",))

  def __call__(self, x):
    """x: [N, P, C] -> [N, P, D]."""
    dt = self.dtype
    x = vit.layer_norm(x, self.norm_scale[...], self.norm_bias[...], self.eps)
    x = dense(x, llm.cast(self.fc1, dt))
    x = jax.nn.gelu(x + llm.cast(self.fc1_bias, dt), approximate=False)
    x = dense(x, llm.cast(self.fc2, dt))
    return x + llm.cast(self.fc2_bias, dt)


class InternVL(nnx.Module):
  """Vision tower + projector + language model."""

  def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
    dtype, pdtype = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    if cfg.get("vision_feature_select_strategy", "default") != "default":
      raise ValueError("only vision_feature_select_strategy='default' (drop "
                       "the class token) is supported")
    self.ratio = cfg.downsample_ratio
    self.feature_layer = cfg.vision_feature_layer
    self.image_token_id = cfg.image_token_id
    unroll = cfg.get("scan_unroll", 1)
    self.vision = vit.InternViT(cfg.vision, dtype, pdtype, cfg.remat, rngs,
                                unroll)
    f = int(round(1 / cfg.downsample_ratio))
    self.projector = Projector(cfg.vision.hidden_size * f * f,
                               cfg.text.hidden_size, cfg.projector_norm_eps,
                               dtype, pdtype, rngs)
    self.language_model = llm.Decoder(cfg.text, dtype, pdtype, cfg.remat,
                                      rngs, unroll)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """[N, C, H, W] -> [N, P, D]; per-sample [B, I, C, H, W] -> [B, I, P, D]
    (P = tokens_per_image)."""
    lead = pixel_values.shape[:-3]
    x = self.vision(pixel_values.reshape(-1, *pixel_values.shape[-3:]),
                    self.feature_layer)[:, 1:]
    x = self.projector(pixel_shuffle(x, self.ratio))
    return x.reshape(*lead, *x.shape[1:])

  def embed(self, input_ids, pixel_values=None, image_embeds=None):
    """Token embeddings [B, L, D] with image features spliced in."""
    x = self.language_model.embed_tokens(input_ids)
    if image_embeds is None and pixel_values is not None:
      image_embeds = self.image_features(pixel_values)
    if image_embeds is None:
      return x
    return splice_images(x, input_ids == self.image_token_id, image_embeds)

  def __call__(self, input_ids, pixel_values=None, image_embeds=None,
               attention_mask=None, positions=None):
    """-> final-norm hidden states [B, L, D]."""
    x = self.embed(input_ids, pixel_values, image_embeds)
    return self.language_model(x, attention_mask, positions)


def splice_images(embeds: jax.Array, is_image: jax.Array,
                  features: jax.Array) -> jax.Array:
  """Puts image features at the True slots of is_image [B, L], in order.

  features [N, P, D]: all images of the batch, consumed row-major over the
  whole batch, like torch's `masked_scatter` in HF. features [B, I, P, D]:
  sequence b gets its own I images; the gather then stays within a row, so
  a batch sharded over `data` needs no cross-device traffic. Jit-friendly
  (gather by running count); outside jit the counts are checked.
  """
  per_row = features.ndim == 4
  flat = features.reshape(features.shape[0] if per_row else 1, -1,
                          features.shape[-1]).astype(embeds.dtype)
  slots = is_image if per_row else is_image.reshape(1, -1)
  if not isinstance(is_image, jax.core.Tracer):
    counts = np.asarray(slots).sum(-1)
    if (counts != flat.shape[1]).any():
      raise ValueError(
          f"{counts.tolist()} <IMG_CONTEXT> tokens in input_ids but the "
          f"images give {flat.shape[1]} features ({features.shape[:-2]} "
          f"images x {features.shape[-2]} tokens); put tokens_per_image(cfg, "
          "size) image tokens per image (tile) in the prompt")
  index = jnp.clip(jnp.cumsum(slots, axis=-1) - 1, 0, flat.shape[1] - 1)
  gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered.reshape(embeds.shape),
                   embeds)


def _abstract(cfg: ml_collections.ConfigDict):
  """(graphdef, state of ShapeDtypeStructs). jax.eval_shape, not
  nnx.eval_shape: the latter turns logical names into mesh axes when called
  under a mesh (e.g. on the first traced call inside `jax.set_mesh`)."""
  graph = []

  def build():
    g, state = nnx.split(InternVL(cfg, nnx.Rngs(0)))
    graph.append(g)
    return state

  state = jax.eval_shape(build)
  return graph[0], state


@functools.lru_cache(maxsize=32)
def _graphdef_from_json(cfg_json: str):
  return _abstract(ml_collections.ConfigDict(json.loads(cfg_json)))[0]


def graphdef(cfg: ml_collections.ConfigDict):
  """The (cached) NNX graph definition that `params` plug into."""
  return _graphdef_from_json(cfg.to_json(sort_keys=True))


def init(cfg: ml_collections.ConfigDict, rng: jax.Array) -> nnx.State:
  """Random params (HF-style init) as an nnx.State. Jit-able; for sharded
  init use out_shardings=sharding.mesh_shardings(abstract_params(cfg), mesh).
  """
  return nnx.split(InternVL(cfg, nnx.Rngs(params=rng)))[1]


def abstract_params(cfg: ml_collections.ConfigDict) -> nnx.State:
  """Params as ShapeDtypeStructs (with logical names); no memory used."""
  return _abstract(cfg)[1]


def param_count(cfg: ml_collections.ConfigDict) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      abstract_params(cfg)))


def model(cfg: ml_collections.ConfigDict, params: nnx.State) -> InternVL:
  return nnx.merge(graphdef(cfg), params)


def image_features(cfg, params, pixel_values: jax.Array) -> jax.Array:
  """Projected image tokens [N, P, D] for [N, C, H, W] images ([B, I, P, D]
  for [B, I, C, H, W]); P = tokens_per_image(cfg).

  Compute once and pass as `image_embeds=` to reuse (e.g. a reference
  image shared by many pairwise comparisons).
  """
  return model(cfg, params).image_features(pixel_values)


def hidden_states(cfg, params, input_ids: jax.Array,
                  pixel_values: jax.Array | None = None, *,
                  image_embeds: jax.Array | None = None,
                  attention_mask: jax.Array | None = None,
                  positions: jax.Array | None = None) -> jax.Array:
  """Final-norm last hidden states [B, L, D] (input to the LM head)."""
  return model(cfg, params)(input_ids, pixel_values, image_embeds,
                            attention_mask, positions)


def forward(cfg, params, input_ids: jax.Array,
            pixel_values: jax.Array | None = None, *,
            image_embeds: jax.Array | None = None,
            attention_mask: jax.Array | None = None,
            positions: jax.Array | None = None) -> jax.Array:
  """Next-token logits [B, L, V] (fp32).

  input_ids: [B, L] int; pixel_values: [N, 3, S, S] normalised images (all
  images/tiles of the batch in order, HF style) or [B, I, 3, S, S] (I per
  sequence); image_embeds: precomputed `image_features` instead of
  pixel_values; attention_mask:
  [B, L] 1 = real token; positions: [B, L] RoPE positions (default 0..L-1).
  """
  m = model(cfg, params)
  hidden = m(input_ids, pixel_values, image_embeds, attention_mask, positions)
  return m.language_model.logits(hidden)


def logits_at(cfg, params, input_ids: jax.Array,
              pixel_values: jax.Array | None, read_positions: jax.Array, *,
              image_embeds: jax.Array | None = None,
              attention_mask: jax.Array | None = None,
              positions: jax.Array | None = None,
              return_hidden: bool = False):
  """Logits [B, P, V] at read_positions [B, P] only (the reward readout).

  The LM head runs on P positions instead of L. With return_hidden=True
  returns (logits, hidden [B, P, D]) for regressive heads.
  """
  m = model(cfg, params)
  hidden = m(input_ids, pixel_values, image_embeds, attention_mask, positions)
  hidden = jnp.take_along_axis(hidden, read_positions[..., None], axis=1)
  logits = m.language_model.logits(hidden)
  return (logits, hidden) if return_hidden else logits


def tokens_per_image(cfg, image_size: int | None = None) -> int:
  """<IMG_CONTEXT> tokens one image (tile) of side image_size becomes."""
  grid = (image_size or cfg.vision.image_size) // cfg.vision.patch_size
  return int(grid * cfg.downsample_ratio) ** 2


# ----------------------- dynamic tiling preprocessing -----------------------

def _closest_grid(width: int, height: int, min_tiles: int, max_tiles: int,
                  tile: int) -> tuple[int, int]:
  """InternVL's `find_closest_aspect_ratio`: (cols, rows) of tiles."""
  grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1)
                  for i in range(1, n + 1) for j in range(1, n + 1)
                  if min_tiles <= i * j <= max_tiles},
                 key=lambda g: g[0] * g[1])
  aspect = width / height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in grids:
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
      # Ties go to the larger grid when the image has the pixels to fill it.
      best = (cols, rows)
  return best


def dynamic_tiles(image: np.ndarray, *, tile: int = 448, min_tiles: int = 1,
                  max_tiles: int = 12, thumbnail: bool = True) -> np.ndarray:
  """InternVL dynamic-resolution input: an [H, W, 3] image (uint8 or float in
  [0, 1]) -> normalised tiles [n, 3, tile, tile].

  The image is resized to the (cols x rows) grid of tiles whose aspect ratio
  is closest to its own (at most max_tiles tiles), cut row-major, and, if
  there is more than one tile, a whole-image thumbnail is appended. Resizing
  is bicubic (jax.image), not PIL's, so pixels differ slightly from the
  PyTorch pipeline. Each tile costs tokens_per_image(cfg) prompt tokens.
  """
  img = np.asarray(image, np.float32)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"expected an [H, W, 3] image, got shape {img.shape}")
  if np.asarray(image).dtype == np.uint8:
    img = img / 255.0
  height, width = img.shape[:2]
  cols, rows = _closest_grid(width, height, min_tiles, max_tiles, tile)

  def resize(x, h, w):
    return np.clip(np.asarray(jax.image.resize(x, (h, w, 3), "bicubic")),
                   0.0, 1.0)

  big = resize(img, rows * tile, cols * tile)
  tiles = [big[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
           for r in range(rows) for c in range(cols)]
  if thumbnail and len(tiles) > 1:
    tiles.append(resize(img, tile, tile))
  out = (np.stack(tiles) - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(
      IMAGENET_STD, np.float32)
  return out.transpose(0, 3, 1, 2)
