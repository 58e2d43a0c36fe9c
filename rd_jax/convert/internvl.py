"""Hugging Face InternVL checkpoint -> rd_jax InternVL params (Orbax).

    python -m rd_jax.convert.internvl --hf_dir=/ckpt/InternVL2_5-1B-hf \
        --out_dir=/ckpt/rd_internvl_1b [--param_dtype=bfloat16]

The input is a directory in the format `transformers` loads with
`InternVLForConditionalGeneration` (the "-hf" checkpoints): `config.json`
plus `model.safetensors` or sharded `model-XXXXX-of-YYYYY.safetensors` with
`model.safetensors.index.json`. Tensors are read straight from the
safetensors files (memory-mapped; no torch, no pickle, no remote code). The
output directory holds `params/` (Orbax, a pure dict of arrays) and
`config.json` (the rd_jax model config). `load(path)` reads either kind of
directory back into `(cfg, params)` for `rd_jax.models.internvl.forward`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
from typing import Callable

import jax
import ml_dtypes
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from rd_jax.models import internvl

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ------------------------------ safetensors ---------------------------------

def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """Memory-mapped arrays of one .safetensors file (header + raw buffer)."""
  with open(path, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name, info in header.items():
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype "
                       f"{info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(
        info["shape"])
  return out


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a single-file or index-sharded safetensors checkpoint."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(
        f"no .safetensors files in {hf_dir}; convert .bin checkpoints to "
        "safetensors first (rd_jax never unpickles weights)")
  tensors = {}
  for name in files:
    tensors.update(_read_safetensors_file(os.path.join(hf_dir, name)))
  return tensors


def canonical_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps both HF layouts (saved `language_model.model.*` and in-memory
  `model.language_model.*`) to `vision_tower.*`, `multi_modal_projector.*`,
  `language_model.*`, `lm_head.*`."""
  out = {}
  for name, value in tensors.items():
    new = re.sub(r"^model\.", "", name)
    new = re.sub(r"^language_model\.model\.", "language_model.", new)
    new = re.sub(r"^language_model\.lm_head\.", "lm_head.", new)
    out[new] = value
  return out


# ------------------------------- config -------------------------------------

def _pair(x) -> int:
  if isinstance(x, (list, tuple)):
    if x[0] != x[1]:
      raise ValueError(f"non-square image/patch size {x} is not supported")
    return int(x[0])
  return int(x)


def _require(cond: bool, msg: str):
  if not cond:
    raise ValueError(f"unsupported InternVL config: {msg}")


