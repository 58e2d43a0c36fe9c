"""ShapesWorld: oracle figures, held-out splits, pipeline determinism and sharding."""
import collections
import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from rd_jax.data import oracle, pipeline, selfcheck, text, tokenizer, world


def _pairs(split, categories, n, seed):
  rng = np.random.default_rng(seed)
  for i in range(n):
    spec = world.sample_spec(rng, categories[i % len(categories)], split)
    yield spec, world.make_pair(spec, rng, split=split)


@pytest.mark.parametrize("split", ["train", "test_ood"])
def test_oracle_accepts_clean_renders_of_every_category(split):
  verdict = collections.defaultdict(list)
  for spec, pair in _pairs(split, world.IMAGE_CATEGORIES, 360, 1):
    verdict[spec.category].append(oracle.score(pair.chosen, spec))
  for spec, pair in _pairs(split, world.VIDEO_CATEGORIES, 40, 2):
    verdict[spec.category].append(oracle.score(pair.chosen, spec))
  assert set(verdict) == set(world.CATEGORIES)
  for category, v in verdict.items():
    assert np.mean(v) >= 0.99, (category, np.mean(v))


def test_oracle_rejects_semantic_failures():
  rejected = collections.defaultdict(list)
  for split in ("train", "test_ood"):
    for cats, n in ((world.IMAGE_CATEGORIES, 480), (world.VIDEO_CATEGORIES, 60)):
      for spec, pair in _pairs(split, cats, n, 3):
        if pair.failure in world.SEMANTIC_FAILURES:
          rejected[pair.failure].append(not oracle.score(pair.rejected, spec))
  assert set(rejected) == set(world.SEMANTIC_FAILURES)
  for failure, v in rejected.items():
    assert len(v) >= 10 and np.mean(v) >= 0.95, (failure, len(v), np.mean(v))


def test_oracle_is_robust_to_generator_like_blur_and_noise():
  rng = np.random.default_rng(4)
  ok = []
  for spec, pair in _pairs("train", world.IMAGE_CATEGORIES, 180, 5):
    x = ndimage.gaussian_filter(pair.chosen.astype(np.float32), (1.2, 1.2, 0))
    x = np.clip(x + rng.normal(0, 15, x.shape), 0, 255).astype(np.uint8)
    ok.append(oracle.score(x, spec))
  assert np.mean(ok) >= 0.97


