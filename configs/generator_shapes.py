r"""Flow-matching generator SFT on ShapesWorld (T2I beside T2V + I2V).

  python -m rd_jax.train_generator --config=configs/generator_shapes.py \
      --workdir=/tmp/gen_shapes

Default: tiny pixel-space MMDiTs (≈1.9M params each), one for images
(32×32, patch 4: 64 tokens) and one for videos (8 frames of 16×16, patch 4:
128 tokens); writes oracle alignment on held-out prompts to
final_metrics.json. The image model predicts x̂0 (`model.prediction=
'sample'`, JiT): with 48 pixel values per token it beats predicting v, and
32×32 gives the oracle margin 16×16 lacks (objects are 3-4.5 px across
there). On 2 CPU cores the image stage is many small steps (batch 8, 6000
steps): at a fixed CPU budget, 4× more updates beat 4× bigger
batches by far, and beat a deeper model (docs/generator.md). Muon on
the block matrices (`image.optimizer='muon'`, stop 30) reaches
oracle_t2i 0.20 on 480 held-out prompts at 4400 steps, where AdamW reached
0.106 (0.077 for the earlier 16×16 velocity default, 0.058 for 32×32
velocity); 6600 steps reach 0.315 and 0.325 (seeds 0 and 1, stop 37;
13 minutes alone then), 0.279-0.312 at later float orders; 8000 steps
0.323 in 8:44 alone at stop 44 (Gram Newton-Schulz, unrolled stacks,
glibc malloc tunables: ~0.06 s a step), when the whole default, images
then videos, took 14:04. Since stop 45 the two stages train side by side
(`parallel_stages`), 6000 image and 3000 video steps: oracle_t2i 0.2875,
I2V direction 0.67, T2V 0.54, in 9:38 for the whole default alone.

Args (`:key=value,...`):
  smoke     a seconds-long run of the same code path (CI).
  size      'tiny' (default) or 'flux_dev': the real FLUX.1-dev transformer
            (11.9B params, 16-channel latents of the Flux VAE, T5-XXL 4096-d
            token states + CLIP-L 768-d pooled vector), for abstract
            instantiation / AOT compiles; its text encoders are external.

FLUX.1-dev dimensions, from black-forest-labs/flux `src/flux/util.py`
(configs["flux-dev"]: in_channels=64, vec_in_dim=768, context_in_dim=4096,
hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19,
depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
guidance_embed=True; ae: ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
z_channels=16, scale_factor=0.3611, shift_factor=0.1159), identical to
diffusers' FluxTransformer2DModel defaults (patch_size=1 on 2×2-packed
latents, in_channels=64, num_layers=19, num_single_layers=38,
attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)) with
guidance_embeds=True as in the FLUX.1-dev transformer/config.json.
tests/test_generator_model.py checks the parameter count (11,901,408,320)
against diffusers instantiated on the meta device.
"""
from __future__ import annotations

import ml_collections

from rd_jax.config_util import parse_arg


