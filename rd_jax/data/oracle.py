"""The ShapesWorld oracle: judges an image or video against its Spec, from pixels.

This is rd_jax's GenEval. It uses no learned model, so it is independent of
every reward model and generator: "reward up, oracle down" is reward hacking.

How it sees (all at 64x64; other sizes are resized first):
  1. Smooth with a small Gaussian (robust to generator noise).
  2. Background = per-channel median of the image; foreground = pixels far
     from it in RGB (works on any plain background, incl. the OOD tint).
     The background must be plain: at least PLAIN_FRACTION of the pixels
     lie near its colour, or the image fails (no objects are looked for).
     Without this, objects drawn on a many-coloured texture passed: once
     smoothed, the texture is too close to its median colour to be objects.
  3. Connected foreground components above a minimum area are objects.
  4. Colour = palette colour nearest in hue to the component's mean colour
     (weighted by how far each pixel is from the background).
     Shape = the circle, square or triangle template (centred on the
     component, with its area) closest to the component's soft mask.
  5. The category's rule compares detected objects to the spec: exact object
     counts (extra objects fail), shapes, colours, relative position of
     centroids, and for videos per-object tracks (direction, speed).
"""
from __future__ import annotations

import collections
import colorsys
import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from rd_jax.data import world

CANON = 64
SMOOTH_SIGMA = 0.7
FG_DISTANCE = 60.0     # RGB distance from the background that counts as ink
MIN_AREA = 14          # px at 64x64; smaller components are specks
MIN_OFFSET = 4.0       # px a position relation must hold by
MIN_SPEED = 0.7        # px/frame for "moving"
FAST_SPEED = 2.5       # px/frame between "slowly" (1.5) and "quickly" (3.5)
TEMPLATE_BLURS = (0.0, 0.8, 1.4)
TRACK_FRACTION = 0.75  # share of frames an object must be seen in
# Share of pixels within FG_DISTANCE / 2 of the background colour that makes
# a plain background. Renders have >= 0.58 (the large OOD objects; 9,300
# images and frames checked); with world.degrade's sigma 28-40 noise, 99%
# have >= 0.47 (0.34 at worst: ~1% of such OOD images fail); the
# checkerboards ReFL painted at 32x32 have 0.02-0.03, a board of 2-px red
# and green cells 0.20-0.34.
PLAIN_FRACTION = 0.45

_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] * 360
         for name, rgb in world.COLORS.items()}


@dataclasses.dataclass(frozen=True)
class Detection:
  shape: str
  color: str
  x: float
  y: float
  area: int


def _canon(img: np.ndarray) -> np.ndarray:
  """float32 [64,64,3] from uint8/float image of any size."""
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = np.clip(np.round(np.asarray(img, np.float32)), 0, 255).astype(
        np.uint8)
  if img.shape[:2] != (CANON, CANON):
    img = np.asarray(Image.fromarray(img).resize((CANON, CANON),
                                                 Image.BILINEAR))
  return img.astype(np.float32)


def _hue_name(rgb: np.ndarray) -> str:
  h = colorsys.rgb_to_hsv(*(np.clip(rgb, 0, 255) / 255.0))[0] * 360
  return min(_HUES, key=lambda n: min(abs(h - _HUES[n]), 360 - abs(h - _HUES[n])))


# radius r at which each shape has unit area (world._mask geometry)
_UNIT_R = {"circle": 1 / np.sqrt(np.pi), "square": 1 / 1.8,
           "triangle": 1 / (1.25 * np.sqrt(3 * np.sqrt(3) / 4))}


