"""InternVL2.5 backbone configs: the reward-model scaling ladder, plus tiny.

    python -m rd_jax.convert.internvl --hf_dir=/ckpt/InternVL2_5-8B-hf \
        --out_dir=/ckpt/rd_internvl_8b
    get_config('size=8b')               # the same architecture, random init
    get_config('size=tiny,vocab=300')   # CPU smoke size (~0.2M params)

Arguments: size (1b|2b|4b|8b|26b|tiny), dtype / param_dtype (float32 |
bfloat16), remat (none|full|dots|dots_no_batch), and for size=tiny: vocab,
image_token_id, image_size (a multiple of 28), width (LLM width), layers.

Sources (every number below): the InternVL 2.5 family table on the model
cards https://huggingface.co/OpenGVLab/InternVL2_5-{1B,2B,4B,8B,26B} (which
ViT and LLM each size uses) and the `config.json` files of
  OpenGVLab/InternViT-300M-448px-V2_5   (1024 wide, 24 layers, 16 heads,
      4096 MLP, LayerNorm eps 1e-6, qkv_bias, no QK-norm, 448 px, patch 14)
  OpenGVLab/InternViT-6B-448px-V2_5     (3200 wide, 45 layers -- InternVL
      keeps 45 of InternViT-6B's 48 --, 25 heads, 12800 MLP, RMSNorm eps 1e-6,
      no qkv bias, QK-norm)
  OpenGVLab/InternVL2_5-*B llm_config   (Qwen2.5-0.5B/3B-Instruct and
      internlm2_5-{1_8b,7b,20b}-chat with InternVL's added tokens:
      vocab 151674 / 92553; InternVL stores an untied LM head for all sizes)
Published totals used by tests/test_internvl_sizes.py (the "Model size"
shown on each model card): 1B 938M, 2B 2.21B, 4B 3.71B, 8B 8.08B, 26B 25.5B.
"""
from __future__ import annotations

import ml_collections

from rd_jax.config_util import parse_arg
from rd_jax.models.internvl import model_config, text_config, vision_config

PUBLISHED_PARAMS = {"1b": 938e6, "2b": 2.21e9, "4b": 3.71e9, "8b": 8.08e9,
                    "26b": 25.5e9}

_VIT_300M = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096,
                 norm_type="layer_norm", qk_norm=False, qkv_bias=True)
_VIT_6B = dict(hidden_size=3200, num_layers=45, num_heads=25, mlp_dim=12800,
               norm_type="rms_norm", qk_norm=True, qkv_bias=False)

# Qwen2.5: QKV bias, rms eps 1e-6, theta 1e6. InternLM2.5 (HF form: Llama
# with no biases): rms eps 1e-5, theta 1e6, dynamic NTK rope (factor 2),
# which equals plain rope below 32768 positions.
_QWEN = dict(vocab_size=151674, norm_eps=1e-6, rope_type="default",
             qkv_bias=True)
_INTERNLM = dict(vocab_size=92553, norm_eps=1e-5, rope_type="dynamic",
                 qkv_bias=False)
_LLMS = {
    "1b": dict(_QWEN, hidden_size=896, num_layers=24, num_heads=14,
               num_kv_heads=2, head_dim=64, mlp_dim=4864),
    "2b": dict(_INTERNLM, hidden_size=2048, num_layers=24, num_heads=16,
               num_kv_heads=8, head_dim=128, mlp_dim=8192),
    "4b": dict(_QWEN, hidden_size=2048, num_layers=36, num_heads=16,
               num_kv_heads=2, head_dim=128, mlp_dim=11008),
    "8b": dict(_INTERNLM, hidden_size=4096, num_layers=32, num_heads=32,
               num_kv_heads=8, head_dim=128, mlp_dim=14336),
    "26b": dict(_INTERNLM, hidden_size=6144, num_layers=48, num_heads=48,
                num_kv_heads=8, head_dim=128, mlp_dim=16384),
}
# `<IMG_CONTEXT>` in the Qwen2.5 / InternLM2.5 tokenizers of InternVL2.5.
_IMAGE_TOKEN = {"1b": 151667, "4b": 151667, "2b": 92546, "8b": 92546,
                "26b": 92546}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = parse_arg(arg, size="tiny", dtype="float32", param_dtype="float32",
                  remat="none", vocab=256, image_token_id=3, image_size=56,
                  width=64, layers=2)
  common = dict(dtype=arg.dtype, param_dtype=arg.param_dtype, remat=arg.remat)
  if arg.size == "tiny":
    return model_config(
        vision_config(image_size=arg.image_size),
        text_config(vocab_size=arg.vocab, hidden_size=arg.width,
                    num_layers=arg.layers, head_dim=arg.width // 4),
        image_token_id=arg.image_token_id, **common)
  if arg.size not in _LLMS:
    raise KeyError(f"unknown InternVL size {arg.size!r}; use one of "
                   f"{sorted(_LLMS)} or 'tiny'")
  vit = _VIT_6B if arg.size == "26b" else _VIT_300M
  return model_config(vision_config(**vit), text_config(**_LLMS[arg.size]),
                      image_token_id=_IMAGE_TOKEN[arg.size], **common)
