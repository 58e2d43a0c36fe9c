r"""Compile a job's real step for a TPU topology on this (CPU) machine.

  python -m rd_jax.aot --config=configs/rm_shapes.py:size=26b \
      --topology=v5p-128 --remat=full --out=/tmp/aot_rm26b.json
  python -m rd_jax.aot --config=configs/generator_shapes.py:size=flux_dev \
      --topology=v5p-64
  python -m rd_jax.aot --job=refl \
      --config=configs/generator_shapes.py:size=flux_dev \
      --rm_config=configs/rm_shapes.py:size=8b --topology=v5p-128

Needs `libtpu` (jax[tpu]); runs with JAX_PLATFORMS=cpu: the TPU devices are
compile-only (`jax.experimental.topologies`), nothing executes. Prints and
writes (--out) JSON with, per chip: argument / output / temp / alias bytes,
the total (argument + output + temp - donated alias) against HBM and whether
it fits; `hlo_flops_per_chip`: dot/convolution FLOPs of the optimised
program with every loop iteration counted (XLA's own cost_analysis counts a
loop body once, so a scanned 48-layer stack reads ~48x low; it is kept as
`xla_cost_flops_per_chip`); `model_flops`: 6 x (matmul parameters x tokens
+ attention) for trained models, 2 x for frozen forward passes (the usual
MFU numerator: no remat recompute, no embedding gather; an MMDiT's
double-stream weights count with their own stream's tokens); `est_step_s`, the
roofline step time max(HLO FLOPs / peak, XLA bytes accessed / HBM
bandwidth), and `est_mfu` = model FLOPs / (chips x peak x est_step_s). That
is an upper bound (perfect overlap, collectives free), for comparing
configs, not a measurement. When the program does not fit, the message names
the mesh / remat / batch / topology change to try.

Jobs (auto from the config; --job to force):
  rm         train_rm.train_step (the real RM update; InternVL 1B..26B)
  generator  train_generator.train_step; for `size=flux_dev` (external T5 /
             CLIP encoders) the same flow-matching + AdamW + EMA update on
             latents with precomputed text states (train_generator's step
             encodes prompt ids with its own small text encoder)
  refl       rd_jax.refl.train_step, the ReFL trainer's own update (DESIGN.md
             §2.4): K-step sampling without gradient to a random step k in
             the late window, x̂0 at step k with gradient, Flux VAE decode,
             pairwise reward against a reference image, relu(λ − r) loss,
             AdamW + EMA on the generator only; FLUX.1-dev sampling settings
             come from the flux_dev config (28 steps, shift 3, guidance 3.5)

Topologies: v5p-{8..1024}, v5e-{4..256}, v6e-{4..256} (the Cloud TPU
names: v5p counts TensorCores, 2 per chip; v5e/v6e count chips); prefix
`Nx` for N slices over DCN (e.g. 2xv5p-256, with --dcn=-1,1,1).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from rd_jax import sharding

# Flags live on their own FlagValues: the trainers this module compiles
# define --config/--workdir on the global absl FLAGS when imported.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "job config file",
                                          flag_values=FLAGS)
_RM_CONFIG = config_flags.DEFINE_config_file(
    "rm_config", "configs/rm_shapes.py:size=8b", "reward model (job=refl)",
    flag_values=FLAGS)
_JOB = flags.DEFINE_enum("job", "auto", ["auto", "rm", "generator", "refl"],
                         "which step to compile", flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string("topology", "v5p-128", "TPU topology name",
                                flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", "1,-1,1", "ICI mesh (data,fsdp,tensor)",
                            flag_values=FLAGS)
_DCN = flags.DEFINE_string("dcn", "", "DCN mesh for multi-slice, e.g. "
                           "-1,1,1", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer(
    "batch", 0, "global batch (RM: pairs; generator/ReFL: samples); "
    "0 = one per chip", flag_values=FLAGS)
_REMAT = flags.DEFINE_string("remat", "", "override the model's remat policy "
                             "(none|full|dots|dots_no_batch)",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", "", "write the JSON report here",
                           flag_values=FLAGS)
_HLO_OUT = flags.DEFINE_string("hlo_out", "", "write the optimised HLO here",
                               flag_values=FLAGS)

# ---------------------------------------------------------------- topologies

# Cloud TPU name -> (get_topology_desc name, chip config, chips per host).
# v5p-N counts TensorCores (megacore: 2 per chip, one device per chip).
_V5P = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4",
        256: "4x4x8", 512: "4x8x8", 1024: "8x8x8", 2048: "8x8x16"}
_LITE = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
         256: "16x16"}
# Per chip: peak bf16 FLOP/s, HBM bytes, HBM bandwidth (bytes/s).
CHIPS = {
    "v5p": dict(peak=459e12, hbm=95 * 2**30, hbm_bw=2.765e12),
    "v5e": dict(peak=197e12, hbm=16e9, hbm_bw=0.819e12),
    "v6e": dict(peak=918e12, hbm=32e9, hbm_bw=1.64e12),
}


def topology_names() -> list[str]:
  return ([f"v5p-{n}" for n in _V5P] + [f"v5e-{n}" for n in _LITE] +
          [f"v6e-{n}" for n in _LITE])


def parse_topology(name: str) -> dict:
  """'v5p-128' / '2xv5e-256' -> get_topology_desc kwargs + chip facts."""
  slices, _, base = name.rpartition("x") if "xv" in name else ("1", "", name)
  slices = int(slices or 1)
  kind, _, n = base.partition("-")
  table = _V5P if kind == "v5p" else _LITE if kind in ("v5e", "v6e") else {}
  if not n.isdigit() or int(n) not in table:
    raise ValueError(f"unknown topology {name!r}; one of {topology_names()} "
                     f"(optionally 'Nx' in front for N slices)")
  dims = table[int(n)]
  sizes = [int(d) for d in dims.split("x")]
  if kind == "v5p":
    # Full 3-D torus (wraparound) from 4x4x4 up; smaller slices are meshes.
    wrap = tuple(min(sizes) >= 4 and s >= 4 for s in sizes)
    args = dict(topology_name=f"v5:{dims}", chip_config_name="megacore",
                chips_per_host_bounds=(2, 2, 1), wrap=wrap)
  else:
    wrap = tuple(s >= 16 for s in sizes) + (False,)
    args = dict(topology_name=f"{kind}:{dims}", chip_config_name="default",
                chips_per_host_bounds=(2, 2, 1), wrap=wrap)
  return dict(args=dict(args, num_slices=slices), kind=kind, slices=slices,
              chips=slices * math.prod(sizes), **CHIPS[kind])


def topology_devices(name: str) -> tuple[list, dict]:
  """Compile-only TPU devices of a topology (needs libtpu; any host)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu takes a machine-wide lock; other processes on this machine may
  # hold it while only compiling, which is safe to share.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  info = parse_topology(name)
  topo = topologies.get_topology_desc(platform="tpu", **info["args"])
  return list(topo.devices), info


