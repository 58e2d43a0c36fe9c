"""Reward model: sequences, readouts, losses, symmetric score, pixel
gradients, vmap/video, and a real-size compile (tiny models, CPU)."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rm_shapes
from rd_jax.data import text, tokenizer
from rd_jax.models import internvl, vit
from rd_jax.reward import evaluate as rm_eval
from rd_jax.reward import losses, model, sequences

YES, NO = 3, 4


def tiny_rm(frames=None, dtype="float32"):
  """A random tiny reward model: 32 px images, patch 8 -> 4 tokens each."""
  cfg = internvl.model_config(
      internvl.vision_config(hidden_size=16, num_layers=1, num_heads=2,
                             mlp_dim=32, image_size=32, patch_size=8),
      internvl.text_config(vocab_size=24, hidden_size=32, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=64),
      image_token_id=2, dtype=dtype, param_dtype=dtype)
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict(dict(model=cfg, yes_id=YES, no_id=NO,
                                        readout="two_token", frames=frames))


def tiny_question(batch, num_images, tpi=4, length=6, seed=0):
  """Random question ids with num_images * tpi image tokens up front."""
  rng = np.random.default_rng(seed)
  img = np.full((batch, num_images * tpi), 2, np.int32)
  words = rng.integers(5, 24, (batch, length)).astype(np.int32)
  ids = np.concatenate([img, words, np.zeros((batch, 2), np.int32)], 1)
  mask = np.ones_like(ids, bool)
  mask[:, -2:] = False
  read = np.full((batch,), ids.shape[1] - 3, np.int32)
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
          "read_pos": jnp.asarray(read)}


@pytest.fixture(scope="module")
def rm_and_params():
  rm = tiny_rm()
  return rm, model.init(rm, jax.random.key(0))


# ---------------------------------------------------------------- sequences


def test_sequences_layout(shapes_tiny):
  tok = tokenizer.load(f"{shapes_tiny}/tokenizer")
  yes, no = tokenizer.answer_token_ids(tok)
  q = text.pairwise_question("a red circle", "Check the number of objects.",
                             "reason_first")
  a = text.pairwise_answer(True, "is blurry", "reason_first")
  out = sequences.encode(tok, [q], [a], num_images=2, tokens_per_image=4,
                         question_len=64, answer_len=32, cot="reason_first")
  ids, n_ctx = out["input_ids"][0], tok.convert_tokens_to_ids("<IMG_CONTEXT>")
  assert (ids == n_ctx).sum() == 8
  r = out["read_pos"][0]
  # The answer follows the read position; its decision token is the last yes.
  n_ans = out["answer_mask"][0].sum()
  np.testing.assert_array_equal(ids[r + 1:r + 1 + n_ans],
                                out["answer_ids"][0, :n_ans])
  assert out["answer_ids"][0, out["decision_index"][0]] == yes
  assert out["decision_index"][0] == n_ans - 1
  assert out["attention_mask"][0].sum() == r + 1 + n_ans
  # Reward inputs (no answer) read at the same position; decision-first at 0.
  bare = sequences.encode(tok, [q], num_images=2, tokens_per_image=4,
                          question_len=64, answer_len=32)
  assert bare["read_pos"][0] == r
  d = sequences.encode(tok, [q], [text.pairwise_answer(False, "x",
                                                       "decision_first")],
                       num_images=2, tokens_per_image=4, question_len=64,
                       answer_len=32, cot="decision_first")
  assert d["decision_index"][0] == 0 and d["answer_ids"][0, 0] == no
  with pytest.raises(ValueError, match="question_len"):
    sequences.encode(tok, [q], num_images=2, tokens_per_image=4,
                     question_len=5)
  # question_first: the question right after `user`, then the images; the
  # same tokens, length, read position and answer.
  f = sequences.encode(tok, [q], [a], num_images=2, tokens_per_image=4,
                       question_len=64, answer_len=32, cot="reason_first",
                       question_first=True)
  q_ids = tok.encode(q, add_special_tokens=False)
  user = len(tok.encode(sequences.USER, add_special_tokens=False))
  fi = f["input_ids"][0]
  np.testing.assert_array_equal(fi[user:user + len(q_ids)], q_ids)
  assert np.flatnonzero(fi == n_ctx).min() == user + len(q_ids) + 1  # <img>
  assert f["read_pos"][0] == r and fi.shape == ids.shape
  np.testing.assert_array_equal(np.sort(fi), np.sort(ids))
  np.testing.assert_array_equal(fi[r:], ids[r:])
  # The prompt restated after the images (config.prompt_after_len): its
  # tokens right after the last image, the rest of the row shifted by them,
  # the row longer by the slots.
  prompt = "a red circle left of a blue square"
  p_ids = tok.encode(prompt, add_special_tokens=False)
  g = sequences.encode(tok, [q], [a], num_images=2, tokens_per_image=4,
                       question_len=64, answer_len=32, cot="reason_first",
                       question_first=True, after=[prompt], after_len=8)
  gi, k = g["input_ids"][0], len(sequences.image_block(tok, 2, 4)) + len(q_ids)
  assert gi.shape[0] == fi.shape[0] + 8 and g["read_pos"][0] == r + len(p_ids)
  np.testing.assert_array_equal(gi[:k], fi[:k])
  np.testing.assert_array_equal(gi[k:k + len(p_ids)], p_ids)
  np.testing.assert_array_equal(gi[k + len(p_ids):][:len(fi) - k], fi[k:])
  np.testing.assert_array_equal(g["answer_ids"], f["answer_ids"])
  with pytest.raises(ValueError, match=re.escape(
      f"text after the images of {len(p_ids)} tokens exceeds its 3 slots: "
      f"{prompt!r}; raise config.prompt_after_len")):
    sequences.encode(tok, [q], num_images=2, tokens_per_image=4,
                     question_len=64, after=[prompt], after_len=3)


def test_caption_rows_and_scores(shapes_tiny):
  """Caption rows put the prompt right after the assistant turn, and
  caption_scores is the whole sequence's next-token CE over exactly the
  prompt's tokens (paradigm caption, the VLM pretraining)."""
  tok = tokenizer.load(f"{shapes_tiny}/tokenizer")
  rm = rm_shapes.get_config("smoke").rm
  tpi = internvl.tokens_per_image(rm.model)
  prompts = ["a red circle", "a square left of a blue triangle"]
  cap = sequences.caption(tok, prompts, num_images=1, tokens_per_image=tpi,
                          caption_len=16)
  n = int(cap["read_pos"][0]) + 1
  assert (cap["read_pos"] == n - 1).all()
  tail = tok.encode(sequences.ASSISTANT, add_special_tokens=False)
  for i, p in enumerate(prompts):
    want = tok.encode(p, add_special_tokens=False)
    ids = cap["input_ids"][i]
    assert list(ids[n - len(tail):n]) == tail
    assert list(ids[n:n + len(want)]) == want
    assert list(cap["answer_ids"][i][cap["answer_mask"][i]]) == want
    assert cap["attention_mask"][i].sum() == n + len(want)
  params = model.init(rm, jax.random.key(0))
  images = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3),
                                              dtype=np.uint8)
  got = rm_eval.caption_scores(rm, params, cap, images)
  feats = model.embed_images(rm, params, images[:, None])
  every = np.broadcast_to(np.arange(cap["input_ids"].shape[1]),
                          cap["input_ids"].shape)
  logits, _ = model.logits_and_hidden(rm, params, cap, feats, every)
  logp = np.asarray(jax.nn.log_softmax(logits, -1))
  for i in range(2):
    k = int(cap["answer_mask"][i].sum())
    pos = np.arange(n - 1, n - 1 + k)
    targets = cap["input_ids"][i, pos + 1]
    np.testing.assert_allclose(got["ce"][i], -logp[i, pos, targets].sum(),
                               rtol=1e-5)
    assert got["tokens"][i] == k
    assert got["hits"][i] == (logp[i, pos].argmax(-1) == targets).sum()
  with pytest.raises(ValueError, match="raise config.caption_len"):
    sequences.caption(tok, prompts, num_images=1, tokens_per_image=tpi,
                      caption_len=4)


