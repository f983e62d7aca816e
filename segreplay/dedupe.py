"""Pure dedupe decisions: which attribute values to send, and event identity digests.

A user's attribute view is {key: [value, event time]}: the last value decided for the key
and the event time of the newest line that set or confirmed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import blake2b

from segreplay.jsonutil import dumps_canonical


def message_digest(message_id: str, index: int) -> int:
    """A 64-bit digest naming the index-th Braze object made from one Segment call.

    Braze has no idempotency key, so this is what stops an event being stored twice.
    64 bits: the chance of any collision among 10 million messageIds is below 3e-6.
    """
    key = message_id if index == 0 else f"{message_id}#{index}"
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "little", signed=True)


def same_value(a, b) -> bool:
    """Type-strict equality: 1, 1.0, True and "1" all differ; key order does not matter."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict | list):
        return dumps_canonical(a) == dumps_canonical(b)
    return a == b


@dataclass(slots=True)
class AttributeDecision:
    send: dict = field(default_factory=dict)  # key -> value to send now
    effects: dict = field(default_factory=dict)  # key -> [value, time] to remember
    unchanged: int = 0  # same value as last sent: nothing sent, time moves forward
    outdated: int = 0  # older than the value we hold: dropped


def decide_attributes(view: dict | None, updates: dict, time: str) -> AttributeDecision:
    """Compare one call's attribute `updates` at event `time` with the user's `view`."""
    decision = AttributeDecision()
    for key, value in updates.items():
        prior = view.get(key) if view else None
        if prior is not None:
            if time < prior[1]:
                decision.outdated += 1
                continue
            if same_value(prior[0], value):
                decision.unchanged += 1
            elif time == prior[1] and dumps_canonical(value) <= dumps_canonical(prior[0]):
                # Two lines of one millisecond disagree. The larger value wins whichever
                # is read first, so reading a file again never flips the value back.
                decision.outdated += 1
                continue
            else:
                decision.send[key] = value
        elif value is None:
            # Unsetting a key never set costs a data point for nothing.
            decision.unchanged += 1
        else:
            decision.send[key] = value
        decision.effects[key] = [value, time]
    return decision
