"""Config argument parsing, the mesh / logical-axis rules, the metrics writer,
the optimiser builder (AdamW / Muon), the entry points' malloc restart,
the table of train_rm runs (report.rm_runs)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from rd_jax import cli, config_util, report, sharding, train_util


def test_parse_arg_types_and_bare_flags():
  c = config_util.parse_arg("size=26b,smoke,steps=7", size="tiny", smoke=False,
                            steps=100)
  assert (c.size, c.smoke, c.steps) == ("26b", True, 7)


def test_parse_arg_unknown_key_suggests_closest():
  with pytest.raises(KeyError, match="unknown config argument 'smok'; did you "
                     "mean 'smoke'"):
    config_util.parse_arg("smok", smoke=False, size="tiny")


def test_malloc_env_adds_the_tunables_once_and_keeps_the_users():
  user = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "PATH": "/bin"}
  env = cli.malloc_env(user)
  tun = env["GLIBC_TUNABLES"].split(":")
  assert tun[0] == "glibc.malloc.hugetlb=0"  # the user's value stays
  assert sorted(t.split("=")[0] for t in tun) == sorted(cli.MALLOC_TUNABLES)
  assert env["PATH"] == "/bin" and "RD_JAX_MALLOC_TUNED" not in user
  assert cli.malloc_env(env) is None  # restarted once, not again
  assert cli.malloc_env(dict(user, RD_JAX_TUNE_MALLOC="0")) is None


def test_tune_malloc_restarts_the_process_with_the_tunables():
  code = ("import os; print('start', flush=True); from rd_jax import cli; "
          "cli.tune_malloc(); print(os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "RD_JAX_MALLOC_TUNED",
                      "RD_JAX_TUNE_MALLOC")}
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout.split("\n")
  # Ran twice (the restart), the second time with every tunable set.
  assert out[:2] == ["start", "start"], out
  assert set(out[2].split(":")) == {f"{k}={v}" for k, v in
                                    cli.MALLOC_TUNABLES.items()}
  off = subprocess.run([sys.executable, "-c", code],
                       env=dict(env, RD_JAX_TUNE_MALLOC="0"), check=True,
                       capture_output=True, text=True).stdout.split("\n")
  assert off[:2] == ["start", "None"], off


def test_logical_rules_map_and_drop_unused_axes():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # a mesh axis is used once per spec: heads takes tensor, mlp gets nothing
  assert sharding.logical_to_mesh(("heads", "mlp"), rules) == P("tensor", None)
  mesh = sharding.make_mesh((-1, 1, 1))  # size-1 axes are dropped
  assert sharding.logical_to_mesh(("act_batch", "embed"), rules, mesh) == (
      P("data", None) if mesh.shape["data"] > 1 else P(None, None))
  with pytest.raises(KeyError, match="logical axis 'nonsense' has no rule"):
    sharding.logical_to_mesh(("nonsense",), rules)


def test_mesh_that_does_not_fit_the_devices_fails_clearly():
  n = len(jax.devices())
  with pytest.raises(ValueError, match=f"mesh shape \\(3, {n}, 1\\) needs "
                     f"{3 * n} devices but {n} are available"):
    sharding.make_mesh((3, n, 1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh((-1, -1, 1))


def test_metric_writer_events_read_back_in_tensorboard(tmp_path):
  """The trainers' event files (written without TensorFlow) are what
  TensorBoard reads: every scalar at its step."""
  from tensorboard.backend.event_processing import event_accumulator
  from rd_jax import train_util
  assert train_util.crc32c(b"123456789") == 0xE3069283  # RFC 3720's check
  w = train_util.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"train/loss": 1.5, "eval/acc": 0.25})
  w.write_scalars(7, {"train/loss": np.float32(0.5)})
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["eval/acc", "train/loss"]
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
      (3, 1.5), (7, 0.5)]
  assert [(e.step, e.value) for e in acc.Scalars("eval/acc")] == [(3, 0.25)]


# Flags README or the lab notes in docs/ show that no config has, on
# purpose: placeholders, the mistyped-key example, and options of past
# experiments since removed.
_README_NOT_KEYS = {"KEY", "key", "trian.steps", "refl.reward_shift",
                    "rm.model.vision.pos_init"}


def test_every_config_flag_in_readme_is_a_config_key():
  import importlib, pathlib, re  # pylint: disable=g-import-not-at-top,multiple-imports
  root = pathlib.Path(__file__).resolve().parents[1]
  docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
  flags = set(re.findall(r"--config\.([A-Za-z_][\w.]*\w)",
                         "\n".join(p.read_text() for p in docs)))
  # The keys the CLI accepts as --config.KEY (cli.unknown_config_key).
  known = set().union(*(
      cli._leaf_keys(importlib.import_module(  # pylint: disable=protected-access
          f"configs.{p.stem}").get_config(None))
      for p in sorted((root / "configs").glob("*.py"))))
  missing = sorted(flags - _README_NOT_KEYS - known)
  assert not missing, (f"README or docs/ document --config.KEY flags no "
                       f"config has: {missing}")
  assert len(flags) > 30  # the regex still finds the documents' flags


def _flat_dims(dims):
  """{'a/b': MuonDimensionNumbers} of muon_dims' Muon leaves."""
  from optax.contrib import MuonDimensionNumbers
  return sharding.flat_paths(
      dims, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers))


