"""Per-run shard views: the ranks of one distributed run build the same view at the same moment."""

from __future__ import annotations

import threading

from workbench.data import shard_view


def test_concurrent_shard_views_all_succeed_and_point_at_the_shards(tmp_path):
    source = tmp_path / "shards"
    source.mkdir()
    names = ["index.json", *(f"shard.{i:05d}.mds" for i in range(20))]
    for name in names:
        (source / name).write_text(name)
    for attempt in range(10):
        view = tmp_path / f"view{attempt}"
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def build(view=view, start=start, errors=errors) -> None:
            start.wait()
            try:
                shard_view(source, view)
            except BaseException as err:  # collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=build) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        assert sorted(p.name for p in view.iterdir()) == sorted(names)  # no leftover temporary links
        assert all((view / name).resolve() == source / name for name in names)


def test_mapped_samples_are_streamings_bytes_and_errors(tiny_config, tmp_path):
    """workbench.data.MappedSamples reads a shard's samples through a memory map instead of opening the file for
    each: byte for byte what Streaming's reader returns, with its errors, and a pickled copy maps again."""
    import pickle

    import pytest
    from streaming.base.format.mds.reader import MDSReader

    from datasets_prep.corpus import prepare
    from workbench.data import MappedSamples, build_loader

    prepared = prepare(tiny_config().data, log=lambda _: None)
    spec = build_loader(prepared.train.path, 16, shuffle=False, seed=0, view=tmp_path / "view")
    dataset = spec.dataloader.dataset
    readers = list(dataset.shards)
    assert readers and all(isinstance(reader.get_sample_data, MappedSamples) for reader in readers)
    for reader in readers:
        mapped = reader.get_sample_data
        for idx in range(reader.samples):
            assert mapped(idx) == MDSReader.get_sample_data(reader, idx)
        with pytest.raises(IndexError):
            mapped(reader.samples)
        copy = pickle.loads(pickle.dumps(mapped))
        assert copy._map is None and copy(reader.samples - 1) == mapped(reader.samples - 1)
    with pytest.raises(FileNotFoundError):  # Streaming's cue to prepare the shard
        MappedSamples(str(tmp_path / "missing.mds"))(0)
    assert len(list(spec.dataloader)) == 32


def test_microbatches_copy_by_cloning_their_tensors(tiny_config, tmp_path):
    """Composer deep-copies each microbatch (workbench.data.TokenBatch): the copy holds equal values in new storage."""
    import copy

    import torch

    from datasets_prep.corpus import prepare
    from workbench.data import TokenBatch, build_loader

    prepared = prepare(tiny_config().data, log=lambda _: None)
    spec = build_loader(prepared.train.path, 16, shuffle=True, seed=0, view=tmp_path / "view")
    batch = spec.microbatch_transforms(next(iter(spec.dataloader)))
    assert isinstance(batch, TokenBatch) and set(batch) == {"tokens", "index"}
    copied = copy.deepcopy(batch)
    assert isinstance(copied, TokenBatch)
    for name in batch:
        assert torch.equal(copied[name], batch[name]) and copied[name].data_ptr() != batch[name].data_ptr()
    batch["tokens"].zero_()
    assert copied["tokens"].any()


def test_microbatches_that_clones_would_not_copy_faithfully_are_deep_copied():
    """A tensor with autograd history, one tensor under two keys, or views of one storage: deepcopy's result."""
    import copy

    import torch

    from workbench.data import TokenBatch

    weights = torch.ones(3, requires_grad=True)
    copied = copy.deepcopy(TokenBatch({"tokens": torch.arange(6), "weights": weights}))
    assert copied["weights"].is_leaf and copied["weights"].requires_grad and copied["weights"] is not weights
    shared = torch.arange(6)
    copied = copy.deepcopy(TokenBatch({"tokens": shared, "labels": shared}))
    assert copied["tokens"] is copied["labels"] and copied["tokens"] is not shared
    base = torch.arange(8)
    copied = copy.deepcopy(TokenBatch({"inputs": base[:-1], "targets": base[1:]}))
    assert copied["inputs"].untyped_storage().data_ptr() == copied["targets"].untyped_storage().data_ptr()
    assert copied["inputs"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()


def test_released_datasets_unmap_their_shards(tiny_config, tmp_path):
    from datasets_prep.corpus import prepare
    from workbench.data import build_loader, release_shared_memory

    prepared = prepare(tiny_config().data, log=lambda _: None)
    spec = build_loader(prepared.train.path, 16, shuffle=False, seed=0, view=tmp_path / "view")
    next(iter(spec.dataloader))
    readers = list(spec.dataloader.dataset.shards)
    assert any(reader.get_sample_data._map is not None for reader in readers)
    release_shared_memory([spec.dataloader.dataset])
    assert all(reader.get_sample_data._map is None for reader in readers)
    assert readers[0].get_sample_data(0)  # maps again on the next read