def _shape_of(soft: np.ndarray) -> str:
  """The shape whose area-matched template best explains a soft mask.

  `soft` [64,64] in [0,1] is how much each pixel looks like the object. Each
  template is centred on the mask's centroid with the mask's area, blurred by
  each of TEMPLATE_BLURS (samples from a generator are soft-edged), and the
  smallest L1 difference wins: it uses every pixel, so it degrades
  gracefully under blur and noise.
  """
  area = soft.sum()
  ys, xs = np.indices(soft.shape) + 0.5
  cx, cy = (soft * xs).sum() / area, (soft * ys).sum() / area
  # a 32x32 window around the object (objects are < 28 px across)
  x0 = int(np.clip(round(cx) - 16, 0, soft.shape[1] - 32))
  y0 = int(np.clip(round(cy) - 16, 0, soft.shape[0] - 32))
  window = soft[y0:y0 + 32, x0:x0 + 32]
  errors = {}
  for shape, unit in _UNIT_R.items():
    t = world._mask(shape, cx - x0, cy - y0, unit * np.sqrt(area), 32)  # pylint: disable=protected-access
    errors[shape] = min(np.abs(ndimage.gaussian_filter(t, b) - window).sum()
                        for b in TEMPLATE_BLURS)
  return min(errors, key=errors.get)


def _scan(img: np.ndarray) -> tuple[list[Detection], float]:
  """The objects in one image (uint8 [H,W,3]) and the share of its pixels
  near the background colour (a plain background has >= PLAIN_FRACTION)."""
  x = ndimage.gaussian_filter(_canon(img), (SMOOTH_SIGMA, SMOOTH_SIGMA, 0))
  background = np.median(x.reshape(-1, 3), 0)
  dist = np.linalg.norm(x - background, axis=-1)
  plain = float((dist < FG_DISTANCE / 2).mean())
  if plain < PLAIN_FRACTION:
    return [], plain
  labels, n = ndimage.label(dist > FG_DISTANCE, structure=np.ones((3, 3)))
  out = []
  for i in range(1, n + 1):
    mask = labels == i
    area = int(mask.sum())
    if area < MIN_AREA:
      continue
    w = dist[mask][:, None]
    mean = (x[mask] * w).sum(0) / w.sum()
    ys, xs = np.nonzero(mask)
    # soft mask: the object's own contrast sets the scale, whatever its colour
    near = ndimage.binary_dilation(mask, iterations=2)
    soft = np.where(near, np.clip(dist / np.percentile(dist[mask], 90), 0, 1),
                    0.0)
    out.append(Detection(_shape_of(soft), _hue_name(mean),
                         float(xs.mean()), float(ys.mean()), area))
  return out, plain


def detect(img: np.ndarray) -> list[Detection]:
  """Objects in one image (uint8 [H,W,3]); none without a plain background."""
  return _scan(img)[0]


def _not_plain(plain: float) -> str:
  return (f"the background is not plain ({plain:.0%} of pixels near its "
          f"colour, needs {PLAIN_FRACTION:.0%})")


# ------------------------------------------------------------------ rules

def _expected(spec: world.Spec) -> list[tuple[str, str | None]]:
  return [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]


def _match(dets: Sequence[Detection], spec: world.Spec) -> str | None:
  """None if the detections are exactly the spec's objects, else why not."""
  want = _expected(spec)
  if len(dets) != len(want):
    return f"found {len(dets)} objects, expected {len(want)}"
  pool = list(dets)
  # named colours first, so unnamed ones cannot steal their detections
  for shape, color in sorted(want, key=lambda w: w[1] is None):
    hit = next((d for d in pool if d.shape == shape and
                (color is None or d.color == color)), None)
    if hit is None:
      return f"no {color or ''} {shape}".replace("  ", " ")
    pool.remove(hit)
  return None


def _relation(dets: Sequence[Detection], spec: world.Spec) -> str | None:
  a = next(d for d in dets if d.shape == spec.objects[0].shape)
  b = next(d for d in dets if d.shape == spec.objects[1].shape)
  dx, dy = b.x - a.x, b.y - a.y
  need = {"left of": dx, "right of": -dx, "above": dy,
          "below": -dy}[spec.relation]
  other = abs(dy) if spec.relation in ("left of", "right of") else abs(dx)
  if need < MIN_OFFSET or need < 0.5 * other:
    return f"{a.shape} is not {spec.relation} {b.shape}"
  return None


