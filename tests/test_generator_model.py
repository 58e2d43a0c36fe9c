"""MMDiT generator: patchify layout, logical names, real-size parameter count,
video RoPE, gradients through a sampled step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import generator_shapes
from rd_jax.generation import flow
from rd_jax.models import generator, mmdit, vae


def tiny_cfg():
  return generator_shapes.get_config("smoke").image.model


def jittered(params, key, scale: float):
  """Every leaf plus scale * N(0, 1): generator params off their
  zero-initialised AdaLN and output layers, so every input and parameter
  counts."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return tree.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype)
                         for x, k in zip(leaves, keys)])


def test_patchify_round_trip_and_diffusers_pack_order():
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 16))
  tok = mmdit.patchify(x, 2)
  assert tok.shape == (2, 4 * 6, 16 * 4)
  np.testing.assert_array_equal(mmdit.unpatchify(tok, x.shape, 2), x)
  # diffusers FluxPipeline._pack_latents on the NCHW layout.
  nchw = np.asarray(x).transpose(0, 3, 1, 2)
  packed = nchw.reshape(2, 16, 4, 2, 6, 2).transpose(0, 2, 4, 1, 3, 5)
  np.testing.assert_array_equal(tok, packed.reshape(2, 24, 64))
  video = jax.random.normal(jax.random.key(1), (2, 3, 8, 8, 3))
  vt = mmdit.patchify(video, 4)
  np.testing.assert_array_equal(mmdit.unpatchify(vt, video.shape, 4), video)
  # Frame-major token order; first RoPE axis is the frame index.
  np.testing.assert_array_equal(vt[:, 4:8], mmdit.patchify(video[:, 1], 4))
  ids = np.asarray(mmdit.position_ids(video.shape, 4))
  np.testing.assert_array_equal(ids[4:8, 0], 1)
  np.testing.assert_array_equal(ids[:4, 1:], [[0, 0], [0, 1], [1, 0], [1, 1]])


def test_every_parameter_has_logical_names_and_stacked_layers():
  cfg = generator_shapes.get_config("smoke").image.model
  params = generator.init(cfg, jax.random.key(0))
  specs = generator.logical_specs(cfg)
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = dict(jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0])
  for path, leaf in flat_p:
    spec = flat_s[path]
    assert len(spec) == leaf.ndim, (path, spec)
    if "transformer_blocks" in jax.tree_util.keystr(path):
      assert spec[0] == "layers" and leaf.shape[0] == (
          cfg.dit.num_layers if "single" not in jax.tree_util.keystr(path)
          else cfg.dit.num_single_layers), path


def test_flux_dev_instantiates_abstractly_with_diffusers_param_count():
  import torch
  from diffusers import FluxTransformer2DModel
  cfg = generator_shapes.get_config("size=flux_dev").image.model.dit
  with torch.device("meta"):
    ref = FluxTransformer2DModel(
        in_channels=cfg.patch_size ** 2 * cfg.channels,
        num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        guidance_embeds=cfg.guidance_embeds,
        axes_dims_rope=tuple(cfg.axes_dims_rope))
    n_ref = sum(p.numel() for p in ref.parameters())
    n_tensors = len(list(ref.parameters()))
  assert n_ref == 11_901_408_320  # FLUX.1-dev transformer
  assert mmdit.param_count(cfg) == n_ref
  # One-to-one: each diffusers tensor is one param, or one layer slice of a
  # scan-stacked param.
  flat = jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(mmdit.abstract(cfg)[1]))[0]
  n_ours = sum(x.shape[0] if "transformer_blocks" in jax.tree_util.keystr(p)
               else 1 for p, x in flat)
  assert n_ours == n_tensors


