"""rd_jax: RewardDance (reward scaling in visual generation) in JAX/Flax."""
from flax import config as _flax_config

# Parameters carry *logical* axis names (see rd_jax/sharding.py); they are mapped
# to mesh axes by one rules table at the jit boundary, never eagerly at creation.
_flax_config.update("flax_always_shard_variable", False)
