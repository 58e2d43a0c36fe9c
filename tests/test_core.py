"""Config argument parsing, the mesh / logical-axis rules, the metrics writer."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rd_jax import cli, config_util, sharding


def test_parse_arg_types_and_bare_flags():
  c = config_util.parse_arg("size=26b,smoke,steps=7", size="tiny", smoke=False,
                            steps=100)
  assert (c.size, c.smoke, c.steps) == ("26b", True, 7)


def test_parse_arg_unknown_key_suggests_closest():
  with pytest.raises(KeyError, match="unknown config argument 'smok'; did you "
                     "mean 'smoke'"):
    config_util.parse_arg("smok", smoke=False, size="tiny")


def test_logical_rules_map_and_drop_unused_axes():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # a mesh axis is used once per spec: heads takes tensor, mlp gets nothing
  assert sharding.logical_to_mesh(("heads", "mlp"), rules) == P("tensor", None)
  mesh = sharding.make_mesh((-1, 1, 1))  # size-1 axes are dropped
  assert sharding.logical_to_mesh(("act_batch", "embed"), rules, mesh) == (
      P("data", None) if mesh.shape["data"] > 1 else P(None, None))
  with pytest.raises(KeyError, match="logical axis 'nonsense' has no rule"):
    sharding.logical_to_mesh(("nonsense",), rules)


def test_mesh_that_does_not_fit_the_devices_fails_clearly():
  n = len(jax.devices())
  with pytest.raises(ValueError, match=f"mesh shape \\(3, {n}, 1\\) needs "
                     f"{3 * n} devices but {n} are available"):
    sharding.make_mesh((3, n, 1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((-1, -1, 1))


def test_metric_writer_events_read_back_in_tensorboard(tmp_path):
  """The trainers' event files (written without TensorFlow) are what
  TensorBoard reads: every scalar at its step."""
  from tensorboard.backend.event_processing import event_accumulator
  from rd_jax import train_util
  assert train_util.crc32c(b"123456789") == 0xE3069283  # RFC 3720's check
  w = train_util.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"train/loss": 1.5, "eval/acc": 0.25})
  w.write_scalars(7, {"train/loss": np.float32(0.5)})
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["eval/acc", "train/loss"]
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (3, 1.5), (7, 0.5)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/acc")] == [(3, 0.25)]


# Flags README shows that no config has, on purpose: placeholders, the
# mistyped-key example, and options of past experiments since removed.
_README_NOT_KEYS = {"KEY", "key", "trian.steps", "refl.reward_shift",
                    "rm.model.vision.pos_init"}


def test_every_config_flag_in_readme_is_a_config_key():
  import importlib, pathlib, re  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[1]
  flags = set(re.findall(r"--config\.([A-Za-z_][\w.]*\w)",
                         (root / "README.md").read_text()))
  # The keys the CLI accepts as --config.KEY (cli.unknown_config_key).
  known = set().union(*(
      cli._leaf_keys(importlib.import_module(  # pylint: disable=protected-access
          f"configs.{p.stem}").get_config(None))
      for p in sorted((root / "configs").glob("*.py"))))
  missing = sorted(flags - _README_NOT_KEYS - known)
  assert not missing, f"README documents --config.KEY flags no config has: {missing}"
  assert len(flags) > 30  # the regex still finds README's flags
