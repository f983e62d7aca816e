"""The ledger without HTTP or files to read: decisions wait in memory until their batch
is acknowledged, and checkpoints never pass a line whose batch is unanswered."""

from __future__ import annotations

import pytest
from conftest import identify, track

from segreplay.batching import Batcher
from segreplay.config import MappingOptions
from segreplay.dedupe import message_digest
from segreplay.ledger import Ledger
from segreplay.mapping import map_call
from segreplay.reporting import Summary
from segreplay.source import ArchiveFile
from segreplay.state import State

T1, T2, T3 = "2024-03-01T00:00:00.000Z", "2024-03-02T00:00:00.000Z", "2024-03-03T00:00:00.000Z"
OPTIONS = MappingOptions()


class World:
    """A ledger over a fresh state, fed Segment lines of one file, 75 objects a batch."""

    def __init__(self, tmp_path) -> None:
        self.state = State(str(tmp_path / "state.sqlite"))
        self.run_id = self.state.start_run(T1)
        self.batcher = Batcher()
        self.summary = Summary()
        self.ledger = Ledger(self.state, self.run_id, OPTIONS, self.batcher, self.summary)
        self.archive = ArchiveFile(str(tmp_path / "a.gz"), size=1000, mtime_ns=1)
        self.file = self.ledger.open_file(self.archive, "fp", OPTIONS.decides_lines(), 0)
        self.line = 0

    def decide(self, *records: dict) -> list:
        """Decide the lines as one chunk; return the batches that sealed."""
        chunk = []
        for record in records:
            self.line += 1
            chunk.append((self.line, 100, map_call(record, OPTIONS)))
        for _ in self.ledger.decide_chunk(self.file, chunk):
            pass
        return self.batcher.take_sealed()

    def flush(self):
        self.batcher.flush()
        [batch] = self.batcher.take_sealed()
        return batch

    def lines_acked(self) -> int:
        [checkpoint] = self.state.checkpoints()
        return checkpoint.lines_acked


@pytest.fixture
def world(tmp_path):
    world = World(tmp_path)
    yield world
    world.state.close()


def test_a_decision_reaches_the_state_only_when_its_batch_is_acknowledged(world):
    world.decide(identify("u1", T1, plan="pro"), track("Played", "u1", T1, messageId="m1"))
    batch = world.flush()
    world.ledger.commit()
    assert world.state.user_attributes("e:u1") is None
    assert world.state.prefetch([], [message_digest("m1", 0)]) == set()
    assert world.lines_acked() == 0
    world.ledger.settle([(batch, set())])
    assert world.state.user_attributes("e:u1") == {"plan": ["pro", T1]}
    assert world.state.prefetch([], [message_digest("m1", 0)]) == {message_digest("m1", 0)}
    assert world.lines_acked() == 2


def test_what_braze_refused_is_not_recorded_as_delivered(world):
    world.decide(identify("u1", T1, plan="pro"), track("Played", "u1", T1, messageId="m1"),
                 track("Played", "u1", T1, messageId="m2"))  # fmt: skip
    batch = world.flush()
    world.ledger.settle([(batch, {("attributes", "e:u1"), ("events", 0)})])
    assert world.state.user_attributes("e:u1") is None  # "pro" never stored
    digests = [message_digest("m1", 0), message_digest("m2", 0)]
    assert world.state.prefetch([], digests) == {message_digest("m2", 0)}


def test_the_checkpoint_stops_before_the_first_line_of_an_unanswered_batch(world):
    first = world.decide(*[track("E", f"u{n}", T1, messageId=f"m{n}") for n in range(80)])
    assert [len(batch) for batch in first] == [75]
    second = world.flush()  # lines 76-80
    world.ledger.settle([(second, set())])  # answered first: Braze answers in any order
    assert world.lines_acked() == 0
    world.ledger.settle([(first[0], set())])
    assert world.lines_acked() == 80


def test_an_event_waiting_for_its_answer_is_not_sent_again(world):
    world.decide(track("E", "u1", T1, messageId="m1"))
    world.decide(track("E", "u1", T1, messageId="m1"))  # a later chunk, before any answer
    batch = world.flush()
    assert len(batch.events) == 1
    assert world.summary.duplicates == 1


def test_a_newer_repeat_with_no_batch_moves_the_time_at_the_next_commit(world):
    world.decide(identify("u1", T1, plan="pro"))
    world.ledger.settle([(world.flush(), set())])
    world.decide(identify("u1", T3, plan="pro"))  # the same value, newer: nothing to send
    assert world.batcher.current.count == 0
    world.ledger.commit()
    assert world.state.user_attributes("e:u1") == {"plan": ["pro", T3]}
    world.decide(identify("u1", T2, plan="free"))  # older than T3 now: dropped
    assert world.batcher.current.count == 0 and world.summary.attributes_outdated == 1


def test_a_users_attribute_batches_are_ordered_and_events_alone_are_not(world):
    world.decide(identify("u1", T1, plan="pro"), track("E", "u2", T1, messageId="m1"))
    batch = world.flush()
    assert batch.ordered_users == {"e:u1"}


def test_decisions_see_values_still_waiting_for_an_answer(world):
    world.decide(identify("u1", T3, plan="pro"))
    pending = world.flush()
    world.decide(identify("u1", T2, plan="free"))  # older than the unanswered "pro"
    assert world.batcher.current.count == 0 and world.summary.attributes_outdated == 1
    world.ledger.settle([(pending, set())])
    assert world.state.user_attributes("e:u1") == {"plan": ["pro", T3]}
