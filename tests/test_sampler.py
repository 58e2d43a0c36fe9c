"""Rectified-flow sampler: exactness on fields with known solutions, x̂0,
guidance, the I2V clamp and gradients through sampled steps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rd_jax.generation import flow


def gaussian_field(mu, sigma):
  """Exact velocity of the flow from N(0,1) noise to N(mu, sigma²) data.

  Along the probability-flow ODE x_t = (1−t)·mu + s(t)·z with
  s(t) = sqrt((1−t)²σ² + t²), so v = dx/dt = −mu + s'(t)/s(t)·(x − (1−t)mu),
  and the solution at t=0 is mu + σ·z for z the noise.
  """
  def v(params, x, t, cond):
    del params, cond
    t = t[:, None]
    s2 = (1 - t) ** 2 * sigma ** 2 + t ** 2
    ds = (-(1 - t) * sigma ** 2 + t) / s2  # s'/s
    return -mu + ds * (x - (1 - t) * mu)
  return v


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_point_mass_is_solved_exactly_in_any_number_of_steps(shift):
  # sigma=0: every trajectory is a straight line, so even 1 Euler step is
  # exact, and every x̂0 along the way equals the data point.
  mu = jnp.array([[0.5, -2.0, 3.0]])
  noise = jax.random.normal(jax.random.key(0), (4, 3))
  for steps in (1, 3):
    sched = flow.Schedule(steps, shift=shift)
    x, x0s = flow.sample(None, noise, None, sched,
                         velocity_fn=gaussian_field(mu, 0.0))
    np.testing.assert_allclose(x, jnp.broadcast_to(mu, x.shape), atol=1e-5)
    np.testing.assert_allclose(x0s, jnp.broadcast_to(mu, x0s.shape),
                               atol=1e-5)


def test_gaussian_solution_and_heun_is_second_order():
  mu, sigma = 1.5, 0.5
  noise = jax.random.normal(jax.random.key(1), (64, 2))
  exact = mu + sigma * noise
  errs = {}
  for solver in ("euler", "heun"):
    for n in (16, 32):
      x, _ = flow.sample(None, noise, None, flow.Schedule(n, solver=solver),
                         velocity_fn=gaussian_field(mu, sigma))
      errs[solver, n] = float(jnp.max(jnp.abs(x - exact)))
  # Halving the step: Euler error halves (order 1), Heun quarters (order 2).
  assert 1.7 < errs["euler", 16] / errs["euler", 32] < 2.3, errs
  assert 3.4 < errs["heun", 16] / errs["heun", 32] < 4.6, errs
  assert errs["heun", 32] < errs["euler", 32] / 20, errs


def test_x0_formula_inverts_the_forward_process():
  k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
  x0 = jax.random.normal(k1, (5, 4, 4, 3))
  eps = jax.random.normal(k2, x0.shape)
  t = jax.random.uniform(k3, (5,))
  x_t = flow.add_noise(x0, eps, t)
  np.testing.assert_allclose(flow.x0_from_v(x_t, t, eps - x0), x0, atol=1e-5)
  np.testing.assert_allclose(x_t[0], (1 - t[0]) * x0[0] + t[0] * eps[0],
                             atol=1e-6)


def test_time_shift_and_schedule_endpoints():
  ts = flow.timesteps(flow.Schedule(4, shift=3.0))
  np.testing.assert_allclose([ts[0], ts[-1]], [1.0, 0.0], atol=1e-7)
  # Flux shift keeps more of the schedule at high noise: t=0.5 -> 0.75.
  np.testing.assert_allclose(ts[2], 0.75, atol=1e-6)
  assert bool(jnp.all(jnp.diff(ts) < 0))


def test_classifier_free_guidance_extrapolates_from_unconditional():
  def v(params, x, t, cond):
    return x * 0 + cond[:, None]
  x = jnp.zeros((2, 3))
  out = flow.guided_velocity(v, None, x, jnp.ones(2), jnp.array([2.0, 3.0]),
                             jnp.array([1.0, 1.0]), cfg_scale=4.0)
  np.testing.assert_allclose(out, [[5.0] * 3, [9.0] * 3])


def test_known_pixels_stay_fixed_image_to_video():
  video_noise = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, 3))
  first = jax.random.uniform(jax.random.key(4), (2, 1, 8, 8, 3))
  mask = jnp.zeros((1, 4, 1, 1, 1)).at[:, 0].set(1)
  value = jnp.broadcast_to(first, video_noise.shape)

  def v(params, x, t, cond):  # a field that would move the first frame
    return jnp.sin(x) + 1.0
  x, x0s = flow.sample(None, video_noise, None,
                       flow.Schedule(5, solver="heun"), velocity_fn=v,
                       known=(mask, value))
  np.testing.assert_array_equal(x[:, 0], first[:, 0])
  np.testing.assert_array_equal(x0s[:, :, 0],
                                jnp.broadcast_to(first[:, 0], x0s[:, :, 0].shape))
  assert float(jnp.abs(x[:, 1:] - video_noise[:, 1:]).min()) > 0


def linear_field(params, x, t, cond):
  return params["a"] * x + params["b"] * t[:, None]


def test_gradient_flows_only_from_the_chosen_step():
  params = {"a": jnp.array(0.3), "b": jnp.array(-0.7)}
  noise = jax.random.normal(jax.random.key(5), (3, 2))
  sched = flow.Schedule(4)
  ts = flow.timesteps(sched)

  def loss(p, k):
    x, _ = flow.sample(p, noise, None, sched, velocity_fn=linear_field,
                       grad_from_step=k)
    return jnp.sum(x ** 2)

  # Reference for k = 3: steps 0..2 frozen, the last step differentiated.
  x = noise
  for i in range(3):
    x = x + (ts[i + 1] - ts[i]) * linear_field(params, x, jnp.full(3, ts[i]),
                                               None)

  def last_step(p):
    y = x + (ts[4] - ts[3]) * linear_field(p, x, jnp.full(3, ts[3]), None)
    return jnp.sum(y ** 2)

  g = jax.grad(loss)(params, 3)
  g_ref = jax.grad(last_step)(params)
  for k in params:
    np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-5)
  # k traced under jit gives the same; k = N freezes everything; k = 0
  # differs from k = 3 (earlier steps contribute).
  g_jit = jax.jit(jax.grad(loss))(params, jnp.int32(3))
  np.testing.assert_allclose(g_jit["a"], g_ref["a"], rtol=1e-5)
  g_none = jax.grad(loss)(params, 4)
  assert float(g_none["a"]) == 0.0 and float(g_none["b"]) == 0.0
  g_all = jax.grad(loss)(params, 0)
  assert abs(float(g_all["a"] - g_ref["a"])) > 1e-4


def test_flow_matching_loss_is_zero_for_the_exact_field_and_masks():
  x0 = jnp.ones((4, 6)) * 2.0
  # For a point mass the exact v = (x_t − x0)/t = ε − x0.
  exact = lambda p, x, t, c: (x - 2.0) / t[:, None]
  loss, _ = flow.flow_matching_loss(exact, None, x0, None,
                                    jax.random.key(6))
  assert float(loss) < 1e-8
  zero = lambda p, x, t, c: jnp.zeros_like(x)
  mask = jnp.zeros((1, 6)).at[:, :3].set(1)
  full, _ = flow.flow_matching_loss(zero, None, x0, None, jax.random.key(7))
  part, _ = flow.flow_matching_loss(zero, None, x0, None, jax.random.key(7),
                                    loss_mask=mask)
  assert float(full) > 1 and abs(float(part) - float(full)) > 1e-3
