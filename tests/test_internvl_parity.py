"""Logit parity of rd_jax InternVL against Hugging Face transformers.

Each case builds a tiny random `InternVLForConditionalGeneration` in-process,
saves it with `save_pretrained`, converts it with rd_jax's converter and
compares fp32 logits on every position (max abs diff <= 1e-4) and the greedy
next tokens.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from rd_jax.convert import internvl as convert
from rd_jax.models import internvl

IMAGE_TOKEN = 5
VOCAB = 96

CASES = {
    # Qwen2 text (QKV bias, GQA 4:2), InternViT-300M-style vision (LayerNorm,
    # qkv bias, layer scale), untied head, two images per sequence, sharded
    # safetensors with an index.
    "qwen2_layernorm_untied_2img": dict(
        text=dict(model_type="qwen2", num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(norm_type="layer_norm", attention_bias=True),
        tie=False, images_per_seq=2, shard=True),
    # Llama text (how InternLM2 checkpoints appear in HF form) with dynamic
    # NTK rope (active: the sequence is longer than max_position_embeddings),
    # InternViT-6B-style vision (RMSNorm + QK-norm, no bias), final vision
    # LayerNorm, tied embeddings.
    "llama_rmsnorm_qknorm_tied": dict(
        text=dict(model_type="llama", num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=8,
                  rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                       rope_theta=10000.0)),
        vision=dict(norm_type="rms_norm", use_qk_norm=True,
                    use_mean_pooling=False),
        tie=True, images_per_seq=1),
    # Llama with every bias, head_dim != width/heads, linear rope, an
    # earlier vision feature layer, and images at twice the trained
    # resolution (bicubic position-embedding interpolation).
    "llama_biases_posinterp_featlayer": dict(
        text=dict(model_type="llama", num_attention_heads=4,
                  num_key_value_heads=1, head_dim=12, attention_bias=True,
                  mlp_bias=True,
                  rope_parameters=dict(rope_type="linear", factor=2.0,
                                       rope_theta=500.0)),
        vision=dict(norm_type="layer_norm", attention_bias=True,
                    image_size=28),
        tie=False, images_per_seq=2, pixel_size=56, feature_layer=-2),
}


def _hf_config(case):
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=56, patch_size=14)
  vision.update(case["vision"])
  text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
              intermediate_size=48, rms_norm_eps=1e-6,
              tie_word_embeddings=case["tie"])
  text.update(case["text"])
  return InternVLConfig(
      vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
      vision_feature_layer=case.get("feature_layer", -1),
      tie_word_embeddings=case["tie"])


def _randomize(model, seed):
  """HF init leaves norms at 1, layer scales at 0.1 and the class/position
  embeddings at 0, which would hide mapping bugs: draw everything."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name or "lambda" in name:
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.2 * noise)


def _inputs(case, rng, tokens_per_image):
  batch, n_img = 2, case["images_per_seq"]
  size = case.get("pixel_size", 56)
  ids = []
  for _ in range(batch):
    seq = list(rng.integers(6, VOCAB, 3))
    for _ in range(n_img):
      seq += [1] + [IMAGE_TOKEN] * tokens_per_image + [2]
    seq += list(rng.integers(6, VOCAB, 5))
    ids.append(seq)
  pixels = rng.standard_normal((batch * n_img, 3, size, size)).astype(
      np.float32)
  return np.asarray(ids, np.int64), pixels


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
  case = CASES[request.param]
  hf_dir = str(tmp_path_factory.mktemp("hf"))
  out_dir = str(tmp_path_factory.mktemp("rd"))
  torch.manual_seed(0)
  model = InternVLForConditionalGeneration(_hf_config(case)).eval()
  model.config._attn_implementation = "eager"
  _randomize(model, seed=len(request.param))
  model.save_pretrained(hf_dir, max_shard_size="40KB" if case.get("shard")
                        else "1GB")
  if case.get("shard"):
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
  convert.main([f"--hf_dir={hf_dir}", f"--out_dir={out_dir}"])
  cfg, params = convert.load(out_dir)
  size = case.get("pixel_size", 56)
  ids, pixels = _inputs(case, np.random.default_rng(0),
                        internvl.tokens_per_image(cfg, size))
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids),
                pixel_values=torch.from_numpy(pixels)).logits.numpy()
  return dict(name=request.param, cfg=cfg, params=params, ids=ids,
              pixels=pixels, ref=ref, hf_dir=hf_dir)


