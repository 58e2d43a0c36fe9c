"""Test setup: CPU only (libtpu is installed for AOT compiles, not to run).

Compiling, not running, is most of the suite's time on CPU, so the tests
(and the trainers they start as subprocesses, which inherit this
environment) compile with XLA:CPU's LLVM optimisations off, and the
subprocesses share a persistent compilation cache: a rerun of the same
trainer command (tests/test_faults.py restarts one three times) loads its
programs instead of compiling them again. Both change speed, and at most
floating-point rounding: every comparison (bit-exact resumes, sharded vs one
device, parity with torch) is between runs under the same flags or within
the tests' tolerances. jax reads the JAX_* variables when imported, XLA
reads XLA_FLAGS when the first backend starts (rd_jax.cli.fast_compile).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="rd_jax_tests_jit_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import rm_runs  # noqa: E402  (imports jax: after the JAX_* variables)
from rd_jax import cli  # noqa: E402

cli.add_fast_compile_flags()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_tiny(tmp_path_factory):
  """A tiny ShapesWorld (ArrayRecord + tokenizer), built once per test run."""
  from rd_jax.data import pipeline
  data_dir = str(tmp_path_factory.mktemp("shapes_tiny"))
  pipeline.build(data_dir, "tiny", log=lambda *_: None)
  return data_dir


@pytest.fixture(scope="session")
def rm_reference(shapes_tiny, tmp_path_factory):
  """Workdir of one uninterrupted single-device smoke run of train_rm."""
  workdir = str(tmp_path_factory.mktemp("rm_reference"))
  rm_runs.run(shapes_tiny, workdir)
  return workdir


@pytest.fixture(scope="session")
def demo_smoke(shapes_tiny, tmp_path_factory):
  """(config, workdir, final_metrics) of the main job's smoke run
  (configs/demo.py:smoke) on the tiny ShapesWorld. Its stages' workdirs are
  the trained smoke models other tests use (gen_smoke, test_reward_train,
  test_refl), so the suite trains each only once."""
  from configs import demo
  from rd_jax import main
  config = demo.get_config("smoke")
  config.data_dir = shapes_tiny
  workdir = str(tmp_path_factory.mktemp("demo"))
  return config, workdir, main.run(config, workdir)


@pytest.fixture(scope="session")
def gen_smoke(demo_smoke):
  """(config, workdir, metrics) of the main job's generator SFT stage."""
  from rd_jax import main
  config, workdir, final = demo_smoke
  return (main.job_config(config, "generator", workdir),
          os.path.join(workdir, "generator"), final["generator"])
