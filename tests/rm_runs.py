"""Runs of `python -m rd_jax.train_rm` on the smoke config, as a user would
type them (used by test_faults and test_scale_out)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def start(data_dir: str, workdir: str, *extra: str, devices: int = 1):
  """Starts the trainer (smoke config, STEPS steps, a checkpoint every
  step, no final evaluation); returns the Popen (stdout + stderr as text on
  .stdout)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, "-m", "rd_jax.train_rm",
         "--config=configs/rm_shapes.py:smoke",
         f"--config.data_dir={data_dir}", f"--workdir={workdir}",
         f"--config.train.steps={STEPS}", "--config.ckpt_every=1",
         "--config.eval_every=1000", "--config.final_eval_pairs=0", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(data_dir: str, workdir: str, *extra: str, devices: int = 1) -> str:
  p = start(data_dir, workdir, *extra, devices=devices)
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
