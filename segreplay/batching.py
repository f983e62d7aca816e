"""Packs Braze objects into /users/track requests under Braze's limits.

75 objects in total per request (or 75 per array on legacy contracts), one attributes
object per user per request (later updates merge into it), and a body under 4 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from segreplay.config import MAX_BODY_BYTES, MAX_OBJECTS_PER_REQUEST
from segreplay.jsonutil import dumps

# (source path, line number) of the Segment call an object came from.
Origin = tuple[str, int]

ARRAYS = ("attributes", "events", "purchases")
_ENVELOPE_BYTES = 64
_OBJECT_OVERHEAD_BYTES = 512  # identifiers, name, time and punctuation beyond the line


@dataclass(slots=True, eq=False)
class Batch:
    """One /users/track request: its arrays, where each object came from, the digests of
    its events and purchases with their users' state keys, and (once sealed) its body."""

    seq: int
    attributes: dict[str, dict] = field(default_factory=dict)  # user -> object
    attribute_origins: dict[str, list[Origin]] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    event_origins: list[Origin] = field(default_factory=list)
    event_digests: list[int | None] = field(default_factory=list)
    event_users: list[str] = field(default_factory=list)
    purchases: list[dict] = field(default_factory=list)
    purchase_origins: list[Origin] = field(default_factory=list)
    purchase_digests: list[int | None] = field(default_factory=list)
    purchase_users: list[str] = field(default_factory=list)
    # Users whose objects here must reach Braze after their earlier ones: the sink keeps
    # at most one batch in flight for each.
    ordered_users: set[str] = field(default_factory=set)
    size_estimate: int = _ENVELOPE_BYTES
    count: int = 0  # objects in all three arrays
    body: bytes = b""

    def __len__(self) -> int:
        return self.count

    def arrays(self) -> dict[str, list[dict]]:
        """The request's arrays, in body order; empty ones are left out."""
        arrays = {
            "attributes": list(self.attributes.values()),
            "events": self.events,
            "purchases": self.purchases,
        }
        return {name: objects for name, objects in arrays.items() if objects}

    def origin(self, array: str, index: int) -> Origin | None:
        """Where the object at `index` of `array` came from (the latest line for a merged
        attributes object: the one whose values won)."""
        try:
            if array == "attributes":
                user = list(self.attributes)[index]
                return self.attribute_origins[user][-1]
            return (self.event_origins if array == "events" else self.purchase_origins)[index]
        except (IndexError, KeyError):
            return None

    def seal(self) -> bytes:
        self.body = dumps(self.arrays())
        return self.body


class Batcher:
    """Fills one batch at a time; full batches wait in `take_sealed()` for the caller."""

    def __init__(
        self,
        limit_mode: str = "combined",
        max_objects: int = MAX_OBJECTS_PER_REQUEST,
        max_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._sealed: list[Batch] = []
        self._per_type = limit_mode == "per-type"
        self._max_objects = max_objects
        self._max_bytes = max_bytes
        self._seq = 0
        self.current = Batch(0)

    def _room(self, held: int, size: int) -> bool:
        """Whether one more object fits; `held` is how many its own array has."""
        current = self.current
        if current.size_estimate + size > self._max_bytes and current.count:
            return False
        return (held if self._per_type else current.count) < self._max_objects

    def flush(self) -> None:
        """Seal the current batch, if it holds anything, and start the next."""
        if self.current.count:
            batch = self.current
            batch.seal()
            self._seq += 1
            self.current = Batch(self._seq)
            self._sealed.append(batch)

    def take_sealed(self) -> list[Batch]:
        """The batches sealed since the last call, in order."""
        sealed, self._sealed = self._sealed, []
        return sealed

    def add_attributes(self, user: str, obj: dict, origin: Origin, size: int) -> Batch:
        """Merge into the user's attributes object in this batch, or start one."""
        batch = self.current
        existing = batch.attributes.get(user)
        if existing is not None and batch.size_estimate + size <= self._max_bytes:
            existing.update(obj)
            batch.attribute_origins[user].append(origin)
        else:
            if not self._room(len(batch.attributes), size + _OBJECT_OVERHEAD_BYTES):
                self.flush()
                batch = self.current
            batch.attributes[user] = obj
            batch.attribute_origins[user] = [origin]
            batch.count += 1
        batch.size_estimate += size + _OBJECT_OVERHEAD_BYTES
        return batch

    def add_event(self, user: str, obj: dict, origin: Origin, digest: int | None,
                  size: int) -> Batch:  # fmt: skip
        return self._add(user, obj, origin, digest, size, purchase=False)

    def add_purchase(self, user: str, obj: dict, origin: Origin, digest: int | None,
                     size: int) -> Batch:  # fmt: skip
        return self._add(user, obj, origin, digest, size, purchase=True)

    def _add(self, user: str, obj: dict, origin: Origin, digest: int | None, size: int,
             purchase: bool) -> Batch:  # fmt: skip
        batch = self.current
        size += _OBJECT_OVERHEAD_BYTES
        if not self._room(len(batch.purchases if purchase else batch.events), size):
            self.flush()
            batch = self.current
        if purchase:
            batch.purchases.append(obj)
            batch.purchase_origins.append(origin)
            batch.purchase_digests.append(digest)
            batch.purchase_users.append(user)
        else:
            batch.events.append(obj)
            batch.event_origins.append(origin)
            batch.event_digests.append(digest)
            batch.event_users.append(user)
        batch.size_estimate += size
        batch.count += 1
        return batch
