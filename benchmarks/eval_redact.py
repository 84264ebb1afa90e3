"""Recall and false positives of the gate's redaction beside detect-secrets and CredSweeper.

    python benchmarks/redact_corpus.py --gitleaks G --trufflehog T --out corpus.jsonl
    python benchmarks/eval_redact.py corpus.jsonl [--peers] [--json out.json] [--misses 20]

Every case of the corpus (redact_corpus.py) goes through the gate's own path: a new cell of
`OutputFilter` with the profile's output policy (``build_redactor``), the case printed as one
stream message, then the cell's flush, as the relay drives it. The released text is the output.

Scores, per case, the same for every scanner:

- **flagged**: the scanner reports something in the case (for us: the output holds a
  ``[REDACTED:`` marker). *Recall* is flagged secret cases / secret cases; *false positives*
  flagged benign cases / benign cases.
- **FP near**: false positives among the near-misses of gitleaks' rule tests and those
  written here (placeholders, documented examples, ids, code); **FP th-inv**: among
  trufflehog's "invalid pattern" cases, which are mostly a provider's token one character or
  length off, assigned to a key (``luno key = '=XyDP7...'``), flagged by any scanner that
  redacts random values next to a keyword.
- **removed** (secret cases whose secret value is known, gitleaks-generated and trufflehog cases
  with a ``want`` inside the input): no run of 8 or more characters of the secret's longest
  third is left in our output; for a peer, one of its reported values covers the secret.

``--peers`` runs detect-secrets (its plugins and default filters on each case as a file, as
``detect-secrets scan`` does) and CredSweeper (its CLI with the ML validation on, each case
a file) on the same cases; their results are cached next to the corpus
(``corpus.jsonl.<peer>.json``, keyed by the corpus' sha256).

``--kernel N`` prints a seeded sample of N cases (half secret, half benign) through a real
jailed kernel of the first profile, one case a cell, and scores what the client receives beside
the same cases through the gate's path in-process.

``--ordinary`` checks that ordinary analysis output is not changed by redaction: the notebook
corpus of bench_redact.py without its secret cells, and pandas DataFrames of UUIDs, hashes,
timestamps and floats, through the analyst and agent profiles; any ``[REDACTED:`` is a failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from cellblock.output.filter import OutputFilter, build_redactor
from cellblock.policy import load_policy

MARK = "[REDACTED:"


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gate_outputs(cases: list[dict[str, Any]], profile: str) -> tuple[list[str], float]:
    """What the gate releases for each case printed alone in a cell, and the CPU seconds."""
    policy = load_policy().profile(profile).output
    redactor = build_redactor(policy, {})
    f = OutputFilter(policy, redactor, audit=None, nonce="eval00")
    out = []
    start = time.process_time()
    for n, case in enumerate(cases):
        parent = {"msg_id": f"case-{n}"}
        content = json.dumps({"name": "stdout", "text": case["text"]}).encode()
        sent = f.apply("iopub", "stream", {"msg_type": "stream"}, parent, content, b"{}")
        text = ""
        if isinstance(sent, tuple):
            sent = sent[0]
        if isinstance(sent, bytes) and sent:
            text = json.loads(sent).get("text", "")
        text += "".join(c["text"] for _t, c in f.flush(parent["msg_id"]))
        out.append(text)
    return out, time.process_time() - start


def leaked(secret: str, output: str) -> bool:
    """Some 8-character run of the secret (or all of a shorter one) is in the output."""
    n = min(8, len(secret))
    return any(secret[i:i + n] in output for i in range(len(secret) - n + 1))


def covered(secret: str, values: list[str]) -> bool:
    return any(secret in v or (len(v) >= 0.8 * len(secret) and v in secret) for v in values)


# -- peers ----------------------------------------------------------------------------------

def detect_secrets_run(cases: list[dict[str, Any]]) -> tuple[list[list[str]], float]:
    """detect-secrets as ``detect-secrets scan`` runs it: each case a file, default plugins
    and filters (its ad-hoc ``scan_line`` skips the filters and searches eagerly)."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    out = []
    with tempfile.TemporaryDirectory() as tmp, default_settings():
        paths = []
        for n, case in enumerate(cases):
            path = Path(tmp, f"{n:06}.txt")
            path.write_text(case["text"])
            paths.append(str(path))
        start = time.process_time()
        collection = SecretsCollection()
        for path in paths:
            collection.scan_file(path)
        seconds = time.process_time() - start
        for path in paths:
            out.append([s.secret_value or "" for s in collection[path]])
    return out, seconds


