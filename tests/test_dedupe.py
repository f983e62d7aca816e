"""Dedupe decisions: type-strict comparison, event-time order, idempotence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from segreplay.dedupe import decide_attributes, message_digest, same_value
from segreplay.jsonutil import dumps_canonical

_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(-3, 3, allow_nan=False),
    st.sampled_from(["a", "b", "1"]), st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.sampled_from(["x", "y"]), st.integers(0, 2), max_size=2),
)  # fmt: skip
_times = st.sampled_from([f"2024-03-0{d}T00:00:00.000Z" for d in range(1, 8)])
_updates = st.lists(
    st.tuples(st.dictionaries(st.sampled_from(["plan", "n", "tags"]), _values), _times),
    max_size=12,
)


def _apply(updates, view=None):
    """Decide each update in turn, as the ledger does; returns (view, everything sent)."""
    view = dict(view or {})
    sent = []
    for values, time in updates:
        decision = decide_attributes(view, values, time)
        view.update(decision.effects)
        sent.append(decision.send)
    return view, sent


@given(_updates)
def test_replaying_the_same_updates_sends_nothing(updates):
    view, _ = _apply(updates)
    _, sent_again = _apply(updates, view)
    assert all(not sent for sent in sent_again)


@given(_updates)
def test_each_key_ends_at_its_newest_value_in_any_reading_order(updates):
    view, _ = _apply(updates)
    assert _apply(list(reversed(updates)))[0] == view
    for key, (value, time) in view.items():
        times = [t for values, t in updates if key in values]
        assert time == max(times)
        # Lines of that newest time that disagree: the largest value wins, whatever the
        # order they were read in.
        newest = [dumps_canonical(v[key]) for v, t in updates if key in v and t == time]
        assert dumps_canonical(value) == max(newest)


@given(_values, _values)
def test_same_value_is_type_strict(a, b):
    if same_value(a, b):
        assert type(a) is type(b)


def test_same_value_examples():
    assert not same_value(1, 1.0)
    assert not same_value(1, True)
    assert not same_value(1, "1")
    assert same_value({"x": 1, "y": 2}, {"y": 2, "x": 1})
    assert not same_value([1, 2], [2, 1])


def test_null_unsets_only_what_was_sent():
    decision = decide_attributes(None, {"coupon": None}, "2024-03-01T00:00:00.000Z")
    assert decision.send == {} and decision.unchanged == 1
    view = {"coupon": ["SAVE", "2024-03-01T00:00:00.000Z"]}
    decision = decide_attributes(view, {"coupon": None}, "2024-03-02T00:00:00.000Z")
    assert decision.send == {"coupon": None}


def test_message_digests_are_stable_64_bit_and_per_object():
    first = message_digest("ajs-1", 0)
    assert first == message_digest("ajs-1", 0)
    assert first != message_digest("ajs-1", 1) != message_digest("ajs-2", 0)
    assert -(2**63) <= first < 2**63