def test_oracle_rejects_objects_on_a_textured_background():
  """ReFL once painted the right objects on a many-coloured checkerboard
  (32x32 generator): smoothed, the board was neither background nor
  objects, and the objects on it were found and judged right. The
  background must be plain: without the check 17 of these 20 pass. (A
  board of 1-px cells blurs into one colour at 64x64 and still passes.)"""
  rng = np.random.default_rng(8)
  ys, xs = np.indices((32, 32))
  board = np.array([world.COLORS["red"], world.COLORS["green"]],
                   np.float32)[(xs // 2 + ys // 2) % 2]
  verdicts = []
  for _ in range(20):
    spec = world.sample_spec(rng, "single_object", "train")
    img = world.render(spec, rng, size=32)
    flat = (img == img[0, 0]).all(-1, keepdims=True)
    textured = np.where(flat, board, img).astype(np.uint8)
    assert oracle.score(img, spec)
    verdicts.append(oracle.judge(textured, spec))
  assert {ok for ok, _ in verdicts} == {False}
  assert all(why.startswith("the background is not plain (") and
             why.endswith("of pixels near its colour, needs 45%)")
             for _, why in verdicts), verdicts[0]
  assert oracle.detect(textured) == []
  video = np.stack([textured] * 8)
  motion = world.Spec("motion", (world.Obj("circle", "red", direction="left",
                                           speed="slowly"),))
  ok, why = oracle.judge(video, motion)
  assert not ok and why.endswith(" in 8 frames"), why


def test_oracle_attributes_say_which_attribute_is_wrong():
  rng = np.random.default_rng(6)
  one = [world.Spec("colors", (world.Obj(sh, c),))
         for sh in world.SHAPES for c in ("red", "blue", "green")]
  imgs = [world.render(s, rng) for s in one]
  assert oracle.attributes(imgs, one) == {
      "count": 1.0, "blank": 0.0, "shape": 1.0, "color": 1.0, "n_single": 9,
      "n_color": 9}
  # The same renders judged against other colours, then other shapes.
  recolor = [world.Spec("colors", (world.Obj(s.objects[0].shape, "yellow"),))
             for s in one]
  assert oracle.attributes(imgs, recolor) == {
      "count": 1.0, "blank": 0.0, "shape": 1.0, "color": 0.0, "n_single": 9,
      "n_color": 9}
  reshape = [world.Spec("single_object", (world.Obj(
      world.SHAPES[(world.SHAPES.index(s.objects[0].shape) + 1) % 3]),))
             for s in one]
  a = oracle.attributes(imgs, reshape)
  assert (a["count"], a["shape"], a["n_single"], a["n_color"]) == (
      1.0, 0.0, 9, 0) and np.isnan(a["color"])
  # Two objects asked for, one drawn: count fails, no single-object rates.
  two = [world.Spec("counting", (world.Obj(s.objects[0].shape, count=2),))
         for s in one]
  a = oracle.attributes(imgs, two)
  assert (a["count"], a["n_single"]) == (0.0, 0) and np.isnan(a["shape"])
  # An empty background: a blank sample, counted apart from wrong counts.
  empty = np.full_like(imgs[0], imgs[0][0, 0])
  a = oracle.attributes([empty, imgs[0]], one[:2])
  assert (a["count"], a["blank"]) == (0.5, 0.5)
  with pytest.raises(ValueError, match="attributes\\(\\) judges images"):
    oracle.attributes([imgs[0]], [world.Spec("motion", (world.Obj(
        "circle", "red", direction="left", speed="slowly"),))])


def test_oracle_motion_says_whether_objects_move_as_asked():
  rng = np.random.default_rng(7)
  specs = [world.Spec("motion", (world.Obj(sh, c, direction=d, speed=v),))
           for sh, c in (("circle", "red"), ("square", "blue"))
           for d in ("left", "right", "up", "down")
           for v in ("slowly", "quickly")]
  videos = [world.render(s, rng) for s in specs]
  assert oracle.motion(videos, specs) == {
      "tracked": 1.0, "direction": 1.0, "speed": 1.0, "moving": 1.0,
      "n_tracked": 16}
  # The same videos judged against the opposite direction, the other speed,
  # played frozen (first frame repeated), and against another colour.
  flip = {"left": "right", "right": "left", "up": "down", "down": "up"}
  other = {"slowly": "quickly", "quickly": "slowly"}
  redo = lambda **kw: [world.Spec("motion", (dataclasses.replace(  # noqa: E731
      s.objects[0], **{k: f(s.objects[0]) for k, f in kw.items()}),))
      for s in specs]
  m = oracle.motion(videos, redo(direction=lambda o: flip[o.direction]))
  assert (m["direction"], m["moving"]) == (0.0, 1.0)
  m = oracle.motion(videos, redo(speed=lambda o: other[o.speed]))
  assert (m["direction"], m["speed"]) == (1.0, 0.0)
  frozen = [np.stack([v[0]] * len(v)) for v in videos]
  m = oracle.motion(frozen, specs)
  assert (m["tracked"], m["direction"], m["moving"]) == (1.0, 0.0, 0.0)
  m = oracle.motion(videos, redo(color=lambda o: "yellow"))
  assert (m["tracked"], m["n_tracked"]) == (0.0, 0) and np.isnan(
      m["direction"])
  with pytest.raises(ValueError, match="motion\\(\\) judges videos"):
    oracle.motion([videos[0][0]], [world.Spec("colors", (world.Obj(
        "circle", "red"),))])


def test_oracle_judges_position_and_motion_by_geometry():
  spec = world.Spec("position", (world.Obj("circle"), world.Obj("square")),
                    "left of")
  left = world.Scene((world.Placed("circle", "red", 16, 32, 7),
                      world.Placed("square", "blue", 48, 32, 7)), (228,) * 3)
  right = world.Scene((world.Placed("circle", "red", 48, 32, 7),
                       world.Placed("square", "blue", 16, 32, 7)), (228,) * 3)
  assert oracle.judge(world.draw(left), spec) == (True, "ok")
  assert oracle.judge(world.draw(right), spec) == (
      False, "circle is not left of square")
  move = world.Spec("motion", (world.Obj("circle", "red", direction="right",
                                         speed="quickly"),))
  fast = world.Scene((world.Placed("circle", "red", 12, 32, 7, 3.5, 0),),
                     (228,) * 3, frames=8)
  slow = world.Scene((world.Placed("circle", "red", 12, 32, 7, 1.5, 0),),
                     (228,) * 3, frames=8)
  assert oracle.score(world.draw(fast), move)
  assert oracle.judge(world.draw(slow), move) == (
      False, "the circle does not move quickly")


def test_pairs_are_near_misses_not_different_pictures():
  changed = []
  for spec, pair in _pairs("train", world.IMAGE_CATEGORIES, 120, 6):
    if pair.failure in ("wrong_color", "wrong_shape", "swapped_attributes"):
      diff = np.abs(pair.chosen.astype(int) - pair.rejected.astype(int)).sum(-1)
      changed.append((diff > 30).mean())
  assert 0 < np.max(changed) < 0.15 and np.min(changed) > 0


def _rendered_combos(sample):
  frames = sample if sample.ndim == 4 else sample[None]
  return {(d.color, d.shape) for f in frames for d in oracle.detect(f)}


def test_splits_hold_out_combinations_and_style(shapes_tiny):
  for kind in pipeline.KINDS:
    for r in pipeline.data_source(shapes_tiny, kind, "train", "tiny"):
      for key in ("chosen", "rejected"):
        assert not _rendered_combos(r[key]) & world.OOD_COMBOS, r["prompt"]
      assert tuple(np.median(r["chosen"].reshape(-1, 3), 0)) in world.TRAIN_BACKGROUNDS
    for r in pipeline.data_source(shapes_tiny, kind, "test_ood", "tiny"):
      assert _rendered_combos(r["chosen"]) & world.OOD_COMBOS, r["prompt"]
      assert tuple(np.median(r["chosen"].reshape(-1, 3), 0)) == world.OOD_BACKGROUND


def test_held_out_combos_never_in_train_layouts():
  rng = np.random.default_rng(7)
  for category in world.CATEGORIES:
    for _ in range(100):
      spec = world.sample_spec(rng, category, "train")
      scene = world.layout(spec, rng, "train", 8 if spec.is_video else None)
      for failure in world.CATEGORY_FAILURES[category]:
        out = world.near_miss(spec, scene, failure, rng, "train")
        for s in [scene] + ([out[0]] if out else []):
          assert not {(o.color, o.shape) for o in s.objects} & world.OOD_COMBOS


def test_pipeline_is_deterministic_and_resumes(shapes_tiny):
  def batches(it, n):
    return [next(it) for _ in range(n)]
  make = lambda seed: iter(pipeline.loader(shapes_tiny, "image", "train",
                                           batch_size=8, seed=seed,
                                           scale="tiny"))
  a, b = batches(make(3), 4), batches(make(3), 4)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["id"], batches(make(4), 1)[0]["id"])
  it = make(3)
  batches(it, 2)
  state = it.get_state()
  rest = batches(it, 3)
  again = make(3)
  again.set_state(state)
  for x, y in zip(rest, batches(again, 3)):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["chosen"], y["chosen"])


