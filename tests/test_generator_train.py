"""Generator SFT: a short run of the real train step lowers the loss, and the
I2V first frame is masked out of the loss; the smoke trainer writes what it
promises and resumes; `generate` samples it with a reward-model verifier."""
import copy
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import generate_shapes, generator_shapes, rm_shapes
from rd_jax import generate, train_generator, train_rm, train_util
from rd_jax.data import pipeline, tokenizer, world
from rd_jax.generation import flow
from rd_jax.models import generator
from test_generator_model import jittered


def _batch(kind: str, n: int, max_len: int, frames: int = 0):
  rng = np.random.default_rng(0)
  cats = world.IMAGE_CATEGORIES if kind == "image" else world.VIDEO_CATEGORIES
  specs = [world.sample_spec(rng, cats[i % len(cats)]) for i in range(n)]
  chosen = np.stack([world.render(s, rng, size=64, frames=frames or None)
                     for s in specs])
  words = sorted({w for s in specs for w in world.prompt(s).split()})
  vocab = {w: i + 1 for i, w in enumerate(words)}
  ids = np.zeros((n, max_len), np.int32)
  for i, s in enumerate(specs):
    toks = [vocab[w] for w in world.prompt(s).split()]
    ids[i, :len(toks)] = toks
  return {"chosen": chosen, "prompt_ids": ids,
          "prompt_mask": (ids > 0).astype(np.int32)}


def _eval_loss(st, params, batch):
  """Loss at fixed noise/t over several keys (no dropout): comparable."""
  x0 = generator.to_model_space(generator.resize(batch["chosen"],
                                                 st.resolution))
  cond = generator.encode_text(st.model, params, batch["prompt_ids"],
                               batch["prompt_mask"])
  losses = [flow.flow_matching_loss(generator.velocity_fn(st.model), params,
                                    x0, cond, jax.random.key(k))[0]
            for k in range(4)]
  return float(jnp.mean(jnp.stack(losses)))


def test_short_training_run_lowers_the_flow_matching_loss():
  st = generator_shapes.get_config("smoke").image
  st.update(lr=3e-3, warmup_steps=1, steps=40, cond_drop=0.0)
  batch = _batch("image", 8, st.model.text.max_len)
  params = generator.init(st.model, jax.random.key(0))
  opt = train_generator.make_optimizer(st)
  state = {"params": params, "opt": opt.init(params),
           "ema": jax.tree.map(jnp.copy, params),
           "step": jnp.zeros((), jnp.int32)}
  before = _eval_loss(st, params, batch)
  step = jax.jit(functools.partial(train_generator.train_step, st, opt))
  for i in range(st.steps):
    state, metrics = step(state, batch, jax.random.key(100 + i))
  after = _eval_loss(st, state["params"], batch)
  assert np.isfinite(float(metrics["loss"]))
  assert after < 0.7 * before, (before, after)
  # EMA trails the live params but has moved off the initialisation.
  ema_after = _eval_loss(st, state["ema"], batch)
  assert ema_after < before, (before, ema_after)


def test_i2v_mask_excludes_the_given_first_frame_from_the_loss():
  m = train_generator.first_frame_mask(jnp.array([True, False]), 4)
  assert m.shape == (2, 4, 1, 1, 1)
  np.testing.assert_array_equal(m[:, :, 0, 0, 0], [[1, 0, 0, 0], [0] * 4])
  # A model that is wrong only on frame 0 has zero loss when frame 0 is
  # given (clamped and masked), and positive loss otherwise.
  x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 3))
  known = jnp.ones((2, 1, 1, 1, 1)) * (jnp.arange(4) == 0)[None, :, None,
                                                            None, None]

  def exact_but_frame0(params, x, t, cond):
    v = (x - x0) / t[:, None, None, None, None]
    return v.at[:, 0].add(5.0)

  loss, _ = flow.flow_matching_loss(exact_but_frame0, None, x0, None,
                                    jax.random.key(1), known=(known, x0),
                                    loss_mask=1 - known)
  assert float(loss) < 1e-6
  loss_all, _ = flow.flow_matching_loss(exact_but_frame0, None, x0, None,
                                        jax.random.key(1))
  assert float(loss_all) > 1.0