# ---------------------------------------------------------------- jobs


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",")) if s else ()


def _set_remat(model_cfg, remat: str) -> None:
  if remat:
    model_cfg.remat = remat


class Job:
  """A step function with its abstract inputs.

  fn(state, *rest) -> (state, metrics); state is donated. `state` and `rest`
  are pytrees of ShapeDtypeStructs; `logical` names their parameters;
  `model_flops` is the MFU numerator per step (whole batch). `init()` makes
  the real state and `param_init()` the real frozen parameters (`rest` at
  `param_args`) for running the step (rd_jax.bench).
  """

  def __init__(self, fn, state, rest, logical=None, model_flops=0.0,
               describe="", param_args=(), remat="", static_loops=True,
               init=None, param_init=None):
    self.fn, self.state, self.rest, self.remat = fn, state, rest, remat
    self.init, self.param_init = init, param_init
    self.static_loops = static_loops  # False: FLOPs/MFU not estimable
    self.param_args = param_args  # indices of `rest` that are parameters
    self.logical, self.model_flops, self.describe = (logical, model_flops,
                                                     describe)


def n_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _abstract_key():
  return jax.eval_shape(lambda: jax.random.key(0))


def rm_seq_len(config) -> tuple[int, int]:
  """(images per sequence, padded sequence length) of a real-size RM batch:
  per image <img> + tokens_per_image + </img>\\n, the chat frame, question
  and answer (rd_jax.reward.sequences layout), rounded up to 8: the
  trainer's own rows are unrounded, so 128 (TPU lanes) would time a
  tiny RM's 143-token rows at 256."""
  from rd_jax.models import internvl  # pylint: disable=g-import-not-at-top
  from rd_jax.reward import evaluate as rm_eval  # pylint: disable=g-import-not-at-top
  n_img = rm_eval.num_images(config)
  tpi = internvl.tokens_per_image(config.rm.model)
  raw = 4 + n_img * (tpi + 3) + sum(_rm_text_slots(config)) + 8
  return n_img, -(-raw // 8) * 8


def _rm_text_slots(config) -> tuple[int, int]:
  """(question, answer) token slots of an RM row: a caption row has no
  question, and the prompt is its answer; the prompt restated after the
  images (prompt_after_len) counts with the question."""
  from rd_jax.reward import evaluate as rm_eval  # pylint: disable=g-import-not-at-top
  if config.paradigm == rm_eval.CAPTION:
    return 0, config.caption_len
  return (config.question_len + config.get("prompt_after_len", 0),
          config.answer_len)


def _internvl_flops(model_cfg, n_images: int, rows: int, seq: int,
                    mult: float, read: int = 1) -> float:
  """mult·(N_vit·ViT tokens + N_proj·image tokens + N_llm·LLM tokens +
  N_head·read positions + attention), in multiply-adds (mult = 2 per
  forward, 6 per forward + backward); `read`: the positions of a row whose
  logits are computed (answer or caption slots)."""
  from rd_jax.models import internvl  # pylint: disable=g-import-not-at-top
  params = internvl.abstract_params(model_cfg)
  # The projector sees the pixel-shuffled tokens, not the ViT's.
  n_vit, n_proj = n_params(params["vision"]), n_params(params["projector"])
  # The embedding is a gather, not a matmul; the LM head runs at the read
  # positions only (the embedding's matrix when tied).
  lm = params["language_model"]
  n_head = n_params(lm["lm_head"] if "lm_head" in lm else lm["embed"])
  n_llm = n_params(lm) - sum(n_params(lm[k]) for k in ("embed", "lm_head")
                              if k in lm)
  v, t = model_cfg.vision, model_cfg.text
  vit_tok = (v.image_size // v.patch_size) ** 2 + 1
  dense = (n_images * (n_vit * vit_tok + n_proj * internvl.tokens_per_image(
      model_cfg)) + rows * (n_llm * seq + n_head * read))
  attn = (2 * v.num_layers * v.hidden_size * vit_tok**2 * n_images +
          2 * t.num_layers * t.num_heads * t.head_dim * seq**2 * rows)
  return mult * (dense + attn)


def rm_job(config, batch: int, remat: str = "") -> Job:
  """The reward-model update of rd_jax.train_rm at config's (real) size."""
  from rd_jax import train_rm  # pylint: disable=g-import-not-at-top
  from rd_jax.reward import evaluate as rm_eval  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  _set_remat(config.rm.model, remat)
  if config.rm.yes_id < 0:  # filled from the tokenizer at train time
    config.rm.yes_id, config.rm.no_id = 0, 1
  opt = train_rm.make_optimizer(config.train)
  init = lambda: train_rm.init_state(config, jax.random.key(0))[0]  # noqa: E731
  state = jax.eval_shape(init)
  n_img, seq = rm_seq_len(config)
  rows = 2 * batch
  s = config.rm.model.vision.image_size
  frames = config.rm.get("frames")
  img = (batch,) + ((frames,) if frames else ()) + (s, s, 3)
  i32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32)  # noqa: E731
  b = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.bool_)  # noqa: E731
  caption = config.paradigm == rm_eval.CAPTION
  a = _rm_text_slots(config)[1]

  def tokens(seq: int, pairs: int = batch) -> dict:  # pair_major layout
    return {"input_ids": i32(pairs, 2, seq),
            "attention_mask": b(pairs, 2, seq), "read_pos": i32(pairs, 2),
            "answer_ids": i32(pairs, 2, a), "answer_mask": b(pairs, 2, a),
            "decision_index": i32(pairs, 2)}

  fn = functools.partial(train_rm.train_step, config, opt)
  if caption:  # one row per chosen image, its prompt the answer
    rows, images = batch, batch * (frames or 1)
    data = dict(caption={"input_ids": i32(batch, seq),
                         "attention_mask": b(batch, seq),
                         "read_pos": i32(batch), "answer_ids": i32(batch, a),
                         "answer_mask": b(batch, a)},
                chosen=jax.ShapeDtypeStruct(img, jnp.uint8))
  else:
    images = 2 * batch * (frames or 1)  # every image is encoded once
    data = dict(tokens(seq), chosen=jax.ShapeDtypeStruct(img, jnp.uint8),
                rejected=jax.ShapeDtypeStruct(img, jnp.uint8))
  flops = _internvl_flops(config.rm.model, images, rows, seq, 6.0, a)
  twin = train_rm.pointwise_twin(config)
  if twin is not None:
    # the pointwise rows of every k-th pair (train_rm.device_batch): one
    # more LLM pass, over the images already encoded
    pw_seq, pairs = rm_seq_len(twin)[1], -(-batch // twin.get(
        "pointwise_aux_every", 1))
    data.update({train_rm.AUX + k: v for k, v in tokens(pw_seq, pairs).items()})
    flops += _internvl_flops(config.rm.model, 0, 2 * pairs, pw_seq, 6.0,
                             twin.answer_len)
  return Job(fn, state, (data, _abstract_key()), model_flops=flops,
             remat=config.rm.model.remat, init=init,
             describe=f"RM {config.size} {config.paradigm}: {batch} "
             f"{'captions' if caption else 'pairs'} ({rows} sequences x "
             f"{seq} tokens, {n_img} image(s) each)")


