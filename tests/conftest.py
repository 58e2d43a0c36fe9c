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
