r"""Evaluates a trained reward model on held-out ShapesWorld preference pairs.

  python -m rd_jax.eval_rm --checkpoint=/tmp/rm_shapes \
      --split=test_id,test_ood [--kind=image|video] [--max_pairs=-1]

--checkpoint is a train_rm workdir (its config.json and latest Orbax
checkpoint; or a `.../checkpoints/STEP` directory for that step). Prints and
writes CHECKPOINT/eval_<kind>.json: {split: {acc, acc_sym, acc_by_failure,
ece, position_consistency, n}} (see rd_jax/reward/evaluate.py), plus `step`.
--kind=video scores 8-frame clip pairs (frames as images); with an image
model that is a zero-shot transfer.
"""
from __future__ import annotations

import functools
import json
import os

import jax
from absl import app, flags, logging

from rd_jax import sharding, train_rm, train_util
from rd_jax.models import internvl
from rd_jax.reward import evaluate as rm_eval
from rd_jax.reward import model as rm_model

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defined only when run as a program (importers get no flag clashes)."""
  flags.DEFINE_string("checkpoint", None,
                      "train_rm workdir (or .../checkpoints/STEP)")
  flags.DEFINE_string("split", "test_id,test_ood", "comma-separated splits")
  flags.DEFINE_string("kind", None, "image | video (default: as trained)")
  flags.DEFINE_integer("max_pairs", -1, "pairs per split; -1 all")
  flags.DEFINE_string("data_dir", None,
                      "ShapesWorld dir (default: as trained)")


def load(checkpoint: str, data_dir: str | None = None, mesh=None,
         rules=sharding.DEFAULT_RULES):
  """(config, params, step, tokenizer) of a train_rm workdir; with a mesh,
  the params are placed on it by their logical names."""
  step = None
  path = os.path.abspath(checkpoint)
  if os.path.basename(os.path.dirname(path)) == "checkpoints":
    step, path = int(os.path.basename(path)), os.path.dirname(
        os.path.dirname(path))
  config = train_util.load_config(
      path, "--checkpoint must be a train_rm --workdir (or its "
      "checkpoints/STEP directory)")
  if data_dir:
    config.data_dir = data_dir
  tok = train_rm.load_tokenizer(config)
  # The params only: the optimiser moments stay on disk.
  abstract = {"params": jax.eval_shape(
      lambda: rm_model.init(config.rm, jax.random.key(0)))}
  ckpt = train_util.Checkpointer(os.path.join(path, "checkpoints"))
  state, step = ckpt.restore(abstract, step=step, partial=True)
  ckpt.close()
  params = state["params"]
  if mesh is not None:
    params, _ = sharding.put(params, mesh, rules, abstract["params"])
  return config, params, step, tok


def evaluate(checkpoint: str, splits, kind: str | None = None,
             max_pairs: int = -1, data_dir: str | None = None) -> dict:
  config, params, step, tok = load(checkpoint, data_dir)
  kind = kind or config.kind
  if kind != config.kind:
    config.kind = kind
    config.rm.frames = 8 if kind == "video" else None
    train_rm.load_tokenizer(config)  # builds that kind's data if missing
  tpi = internvl.tokens_per_image(config.rm.model)
  score_fn = jax.jit(functools.partial(rm_eval.score_pairs, config))
  out = {"step": step, "kind": kind}
  for split in splits:
    out[split] = rm_eval.evaluate(config, params, tok, score_fn, tpi,
                                  split=split, kind=kind,
                                  max_pairs=max_pairs,
                                  batch_size=config.eval_batch)
    logging.info("%s/%s: %s", kind, split, out[split])
  return out


def main(argv):
  del argv
  out = evaluate(FLAGS.checkpoint, FLAGS.split.split(","), FLAGS.kind,
                 FLAGS.max_pairs, FLAGS.data_dir)
  root = os.path.abspath(FLAGS.checkpoint)
  if os.path.basename(os.path.dirname(root)) == "checkpoints":
    root = os.path.dirname(os.path.dirname(root))
  train_util.write_json(os.path.join(root, f"eval_{out['kind']}.json"), out)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint"])
  app.run(main)