def judge_image(img: np.ndarray, spec: world.Spec) -> tuple[bool, str]:
  dets, plain = _scan(img)
  if plain < PLAIN_FRACTION:
    return False, _not_plain(plain)
  why = _match(dets, spec)
  if why is None and spec.relation:
    why = _relation(dets, spec)
  return why is None, why or "ok"


def _track(frames: Sequence[Sequence[Detection]], color: str, need: int):
  """The object of `color` followed through `frames` (nearest to its last
  position) -> (fitted velocity (vx, vy) in px/frame, its shapes), or None
  when it is seen in fewer than `need` frames."""
  track, shapes, prev = [], [], None
  for t, dets in enumerate(frames):
    cands = [d for d in dets if d.color == color]
    if not cands:
      continue
    d = cands[0] if prev is None else min(
        cands, key=lambda c: (c.x - prev.x) ** 2 + (c.y - prev.y) ** 2)
    track.append((t, d.x, d.y))
    shapes.append(d.shape)
    prev = d
  if len(track) < need:
    return None
  t, xs, ys = (np.array(v, np.float64) for v in zip(*track))
  return (np.polyfit(t, xs, 1)[0], np.polyfit(t, ys, 1)[0]), shapes


def _moves(velocity, obj: world.Obj) -> tuple[bool, bool]:
  """(moves in obj's direction, ... and at obj's speed)."""
  vx, vy = velocity
  ux, uy = world._VEL[obj.direction]  # pylint: disable=protected-access
  along = vx * ux + vy * uy
  across = abs(vx * uy) + abs(vy * ux)
  direction = along >= MIN_SPEED and across <= 0.5 * along
  return direction, direction and (along >= FAST_SPEED) == (
      obj.speed == "quickly")


def judge_video(video: np.ndarray, spec: world.Spec) -> tuple[bool, str]:
  """Every object present, right shape and colour, moving as asked."""
  scans = [_scan(f) for f in video]
  frames = [dets for dets, _ in scans]
  t_n = len(frames)
  need = int(np.ceil(TRACK_FRACTION * t_n))
  flawed = [p for _, p in scans if p < PLAIN_FRACTION]  # frames not plain
  if len(flawed) > t_n - need:
    return False, f"{_not_plain(min(flawed))} in {len(flawed)} frames"
  good_count = sum(len(d) == len(spec.objects) for d in frames)
  if good_count < need:
    return False, f"wrong number of objects in {t_n - good_count} frames"
  for o in spec.objects:
    tracked = _track(frames, o.color, need)
    if tracked is None:
      return False, f"no {o.color} object in most frames"
    velocity, shapes = tracked
    if majority(shapes) != o.shape:
      return False, f"the {o.color} object is not a {o.shape}"
    direction, speed = _moves(velocity, o)
    if not direction:
      return False, f"the {o.shape} does not move {o.direction}"
    if not speed:
      return False, f"the {o.shape} does not move {o.speed}"
  return True, "ok"


def majority(labels: Sequence[str]) -> str:
  """The most frequent label; a tie goes to the one seen first. (Not
  max(set(labels), ...): a set's order of strings changes with each
  process's hash seed, and so did tied verdicts.)"""
  return collections.Counter(labels).most_common(1)[0][0]


def judge(sample: np.ndarray, spec: world.Spec) -> tuple[bool, str]:
  """(correct, reason) for an image [H,W,3] or a video [T,H,W,3]."""
  sample = np.asarray(sample)
  if sample.ndim == 4:
    if not spec.is_video:
      raise ValueError(f"got a video for the image spec {world.prompt(spec)!r}")
    return judge_video(sample, spec)
  if sample.ndim != 3:
    raise ValueError(f"expected [H,W,3] or [T,H,W,3], got {sample.shape}")
  if spec.is_video:
    raise ValueError(f"got an image for the video spec {world.prompt(spec)!r}")
  return judge_image(sample, spec)


