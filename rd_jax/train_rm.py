r"""Trains a RewardDance reward model on ShapesWorld preference pairs.

  python -m rd_jax.train_rm --config=configs/rm_shapes.py --workdir=/tmp/rm

Paradigms (config.paradigm, DESIGN.md §2.2):
  pairwise_generative   CE on the answer token; every pair in both orders
  pointwise_generative  Bradley-Terry on l_yes - l_no + alpha * CE
  pointwise_regressive  Bradley-Terry on a scalar head
  caption               not a reward: pretraining of the VLM, LM loss on
                        each prompt given its matching (chosen) image
plus task instructions (config.instruction), CoT rationales (config.cot,
LM loss weight config.w_cot) and, for pairwise_generative, the pointwise
generative loss of the same pairs added with weight config.pointwise_aux
(a training aid; the model still answers the pairwise question). Writes
to WORKDIR: config.json, Orbax checkpoints (resumed from the latest, data
iterator included; SIGTERM saves and exits 0), losses.jsonl (every step's
metrics), TensorBoard events, and final_metrics.json:

  acc_id, acc_ood                 preference accuracy (test_id / test_ood)
  acc_sym_id, acc_sym_ood         pairwise: symmetric-score accuracy
  acc_by_failure, acc_by_failure_ood   {failure mode: accuracy}
  ece, ece_ood                    calibration of P(yes)
  position_consistency(_ood)      pairwise: decision survives swapping
  steps, wall_s, train_s, params, first_loss (first step of this
  process), final_loss, skipped_steps (non-finite updates skipped)
  pretrain                        {paradigm: steps, wall_s, final_loss}
(paradigm caption: caption_ce_id/_ood, caption_acc_id/_ood instead of the
preference metrics). config.init_from = another train_rm workdir starts
from its params (same rm.model; e.g. a caption-pretrained VLM).

Pretraining (config.pretrain; on by default for the pairwise ShapesWorld
RM): first `caption_steps` of paradigm caption, then `pointwise_steps` of
the pointwise question, each from the one before, in
WORKDIR/pretrain/<paradigm> (train_rm workdirs of their own, resumed or
skipped when done); the run's own paradigm then starts from the last.
From random weights the pairwise question gives a gradient only to what
tells image 1 from image 2 and sits on a chance plateau; the dense caption
loss and the pointwise question first are what lift it
(docs/reward_models.md).
"""
from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rd_jax import cli, config_util, sharding, train_util
from rd_jax.models import internvl
from rd_jax.reward import evaluate as rm_eval
from rd_jax.reward import losses, model, sequences


# ---------------------------------------------------------------- setup


def load_tokenizer(config: ml_collections.ConfigDict):
  """The ShapesWorld tokenizer (building the data if missing); fills
  config.rm.yes_id / no_id and checks the vocabulary fits the model."""
  from rd_jax.data import pipeline, tokenizer  # pylint: disable=g-import-not-at-top
  # Reuses what exists; builds what is missing (~1.5 min at default scale).
  pipeline.build(config.data_dir, config.scale, kinds=(config.kind,),
                 log=logging.info)
  tok = tokenizer.load(pipeline.tokenizer_dir(config.data_dir))
  config.rm.yes_id, config.rm.no_id = tokenizer.answer_token_ids(tok)
  if len(tok) > config.rm.model.text.vocab_size:
    raise ValueError(
        f"tokenizer has {len(tok)} tokens but rm.model.text.vocab_size="
        f"{config.rm.model.text.vocab_size}; raise it with "
        f"--config.rm.model.text.vocab_size={len(tok)}")
  return tok


def make_optimizer(tc) -> optax.GradientTransformation:
  lr = optax.warmup_cosine_decay_schedule(
      0.0, tc.lr, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
      end_value=tc.lr * 0.05)
  return train_util.make_optimizer(lr, grad_clip=tc.grad_clip, b2=tc.b2,
                                   weight_decay=tc.weight_decay,
                                   kind=tc.optimizer)


