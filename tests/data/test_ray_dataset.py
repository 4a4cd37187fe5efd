"""sparserm.data.ray_dataset: the Ray Data actor pass every model-forward stage runs, and its one progress bar."""
import numpy as np


def test_actor_pass_collects_every_row_once_sorted_with_one_bar(ray_session, capsys):
    import ray.data

    from sparserm.data.ray_dataset import actor_pass, collect_sorted

    class Square:  # defined here so that Ray ships it by value to the actor
        def __init__(self, offset: int):
            self.offset = offset

        def __call__(self, batch: dict) -> dict:
            return {"i": batch["i"], "y": batch["i"] ** 2 + self.offset}

    class Resources:
        num_actors, num_cpus, num_gpus = 1, 1, 0

    items = [{"i": i} for i in range(10)]
    ds = actor_pass(items, Square, {"offset": 3}, blocks=4, resources=Resources)
    assert ray.data.DataContext.get_current().enable_progress_bars is False  # Ray's own output off: ours shows
    table = collect_sorted(ds, "i", len(items), "test: pass", unit="item")
    assert table.column("i").to_pylist() == list(range(10))
    np.testing.assert_array_equal(table.column("y").to_numpy(), np.arange(10) ** 2 + 3)
    out = capsys.readouterr()
    assert "test: pass" in out.err and "10/10" in out.err and "item" in out.err  # one bar, on stderr
    assert "test: pass" not in out.out and "Running Dataset" not in out.err
