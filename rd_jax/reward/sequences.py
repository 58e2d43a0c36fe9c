"""Token sequences of the reward model (InternVL chat layout), fixed length.

    <|im_start|>user\\n [image k: ]<img><IMG_CONTEXT>*P</img>\\n ... (per image)
    {question}<|im_end|>\\n<|im_start|>assistant\\n {answer} <pad>...

Pairwise: images 1..T are the reference (T = 1 for an image, T frames for a
video), images T+1..2T the candidate; each group is labelled as the question
names it ("image 1: ", "image 2: "; "video 1: " before its frames), the
InternVL multi-image convention ("Image-1: <image>"). Pointwise: T images. Sequences are
right-padded to one length (`seq_len`), so every batch of a run compiles
once. The logits at `read_pos` (the last prompt token) predict the first
answer token: that is where the reward reads P("yes").

Works with the ShapesWorld word-level tokenizer (where "user", "assistant"
and newlines are `<unk>` / dropped: harmless, they are constant) and with
any Hugging Face tokenizer that has InternVL's special tokens.

Arrays (B batch, L seq_len, A answer_len):
  input_ids       int32 [B, L]
  attention_mask  bool  [B, L]
  read_pos        int32 [B]      logits here predict answer token 0
  answer_ids      int32 [B, A]   (examples only) answer tokens, pad after
  answer_mask     bool  [B, A]   real answer tokens
  decision_index  int32 [B]      index in the answer of the yes/no token
"""
from __future__ import annotations

import numpy as np
from absl import logging

from rd_jax.data import tokenizer as tokenizer_lib

USER = f"{tokenizer_lib.IM_START}user\n"
ASSISTANT = f"{tokenizer_lib.IM_END}\n{tokenizer_lib.IM_START}assistant\n"


def _ids(tok, text: str) -> list[int]:
  return tok.encode(text, add_special_tokens=False)


def image_block(tok, num_images: int, tokens_per_image: int,
                groups: int = 1, noun: str = "image") -> list[int]:
  """`<|im_start|>user\\n` + one `<img><IMG_CONTEXT>*P</img>\\n` per image;
  with groups > 1 each group of num_images / groups is labelled
  `{noun} {k}: `."""
  ctx = tok.convert_tokens_to_ids(tokenizer_lib.IMG_CONTEXT)
  if ctx is None or ctx == tok.unk_token_id:
    raise ValueError(f"the tokenizer has no {tokenizer_lib.IMG_CONTEXT!r} "
                     "token; use an InternVL tokenizer (or the ShapesWorld "
                     "one)")
  one = (_ids(tok, tokenizer_lib.IMG_START) + [ctx] * tokens_per_image +
         _ids(tok, f"{tokenizer_lib.IMG_END}\n"))
  out = _ids(tok, USER)
  per = num_images // groups
  for g in range(groups):
    if groups > 1:
      out += _ids(tok, f"{noun} {g + 1}: ")
    out += one * per
  return out


def seq_len(tok, num_images: int, tokens_per_image: int, question_len: int,
            answer_len: int, groups: int = 1, after_len: int = 0) -> int:
  """Fixed sequence length for questions of <= question_len tokens (and
  text after the images of <= after_len)."""
  return (len(image_block(tok, num_images, tokens_per_image, groups))
          + question_len + after_len
          + len(_ids(tok, ASSISTANT)) + answer_len)


