"""The reward model's questions and chain-of-thought rationales (DESIGN.md §2.1-2.2).

Pairwise (image 1 = reference, image 2 = candidate):
  Please evaluate two images generated from the prompt: "{prompt}". Is image 2
  better than image 1? Please answer "yes" or "no"{cot_suffix}. {instruction}
Pointwise:
  Does this image match the prompt: "{prompt}", and is it high quality?
  Please answer "yes" or "no"{cot_suffix}. {instruction}

Rationales come from the known failure of the rejected sample, in two formats:
  decision_first: `yes. Reasons: image 1 is blurry; image 2 matches the prompt.`
  reason_first:   `Reasons: image 1 is blurry; image 2 matches the prompt. Answer: yes`
"""
from __future__ import annotations

from rd_jax.data import world

COT_FORMATS = ("none", "decision_first", "reason_first")
COT_SUFFIX = ", and give your reasons"


def _noun(video: bool) -> str:
  return "video" if video else "image"


def pairwise_question(prompt: str, instruction: str = "", cot: str = "none",
                      video: bool = False) -> str:
  n = _noun(video)
  suffix = COT_SUFFIX if cot != "none" else ""
  text = (f'Please evaluate two {n}s generated from the prompt: "{prompt}". '
          f'Is {n} 2 better than {n} 1? Please answer "yes" or "no"{suffix}.')
  return f"{text} {instruction}".strip()


def pointwise_question(prompt: str, instruction: str = "", cot: str = "none",
                       video: bool = False) -> str:
  n = _noun(video)
  suffix = COT_SUFFIX if cot != "none" else ""
  text = (f'Does this {n} match the prompt: "{prompt}", and is it high '
          f'quality? Please answer "yes" or "no"{suffix}.')
  return f"{text} {instruction}".strip()


def _format(answer: str, reasons: str, cot: str) -> str:
  if cot == "none":
    return answer
  if cot == "decision_first":
    return f"{answer}. Reasons: {reasons}"
  if cot == "reason_first":
    return f"Reasons: {reasons} Answer: {answer}"
  raise ValueError(f"unknown CoT format {cot!r}; one of {COT_FORMATS}")


def pairwise_answer(candidate_is_chosen: bool, failure_text: str,
                    cot: str = "none", video: bool = False) -> str:
  """The target text: is image 2 (the candidate) better than image 1?"""
  n = _noun(video)
  bad, good = (1, 2) if candidate_is_chosen else (2, 1)
  reasons = f"{n} {bad} {failure_text}; {n} {good} matches the prompt."
  return _format("yes" if candidate_is_chosen else "no", reasons, cot)


def pointwise_answer(is_chosen: bool, failure_text: str, cot: str = "none",
                     video: bool = False) -> str:
  n = _noun(video)
  reasons = (f"the {n} matches the prompt." if is_chosen
             else f"the {n} {failure_text}.")
  return _format("yes" if is_chosen else "no", reasons, cot)


def corpus(samples_per_category: int = 60, seed: int = 0) -> list[str]:
  """Every kind of text ShapesWorld produces (to build a closed vocabulary)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  texts = [" ".join(world.SHAPES + tuple(world.PLURAL.values()) +
                    world.COLOR_NAMES + world.NUMBERS + world.RELATIONS +
                    world.DIRECTIONS + tuple(world.SPEEDS) +
                    tuple(str(i) for i in range(10)))]
  texts += list(world.INSTRUCTIONS.values()) + [world.QUALITY_INSTRUCTION]
  for split in world.SPLITS:
    for category in world.CATEGORIES:
      video = category in world.VIDEO_CATEGORIES
      for _ in range(samples_per_category):
        spec = world.sample_spec(rng, category, split)
        scene = world.layout(spec, rng, split, 8 if video else None)
        p = world.prompt(spec)
        texts.append(pairwise_question(p, world.instruction(spec), "reason_first", video))
        texts.append(pointwise_question(p, world.instruction(spec), "reason_first", video))
        for failure in world.CATEGORY_FAILURES[category]:
          out = world.near_miss(spec, scene, failure, rng, split)
          if out is not None:
            texts.append(pairwise_answer(True, out[1], "reason_first", video))
            texts.append(pointwise_answer(False, out[1], "decision_first", video))
  for failure in world.QUALITY_FAILURES:
    texts.append(world.degrade(np.zeros((4, 4, 3), np.uint8), failure, rng)[1])
  texts.append(pointwise_answer(True, "", "decision_first"))
  return texts
