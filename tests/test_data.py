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