def test_muon_orthogonalises_each_layer_of_the_stacked_matrices():
  """muon_dims from the logical names: the generator's block kernels are
  Muon matrices [layers, in, out], embeddings and biases are not; an RM
  attention `o` [layers, heads, head_dim, embed] reduces over (heads,
  head_dim). The first Muon update of a layer-stacked kernel is
  orthogonalised per layer: its singular values are within 2.5x (1.7 when
  written) although the gradient's span 100x, and a layer whose gradient
  is 100x smaller gets an update of the same size (one matrix over both
  layers would not); AdamW's singular values are not within 2.5x (6.2),
  nor are an embedder's under Muon (AdamW there)."""
  from optax.contrib import MuonDimensionNumbers
  from configs import generator_shapes, rm_shapes
  from rd_jax import train_util
  from rd_jax.models import generator
  from rd_jax.reward import model
  cfg = generator_shapes.get_config().image.model  # 2 layers per stack
  params = jax.jit(lambda: generator.init(cfg, jax.random.key(0)))()
  logical = generator.logical_specs(cfg)
  dims = _flat_dims(train_util.muon_dims(params, logical))
  flat = sharding.flat_paths(params)
  muon = {k for k, v in flat.items() if k.endswith("kernel") and v.ndim == 3}
  assert muon and set(dims) == muon, sorted(set(dims) ^ muon)
  assert dims["dit/transformer_blocks/ff/proj_in/kernel"] == (
      MuonDimensionNumbers(1, (2,)))
  rm_dims = _flat_dims(train_util.muon_dims(jax.eval_shape(
      lambda: model.init(rm_shapes.get_config("smoke").rm,
                         jax.random.key(0)))))
  assert rm_dims["vlm/language_model/layers/attn/o"] == (
      MuonDimensionNumbers((1, 2), 3))
  assert rm_dims["vlm/language_model/layers/attn/q"] == (
      MuonDimensionNumbers(1, (2, 3)))
  assert "vlm/language_model/embed" not in rm_dims

  def graded(x, key):  # singular values 1 .. 1e-2 in every layer
    u = jnp.linalg.qr(jax.random.normal(key, x.shape[:-1] + (x.shape[-2],)))[0]
    v = jnp.linalg.qr(jax.random.normal(key, x.shape[:-2] + (x.shape[-1],) * 2))[0]
    k = min(x.shape[-2:])
    s = jnp.logspace(0, -2, k)
    return jnp.einsum("...ik,k,...jk->...ij", u[..., :k], s, v[..., :k])

  grads = jax.tree.map(jnp.zeros_like, params)
  dit = grads["dit"]
  for d, key in ((dit["transformer_blocks"]["ff"]["proj_in"], 1),
                 (dit["x_embedder"], 2)):
    d["kernel"] = graded(d["kernel"], jax.random.key(key))
  proj_in = dit["transformer_blocks"]["ff"]["proj_in"]
  proj_in["kernel"] = proj_in["kernel"] * jnp.array([1.0, 0.01])[:, None, None]
  for kind, ratio in (("muon", lambda r: r < 2.5), ("adamw", lambda r: r > 4)):
    opt = train_util.make_optimizer(1.0, grad_clip=1e9, b2=0.99, kind=kind,
                                    logical=logical)
    upd = sharding.flat_paths(jax.jit(opt.update)(grads, opt.init(params),
                                                  params)[0])
    layers = np.asarray(upd["dit/transformer_blocks/ff/proj_in/kernel"])
    for layer in layers:
      s = np.linalg.svd(layer, compute_uv=False)
      assert ratio(s.max() / s.min()), (kind, s.max() / s.min())
    if kind == "muon":
      n0, n1 = np.linalg.norm(layers[0]), np.linalg.norm(layers[1])
      assert 1 / 1.5 < n0 / n1 < 1.5, (n0, n1)
    s = np.linalg.svd(np.asarray(upd["dit/x_embedder/kernel"]),
                      compute_uv=False)
    assert s.max() / s.min() > 4, s  # AdamW in both