def score(sample: np.ndarray, spec: world.Spec) -> bool:
  return judge(sample, spec)[0]


def score_batch(samples: Sequence[np.ndarray] | np.ndarray,
                specs: Sequence[world.Spec]) -> np.ndarray:
  """bool [B]: the oracle's verdict for each (sample, spec)."""
  if len(samples) != len(specs):
    raise ValueError(f"{len(samples)} samples for {len(specs)} specs")
  return np.array([score(s, p) for s, p in zip(samples, specs)], bool)


def _rate(flags: Sequence[bool]) -> float:
  """Share of True in `flags`; NaN when there are none."""
  return float(np.mean(flags)) if flags else float("nan")


def attributes(samples: Sequence[np.ndarray] | np.ndarray,
               specs: Sequence[world.Spec]) -> dict[str, float]:
  """Which attribute images get wrong, apart from the all-or-nothing verdict:
  `count` = share of images with exactly the spec's number of objects;
  `blank` = share with no object found at all (a failure of its own in
  the small generators: an empty background); over one-object specs where
  one object is found, `shape` = share of the right shape and `color` =
  share of the right colour (specs naming one);
  `n_single` / `n_color` = how many such images (the rates are NaN at 0)."""
  count, blank, shape, color = [], [], [], []
  for img, spec in zip(samples, specs):
    if spec.is_video:
      raise ValueError(f"attributes() judges images; got the video spec "
                       f"{world.prompt(spec)!r}")
    dets, want = detect(img), _expected(spec)
    count.append(len(dets) == len(want))
    blank.append(not dets)
    if len(want) == 1 and len(dets) == 1:
      shape.append(dets[0].shape == want[0][0])
      if want[0][1] is not None:
        color.append(dets[0].color == want[0][1])
  return {"count": _rate(count), "blank": _rate(blank), "shape": _rate(shape),
          "color": _rate(color), "n_single": len(shape),
          "n_color": len(color)}


def motion(videos: Sequence[np.ndarray] | np.ndarray,
           specs: Sequence[world.Spec]) -> dict[str, float]:
  """Whether videos move their objects as asked, apart from the
  all-or-nothing verdict (which also needs the right count and shapes):
  each moving object of each spec is followed by its colour as
  `judge_video` does. `tracked` = share of those objects seen in most
  frames; over the tracked ones, `direction` = share moving in the asked
  direction (a random one of the four would give 0.25; a still object
  fails) and `speed` = share moving in that direction at the asked speed;
  `moving` = share moving at all (fitted speed >= MIN_SPEED, any way);
  `n_tracked` = how many were tracked (the rates are NaN at 0)."""
  tracked, direction, speed, moving = [], [], [], []
  for video, spec in zip(videos, specs):
    if not spec.is_video:
      raise ValueError(f"motion() judges videos; got the image spec "
                       f"{world.prompt(spec)!r}")
    frames = [_scan(f)[0] for f in video]
    need = int(np.ceil(TRACK_FRACTION * len(frames)))
    for o in spec.objects:
      if o.direction is None:
        continue
      got = _track(frames, o.color, need)
      tracked.append(got is not None)
      if got is not None:
        d, s = _moves(got[0], o)
        direction.append(d)
        speed.append(s)
        moving.append(bool(np.hypot(*got[0]) >= MIN_SPEED))
  return {"tracked": _rate(tracked), "direction": _rate(direction),
          "speed": _rate(speed), "moving": _rate(moving),
          "n_tracked": len(direction)}


def by_category(correct: Sequence[bool], specs: Sequence[world.Spec]
                ) -> dict[str, float]:
  """Mean correctness per category, plus `overall`."""
  correct = np.asarray(correct, np.float64)
  cats = np.array([s.category for s in specs])
  out = {c: float(correct[cats == c].mean()) for c in dict.fromkeys(cats)}
  out["overall"] = float(correct.mean()) if len(correct) else float("nan")
  return out
