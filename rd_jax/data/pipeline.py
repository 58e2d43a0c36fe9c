"""Building ShapesWorld on disk and reading it with grain.

    build(data_dir)                      # TFDS -> ArrayRecord + tokenizer
    it = iter(loader(data_dir, "image", "train", batch_size=32, seed=0))
    batch = next(it)                     # dict of numpy arrays
    state = it.get_state(); it.set_state(state)   # resumable

Batches (B = batch size; samples are uint8 images [B,64,64,3] or videos
[B,8,64,64,3]):
  chosen, rejected   the preferred sample and its labelled near miss
  prompt_ids         int32 [B, max_len] word-level tokens of the prompt
  prompt_mask        bool  [B, max_len]
  category, failure  int32 [B], indices into world.CATEGORIES / FAILURES
  id                 int64 [B], record index within the split
  prompt, spec, failure_text   bytes [B] (spec is JSON: world.Spec.from_json)

Corrupt records (a bad disk, a cut copy) fail with the record's index and
the fix (on_corrupt="fail", the default), or are skipped with a warning
that counts them (on_corrupt="skip").

Thinning: `keep={failure: fraction}` keeps that fraction of the records
whose rejected sample has that failure (world.FAILURES; unnamed ones are
all kept), chosen by a hash of the record index and the seed, so it is
deterministic and resumes. It spends the steps on the near misses a model
still gets wrong instead of the ones it has learnt (quality failures are
~25% of the records and reach accuracy ~1.0 early).

Caching: `cache=True` keeps every record a process has read, decoded, in
its memory (ShapesWorld's default image train split: about 250 MB), so
later epochs and later loaders of the same split in that process skip
the read and decode: a 64-record batch takes 5.7 ms instead of 19.1
(docs/reward_models.md, "The records cache").

Sharding: each process reads the records `shard_index::shard_count` of a
deterministic permutation (defaults: jax.process_index()/process_count()),
so the processes of a pod see disjoint parts of every epoch.
"""
from __future__ import annotations

import os
import time

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rd_jax.data import tfds_shapes, tokenizer, world

KINDS = ("image", "video")


def tokenizer_dir(data_dir: str) -> str:
  return os.path.join(data_dir, "tokenizer")


def check_data_dir(data_dir: str) -> None:
  """Fails clearly when `data_dir` exists but cannot hold or give data."""
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise NotADirectoryError(
        f"data_dir {data_dir!r} is a file, not a directory; point "
        f"--config.data_dir at a directory (it is built there if empty)")
  if os.path.isdir(data_dir) and not os.access(data_dir, os.R_OK | os.X_OK):
    raise PermissionError(
        f"data_dir {data_dir!r} is not readable; fix its permissions or "
        f"point --config.data_dir elsewhere")


def _builder(data_dir: str, kind: str, scale: str) -> tfds_shapes.ShapesWorld:
  check_data_dir(data_dir)
  if kind not in KINDS:
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
  if scale not in tfds_shapes.SCALES:
    raise ValueError(f"unknown scale {scale!r}; one of {tuple(tfds_shapes.SCALES)}")
  return tfds_shapes.ShapesWorld(
      config=tfds_shapes.config_name(kind, scale), data_dir=data_dir)


def build(data_dir: str, scale: str = "default", kinds=KINDS,
          log=print) -> dict[str, float]:
  """Writes ShapesWorld (ArrayRecord) and its tokenizer; reuses what exists.

  Returns seconds spent per part.
  """
  tfds.disable_progress_bar()
  timings = {}
  for kind in kinds:
    t0 = time.time()
    b = _builder(data_dir, kind, scale)
    b.download_and_prepare(file_format="array_record")
    timings[kind] = time.time() - t0
    sizes = {s: b.info.splits[s].num_examples for s in world.SPLITS}
    log(f"[data] {kind}/{scale}: {sizes} in {timings[kind]:.1f}s -> {b.data_dir}")
  t0 = time.time()
  if not os.path.exists(os.path.join(tokenizer_dir(data_dir), "tokenizer.json")):
    tok = tokenizer.build(tokenizer_dir(data_dir))
    log(f"[data] tokenizer: {len(tok)} tokens -> {tokenizer_dir(data_dir)}")
  timings["tokenizer"] = time.time() - t0
  return timings


