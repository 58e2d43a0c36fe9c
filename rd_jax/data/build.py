"""Builds ShapesWorld (ArrayRecord via TFDS) and its tokenizer.

    python -m rd_jax.data.build --data_dir=DIR [--scale=default|small|tiny]

Reuses what already exists under DIR. The default scale takes 1.5-2
minutes on a 2-core machine (see README).
"""
from absl import app, flags

from rd_jax.data import pipeline

def main(argv):
  del argv
  pipeline.build(flags.FLAGS.data_dir, flags.FLAGS.scale)


if __name__ == "__main__":
  # flags live here, not at import: other entry points import this module
  flags.DEFINE_string("data_dir", None, "Where to write ShapesWorld.")
  flags.DEFINE_string("scale", "default", "Data scale (tfds_shapes.SCALES).")
  flags.mark_flag_as_required("data_dir")
  app.run(main)