def test_newton_schulz_on_the_gram_matrix_is_the_same_map():
  """newton_schulz's Gram iteration (R_k = X_k X_k^T on the short side)
  is the standard iteration, wide or tall, batched: within 1e-4 (its
  float32 rounding: 3e-5 from the float64 result, the standard's 4e-7),
  where one step fewer is 1e-2 away; both land the singular values in
  the quintic's band (0.6 .. 1.25) from a spread of 1 .. 1e-2."""
  from rd_jax import train_util
  k = jax.random.split(jax.random.key(0), 2)
  u = jnp.linalg.qr(jax.random.normal(k[0], (3, 24, 24)))[0]
  v = jnp.linalg.qr(jax.random.normal(k[1], (3, 80, 24)))[0]
  x = jnp.einsum("bik,k,bjk->bij", u, jnp.logspace(0, -2, 24), v)
  for y in (x, jnp.swapaxes(x, 1, 2)):
    std = train_util.newton_schulz(y, gram=False)
    gram = train_util.newton_schulz(y, gram=True)
    np.testing.assert_allclose(gram, std, atol=1e-4)
    short = train_util.newton_schulz(y, steps=4, gram=True)
    assert np.abs(short - std).max() > 1e-2
    for z in (std, gram):
      s = np.linalg.svd(np.asarray(z), compute_uv=False)
      assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())


def test_muon_is_optax_muon():
  """make_optimizer(kind='muon') -- our Muon with the Gram Newton-Schulz --
  takes optax.contrib.muon's steps (same settings) to float32 rounding over
  three updates: Muon on the layer-stacked kernels (a wide, a tall and a
  square one, per layer), Nesterov AdamW on the rest."""
  from optax.contrib import muon
  from rd_jax import train_util
  shapes = {"w_in": ((2, 16, 64), P("layers", "embed", "mlp")),
            "w_out": ((2, 64, 16), P("layers", "mlp", "embed")),
            "w_q": ((2, 16, 16), P("layers", "embed", "q")),
            "embed": ((32, 16), P("vocab", "embed")),
            "bias": ((2, 16), P("layers", "embed"))}
  logical = {n: names for n, (_, names) in shapes.items()}
  keys = iter(jax.random.split(jax.random.key(0), 40))
  params = {n: jax.random.normal(next(keys), shp)
            for n, (shp, _) in shapes.items()}
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
  ours = train_util.make_optimizer(lr, grad_clip=1e9, b2=0.99,
                                   weight_decay=0.05, kind="muon",
                                   logical=logical)
  ref = optax.chain(optax.clip_by_global_norm(1e9), muon(
      lr, adam_b2=0.99, weight_decay=0.05, adam_weight_decay=0.05,
      consistent_rms=0.2, muon_weight_dimension_numbers=lambda p: (
          train_util.muon_dims(p, logical))))
  states = [opt.init(params) for opt in (ours, ref)]
  for _ in range(3):
    grads = {n: jax.random.normal(next(keys), p.shape)
             for n, p in params.items()}
    (a, sa), (b, sb) = [jax.jit(opt.update)(grads, s, params)
                        for opt, s in zip((ours, ref), states)]
    states = [sa, sb]
    for n in params:
      np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-6,
                                 err_msg=n)
    params = optax.apply_updates(params, a)