# ---------------------------------------------------------------- readout


def test_readout_is_softmax_of_two_logits():
  logits = jax.random.normal(jax.random.key(1), (5, 24)) * 3
  p = model.readout(logits, YES, NO, "two_token")
  ref = jax.nn.softmax(logits[:, [YES, NO]], -1)[:, 0]
  np.testing.assert_allclose(p, ref, rtol=1e-6)
  full = model.readout(logits, YES, NO, "full_vocab")
  np.testing.assert_allclose(full, jax.nn.softmax(logits, -1)[:, YES],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="readout"):
    model.readout(logits, YES, NO, "bogus")


# ---------------------------------------------------------------- losses


def _logits(rows):
  """[B, A, V=6] logits from per-row {(a, v): value} (others 0)."""
  out = np.zeros((len(rows), 2, 6), np.float32)
  for i, row in enumerate(rows):
    for (a, v), x in row.items():
      out[i, a, v] = x
  return jnp.asarray(out)


def _ce(row, target):
  row = np.asarray(row, np.float64)
  return np.log(np.exp(row).sum()) - row[target]


def test_pairwise_loss_hand_computed():
  logits = _logits([{(0, YES): 2.0, (0, NO): -1.0},
                    {(0, YES): 0.5, (1, 5): 1.0}])
  ids = jnp.asarray([[YES, 0], [NO, 5]])
  mask = jnp.asarray([[True, False], [True, True]])
  dec = jnp.asarray([0, 0])
  loss, aux = losses.pairwise_generative_loss(logits, ids, mask, dec,
                                              w_cot=0.5)
  ce0 = _ce([0, 0, 0, 2.0, -1.0, 0], YES)
  ce1 = _ce([0, 0, 0, 0.5, 0, 0], NO)
  cot = _ce([0, 0, 0, 0, 0, 1.0], 5)   # the one rationale token
  np.testing.assert_allclose(aux["ce"], (ce0 + ce1) / 2, rtol=1e-5)
  np.testing.assert_allclose(loss, (ce0 + ce1) / 2 + 0.5 * cot, rtol=1e-5)


