"""Request packing: Braze's limits hold for any mix of objects."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from segreplay.batching import Batcher

# (kind, user, size of the line the object came from)
_objects = st.lists(
    st.tuples(
        st.sampled_from(["attributes", "event", "purchase"]),
        st.integers(min_value=0, max_value=30),
        st.sampled_from([200, 2_000, 300_000]),
    ),
    max_size=600,
)


def _pack(items, limit_mode, max_bytes=4_000_000):
    batcher = Batcher(limit_mode, max_bytes=max_bytes)
    sealed = []
    for seq, (kind, user_number, size) in enumerate(items):
        user = f"e:u{user_number}"
        padding = "x" * max(size - 150, 0)
        if kind == "attributes":
            obj = {"external_id": f"u{user_number}", f"k{seq}": padding[:200] or "v"}
            batcher.add_attributes(user, obj, ("f", seq), size)
        else:
            obj = {
                "external_id": f"u{user_number}",
                "name": f"e{seq}",
                "time": "t",
                "properties": {"p": padding},
            }
            add = batcher.add_event if kind == "event" else batcher.add_purchase
            add(user, obj, ("f", seq), seq, size)
        sealed += batcher.take_sealed()
    batcher.flush()
    return sealed + batcher.take_sealed()


@settings(max_examples=60, deadline=None)
@given(_objects, st.sampled_from(["combined", "per-type"]))
def test_no_request_over_the_limits(items, limit_mode):
    for batch in _pack(items, limit_mode):
        body = orjson.loads(batch.body)
        sizes = {name: len(objects) for name, objects in body.items()}
        if limit_mode == "combined":
            assert sum(sizes.values()) <= 75
        else:
            assert all(size <= 75 for size in sizes.values())
        assert len(batch.body) < 4_000_000
        users = [obj["external_id"] for obj in body.get("attributes", [])]
        assert len(users) == len(set(users)), "one attributes object per user per request"


@settings(max_examples=60, deadline=None)
@given(_objects)
def test_every_event_in_exactly_one_request_in_order(items):
    sealed = _pack(items, "combined")
    names = [e["name"] for b in sealed for e in orjson.loads(b.body).get("events", [])]
    expected = [f"e{seq}" for seq, (kind, _, _) in enumerate(items) if kind == "event"]
    assert names == expected
    keys = [k for b in sealed for a in orjson.loads(b.body).get("attributes", []) for k in a]
    expected_keys = [f"k{seq}" for seq, (kind, _, _) in enumerate(items) if kind == "attributes"]
    assert sorted(k for k in keys if k != "external_id") == sorted(expected_keys)


@given(_objects)
def test_the_same_input_packs_the_same_bodies(items):
    assert [b.body for b in _pack(items, "combined")] == [b.body for b in _pack(items, "combined")]


def test_merged_attributes_collapse_to_the_latest_value():
    batcher = Batcher()
    batcher.add_attributes("e:u1", {"external_id": "u1", "plan": "free"}, ("f", 1), 100)
    batcher.add_attributes("e:u1", {"external_id": "u1", "plan": "pro"}, ("f", 2), 100)
    assert batcher.take_sealed() == []
    batcher.flush()
    sealed = batcher.take_sealed()
    assert orjson.loads(sealed[0].body) == {"attributes": [{"external_id": "u1", "plan": "pro"}]}
    assert sealed[0].origin("attributes", 0) == ("f", 2)


def test_a_body_near_the_size_limit_starts_a_new_request():
    sealed = _pack([("event", 1, 300_000)] * 30, "combined", max_bytes=1_000_000)
    assert [len(b) for b in sealed] == [3] * 10