def test_two_pass_text_to_video_is_the_i2v_sample_of_its_own_frame_0():
  """t2v_two_pass: frame 0 is the joint sample's, exactly, and the video is
  what image-to-video from that frame gives with the same noise; frames
  1.. are drawn again; image-to-video input is left alone."""
  st = generator_shapes.get_config("smoke").video
  st.update(sample_steps=3, t2v_two_pass=False)
  batch = _batch("video", 2, st.model.text.max_len, frames=st.frames)
  ids, mask = batch["prompt_ids"], batch["prompt_mask"]
  params = jittered(generator.init(st.model, jax.random.key(0)),
                    jax.random.key(2), 0.1)
  noise = jax.random.normal(jax.random.key(1), generator.sample_shape(st, 2))
  joint = train_generator.sample(st, params, ids, mask, noise)
  known = train_generator.i2v_known(st, joint[:, 0])
  i2v = train_generator.sample(st, params, ids, mask, noise, known)
  two = copy.deepcopy(st)
  two.t2v_two_pass = True
  got = train_generator.sample(two, params, ids, mask, noise)
  np.testing.assert_array_equal(got[:, 0], joint[:, 0])
  np.testing.assert_allclose(got, i2v, atol=1e-6)
  assert float(jnp.abs(got[:, 1:] - joint[:, 1:]).max()) > 1e-3
  np.testing.assert_array_equal(
      train_generator.sample(two, params, ids, mask, noise, known), i2v)


def test_smoke_run_writes_metrics_samples_and_resumes(gen_smoke):
  cfg, workdir, m = gen_smoke
  cfg = copy.deepcopy(cfg)
  for key in ("oracle_t2i", "oracle_t2v", "oracle_i2v", "wall_s"):
    assert 0.0 <= m[key] <= 1.0 or key == "wall_s", (key, m[key])
  assert set(m["oracle_by_category"]) == {"t2i", "t2v", "i2v"}
  assert set(m["oracle_attributes_t2i"]) == {"count", "blank", "shape",
                                             "color", "n_single", "n_color"}
  for task in ("t2v", "i2v"):
    assert set(m[f"oracle_motion_{task}"]) == {"tracked", "moving",
                                               "direction", "speed",
                                               "n_tracked"}
  assert set(m["oracle_by_category"]["t2i"]) == set(
      world.IMAGE_CATEGORIES) | {"overall"}
  with open(f"{workdir}/final_metrics.json") as f:
    assert json.load(f)["oracle_t2i"] == m["oracle_t2i"]
  for name in ("image/samples_t2i.png", "video/samples_t2v.gif",
               "video/samples_i2v_frames.png", "config.json"):
    assert os.path.exists(f"{workdir}/{name}"), name
  # Resuming: two more steps on top of the saved image checkpoint.
  cfg.stages = ("image",)
  cfg.image.steps += 2
  m2 = train_generator.train_and_evaluate(cfg, workdir)
  assert os.path.isdir(f"{workdir}/image/checkpoints/{cfg.image.steps}")
  assert np.isfinite(m2["final_loss_image"])


def test_stages_side_by_side_give_what_one_after_another_gives(gen_smoke,
                                                               tmp_path):
  """The main job's smoke generator trained its two stages side by side,
  each in its own process (config.parallel_stages); one after another in
  this process, the same config gives the same losses and oracle figures."""
  cfg, _, m = gen_smoke
  assert train_generator.stages_side_by_side(cfg, {"image": None,
                                                   "video": None})
  cfg = copy.deepcopy(cfg)
  cfg.parallel_stages = False
  seq = train_generator.train_and_evaluate(cfg, str(tmp_path))
  for key in ("final_loss_image", "final_loss_video", "oracle_by_category"):
    assert seq[key] == m[key], key


