"""User-facing errors: raised early, each says what to change."""


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and the allowed values."""


class DataError(RuntimeError):
  """Data is missing, empty or unreadable; the message names the path and what to do."""


class TrainingDiverged(FloatingPointError):
  """The loss or the parameters became NaN/Inf; the message names the step, the last checkpoint
  and what to change."""
