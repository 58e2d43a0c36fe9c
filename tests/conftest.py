"""Test setup: CPU only (libtpu is installed for AOT compiles, not to run)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