def test_stages_go_one_after_another_on_one_core_or_when_asked(
    monkeypatch):
  cfg = generator_shapes.get_config("smoke")
  free = {"image": None, "video": None}
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1},
                      raising=False)
  assert train_generator.stages_side_by_side(cfg, free)
  cfg.stages = ("image",)
  assert not train_generator.stages_side_by_side(cfg, {"image": None})
  cfg.stages = ("image", "video")
  cfg.parallel_stages = False
  assert not train_generator.stages_side_by_side(cfg, free)
  cfg.parallel_stages = True
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0},
                      raising=False)  # e.g. taskset -c 0
  assert not train_generator.stages_side_by_side(cfg, free)


def test_a_stage_starts_from_the_params_it_is_given(gen_smoke, tmp_path):
  """train_stage(init_params=the image stage's EMA) starts there (0 steps:
  its EMA is exactly them); without, from a fresh init. The second stage
  is a copy of the image stage: video prompts (13 tokens) do not fit the
  image model's max_len of 8."""
  cfg, workdir, _ = gen_smoke
  cfg = copy.deepcopy(cfg)
  image = generate.load_generator(workdir, "image")[2]
  cfg.video = copy.deepcopy(cfg.image)
  cfg.video.steps = 0
  tok = tokenizer.load(pipeline.tokenizer_dir(cfg.data_dir))
  writer = train_util.metric_writer(str(tmp_path))
  gap = lambda a, b: max(float(jnp.abs(x - y).max())  # noqa: E731
                         for x, y in zip(jax.tree.leaves(a),
                                         jax.tree.leaves(b)))
  _, ema = train_generator.train_stage(cfg, "video", tok, str(tmp_path / "a"),
                                       writer, init_params=image)
  assert gap(ema, image) == 0.0
  # The fresh init is the one the few-step image stage started from (same
  # seed), so it differs from the image EMA by those few small updates.
  _, ema = train_generator.train_stage(cfg, "video", tok, str(tmp_path / "b"),
                                       writer)
  assert gap(ema, image) > 1e-4, gap(ema, image)


def test_init_from_stage_needs_an_earlier_stage_with_the_same_model():
  cfg = generator_shapes.get_config("smoke")
  assert train_generator.check_init_from_stage(cfg, "video") is None
  cfg.video.model = copy.deepcopy(cfg.image.model)
  cfg.video.init_from_stage = "image"
  assert train_generator.check_init_from_stage(cfg, "video") == "image"
  # A stage that starts from another waits for it.
  assert not train_generator.stages_side_by_side(cfg, {"image": None,
                                                       "video": "image"})
  bad = copy.deepcopy(cfg)
  bad.video.model.dit.patch_size = 2
  with pytest.raises(ValueError, match=(
      r"video.init_from_stage='image' needs video.model equal to "
      r"image.model; they differ in dit.patch_size: set them alike, or "
      r"--config.video.init_from_stage='' to start video from scratch")):
    train_generator.check_init_from_stage(bad, "video")
  bad = copy.deepcopy(cfg)
  bad.stages = ("video", "image")
  with pytest.raises(ValueError, match=(
      r"video.init_from_stage='image' must name a stage that runs before "
      r"'video' in config.stages=\('video', 'image'\)")):
    train_generator.check_init_from_stage(bad, "video")


