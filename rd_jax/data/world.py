"""ShapesWorld: a procedural world of coloured shapes in which RewardDance runs.

A `Spec` is what a prompt asks for; `render` draws a sample that satisfies it;
`near_miss` draws a plausible sample that fails it in one labelled way. The
oracle (oracle.py) judges any image or video against a Spec from pixels alone.

Categories follow GenEval (single_object, two_object, counting, colors,
position, color_attr) plus `motion` for text-to-video / image-to-video.

Splits (what is held out, exactly):
  * train / test_id: the same distribution; different seeds. Every
    (colour, shape) combination in `OOD_COMBOS` is excluded from *every*
    rendered object (named in the prompt or not), and the style is the
    training style (light-gray background, object size in SIZE_RANGE).
  * test_ood: every sample contains at least one object whose
    (colour, shape) is in `OOD_COMBOS`, and is rendered in the shifted style:
    a warm-tinted background and objects of size OOD_SIZE_RANGE (larger than
    anything in training).
All pixel sizes are given for 64x64 and scale with the image size.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np
from scipy import ndimage

SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
COLORS = {  # six hues ~60 degrees apart: easy to tell apart under blur/noise
    "red": (220, 40, 40),
    "yellow": (225, 200, 30),
    "green": (40, 170, 60),
    "cyan": (30, 185, 200),
    "blue": (40, 70, 225),
    "purple": (165, 55, 205),
}
COLOR_NAMES = tuple(COLORS)
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = {"slowly": 1.5, "quickly": 3.5}  # px per frame at 64x64

IMAGE_CATEGORIES = ("single_object", "two_object", "counting", "colors",
                    "position", "color_attr")
VIDEO_CATEGORIES = ("motion",)
CATEGORIES = IMAGE_CATEGORIES + VIDEO_CATEGORIES
SPLITS = ("train", "test_id", "test_ood")

OOD_COMBOS = frozenset({("purple", "triangle"), ("cyan", "circle"),
                        ("yellow", "square")})
TRAIN_BACKGROUNDS = ((228, 228, 228), (215, 215, 215), (238, 238, 238))
OOD_BACKGROUND = (240, 226, 196)
SIZE_RANGE = (6.0, 9.0)       # object "radius" in px at 64x64, train / test_id
OOD_SIZE_RANGE = (9.5, 11.0)  # test_ood
GAP = 4.0                     # min px between objects (they never touch)

SEMANTIC_FAILURES = ("wrong_count", "wrong_color", "wrong_shape",
                     "wrong_position", "swapped_attributes", "wrong_motion",
                     "missing_object")
QUALITY_FAILURES = ("blur", "noise", "smear")
FAILURES = SEMANTIC_FAILURES + QUALITY_FAILURES

# Which near misses make sense for which category.
CATEGORY_FAILURES = {
    "single_object": ("wrong_shape", "missing_object", "wrong_count"),
    "two_object": ("wrong_shape", "missing_object"),
    "counting": ("wrong_count", "wrong_shape"),
    "colors": ("wrong_color", "wrong_shape"),
    "position": ("wrong_position", "wrong_shape"),
    "color_attr": ("swapped_attributes", "wrong_color"),
    "motion": ("wrong_motion", "wrong_color", "wrong_shape"),
}
QUALITY_FRACTION = 0.25  # share of pairs whose rejected sample is degraded

INSTRUCTIONS = {
    "single_object": "Check that the object in the prompt is there and has the right shape.",
    "two_object": "Check that both objects in the prompt are there with the right shapes.",
    "counting": "Check the number of objects.",
    "colors": "Check the colour and the shape of the object.",
    "position": "Check where each object is relative to the other.",
    "color_attr": "Check that each object has its own colour.",
    "motion": "Check the direction and the speed of each moving object.",
}
QUALITY_INSTRUCTION = "Also check that it is sharp and clean."


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  color: str | None = None         # None: not named in the prompt
  count: int = 1
  direction: str | None = None     # motion only
  speed: str | None = None         # motion only


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a prompt asks for. `relation` reads objects[0] REL objects[1]."""
  category: str
  objects: tuple[Obj, ...]
  relation: str | None = None

  @property
  def is_video(self) -> bool:
    return self.category in VIDEO_CATEGORIES

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @staticmethod
  def from_json(text: str) -> "Spec":
    d = json.loads(text)
    return Spec(d["category"], tuple(Obj(**o) for o in d["objects"]),
                d["relation"])


# ----------------------------------------------------------------- prompts

