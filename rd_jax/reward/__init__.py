"""RewardDance reward models (DESIGN.md §2.1-2.2) on the Flax InternVL.

    from rd_jax import reward
    q = reward.encode_questions(tok, questions, num_images=2, ...)
    r = reward.pairwise_reward(rm, params, ref_images, cand_images, q)

sequences.py  token layout (InternVL chat), fixed lengths, answer masks
model.py      pairwise / pointwise / regressive rewards, readouts
losses.py     CE, Bradley-Terry, pointwise generative, CoT LM loss
evaluate.py   preference accuracy, ECE, position consistency
"""
from rd_jax.reward.losses import (bradley_terry, pairwise_generative_loss,
                                  pointwise_generative_loss, regressive_loss)
from rd_jax.reward.model import (embed_images, init, margin, pairwise_reward,
                                 pointwise_reward, preprocess, readout,
                                 regressive_reward)
from rd_jax.reward.sequences import encode as encode_questions

__all__ = ["bradley_terry", "embed_images", "encode_questions", "init",
           "margin", "pairwise_generative_loss", "pairwise_reward",
           "pointwise_generative_loss", "pointwise_reward", "preprocess",
           "readout", "regressive_loss", "regressive_reward"]
