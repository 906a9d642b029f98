"""What a sign-flip null can resolve, and what it costs: p floors, flip counts, time estimates.

Re-exported by :mod:`otherview.inference`; ``otherview plan`` / ``exec`` call these before any work.
"""

from __future__ import annotations

import math

ALPHA = 0.05


#: Seconds an exact null may be estimated to take before :func:`check_null_budget` refuses it.
NULL_BUDGET_S = 600.0
#: Measured unit-flip rates (unit-flips per second) of the compiled op, by device and mode, at one
#: threshold; each further threshold costs ``_THRESHOLD_COST`` of that. CUDA: H100, exact N = 30,
#: U = 16,320: 2.1e12 (one threshold) / 1.7e12 (two); random 1e6 flips in 68 ms (2.4e11, N = 30).
#: CPU (2-core host, commit of this change): exact N = 20, U = 16,320: 7.3e8 (none) / 5.2e8 (two);
#: random N = 30: 1.9e8 (none) / 1.5e8 (two). The plain-PyTorch reference (no compiled op): 7e6
#: (200 random flips x 16,320 units in 0.50 s, host preparation included).
_RATES = {("cuda", "exact"): 2.1e12, ("cuda", "random"): 2.4e11,
          ("cpu", "exact"): 7.3e8, ("cpu", "random"): 1.9e8, ("reference", "exact"): 7e6,
          ("reference", "random"): 7e6}
_THRESHOLD_COST = {"cuda": 0.2, "cpu": 0.2, "reference": 0.1}
#: Random mode rebuilds S from its N pairs per flip: its rate is the N = 30 one times 30 / N.
_RANDOM_RATE_PAIRS = 30


class NullTooExpensive(ValueError):
    """The null asked for would run longer than the budget; the message gives the way out."""


def min_p(method: str, n_pairs: int, flips: int) -> float:
    """Return the smallest p-value a sign-flip null can give: 1 / (number of flips, identity included).

    ``"exact"``: 2^-(N-1) (all flips, pair 0's sign held); ``"random"``: 1 / flips. Family-wise,
    step-down and count p-values share the floor.
    """
    if method == "exact":
        return 2.0 ** -max(n_pairs - 1, 0)
    if method == "random":
        return 1.0 / max(int(flips), 1)
    raise ValueError(f'method must be "exact" or "random", got "{method}"')


def required_flips(n_units: int, alpha: float) -> int:
    """Return the random-mode flip count whose floor lets one unit pass BH and Bonferroni at alpha.

    ``1 / flips <= alpha / n_units``, rounded up to 1, 2 or 5 times a power of ten, at least 10,000
    (16,320 units at 0.05: 500,000 flips, ~35 ms on an H100, ~1 min on a 2-core CPU).
    """
    need = max(10_000, math.ceil(n_units / alpha))
    mag = 10 ** (len(str(need)) - 1)
    for step in (1, 2, 5, 10):
        if step * mag >= need:
            return step * mag
    return 10 * mag  # pragma: no cover


