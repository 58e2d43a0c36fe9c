"""Reward-model training end to end on the tiny ShapesWorld: the loss goes
down, held-out pairs beat chance, and eval_rm reads the checkpoint back
(resuming is tested bit for bit in test_faults.py)."""
import functools
import os
import re

import jax
import numpy as np
import pytest

from configs import rm_shapes
from rd_jax import eval_rm, train_rm, train_util
from rd_jax.data import pipeline
from rd_jax.models import internvl
from rd_jax.reward import evaluate as rm_eval


def _config(data_dir, arg="smoke", **kw):
  config = rm_shapes.get_config(arg)
  config.data_dir = data_dir
  config.update(kw)
  return config


@pytest.fixture(scope="module")
def trained(demo_smoke, shapes_tiny):
  """The main job's smoke pairwise RM (rm_shapes.py:smoke, 40 steps)."""
  config, workdir, final = demo_smoke
  assert config.reward_model.ckpt_every == 20
  return (os.path.join(workdir, "reward_model"), final["reward_model"],
          shapes_tiny)


def test_training_lowers_loss(trained):
  _, out, _ = trained
  assert out["steps"] == 40
  assert out["final_loss"] < out["first_loss"]
  for key in ("acc_id", "acc_ood", "acc_by_failure", "ece",
              "position_consistency", "wall_s"):
    assert key in out


def test_short_run_beats_chance_on_held_out_pairs(shapes_tiny):
  """The real train step and evaluation on a preference a from-scratch model
  learns in a few steps (the brighter image is preferred; ShapesWorld itself
  takes hundreds of steps to leave chance), scored on unseen pairs."""
  config = _config(shapes_tiny)
  config.augment.update(tint=0.0, brightness=0.0, zoom_prob=0.0)
  tok = train_rm.load_tokenizer(config)
  tpi = internvl.tokens_per_image(config.rm.model)
  state, opt = train_rm.init_state(config, jax.random.key(0))
  step = jax.jit(functools.partial(train_rm.train_step, config, opt))
  batch = next(iter(pipeline.loader(shapes_tiny, "image", "train",
                                    batch_size=8, scale="tiny")))
  rng = np.random.default_rng(0)

  def brighter_pairs(b):
    base = rng.integers(0, 255, (8, 64, 64, 3))
    return dict(b, chosen=(base * 0.5 + 120).astype(np.uint8),
                rejected=(base * 0.5).astype(np.uint8))

  seen = []
  for i in range(12):
    data = train_rm.device_batch(config, tok, tpi, brighter_pairs(batch))
    state, m = step(state, data, jax.random.key(i))
    seen.append(float(m["loss"]))
  assert seen[-1] < 0.5 * seen[0]
  held = brighter_pairs(batch)
  q = rm_eval.encode_batch(config, tok, tpi, held)
  scores = jax.jit(functools.partial(rm_eval.score_pairs, config))(
      state["params"], q, held["chosen"], held["rejected"])
  m = rm_eval.metrics(config.paradigm, scores, held["failure"])
  assert m["acc"] > 0.9 and m["position_consistency"] > 0.9, m


def test_eval_rm_reads_the_checkpoint(trained):
  workdir, out, _ = trained
  res = eval_rm.evaluate(workdir, ["test_id"])
  assert res["step"] == 40
  assert res["test_id"]["acc"] == pytest.approx(out["acc_id"])


@pytest.mark.parametrize("arg", [
    "smoke,paradigm=pointwise_generative,cot=reason_first",
    "smoke,paradigm=pointwise_regressive",
    "smoke,kind=video,cot=decision_first",
])
def test_paradigms_cot_and_video_step_and_score(shapes_tiny, arg):
  """One real train step and one scoring pass for every paradigm, both CoT
  formats (reason-first decodes its rationale greedily) and video."""
  config = _config(shapes_tiny, arg)
  tok = train_rm.load_tokenizer(config)
  tpi = internvl.tokens_per_image(config.rm.model)
  state, opt = train_rm.init_state(config, jax.random.key(0))
  batch = next(iter(pipeline.loader(shapes_tiny, config.kind, "train",
                                    batch_size=2, scale="tiny")))
  data = train_rm.device_batch(config, tok, tpi, batch)
  state, m = jax.jit(functools.partial(train_rm.train_step, config, opt))(
      state, data, jax.random.key(0))
  assert np.isfinite(float(m["loss"]))
  if config.cot != "none":
    assert float(m["cot_ce"]) > 0
  q = rm_eval.encode_batch(config, tok, tpi, batch)
  scores = jax.jit(functools.partial(rm_eval.score_pairs, config))(
      state["params"], q, batch["chosen"], batch["rejected"])
  out = rm_eval.metrics(config.paradigm, scores, batch["failure"])
  assert 0 <= out["acc"] <= 1 and out["n"] == 2


