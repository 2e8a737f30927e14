"""Reading a stage whose shards are on an object store: each shard is copied whole into a bounded local cache when
first needed, the next few ahead of need in a background thread, and the least recently used evicted once the cache
holds more than its budget.

The stage manifest lists every shard and its number of sequences, so the global order (and with it batches, ranks,
epochs and resuming: stage_loader.py) is known before any shard is read; `RemoteIndex` turns a range of global
sequence numbers into members of cached shards, fetching what it lacks. One process downloads a shard while the
others (DataLoader workers, ranks on the node) wait on its lock file, then use the copy. A shard evicted while another
process still reads it stays readable to that process (Linux keeps an open file's data until it is closed).
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from model.files import storage

log = logging.getLogger(__name__)


class ShardCache:
    """Local copies of the shards of one stage folder on a store, in `folder`, at most `max_bytes` of them (plus the
    shards in use); `read_ahead` shards past the one in use are fetched in the background.

    Two lock files per shard coordinate the processes of a node: `.NAME.fetch` (exclusive) while one downloads it,
    `.NAME.use` (shared) while a process reads it; eviction deletes only shards nobody holds in use."""

    def __init__(self, stage_url: str, folder: Path, max_bytes: int, read_ahead: int = 2):
        self.stage_url, self.folder, self.max_bytes, self.read_ahead = stage_url, Path(folder), max_bytes, read_ahead
        self.folder.mkdir(parents=True, exist_ok=True)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: dict[str, Any] = {}
        self._held: dict[str, Any] = {}  # shard name -> its `.use` lock file, held shared
        self.fetched: list[str] = []  # shards this process downloaded, in order (for tests and logs)

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker starts with no thread, lock or history of its own
        return {**self.__dict__, "_executor": None, "_pending": {}, "_held": {}, "fetched": []}

    def path(self, name: str) -> Path:
        return self.folder / name

    def _lock_file(self, name: str, kind: str) -> Any:
        return open(self.folder / f".{name}.{kind}", "a")

    def _fetch(self, name: str) -> None:
        """Download shard `name` unless it is here (one process at a time per shard)."""
        with self._lock_file(name, "fetch") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path(name).is_file():  # another process fetched it while we waited
                return
            started = time.perf_counter()
            storage.download(storage.join(self.stage_url, name), self.path(name))
            self.fetched.append(name)
            took = time.perf_counter() - started
            log.info("fetched %s (%d bytes) in %.2f s", name, self.path(name).stat().st_size, took)

    def acquire(self, name: str, keep: tuple[str, ...] = ()) -> Path:
        """The local copy of shard `name` (a file name in the stage folder), fetched now if it is not cached, and held
        in use (not evicted) until `release(name)`."""
        if name not in self._held:
            lock = self._lock_file(name, "use")
            fcntl.flock(lock, fcntl.LOCK_SH)
            self._held[name] = lock
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending.result()  # a read-ahead of it is under way: wait for it (its error, if any, raises here)
        if not self.path(name).is_file():
            self._fetch(name)
            self.evict(keep=(name, *keep))
        os.utime(self.path(name))  # the eviction order is the order of last use
        return self.path(name)

    def release(self, name: str) -> None:
        """No longer in use by this process (it may be evicted)."""
        lock = self._held.pop(name, None)
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    def held(self) -> set[str]:
        return set(self._held)

    def prefetch(self, names: list[str]) -> None:
        """Fetch `names` in the background (those not cached or under way)."""
        for name in names:
            if name in self._pending or self.path(name).is_file():
                continue
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read-ahead")
            self._pending[name] = self._executor.submit(self._fetch_ahead, name, tuple(names))

    def _fetch_ahead(self, name: str, keep: tuple[str, ...]) -> None:
        self._fetch(name)
        self.evict(keep=keep)

    def _cached(self) -> list[tuple[Path, int, float]]:
        """(path, size, last use) of the shards here now; one another process deletes meanwhile is left out."""
        found = []
        for path in self.folder.glob("*.tar"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((path, stat.st_size, stat.st_mtime))
        return found

    def cached_bytes(self) -> int:
        return sum(size for _, size, _ in self._cached())

    def evict(self, keep: tuple[str, ...] = ()) -> None:
        """Delete the least recently used shards until the cache is within its budget: never those in `keep`, those
        this process holds, nor those another process holds in use."""
        shards = sorted(self._cached(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in shards)
        for shard, size, _ in shards:
            if total <= self.max_bytes:
                break
            if shard.name in keep or shard.name in self._held:
                continue
            with self._lock_file(shard.name, "use") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another process reads it
                total -= size
                shard.unlink(missing_ok=True)
                fcntl.flock(lock, fcntl.LOCK_UN)


class RemoteIndex:
    """The members of a stage's sequences, in the stage's order, over shards fetched through a ShardCache: supports
    len() and slicing as the list of members of a local stage does (stage_loader.StageDataset)."""

    def __init__(self, shards: list[tuple[str, int]], cache: ShardCache):
        from model.training.stage_loader import index_shard

        self._index_shard = index_shard
        self.names = [name for name, _ in shards]
        self.counts = [count for _, count in shards]
        self.ends = [sum(self.counts[: i + 1]) for i in range(len(shards))]
        self.cache = cache
        self._members: dict[int, list[Any]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_members": {}, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def _shard_members(self, shard: int) -> list[Any]:
        with self._lock:
            if shard not in self._members:
                ahead = self.names[shard + 1 : shard + 1 + self.cache.read_ahead]
                path = self.cache.acquire(self.names[shard], keep=tuple(ahead))
                self._members[shard] = self._index_shard(path, self.counts[shard])
                self.cache.prefetch(ahead)
            return self._members[shard]

    def __getitem__(self, key: slice) -> list[Any]:
        """Members of sequences `key` (a slice); the shards they are in stay in use until a later slice moves past
        them (their members are read right after slicing)."""
        if not isinstance(key, slice):
            raise TypeError("RemoteIndex supports slices only")
        start, stop, step = key.indices(len(self))
        members, touched = [], set()
        for i in range(start, stop, step):
            shard = bisect.bisect_right(self.ends, i)
            touched.add(shard)
            first = self.ends[shard] - self.counts[shard]
            members.append(self._shard_members(shard)[i - first])
        for old in set(self._members) - touched:  # shards behind this slice: no longer in use here
            self.cache.release(self.names[old])
            del self._members[old]
        return members
