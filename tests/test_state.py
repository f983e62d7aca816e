"""State's user cache: what a chunk of lines needs stays in memory until it is decided."""

from __future__ import annotations

from segreplay import state as state_module
from segreplay.state import State


def test_prefetch_keeps_the_users_a_chunk_wants(tmp_path, monkeypatch):
    monkeypatch.setattr(state_module, "_USER_CACHE_SIZE", 3)
    state = State(str(tmp_path / "state.sqlite"))
    users = [f"e:u{n}" for n in range(5)]
    state.commit(1, {user: {"plan": [user, "2024-01-01T00:00:00.000Z"]} for user in users}, [], [])
    # The cache holds u2, u3 and u4; u2 is the next to go. The chunk wants u2, u0 and u1:
    # loading u0 and u1 must not push out u2.
    state.prefetch(["e:u2", "e:u0", "e:u1"], [])
    statements: list[str] = []
    state._db.set_trace_callback(statements.append)
    for user in ("e:u2", "e:u0", "e:u1"):
        assert state.user_attributes(user) == {"plan": [user, "2024-01-01T00:00:00.000Z"]}
    assert statements == []  # all three from memory: none read again on its own
    state.close()


def test_a_user_not_prefetched_is_read_when_asked_for(tmp_path, monkeypatch):
    monkeypatch.setattr(state_module, "_USER_CACHE_SIZE", 2)
    state = State(str(tmp_path / "state.sqlite"))
    state.commit(1, {"e:a": {"k": [1, "t"]}, "e:b": {}, "e:c": {}}, [], [])
    state.prefetch(["e:b", "e:c"], [])
    statements: list[str] = []
    state._db.set_trace_callback(statements.append)
    assert state.user_attributes("e:a") == {"k": [1, "t"]}
    assert state.user_attributes("e:never") is None
    assert len(statements) == 2
    state.close()


def test_a_profile_acknowledged_under_a_linked_id_plans_its_merge_in_the_same_commit(tmp_path):
    """An alias profile sent before its link applied (shards), or a userId an alias call
    renames: the merge is recorded with the acknowledgement, so a run stopped right after
    it still sends the merge next time."""
    state = State(str(tmp_path / "state.sqlite"))
    run = state.start_run("2026-11-30T00:00:00.000Z")
    state.record_links([("anon-1", "user-1", "2024-01-01T00:00:00.000Z", 5),
                        ("old-id", "new-id", "2024-01-01T00:00:00.000Z", 5)])  # fmt: skip
    state.commit(run, {"a:anon-1": {}, "e:old-id": {}, "e:user-1": {}, "a:anon-2": {}}, [], [])
    assert state.pending_merges() == [("a:anon-1", "e:user-1")]  # new-id: not known yet
    state.commit(run, {"e:new-id": {}}, [], [])
    assert state.pending_merges() == [("a:anon-1", "e:user-1"), ("e:old-id", "e:new-id")]
    state.commit(run, {"a:anon-1": {"plan": ["pro", "2024-01-02T00:00:00.000Z"]}}, [], [])
    assert len(state.pending_merges()) == 2  # once: a profile already known plans nothing
    state.close()


def test_a_run_still_marked_running_with_nobody_holding_the_state_was_killed(tmp_path):
    from segreplay.state import StateLock

    path = str(tmp_path / "state.sqlite")
    state = State(path)
    state.start_run("2026-11-30T00:00:00.000Z")  # and then the process is gone
    with StateLock(path):
        assert [run["status"] for run in state.report()["runs"]] == ["running"]
    assert [run["status"] for run in state.report()["runs"]] == ["killed"]
    state.close()