def _obj_phrase(o: Obj) -> str:
  color = f"{o.color} " if o.color else ""
  if o.count == 1:
    phrase = f"a {color}{o.shape}"
  else:
    phrase = f"{NUMBERS[o.count]} {color}{PLURAL[o.shape]}"
  if o.direction:
    phrase += f" moving {o.direction} {o.speed}"
  return phrase


def prompt(spec: Spec) -> str:
  a = _obj_phrase(spec.objects[0])
  if spec.relation:
    return f"{a} {spec.relation} {_obj_phrase(spec.objects[1])}"
  return " and ".join(_obj_phrase(o) for o in spec.objects)


def instruction(spec: Spec) -> str:
  return f"{INSTRUCTIONS[spec.category]} {QUALITY_INSTRUCTION}"


# -------------------------------------------------------------- sampling

def sample_spec(rng: np.random.Generator, category: str,
                split: str = "train") -> Spec:
  """A random prompt spec of `category` for `split`."""
  if category not in CATEGORIES:
    raise ValueError(f"unknown category {category!r}; one of {CATEGORIES}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
  shapes = list(SHAPES)
  if category == "single_object":
    return Spec(category, (Obj(str(rng.choice(shapes))),))
  if category == "two_object":
    a, b = rng.choice(shapes, 2, replace=False)
    return Spec(category, (Obj(str(a)), Obj(str(b))))
  if category == "counting":
    return Spec(category, (Obj(str(rng.choice(shapes)),
                               count=int(rng.integers(2, 5))),))
  if category == "position":
    a, b = rng.choice(shapes, 2, replace=False)
    return Spec(category, (Obj(str(a)), Obj(str(b))),
                str(rng.choice(RELATIONS)))
  combos = [(c, s) for c in COLOR_NAMES for s in shapes
            if ((c, s) in OOD_COMBOS) == (split == "test_ood")]
  others = [(c, s) for c in COLOR_NAMES for s in shapes
            if (c, s) not in OOD_COMBOS]
  if category == "colors":
    c, s = combos[rng.integers(len(combos))]
    return Spec(category, (Obj(s, c),))
  # color_attr and motion: one or two objects that differ in colour and shape;
  # the first carries the held-out combo in test_ood.
  n = 2 if category == "color_attr" else int(rng.integers(1, 3))
  c0, s0 = combos[rng.integers(len(combos))]
  objs = [(c0, s0)]
  if n == 2:
    rest = [(c, s) for c, s in others if c != c0 and s != s0]
    objs.append(rest[rng.integers(len(rest))])
    if rng.random() < 0.5:
      objs.reverse()
  if category == "color_attr":
    return Spec(category, tuple(Obj(s, c) for c, s in objs))
  return Spec(category, tuple(
      Obj(s, c, direction=str(rng.choice(DIRECTIONS)),
          speed=str(rng.choice(list(SPEEDS)))) for c, s in objs))


def eval_specs(kind: str = "image", split: str = "test_id", n: int = 60,
               seed: int = 0) -> list[Spec]:
  """`n` held-out prompt specs balanced over the categories of `kind`."""
  cats = {"image": IMAGE_CATEGORIES, "video": VIDEO_CATEGORIES}[kind]
  rng = np.random.default_rng([seed, SPLITS.index(split), 7])
  return [sample_spec(rng, cats[i % len(cats)], split) for i in range(n)]


# -------------------------------------------------------------- rendering

@dataclasses.dataclass(frozen=True)
class Placed:
  """A concrete object: centre (x, y) and radius r at frame 0, velocity v."""
  shape: str
  color: str
  x: float
  y: float
  r: float
  vx: float = 0.0
  vy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Placed, ...]
  background: tuple[int, int, int]
  frames: int | None = None  # None: an image


def _mask(shape: str, x: float, y: float, r: float, size: int,
          ss: int = 4) -> np.ndarray:
  """Anti-aliased coverage in [0,1] of one shape ([size, size], float32)."""
  g = (np.arange(size * ss) + 0.5) / ss
  yy, xx = g[:, None], g[None, :]
  if shape == "circle":
    m = (xx - x) ** 2 + (yy - y) ** 2 <= r * r
  elif shape == "square":
    h = r * 0.9
    m = (np.abs(xx - x) <= h) & (np.abs(yy - y) <= h)
  elif shape == "triangle":  # equilateral, pointing up, circumradius 1.25 r
    rc = 1.25 * r
    top, base = y - rc, y + rc / 2
    half = (yy - top) / (base - top) * rc * np.sqrt(3) / 2
    m = (yy >= top) & (yy <= base) & (np.abs(xx - x) <= half)
  else:
    raise ValueError(f"unknown shape {shape!r}")
  return m.reshape(size, ss, size, ss).mean((1, 3)).astype(np.float32)


