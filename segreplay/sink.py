"""What the pipeline hands a sink and gets back: sealed batches in, `Answer`s out.

The pipeline's loop submits batches and pulls answers between chunks of lines; a sink
never calls back into the pipeline. `DrySink` answers at once and sends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from segreplay.batching import Batch


@dataclass(slots=True)
class Refusal:
    """Braze refused one object of a request (or the whole request: index None)."""

    array: str | None
    index: int | None
    reason: str


@dataclass(slots=True)
class Answer:
    """Braze's answer to one batch: the bodies it answered, as sent (the batch's body, or
    its parts after a 413 split), the objects it refused, and what it took to get there."""

    batch: Batch
    bodies: list[bytes]
    refusals: list[Refusal] = field(default_factory=list)
    retries: int = 0
    rate_limited: int = 0


class Sink(Protocol):
    def has_room(self, batch: Batch) -> bool:
        """Whether `batch` may be submitted now (a free slot, and none of its ordered
        users has a request in flight)."""

    def submit(self, batch: Batch) -> None: ...

    def answers(self, timeout: float | None = 0) -> list[Answer]:
        """The answers that arrived, without waiting (timeout 0), or waiting up to
        `timeout` seconds for one (None: until one arrives). Raises the error that
        stopped delivery once every request in flight has answered."""

    @property
    def in_flight(self) -> int: ...

    error: BaseException | None
    """What stopped delivery (a bad key, Braze unreachable), once something has."""

    unsent: int
    """Batches submitted, then abandoned by a stop before they were ever sent."""

    def notices(self) -> list:
        """Failed attempts (retry.RetryNotice) since the last call, to tell the user."""

    @property
    def budget_waits(self) -> int:
        """Times a request waited for the request budget."""

    def stop(self) -> None:
        """Start no new attempt; requests already on the wire may still answer."""

    def close(self) -> None: ...


class DrySink:
    """A dry run: every request is acknowledged at once, nothing leaves the machine."""

    error = None
    unsent = 0

    def __init__(self) -> None:
        self._answers: list[Answer] = []

    def has_room(self, batch: Batch) -> bool:
        return True

    def submit(self, batch: Batch) -> None:
        self._answers.append(Answer(batch, [batch.body]))

    def answers(self, timeout: float | None = 0) -> list[Answer]:
        answers, self._answers = self._answers, []
        return answers

    @property
    def in_flight(self) -> int:
        return len(self._answers)

    def notices(self) -> list:
        return []

    budget_waits = 0

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass
