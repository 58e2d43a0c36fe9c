"""The flags every `python -m rd_jax.<job>` entry point shares.

Defined once here, so entry points can import each other (main runs the
trainers; tests import them all) without absl's duplicate-flag error.

    --config=configs/NAME.py[:key=value,...]   plus --config.key=value
    --workdir=DIR
"""
from absl import flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/NAME.py[:key=value,...].")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, metrics and outputs are written.")
