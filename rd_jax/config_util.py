"""Config helpers: the `get_config(arg)` convention of rd_jax config files.

A config file is `configs/NAME.py` with `get_config(arg=None)`; `arg` is the
text after the colon in `--config=configs/NAME.py:arg`, a `key=value,...`
string. `parse_arg` turns it into a typed ConfigDict using the defaults given:

    def get_config(arg=None):
      arg = parse_arg(arg, size="s", smoke=False)
      ...

A bare word `smoke` means `smoke=True`. Unknown keys fail with the closest
known key suggested.
"""
from __future__ import annotations

import difflib
import json
from typing import Any

import ml_collections


def _convert(value: str, default):
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes", ""):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if default is None:
    return value
  return type(default)(value)


def differences(a, b, skip=()) -> list[tuple[str, Any, Any]]:
  """(key, a's value, b's value) for each dotted leaf key (`x.y.z`, as in
  --config.x.y.z) on which two configs -- ConfigDicts or dicts -- differ,
  compared as config.json holds them (tuples as lists); keys in `skip`
  are ignored."""
  def flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
      return {prefix[:-1]: node}
    out = {}
    for k, v in node.items():
      out.update(flat(v, f"{prefix}{k}."))
    return out
  fa, fb = (flat(json.loads(json.dumps(
      c.to_dict() if isinstance(c, ml_collections.ConfigDict) else c)))
            for c in (a, b))
  return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
          if k not in skip and fa.get(k) != fb.get(k)]


def suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f"; did you mean {close[0]!r}?" if close else ""


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,...` (bare `key` = True) against typed defaults."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise KeyError(f"unknown config argument {key!r}{suggest(key, defaults)}"
                     f" (known: {', '.join(sorted(defaults))})")
    out[key] = _convert(value.strip() if "=" in item else "true",
                        defaults[key])
  return ml_collections.ConfigDict(out)


def require_workdirs(config: ml_collections.ConfigDict,
                     keys: dict[str, str]) -> None:
  """Fails naming the first empty key of {dotted key: job}, e.g.
  {"generator": "train_generator"} -> 'set --config.generator (a
  train_generator workdir)'."""
  for key, job in keys.items():
    node = config
    for k in key.split("."):
      node = node[k]
    if not node:
      raise ValueError(f"set --config.{key} (a {job} workdir)")
