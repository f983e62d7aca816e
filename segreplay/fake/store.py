"""What the fake accepted: a journal of arrivals, replayed into profiles (attributes, events,
purchases, aliases) when asked, and the optional JSON-lines log of accepted objects.
"""

from __future__ import annotations

from typing import IO, Any

import orjson

from segreplay.fake.config import _ARRAYS, KINDS, MAX_KEY_CHARS
from segreplay.fake.validation import _identifier

_NOT_ATTRIBUTES = frozenset(("external_id", "user_alias", "braze_id", "_update_existing_only"))
_STANDARD_ATTRIBUTES = frozenset(
    (
        "first_name", "last_name", "email", "phone", "dob", "gender", "country", "home_city",
        "language", "time_zone", "image_url", "email_subscribe", "push_subscribe",
        "push_tokens", "current_location", "subscription_groups",
    )
)  # fmt: skip


class _Profile:
    __slots__ = ("braze_id", "external_id", "aliases", "attributes", "events", "purchases")

    def __init__(self, braze_id: str) -> None:
        self.braze_id = braze_id
        self.external_id: str | None = None
        self.aliases: list[tuple[str, str]] = []  # (label, name)
        self.attributes: dict[str, Any] = {}
        self.events: list[dict] = []
        self.purchases: list[dict] = []

    def keys(self) -> list[tuple]:
        keys = [("braze_id", self.braze_id)]
        if self.external_id is not None:
            keys.append(("external_id", self.external_id))
        keys.extend(("alias", label, name) for label, name in self.aliases)
        for name in ("email", "phone"):
            if type(self.attributes.get(name)) is str:
                keys.append((name, self.attributes[name]))
        return keys

    def as_dict(self) -> dict:
        return {
            "braze_id": self.braze_id,
            "external_id": self.external_id,
            "user_aliases": [{"alias_name": n, "alias_label": lb} for lb, n in self.aliases],
            "attributes": dict(self.attributes),
            "events": list(self.events),
            "purchases": list(self.purchases),
        }


