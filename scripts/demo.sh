#!/usr/bin/env bash
# make demo: start the local fake Braze, replay the bundled sample archive into it twice
# (the second run has nothing new to send), print the summaries, stop the fake.
set -euo pipefail
bin=${1:-.venv/bin}
out=out/demo
rm -rf "$out" && mkdir -p "$out"

"$bin/segreplay" fake-braze --port 0 --log "$out/fake-braze-accepted.jsonl" 2> "$out/fake-braze.log" &
fake=$!
trap 'kill $fake 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  grep -q "listening on" "$out/fake-braze.log" 2>/dev/null && break
  sleep 0.1
done
url=$(grep -o "http://127.0.0.1:[0-9]*" "$out/fake-braze.log")
export BRAZE_REST_ENDPOINT=$url BRAZE_API_KEY=fake-key SEGREPLAY_STATE=$out/state.sqlite

replay() {
  status=0
  "$bin/segreplay" import samples/segment-logs --dead-letter "$out/dead-letter.jsonl" "$@" || status=$?
  # 3 = finished, some lines rejected: the sample holds bad lines on purpose.
  [ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"
}

echo "== replaying samples/segment-logs into the local fake Braze at $url"
replay --output "$out/requests.jsonl"
echo
echo "== the same command again: everything is already delivered"
replay --json > "$out/second-run.json" 2> /dev/null
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"second run: {s['requests']} requests, {s['files_already_done']} files already done\")" "$out/second-run.json"
echo
echo "fake Braze accepted: $(curl -s "$url/_fake/stats" 2>/dev/null || echo '(curl not installed)')"
echo "request bodies: $out/requests.jsonl; rejected lines: $out/dead-letter.jsonl"
