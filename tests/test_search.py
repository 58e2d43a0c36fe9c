"""Inference-time scaling: the exact re-noising transition, Best-of-N and
round-robin ranking against brute force, and Search over Paths (survivors,
exact NFE counts, never worse than its start, better than Best-of-1 on a
toy problem whose verifier is the truth)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rd_jax.generation import flow, search


def test_renoise_has_the_forward_marginal():
  # x_t ~ (1−t)·x0 + t·ε; after renoise to t' the marginal must be
  # (1−t')·x0 + t'·ε': mean (1−t')·x0 and std t', for any t < t'.
  x0 = jnp.array([2.0, -1.0, 0.5])
  k1, k2 = jax.random.split(jax.random.key(0))
  n = 400_000
  for t, t_up in ((0.1, 0.88), (0.5, 0.7), (0.0, 0.3)):
    x_t = flow.add_noise(jnp.broadcast_to(x0, (n, 3)),
                         jax.random.normal(k1, (n, 3)), jnp.full(n, t))
    x_up = search.renoise(x_t, t, t_up, jax.random.normal(k2, (n, 3)))
    np.testing.assert_allclose(x_up.mean(0), (1 - t_up) * x0, atol=6e-3)
    np.testing.assert_allclose(x_up.std(0), t_up, atol=6e-3)
  # The variance-exploding rule x + sqrt(Δ)·ε fails this check.
  wrong = x_t + jnp.sqrt(0.3) * jax.random.normal(k2, (n, 3))
  assert abs(float(wrong.mean(0)[0]) - 0.7 * 2.0) > 0.5


def test_select_top_and_bottom_k():
  scores = jax.random.normal(jax.random.key(1), (9, 5))
  top = np.asarray(search.select(scores, 2))
  bottom = np.asarray(search.select(scores, 2, bottom=True))
  order = np.argsort(-np.asarray(scores), axis=0)
  np.testing.assert_array_equal(top, order[:2])
  np.testing.assert_array_equal(bottom, order[::-1][:2])


def toy_scene(seed, n=6, b=3):
  return jax.random.normal(jax.random.key(seed), (n, b, 4, 2))


def test_best_of_n_and_round_robin_match_brute_force():
  noise = toy_scene(2)
  sample_fn = lambda z: jnp.tanh(z) * 2  # any deterministic "generator"
  score_fn = lambda x: -jnp.abs(x - 0.7).mean((1, 2))
  best, samples, scores = jax.jit(functools.partial(
      search.best_of_n, sample_fn, score_fn))(noise)
  s_np = np.asarray(samples)
  for b in range(noise.shape[1]):
    ref = [float(score_fn(s_np[i, b][None])[0]) for i in range(len(s_np))]
    np.testing.assert_allclose(scores[:, b], ref, rtol=1e-6)
    np.testing.assert_array_equal(best[b], s_np[int(np.argmax(ref)), b])

  # An asymmetric verifier (position bias + nonlinearity), so a wrong pairing
  # of ref and candidate changes the totals.
  def pair_fn(ref, cand):
    return jax.nn.sigmoid(3 * (score_fn(cand) - score_fn(ref)) + 0.4)

  wins = jax.jit(functools.partial(search.round_robin_wins, pair_fn))(samples)
  for b in range(noise.shape[1]):
    for i in range(len(s_np)):
      want = sum(float(pair_fn(s_np[j, b][None], s_np[i, b][None])[0])
                 for j in range(len(s_np)) if j != i)
      np.testing.assert_allclose(wins[i, b], want, rtol=1e-5)


def mixture_field(params, x, t, cond):
  """Exact velocity from N(0, 1) noise to data ±1 with equal mass.

  E[x0 | x_t] = tanh((1 − t)·x / t²) for x_t = (1−t)·x0 + t·ε, and
  v = (x − E[x0|x_t]) / t.
  """
  del params, cond
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  tt = jnp.maximum(t, 1e-3)
  return (x - jnp.tanh((1 - tt) * x / tt ** 2)) / tt


def counted(fn, counter, key):
  """fn, counting how many single samples it is evaluated on."""
  def wrapped(x, *args):
    jax.debug.callback(lambda x: counter.__setitem__(
        key, counter[key] + x.shape[0]), x)
    return fn(x, *args)
  return wrapped


def test_search_over_paths_counts_and_beats_best_of_one():
  cfg = search.PathSearch(n=3, m=4, sigma_start=0.4, delta_f=0.3,
                          delta_b=0.45, steps_start=5, steps_round=3)
  rounds = cfg.rounds()
  # 0.4 -> 0.7 -> 0.25 -> 0.55 -> 0.1 -> 0.4 -> 0.0: three rounds.
  np.testing.assert_allclose(rounds, [[0.4, 0.7, 0.25], [0.25, 0.55, 0.1],
                                      [0.1, 0.4, 0.0]], atol=1e-6)
  b, d = 256, 1
  counter = {"gen": 0, "ver": 0}

  def velocity(params, x, t, cond):
    jax.debug.callback(lambda x: counter.__setitem__(
        "gen", counter["gen"] + x.shape[0]), x)
    return mixture_field(params, x, t, cond)

  def segment_fn(x, t_from, t_to, steps):
    x, x0s = flow.sample(None, x, None, flow.Schedule(steps),
                         velocity_fn=velocity, span=(t_from, t_to))
    return x, x0s[-1]

  # The verifier is the truth: the target is +1 (and -1 is a valid but
  # unwanted mode), scored on x̂0.
  score_fn = counted(lambda x: -jnp.abs(x - 1.0).mean(-1), counter, "ver")
  noise = jax.random.normal(jax.random.key(3), (cfg.n, b, d))
  best, info = jax.jit(functools.partial(
      search.search_over_paths, segment_fn, score_fn, cfg=cfg))(
          noise, jax.random.key(4))
  jax.block_until_ready(best)
  assert info["survivors"].shape == (cfg.n, b, d)
  round_best = np.asarray(info["round_best"])
  assert round_best.shape == (len(rounds) + 1, b)
  # Elitist: never worse than the best of the N starting paths.
  assert (np.diff(round_best, axis=0) >= 0).all()
  np.testing.assert_allclose(
      np.asarray(score_fn(best)), round_best[-1], rtol=1e-6)
  nfe = cfg.nfe()
  assert counter["gen"] == nfe["nfe_generator"] * b
  assert counter["ver"] == nfe["nfe_verifier"] * b + b  # + the check above
  # Search finds the wanted mode far more often than one plain sample
  # (which lands on +1 half the time).
  plain, _ = flow.sample(None, noise[0], None, flow.Schedule(8),
                         velocity_fn=mixture_field)
  hit_plain = float((jnp.abs(plain - 1) < 0.2).mean())
  hit_search = float((jnp.abs(best - 1) < 0.2).mean())
  assert 0.35 < hit_plain < 0.65, hit_plain
  assert hit_search > 0.95, hit_search


def test_path_search_config_errors():
  with pytest.raises(ValueError, match="need delta_b > delta_f > 0"):
    search.PathSearch(delta_f=0.8, delta_b=0.8)
  with pytest.raises(ValueError, match=r"sigma_start must be in \(0, 1\)"):
    search.PathSearch(sigma_start=1.0)
