"""The faster of a few interchangeable ways to do the same work, by measurement as calls come in.

Used where the faster way depends on the machine and the problem and no rule picks it reliably: the layer's
``method="auto"`` (torch iterations or the C solver, :mod:`amortcvx.layers.layer`) and
:class:`~amortcvx.backends.persistent.ThreadedSolver` (a batch on one object or cut into parts on threads).
"""

from __future__ import annotations

import math

PROBE_SHARE = 0.02
"""The most time, as a share of the calls' time, that probing an option slower by a measured factor ``r`` adds: a
probe costs ``r - 1`` calls of the faster one, so it comes no sooner than ``(r - 1) / PROBE_SHARE`` calls after the
last. Measured (the package's cold path on mpc large with OSQP, batch 1024, calls after the race settled, one object
against two threads' parts, ``r`` about 1.9): probing every 16th call made a stream of 48 calls 5% slower (mean 1.234
against 1.177 ms per instance without probes); every 45th call, 1% over 96 calls (mean 1.152 against a median of
1.139)."""


class Race:
    """The faster of ``options`` by their last measured seconds per instance.

    Each option is timed on its first call; then each call takes the one whose last call was faster, and the one
    timed longest ago is probed again (its time changes as the data do) after ``probe`` calls, or, with a
    ``share``, after more where it was much slower, so that probing adds at most about that share of the time
    (:meth:`probe_interval`). A ``share`` needs recorded times that do not overstate an option's pace (a first call's
    one-time costs would make a ratio, and the wait for the next probe, too large): None probes every ``probe``
    calls whatever the ratio.
    """

    def __init__(self, options: tuple[str, ...], probe: int, share: float | None = PROBE_SHARE):
        if not options or probe < 2 or not (share is None or share > 0):
            raise ValueError(f"a race needs options, a probe interval of at least 2 and a positive share or None; got "
                             f"{options!r}, {probe!r}, {share!r}")
        self.options, self.probe, self.share = options, int(probe), share
        self.seconds: dict[str, float] = {}
        self.since_probe = 0

    def probe_interval(self, slow: str, fast: str) -> int:
        """Calls between probes of ``slow`` while ``fast`` is faster: ``probe``, or ``(r - 1) / share`` for the
        measured ratio ``r`` of their times where that is more (with a ``share``)."""
        if self.share is None:
            return self.probe
        ratio = self.seconds[slow] / max(self.seconds[fast], 1e-300)
        return max(self.probe, math.ceil((ratio - 1.0) / self.share))

    def pick(self) -> str:
        """The option for the next call: an untimed one first, then the fastest, and the one timed longest ago
        once every :meth:`probe_interval` calls."""
        untimed = [o for o in self.options if o not in self.seconds]
        if untimed:
            return untimed[0]
        fastest = min(self.options, key=self.seconds.__getitem__)
        stale = next(iter(self.seconds))  # insertion order: the one recorded longest ago
        self.since_probe += 1
        if stale != fastest and self.since_probe >= self.probe_interval(stale, fastest):
            self.since_probe = 0
            return stale
        return fastest

    def record(self, option: str, seconds: float) -> None:
        """The seconds per instance of a call that used ``option``."""
        self.seconds.pop(option, None)
        self.seconds[option] = seconds


__all__ = ["Race"]
