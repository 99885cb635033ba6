"""Ray for work beyond one process: joining (or starting) a Ray instance, and corpus encoding on it.

Why: a corpus of millions is encoded faster by one model replica per device across a cluster than
by one process. Here the corpus is cut into shards, each shard is encoded by one actor per device
(a GPU each on GPU nodes, else `cpus_per_actor` CPU threads each), and the driver writes every
shard into the ordinary embedding cache as it arrives (`EmbeddingCache.writer`, memory-mapped,
published only when complete). The cache key is the one a local `SteerEncoder` computes for the
same texts, so a corpus encoded on a cluster is read back by a local evaluation without encoding.
Only the driver writes, so cluster nodes need no shared file system. Shards finish in any order;
the driver commits the longest finished prefix to the cache's progress record, so a driver killed
mid-way is resumed by the next run from that prefix (the resumable writer of `embedding_cache`);
an actor that dies has its shard retried by Ray on a restarted actor.

`ray` is an optional extra (`pip install -e ".[ray]"`); this module imports it only when called.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mteb_steer.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)

SHARD_ROWS = 4_096  # texts per actor call: small enough to rebalance, large enough to keep a device busy


def require_ray() -> Any:
    """The `ray` module, or an ImportError naming the extra that installs it."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("--engine ray needs Ray: pip install 'mteb-steer[ray]' (or 'ray[data]')") from err
    return ray


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Join the Ray cluster at `address`, or start a local instance (`num_cpus`, default all cores) for the block.

    An instance this process already joined is reused and left running; one started here is shut
    down on exit.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


class ShardEncoder:
    """A Ray actor body: one `SteerEncoder` (no cache) that embeds shards of passages as documents."""

    def __init__(self, options: dict[str, Any], threads: int | None) -> None:
        import torch

        from mteb_steer.encoder import SteerEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = SteerEncoder(**options, cache_dir=None)

    def dimension(self) -> int:
        return self.encoder.dimension()

    def encode(self, start: int, texts: list[str], batch_size: int) -> tuple[int, np.ndarray]:
        from mteb.types import PromptType

        # upcast=False: the vectors come back in the storage dtype, as the cache keeps them
        return start, self.encoder.embed(texts, PromptType.document, batch_size=batch_size, upcast=False)


def encode_on_ray(texts: list[str], options: dict[str, Any], cache: EmbeddingCache, key: str, storage: str, *,
                  actors: int | None = None, cpus_per_actor: int = 1, batch_size: int = 32,
                  shard_rows: int = SHARD_ROWS, show_progress: bool = True) -> np.ndarray:
    """Embed `texts` as documents on the joined Ray instance into `cache` under `key`; the memory-mapped result.

    `options` are `SteerEncoder` keyword arguments (model, device, backend, dtype, storage) and
    `key` must be the key `SteerEncoder.cache_key` gives for them. With GPUs in the cluster one
    actor per GPU is started; else `actors` (default: the cluster's CPUs // `cpus_per_actor`)
    CPU actors. At most one shard per actor waits in flight beyond the running ones, so the driver
    never holds the whole matrix. An entry already cached is returned without any work.
    """
    cached = cache.get(key, rows=len(texts))
    if cached is not None:
        return cached
    ray = require_ray()
    from ray.util import ActorPool

    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = actors or gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_actor)
    remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else cpus_per_actor,
                        max_restarts=2, max_task_retries=2)(ShardEncoder)
    workers = [remote.remote(options, None if gpus else cpus_per_actor) for _ in range(count)]
    pool = ActorPool(workers)
    with cache.writer(key, len(texts), ray.get(workers[0].dimension.remote()), storage) as entry, \
            tqdm(total=len(texts), initial=entry.done, desc=f"encoding on Ray ({count} actor(s))", unit="text",
                 disable=not show_progress) as bar:
        # the pool submits lazily: a shard's texts are sliced and shipped only when an actor is free
        results = pool.map_unordered(lambda actor, s: actor.encode.remote(s, texts[s:s + shard_rows], batch_size),
                                     range(entry.done, len(texts), shard_rows))
        finished: dict[int, int] = {}  # shard start -> end, for shards beyond the committed prefix
        prefix = entry.done
        for start, block in results:
            entry.array[start:start + len(block)] = block
            finished[start] = start + len(block)
            while prefix in finished:
                prefix = finished.pop(prefix)
            entry.commit(prefix)
            bar.update(len(block))
    stored = cache.written(key, len(texts))
    logger.info("encoded %d texts on %d Ray actor(s) into %s", len(texts), count, cache.folder / f"{key}.npy")
    return stored

