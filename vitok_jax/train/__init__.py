"""Trainers of tokenizers and generators, their losses, optimizer, checkpoints and metric files."""


def validate(config, new_run: bool = False) -> None:
  """Raises ConfigError naming the first invalid field of a run config, a tokenizer's or (kind
  "generator") a generator's: the checks `vitok train` makes before it builds anything (new_run:
  also those of a run not started yet)."""
  if config.get("kind") == "generator":
    from vitok_jax.train import train_generator as trainer  # pylint: disable=g-import-not-at-top
  else:
    from vitok_jax.train import train_tokenizer as trainer  # pylint: disable=g-import-not-at-top
  trainer.validate(config, new_run=new_run)
