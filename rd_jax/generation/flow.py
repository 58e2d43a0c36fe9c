"""Rectified flow: schedule, x̂0, and the Euler/Heun sampler (DESIGN.md §2.4).

Convention: x_t = (1 − t)·x0 + t·ε with t ∈ [0, 1] (t = 1 is pure noise); the
model predicts v = ε − x0, so x̂0 = x_t − t·v, and an Euler step from t to
t' < t is x_{t'} = x_t + (t' − t)·v.

`sample` is one `lax.scan` over steps: jit-able, differentiable end to end,
with classifier-free guidance, an optional stop-gradient on the steps before
a chosen index (ReFL), an optional clamp of known pixels (image-to-video:
the clean first frame stays fixed), and the x̂0 prediction of every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# velocity_fn(params, x_t [B, ...], t [B], cond pytree with batch axis 0)
VelocityFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Sampling schedule: `num_steps` steps from t=1 to t=0.

  shift: Flux/SD3 time shift t -> s·t / (1 + (s − 1)·t); s > 1 spends more
    steps at high noise (Flux uses a resolution-dependent s ≈ 1.15–3).
  solver: 'euler' (1 NFE/step) or 'heun' (2 NFE/step, 2nd order).
  """
  num_steps: int = 20
  shift: float = 1.0
  solver: str = "euler"

  def __post_init__(self):
    if self.solver not in ("euler", "heun"):
      raise ValueError(f"unknown solver {self.solver!r}; use 'euler' or "
                       f"'heun'")
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Flux time shift (identity for shift=1)."""
  return shift * t / (1 + (shift - 1) * t)


def timesteps(schedule: Schedule) -> jax.Array:
  """t_0 = 1 > t_1 > ... > t_N = 0, shape [N + 1]."""
  return shift_time(jnp.linspace(1.0, 0.0, schedule.num_steps + 1),
                    schedule.shift)


def x0_from_v(x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x̂0 = x_t − t·v (t broadcast over the trailing axes)."""
  return x_t - _bcast(t, x_t) * v


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 − t)·x0 + t·ε."""
  t = _bcast(t, x0)
  return (1 - t) * x0 + t * noise


def _bcast(t, x):
  t = jnp.asarray(t, x.dtype)
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def guided_velocity(velocity_fn: VelocityFn, params, x, t, cond,
                    uncond=None, cfg_scale: float = 1.0) -> jax.Array:
  """Classifier-free guidance: v_u + s·(v_c − v_u), one batched call.

  The conditional and unconditional rows are interleaved (row 2i is row i
  with cond, 2i+1 with uncond), not concatenated: with the batch sharded,
  each device keeps its own rows' pairs, so CFG needs no all-to-all.
  """
  if uncond is None or cfg_scale == 1.0:
    return velocity_fn(params, x, t, cond)
  pair = lambda a, b: jnp.stack([a, b], 1).reshape(  # noqa: E731
      (2 * a.shape[0],) + a.shape[1:])
  v = velocity_fn(params, pair(x, x), pair(t, t),
                  jax.tree.map(pair, cond, uncond))
  v = v.reshape((x.shape[0], 2) + v.shape[1:])
  v_c, v_u = v[:, 0], v[:, 1]
  return v_u + cfg_scale * (v_c - v_u)


def sample(params, noise: jax.Array, cond, schedule: Schedule, *,
           velocity_fn: VelocityFn, uncond=None, cfg_scale: float = 1.0,
           grad_from_step: jax.Array | int = 0,
           known: tuple[jax.Array, jax.Array] | None = None,
           span: tuple[jax.Array, jax.Array] | None = None,
           stop_at: jax.Array | int | None = None):
  """Solves the flow ODE from t=1 (noise) to t=0, or over `span`.

  Args:
    params: generator parameters, passed to `velocity_fn`.
    noise: ε [B, ...], the state at t=1.
    cond / uncond: conditioning pytrees (batch axis 0); `uncond` enables CFG.
    schedule: steps, time shift, solver.
    velocity_fn: v(params, x_t, t [B], cond).
    cfg_scale: guidance scale s (1 = no guidance).
    grad_from_step: k; the outputs of steps with index < k are under
      `stop_gradient`, so gradients reach params (and noise) only through
      steps >= k (ReFL: x̂0 of step k is the first with gradient). May be
      traced; 0 = differentiable end to end.
    known: (mask, value), both broadcastable to noise: where mask is 1 the
      state is held at `value` throughout (image-to-video first frame).
    span: (t_from, t_to), possibly traced: solve only this segment, with
      `schedule.num_steps` evenly spaced steps (no time shift); `noise` is
      then the state at t_from (search over paths).
    stop_at: k, possibly traced: run only steps 0..k-1 (a loop of k
      iterations, so the skipped steps cost nothing) and return the state
      entering step k, at timesteps[k], with no x̂0 trajectory (None). The
      loop is not reverse-differentiable: ReFL runs the steps before its
      chosen one this way, with frozen params and no gradient.

  Returns:
    (x0 [B, ...], x̂0 of every step [N, B, ...]); for Heun, x̂0 is taken from
    the first velocity evaluation of the step.
  """
  if span is None:
    ts = timesteps(schedule)
  else:
    ts = jnp.linspace(span[0], span[1], schedule.num_steps + 1)
  b = noise.shape[0]

  def clamp(x):
    if known is None:
      return x
    mask, value = known
    return jnp.where(mask.astype(bool), value.astype(x.dtype), x)

  def vel(p, x, t):
    return guided_velocity(velocity_fn, p, x, jnp.full((b,), t, x.dtype),
                           cond, uncond, cfg_scale)

  def step(x, inputs):
    i, t, t_next = inputs
    v = vel(params, x, t)
    x0_hat = clamp(x0_from_v(x, t, v))
    x_next = x + (t_next - t) * v
    if schedule.solver == "heun":
      v2 = vel(params, clamp(x_next), t_next)
      x_next = x + (t_next - t) * 0.5 * (v + v2)
    # Cutting the state *leaving* each frozen step is enough: later steps
    # then see a constant, so no gradient reaches params through steps < k.
    x_next = jnp.where(i < grad_from_step, jax.lax.stop_gradient(x_next),
                       x_next)
    return clamp(x_next), x0_hat

  if stop_at is not None:
    x = jax.lax.fori_loop(
        0, stop_at, lambda i, x: step(x, (i, ts[i], ts[i + 1]))[0],
        clamp(noise))
    return x, None
  idx = jnp.arange(schedule.num_steps)
  x, x0_traj = jax.lax.scan(step, clamp(noise), (idx, ts[:-1], ts[1:]))
  return x, x0_traj


def flow_matching_loss(velocity_fn: VelocityFn, params, x0: jax.Array,
                       cond, rng: jax.Array, *, t_sampling: str = "logit_normal",
                       shift: float = 1.0,
                       loss_mask: jax.Array | None = None,
                       known: tuple[jax.Array, jax.Array] | None = None):
  """Rectified-flow training loss E‖v_θ(x_t, t) − (ε − x0)‖².

  t ~ logit-normal(0, 1) (SD3) or uniform, then time-shifted. `known` clamps
  the clean pixels the model is given (I2V first frame) and `loss_mask`
  (broadcastable to x0, 1 = counted) excludes them from the loss.
  Returns (scalar loss, per-sample loss [B]).
  """
  k_t, k_eps = jax.random.split(rng)
  b = x0.shape[0]
  if t_sampling == "logit_normal":
    t = jax.nn.sigmoid(jax.random.normal(k_t, (b,)))
  elif t_sampling == "uniform":
    t = jax.random.uniform(k_t, (b,))
  else:
    raise ValueError(f"unknown t_sampling {t_sampling!r}; use 'logit_normal' "
                     f"or 'uniform'")
  t = shift_time(t, shift)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  x_t = add_noise(x0, eps, t)
  if known is not None:
    x_t = jnp.where(known[0].astype(bool), known[1], x_t)
  err = jnp.square(velocity_fn(params, x_t, t, cond) - (eps - x0))
  mask = jnp.ones_like(err) if loss_mask is None else jnp.broadcast_to(
      loss_mask, err.shape).astype(err.dtype)
  axes = tuple(range(1, err.ndim))
  per_sample = jnp.sum(err * mask, axes) / jnp.maximum(jnp.sum(mask, axes), 1)
  return jnp.mean(per_sample), per_sample