def encode(tok, questions: list[str], answers: list[str] | None = None, *,
           num_images: int, tokens_per_image: int, question_len: int,
           answer_len: int = 1, cot: str = "none",
           yes_no: tuple[int, int] | None = None, groups: int = 1,
           noun: str = "image", overflow: str = "error",
           decision: bool = True, answer_key: str = "answer_len",
           question_first: bool = False, after: list[str] | None = None,
           after_len: int = 0) -> dict[str, np.ndarray]:
  """Questions (and, for training, answers) -> fixed-length arrays above.

  Without answers the result is what the reward functions take (compute it
  once per prompt and reuse it). `cot` says where the decision token is in
  the answer: first ("none", "decision_first") or last ("reason_first").
  groups=2 (pairwise) labels the two images / videos `{noun} 1: `, ....
  A question longer than question_len fails (overflow="error") or keeps
  its last question_len tokens, the question itself, with a warning
  (overflow="truncate"). decision=False: answers need no yes/no token (no
  decision_index); answer_key names answer_len's config key in errors.
  question_first=True puts the question before the images
  (`<|im_start|>user\n{question}<img>...</img>\n...`), so that in the
  causal LM the image tokens attend to the prompt; same length and
  read position. `after` (one text per row, <= after_len tokens; the
  config's `prompt_after_len` > 0 passes the prompts) goes right after the
  last image: its tokens attend to the images, so a word of the prompt
  can be matched with what the image shows (a colour with its shape) even
  when the question came first.
  """
  if overflow not in ("error", "truncate"):
    raise ValueError(f"prompt overflow must be 'error' or 'truncate', got "
                     f"{overflow!r}")
  head = image_block(tok, num_images, tokens_per_image, groups, noun)
  tail = _ids(tok, ASSISTANT)
  user = _ids(tok, USER)
  images = head[len(user):]
  length = seq_len(tok, num_images, tokens_per_image, question_len,
                   answer_len, groups, after_len)
  b = len(questions)
  if after is not None and len(after) != b:
    raise ValueError(f"{b} questions but {len(after)} texts after the images")
  after_ids = [[] for _ in questions] if after is None else (
      tok(list(after), add_special_tokens=False)["input_ids"])
  out = {"input_ids": np.full((b, length), tok.pad_token_id, np.int32),
         "attention_mask": np.zeros((b, length), bool),
         "read_pos": np.zeros((b,), np.int32)}
  q_ids = tok(list(questions), add_special_tokens=False)["input_ids"]
  if answers is not None:
    if len(answers) != b:
      raise ValueError(f"{b} questions but {len(answers)} answers")
    if decision:
      yes_no = yes_no or tokenizer_lib.answer_token_ids(tok)
      out["decision_index"] = np.zeros((b,), np.int32)
    a_ids = tok(list(answers), add_special_tokens=False)["input_ids"]
    out["answer_ids"] = np.full((b, answer_len), tok.pad_token_id, np.int32)
    out["answer_mask"] = np.zeros((b, answer_len), bool)
  for i, q in enumerate(q_ids):
    if len(q) > question_len:
      msg = (f"question of {len(q)} tokens exceeds question_len="
             f"{question_len}: {questions[i][:80]!r}...")
      if overflow == "error":
        raise ValueError(f"{msg}; raise config.question_len or set "
                         f"config.prompt_overflow='truncate'")
      logging.warning("%s; kept its last %d tokens", msg, question_len)
      q = q[-question_len:]
    if len(after_ids[i]) > after_len:
      raise ValueError(f"text after the images of {len(after_ids[i])} tokens "
                       f"exceeds its {after_len} slots: {after[i][:80]!r}; "
                       f"raise config.prompt_after_len")
    between = images + after_ids[i]
    prompt = (user + q + between + tail if question_first
              else user + between + q + tail)
    n = len(prompt)
    out["input_ids"][i, :n] = prompt
    out["read_pos"][i] = n - 1
    if answers is not None:
      a = a_ids[i]
      if len(a) > answer_len:
        raise ValueError(
            f"{answer_key.removesuffix('_len')} of {len(a)} tokens exceeds "
            f"{answer_key}={answer_len}: {answers[i][:80]!r}; raise "
            f"config.{answer_key}")
      if decision:
        hits = [j for j, t in enumerate(a) if t in yes_no]
        if not hits:
          raise ValueError(f"answer {answers[i]!r} has no yes/no token")
        out["decision_index"][i] = (hits[-1] if cot == "reason_first"
                                    else hits[0])
      out["input_ids"][i, n:n + len(a)] = a
      out["answer_ids"][i, :len(a)] = a
      out["answer_mask"][i, :len(a)] = True
      n += len(a)
    out["attention_mask"][i, :n] = True
  return out


def caption(tok, prompts: list[str], *, num_images: int,
            tokens_per_image: int, caption_len: int) -> dict[str, np.ndarray]:
  """Captioning rows: the image block, then the assistant turn holding the
  prompt itself (`<|im_start|>user\\n<img>...</img>\\n<|im_end|>\\n
  <|im_start|>assistant\\n{prompt}`): the LM target of train_rm's
  paradigm="caption" (VLM pretraining), every prompt word tied to the
  pixels. `encode` with an empty question and the prompts as answers
  (answer_* = the prompt's tokens), without decision_index. A prompt over
  caption_len tokens is an error.
  """
  return encode(tok, [""] * len(prompts), prompts, num_images=num_images,
                tokens_per_image=tokens_per_image, question_len=0,
                answer_len=caption_len, decision=False,
                answer_key="caption_len")


def answer_positions(read_pos, answer_len: int):
  """[B] -> [B, A]: the positions whose logits predict answer tokens 0..A-1."""
  return read_pos[:, None] + np.arange(answer_len, dtype=np.int32)[None]
