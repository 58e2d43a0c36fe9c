r"""Time a job's real training step on this machine's devices: step time,
throughput and MFU.

  python -m rd_jax.bench --config=configs/rm_shapes.py --steps=50
  python -m rd_jax.bench --config=configs/rm_shapes.py:size=1b --batch=8 \
      --remat=full --steps=10 --matmul=8192 --out=/tmp/bench_rm1b.json

The step is the one `rd_jax.aot` compiles for a TPU topology (same flags:
--config, --job, --rm_config, --batch, --remat, --mesh, --out, --hlo_out;
--topology is not used; --batch=0, the default, is the trainer's batch),
here compiled for and run on the local devices (`jax.devices()`, mesh
--mesh, default FSDP over all of them) with the real initial state
(`Job.init`) and a synthetic batch of the right shapes (token ids 0, masks
True, random images). Prints and writes JSON: `compile_s`; `step_s` (mean
of --steps timed steps after --warmup untimed ones, with one sync at the
end, so the host's dispatch overlaps the device as in the trainers);
`steps_per_s`; `model_flops` and `hlo_flops` per step (rd_jax.aot's two
counts: 6 x parameters x the tokens they see + attention, and the compiled
program's dot FLOPs with loop trips, i.e. with remat recompute and the
optimiser's own matmuls); `mfu` = model FLOPs / (devices x
peak x step_s) and `hfu` the same with HLO FLOPs, against `peak_tflops`
(the device kind's dense bf16 datasheet peak, --peak_tflops to override,
none known for CPUs); `peak_gib` (the device allocator's high-water mark,
where the backend reports one); with --matmul=N, the rate of an N x N x N
bf16 matmul on one device (`matmul_tflops`), the ceiling this machine
actually reaches. With --profile_top=N, the timed steps run under
`jax.profiler` and the N compiled ops with the most time per step are
printed and reported (`profile_top`: [ms per step, op name]); their names
are those of `--hlo_out`'s HLO, and `step_s` then includes the tracer's
overhead. Like the trainers, it restarts itself once with glibc malloc
tunables (`cli.tune_malloc`; `RD_JAX_TUNE_MALLOC=0` times glibc's
defaults).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from rd_jax import aot, cli, sharding, train_util

FLAGS = aot.FLAGS
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps", flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps after compiling",
                               flag_values=FLAGS)
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "peak bf16 TFLOP/s per "
                           "device for MFU; 0 = from the device kind",
                           flag_values=FLAGS)
_MATMUL = flags.DEFINE_integer("matmul", 0, "also time an N^3 bf16 matmul "
                               "(0 = no)", flag_values=FLAGS)
_PROFILE_TOP = flags.DEFINE_integer(
    "profile_top", 0, "profile the timed steps and report the N ops with "
    "the most time per step (0 = no profile)", flag_values=FLAGS)

# Dense bf16 datasheet peak per device (jax's device_kind), FLOP/s.
PEAK = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,
        "TPU v5": aot.CHIPS["v5p"]["peak"], "TPU v5p": aot.CHIPS["v5p"]["peak"],
        "TPU v5 lite": aot.CHIPS["v5e"]["peak"],
        "TPU v6 lite": aot.CHIPS["v6e"]["peak"]}


def synthetic(tree, shardings, seed: int = 0):
  """Arrays for a pytree of ShapeDtypeStructs: ints 0, bools True, uint8
  random, floats N(0, 1), PRNG keys key(seed); placed as `shardings`."""
  rs = np.random.default_rng(seed)

  def make(x, s):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(jax.random.key(seed), s)
    if x.dtype == jnp.uint8:
      v = rs.integers(0, 256, x.shape, dtype=np.uint8)
    elif x.dtype == jnp.bool_:
      v = np.ones(x.shape, bool)
    elif jnp.issubdtype(x.dtype, jnp.integer):
      v = np.zeros(x.shape, x.dtype)
    else:
      v = rs.standard_normal(x.shape).astype(x.dtype)
    return jax.device_put(v, s)

  return jax.tree.map(make, tree, shardings)


def matmul_tflops(n: int, reps: int = 10) -> float:
  """TFLOP/s of an n x n x n bf16 matmul on the first device (random data,
  mean of `reps` after a warm-up)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def top_ops(trace_dir: str, steps: int, n: int, hlo_text: str
            ) -> list[list]:
  """The n ops of the compiled step (instructions of `hlo_text`) with the
  most time per step in a jax.profiler trace of `steps` steps (its
  perfetto JSON): [[ms per step, name], ...]."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"),
                    recursive=True)
  if not files:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  ops = set(re.findall(r"%([^\s=]+) = ", hlo_text))
  total = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and e.get("name") in ops:
      total[e["name"]] += e["dur"]
  return [[round(us / steps / 1e3, 3), name]
          for name, us in total.most_common(n)]


def bench(job: aot.Job, mesh, rules, steps: int, warmup: int,
          peak: float = 0.0, hlo_out: str = "", profile_top: int = 0
          ) -> dict:
  """Compiles `job` for `mesh`, runs warmup + steps updates, returns the
  report (see the module docstring); writes the optimised HLO to
  `hlo_out` if given; profiles the timed steps if profile_top > 0."""
  _, rest_sh = aot.placements(job, mesh, rules)
  state, _ = sharding.init_sharded(job.init, mesh, rules, job.logical)
  rest = [sharding.init_sharded(job.param_init, mesh, rules, job.logical)[0]
          if i in job.param_args else synthetic(r, s, seed=i)
          for i, (r, s) in enumerate(zip(job.rest, rest_sh))]
  t0 = time.perf_counter()
  compiled = aot.compile_step(job, mesh, rules, [state, *rest])
  compile_s = time.perf_counter() - t0
  hlo_text = aot.compiled_text(compiled, hlo_out)
  hlo = aot.hlo_flops(hlo_text)
  for _ in range(warmup):
    state, metrics = compiled(state, *rest)
  jax.block_until_ready((state, metrics) if warmup else state)
  trace_dir = tempfile.mkdtemp(prefix="rd_jax_bench_") if profile_top else ""
  if trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, *rest)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / steps
  if trace_dir:
    jax.profiler.stop_trace()
  n_dev = mesh.devices.size
  dev = mesh.devices.flat[0]
  peak = peak or PEAK.get(dev.device_kind, 0.0)
  stats = dev.memory_stats() or {}
  report = dict(
      device=dev.device_kind, platform=dev.platform, devices=n_dev,
      mesh=dict(mesh.shape), describe=job.describe, remat=job.remat,
      params=aot.n_params(job.state["params"]),
      compile_s=round(compile_s, 1), warmup=warmup, steps=steps,
      step_s=step_s, steps_per_s=1.0 / step_s,
      final_step=int(state["step"]), loss=float(metrics["loss"]),
      model_flops=job.model_flops, hlo_flops=hlo * n_dev,
      model_tflops_per_s=job.model_flops / step_s / 1e12,
      peak_tflops=peak / 1e12 or None,
      mfu=(round(job.model_flops / (n_dev * peak * step_s), 4)
           if peak and job.static_loops else None),
      hfu=(round(hlo / (peak * step_s), 4)
           if peak and job.static_loops else None),
      peak_gib=(round(stats["peak_bytes_in_use"] / 2**30, 2)
                if "peak_bytes_in_use" in stats else None))
  if trace_dir:
    report["profile_top"] = top_ops(trace_dir, steps, profile_top, hlo_text)
    shutil.rmtree(trace_dir, ignore_errors=True)
  return report


def default_batch(config, job: str, devices: int) -> int:
  """The trainer's batch: train.batch_size (RM) or the first stage's
  batch_size (generator); one per device for ReFL."""
  if job in ("auto", "rm") and "rm" in config:
    return config.train.batch_size
  if job in ("auto", "generator") and "stages" in config:
    return config[config.stages[0]].batch_size
  return devices


def main(argv) -> dict:
  FLAGS(argv)
  if FLAGS.config is None:
    raise app.UsageError("--config is required")
  flags.FLAGS.mark_as_parsed()
  config = FLAGS.config
  mesh = sharding.make_mesh(tuple(int(x) for x in FLAGS.mesh.split(",")))
  batch = FLAGS.batch or default_batch(config, FLAGS.job, mesh.devices.size)
  job = aot.make_job(config, FLAGS.job, batch, FLAGS.remat, FLAGS.rm_config)
  report = bench(job, mesh, sharding.rules_from_config(config), _STEPS.value,
                 _WARMUP.value, _PEAK.value * 1e12, FLAGS.hlo_out,
                 _PROFILE_TOP.value)
  report["batch"] = batch
  if _MATMUL.value:
    report["matmul_tflops"] = round(matmul_tflops(_MATMUL.value), 1)
  print(json.dumps(report, indent=2))
  if FLAGS.out:
    train_util.write_json(FLAGS.out, report)
  return report


if __name__ == "__main__":
  cli.tune_malloc()  # the trainers' malloc settings (cli.run)
  main(sys.argv)