def _listed(diff) -> str:
  """config_util.differences as 'key: theirs vs ours; ...'."""
  return "; ".join(f"{k}: {a} vs {b}" for k, a, b in diff)


def from_pretrained(config, source: str, state: dict, opt, mesh, rules
                    ) -> dict:
  """{params of `source` (a train_rm workdir, or its checkpoints/STEP), a
  fresh optimiser state, step 0}, laid out as `state` (arrays or
  jax.ShapeDtypeStructs): the step's inputs keep one type, so it compiles
  once."""
  from rd_jax import eval_rm  # pylint: disable=g-import-not-at-top
  src, params, step, _ = eval_rm.load(source, config.data_dir, mesh=mesh,
                                      rules=rules)
  diff = config_util.differences(src.rm.model, config.rm.model)
  if diff:
    raise ValueError(
        f"init_from={source} holds another model than this run's "
        f"rm.model (theirs vs ours: {_listed(diff)}); pretrain with the "
        "same rm.model, or leave init_from empty to start from random params")
  logging.info("initialised from %s step %d (%s)", source, step,
               src.paradigm)
  with jax.set_mesh(mesh):
    return jax.jit(functools.partial(fresh_state, opt=opt),
                   out_shardings=jax.tree.map(lambda x: x.sharding, state),
                   donate_argnums=0)(params)


# (config.pretrain key, paradigm), in the order they run.
PRETRAIN = (("caption_steps", rm_eval.CAPTION),
            ("pointwise_steps", "pointwise_generative"))


