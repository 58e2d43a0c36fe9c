"""Scale-out: mesh builder, state shardings, sharded steps on 8 fake devices,
2 processes vs 1 (gloo), checkpoint resharding, and an AOT compile of a
real-size reward model for a real TPU topology.

The multi-device / multi-process / TPU parts run in subprocesses (the suite
itself runs with one CPU device and without libtpu initialised).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rm_runs
from rd_jax import aot, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _run(args, env, timeout=900):
  t0 = time.time()
  p = subprocess.run([sys.executable] + args, cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout,
                     check=False)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  lines = []
  for line in p.stdout.splitlines():
    if line.startswith("{") and line.rstrip().endswith("}"):
      lines.append(json.loads(line))
  return lines, time.time() - t0


# ---------------------------------------------------------------- in-process


def test_logical_to_mesh_keeps_only_axes_that_divide():
  mesh = jax.sharding.AbstractMesh((2, 4, 2), sharding.MESH_AXES)
  rules = sharding.DEFAULT_RULES
  # 14 heads do not split 2 ways on tensor? they do; 7 do not.
  assert sharding.logical_to_mesh(("heads",), rules, mesh, (14,)) == (
      jax.sharding.PartitionSpec("tensor"))
  assert sharding.logical_to_mesh(("heads",), rules, mesh, (7,)) == (
      jax.sharding.PartitionSpec(None))
  # act_batch -> (data, fsdp): 4 rows keep data only, 8 keep both.
  assert sharding.logical_to_mesh(("act_batch",), rules, mesh, (4,)) == (
      jax.sharding.PartitionSpec("data"))
  assert sharding.logical_to_mesh(("act_batch",), rules, mesh, (8,)) == (
      jax.sharding.PartitionSpec(("data", "fsdp")))


def test_optimizer_moments_and_ema_inherit_parameter_names():
  import optax
  params = {"dense": {"w": jnp.zeros((4, 6)), "b": jnp.zeros((6,))}}
  logical = {"dense": {"w": jax.sharding.PartitionSpec("embed", "mlp"),
                       "b": jax.sharding.PartitionSpec("mlp")}}
  opt = optax.adamw(1e-3)
  state = {"params": params, "opt": opt.init(params), "ema": params,
           "step": jnp.zeros((), jnp.int32)}
  names = sharding.tree_logical_specs(state, {"params": logical})
  assert names["params"]["dense"]["w"] == ("embed", "mlp")
  assert names["ema"]["dense"]["w"] == ("embed", "mlp")
  assert names["opt"][0].mu["dense"]["w"] == ("embed", "mlp")
  assert names["opt"][0].nu["dense"]["b"] == ("mlp",)
  assert names["step"] is None and names["opt"][0].count is None


def test_pair_major_rm_batches_assemble_across_processes():
  """train_rm's rows i and B + i are pair i's two sequences. In pair_major
  layout, the pairs two processes load separately, concatenated (what
  sharding.global_batch does), equal one process's batch; row_major, inside
  the step, undoes it."""
  from rd_jax import train_rm  # pylint: disable=import-outside-toplevel
  b = 4
  rows = np.arange(2 * b * 3).reshape(2 * b, 3)
  one = train_rm.pair_major({"input_ids": rows, "chosen": np.arange(b)})
  assert one["input_ids"].shape == (b, 2, 3)
  local = [train_rm.pair_major({"input_ids": np.concatenate(
      [rows[p * 2:p * 2 + 2], rows[b + p * 2:b + p * 2 + 2]])})
           for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([x["input_ids"] for x in local]), one["input_ids"])
  np.testing.assert_array_equal(one["chosen"], np.arange(b))
  np.testing.assert_array_equal(train_rm.row_major(one["input_ids"]), rows)


def test_mesh_from_config_and_rules_override():
  import ml_collections
  c = ml_collections.ConfigDict({"mesh": {"shape": (-1, 1, 1)},
                                 "sharding_rules": (("embed", None),)})
  mesh = sharding.mesh_from_config(c)
  assert mesh.devices.size == len(jax.devices())
  assert dict(sharding.rules_from_config(c))["embed"] is None
  assert dict(sharding.rules_from_config(c))["mlp"] == "tensor"


def test_topology_names_map_to_chip_counts():
  assert aot.parse_topology("v5p-8")["chips"] == 4
  assert aot.parse_topology("v5p-256")["args"]["topology_name"] == "v5:4x4x8"
  assert aot.parse_topology("v5e-256")["chips"] == 256
  assert aot.parse_topology("2xv6e-256")["chips"] == 512
  with pytest.raises(ValueError, match="unknown topology 'v5p-7'"):
    aot.parse_topology("v5p-7")


def test_memory_advice_offers_microbatches_only_with_pairs_to_split():
  """aot's tip for a step that does not fit: train.microbatches where a
  chip holds several pairs; with one a chip its gradient-sized
  accumulator only adds memory (the 26B RM on v5p-8: 102.8 -> 126.7 GiB
  of temporaries), so the tip is the smaller batch alone."""
  report = dict(remat="full", topology="v5p-8", temp_gib=100.0,
                argument_gib=10.0)
  many = aot._advice(dict(report, batch=64), (1, 4, 1))
  assert ("--batch=32 (half the activations; a reward model with several "
          "pairs a chip keeps its batch with --config.train.microbatches=2"
          in many), many
  one = aot._advice(dict(report, batch=4), (1, 4, 1))
  assert "--batch=2 (half the activations)" in one
  assert "microbatches" not in one


def test_hlo_flops_counts_every_loop_iteration():
  def f(ws, x):
    x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)
    return jnp.sum(x @ ws[0])

  compiled = jax.jit(jax.grad(f)).lower(jnp.ones((12, 64, 64)),
                                        jnp.ones((32, 64))).compile()
  # 12 scanned matmuls: forward + 2 in the backward pass (inputs, weights);
  # the last matmul's forward value is unused by grad (dead code): 2.
  assert aot.hlo_flops(compiled.as_text()) == (12 * 3 + 2) * 2 * 32 * 64 * 64
  # XLA:GPU writes most matmuls as cuBLAS calls returning (result,
  # workspace), with the contracting dims in the backend config.
  gpu = """ENTRY %main (a: bf16[64,32], b: bf16[32,16]) -> bf16[64,16] {
  %a = bf16[64,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %custom-call.1 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]}}}
  ROOT %gte = bf16[64,16]{1,0} get-tuple-element(%custom-call.1), index=0
}
"""
  assert aot.hlo_flops(gpu) == 2 * 64 * 16 * 32


def test_model_flops_match_the_compiled_step():
  """The MFU numerator (parameters x the tokens they see + attention) is
  the compiled step's dot FLOPs when nothing is recomputed: the Flux layout
  (image / context streams see their own tokens) and the RM, with and
  without pointwise_aux (on every other pair), and its caption stage."""
  from configs import generator_shapes, rm_shapes
  g = generator_shapes.get_config("size=flux_dev")
  g.image.resolution = 128  # 8 x 8 latent patches + 512 text tokens
  g.image.model.dit.update(num_layers=1, num_single_layers=1,
                           num_attention_heads=2, attention_head_dim=32,
                           axes_dims_rope=(8, 12, 12), joint_attention_dim=64,
                           pooled_projection_dim=32)
  aux = rm_shapes.get_config("smoke=True,cot=decision_first")
  # the pointwise rows of every other pair: one more LLM pass, on half
  aux.update(pointwise_aux=1.0, pointwise_aux_every=2)
  mesh = sharding.make_mesh()
  for job in (aot.make_job(g, "generator", 2, remat="none"),
              aot.make_job(rm_shapes.get_config("smoke=True"), "rm", 4),
              aot.make_job(aux, "rm", 4),
              aot.make_job(rm_shapes.get_config("smoke=True,paradigm=caption"),
                           "rm", 4)):
    compiled = aot.compile_step(job, mesh)
    ratio = aot.hlo_flops(compiled.as_text()) / job.model_flops
    assert 0.97 < ratio < 1.03, (job.describe, ratio)


def test_bench_times_real_updates(tmp_path):
  from configs import rm_shapes
  from rd_jax import bench
  config = rm_shapes.get_config("smoke=True")
  job = aot.make_job(config, "rm", 4)
  hlo = tmp_path / "step.hlo"
  r = bench.bench(job, sharding.make_mesh(), sharding.DEFAULT_RULES,
                  steps=2, warmup=1, hlo_out=str(hlo), profile_top=3)
  assert r["final_step"] == 3 and np.isfinite(r["loss"])  # 3 real updates
  # the profile names the compiled step's own ops, slowest first
  top = r["profile_top"]
  assert len(top) == 3 and [t[0] for t in top] == sorted(
      (t[0] for t in top), reverse=True) and top[-1][0] > 0
  text = hlo.read_text()
  assert all(f"%{name} = " in text for _, name in top), top
  assert r["step_s"] > 0 and r["model_flops"] == job.model_flops
  assert 0.97 < r["hlo_flops"] / r["model_flops"] < 1.03
  assert r["mfu"] is None  # no known peak for a CPU
  assert bench.default_batch(config, "auto", 1) == config.train.batch_size


# ---------------------------------------------------------------- subprocesses


@pytest.mark.parametrize("job", ["generator", "rm",
                                 pytest.param("refl", marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(job):
  """Meshes (8,1,1), (2,2,2) vs one device: loss and updated params
  within fp32 tolerance; every array (and ReFL's frozen RM) sharded as its
  logical names say. For refl also: generate's Best-of-N program on a
  data-parallel mesh has no cross-device collective (CFG's concatenated
  batch once made every sampling step an all-to-all)."""
  lines, secs = _run([os.path.join(TESTS, "multidevice_steps.py"), job],
                     rm_runs.env(devices=8))
  if job == "refl":
    assert lines.pop() == {"best_of_n_collectives": []}
  meshes = [l for l in lines if l["mesh"] != "single"]
  assert [tuple(l["mesh"]) for l in meshes] == [(8, 1, 1), (2, 2, 2)]
  for l in meshes:
    assert l["loss_diff"] < 1e-5 and l["max_param_diff"] < 1e-4, l
  print(f"{job}: {secs:.0f} s")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_checkpoint_restores_in_one(tmp_path):
  """RM train steps on the same global batches (each process feeds its own
  rows) on 2 processes as on 1; the 2-process checkpoint restores in 1
  process onto another mesh shape."""
  script = os.path.join(TESTS, "multiprocess_rm.py")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, script, "multi", str(tmp_path)], cwd=ROOT,
      env=rm_runs.env(devices=2, RD_JAX_COORDINATOR=f"127.0.0.1:{port}",
                      RD_JAX_NUM_PROCESSES="2", RD_JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=900)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  multi = json.loads((tmp_path / "multi.json").read_text())
  assert multi["processes"] == 2 and multi["devices"] == 4
  _run([script, "single", str(tmp_path)], rm_runs.env(devices=2))
  single = json.loads((tmp_path / "single.json").read_text())
  np.testing.assert_allclose(single["losses"], multi["losses"], atol=1e-5)
  assert single["restored_step"] == 3
  assert single["restored_on_target_shardings"]
  # 4 vs 2 devices reduce in different orders; 3 Adam steps amplify that
  # slightly for near-zero gradients.
  assert single["restore_max_diff"] < 2e-4


@pytest.mark.slow
def test_rm_trainer_runs_as_two_processes_and_resumes_in_one(shapes_tiny,
                                                             tmp_path):
  """`python -m rd_jax.train_rm` itself as 2 gloo processes of 1 CPU device
  each: one global (2,1,1) mesh, each process loading its own shard of the
  data at half the batch size; one loss log; it trains; its checkpoint
  resumes in 1 process on 1 device. (The curve is not the 1-process one:
  grain shards records per process, so the global batches hold other
  examples; test_two_processes_match_one checks the arithmetic.)"""
  work, port = str(tmp_path / "run"), _free_port()
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:  # a file, not a pipe: a full pipe deadlocks
      procs.append(rm_runs.start(
          shapes_tiny, work, ckpt_every=rm_runs.STEPS, stdout=f,
          RD_JAX_COORDINATOR=f"127.0.0.1:{port}",
          RD_JAX_NUM_PROCESSES="2", RD_JAX_PROCESS_ID=str(i)))
  for p in procs:
    p.wait(timeout=900)
  outs = [log.read_text() for log in logs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 devices" in outs[0]
  rows = rm_runs.losses(work)
  assert [r["step"] for r in rows] == list(range(1, rm_runs.STEPS + 1))
  assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
  out = rm_runs.run(shapes_tiny, work)
  assert f"resumed from step {rm_runs.STEPS}" in out
  assert ("holds the data position of another number of processes (this run "
          "has 1): the model state resumes, the data order starts over") in out


@pytest.mark.slow
def test_aot_compiles_real_size_reward_model_for_v5p(tmp_path):
  """InternVL2.5-1B RM training step, FSDP over a v5p-8 (4 chips)."""
  out = tmp_path / "aot.json"
  _, secs = _run(["-m", "rd_jax.aot", "--config=configs/rm_shapes.py:size=1b",
                  "--topology=v5p-8", "--remat=full", f"--out={out}"],
                 rm_runs.env(tpu_compile=True), timeout=1500)
  report = json.loads(out.read_text())
  assert report["chips"] == 4 and report["fits"]
  assert report["params"] > 9e8
  assert 0 < report["total_gib"] < report["hbm_gib"]
  assert report["hlo_flops_per_chip"] > report["model_flops"] / 4
  assert 0 < report["est_mfu"] < 1
  print(f"AOT 1B RM on v5p-8: {secs:.0f} s")


def test_multislice_mesh_puts_dcn_axes_across_slices():
  """2 v5p-16 slices: data (DCN) spans slices, fsdp (ICI) stays in one."""
  code = ("import json; from rd_jax import aot, sharding\n"
          "d, _ = aot.topology_devices('2xv5p-16')\n"
          "m = sharding.make_mesh((1, -1, 1), d, (-1, 1, 1))\n"
          "print(json.dumps({'shape': list(m.devices.shape), "
          "'data': [x.slice_index for x in m.devices[:, 0, 0]], "
          "'fsdp': sorted({x.slice_index for x in m.devices[0, :, 0]})}))")
  (out,), _ = _run(["-c", code], rm_runs.env())
  assert out == {"shape": [2, 8, 1], "data": [0, 1], "fsdp": [0]}


@pytest.mark.slow
def test_rm_trainer_on_8_devices_matches_one(shapes_tiny, rm_reference,
                                             tmp_path):
  """`python -m rd_jax.train_rm` itself on a (2, 2, 2) mesh of 8 fake
  devices: the single-device loss curve. Step 1 agrees to fp32 rounding;
  later steps drift chaotically (reduction order, clipped Adam at lr 3e-3:
  measured <= 0.0024 absolute, 0.17 % relative, over 24 steps)."""
  out = rm_runs.run(shapes_tiny, str(tmp_path), "--config.mesh.shape=2,2,2",
                    devices=8, ckpt_every=rm_runs.STEPS)
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices" in out
  got, want = rm_runs.losses(str(tmp_path)), rm_runs.losses(rm_reference)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  assert abs(got[0]["loss"] - want[0]["loss"]) < 1e-5
  assert abs(got[0]["grad_norm"] - want[0]["grad_norm"]) < 1e-3
  rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, want))
  assert rel < 0.01, rel
