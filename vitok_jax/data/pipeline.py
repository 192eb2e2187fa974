"""grain pipelines: source -> shuffle/repeat -> preprocess -> process shard -> batch -> prefetch.

Training reads one global stream: a shuffled, repeated order of the examples, each augmented with
randomness drawn from (seed, its position in the stream). Global batch k is stream positions
[k·B·P, (k+1)·B·P), and each process loads the positions of the rows of the global array it holds
(`rows`; by default process p of P the p-th block of B), so the global array's rows are in stream
order on any mesh. The stream, and where a run is in it, depend only on (seed, step), never on the
number of processes: a run resumes exactly from its step alone, also on another topology
(`start_batch`).
"""
from __future__ import annotations

from absl import flags
import grain
import numpy as np

from vitok_jax.data import config
from vitok_jax.data import sources
from vitok_jax.data import transforms
from vitok_jax.errors import ConfigError, DataError

# Reader threads per process build whole batches ahead of the train step; PIL and PyAV drop the
# GIL, so 2 threads give 1.4x on photo crops on 2 cores and cost nothing on in-memory MNIST.
# Scale further with data.worker_count (processes).
_READ_THREADS = 2
# Batches buffered ahead per process; each is a whole batch, so keep it small.
_PREFETCH_BATCHES = 4
# The one-pass (eval) order: a fixed permutation, the same for every run and seed, so a prefix of
# it (eval_examples, a store's max_examples) is a sample of the split, not its first classes (a
# folder is sorted by class).
_ONE_PASS_ORDER_SEED = 0


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def build_dataset(data_cfg, split: str = "train", *, batch_size: int, seed: int = 0,
                  process_index: int | None = None, process_count: int | None = None,
                  start_batch: int = 0, one_pass: bool = False, source=None,
                  rows=None) -> grain.IterDataset:
  """The grain IterDataset of per-process batches (see build_iterator)."""
  config.validate(data_cfg, split)
  if batch_size <= 0:
    raise ConfigError(f"batch_size={batch_size} must be positive (per-process batch)")
  process_index, process_count = _process(process_index, process_count)
  if not 0 <= process_index < process_count:
    raise ConfigError(
        f"process_index={process_index} must be in [0, process_count={process_count})")
  source = source if source is not None else sources.make_source(data_cfg, split)
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise DataError(f"data.name={data_cfg.name!r} split={split!r} has no examples; check "
                    f"data.path / the split's files")

  ds = grain.MapDataset.source(source)
  opt = transforms.Options.from_config(data_cfg)
  if split == "train" and not one_pass:
    shuffle_seed, augment_seed = np.random.SeedSequence([seed]).generate_state(2)
    if data_cfg.shuffle:
      ds = ds.shuffle(seed=int(shuffle_seed))  # Reseeded with seed + epoch for each epoch.
    ds = ds.repeat()
    # Augmentation before sharding: its randomness follows the global stream position.
    ds = ds.random_map(transforms.Augment(opt), seed=int(augment_seed))
    if rows is None:  # Block p of each global batch.
      rows = range(process_index * batch_size, (process_index + 1) * batch_size)
    if len(rows) != batch_size:
      raise ConfigError(f"rows: {len(rows)} rows of each global batch for a per-process batch "
                        f"of {batch_size}")
    ds = _GlobalBatchRows(ds, rows, batch_size * process_count)
    ds = ds.batch(batch_size, drop_remainder=True)[start_batch:]
  else:
    ds = ds.shuffle(seed=_ONE_PASS_ORDER_SEED)
    # grain's ShardOptions(drop_remainder=True) semantics (equal shards, so every process runs
    # the same number of eval steps), strided: process p reads positions p, p + P, ..., so the
    # first k examples of each shard are the first k·P of the order.
    n = len(ds) - len(ds) % process_count
    ds = ds[:n][process_index::process_count]
    if len(ds) == 0:  # pylint: disable=g-explicit-length-test
      raise DataError(f"data.name={data_cfg.name!r} split={split!r} has {len(source)} examples, "
                      f"too few for {process_count} processes; add data or use fewer processes")
    ds = ds.map(transforms.Prepare(opt)).batch(batch_size, drop_remainder=False)
  ds = ds.map(transforms.normalize)

  out = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                             prefetch_buffer_size=_PREFETCH_BATCHES))
  if data_cfg.worker_count:
    # grain's worker start-up reads an absl flag; outside absl.app (scripts, pytest, notebooks)
    # flags are unparsed and that read raises, so take the defaults as absl.app would.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
  return out