def test_pointwise_generative_loss_hand_computed():
  lw = _logits([{(0, YES): 1.0, (0, NO): -1.0}])   # s_w = 2
  ll = _logits([{(0, YES): 0.5, (0, NO): 0.0}])    # s_l = 0.5
  ans = lambda t: (jnp.asarray([[t, 0]]), jnp.asarray([[True, False]]),  # noqa
                   jnp.asarray([0]))
  loss, aux = losses.pointwise_generative_loss(lw, ll, ans(YES), ans(NO),
                                               YES, NO, alpha=0.1)
  bt = np.log1p(np.exp(-(2.0 - 0.5)))
  ce = 0.5 * (_ce([0, 0, 0, 1.0, -1.0, 0], YES) +
              _ce([0, 0, 0, 0.5, 0.0, 0], NO))
  np.testing.assert_allclose(aux["bt"], bt, rtol=1e-5)
  np.testing.assert_allclose(loss, bt + 0.1 * ce, rtol=1e-5)


def test_regressive_loss_hand_computed():
  loss, _ = losses.regressive_loss(jnp.asarray([1.0, -2.0]),
                                   jnp.asarray([0.0, 1.0]))
  expect = 0.5 * (np.log1p(np.exp(-1.0)) + np.log1p(np.exp(3.0)))
  np.testing.assert_allclose(loss, expect, rtol=1e-5)


def test_ece_and_metrics():
  assert rm_eval.ece(np.array([0.9, 0.9]), np.array([1, 1])) == \
      pytest.approx(0.1)
  m = rm_eval.metrics("pairwise_generative",
                      {"p_fwd": np.array([0.9, 0.8, 0.3]),
                       "p_bwd": np.array([0.2, 0.6, 0.4])},
                      np.array([0, 0, 7]))
  assert m["acc"] == pytest.approx((1 + 0.5 + 0.5) / 3)
  assert m["position_consistency"] == pytest.approx(1 / 3)
  assert m["acc_by_failure"] == {"wrong_count": 0.75, "blur": 0.5}


# ---------------------------------------------------------------- rewards


def test_symmetric_score_property(rm_and_params):
  rm, params = rm_and_params
  k1, k2 = jax.random.split(jax.random.key(2))
  a = jax.random.uniform(k1, (3, 32, 32, 3))
  b = jax.random.uniform(k2, (3, 32, 32, 3))
  q = tiny_question(3, 2)
  sym = functools.partial(model.pairwise_reward, rm, params, question=q,
                          symmetric=True)
  r_ab, r_ba = sym(a, b), sym(b, a)
  np.testing.assert_allclose(r_ab + r_ba, 1.0, atol=1e-6)
  np.testing.assert_allclose(sym(a, a), 0.5, atol=1e-6)
  plain = model.pairwise_reward(rm, params, a, b, q)
  plain_ba = model.pairwise_reward(rm, params, b, a, q)
  np.testing.assert_allclose(r_ab, 0.5 * (plain + 1 - plain_ba), atol=1e-6)


