"""Preference accuracy, calibration and position consistency of a reward model.

Every paradigm is scored on held-out preference pairs (chosen, rejected):
  pairwise_generative   p_fwd = r(rejected, chosen) (label yes) and
                        p_bwd = r(chosen, rejected) (label no)
  pointwise_generative  p_yes of each image; decision: s_chosen > s_rejected
  pointwise_regressive  scalar rewards; decision: r_chosen > r_rejected

Metrics (`metrics`):
  acc             pairwise: mean correctness over both orders; else per pair
  acc_sym         pairwise only: decision of 1/2 [p_fwd + 1 - p_bwd]
  acc_by_failure  {failure mode: acc}
  ece             expected calibration error (10 equal-width bins) of the
                  P(yes) readouts (regressive: of sigmoid(r_w - r_l), both
                  orders)
  position_consistency  pairwise: share of pairs whose decision survives
                  swapping the images (null for pointwise paradigms)
  n               pairs scored
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rd_jax.data import text, world
from rd_jax.reward import losses, model, sequences

PARADIGMS = ("pairwise_generative", "pointwise_generative",
             "pointwise_regressive")
# Not a reward: pretraining of the VLM (train_rm's paradigm="caption").
CAPTION = "caption"


# ---------------------------------------------------------------- sequences

def questions_of(config, batch) -> list[str]:
  """The questions of a data batch (task instruction per config)."""
  video = config.rm.get("frames") is not None
  ask = (text.pairwise_question if config.paradigm == "pairwise_generative"
         else text.pointwise_question)
  out = []
  for prompt, spec in zip(batch["prompt"], batch["spec"]):
    instr = (world.instruction(world.Spec.from_json(spec.decode()))
             if config.instruction else "")
    out.append(ask(prompt.decode(), instr, config.cot, video))
  return out


def encode_specs(config, tok, specs) -> dict:
  """Question arrays (no answers) of this config's paradigm for world
  specs: the reward model scoring generator samples of those prompts."""
  from rd_jax.models import internvl  # pylint: disable=g-import-not-at-top
  batch = {"prompt": [world.prompt(s).encode() for s in specs],
           "spec": [s.to_json().encode() for s in specs]}
  return encode_batch(config, tok, internvl.tokens_per_image(config.rm.model),
                      batch)


def num_images(config) -> int:
  per = config.rm.get("frames") or 1
  return 2 * per if config.paradigm == "pairwise_generative" else per


def encode(config, tok, tokens_per_image: int, questions, answers=None, *,
           prompts):
  """Token arrays (rd_jax.reward.sequences) for this config's paradigm;
  `prompts` (bytes, one per question) are restated after the images in
  config.prompt_after_len slots (0: not)."""
  pairwise = config.paradigm == "pairwise_generative"
  after = config.get("prompt_after_len", 0)
  return sequences.encode(
      tok, questions, answers, num_images=num_images(config),
      tokens_per_image=tokens_per_image, question_len=config.question_len,
      answer_len=config.answer_len, cot=config.cot,
      yes_no=(config.rm.yes_id, config.rm.no_id),
      groups=2 if pairwise else 1,
      noun="video" if config.rm.get("frames") else "image",
      overflow=config.get("prompt_overflow", "error"),
      question_first=config.get("question_first", False),
      after=[p.decode() for p in prompts] if after else None,
      after_len=after)


def encode_batch(config, tok, tokens_per_image: int, batch) -> dict:
  """The question arrays (no answers) of a data batch's pairs."""
  return encode(config, tok, tokens_per_image, questions_of(config, batch),
                prompts=batch["prompt"])


# ---------------------------------------------------------------- scoring

def _decide(rm, params, question, embeds, cot: str, answer_len: int):
  """P(yes) at the decision token. reason_first: the rationale is decoded
  greedily first (up to answer_len tokens, stopping at yes/no)."""
  if cot != "reason_first":
    logits, _ = model.logits_and_hidden(rm, params, question, embeds)
    return model.readout(logits[:, 0], rm.yes_id, rm.no_id, rm.readout)
  b = question["input_ids"].shape[0]
  rows = jnp.arange(b)

  def step(k, carry):
    ids, mask, p, done = carry
    pos = question["read_pos"] + k
    q = {"input_ids": ids, "attention_mask": mask}
    logits = _logits_at(rm, params, q, embeds, pos)
    tok = jnp.argmax(logits, -1)
    is_decision = (tok == rm.yes_id) | (tok == rm.no_id)
    p_now = model.readout(logits, rm.yes_id, rm.no_id, rm.readout)
    p = jnp.where(done, p, p_now)
    done = done | is_decision
    nxt = jnp.minimum(pos + 1, ids.shape[1] - 1)
    ids = ids.at[rows, nxt].set(jnp.where(done, ids[rows, nxt], tok))
    mask = mask.at[rows, nxt].set(True)
    return ids, mask, p, done

  init = (question["input_ids"], question["attention_mask"],
          jnp.full((b,), 0.5), jnp.zeros((b,), bool))
  return jax.lax.fori_loop(0, answer_len, step, init)[2]