def test_video_tokens_see_time_and_text_changes_the_output():
  cfg = tiny_cfg()
  params = generator.init(cfg, jax.random.key(0))
  # Give proj_out weights (it is zero-initialised) so outputs are non-trivial.
  params["dit"]["proj_out"]["kernel"] = 0.1 * jax.random.normal(
      jax.random.key(1), params["dit"]["proj_out"]["kernel"].shape)
  for name in ("norm1", "norm1_context"):
    lin = params["dit"]["transformer_blocks"][name]["linear"]
    lin["kernel"] = 0.1 * jax.random.normal(jax.random.key(2),
                                            lin["kernel"].shape)
  ids = jnp.array([[3, 4, 5, 0], [6, 4, 7, 8]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.int32)
  cond = generator.encode_text(cfg, params, ids, mask)
  r = cfg.dit.patch_size * 2
  # Identical content in every frame: only the time axis of RoPE tells
  # frames apart, so outputs must differ across frames.
  frame = jax.random.normal(jax.random.key(3), (2, 1, r, r, 3))
  video = jnp.tile(frame, (1, 3, 1, 1, 1))
  vel = jax.jit(lambda p, c: generator.velocity(cfg, p, video,
                                                jnp.array([0.5, 0.5]), c))
  v = vel(params, cond)
  assert v.shape == video.shape
  assert float(jnp.abs(v[:, 0] - v[:, 1]).max()) > 1e-4
  v_u = vel(params, generator.unconditional(cond))
  assert float(jnp.abs(v - v_u).max()) > 1e-4
  # Padding tokens are invisible: changing a masked id changes nothing.
  cond2 = generator.encode_text(cfg, params, ids.at[0, 3].set(9), mask)
  v2 = vel(params, cond2)
  np.testing.assert_allclose(v2[0], v[0], atol=1e-5)


def test_gradient_flows_through_a_sampled_step_of_the_mmdit():
  cfg = tiny_cfg()
  params = generator.init(cfg, jax.random.key(0))
  ids = jnp.array([[3, 4, 5]], jnp.int32)
  cond = generator.encode_text(cfg, params, ids, jnp.ones_like(ids))
  r = cfg.dit.patch_size * 2
  noise = jax.random.normal(jax.random.key(1), (1, r, r, 3))
  sched = flow.Schedule(3)

  def loss(p, k):
    x, x0s = flow.sample(p, noise, cond, sched,
                         velocity_fn=generator.velocity_fn(cfg),
                         grad_from_step=k)
    return jnp.mean(x0s[k] ** 2) + jnp.mean(x ** 2)

  g = jax.jit(jax.grad(loss), static_argnums=1)(params, 1)
  g_out = g["dit"]["proj_out"]["kernel"]
  assert bool(jnp.all(jnp.isfinite(g_out))) and float(jnp.abs(g_out).max()) > 0


def test_flux_vae_layout_matches_diffusers_autoencoderkl():
  import torch
  from diffusers import AutoencoderKL
  cfg = generator_shapes.get_config("size=flux_dev").image.model.vae
  n = len(cfg.block_out_channels)
  with torch.device("meta"):
    ref = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        use_quant_conv=cfg.use_quant_conv,
        use_post_quant_conv=cfg.use_post_quant_conv)
    shapes = sorted(tuple(p.shape) for p in ref.parameters())
  assert vae.param_count(cfg) == sum(int(np.prod(s)) for s in shapes)
  ours = jax.tree.leaves(nnx.to_pure_dict(vae._graph(cfg.to_json())[1]))  # pylint: disable=protected-access
  # Same multiset of tensor sizes: every diffusers tensor has one twin here.
  assert sorted(int(np.prod(x.shape)) for x in ours) == sorted(
      int(np.prod(s)) for s in shapes)
  small = ml_collections.ConfigDict(cfg.to_dict())
  small.update(block_out_channels=(16, 32), norm_num_groups=4,
               latent_channels=4)
  params = vae.init(small, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3)) * 2 - 1
  z = vae.encode(small, params, x)
  assert z.shape == (1, 4, 4, 4)
  assert vae.decode(small, params, z).shape == x.shape


