"""ReFL with the RewardDance reward (DESIGN.md §2.4): the loss.

    loss, aux = refl_loss(gen_params, rm_params, batch, rng, cfg)

Sample K steps from noise; pick a step index k uniformly in the late window
`cfg.refl.window` = (lo, hi); steps before k run under `stop_gradient`; the
x̂0 of step k (with gradient) is decoded to pixels and scored by the frozen
reward model; loss = mean relu(λ − r) · scale, plus β · the flow-matching
loss on the batch's data when β > 0. Gradients reach the generator only.

cfg (ConfigDict):
  gen      generator stage config (train_generator: model, sample_shift,
           solver, cfg_scale, t_sampling, train_shift)
  rm       reward-model config (train_rm's `rm`) and `paradigm`:
           pairwise_generative (reward against batch['reference']),
           pointwise_generative or pointwise_regressive
  refl     steps K, window (lo, hi) inclusive, lam λ, scale, beta β
batch: prompt_ids, prompt_mask [B, L]; question (reward-model token arrays
for the paradigm); reference [B, H, W, 3] in [0, 1] (pairwise);
chosen uint8 [B, 64, 64, 3] (β > 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rd_jax.generation import flow
from rd_jax.models import generator
from rd_jax.reward import model as rm_model


def reward(cfg, rm_params, images: jax.Array, batch: dict) -> jax.Array:
  """The configured RewardDance reward of pixels [B, H, W, 3] in [0, 1]."""
  paradigm = cfg.rm.paradigm
  q = batch["question"]
  if paradigm == "pairwise_generative":
    return rm_model.pairwise_reward(cfg.rm, rm_params, batch["reference"],
                                    images, q)
  if paradigm == "pointwise_generative":
    return rm_model.pointwise_reward(cfg.rm, rm_params, images, q)
  if paradigm == "pointwise_regressive":
    return rm_model.regressive_reward(cfg.rm, rm_params, images, q)
  raise ValueError(f"unknown paradigm {paradigm!r}")


def refl_loss(gen_params, rm_params, batch: dict, rng: jax.Array, cfg):
  """(loss, aux) of one ReFL step; differentiate w.r.t. gen_params.

  aux: reward [B], step k, x0 (the scored x̂0, model space), fm_loss.
  """
  st, rc = cfg.gen, cfg.refl
  lo, hi = rc.window
  if not 0 <= lo <= hi < rc.steps:
    raise ValueError(f"refl.window {tuple(rc.window)} must satisfy "
                     f"0 <= lo <= hi < refl.steps={rc.steps}")
  rm_params = jax.lax.stop_gradient(rm_params)  # the reward model is frozen
  k_noise, k_step, k_fm = jax.random.split(rng, 3)
  ids, mask = batch["prompt_ids"], batch["prompt_mask"]
  cond = generator.encode_text(st.model, gen_params, ids, mask)
  r = st.resolution
  noise = jax.random.normal(k_noise, (ids.shape[0], r, r, 3))
  k = jax.random.randint(k_step, (), lo, hi + 1)
  _, x0s = flow.sample(gen_params, noise, cond,
                       flow.Schedule(rc.steps, st.sample_shift, st.solver),
                       velocity_fn=generator.velocity_fn(st.model),
                       uncond=generator.unconditional(cond),
                       cfg_scale=st.cfg_scale, grad_from_step=k)
  x0 = x0s[k]
  rew = reward(cfg, rm_params, generator.to_unit(x0), batch)
  loss = jnp.mean(jax.nn.relu(rc.lam - rew)) * rc.scale
  fm = jnp.zeros(())
  if rc.beta > 0:
    data = generator.to_model_space(generator.resize(batch["chosen"], r))
    fm, _ = flow.flow_matching_loss(
        generator.velocity_fn(st.model), gen_params, data, cond, k_fm,
        t_sampling=st.t_sampling, shift=st.train_shift)
    loss = loss + rc.beta * fm
  return loss, {"reward": rew, "k": k, "x0": x0, "fm_loss": fm}
