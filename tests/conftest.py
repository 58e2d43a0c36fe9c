"""Test setup: CPU only (libtpu is installed for AOT compiles, not to run)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
  import rm_runs
  workdir = str(tmp_path_factory.mktemp("rm_reference"))
  rm_runs.run(shapes_tiny, workdir)
  return workdir


@pytest.fixture(scope="session")
def gen_smoke(shapes_tiny, tmp_path_factory):
  """(config, workdir, metrics) of one smoke run of the generator SFT."""
  from configs import generator_shapes
  from rd_jax import train_generator
  cfg = generator_shapes.get_config("smoke")
  cfg.data_dir = shapes_tiny
  workdir = str(tmp_path_factory.mktemp("gen"))
  return cfg, workdir, train_generator.train_and_evaluate(cfg, workdir)