def draw(scene: Scene, size: int = 64) -> np.ndarray:
  """uint8 [H,W,3] (image) or [T,H,W,3] (video) from a Scene."""
  scale = size / 64.0
  frames = scene.frames or 1
  out = np.empty((frames, size, size, 3), np.float32)
  for t in range(frames):
    img = np.broadcast_to(np.asarray(scene.background, np.float32),
                          (size, size, 3)).copy()
    for o in scene.objects:
      m = _mask(o.shape, (o.x + o.vx * t) * scale, (o.y + o.vy * t) * scale,
                o.r * scale, size)[..., None]
      img = img * (1 - m) + np.asarray(COLORS[o.color], np.float32) * m
    out[t] = img
  out = np.clip(np.round(out), 0, 255).astype(np.uint8)
  return out if scene.frames else out[0]


def _boxes(o: Placed, frames: int) -> np.ndarray:
  """[T, 4] (x0, y0, x1, y1) bounding boxes of `o` over the frames."""
  t = np.arange(frames, dtype=np.float64)
  x, y = o.x + o.vx * t, o.y + o.vy * t
  hw, up, down = {"circle": (1.0, 1.0, 1.0), "square": (0.9, 0.9, 0.9),
                  "triangle": (1.09, 1.25, 0.63)}[o.shape]
  return np.stack([x - hw * o.r, y - up * o.r, x + hw * o.r, y + down * o.r],
                  -1)


def _fits(objs: Sequence[Placed], frames: int) -> bool:
  """Inside the canvas, and boxes at least GAP apart, in every frame."""
  boxes = [_boxes(o, frames) for o in objs]
  for b in boxes:
    if b[:, :2].min() < 1.5 or b[:, 2:].max() > 62.5:
      return False
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      apart = ((a[:, 2] + GAP <= b[:, 0]) | (b[:, 2] + GAP <= a[:, 0]) |
               (a[:, 3] + GAP <= b[:, 1]) | (b[:, 3] + GAP <= a[:, 1]))
      if not apart.all():
        return False
  return True


_VEL = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _relation_ok(a: Placed, b: Placed, relation: str) -> bool:
  dx, dy = b.x - a.x, b.y - a.y  # a REL b
  need = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
  other = abs(dy) if relation in ("left of", "right of") else abs(dx)
  return need >= 16 and other <= 0.5 * need


def _color_for(rng, shape: str, split: str, avoid: Sequence[str] = ()) -> str:
  ok = [c for c in COLOR_NAMES if c not in avoid and
        ((c, shape) not in OOD_COMBOS or split == "test_ood")]
  return str(ok[rng.integers(len(ok))])


def _style(rng, split: str) -> tuple[tuple[int, int, int], tuple[float, float]]:
  if split == "test_ood":
    return OOD_BACKGROUND, OOD_SIZE_RANGE
  return TRAIN_BACKGROUNDS[rng.integers(len(TRAIN_BACKGROUNDS))], SIZE_RANGE


def layout(spec: Spec, rng: np.random.Generator, split: str = "train",
           frames: int | None = None, relation: str | None = None,
           max_tries: int = 500) -> Scene:
  """Places the objects of `spec` (colours drawn where the prompt is silent).

  `relation` overrides spec.relation (used to render a wrong position).
  """
  background, (rmin, rmax) = _style(rng, split)
  frames_n = frames or 1
  relation = relation or spec.relation
  todo = []  # (shape, color, vx, vy, colour left open by the prompt)
  for o in spec.objects:
    for _ in range(o.count):
      color = o.color or _color_for(rng, o.shape, split)
      vx = vy = 0.0
      if o.direction:
        ux, uy = _VEL[o.direction]
        vx, vy = ux * SPEEDS[o.speed], uy * SPEEDS[o.speed]
      todo.append((o.shape, color, vx, vy, o.color is None))
  if split == "test_ood" and not any((c, sh) in OOD_COMBOS
                                     for sh, c, *_ in todo):
    # every OOD sample shows a held-out combination: recolour an object whose
    # colour the prompt leaves open
    free = [i for i, t in enumerate(todo) if t[4]]
    i = free[rng.integers(len(free))]
    shape = todo[i][0]
    color = next(c for c, sh in sorted(OOD_COMBOS) if sh == shape)
    todo[i] = (shape, color) + todo[i][2:]
  for _ in range(max_tries):  # greedy placement, restarted when stuck
    placed: list[Placed] = []
    for shape, color, vx, vy, _ in todo:
      for _ in range(100):
        cand = Placed(shape, color, float(rng.uniform(6, 58)),
                      float(rng.uniform(6, 58)),
                      float(rng.uniform(rmin, rmax)), vx, vy)
        if _fits(placed + [cand], frames_n):
          placed.append(cand)
          break
      else:
        break
    if len(placed) < len(todo):
      continue
    if relation and not _relation_ok(placed[0], placed[1], relation):
      continue
    return Scene(tuple(placed), background, frames)
  raise RuntimeError(f"could not lay out {prompt(spec)!r} in {max_tries} tries")


