"""Tokenizers: ShapesWorld's word-level tokenizer, or any Hugging Face one.

`build(out_dir)` writes a word-level `PreTrainedTokenizerFast` whose closed
vocabulary is everything ShapesWorld says (prompts, questions, instructions,
rationales) plus InternVL's special tokens; "yes" and "no" are single tokens.
`load(path)` reads that, or any Hugging Face tokenizer directory on disk
(no hub access, no remote code).
"""
from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rd_jax.data import text

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# InternVL's image markers and chat turns.
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMG_START, IMG_END, IMG_CONTEXT,
                  IM_START, IM_END)


def _pre_tokenizer():
  return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                  pre_tokenizers.Punctuation("isolated")])


def build(out_dir: str, corpus: list[str] | None = None
          ) -> PreTrainedTokenizerFast:
  """Builds the ShapesWorld word-level tokenizer and saves it to `out_dir`."""
  corpus = text.corpus() if corpus is None else corpus
  pre, norm = _pre_tokenizer(), normalizers.Lowercase()
  words = sorted({w for t in corpus
                  for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))})
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + tuple(
      w for w in words if w not in SPECIAL_TOKENS))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = norm
  tok.pre_tokenizer = pre
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token=PAD, unk_token=UNK, bos_token=BOS,
      eos_token=EOS,
      additional_special_tokens=[IMG_START, IMG_END, IMG_CONTEXT, IM_START,
                                 IM_END])
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  answer_token_ids(fast)  # fail now, not at training time
  return fast


# tokenizer_class of a plain tokenizer.json (`build`'s; "TokenizersBackend"
# in transformers 5).
_PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load(path: str) -> PreTrainedTokenizerBase:
  """A tokenizer from a local directory (ShapesWorld's or any HF one)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"no tokenizer directory at {path!r}; build the ShapesWorld data "
        f"first (python -m rd_jax.data.build --data_dir=...) or point to a "
        f"Hugging Face tokenizer directory")
  config = os.path.join(path, "tokenizer_config.json")
  cls = None
  if os.path.exists(config):
    with open(config) as f:
      cls = json.load(f).get("tokenizer_class")
  if cls in _PLAIN_CLASSES:  # what `build` writes: no AutoTokenizer needed
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
  # AutoTokenizer's import costs 4.5 s (it imports torch when installed):
  # paid only for other tokenizers (Hugging Face checkpoints).
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  return AutoTokenizer.from_pretrained(path, local_files_only=True,
                                       trust_remote_code=False)


def answer_token_ids(tok: PreTrainedTokenizerBase,
                     words: tuple[str, str] = ("yes", "no")) -> tuple[int, int]:
  """Token ids of "yes" and "no" at the answer position; each must be one token."""
  ids = []
  for word in words:
    enc = tok.encode(word, add_special_tokens=False)
    if len(enc) != 1 or enc[0] == tok.unk_token_id:
      raise ValueError(
          f"the tokenizer {getattr(tok, 'name_or_path', '')!r} encodes "
          f"{word!r} as {enc} ({len(enc)} tokens); the reward readout needs "
          f"{words[0]!r} and {words[1]!r} to be single known tokens: use a "
          f"tokenizer whose vocabulary has both as whole words")
    ids.append(enc[0])
  return ids[0], ids[1]


def encode(tok: PreTrainedTokenizerBase, texts: list[str], max_len: int,
           overflow: str = "error") -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [B, max_len], mask bool [B, max_len]), right-padded.

  `overflow`: "error" (fail naming the text) or "truncate".
  """
  ids = np.full((len(texts), max_len), tok.pad_token_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for i, t in enumerate(texts):
    enc = tok.encode(t, add_special_tokens=False)
    if len(enc) > max_len:
      if overflow != "truncate":
        raise ValueError(
            f"text of {len(enc)} tokens exceeds max_len={max_len}: {t[:80]!r}"
            f"; raise max_len in the config or set overflow='truncate'")
      enc = enc[:max_len]
    ids[i, :len(enc)] = enc
    mask[i, :len(enc)] = True
  return ids, mask
