r"""Flow-matching SFT of the ShapesWorld generator (T2I, T2V, I2V).

  python -m rd_jax.train_generator --config=configs/generator_shapes.py \
      --workdir=/tmp/gen_shapes

Runs the stages in `config.stages` ('image': text-to-image; 'video': one
model trained on text-to-video and, for a share `i2v_prob` of samples,
image-to-video with the clean first frame given and masked out of the loss).
Each stage writes to WORKDIR/<stage>/: Orbax checkpoints (resumed from the
latest), TensorBoard events, sample grids (PNG; GIF + frame strip for
video). WORKDIR/final_metrics.json holds the oracle's alignment on held-out
(test_id) prompts, sampled with the EMA params:

  oracle_t2i, oracle_t2v, oracle_i2v   overall share judged correct
  oracle_by_category                   {task: {category: share, overall}}
  final_loss_<stage>, params_<stage>
  wall_s (training + evaluation), data_s (building/reading ShapesWorld)

config.data_dir ("" = WORKDIR/data) is built on first use. On a CPU host,
stages that start from scratch train side by side, each in a process of
its own (`config.parallel_stages`, `stages_side_by_side`).
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
from PIL import Image

from rd_jax import cli, config_util, sharding, train_util
from rd_jax.generation import flow
from rd_jax.models import generator


# ---------------------------------------------------------------- data


def _data_modules():
  # Imported lazily so the model/sampler stay importable without the data
  # stack (tensorflow_datasets, grain).
  from rd_jax.data import oracle, pipeline, tokenizer, world  # pylint: disable=g-import-not-at-top
  return oracle, pipeline, tokenizer, world


def prepare_data(data_dir: str, scale: str):
  """Builds ShapesWorld under `data_dir` unless there; returns its tokenizer."""
  _, pipeline, tokenizer, _ = _data_modules()
  pipeline.build(data_dir, scale, log=logging.info)
  return tokenizer.load(pipeline.tokenizer_dir(data_dir))


def train_iterator(config, st, kind: str):
  """Resumable grain iterator over the train split."""
  _, pipeline, _, _ = _data_modules()
  return iter(pipeline.loader(config.data_dir, kind, "train",
                              batch_size=sharding.process_batch_size(
                                  st.batch_size), seed=config.seed,
                              scale=config.data_scale,
                              max_len=st.model.text.max_len,
                              on_corrupt=config.on_corrupt))


def _kind(st) -> str:
  return "video" if st.frames else "image"


# ---------------------------------------------------------------- train step


def make_optimizer(st) -> optax.GradientTransformation:
  lr = optax.warmup_cosine_decay_schedule(
      0.0, st.lr, st.warmup_steps, max(st.steps, st.warmup_steps + 1),
      end_value=st.lr * 0.1)
  return train_util.make_optimizer(
      lr, grad_clip=st.grad_clip, b2=0.99, weight_decay=st.weight_decay,
      kind=st.optimizer, logical=generator.logical_specs(st.model))


def first_frame_mask(i2v: jax.Array, frames: int) -> jax.Array:
  """[B] bool -> [B, T, 1, 1, 1]: 1 on frame 0 of the I2V samples."""
  return (i2v[:, None] & (jnp.arange(frames) == 0)[None]).astype(
      jnp.float32)[..., None, None, None]


def train_step(st, opt, state: dict, batch: dict, rng: jax.Array):
  """One flow-matching step; state = {params, opt, ema, step}."""
  cfg = st.model
  x0 = generator.to_model_space(generator.resize(batch["chosen"],
                                                 st.resolution))
  b = x0.shape[0]
  k_drop, k_i2v, k_loss = jax.random.split(rng, 3)
  drop = jax.random.bernoulli(k_drop, st.cond_drop, (b,))
  known = loss_mask = None
  if st.frames:
    m = first_frame_mask(jax.random.bernoulli(k_i2v, st.i2v_prob, (b,)),
                         x0.shape[1])
    known, loss_mask = (m, x0), 1.0 - m

  def loss_fn(params):
    cond = generator.encode_text(cfg, params, batch["prompt_ids"],
                                 batch["prompt_mask"])
    uncond = generator.unconditional(cond)
    cond = jax.tree.map(
        lambda c, u: jnp.where(drop.reshape((b,) + (1,) * (c.ndim - 1)), u,
                               c), cond, uncond)
    loss, _ = flow.flow_matching_loss(
        generator.velocity_fn(cfg), params, x0, cond, k_loss,
        t_sampling=st.t_sampling, shift=st.train_shift, known=known,
        loss_mask=loss_mask)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  new, skipped = train_util.apply_gradients(state, grads, opt, st.ema_decay,
                                           loss=loss)
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "skipped": skipped}


# ---------------------------------------------------------------- sampling


def sample_passes(st, i2v: bool) -> int:
  """Sampler runs per `sample` call: 2 for text-to-video with
  `st.t2v_two_pass`, else 1 (generate counts its NFE with this)."""
  return 2 if st.frames and not i2v and st.get("t2v_two_pass") else 1


def sample(st, params, ids, mask, noise, known=None, steps=None):
  """Prompt ids -> samples in model space [B, (T,) R, R, 3], with CFG, in
  `steps` solver steps (default st.sample_steps; jit this).

  Text-to-video with `st.t2v_two_pass` (sample_passes): the joint sample's
  frame 0 is then held as an image-to-video first frame and frames 1.. are
  drawn again from the same noise (Emu Video's text -> image -> video
  factorisation, one model doing both)."""
  cfg = st.model
  cond = generator.encode_text(cfg, params, ids, mask)

  def run(known):
    x, _ = flow.sample(
        params, noise, cond,
        flow.Schedule(steps or st.sample_steps, st.sample_shift, st.solver),
        velocity_fn=generator.velocity_fn(cfg, guidance=st.get("guidance")),
        uncond=generator.unconditional(cond), cfg_scale=st.cfg_scale,
        known=known)
    return x

  x = run(known)
  if sample_passes(st, i2v=known is not None) == 2:
    x = run(i2v_known(st, x[:, 0]))
  return x


def sample_pixels(st, params, ids, mask, noise, known=None):
  """`sample` as uint8 pixels."""
  return generator.to_pixels(sample(st, params, ids, mask, noise, known))


@functools.lru_cache(maxsize=8)
def _jit_sampler_from_json(st_json: str):
  st = ml_collections.ConfigDict(json.loads(st_json))
  return jax.jit(functools.partial(sample_pixels, st))


def _jit_sampler(st):
  """`sample_pixels` jitted once per stage config (evaluation runs often)."""
  return _jit_sampler_from_json(st.to_json())


def i2v_first_frames(seed: int, st, specs) -> np.ndarray:
  """The given first frames of image-to-video prompts [P, R, R, 3] (model
  space): a fresh render of each held-out spec, frame 0."""
  _, _, _, world = _data_modules()
  np_rng = np.random.default_rng([seed, 11])
  first = np.stack([world.render(s, np_rng, size=64, frames=st.frames,
                                 split="test_id")[0] for s in specs])
  return np.asarray(generator.to_model_space(
      generator.resize(first, st.resolution)))


def i2v_known(st, first: jax.Array) -> tuple[jax.Array, jax.Array]:
  """flow.sample's `known` (mask, value) [B, T, R, R, 3] that holds frame 0
  at `first` [B, R, R, 3]."""
  b = first.shape[0]
  return (first_frame_mask(jnp.ones(b, bool), st.frames),
          jnp.broadcast_to(first[:, None], generator.sample_shape(st, b)))


def evaluate(config, st, params, tok, rng: jax.Array, task: str):
  """Samples held-out prompts; returns (uint8 samples, specs)."""
  oracle, _, tokenizer, world = _data_modules()
  del oracle
  specs = world.eval_specs(_kind(st), "test_id", n=st.eval_n,
                           seed=config.seed)
  ids, mask = tokenizer.encode(tok, [world.prompt(s) for s in specs],
                               st.model.text.max_len)
  noise = jax.random.normal(rng, generator.sample_shape(st, len(specs)))
  known = (i2v_known(st, i2v_first_frames(config.seed, st, specs))
           if task == "i2v" else None)
  fn = _jit_sampler(st)
  out = []
  for i in range(0, len(specs), st.eval_batch):
    sl = slice(i, i + st.eval_batch)
    kn = None if known is None else (known[0][sl], known[1][sl])
    out.append(np.asarray(fn(params, jnp.asarray(ids[sl]),
                             jnp.asarray(mask[sl]), noise[sl], kn)))
  samples = np.concatenate(out)
  return samples, specs


def save_grid(path: str, samples: np.ndarray, n: int) -> None:
  """PNG grid of images, or for videos a GIF of grids + a frame strip PNG."""
  samples = samples[:n]
  cols = int(np.ceil(np.sqrt(len(samples))))
  rows = int(np.ceil(len(samples) / cols))

  def grid(imgs):
    h, w = imgs.shape[1:3]
    g = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(imgs):
      y, x = divmod(i, cols)
      g[y * (h + 2):y * (h + 2) + h, x * (w + 2):x * (w + 2) + w] = im
    return Image.fromarray(g).resize((g.shape[1] * 2, g.shape[0] * 2),
                                     Image.NEAREST)

  if samples.ndim == 4:
    grid(samples).save(path + ".png")
    return
  frames = [grid(samples[:, t]) for t in range(samples.shape[1])]
  frames[0].save(path + ".gif", save_all=True, append_images=frames[1:],
                 duration=200, loop=0)
  strip = np.concatenate([np.concatenate(list(v), 1) for v in samples], 0)
  Image.fromarray(strip).save(path + "_frames.png")


# ---------------------------------------------------------------- stages


def check_init_from_stage(config, name: str) -> str | None:
  """The stage whose final EMA params initialise stage `name`
  (`<name>.init_from_stage`), checked: it runs earlier and has the same
  model, or None."""
  src = config[name].get("init_from_stage") or None
  if src is None:
    return None
  stages = list(config.stages)
  if src not in stages[:stages.index(name)]:
    raise ValueError(f"{name}.init_from_stage={src!r} must name a stage that "
                     f"runs before {name!r} in config.stages={tuple(stages)}")
  diff = config_util.differences(config[src].model, config[name].model)
  if diff:
    raise ValueError(
        f"{name}.init_from_stage={src!r} needs {name}.model equal to "
        f"{src}.model; they differ in {', '.join(k for k, _, _ in diff)}: "
        "set them alike, or "
        f"--config.{name}.init_from_stage='' to start {name} from scratch")
  return src


def train_stage(config, name: str, tok, workdir: str, writer,
                init_params=None) -> tuple[dict, object]:
  """Trains and evaluates one stage -> (metrics, final EMA params).
  `init_params` (another stage's EMA params, same model and mesh) replace
  the random init; a resumed run restores its own checkpoint instead, with
  no init."""
  st = config[name]
  stage_dir = os.path.join(workdir, name)
  vocab = len(tok)
  if vocab > st.model.text.vocab_size:
    raise ValueError(f"tokenizer has {vocab} tokens but {name}.model.text."
                     f"vocab_size={st.model.text.vocab_size}; raise it with "
                     f"--config.{name}.model.text.vocab_size={vocab}")
  rng = jax.random.key(config.seed)
  k_init, k_train, k_eval = jax.random.split(rng, 3)
  opt = make_optimizer(st)

  def init():
    params = generator.init(st.model, k_init)
    return {"params": params, "opt": opt.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32)}

  ckpt = train_util.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                 save_every=config.ckpt_every)
  # A resumed stage restores its checkpoint into the state's shapes: no
  # random init to throw away.
  resume = ckpt.latest_step() is not None
  state, state_sh, mesh, rules = train_util.sharded_init(
      config, init, {"params": generator.logical_specs(st.model)},
      abstract=resume)
  if init_params is not None and not resume:
    # Copies placed as this stage's state (the step donates its buffers).
    put = lambda: jax.device_put(jax.tree.map(jnp.copy, init_params),  # noqa: E731
                                 state_sh["params"])
    state = dict(state, params=put(), ema=put())
  counts = generator.param_count(st.model)
  logging.info("%s generator: %s params", name, counts)

  data = train_iterator(config, st, _kind(st))
  step_fn = train_util.jit_step(functools.partial(train_step, st, opt),
                                mesh, state_sh)
  keys = ("chosen", "prompt_ids", "prompt_mask")
  with jax.set_mesh(mesh):
    state, info = train_util.train_loop(
        state, step_fn, data, steps=st.steps, rng=k_train, ckpt=ckpt,
        writer=writer, workdir=stage_dir,
        make_batch=lambda b: sharding.global_batch(
            {k: b[k] for k in keys}, mesh, rules),
        max_nonfinite=st.max_nonfinite, log_every=config.log_every,
        name=name)
  ckpt.close()
  if info["preempted"]:
    return {"preempted": True}, None

  out = {f"final_loss_{name}": info["last_loss"],
         f"params_{name}": int(sum(counts.values())), "by_category": {}}
  oracle, _, _, _ = _data_modules()
  for i, task in enumerate(("t2v", "i2v") if st.frames else ("t2i",)):
    samples, specs = evaluate(config, st, state["ema"], tok,
                              jax.random.fold_in(k_eval, i), task)
    cats = oracle.by_category(oracle.score_batch(samples, specs), specs)
    cats = {str(k): float(v) for k, v in cats.items()}
    out[f"oracle_{task}"] = cats["overall"]
    out["by_category"][task] = cats
    writer.write_scalars(st.steps, {f"oracle_{task}/{k}": v
                                    for k, v in cats.items()})
    # Which attribute fails: count, shape or colour for images; for videos
    # whether the objects move as asked.
    what, judge = (("motion", oracle.motion) if st.frames else
                   ("attributes", oracle.attributes))
    attrs = judge(samples, specs)
    key = f"oracle_{what}_{task}"
    out[key] = attrs
    writer.write_scalars(st.steps, {f"{key}/{k}": v for k, v in attrs.items()})
    logging.info("%s: %s", key, attrs)
    save_grid(os.path.join(stage_dir, f"samples_{task}"), samples,
              config.num_grid)
    logging.info("%s oracle: %s", task, cats)
  return out, state["ema"]


def stages_side_by_side(config, sources: dict) -> bool:
  """Whether the stages train at the same time, each in a process of its
  own (`config.parallel_stages`): on one CPU host with more than one core,
  when no stage starts from another's params (`sources`: stage -> source
  stage or None). XLA:CPU keeps 2 cores about 1.7 busy with one tiny
  stage; side by side, the two stages' trainers step at 103 and 115 ms
  (image, video) against 60 and 68 ms alone, so together they finish
  sooner (docs/generator.md, "Stop 45"). An accelerator runs one stage at
  a time."""
  return bool(config.get("parallel_stages", False)
              and len(config.stages) > 1
              and not any(sources.values())
              and _cores() > 1
              and jax.process_count() == 1
              and jax.default_backend() == "cpu")


def _cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. taskset)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _stage_process(config, name: str, tok, workdir: str) -> dict:
  """train_stage in a process of its own (run_in_processes; `tok` is the
  parent's tokenizer, pickled): its metrics (the EMA params stay in its
  checkpoint)."""
  writer = train_util.metric_writer(workdir)
  try:
    return train_stage(config, name, tok, workdir, writer)[0]
  finally:
    writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict:
  train_util.prepare_workdir(workdir)
  if not config.data_dir:
    config.data_dir = os.path.join(workdir, "data")
  train_util.save_config(workdir, config)
  writer = train_util.metric_writer(workdir)
  t_data = time.time()
  tok = prepare_data(config.data_dir, config.data_scale)
  t0 = time.time()
  metrics = {"oracle_by_category": {}}
  sources = {}  # stage -> the stage it starts from (None: random init)
  for name in config.stages:
    if name not in ("image", "video"):
      raise ValueError(f"unknown stage {name!r}; use 'image' and/or 'video'")
    sources[name] = check_init_from_stage(config, name)
  side_by_side = None
  if stages_side_by_side(config, sources):
    logging.info("stages %s train side by side, each in its own process "
                 "(config.parallel_stages)", tuple(config.stages))
    side_by_side = train_util.run_in_processes(
        _stage_process, {n: (config, n, tok, workdir) for n in config.stages})
  ema = {}  # final EMA params of the stages another one starts from
  for name in config.stages:
    if side_by_side is not None:
      out = side_by_side[name]
    else:
      out, params = train_stage(config, name, tok, workdir, writer,
                                init_params=ema.get(sources[name]))
      if name in sources.values():
        ema[name] = params
    if out.get("preempted"):
      return {"preempted": True}
    metrics["oracle_by_category"].update(out.pop("by_category"))
    metrics.update(out)
  # wall_s: training + evaluation; building the data (once per data_dir,
  # shared by every job) is reported apart.
  metrics["wall_s"] = time.time() - t0
  metrics["data_s"] = t0 - t_data
  writer.flush()
  train_util.write_json(os.path.join(workdir, "final_metrics.json"), metrics)
  logging.info("final metrics: %s", metrics)
  return metrics


def main(argv):
  del argv
  train_and_evaluate(cli.CONFIG.value, cli.WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