def test_pipeline_cache_gives_the_same_batches_without_rereading(
    shapes_tiny, monkeypatch):
  """cache=True: the batches of cache=False, and the records a loader of
  this process read before come from memory (the next epoch, another
  loader of the split), not from the files."""
  def batches(n, cache, seed=3):
    it = iter(pipeline.loader(shapes_tiny, "image", "train", batch_size=8,
                              seed=seed, scale="tiny", cache=cache))
    return [next(it) for _ in range(n)]
  monkeypatch.setattr(pipeline, "_CACHE", {})
  plain, cached = batches(30, False), batches(30, True)  # 2 epochs of 120
  for x, y in zip(plain, cached):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  reads = []
  source = pipeline.data_source
  def counted(*args):
    src = source(*args)
    class Counted:
      def __len__(self):
        return len(src)
      def __getitem__(self, i):
        reads.append(i)
        return src[i]
    return Counted()
  monkeypatch.setattr(pipeline, "data_source", counted)
  batches(15, True, seed=4)  # another order of the records read above
  assert not reads
  batches(1, False)
  assert len(reads) == 8


def test_pipeline_thins_records_by_failure(shapes_tiny):
  def ids_by_failure(seed, keep):
    out = collections.defaultdict(set)
    for b in pipeline.loader(shapes_tiny, "image", "train", batch_size=1,
                             seed=seed, scale="tiny", num_epochs=1,
                             keep=keep):
      out[world.FAILURES[int(b["failure"][0])]].add(int(b["id"][0]))
    return out
  keep = {"blur": 0.0, "noise": 0.0, "smear": 0.0, "wrong_shape": 0.5}
  full, thin = ids_by_failure(0, None), ids_by_failure(0, keep)
  # The quality failures are gone, the unnamed failures all kept, and about
  # half of the 29 wrong shapes kept (a uniform draw per record).
  assert not {"blur", "noise", "smear"} & set(thin)
  for f in set(full) - set(keep):
    assert thin[f] == full[f], f
  assert thin["wrong_shape"] < full["wrong_shape"]
  assert 8 <= len(thin["wrong_shape"]) <= 21, len(thin["wrong_shape"])
  # Deterministic for a seed, another draw for another seed.
  assert ids_by_failure(0, keep) == thin
  assert ids_by_failure(1, keep)["wrong_shape"] != thin["wrong_shape"]
  # All ones: nothing thinned.
  assert ids_by_failure(0, {f: 1.0 for f in world.FAILURES}) == full
  with pytest.raises(ValueError, match=r"keep names unknown failures "
                     r"\['wrong_size'\]; the failures are \['wrong_count'"):
    pipeline.loader(shapes_tiny, "image", "train", batch_size=1, scale="tiny",
                    keep={"wrong_size": 0.5})
  with pytest.raises(ValueError, match=r"keep fractions must lie in \[0, 1\], "
                     r"got \{'blur': 1.5\}"):
    pipeline.loader(shapes_tiny, "image", "train", batch_size=1, scale="tiny",
                    keep={"blur": 1.5})
  with pytest.raises(ValueError, match="keep drops every failure"):
    pipeline.loader(shapes_tiny, "image", "train", batch_size=1, scale="tiny",
                    keep={f: 0.0 for f in world.FAILURES})


