r"""Inference-time scaling on ShapesWorld held-out prompts (T2I, T2V, I2V).

  python -m rd_jax.generate --config=configs/generate_shapes.py \
      --config.generator=/tmp/gen_img --config.verifier.checkpoint=/tmp/rm_pw \
      --workdir=/tmp/gen_search

Compares, on the same prompts and the oracle: plain sampling at several step
counts, Best-of-N (N in `best_of_n`) and Search over Paths (each (n, m) in
`search.paths`), against the number of generator and verifier evaluations
per prompt. The generator is a `train_generator` workdir or a `refl`
workdir (the generator after ReFL; its EMA params either way);
the verifier a `train_rm` workdir: pointwise_generative scores each sample
(P("yes")), pairwise_generative ranks Best-of-N candidates by round-robin
wins (symmetric), and cannot drive the search, which needs a pointwise
score.

Keys:
  generator            train_generator or refl workdir (required)
  stage                its stage to sample: 'image' (T2I) or 'video'
  task                 '' (t2i for image, t2v for video) or 'i2v' (video:
                       the first frame given, a render of the spec)
  verifier.checkpoint  train_rm workdir (required)
  modes                any of plain, best_of_n, search_over_paths
  plain_steps          solver steps of the plain runs
  best_of_n            N values; candidates 0..N-1 of one set of 16 noises
                       per prompt (nested, so the curve is monotone in what
                       the verifier sees, and cheap)
  search.*             PathSearch (rd_jax/generation/search.py): paths =
                       ((n, m), ...), sigma_start, delta_f, delta_b,
                       steps_start, steps_round
  eval_n, eval_batch   held-out (test_id) prompts and their batch size
                       (eval_batch divides eval_n and is a multiple of the
                       mesh's batch shards)
  mesh.shape           (data, fsdp, tensor), -1 = fill; both models sharded
                       by their logical names, prompts over data x fsdp
"""
from __future__ import annotations

import ml_collections

from rd_jax.config_util import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, smoke=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.generator = ""
  c.stage = "image"
  c.task = ""  # "" = t2i (image stage) / t2v (video stage); or i2v
  c.data_dir = ""  # "" = the generator's
  c.verifier = ml_collections.ConfigDict(dict(checkpoint=""))
  c.modes = ("plain", "best_of_n", "search_over_paths")
  c.plain_steps = (10, 20, 40)
  c.best_of_n = (1, 2, 4, 8, 16)
  c.search = ml_collections.ConfigDict(dict(
      paths=((2, 2), (4, 4)), sigma_start=0.11, delta_f=0.78, delta_b=0.81,
      steps_start=18, steps_round=4))
  # Mesh (data, fsdp, tensor), -1 = fill; rules: rd_jax/sharding.py.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.eval_n = 120
  c.eval_batch = 60
  c.num_grid = 16
  if arg.smoke:
    c.plain_steps, c.best_of_n = (2,), (1, 2)
    c.search.update(paths=((2, 2),), steps_start=2, steps_round=1)
    c.eval_n, c.eval_batch, c.num_grid = 6, 6, 4
  return c