def test_pixel_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    rm = tiny_rm(dtype="float64")
    params = model.init(rm, jax.random.key(3))
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, params)
    q = tiny_question(2, 2)
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    ref = jax.random.uniform(k1, (2, 24, 24, 3), jnp.float64)  # resized
    cand = jax.random.uniform(k2, (2, 24, 24, 3), jnp.float64)
    fns = {
        "pairwise": lambda x: model.pairwise_reward(rm, params, ref, x,
                                                    q).sum(),
        "pointwise": lambda x: model.pointwise_reward(
            rm, params, x, tiny_question(2, 1)).sum(),
        "regressive": lambda x: model.regressive_reward(
            rm, dict(params, head={"w": jnp.ones(32, jnp.float64),
                                   "b": jnp.zeros((), jnp.float64)}),
            x, tiny_question(2, 1)).sum(),
    }
    d = jax.random.normal(k3, cand.shape, jnp.float64)
    for name, f in fns.items():
      # Compiled, not eager: the gradient, and both shifted values in one
      # vmapped call.
      grad = jax.jit(jax.grad(f))(cand)
      # The backbone's LM head accumulates logits in fp32 (round-off
      # ~1e-7), so the step is large; everything else runs in fp64.
      eps = 1e-3
      hi, lo = jax.jit(jax.vmap(f))(jnp.stack([cand + eps * d,
                                               cand - eps * d]))
      fd = (hi - lo) / (2 * eps)
      analytic = jnp.vdot(grad, d)
      assert abs(analytic) > 1e-3, name
      np.testing.assert_allclose(analytic, fd, rtol=2e-3, err_msg=name)


def test_vmap_and_uint8(rm_and_params):
  rm, params = rm_and_params
  imgs = jax.random.randint(jax.random.key(5), (2, 3, 32, 32, 3), 0, 255
                            ).astype(jnp.uint8)
  q = tiny_question(3, 2)
  batched = model.pairwise_reward(rm, params, imgs[0], imgs[1], q)
  mapped = jax.vmap(lambda a, b, qq: model.pairwise_reward(rm, params, a, b,
                                                           qq))(
                                                               imgs[0],
                                                               imgs[1], q)
  np.testing.assert_allclose(batched, mapped, atol=1e-5)
  as_float = model.pairwise_reward(rm, params, imgs[0] / 255.0,
                                   imgs[1] / 255.0, q)
  np.testing.assert_allclose(batched, as_float, atol=1e-5)


def test_video_rewards():
  rm = tiny_rm(frames=3)
  params = model.init(rm, jax.random.key(6))
  v = jax.random.uniform(jax.random.key(7), (2, 2, 3, 32, 32, 3))
  r = model.pairwise_reward(rm, params, v[0], v[1], tiny_question(2, 6),
                            symmetric=True)
  p = model.pointwise_reward(rm, params, v[0], tiny_question(2, 3))
  assert r.shape == p.shape == (2,)
  assert np.all((np.asarray(r) > 0) & (np.asarray(r) < 1))


def test_real_size_train_step_compiles():
  """size=1b (InternVL2.5-1B) builds and lowers the train step abstractly."""
  from rd_jax import train_rm  # pylint: disable=import-outside-toplevel
  config = rm_shapes.get_config("size=1b")
  config.rm.yes_id, config.rm.no_id = 9454, 2152
  rm, b = config.rm, 1
  tpi = internvl.tokens_per_image(rm.model)
  assert tpi == 256
  state = jax.eval_shape(lambda: train_rm.init_state(
      config, jax.random.key(0))[0])
  opt = train_rm.make_optimizer(config.train)
  length = 2 * (tpi + 2) + 96
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
  batch = {"input_ids": i32(b, 2, length),  # train_rm.pair_major layout
           "attention_mask": jax.ShapeDtypeStruct((b, 2, length), bool),
           "read_pos": i32(b, 2), "answer_ids": i32(b, 2, 1),
           "answer_mask": jax.ShapeDtypeStruct((b, 2, 1), bool),
           "decision_index": i32(b, 2),
           "chosen": jax.ShapeDtypeStruct((b, 448, 448, 3), jnp.uint8),
           "rejected": jax.ShapeDtypeStruct((b, 448, 448, 3), jnp.uint8)}
  step = jax.jit(functools.partial(train_rm.train_step, config, opt))
  lowered = step.lower(state, batch, jax.random.key(0))
  out = jax.eval_shape(functools.partial(train_rm.train_step, config, opt),
                       state, batch, jax.random.key(0))
  assert out[1]["loss"].shape == ()
  assert "stablehlo" in lowered.as_text()[:2000] or lowered is not None