def null_resolution(method: str, n_pairs: int, n_units: int, flips: int, alpha: float) -> dict:
    """Return whether a null's p-value floor is fine enough for the corrections at alpha.

    The floor must reach ``alpha / n_units``: below it a single unit can pass Benjamini-Hochberg's
    first step and Bonferroni; above it BH rejects nothing unless ``ceil(floor * n_units / alpha)``
    units tie at the floor (200 flips, 16,320 units: 1,632). Max-T family-wise p-values need only
    ``floor <= alpha`` but are then coarse.

    Returns
    -------
    dict
        ``min_p`` (the floor), ``needed_p`` (alpha / n_units), ``enough`` (bool), ``flips_needed``
        (random flips that would be enough; None in exact mode, whose floor is fixed by N),
        ``ties_needed`` (units BH needs tied at the floor to reject anything) and ``message``.
    """
    floor = min_p(method, n_pairs, flips)
    needed = alpha / max(n_units, 1)
    enough = floor <= needed * (1 + 1e-12)
    ties = max(1, math.ceil(floor * n_units / alpha - 1e-9))
    out = {"min_p": floor, "needed_p": needed, "enough": bool(enough),
           "flips_needed": None if method == "exact" else required_flips(n_units, alpha), "ties_needed": ties}
    if enough:
        out["message"] = f"smallest p {floor:.3g} <= alpha / units = {needed:.3g}: fine enough for BH and FWER"
    elif method == "exact":
        out["message"] = (f"exact null with {n_pairs} pairs: smallest p {floor:.3g} > alpha / units = {needed:.3g}; "
                          f"no flip count can do better with {n_pairs} pairs: BH rejects only when >= {ties} "
                          f"units tie at the floor, and family-wise p-values are "
                          f"{'coarse' if floor <= alpha else 'never <= alpha'}. More pairs lower the floor.")
    else:
        out["message"] = (f"random null with {flips} flips: smallest p {floor:.3g} > alpha / units = {needed:.3g}; "
                          f"BH rejects only when >= {ties} units tie at the floor. "
                          f"Use null.flips = {out['flips_needed']} (or method = \"exact\" where affordable).")
    return out


def estimate_null_seconds(mode: str, n_pairs: int, n_units: int, n_flips: int, device_type: str,
                          n_thresholds: int = 2, passes: int = 1) -> float:
    """Return the estimated seconds of a sign-flip null, from the measured rates of ``_RATES``.

    Parameters
    ----------
    mode : {"exact", "random"}
    n_pairs, n_units, n_flips : int
        ``n_flips`` is ignored in exact mode (2^(N-1)).
    device_type : {"cuda", "cpu", "reference"}
        ``"reference"``: no compiled op (the plain-PyTorch fallback).
    n_thresholds : int
        Rows of ``count_hist``.
    passes : int
        Passes over the flips (step-down may need more than one; each is at most the first's cost).
    """
    kind = device_type if device_type in ("cuda", "reference") else "cpu"
    flips = 2.0 ** max(n_pairs - 1, 0) if mode == "exact" else float(n_flips)
    rate = _RATES[(kind, mode)]
    if mode == "random" and kind != "reference":
        rate *= _RANDOM_RATE_PAIRS / max(n_pairs, 1)
    rate /= 1.0 + _THRESHOLD_COST[kind] * max(n_thresholds - 1, 0)
    return flips * n_units * passes / rate


def check_null_budget(mode: str, n_pairs: int, n_units: int, n_flips: int, device_type: str,
                      alpha: float = ALPHA, budget_s: float = NULL_BUDGET_S, n_thresholds: int = 2) -> float:
    """Return the estimated seconds of the null, or raise :class:`NullTooExpensive` past ``budget_s``.

    Called before any work (``otherview plan`` / ``exec``). The message gives the estimate and the
    way out: random mode with a flip count fine enough for alpha and the unit count, and its time.
    """
    secs = estimate_null_seconds(mode, n_pairs, n_units, n_flips, device_type, n_thresholds)
    if secs <= budget_s:
        return secs
    flips = required_flips(n_units, alpha)
    where = f"{n_pairs} pairs x {n_units} units, " + (f"2^{n_pairs - 1} flips" if mode == "exact" else f"{n_flips} flips")
    head = (f"null.method = \"{mode}\": {where} is estimated at {_duration(secs)} on {device_type} "
            f"(budget {_duration(budget_s)}); ")
    alt = estimate_null_seconds("random", n_pairs, n_units, flips, device_type, n_thresholds)
    if mode == "exact" and alt <= budget_s:
        way = f"use null.method = \"random\" with null.flips = {flips} (~{_duration(alt)}, smallest p {1 / flips:.2g})"
    else:
        way = (f"{flips} random flips (the fewest whose smallest p reaches alpha / units) would take "
               f"~{_duration(alt)} here")
    if device_type != "cuda":
        way += "; or run on a GPU" + (" or build the compiled op (pip install --no-build-isolation -e .)"
                                   if device_type == "reference" else "")
    raise NullTooExpensive(head + way)


def _duration(s: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"
