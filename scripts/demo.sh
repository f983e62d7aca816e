#!/usr/bin/env bash
# make demo: start the local fake Braze, replay the bundled sample archive into it twice
# (the second run has nothing new to send), print the summaries, save what the fake holds,
# stop the fake, and say how to run one to browse.
# Usage: scripts/demo.sh [PYTHON]   (the Python that has segreplay installed)
set -euo pipefail
py=${1:-.venv/bin/python}
root=$(cd "$(dirname "$0")/.." && pwd)
samples=$root/samples/segment-logs
out=out/demo
rm -rf "$out" && mkdir -p "$out"

"$py" -m segreplay fake-braze --port 0 --log "$out/fake-braze-accepted.jsonl" 2> "$out/fake-braze.log" &
fake=$!
trap 'kill $fake 2>/dev/null || true' EXIT
for _ in $(seq 100); do  # the fake says where it listens once it does
  grep -q "listening on" "$out/fake-braze.log" 2>/dev/null && break
  sleep 0.1
done
url=$(grep -o "http://127.0.0.1:[0-9]*" "$out/fake-braze.log")
export BRAZE_REST_ENDPOINT=$url BRAZE_API_KEY=fake-key SEGREPLAY_STATE=$out/state.sqlite

replay() {
  status=0
  "$py" -m segreplay import "$samples" --dead-letter "$out/dead-letter.jsonl" "$@" || status=$?
  # 3 = finished, some lines rejected: the sample holds bad lines on purpose.
  [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"
}

echo "== replaying samples/segment-logs into the local fake Braze at $url"
replay --output "$out/requests.jsonl" --json > "$out/first-run.json"
echo
echo "== the same command again: everything is already delivered"
replay --json > "$out/second-run.json" 2> /dev/null

"$py" - "$url" "$out" <<'PY'
import json
import sys
import urllib.request

url, out = sys.argv[1:]
first = json.load(open(f"{out}/first-run.json"))
second = json.load(open(f"{out}/second-run.json"))
print(
    f"second run: {second['requests']} requests sent, "
    f"{second['files_already_done']} files already done"
)
stats = json.load(urllib.request.urlopen(f"{url}/_fake/stats"))
with urllib.request.urlopen(f"{url}/_fake/profiles") as answer:
    profiles = json.load(answer)
with open(f"{out}/profiles.json", "w") as file:
    json.dump(profiles, file, indent=1)
accepted = stats["accepted"]
print()
print(
    f"fake Braze accepted {stats['requests']} requests: {accepted['event']} events, "
    f"{accepted['purchase']} purchases, and {first['attributes_sent']} attribute values "
    f"in {accepted['attribute']} attributes objects (one per user and request)"
)
print(f"what it holds, profile by profile ({len(profiles['profiles'])}): {out}/profiles.json")
print(f"request bodies: {out}/requests.jsonl; rejected lines: {out}/dead-letter.jsonl")
PY

echo
echo "== anonymous history on the person it turned out to be (--anonymous alias)"
identity=$root/samples/identity-logs
identity_run() {
  "$py" -m segreplay import "$1" --anonymous alias --state "$out/identity.sqlite" \
      --dead-letter "$out/identity-dead-letter.jsonl" --json 2> /dev/null
}
identity_run "$identity/web/1709596800000" > "$out/identity-day-1.json"
identity_run "$identity" > "$out/identity-day-2.json"
"$py" - "$url" "$out" <<'PY'
import json
import sys
import urllib.request

url, out = sys.argv[1:]
day1 = json.load(open(f"{out}/identity-day-1.json"))
day2 = json.load(open(f"{out}/identity-day-2.json"))
with urllib.request.urlopen(f"{url}/_fake/profiles") as answer:
    profiles = json.load(answer)["profiles"]
ada = next(p for p in profiles if p.get("external_id") == "usr_demo_ada")
print(f"day 1: anonymous visitors only: {day1['aliases_created']} alias-only profiles created")
print(
    f"day 2: one visitor signs up, then logs in on a second device: "
    f"{day2['merges_sent']} profiles merged into usr_demo_ada (/users/identify, /users/merge)"
)
print(f"usr_demo_ada now holds {len(ada['events'])} events, from both devices")
PY

cat <<TEXT

The demo stops its fake Braze as it ends. To browse one, start it and replay into it:
  $py -m segreplay fake-braze --port 4011 &
  $py -m segreplay import samples/segment-logs --endpoint http://127.0.0.1:4011 \\
      --api-key fake-key --state out/browse.sqlite
  then open http://127.0.0.1:4011/_fake/profiles (also /_fake/stats and /_fake/accepted)
TEXT
