"""Inference-time scaling with a verifier (DESIGN.md §2.5): Best-of-N,
round-robin pairwise ranking, and Search over Paths (Ma et al. 2025).

Everything here is a pure function of arrays plus two callables that close
over the models, so it jits as one program with no Python loop over
candidates or rounds:

  sample_fn(noise [B, ...]) -> x0 [B, ...]            (the generator)
  segment_fn(x [B, ...], t_from, t_to, steps) -> (x, x̂0)  (one ODE segment;
      `steps` a static int, x̂0 of its last step)
  score_fn(x0 [B, ...]) -> [B]                        (pointwise verifier)
  pair_fn(ref [B, ...], cand [B, ...]) -> [B]         (P(cand beats ref))

Candidates ride on a leading axis [N, B, ...] (N per prompt, B prompts) and
are mapped with `jax.vmap`, so the callables only ever see [B, ...].
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def renoise(x: jax.Array, t: jax.Array, t_up: jax.Array,
            eps: jax.Array) -> jax.Array:
  """Exact rectified-flow forward transition from t to t_up >= t.

  With x_t = (1 − t)·x0 + t·ε: x_{t'} = a·x_t + b·ε', a = (1 − t')/(1 − t),
  b = sqrt(t'² − a²t²), so x_{t'} has the marginal (1 − t')·x0 + t'·ε
  (DESIGN.md §2.5; `x + sqrt(Δ)·ε` is the variance-exploding rule and is
  wrong here).
  """
  a = (1.0 - t_up) / (1.0 - t)
  b = jnp.sqrt(jnp.maximum(t_up ** 2 - (a * t) ** 2, 0.0))
  return a * x + b * eps


def gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x [N, B, ...], idx [K, B] -> x[idx[k, b], b] [K, B, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=0)


def select(scores: jax.Array, k: int, bottom: bool = False) -> jax.Array:
  """Indices [k, B] of the k best (or worst) of scores [N, B], best first
  (worst first for bottom); ties go to the lower index."""
  s = -scores if bottom else scores
  return jax.lax.top_k(s.T, k)[1].T


def best_of_n(sample_fn: Callable, score_fn: Callable, noise: jax.Array):
  """N samples per prompt in one vmapped call; returns the best.

  noise [N, B, ...] -> (best [B, ...], samples [N, B, ...], scores [N, B]).
  """
  samples = jax.vmap(sample_fn)(noise)
  scores = jax.vmap(score_fn)(samples)
  return gather(samples, select(scores, 1))[0], samples, scores


def round_robin_wins(pair_fn: Callable, samples: jax.Array) -> jax.Array:
  """Pairwise tournament: wins[i, b] = Σ_{j≠i} P(i beats j).

  All N·(N−1) ordered comparisons in one vmapped `pair_fn(ref, cand)` call
  (make `pair_fn` symmetric to cancel the verifier's position bias).
  samples [N, B, ...] -> wins [N, B].
  """
  n = samples.shape[0]
  cand, ref = np.nonzero(~np.eye(n, dtype=bool))
  r = jax.vmap(pair_fn)(samples[ref], samples[cand])  # [N(N-1), B]
  return jax.ops.segment_sum(r, jnp.asarray(cand), num_segments=n)


@dataclasses.dataclass(frozen=True)
class PathSearch:
  """Search over Paths parameters (defaults: DESIGN.md §2.5).

  n: paths kept per prompt; m: re-noised copies per path per round;
  sigma_start: t at which search starts; delta_f / delta_b: how far each
  round re-noises forward and then solves back (delta_b > delta_f, so every
  round ends cleaner); steps_start / steps_round: solver steps from t=1 to
  sigma_start and per backward segment.
  """
  n: int = 4
  m: int = 8
  sigma_start: float = 0.11
  delta_f: float = 0.78
  delta_b: float = 0.81
  steps_start: int = 18
  steps_round: int = 4

  def __post_init__(self):
    if not self.delta_b > self.delta_f > 0:
      raise ValueError(f"need delta_b > delta_f > 0 so that every round ends "
                       f"cleaner; got delta_f={self.delta_f}, "
                       f"delta_b={self.delta_b}")
    if not 0 < self.sigma_start < 1:
      raise ValueError(f"sigma_start must be in (0, 1), got "
                       f"{self.sigma_start}")

  def rounds(self) -> np.ndarray:
    """[R, 3] rows (t, t_up, t_down) of every round, until t_down = 0."""
    out, t = [], self.sigma_start
    while t > 0:
      up = min(t + self.delta_f, 1.0)
      down = max(up - self.delta_b, 0.0)
      out.append((t, up, down))
      t = down
    return np.asarray(out, np.float32)

  def nfe(self, per_step: int = 1) -> dict[str, int]:
    """Exact function evaluations per prompt: generator forward passes
    (`per_step` per solver step: 2 for Heun, ×2 for CFG) and verifier calls."""
    r = len(self.rounds())
    return {"nfe_generator": per_step * (self.n * self.steps_start +
                                         r * self.n * self.m *
                                         self.steps_round),
            "nfe_verifier": self.n + r * self.n * self.m}


def search_over_paths(segment_fn: Callable, score_fn: Callable,
                      noise: jax.Array, rng: jax.Array, cfg: PathSearch):
  """Search over Paths with a pointwise verifier on x̂0.

  noise [N, B, ...] (N = cfg.n) is solved to t = sigma_start and each path's
  x̂0 scored. Each round, every survivor gets M copies re-noised forward by
  delta_f with the exact transition (`renoise`), solved back by delta_b,
  scored on x̂0, and the top N of the N·M candidates survive; the last round
  ends at t = 0. Rounds are one `lax.scan`.

  Returns (best [B, ...], info): best is the highest-scoring x̂0 seen in any
  round (elitist: search never returns worse than its initial best, by its
  verifier); info['round_best'] [R + 1, B] is the best score after the
  start and each round, info['survivors'] [N, B, ...] the final paths.
  """
  if noise.shape[0] != cfg.n:
    raise ValueError(f"noise has {noise.shape[0]} paths, config n={cfg.n}")
  def seg(x, t_from, t_to, steps):
    fn = lambda x: segment_fn(x, t_from, t_to, steps)
    return jax.vmap(fn)(x)

  score = jax.vmap(score_fn)
  x, x0 = seg(noise, jnp.float32(1.0), jnp.float32(cfg.sigma_start),
              cfg.steps_start)
  s = score(x0)
  top = select(s, 1)
  best, best_s = gather(x0, top)[0], gather(s, top)[0]

  def one_round(carry, inputs):
    x, best, best_s = carry
    (t, up, down), key = inputs
    xs = jnp.repeat(x, cfg.m, axis=0)  # [N·M, B, ...], path-major
    xs = renoise(xs, t, up, jax.random.normal(key, xs.shape, xs.dtype))
    xs, x0 = seg(xs, up, down, cfg.steps_round)
    s = score(x0)
    keep = select(s, cfg.n)
    top_x0, top_s = gather(x0, keep[:1])[0], gather(s, keep[:1])[0]
    better = top_s > best_s
    best = jnp.where(better.reshape(better.shape + (1,) * (best.ndim - 1)),
                     top_x0, best)
    best_s = jnp.maximum(best_s, top_s)
    return (gather(xs, keep), best, best_s), best_s

  rounds = jnp.asarray(cfg.rounds())
  keys = jax.random.split(rng, len(rounds))
  (x, best, best_s), round_best = jax.lax.scan(
      one_round, (x, best, best_s), ((rounds[:, 0], rounds[:, 1],
                                      rounds[:, 2]), keys))
  s0 = gather(s, top)[0]
  return best, {"round_best": jnp.concatenate([s0[None], round_best]),
                "survivors": x, "best_score": best_s}