def _logits_at(rm, params, q, embeds, pos):
  logits, _ = model.logits_and_hidden(rm, params, q, embeds, pos[:, None])
  return logits[:, 0]


def score_pairs(config, params, question, chosen, rejected) -> dict:
  """Scores for a batch of pairs (jit with config static). Images uint8 or
  float [B, (T,) H, W, 3]; question from `encode` (no answers); for
  paradigm="caption", caption rows and `caption_scores` of the chosen
  images."""
  rm = config.rm
  if config.paradigm == CAPTION:
    return caption_scores(rm, params, question, chosen)
  ch = model.per_sequence(rm, chosen)
  rej = model.per_sequence(rm, rejected)
  t = ch.shape[1]
  feats = model.embed_images(rm, params, jnp.concatenate([ch, rej], 1))
  f_ch, f_rej = feats[:, :t], feats[:, t:]
  if config.paradigm == "pairwise_generative":
    fwd = jnp.concatenate([f_rej, f_ch], 1)
    bwd = jnp.concatenate([f_ch, f_rej], 1)
    return {"p_fwd": _decide(rm, params, question, fwd, config.cot,
                             config.answer_len),
            "p_bwd": _decide(rm, params, question, bwd, config.cot,
                             config.answer_len)}
  if config.paradigm == "pointwise_generative":
    return {"p_chosen": _decide(rm, params, question, f_ch, config.cot,
                                config.answer_len),
            "p_rejected": _decide(rm, params, question, f_rej, config.cot,
                                  config.answer_len)}
  if config.paradigm == "pointwise_regressive":
    _, h_ch = model.logits_and_hidden(rm, params, question, f_ch)
    _, h_rej = model.logits_and_hidden(rm, params, question, f_rej)
    return {"r_chosen": model.regressive_score(params, h_ch[:, 0]),
            "r_rejected": model.regressive_score(params, h_rej[:, 0])}
  raise ValueError(f"unknown paradigm {config.paradigm!r}; one of "
                   f"{PARADIGMS}")


def caption_rows(config, tok, tokens_per_image: int, batch) -> dict:
  """Caption rows (sequences.caption) of a data batch's prompts."""
  return sequences.caption(
      tok, [p.decode() for p in batch["prompt"]],
      num_images=config.rm.get("frames") or 1,
      tokens_per_image=tokens_per_image, caption_len=config.caption_len)


def caption_scores(rm, params, cap: dict, images) -> dict:
  """Per-row sums of the captioning LM loss over the real caption tokens:
  `ce` (nats), `hits` (argmax = target) and `tokens` [B]. images: the
  captioned (chosen) images [B, (T,) H, W, 3]."""
  feats = model.embed_images(rm, params, model.per_sequence(rm, images))
  pos = sequences.answer_positions(cap["read_pos"],
                                   cap["answer_ids"].shape[1])
  logits, _ = model.logits_and_hidden(rm, params, cap, feats, pos)
  mask = cap["answer_mask"]
  ce = losses.token_ce(logits, cap["answer_ids"])
  hits = (jnp.argmax(logits, -1) == cap["answer_ids"]) & mask
  return {"ce": jnp.sum(jnp.where(mask, ce, 0.0), 1),
          "hits": jnp.sum(hits, 1), "tokens": jnp.sum(mask, 1)}


# ---------------------------------------------------------------- metrics

