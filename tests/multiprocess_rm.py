"""RM train steps on 2 processes vs 1, and a 2-process checkpoint restored in 1
(run by test_scale_out; each process has 2 fake CPU devices).

  multi:  RD_JAX_COORDINATOR=127.0.0.1:PORT RD_JAX_NUM_PROCESSES=2 \
          RD_JAX_PROCESS_ID=i python tests/multiprocess_rm.py multi DIR
  single: python tests/multiprocess_rm.py single DIR

Both run STEPS steps of the tiny RM on the same global batches (each process
feeds its own rows; `sharding.global_batch` assembles the global arrays) on
a (-1, 1, 1) mesh; multi saves an Orbax checkpoint from both processes.
single then restores it onto a different mesh, (1, 2, 1), and compares
its own losses and final parameters with it. Writes DIR/<mode>.json.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rd_jax import sharding, train_util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import multidevice_steps  # noqa: E402  pylint: disable=g-import-not-at-top

STEPS = 3


def run(mode: str, out_dir: str) -> None:
  sharding.initialize_distributed()
  from rd_jax import train_rm  # pylint: disable=g-import-not-at-top
  config = multidevice_steps.rm_config()
  opt = train_rm.make_optimizer(config.train)
  mesh = sharding.make_mesh((-1, 1, 1))
  rules = sharding.DEFAULT_RULES
  state, state_sh = sharding.init_sharded(
      lambda: train_rm.init_state(config, jax.random.key(0))[0], mesh, rules)

  def step(state, batch, i):
    return train_rm.train_step(config, opt, state, batch,
                               jax.random.fold_in(jax.random.key(1), i))

  with jax.set_mesh(mesh):
    fn = jax.jit(step, out_shardings=(state_sh, None), donate_argnums=0)
  p, n_proc = jax.process_index(), jax.process_count()
  losses = []
  for i in range(STEPS):
    full = train_rm.pair_major(multidevice_steps.rm_batch(config, 8, seed=i))
    local = jax.tree.map(
        lambda x: x[p * len(x) // n_proc:(p + 1) * len(x) // n_proc], full)
    batch = sharding.global_batch(local, mesh, rules)
    idx = jax.make_array_from_process_local_data(NamedSharding(mesh, P()),
                                                 np.int32(i))
    with jax.set_mesh(mesh):
      state, metrics = fn(state, batch, idx)
    losses.append(float(metrics["loss"]))
  out = {"losses": losses, "processes": n_proc,
         "devices": len(jax.devices())}
  ckpt_dir = os.path.join(out_dir, "ckpt")
  if mode == "multi":
    ckpt = train_util.Checkpointer(ckpt_dir)
    ckpt.save(STEPS, state, force=True)
    ckpt.wait()
    ckpt.close()
  else:
    # Restore the 2-process checkpoint onto another mesh shape.
    mesh2 = sharding.make_mesh((1, -1, 1))
    target_sh = sharding.tree_shardings(state, mesh2, rules)
    abstract = sharding.abstract_with_shardings(state, target_sh)
    restored, step_no = train_util.Checkpointer(ckpt_dir).restore(abstract)
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(restored),
                             jax.tree.leaves(state))]
    specs_ok = all(a.sharding == s for a, s in zip(
        jax.tree.leaves(restored), jax.tree.leaves(target_sh)))
    out.update(restored_step=step_no, restore_max_diff=max(diffs),
               restored_on_target_shardings=specs_ok)
  if p == 0:
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
      json.dump(out, f)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  run(sys.argv[1], sys.argv[2])