def data_source(data_dir: str, kind: str, split: str,
                scale: str = "default"):
  """Random-access source of decoded records for one split."""
  if split not in world.SPLITS:
    raise ValueError(f"unknown split {split!r}; one of {world.SPLITS}")
  b = _builder(data_dir, kind, scale)
  if not os.path.isdir(b.data_dir) or not os.path.exists(
      os.path.join(b.data_dir, "dataset_info.json")):
    raise FileNotFoundError(
        f"no ShapesWorld {kind}/{scale} data under {data_dir!r}; build it "
        f"with: python -m rd_jax.data.build --data_dir={data_dir} "
        f"--scale={scale}")
  return b.as_data_source(split=split)


class CorruptRecordError(RuntimeError):
  """A record of the data could not be read or decoded."""


class _Checked:
  """A data source whose unreadable records fail clearly or read as None."""

  def __init__(self, source, data_dir: str, kind: str, split: str,
               scale: str, on_corrupt: str, cache: dict | None = None):
    if on_corrupt not in ("fail", "skip"):
      raise ValueError(f"on_corrupt must be 'fail' or 'skip', got "
                       f"{on_corrupt!r}")
    self.source, self.on_corrupt, self.skipped = source, on_corrupt, 0
    self.cache = cache  # {index: record} read before, or None
    self.args = (data_dir, kind, scale)
    self.where = f"ShapesWorld {kind}/{scale} {split} in {data_dir}"

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:  # grain checks it when restoring an iterator
    return repr(self.source)

  def __getitem__(self, i):
    if self.cache is not None and i in self.cache:
      return self.cache[i]
    try:
      record = self.source[i]
    except Exception as e:  # pylint: disable=broad-except
      if self.on_corrupt == "fail":
        data_dir, kind, scale = self.args
        raise CorruptRecordError(
            f"corrupt record {i} of {self.where}: {e}; rebuild it (delete "
            f"{_builder(data_dir, kind, scale).data_dir} and run python -m "
            f"rd_jax.data.build --data_dir={data_dir} --scale={scale}), or "
            f"set config.on_corrupt='skip' to skip and count such records"
        ) from None
      self.skipped += 1
      logging.warning("skipped corrupt record %d of %s (%d skipped so far): "
                      "%s", i, self.where, self.skipped, e)
      return None
    if self.cache is not None:
      self.cache[i] = record
    return record


# (data_dir, kind, split, scale) -> {record index: decoded record}: the
# records loaders with cache=True have read in this process.
_CACHE: dict[tuple, dict] = {}


class _Readable(grain.transforms.Filter):
  """Drops the records _Checked could not read (on_corrupt='skip')."""

  def filter(self, element) -> bool:
    return element is not None


class _Keep(grain.transforms.Filter):
  """Keeps keep[failure] of the records of each failure (see the module
  docstring), by a uniform hash of (seed, record index)."""

  def __init__(self, keep, seed: int):
    keep = dict(keep)
    unknown = sorted(set(keep) - set(world.FAILURES))
    if unknown:
      raise ValueError(f"keep names unknown failures {unknown}; the failures "
                       f"are {list(world.FAILURES)}")
    bad = {f: v for f, v in keep.items() if not 0.0 <= v <= 1.0}
    if bad:
      raise ValueError(f"keep fractions must lie in [0, 1], got {bad}")
    if all(keep.get(f, 1.0) == 0.0 for f in world.FAILURES):
      raise ValueError("keep drops every failure: no records would be left")
    self.fractions = np.array([keep.get(f, 1.0) for f in world.FAILURES])
    self._seed = np.uint64(seed)

  def filter(self, element) -> bool:
    # splitmix64 of (index, seed): a uniform draw in [0, 1) per record.
    with np.errstate(over="ignore"):
      z = (np.uint64(element["id"]) * np.uint64(0x9E3779B97F4A7C15)
           + self._seed * np.uint64(0xBF58476D1CE4E5B9))
      z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      z ^= z >> np.uint64(31)
    return float(z >> np.uint64(11)) / 2.0 ** 53 < self.fractions[
        int(element["failure"])]