def test_pointwise_aux_adds_the_pointwise_loss_of_the_same_pairs(
    shapes_tiny):
  """pointwise_aux = w: the pairwise loss + w x the pointwise generative
  loss (its own questions and rationales) of the batch's pairs."""
  batch = next(iter(pipeline.loader(shapes_tiny, "image", "train",
                                    batch_size=4, scale="tiny")))

  def loss(arg, pairs=batch, **kw):
    config = _config(shapes_tiny, "smoke,cot=decision_first," + arg, **kw)
    tok = train_rm.load_tokenizer(config)  # sets rm.yes_id / no_id
    tpi = internvl.tokens_per_image(config.rm.model)
    params = train_rm.init_state(config, jax.random.key(0))[0]["params"]
    data = train_rm.device_batch(config, tok, tpi, pairs)
    seq = {k: train_rm.row_major(v) for k, v in data.items()
           if k not in train_rm.PER_PAIR}
    return train_rm.loss_fn(config, params, seq, data["chosen"] / 255.0,
                            data["rejected"] / 255.0)

  pair, _ = loss("paradigm=pairwise_generative")
  point, _ = loss("paradigm=pointwise_generative")
  both, aux = loss("paradigm=pairwise_generative", pointwise_aux=0.5)
  assert float(point) > 0.1
  np.testing.assert_allclose(float(both), float(pair) + 0.5 * float(point),
                             rtol=1e-5)
  np.testing.assert_allclose(float(aux["pointwise_loss"]), float(point),
                             rtol=1e-5)
  # pointwise_aux_every=2: the pointwise loss of pairs 0 and 2 only
  point02, _ = loss("paradigm=pointwise_generative",
                    pairs={k: v[::2] for k, v in batch.items()})
  _, aux = loss("paradigm=pairwise_generative", pointwise_aux=0.5,
                pointwise_aux_every=2)
  assert abs(float(point02) - float(point)) > 1e-3
  np.testing.assert_allclose(float(aux["pointwise_loss"]), float(point02),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=re.escape(
      "pointwise_aux_every=3 does not divide this process's 4 pairs")):
    loss("paradigm=pairwise_generative", pointwise_aux=0.5,
         pointwise_aux_every=3)


def test_microbatches_average_the_slices_losses_and_gradients(shapes_tiny):
  """train.microbatches=k: the step's loss and gradient are the means over
  k contiguous slices of the batch, each slice with its own pairs'
  pointwise_aux rows; for a mean over pairs (the regressive Bradley-Terry
  loss) that is the whole batch's gradient."""
  batch = next(iter(pipeline.loader(shapes_tiny, "image", "train",
                                    batch_size=4, scale="tiny")))

  def step(arg, k, pairs=batch, **kw):
    config = _config(shapes_tiny, arg, **kw)
    config.train.microbatches = k
    config.augment.update(tint=0.0, brightness=0.0, zoom_prob=0.0)
    tok = train_rm.load_tokenizer(config)
    tpi = internvl.tokens_per_image(config.rm.model)
    state, opt = train_rm.init_state(config, jax.random.key(0))
    data = train_rm.device_batch(config, tok, tpi, pairs)
    _, m = jax.jit(functools.partial(train_rm.train_step, config, opt))(
        state, data, jax.random.key(1))
    return {key: float(v) for key, v in m.items()}

  whole = step("smoke,paradigm=pointwise_regressive", 1)
  sliced = step("smoke,paradigm=pointwise_regressive", 2)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(sliced[key], whole[key], rtol=1e-5)
  aux = dict(pointwise_aux=1.0, pointwise_aux_every=2)
  arg = "smoke,cot=decision_first"
  two = step(arg, 2, **aux)
  halves = [step(arg, 1, pairs={k: v[i:i + 2] for k, v in batch.items()},
                 **aux) for i in (0, 2)]
  assert abs(halves[0]["loss"] - halves[1]["loss"]) > 1e-3
  for key in ("loss", "pointwise_loss", "cot_ce"):
    np.testing.assert_allclose(two[key], np.mean([h[key] for h in halves]),
                               rtol=1e-5)
  with pytest.raises(ValueError, match=re.escape(
      "train.microbatches=4 gives slices of 1 pairs, not a multiple of "
      "pointwise_aux_every=2")):
    step(arg, 4, **aux)
  with pytest.raises(ValueError, match=re.escape(
      "train.microbatches=3 does not divide a batch leaf of shape (4,")):
    step("smoke,paradigm=pointwise_regressive", 3)
  with pytest.raises(ValueError, match=re.escape(
      "train.microbatches=0: use 1 or more")):
    step("smoke,paradigm=pointwise_regressive", 0)