def build_iterator(data_cfg, split: str = "train", *, batch_size: int, seed: int = 0,
                   process_index: int | None = None, process_count: int | None = None,
                   start_batch: int = 0, one_pass: bool = False, source=None,
                   rows=None) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's batches.

  Yields {"image": float32 [B, H, W, C] (frames == 1) or [B, T, H, W, C] in [-1, 1],
  "label": int32 [B]}. B = batch_size per process. train: process p of P reads its `rows` of
  each global batch (by default block p); eval: every P-th example.
  train: endless, reshuffled each epoch, augmented per data.crop/flip, full batches only; starts
  at global batch `start_batch` (the train step to resume from) on any number of processes.
  eval: one pass in a fixed order (the same permutation of the split for every run and seed), no
  augmentation; the last batch is KEPT even if smaller than B (pad it if a jitted step needs a
  static batch). With P processes each reads ⌊N / P⌋ examples, so the last N mod P of the order
  are not read: on one process every held-out example is seen exactly once.
  one_pass: any split read the eval way (e.g. tokenizing the train split once for a generator).
  process_index/count default to jax.process_index()/process_count().
  source: `sources.make_source(data_cfg, split)` made beforehand (a trainer makes it before the
  model, so a missing or unreadable dataset stops the run first); made here when None.
  rows: train: the rows of each global batch (B·P) this process loads, ascending
  (`mesh.process_rows`); default block p, [p·B, (p+1)·B).
  """
  return iter(build_dataset(data_cfg, split, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            start_batch=start_batch, one_pass=one_pass, source=source,
                            rows=rows))


class _GlobalBatchRows(grain.MapDataset):
  """Of a stream of positions, rows `rows` of each global batch of `global_batch` positions:
  element i is position (i // R)·global_batch + rows[i mod R], R = len(rows)."""

  def __init__(self, parent: grain.MapDataset, rows, global_batch: int):
    super().__init__(parent)
    self._rows, self._global_batch = tuple(int(r) for r in rows), global_batch
    self._length = len(parent) // global_batch * len(self._rows)

  def __len__(self) -> int:
    return self._length

  def _position(self, index: int) -> int:
    batch, row = divmod(index, len(self._rows))
    return batch * self._global_batch + self._rows[row]

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._position(index)]

  def _getitems(self, indices):
    positions = [self._position(i) for i in indices]
    return self._parent._getitems(positions)  # pylint: disable=protected-access


def held_out_images(data_cfg, batch_size: int, limit: int = 0, split: str = "eval"):
  """Batches [b, H, W, C] (or [b, T, H, W, C]) in [-1, 1] of the eval split (or another `split`,
  read the eval way: no augmentation), all of it on this process in its fixed one-pass order, up
  to `limit` images (0: all)."""
  iterator = build_iterator(data_cfg, split=split, batch_size=batch_size, one_pass=True,
                            process_index=0, process_count=1)
  seen = 0
  try:
    for batch in iterator:
      images = batch["image"][:limit - seen] if limit else batch["image"]
      seen += len(images)
      yield images
      if limit and seen >= limit:
        break
  finally:  # Also when the caller stops early.
    iterator.close()


def num_examples(data_cfg, split: str = "train") -> int:
  """Examples in `split` (the whole split: training streams it to all processes in turn, and
  a one-pass read gives each of P processes ⌊num / P⌋ of them)."""
  config.validate(data_cfg, split)
  return sources.num_examples(data_cfg, split)