class _Prepare(grain.transforms.Map):
  """Record -> numpy example with tokenized prompt."""

  CACHE = 1 << 16  # prompts kept tokenized (ShapesWorld has far fewer)

  def __init__(self, tok_dir: str, max_len: int):
    self._tok_dir, self._max_len, self._tok = tok_dir, max_len, None
    self._ids = {}

  def map(self, record):
    if self._tok is None:  # loaded lazily: cheap to pickle into workers
      self._tok = tokenizer.load(self._tok_dir)
    prompt = record["prompt"]
    # Tokenizing costs ~1 ms a call, most of a small batch's loading time;
    # prompts repeat, so each is tokenized once.
    enc = self._ids.get(prompt)
    if enc is None:
      ids, mask = tokenizer.encode(self._tok, [prompt.decode()],
                                   self._max_len)
      enc = (ids[0], mask[0])
      if len(self._ids) < self.CACHE:
        self._ids[prompt] = enc
    return {
        "chosen": record["chosen"], "rejected": record["rejected"],
        "prompt_ids": enc[0], "prompt_mask": enc[1],  # Batch copies them
        "category": np.int32(record["category"]),
        "failure": np.int32(record["failure"]),
        "id": np.int64(record["id"]),
        "prompt": prompt, "spec": record["spec"],
        "failure_text": record["failure_text"],
    }


def loader(data_dir: str, kind: str = "image", split: str = "train", *,
           batch_size: int, seed: int = 0, scale: str = "default",
           max_len: int = 24, shuffle: bool = True,
           num_epochs: int | None = None, drop_remainder: bool = True,
           shard_index: int | None = None, shard_count: int | None = None,
           worker_count: int = 0, on_corrupt: str = "fail",
           read_threads: int = 0,
           keep: dict[str, float] | None = None,
           cache: bool = False) -> grain.DataLoader:
  """A deterministic grain DataLoader over one split (see module docstring).

  `num_epochs=None` repeats forever (training); evaluation passes 1.
  `read_threads=0` reads records in the calling thread: for local files that
  is ~2.8x faster than grain's default 16 threads and 500-record buffer,
  whose GIL contention and buffer polling cost more than the reads (batch of
  8 images: 3.8 vs 10.7 ms). Raise it for remote storage.
  `keep` thins records by failure (module docstring); None keeps all.
  `cache` keeps the decoded records in this process (module docstring).
  Same arguments -> identical batches; `iter(...).get_state()` / `set_state`
  resume exactly.
  """
  import jax  # pylint: disable=import-outside-toplevel
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  source = _Checked(data_source(data_dir, kind, split, scale), data_dir,
                    kind, split, scale, on_corrupt,
                    _CACHE.setdefault((os.path.abspath(data_dir), kind, split,
                                       scale), {}) if cache else None)
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(
          shard_index=shard_index, shard_count=shard_count,
          drop_remainder=True),
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  ops = [_Readable()]
  if keep is not None:
    thin = _Keep(keep, seed)  # validates keep, even when it keeps all
    if (thin.fractions < 1).any():
      ops.append(thin)
  ops += [_Prepare(tokenizer_dir(data_dir), max_len),
          grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)]
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops,
      worker_count=worker_count,
      read_options=grain.ReadOptions(num_threads=read_threads))


def specs_of(batch) -> list[world.Spec]:
  """The world.Spec of every example in a batch."""
  return [world.Spec.from_json(s.decode()) for s in batch["spec"]]
