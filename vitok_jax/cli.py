"""The `vitok` command: one entry point, one subcommand per job.

  vitok train --config vitok:"Mu-Mi/4,c=16,data=mnist" --workdir runs/mnist [--config.x.y=value ...]
  vitok eval  --workdir runs/mnist

--config takes NAME:VARIANT (a file in configs/) or PATH.py:VARIANT; --config.a.b=v overrides a field.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from vitok_jax import config_lib
from vitok_jax.errors import ConfigError, DataError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "NAME:VARIANT or PATH.py:VARIANT, e.g. vitok:'Mu-Mi/4,c=16,data=mnist'.",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, images, record.")

DEFAULT_CONFIG = "vitok"


def _cmd_train(workdir: str) -> int:
  """Train a tokenizer from --config into --workdir (resumes if the workdir has checkpoints)."""
  from vitok_jax.train import train_tokenizer
  config = _CONFIG.value
  record = train_tokenizer.train(config, workdir)
  print(json.dumps({k: record[k] for k in ("workdir", "metrics", "E", "params")}, indent=1))
  return 0


def _cmd_eval(workdir: str) -> int:
  """Evaluate the latest checkpoint of --workdir on its held-out split; updates record.json."""
  from vitok_jax.train import train_tokenizer
  config = _CONFIG.value  # None: use the config saved in the workdir.
  metrics = train_tokenizer.evaluate_workdir(workdir, config)
  print(json.dumps(metrics, indent=1))
  return 0


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval}


def _usage() -> str:
  lines = [__doc__.strip(), "", "Subcommands:"]
  lines += [f"  {name:8s}{fn.__doc__}" for name, fn in COMMANDS.items()]
  lines += ["", "`vitok SUBCOMMAND --help` lists the flags."]
  return "\n".join(lines)


def _resolve_config_arg(argv: list[str], default: str | None) -> list[str]:
  """Rewrites --config NAME:VARIANT to the config file's absolute path; adds `default` if absent."""
  out, found = [], False
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--config" and i + 1 < len(argv):
      arg, i = f"--config={argv[i + 1]}", i + 1
    if arg.startswith("--config="):
      arg, found = "--config=" + config_lib.resolve_config_path(arg.split("=", 1)[1]), True
    out.append(arg)
    i += 1
  if not found and default:  # Before any --config.x=y override, which needs it parsed first.
    out.insert(0, "--config=" + config_lib.resolve_config_path(default))
  return out


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    return 0
  command = argv[1]
  if command not in COMMANDS:
    print(f"vitok: unknown subcommand {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  rest = argv[2:]
  if "--help" in rest or "-h" in rest:
    print(f"vitok {command}: {COMMANDS[command].__doc__}\n")
    print(FLAGS.get_help())
    return 0
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    FLAGS([argv[0], *_resolve_config_arg(rest, DEFAULT_CONFIG if command == "train" else None)])
    workdir = FLAGS.workdir or os.path.join("runs", "default")
    return COMMANDS[command](workdir)
  except (ConfigError, DataError, flags.Error) as e:
    print(f"vitok {command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
