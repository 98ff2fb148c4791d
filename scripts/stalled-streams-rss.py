#!/usr/bin/env python3
"""taskgate's memory with event-stream clients that stop reading (docs/reliability.md, "Memory").

   scripts/stalled-streams-rss.py TASKGATE BENCH [streams] [rate] [secs] [rounds]

BENCH is the benchmark binary (`cargo build --release --example bench`:
target/release/examples/bench); its upstream sends `rate` events a second for `secs` seconds on
`GET /event`. Each round opens `streams` event streams through taskgate (default config: the
event gate on) with a 64 KiB receive buffer, reads nothing until the upstream has sent
everything, then reads each stream to its end and keeps the connection open. Prints taskgate's
RSS at the start, with the streams stalled, and after they drained, for each round: memory that
stayed with the open connections would grow from round to round."""
import re
import socket
import subprocess
import sys
import time

taskgate, bench = sys.argv[1], sys.argv[2]
defaults = [20, 100000, 3, 3]
given = [int(a) for a in sys.argv[3:7]]
streams, rate, secs, rounds = given + defaults[len(given):]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


up, tg = free_port(), free_port()
upstream = subprocess.Popen([bench, "upstream", "--listen", f"127.0.0.1:{up}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
proxy = subprocess.Popen([taskgate, "serve", "--listen", f"127.0.0.1:{tg}",
                          "--upstream", f"http://127.0.0.1:{up}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rss_mib():
    status = open(f"/proc/{proxy.pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", tg)).close()
            break
        except OSError:
            time.sleep(0.1)
    print(f"start: {rss_mib():.1f} MiB")
    kept = []
    for round in range(1, rounds + 1):
        socks = []
        for _ in range(streams):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.connect(("127.0.0.1", tg))
            s.sendall(f"GET /event?rate={rate}&secs={secs} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            socks.append(s)
        # Until the upstream has written every event (it ends each stream after `secs`).
        time.sleep(secs + 1.5)
        stalled = rss_mib()
        for s in socks:
            s.settimeout(30)
            tail = b""
            while not tail.endswith(b"0\r\n\r\n"):
                data = s.recv(1 << 20)
                if not data:
                    break
                tail = (tail + data)[-16:]
        time.sleep(1)
        kept += socks
        print(f"round {round}: {streams} streams stalled {stalled:.1f} MiB, drained {rss_mib():.1f} MiB")
finally:
    proxy.terminate()
    upstream.terminate()
