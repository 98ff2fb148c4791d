#!/bin/sh
# Measures taskgate's memory under ten concurrent 15 MiB `GET /session/:id/message` replies
# (issue 17, docs/reliability.md): RSS before, peak (VmHWM), right after, and 5 s after, and how
# long an unrelated small request takes while the large ones are in flight.
#   scripts/inspect-rss.sh [path/to/taskgate] [inspect_concurrency]
# The runtime is a Python stand-in that answers every history with the same 15 MiB list.
set -eu
bin="${1:-target/debug/taskgate}"
turns="${2:-2}"
work=$(mktemp -d)
trap 'kill $up $tg 2>/dev/null; rm -rf "$work"' EXIT
python3 - "$work/history.json" <<'PY'
import json, sys
# Many small parts, as a long agent session has: the costly shape to parse.
part = lambda n, k: {"id": f"prt_{n}_{k}", "type": "tool", "tool": "read", "callID": f"c{k}",
                     "state": {"status": "completed", "input": {"filePath": f"/src/f{k}.rs"},
                               "output": "fn main() {}\n" * 8, "time": {"start": k, "end": k}}}
msgs = [{"info": {"id": f"msg_{n}", "sessionID": "ses_big", "role": "assistant"},
         "parts": [part(n, k) for k in range(100)]} for n in range(500)]
open(sys.argv[1], "w").write(json.dumps(msgs))
PY
cat > "$work/upstream.py" <<'PY'
import http.server, sys
body = open(sys.argv[1], "rb").read()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.endswith("/message"): data, code = body, 200
        elif self.path.startswith("/session/status"): data, code = b"{}", 200
        else: data, code = b'{"name":"NotFoundError"}', 404
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
PY
python3 "$work/upstream.py" "$work/history.json" > "$work/port" &
up=$!
while [ ! -s "$work/port" ]; do sleep 0.1; done
port=$(cat "$work/port")
printf '[proxy]\nlisten = "127.0.0.1:4597"\nupstream = "http://127.0.0.1:%s"\ninspect_concurrency = %s\n[log]\nfilter = "warn"\n' "$port" "$turns" > "$work/proxy.toml"
"$bin" serve --config "$work/proxy.toml" 2> "$work/log" &
tg=$!
until curl -sf -o /dev/null http://127.0.0.1:4597/_taskgate/metrics; do sleep 0.1; done
rss() { awk -v k="$1:" '$1 == k { print $2 / 1024 " MiB" }' /proc/$tg/status; }
echo "history reply: $(wc -c < "$work/history.json") bytes; inspect_concurrency = $turns"
echo "RSS at start: $(rss VmRSS)"
start=$(date +%s.%N)
pids=
for i in 0 1 2 3 4 5 6 7 8 9; do
    curl -s -o "$work/out$i" "http://127.0.0.1:4597/session/ses_$i/message" &
    pids="$pids $!"
done
sleep 0.3
curl -s -o /dev/null -w "unrelated GET /session/status during the burst: %{time_total} s\n" \
    http://127.0.0.1:4597/session/status
# shellcheck disable=SC2086 # one pid per word
wait $pids
echo "ten replies in $(echo "$(date +%s.%N) - $start" | bc) s; intact: $(for i in 0 1 2 3 4 5 6 7 8 9; do cmp -s "$work/out$i" "$work/history.json" && echo y; done | wc -l)/10"
echo "RSS peak: $(rss VmHWM); right after: $(rss VmRSS)"
sleep 5
echo "RSS 5 s after: $(rss VmRSS)"
curl -s http://127.0.0.1:4597/_taskgate/metrics | grep passthrough_uninspected_total || true
