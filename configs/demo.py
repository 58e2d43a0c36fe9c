r"""RewardDance end to end on ShapesWorld: the main job.

    python -m rd_jax.main --config=configs/demo.py --workdir=workdirs/demo
    python -m rd_jax.main --config=configs/demo.py:smoke --workdir=/tmp/rd_smoke

Stages (each resumable; a rerun skips the ones already done, and a stage
interrupted midway resumes from its own last checkpoint):
  data          build ShapesWorld (ArrayRecord) + tokenizer under `data_dir`
  selfcheck     the oracle's accuracy on the stored pairs (must `pass`)
  generator     SFT of the flow-matching generator: T2I, then T2V + I2V
                (rd_jax.train_generator, `generator.*` = its config)
  reward_model  the pairwise generative RM, evaluated in/out of domain
                (rd_jax.train_rm, `reward_model.*`): ReFL's reward
  verifier      the pointwise generative RM (rd_jax.train_rm,
                `verifier.*`): the verifier of Best-of-N and the search
  refl          Best-of-N references, then ReFL of the T2I generator
                against them (rd_jax.refl, `refl.*`)
  search        plain sampling, Best-of-N and Search over Paths with the
                ReFL generator and the verifier (rd_jax.generate,
                `search.*`)
  report        WORKDIR/report.md from every stage's figures and pictures

Each stage's sub-config is the job's own config file (configs/
generator_shapes.py, rm_shapes.py, refl_shapes.py, generate_shapes.py) with
the shorter budgets below, so the whole default run fits in about half an
hour on 2 CPU cores; the job configs' own defaults are the longer runs that
README's sections measure. The main job fills in what links the stages:
data_dir / data scale, and each stage's input workdirs (WORKDIR/generator,
WORKDIR/reward_model, WORKDIR/verifier, WORKDIR/refl).

Config keys:
  data_dir             where ShapesWorld lives ("" = WORKDIR/data)
  data_scale           default | small | tiny (rd_jax/data/tfds_shapes.py)
  selfcheck.max_image  pairs per split checked for images
  selfcheck.max_video  pairs per split checked for videos
  seed                 global seed (copied into every stage)
  fast_compile         compile with XLA:CPU's LLVM optimisations off
                       (rd_jax/cli.py); on for :smoke, whose tiny models
                       spend most of their time compiling
  generator.*, reward_model.*, verifier.*, refl.*, search.*   the stages'
                       job configs (their files document their keys), e.g.
                       --config.reward_model.train.steps=1600
`:smoke` runs every stage at tiny size (the test suite runs it).
"""
import ml_collections

from configs import (generate_shapes, generator_shapes, refl_shapes,
                     rm_shapes)
from rd_jax.config_util import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, smoke=False)
  smoke = "smoke" if arg.smoke else None
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.fast_compile = arg.smoke
  c.data_dir = ""
  c.data_scale = "tiny" if arg.smoke else "default"
  c.selfcheck = ml_collections.ConfigDict(
      {"max_image": 48 if arg.smoke else 200,
       "max_video": 8 if arg.smoke else 40})

  c.generator = generator_shapes.get_config(smoke)
  # Without the pairwise RM's pretraining stages (rm_shapes.py `pretrain`),
  # which would add about five minutes: the shorter budgets below.
  c.reward_model = rm_shapes.get_config(smoke or "pretrain=False")
  c.verifier = rm_shapes.get_config(
      ",".join(filter(None, [smoke, "paradigm=pointwise_generative"])))
  c.refl = refl_shapes.get_config(smoke)
  c.search = generate_shapes.get_config(smoke)
  if not arg.smoke:
    # About half of each job's own budget (module docstring).
    c.generator.image.steps = 2000
    c.generator.video.steps = 150
    c.reward_model.train.steps = 800
    c.reward_model.update(eval_every=200, ckpt_every=200)
    c.verifier.train.steps = 600
    c.verifier.update(eval_every=200, ckpt_every=200)
    c.refl.references.prompts = 60
    c.refl.train.steps = 100
    # The oracle curve on the same 60 prompts as before / after.
    c.refl.update(eval_every=50, eval_n=60, final_eval_n=60, eval_batch=30)
    c.search.update(eval_n=60, eval_batch=30, plain_steps=(20,),
                    best_of_n=(1, 2, 4, 8))
    c.search.search.paths = ((2, 2), (4, 2))  # 200 and 400 generator NFE
  # The report compares SFT, ReFL and ReFL + search on the same held-out
  # prompts: ReFL's final evaluation and the search draw the first n of the
  # same test_id specs (world.eval_specs, same seed).
  c.search.eval_n = c.refl.final_eval_n
  return c
