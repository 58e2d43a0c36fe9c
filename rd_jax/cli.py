"""The flags every `python -m rd_jax.<job>` entry point shares, and `run`.

Defined once here, so entry points can import each other (main runs the
trainers; tests import them all) without absl's duplicate-flag error.

    --config=configs/NAME.py[:key=value,...]   plus --config.key=value
    --workdir=DIR

A config with `fast_compile=True` (configs/demo.py:smoke) compiles with
XLA:CPU's LLVM optimisations off (FAST_COMPILE): tiny models spend most of
their time compiling, not running. The test suite uses the same flags.

    if __name__ == "__main__":
      cli.run(main)      # app.run with both flags required
"""
from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rd_jax import config_util

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/NAME.py[:key=value,...].")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and outputs are written.")


# XLA:CPU compiles several times faster without its LLVM optimisations; the
# programs run slower, which tiny smoke models do not notice.
FAST_COMPILE = ("--xla_backend_optimization_level=0",
                "--xla_llvm_disable_expensive_passes=true")


def add_fast_compile_flags() -> str:
  """Appends FAST_COMPILE (those not there yet) to the XLA_FLAGS variable,
  which XLA reads once, when the first backend starts; -> the new value.
  The test suite calls it (tests/conftest.py), as does `fast_compile`."""
  flags_now = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(
      flags_now + [f for f in FAST_COMPILE if f not in flags_now])
  return os.environ["XLA_FLAGS"]


def fast_compile(config) -> None:
  """add_fast_compile_flags() if `config.fast_compile` is set; call it
  before any computation (it warns and does nothing after)."""
  if not config.get("fast_compile", False):
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning("fast_compile ignored: a JAX backend already started")
    return
  logging.info("fast_compile: XLA_FLAGS=%s", add_fast_compile_flags())


def run(main, required=("config", "workdir")) -> None:
  """app.run(main) with `required` flags and one-line config errors; joins
  a multi-process run first (sharding.initialize_distributed: a no-op for
  one process) and applies `config.fast_compile`."""
  flags.mark_flags_as_required(list(required))

  def with_distributed(argv):
    fast_compile(CONFIG.value)
    from rd_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.initialize_distributed(CONFIG.value)
    return main(argv)

  app.run(with_distributed, flags_parser=_parse)


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e))
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    _fail(unknown_config_key(argv) or f"{type(e).__name__}: {e}")


def _fail(msg: str) -> None:
  sys.stderr.write(f"FATAL Flags parsing error: {msg}\n")
  sys.exit(1)


def _leaf_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out += _leaf_keys(v, f"{prefix}{k}.")
  return out


def unknown_config_key(argv: list[str]) -> str | None:
  """The message for the first `--config.KEY=` naming no key of the config
  file given by --config (closest key suggested), else None."""
  path = next((a.split("=", 1)[1] for a in argv
               if a.startswith("--config=")), None)
  if path is None:
    return None
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_rd_jax_config", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  known = _leaf_keys(config)
  for a in argv:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      if key not in known:
        return (f"unknown config key {key!r} in {a!r}"
                f"{config_util.suggest(key, known)}")
  return None