def test_optimizer_errors_name_the_choices():
  from rd_jax import train_util
  with pytest.raises(ValueError, match=r"unknown optimizer 'sgd'; one of "
                     r"\('adamw', 'muon'\)"):
    train_util.make_optimizer(1e-3, grad_clip=1.0, b2=0.99, kind="sgd")
  opt = train_util.make_optimizer(1e-3, grad_clip=1.0, b2=0.99, kind="muon")
  with pytest.raises(ValueError, match="found no layer-stacked matrix"):
    opt.init({"w": jnp.ones((4, 4))})


def test_dense_is_the_einsum_over_its_contracted_axes():
  from rd_jax.models.layers import dense
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (2, 3, 4, 5))
  w2 = jax.random.normal(k[1], (4, 5, 6, 7))  # heads x head_dim -> out
  w1 = jax.random.normal(k[2], (5, 6))
  np.testing.assert_allclose(dense(x, w2, 2),
                             jnp.einsum("abij,ijkl->abkl", x, w2),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense(x, w1), jnp.einsum("abci,ij->abcj", x, w1),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"dense: x \(2, 3, 4, 5\) does not "
                     r"end in kernel's input axes \(6,\)"):
    dense(x, w1.T)


def test_run_in_processes_runs_each_job_in_a_new_process():
  from rd_jax import train_util
  pids = train_util.run_in_processes(os.getpid, {"a": (), "b": ()})
  assert set(pids) == {"a", "b"}
  assert len({pids["a"], pids["b"], os.getpid()}) == 3, pids


def test_run_in_processes_raises_a_jobs_error_with_its_name():
  from rd_jax import train_util
  with pytest.raises(RuntimeError, match=(
      r"(?s)b failed in its own process \(run_in_processes\); its error:\n"
      r"Traceback.*ValueError: invalid literal for int\(\) with base 10: "
      r"'x'")):
    train_util.run_in_processes(int, {"a": ("7",), "b": ("x",)})


def test_run_in_processes_passes_sigterm_to_its_jobs():
  """SIGTERM to the parent reaches the job (a 60 s sleep, which SIGTERM
  ends at once), and the parent itself lives on to report it."""
  import signal
  import threading
  import time
  from rd_jax import train_util
  before = signal.getsignal(signal.SIGTERM)
  timer = threading.Timer(8.0, os.kill, (os.getpid(), signal.SIGTERM))
  t0 = time.time()
  timer.start()
  with pytest.raises(RuntimeError, match=(
      r"a failed in its own process \(run_in_processes\); its error:\n"
      r"its process ended \(exit code -15\) before it returned")):
    train_util.run_in_processes(time.sleep, {"a": (60,)})
  timer.join()
  assert time.time() - t0 < 30
  assert signal.getsignal(signal.SIGTERM) is before


def test_rm_runs_table_has_each_run_their_mean_std_and_the_target_count(
    tmp_path):
  figures = [(0, 0.86, 0.84, 0.79), (1, 0.90, 0.87, 0.94), (2, 0.92, 0.79,
                                                             0.96)]
  dirs = []
  for seed, acc_id, acc_ood, shape in figures:
    d = str(tmp_path / f"s{seed}")
    train_util.write_json(os.path.join(d, "config.json"), {"seed": seed})
    train_util.write_json(os.path.join(d, "final_metrics.json"), {
        "acc_id": acc_id, "acc_ood": acc_ood,
        "acc_by_failure": {"wrong_shape": shape}})
    dirs.append(d)
  lines = report.rm_runs(dirs).splitlines()

  def row(i):
    return [c.strip() for c in lines[i].strip("|").split("|")]
  assert row(0)[:4] == ["run", "seed", "acc_id", "acc_ood"]
  assert row(0)[-1] == "wrong_shape"  # only the failures the runs have
  assert row(2)[:4] == [f"`{dirs[0]}`", "0", "0.860", "0.840"]
  assert row(5)[:4] == ["mean", "–", "0.893", "0.833"]
  assert row(5)[-1] == "0.897" and row(5)[4] == "–"  # acc_sym_id: none
  assert row(6)[2] == f"{np.std([0.86, 0.90, 0.92], ddof=1):.3f}"
  # Seed 1 alone reaches 0.90 / 0.80: seed 2 misses out of domain.
  assert lines[-1] == "1 of 3 runs reach acc_id >= 0.9 and acc_ood >= 0.8."
  with pytest.raises(FileNotFoundError, match="no final_metrics.json in "
                     ".*not a finished train_rm workdir"):
    report.rm_runs([str(tmp_path)])
