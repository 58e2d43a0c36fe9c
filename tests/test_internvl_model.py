"""InternVL model behaviour beyond HF parity: padding, remat, mesh, image
feature reuse, dynamic tiling, config errors, an 8-device sharded forward
(tiny sizes only) and attention's hand-written backward."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rm_runs
from configs import internvl as configs
from rd_jax import sharding
from rd_jax.models import internvl, llm

IMG = 3  # image_token_id of the tiny config


def _attend_autodiff(q, k, v, mask):
  """llm.attend as plain jnp, its gradient left to autodiff."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  if mask is not None:
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)


@pytest.mark.parametrize("masked", [True, False])
def test_attention_backward_matches_autodiff(masked):
  """llm.attend's custom VJP (grouped kv heads, padding + causal mask, a
  query row with every key masked) against autodiff of the plain form."""
  rng = np.random.default_rng(0)
  q, k, v, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                ((3, 7, 4, 8), (3, 7, 2, 8), (3, 7, 2, 8), (3, 7, 4, 8)))
  mask = None
  if masked:
    lens = np.array([7, 4, 1])
    m = np.tril(np.ones((7, 7), bool))[None] & (
        np.arange(7)[None, None] < lens[:, None, None])
    m[2, 3] = False  # a row that attends to nothing: uniform, as before
    mask = jnp.asarray(m)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a, mask)) * w)
  got = jax.jit(jax.value_and_grad(loss(llm.attend), (0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(loss(_attend_autodiff), (0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  cfg = configs.get_config("size=tiny,vocab=64")
  # rbg keys: XLA:CPU compiles threefry for every param shape very slowly.
  params = jax.jit(lambda k: internvl.init(cfg, k))(
      jax.random.key(0, impl="unsafe_rbg"))
  n = internvl.tokens_per_image(cfg)
  ids = jnp.asarray([[10, 1] + [IMG] * n + [2, 11, 12, 13] + [1] + [IMG] * n
                     + [2, 14]] * 2)
  pixels = jax.random.normal(jax.random.key(1), (4, 3, 56, 56))
  return cfg, params, ids, pixels


def test_right_padding_does_not_change_real_positions(tiny):
  cfg, params, ids, pixels = tiny
  padded = jnp.concatenate([ids, jnp.zeros((2, 3), ids.dtype)], axis=1)
  mask = jnp.concatenate([jnp.ones_like(ids), jnp.zeros((2, 3), ids.dtype)], 1)
  fwd = jax.jit(lambda p, i, m: internvl.forward(cfg, p, i, pixels,
                                                 attention_mask=m))
  ref = fwd(params, ids, jnp.ones_like(ids))
  out = fwd(params, padded, mask)
  np.testing.assert_allclose(out[:, :ids.shape[1]], ref, atol=1e-5)


def test_remat_policies_unroll_and_mesh_give_same_logits(tiny):
  cfg, params, ids, pixels = tiny
  assert cfg.vision.num_layers > 1 and cfg.text.num_layers > 1
  def value_and_grad(remat, unroll=1):
    c = cfg.copy_and_resolve_references()
    c.remat, c.scan_unroll = remat, unroll
    loss = lambda p: jnp.square(internvl.forward(c, p, ids, pixels)).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  ref_value, ref_grads = value_and_grad("none")
  for remat, unroll in (("full", 1), ("none", 2), ("none", 8)):
    value, grads = value_and_grad(remat, unroll)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)
  ref = jax.jit(lambda p: internvl.forward(cfg, p, ids, pixels))(params)
  mesh = sharding.make_mesh((-1, 1, 1))
  shardings = sharding.mesh_shardings(params, mesh)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p: internvl.forward(cfg, p, ids, pixels))(
        jax.device_put(params, shardings))
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_image_embeds_reuse_and_batched_pixels(tiny):
  cfg, params, ids, pixels = tiny
  read = jnp.asarray([[5], [9]])
  logits_at = jax.jit(lambda p, x, e: internvl.logits_at(
      cfg, p, ids, x, read, image_embeds=e))
  ref = logits_at(params, pixels, None)
  feats = jax.jit(lambda p, x: internvl.image_features(cfg, p, x))(
      params, pixels)
  assert feats.shape == (4, internvl.tokens_per_image(cfg),
                         cfg.text.hidden_size)
  out = logits_at(params, None, feats)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  per_seq = pixels.reshape(2, 2, 3, 56, 56)
  assert jax.eval_shape(lambda p, x: internvl.image_features(cfg, p, x),
                        params, per_seq).shape == (2, 2) + feats.shape[1:]
  np.testing.assert_allclose(logits_at(params, per_seq, None), ref, atol=1e-6)
  # The images matter: swapping the two images of a sequence changes logits.
  out_sw = logits_at(params, per_seq[:, ::-1], None)
  assert float(jnp.abs(out_sw - ref).max()) > 1e-3


def test_image_token_count_mismatch_is_clear(tiny):
  cfg, params, ids, _ = tiny
  n, d = internvl.tokens_per_image(cfg), cfg.text.hidden_size
  short = jnp.asarray([[7, IMG, IMG, 8]])  # 2 image tokens; one image gives 4
  with pytest.raises(ValueError, match=r"\[2\] <IMG_CONTEXT> tokens"):
    internvl.forward(cfg, params, short, image_embeds=jnp.zeros((1, n, d)))
  with pytest.raises(ValueError, match=r"\[8, 8\] <IMG_CONTEXT> tokens .* "
                     r"give 4 features"):  # one image per row, two in the ids
    internvl.forward(cfg, params, ids, image_embeds=jnp.zeros((2, 1, n, d)))


def test_pixel_shuffle_groups_2x2_neighbours():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)  # 4x4 grid
  out = internvl.pixel_shuffle(x, 0.5)
  np.testing.assert_array_equal(out[0], [[0, 1, 4, 5], [2, 3, 6, 7],
                                         [8, 9, 12, 13], [10, 11, 14, 15]])


def test_dynamic_tiles_follow_internvl_grid_choice():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (28, 56, 3), dtype=np.uint8)
  tiles = internvl.dynamic_tiles(wide, tile=28)
  assert tiles.shape == (3, 3, 28, 28)  # 2x1 grid + thumbnail
  left = (wide[:, :28] / 255.0 - np.asarray(internvl.IMAGENET_MEAN)) / (
      np.asarray(internvl.IMAGENET_STD))
  np.testing.assert_allclose(tiles[0], left.transpose(2, 0, 1), atol=1e-5)
  # Aspect 5:3 with at most 12 tiles -> 3x2 grid (InternVL's choice).
  assert internvl.dynamic_tiles(rng.random((60, 100, 3)), tile=28).shape == (
      7, 3, 28, 28)
  # Square ties go to the larger grid only when the image has the pixels.
  assert internvl.dynamic_tiles(rng.random((56, 56, 3)), tile=28).shape[0] == 5
  assert internvl.dynamic_tiles(rng.random((28, 28, 3)), tile=28).shape[0] == 1


def test_config_errors_name_the_fix():
  with pytest.raises(KeyError, match="unknown InternVL size '3b'"):
    configs.get_config("size=3b")
  with pytest.raises(KeyError, match="did you mean 'vocab'"):
    configs.get_config("vocabb=3")


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from configs import internvl as configs
from rd_jax import sharding
from rd_jax.models import internvl
cfg = configs.get_config("size=tiny,vocab=64")
params = jax.jit(lambda k: internvl.init(cfg, k))(
    jax.random.key(0, impl="unsafe_rbg"))
n = internvl.tokens_per_image(cfg)
ids = jnp.asarray([[10, 1] + [3] * n + [2, 11, 12]] * 4)
pixels = jax.random.normal(jax.random.key(1), (4, 1, 3, 56, 56))
fwd = jax.jit(lambda p, i, x: internvl.forward(cfg, p, i, x))
mesh = sharding.make_mesh((2, 2, 2))
with jax.set_mesh(mesh):  # first model build happens under the mesh
  specs = sharding.mesh_shardings(internvl.abstract_params(cfg), mesh)
  sharded = jax.device_put(params, specs)
  out = fwd(sharded, ids, pixels)
ref = fwd(params, ids, pixels)
q = sharded["language_model"]["layers"]["attn"]["q"][...]
print("HEADS_SPEC", q.sharding.spec)
print("MAXDIFF", float(jnp.abs(out - ref).max()))
"""


def test_sharded_forward_on_8_fake_devices():
  """(data, fsdp, tensor) = (2, 2, 2): params really sharded by the logical
  rules, activations constrained, same logits as one device, and building
  the model for the first time under a mesh works."""
  env = rm_runs.env(devices=8)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env,
                       cwd=root, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  lines = dict(l.split(" ", 1) for l in res.stdout.splitlines() if " " in l)
  # q kernel [layers, embed, heads, head_dim]: embed on fsdp, heads on tensor.
  assert lines["HEADS_SPEC"] == "P(None, 'fsdp', 'tensor', None)"
  assert float(lines["MAXDIFF"]) < 1e-5
