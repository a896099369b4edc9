"""The bracketing search of ``wsld compare`` on made-up held-out scores: grids grow while the best point is at an
edge, stop at the limit with a flag, never leave a value's range, replay the same decisions, and fill every row to
the same number of runs."""

from __future__ import annotations

import math

from wsld.demo.search import Dim, RowSearch, choose, max_runs, min_runs


def run(search: RowSearch, score) -> tuple[dict, tuple]:
    """Drive a search to its end with ``score(values) -> held-out top-1``."""
    scores: dict = {}
    for _ in range(100):
        pending, best = search.pending(scores)
        if best is not None:
            return scores, best
        for p in pending:
            scores[p] = score(dict(p))
    raise AssertionError("the search did not end")


def peak(at: float):
    """Held-out top-1 that peaks at lr = ``at`` (log scale)."""
    return lambda v: 90.0 - abs(math.log2(v["lr"] / at))


def test_grid_grows_until_the_best_rate_is_inside_it():
    s = RowSearch((Dim("lr", 0.1, low=0.0),), limit=5)
    scores, best = run(s, peak(0.8))  # three doublings above the start
    assert dict(best)["lr"] == 0.8
    (lr,) = s.results
    assert lr.grid == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6] and lr.extended == 3 and lr.edge is None
    assert len(scores) == 6


def test_an_optimum_beyond_the_limit_is_flagged_at_its_edge():
    s = RowSearch((Dim("lr", 0.1, low=0.0),), limit=1)  # too low a limit for an optimum at 0.8
    _, best = run(s, peak(0.8))
    (lr,) = s.results
    assert dict(best)["lr"] == 0.4 == lr.grid[-1]
    assert (lr.edge, lr.why, lr.extended) == ("high", "limit", 1)
    low = RowSearch((Dim("lr", 0.1, low=0.0),), limit=0)
    run(low, peak(0.001))
    assert (low.results[0].edge, low.results[0].why, low.results[0].grid) == ("low", "limit", [0.05, 0.1, 0.2])


def test_one_value_at_a_time_from_the_best_point_so_far():
    dims = (Dim("lr", 0.1, low=0.0), Dim("T", 4.0, low=0.0), Dim("alpha", 2.5, low=0.0))

    def score(v):
        return 90 - abs(math.log2(v["lr"] / 0.2)) - abs(math.log2(v["T"] / 2)) - abs(math.log2(v["alpha"] / 2.5))

    s = RowSearch(dims, limit=3)
    scores, best = run(s, score)
    assert dict(best) == {"lr": 0.2, "T": 2.0, "alpha": 2.5}
    assert [r.name for r in s.results] == ["lr", "T", "alpha"] and all(r.edge is None for r in s.results)
    assert all(dict(p)["T"] == 4.0 for p in scores if dict(p)["alpha"] == 2.5 and dict(p)["lr"] != 0.2)  # lr first, T held
    assert min_runs(dims) <= len(scores) <= max_runs(dims, 3)


def test_kd_alpha_grid_is_on_the_label_weight_and_never_passes_one():
    d = Dim("alpha", 0.9, low=0.0, complement=True)
    assert [d.step(0.9, k) for k in (-1, 0, 1)] == [0.8, 0.9, 0.95]
    s = RowSearch((Dim("lr", 0.1, low=0.0), d), limit=10)
    _, best = run(s, lambda v: 90 - (1 - v["alpha"]) * 10 - abs(math.log2(v["lr"] / 0.1)))  # best: alpha -> 1
    alpha = s.results[1]
    assert all(0 < a < 1 for a in alpha.grid) and alpha.edge == "high" and alpha.extended == 10
    assert dict(best)["alpha"] == alpha.grid[-1]


def test_a_value_stopped_by_its_range_says_so():
    s = RowSearch((Dim("w", 1.0, low=0.0, high=3.0),), limit=5)
    run(s, lambda v: v["w"])  # the higher the better, but 4 is outside the range
    assert (s.results[0].edge, s.results[0].why, s.results[0].grid[-1]) == ("high", "range", 2.0)


def test_replay_gives_the_same_decisions_and_fill_equalises_the_budget():
    dims = (Dim("lr", 0.1, low=0.0),)
    s = RowSearch(dims, limit=3)
    scores, best = run(s, peak(0.1))
    again = RowSearch(dims, limit=3)
    assert again.pending(scores) == ([], best)  # an interrupted comparison continues with the same choice
    fill = s.fill(best, set(scores), budget=7)
    assert len(scores) + len(fill) == 7 and not set(fill) & set(scores)
    lrs = sorted(dict(p)["lr"] for p in fill)
    assert lrs == [0.0707, 0.0841, 0.119, 0.141]  # half and quarter steps around 0.1, 3 digits
    filled = {**scores, **{p: peak(0.1)(dict(p)) for p in fill}}
    assert choose(filled, best) == best  # the bracketed best keeps a tie
