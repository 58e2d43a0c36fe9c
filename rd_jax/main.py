"""The main job: RewardDance end to end on ShapesWorld, stage by stage.

    python -m rd_jax.main --config=configs/demo.py --workdir=DIR

Each stage's figures go to DIR/stages/NAME.json when it completes; a rerun
of the same command skips completed stages, so an interrupted run resumes
from the last completed one. DIR/final_metrics.json collects every stage's
figures under its name; DIR/config.json is the config used.
"""
from __future__ import annotations

import json
import os
import time

from absl import logging

from rd_jax import cli, train_util
from rd_jax.data import pipeline, selfcheck



def data_dir(config, workdir: str) -> str:
  return config.data_dir or os.path.join(workdir, "data")


def stage_data(config, workdir: str) -> dict:
  seconds = pipeline.build(data_dir(config, workdir), config.data_scale,
                           log=logging.info)
  return {"data_dir": data_dir(config, workdir), "scale": config.data_scale,
          "build_s": seconds}


def stage_selfcheck(config, workdir: str) -> dict:
  report = selfcheck.check(
      data_dir(config, workdir), config.data_scale,
      {"image": config.selfcheck.max_image,
       "video": config.selfcheck.max_video}, config.seed, log=logging.info)
  if not report["pass"]:
    raise RuntimeError(
        f"the ShapesWorld oracle failed its self-check (min clean accuracy "
        f"{report['min_clean_accuracy']:.3f}, min semantic rejection "
        f"{report['min_semantic_rejection']:.3f}); see "
        f"{os.path.join(workdir, 'stages', 'selfcheck.failed.json')}")
  return report


STAGES = (("data", stage_data), ("selfcheck", stage_selfcheck))


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns final_metrics."""
  os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
  train_util.save_config(workdir, config)
  final, t0 = {}, time.time()
  for i, (name, fn) in enumerate(STAGES, 1):
    path = os.path.join(workdir, "stages", f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        final[name] = json.load(f)
      logging.info("[stage %d/%d] %s: done before, skipped", i, len(STAGES),
                   name)
      continue
    logging.info("[stage %d/%d] %s ...", i, len(STAGES), name)
    start = time.time()
    final[name] = fn(config, workdir)
    final[name]["stage_wall_s"] = time.time() - start
    train_util.write_json(path, final[name])
    logging.info("[stage %d/%d] %s done in %.0fs (total %.0fs)", i,
                 len(STAGES), name, time.time() - start, time.time() - t0)
  final["wall_s"] = sum(s.get("stage_wall_s", 0.0) for s in final.values()
                        if isinstance(s, dict))
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), final)
  return final


def main(argv):
  del argv
  final = run(cli.CONFIG.value, cli.WORKDIR.value)
  sc = final["selfcheck"]
  print(json.dumps({"oracle_selfcheck_pass": sc["pass"],
                    "clean_accuracy": sc["clean_accuracy"],
                    "semantic_rejection": sc["semantic_rejection"],
                    "wall_s": final["wall_s"]}, indent=1))


if __name__ == "__main__":
  cli.run(main)