def test_generate_counts_nfe_and_needs_a_pointwise_verifier_to_search(
    gen_smoke, rm_reference, tmp_path):
  st = gen_smoke[0].image
  c = generate_shapes.get_config("smoke")
  c.generator, c.verifier.checkpoint = gen_smoke[1], rm_reference
  c.modes = ("plain", "best_of_n")
  m = generate.run(c, str(tmp_path / "g"))
  per_step = 2  # classifier-free guidance: two forward passes per step
  assert st.cfg_scale != 1 and st.solver == "euler"
  rows = [(r["mode"], r.get("steps"), r.get("n"), r["nfe_generator"],
           r["nfe_verifier"]) for r in m["curves"]]
  # rm_reference is pairwise: Best-of-N ranks by round-robin symmetric
  # comparisons, 2·N·(N−1) verifier passes.
  assert rows == [("plain", 2, None, 2 * per_step, 0),
                  ("best_of_n", None, 1, st.sample_steps * per_step, 0),
                  ("best_of_n", None, 2, 2 * st.sample_steps * per_step, 4)]
  assert all(0.0 <= r["oracle"] <= 1.0 for r in m["curves"])
  for name in ("final_metrics.json", "oracle_vs_nfe.png",
               "samples_plain.png", "samples_best_of_n.png"):
    assert os.path.exists(tmp_path / "g" / name), name
  c.modes = ("search_over_paths",)
  with pytest.raises(ValueError, match=(
      "search_over_paths needs a pointwise verifier; --config.verifier."
      "checkpoint is a pairwise_generative RM")):
    generate.run(c, str(tmp_path / "g2"))


def test_generate_image_to_video_holds_the_given_first_frame(gen_smoke,
                                                             tmp_path):
  """generate's video stage, task i2v, every mode: the returned videos
  start with the given first frame, exactly; the NFE counts are a
  pointwise verifier's. The verifier is an untrained video RM (its scores
  pick candidates, the property holds for any)."""
  cfg, workdir, _ = gen_smoke
  rc = rm_shapes.get_config("smoke,kind=video,paradigm=pointwise_generative")
  rc.data_dir = cfg.data_dir
  tok = train_rm.load_tokenizer(rc)
  params = train_rm.init_state(rc, jax.random.key(0))[0]["params"]
  c = generate_shapes.get_config("smoke")
  c.generator, c.stage, c.task = workdir, "video", "i2v"
  c.eval_n = c.eval_batch = 4
  out = str(tmp_path / "v")
  m = generate.run(c, out, verifier=generate.Verifier(rc, params, tok))
  st = cfg.video
  assert m["task"] == "i2v" and st.frames == 8
  per_step = generate.nfe_per_step(st)
  rows = [(r["mode"], r.get("n"), r["nfe_generator"], r["nfe_verifier"])
          for r in m["curves"]]
  assert rows[:3] == [("plain", None, 2 * per_step, 0),
                      ("best_of_n", 1, st.sample_steps * per_step, 1),
                      ("best_of_n", 2, 2 * st.sample_steps * per_step, 2)]
  assert rows[3][0] == "search_over_paths"
  specs = world.eval_specs("video", "test_id", n=c.eval_n, seed=c.seed)
  first = np.asarray(generator.to_pixels(
      train_generator.i2v_first_frames(c.seed, st, specs)))
  r = st.resolution
  for mode in ("plain", "best_of_n", "search_over_paths"):
    # Rows of the lossless frame strip: one video each, frames side by side.
    strip = np.asarray(Image.open(f"{out}/samples_{mode}_frames.png"))
    got = strip.reshape(c.eval_n, r, st.frames, r, 3)[:, :, 0]
    np.testing.assert_array_equal(got, first, err_msg=mode)
    # The other frames are sampled, not copies of the first.
    assert not np.array_equal(strip.reshape(c.eval_n, r, st.frames, r, 3)
                              [:, :, 1], first), mode
  # Text-to-video in two passes (st.t2v_two_pass, the video default):
  # twice the plain sampler's generator passes.
  assert st.t2v_two_pass
  c.task, c.modes = "t2v", ("plain",)
  m = generate.run(c, str(tmp_path / "t"), verifier=generate.Verifier(
      rc, params, tok))
  assert [(r["mode"], r["nfe_generator"]) for r in m["curves"]] == [
      ("plain", 2 * c.plain_steps[0] * per_step)]
  c.task = "t2i"
  with pytest.raises(ValueError, match="--config.task=t2i does not fit "
                     "stage 'video', which samples videos; use t2v or i2v"):
    generate.run(c, str(tmp_path / "w"), verifier=generate.Verifier(
        rc, params, tok))