def test_init_from_gives_the_step_the_types_of_a_fresh_state(trained):
  """from_pretrained's state (from a fresh or an abstract one) has the
  types, shardings included, of a fresh random state, as the jitted step's
  outputs do: otherwise the step compiles twice (stop 47: its opt counts
  had no mesh; a 3-step xs stage from init_from took 38 s, now 21 s)."""
  workdir, _, data_dir = trained
  config = _config(data_dir)
  train_rm.load_tokenizer(config)
  opt = train_rm.make_optimizer(config.train)
  init = lambda: train_rm.init_state(config, jax.random.key(0))[0]  # noqa: E731
  fresh, _, mesh, rules = train_util.sharded_init(config, init)
  abstract, *_ = train_util.sharded_init(config, init, abstract=True)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(abstract))
  want = jax.tree.map(jax.typeof, fresh)
  for start in (fresh, abstract):
    state = train_rm.from_pretrained(config, workdir, start, opt, mesh,
                                     rules)
    assert jax.tree.map(jax.typeof, state) == want


def test_augment_draws_per_row_not_per_image():
  """The chosen images alone (paradigm caption) get exactly the
  augmentation they get next to their rejected ones: one draw per row."""
  aug = rm_shapes.get_config().augment
  rng = np.random.default_rng(0)
  chosen, rejected = (rng.integers(0, 256, (4, 64, 64, 3), np.uint8)
                      for _ in range(2))
  key = jax.random.key(1)
  pair = train_rm.augment(aug, key, chosen, rejected)
  (alone,) = train_rm.augment(aug, key, chosen)
  np.testing.assert_array_equal(alone, pair[0])
  assert np.abs(np.asarray(pair[0]) - chosen / 255.0).max() > 0.05


def test_caption_pretraining_starts_a_reward_model(shapes_tiny, tmp_path):
  """paradigm=caption trains the VLM on the prompts (held-out caption loss
  far below the first step's); init_from starts a reward model from
  exactly its params (lr 0: they stay put) and refuses another rm.model,
  naming the difference."""
  pre = _config(shapes_tiny, "smoke,paradigm=caption", eval_every=100,
                ckpt_every=20, final_eval_pairs=16)
  pre.train.steps = 20
  vlm = str(tmp_path / "vlm")
  out = train_rm.train_and_evaluate(pre, vlm)
  assert out["caption_ce_id"] < 0.6 * out["first_loss"], out
  assert "acc_id" not in out and 0 < out["caption_acc_ood"] <= 1
  rm = _config(shapes_tiny, "smoke,paradigm=pointwise_generative",
               init_from=vlm, final_eval_pairs=0)
  rm.train.update(steps=2, lr=0.0)
  train_rm.train_and_evaluate(rm, str(tmp_path / "rm"))
  (_, want, _, _), (_, got, step, _) = (
      eval_rm.load(d) for d in (vlm, str(tmp_path / "rm")))
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, got, want)
  bad = _config(shapes_tiny, "smoke", init_from=vlm)
  bad.rm.model.text.num_layers = 3
  with pytest.raises(ValueError, match="text.num_layers: 2 vs 3"):
    train_rm.train_and_evaluate(bad, str(tmp_path / "bad"))


