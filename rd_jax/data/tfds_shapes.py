"""TFDS builder for ShapesWorld preference pairs, written as ArrayRecord.

Builder configs `image` (64x64 T2I pairs, GenEval categories) and `video`
(8-frame motion pairs, used for T2V and I2V), each at the scales in SCALES
(`image`, `image_small`, `image_tiny`, ...). Every example is a
pair: a prompt, its spec (JSON), the preferred sample (`chosen`), a labelled
near miss (`rejected`), the failure mode and its description. Example i of a
split is a pure function of (seed, split, i), so any record can be rebuilt.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from rd_jax.data import world


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  kind: str = "image"
  size: int = 64
  frames: int | None = None
  num_examples: tuple[tuple[str, int], ...] = ()
  seed: int = 0


# examples per split: (image train, video train, image test, video test)
SCALES = {
    "default": (10000, 1600, 600, 200),
    "small": (2000, 400, 200, 60),   # smoke runs of the whole pipeline
    "tiny": (120, 24, 24, 8),        # unit tests
}


def config_name(kind: str, scale: str = "default") -> str:
  return kind if scale == "default" else f"{kind}_{scale}"


def _configs() -> list[ShapesConfig]:
  out = []
  for scale, (img, vid, img_test, vid_test) in SCALES.items():
    out.append(ShapesConfig(
        name=config_name("image", scale), kind="image", num_examples=(
            ("train", img), ("test_id", img_test), ("test_ood", img_test))))
    out.append(ShapesConfig(
        name=config_name("video", scale), kind="video", frames=8,
        num_examples=(("train", vid), ("test_id", vid_test),
                      ("test_ood", vid_test))))
  return out


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """ShapesWorld preference pairs (see rd_jax/data/world.py for the splits)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = _configs()

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    shape = (cfg.size, cfg.size, 3) if not cfg.frames else (
        cfg.frames, cfg.size, cfg.size, 3)
    sample = tfds.features.Tensor(shape=shape, dtype=np.uint8,
                                  encoding=tfds.features.Encoding.ZLIB)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "id": np.int64,
            "prompt": tfds.features.Text(),
            "spec": tfds.features.Text(),
            "category": tfds.features.ClassLabel(names=world.CATEGORIES),
            "chosen": sample,
            "rejected": sample,
            "failure": tfds.features.ClassLabel(names=world.FAILURES),
            "failure_text": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # procedural: nothing to download
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.num_examples}

  def _generate_examples(self, split: str, n: int):
    cfg = self.builder_config
    cats = world.IMAGE_CATEGORIES if cfg.kind == "image" else world.VIDEO_CATEGORIES
    for i in range(n):
      yield i, example(cfg.seed, split, i, cats, cfg.size, cfg.frames)


def example(seed: int, split: str, i: int, categories, size: int,
            frames: int | None) -> dict:
  """Record i of `split`, categories balanced round-robin."""
  rng = np.random.default_rng([seed, world.SPLITS.index(split), i])
  spec = world.sample_spec(rng, categories[i % len(categories)], split)
  pair = world.make_pair(spec, rng, size, frames, split)
  return {"id": i, "prompt": world.prompt(spec), "spec": spec.to_json(),
          "category": spec.category, "chosen": pair.chosen,
          "rejected": pair.rejected, "failure": pair.failure,
          "failure_text": pair.failure_text}
