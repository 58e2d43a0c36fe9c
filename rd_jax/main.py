"""The main job: RewardDance end to end on ShapesWorld, stage by stage.

    python -m rd_jax.main --config=configs/demo.py --workdir=DIR

Stages (configs/demo.py): data, selfcheck, generator (SFT), reward_model
(pairwise generative), verifier (pointwise generative), refl, search,
report. Each stage's job writes into DIR/NAME (a workdir of that job, e.g.
DIR/refl is a `python -m rd_jax.refl` workdir) and its figures go to
DIR/stages/NAME.json when it completes; a rerun of the same command skips
completed stages, and a stage stopped midway resumes from its own last
checkpoint. DIR/final_metrics.json collects every stage's figures under its
name; DIR/report.md is the report; DIR/config.json the config used.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import time

from absl import logging

from rd_jax import (cli, generate, refl, report, train_generator, train_rm,
                    train_util)
from rd_jax.data import pipeline, selfcheck


def data_dir(config, workdir: str) -> str:
  return config.data_dir or os.path.join(workdir, "data")


def job_config(config, name: str, workdir: str):
  """Stage `name`'s job config, linked to the main job's data and seed."""
  c = copy.deepcopy(config[name])
  c.seed = config.seed
  c.data_dir = data_dir(config, workdir)
  if "data_scale" in c:  # train_generator
    c.data_scale = config.data_scale
  if "scale" in c:  # train_rm
    c.scale = config.data_scale
  return c


def stage_data(config, workdir: str) -> dict:
  seconds = pipeline.build(data_dir(config, workdir), config.data_scale,
                           log=logging.info)
  return {"data_dir": data_dir(config, workdir), "scale": config.data_scale,
          "build_s": seconds}


def stage_selfcheck(config, workdir: str) -> dict:
  out = selfcheck.check(
      data_dir(config, workdir), config.data_scale,
      {"image": config.selfcheck.max_image,
       "video": config.selfcheck.max_video}, config.seed, log=logging.info)
  if not out["pass"]:
    raise RuntimeError(
        f"the ShapesWorld oracle failed its self-check (min clean accuracy "
        f"{out['min_clean_accuracy']:.3f}, min semantic rejection "
        f"{out['min_semantic_rejection']:.3f}); see "
        f"{os.path.join(workdir, 'stages', 'selfcheck.failed.json')}")
  return out


def stage_generator(config, workdir: str) -> dict:
  return train_generator.train_and_evaluate(
      job_config(config, "generator", workdir),
      os.path.join(workdir, "generator"))


def stage_rm(name: str, config, workdir: str) -> dict:
  """The reward_model (pairwise) or verifier (pointwise) stage."""
  return train_rm.train_and_evaluate(job_config(config, name, workdir),
                                     os.path.join(workdir, name))


def stage_refl(config, workdir: str) -> dict:
  c = copy.deepcopy(config.refl)
  c.seed = config.seed
  c.generator = os.path.join(workdir, "generator")
  c.reward.checkpoint = os.path.join(workdir, "reward_model")
  return refl.train_and_evaluate(c, os.path.join(workdir, "refl"))


def stage_search(config, workdir: str) -> dict:
  c = job_config(config, "search", workdir)
  c.generator = os.path.join(workdir, "refl")  # the ReFL generator
  c.verifier.checkpoint = os.path.join(workdir, "verifier")
  return generate.run(c, os.path.join(workdir, "search"))


def stage_report(config, workdir: str, final: dict) -> dict:
  return {"path": report.write(final, config, workdir)}


STAGES = (("data", stage_data), ("selfcheck", stage_selfcheck),
          ("generator", stage_generator),
          ("reward_model", functools.partial(stage_rm, "reward_model")),
          ("verifier", functools.partial(stage_rm, "verifier")),
          ("refl", stage_refl),
          ("search", stage_search), ("report", stage_report))


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns final_metrics (with
  `preempted`: the stage name, if a stage was stopped by a preemption
  signal; a rerun resumes it)."""
  train_util.prepare_workdir(workdir)
  os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
  train_util.save_config(workdir, config)
  final, t0, n = {}, time.time(), len(STAGES)
  for i, (name, fn) in enumerate(STAGES, 1):
    path = os.path.join(workdir, "stages", f"{name}.json")
    # The report is always rewritten (seconds) from the stages' figures.
    if os.path.exists(path) and name != "report":
      with open(path) as f:
        final[name] = json.load(f)
      logging.info("[stage %d/%d] %s: done before, skipped", i, n, name)
      continue
    logging.info("[stage %d/%d] %s ... (main job %s so far)", i, n, name,
                 train_util.fmt_time(time.time() - t0))
    start = time.time()
    out = (fn(config, workdir, final) if name == "report"
           else fn(config, workdir))
    if out.get("preempted"):
      logging.warning("[stage %d/%d] %s preempted; rerun the same command "
                      "to resume it", i, n, name)
      return {**final, "preempted": name}
    final[name] = {**out, "stage_wall_s": time.time() - start}
    train_util.write_json(path, final[name])
    logging.info("[stage %d/%d] %s done in %s (main job %s so far)", i, n,
                 name, train_util.fmt_time(time.time() - start),
                 train_util.fmt_time(time.time() - t0))
  final["wall_s"] = sum(s.get("stage_wall_s", 0.0) for s in final.values()
                        if isinstance(s, dict))
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), final)
  return final


def main(argv):
  del argv
  final = run(cli.CONFIG.value, cli.WORKDIR.value)
  if "preempted" in final:
    return
  print(json.dumps(report.summary(final), indent=1))


if __name__ == "__main__":
  cli.run(main)
