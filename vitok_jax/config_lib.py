"""Config plumbing shared by every config file: variant strings, loading by name, saving.

A config file in `configs/` defines `get_config(arg)`; `arg` is a big_vision-style variant string,
a model part then `key=value` options: "S-B/16,c=16,res=256,data=imagenet".
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import math
import os
import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags

from vitok_jax.errors import ConfigError

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def split_variant(arg: str) -> tuple[str, dict[str, str]]:
  """"S-B/16,c=16,res=256" -> ("S-B/16", {"c": "16", "res": "256"}); "" -> ("", {})."""
  head, *options = [part.strip() for part in (arg or "").split(",") if part.strip()] or [""]
  if "=" in head:  # Options only, no model part.
    options, head = [head, *options], ""
  parsed = {}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or not key:
      raise ConfigError(f"variant option {option!r} is not key=value (in {arg!r})")
    if key.strip() in parsed:
      raise ConfigError(f"variant option {key.strip()!r} is given twice in {arg!r}; keep one")
    parsed[key.strip()] = value.strip()
  return head, parsed


def with_options(variant: str, arg: str) -> str:
  """variant ("S-B/16,c=16,steps=500") with arg's options ("steps=50,lr=1e-3") replacing its own
  and the rest added after them; `variant` itself when arg is empty. For a sweep's base: its
  documented arg may set what the base already sets."""
  if not arg:
    return variant
  head, options = split_variant(variant)
  extra_head, extra = split_variant(arg)
  if extra_head:
    raise ConfigError(f"{arg!r} must be key=value options only (got the model part "
                      f"{extra_head!r})")
  options.update(extra)
  return ",".join([head] * bool(head) + [f"{k}={v}" for k, v in options.items()])


def apply_options(config: ml_collections.ConfigDict, options: dict[str, str],
                  aliases: dict[str, str], arg: str) -> None:
  """Sets config fields from variant options; `aliases` maps short keys to dotted config paths.

  Values are converted to the type of the field they replace.
  """
  for key, value in options.items():
    if key not in aliases:
      raise ConfigError(f"unknown variant option {key!r} in {arg!r}; use one of {sorted(aliases)}")
    *parents, leaf = aliases[key].split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = _convert(value, node[leaf], f"{key}={value}")


def _convert(value: str, like, where: str):
  try:
    if isinstance(like, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return value.lower() in ("true", "1")
    if isinstance(like, int):
      if "e" in value.lower():  # 1e3; not 2.9e0, which int() would truncate.
        number = float(value)
        if not number.is_integer():
          raise ValueError
        return int(number)
      return int(value)
    if isinstance(like, float):
      number = float(value)
      if not math.isfinite(number):
        raise ValueError
      return number
  except ValueError:
    kind = ("true or false" if isinstance(like, bool) else "a whole number"
            if isinstance(like, int) else "a finite number")
    raise ConfigError(f"{where}: expected {kind}") from None
  return value


def apply_overrides(spec: str, overrides) -> ml_collections.ConfigDict:
  """The config of `spec` with each "--config.a.b=value" of `overrides` set exactly as `vitok train`
  sets it: by ml_collections' config flags, the trainer's own parser (an int field takes int()'s
  text, a bool true/false/1/0, a tuple field a Python literal or one bare word as a 1-tuple).
  Raises ConfigError for an override not of that form, a field the config lacks (naming the
  fields beside it) or a value the trainer would refuse."""
  overrides = list(overrides)
  for override in overrides:
    flag, sep, _ = override.partition("=")
    if not flag.startswith("--config.") or not sep:
      raise ConfigError(f"override {override!r} must look like --config.a.b=value")
  if not overrides:
    return load_config(spec)
  argv = ["vitok", f"--config={resolve_config_path(spec)}", *overrides]
  flag_values = flags.FlagValues()  # The trainer's flag, defined apart from the process's flags.
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  try:
    flag_values(argv)
  except (flags.Error, AttributeError, KeyError) as e:  # The last two: a field the config lacks.
    config = load_config(spec)  # Such a field is named with the fields beside it.
    for override in overrides:
      flag = override.partition("=")[0]
      field_parent(config, flag[len("--config."):], flag)
    raise ConfigError(str(e)) from None
  return flag_values.config


def field_parent(config: ml_collections.ConfigDict, path: str, what: str):
  """(node, leaf) with node[leaf] the existing field at dotted `path` ("a.b") of config; else a
  ConfigError starting with `what` that names the missing field and the fields beside it."""
  keys = path.split(".")
  node = config
  for i, key in enumerate(keys):
    if not hasattr(node, "keys") or key not in node:
      where = ".".join(["config", *keys[:i]])
      fields = sorted(node.keys()) if hasattr(node, "keys") else []
      raise ConfigError(f"{what}: {where} has no field {key!r}"
                        + (f"; its fields are {fields}" if fields else ""))
    if i < len(keys) - 1:
      node = node[key]
  return node, keys[-1]


def resolve_config_path(spec: str) -> str:
  """"vitok:S-B/16" or "configs/vitok.py:S-B/16" -> "/abs/path/configs/vitok.py:S-B/16"."""
  path, sep, arg = spec.partition(":")
  if not path.endswith(".py"):
    path = str(CONFIGS_DIR / f"{path}.py")
  if not os.path.exists(path):
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
    raise ConfigError(f"config file {path} not found; pass a path to a .py config or one of {known}")
  return os.path.abspath(path) + sep + arg


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports the config file of `spec` ("name:arg" or "path.py:arg") and calls get_config(arg)."""
  module, arg = _config_module(spec)
  return module.get_config(arg) if arg else module.get_config()