def test_vision_pos_sincos_makes_patch_positions_linear():
  """rm.vision_pos_sincos=a starts the ViT's patch position embeddings at
  a x the 2-D sin-cos table and leaves every other param (the class slot
  too) at its random init. A linear readout of each patch's column and
  row from the table is exact; from the random init (64 slots in 32
  dims at size xs) it explains about half the variance."""
  rm = rm_shapes.get_config("").rm
  rm.vision_pos_sincos = 0.0
  base = model.init(rm, jax.random.key(0))
  rm.vision_pos_sincos = 4.0
  init = model.init(rm, jax.random.key(0))
  grid = rm.model.vision.image_size // rm.model.vision.patch_size
  y, x = np.mgrid[:grid, :grid]
  target = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)

  def r2(table):
    a = np.c_[np.asarray(table, np.float64), np.ones(len(table))]
    w = np.linalg.lstsq(a, target, rcond=None)[0]
    resid = ((a @ w - target) ** 2).sum(0)
    return 1 - resid / ((target - target.mean(0)) ** 2).sum(0)

  pos = init["vlm"]["vision"]["pos"][...]
  np.testing.assert_allclose(pos[1:], 4.0 * vit.sincos_2d(grid, pos.shape[1]),
                             rtol=1e-6)
  assert r2(pos[1:]).min() > 0.999
  assert r2(base["vlm"]["vision"]["pos"][...][1:]).max() < 0.8
  flat = dict(jax.tree_util.tree_flatten_with_path(base)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(init)[0]:
    name = jax.tree_util.keystr(path)
    want = flat[path]
    if "'pos'" in name:
      leaf, want = leaf[:1], want[:1]
    np.testing.assert_array_equal(leaf, want, err_msg=name)
  with pytest.raises(ValueError, match="divisible by 4, got 30"):
    vit.sincos_2d(8, 30)


@pytest.mark.parametrize("vision_init_scale", [0.0, 8.0])
def test_init_scale_scales_matrices_only(vision_init_scale):
  """rm.init_scale multiplies weight matrices, not the norm scales or ViT
  layer-scales (which are [layers, D] in the layer-stacked params);
  rm.vision_init_scale, when set, is the ViT's matrices' scale instead."""
  rm = tiny_rm()
  base = model.init(rm, jax.random.key(0))
  rm.init_scale = 4.0
  rm.vision_init_scale = vision_init_scale
  scaled = model.init(rm, jax.random.key(0))
  flat = dict(jax.tree_util.tree_flatten_with_path(base)[0])
  seen, vision_ratios = set(), set()
  for path, x in jax.tree_util.tree_flatten_with_path(scaled)[0]:
    name = jax.tree_util.keystr(path)
    vision = name.startswith("['vlm']['vision']")
    matrix = model._is_matrix(path, x)  # pylint: disable=protected-access
    ratio = ((vision_init_scale or 4.0) if vision else 4.0) if matrix else 1.0
    np.testing.assert_allclose(x, ratio * flat[path], err_msg=name)
    if vision:
      vision_ratios.add(ratio)
    if "norm" in name or "scale" in name:
      assert ratio == 1.0, name
      seen.add(name)
  assert any("attn_norm" in n for n in seen)
  assert any("scale1" in n for n in seen)
  assert vision_ratios == {1.0, vision_init_scale or 4.0}
  lm = scaled["vlm"]["language_model"]
  np.testing.assert_allclose(lm["layers"]["attn_norm"][...], 1.0)
  np.testing.assert_allclose(
      lm["layers"]["attn"]["q"][...],
      4.0 * base["vlm"]["language_model"]["layers"]["attn"]["q"][...])