def _dit(**kw) -> ml_collections.ConfigDict:
  base = dict(patch_size=2, channels=3, num_layers=2, num_single_layers=2,
              num_attention_heads=4, attention_head_dim=32,
              axes_dims_rope=(8, 12, 12), mlp_ratio=4.0,
              joint_attention_dim=64, pooled_projection_dim=64,
              guidance_embeds=False, remat="none", dtype="float32",
              scan_unroll=1)  # layers per scan iteration (layers.scan_layers)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _text(**kw) -> ml_collections.ConfigDict:
  base = dict(vocab_size=128, max_len=24, dim=64, heads=2, layers=2,
              remat="none", scan_unroll=1)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _stage(**kw) -> ml_collections.ConfigDict:
  base = dict(
      resolution=16,       # trained/sampled size; data is area-downsampled
      frames=0,            # 0: images; >0: videos of this many frames
      i2v_prob=0.0,        # share of video batches trained as I2V
      t2v_two_pass=False,  # T2V sampling: joint, then I2V from its frame 0
      steps=600, batch_size=32,
      lr=1e-3, warmup_steps=50, weight_decay=0.0, grad_clip=1.0,
      optimizer="adamw",   # adamw | muon (rd_jax/train_util.make_optimizer)
      ema_decay=0.995,
      max_nonfinite=20,    # skipped (non-finite) updates in a row -> stop
      cond_drop=0.1,       # prompt dropout, enables classifier-free guidance
      t_sampling="logit_normal", train_shift=1.0,
      # evaluation on held-out (test_id) prompts with the EMA params
      eval_n=60, eval_batch=60, sample_steps=20, sample_shift=1.0,
      solver="euler", cfg_scale=3.0,
      guidance=None,       # FLUX.1-dev's distilled-guidance input (sampling)
      # An earlier stage whose final EMA params start this one ("" = random
      # init); the two stages' `model` must be equal (T2V from T2I).
      init_from_stage="",
  )
  base.update(kw)
  return ml_collections.ConfigDict(base)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, smoke=False, size="tiny")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""  # "" = WORKDIR/data (built on first use)
  c.data_scale = "default"  # ShapesWorld size: default | small | tiny
  c.on_corrupt = "fail"  # a corrupt data record: "fail" or "skip" (counted)
  c.stages = ("image", "video")
  # CPU: stages that start from scratch train at the same time, each in a
  # process of its own (train_generator.stages_side_by_side); off, or on
  # an accelerator, they run one after another.
  c.parallel_stages = True
  c.log_every = 50
  # Orbax saves cost ~2 % of the image stage's steps/s at every 200 (stop
  # 44); a SIGTERM still saves the step it stops at.
  c.ckpt_every = 500
  # Mesh (data, fsdp, tensor), -1 = fill; rules: rd_jax/sharding.py.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.num_grid = 16  # samples per PNG grid / GIF strip

  # Images: small batches, many steps (see the module docstring).
  # 32×32, x̂0-prediction, noise-heavy training t (train_shift=3 binds
  # colours); image prompts are at most 7 tokens.
  # Muon: 0.20 on 480 held-out prompts against AdamW's 0.106 at the same
  # 4400 steps (docs/generator.md, "Stop 30"); sampled at CFG 2 that model
  # scores 0.229 (1.5: 0.202, 2.5: 0.221, 3: 0.202; docs/generator.md,
  # "Sampler settings"). 6600 steps (stop 37): 0.315 / 0.325 on two seeds,
  # where 5400 give 0.221 and 13200 0.452 (docs/generator.md, "Stop 37");
  # 8000 at stop 44 (0.323 against 6600's 0.279 at the same float order);
  # 6000 since stop 45, beside the video stage, to fit both stages in ten
  # minutes (0.2875; 6400: 0.300, 7000: 0.300; docs/generator.md,
  # "Stop 45").
  c.image = _stage(resolution=32, steps=6000, batch_size=8, lr=2e-3,
                   optimizer="muon", warmup_steps=100, train_shift=3.0,
                   cfg_scale=2.0, eval_n=480, eval_batch=120)
  c.image.model = ml_collections.ConfigDict(dict(
      space="pixel", prediction="sample", text=_text(max_len=8, scan_unroll=2),
      dit=_dit(patch_size=4, scan_unroll=2)))
  # Videos: the image recipe with Muon (stop 31), many small steps, and the
  # first frame on every frame's channels (stop 39): I2V objects then move
  # the asked way (direction 0.79 / 0.53 of the tracked ones on seeds 0 /
  # 1, chance 0.25), where 500 x 16 steps (0.08-0.15) or either change
  # alone (0.15-0.17) stay at chance (docs/generator.md, "Stop 39").
  # T2V in two passes (stop 40: the joint sample's frame 0, then I2V from
  # it) moves the objects the asked way on 3 of 4 seeds (direction 0.52-
  # 0.61 against 0.20-0.29 joint; docs/generator.md, "Stop 40").
  # 3000 steps since stop 45 (I2V / T2V direction 0.67 / 0.54; 4000: 0.82
  # / 0.65; 2600: 0.59 / 0.40; 2200: 0.35 / 0.08, docs/generator.md,
  # "Stop 45").
  c.video = _stage(frames=8, i2v_prob=0.5, steps=3000, batch_size=4,
                   lr=2e-3, optimizer="muon", warmup_steps=100,
                   train_shift=3.0, cfg_scale=2.0, eval_n=60, eval_batch=30,
                   t2v_two_pass=True)
  c.video.model = ml_collections.ConfigDict(dict(
      space="pixel", prediction="sample", first_frame_concat=True,
      text=_text(scan_unroll=2), dit=_dit(patch_size=4, scan_unroll=2)))

  if arg.size == "flux_dev":
    c.image.resolution = 1024
    # FLUX.1-dev sampling: guidance-distilled (no CFG), shifted schedule.
    c.image.update(sample_steps=28, sample_shift=3.0, cfg_scale=1.0,
                   guidance=3.5)
    # Fine-tuning a pretrained FLUX.1-dev: AdamW at a small lr (the tiny
    # stage's Muon at 2e-3 is a from-scratch recipe).
    c.image.update(optimizer="adamw", lr=1e-5)
    c.image.model = ml_collections.ConfigDict(dict(
        space="latent",
        text=None,  # external: T5-XXL token states + CLIP-L pooled vector
        dit=_dit(patch_size=2, channels=16, num_layers=19,
                 num_single_layers=38, num_attention_heads=24,
                 attention_head_dim=128, axes_dims_rope=(16, 56, 56),
                 joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, remat="full", dtype="bfloat16"),
        # diffusers AutoencoderKL layout of the Flux VAE.
        vae=ml_collections.ConfigDict(dict(
            in_channels=3, latent_channels=16,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False)),
    ))
    c.stages = ("image",)
  elif arg.size != "tiny":
    raise ValueError(f"unknown size {arg.size!r}; use 'tiny' or 'flux_dev'")

  if arg.smoke:
    for s in (c.image, c.video):
      s.steps, s.batch_size, s.warmup_steps = 4, 4, 2
      s.eval_n, s.eval_batch, s.sample_steps = 6, 6, 2
      if s.model.text is not None:
        s.model.text.update(dim=32, layers=1)
      s.model.dit.update(num_attention_heads=1, num_layers=1,
                         num_single_layers=1)
      if s.model.text is not None:
        s.model.dit.update(joint_attention_dim=32, pooled_projection_dim=32)
    c.log_every, c.ckpt_every, c.num_grid = 2, 2, 4
    c.data_scale = "tiny"
  return c
