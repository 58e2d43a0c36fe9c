r"""ReFL of the ShapesWorld SFT generator with a RewardDance reward (T2I).

  python -m rd_jax.refl --config=configs/refl_shapes.py \
      --config.generator=/tmp/gen_img --config.reward.checkpoint=/tmp/rm \
      --workdir=/tmp/refl

The reward model's paradigm (its train_rm config) selects the reward:
pairwise_generative (the default RewardDance reward: P(sample better than a
Best-of-N reference)), pointwise_generative (P("yes")) or
pointwise_regressive (the scalar head). Writes DIR/final_metrics.json
(oracle_before/after, oracle_by_category_before/after, oracle_curve,
reward_mean_curve, reward_std_window_curve, diversity_before/after,
references_s, wall_s), DIR/reward_and_oracle.png, sample grids before,
during and after, and DIR/references.npz (reused by a rerun).

Keys:
  generator, stage     train_generator workdir and its stage ('image')
  reward.checkpoint    train_rm workdir
  refl.steps           sampling steps K of the ReFL rollout
  refl.window          (lo, hi): the scored step k is uniform in [lo, hi]
  refl.lam, refl.scale loss = relu(lam - r) * scale
  refl.beta            weight of the flow-matching loss on clean renders
  references.*         prompts (train-split pool), n (Best-of-n), top_k,
                       bottom (keep the worst k: the paper's ablation),
                       batch (prompts per call: memory grows with
                       batch * n * (n - 1) reward-model passes)
  train.*              steps, batch_size, lr, warmup_steps, grad_clip,
                       ema_decay, max_nonfinite, optimizer (adamw | muon,
                       rd_jax/train_util.make_optimizer)
  eval_every, eval_n   oracle on held-out prompts during training (EMA);
                       oracle_curve = [[step, oracle]] from step 0 (SFT)
  final_eval_n         prompts for oracle_before / oracle_after
  diversity_prompts, diversity_seeds   diversity: mean pixel std across
                       seeds of one prompt
  std_window           steps in the sliding reward std (hacking indicator)
  mesh.shape           (data, fsdp, tensor), -1 = fill; the generator's
                       state and the frozen RM are sharded on it by their
                       logical names, the batch over data x fsdp
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
  c.reward = ml_collections.ConfigDict(dict(checkpoint=""))
  c.refl = ml_collections.ConfigDict(dict(
      steps=20, window=(12, 17), lam=1.0, scale=1.0, beta=0.1))
  c.references = ml_collections.ConfigDict(dict(
      prompts=128, n=8, top_k=2, bottom=False, batch=32))
  c.train = ml_collections.ConfigDict(dict(
      steps=200, batch_size=8, lr=3e-4, warmup_steps=10, grad_clip=1.0,
      ema_decay=0.95, max_nonfinite=20, optimizer="adamw"))
  # Mesh (data, fsdp, tensor), -1 = fill; rules: rd_jax/sharding.py.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.eval_every = 50
  c.eval_n = 60
  c.final_eval_n = 120
  c.eval_batch = 60
  c.diversity_prompts = 8
  c.diversity_seeds = 4
  c.std_window = 20
  c.log_every = 10
  c.ckpt_every = 50
  c.num_grid = 16
  if arg.smoke:
    c.refl.update(steps=3, window=(1, 2))
    c.references.update(prompts=4, n=2, top_k=2)
    c.train.update(steps=4, batch_size=2, warmup_steps=1)
    c.eval_every, c.eval_n, c.final_eval_n, c.eval_batch = 4, 6, 6, 6
    c.diversity_prompts, c.diversity_seeds, c.std_window = 2, 2, 2
    c.log_every, c.ckpt_every, c.num_grid = 1, 2, 4
  return c
