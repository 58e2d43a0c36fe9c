"""Self-check of ShapesWorld: is the oracle right about the stored data?

    python -m rd_jax.data.selfcheck --data_dir=DIR [--scale=default] [--out=F]

Prints (and writes to --out) JSON with, per split and category:
  clean_accuracy       oracle says "correct" for the preferred samples
                       (target >= 0.99 in every category)
  semantic_rejection   oracle says "wrong" for rejected samples whose failure
                       is semantic, per failure mode (target >= 0.95)
  degraded_accuracy    oracle still says "correct" for preferred samples
                       after a blur (sigma 1.2 px) and noise (sigma 15)
                       like a small generator's (reported, no target)
  quality_acceptance   share of quality-degraded rejected samples (blur,
                       noise, smear) the oracle still calls aligned: they are
                       worse pictures of the right content (reported)
and `pass` (both targets met everywhere).
"""
from __future__ import annotations

import collections
import json
import time

import numpy as np
from absl import app, flags
from scipy import ndimage

from rd_jax.data import oracle, pipeline, world

CLEAN_TARGET = 0.99
REJECT_TARGET = 0.95


def _mild_degrade(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  sigma = [0.0] * x.ndim
  for a in ((0, 1) if x.ndim == 3 else (1, 2)):
    sigma[a] = 1.2
  y = ndimage.gaussian_filter(x.astype(np.float32), sigma)
  y = y + rng.normal(0, 15, y.shape)
  return np.clip(np.round(y), 0, 255).astype(np.uint8)


def check(data_dir: str, scale: str = "default", max_per_split: dict | None
          = None, seed: int = 0, log=print) -> dict:
  """Runs the oracle over stored pairs; returns the JSON-able report."""
  max_per_split = max_per_split or {"image": 600, "video": 120}
  rng = np.random.default_rng(seed)
  out: dict = {"clean_accuracy": {}, "semantic_rejection": {},
               "degraded_accuracy": {}, "quality_acceptance": {}, "n": {}}
  t0 = time.time()
  for kind in pipeline.KINDS:
    for split in world.SPLITS:
      src = pipeline.data_source(data_dir, kind, split, scale)
      n = min(len(src), max_per_split[kind])
      clean, degraded = collections.defaultdict(list), collections.defaultdict(list)
      reject, quality = collections.defaultdict(list), []
      for i in range(n):
        r = src[i]
        spec = world.Spec.from_json(r["spec"].decode())
        failure = world.FAILURES[r["failure"]]
        clean[spec.category].append(oracle.score(r["chosen"], spec))
        degraded[spec.category].append(
            oracle.score(_mild_degrade(r["chosen"], rng), spec))
        verdict = oracle.score(r["rejected"], spec)
        if failure in world.SEMANTIC_FAILURES:
          reject[failure].append(not verdict)
        else:
          quality.append(verdict)
      key = f"{kind}/{split}"
      mean = lambda d: {k: float(np.mean(v)) for k, v in sorted(d.items())}
      out["clean_accuracy"][key] = mean(clean)
      out["degraded_accuracy"][key] = mean(degraded)
      out["semantic_rejection"][key] = mean(reject)
      out["quality_acceptance"][key] = float(np.mean(quality)) if quality else None
      out["n"][key] = n
      log(f"[selfcheck] {key}: {n} pairs, clean min "
          f"{min(out['clean_accuracy'][key].values()):.3f}, rejection min "
          f"{min(out['semantic_rejection'][key].values()):.3f} "
          f"({time.time() - t0:.0f}s)")
  out["min_clean_accuracy"] = min(v for d in out["clean_accuracy"].values()
                                  for v in d.values())
  out["min_semantic_rejection"] = min(
      v for d in out["semantic_rejection"].values() for v in d.values())
  out["pass"] = bool(out["min_clean_accuracy"] >= CLEAN_TARGET and
                     out["min_semantic_rejection"] >= REJECT_TARGET)
  out["wall_s"] = time.time() - t0
  return out


def main(argv):
  del argv
  flags_ = flags.FLAGS
  report = check(flags_.data_dir, flags_.scale)
  text = json.dumps(report, indent=1)
  print(text)
  if flags_.out:
    with open(flags_.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  # flags live here, not at import: other entry points import this module
  flags.DEFINE_string("data_dir", None, "ShapesWorld data directory.")
  flags.DEFINE_string("scale", "default", "Data scale (tfds_shapes.SCALES).")
  flags.DEFINE_string("out", None, "Write the JSON report here too.")
  flags.mark_flag_as_required("data_dir")
  app.run(main)