def config_from_hf(hf: dict, *, dtype: str = "float32",
                   param_dtype: str = "float32",
                   remat: str = "none") -> ml_collections.ConfigDict:
  """rd_jax model config from an HF InternVL `config.json` dict."""
  _require(hf.get("model_type") == "internvl",
           f"model_type {hf.get('model_type')!r}, expected 'internvl'")
  v, t = hf["vision_config"], hf["text_config"]
  _require(v.get("hidden_act", "gelu") == "gelu", "vision hidden_act != gelu")
  _require(v.get("use_absolute_position_embeddings", True),
           "vision tower without absolute position embeddings")
  _require(hf.get("projector_hidden_act", "gelu") == "gelu",
           "projector_hidden_act != gelu")
  _require(isinstance(hf.get("vision_feature_layer", -1), int),
           "vision_feature_layer must be one layer index")
  _require(t.get("hidden_act", "silu") == "silu", "text hidden_act != silu")
  _require(not t.get("use_sliding_window", False), "sliding-window attention")
  kind = t.get("model_type")
  _require(kind in ("qwen2", "llama"),
           f"text model_type {kind!r}; supported: qwen2, llama (InternLM2 "
           "checkpoints appear as llama in the HF format)")
  if kind == "qwen2":
    qkv_bias, o_bias, mlp_bias = True, False, False
  else:
    qkv_bias = o_bias = bool(t.get("attention_bias", False))
    mlp_bias = bool(t.get("mlp_bias", False))
  rope = dict(t.get("rope_scaling") or {})
  rope.update(t.get("rope_parameters") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  _require(rope_type in ("default", "linear", "dynamic"),
           f"rope_type {rope_type!r}")
  _require(rope.get("partial_rotary_factor", 1.0) == 1.0,
           "partial rotary embeddings")
  heads = t["num_attention_heads"]
  # As transformers: the top-level flag decides (default True); the text
  # config's own flag is ignored. params_from_hf refuses to drop a distinct
  # lm_head.weight because of it.
  tie = hf.get("tie_word_embeddings", True)
  vision = internvl.vision_config(
      hidden_size=v["hidden_size"], num_layers=v["num_hidden_layers"],
      num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
      norm_type=v.get("norm_type", "layer_norm"),
      norm_eps=v.get("layer_norm_eps", 1e-6),
      qk_norm=bool(v.get("use_qk_norm", False)),
      qkv_bias=bool(v.get("attention_bias", False)),
      image_size=_pair(v.get("image_size", 448)),
      patch_size=_pair(v.get("patch_size", 14)),
      num_channels=v.get("num_channels", 3),
      use_mean_pooling=bool(v.get("use_mean_pooling", True)),
      layer_scale_init=v.get("layer_scale_init_value", 0.1))
  text = internvl.text_config(
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
      num_layers=t["num_hidden_layers"], num_heads=heads,
      num_kv_heads=t.get("num_key_value_heads") or heads,
      head_dim=t.get("head_dim") or t["hidden_size"] // heads,
      mlp_dim=t["intermediate_size"], norm_eps=t.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
      rope_type=rope_type, rope_factor=float(rope.get("factor", 1.0)),
      max_position_embeddings=rope.get("original_max_position_embeddings",
                                       t.get("max_position_embeddings",
                                             32768)),
      qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias,
      tie_embeddings=bool(tie))
  return internvl.model_config(
      vision, text, downsample_ratio=hf.get("downsample_ratio", 0.5),
      image_token_id=hf.get("image_token_id", 151667),
      vision_feature_layer=hf.get("vision_feature_layer", -1),
      vision_feature_select_strategy=hf.get("vision_feature_select_strategy",
                                            "default"),
      dtype=dtype, param_dtype=param_dtype, remat=remat)


# ------------------------------ weights -------------------------------------

def _copy(shape):
  return tuple(shape), lambda x: x


def _transpose(shape):
  return tuple(shape[::-1]), lambda x: x.T


def _reshape(hf_shape):
  def make(shape):
    return tuple(hf_shape), lambda x: x.reshape(shape)
  return make


def _in_heads(shape):
  """[D, N, H] from a torch Linear weight [N*H, D]."""
  d, n, h = shape
  return (n * h, d), lambda x: x.reshape(n, h, d).transpose(2, 0, 1)


def _out_heads(shape):
  """[N, H, D] from a torch Linear weight [D, N*H]."""
  n, h, d = shape
  return (d, n * h), lambda x: x.reshape(d, n, h).transpose(1, 2, 0)


def _flat(shape):
  return (int(np.prod(shape)),), lambda x: x.reshape(shape)


def _conv(shape):
  """[C, P, P, D] from a torch Conv2d weight [D, C, P, P]."""
  c, p, q, d = shape
  return (d, c, p, q), lambda x: x.transpose(1, 2, 3, 0)


def _weight_map(cfg) -> dict[str, tuple[str, Callable]]:
  """rd_jax param path -> (HF name; `{i}` = layer index, shape rule)."""
  d = cfg.vision.hidden_size
  m = {
      "vision/patch_kernel": ("vision_tower.embeddings.patch_embeddings."
                              "projection.weight", _conv),
      "vision/patch_bias": ("vision_tower.embeddings.patch_embeddings."
                            "projection.bias", _copy),
      "vision/cls": ("vision_tower.embeddings.cls_token",
                     _reshape((1, 1, d))),
      "vision/pos": ("vision_tower.embeddings.position_embeddings",
                     lambda s: ((1,) + tuple(s), lambda x: x.reshape(s))),
      "vision/final_norm/scale": ("vision_tower.layernorm.weight", _copy),
      "vision/final_norm/bias": ("vision_tower.layernorm.bias", _copy),
      "projector/norm_scale": ("multi_modal_projector.layer_norm.weight",
                               _copy),
      "projector/norm_bias": ("multi_modal_projector.layer_norm.bias", _copy),
      "projector/fc1": ("multi_modal_projector.linear_1.weight", _transpose),
      "projector/fc1_bias": ("multi_modal_projector.linear_1.bias", _copy),
      "projector/fc2": ("multi_modal_projector.linear_2.weight", _transpose),
      "projector/fc2_bias": ("multi_modal_projector.linear_2.bias", _copy),
      "language_model/embed": ("language_model.embed_tokens.weight", _copy),
      "language_model/final_norm": ("language_model.norm.weight", _copy),
      "language_model/lm_head": ("lm_head.weight", _transpose),
  }
  vl = "vision_tower.encoder.layer.{i}."
  for ours, theirs, rule in [
      ("norm1/scale", "layernorm_before.weight", _copy),
      ("norm1/bias", "layernorm_before.bias", _copy),
      ("norm2/scale", "layernorm_after.weight", _copy),
      ("norm2/bias", "layernorm_after.bias", _copy),
      ("q", "attention.q_proj.weight", _in_heads),
      ("k", "attention.k_proj.weight", _in_heads),
      ("v", "attention.v_proj.weight", _in_heads),
      ("q_bias", "attention.q_proj.bias", _flat),
      ("k_bias", "attention.k_proj.bias", _flat),
      ("v_bias", "attention.v_proj.bias", _flat),
      ("q_norm/scale", "attention.q_norm.weight", _flat),
      ("k_norm/scale", "attention.k_norm.weight", _flat),
      ("o", "attention.projection_layer.weight", _out_heads),
      ("o_bias", "attention.projection_layer.bias", _copy),
      ("scale1", "lambda_1", _copy), ("scale2", "lambda_2", _copy),
      ("fc1", "mlp.fc1.weight", _transpose),
      ("fc1_bias", "mlp.fc1.bias", _copy),
      ("fc2", "mlp.fc2.weight", _transpose),
      ("fc2_bias", "mlp.fc2.bias", _copy),
  ]:
    m["vision/layers/" + ours] = (vl + theirs, rule)
  tl = "language_model.layers.{i}."
  for ours, theirs, rule in [
      ("attn_norm", "input_layernorm.weight", _copy),
      ("mlp_norm", "post_attention_layernorm.weight", _copy),
      ("attn/q", "self_attn.q_proj.weight", _in_heads),
      ("attn/k", "self_attn.k_proj.weight", _in_heads),
      ("attn/v", "self_attn.v_proj.weight", _in_heads),
      ("attn/q_bias", "self_attn.q_proj.bias", _flat),
      ("attn/k_bias", "self_attn.k_proj.bias", _flat),
      ("attn/v_bias", "self_attn.v_proj.bias", _flat),
      ("attn/o", "self_attn.o_proj.weight", _out_heads),
      ("attn/o_bias", "self_attn.o_proj.bias", _copy),
      ("mlp/gate", "mlp.gate_proj.weight", _transpose),
      ("mlp/up", "mlp.up_proj.weight", _transpose),
      ("mlp/down", "mlp.down_proj.weight", _transpose),
      ("mlp/gate_bias", "mlp.gate_proj.bias", _copy),
      ("mlp/up_bias", "mlp.up_proj.bias", _copy),
      ("mlp/down_bias", "mlp.down_proj.bias", _copy),
  ]:
    m["language_model/layers/" + ours] = (tl + theirs, rule)
  return m


def _fetch(tensors, name: str, shape, rule, dtype) -> np.ndarray:
  if name not in tensors:
    raise ValueError(
        f"checkpoint has no tensor {name!r} (expected shape "
        f"{rule(shape)[0]}); the checkpoint does not match its config")
  hf_shape, fn = rule(shape)
  found = tuple(tensors[name].shape)
  if found != hf_shape:
    raise ValueError(
        f"tensor {name!r}: expected shape {hf_shape} from the config, found "
        f"{found}; the checkpoint does not match its config")
  return np.asarray(fn(tensors[name])).astype(dtype)


def params_from_hf(cfg, tensors: dict[str, np.ndarray]) -> nnx.State:
  """Params for `cfg` from HF tensors (names as in the checkpoint)."""
  tensors = canonical_names(tensors)
  abstract = internvl.abstract_params(cfg)
  wmap = _weight_map(cfg)
  used: set[str] = set()
  dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))

  def fill(path, leaf):
    key = "/".join(str(p.key) for p in path)
    if key not in wmap:
      raise KeyError(f"no HF mapping for rd_jax param {key}")
    name, rule = wmap[key]
    if "{i}" not in name:
      used.add(name)
      return jax.numpy.asarray(_fetch(tensors, name, leaf.shape, rule, dtype))
    names = [name.format(i=i) for i in range(leaf.shape[0])]
    used.update(names)
    return jax.numpy.asarray(np.stack(
        [_fetch(tensors, n, leaf.shape[1:], rule, dtype) for n in names]))

  pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract))
  if cfg.text.tie_embeddings and "lm_head.weight" in tensors and not (
      np.array_equal(tensors["lm_head.weight"],
                     tensors["language_model.embed_tokens.weight"])):
    raise ValueError(
        "config.json ties the LM head to the embeddings (top-level "
        "tie_word_embeddings is true or absent) but the checkpoint has a "
        "different lm_head.weight; set \"tie_word_embeddings\": false at the "
        "top level of config.json if the head is separate")
  unused = sorted(set(tensors) - used - {"lm_head.weight",
                                         "vision_tower.embeddings.mask_token"})
  if unused:
    raise ValueError(
        f"{len(unused)} checkpoint tensors are not used by the config, e.g. "
        f"{unused[:5]}; the checkpoint does not match its config.json")
  nnx.replace_by_pure_dict(abstract, pure)
  return abstract


