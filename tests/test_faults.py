"""Faults: kills at random points, preemption, non-finite steps, bad input.

The end-to-end tests run `python -m rd_jax.train_rm` (smoke config, a
checkpoint every step) as a user would, interrupt it with SIGKILL (at random
steps and in the middle of a checkpoint write) and SIGTERM, rerun the same
command each time, and compare with an uninterrupted run bit for bit.
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rd_jax import cli, train_util
from rd_jax.data import pipeline
from rd_jax.reward import sequences

from rm_runs import ROOT, STEPS, env as rm_env, losses as _lines, start as _start  # noqa: E402  pylint: disable=g-bad-import-order


def _wait_for(proc, cond, timeout=300):
  t0 = time.time()
  while not cond():
    assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
    assert time.time() - t0 < timeout, "timed out"
    time.sleep(0.002)


def _tmp_writes(workdir) -> list[str]:
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def _final_params(workdir):
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(workdir, "checkpoints", str(STEPS),
                                  "state"))
  return jax.tree_util.tree_flatten_with_path(tree["params"])[0]


@pytest.fixture(scope="module")
def runs(shapes_tiny, rm_reference, tmp_path_factory):
  """The uninterrupted run, and one interrupted three times then finished."""
  ref = rm_reference
  work = str(tmp_path_factory.mktemp("interrupted"))
  rng = random.Random(0)
  events = []
  # (signal, when): a random step, or the moment a checkpoint write is open.
  plan = [(signal.SIGKILL, "step"), (signal.SIGKILL, "checkpoint write"),
          (signal.SIGTERM, "step")]
  for sig, when in plan:
    p = _start(shapes_tiny, work)
    done = len(_lines(work))  # after the restart truncates to its checkpoint
    if when == "step":
      target = min(done + rng.randint(1, 5), STEPS - 1)
      _wait_for(p, lambda: len(_lines(work)) >= target)  # noqa: B023
      time.sleep(rng.uniform(0.0, 0.3))
    else:
      _wait_for(p, lambda: len(_lines(work)) > done and _tmp_writes(work))  # noqa: B023
    p.send_signal(sig)
    out = p.communicate()[0]
    events.append({"signal": sig, "when": when, "rc": p.returncode,
                   "output": out, "left_tmp": _tmp_writes(work),
                   "latest": ocp.CheckpointManager(os.path.join(
                       work, "checkpoints")).latest_step()})
  p = _start(shapes_tiny, work)
  out = p.communicate()[0]
  assert p.returncode == 0, out
  events.append({"output": out})
  return ref, work, events


def test_sigkill_at_random_points_resumes_bit_exact(runs):
  ref, work, events = runs
  kills = [e for e in events[:-1] if e["signal"] == signal.SIGKILL]
  assert [e["rc"] for e in kills] == [-signal.SIGKILL] * 2
  # Every restart resumed from the last complete checkpoint, none from the
  # write that was cut.
  for before, after in zip(events[:-1], events[1:]):
    assert f"resumed from step {before['latest']}" in after["output"]
  # The whole loss curve (every metric of every step) and the final params
  # equal the uninterrupted run's, bit for bit.
  assert _lines(work) == _lines(ref)
  assert len(_lines(ref)) == STEPS
  got, want = _final_params(work), _final_params(ref)
  assert [k for k, _ in got] == [k for k, _ in want]
  for (k, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=str(k))
  assert not _tmp_writes(work)  # the cut write was cleaned up on restart


def test_sigterm_saves_at_the_current_step_and_exits_0(runs):
  _, _, events = runs
  term = next(e for e in events if e.get("signal") == signal.SIGTERM)
  assert term["rc"] == 0, term["output"]
  msg = (f"train: preempted: saved step {term['latest']} to ")
  assert msg in term["output"]
  assert "rerun the same command to resume" in term["output"]
  # It saved the step it was on: the loss log (one step behind the
  # dispatched step, flushed before the save) ends at that step.
  nxt = events[events.index(term) + 1]
  assert f"resumed from step {term['latest']}" in nxt["output"]
  assert term["latest"] > 0


# ---------------------------------------------------------------- the loop


def _toy(tmp_path, n=32, nan_ids=()):
  """A linear-regression trainer on a grain loader of records with ids."""
  xs = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)
  records = [{"x": xs[i], "y": np.float32(xs[i].sum()), "id": np.int64(i)}
             for i in range(n)]
  for i in nan_ids:
    records[i]["x"] = np.full(4, np.nan, np.float32)
  loader = pipeline.grain.DataLoader(
      data_source=records, sampler=pipeline.grain.samplers.IndexSampler(
          n, shuffle=True, seed=0, num_epochs=None),
      operations=[pipeline.grain.transforms.Batch(4)])
  opt = optax.adam(0.1)
  params = {"w": jnp.zeros(4)}
  state = {"params": params, "opt": opt.init(params),
           "step": jnp.zeros((), jnp.int32)}

  @jax.jit
  def step_fn(state, batch, rng):
    del rng
    def loss_fn(p):
      return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    new, skipped = train_util.apply_gradients(state, grads, opt, loss=loss)
    return new, {"loss": loss, "skipped": skipped}

  def run(workdir, steps, **kw):
    ckpt = train_util.Checkpointer(os.path.join(workdir, "ckpt"),
                                   save_every=1)
    try:
      return train_util.train_loop(
          state, step_fn, iter(loader), steps=steps, rng=jax.random.key(0),
          ckpt=ckpt, writer=train_util.metric_writer(workdir),
          workdir=workdir, log_every=1000, **kw)
    finally:
      ckpt.close()
  return run


def test_train_loop_sigterm_saves_and_resumes_exactly(tmp_path):
  run = _toy(tmp_path)
  ref_state, _ = run(str(tmp_path / "ref"), 10)

  def term_at_4(step, state):
    del state
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  work = str(tmp_path / "work")
  state, info = run(work, 10, on_step=term_at_4)
  assert info["preempted"] and int(state["step"]) == 4
  assert [r["step"] for r in _lines(work)] == [1, 2, 3, 4]
  state, info = run(work, 10)
  assert info["start"] == 4 and not info["preempted"]
  np.testing.assert_array_equal(state["params"]["w"], ref_state["params"]["w"])
  assert _lines(work) == _lines(str(tmp_path / "ref"))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  run = _toy(tmp_path, nan_ids=(5,))
  state, info = run(str(tmp_path / "w"), 16)
  rows = _lines(str(tmp_path / "w"))
  bad = [r["step"] for r in rows if r["skipped"]]
  assert len(bad) >= 1 and info["skipped"] == len(bad)
  assert all(np.isnan(r["loss"]) for r in rows if r["skipped"])
  assert np.all(np.isfinite(np.asarray(state["params"]["w"])))


def test_too_many_nonfinite_steps_stop_with_the_ids_and_a_saved_state(
    tmp_path):
  run = _toy(tmp_path, nan_ids=range(32))
  work = str(tmp_path / "w")
  with pytest.raises(train_util.NonFiniteError) as e:
    run(work, 16, max_nonfinite=3)
  ids = _lines(work)  # steps 1-3 logged, all skipped
  assert [r["step"] for r in ids] == [1, 2, 3]
  msg = str(e.value)
  assert msg.startswith("3 non-finite losses or gradients in a row (steps "
                        "1-3; record ids of step 3: [")
  assert ("their updates were skipped. The last good state is saved at "
          f"step 4 in {work}/ckpt: lower the learning rate or check those "
          "records, then rerun to resume (train.max_nonfinite=3 sets the "
          "limit)") in msg
  restored = ocp.CheckpointManager(os.path.join(work, "ckpt")).latest_step()
  assert restored == 4
  with ocp.StandardCheckpointer() as c:
    w = c.restore(os.path.join(work, "ckpt", "4", "state"))["params"]["w"]
  np.testing.assert_array_equal(w, np.zeros(4))  # never updated: last good


# ---------------------------------------------------------------- bad input


def test_mistyped_config_key_names_the_closest():
  argv = ["prog", "--config=configs/rm_shapes.py:smoke",
          "--config.train.stepz=3"]
  old = os.getcwd()
  os.chdir(ROOT)
  try:
    msg = cli.unknown_config_key(argv)
  finally:
    os.chdir(old)
  assert msg == ("unknown config key 'train.stepz' in "
                 "'--config.train.stepz=3'; did you mean 'train.steps'?")


def test_mistyped_config_key_on_the_command_line(tmp_path):
  p = subprocess.run(
      [sys.executable, "-m", "rd_jax.train_rm",
       "--config=configs/rm_shapes.py:smoke", "--config.trian.steps=3",
       f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
      env=rm_env())
  assert p.returncode == 1
  assert p.stderr.strip().endswith(
      "FATAL Flags parsing error: unknown config key 'trian.steps' in "
      "'--config.trian.steps=3'; did you mean 'train.steps'?")
  assert not os.listdir(tmp_path)  # failed before writing anything


def test_data_dir_that_is_a_file(tmp_path):
  f = tmp_path / "data"
  f.write_text("not a directory")
  with pytest.raises(NotADirectoryError) as e:
    pipeline.loader(str(f), "image", "train", batch_size=2, scale="tiny")
  assert str(e.value) == (
      f"data_dir {str(f)!r} is a file, not a directory; point "
      f"--config.data_dir at a directory (it is built there if empty)")
  with pytest.raises(FileNotFoundError, match="no ShapesWorld image/tiny "
                     "data under .*; build it with: python -m rd_jax.data."
                     "build"):
    pipeline.loader(str(tmp_path / "empty"), "image", "train", batch_size=2,
                    scale="tiny")


def _corrupt_copy(shapes_tiny, tmp_path):
  data = str(tmp_path / "data")
  shutil.copytree(shapes_tiny, data)
  f = os.path.join(data, "shapes_world", "image_tiny", "1.0.0",
                   "shapes_world-train.array_record-00000-of-00001")
  raw = bytearray(open(f, "rb").read())
  mid = len(raw) // 2
  raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
  open(f, "wb").write(raw)
  return data


def _read_all(data, on_corrupt):
  it = pipeline.loader(data, "image", "train", batch_size=4, scale="tiny",
                       shuffle=False, num_epochs=1, on_corrupt=on_corrupt)
  return [int(i) for b in it for i in b["id"]]


def test_corrupt_record_fails_naming_it_or_is_skipped(shapes_tiny, tmp_path,
                                                      caplog):
  data = _corrupt_copy(shapes_tiny, tmp_path)
  with pytest.raises(pipeline.CorruptRecordError) as e:
    _read_all(data, "fail")
  msg = str(e.value)
  assert msg.startswith("corrupt record ")
  assert f" of ShapesWorld image/tiny train in {data}: Corrupted" in msg
  assert msg.endswith(
      f"; rebuild it (delete {data}/shapes_world/image_tiny/1.0.0 and run "
      f"python -m rd_jax.data.build --data_dir={data} --scale=tiny), or set "
      f"config.on_corrupt='skip' to skip and count such records")
  bad = int(msg.split()[2])  # index in the split (TFDS shuffles on write)
  ids = _read_all(data, "skip")
  assert len(ids) == len(set(ids)) == 116  # 119 readable -> 29 batches of 4
  assert f"skipped corrupt record {bad} of" in caplog.text
  assert "(1 skipped so far)" in caplog.text


def test_checkpoint_that_does_not_match_the_config(tmp_path):
  ckpt = train_util.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(1, {"params": {"embed": jnp.zeros((128, 64)),
                           "head": jnp.zeros(3)}}, force=True)
  ckpt.wait()
  want = {"params": {"embed": jnp.zeros((256, 64)), "head": jnp.zeros(3),
                     "extra": jnp.zeros(2)}}
  with pytest.raises(ValueError) as e:
    ckpt.restore(want)
  assert str(e.value) == (
      f"checkpoint {tmp_path}/ckpt/1 does not match this config: "
      f"params/embed: expected (256, 64), found (128, 64); params/extra: "
      f"expected (2,), found nothing. Rerun with the config it was trained "
      f"with (config.json beside it) or use a fresh --workdir")
  ckpt.close()


def test_partial_restore_reads_only_the_parts_named(tmp_path):
  """Loading a model to evaluate or to start from (eval_rm.load,
  generate.load_generator) restores its params alone, not the optimiser
  moments saved beside them; the shapes it restores are still checked."""
  ckpt = train_util.Checkpointer(str(tmp_path / "ckpt"))
  params = {"embed": jnp.arange(12.0).reshape(3, 4), "head": jnp.ones(3)}
  ckpt.save(7, {"params": params, "opt": {"mu": jnp.full((3, 4), 2.0)},
                "step": jnp.int32(7)}, force=True)
  ckpt.wait()
  want = jax.eval_shape(lambda: {"params": params})
  state, step = ckpt.restore(want, partial=True)
  assert step == 7 and set(state) == {"params"}
  for k, v in params.items():
    assert isinstance(state["params"][k], jax.Array)
    np.testing.assert_array_equal(state["params"][k], v)
  with pytest.raises(ValueError, match=r"opt/mu: not in this config, "
                     r"found \(3, 4\)"):
    ckpt.restore(want)  # a full restore must account for everything
  bad = {"params": {"embed": jax.ShapeDtypeStruct((4, 4), jnp.float32)}}
  with pytest.raises(ValueError, match=r"params/embed: expected \(4, 4\), "
                     r"found \(3, 4\)"):
    ckpt.restore(bad, partial=True)
  # The same Checkpointer still saves and restores whole states after it.
  ckpt.save(8, {"params": params, "opt": {"mu": jnp.zeros((3, 4))},
                "step": jnp.int32(8)}, force=True)
  ckpt.wait()
  full, step = ckpt.restore(jax.eval_shape(lambda: {
      "params": params, "opt": {"mu": jnp.zeros((3, 4))},
      "step": jnp.int32(0)}))
  assert step == 8 and int(full["step"]) == 8
  ckpt.close()


def test_prompt_longer_than_the_context(shapes_tiny, caplog):
  from rd_jax.data import tokenizer
  tok = tokenizer.load(pipeline.tokenizer_dir(shapes_tiny))
  q = "is image 2 better than image 1 ?"
  kw = dict(num_images=2, tokens_per_image=4, question_len=5)
  with pytest.raises(ValueError) as e:
    sequences.encode(tok, [q], **kw)
  assert str(e.value) == (
      f"question of 8 tokens exceeds question_len=5: {q!r}...; raise "
      f"config.question_len or set config.prompt_overflow='truncate'")
  out = sequences.encode(tok, [q], overflow="truncate", **kw)
  full = sequences.encode(tok, [q], **dict(kw, question_len=8))
  # The truncated prompt is the full one less the question's first 3 tokens.
  h = len(sequences.image_block(tok, 2, 4))
  n_full = int(full["read_pos"][0]) + 1
  want = list(full["input_ids"][0, :h]) + list(full["input_ids"][0,
                                                                 h + 3:n_full])
  assert list(out["input_ids"][0, :int(out["read_pos"][0]) + 1]) == want
  assert "kept its last 5 tokens" in caplog.text


def test_workdir_that_is_not_writable(tmp_path):
  f = tmp_path / "file"
  f.write_text("")
  with pytest.raises(OSError) as e:
    train_util.prepare_workdir(str(f / "run"))
  assert str(e.value) == (
      f"workdir {str(f / 'run')!r} is not writable (Not a directory); "
      f"choose another --workdir or fix its permissions")