def render(spec: Spec, rng: np.random.Generator, size: int = 64,
           frames: int | None = None, split: str = "train") -> np.ndarray:
  """A sample that satisfies `spec`: uint8 [H,W,3], or [T,H,W,3] for video."""
  if spec.is_video and not frames:
    frames = 8
  return draw(layout(spec, rng, split, frames), size)


# -------------------------------------------------- near misses (rejected)

def _replace_obj(scene: Scene, i: int, **kw) -> Scene:
  objs = list(scene.objects)
  objs[i] = dataclasses.replace(objs[i], **kw)
  return dataclasses.replace(scene, objects=tuple(objs))


def _other(rng, options: Sequence[str], current: str) -> str:
  rest = [o for o in options if o != current]
  return str(rest[rng.integers(len(rest))])


def near_miss(spec: Spec, scene: Scene, failure: str,
              rng: np.random.Generator, split: str = "train"
              ) -> tuple[Scene, str] | None:
  """The scene with one semantic failure, and a phrase describing it.

  Returns None if the failure does not apply (the caller picks another).
  The rest of the scene (positions, sizes, background) is kept, so the pair
  differs only where the failure is: a near miss, not a different picture.
  """
  objs = scene.objects
  if failure == "wrong_shape":
    i = int(rng.integers(len(objs)))
    o = objs[i]
    names = {p.shape for p in objs} if spec.category != "counting" else set()
    options = [s for s in SHAPES if s != o.shape and s not in names and
               ((o.color, s) not in OOD_COMBOS or split == "test_ood")]
    if not options:
      return None
    new = str(options[rng.integers(len(options))])
    return (_replace_obj(scene, i, shape=new),
            f"shows a {new} where the prompt asks for a {o.shape}")
  if failure == "wrong_color":
    named = [i for i, o in enumerate(spec.objects) if o.color]
    if not named:
      return None
    i = int(rng.choice(named))
    o = objs[i]
    avoid = [p.color for p in objs]
    options = [c for c in COLOR_NAMES if c not in avoid and
               ((c, o.shape) not in OOD_COMBOS or split == "test_ood")]
    new = str(options[rng.integers(len(options))])
    return (_replace_obj(scene, i, color=new),
            f"shows a {new} {o.shape} where the prompt asks for a "
            f"{o.color} {o.shape}")
  if failure == "swapped_attributes":
    if len(objs) != 2 or not all(o.color for o in spec.objects):
      return None
    a, b = objs
    if ((b.color, a.shape) in OOD_COMBOS or
        (a.color, b.shape) in OOD_COMBOS) and split != "test_ood":
      return None
    s = _replace_obj(_replace_obj(scene, 0, color=b.color), 1, color=a.color)
    return s, (f"has the colours swapped: a {b.color} {a.shape} and a "
               f"{a.color} {b.shape}")
  if failure == "wrong_position":
    if not spec.relation:
      return None
    a, b = objs
    # mirror both objects through the midpoint: same look, opposite relation
    s = _replace_obj(_replace_obj(scene, 0, x=b.x, y=b.y), 1, x=a.x, y=a.y)
    opposite = {"left of": "right of", "right of": "left of",
                "above": "below", "below": "above"}[spec.relation]
    return s, (f"shows the {a.shape} {opposite} the {b.shape} where the "
               f"prompt asks for {spec.relation} it")
  if failure == "wrong_count":
    o = spec.objects[0]
    if len(spec.objects) != 1:
      return None
    if o.count == 1 or rng.random() < 0.5 and o.count < 4:
      # add one more of the same shape somewhere free
      for _ in range(500):
        extra = Placed(o.shape, objs[0].color if o.color else _color_for(
            rng, o.shape, split), float(rng.uniform(6, 58)),
                       float(rng.uniform(6, 58)), objs[0].r)
        if _fits(objs + (extra,), scene.frames or 1):
          n = o.count + 1
          return (dataclasses.replace(scene, objects=objs + (extra,)),
                  f"shows {NUMBERS[n]} {PLURAL[o.shape]} where the prompt asks"
                  f" for {NUMBERS[o.count]}")
      return None
    n = o.count - 1
    return (dataclasses.replace(scene, objects=objs[:-1]),
            f"shows {NUMBERS[n]} {PLURAL[o.shape]} where the prompt asks for "
            f"{NUMBERS[o.count]}")
  if failure == "missing_object":
    if len(objs) == 1:
      return dataclasses.replace(scene, objects=()), (
          f"is empty: the {objs[0].shape} is missing")
    i = int(rng.integers(len(objs)))
    return (dataclasses.replace(scene, objects=objs[:i] + objs[i + 1:]),
            f"is missing the {objs[i].shape}")
  if failure == "wrong_motion":
    if not scene.frames:
      return None
    i = int(rng.integers(len(objs)))
    o = objs[i]
    d = spec.objects[i]
    kind = rng.choice(["direction", "speed", "still"])
    if kind == "still":
      new = _replace_obj(scene, i, vx=0.0, vy=0.0)
      text = f"shows the {o.shape} standing still instead of moving {d.direction}"
    elif kind == "speed":
      sp = _other(rng, list(SPEEDS), d.speed)
      ux, uy = _VEL[d.direction]
      new = _replace_obj(scene, i, vx=ux * SPEEDS[sp], vy=uy * SPEEDS[sp])
      text = f"shows the {o.shape} moving {sp} instead of {d.speed}"
    else:
      dr = _other(rng, DIRECTIONS, d.direction)
      ux, uy = _VEL[dr]
      new = _replace_obj(scene, i, vx=ux * SPEEDS[d.speed],
                         vy=uy * SPEEDS[d.speed])
      text = f"shows the {o.shape} moving {dr} instead of {d.direction}"
    # keep the changed object inside the frame and apart from the others
    if not _fits(new.objects, scene.frames):
      return None
    return new, text
  raise ValueError(f"unknown failure {failure!r}; one of {FAILURES}")


