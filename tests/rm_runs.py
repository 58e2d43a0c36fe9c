"""Runs of `python -m rd_jax.train_rm` on the smoke config, as a user would
type them (used by test_faults and test_scale_out)."""
import json
import os
import subprocess
import sys

from rd_jax.cli import FAST_COMPILE  # the suite's XLA flags (conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def env(devices: int | None = None, tpu_compile: bool = False,
        **extra: str) -> dict:
  """The environment of a test subprocess: CPU, this repo importable, the
  suite's XLA flags and compilation cache (conftest.py) plus `devices` fake
  CPU devices. `tpu_compile` (rd_jax.aot) drops both: a TPU program is
  compiled exactly as a user's would be, and not cached."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH"))
                         if p)
  e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
           PYTHONPATH=path, **extra)
  if tpu_compile:
    e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split()
                              if f not in FAST_COMPILE)
    e.pop("JAX_COMPILATION_CACHE_DIR", None)
  if devices and devices > 1:
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                      f"device_count={devices}").strip()
  return e


def start(data_dir: str, workdir: str, *extra: str, devices: int = 1,
          ckpt_every: int = 1, stdout=subprocess.PIPE, **env_extra: str):
  """Starts the trainer (smoke config, STEPS steps, a checkpoint every
  `ckpt_every` steps and at the end, no final evaluation); returns the
  Popen (stdout + stderr as text on .stdout, or into the file `stdout`:
  processes that wait on each other must not block on a full pipe);
  `env_extra` adds environment variables."""
  cmd = [sys.executable, "-m", "rd_jax.train_rm",
         "--config=configs/rm_shapes.py:smoke",
         f"--config.data_dir={data_dir}", f"--workdir={workdir}",
         f"--config.train.steps={STEPS}", f"--config.ckpt_every={ckpt_every}",
         "--config.eval_every=1000", "--config.final_eval_pairs=0", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env(devices, **env_extra),
                          stdout=stdout, stderr=subprocess.STDOUT, text=True)


def run(data_dir: str, workdir: str, *extra: str, devices: int = 1,
        ckpt_every: int = 1) -> str:
  p = start(data_dir, workdir, *extra, devices=devices, ckpt_every=ckpt_every)
  out = p.communicate()[0]
  assert p.returncode == 0, out
  return out


def losses(workdir: str) -> list[dict]:
  """The complete lines of WORKDIR/losses.jsonl."""
  path = os.path.join(workdir, "losses.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(x) for x in f if x.endswith("\n")]
