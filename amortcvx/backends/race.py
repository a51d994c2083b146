"""The faster of a few interchangeable ways to do the same work, by measurement as calls come in.

Used where the faster way depends on the machine and the problem and no rule picks it reliably: the layer's
``method="auto"`` (torch iterations or the C solver, :mod:`amortcvx.layers.layer`) and
:class:`~amortcvx.backends.persistent.ThreadedSolver` (a batch on one object or cut into parts on threads).
"""

from __future__ import annotations


class Race:
    """The faster of ``options`` by their last measured seconds per instance.

    Each option is timed on its first call; then each call takes the one whose last call was faster, and every
    ``probe``-th call the one timed longest ago (its time changes as the data do).
    """

    def __init__(self, options: tuple[str, ...], probe: int):
        if not options or probe < 2:
            raise ValueError(f"a race needs options and a probe interval of at least 2; got {options!r}, {probe!r}")
        self.options, self.probe = options, int(probe)
        self.seconds: dict[str, float] = {}
        self.calls = 0

    def pick(self) -> str:
        """The option for the next call: an untimed one first, then the fastest, and every ``probe``-th call the
        one timed longest ago."""
        self.calls += 1
        untimed = [o for o in self.options if o not in self.seconds]
        if untimed:
            return untimed[0]
        if self.calls % self.probe == 0:
            return next(iter(self.seconds))  # insertion order: the one recorded longest ago
        return min(self.options, key=self.seconds.__getitem__)

    def record(self, option: str, seconds: float) -> None:
        """The seconds per instance of a call that used ``option``."""
        self.seconds.pop(option, None)
        self.seconds[option] = seconds


__all__ = ["Race"]
