"""Shared trainer plumbing: checkpoints, metrics + progress/ETA, EMA, JSON.

One checkpoint helper (Orbax, atomic, resume from latest, optional grain
iterator state beside the train state), one metrics writer (clu: TensorBoard
+ console), used by every `python -m rd_jax.<job>` entry point.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers

# ---------------------------------------------------------------- files


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): readers never see half."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_builtin)
  os.replace(tmp, path)


def _to_builtin(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, "config.json"), config.to_dict())


# ---------------------------------------------------------------- checkpoints


class Checkpointer:
  """Orbax checkpoints of a train-state pytree (+ data iterator state).

  Saves are atomic (Orbax writes to a temp dir and renames), so a crash never
  corrupts the latest complete checkpoint. `restore` fails with a message
  naming the mismatch when the checkpoint does not fit the config.
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2,
               save_every: int = 1000):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every,
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any = None,
           force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: int | None = None) -> tuple[Any, int]:
    """(state, step) from `step` (default: latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this config "
          f"({e}); use a fresh --workdir or the config it was trained "
          f"with") from e
    return out["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------- metrics


def metric_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events in `workdir` + console logging (host 0 only)."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)


class Progress:
  """Logs step rate and ETA every `every` steps (and on the last step)."""

  def __init__(self, total_steps: int, writer: metric_writers.MetricWriter,
               *, first_step: int = 0, every: int = 50, name: str = "train"):
    self.total, self.writer, self.every, self.name = (
        total_steps, writer, every, name)
    self.first, self.t0 = first_step, None

  def __call__(self, step: int, metrics: dict[str, Any]) -> None:
    """`step` is the number of steps done so far (1-based)."""
    if self.t0 is None:  # start timing after the first (compiling) step
      self.t0, self.first = time.time(), step
      return
    if step % self.every and step != self.total:
      return
    rate = (step - self.first) / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    scalars = {k: float(v) for k, v in metrics.items()}
    scalars["steps_per_s"] = rate
    self.writer.write_scalars(step, {f"{self.name}/{k}": v
                                     for k, v in scalars.items()})
    logging.info("%s step %d/%d  %s  %.2f steps/s  ETA %s", self.name, step,
                 self.total, "  ".join(f"{k}={v:.4g}" for k, v in
                                       scalars.items() if k != "steps_per_s"),
                 rate, _fmt_time(eta))


def _fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- EMA


def apply_gradients(state: dict, grads: Any, opt: Any,
                    ema_decay: float | None = None) -> dict:
  """The optimiser update of a train state {params, opt, step[, ema]}.

  Every trainer's step ends here, so the update (and the EMA, when the state
  has one) is written once.
  """
  updates, opt_state = opt.update(grads, state["opt"], state["params"])
  new = dict(state, params=optax.apply_updates(state["params"], updates),
             opt=opt_state, step=state["step"] + 1)
  if "ema" in state:
    new["ema"] = ema_update(state["ema"], new["params"], state["step"],
                            ema_decay)
  return new


def ema_update(ema: Any, params: Any, step: jax.Array,
               decay: float) -> Any:
  """EMA with warm-up: decay_t = min(decay, (1 + t) / (10 + t)).

  The warm-up keeps early EMA weights close to the live ones, so short runs
  (CPU smoke configs) still evaluate a trained model.
  """
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