def option_paths(spec: str) -> dict[str, str]:
  """The variant options of the config file of `spec` -> the config paths they set (its OPTIONS)."""
  return dict(getattr(_config_module(spec)[0], "OPTIONS", {}))


def _config_module(spec: str):
  path, _, arg = resolve_config_path(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def check_workdir(workdir: str, what: str = "workdir") -> None:
  """Raises ConfigError for a URL (gs://, s3://, ...): run files are written with the local file
  API, so on several hosts the directory must be one path they all see (NFS, Filestore, or a
  bucket mounted with gcsfuse)."""
  if "://" in workdir:
    raise ConfigError(
        f"{what}={workdir!r} is a URL; runs write through the local file system, so pass a "
        "directory every process sees (one host: a local disk; a pod or cluster: NFS, Filestore, "
        f"or the bucket mounted with gcsfuse, e.g. /gcs/{workdir.partition('://')[2]})")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
  """A file to write `path` through in one step (a tmp file of this process, renamed onto `path`
  when the block ends): a reader never sees it half-written, and two writers never share a tmp
  file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, mode) as f:
    yield f
  os.replace(tmp, path)


def write_json(path: str, value, *, indent: int | None = 1, sort_keys: bool = True) -> None:
  """Writes `value` as JSON to `path` in one step (`atomic_write`)."""
  with atomic_write(path) as f:
    json.dump(value, f, indent=indent, sort_keys=sort_keys, default=str)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config as workdir/config.json; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  write_json(path, config.to_dict(), indent=2)
  return path


# The configs' optional fields (placeholders: None until set) and their types. config.json stores
# an unset one as null, a field of no type that a --config.<path>=value override cannot reach
# (absl: "Unknown command line flag"), so read_config restores the typed placeholder.
# Fields added to the configs after runs were saved without them, with the value such a run
# trained with (read through `added_field`, or with these as the default where only a section of
# the config is at hand): resuming one with a config that holds another value changes how it
# trains (`train.loop.config_changes`).
ADDED_FIELDS = {"model.dropout": 0.0, "model.drop_path": 0.0, "objective.reweight_by_scale": False,
                "loss.bsq_commit": 0.25, "model.prior_size": "Mu", "model.prior_dropout": 0.0,
                "optim.prior_lr_mult": 1.0, "data.folder_split": "position",
                "objective.shortcut_input": "d"}


def added_field(config: ml_collections.ConfigDict, key: str):
  """config's value of `key`, one of `ADDED_FIELDS`; for a run saved before the field existed,
  the value it trained with."""
  section, name = key.split(".")
  return config[section].get(name, ADDED_FIELDS[key])


OPTIONAL_FIELDS = {"model.drop_path": float, "optim.warmup_steps": int}
# Eval fields added after runs were saved without them, by run kind, with the value such a run
# behaves as: `read_config` fills them in, so --config.eval.x=v reaches an older run too.
ADDED_EVAL_FIELDS = {"generator": {"gfid_reference": ""}}


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its work directory (tuples come back as tuples; unset
  `OPTIONAL_FIELDS` as their typed placeholders; missing `ADDED_EVAL_FIELDS` filled in)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: {workdir} is not a run directory (no config.json)")
  with open(path) as f:
    raw = _lists_to_tuples(json.load(f))
  for key, kind in OPTIONAL_FIELDS.items():
    section, name = key.split(".")
    if isinstance(raw.get(section), dict) and name in raw[section] and raw[section][name] is None:
      raw[section][name] = ml_collections.config_dict.placeholder(kind)
  if isinstance(raw.get("eval"), dict):
    for name, value in ADDED_EVAL_FIELDS.get(raw.get("kind", "tokenizer"), {}).items():
      raw["eval"].setdefault(name, value)
  return ml_collections.ConfigDict(raw)


def require_kind(config: ml_collections.ConfigDict, workdir: str, kind: str) -> None:
  """ConfigError unless the run in `workdir` (its `config`) is a `kind` run: "tokenizer" or
  "generator"."""
  actual = config.get("kind", "tokenizer")
  if actual != kind:
    raise ConfigError(f"{workdir} is a {actual} run, not a {kind} run; point this at the workdir "
                      f"of a {kind} (one `vitok train --config "
                      f"{'vitok' if kind == 'tokenizer' else 'generator'}:...` wrote)")


def _lists_to_tuples(node):
  if isinstance(node, dict):
    return {k: _lists_to_tuples(v) for k, v in node.items()}
  return tuple(node) if isinstance(node, list) else node


def require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def require_choice(value, field: str, allowed) -> None:
  require(value in allowed, f"{field}={value!r} is not allowed; use one of {list(allowed)}")


# The embedded default's tokenizer for generators: the c=4 run of `vitok sweep quickstart`.
QUICKSTART_TOKENIZER = "runs/quickstart/runs/c4-*"


def quickstart_tokenizer() -> str:
  """The workdir of the quickstart sweep's c=4 tokenizer (relative to the current directory): a
  finished one (with record.json), the newest if several (run ids change with config defaults)."""
  found = [path for path in glob.glob(QUICKSTART_TOKENIZER)
           if os.path.exists(os.path.join(path, "record.json"))]
  if not found:
    raise ConfigError(f"no tokenizer given and no finished quickstart tokenizer at "
                      f"{QUICKSTART_TOKENIZER}: run `vitok sweep quickstart` first, or pass a "
                      f"trained tokenizer's workdir (`--config generator:...,tokenizer=WORKDIR`; "
                      f"`vitok sweep generator_size:WORKDIR`)")
  return max(found, key=lambda path: os.path.getmtime(os.path.join(path, "record.json")))