def test_logit_parity(converted):
  c = converted
  logits = jax.jit(lambda p, i, x: internvl.forward(c["cfg"], p, i, x))(
      c["params"], jnp.asarray(c["ids"]), jnp.asarray(c["pixels"]))
  logits = np.asarray(logits)
  diff = float(np.max(np.abs(logits - c["ref"])))
  print(f"\n{c['name']}: max |logits - HF| = {diff:.2e}")
  assert logits.shape == c["ref"].shape
  assert diff <= 1e-4
  np.testing.assert_array_equal(logits.argmax(-1), c["ref"].argmax(-1))


def test_logits_at_and_hf_dir_load(converted):
  """The readout path matches the full forward, and loading the HF dir
  directly gives the same params as the converted Orbax checkpoint."""
  c = converted
  cfg_hf, params_hf = convert.load(c["hf_dir"])
  assert cfg_hf.to_dict() == c["cfg"].to_dict()
  for a, b in zip(jax.tree.leaves(params_hf), jax.tree.leaves(c["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  read = jnp.asarray([[c["ids"].shape[1] - 1, 3], [0, 7]])
  logits, hidden = jax.jit(
      lambda p, i, x, r: internvl.logits_at(c["cfg"], p, i, x, r,
                                            return_hidden=True))(
          c["params"], jnp.asarray(c["ids"]), jnp.asarray(c["pixels"]), read)
  ref = np.take_along_axis(c["ref"], np.asarray(read)[..., None], axis=1)
  assert logits.shape == (2, 2, VOCAB)
  assert hidden.shape == (2, 2, c["cfg"].text.hidden_size)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_bf16_compute_close(converted):
  """bf16 compute on fp32 master params stays near the fp32 logits; bf16
  params load as the rounded fp32 weights."""
  c = converted
  cfg = c["cfg"].copy_and_resolve_references()
  cfg.dtype = "bfloat16"
  logits = jax.jit(lambda p, i, x: internvl.forward(cfg, p, i, x))(
      c["params"], jnp.asarray(c["ids"]), jnp.asarray(c["pixels"]))
  assert logits.dtype == jnp.float32
  scale = np.abs(c["ref"]).max()
  assert float(np.max(np.abs(np.asarray(logits) - c["ref"]))) < 0.1 * scale
  # bf16 params straight from the HF dir: every weight is cast on load.
  cfg16, params16 = convert.load(c["hf_dir"], param_dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16"
  for p16, p32 in zip(jax.tree.leaves(params16), jax.tree.leaves(c["params"])):
    assert p16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(p16, p32.astype(jnp.bfloat16))


def test_mismatched_checkpoint_names_tensor(tmp_path):
  case = CASES["qwen2_layernorm_untied_2img"]
  model = InternVLForConditionalGeneration(_hf_config(case))
  model.save_pretrained(str(tmp_path))
  path = tmp_path / "config.json"
  good = json.loads(path.read_text())
  bad = json.loads(path.read_text())
  bad["text_config"]["intermediate_size"] = 40
  path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"tensor 'language_model\.layers\.0\."
                     r"mlp\.down_proj\.weight': expected shape \(32, 40\) "
                     r"from the config, found \(32, 48\)"):
    convert.load(str(tmp_path))
  # Without the top-level flag transformers ties the head; a separate
  # lm_head.weight in the checkpoint must not be dropped silently.
  del good["tie_word_embeddings"]
  path.write_text(json.dumps(good))
  with pytest.raises(ValueError, match="different lm_head.weight"):
    convert.load(str(tmp_path))



def test_both_hf_name_layouts_map_to_the_same_params():
  """save_pretrained writes `language_model.model.*`; in-memory state dicts
  (and some Hub checkpoints) use `model.language_model.*`."""
  saved = ["language_model.model.layers.0.mlp.up_proj.weight",
           "language_model.lm_head.weight",
           "vision_tower.encoder.layer.0.lambda_1",
           "multi_modal_projector.linear_1.bias"]
  memory = ["model.language_model.layers.0.mlp.up_proj.weight",
            "lm_head.weight", "model.vision_tower.encoder.layer.0.lambda_1",
            "model.multi_modal_projector.linear_1.bias"]
  want = ["language_model.layers.0.mlp.up_proj.weight", "lm_head.weight",
          "vision_tower.encoder.layer.0.lambda_1",
          "multi_modal_projector.linear_1.bias"]
  for names in (saved, memory):
    assert list(convert.canonical_names({n: i for i, n in enumerate(names)})
                ) == want
