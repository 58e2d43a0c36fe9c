"""RewardDance end to end on ShapesWorld: the main job.

    python -m rd_jax.main --config=configs/demo.py --workdir=/tmp/rd_demo
    python -m rd_jax.main --config=configs/demo.py:smoke --workdir=/tmp/rd_smoke

Stages (each resumable; a rerun skips the ones already done):
  data       build ShapesWorld (ArrayRecord) + tokenizer under `data_dir`
  selfcheck  the oracle's accuracy on the stored pairs (must `pass`)

Expected (default, 2-core CPU): data ~1.5 min, selfcheck ~0.5 min,
selfcheck.pass = true with every clean accuracy and semantic rejection 1.0.

Config keys:
  data_dir             where ShapesWorld lives ("" = WORKDIR/data)
  data_scale           default | small | tiny (rd_jax/data/tfds_shapes.py)
  selfcheck.max_image  pairs per split checked for images
  selfcheck.max_video  pairs per split checked for videos
  seed                 global seed
"""
import ml_collections

from rd_jax.config_util import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""
  c.data_scale = "tiny" if arg.smoke else "default"
  c.selfcheck = ml_collections.ConfigDict(
      {"max_image": 48 if arg.smoke else 600,
       "max_video": 8 if arg.smoke else 120})
  return c
