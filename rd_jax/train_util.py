"""Shared trainer plumbing: the train loop, checkpoints, metrics + progress/ETA,
the guarded optimiser update (+ EMA), JSON.

One checkpoint helper (Orbax, atomic, resume from latest, optional grain
iterator state beside the train state), one metrics writer (TensorBoard
events + console), one train loop (`train_loop`: resume, preemption, non-finite
guard, per-step loss log), used by every `python -m rd_jax.<job>` trainer.
"""
from __future__ import annotations

import collections
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags, logging
from tensorboard.compat.proto import event_pb2, summary_pb2

# ---------------------------------------------------------------- files


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename): readers never see half.
  The temp file is the writer's own: processes of one multi-host run that
  write the same file (final_metrics.json) each rename a complete copy."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_builtin)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file up to the first incomplete line (a line
  cut by a kill); [] if the file does not exist."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          break
  return rows


def _to_builtin(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, "config.json"), config.to_dict())


def load_config(workdir: str, hint: str) -> ml_collections.ConfigDict:
  """The config.json `save_config` wrote in a job's workdir; a missing one
  fails with `hint` (which flag must name which kind of workdir)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir!r}; {hint}")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks that it is writable, before any work."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise OSError(
        f"workdir {workdir!r} is not writable ({e.strerror or e}); choose "
        f"another --workdir or fix its permissions") from e
  return workdir


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
    if jax.process_index() == 0:
      # A write killed midway leaves `<step>.orbax-checkpoint-tmp*`: never a
      # step Orbax restores from; removed so a resumed run can rewrite it.
      for tmp in glob.glob(os.path.join(self.directory, "*-tmp*")):
        logging.warning("removing an interrupted checkpoint write: %s", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_every,
            create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any = None,
           force: bool = False) -> bool:
    """Saves at `step` (every save_every steps, or now with force)."""
    if step == self.latest_step():
      return False
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      import grain  # pylint: disable=g-import-not-at-top
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items),
                             force=force)

  def restore(self, abstract_state: Any, data_iter: Any = None,
              step: int | None = None, partial: bool = False
              ) -> tuple[Any, int]:
    """(state, step) from `step` (default: latest).

    partial=True restores only the parts `abstract_state` names (e.g.
    {"params": ...} of a {params, opt, step} checkpoint) and reads nothing
    else: loading a model to evaluate or to start from leaves the
    optimiser moments (2x the params in f32 for AdamW) on disk.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_shapes(abstract_state, step, partial)
    if partial:
      if data_iter is not None:
        raise ValueError("a partial restore cannot resume a data iterator")
      args = ocp.args.PyTreeRestore(
          abstract_state, partial_restore=True,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              abstract_state))
      # Straight from the step's directory, not through the manager (whose
      # handler for "state" stays the one save and full restores use).
      with ocp.PyTreeCheckpointer() as c:
        state = self._restoring(step, lambda: c.restore(
            os.path.join(self.directory, str(step), "state"), args=args))
      # Leaves without a sharding come back as numpy arrays.
      return jax.tree.map(lambda x: jnp.asarray(x) if isinstance(
          x, np.ndarray) else x, state), step
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and self._has_data_state(step):
      import grain  # pylint: disable=g-import-not-at-top
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif data_iter is not None:
      logging.warning(
          "checkpoint %s/%d holds the data position of another number of "
          "processes (this run has %d): the model state resumes, the data "
          "order starts over", self.directory, step, jax.process_count())
    out = self._restoring(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**items)))
    return out["state"], step

  def _restoring(self, step: int, fn: Callable[[], Any]) -> Any:
    try:
      return fn()
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this config "
          f"({e}); use a fresh --workdir or the config it was trained "
          f"with") from e

  def _has_data_state(self, step: int) -> bool:
    """Whether `step` saved a data position for this process count (grain
    writes one file per process, named for the count)."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.exists(os.path.join(self.directory, str(step), "data",
                                       name))

  def check_shapes(self, abstract_state: Any, step: int,
                   partial: bool = False) -> None:
    """Fails naming the first tensors whose shape (or presence) differs
    (partial: tensors the checkpoint has beyond abstract_state are fine)."""
    from rd_jax import sharding  # pylint: disable=g-import-not-at-top
    with ocp.StandardCheckpointer() as c:
      found = sharding.flat_paths(c.metadata(os.path.join(
          self.directory, str(step), "state")).item_metadata.tree)
    want = sharding.flat_paths(abstract_state)
    shape = lambda x: tuple(getattr(x, "shape", ()))  # noqa: E731
    bad = [f"{k}: expected {shape(want[k])}, found "
           f"{shape(found[k]) if k in found else 'nothing'}"
           for k in want if k not in found or shape(found[k]) != shape(
               want[k])]
    bad += [] if partial else [
        f"{k}: not in this config, found {shape(found[k])}"
        for k in found if k not in want]
    if bad:
      more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
      raise ValueError(
          f"checkpoint {self.directory}/{step} does not match this config: "
          f"{'; '.join(bad[:3])}{more}. Rerun with the config it was trained "
          f"with (config.json beside it) or use a fresh --workdir")

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------- metrics


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  c = crc32c(data)
  return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class MetricWriter:
  """Every trainer's metrics writer: scalars to the log and, on host 0, to a
  TensorBoard event file in `workdir` (`tensorboard --logdir WORKDIR`).

  The file is what TensorFlow's summary writer (and clu's, on top of it)
  writes: TFRecords of Event protos. It is written here because those
  writers import TensorFlow, 10 s of every process start on 2 CPU cores.
  """

  def __init__(self, workdir: str, events: bool = True):
    self._f = None
    if events:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, f"events.out.tfevents.{time.time():.0f}"
                               f".{socket.gethostname()}.{os.getpid()}.rd_jax")
      self._f = open(self.path, "ab")  # pylint: disable=consider-using-with
      self._write(event_pb2.Event(wall_time=time.time(),
                                  file_version="brain.Event:2"))

  def _write(self, event) -> None:
    data = event.SerializeToString()
    head = struct.pack("<Q", len(data))
    self._f.write(head + _masked_crc(head) + data + _masked_crc(data))
    self._f.flush()  # TensorBoard sees each write while the run goes on

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                            for k, v in scalars.items()))
    if self._f is not None:
      self._write(event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=summary_pb2.Summary(value=[
              summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()])))

  def flush(self) -> None:
    if self._f is not None:
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None


def metric_writer(workdir: str) -> MetricWriter:
  """TensorBoard events in `workdir` + console logging (host 0 only)."""
  return MetricWriter(workdir, events=jax.process_index() == 0)


class Progress:
  """Logs step rate and ETA every `every` steps (and on the last step)."""

  def __init__(self, total_steps: int, writer: MetricWriter,
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
                 rate, fmt_time(eta))


def fmt_time(s: float) -> str:
  s = int(s)
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- update


OPTIMIZERS = ("adamw", "muon")


def muon_dims(params: Any, logical: Any = None) -> Any:
  """Muon's matrix view of every parameter, from its logical axis names
  (sharding.tree_logical_specs; `logical` as there): a layer-stacked matrix,
  named (layers, embed, out...) or (layers, in..., embed), is orthogonalised
  per layer with `embed` as its input or output axis; every other
  parameter (embeddings, norms, biases, patch and output projections) gets
  None, i.e. AdamW."""
  from optax.contrib import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top
  from rd_jax import sharding  # pylint: disable=g-import-not-at-top

  def dims(names):
    if not names or names[0] != "layers" or len(names) < 3:
      return None
    if names[1] == "embed":
      return MuonDimensionNumbers(1, tuple(range(2, len(names))))
    if names[-1] == "embed":
      return MuonDimensionNumbers(tuple(range(1, len(names) - 1)),
                                  len(names) - 1)
    return None

  return jax.tree.map(dims, sharding.tree_logical_specs(params, logical),
                      is_leaf=lambda x: x is None or isinstance(x, tuple))


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic (optax's default)


def newton_schulz(x: jax.Array, steps: int = 5, gram: bool | None = None,
                  eps: float = 1e-8) -> jax.Array:
  """Muon's orthogonalisation of the matrices x [..., m, n]: Frobenius
  normalisation, then `steps` of the quintic Newton-Schulz map
  X <- aX + b(XX^T)X + c(XX^T)^2 X (optax's `orthogonalize_via_newton_schulz`,
  the same polynomial), on the short side.

  `gram`: iterate on the Gram matrix R = XX^T of the short side m instead:
  X_k = Q_k X_0 with P_k = aI + bR_k + cR_k^2, Q_{k+1} = P_k Q_k and
  R_{k+1} = P_k R_k P_k -- the same X_k in exact arithmetic, for
  2m^2 n + 17m^3 multiply-adds over 5 steps against 5 (2m^2 n + m^3), so
  fewer when n >= 1.5 m (the generator's 128 x 384..768 kernels: up to
  2.2x). Its products run at full float32 precision (Gram iterations are
  not stable at bfloat16). None: Gram where it is cheaper and the backend
  is the CPU, whose float32 dots are full precision anyway; on TPU / GPU
  the standard iteration at default precision is the cheaper one.
  """
  a, b, c = NS_COEFFS
  t = lambda y: jnp.swapaxes(y, -1, -2)  # noqa: E731
  wide = x.shape[-2] <= x.shape[-1]
  x = x if wide else t(x)
  x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
  m, n = x.shape[-2:]
  if gram is None:
    gram = 2 * n >= 3 * m and jax.default_backend() == "cpu"
  if gram:
    mm = lambda u, v: jnp.matmul(  # noqa: E731
        u, v, precision=jax.lax.Precision.HIGHEST)
    r, eye, q = mm(x, t(x)), jnp.eye(m, dtype=x.dtype), None
    for i in range(steps):
      p = a * eye + b * r + c * mm(r, r)
      q = p if q is None else mm(p, q)
      if i + 1 < steps:
        r = mm(mm(p, r), p)
    x = x if q is None else mm(q, x)
  else:
    for _ in range(steps):
      r = x @ t(x)
      x = a * x + (b * r + c * r @ r) @ x
  return x if wide else t(x)


def _is_dims(x) -> bool:
  from optax.contrib import MuonDimensionNumbers  # pylint: disable=g-import-not-at-top
  return x is None or isinstance(x, MuonDimensionNumbers)


def _as_matrices(x: jax.Array, d) -> tuple[jax.Array, Callable, int, int]:
  """x as [batch, fan_in, fan_out] by its MuonDimensionNumbers d, the map
  back, fan_in and fan_out."""
  def axes(a):
    return tuple(i % x.ndim for i in ((a,) if isinstance(a, int) else a))

  red, out = axes(d.reduction_axis), axes(d.output_axis)
  batch = tuple(i for i in range(x.ndim) if i not in red + out)
  perm = batch + red + out
  size = lambda axes: int(np.prod([x.shape[i] for i in axes]))  # noqa: E731
  fan_in, fan_out = size(red), size(out)
  shape = tuple(x.shape[i] for i in perm)
  back = lambda y: y.reshape(shape).transpose(np.argsort(perm))  # noqa: E731
  return (x.transpose(perm).reshape(size(batch), fan_in, fan_out), back,
          fan_in, fan_out)


def muon_direction(dims_fn: Callable[[Any], Any], beta: float = 0.95,
                   ns_steps: int = 5, consistent_rms: float = 0.2
                   ) -> optax.GradientTransformation:
  """Muon's update direction for the matrices of `dims_fn(params)` (a tree
  of MuonDimensionNumbers, None elsewhere): Nesterov momentum with optax's
  bias correction, orthogonalised per matrix (`newton_schulz`), scaled by
  consistent_rms * sqrt(max(fan_in, fan_out)) (Liu et al. 2025: AdamW's
  update RMS); every other leaf passes through unchanged and keeps no
  momentum. optax.contrib.scale_by_muon + scale_by_shape, with our
  Newton-Schulz."""

  def init(params):
    mu = jax.tree.map(
        lambda d, p: jnp.zeros((), p.dtype) if d is None
        else jnp.zeros_like(p), dims_fn(params), params, is_leaf=_is_dims)
    return dict(count=jnp.zeros([], jnp.int32), mu=mu)

  def update(updates, state, params=None):
    del params
    count = state["count"] + 1
    bc = lambda k: 1 - beta ** k.astype(jnp.float32)  # noqa: E731
    dims = dims_fn(updates)
    mu = jax.tree.map(lambda d, g, m: m if d is None
                      else beta * m + (1 - beta) * g,
                      dims, updates, state["mu"], is_leaf=_is_dims)

    def direction(d, g, m):
      if d is None:
        return g
      nesterov = beta * m / bc(count + 1) + (1 - beta) * g / bc(count)
      x, back, fan_in, fan_out = _as_matrices(nesterov, d)
      scale = consistent_rms * max(fan_in, fan_out) ** 0.5
      return back(newton_schulz(x, ns_steps)) * scale

    new = jax.tree.map(direction, dims, updates, mu, is_leaf=_is_dims)
    return new, dict(count=count, mu=mu)

  return optax.GradientTransformation(init, update)


def make_optimizer(lr: Any, *, grad_clip: float, b2: float,
                   weight_decay: float = 0.0, kind: str = "adamw",
                   logical: Any = None) -> optax.GradientTransformation:
  """Every trainer's optimiser: global-norm clipping, then AdamW
  (`kind='adamw'`) or Muon (`kind='muon'`: momentum orthogonalised by
  Newton-Schulz on the layer-stacked matrices of `muon_dims`, update RMS
  matched to AdamW's, `consistent_rms=0.2`, so one learning rate serves
  both; AdamW (Nesterov, as optax.contrib.muon's) with the same schedule on
  the rest -- optax.contrib.muon's update, with `newton_schulz` on the Gram
  matrix where that is cheaper). `lr`: a float or an optax schedule;
  `logical`: the params' logical names when the params are plain arrays
  (see sharding.tree_logical_specs)."""
  if kind == "adamw":
    inner = optax.adamw(lr, b2=b2, weight_decay=weight_decay)
  elif kind == "muon":
    def dims(params):
      out = muon_dims(params, logical)
      if all(d is None for d in jax.tree.leaves(out, is_leaf=_is_dims)):
        raise ValueError(
            "optimizer='muon' found no layer-stacked matrix (logical names "
            "(layers, embed, ...) or (layers, ..., embed)) among the "
            "parameters; use optimizer='adamw' for this model")
      return out

    def labels(params):
      return jax.tree.map(lambda d, _: "adam" if d is None else "muon",
                          dims(params), params, is_leaf=_is_dims)

    inner = optax.chain(muon_direction(dims), optax.partition(
        {"muon": optax.chain(optax.add_decayed_weights(weight_decay),
                             optax.scale_by_learning_rate(lr)),
         "adam": optax.adamw(lr, b2=b2, weight_decay=weight_decay,
                             nesterov=True)}, labels))
  else:
    raise ValueError(f"unknown optimizer {kind!r}; one of {OPTIMIZERS}")
  return optax.chain(optax.clip_by_global_norm(grad_clip), inner)


def value_and_grad(fn: Callable, params: Any, batch: Any,
                   microbatches: int = 1) -> tuple[tuple[Any, Any], Any]:
  """((loss, aux), grads) of fn(params, batch) -> (loss, aux), over
  `microbatches` contiguous equal slices of every batch leaf's leading axis
  in a lax.scan: the means of the slices' losses, aux and gradients. For a
  loss that is a mean over rows this is the whole batch's gradient up to
  float order, with a slice's activations in memory instead of the batch's
  (docs/reward_models.md, "Microbatches"). None leaves pass through."""
  grad_fn = jax.value_and_grad(fn, has_aux=True)
  if microbatches < 1:
    raise ValueError(f"train.microbatches={microbatches}: use 1 or more")
  if microbatches == 1:
    return grad_fn(params, batch)

  def split(x):
    if x.shape[0] % microbatches:
      raise ValueError(
          f"train.microbatches={microbatches} does not divide a batch leaf "
          f"of shape {x.shape}; use a divisor of the batch size")
    return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])

  slices = jax.tree.map(split, batch)
  one = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], slices))
  total, _ = jax.lax.scan(
      lambda acc, b: (jax.tree.map(jnp.add, acc, grad_fn(params, b)), None),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), one), slices)
  return jax.tree.map(lambda x: x / microbatches, total)


def apply_gradients(state: dict, grads: Any, opt: Any,
                    ema_decay: float | None = None,
                    loss: jax.Array | None = None) -> tuple[dict, jax.Array]:
  """The optimiser update of a train state {params, opt, step[, ema]}.

  Every trainer's step ends here, so the update (and the EMA, when the state
  has one) is written once. A non-finite loss or gradient skips the update
  (params, optimiser and EMA stay as they were; `step` still advances):
  returns (new state, skipped: bool scalar).
  """
  skipped = ~jnp.isfinite(optax.tree.norm(grads))
  if loss is not None:
    skipped |= ~jnp.isfinite(loss)
  updates, opt_state = opt.update(grads, state["opt"], state["params"])
  new = dict(state, params=optax.apply_updates(state["params"], updates),
             opt=opt_state)
  if "ema" in state:
    new["ema"] = ema_update(state["ema"], new["params"], state["step"],
                            ema_decay)
  keep = lambda n, o: jnp.where(skipped, o, n)  # noqa: E731
  new = {k: (v if k == "step" else jax.tree.map(keep, v, state[k]))
         for k, v in new.items()}
  new["step"] = state["step"] + 1
  return new, skipped


def ema_update(ema: Any, params: Any, step: jax.Array,
               decay: float) -> Any:
  """EMA with warm-up: decay_t = min(decay, (1 + t) / (10 + t)).

  The warm-up keeps early EMA weights close to the live ones, so short runs
  (CPU smoke configs) still evaluate a trained model.
  """
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


# ---------------------------------------------------------------- sharding


def sharded_init(config: ml_collections.ConfigDict, init_fn: Callable[[], Any],
                 logical: Any = None, abstract: bool = False
                 ) -> tuple[Any, Any, Any, Any]:
  """(state, shardings, mesh, rules) of a trainer: `init_fn()` initialised
  directly sharded on the config's mesh (`config.mesh.shape`, default
  (-1, 1, 1): data parallel over every device) under its rules
  (`config.sharding_rules`, default sharding.DEFAULT_RULES); abstract=True:
  only its shapes and shardings (sharding.init_sharded)."""
  from rd_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  state, shardings = sharding.init_sharded(init_fn, mesh, rules, logical,
                                           abstract)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  return state, shardings, mesh, rules


def jit_step(step: Callable, mesh: Any, state_shardings: Any,
             frozen: Any = None) -> Callable:
  """step(state, batch, rng) -> (state, metrics), jitted with the state's
  shardings kept and its buffers donated. With `frozen` (arrays already on
  the mesh, e.g. a reward model's params), `step(state, batch, rng, frozen)`
  gets them as an argument on every call rather than as constants baked
  into the program."""
  with jax.set_mesh(mesh):
    fn = jax.jit(step, out_shardings=(state_shardings, None),
                 donate_argnums=0)
  if frozen is None:
    return fn
  return lambda state, batch, rng: fn(state, batch, rng, frozen)


# ---------------------------------------------------------------- train loop


class NonFiniteError(RuntimeError):
  """Too many non-finite losses/gradients in a row (see train_loop)."""


class LossLog:
  """`losses.jsonl`: one JSON line per step {step, loss, ...}.

  Opened at the resumed step: lines past it (steps a killed run had done
  after its last checkpoint, or a half-written last line) are dropped, so
  the file always equals an uninterrupted run's. Process 0 writes it (the
  metrics are global: every process has the same).
  """

  def __init__(self, path: str, start: int):
    self.path = path
    # After a line cut by a kill everything is stale; so are later steps.
    kept = [r for r in read_jsonl(path) if r["step"] <= start]
    self.last = kept[-1] if kept else None
    self._f = None
    if jax.process_index() == 0:
      with open(f"{path}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(f"{path}.tmp", path)
      self._f = open(path, "a")

  def append(self, step: int, metrics: dict[str, Any]) -> None:
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    if self._f is not None:
      self._f.write(json.dumps(row) + "\n")
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()


class _PreemptionWatch:
  """SIGTERM, or Orbax's preemption notice (TPU maintenance events), asks
  the loop to save and stop after the current step."""

  def __init__(self, ckpt: Checkpointer):
    self.ckpt, self.signalled, self._prev = ckpt, False, None
    try:
      self._prev = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread: no handler, Orbax's notice only
      pass

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled = True

  def __call__(self, step: int) -> bool:
    stop = self.signalled
    if jax.process_count() > 1:  # every host stops at the same step
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop or self.ckpt.manager.reached_preemption(step)

  def close(self) -> None:
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)


def train_loop(state: dict, step_fn: Callable, data: Iterator, *,
               steps: int, rng: jax.Array, ckpt: Checkpointer,
               writer: MetricWriter, workdir: str,
               make_batch: Callable[[dict], Any] = lambda b: b,
               on_step: Callable[[int, dict], None] | None = None,
               max_nonfinite: int = 20, log_every: int = 50,
               name: str = "train") -> tuple[dict, dict]:
  """Runs (or resumes) steps [latest checkpoint, steps) of one trainer.

  step_fn(state, batch, rng) -> (state, metrics) with metrics["skipped"]
  from apply_gradients; rng for step s is fold_in(rng, s), so a resumed run
  draws what an uninterrupted one would. `data` is a grain iterator (its
  position is checkpointed with the state); `make_batch` turns its numpy
  batch (with record "id"s) into step_fn's input. `on_step(step, state)`
  runs after every step (periodic evaluation).

  Every step's metrics go to WORKDIR/losses.jsonl (one step late, so the host
  never waits on the step it just dispatched). On SIGTERM or a preemption
  notice: save at the current step and return with info["preempted"]. After
  `max_nonfinite` skipped (non-finite) updates in a row: save the last good
  state and raise NonFiniteError naming the steps and record ids.

  Returns (state, info): info = {start, preempted, first_loss, last_loss,
  skipped (non-finite steps seen by this process)}.
  """
  start = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), state)
    state, start = ckpt.restore(abstract, data)
    logging.info("%s: resumed from step %d (%s)", name, start,
                 ckpt.directory)
  log = LossLog(os.path.join(workdir, "losses.jsonl"), start)
  progress = Progress(steps, writer, first_step=start, every=log_every,
                      name=name)
  watch = _PreemptionWatch(ckpt)
  done = log.last["loss"] if log.last else None  # if nothing is left to run
  info = {"start": start, "preempted": False, "first_loss": done,
          "last_loss": done, "skipped": 0}
  bad_run = collections.deque()  # (step, record ids) of consecutive skips

  def finish(step: int, metrics: dict, ids) -> None:
    metrics = jax.device_get(metrics)
    log.append(step, metrics)
    progress(step, metrics)
    loss = float(metrics["loss"])
    if step == start + 1:
      info["first_loss"] = loss
    info["last_loss"] = loss
    if not metrics["skipped"]:
      bad_run.clear()
      return
    info["skipped"] += 1
    bad_run.append((step, ids))
    logging.warning("%s step %d: non-finite loss or gradient (loss=%s); "
                    "update skipped (%d in a row)", name, step, loss,
                    len(bad_run))
    if len(bad_run) >= max_nonfinite:
      raise NonFiniteError(
          f"{len(bad_run)} non-finite losses or gradients in a row (steps "
          f"{bad_run[0][0]}-{bad_run[-1][0]}; record ids of step "
          f"{bad_run[-1][0]}: {list(np.asarray(bad_run[-1][1]).tolist())}); "
          f"their updates were skipped")

  pending = None
  try:
    for step in range(start, steps):
      raw = next(data)
      state, metrics = step_fn(state, make_batch(raw),
                               jax.random.fold_in(rng, step))
      if pending is not None:
        finish(*pending)
      pending = (step + 1, metrics, raw.get("id"))
      ckpt.save(step + 1, state, data)
      if on_step is not None:
        on_step(step + 1, state)
      if watch(step + 1):
        finish(*pending)
        pending = None
        ckpt.save(step + 1, state, data, force=True)
        info["preempted"] = True
        logging.warning(
            "%s: preempted: saved step %d to %s; rerun the same command to "
            "resume", name, step + 1, ckpt.directory)
        break
    if pending is not None:
      finish(*pending)
    if not info["preempted"] and ckpt.latest_step() != steps:
      ckpt.save(steps, state, data, force=True)
  except NonFiniteError as e:
    # Skipped updates left the state as it was: that is the last good one.
    done = int(state["step"])
    ckpt.save(done, state, data, force=True)
    ckpt.wait()
    raise NonFiniteError(
        f"{e}. The last good state is saved at step {done} in "
        f"{ckpt.directory}: lower the learning rate or check those records, "
        f"then rerun to resume (train.max_nonfinite={max_nonfinite} sets "
        f"the limit)") from None
  finally:
    ckpt.wait()
    log.close()
    watch.close()
  return state, info


# ---------------------------------------------------------------- processes


def _job(conn, verbosity: int, fn: Callable, args: tuple) -> None:
  """A run_in_processes job: sends (True, fn(*args)) or (False, traceback)."""
  # A spawned process: absl parsed no flags here (the parent did).
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(verbosity)
  try:
    conn.send((True, fn(*args)))
  except BaseException:  # pylint: disable=broad-except
    conn.send((False, traceback.format_exc()))
    sys.exit(1)
  finally:
    conn.close()


def run_in_processes(fn: Callable, jobs: dict[str, tuple]) -> dict[str, Any]:
  """{name: fn(*args)} for jobs {name: args}, run side by side, each in a
  new (spawned) Python process: `fn` must be importable, args and results
  picklable. SIGTERM to this process is passed to every job (a train_loop
  saves and returns preempted); a job that fails stops the others the same
  way, and its traceback is raised here (RuntimeError)."""
  ctx = multiprocessing.get_context("spawn")
  procs, names = {}, {}
  for name, args in jobs.items():
    recv, send = ctx.Pipe(duplex=False)
    procs[name] = ctx.Process(target=_job, name=name, args=(
        send, logging.get_verbosity(), fn, args))
    procs[name].start()
    send.close()
    names[recv] = name

  def stop(*_):
    for p in procs.values():
      if p.is_alive():
        p.terminate()  # SIGTERM

  prev = None
  if threading.current_thread() is threading.main_thread():
    prev = signal.signal(signal.SIGTERM, stop)
  out, failed = {}, None
  try:
    while names:
      for conn in multiprocessing.connection.wait(list(names)):
        name = names.pop(conn)
        try:
          ok, value = conn.recv()
        except EOFError:
          procs[name].join()
          ok, value = False, (f"its process ended (exit code "
                              f"{procs[name].exitcode}) before it returned")
        if ok:
          out[name] = value
        elif failed is None:
          failed = (name, value)
          stop()
  finally:
    for p in procs.values():
      p.join()
    if prev is not None:
      signal.signal(signal.SIGTERM, prev)
  if failed:
    raise RuntimeError(f"{failed[0]} failed in its own process (run_in_"
                       f"processes); its error:\n{failed[1]}")
  return out
