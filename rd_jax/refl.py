r"""ReFL with the RewardDance reward (DESIGN.md §2.4): loss and trainer.

  python -m rd_jax.refl --config=configs/refl_shapes.py \
      --config.generator=GEN_WORKDIR --config.reward.checkpoint=RM_WORKDIR \
      --workdir=DIR

    loss, aux = refl_loss(gen_params, {"rm": rm_params}, batch, rng, cfg)

Sample K steps from noise; pick a step index k uniformly in the late window
`cfg.refl.window` = (lo, hi); steps before k run under `stop_gradient`; the
x̂0 of step k (with gradient) is decoded to pixels (by the frozen VAE for a
latent generator) and scored by the frozen reward model; loss = mean
relu(λ − r) · scale, plus β · the flow-matching loss on the batch's data
when β > 0. Gradients reach the generator only. The same function is the
ShapesWorld trainer's step and the one `python -m rd_jax.aot --job=refl`
compiles for FLUX.1-dev + an 8B RM.

cfg (ConfigDict):
  gen      generator stage config (train_generator: model, sample_shift,
           solver, cfg_scale, t_sampling, train_shift; optional guidance,
           Flux-dev's distilled-guidance value)
  rm       reward-model config (train_rm's `rm`) and `paradigm`:
           pairwise_generative (reward against batch['reference']),
           pointwise_generative or pointwise_regressive
  refl     steps K, window (lo, hi) inclusive, lam λ, scale, beta β
batch: prompt_ids, prompt_mask [B, L] (or cond, a precomputed TextCond, for
external text encoders); question (reward-model token arrays for the
paradigm); reference [B, H, W, 3] in [0, 1] (pairwise); chosen uint8
[B, 64, 64, 3] (β > 0).
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

from rd_jax import (cli, config_util, eval_rm, generate, sharding,
                    train_generator, train_util)
from rd_jax.generation import flow, search
from rd_jax.models import generator
from rd_jax.reward import evaluate as rm_eval
from rd_jax.reward import model as rm_model


def reward(cfg, rm_params, images: jax.Array, batch: dict) -> jax.Array:
  """The configured RewardDance reward of pixels [B, H, W, 3] in [0, 1]."""
  paradigm = cfg.rm.paradigm
  q = batch["question"]
  if paradigm == "pairwise_generative":
    return rm_model.pairwise_reward(cfg.rm, rm_params, batch["reference"],
                                    images, q)
  if paradigm == "pointwise_generative":
    return rm_model.pointwise_reward(cfg.rm, rm_params, images, q)
  if paradigm == "pointwise_regressive":
    return rm_model.regressive_reward(cfg.rm, rm_params, images, q)
  raise ValueError(f"a {paradigm!r} model gives no reward (a 'caption' "
                   "workdir is a pretrained VLM: train a reward model from it "
                   "with --config.init_from)")


def refl_loss(gen_params, frozen: dict, batch: dict, rng: jax.Array, cfg):
  """(loss, aux) of one ReFL step; differentiate w.r.t. gen_params.

  frozen: {'rm': reward-model params, 'vae': VAE params (latent generators
  only)}. aux: reward [B], step k, x0 (the scored x̂0, model space), fm_loss.
  """
  st, rc = cfg.gen, cfg.refl
  lo, hi = rc.window
  if not 0 <= lo <= hi < rc.steps:
    raise ValueError(f"refl.window {tuple(rc.window)} must satisfy "
                     f"0 <= lo <= hi < refl.steps={rc.steps}")
  if rc.beta > 0 and generator.latent(st.model):
    raise ValueError("refl.beta > 0 needs pixel-space data; a latent "
                     "generator's ReFL runs with refl.beta=0")
  frozen = jax.lax.stop_gradient(frozen)  # the reward model (and VAE)
  k_noise, k_step, k_fm = jax.random.split(rng, 3)
  # Prompt ids through the generator's own text encoder, or precomputed
  # external text states (batch['cond'], a TextCond).
  cond = batch["cond"] if "cond" in batch else generator.encode_text(
      st.model, gen_params, batch["prompt_ids"], batch["prompt_mask"])
  b = cond.txt.shape[0]
  noise = jax.random.normal(k_noise, generator.sample_shape(st, b))
  k = jax.random.randint(k_step, (), lo, hi + 1)
  vel = generator.velocity_fn(st.model, guidance=st.get("guidance"))
  # Steps 0..k-1 with frozen params: no tangents, so no backward pass
  # through them at all (cheaper than a stop_gradient inside the scan).
  gen_f = jax.lax.stop_gradient(gen_params)
  cond_f = jax.lax.stop_gradient(cond)
  sched = flow.Schedule(rc.steps, st.sample_shift, st.solver)
  x_k, _ = flow.sample(gen_f, noise, cond_f, sched, velocity_fn=vel,
                       uncond=generator.unconditional(cond_f),
                       cfg_scale=st.cfg_scale, stop_at=k)
  # Step k's x̂0 with gradient.
  t_k = jnp.full((b,), flow.timesteps(sched)[k], x_k.dtype)
  v = flow.guided_velocity(vel, gen_params, x_k, t_k, cond,
                           generator.unconditional(cond), st.cfg_scale)
  x0 = flow.x0_from_v(x_k, t_k, v)
  images = generator.decode_unit(st.model, frozen.get("vae"), x0)
  rew = reward(cfg, frozen["rm"], images, batch)
  loss = jnp.mean(jax.nn.relu(rc.lam - rew)) * rc.scale
  fm = jnp.zeros(())
  if rc.beta > 0:
    data = generator.to_model_space(generator.resize(batch["chosen"],
                                                     st.resolution))
    fm, _ = flow.flow_matching_loss(
        generator.velocity_fn(st.model), gen_params, data, cond, k_fm,
        t_sampling=st.t_sampling, shift=st.train_shift)
    loss = loss + rc.beta * fm
  return loss, {"reward": rew, "k": k, "x0": x0, "fm_loss": fm}


# ---------------------------------------------------------------- trainer


def make_optimizer(tc: ml_collections.ConfigDict,
                   logical: dict) -> optax.GradientTransformation:
  """logical: the generator params' logical names (Muon's matrices)."""
  return train_util.make_optimizer(
      optax.warmup_constant_schedule(0.0, tc.lr, tc.warmup_steps),
      grad_clip=tc.grad_clip, b2=0.99, kind=tc.optimizer, logical=logical)


def train_step(cfg, opt, state: dict, batch: dict, rng: jax.Array,
               frozen: dict) -> tuple[dict, dict]:
  """One ReFL update of {params, opt, step[, ema]}; cfg as refl_loss's plus
  `train.ema_decay`. The frozen models (refl_loss's `frozen`) come in as an
  argument."""
  (loss, aux), grads = jax.value_and_grad(refl_loss, has_aux=True)(
      state["params"], frozen, batch, rng, cfg)
  new, skipped = train_util.apply_gradients(state, grads, opt,
                                            cfg.train.ema_decay, loss=loss)
  return new, {"loss": loss, "reward_mean": jnp.mean(aux["reward"]),
               "reward_std": jnp.std(aux["reward"]),
               "fm_loss": aux["fm_loss"], "k": aux["k"],
               "grad_norm": optax.tree.norm(grads), "skipped": skipped}


def references(config, st, gen_params, rm_config, rm_params, ids, mask, q,
               log=logging.info) -> np.ndarray:
  """Best-of-N references [P, top_k, R, R, 3] in [0, 1]: N SFT samples per
  prompt (one vmapped call), ranked by round-robin symmetric pairwise wins
  under the reward model, the top (or bottom) k kept.

  At most `references.batch` prompts per call: memory grows with
  batch · N(N−1) reward-model passes. The noise of all prompts is drawn
  before the calls, so the references do not depend on the batch.
  """
  rc = config.references
  if rc.batch < 1:
    raise ValueError(f"references.batch must be >= 1, got {rc.batch}")

  def one_batch(ids, mask, q, noise):
    samples = jax.vmap(lambda z: train_generator.sample(
        st, gen_params, ids, mask, z))(noise)
    wins = search.round_robin_wins(
        lambda a, b: rm_model.pairwise_reward(
            rm_config.rm, rm_params, generator.to_unit(a),
            generator.to_unit(b), q, symmetric=True), samples)
    keep = search.select(wins, rc.top_k, bottom=rc.bottom)
    return generator.to_unit(search.gather(samples, keep))

  fn = jax.jit(one_batch)
  # At most references.batch prompts per call, in equal calls where the
  # count allows (one compile instead of two for a short last call).
  calls = -(-len(ids) // rc.batch)
  bs = -(-len(ids) // calls)
  out, t0 = [], time.time()
  # Every prompt's N noises drawn at once, as generate.py and
  # train_generator.evaluate do, then sliced per call.
  noise = jax.random.normal(jax.random.key(config.seed + 17), (rc.n,) +
                            generator.sample_shape(st, len(ids)))
  for i in range(0, len(ids), bs):
    sl = slice(i, i + bs)
    out.append(np.asarray(fn(ids[sl], mask[sl],
                             jax.tree.map(lambda a, sl=sl: a[sl], q),
                             noise[:, sl])))
    log(f"references: {i + len(ids[sl])}/{len(ids)} prompts "
        f"({time.time() - t0:.0f}s)")
  return np.moveaxis(np.concatenate(out, 1), 0, 1)


def diversity(st, params, ids, mask, noise) -> jax.Array:
  """Mean pixel std across samples of the same prompt, one per noise
  [seeds, B, ...] (jit this)."""
  x = jax.vmap(lambda z: train_generator.sample(st, params, ids, mask,
                                               z))(noise)
  return jnp.mean(jnp.std(generator.to_unit(x), axis=0))


def window_std(values, window: int) -> list[float]:
  """Std of the last `window` values at every step (the hacking signal)."""
  v = np.asarray(values, np.float64)
  return [float(v[max(0, i + 1 - window):i + 1].std()) for i in range(len(v))]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  from rd_jax.data import oracle, world  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top
  config_util.require_workdirs(config, {"generator": "train_generator",
                                       "reward.checkpoint": "train_rm"})
  train_util.prepare_workdir(workdir)
  train_util.save_config(workdir, config)
  writer = train_util.metric_writer(workdir)
  t0 = time.time()
  gcfg, st, sft = generate.load_generator(config.generator, config.stage)
  if st.frames:
    raise ValueError("refl supports the image stage (T2I) only so far")
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  rm_config, rm_params, _, tok = eval_rm.load(
      config.reward.checkpoint, gcfg.data_dir, mesh, rules)
  cfg = ml_collections.ConfigDict(dict(gen=st, rm=rm_config.rm,
                                       refl=config.refl, train=config.train))
  cfg.rm.paradigm = rm_config.paradigm
  pairwise = rm_config.paradigm == "pairwise_generative"

  # The training prompts: a fixed pool of train-split specs, with their
  # questions, a clean render each (flow-matching term) and references.
  specs = world.eval_specs("image", "train", n=config.references.prompts,
                           seed=config.seed)
  from rd_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  ids, mask = tokenizer.encode(tok, [world.prompt(s) for s in specs],
                               st.model.text.max_len)
  q = rm_eval.encode_specs(rm_config, tok, specs)
  np_rng = np.random.default_rng([config.seed, 5])
  chosen = np.stack([world.render(s, np_rng) for s in specs])
  ref_path = os.path.join(workdir, "references.npz")
  t_ref = time.time()
  if not pairwise:
    refs = np.zeros((len(specs), 1, 1, 1, 3), np.float32)  # unused
  elif os.path.exists(ref_path):
    refs = np.load(ref_path)["references"]
  else:
    refs = references(config, st, sft, rm_config, rm_params, ids, mask, q)
    np.savez(ref_path + ".tmp.npz", references=refs)
    os.replace(ref_path + ".tmp.npz", ref_path)
  references_s = time.time() - t_ref
  k_refs = refs.shape[1]

  # Resumable data: record j = (prompt j // k, reference j % k), shuffled.
  data = iter(grain.MapDataset.range(len(specs) * k_refs)
              .shuffle(seed=config.seed).repeat()
              .batch(config.train.batch_size, drop_remainder=True)
              .map(lambda j: {"id": j}).to_iter_dataset())

  def make_batch(raw):
    # Every process draws the same global batch and passes on its rows.
    j = np.array_split(np.asarray(raw["id"]),
                       jax.process_count())[jax.process_index()]
    p, slot = j // k_refs, j % k_refs
    return sharding.global_batch(
        {"prompt_ids": ids[p], "prompt_mask": mask[p],
         "question": {k: v[p] for k, v in q.items()},
         "reference": refs[p, slot], "chosen": chosen[p]}, mesh, rules)

  # The state (from the SFT params) and the frozen reward model, placed on
  # config.mesh by their logical names; the RM is an argument of the step.
  tc = config.train
  opt = make_optimizer(tc, generator.logical_specs(st.model))
  state, state_sh = sharding.put(
      {"params": sft, "opt": opt.init(sft),
       "ema": jax.tree.map(jnp.copy, sft), "step": np.zeros((), np.int32)},
      mesh, rules,
      {"params": generator.logical_specs(st.model)})
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  step_fn = train_util.jit_step(functools.partial(train_step, cfg, opt),
                                mesh, state_sh, frozen={"rm": rm_params})

  eval_cfg = ml_collections.ConfigDict(dict(seed=config.seed))
  evals_path = os.path.join(workdir, "evals.jsonl")
  k_eval = jax.random.key(config.seed + 3)
  n_div = config.diversity_prompts
  div_noise = jax.random.normal(k_eval, (config.diversity_seeds,) +
                                generator.sample_shape(st, n_div))
  div_fn = jax.jit(lambda p: diversity(st, p, jnp.asarray(ids[:n_div]),
                                       jnp.asarray(mask[:n_div]), div_noise))

  def oracle_eval(params, n):
    est = ml_collections.ConfigDict(st.to_dict())
    est.eval_n, est.eval_batch = n, config.eval_batch
    samples, especs = train_generator.evaluate(eval_cfg, est, params, tok,
                                               k_eval, "t2i")
    cats = oracle.by_category(oracle.score_batch(samples, especs), especs)
    return {str(k): float(v) for k, v in cats.items()}, samples

  last_eval = {}  # {n prompts: the final step's (cats, samples)}

  def on_step(step, state):
    if step % config.eval_every and step != tc.steps:
      return
    cats, samples = oracle_eval(state["ema"], config.eval_n)
    if step == tc.steps:
      last_eval[config.eval_n] = cats, samples
    row = {"step": step, "oracle": cats["overall"]}
    writer.write_scalars(step, {"oracle_during": cats["overall"]})
    with open(evals_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    train_generator.save_grid(os.path.join(workdir, f"samples_{step:05d}"),
                              samples, config.num_grid)
    logging.info("refl step %d: oracle %.3f (%d held-out prompts)", step,
                 cats["overall"], config.eval_n)

  before, before_samples = oracle_eval(sft, config.final_eval_n)
  # The oracle curve starts from SFT on its own eval_n prompts and noise.
  start = (before if config.eval_n == config.final_eval_n else
           oracle_eval(sft, config.eval_n)[0])
  div_before = float(div_fn(sft))
  train_generator.save_grid(os.path.join(workdir, "samples_before"),
                            before_samples, config.num_grid)
  ckpt = train_util.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.ckpt_every)
  with jax.set_mesh(mesh):
    state, info = train_util.train_loop(
        state, step_fn, data, steps=tc.steps,
        rng=jax.random.key(config.seed + 1), ckpt=ckpt, writer=writer,
        workdir=workdir, make_batch=make_batch, on_step=on_step,
        max_nonfinite=tc.max_nonfinite, log_every=config.log_every,
        name="refl")
  ckpt.close()
  if info["preempted"]:
    return {"preempted": True}
  # The last step's evaluation is this one when it drew as many prompts
  # (same params, same noise); else (or after a resume past it) sample.
  after, after_samples = (last_eval.get(config.final_eval_n) or
                          oracle_eval(state["ema"], config.final_eval_n))
  train_generator.save_grid(os.path.join(workdir, "samples_after"),
                            after_samples, config.num_grid)
  rows = train_util.read_jsonl(os.path.join(workdir, "losses.jsonl"))
  rewards = [r["reward_mean"] for r in rows]
  # By step (a resumed run may have evaluated a step twice).
  evals = sorted({e["step"]: e for e in
                  train_util.read_jsonl(evals_path)}.values(),
                 key=lambda e: e["step"])
  metrics = {
      "oracle_before": before["overall"], "oracle_after": after["overall"],
      "oracle_by_category_before": before,
      "oracle_by_category_after": after,
      "oracle_curve": [[0, start["overall"]]] + [[e["step"], e["oracle"]]
                                                 for e in evals],
      "reward_mean_curve": rewards,
      "reward_std_window_curve": window_std(rewards, config.std_window),
      "diversity_before": div_before,
      "diversity_after": float(div_fn(state["ema"])),
      "paradigm": rm_config.paradigm, "references_s": references_s,
      "wall_s": time.time() - t0}
  plot(metrics, os.path.join(workdir, "reward_and_oracle.png"))
  writer.flush()
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), metrics)
  logging.info("oracle %.3f -> %.3f", metrics["oracle_before"],
               metrics["oracle_after"])
  return metrics


def plot(metrics: dict, path: str) -> None:
  """Reward mean and its sliding-window std per step, with the oracle."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  steps = np.arange(1, len(metrics["reward_mean_curve"]) + 1)
  ax.plot(steps, metrics["reward_mean_curve"], lw=0.8, label="reward mean")
  ax.plot(steps, metrics["reward_std_window_curve"], lw=0.8,
          label="reward std (window)")
  ax.set_xlabel("ReFL step")
  ax.set_ylabel("reward")
  ax2 = ax.twinx()
  curve = np.asarray(metrics["oracle_curve"])
  ax2.plot(curve[:, 0], curve[:, 1], "ko-", label="oracle (held-out)")
  # From 0, so a change of one prompt does not fill the axis.
  ax2.set_ylim(0, max(0.2, 1.2 * curve[:, 1].max()))
  ax2.set_ylabel("oracle alignment")
  lines = [a.get_legend_handles_labels() for a in (ax, ax2)]
  ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1],
            loc="center right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