def pretrain_config(config, paradigm: str, steps: int, init_from: str):
  """One pretraining stage of `config`: the same model, data and optimiser
  for `steps` steps of `paradigm` from `init_from`, with every training
  pair kept (thinning helps only a stage that has learnt the failures it
  thins; docs/reward_models.md, "Thinning the failures learnt early"), no
  evaluations, and config.pretrain.caption_train's overrides in the
  caption stage."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.paradigm, c.init_from = paradigm, init_from
  c.pretrain = {k: 0 for k, _ in PRETRAIN}
  c.failure_keep = {f: 1.0 for f in c.failure_keep}
  c.train.steps = steps
  c.update(eval_every=steps + 1, final_eval_pairs=0)
  if paradigm == rm_eval.CAPTION:
    c.train.update(config.pretrain.caption_train)
  return c


def pretrain(config, workdir: str) -> tuple[str, dict]:
  """Runs config.pretrain's stages, each from the one before (the first
  from config.init_from), in WORKDIR/pretrain/<paradigm>: train_rm
  workdirs of their own. A finished stage (its final_metrics.json) is
  skipped on a rerun, if its config is this run's (else an error names
  what differs); a stopped one resumes. -> (the workdir the main run
  starts from, {paradigm: the stage's final metrics}; `preempted`: the
  stage that was stopped)."""
  source, out = config.init_from, {}
  for key, paradigm in PRETRAIN:
    steps = config.get("pretrain", {}).get(key, 0)
    if not steps:
      continue
    stage = os.path.join(workdir, "pretrain", paradigm)
    done = os.path.join(stage, "final_metrics.json")
    want = pretrain_config(config, paradigm, steps, source)
    if os.path.exists(done):
      diff = config_util.differences(train_util.load_config(stage, ""),
                                     want, skip=("data_dir",))
      if diff:
        raise ValueError(
            f"{stage} holds a finished {paradigm} stage run with other "
            f"settings (theirs vs ours: {_listed(diff)}); delete that "
            "directory to train the stage again, or use another --workdir")
      logging.info("pretraining %s: done before, skipped", paradigm)
      with open(done) as f:
        out[paradigm] = json.load(f)
    else:
      logging.info("pretraining %s: %d steps in %s", paradigm, steps, stage)
      out[paradigm] = train_and_evaluate(want, stage)
      if out[paradigm].get("preempted"):
        return source, {**out, "preempted": paradigm}
    source = stage
  return source, out


def fresh_state(params, opt: optax.GradientTransformation) -> dict:
  """{params, opt, step}: a run's state at step 0 from `params`."""
  return {"params": params, "opt": opt.init(params),
          "step": jnp.zeros((), jnp.int32)}


def init_state(config, rng: jax.Array) -> tuple[dict, optax.GradientTransformation]:
  """{params, opt, step} from random params, and the optimiser."""
  opt = make_optimizer(config.train)
  return fresh_state(model.init(config.rm, rng), opt), opt


# ---------------------------------------------------------------- augmentation


def augment(aug, rng: jax.Array, *images: jax.Array) -> tuple:
  """uint8 [B, (T,) H, W, 3] arrays (a pair's chosen and rejected, or the
  chosen alone) -> float [0, 1], the same draw for row i of each.

  Tint / brightness act on low-saturation (background-like) pixels only, so
  object colours stay put; zoom-in (prob zoom_prob, factor U[1, zoom])
  about the centre makes objects larger. Both aim at the OOD shift (tinted
  background, larger objects).
  """
  x = jnp.stack(images, 1).astype(jnp.float32) / 255.0
  b, h, w = x.shape[0], x.shape[-3], x.shape[-2]
  k_tint, k_bright, k_zp, k_z = jax.random.split(rng, 4)
  lead = (b,) + (1,) * (x.ndim - 1)
  gain = 1 + jax.random.uniform(k_tint, (b, 3), minval=-aug.tint,
                                maxval=aug.tint)
  bright = jax.random.uniform(k_bright, (b,), minval=-aug.brightness,
                              maxval=aug.brightness)
  sat = x.max(-1, keepdims=True) - x.min(-1, keepdims=True)
  grey = jnp.clip(1 - 4 * sat, 0, 1)
  x = x * (1 + (gain.reshape(lead[:-1] + (3,)) - 1) * grey) + (
      bright.reshape(lead) * grey)
  zoom = jnp.where(jax.random.bernoulli(k_zp, aug.zoom_prob, (b,)),
                   jax.random.uniform(k_z, (b,), minval=1.0,
                                      maxval=aug.zoom), 1.0)

  def zoom_pair(imgs, z):
    flat = imgs.reshape(-1, h, w, 3)
    scale = jnp.stack([z, z])
    shift = jnp.stack([(1 - z) * h / 2, (1 - z) * w / 2])
    out = jax.vmap(lambda im: jax.image.scale_and_translate(
        im, (h, w, 3), (0, 1), scale, shift, "linear"))(flat)
    return out.reshape(imgs.shape)

  x = jnp.clip(jax.vmap(zoom_pair)(x, zoom), 0.0, 1.0)
  return tuple(x[:, i] for i in range(len(images)))


# ---------------------------------------------------------------- train step


AUX = "pointwise/"  # batch key prefix of the pointwise_aux sequences


def pointwise_twin(config):
  """The pointwise config whose sequences pointwise_aux adds to a pairwise
  batch (the same config, paradigm pointwise_generative), or None when
  the run has no pointwise_aux."""
  if config.paradigm != "pairwise_generative" or not config.get(
      "pointwise_aux"):
    return None
  twin = config.copy_and_resolve_references()
  twin.paradigm = "pointwise_generative"
  return twin


def _pointwise(config, params, seq: dict, f_ch, f_rej):
  """(loss, aux, correct) of the pointwise generative loss on B pairs'
  image features; seq: 2B rows, the chosen then the rejected."""
  rm, b = config.rm, f_ch.shape[0]
  pos = sequences.answer_positions(seq["read_pos"], config.answer_len)
  logits, _ = model.logits_and_hidden(
      rm, params, seq, jnp.concatenate([f_ch, f_rej], 0), pos)
  half = lambda x: (x[:b], x[b:])  # noqa: E731
  answers = (seq["answer_ids"], seq["answer_mask"], seq["decision_index"])
  aw, al = zip(*(half(a) for a in answers))
  loss, aux = losses.pointwise_generative_loss(
      *half(logits), aw, al, rm.yes_id, rm.no_id, config.alpha,
      config.w_cot)
  s = model.margin(losses.decision_logits(logits, seq["decision_index"]),
                   rm.yes_id, rm.no_id)
  return loss, aux, s[:b] > s[b:]


def loss_fn(config, params, seq: dict, chosen, rejected, caption=None):
  """(loss, aux) for one batch of B pairs; seq from
  evaluate.training_sequences (2B rows); paradigm caption: `caption` rows
  (evaluate.caption_rows, B rows) of the chosen images instead."""
  rm = config.rm
  if config.paradigm == rm_eval.CAPTION:
    s = rm_eval.caption_scores(rm, params, caption, chosen)
    tokens = jnp.maximum(jnp.sum(s["tokens"]), 1)
    return jnp.sum(s["ce"]) / tokens, {"acc": jnp.sum(s["hits"]) / tokens}
  ch = model.per_sequence(rm, chosen)
  rej = model.per_sequence(rm, rejected)
  b, t = ch.shape[:2]
  feats = model.embed_images(rm, params, jnp.concatenate([ch, rej], 1))
  f_ch, f_rej = feats[:, :t], feats[:, t:]
  if config.paradigm == "pairwise_generative":
    pos = sequences.answer_positions(seq["read_pos"], config.answer_len)
    answers = (seq["answer_ids"], seq["answer_mask"], seq["decision_index"])
    embeds = jnp.concatenate([jnp.concatenate([f_rej, f_ch], 1),
                              jnp.concatenate([f_ch, f_rej], 1)], 0)
    logits, _ = model.logits_and_hidden(rm, params, seq, embeds, pos)
    loss, aux = losses.pairwise_generative_loss(logits, *answers,
                                                w_cot=config.w_cot)
    p = model.readout(losses.decision_logits(logits, seq["decision_index"]),
                      rm.yes_id, rm.no_id)
    correct = jnp.concatenate([p[:b] > 0.5, p[b:] < 0.5])
    if config.get("pointwise_aux", 0.0):
      pw = {k[len(AUX):]: v for k, v in seq.items() if k.startswith(AUX)}
      if not pw:
        raise ValueError("pointwise_aux > 0 needs the pairs' pointwise "
                         f"sequences in the batch ({AUX}* keys, as "
                         "train_rm.device_batch builds them)")
      k = config.get("pointwise_aux_every", 1)  # device_batch's pairs[::k]
      pw_loss, pw_aux, _ = _pointwise(config, params, pw, f_ch[::k],
                                      f_rej[::k])
      loss = loss + config.pointwise_aux * pw_loss
      aux = dict(aux, pointwise_loss=pw_loss, pointwise_bt=pw_aux["bt"])
  elif config.paradigm == "pointwise_generative":
    loss, aux, correct = _pointwise(config, params, seq, f_ch, f_rej)
  elif config.paradigm == "pointwise_regressive":
    _, hidden = model.logits_and_hidden(
        rm, params, seq, jnp.concatenate([f_ch, f_rej], 0),
        seq["read_pos"][:, None])
    r = model.regressive_score(params, hidden[:, 0])
    loss, aux = losses.regressive_loss(r[:b], r[b:])
    correct = r[:b] > r[b:]
  else:
    raise ValueError(f"unknown paradigm {config.paradigm!r}; one of "
                     f"{rm_eval.PARADIGMS + (rm_eval.CAPTION,)}")
  return loss, dict(aux, acc=jnp.mean(correct.astype(jnp.float32)))


PER_PAIR = ("chosen", "rejected", "caption")  # batch keys: a row per pair


def pair_major(seq: dict) -> dict:
  """training_sequences' 2B rows (rows i and B + i: pair i's two sequences)
  -> [B, 2, ...]: a batch row holds all of one pair, so the pairs each
  process loads assemble into the global batch (sharding.global_batch) as
  they would on one process. train_step takes this layout. `chosen`,
  `rejected` and `caption` (already one row per pair) pass through."""
  return {k: v if k in PER_PAIR else
          np.stack(np.split(np.asarray(v), 2), 1) for k, v in seq.items()}


def row_major(x: jax.Array) -> jax.Array:
  """pair_major's inverse, inside the step: [B, 2, ...] -> [2B, ...]."""
  return jnp.swapaxes(x, 0, 1).reshape((2 * x.shape[0],) + x.shape[2:])


def train_step(config, opt, state: dict, batch: dict, rng: jax.Array):
  """One update; state = {params, opt, step} (donated); batch: `chosen`,
  `rejected` [B, ...] (no `rejected` for paradigm caption) and the token
  arrays in pair_major layout."""
  if "rejected" in batch:
    chosen, rejected = augment(config.augment, rng, batch["chosen"],
                               batch["rejected"])
  else:  # caption: the chosen images only
    (chosen,), rejected = augment(config.augment, rng, batch["chosen"]), None
  k = config.train.get("microbatches", 1)
  every = config.get("pointwise_aux_every", 1)
  if k > 1 and pointwise_twin(config) is not None and (
      chosen.shape[0] // k) % every:
    raise ValueError(
        f"train.microbatches={k} gives slices of {chosen.shape[0] // k} "
        f"pairs, not a multiple of pointwise_aux_every={every}: a slice's "
        "pointwise rows would not be its own pairs'")

  def loss_of(params, b):
    seq = {key: row_major(v) for key, v in b["seq"].items()}
    return loss_fn(config, params, seq, b["chosen"], b["rejected"],
                   b["caption"])

  (loss, aux), grads = train_util.value_and_grad(
      loss_of, state["params"],
      dict(seq={key: v for key, v in batch.items() if key not in PER_PAIR},
           chosen=chosen, rejected=rejected, caption=batch.get("caption")),
      k)
  new, skipped = train_util.apply_gradients(state, grads, opt, loss=loss)
  return new, dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   skipped=skipped)


def device_batch(config, tok, tpi: int, batch) -> dict:
  """A train batch's device arrays (caption: the chosen images only)."""
  if config.paradigm == rm_eval.CAPTION:
    return {"caption": rm_eval.caption_rows(config, tok, tpi, batch),
            "chosen": batch["chosen"]}
  seq = pair_major(rm_eval.training_sequences(config, tok, tpi, batch))
  twin = pointwise_twin(config)
  if twin is not None:  # every k-th pair's pointwise rows
    k, n = config.get("pointwise_aux_every", 1), len(batch["chosen"])
    if k < 1 or n % k:
      raise ValueError(
          f"pointwise_aux_every={k} does not divide this process's {n} "
          "pairs a batch; make it a divisor of train.batch_size / "
          "processes")
    part = {key: v[::k] for key, v in batch.items()}
    seq.update({AUX + key: v for key, v in pair_major(
        rm_eval.training_sequences(twin, tok, tpi, part)).items()})
  seq["chosen"], seq["rejected"] = batch["chosen"], batch["rejected"]
  return seq


# ---------------------------------------------------------------- main loop


def evaluate_splits(config, params, tok, score_fn, tpi, splits, max_pairs):
  out = {}
  for split in splits:
    out[split] = rm_eval.evaluate(config, params, tok, score_fn, tpi,
                                  split=split, max_pairs=max_pairs,
                                  batch_size=config.eval_batch)
  return out


def final_metrics(evals: dict) -> dict:
  """Flattens {split: metrics} into final_metrics.json keys."""
  out = {}
  for split, suffix in (("test_id", "_id"), ("test_ood", "_ood")):
    if split not in evals:
      continue
    m = evals[split]
    tail = "" if split == "test_id" else "_ood"
    if "caption_ce" in m:
      out.update({f"caption_ce{suffix}": m["caption_ce"],
                  f"caption_acc{suffix}": m["caption_acc"],
                  f"n{suffix}": m["n"]})
      continue
    out[f"acc{suffix}"] = m["acc"]
    if "acc_sym" in m:
      out[f"acc_sym{suffix}"] = m["acc_sym"]
    out[f"acc_by_failure{tail}"] = m["acc_by_failure"]
    out[f"ece{tail}"] = m["ece"]
    out[f"position_consistency{tail}"] = m["position_consistency"]
    out[f"n{suffix}"] = m["n"]
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str
                       ) -> dict:
  t0 = time.time()
  from rd_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  train_util.prepare_workdir(workdir)
  tok = load_tokenizer(config)
  train_util.save_config(workdir, config)
  source, pre = pretrain(config, workdir)
  if "preempted" in pre:
    return {"preempted": True, "steps": 0}
  writer = train_util.metric_writer(workdir)
  tpi = internvl.tokens_per_image(config.rm.model)
  tc = config.train

  rng = jax.random.key(config.seed)
  k_init, k_train = jax.random.split(rng)
  opt = make_optimizer(tc)
  ckpt = train_util.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.ckpt_every)
  resume = ckpt.latest_step() is not None
  # random params only where neither a checkpoint nor init_from replaces them
  state, state_sh, mesh, rules = train_util.sharded_init(
      config, lambda: init_state(config, k_init)[0],
      abstract=resume or bool(source))
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(
      state["params"])))
  logging.info("reward model %s (%s): %d params, %d tokens per image",
               config.size, config.paradigm, n_params, tpi)

  data = iter(pipeline.loader(config.data_dir, config.kind, "train",
                              batch_size=sharding.process_batch_size(
                                  tc.batch_size), seed=config.seed,
                              scale=config.scale,
                              on_corrupt=config.on_corrupt,
                              keep=config.failure_keep.to_dict(),
                              # the stages of one command read the same
                              # records: decoded once
                              cache=True))
  if source and not resume:
    state = from_pretrained(config, source, state, opt, mesh, rules)
  step_fn = train_util.jit_step(functools.partial(train_step, config, opt),
                                mesh, state_sh)
  score_fn = jax.jit(functools.partial(rm_eval.score_pairs, config))

  def periodic_eval(step: int, state: dict) -> None:
    if step % config.eval_every or step >= tc.steps:
      return
    m = rm_eval.evaluate(config, state["params"], tok, score_fn, tpi,
                         split="test_id", max_pairs=config.eval_pairs,
                         batch_size=config.eval_batch)
    n = m["n"]
    m = {k: m[k] for k in ("acc", "ece", "caption_ce", "caption_acc")
         if k in m}
    writer.write_scalars(step, {f"eval/{k}_id": v for k, v in m.items()})
    logging.info("step %d eval (test_id, %d pairs): %s", step, n,
                 "  ".join(f"{k}={v:.3f}" for k, v in m.items()))

  def make_batch(raw: dict) -> dict:
    return sharding.global_batch(device_batch(config, tok, tpi, raw), mesh,
                                 rules)

  t_train = time.time()
  with jax.set_mesh(mesh):
    state, info = train_util.train_loop(
        state, step_fn, data, steps=tc.steps, rng=k_train, ckpt=ckpt,
        writer=writer, workdir=workdir, make_batch=make_batch,
        on_step=periodic_eval, max_nonfinite=tc.max_nonfinite,
        log_every=config.log_every)
  train_s = time.time() - t_train
  ckpt.close()
  if info["preempted"]:
    return {"preempted": True, "steps": int(state["step"])}

  evals = evaluate_splits(config, state["params"], tok, score_fn, tpi,
                          ("test_id", "test_ood"), config.final_eval_pairs
                          ) if config.final_eval_pairs else {}
  out = final_metrics(evals)
  out.update(steps=int(state["step"]), params=n_params, train_s=train_s,
             first_loss=info["first_loss"], final_loss=info["last_loss"],
             skipped_steps=info["skipped"],
             paradigm=config.paradigm, size=config.size,
             wall_s=time.time() - t0)
  if pre:
    out["pretrain"] = {k: {m: v[m] for m in ("steps", "wall_s", "final_loss")}
                       for k, v in pre.items()}
  writer.write_scalars(tc.steps, {f"final/{k}": v for k, v in out.items()
                                  if isinstance(v, float)})
  writer.flush()
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), out)
  logging.info("final metrics: %s", out)
  return out


def main(argv):
  del argv
  train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