def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
  """Expected calibration error of P(label = 1) with equal-width bins."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
  idx = np.minimum((probs * bins).astype(int), bins - 1)
  total = 0.0
  for b in range(bins):
    sel = idx == b
    if sel.any():
      total += sel.sum() * abs(probs[sel].mean() - labels[sel].mean())
  return float(total / max(len(probs), 1))


def metrics(paradigm: str, scores: dict, failures: np.ndarray) -> dict:
  """Metric dict (module docstring) from concatenated `score_pairs` outputs
  and the pairs' failure indices into world.FAILURES."""
  s = {k: np.asarray(v, np.float64) for k, v in scores.items()}
  out = {}
  if paradigm == "pairwise_generative":
    fwd_ok, bwd_ok = s["p_fwd"] > 0.5, s["p_bwd"] < 0.5
    per_pair = 0.5 * (fwd_ok.astype(float) + bwd_ok)
    out["acc_sym"] = float(np.mean(0.5 * (s["p_fwd"] + 1 - s["p_bwd"]) > 0.5))
    out["position_consistency"] = float(np.mean(fwd_ok == bwd_ok))
    out["ece"] = ece(np.concatenate([s["p_fwd"], s["p_bwd"]]),
                     np.r_[np.ones_like(s["p_fwd"]), np.zeros_like(s["p_bwd"])])
  elif paradigm == "pointwise_generative":
    per_pair = (s["p_chosen"] > s["p_rejected"]).astype(float)
    out["position_consistency"] = None
    out["ece"] = ece(np.concatenate([s["p_chosen"], s["p_rejected"]]),
                     np.r_[np.ones_like(s["p_chosen"]),
                           np.zeros_like(s["p_rejected"])])
  else:
    diff = s["r_chosen"] - s["r_rejected"]
    per_pair = (diff > 0).astype(float)
    out["position_consistency"] = None
    p = 1 / (1 + np.exp(-diff))
    out["ece"] = ece(np.r_[p, 1 - p], np.r_[np.ones_like(p), np.zeros_like(p)])
  out["acc"] = float(np.mean(per_pair)) if len(per_pair) else float("nan")
  out["acc_by_failure"] = {
      world.FAILURES[f]: float(np.mean(per_pair[failures == f]))
      for f in np.unique(failures)}
  out["n"] = int(len(per_pair))
  return out


# ---------------------------------------------------------------- driver

def evaluate(config, params, tok, score_fn, tokens_per_image: int, *,
             split: str, kind: str | None = None, max_pairs: int = -1,
             batch_size: int = 64) -> dict:
  """Scores `split` (up to max_pairs; -1 = all) with the jitted
  `score_fn(params, question, chosen, rejected)`; -> `metrics` dict
  (paradigm "caption": held-out caption_ce (nats per prompt token),
  caption_acc (greedy next-token accuracy) and n).

  The last partial batch is padded (by repeating) to keep one compiled shape.
  """
  from rd_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  kind = kind or config.kind
  data = pipeline.loader(config.data_dir, kind, split, batch_size=batch_size,
                         scale=config.scale, shuffle=False, num_epochs=1,
                         drop_remainder=False, shard_index=0, shard_count=1)
  caption = config.paradigm == CAPTION
  scores, failures, seen = {}, [], 0
  for batch in data:
    n = len(batch["failure"])
    if 0 <= max_pairs <= seen:
      break
    if max_pairs >= 0:
      n = min(n, max_pairs - seen)
    q = (caption_rows(config, tok, tokens_per_image, batch) if caption
         else encode_batch(config, tok, tokens_per_image, batch))
    pad = np.r_[np.arange(n), np.zeros(batch_size - n, int)]
    out = score_fn(params, {k: v[pad] for k, v in q.items()},
                   batch["chosen"][pad], batch["rejected"][pad])
    for k, v in out.items():
      scores.setdefault(k, []).append(np.asarray(v)[:n])
    failures.append(batch["failure"][:n])
    seen += n
  scores = {k: np.concatenate(v) for k, v in scores.items()}
  if caption:
    tokens = max(float(scores["tokens"].sum()), 1.0)
    return {"caption_ce": float(scores["ce"].sum() / tokens),
            "caption_acc": float(scores["hits"].sum() / tokens),
            "n": int(len(scores["ce"]))}
  return metrics(config.paradigm, scores, np.concatenate(failures))


def training_sequences(config, tok, tokens_per_image: int, batch) -> dict:
  """Host-side token arrays of one training batch (B pairs).

  pairwise: 2B rows, rows [0, B) ask r(rejected, chosen) -> "yes", rows
  [B, 2B) r(chosen, rejected) -> "no" (every pair in both orders).
  pointwise: rows [0, B) the chosen image -> "yes", [B, 2B) the rejected ->
  "no" (the regressive baseline ignores the answers).
  """
  video = config.rm.get("frames") is not None
  qs = questions_of(config, batch)
  fails = [f.decode() for f in batch["failure_text"]]
  if config.paradigm == "pairwise_generative":
    answers = ([text.pairwise_answer(True, f, config.cot, video) for f in fails]
               + [text.pairwise_answer(False, f, config.cot, video)
                  for f in fails])
  else:
    answers = ([text.pointwise_answer(True, f, config.cot, video)
                for f in fails] +
               [text.pointwise_answer(False, f, config.cot, video)
                for f in fails])
  prompts = list(batch["prompt"])
  return encode(config, tok, tokens_per_image, qs + qs, answers,
                prompts=prompts + prompts)

