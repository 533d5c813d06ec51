"""Group commit: work of concurrent callers shares transactions instead of queueing for one
each: files stored by C-STORE associations (``storage/group_commit.py``), the audit records of
reads (``storage/audit.py``).

The first caller to arrive becomes the leader: it takes every item waiting (its own first, up
to a maximum) and runs them as one group: one transaction, one commit (one fsync of the SQLite
log). Callers that arrive meanwhile wait; when the leader's group is done it hands the lead to
the first of them, who takes all that gathered while it waited. So under load each commit
serves several callers, and alone a caller pays nothing more than before. A result is final
only after the commit: nobody is answered before their work is durable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

T = TypeVar("T")
R = TypeVar("R")


class _Waiting(Generic[T, R]):
    """A caller's item; ``done`` (an event made only for a caller that waits: one that leads
    at once is never woken) is set when it is to lead or its group is finished."""

    __slots__ = ("done", "finished", "item", "leads", "outcome", "weight")

    def __init__(self, item: T, weight: int) -> None:
        self.item = item
        self.weight = weight
        self.done: threading.Event | None = None
        self.leads = False  # woken to lead the next group
        self.finished = False
        self.outcome: R | BaseException | None = None


class Groups(Generic[T, R]):
    """Runs the items of many threads, several per call of ``run`` (one transaction):
    ``run(items)`` answers each item's result or the exception its caller raises, in order;
    a group holds at most ``max_weight`` (the sum of ``weight(item)``, at least one item)."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | BaseException]],
        max_weight: int,
        weight: Callable[[T], int] = lambda _: 1,
    ) -> None:
        self._run = run
        self.max_weight = max_weight
        self._weight = weight
        self._lock = threading.Lock()
        self._waiting: list[_Waiting[T, R]] = []
        self._leader = False
        self._in_flight = 0
        # What was run, in how many groups: for the logs and the tests.
        self.items = 0
        self.groups = 0

    def submit(self, item: T) -> R:
        """``item``'s result once its group is committed; raises what ``run`` answered for
        it, or what ``run`` raised for its whole group."""
        me: _Waiting[T, R] = _Waiting(item, self._weight(item))
        with self._lock:
            self._waiting.append(me)
            self._in_flight += me.weight
            me.leads = not self._leader
            if not me.leads:
                me.done = threading.Event()
            self._leader = True
        try:
            if me.done is not None:
                me.done.wait()  # run by a leader, or made the next leader
            if not me.finished:
                self._lead(me)
        finally:
            with self._lock:
                self._in_flight -= me.weight
        if isinstance(me.outcome, BaseException):
            raise me.outcome
        return cast(R, me.outcome)

    def in_flight(self) -> int:
        """The weight of the items submitted and not finished yet: waiting for a leader, or
        being run."""
        with self._lock:
            return self._in_flight

    def _lead(self, me: _Waiting[T, R]) -> None:
        """Run the items waiting (``me`` first: a leader is always the longest waiting), then
        pass the lead to the first that arrived meanwhile, whatever happened."""
        with self._lock:
            group: list[_Waiting[T, R]] = []
            weight = 0
            for waiting in self._waiting:
                if group and weight + waiting.weight > self.max_weight:
                    break
                group.append(waiting)
                weight += waiting.weight
            del self._waiting[: len(group)]
        assert group[0] is me
        outcomes: Sequence[R | BaseException] = [
            RuntimeError("the group's leader was interrupted")
        ] * len(group)
        try:
            outcomes = self._run([w.item for w in group])
        except Exception as error:  # noqa: BLE001 (every waiting caller must get an answer)
            outcomes = [error] * len(group)
        finally:
            with self._lock:
                self.items += len(group)
                self.groups += 1
                if self._waiting:
                    self._waiting[0].leads = True
                    self._wake(self._waiting[0])
                else:
                    self._leader = False
            for waiting, outcome in zip(group, outcomes, strict=True):
                waiting.outcome = outcome
                waiting.finished = True
                if waiting is not me:
                    self._wake(waiting)

    @staticmethod
    def _wake(waiting: _Waiting[T, R]) -> None:
        """Every caller but one leading at once waits on its event (made when it arrived)."""
        assert waiting.done is not None
        waiting.done.set()
