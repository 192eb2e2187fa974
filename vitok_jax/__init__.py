"""vitok_jax: scaling studies of visual tokenizers and the generators trained on them."""
from vitok_jax.errors import ConfigError, DataError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError"]
