"""Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta, its prior, its fit to a ledger's runs, and the
compute-optimal allocation of a FLOP budget.

N is the model's non-embedding parameter count (sizing.count_params()["non_embedding"]), D the training tokens and
L the validation loss in nats per token. The fit follows Chinchilla (Hoffmann et al. 2022, appendix D.2) as
refitted by Epoch AI (Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt"):

    log L_pred = LSE(e, a - alpha log N, b - beta log D),   E = exp(e), A = exp(a), B = exp(b)

minimising the Huber loss (delta = 1e-3) of log L_pred - log L, summed over runs, with L-BFGS-B from every
point of a grid of starts and keeping the best; 90% intervals come from a bootstrap over runs. Compute is
C = 6 N D (Chinchilla's convention, with the fit's N), which gives the allocation in closed form:

    N_opt = G (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
    G = (alpha A / (beta B))^(1/(alpha+beta))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

HUBER_DELTA = 1e-3  # Chinchilla's: below it a residual counts quadratically, above it linearly (outliers weigh less)
MIN_RUNS = 5  # five constants: fewer runs than that cannot pin them
NAMES = ("E", "A", "B", "alpha", "beta")

# Starting points of L-BFGS-B: every combination, 2^5 = 32 starts (Chinchilla's grid has 4,500 and takes minutes).
# On synthetic runs two thirds or more of these starts reach the best optimum; starts at A or B = 1 (a, b = 0)
# or at exponents above 1 often end in a local one, so the grid stays inside those values.
GRID_E = (0.0, 1.0)  # E = 1 or 2.7 nats
GRID_A = (5.0, 15.0)
GRID_B = (5.0, 15.0)
GRID_EXPONENT = (0.3, 0.8)
# Box for L-BFGS-B: alpha and beta outside (0.01, 2.5) mean the runs do not pin the exponent (a fit that ends on
# that edge is reported as not converged); E from 0.007 to 150 nats and A, B up to e^40 leave the rest free.
BOUNDS = [(-5.0, 5.0), (-10.0, 40.0), (-10.0, 40.0), (0.01, 2.5), (0.01, 2.5)]
BOOTSTRAP_STARTS = 2  # a bootstrap refit starts from the full fit's optimum and the best-scoring grid point


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta in nats per token; `source` says where the constants come from."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: float | np.ndarray, d: float | np.ndarray) -> float | np.ndarray:
        """Predicted loss of a model with `n` non-embedding parameters trained on `d` tokens."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L(N, D) subject to 6 N D = flops: the closed form in the module docstring."""
        if not flops > 0:
            raise ValueError(f"a compute budget must be positive, got {flops!r}")
        s = self.alpha + self.beta
        return self.G * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / self.G

    def constants(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in NAMES}


PRIOR = ScalingLaw(
    E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="prior: Epoch AI's refit of Chinchilla (Besiroglu et al. 2024), nats/token on Chinchilla's tokenizer "
    "and MassiveText; on another tokenizer or corpus it is only a prior, not a prediction",
)


@dataclass(frozen=True)
class ScalingPoint:
    """One finished training run: N non-embedding parameters, D tokens, validation loss L (nats/token)."""

    n: float
    d: float
    loss: float
    name: str = ""


