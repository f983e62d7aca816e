"""A local stand-in for Braze's REST API: a real HTTP/1.1 server on 127.0.0.1 that enforces
Braze's contract (limits, errors, headers), injects faults on demand and records what it
accepted, for tests, rehearsals (`segreplay fake-braze`) and benchmarks.

Endpoints (all POST, `Authorization: Bearer <key>`, JSON body with Content-Length):
  /users/track     attributes/events/purchases, 75-object limit, 4 MB body limit
  /users/delete    one of "external_ids", "user_aliases", "braze_ids", at most 50 ids;
                   answers 201 {"deleted": n, "message": "success"} (n: profiles found)
  /users/identify  {"aliases_to_identify": [...], "merge_behavior": "none"|"merge"}, at most 50;
                   an alias-only profile joins the user with that external_id (or takes
                   it, when there is none); nothing happens when there is no alias-only
                   profile or the user already holds an alias of that label (one a label);
                   "none" leaves the alias profile's data behind, "merge" carries it over
  /users/merge     {"merge_updates": [...]}, at most 50, answers 202; identifiers by
                   external_id or user_alias, in any pairing; unknown users are skipped
Their answers carry X-RateLimit-Limit/-Remaining/-Reset; /users/track allows a fixed window
of `rate_limit` requests per `rate_window_s` seconds and answers 429 beyond it; the other
three share one window of `user_ops_rate_limit` per `user_ops_rate_window_s` (20,000 a minute).

Admin endpoints, no key needed (GET unless noted), for tests and scripts in other processes:
  /_fake/stats               counters only (cheap): requests, connections, by_status,
                             by_path, accepted per kind, rejected_objects, rate_limited,
                             injected faults by name, bytes_received
  /_fake/profiles            {"profiles": [...], "deleted": [...], "not_applied": n,
                             "ignored_attributes": [...]}; each deleted entry is
                             {"request", "identifier", "found": whether a profile existed}
  /_fake/accepted[?kind=K]   {"accepted": [{"request", "kind", "object"}, ...]}
  /_fake/requests            {"requests": [{"request", "method", "path", "arrived_at", "status"}]}
  /_fake/rate-limit-resets   {"resets": [{"request", "sent_at", "reset_at"}, ...]}
  POST /_fake/reset          forget everything recorded (configuration and log file stay)

A profile is {"braze_id", "external_id", "user_aliases", "attributes", "events",
"purchases"}: attributes applied in request order (null unsets), events and purchases kept
as the objects sent, so a resent event shows up twice. `not_applied` counts accepted objects
that changed nothing (an alias's default `_update_existing_only` for an unknown user).

Kinds of accepted objects: attribute, event, purchase (each valid /users/track object),
delete (each identifier of a delete request), identify (each valid alias item), merge (each
merge update). With `log_path`, each is also appended to that file as one JSON line,
`{"request": <request sequence number>, "kind": "<kind>", "object": {...}}`, flushed after
every request so another process can follow it.

Times (`arrived_at`, `sent_at`, `reset_at`) are UTC epoch seconds. The API key is never
echoed, logged or printed.
"""

from segreplay.fake.config import FakeBrazeConfig, RateLimitReset, RequestRecord
from segreplay.fake.server import FakeBraze, serve

__all__ = [
    "FakeBraze",
    "FakeBrazeConfig",
    "RateLimitReset",
    "RequestRecord",
    "serve",
]
