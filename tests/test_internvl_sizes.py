"""The InternVL2.5 ladder at real dimensions, instantiated abstractly."""
import jax
import pytest
from flax import nnx

from configs import internvl as configs
from rd_jax import sharding
from rd_jax.models import internvl


@pytest.mark.parametrize("size", ["1b", "2b", "4b", "8b", "26b"])
def test_param_count_matches_published(size):
  cfg = configs.get_config(f"size={size}")
  count = internvl.param_count(cfg)  # eval_shape: no memory is allocated
  published = configs.PUBLISHED_PARAMS[size]
  print(f"\n{size}: {count:,} vs published {published:,.0f} "
        f"({100 * (count / published - 1):+.2f}%)")
  assert abs(count / published - 1) <= 0.02
  # Every InternVL2.5 size turns a 448 tile into 256 <IMG_CONTEXT> tokens.
  assert internvl.tokens_per_image(cfg) == 256


def test_every_param_has_known_logical_names():
  abstract = internvl.abstract_params(configs.get_config("size=26b"))
  known = dict(sharding.DEFAULT_RULES)
  specs = jax.tree_util.tree_leaves_with_path(
      sharding.logical_specs(abstract),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = dict((jax.tree_util.keystr(p), x.shape) for p, x in
                jax.tree_util.tree_leaves_with_path(abstract))
  assert len(specs) == len(shapes) > 30
  for path, spec in specs:
    key = jax.tree_util.keystr(path)
    assert len(spec) == len(shapes[key]), key
    assert all(n is None or n in known for n in spec), (key, spec)
    # Scanned layers carry the stacking axis first.
    assert ("['layers']" in key) == (spec[0] == "layers"), (key, spec)


def test_26b_uses_internvit_6b():
  cfg = configs.get_config("size=26b")
  assert (cfg.vision.num_layers, cfg.vision.hidden_size) == (45, 3200)
  assert cfg.vision.norm_type == "rms_norm" and cfg.vision.qk_norm
  shapes = nnx.to_pure_dict(internvl.abstract_params(cfg))
  assert shapes["vision"]["layers"]["q_norm"]["scale"].shape == (45, 25, 128)
  assert shapes["projector"]["fc1"].shape == (12800, 6144)