def _text_cond_abstract(dit_cfg, batch: int, txt_len: int):
  from rd_jax.models.text_encoder import TextCond  # pylint: disable=g-import-not-at-top
  return TextCond(
      jax.ShapeDtypeStruct((batch, txt_len, dit_cfg.joint_attention_dim),
                           jnp.bfloat16),
      jax.ShapeDtypeStruct((batch, txt_len), jnp.bool_),
      jax.ShapeDtypeStruct((batch, dit_cfg.pooled_projection_dim),
                           jnp.bfloat16))


def _dit_tokens(st) -> int:
  m = st.model
  side = st.resolution // (8 if m.space == "latent" else 1)
  return (side // m.dit.patch_size) ** 2 * max(st.frames, 1)


def _kernel_size(tree, skip=()) -> int:
  """Matmul weights (kernels) of a parameter tree, except paths containing
  any of `skip`."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.endswith("kernel") and not any(s in name for s in skip):
      total += math.prod(x.shape)
  return total


def mmdit_flops(params, dit_cfg, img_tokens: int, txt_tokens: int,
                mult: float) -> float:
  """mult·(matmul MACs per sample) of the MMDiT: in the double-stream
  blocks the image weights see the image tokens and the context weights
  (`add_*`, `*context*`) the text tokens; the single-stream blocks see both;
  AdaLN modulation and the timestep / pooled embedders run once per sample
  (not counted); attention over the joint sequence in every block."""
  per_sample = ("norm", "time_text_embed")  # modulation linears
  double = params["transformer_blocks"]
  img_double = _kernel_size(double, per_sample + ("add_", "context"))
  txt = (_kernel_size(double, per_sample) - img_double +
         _kernel_size(params.get("context_embedder", {})))
  img = (img_double + _kernel_size(params.get("x_embedder", {})) +
         _kernel_size(params.get("proj_out", {})))
  single = _kernel_size(params["single_transformer_blocks"], per_sample)
  seq = img_tokens + txt_tokens
  width = dit_cfg.num_attention_heads * dit_cfg.attention_head_dim
  attn = 2 * (dit_cfg.num_layers + dit_cfg.num_single_layers) * width * seq**2
  return mult * (img * img_tokens + txt * txt_tokens + single * seq + attn)


def latent_sft_step(st, opt, state: dict, batch: dict, rng: jax.Array):
  """Flow-matching update on latents with precomputed text states (the
  real-size generator, whose T5/CLIP encoders run outside the step)."""
  from rd_jax import train_util  # pylint: disable=g-import-not-at-top
  from rd_jax.generation import flow  # pylint: disable=g-import-not-at-top
  from rd_jax.models import generator  # pylint: disable=g-import-not-at-top
  cfg = st.model

  def loss_fn(params):
    loss, _ = flow.flow_matching_loss(
        generator.velocity_fn(cfg, guidance=1.0), params, batch["latents"],
        batch["cond"], rng, t_sampling=st.t_sampling, shift=st.train_shift)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  new, skipped = train_util.apply_gradients(state, grads, opt, st.ema_decay,
                                           loss=loss)
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "skipped": skipped}


def generator_job(config, batch: int, remat: str = "") -> Job:
  from rd_jax import train_generator  # pylint: disable=g-import-not-at-top
  from rd_jax.models import generator  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  st = config[config.stages[0]]
  _set_remat(st.model.dit, remat)
  opt = train_generator.make_optimizer(st)

  def init():
    params = generator.init(st.model, jax.random.key(0))
    return {"params": params, "opt": opt.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32)}

  state = jax.eval_shape(init)
  logical = {"params": generator.logical_specs(st.model)}
  r, tokens = st.resolution, _dit_tokens(st)
  if st.model.text is None:
    txt_len = 512
    side = r // 8
    data = {"latents": jax.ShapeDtypeStruct(
                (batch, side, side, st.model.dit.channels), jnp.float32),
            "cond": _text_cond_abstract(st.model.dit, batch, txt_len)}
    fn = functools.partial(latent_sft_step, st, opt)
  else:
    txt_len = st.model.text.max_len
    img = (batch,) + ((st.frames,) if st.frames else ()) + (64, 64, 3)
    data = {"chosen": jax.ShapeDtypeStruct(img, jnp.uint8),
            "prompt_ids": jax.ShapeDtypeStruct((batch, txt_len), jnp.int32),
            "prompt_mask": jax.ShapeDtypeStruct((batch, txt_len), jnp.bool_)}
    fn = functools.partial(train_generator.train_step, st, opt)
  flops = batch * mmdit_flops(state["params"]["dit"], st.model.dit, tokens,
                              txt_len, 6.0)
  if st.model.text is not None:  # the small text encoder, trained with it
    flops += 6.0 * batch * txt_len * _kernel_size(state["params"]["text"])
  return Job(fn, state, (data, _abstract_key()), logical, flops,
             remat=st.model.dit.remat, init=init,
             describe=f"generator SFT {r}px: {batch} samples x {tokens} "
             f"image + {txt_len} text tokens")


def refl_job(config, rm_config, batch: int, remat: str = "") -> Job:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from rd_jax import refl  # pylint: disable=g-import-not-at-top
  from rd_jax.models import generator, vae  # pylint: disable=g-import-not-at-top
  from rd_jax.reward import model as rm_model  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  rm_config = rm_config.copy_and_resolve_references()
  rm_config.unlock()  # the reward needs rm.paradigm
  st = config[config.stages[0]]
  if not generator.latent(st.model):
    raise ValueError("job=refl compiles the latent (real-size) generator; "
                     "use --config=configs/generator_shapes.py:size=flux_dev")
  _set_remat(st.model.dit, remat)
  # Frozen models are held in bf16 (no optimiser, no master copy needed).
  rm_config.rm.model.param_dtype = "bfloat16"
  rm_config.rm.model.remat = remat or "full"
  rm_config.rm.yes_id, rm_config.rm.no_id = 0, 1
  rm_config.rm.paradigm = "pairwise_generative"
  # The trainer's step (rd_jax/refl.py) with FLUX.1-dev's sampling: 28
  # steps, k uniform in the late window [20, 27] (a traced index, as in
  # training); no flow-matching term (its data would need VAE encoding).
  cfg = ml_collections.ConfigDict(dict(
      gen=st, rm=rm_config.rm,
      refl=dict(steps=st.sample_steps, window=(20, 27), lam=1.0, scale=1.0,
                beta=0.0),
      train=dict(ema_decay=0.999)))
  opt = refl.make_optimizer(ml_collections.ConfigDict(dict(
      grad_clip=1.0, lr=1e-5, warmup_steps=10, optimizer="adamw")),
      generator.logical_specs(st.model))

  def init():
    params = generator.init(st.model, jax.random.key(0))
    return {"params": params, "opt": opt.init(params),
            "ema": jax.tree.map(jnp.copy, params),
            "step": jnp.zeros((), jnp.int32)}

  state = jax.eval_shape(init)

  def frozen_init():
    return {"vae": jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                vae.init(st.model.vae, jax.random.key(1))),
            "rm": rm_model.init(rm_config.rm, jax.random.key(2))}

  frozen = jax.eval_shape(frozen_init)
  logical = {"params": generator.logical_specs(st.model),
             "vae": vae.logical_specs(st.model.vae)}
  _, seq = rm_seq_len(rm_config)
  s = rm_config.rm.model.vision.image_size
  i32 = lambda *sh: jax.ShapeDtypeStruct(sh, jnp.int32)  # noqa: E731
  data = {
      "cond": _text_cond_abstract(st.model.dit, batch, 512),
      "reference": jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32),
      "question": {"input_ids": i32(batch, seq),
                   "attention_mask": jax.ShapeDtypeStruct((batch, seq),
                                                          jnp.bool_),
                   "read_pos": i32(batch)}}
  k_mean = sum(cfg.refl.window) / 2
  dit = batch * mmdit_flops(state["params"]["dit"], st.model.dit,
                            _dit_tokens(st), 512, 1.0)
  flops = (2.0 * dit * k_mean  # frozen sampling to k
           + 6.0 * dit         # step k, with grad
           + _internvl_flops(rm_config.rm.model, 2 * batch, batch, seq, 4.0))
  fn = functools.partial(refl.train_step, cfg, opt)
  return Job(fn, state, (data, _abstract_key(), frozen), logical, flops,
             param_args=(2,), remat=st.model.dit.remat, static_loops=False,
             init=init, param_init=frozen_init,
             describe=f"ReFL flux_dev {st.resolution}px + RM "
             f"{rm_config.size}: {batch} samples, {cfg.refl.steps} steps, "
             f"grad at k in {tuple(cfg.refl.window)}")


def make_job(config, job: str, batch: int, remat: str = "",
             rm_config=None) -> Job:
  """The job's step at `batch`; `remat` overrides the model's policy;
  `rm_config` is the reward model of job=refl."""
  if job == "auto":
    job = ("rm" if "rm" in config else "generator" if "stages" in config
           else "")
  if job == "rm":
    return rm_job(config, batch, remat)
  if job == "generator":
    return generator_job(config, batch, remat)
  if job == "refl":
    return refl_job(config, rm_config, batch, remat)
  raise ValueError("cannot tell the job from the config; pass --job=rm|"
                   "generator|refl")


# ---------------------------------------------------------------- compile


_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")
_CALLS = re.compile(r"(calls|body|condition|to_apply|true_computation|"
                    r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONST = re.compile(r"^[su]32\[\]\S* constant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _dims(s: str) -> list[int]:
  m = _SHAPE.match(s.strip())
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _op_flops(rhs: str, shapes: dict[str, list[int]]) -> float:
  """FLOPs of one dot / convolution / cuBLAS GEMM (GPU) instruction (right
  of ` = `)."""
  gemm = '__cublas$' in rhs  # GPU: (result, workspace) = custom-call(a, b)
  if " dot(" not in rhs and " convolution(" not in rhs and not gemm:
    return 0.0
  out = _dims(rhs.lstrip("("))
  n_out = math.prod(out) if out else 1
  args = re.search(r"(?:dot|convolution|custom-call)\(([^)]*)\)", rhs)
  names = [a.strip().split(" ")[-1].lstrip("%") for a in
           args.group(1).split(",")] if args else []
  dims = [shapes.get(n, []) for n in names]
  if (" dot(" in rhs or gemm) and dims:
    m = re.search(
        r'lhs_contracting_dim(?:s=\{([\d,]*)\}|ensions":\[([^\]]*)\])', rhs)
    idx = [int(i.strip('"')) for i in (m.group(1) or m.group(2)).split(",")
           if i.strip('"')] if m else []
    k = math.prod(dims[0][i] for i in idx) if dims[0] else 1
    return 2.0 * n_out * k
  m = re.search(r"dim_labels=(\w+)_(\w+)->", rhs)
  if len(dims) > 1 and dims[0] and dims[1] and m:
    # Per output element: input features x, per spatial dim, the window
    # positions that can overlap the input (min(window, input size)); the
    # TPU compiler writes batched matmuls as convolutions whose batch dims
    # are spatial dims with a full-size, fully padded (or lhs-dilated)
    # window.
    lhs_l, rhs_l = m.groups()
    dil = re.search(r"lhs_dilate=([\dx]+)", rhs)
    dil = [int(d) for d in dil.group(1).split("x")] if dil else []
    macs = dims[1][rhs_l.index("i")]
    for k, label in enumerate(rhs_l):
      if label.isdigit():
        s = int(label)
        d = dil[s] if s < len(dil) else 1  # lhs dilation: holes don't count
        macs *= min(-(-dims[1][k] // d), dims[0][lhs_l.index(label)])
    return 2.0 * n_out * macs
  return 0.0


def hlo_flops(hlo_text: str) -> float:
  """Dot/convolution FLOPs of an optimised HLO module, with every while
  loop's body counted as many times as the loop runs (`known_trip_count`,
  else the bound its condition compares with).

  XLA's cost_analysis counts a loop body once, so for scanned layer stacks
  it undercounts by about the number of layers.
  """
  shapes = {}
  for line in hlo_text.splitlines():
    lhs, sep, rhs = line.partition(" = ")
    if sep and lhs.strip():
      shapes[lhs.split()[-1].lstrip("%")] = _dims(rhs)
  comps, order, entry, cur = {}, [], None, None
  for line in hlo_text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      cur = m.group(1)
      comps[cur] = {"flops": 0.0, "calls": []}
      order.append(cur)
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if cur is None or " = " not in line:
      continue
    c = comps[cur]
    rhs = line.partition(" = ")[2]
    c["flops"] += _op_flops(rhs, shapes)
    const = _CONST.match(rhs)
    if const:
      c["max_const"] = max(c.get("max_const", 0), int(const.group(1)))
    trip = _TRIP.search(line)
    for kind, name in _CALLS.findall(line):
      if kind in ("body", "condition"):
        c["calls"].append((name, int(trip.group(1)) if trip else
                           ("cond", re.search(r"condition=%?([\w.\-]+)",
                                              line).group(1))))
      else:
        c["calls"].append((name, 1))
    b = _BRANCHES.search(line)
    if b:
      c["calls"] += [(n.strip().lstrip("%"), 1) for n in b.group(1).split(",")]
  mult = {name: 0.0 for name in comps}
  mult[entry or order[-1]] = 1.0
  # HLO text lists callees before callers: walk callers first.
  for name in reversed(order):
    for callee, times in comps[name]["calls"]:
      if isinstance(times, tuple):
        # No known_trip_count (TPU HLO): the loop bound is the constant the
        # condition compares the counter with (scan loops count 0..N-1).
        times = comps.get(times[1], {}).get("max_const", 1) or 1
      if callee in mult:
        mult[callee] += mult[name] * times
  return sum(comps[n]["flops"] * mult[n] for n in comps)


def compiled_text(compiled, hlo_out: str = "") -> str:
  """A compiled step's HLO text, rendered once (slow for large programs:
  keep it for every use) and also written to `hlo_out` if given."""
  text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(text)
  return text


def _gib(x: float) -> float:
  return round(x / 2**30, 3)


def _advice(report: dict, mesh_shape) -> str:
  """What to change when a program does not fit (or barely fits)."""
  data, fsdp, tensor = mesh_shape
  tips = []
  if report.get("remat") in ("none", "dots", "dots_no_batch", None):
    tips.append("--remat=full (recompute activations in the backward pass)")
  if data > 1:
    tips.append(f"--mesh=1,{data * fsdp},{tensor} (shard parameters and "
                "optimiser state over every chip instead of replicating "
                "them over data)")
  known = "temp_gib" in report  # XLA gave up before a memory analysis
  if report["batch"] > 1 and (not known or
                              report["temp_gib"] > report["argument_gib"]):
    keep = ("; a reward model with several pairs a chip keeps its batch "
            "with --config.train.microbatches=2, gradients accumulated over "
            "its halves" if report["batch"] >= 2 * data * fsdp
            else "")  # one pair a chip: the accumulator only adds memory
    tips.append(f"--batch={report['batch'] // 2} (half the "
                f"activations{keep})")
  bigger = _bigger(report["topology"])
  tips.append(f"--topology={bigger} (parameters + optimiser state shrink "
              "linearly with the fsdp axis)" if bigger else
              "more slices (Nx prefix) with data over DCN")
  return "; or ".join(tips)


def _bigger(topology: str) -> str | None:
  """The next larger topology of the same TPU generation."""
  names = [n for n in topology_names()
           if n.split("-")[0] == topology.split("x")[-1].split("-")[0]]
  base = topology.split("xv")[-1] if "xv" in topology else topology
  base = base if base.startswith("v") else "v" + base
  i = names.index(base) if base in names else -1
  return names[i + 1] if 0 <= i < len(names) - 1 else None


def placements(job: Job, mesh, rules=sharding.DEFAULT_RULES):
  """(state shardings, [shardings of each `rest` argument]): parameters by
  their logical names (frozen models too), batches over act_batch."""
  state_sh = sharding.tree_shardings(job.state, mesh, rules, job.logical)
  div = sharding.batch_shards(mesh, rules)

  def batch_sh(x):
    if x.ndim and x.shape[0] % div == 0:
      return sharding.batch_sharding(mesh, x.ndim, rules)
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  rest_sh = [sharding.tree_shardings(r, mesh, rules, job.logical)
             if i in job.param_args else jax.tree.map(batch_sh, r)
             for i, r in enumerate(job.rest)]
  return state_sh, rest_sh


def compile_step(job: Job, mesh, rules=sharding.DEFAULT_RULES, args=None):
  """`job.fn` compiled for `mesh`, its state donated and kept in its
  shardings (`placements`). `args`: the real (state, *rest) arrays to
  compile for, or None for the abstract ones (job.state, job.rest)."""
  state_sh, rest_sh = placements(job, mesh, rules)
  if args is None:
    args = [sharding.abstract_with_shardings(job.state, state_sh)] + [
        sharding.abstract_with_shardings(r, s)
        for r, s in zip(job.rest, rest_sh)]
  # Trace once without a mesh first: the models build (and cache) their NNX
  # graph definitions lazily with nnx.eval_shape, which under an active mesh
  # would try to resolve the logical names as mesh axes.
  jax.eval_shape(job.fn, job.state, *job.rest)
  with jax.set_mesh(mesh):
    return jax.jit(job.fn, donate_argnums=0,
                   out_shardings=(state_sh, None)).lower(*args).compile()


def compile_job(job: Job, devices, info: dict, mesh_shape, dcn_shape=None,
                rules=sharding.DEFAULT_RULES,
                hlo_out: str = "") -> dict:
  """AOT-compiles `job` on `devices`; returns its report. Writes the
  optimised HLO to `hlo_out` if given (and it compiled)."""
  mesh = sharding.make_mesh(mesh_shape, devices, dcn_shape)
  n_chips = mesh.devices.size
  report = dict(topology=info["name"], chips=n_chips,
                mesh=dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
                describe=job.describe,
                params=n_params(job.state["params"]))
  t0 = time.time()
  try:
    compiled = compile_step(job, mesh, rules)
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "HBM" not in msg:
      raise
    report.update(fits=False, compile_s=round(time.time() - t0, 1),
                  error=msg.splitlines()[0][:400])
    return report
  report["compile_s"] = round(time.time() - t0, 1)
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
           mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  bytes_acc = float(cost.get("bytes accessed", 0.0))
  flops = hlo_flops(compiled_text(compiled, hlo_out))
  t_est = max(flops / info["peak"], bytes_acc / info["hbm_bw"])
  report.update(
      argument_gib=_gib(mem.argument_size_in_bytes),
      output_gib=_gib(mem.output_size_in_bytes),
      temp_gib=_gib(mem.temp_size_in_bytes),
      alias_gib=_gib(mem.alias_size_in_bytes),
      total_gib=_gib(total), hbm_gib=_gib(info["hbm"]),
      hbm_used=round(total / info["hbm"], 3),
      fits=bool(total <= info["hbm"]),
      hlo_flops_per_chip=flops, xla_cost_flops_per_chip=xla_flops,
      hlo_bytes_per_chip=bytes_acc,
      model_flops=job.model_flops,
      est_step_s=t_est,
      est_mfu=(round(job.model_flops / (n_chips * info["peak"] * t_est), 3)
               if t_est and job.static_loops else None))
  if not job.static_loops:
    report["note"] = ("a loop runs a data-dependent number of times (ReFL "
                      "samples to a random step k) that the FLOP count "
                      "cannot know, so no MFU is estimated")
  return report


def run(config, job_name: str, topology: str, mesh_shape, dcn_shape=None,
        batch: int = 0) -> dict:
  devices, info = topology_devices(topology)
  info["name"] = topology
  batch = batch or info["chips"]
  job = make_job(config, job_name, batch, _REMAT.value, _RM_CONFIG.value)
  rules = sharding.rules_from_config(config)
  report = compile_job(job, devices, info, mesh_shape, dcn_shape, rules,
                       _HLO_OUT.value)
  report.update(batch=batch, remat=job.remat)
  if not report["fits"]:
    report["advice"] = _advice(report, tuple(report["mesh"].values()))
  return report


def main(argv) -> dict:
  FLAGS(argv)
  if not FLAGS.is_parsed() or _CONFIG.value is None:
    raise app.UsageError("--config is required")
  flags.FLAGS.mark_as_parsed()
  report = run(_CONFIG.value, _JOB.value, _TOPOLOGY.value, _ints(_MESH.value),
               _ints(_DCN.value) or None, _BATCH.value)
  print(json.dumps(report, indent=2))
  if not report["fits"]:
    hbm = _gib(CHIPS[parse_topology(report["topology"])["kind"]]["hbm"])
    need = (f"{report['total_gib']} GiB per chip > {hbm} GiB HBM"
            if "total_gib" in report else
            f"more than the {hbm} GiB HBM per chip ({report['error']})")
    print(f"\nDOES NOT FIT on {report['topology']}: {need}. "
          f"Try {report['advice']}.", file=sys.stderr)
  if _OUT.value:
    from rd_jax import train_util  # pylint: disable=g-import-not-at-top
    train_util.write_json(_OUT.value, report)
  return report


if __name__ == "__main__":
  main(sys.argv)
