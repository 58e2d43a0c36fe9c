"""Sharded train steps vs one device (run in a subprocess by test_scale_out).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/multidevice_steps.py generator|rm|refl

For each mesh (data, fsdp, tensor) in (8,1,1), (2,2,2): the step
jitted with explicit in/out shardings (state donated) must give the
single-device loss and updated parameters within fp32 tolerance, and every
parameter (and optimiser moment) must be sharded as its logical names say
under the rules. Prints one JSON line per mesh.
"""
from __future__ import annotations

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rd_jax import sharding, train_util

# Pure data parallelism, and every axis split (a third mesh, (2,4,1), split
# nothing these two do not and cost a third of each job's compiles).
MESHES = ((8, 1, 1), (2, 2, 2))


def generator_case():
  from configs import generator_shapes
  from rd_jax import train_generator
  from rd_jax.models import generator
  st = generator_shapes.get_config("smoke").image
  opt = train_generator.make_optimizer(st)
  params = generator.init(st.model, jax.random.key(0))
  state = {"params": params, "opt": opt.init(params),
           "ema": jax.tree.map(jnp.copy, params),
           "step": jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  b, length = 8, st.model.text.max_len
  batch = {"chosen": rng.integers(0, 256, (b, 32, 32, 3), np.uint8),
           "prompt_ids": rng.integers(1, 100, (b, length), np.int32),
           "prompt_mask": np.arange(length)[None] < rng.integers(
               3, length, (b, 1))}
  step = functools.partial(train_generator.train_step, st, opt)
  return (step, state, batch, {"params": generator.logical_specs(st.model)},
          None)


def rm_batch(config, b: int, seed: int = 0) -> dict:
  """A synthetic pairwise batch of the tiny RM: 2 images of P tokens, a
  random question, the answer token (yes for rows < b, no after)."""
  from rd_jax.models import internvl
  rng = np.random.default_rng(seed)
  tpi = internvl.tokens_per_image(config.rm.model)
  img_tok = config.rm.model.image_token_id
  q_len, length = 10, 2 * tpi + 16
  ids = rng.integers(20, 100, (2 * b, length)).astype(np.int32)
  ids[:, :2 * tpi] = img_tok
  read = 2 * tpi + q_len
  ans = np.where(np.arange(2 * b) < b, config.rm.yes_id, config.rm.no_id)
  ids[:, read + 1] = ans
  mask = np.arange(length)[None] <= read + 1
  return {"input_ids": ids, "attention_mask": np.broadcast_to(
              mask, ids.shape).copy(),
          "read_pos": np.full((2 * b,), read, np.int32),
          "answer_ids": ans[:, None].astype(np.int32),
          "answer_mask": np.ones((2 * b, 1), bool),
          "decision_index": np.zeros((2 * b,), np.int32),
          "chosen": rng.integers(0, 256, (b, 64, 64, 3), np.uint8),
          "rejected": rng.integers(0, 256, (b, 64, 64, 3), np.uint8)}


def rm_config():
  from configs import rm_shapes
  config = rm_shapes.get_config("smoke")
  config.rm.yes_id, config.rm.no_id = 10, 11
  return config


def rm_case():
  from rd_jax import train_rm
  config = rm_config()
  state, opt = train_rm.init_state(config, jax.random.key(0))
  step = functools.partial(train_rm.train_step, config, opt)
  return step, state, train_rm.pair_major(rm_batch(config, 8)), None, None


def refl_case():
  """The ReFL step (pairwise reward against a reference, β > 0) of the
  smoke generator and the smoke RM; the RM's params are the frozen 4th
  argument."""
  from configs import generator_shapes, refl_shapes
  import ml_collections
  from rd_jax import refl
  from rd_jax.models import generator
  from rd_jax.reward import model as rm_model
  rc = refl_shapes.get_config("smoke")
  rm_c = rm_config()
  st = generator_shapes.get_config("smoke").image
  cfg = ml_collections.ConfigDict(dict(gen=st, rm=rm_c.rm, refl=rc.refl,
                                       train=rc.train))
  cfg.rm.paradigm = "pairwise_generative"
  opt = refl.make_optimizer(rc.train, generator.logical_specs(st.model))
  params = generator.init(st.model, jax.random.key(0))
  state = {"params": params, "opt": opt.init(params),
           "ema": jax.tree.map(jnp.copy, params),
           "step": jnp.zeros((), jnp.int32)}
  b, length = 8, st.model.text.max_len
  rb = rm_batch(rm_c, b)
  rng = np.random.default_rng(1)
  batch = {"prompt_ids": rng.integers(1, 100, (b, length), np.int32),
           "prompt_mask": np.arange(length)[None] < rng.integers(
               3, length, (b, 1)),
           "question": {k: rb[k][:b] for k in ("input_ids",
                                               "attention_mask",
                                               "read_pos")},
           "reference": rng.uniform(size=(b, st.resolution, st.resolution,
                                          3)).astype(np.float32),
           "chosen": rb["chosen"]}
  rm_params = rm_model.init(cfg.rm, jax.random.key(2))
  frozen = ({"rm": rm_params}, {"rm": jax.eval_shape(
      lambda: rm_model.init(cfg.rm, jax.random.key(2)))})
  return (functools.partial(refl.train_step, cfg, opt), state, batch,
          {"params": generator.logical_specs(st.model)}, frozen)


def best_of_n_collectives() -> list[str]:
  """The cross-device collectives in generate's Best-of-N program (smoke
  generator, 4 candidates for each of 8 prompts, pointwise verifier) on the
  data-parallel mesh (8, 1, 1); rows never meet, so there should be none."""
  import re
  from configs import generator_shapes
  from rd_jax import generate
  from rd_jax.models import generator, internvl
  from rd_jax.reward import model as rm_model
  mesh, rules = sharding.make_mesh((8, 1, 1)), sharding.DEFAULT_RULES
  st = generator_shapes.get_config("smoke").image
  rm_c = rm_config()
  rm_c.paradigm = "pointwise_generative"
  params, _ = sharding.put(generator.init(st.model, jax.random.key(0)), mesh,
                           rules, generator.logical_specs(st.model))
  rm_params, _ = sharding.put(
      rm_model.init(rm_c.rm, jax.random.key(2)), mesh, rules,
      jax.eval_shape(lambda: rm_model.init(rm_c.rm, jax.random.key(2))))
  b, n, length = 8, 4, st.model.text.max_len
  # A pairwise question less its first image's tokens: a pointwise one.
  tpi = internvl.tokens_per_image(rm_c.rm.model)
  rb = rm_batch(rm_c, b)
  rng = np.random.default_rng(3)
  batch = sharding.global_batch({
      "ids": rng.integers(1, 100, (b, length), np.int32),
      "mask": np.ones((b, length), bool),
      "q": {"input_ids": rb["input_ids"][:b, tpi:], "attention_mask":
            rb["attention_mask"][:b, tpi:],
            "read_pos": rb["read_pos"][:b] - tpi},
      "noise": rng.normal(size=(b, n, st.resolution, st.resolution,
                                3)).astype(np.float32)}, mesh, rules)
  verifier = generate.Verifier(rm_c, rm_params)
  fn = jax.jit(lambda p, rp, ids, mask, q, noise: generate.candidates(
      st, verifier, p, rp, ids, mask, q, noise))
  with jax.set_mesh(mesh):
    hlo = fn.lower(params, rm_params, **batch).compile().as_text()
  return sorted(set(re.findall(
      r"\b(all-gather|all-reduce|reduce-scatter|collective-permute|"
      r"all-to-all)(?:-start)?\(", hlo)))


def check_shardings(state, names, mesh, rules) -> int:
  """Asserts every array's sharding is its logical names' mesh spec;
  returns how many arrays are actually split over some mesh axis."""
  split = 0
  flat_names = jax.tree_util.tree_structure(state).flatten_up_to(names)
  for x, n in zip(jax.tree.leaves(state), flat_names):
    want = sharding.logical_to_mesh(n, rules, mesh, x.shape)
    got = x.sharding.spec
    pad = lambda s: tuple(s) + (None,) * (x.ndim - len(s))  # noqa: E731
    assert pad(got) == pad(want), (x.shape, n, got, want)
    split += any(a is not None for a in want)
  return split


def main(job: str) -> None:
  assert len(jax.devices()) == 8, jax.devices()
  step, state, batch, logical, frozen = {
      "generator": generator_case, "rm": rm_case, "refl": refl_case}[job]()
  rng = jax.random.key(1)
  t0 = time.time()
  extra = () if frozen is None else (frozen[0],)
  ref_state, ref_metrics = jax.jit(step)(state, batch, rng, *extra)
  print(json.dumps({"mesh": "single", "s": round(time.time() - t0, 1)}),
        flush=True)
  ref_leaves = jax.tree.leaves(ref_state)
  rules = sharding.DEFAULT_RULES
  names = sharding.tree_logical_specs(state, logical)
  for shape in MESHES:
    t0 = time.time()
    mesh = sharding.make_mesh(shape)
    # From host copies: donation must not delete the reference inputs.
    sharded, state_sh = sharding.put(jax.tree.map(np.asarray, state), mesh,
                                     rules, logical)
    check_shardings(sharded, names, mesh, rules)
    frozen_on_mesh = None
    if frozen is not None:
      frozen_on_mesh, _ = sharding.put(frozen[0], mesh, rules, frozen[1])
      check_shardings(frozen_on_mesh, sharding.tree_logical_specs(
          frozen[0], frozen[1]), mesh, rules)
    gbatch = sharding.global_batch(batch, mesh, rules)
    fn = train_util.jit_step(step, mesh, state_sh, frozen=frozen_on_mesh)
    with jax.set_mesh(mesh):
      new, metrics = fn(sharded, gbatch, rng)
    n_split = check_shardings(new, names, mesh, rules)
    diffs = [float(np.max(np.abs(np.asarray(a, np.float64) -
                                 np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves(new), ref_leaves)]
    loss_diff = abs(float(metrics["loss"]) - float(ref_metrics["loss"]))
    print(json.dumps({"mesh": shape, "loss": float(metrics["loss"]),
                      "loss_diff": loss_diff, "max_param_diff": max(diffs),
                      "sharded_arrays": n_split,
                      "arrays": len(diffs),
                      "s": round(time.time() - t0, 1)}), flush=True)
    assert loss_diff < 1e-5, loss_diff
    assert max(diffs) < 1e-4, max(diffs)
    if shape != (8, 1, 1):
      assert n_split > 0
  if job == "refl":  # the verifier's other use, at inference
    print(json.dumps({"best_of_n_collectives": best_of_n_collectives()}),
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