# ----------------------------- save / load ----------------------------------

def save(out_dir: str, cfg, params: nnx.State) -> None:
  """Orbax params at out_dir/params plus out_dir/config.json.

  An existing checkpoint there is replaced only once the new one is fully
  written, so a failed conversion never destroys a good one.
  """
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  target = os.path.join(out_dir, "params")
  fresh, old = target + ".new", target + ".old"
  for leftover in (fresh, old):
    if os.path.exists(leftover):
      shutil.rmtree(leftover)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(fresh, nnx.to_pure_dict(params))
  if os.path.exists(target):
    os.replace(target, old)
  os.replace(fresh, target)
  if os.path.exists(old):
    shutil.rmtree(old)
  tmp = os.path.join(out_dir, "config.json.tmp")
  with open(tmp, "w") as f:
    f.write(cfg.to_json(indent=2, sort_keys=True))
  os.replace(tmp, os.path.join(out_dir, "config.json"))


def load(path: str, *, dtype: str | None = None,
         param_dtype: str | None = None, remat: str | None = None
         ) -> tuple[ml_collections.ConfigDict, nnx.State]:
  """(cfg, params) from a converted rd_jax dir or an HF InternVL dir.

  dtype / param_dtype / remat override the stored config (param_dtype also
  casts the weights).
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: give a directory made by "
                            "`python -m rd_jax.convert.internvl` or an HF "
                            "InternVL checkpoint directory")
  with open(cfg_path) as f:
    raw = json.load(f)
  overrides = {k: v for k, v in dict(dtype=dtype, param_dtype=param_dtype,
                                     remat=remat).items() if v is not None}
  if raw.get("model_type") == "internvl":
    cfg = config_from_hf(raw, **overrides)
    return cfg, params_from_hf(cfg, read_safetensors(path))
  cfg = ml_collections.ConfigDict(raw)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(internvl.abstract_params(cfg)))
  with ocp.StandardCheckpointer() as ckpt:
    pure = ckpt.restore(os.path.join(os.path.abspath(path), "params"), target)
  cfg.update(overrides)
  params = internvl.abstract_params(cfg)
  nnx.replace_by_pure_dict(params, jax.tree.map(
      lambda x: x.astype(cfg.param_dtype), pure))
  return cfg, params


def convert(hf_dir: str, out_dir: str, *, param_dtype: str = "float32"
            ) -> ml_collections.ConfigDict:
  """HF dir -> out_dir (Orbax params + config.json); returns the config."""
  cfg, params = load(hf_dir, param_dtype=param_dtype)
  save(out_dir, cfg, params)
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--hf_dir", required=True,
                      help="HF InternVL (-hf format) checkpoint directory")
  parser.add_argument("--out_dir", required=True, help="output directory")
  parser.add_argument("--param_dtype", default="float32",
                      choices=["float32", "bfloat16"])
  args = parser.parse_args(argv)
  cfg = convert(args.hf_dir, args.out_dir, param_dtype=args.param_dtype)
  print(f"wrote {args.out_dir}: {internvl.param_count(cfg):,} params")


if __name__ == "__main__":
  main()
