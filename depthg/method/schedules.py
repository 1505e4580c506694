"""DepthG's two decays, counted in training iterations: the depth term's weight and shift (R5) and the
number of FPS samples per side (R6) (docs/method.md §8).

Both are pure functions of the 0-based iteration, so a resumed run continues them exactly. Paper mode
counts one decay every ``every`` iterations; the released timing (docs/fidelity.md §3.9-3.10) acts one
iteration late and, for the sample count, once more at iteration 0 (:func:`decay_events`).
"""

from __future__ import annotations

from dataclasses import dataclass

from depthg.utils import DepthGError

__all__ = ["ScheduleError", "decay_events", "DepthDecaySchedule", "SampleCountSchedule"]


class ScheduleError(DepthGError, ValueError):
    """A schedule's settings or the iteration asked for are out of range."""


def decay_events(iteration: int, every: int, after_step: bool = False, at_start: bool = False) -> int:
    """How many decays act at 0-based ``iteration`` with one every ``every`` iterations (0 = never).

    Paper: iteration // every. Released timing (docs/fidelity.md §3.9-3.10): ``after_step`` delays each
    decay by one iteration, ``at_start`` adds one at iteration 0.
    """
    t = iteration - 1 if after_step else iteration
    if every <= 0 or t < 0:
        return 0
    return t // every + (1 if at_start else 0)


@dataclass(frozen=True)
class DepthDecaySchedule:
    """Depth weight and shift decay w <- factor*w, b <- factor*b (docs/method.md §8.1, R5).

    ``.at(iteration)`` gives (w_depth, b_depth) at that 0-based iteration: w0 * factor**k with k =
    :func:`decay_events` (``every`` in iterations, 0 = off; ``after_step``: the released timing).
    """

    weight0: float
    shift0: float
    factor: float = 1.0
    every: int = 0
    after_step: bool = False

    def __post_init__(self) -> None:
        if self.every < 0 or self.factor < 0:
            raise ScheduleError(f"DepthDecaySchedule needs every >= 0 and factor >= 0, got every={self.every}, "
                                f"factor={self.factor}")

    def events(self, iteration: int) -> int:
        """Number of decays that act at ``iteration``."""
        if iteration < 0:
            raise ScheduleError(f"iteration must be >= 0, got {iteration}")
        return decay_events(iteration, self.every, self.after_step)

    def at(self, iteration: int) -> tuple[float, float]:
        scale = self.factor ** self.events(iteration)
        return self.weight0 * scale, self.shift0 * scale


@dataclass(frozen=True)
class SampleCountSchedule:
    """The FPS sample-count decay S <- floor(factor * S) (docs/method.md §8.2, R6).

    ``.at(iteration)`` is the n_side at that 0-based iteration; timing as :func:`decay_events`;
    ``min_side`` floors the count (the released floor is 0, which would empty the loss).
    """

    n_side0: int
    factor: float = 1.0
    every: int = 0
    min_side: int = 1
    after_step: bool = False
    at_start: bool = False

    def __post_init__(self) -> None:
        if self.n_side0 < 1 or self.every < 0 or not 0.0 < self.factor <= 1.0:
            raise ScheduleError(f"SampleCountSchedule needs n_side0 >= 1, every >= 0 and 0 < factor <= 1; "
                                f"got n_side0={self.n_side0}, every={self.every}, factor={self.factor}")

    def at(self, iteration: int) -> int:
        if iteration < 0:
            raise ScheduleError(f"iteration must be >= 0, got {iteration}")
        n = self.n_side0
        for _ in range(decay_events(iteration, self.every, self.after_step, self.at_start)):
            new = max(int(n * self.factor), self.min_side)
            if new == n:
                break
            n = new
        return n