class _Store:
    """Profiles and accepted objects, journaled on arrival and built when asked for.

    Keeping every parsed object costs about 80 KB and 250 us a request (allocation, and the
    garbage collector walking ever more objects), which would halve the fake's throughput.
    So a /users/track request journals only its raw body and the indexes it refused, and
    queries replay the journal in arrival order: profiles come out exactly as if applied
    live. Not thread-safe: `_App` holds the lock around every call.
    """

    def __init__(self, log_path: str | None) -> None:
        self._log: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        self.clear()

    def clear(self) -> None:
        self._journal: list[tuple] = []  # (replay function, arguments) not yet applied
        self._index: dict[tuple, _Profile] = {}
        self._accepted: dict[str, list[tuple[int, dict]]] = {kind: [] for kind in KINDS}
        self._not_applied = 0
        self._ignored_attributes: list[dict] = []
        self._deleted: list[dict] = []  # {"request", "identifier", "found"}, in arrival order
        self._profiles_created = 0

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- arrival (hot path)

    def add_track(self, seq: int, body: bytes, refused: set, valid: list[tuple[str, dict]]):
        """A /users/track request with `valid` (kind, object) pairs; `refused` holds the
        (array name, index) of the others."""
        self._journal.append((self._replay_track, (seq, body, refused)))
        self._write_log(seq, valid)

    def add_identify(self, seq: int, items: list[tuple[tuple, tuple, dict]], merge: bool):
        self._journal.append((self._replay_identify, (items, merge)))
        self._keep(seq, "identify", [item for _, _, item in items])

    def add_merge(self, seq: int, pairs: list[tuple[tuple, tuple, dict]]) -> None:
        self._journal.append((self._replay_merge, (pairs,)))
        self._keep(seq, "merge", [update for _, _, update in pairs])

    def delete(self, seq: int, keys: list[tuple[tuple, dict]]) -> int:
        """Delete now (the answer counts the users that existed); returns that count."""
        self._catch_up()
        deleted = 0
        for key, identifier in keys:
            profile = self._index.get(key)
            if profile is not None:
                self._drop(profile)
                deleted += 1
            self._deleted.append(
                {"request": seq, "identifier": identifier, "found": profile is not None}
            )
        self._keep(seq, "delete", [identifier for _, identifier in keys])
        return deleted

    def _keep(self, seq: int, kind: str, objects: list[dict]) -> None:
        self._accepted[kind].extend((seq, obj) for obj in objects)
        self._write_log(seq, [(kind, obj) for obj in objects])

    def _write_log(self, seq: int, items: list[tuple[str, dict]]) -> None:
        if self._log is None:
            return
        dumps = orjson.dumps
        lines = [dumps({"request": seq, "kind": kind, "object": obj}) for kind, obj in items]
        lines.append(b"")
        self._log.write(b"\n".join(lines))
        # Flushed per request: other processes follow the log while the fake runs.
        self._log.flush()

    # -- queries

    def profiles(self) -> list[_Profile]:
        self._catch_up()
        unique = {id(profile): profile for profile in self._index.values()}
        return list(unique.values())

    def profile(self, key: tuple) -> _Profile | None:
        self._catch_up()
        return self._index.get(key)

    def accepted(self, kind: str) -> list[tuple[int, dict]]:
        self._catch_up()
        return self._accepted[kind]

    def not_applied(self) -> int:
        self._catch_up()
        return self._not_applied

    def ignored_attributes(self) -> list[dict]:
        self._catch_up()
        return list(self._ignored_attributes)

    def deleted(self) -> list[dict]:
        """Every identifier a /users/delete named, and whether a profile was found."""
        return list(self._deleted)

    # -- replay

    def _catch_up(self) -> None:
        journal, self._journal = self._journal, []
        for replay, arguments in journal:
            replay(*arguments)

    def _replay_track(self, seq: int, body: bytes, refused: set) -> None:
        payload = orjson.loads(body)
        for name, kind in _ARRAYS:
            accepted = self._accepted[kind]
            for index, obj in enumerate(payload.get(name) or ()):
                if refused and (name, index) in refused:
                    continue
                accepted.append((seq, obj))
                key, _ = _identifier(obj)
                profile = self._profile_for(key, obj)
                if profile is None:
                    self._not_applied += 1
                elif kind == "event":
                    profile.events.append(obj)
                elif kind == "purchase":
                    profile.purchases.append(obj)
                else:
                    self._apply_attributes(seq, profile, obj)

    def _profile_for(self, key: tuple, obj: dict) -> _Profile | None:
        profile = self._index.get(key)
        if profile is not None:
            return profile
        update_existing_only = obj.get("_update_existing_only")
        if update_existing_only is None:
            # Braze's defaults: an external_id creates its profile, an alias needs false.
            update_existing_only = key[0] == "alias"
        if update_existing_only or key[0] == "braze_id":
            return None  # Braze assigns braze_ids: an unknown one cannot be created
        profile = self._new_profile()
        if key[0] == "external_id":
            profile.external_id = key[1]
        elif key[0] == "alias":
            profile.aliases.append((key[1], key[2]))
        else:
            profile.attributes[key[0]] = key[1]
        self._index[key] = profile
        return profile

    def _new_profile(self) -> _Profile:
        self._profiles_created += 1
        profile = _Profile(f"{self._profiles_created:024x}")
        self._index[("braze_id", profile.braze_id)] = profile
        return profile

    def _apply_attributes(self, seq: int, profile: _Profile, obj: dict) -> None:
        attributes = profile.attributes
        for key, value in obj.items():
            if key in _NOT_ATTRIBUTES:
                continue
            if value is None:
                self._unindex_contact(profile, key)
                attributes.pop(key, None)
                continue
            if key not in _STANDARD_ATTRIBUTES:
                reason = None
                if len(key) > MAX_KEY_CHARS:
                    reason = "key longer than 255 characters"
                elif type(value) is str and len(value) > MAX_KEY_CHARS:
                    reason = "value longer than 255 characters"
                if reason is not None:
                    self._ignored_attributes.append(
                        {"request": seq, "key": key[:MAX_KEY_CHARS], "reason": reason}
                    )
                    continue
            elif key in ("email", "phone") and type(value) is str:
                self._unindex_contact(profile, key)
                self._index[(key, value)] = profile
            attributes[key] = value

    def _unindex_contact(self, profile: _Profile, key: str) -> None:
        if key in ("email", "phone"):
            old = (key, profile.attributes.get(key))
            if self._index.get(old) is profile:
                del self._index[old]

    def _replay_identify(self, items: list[tuple[tuple, tuple, dict]], merge: bool) -> None:
        for external_key, alias_key, _ in items:
            alias_profile = self._index.get(alias_key)
            if alias_profile is None or alias_profile.external_id is not None:
                continue  # Braze identifies alias-only profiles; with none, nothing happens
            identified = self._index.get(external_key)
            if identified is None:
                # No such user: the external_id is added to the alias-only profile.
                alias_profile.external_id = external_key[1]
                self._index[external_key] = alias_profile
            elif any(label == alias_key[1] for label, _ in identified.aliases):
                continue  # one alias a label: Braze leaves both profiles as they are
            else:
                # "none" (Braze's default before August 2023) orphans the alias-only
                # profile's attributes, events and purchases; "merge" carries them over.
                self._fold(identified, alias_profile, with_data=merge, move_aliases=True)

    def _replay_merge(self, pairs: list[tuple[tuple, tuple, dict]]) -> None:
        for gone_key, keep_key, _ in pairs:
            gone = self._index.get(gone_key)
            keep = self._index.get(keep_key)
            # Merging is asynchronous at Braze: unknown users are skipped, not reported.
            if gone is not None and keep is not None and gone is not keep:
                self._fold(keep, gone, with_data=True, move_aliases=False)

    def _fold(self, keep: _Profile, gone: _Profile, with_data: bool, move_aliases: bool):
        """`gone` disappears into `keep`, handing over the attributes only it has and its
        events and purchases (with_data), and its aliases (move_aliases)."""
        if with_data:
            for key, value in gone.attributes.items():
                keep.attributes.setdefault(key, value)
            keep.events.extend(gone.events)
            keep.purchases.extend(gone.purchases)
        self._drop(gone)
        for label, name in gone.aliases if move_aliases else ():
            if (label, name) not in keep.aliases:
                keep.aliases.append((label, name))
        for key in keep.keys():
            self._index.setdefault(key, keep)

    def _drop(self, profile: _Profile) -> None:
        for key in profile.keys():
            if self._index.get(key) is profile:
                del self._index[key]
