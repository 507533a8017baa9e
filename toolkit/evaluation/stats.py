"""Exact binomial intervals for a paired accuracy change, in plain Python (no scipy: it is not in every install).

Two files classify the same labelled images. Of the `images`, `gains` are right with the candidate and wrong
with the reference, `losses` the other way round; the accuracy change is (gains - losses) / images. Its
interval: write the change as delta * (2 pi - 1), with delta the share of discordant images and pi the share of
gains among them (McNemar's view). Each gets an exact Clopper-Pearson interval at 1 - alpha/2, so both hold
together with probability >= 1 - alpha (Bonferroni); the change's interval is the range of delta * (2 pi - 1)
over that box. Conservative (never narrower than the truth), and honest where nothing changed: with no
discordant image the interval still has the width the number of images allows (about +-4.4/images at 95%),
where the exact McNemar interval conditional on the discordant count would claim a width of zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_TERMS = 100_000  # continued-fraction terms: converges in O(sqrt(max(a, b))) of them
MAX_IMAGES = 10**7  # images_to_resolve gives up beyond this


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz, as in Numerical Recipes' betacf)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, MAX_TERMS):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function I_x(a, b): the Beta(a, b) distribution function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use symmetry on the other
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q, by bisection (the distribution function is increasing), to 1e-13."""
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-13:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact two-sided interval for a binomial proportion k/n: each tail holds at most (1 - confidence) / 2.
    n == 0 says nothing: (0, 1)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2
    low = 0.0 if k == 0 else beta_quantile(tail, k, n - k + 1)
    high = 1.0 if k == n else beta_quantile(1.0 - tail, k + 1, n - k)
    return low, high


@dataclass(frozen=True)
class PairedChange:
    """An accuracy change from paired predictions, as a fraction, with its exact interval."""

    images: int
    gains: int
    losses: int
    low: float
    high: float
    confidence: float

    @property
    def change(self) -> float:
        return (self.gains - self.losses) / self.images

    @property
    def width(self) -> float:
        return self.high - self.low


def paired_change(gains: int, losses: int, images: int, confidence: float = 0.95) -> PairedChange:
    """The change (gains - losses) / images and its interval (see the module's docstring for the method)."""
    if images < 1 or gains < 0 or losses < 0 or gains + losses > images:
        raise ValueError(f"need gains + losses <= images >= 1, got {gains} + {losses} of {images}")
    per_part = 1.0 - (1.0 - confidence) / 2  # Bonferroni: two intervals, each missing with at most alpha/2
    d_low, d_high = clopper_pearson(gains + losses, images, per_part)
    p_low, p_high = clopper_pearson(gains, gains + losses, per_part)
    # delta * (2 pi - 1) rises with pi and is linear in delta: its extremes lie on the box's corners
    low = min(d_low * (2 * p_low - 1), d_high * (2 * p_low - 1))
    high = max(d_low * (2 * p_high - 1), d_high * (2 * p_high - 1))
    return PairedChange(images, gains, losses, low, high, confidence)


def images_to_resolve(change: PairedChange, bound: float) -> int | None:
    """About how many images make the interval no wider than `bound`, were gains and losses as frequent as
    here (counts scaled and rounded, so an estimate): the smallest such count, found by doubling then
    bisection. None: no count up to MAX_IMAGES does (or bound <= 0)."""

    def width(n: int) -> float:
        scale = n / change.images
        gains, losses = round(change.gains * scale), round(change.losses * scale)
        return paired_change(gains, losses, n, change.confidence).width

    if bound <= 0:
        return None
    if change.width <= bound:
        return change.images
    low = change.images
    while low < MAX_IMAGES:  # double until enough: width(low) > bound >= width(high)
        high = min(low * 2, MAX_IMAGES)
        if width(high) <= bound:
            break
        low = high
    else:
        return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if width(mid) > bound else (low, mid)
    return high
