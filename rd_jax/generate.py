r"""Inference-time scaling with the reward model as verifier (T2I, T2V, I2V).

  python -m rd_jax.generate --config=configs/generate_shapes.py \
      --config.generator=GEN_WORKDIR --config.verifier.checkpoint=RM_WORKDIR \
      --workdir=DIR
  ... --config.stage=video [--config.task=i2v]   (a kind=video verifier)

Samples held-out (test_id) ShapesWorld prompts with a generator's EMA params
(a train_generator workdir, or a refl workdir: the generator after ReFL)
in three modes (configs/generate_shapes.py): plain sampling, Best-of-N
and Search over Paths (rd_jax/generation/search.py), scores the returned
samples with the oracle and writes

  DIR/final_metrics.json  curves: [{mode, n, m, steps, nfe_generator,
                          nfe_verifier, oracle, by_category}; Best-of-N
                          rows add oracle_pass_at_n: the share of prompts
                          with some right candidate], task, verifier, wall_s
  DIR/oracle_vs_nfe.png   oracle alignment against generator NFE per prompt
  DIR/samples_<mode>.png  grids of returned samples (videos: .gif and a
                          _frames.png strip)

The image stage samples text-to-image; the video stage text-to-video, or
with task i2v image-to-video: every mode gets the same given first frame
per prompt (a render of the held-out spec), held fixed while sampling and
searching.

NFE are per prompt and count one forward pass of one sample: a CFG step is
2, a Heun step 2 (×2 with CFG). A symmetric pairwise verifier call is 2.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jax.experimental import multihost_utils

from rd_jax import (cli, config_util, eval_rm, sharding, train_generator,
                    train_util)
from rd_jax.generation import flow, search
from rd_jax.models import generator
from rd_jax.reward import evaluate as rm_eval
from rd_jax.reward import model as rm_model


def load_generator(workdir: str, stage: str):
  """(SFT config, stage config, EMA params) of a train_generator workdir,
  or of a refl workdir (its generator after ReFL; `stage` is then the one
  it fine-tuned)."""
  hint = "--config.generator must be a train_generator or refl --workdir"
  config = train_util.load_config(workdir, hint)
  if "refl" in config:  # a ReFL workdir: its SFT generator's architecture
    stage = config.stage
    ckpt_dir = os.path.join(workdir, "checkpoints")
    config = train_util.load_config(config.generator, hint)
  else:
    ckpt_dir = os.path.join(workdir, stage, "checkpoints")
  st = config[stage]
  # The EMA params only: raw params and optimiser moments stay on disk.
  abstract = {"ema": jax.eval_shape(
      lambda: generator.init(st.model, jax.random.key(0)))}
  ckpt = train_util.Checkpointer(ckpt_dir)
  state, step = ckpt.restore(abstract, partial=True)
  ckpt.close()
  logging.info("generator %s (%s): step %d", workdir, stage, step)
  return config, st, state["ema"]


def nfe_per_step(st) -> int:
  return (2 if st.solver == "heun" else 1) * (2 if st.cfg_scale != 1 else 1)


@dataclasses.dataclass
class Verifier:
  """A reward model (config with `rm` and `paradigm`, params, tokenizer) as
  a jit-able verifier of generator samples."""
  config: ml_collections.ConfigDict
  params: Any
  tok: Any = None

  def __post_init__(self):
    if self.paradigm not in ("pointwise_generative", "pairwise_generative"):
      raise ValueError(f"a {self.paradigm} model has no P(yes); train a "
                       "pointwise_generative or pairwise_generative verifier")

  @classmethod
  def load(cls, checkpoint: str, data_dir: str | None, mesh=None,
           rules=sharding.DEFAULT_RULES) -> "Verifier":
    """From a train_rm workdir, params placed on `mesh`."""
    config, params, _, tok = eval_rm.load(checkpoint, data_dir, mesh, rules)
    return cls(config, params, tok)

  @property
  def paradigm(self) -> str:
    return self.config.paradigm

  @property
  def pointwise(self) -> bool:
    return self.paradigm == "pointwise_generative"

  def score_fn(self, params, q):
    """x0 [B, ...] (model space) -> P("yes") [B] (pointwise verifiers)."""
    return lambda x: rm_model.pointwise_reward(self.config.rm, params,
                                               generator.to_unit(x), q)

  def pair_fn(self, params, q):
    """(ref, cand) -> symmetric P(cand better) [B] (pairwise verifiers)."""
    return lambda ref, cand: rm_model.pairwise_reward(
        self.config.rm, params, generator.to_unit(ref),
        generator.to_unit(cand), q, symmetric=True)


def known_frames(st, first):
  """flow.sample's `known` for image-to-video (`first` [B, R, R, 3]), or
  None."""
  return None if first is None else train_generator.i2v_known(st, first)


def candidates(st, verifier, params, rm_params, ids, mask, q, noise,
               first=None):
  """Best-of-N pool: samples [N, B, ...] and verifier scores [N, B]
  (pointwise P(yes), or nothing for a pairwise verifier); `first`: the
  given first frames of image-to-video."""
  noise = jnp.moveaxis(noise, 1, 0)
  sample_fn = functools.partial(train_generator.sample, st, params, ids,
                                mask, known=known_frames(st, first))
  if verifier.pointwise:
    _, samples, scores = search.best_of_n(
        sample_fn, verifier.score_fn(rm_params, q), noise)
    return samples, scores
  return jax.vmap(sample_fn)(noise), None


def paths(st, verifier, cfg, params, rm_params, ids, mask, q, noise, rng,
          first=None):
  noise = jnp.moveaxis(noise, 1, 0)
  cond = generator.encode_text(st.model, params, ids, mask)
  uncond = generator.unconditional(cond)
  known = known_frames(st, first)

  def segment_fn(x, t_from, t_to, steps):
    x, x0s = flow.sample(params, x, cond, flow.Schedule(steps, 1.0,
                                                        st.solver),
                         velocity_fn=generator.velocity_fn(
                             st.model, guidance=st.get("guidance")),
                         uncond=uncond, cfg_scale=st.cfg_scale,
                         known=known, span=(t_from, t_to))
    return x, x0s[-1]

  best, _ = search.search_over_paths(
      segment_fn, verifier.score_fn(rm_params, q), noise, rng, cfg)
  return best


TASKS = {"image": ("t2i",), "video": ("t2v", "i2v")}


def run(config: ml_collections.ConfigDict, workdir: str,
        verifier: Verifier | None = None) -> dict:
  """Writes and returns final_metrics; `verifier` (default: loaded from
  config.verifier.checkpoint) lets a caller pass one in."""
  from rd_jax.data import oracle, pipeline, tokenizer, world  # pylint: disable=g-import-not-at-top
  config_util.require_workdirs(config, {"generator": "train_generator"})
  if verifier is None:
    config_util.require_workdirs(config, {"verifier.checkpoint": "train_rm"})
  train_util.prepare_workdir(workdir)
  train_util.save_config(workdir, config)
  t0 = time.time()
  gcfg, st, params = load_generator(config.generator, config.stage)
  kind = "video" if st.frames else "image"
  task = config.task or ("t2v" if st.frames else "t2i")
  if task not in TASKS[kind]:
    raise ValueError(
        f"--config.task={task} does not fit stage {config.stage!r}, which "
        f"samples {kind}s; use {' or '.join(TASKS[kind])}")
  data_dir = config.data_dir or gcfg.data_dir
  # Both models on config.mesh by their logical names; prompts (and their
  # candidates) are split over the batch axes. Every program below is one
  # jit whose batch rows never meet: on a data-parallel mesh the compiled
  # Best-of-N has no collective at all (tests/test_scale_out.py), so a
  # shard_map would only restate what the partitioner already does.
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  params, _ = sharding.put(params, mesh, rules,
                           generator.logical_specs(st.model))
  if verifier is None:
    verifier = Verifier.load(config.verifier.checkpoint, data_dir, mesh,
                             rules)
  if verifier.config.kind != kind:
    raise ValueError(f"the verifier is a {verifier.config.kind} RM, but "
                     f"stage {config.stage!r} samples {kind}s; train it "
                     f"with rm_shapes.py:kind={kind}")
  tok = tokenizer.load(pipeline.tokenizer_dir(data_dir))
  specs = world.eval_specs(kind, "test_id", n=config.eval_n,
                           seed=config.seed)
  ids, mask = tokenizer.encode(tok, [world.prompt(s) for s in specs],
                               st.model.text.max_len)
  n_max = max([1] + list(config.best_of_n) +
              [n for n, _ in config.search.paths])
  # The same noises for every mode, stored [prompt, candidate, ...] so a
  # batch's rows split over processes.
  noise_all = np.moveaxis(np.asarray(jax.random.normal(
      jax.random.key(config.seed),
      (n_max,) + generator.sample_shape(st, len(specs)))), 0, 1)
  # Image-to-video: every mode is given the same first frames, held fixed.
  given = ({"first": train_generator.i2v_first_frames(config.seed, st,
                                                      specs)}
           if task == "i2v" else {})
  q_all = rm_eval.encode_specs(verifier.config, verifier.tok, specs)
  rows = sharding.batch_shards(mesh, rules)
  if config.eval_batch % rows or len(specs) % config.eval_batch:
    raise ValueError(f"eval_batch={config.eval_batch} must divide eval_n="
                     f"{len(specs)} and be a multiple of the mesh's {rows} "
                     "batch shards")
  per_step = nfe_per_step(st)
  # Plain and Best-of-N call train_generator.sample (two runs for
  # text-to-video with t2v_two_pass); the path search's segments are joint.
  passes = train_generator.sample_passes(st, i2v=task == "i2v")
  curves, grids = [], {}

  def record(mode, samples, nfe_g, nfe_v, **kw):
    samples = np.asarray(generator.to_pixels(samples))
    verdicts = oracle.score_batch(samples, specs)
    cats = {str(k): float(v) for k, v in
            oracle.by_category(verdicts, specs).items()}
    row = dict(mode=mode, nfe_generator=int(nfe_g), nfe_verifier=int(nfe_v),
               oracle=cats["overall"], by_category=cats, **kw)
    curves.append(row)
    grids[mode] = samples
    logging.info("%s %s: oracle %.3f (NFE generator %d, verifier %d)", mode,
                 kw, cats["overall"], nfe_g, nfe_v)

  def over_prompts(fn, n_noise=1, **arrays):
    """fn(gen params, RM params, ids, mask, q, noise [b, n_noise, ...], rng,
    **arrays [P, ...] of those rows) per eval batch; every process passes
    its share of each batch's rows and gets the whole result back."""
    out = []
    for i in range(0, len(specs), config.eval_batch):
      sl = np.array_split(np.arange(i, i + config.eval_batch),
                          jax.process_count())[jax.process_index()]
      local = {"ids": ids[sl], "mask": mask[sl],
               "q": {k: v[sl] for k, v in q_all.items()},
               "noise": noise_all[sl, :n_noise],
               **{k: v[sl] for k, v in {**given, **arrays}.items()}}
      b = sharding.global_batch(local, mesh, rules)
      with jax.set_mesh(mesh):
        res = fn(params, verifier.params, b.pop("ids"), b.pop("mask"),
                 b.pop("q"), b.pop("noise"),
                 jax.random.fold_in(jax.random.key(config.seed), i), **b)
      out.append(multihost_utils.process_allgather(res, tiled=True))
    return out

  if "plain" in config.modes:
    for steps in config.plain_steps:
      fn = jax.jit(lambda p, rp, ids, mask, q, noise, rng, first=None,
                   steps=steps: train_generator.sample(
                       st, p, ids, mask, noise[:, 0],
                       known=known_frames(st, first), steps=steps))
      record("plain", np.concatenate(over_prompts(fn)),
             passes * steps * per_step, 0, steps=steps)

  if "best_of_n" in config.modes:
    fn = jax.jit(lambda p, rp, ids, mask, q, noise, rng, first=None:
                 candidates(st, verifier, p, rp, ids, mask, q, noise, first))
    n_pool = max(config.best_of_n)
    out = over_prompts(fn, n_pool)
    pool = np.concatenate([o[0] for o in out], 1)  # [N, P, ...]
    # The oracle on every candidate: pass@N (some candidate is right) is the
    # most a perfect verifier could pick, the headroom over the RM's pick.
    right = np.stack([oracle.score_batch(np.asarray(generator.to_pixels(p)),
                                         specs) for p in pool])
    by_prompt = np.moveaxis(pool, 1, 0)  # rows first, to split them
    wins_fn = jax.jit(lambda p, rp, ids, mask, q, noise, rng, cands,
                      first=None: search.round_robin_wins(
                          verifier.pair_fn(rp, q), jnp.moveaxis(cands, 1, 0)))
    for n in config.best_of_n:
      if verifier.pointwise:
        sc = np.concatenate([o[1] for o in out], 1)[:n]
        nfe_v = n
      else:
        sc = np.concatenate(over_prompts(wins_fn, cands=by_prompt[:, :n]),
                            1)
        nfe_v = 2 * n * (n - 1)
      best = search.gather(pool[:n], search.select(sc, 1))[0]
      record("best_of_n", best, passes * n * st.sample_steps * per_step,
             nfe_v, n=n,
             oracle_pass_at_n=float(right[:n].any(0).mean()))

  if "search_over_paths" in config.modes:
    if not verifier.pointwise:
      raise ValueError("search_over_paths needs a pointwise verifier; "
                       "--config.verifier.checkpoint is a "
                       f"{verifier.paradigm} RM")
    for n, m in config.search.paths:
      cfg = search.PathSearch(
          n=n, m=m, sigma_start=config.search.sigma_start,
          delta_f=config.search.delta_f, delta_b=config.search.delta_b,
          steps_start=config.search.steps_start,
          steps_round=config.search.steps_round)
      fn = jax.jit(functools.partial(paths, st, verifier, cfg))
      out = over_prompts(fn, n)
      nfe = cfg.nfe(per_step)
      record("search_over_paths", np.concatenate(out), nfe["nfe_generator"],
             nfe["nfe_verifier"], n=n, m=m)

  for mode, samples in grids.items():
    train_generator.save_grid(os.path.join(workdir, f"samples_{mode}"),
                              samples, config.num_grid)
  plot(curves, os.path.join(workdir, "oracle_vs_nfe.png"), task)
  metrics = {"curves": curves, "task": task, "verifier": verifier.paradigm,
             "wall_s": time.time() - t0}
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), metrics)
  return metrics


def plot(curves: list[dict], path: str, task: str = "t2i") -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for mode in dict.fromkeys(c["mode"] for c in curves):
    rows = sorted((c for c in curves if c["mode"] == mode),
                  key=lambda c: c["nfe_generator"])
    ax.plot([c["nfe_generator"] for c in rows], [c["oracle"] for c in rows],
            "o-", label=mode)
  bon = sorted((c for c in curves if "oracle_pass_at_n" in c),
               key=lambda c: c["nfe_generator"])
  if bon:
    ax.plot([c["nfe_generator"] for c in bon],
            [c["oracle_pass_at_n"] for c in bon], "k--",
            label="pass@N (a perfect verifier)")
  ax.set_xscale("log")
  ax.set_xlabel("generator NFE per prompt")
  ax.set_ylabel(f"oracle alignment (held-out {task.upper()})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  run(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