def test_sample_prediction_makes_the_network_output_the_x0_estimate():
  cfg = tiny_cfg()
  params = generator.init(cfg, jax.random.key(0))
  params["dit"]["proj_out"]["kernel"] = 0.1 * jax.random.normal(
      jax.random.key(1), params["dit"]["proj_out"]["kernel"].shape)
  ids = jnp.array([[3, 4, 5], [6, 4, 7]], jnp.int32)
  cond = generator.encode_text(cfg, params, ids, jnp.ones_like(ids))
  r = cfg.dit.patch_size * 2
  x = jax.random.normal(jax.random.key(3), (2, r, r, 3))
  t = jnp.array([0.7, 0.01])  # the second below T_MIN
  vcfg, xcfg = (ml_collections.ConfigDict(cfg.to_dict()) for _ in "vx")
  vcfg.prediction, xcfg.prediction = "velocity", "sample"
  raw = generator.velocity(vcfg, params, x, t, cond)  # the network output
  v = generator.velocity(xcfg, params, x, t, cond)
  # x̂0 = x_t − t·v is the network output where t >= T_MIN ...
  np.testing.assert_allclose(flow.x0_from_v(x[:1], t[:1], v[:1]), raw[:1],
                             atol=1e-5)
  # ... and below it v = (x_t − x̂0) / T_MIN stays bounded.
  np.testing.assert_allclose(v[1], (x[1] - raw[1]) / generator.T_MIN,
                             rtol=1e-5, atol=1e-5)
  xcfg.prediction = "noise"
  with np.testing.assert_raises_regex(
      ValueError, r"unknown model.prediction 'noise'; use one of "
      r"\('velocity', 'sample'\)"):
    generator.velocity(xcfg, params, x, t, cond)


def test_first_frame_concat_gives_frame0_on_every_frames_channels():
  """The widened x_embedder's first rows read x, its last rows frame 0:
  with either half zeroed the model equals the plain model on x, or on x
  with every frame replaced by frame 0."""
  plain = generator_shapes.get_config("smoke").video.model
  plain.first_frame_concat, plain.prediction = False, "velocity"
  cat = ml_collections.ConfigDict(plain.to_dict())
  cat.first_frame_concat = True
  params = generator.init(cat, jax.random.key(0))
  params["dit"]["proj_out"]["kernel"] = 0.1 * jax.random.normal(
      jax.random.key(1), params["dit"]["proj_out"]["kernel"].shape)
  w = params["dit"]["x_embedder"]["kernel"]
  n = cat.dit.patch_size ** 2 * cat.dit.channels
  assert w.shape[0] == 2 * n  # tokens of x's and of frame 0's pixels
  ids = jnp.array([[3, 4, 5], [6, 4, 7]], jnp.int32)
  cond = generator.encode_text(cat, params, ids, jnp.ones_like(ids))
  r = cat.dit.patch_size * 2
  x = jax.random.normal(jax.random.key(2), (2, 3, r, r, 3))
  t = jnp.array([0.3, 0.8])
  first = jnp.broadcast_to(x[:, :1], x.shape)

  def with_rows(keep):
    """(concat params with the other half zeroed, plain params with keep)."""
    zeroed = w.at[n:].set(0.0) if keep == "x" else w.at[:n].set(0.0)
    part = w[:n] if keep == "x" else w[n:]
    pc = jax.tree.map(lambda a: a, params)
    pc["dit"]["x_embedder"]["kernel"] = zeroed
    pp = jax.tree.map(lambda a: a, params)
    pp["dit"]["x_embedder"]["kernel"] = part
    return pc, pp

  pc, pp = with_rows("x")
  np.testing.assert_allclose(generator.velocity(cat, pc, x, t, cond),
                             generator.velocity(plain, pp, x, t, cond),
                             atol=1e-5)
  pc, pp = with_rows("first")
  v_cat = generator.velocity(cat, pc, x, t, cond)
  np.testing.assert_allclose(v_cat, generator.velocity(plain, pp, first, t,
                                                       cond), atol=1e-5)
  # Not the same as the plain model on x: frame 0 really is what it reads.
  assert float(jnp.abs(v_cat - generator.velocity(plain, pp, x, t,
                                                  cond)).max()) > 1e-3
  img = jax.random.normal(jax.random.key(3), (2, r, r, 3))
  with pytest.raises(ValueError, match="model.first_frame_concat needs "
                     r"videos \[B, T, H, W, C\]; got shape \(2, 8, 8, 3\)"):
    generator.velocity(cat, params, img, t, cond)
