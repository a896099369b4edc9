"""The bracketing search of ``wsld compare``: one dimension at a time on a log grid that grows while its best point sits at an edge.

Pure bookkeeping, no training: ``RowSearch.pending(scores)`` replays the search from the held-out
scores of the runs that finished and returns the points still to run, so a search interrupted
anywhere continues from its run folder with the same decisions.

Per dimension (learning rate first, then T, then the loss's weight): three points ``x / f, x, x * f``
around the current value; while the best of them is at an edge of the grid, one more point beyond
that edge, at most ``limit`` times per dimension (and never outside the dimension's allowed
range). A dimension whose best point is still at an edge when no further point may be added is
*unbracketed*: the report flags it. The next dimension starts from the best point so far. After
every row has bracketed, ``fill`` adds learning-rate points halfway between grid points around
the best rate until the row has the common budget of runs, so every row gets the same number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

Point = tuple[tuple[str, float], ...]  # ((name, value), ...) in the row's dimension order
# fill offsets, in units of the log-grid step: half steps, then quarter steps, around the best rate
FILL_OFFSETS = (0.5, -0.5, 0.25, -0.25, 0.75, -0.75, 0.125, -0.125, 0.375, -0.375, 0.625, -0.625, 0.875, -0.875)


@dataclass(frozen=True)
class Dim:
    """One searched value: ``name`` (lr, T, or a loss parameter), its start, grid factor and allowed range.

    ``complement``: the grid is on ``1 - value`` (KD's alpha: the label weight ``1 - alpha`` is searched
    on a log scale, so the grid never passes alpha = 1).
    """

    name: str
    start: float
    factor: float = 2.0
    low: Optional[float] = None  # exclusive bounds of the searched value
    high: Optional[float] = None
    complement: bool = False

    def step(self, value: float, k: float) -> float:
        """``value`` moved ``k`` grid steps (up = larger searched value)."""
        if self.complement:
            return _round(1.0 - (1.0 - value) * self.factor ** (-k))
        return _round(value * self.factor**k)

    def allowed(self, value: float) -> bool:
        if self.complement and not 0.0 < 1.0 - value:
            return False
        return (self.low is None or value > self.low) and (self.high is None or value < self.high)


def _round(x: float) -> float:
    """6 significant digits: grid points met twice (from two directions) compare equal."""
    return float(f"{x:.6g}")


def make_point(values: dict[str, float], dims: tuple[Dim, ...]) -> Point:
    return tuple((d.name, _round(values[d.name])) for d in dims)


@dataclass
class DimResult:
    """How one dimension's search ended."""

    name: str
    grid: list[float]  # ascending
    best: float
    extended: int  # points added beyond the first three
    edge: Optional[str] = None  # "low" / "high": the best point is still at that edge of its grid
    why: str = ""  # why the grid stopped at that edge: "limit" or "range"


@dataclass
class RowSearch:
    """The search of one row: its dimensions, start values and extension limit."""

    dims: tuple[Dim, ...]
    limit: int
    results: list[DimResult] = field(default_factory=list)
    bracketing: set = field(default_factory=set)  # the points of the grids (the rest are fill)

    def _start(self) -> dict[str, float]:
        return {d.name: d.start for d in self.dims}

    def pending(self, scores: dict[Point, float]) -> tuple[list[Point], Optional[Point]]:
        """(points to run now, the best point once every dimension is bracketed, else None).

        ``scores``: held-out top-1 of the finished points. Ties go to the point nearer the grid's start.
        """
        self.results, self.bracketing = [], set()
        current = self._start()
        for dim in self.dims:
            centre = current[dim.name]
            grid = [dim.step(centre, -1), centre, dim.step(centre, 1)]
            grid = [v for v in grid if dim.allowed(v)] or [centre]
            extended, low_stop, high_stop = 0, "", ""
            while True:
                pts = {v: make_point({**current, dim.name: v}, self.dims) for v in grid}
                self.bracketing.update(pts.values())
                todo = [p for p in pts.values() if p not in scores]
                if todo:
                    return todo, None
                # best score; ties: nearest the centre in grid steps, then the lower value
                best = max(grid, key=lambda v: (scores[pts[v]], -abs(grid.index(v) - grid.index(centre)), -v))
                edge = "low" if best == grid[0] and len(grid) > 1 else "high" if best == grid[-1] and len(grid) > 1 else None
                if edge is None:
                    break
                nxt = dim.step(grid[0], -1) if edge == "low" else dim.step(grid[-1], 1)
                if extended >= self.limit or not dim.allowed(nxt):
                    why = "limit" if dim.allowed(nxt) else "range"
                    low_stop, high_stop = (why, "") if edge == "low" else ("", why)
                    break
                grid = [nxt, *grid] if edge == "low" else [*grid, nxt]
                extended += 1
            res = DimResult(dim.name, grid, best, extended)
            if edge is not None:
                res.edge, res.why = edge, low_stop or high_stop
            self.results.append(res)
            current[dim.name] = best
        return [], make_point(current, self.dims)

    def fill(self, best: Point, have: set[Point], budget: int) -> list[Point]:
        """Learning-rate points between grid points around the best rate, until the row has ``budget`` runs."""
        lr_dim = self.dims[0]
        values = dict(best)
        out: list[Point] = []
        for k in FILL_OFFSETS:
            if len(have) + len(out) >= budget:
                break
            lr = float(f"{lr_dim.step(values[lr_dim.name], k):.3g}")  # 3 digits: a rate a person would write
            p = make_point({**values, lr_dim.name: lr}, self.dims)
            if p not in have and p not in out:
                out.append(p)
        return out


def choose(scores: dict[Point, float], best_bracketed: Point) -> Point:
    """The row's chosen point: the best held-out score over every run of the row (fill included);
    ties keep the bracketed best."""
    top = max(scores.values())
    if scores.get(best_bracketed) == top:
        return best_bracketed
    return next(p for p, s in scores.items() if s == top)


def max_runs(dims: tuple[Dim, ...], limit: int) -> int:
    """The most runs a row's bracketing can take: every dimension at 3 + ``limit`` points, one shared with the previous."""
    return sum(3 + limit - (1 if i else 0) for i in range(len(dims)))


def min_runs(dims: tuple[Dim, ...]) -> int:
    """The fewest: 3 points for the first dimension, 2 new for each next."""
    return 3 + 2 * (len(dims) - 1)


def describe(p: Point) -> str:
    """``lr 0.1, T 4, alpha 2.5``."""
    return ", ".join(f"{k} {v:g}" for k, v in p)

