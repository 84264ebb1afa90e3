"""Fault injection: SIGKILL one piece of a kernel's process tree at a random moment, then
check that nothing is left and that the client's next kernel works.

Run it (as root or not; it sets up its own isolated environment)::

    /opt/cellblock/venv/bin/python tests/stress/faults.py --rounds 200 --seed 1 \\
        --json faults.json

Each round picks a victim and a moment (the first rounds cover every pair once, in a
seeded order; later rounds pick at random), does the moment's operation through a client
process (``client.py``: jupyter_client's AsyncKernelManager with the cellblock
provisioner), and SIGKILLs the victim after a random delay within that operation.

Victims: the client process, its spawner, the kernel's warden, its nsjail, the kernel
(pid 1 of the jail), and a pooled warden (warm pool, ``pooled`` profile). Moments: during
a start (before ready), idle, mid-execution (a cell sleeping between prints), while a cell
prints as fast as it can, during ``restart_kernel``, during ``shutdown_kernel``, during an
adoption from the warm pool, and while the pool refills.

After each round, checked (and counted as a *finding* when wrong):

- the operation answered (no hang) and the client's view is right: ``is_alive()`` is
  false once the kernel's warden is gone, true while it lives;
- a kernel killed mid-execution told the cell why (``CellblockKernelStopped`` on iopub);
- the client recovers: ``restart_kernel`` (or a new start) and ``1+1`` gives ``2``; after
  a killed client, a new client's first kernel does;
- nothing is left: no process (spawner, warden, nsjail, kernel) that the live client does
  not account for, no run dir, cgroup or mount of a kernel that is gone, and never more
  pooled wardens than the pool's size;
- a client that lives through many rounds does not collect descriptors (its count after
  each round, for the same number of kernels, grows by at most ``FD_SLACK``).

Exits 1 if anything was found. Prints one line per round and a summary; ``--json`` writes
the whole record (rounds, kills, findings with the client's log tail, the client's fd and
RSS counts).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    HERE,
    Env,
    Expected,
    Proc,
    kernel_tree,
    leftovers,
    log,
    processes,
    run_dirs,
    settle,
    sigkill,
    tree_below,
    write_report,
)

VICTIMS = ("client", "spawner", "warden", "nsjail", "kernel", "pooled")
MOMENTS = ("start", "idle", "exec", "print", "restart", "shutdown", "adopt", "refill")
COMBOS = [(v, m) for v in ("client", "spawner", "warden", "nsjail", "kernel")
          for m in ("start", "idle", "exec", "print", "restart", "shutdown", "adopt")] + [
    ("pooled", "idle"), ("pooled", "adopt"), ("pooled", "refill"), ("warden", "refill"),
    ("nsjail", "refill"), ("kernel", "refill"), ("client", "refill"), ("spawner", "refill"),
]
# A cell that runs ~6 s, printing between sleeps; and one that prints flat out for ~4 s.
EXEC_CELL = "import time\nfor i in range(60):\n    print('tick', i, flush=True)\n" \
            "    time.sleep(0.1)\n"
PRINT_CELL = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 4:\n" \
             "    print('y' * 200)\n"
OP_TIMEOUT = 180.0  # seconds any one client operation may take before it is a hang
SETTLE = 45.0  # seconds cleanup may take after a kill before a leftover is a finding


class Hang(Exception):
    pass


class ClientProc:
    """``client.py`` in a subprocess: send commands, wait for their answers."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        with log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "client.py")], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=logf, text=True, bufsize=1)
        self.pid = self.proc.pid
        self._next = 0
        self._answers: dict[int, dict[str, Any]] = {}
        self._events: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.event(lambda e: e.get("event") == "hello", 60)
        if hello is None:
            raise Hang(f"the client did not start: {self.log_tail()}")
        stat = Path(f"/proc/{self.pid}/stat").read_bytes()
        self.start_ticks = int(stat[stat.rfind(b")") + 2:].split()[19])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cv:
                if "event" in msg:
                    self._events.append(msg)
                elif isinstance(msg.get("id"), int):
                    self._answers[msg["id"]] = msg
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def send(self, op: str, **kw: Any) -> int:
        self._next += 1
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"id": self._next, "op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._next

    def answer(self, cid: int, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self._cv:
            while cid not in self._answers:
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return self._answers.get(cid)
                self._cv.wait(min(left, 0.5))
            return self._answers[cid]

    def done(self, cid: int) -> bool:
        with self._cv:
            return cid in self._answers

    def call(self, op: str, timeout: float = OP_TIMEOUT, **kw: Any) -> dict[str, Any]:
        got = self.answer(self.send(op, timeout=min(timeout, 120), **kw), timeout)
        if got is None:
            raise Hang(f"{op} {kw} did not answer within {timeout:.0f} s")
        return got

    def event(self, pred: Any, timeout: float) -> dict[str, Any] | None:
        end = time.monotonic() + timeout
        with self._cv:
            while True:
                for e in self._events:
                    if pred(e):
                        return e
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cv.wait(min(left, 0.5))

    def as_proc(self) -> Proc:
        return Proc(self.pid, os.getpid(), "client", "client.py", self.start_ticks)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


@dataclass
class Slot:
    profile: str
    kernel_id: str


class Faults:
    """The fault-injection run: one client at a time, rounds of (victim, moment)."""

    def __init__(self, env: Env, rng: random.Random) -> None:
        self.env = env
        self.rng = rng
        self.client: ClientProc | None = None
        self.slots: dict[str, Slot] = {}
        self.clients_started = 0
        self.findings: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.durations: dict[str, list[float]] = collections.defaultdict(list)
        self.client_stats: list[dict[str, Any]] = []
        self.pool_warm = False
        self.known: set[str] = set()  # leftovers already reported

    # -- the client -----------------------------------------------------------------------

    def ensure_client(self) -> ClientProc:
        if self.client is None or self.client.proc.poll() is not None:
            self.clients_started += 1
            self.client = ClientProc(self.env.top / f"client-{self.clients_started}.log")
            self.slots = {}
            self.pool_warm = False
        return self.client

    def expected(self) -> Expected:
        if self.client is None or self.client.proc.poll() is not None:
            return Expected()
        return Expected({self.client.pid}, {s.kernel_id for s in self.slots.values()}, 2)

    def leftovers(self, expected: Expected) -> list[str]:
        """What is left beyond ``expected`` once cleanup had its time, leaving out what an
        earlier round already reported (a leak stays; it is one finding, not one a round).
        """
        def new() -> list[str]:
            return [x for x in leftovers(self.env, expected) if _key(x) not in self.known]

        left = settle(new, SETTLE)
        self.known.update(_key(x) for x in left)
        return left

    def find(self, rnd: dict[str, Any], kind: str, detail: str, **extra: Any) -> None:
        entry = {"round": rnd["round"], "victim": rnd["victim"], "moment": rnd["moment"],
                 "kind": kind, "detail": detail, **extra}
        if self.client is not None:
            entry["client_log_tail"] = self.client.log_tail(3000)
        self.findings.append(entry)
        rnd["findings"].append(f"{kind}: {detail}"[:400])
        log(f"  FINDING {kind}: {detail}"[:1000])

    def start_slot(self, name: str, profile: str) -> dict[str, Any]:
        client = self.ensure_client()
        cid = client.send("start", slot=name, profile=profile)
        ev = client.event(lambda e: e.get("id") == cid and e.get("event") == "kernel_id",
                          OP_TIMEOUT)
        if ev is not None:
            self.slots[name] = Slot(profile, ev["kernel_id"])
        got = client.answer(cid, OP_TIMEOUT)
        if got is None:
            raise Hang(f"start of {profile} in slot {name} did not answer")
        if got.get("ok"):
            self.durations[f"start:{profile}"].append(got["seconds"])
        return got

    def one_plus_one(self, name: str) -> dict[str, Any]:
        assert self.client is not None
        return self.client.call("exec", slot=name, code="1+1", timeout=90)

    # -- a round --------------------------------------------------------------------------

    def prepare(self, victim: str, moment: str) -> None:
        """Bring the client to the state the moment starts from."""
        client = self.ensure_client()
        if moment in ("adopt", "refill") or victim == "pooled":
            state = client.call("warm", profile="pooled")
            if not state.get("ok") or state["state"]["ready"] < 2:
                raise RuntimeError(f"the warm pool did not fill: {state}")
            self.pool_warm = True
        if moment in ("start", "adopt", "refill"):
            target = "a" if moment == "start" else "p"
            if target in self.slots:
                client.call("shutdown", slot=target)
                self.slots.pop(target)
        elif "a" not in self.slots:
            profile = self.rng.choice(("agent", "pooled"))
            got = self.start_slot("a", profile)
            if not got.get("ok"):
                raise RuntimeError(f"the kernel for the round did not start: {got}")

    def pooled_wardens(self) -> list[Proc]:
        """Ready pooled wardens of the live client's spawner, oldest first."""
        records = run_dirs(self.env)
        procs = processes(self.env)
        spawners = {p.pid for p in procs if p.kind == "spawner" and self.client is not None
                    and p.ppid == self.client.pid}
        ready = [p for p in procs if p.kind == "warden" and p.title.startswith("pool-")
                 and p.ppid in spawners and records.get(p.title, {}).get("state") == "pooled"]
        return sorted(ready, key=lambda p: (p.start, p.pid))

    def target_finder(self, victim: str, moment: str, slot: str) -> Any:
        """A function returning the process to kill now (or None: not there yet)."""
        client = self.client
        assert client is not None
        if victim == "client":
            return client.as_proc
        if victim == "spawner":
            return lambda: next((p for p in processes(self.env) if p.kind == "spawner"
                                 and p.ppid == client.pid), None)
        if moment == "adopt":
            pooled = self.pooled_wardens()
            if victim == "pooled":  # another pooled warden, not the one adopted
                pick = pooled[1] if len(pooled) > 1 else None
            else:
                pick = pooled[0] if pooled else None
            if pick is None:
                return lambda: None
            return self._by_warden(pick, "warden" if victim == "pooled" else victim)
        if victim == "pooled" and moment == "idle":
            pooled = self.pooled_wardens()
            pick = self.rng.choice(pooled) if pooled else None
            return (lambda: None) if pick is None else self._by_warden(pick, "warden")
        if moment == "refill":
            before = {p.pid for p in processes(self.env) if p.kind == "warden"}
            kind = "warden" if victim == "pooled" else victim

            def new_pooled() -> Proc | None:
                procs = processes(self.env)
                fresh = [p for p in procs if p.kind == "warden" and p.pid not in before
                         and p.title.startswith("pool-")]
                for w in fresh:
                    tree = _tree_of(procs, w)
                    if kind in tree:
                        return tree[kind]
                return None

            return new_pooled
        return lambda: kernel_tree(processes(self.env), self.slots[slot].kernel_id).get(victim) \
            if slot in self.slots else None

    def _by_warden(self, warden: Proc, kind: str) -> Any:
        return lambda: _tree_of(processes(self.env), warden).get(kind)

    def window(self, moment: str, profile: str) -> float:
        """How long the moment's operation usually takes (the kill lands within it): the
        median of the last ten, or a guess. A pool refills as fast as a cold start."""
        key = {"start": f"start:{profile}", "restart": f"restart:{profile}",
               "shutdown": f"shutdown:{profile}", "adopt": "start:pooled",
               "refill": "start:agent"}.get(moment)
        if key is None:
            return {"exec": 3.0, "print": 2.5}.get(moment, 1.0)
        seen = self.durations.get(key, [])[-10:]
        guess = {"start:pooled": 0.3, "start:agent": 2.0, "shutdown": 1.0}
        if not seen:
            return guess.get(key, guess.get(key.split(":")[0], 2.0))
        return sorted(seen)[len(seen) // 2]

    def run_round(self, i: int, victim: str, moment: str) -> dict[str, Any]:
        rnd: dict[str, Any] = {"round": i, "victim": victim, "moment": moment,
                               "findings": []}
        t0 = time.monotonic()
        try:
            self.prepare(victim, moment)
            self._fault(rnd, victim, moment)
        except Hang as exc:
            self.find(rnd, "hang", str(exc))
            self.reset_client(rnd)
        except RuntimeError as exc:
            self.find(rnd, "setup", str(exc))
            self.reset_client(rnd)
        rnd["seconds"] = round(time.monotonic() - t0, 2)
        self.rounds.append(rnd)
        return rnd

    def reset_client(self, rnd: dict[str, Any]) -> None:
        """After a hang: kill the client, then everything must still go away."""
        if self.client is not None:
            sigkill(self.client.as_proc())
            self.client.proc.wait()
            self.client.close()
            self.client = None
            self.slots = {}
        left = self.leftovers(Expected())
        if left:
            self.find(rnd, "leak", f"after killing the client: {left}")

    def _fault(self, rnd: dict[str, Any], victim: str, moment: str) -> None:
        client = self.client
        assert client is not None
        slot = "p" if moment in ("adopt", "refill") else "a"
        before = client.call("stats")
        finder = self.target_finder(victim, moment, slot)
        cid: int | None = None
        if moment in ("start", "adopt", "refill"):
            profile = "agent" if moment == "start" else "pooled"
            if moment == "start":
                profile = self.rng.choice(("agent", "pooled"))
            rnd["profile"] = profile
            cid = client.send("start", slot=slot, profile=profile)
            ev = client.event(lambda e: e.get("id") == cid and e.get("event") == "kernel_id",
                              30)
            if ev is not None:
                self.slots[slot] = Slot(profile, ev["kernel_id"])
        elif moment in ("exec", "print"):
            cid = client.send("exec", slot=slot, code=EXEC_CELL if moment == "exec"
                              else PRINT_CELL, timeout=120)
            if client.event(lambda e: e.get("id") == cid and e.get("event") == "output",
                            60) is None and not client.done(cid):
                raise Hang(f"the {moment} cell printed nothing within 60 s")
        elif moment == "restart":
            cid = client.send("restart", slot=slot)
        elif moment == "shutdown":
            cid = client.send("shutdown", slot=slot)
        rnd["profile"] = rnd.get("profile") or (self.slots[slot].profile
                                                if slot in self.slots else "")
        delay = self.rng.uniform(0, self.window(moment, rnd["profile"]))
        rnd["delay"] = round(delay, 3)
        t_op = time.monotonic()
        time.sleep(delay)  # the random moment of the kill
        killed = None
        while killed is None and time.monotonic() < t_op + delay + 30:
            target = finder()
            if target is not None:
                state = run_dirs(self.env).get(self.warden_title(target), {}).get("state")
                if sigkill(target):
                    killed = target
                    rnd["victim_state"] = state
                    break
            if cid is not None and client.done(cid) and moment not in ("refill",) \
                    and target is None and time.monotonic() > t_op + delay + 5:
                break  # the operation ended and the victim never showed
            time.sleep(0.005)  # polling for the victim to appear
        rnd["killed"] = None if killed is None else f"{killed.kind} {killed.pid}"
        warden = None if killed is None else self.warden_of(killed)
        rnd["phase"] = "missed" if killed is None else (
            "during" if cid is not None and not client.done(cid) else
            ("idle" if cid is None else "after"))
        if moment == "refill" and killed is not None and victim != "client":
            rnd["phase"] = "during" if rnd.get("victim_state") == "starting" else "after"
        if victim == "client":
            self.after_client_kill(rnd, client)
            return
        answer = None
        if cid is not None:
            answer = client.answer(cid, OP_TIMEOUT)
            if answer is None:
                raise Hang(f"{moment} did not answer within {OP_TIMEOUT:.0f} s after the kill")
            rnd["answer"] = {k: v for k, v in answer.items()
                             if k in ("ok", "outcome", "error", "stage", "errors")}
            if moment == "shutdown":
                self.slots.pop(slot, None)
            if moment in ("start", "adopt", "refill") and answer.get("stage") == "start":
                self.slots.pop(slot, None)  # jupyter_client holds nothing of it
            if answer.get("ok") and "seconds" in answer:
                op = "start" if moment in ("adopt", "refill") else moment
                self.durations[f"{op}:{rnd['profile']}"].append(answer["seconds"])
        if moment in ("exec", "print") and victim in ("kernel", "nsjail") \
                and rnd["phase"] == "during" and answer is not None:
            said = [e for e in answer.get("errors") or []
                    if e.get("ename") == "CellblockKernelStopped"]
            if answer.get("outcome") != "died" or not said:
                self.find(rnd, "announce", f"the {victim} died mid-cell but the cell got "
                          f"outcome {answer.get('outcome')!r}, errors {answer.get('errors')}")
        if warden is not None:  # its jail ended: the warden must go too
            t_kill = time.monotonic()
            if settle(lambda: [] if _gone(warden) else ["alive"], SETTLE):
                self.find(rnd, "state", f"warden {warden.pid} ({warden.title}) still runs "
                          f"{SETTLE:.0f} s after its {victim} was killed")
            rnd["warden_gone_seconds"] = round(time.monotonic() - t_kill, 2)
        self.check_state(rnd)
        self.recover(rnd)
        t_left = time.monotonic()
        left = self.leftovers(self.expected())
        rnd["settle_seconds"] = round(time.monotonic() - t_left, 2)
        if left:
            self.find(rnd, "leak", "; ".join(left))
        after = client.call("stats")
        rnd["client"] = {"fds": [before["fds"], after["fds"]],
                         "rss_kib": [before["rss_kib"], after["rss_kib"]]}
        self.client_stats.append({"client": self.clients_started, "round": rnd["round"],
                                  "fds": after["fds"], "rss_kib": after["rss_kib"],
                                  "kernels": len(self.slots)})

    def warden_title(self, victim: Proc) -> str:
        """The run dir name of the kernel ``victim`` belongs to ("" if none)."""
        warden = self.warden_of(victim) if victim.kind in ("warden", "nsjail", "kernel") \
            else None
        if warden is None:
            return ""
        records = run_dirs(self.env)
        return next((name for name, r in records.items()
                     if r.get("warden_pid") == warden.pid), warden.title)

    def warden_of(self, victim: Proc) -> Proc | None:
        """The warden whose jail ``victim`` (a warden, nsjail or kernel) belongs to."""
        if victim.kind == "warden":
            return victim
        procs = {p.pid: p for p in processes(self.env)}
        parent = procs.get(victim.ppid)
        if victim.kind == "kernel" and parent is not None and parent.kind == "nsjail":
            parent = procs.get(parent.ppid)
        return parent if parent is not None and parent.kind == "warden" else None

    def after_client_kill(self, rnd: dict[str, Any], client: ClientProc) -> None:
        client.proc.wait()
        client.close()
        self.client = None
        self.slots = {}
        t_left = time.monotonic()
        left = self.leftovers(Expected())
        rnd["settle_seconds"] = round(time.monotonic() - t_left, 2)
        if left:
            self.find(rnd, "leak", "after the client's death: " + "; ".join(left))
        # the next client's first kernel starts cleanly and works
        self.ensure_client()
        got = self.start_slot("a", "agent")
        if not got.get("ok"):
            self.find(rnd, "recover", f"a new client's first kernel failed: {got}")
            return
        out = self.one_plus_one("a")
        if out.get("results") != [{"text/plain": "2"}]:
            self.find(rnd, "recover", f"1+1 on a new client's first kernel gave {out}")

    def check_state(self, rnd: dict[str, Any]) -> None:
        """The client's view matches the processes: alive iff the kernel's warden lives."""
        assert self.client is not None
        client = self.client
        for name, slot in list(self.slots.items()):
            seen: dict[str, Any] = {}

            def consistent(name: str = name, slot: Slot = slot,
                           seen: dict[str, Any] = seen) -> list[str]:
                alive = client.call("alive", slot=name)
                warden = "warden" in kernel_tree(processes(self.env), slot.kernel_id)
                seen.update(alive=alive.get("alive"), warden=warden)
                return [] if alive.get("alive") == warden else ["mismatch"]

            if settle(consistent, 30):
                self.find(rnd, "state", f"slot {name} kernel {slot.kernel_id}: is_alive() "
                          f"{seen.get('alive')} but warden process exists: {seen.get('warden')}")
            rnd.setdefault("alive", {})[name] = seen.get("alive")

    def recover(self, rnd: dict[str, Any]) -> None:
        """Every slot ends with a working kernel: restart the dead, start slot a if empty."""
        assert self.client is not None
        client = self.client
        for name in list(self.slots):
            alive = client.call("alive", slot=name)
            if not alive.get("known"):
                self.slots.pop(name)
                continue
            if not alive.get("alive"):
                got = client.call("restart", slot=name)
                rnd.setdefault("recovery", []).append(f"restart {name}: {got.get('ok')}")
                if got.get("ok"):
                    self.durations[f"restart:{self.slots[name].profile}"].append(got["seconds"])
                if not got.get("ok"):
                    self.find(rnd, "recover", f"restart of slot {name} failed: {got}")
                    client.call("drop", slot=name)
                    self.slots.pop(name)
                    continue
            out = self.one_plus_one(name)
            if out.get("results") != [{"text/plain": "2"}] or out.get("outcome") != "ok":
                self.find(rnd, "recover", f"1+1 in slot {name} gave {out}")
        if "a" not in self.slots:
            got = self.start_slot("a", self.rng.choice(("agent", "pooled")))
            rnd.setdefault("recovery", []).append(f"start a: {got.get('ok')}")
            if not got.get("ok"):
                self.find(rnd, "recover", f"the next kernel did not start: {got}")
                if "a" in self.slots:
                    client.call("drop", slot="a")
                    self.slots.pop("a")
                return
            out = self.one_plus_one("a")
            if out.get("results") != [{"text/plain": "2"}]:
                self.find(rnd, "recover", f"1+1 on the next kernel gave {out}")

    def finish(self) -> list[str]:
        """Shut everything down; nothing may be left."""
        if self.client is not None:
            for name in list(self.slots):
                self.client.call("shutdown", slot=name)
            self.client.close()
            self.client = None
        return self.leftovers(Expected())


FD_SLACK = 2  # descriptors a client may gain over its rounds (same kernels) before it counts


def fd_trend(stats: list[dict[str, Any]]) -> dict[tuple[int, int], list[int]]:
    """The client's open descriptors after each round, by client and number of kernels:
    a client that survives rounds of kills must not collect descriptors."""
    out: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for s in stats:
        out[(s["client"], s["kernels"])].append(s["fds"])
    return dict(out)


def _key(leftover: str) -> str:
    """What names a leftover for good ("process warden 123", "cgroup /sys/...")."""
    return leftover.split(" (", 1)[0]


def _gone(proc: Proc) -> bool:
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_bytes()
    except OSError:
        return True
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) != proc.start or fields[0] == b"Z"


def _tree_of(procs: list[Proc], warden: Proc) -> dict[str, Proc]:
    w = next((p for p in procs if p.pid == warden.pid and p.start == warden.start), None)
    return {} if w is None else tree_below(procs, w)


def schedule(rounds: int, rng: random.Random) -> list[tuple[str, str]]:
    """Every (victim, moment) pair once in a seeded order, then random pairs. The order
    covers every victim and every moment as early as it can (in the first 8 rounds), so
    that a short run tries each of them."""
    left = list(COMBOS)
    rng.shuffle(left)
    out: list[tuple[str, str]] = []
    while left and len(out) < rounds:
        victims = {v for v, _ in out}
        moments = {m for _, m in out}
        pick = max(left, key=lambda p: (p[0] not in victims) + (p[1] not in moments))
        left.remove(pick)
        out.append(pick)
    while len(out) < rounds:
        out.append(rng.choice(COMBOS))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=len(COMBOS),
                        help=f"rounds to run (default {len(COMBOS)}: every pair once)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the environment's dir")
    parser.add_argument("--only", help="run only these victim:moment pairs (comma list)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    plan = schedule(args.rounds, rng)
    if args.only:
        pairs = [tuple(p.split(":", 1)) for p in args.only.split(",")]
        bad = [p for p in pairs if p not in COMBOS]
        if bad:
            parser.error(f"unknown pairs {bad}; known: {COMBOS}")
        plan = [pairs[i % len(pairs)] for i in range(args.rounds)]  # type: ignore[misc]
    env = Env.create("faults")
    log(f"faults: {args.rounds} rounds, seed {seed}, env {env.top}, "
        f"cgroups under {env.cgroup_parent}, uid {os.geteuid()}")
    run = Faults(env, rng)
    t0 = time.monotonic()
    final: list[str] = []
    interrupted = False
    try:
        for i, (victim, moment) in enumerate(plan, 1):
            rnd = run.run_round(i, victim, moment)
            answer = rnd.get("answer", {})
            result = answer.get("outcome") or answer.get("ok", "-")
            log(f"round {i}/{len(plan)} kill {victim:8} {moment:9} {rnd.get('phase', '-'):7} "
                f"delay {rnd.get('delay', 0):5.2f}s -> {result} [{rnd['seconds']:.1f}s]"
                + (" FINDINGS" if rnd["findings"] else ""))
        final = run.finish()
        if final:
            run.findings.append({"round": None, "kind": "leak", "detail": "at the end: "
                                 + "; ".join(final)})
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing the report of the rounds run so far")
    finally:
        if run.client is not None:
            run.client.close()
        env.close(keep=args.keep or bool(run.findings))
    elapsed = time.monotonic() - t0
    fds = fd_trend(run.client_stats)
    for (client, kernels), seen in fds.items():
        if len(seen) >= 5 and seen[-1] > seen[0] + FD_SLACK:
            run.findings.append({"round": None, "kind": "fds", "detail": (
                f"client {client} with {kernels} kernels held {seen[0]} descriptors, "
                f"{seen[-1]} {len(seen)} rounds later: {seen}")})
    phases = collections.Counter(r.get("phase", "error") for r in run.rounds)
    pairs = collections.Counter(f"{r['victim']}:{r['moment']}" for r in run.rounds)
    report = {
        "command": [sys.executable, *sys.argv],
        "seed": seed, "rounds": len(run.rounds), "seconds": round(elapsed, 1),
        "interrupted": interrupted,
        "uid": os.geteuid(), "clients_started": run.clients_started,
        "pairs": dict(sorted(pairs.items())), "phases": dict(phases),
        "findings": run.findings, "rounds_detail": run.rounds,
        "client_stats": run.client_stats,
        "client_fds": {f"client {c}, {k} kernels": v for (c, k), v in fds.items()},
        "durations": {k: [round(x, 3) for x in v] for k, v in run.durations.items()},
        "env": str(env.top),
    }
    write_report(args.json, report)
    print()
    print(f"faults: {len(run.rounds)} rounds in {elapsed:.0f} s (seed {seed}), "
          f"{len(pairs)} victim:moment pairs, kills {dict(phases)}, "
          f"{run.clients_started} clients")
    kinds = collections.Counter(f["kind"] for f in run.findings)
    print(f"findings: {len(run.findings)} {dict(kinds)}")
    for f in run.findings[:20]:
        print(f"  round {f['round']} {f.get('victim')}:{f.get('moment')} {f['kind']}: "
              f"{f['detail'][:300]}")
    if run.findings:
        print(f"environment kept for inspection: {env.top}")
    return 1 if run.findings or interrupted else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