def degrade(sample: np.ndarray, failure: str, rng: np.random.Generator
            ) -> tuple[np.ndarray, str]:
  """A quality degradation of a (correct) sample, and its description."""
  x = sample.astype(np.float32)
  spatial = (0, 1) if x.ndim == 3 else (1, 2)
  if failure == "blur":
    sigma = [0.0] * x.ndim
    for a in spatial:
      sigma[a] = float(rng.uniform(1.6, 2.4))
    x = ndimage.gaussian_filter(x, sigma)
    text = "is blurry"
  elif failure == "noise":
    x = x + rng.normal(0, float(rng.uniform(28, 40)), x.shape)
    text = "is noisy"
  elif failure == "smear":
    length = int(rng.integers(7, 11))
    axis = spatial[int(rng.integers(2))]
    x = ndimage.uniform_filter1d(x, length, axis=axis)
    text = "is smeared"
  else:
    raise ValueError(f"unknown quality failure {failure!r}")
  return np.clip(np.round(x), 0, 255).astype(np.uint8), text


# ------------------------------------------------------ preference pairs

@dataclasses.dataclass(frozen=True)
class Pair:
  spec: Spec
  chosen: np.ndarray
  rejected: np.ndarray
  failure: str
  failure_text: str   # "shows a blue circle where the prompt asks for ..."


def make_pair(spec: Spec, rng: np.random.Generator, size: int = 64,
              frames: int | None = None, split: str = "train") -> Pair:
  """A preferred sample and a labelled near miss for `spec`."""
  if spec.is_video and not frames:
    frames = 8
  while True:  # a layout always admits at least one failure of its category
    scene = layout(spec, rng, split, frames)
    chosen = draw(scene, size)
    if rng.random() < QUALITY_FRACTION:
      failure = str(rng.choice(QUALITY_FAILURES))
      rejected, text = degrade(chosen, failure, rng)
      return Pair(spec, chosen, rejected, failure, text)
    options = list(CATEGORY_FAILURES[spec.category])
    rng.shuffle(options)
    for failure in options:
      out = near_miss(spec, scene, failure, rng, split)
      if out is not None:
        return Pair(spec, chosen, draw(out[0], size), failure, out[1])