@dataclass
class ScalingFit:
    """The best fit over the grid of starts, and its bootstrap."""

    law: ScalingLaw
    points: list[ScalingPoint]
    objective: float  # summed Huber loss at the optimum
    converged: bool
    note: str  # why the fit is not to be trusted, or "" when it is
    starts: int
    bootstrap: list[ScalingLaw] = field(default_factory=list)  # refits on runs resampled with replacement

    def interval(self, name: str, level: float = 0.9) -> tuple[float, float] | None:
        """Central bootstrap interval of a constant ('E', 'A', 'B', 'alpha', 'beta'); None without a bootstrap."""
        if not self.bootstrap:
            return None
        values = np.array([getattr(law, name) for law in self.bootstrap])
        tail = (1.0 - level) / 2.0 * 100.0
        return float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))

    def to_dict(self) -> dict:
        return {
            "constants": self.law.constants(), "source": self.law.source, "runs": len(self.points),
            "objective": self.objective, "converged": self.converged, "note": self.note, "starts": self.starts,
            "bootstrap_samples": len(self.bootstrap),
            "intervals_90": {name: self.interval(name) for name in NAMES} if self.bootstrap else None,
            "points": [asdict(p) for p in self.points],
        }


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals `r`, and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Summed Huber loss of log L_pred - log L over runs and its gradient in theta = (e, a, b, alpha, beta)."""
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])  # (3, R)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)  # (3, R): softmax over the three terms = d LSE / d term
    total = weights.sum(axis=0)
    residual = top + np.log(total) - log_loss  # (R,)
    weights /= total
    value, slope = huber(residual, delta)
    grad = np.array([
        slope @ weights[0],
        slope @ weights[1],
        slope @ weights[2],
        -(slope * weights[1]) @ log_n,
        -(slope * weights[2]) @ log_d,
    ])
    return float(value.sum()), grad


def grid_starts() -> list[np.ndarray]:
    return [np.array(start) for start in itertools.product(GRID_E, GRID_A, GRID_B, GRID_EXPONENT, GRID_EXPONENT)]


def _minimise(starts: Sequence[np.ndarray], data: tuple[np.ndarray, ...]) -> tuple[np.ndarray, float, bool]:
    """Best L-BFGS-B result over `starts`: (theta, objective, whether the optimiser reported success)."""
    from scipy.optimize import minimize

    best: tuple[np.ndarray, float, bool] | None = None
    for start in starts:
        # The summed Huber loss is tiny (~1e-6 near the optimum) and L-BFGS-B's ftol is relative to max(|f|, 1),
        # so the default tolerances stop long before the optimum: both are tightened to what float64 resolves.
        result = minimize(objective, start, args=data, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
        if best is None or result.fun < best[1]:
            best = (result.x, float(result.fun), bool(result.success))
    assert best is not None  # starts is never empty
    return best


def _law(theta: np.ndarray, source: str) -> ScalingLaw:
    e, a, b, alpha, beta = (float(v) for v in theta)
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, source=source)


def fit(points: Sequence[ScalingPoint], *, bootstrap: int = 100, seed: int = 0,
        delta: float = HUBER_DELTA) -> ScalingFit:
    """Fit L(N, D) to `points` (at least MIN_RUNS of them) and bootstrap it `bootstrap` times.

    The fit is marked not converged (with a note saying why) when the optimiser fails, when alpha or beta ends
    on the edge of its box, or when the runs span a single N or a single D (then one of the two terms is free).
    """
    import scipy.optimize  # noqa: F401  (loaded before threadpool_limits, which limits only loaded libraries)
    from threadpoolctl import threadpool_limits

    points = list(points)
    if len(points) < MIN_RUNS:
        raise ValueError(f"a fit needs at least {MIN_RUNS} runs, got {len(points)}")
    for p in points:
        if not (p.n > 0 and p.d > 0 and p.loss > 0 and math.isfinite(p.n * p.d * p.loss)):
            raise ValueError(f"run {p.name or p}: N, D and loss must be positive and finite")
    # One BLAS thread: L-BFGS-B's 5 x 5 linear algebra ran 15x slower when OpenBLAS woke its threads on a busy
    # machine (measured on 2 shared cores); nothing here is large enough to gain from more.
    with threadpool_limits(1, user_api="blas"):
        return _fit(points, bootstrap, seed, delta)


def _fit(points: list[ScalingPoint], bootstrap: int, seed: int, delta: float) -> ScalingFit:
    log_n = np.log([p.n for p in points])
    log_d = np.log([p.d for p in points])
    log_loss = np.log([p.loss for p in points])
    starts = grid_starts()
    theta, value, success = _minimise(starts, (log_n, log_d, log_loss, delta))

    notes = []
    if not success:
        notes.append("L-BFGS-B did not report convergence")
    for name, v, (lo, hi) in zip(("alpha", "beta"), theta[3:], BOUNDS[3:]):
        if not lo * 1.01 < v < hi * 0.99:
            notes.append(f"{name} = {v:.3g} ended on the edge of its range ({lo:g}..{hi:g})")
    if len({p.n for p in points}) < 2 or len({p.d for p in points}) < 2:
        notes.append("the runs span a single model size or a single token count")
    source = f"fit to {len(points)} runs (Huber delta {delta:g}, L-BFGS-B from {len(starts)} starts)"
    result = ScalingFit(law=_law(theta, source), points=points, objective=value, converged=not notes,
                        note="; ".join(notes), starts=len(starts))

    # Bootstrap: resample runs with replacement and refit. Each refit starts from the full fit's optimum and the
    # grid point that scores best on the resample, not from the whole grid (a hundred refits would take a minute).
    rng = np.random.default_rng(seed)
    grid = np.array(starts)
    for _ in range(bootstrap):
        pick = rng.integers(0, len(points), size=len(points))
        data = (log_n[pick], log_d[pick], log_loss[pick], delta)
        scores = np.array([objective(start, *data)[0] for start in grid])
        chosen = [theta, *grid[np.argsort(scores)[:BOOTSTRAP_STARTS - 1]]]
        result.bootstrap.append(_law(_minimise(chosen, data)[0], "bootstrap"))
    return result


def frontier(law: ScalingLaw, budgets: Sequence[float], samples: Sequence[ScalingLaw] = (),
             level: float = 0.9) -> list[dict]:
    """The compute-optimal (N, D, loss) at each budget; with bootstrap `samples`, central intervals of each."""
    rows = []
    tail = (1.0 - level) / 2.0 * 100.0
    for flops in budgets:
        n, d = law.compute_optimal(flops)
        row = {"flops": flops, "n_opt": n, "d_opt": d, "loss": float(law.loss(n, d))}
        if samples:
            optima = np.array([s.compute_optimal(flops) for s in samples])  # (S, 2)
            losses = np.array([s.loss(nd[0], nd[1]) for s, nd in zip(samples, optima)])
            for key, values in (("n_opt", optima[:, 0]), ("d_opt", optima[:, 1]), ("loss", losses)):
                row[f"{key}_interval"] = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail)))
        rows.append(row)
    return rows