def credsweeper_run(cases: list[dict[str, Any]]) -> tuple[list[list[str]], float]:
    exe = Path(sys.executable).with_name("credsweeper")
    out: list[list[str]] = [[] for _ in cases]
    with tempfile.TemporaryDirectory() as tmp:
        for n, case in enumerate(cases):
            Path(tmp, f"{n:06}.txt").write_text(case["text"])
        report = Path(tmp, "report.json")
        start = time.monotonic()
        subprocess.run([str(exe), "--path", tmp, "--save-json", str(report), "--no-stdout",
                        "--jobs", "1", "--log", "error"], check=True,
                       stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - start
        for cand in json.loads(report.read_text()):
            for line in cand.get("line_data_list", []):
                name = Path(line["path"]).stem
                if name.isdigit():
                    out[int(name)].append(line.get("value") or "")
    return out, seconds


def peer(name: str, corpus: Path, cases: list[dict[str, Any]]) -> tuple[list[list[str]], float]:
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    cache = corpus.with_name(f"{corpus.name}.{name}.json")
    if cache.exists():
        data = json.loads(cache.read_text())
        if data["sha256"] == digest:
            return data["values"], data["seconds"]
    run = detect_secrets_run if name == "detect-secrets" else credsweeper_run
    values, seconds = run(cases)
    cache.write_text(json.dumps({"sha256": digest, "values": values, "seconds": seconds}))
    return values, seconds


# -- scoring --------------------------------------------------------------------------------

def score(cases: list[dict[str, Any]], flagged: list[bool], removed: list[bool | None]
          ) -> dict[str, Any]:
    secret = [i for i, c in enumerate(cases) if c["label"] == "secret"]
    benign = [i for i, c in enumerate(cases) if c["label"] == "benign"]
    known = [i for i in secret if removed[i] is not None]
    by_source: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        src = case["id"].split("/")[0] + "/" + case["label"]
        by_source.setdefault(src, [0, 0])
        by_source[src][0] += 1
        by_source[src][1] += int(flagged[i])
    near = [i for i in benign if not cases[i]["id"].startswith("trufflehog/")]
    invalid = [i for i in benign if cases[i]["id"].startswith("trufflehog/")]
    return {
        "recall": sum(flagged[i] for i in secret) / len(secret),
        "fp_near_miss": sum(flagged[i] for i in near) / max(1, len(near)),
        "fp_trufflehog_invalid": sum(flagged[i] for i in invalid) / max(1, len(invalid)),
        "removed": sum(bool(removed[i]) for i in known) / max(1, len(known)),
        "false_positives": sum(flagged[i] for i in benign) / len(benign),
        "secret_cases": len(secret), "benign_cases": len(benign), "known_secret": len(known),
        "by_source": {k: f"{v[1]}/{v[0]}" for k, v in sorted(by_source.items())},
    }


def evaluate(corpus: Path, peers: bool, profiles: tuple[str, ...], misses: int
             ) -> dict[str, Any]:
    cases = load(corpus)
    mb = sum(len(c["text"].encode()) for c in cases) / 1e6
    results: dict[str, Any] = {"cases": len(cases), "mb": mb}
    for profile in profiles:
        outputs, seconds = gate_outputs(cases, profile)
        flagged = [MARK in o for o in outputs]
        removed = [None if not c["secret"] or c["label"] != "secret"
                   else (MARK in o and not leaked(c["secret"], o))
                   for c, o in zip(cases, outputs, strict=True)]
        results[f"cellblock {profile}"] = score(cases, flagged, removed) | {
            "mb_per_s": mb / seconds}
        if misses:
            _show(cases, outputs, flagged, misses)
    if peers:
        for name in ("detect-secrets", "credsweeper"):
            values, seconds = peer(name, corpus, cases)
            flagged = [bool(v) for v in values]
            removed = [None if not c["secret"] or c["label"] != "secret"
                       else covered(c["secret"], v) for c, v in zip(cases, values, strict=True)]
            results[name] = score(cases, flagged, removed) | {"mb_per_s": mb / seconds}
    return results


def _show(cases: list[dict[str, Any]], outputs: list[str], flagged: list[bool], n: int) -> None:
    missed = Counter()
    fps = Counter()
    for c, o, f in zip(cases, outputs, flagged, strict=True):
        key = c["id"].rsplit("/", 1)[0]
        if c["label"] == "secret" and (not f or (c["secret"] and leaked(c["secret"], o))):
            missed[key] += 1
            if missed[key] <= 1 and sum(missed.values()) <= n:
                print("MISS", c["id"], repr(c["text"][:200]), "->", repr(o[:200]))
        elif c["label"] == "benign" and f:
            fps[key] += 1
            if fps[key] <= 1 and sum(fps.values()) <= n:
                print("FP  ", c["id"], repr(c["text"][:200]), "->", repr(o[:200]))
    print("misses by rule:", missed.most_common(40))
    print("false positives by source:", fps.most_common(20))


def ordinary(profiles: tuple[str, ...]) -> dict[str, int]:
    """Redactions in ordinary analysis output (must be 0), per profile."""
    import bench_redact as bench
    import numpy as np
    import pandas as pd

    kinds: list[str] = []
    cells = bench.notebook_corpus(5, seed=11, kinds=kinds)
    cells = [c for c, k in zip(cells, kinds, strict=True) if k != "secret"]
    rng = np.random.default_rng(14)
    import uuid as _uuid
    for n in range(60):
        frame = pd.DataFrame({
            "id": [str(_uuid.UUID(int=int(rng.integers(0, 2**62)) << 64 | n)) for _ in range(20)],
            "sha256": [hashlib.sha256(f"{n}-{i}".encode()).hexdigest() for i in range(20)],
            "md5": [hashlib.md5(f"{n}-{i}".encode()).hexdigest() for i in range(20)],
            "ts": pd.date_range("2024-01-01", periods=20, freq="h"),
            "value": rng.normal(size=20), "count": rng.integers(0, 10**9, size=20),
            "token_count": rng.integers(0, 4096, size=20),
            "key": [f"user_{i:05}" for i in rng.integers(0, 99999, size=20)],
        })
        cells.append([("execute_result", {"data": {"text/plain": repr(frame),
                                                  "text/html": frame.to_html()},
                                         "metadata": {}, "execution_count": n}),
                      ("stream", {"name": "stdout", "text": frame.to_string() + "\n"}),
                      ("stream", {"name": "stdout",
                                  "text": frame.to_json(orient="records", date_format="iso")})])
    out = {}
    for profile in profiles:
        policy = load_policy().profile(profile).output
        f = OutputFilter(policy, build_redactor(policy, {}), audit=None, nonce="eval00")
        count = 0
        for n, cell in enumerate(cells):
            parent = {"msg_id": f"c{n}"}
            for msg_type, content in cell:
                sent = f.apply("iopub", msg_type, {"msg_type": msg_type}, parent,
                               json.dumps(content).encode(), b"{}")
                blob = sent[0] if isinstance(sent, tuple) else sent
                if isinstance(blob, bytes) and MARK.encode() in blob:
                    count += 1
            count += sum(MARK in c["text"] for _t, c in f.flush(parent["msg_id"]))
        out[profile] = count
    return out


async def _kernel_outputs(cases: list[dict[str, Any]], profile: str) -> list[str]:
    """What a client receives when a real jailed kernel of `profile` prints each case, one
    case a cell (everything on iopub for that cell until its idle)."""
    from cellblock.notebook_run import sandbox_kernel_manager

    km = sandbox_kernel_manager(profile)
    await km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=120)
        out = []
        for case in cases:
            msg_id = kc.execute(f"print({case['text']!r})")
            seen = ""
            while True:
                msg = await kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    seen += msg["content"]["text"]
                elif (msg["msg_type"] == "status"
                      and msg["content"]["execution_state"] == "idle"):
                    break
            out.append(seen)
        return out
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)


