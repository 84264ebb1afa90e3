"""The gate's cost per message, on raw ZMQ sockets (no kernel, no jail).

    python benchmarks/bench_gate.py [--messages 20000] [--rules none|agent]
                                    [--rcvhwm N] [--loose-json] [--json out.json]

Measures, for one Gate between a raw "kernel" (ROUTER + PUB, kernel key) and a raw client
(DEALER + SUB, client key):

- iopub: N small ``stream`` messages published by the kernel, bound to an open request,
  then the reply and the idle; microseconds per message until the client has the idle
  (output rules may coalesce stream messages, so the client may receive fewer), and the
  gate thread's own CPU time per message (steadier on a busy machine);
- round trip: ``execute_request`` client -> gate -> kernel, ``execute_reply`` back,
  median and p90 of 1000, in microseconds.

``--rules agent`` runs the shipped agent profile's output policy (what the warden does);
``--loose-json`` makes that policy parse content with ``json.loads`` instead of the strict
decoder (the "before" of a change). Not a test: nothing here asserts on time; compare runs
on the same machine.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
import tomllib
import uuid
from importlib import resources
from typing import Any

import zmq

from cellblock.gate import Gate, GateLimits
from cellblock.gate.wire import DELIM


def sign(key: bytes, parts: list[bytes]) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).hexdigest().encode()


def header(msg_type: str, session: str, msg_id: str | None = None) -> bytes:
    return json.dumps({"msg_id": msg_id or uuid.uuid4().hex, "msg_type": msg_type,
                       "session": session, "username": "u", "date": "2025-01-01T00:00:00Z",
                       "version": "5.3"}).encode()


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) one thread of this process has used so far."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rules(name: str, loose: bool) -> tuple[Any, ...]:
    if name == "none":
        return ()
    from cellblock.output import build_output_rules
    from cellblock.policy import OutputPolicy

    if loose:
        import cellblock.output.filter as output_filter

        output_filter.load_object = lambda raw, what="json": json.loads(raw)  # type: ignore
    data = tomllib.loads(resources.files("cellblock").joinpath("builtin.toml").read_text())
    policy = OutputPolicy.model_validate(data["profiles"][name]["output"])
    return build_output_rules(policy, env={})


def run(messages: int, rule_set: str, rcvhwm: int, loose: bool) -> dict[str, Any]:
    rundir = tempfile.mkdtemp(prefix="cbb-", dir="/tmp")
    kkey, ckey = uuid.uuid4().hex.encode(), uuid.uuid4().hex
    kconn = {"transport": "ipc", "ip": os.path.join(rundir, "k"), "key": kkey.decode(),
             "signature_scheme": "hmac-sha256", "shell_port": 1, "iopub_port": 2,
             "stdin_port": 3, "control_port": 4, "hb_port": 5}
    cconn: dict[str, Any] = {f"{c}_port": 0 for c in ("shell", "iopub", "stdin", "control", "hb")}
    cconn.update(transport="tcp", ip="127.0.0.1", key=ckey, signature_scheme="hmac-sha256")
    ctx = zmq.Context()
    shell, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    gate = Gate(client=cconn, kernel=kconn, rules=rules(rule_set, loose),
                limits=GateLimits(kernel_rcvhwm=rcvhwm))
    gate.start()
    for sock, port in ((shell, 1), (pub, 2)):  # the gate binds, the kernel connects
        sock.connect(f"ipc://{kconn['ip']}-{port}")
    conn = gate.client_connection_info
    dealer, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
    dealer.setsockopt(zmq.IDENTITY, b"client")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(f"tcp://127.0.0.1:{conn['shell_port']}")
    sub.connect(f"tcp://127.0.0.1:{conn['iopub_port']}")

    def request(msg_id: str | None = None) -> tuple[bytes, bytes]:
        parts = [header("execute_request", "s", msg_id), b"{}", b"{}", b'{"code": "1+1"}']
        dealer.send_multipart([DELIM, sign(ckey.encode(), parts), *parts])
        gate_id, *frames = shell.recv_multipart()
        return gate_id, frames[frames.index(DELIM) + 2]

    try:
        gate_id, parent = request()
        # iopub: sync the slow joiners, then time N pre-signed messages.
        def stream(i: int, text: str) -> list[bytes]:
            parts = [header("stream", "k", f"m-{i}"), parent, b"{}",
                     json.dumps({"name": "stdout", "text": text}).encode()]
            return [b"stream", DELIM, sign(kkey, parts), *parts]
        i = 0
        while not sub.poll(20):
            pub.send_multipart(stream(i, "sync\n"))
            i += 1
        while sub.poll(100):
            sub.recv_multipart()
        batch = [stream(i + n, f"line {n}\n") for n in range(messages)]
        reply = [header("execute_reply", "k"), parent, b"{}", b'{"status": "ok"}']
        idle = [header("status", "k"), parent, b"{}", b'{"execution_state": "idle"}']
        assert gate._thread is not None and gate._thread.native_id is not None
        cpu = thread_cpu_s(gate._thread.native_id)
        start = time.perf_counter()
        for frames in batch:
            pub.send_multipart(frames)
        shell.send_multipart([gate_id, DELIM, sign(kkey, reply), *reply])
        pub.send_multipart([b"status", DELIM, sign(kkey, idle), *idle])
        got = 0
        while sub.poll(5000):  # the idle comes after every stream (one socket, in order)
            topic = sub.recv_multipart()[0]
            if topic == b"status":
                break
            got += 1
        iopub_s = time.perf_counter() - start
        cpu = thread_cpu_s(gate._thread.native_id) - cpu
        dealer.recv_multipart()
        # round trips
        rts = []
        for _ in range(1000):
            t = time.perf_counter()
            _gate_id, hdr = request()
            parts = [header("execute_reply", "k"), hdr, b"{}", b'{"status": "ok"}']
            shell.send_multipart([gate_id, DELIM, sign(kkey, parts), *parts])
            dealer.recv_multipart()
            rts.append(time.perf_counter() - t)
        rts.sort()
        return {"rules": rule_set, "rcvhwm": rcvhwm, "loose_json": loose,
                "iopub_received": got, "iopub_us_per_msg": round(iopub_s / messages * 1e6, 1),
                "gate_cpu_us_per_msg": round(cpu / messages * 1e6, 1),
                "rt_median_us": round(statistics.median(rts) * 1e6),
                "rt_p90_us": round(rts[int(len(rts) * 0.9)] * 1e6)}
    finally:
        gate.close()
        for sock in (shell, pub, dealer, sub):
            sock.close(linger=0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rules", default="none", help="none, or a built-in profile name")
    parser.add_argument("--rcvhwm", type=int, default=GateLimits().kernel_rcvhwm)
    parser.add_argument("--loose-json", action="store_true")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.messages, args.rules, args.rcvhwm, args.loose_json)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
