"""The ``lerf/locate`` loop (lerf_ros/action/Locate), without ROS: ask, report, wait, until found or time out.

``LocateLoop.run`` drives one goal. ``ask()`` is the query node's own answer path (the same engine call and
reply as ``lerf/query``: a ``Query.Response``-shaped object with ``result``, ``found``, ``confidence``,
``relevancy``, ``message``); the loop decides only when to ask again and when to stop:

- an answer with RESULT_FOUND ends the goal at once ("succeeded");
- RESULT_ERROR ends it at once ("aborted"): the node cannot answer (a failed query, no model and none
  coming), and asking again would only repeat the error;
- RESULT_NOT_FOUND and RESULT_NOT_READY are asked again until ``timeout_s`` (steady clock) passes
  ("aborted", the message names the timeout);
- a cancel ("canceled") or the node stopping ("aborted") ends it between queries, within ``POLL_S``.

Between answers the loop waits ``period_s``, or as long as the last answer took if that was longer: the
engine's lock lets a query in ahead of training steps, so back-to-back queries would stop training, which
is what must show the target.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lerf_ros.ros.messages import RESULTS

#: Least wait between the end of one answer and the next query of a goal, s.
LOCATE_PERIOD_S = 0.5
#: How often a waiting goal checks for a cancel or a stopping node, s.
POLL_S = 0.05


@dataclass(frozen=True)
class Progress:
    """What a feedback message reports: the best answer so far (highest (found, confidence, relevancy)),
    the latest answer, queries asked, seconds since the goal started."""

    best: object
    last: object
    attempts: int
    elapsed_s: float


@dataclass(frozen=True)
class Outcome:
    """How a goal ended: ``state`` "succeeded" | "aborted" | "canceled"; ``answer`` the answer the result
    carries (the finding one when succeeded, else the latest; None when no query was asked);
    ``message`` for the result."""

    state: str
    answer: object | None
    attempts: int
    message: str


def _rank(answer) -> tuple[bool, float, float]:
    return (answer.result == RESULTS["found"], float(answer.confidence), float(answer.relevancy))


class LocateLoop:
    """One goal's loop. ``cancelled`` / ``stopping``: polled between queries; ``clock``: steady seconds;
    ``wait(seconds)``: sleep that may return early (the node passes its stop event's ``wait``)."""

    def __init__(self, ask: Callable[[], object], feedback: Callable[[Progress], None], *,
                 cancelled: Callable[[], bool], stopping: Callable[[], bool],
                 period_s: float = LOCATE_PERIOD_S, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[float], object] | None = None):
        self._ask, self._feedback = ask, feedback
        self._cancelled, self._stopping = cancelled, stopping
        self._period_s = float(period_s)
        self._clock = clock
        self._wait = wait if wait is not None else threading.Event().wait

    def run(self, timeout_s: float) -> Outcome:
        """Ask until found, failed, cancelled, stopped or ``timeout_s`` (> 0) has passed since the call."""
        if not timeout_s > 0.0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        start = self._clock()
        best = last = None
        attempts = 0
        while True:
            if self._stopping():
                return Outcome("aborted", last, attempts, "the query node is shutting down")
            if self._cancelled():
                return Outcome("canceled", last, attempts, f"cancelled after {attempts} queries")
            if self._clock() - start >= timeout_s:
                why = last.message if last is not None else "no answer"
                return Outcome("aborted", last, attempts, f"timeout: not found within {timeout_s:g} s "
                                                          f"({attempts} queries); last answer: {why}")
            asked = self._clock()
            last = self._ask()
            took = self._clock() - asked
            attempts += 1
            if best is None or _rank(last) > _rank(best):
                best = last
            self._feedback(Progress(best, last, attempts, self._clock() - start))
            if last.result == RESULTS["found"]:
                return Outcome("succeeded", last, attempts, last.message)
            if last.result == RESULTS["error"]:
                return Outcome("aborted", last, attempts, last.message)
            self._pause(max(self._period_s, took), start + timeout_s)

    def _pause(self, seconds: float, deadline: float) -> None:
        """Wait ``seconds`` (not past ``deadline``), in ``POLL_S`` slices so a cancel or stop is seen soon."""
        end = min(self._clock() + seconds, deadline)
        while not (self._cancelled() or self._stopping()):
            left = end - self._clock()
            if left <= 0.0:
                return
            self._wait(min(POLL_S, left))
