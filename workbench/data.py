"""Streaming data loaders over prepared MDS shards.

Each sample carries its index in the dataset, so estimators that need per-sequence noise (the fixed
validation NELBO) are independent of batch size and order. Loaders own a torch.Generator: creating an
iterator then never draws from the global RNG, which would otherwise make a run resumed mid-epoch diverge.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from composer.core import DataSpec
from composer.utils import dist
from streaming import StreamingDataLoader, StreamingDataset
from streaming.base.format.mds.reader import MDSReader


class MappedSamples:
    """``MDSReader.get_sample_data`` for a local, uncompressed shard, through one read-only memory map of it.

    Streaming opens, seeks, reads and closes the shard file for every sample: ~50 us of CPU per sample, most of a
    CPU step's data cost and the ceiling of a loader worker feeding a fast GPU (~20k samples/s). The bytes, the
    empty-read IndexError and the FileNotFoundError (Streaming's cue to prepare the shard) are the same; the map
    is made at the first read in each process (a worker pickles the reader without it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: mmap.mmap | None = None

    def __call__(self, idx: int) -> bytes:
        if self._map is None:
            with open(self.path, "rb") as file:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        begin, end = struct.unpack_from("<II", self._map, (1 + idx) * 4)  # the shard's sample offset table
        data = self._map[begin:end]
        if not data:
            raise IndexError(f"Relative sample index {idx} is not present in {self.path}.")
        return data

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_map": None}

    def close(self) -> None:
        """Unmap the shard (the map holds a file descriptor until then); a later read maps it again."""
        if self._map is not None:
            self._map.close()
            self._map = None


class TokenShards(StreamingDataset):
    """MDS shards of fixed-length token sequences -> ``{"tokens": int64 (L,), "index": int}``.

    Resume state is corrected at epoch boundaries. Composer saves ``state_dict(sample_in_epoch, True)`` with its
    own timestamp, which it moves to the next epoch before the epoch-end checkpoint; Streaming's epoch counter only
    moves when the next epoch's iterator starts. At an ``Nep`` checkpoint Streaming therefore recorded "epoch E-1,
    sample 0" and a resumed run replayed epoch E-1's shuffle as epoch E (a different data order from the
    uninterrupted run). A finished epoch is recorded here as the start of the next one."""

    BOUNDARY_KEY = "workbench_epoch_boundary_fix"  # marks states written with the correction (older ones lack it)
    live: ClassVar[weakref.WeakSet] = weakref.WeakSet()  # for release_shared_memory by long-lived callers

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        TokenShards.live.add(self)
        if all(stream.remote is None for stream in self.streams):  # local shards: never downloaded or evicted
            for reader in self.shards:
                if isinstance(reader, MDSReader) and reader.compression is None:
                    reader.get_sample_data = MappedSamples(  # type: ignore[method-assign]
                        os.path.join(reader.dirname, reader.split or "", reader.raw_data.basename))

    def get_item(self, idx: int) -> dict[str, Any]:
        return {"tokens": super().get_item(idx)["tokens"], "index": idx}

    def state_dict(self, num_samples: int, from_beginning: bool) -> dict[str, Any]:
        state = super().state_dict(num_samples, from_beginning)
        # an epoch's iterator has started (next_epoch > 0) and Composer says 0 samples of it remain to be counted:
        # Composer has finished that epoch, so a resume starts the next one from its first sample
        if from_beginning and num_samples == 0 and self.next_epoch > 0 and state["epoch"] == self.next_epoch - 1:
            state["epoch"] += 1
        return {**state, self.BOUNDARY_KEY: True}

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        if self.BOUNDARY_KEY not in obj and obj.get("sample_in_epoch") == 0:
            # written before the correction: Composer saves sample 0 only after it finished that epoch
            obj = {**obj, "epoch": int(obj["epoch"]) + 1}
        super().load_state_dict(obj)


def collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Samples -> one batch of numpy arrays; :class:`TokenLoader` turns them into tensors in the main process."""
    return {"tokens": np.stack([s["tokens"] for s in samples]).astype(np.int64),
            "index": np.array([s["index"] for s in samples], dtype=np.int64)}


class TokenBatch(dict):
    """A (micro)batch that deep-copies its tensors by cloning them: Composer deep-copies every microbatch before its
    forward pass (to keep it for train metrics), and ``copy.deepcopy`` of a dict of two small tensors costs ~45 us
    of Python per step against ~3 us for the clones. A clone is what deepcopy gives for tensors without autograd
    history that share no storage; any other batch (a tensor requiring grad, one tensor under two keys, views of
    one storage, non-tensors) is deep-copied as usual. Made by the DataSpec's ``microbatch_transforms``."""

    def __deepcopy__(self, memo: dict[int, Any]) -> TokenBatch:
        import copy

        values = list(self.values())
        if all(isinstance(value, torch.Tensor) and not value.requires_grad for value in values) and \
                len({value.untyped_storage().data_ptr() for value in values}) == len(values):
            return TokenBatch({name: value.clone() for name, value in self.items()})
        return TokenBatch(copy.deepcopy(dict(self), memo))


class TokenLoader(StreamingDataLoader):
    """A StreamingDataLoader that yields ``{"tokens", "index"}`` int64 tensors.

    Its workers hand over numpy arrays, which travel pickled through the result pipe. A tensor would travel as a
    shared-memory file descriptor (torch's default sharing strategy), and receiving one costs the main process an
    authenticated socket connection per tensor: ~0.2 ms per tensor on the training loop's thread, measured with
    ``workbench bench``'s host time (``num_workers: 2``), whatever the batch size, against ~20 us of pickling for
    a GPU-sized batch (64 x 256 tokens)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in super().__iter__():
            yield {name: torch.from_numpy(values) for name, values in batch.items()}


def tokens_in_batch(batch: dict[str, torch.Tensor]) -> int:
    return batch["tokens"].numel()


def sequences_in_batch(batch: dict[str, torch.Tensor]) -> int:
    return batch["tokens"].shape[0]


def shard_view(path: str | Path, view: str | Path) -> Path:
    """A folder of symlinks to the shards in ``path``.

    Streaming registers each dataset's local folder in shared memory and refuses a folder another process
    already uses; runs that read the same prepared shards concurrently (parallel ablations, Optuna workers)
    each read through their own view instead."""
    source, view = Path(path).resolve(), Path(view)
    view.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name == "index.json" or item.suffix == ".mds":
            link = view / item.name
            if not (link.is_symlink() and link.resolve() == item):
                # made under a temporary name and renamed (atomic): the ranks of a distributed run build the same
                # view at the same moment, and none may see a missing link or trip over another's
                temporary = view / f".{item.name}.{uuid.uuid4().hex}"
                temporary.symlink_to(item)
                os.replace(temporary, link)
    return view


@contextmanager
def streaming_registration_lock() -> Iterator[None]:
    """Serialise StreamingDataset construction across the processes of this machine.

    Streaming picks a shared-memory prefix by probing for a free one and then creating it; two runs starting at
    the same moment (parallel ablation slots, Optuna workers) can pick the same prefix and one dies with
    FileExistsError. The ranks of one distributed run register together behind a barrier, so a machine-wide lock
    would deadlock them: it is taken only by single-process runs."""
    if dist.get_world_size() > 1:
        yield
        return
    from datasets_prep.cache import exclusive

    with exclusive(Path(tempfile.gettempdir()) / "workbench_streaming_register"):
        yield


def build_loader(path: str | Path, global_batch_size: int, shuffle: bool, seed: int,
                 num_workers: int = 0, view: str | Path | None = None) -> DataSpec:
    """A Composer DataSpec over shards in ``path`` (read through ``view``, see :func:`shard_view`); the global
    batch is split over ranks. The last batch of an epoch may be short, so one epoch is exactly one pass over
    the unique tokens."""
    world = dist.get_world_size()
    if global_batch_size % world:
        raise ValueError(f"data.batch_size {global_batch_size} is not divisible by the {world} devices")
    per_rank = global_batch_size // world
    local = shard_view(path, view) if view is not None else Path(path)
    with streaming_registration_lock():
        dataset = TokenShards(local=str(local), shuffle=shuffle, shuffle_seed=seed, batch_size=per_rank,
                              allow_unsafe_types=False)
    loader = TokenLoader(dataset, batch_size=per_rank, collate_fn=collate, num_workers=num_workers,
                                 drop_last=False, persistent_workers=num_workers > 0,
                                 generator=torch.Generator().manual_seed(seed))
    return DataSpec(loader, get_num_tokens_in_batch=tokens_in_batch, get_num_samples_in_batch=sequences_in_batch,
                    microbatch_transforms=TokenBatch)


def release_shared_memory(datasets: list[Any]) -> int:
    """Close the shared-memory segments of finished StreamingDatasets (and unmap TokenShards' shards); the number of
    segments closed.

    Streaming registers every segment's ``cleanup`` with ``atexit``, so a process that trains many runs in turn
    (a tune worker, the test suite) keeps each run's ~36 descriptors until it exits and eventually hits the
    open-file limit. Streaming has no close(): this unregisters and runs those cleanups once the run is over."""
    import gc

    from streaming.base.shared.memory import SharedMemory

    segments: list[SharedMemory] = []

    def collect(value: Any, depth: int = 0) -> None:
        if isinstance(value, SharedMemory):
            segments.append(value)
        elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, type):
            for inner in vars(value).values():
                collect(inner, depth + 1)

    for dataset in datasets:
        if isinstance(dataset, StreamingDataset):
            for value in vars(dataset).values():
                collect(value)
            for reader in getattr(dataset, "shards", []):  # TokenShards' memory maps, one descriptor each
                if isinstance(reader.__dict__.get("get_sample_data"), MappedSamples):
                    reader.get_sample_data.close()
    gc.collect()  # numpy views of the segments' buffers must be gone before close()
    return close_segments(segments)


def close_segments(segments: list[Any]) -> int:
    """Run Streaming SharedMemory cleanups now instead of at exit; the number closed (a segment whose buffer is
    still viewed somewhere is left to atexit, as Streaming would)."""
    import atexit

    closed = 0
    for segment in segments:
        atexit.unregister(segment.cleanup)
        try:
            segment.cleanup()
            closed += 1
        except BufferError:
            atexit.register(segment.cleanup)
    return closed