def test_pipeline_shards_disjointly_by_process(shapes_tiny):
  ids = []
  for index in range(2):
    loader = pipeline.loader(shapes_tiny, "image", "train", batch_size=4,
                             scale="tiny", num_epochs=1, shard_index=index,
                             shard_count=2)
    ids.append(np.concatenate([b["id"] for b in loader]))
  assert not set(ids[0]) & set(ids[1])
  assert sorted(np.concatenate(ids)) == list(range(120))


def test_batches_carry_tokenized_prompts(shapes_tiny):
  tok = tokenizer.load(pipeline.tokenizer_dir(shapes_tiny))
  batch = next(iter(pipeline.loader(shapes_tiny, "video", "train",
                                    batch_size=4, scale="tiny")))
  assert batch["chosen"].shape == (4, 8, 64, 64, 3)
  for ids, mask, prompt in zip(batch["prompt_ids"], batch["prompt_mask"],
                               batch["prompt"]):
    assert tok.decode(ids[mask]) == prompt.decode()
  specs = pipeline.specs_of(batch)
  assert [world.prompt(s) for s in specs] == [p.decode() for p in batch["prompt"]]
  # Two epochs: every prompt is seen again, from the loader's prompt cache.
  seen = []
  for b in pipeline.loader(shapes_tiny, "image", "train", batch_size=8,
                           scale="tiny", num_epochs=2):
    for ids, mask, prompt in zip(b["prompt_ids"], b["prompt_mask"],
                                 b["prompt"]):
      assert tok.decode(ids[mask]) == prompt.decode()
      seen.append(prompt)
  assert len(seen) == 240 and len(set(seen)) <= 120


def test_yes_and_no_are_single_tokens_and_text_has_no_unknowns(shapes_tiny):
  tok = tokenizer.load(pipeline.tokenizer_dir(shapes_tiny))
  yes, no = tokenizer.answer_token_ids(tok)
  assert tok.convert_ids_to_tokens([yes, no]) == ["yes", "no"]
  spec = world.Spec("colors", (world.Obj("circle", "red"),))
  answer = text.pairwise_answer(True, "is blurry", "decision_first")
  assert answer == "yes. Reasons: image 1 is blurry; image 2 matches the prompt."
  assert text.pointwise_answer(False, "is noisy", "reason_first") == (
      "Reasons: the image is noisy. Answer: no")
  for t in (text.pairwise_question(world.prompt(spec), world.instruction(spec),
                                   "reason_first"), answer):
    assert tok.unk_token_id not in tok.encode(t)
  assert tok.encode(answer, add_special_tokens=False)[0] == yes


def test_tokenizer_without_yes_no_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match=r"encodes 'yes' as \[1\] \(1 tokens\); "
                     r"the reward readout needs 'yes' and 'no' to be single "
                     r"known tokens"):
    tokenizer.build(str(tmp_path / "tok"), corpus=["hello world"])
  with pytest.raises(FileNotFoundError, match="no tokenizer directory at"):
    tokenizer.load(str(tmp_path / "missing"))


def test_missing_data_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"build it with: python -m "
                     r"rd_jax.data.build --data_dir=.* --scale=tiny"):
    pipeline.data_source(str(tmp_path), "image", "train", "tiny")


def test_selfcheck_passes_on_stored_data(shapes_tiny):
  report = selfcheck.check(shapes_tiny, "tiny", log=lambda *_: None)
  assert report["pass"], report
  assert set(report["clean_accuracy"]["image/test_id"]) == set(
      world.IMAGE_CATEGORIES)
  assert report["min_clean_accuracy"] >= 0.99


def test_video_shape_majority_breaks_ties_by_first_seen():
  # A tracked object's shape is its most frequent per-frame shape; on a tie
  # the first seen wins, whatever the process's string hash seed (the set
  # this replaced made tied I2V verdicts differ between runs).
  assert oracle.majority(["circle", "square", "square"]) == "square"
  for order in (["circle", "square"], ["square", "circle"],
                ["triangle", "circle"], ["circle", "triangle"],
                ["square", "triangle"], ["triangle", "square"]):
    assert oracle.majority(order * 4) == order[0]
    assert oracle.majority(order[:1] + order[::-1] * 3) == order[0]
