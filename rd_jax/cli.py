"""The flags every `python -m rd_jax.<job>` entry point shares, and `run`.

Defined once here, so entry points can import each other (main runs the
trainers; tests import them all) without absl's duplicate-flag error.

    --config=configs/NAME.py[:key=value,...]   plus --config.key=value
    --workdir=DIR

Before anything else, `run` restarts the process once with glibc malloc
tunables (`tune_malloc`; `RD_JAX_TUNE_MALLOC=0` turns it off).

A config with `fast_compile=True` (configs/demo.py:smoke) compiles with
XLA:CPU's LLVM optimisations off (FAST_COMPILE): tiny models spend most of
their time compiling, not running. The test suite uses the same flags.

    if __name__ == "__main__":
      cli.run(main)      # app.run with both flags required
"""
from __future__ import annotations

import importlib.util
import os
import platform
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


# glibc malloc for XLA:CPU, whose every step allocates and frees its
# buffers: keep freed memory for the next step (no trimming, no mmap per
# large buffer) and back it with transparent huge pages. With glibc's
# defaults each step faulted its buffers in afresh (a 125-step bench run
# of the default RM: 4.6M page faults, 0.13M with these); the RM step
# went 105 -> 92 ms, the image generator's 67 -> 55 ms (README, "On this
# 2-core CPU").
MALLOC_TUNABLES = {"glibc.malloc.hugetlb": "1",
                   "glibc.malloc.mmap_threshold": str(1 << 30),
                   "glibc.malloc.trim_threshold": str(1 << 30),
                   "glibc.malloc.top_pad": str(256 << 20)}
_TUNED = "RD_JAX_MALLOC_TUNED"  # set in the restarted process


def malloc_env(env: dict[str, str]) -> dict[str, str] | None:
  """`env` with MALLOC_TUNABLES added to GLIBC_TUNABLES (a tunable already
  set there keeps its value), or None: nothing to add, RD_JAX_TUNE_MALLOC=0,
  or already restarted."""
  if env.get("RD_JAX_TUNE_MALLOC", "1") == "0" or env.get(_TUNED):
    return None
  have = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  names = {t.split("=", 1)[0] for t in have}
  add = [f"{k}={v}" for k, v in MALLOC_TUNABLES.items() if k not in names]
  if not add:
    return None
  return dict(env, GLIBC_TUNABLES=":".join(have + add), **{_TUNED: "1"})


def tune_malloc() -> None:
  """Restarts this process (same pid and command line) with malloc_env's
  GLIBC_TUNABLES, which glibc reads only at start; on Linux with glibc,
  once. Call it first thing in an entry point: what ran before runs again."""
  env = malloc_env(dict(os.environ))
  if (env is None or not sys.platform.startswith("linux")
      or platform.libc_ver()[0] != "glibc"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def run(main, required=("config", "workdir")) -> None:
  """app.run(main) with `required` flags and one-line config errors; joins
  a multi-process run first (sharding.initialize_distributed: a no-op for
  one process) and applies `config.fast_compile`. Restarts the process
  once first (`tune_malloc`)."""
  tune_malloc()
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
