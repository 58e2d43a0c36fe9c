"""The main job (`python -m rd_jax.main --config=configs/demo.py:smoke`):
every stage writes its figures, the report has its tables and pictures,
the search stage samples the ReFL generator, and a rerun resumes from the
first stage not done."""
import json
import os

import jax
import numpy as np
import pytest

from rd_jax import generate, main, refl, train_util
from rd_jax.data import world
from rd_jax.generation import search
from rd_jax.models import generator

STAGE_KEYS = {
    "data": ("build_s",),
    "selfcheck": ("pass", "clean_accuracy"),
    "generator": ("oracle_t2i", "oracle_t2v", "oracle_i2v",
                  "oracle_by_category"),
    "reward_model": ("acc_id", "acc_ood", "acc_by_failure", "ece",
                     "position_consistency"),
    "verifier": ("acc_id", "acc_ood"),
    "refl": ("oracle_before", "oracle_after", "reward_mean_curve",
             "reward_std_window_curve"),
    "search": ("curves",),
    "report": ("path",),
}


def test_every_stage_writes_its_metrics(demo_smoke):
  config, workdir, final = demo_smoke
  assert [name for name, _ in main.STAGES] == list(STAGE_KEYS)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    on_disk = json.load(f)
  for name, keys in STAGE_KEYS.items():
    with open(os.path.join(workdir, "stages", f"{name}.json")) as f:
      stage = json.load(f)
    assert stage == on_disk[name] == json.loads(json.dumps(final[name]))
    for key in keys:
      assert key in stage, (name, key)
    assert stage["stage_wall_s"] > 0
  assert final["selfcheck"]["pass"] is True
  assert final["reward_model"]["paradigm"] == "pairwise_generative"
  assert final["verifier"]["paradigm"] == "pointwise_generative"
  assert final["reward_model"]["steps"] == config.reward_model.train.steps
  assert final["refl"]["paradigm"] == "pairwise_generative"
  assert len(final["refl"]["reward_mean_curve"]) == config.refl.train.steps
  assert final["wall_s"] == pytest.approx(
      sum(final[n]["stage_wall_s"] for n in STAGE_KEYS))


def test_search_stage_samples_the_refl_generator(demo_smoke):
  config, workdir, final = demo_smoke
  # The ReFL workdir loads as a generator: the SFT architecture with the
  # EMA params of ReFL's last step (not its raw params), which differ from
  # the SFT ones.
  gcfg, st, refl_ema = generate.load_generator(
      os.path.join(workdir, "refl"), "image")
  _, _, sft_ema = generate.load_generator(
      os.path.join(workdir, "generator"), "image")
  assert gcfg.image.to_dict() == st.to_dict()
  ckpt = train_util.Checkpointer(os.path.join(workdir, "refl", "checkpoints"))
  state, step = ckpt.restore(jax.eval_shape(lambda: {
      "params": refl_ema,
      "opt": refl.make_optimizer(config.refl.train,
                                 generator.logical_specs(st.model)
                                 ).init(refl_ema),
      "ema": refl_ema,
      "step": np.zeros((), np.int32)}))
  ckpt.close()
  assert step == config.refl.train.steps
  leaves = jax.tree.leaves
  for a, b in zip(leaves(refl_ema), leaves(state["ema"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      leaves(refl_ema), leaves(state["params"])))
  assert any(not np.array_equal(a, c) for a, c in zip(
      leaves(refl_ema), leaves(sft_ema)))
  # The pointwise verifier scores every candidate once, and the search's
  # counts are PathSearch.nfe's.
  per_step = generate.nfe_per_step(st)
  s = config.search
  rows = {(r["mode"], r.get("n")): r for r in final["search"]["curves"]}
  for n in s.best_of_n:
    assert rows["best_of_n", n]["nfe_verifier"] == n
    assert rows["best_of_n", n]["nfe_generator"] == (
        n * st.sample_steps * per_step)
  (n, m), = s.search.paths
  want = search.PathSearch(
      n=n, m=m, sigma_start=s.search.sigma_start, delta_f=s.search.delta_f,
      delta_b=s.search.delta_b, steps_start=s.search.steps_start,
      steps_round=s.search.steps_round).nfe(per_step)
  got = rows["search_over_paths", n]
  assert (got["nfe_generator"], got["nfe_verifier"]) == (
      want["nfe_generator"], want["nfe_verifier"])


def test_report_has_its_tables_and_pictures(demo_smoke):
  config, workdir, final = demo_smoke
  with open(final["report"]["path"]) as f:
    text = f.read()
  (n, m), = config.search.search.paths
  for line in (
      "| stage | paradigm | params | steps | acc_id | acc_ood |",
      f"| category | SFT | ReFL | ReFL + Best-of-{max(config.search.best_of_n)}"
      f" | ReFL + search over paths (n={n}, m={m}) |",
      "| reward std over the sliding window |",
      "| category | t2v | i2v |"):
    assert line in text, line
  # Every image category has its row, with SFT and ReFL as the refl stage
  # measured them.
  before = final["refl"]["oracle_by_category_before"]
  after = final["refl"]["oracle_by_category_after"]
  for cat in (*world.IMAGE_CATEGORIES, "overall"):
    assert f"| {cat} | {before[cat]:.3f} | {after[cat]:.3f} |" in text, cat
  # The video table ends with oracle.motion's rates, as the generator wrote.
  gen = final["generator"]
  for k in ("tracked", "moving", "direction", "speed"):
    rates = [gen[f"oracle_motion_{t}"][k] for t in ("t2v", "i2v")]
    assert f"| motion: {k} | {rates[0]:.3f} | {rates[1]:.3f} |" in text, k
  pictures = [p.split("](")[1].rstrip(")") for p in text.split("\n")
              if p.startswith("![")]
  assert len(pictures) == 6
  for rel in pictures:
    assert os.path.exists(os.path.join(workdir, rel)), rel


def test_rerun_skips_completed_stages_and_resumes_the_rest(
    demo_smoke, tmp_path, monkeypatch):
  config, workdir, final = demo_smoke
  # A copy of the finished workdir's stage records, with the search stage
  # "interrupted": only it (and the report) may run again.
  work = str(tmp_path / "w")
  os.makedirs(os.path.join(work, "stages"))
  for name in STAGE_KEYS:
    if name not in ("search", "report"):
      train_util.write_json(os.path.join(work, "stages", f"{name}.json"),
                            final[name])
  ran = []

  def refuse(config, workdir):
    raise AssertionError("a completed stage ran again")

  def fake_search(config, workdir):
    ran.append("search")
    return {"curves": final["search"]["curves"]}

  monkeypatch.setattr(main, "STAGES", tuple(
      (name, fake_search if name == "search" else
       fn if name == "report" else refuse) for name, fn in main.STAGES))
  monkeypatch.setattr(main.report, "write",
                      lambda final, config, workdir: ran.append("report")
                      or os.path.join(workdir, "report.md"))
  again = main.run(config, work)
  assert ran == ["search", "report"]
  for name in STAGE_KEYS:
    if name not in ("search", "report"):
      assert again[name] == json.loads(json.dumps(final[name]))
  assert os.path.exists(os.path.join(work, "stages", "search.json"))
  # And now the search is done too: nothing but the report runs.
  ran.clear()
  main.run(config, work)
  assert ran == ["report"]