def kernel_sample(corpus: Path, n: int, profile: str, seed: int = 14) -> dict[str, Any]:
    """Score a seeded sample of `n` cases (half secret, half benign) through a real kernel,
    beside the same cases through `gate_outputs` (they should agree)."""
    import asyncio
    import random

    cases = load(corpus)
    rng = random.Random(seed)
    picked = (rng.sample([c for c in cases if c["label"] == "secret"], n // 2)
              + rng.sample([c for c in cases if c["label"] == "benign"], n - n // 2))
    kernel = asyncio.run(_kernel_outputs(picked, profile))
    gate, _ = gate_outputs(picked, profile)
    result = {}
    for name, outputs in (("kernel", kernel), ("gate", gate)):
        flagged = [MARK in o for o in outputs]
        removed = [None if not c["secret"] or c["label"] != "secret"
                   else (MARK in o and not leaked(c["secret"], o))
                   for c, o in zip(picked, outputs, strict=True)]
        result[name] = score(picked, flagged, removed)
    result["disagree"] = sum((MARK in k) != (MARK in g) for k, g in zip(kernel, gate,
                                                                         strict=True))
    return result


def _print(results: dict[str, Any]) -> None:
    print(f"{results['cases']} cases, {results['mb']:.2f} MB (MB/s: of these small cases, one "
          "at a time; per-case overhead dominates)")
    print(f"{'scanner':20} {'recall':>7} {'removed':>8} {'FP all':>7} {'FP near':>8}"
          f" {'FP th-inv':>9} {'MB/s':>6}")
    for name, r in results.items():
        if isinstance(r, dict) and "recall" in r:
            print(f"{name:20} {r['recall']:7.3f} {r['removed']:8.3f} {r['false_positives']:7.3f}"
                  f" {r['fp_near_miss']:8.3f} {r['fp_trufflehog_invalid']:9.3f}"
                  f" {r['mb_per_s']:6.2f}")
    for name, r in results.items():
        if isinstance(r, dict) and "by_source" in r:
            print(f"  {name}: {r['by_source']}")
    if "ordinary" in results:
        print("redactions in ordinary analysis output:", results["ordinary"])
    if "kernel_sample" in results:
        k = results["kernel_sample"]
        for name in ("kernel", "gate"):
            r = k[name]
            print(f"sample through a real {results['kernel_profile']} kernel, {name:6}: recall "
                  f"{r['recall']:.3f} removed {r['removed']:.3f} FP {r['false_positives']:.3f} "
                  f"({r['secret_cases']} secret, {r['benign_cases']} benign)")
        print(f"  cases where the kernel's output and the gate path disagree: {k['disagree']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--peers", action="store_true", help="also run detect-secrets, "
                        "CredSweeper")
    parser.add_argument("--profiles", default="agent,analyst")
    parser.add_argument("--ordinary", action="store_true")
    parser.add_argument("--misses", type=int, default=0, help="show this many misses and FPs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--kernel", type=int, default=0, metavar="N",
                        help="also print a seeded sample of N cases through a real jailed "
                        "kernel of the first profile")
    args = parser.parse_args()
    profiles = tuple(args.profiles.split(","))
    results = evaluate(args.corpus, args.peers, profiles, args.misses)
    if args.ordinary:
        results["ordinary"] = ordinary(profiles)
    if args.kernel:
        results["kernel_profile"] = profiles[0]
        results["kernel_sample"] = kernel_sample(args.corpus, args.kernel, profiles[0])
    _print(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