def test_pretraining_stages_chain_into_the_reward_model(shapes_tiny,
                                                        tmp_path, caplog):
  """config.pretrain runs caption then pointwise, each from the one before
  with every pair kept, then the run's pairwise RM from the pointwise
  stage's last params (from_pretrained, tested above); a rerun skips the
  finished stages, and refuses one whose settings changed, naming them."""
  cfg = _config(shapes_tiny, final_eval_pairs=0)
  cfg.pretrain.update(caption_steps=6, pointwise_steps=3)
  cfg.pretrain.caption_train.batch_size = 4
  cfg.failure_keep.blur = 0.25
  cfg.train.steps = 2
  workdir = str(tmp_path / "rm")
  with caplog.at_level("INFO"):
    out = train_rm.train_and_evaluate(cfg, workdir)
  assert {k: v["steps"] for k, v in out["pretrain"].items()} == {
      "caption": 6, "pointwise_generative": 3}
  stage = functools.partial(os.path.join, workdir, "pretrain")
  (cap_cfg, cap, _, _), (pw_cfg, pw, _, _) = (
      eval_rm.load(stage(p)) for p in ("caption", "pointwise_generative"))
  assert (cap_cfg.paradigm, cap_cfg.init_from) == ("caption", "")
  assert (cap_cfg.train.batch_size, pw_cfg.train.batch_size) == (4, 8)
  assert (pw_cfg.paradigm, pw_cfg.init_from) == ("pointwise_generative",
                                                 stage("caption"))
  assert cap_cfg.failure_keep.blur == pw_cfg.failure_keep.blur == 1.0
  assert (f"initialised from {stage('pointwise_generative')} step 3 "
          "(pointwise_generative)") in caplog.text
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(cap), jax.tree.leaves(pw)))
  def finished():  # when each stage wrote its final_metrics.json
    return [os.stat(os.path.join(stage(p), "final_metrics.json")).st_mtime_ns
            for p in ("caption", "pointwise_generative")]
  done = finished()
  again = train_rm.train_and_evaluate(cfg, workdir)
  assert again["pretrain"] == out["pretrain"]
  assert finished() == done
  cfg.pretrain.pointwise_steps = 5
  with pytest.raises(ValueError, match=re.escape(
      f"{stage('pointwise_generative')} holds a finished pointwise_generative"
      " stage run with other settings (theirs vs ours: eval_every: 4 vs 6; "
      "train.steps: 3 vs 5); delete that directory")):
    train_rm.train_and_evaluate(cfg, workdir)


@pytest.mark.parametrize("arg", ["smoke", "smoke,paradigm=caption",
                                 "smoke,cot=decision_first"])
def test_bench_batch_has_the_trainers_layout(shapes_tiny, arg):
  """aot.rm_job (what bench and the AOT compiles time) feeds train_step
  the trainer's own batch: the same keys, dtypes and shapes, but for the
  sequence: aot.rm_seq_len knows no tokenizer, so it bounds the chat
  frame's tokens and rounds up to 8, never under the trainer's."""
  from rd_jax import aot  # pylint: disable=import-outside-toplevel
  config = _config(shapes_tiny, arg)
  if config.cot != "none":  # the recipe's pointwise loss, and the prompt
    # after the images in slots enough that aot would fall short without them
    config.pointwise_aux, config.prompt_after_len = 1.0, 16
  tok = train_rm.load_tokenizer(config)
  tpi = internvl.tokens_per_image(config.rm.model)
  batch = next(iter(pipeline.loader(shapes_tiny, "image", "train",
                                    batch_size=4, scale="tiny")))
  real = train_rm.device_batch(config, tok, tpi, batch)
  abstract = aot.make_job(config, "rm", 4).rest[0]
  flat = dict(jax.tree_util.tree_flatten_with_path(real)[0])
  want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
  assert flat.keys() == want.keys()
  for key, x in flat.items():
    a = want[key]
    assert np.dtype(x.dtype) == np.dtype(a.dtype), key
    if key[-1].key.split("/")[-1] in ("input_ids", "attention_mask"):
      assert x.shape[:-1] == a.shape[:-1], key
      assert x.shape[-1] <= a.shape[-1] < x.shape[-1] + 16, key
    else:
      assert x.shape == a.shape, key
