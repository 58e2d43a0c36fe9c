"""Reward-model losses (DESIGN.md §2.2), on answer-span logits.

Inputs per sequence (B batch, A answer_len, V vocabulary):
  logits          [B, A, V]  logits predicting answer tokens 0..A-1
  answer_ids      [B, A]     the answer ("yes", "no", or a CoT answer)
  answer_mask     [B, A]     real answer tokens
  decision_index  [B]        which answer token is the yes/no decision

Every generative loss = CE(decision token) [+ w_cot * mean CE(rationale
tokens)]; the rationale is every real answer token except the decision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Next-token cross-entropy over the full vocabulary: [..., V], [...] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def decision_logits(logits: jax.Array, decision_index: jax.Array) -> jax.Array:
  """[B, A, V], [B] -> logits at the decision token [B, V]."""
  return jnp.take_along_axis(logits, decision_index[:, None, None], 1)[:, 0]


def _decision_and_rationale(logits, answer_ids, answer_mask, decision_index):
  ce = token_ce(logits, answer_ids)                          # [B, A]
  is_decision = jnp.arange(ce.shape[1])[None] == decision_index[:, None]
  decision_ce = jnp.sum(jnp.where(is_decision, ce, 0.0), 1)  # [B]
  rationale = answer_mask & ~is_decision
  n = jnp.maximum(jnp.sum(rationale), 1)
  rationale_ce = jnp.sum(jnp.where(rationale, ce, 0.0)) / n
  return decision_ce, rationale_ce


def pairwise_generative_loss(logits, answer_ids, answer_mask, decision_index,
                             w_cot: float = 0.0):
  """Mean CE on the answer token (+ w_cot * rationale LM loss).

  The batch holds every pair in both orders (the trainer builds it)."""
  decision_ce, rationale_ce = _decision_and_rationale(
      logits, answer_ids, answer_mask, decision_index)
  loss = jnp.mean(decision_ce) + w_cot * rationale_ce
  return loss, {"ce": jnp.mean(decision_ce), "cot_ce": rationale_ce}


def bradley_terry(score_w: jax.Array, score_l: jax.Array) -> jax.Array:
  """-log sigmoid(s_w - s_l), averaged: preferred (w) over rejected (l)."""
  return jnp.mean(jax.nn.softplus(-(score_w - score_l)))


def pointwise_generative_loss(logits_w, logits_l, answers_w, answers_l,
                              yes_id: int, no_id: int, alpha: float = 0.1,
                              w_cot: float = 0.0):
  """Bradley-Terry on s = l_yes - l_no of preferred vs rejected, plus
  alpha * CE on yes (preferred) / no (rejected) [+ w_cot * rationale].

  answers_*: (answer_ids, answer_mask, decision_index) of each side.
  """
  def side(logits, answers):
    ce, cot = _decision_and_rationale(logits, *answers)
    dec = decision_logits(logits, answers[2]).astype(jnp.float32)
    return dec[:, yes_id] - dec[:, no_id], ce, cot

  s_w, ce_w, cot_w = side(logits_w, answers_w)
  s_l, ce_l, cot_l = side(logits_l, answers_l)
  bt = bradley_terry(s_w, s_l)
  ce = 0.5 * (jnp.mean(ce_w) + jnp.mean(ce_l))
  cot = 0.5 * (cot_w + cot_l)
  loss = bt + alpha * ce + w_cot * cot
  return loss, {"bt": bt, "ce": ce, "cot_ce": cot}


def regressive_loss(r_w: jax.Array, r_l: jax.Array):
  """Bradley-Terry on the scalar head's rewards."""
  bt = bradley_terry(r_w, r_l)
  return bt, {"bt": bt}
