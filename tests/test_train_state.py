"""The Ray Train plumbing both training loops share (sparserm.train_state), without Ray: fingerprint refusal,
the epoch order (each loop's order as it was before the move), held-out pairs, and early stopping."""
import json
import re

import pytest
import torch

from sparserm.train_state import (EarlyStopping, check_fingerprint, epoch_order, held_out, refuse_other_run,
                                  stored_fingerprint)


def _store(run_dir, epoch: int, state) -> None:
    (run_dir / f"epoch_{epoch:04d}").mkdir(parents=True)
    (run_dir / f"epoch_{epoch:04d}" / "state.json").write_text(state if isinstance(state, str) else json.dumps(state))


def test_stored_fingerprint_is_the_newest_readable(tmp_path):
    assert stored_fingerprint(tmp_path / "none") is None
    _store(tmp_path, 1, {"epoch": 1, "fingerprint": "old"})
    _store(tmp_path, 2, {"epoch": 2, "fingerprint": "new"})
    _store(tmp_path, 3, "{not json")  # a half-written one is skipped
    assert stored_fingerprint(tmp_path) == "new"


def test_another_fingerprint_is_refused_naming_the_run_folder_and_fields(tmp_path):
    check_fingerprint(None, {"a": 1}, tmp_path, "a run")  # nothing stored
    check_fingerprint({"a": 1}, {"a": 1}, tmp_path, "a run")
    msg = re.escape(f"{tmp_path} holds a run on other pairs or settings (other settings: b, c)")
    with pytest.raises(ValueError, match=msg):
        check_fingerprint({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 0}, tmp_path, "a run")
    _store(tmp_path / "dpo", 1, {"fingerprint": "abc"})
    refuse_other_run(tmp_path / "dpo", "abc", "a DPO run")
    refuse_other_run(tmp_path / "fresh", "xyz", "a DPO run")
    with pytest.raises(ValueError, match="dpo holds a DPO run on other pairs or settings; resume it unchanged"):
        refuse_other_run(tmp_path / "dpo", "xyz", "a DPO run")


def _dpo_order_before(n, seed, epoch, rank, world, step_pairs):  # the DPO loop's inline code before the move
    import math

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    n_pad = math.ceil(n / step_pairs) * step_pairs
    perm = torch.cat([perm, perm[: n_pad - n]]) if n_pad > n else perm
    return perm[rank::world].tolist()


def _head_order_before(n, seed, epoch, rank, world):  # the head loop's inline code before the move
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    perm = torch.cat([perm, perm[: (-n) % world]])
    return perm[rank::world].tolist()


@pytest.mark.parametrize("n,world,step", [(6, 1, 4), (8, 2, 4), (7, 2, 8), (10, 3, 6)])
def test_epoch_order_is_each_loops_order_before(n, world, step):
    for seed in (0, 5):
        for epoch in (1, 2, 3):
            shards = [epoch_order(n, seed, epoch, r, world, multiple=step).tolist() for r in range(world)]
            assert shards == [_dpo_order_before(n, seed, epoch, r, world, step) for r in range(world)]
            assert [epoch_order(n, seed, epoch, r, world, multiple=world).tolist() for r in range(world)] == [
                _head_order_before(n, seed, epoch, r, world) for r in range(world)]
            assert len({len(s) for s in shards}) == 1  # as many on every rank
    assert epoch_order(8, 0, 1, 0, 1, 4).tolist() != epoch_order(8, 0, 2, 0, 1, 4).tolist()
    assert sorted(epoch_order(8, 0, 1, 0, 1, 4).tolist()) == list(range(8))


@pytest.mark.parametrize("n,world,step", [(1, 1, 4), (1, 2, 4), (3, 2, 8), (2, 1, 8)])
def test_fewer_items_than_one_step_still_fill_whole_steps_on_every_rank(n, world, step):
    # a round whose filter kept fewer pairs than one global batch (a CI run kept 1 of 8 and the trainer's step
    # table came out empty): the permutation repeats until it fills a step, so each item appears step // n times
    for epoch in (1, 2):
        shards = [epoch_order(n, 3, epoch, r, world, multiple=step).tolist() for r in range(world)]
        assert [len(s) for s in shards] == [step // world] * world
        flat = [i for s in shards for i in s]
        assert sorted(set(flat)) == list(range(n))
        counts = [flat.count(i) for i in range(n)]
        assert max(counts) - min(counts) <= 1
    with pytest.raises(ValueError, match="at least one item"):
        epoch_order(0, 0, 1, 0, 1, 4)


def test_held_out_pairs_by_seed():
    assert held_out(8, 0.0, 0) == (list(range(8)), [])
    train, val = held_out(8, 0.25, 0)
    assert len(val) == 2 and sorted(train + val) == list(range(8))
    assert held_out(8, 0.25, 0) == (train, val) and held_out(40, 0.25, 1) != held_out(40, 0.25, 2)
    assert len(held_out(3, 0.1, 0)[1]) == 1  # a share that rounds to none still holds one out
    assert held_out(1, 0.4, 0) == ([0], [])  # one pair (a round's filter kept one) trains, unvalidated
    with pytest.raises(ValueError, match="none to train on"):
        held_out(2, 0.9, 0)


def _rows(values):
    return [{"epoch": e, "v": v} for e, v in enumerate(values, start=1)]


def _run(patience, values):
    """Feeds rows until the stopper says stop; (epoch it stopped after or None, best epoch)."""
    es = EarlyStopping(patience, lambda r: r["v"])
    for row in _rows(values):
        es.update(row)
        if es.stop:
            return row["epoch"], es.best_epoch
    return None, es.best_epoch


def test_early_stopping_on_hand_sequences():
    assert _run(0, [3, 2, 1, 0]) == (None, 1)  # off: never stops, still tracks the best
    assert _run(1, [1, 2, 3, 4]) == (None, 4)  # always improving
    assert _run(1, [1, 3, 2, 4]) == (3, 2)
    assert _run(2, [1, 3, 2, 4, 0, 0]) == (6, 4)  # epoch 3 did not improve, epoch 4 did: the count restarts
    assert _run(2, [5, 5, 5]) == (3, 1)  # a tie is no improvement and keeps the earlier epoch
    assert _run(3, [0, 1, 1, 1, 1]) == (5, 2)
    es = EarlyStopping(1, lambda r: (r["acc"], -r["loss"]))  # a tuple key: accuracy, then lower loss
    assert es.update({"epoch": 1, "acc": 0.5, "loss": 1.0}) and es.update({"epoch": 2, "acc": 0.5, "loss": 0.9})
    assert not es.update({"epoch": 3, "acc": 0.5, "loss": 0.95}) and es.stop and es.best_epoch == 2


def test_early_stopping_replays_a_resumed_history():
    rows = _rows([1, 3, 2, 2, 5])  # an unbroken run stops after epoch 4, so never sees epoch 5
    for k in range(5):  # interrupted after any epoch k <= 4 and resumed: decides as the unbroken one
        es = EarlyStopping(2, lambda r: r["v"], rows[:k])
        stopped = None
        for row in rows[k:]:
            if es.stop:
                break
            es.update(row)
            if es.stop:
                stopped = row["epoch"]
        assert (es.stop, es.best_epoch) == (True, 2) and stopped in (None, 4) and (stopped is None) == (k >= 4)
