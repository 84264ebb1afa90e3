"""Throughput of the gate's output scanning, MB/s of CPU time on one core (issue 7).

    python benchmarks/bench_redact.py [--mb 20] [--runs 5] [--json out.json] [--quick]
    python benchmarks/bench_redact.py --build [--runs 5]

Every number is a median of ``--runs`` runs, timed with ``time.process_time`` (CPU time of this
single-threaded process, so other load on the machine does not count against it).

**The notebook corpus** (`notebook_corpus`, fixed seed) is a sequence of cells, each a list of
the messages a kernel sends, serialised as ipykernel does (``json.dumps(..., ensure_ascii=False)``
as jupyter_client's packer). Cell kinds and their weights:

- training logs: stdout ``Epoch`` lines, and stderr tqdm bars (``\\r`` updates, block characters);
- DataFrames: ``execute_result`` with pandas' text/plain and text/html (style block, table);
- logs: ``logging`` lines, HTTP request lines with query strings (``%20``, ``%5B``), JSON log lines;
- JSON: an API response as ``application/json`` + ``text/plain``, and ``print(json.dumps(...))``
  of records with non-ASCII names (so ``\\u00e9`` escapes in the text);
- errors: IPython tracebacks with ANSI colours and file paths;
- plots: ``display_data`` with a PNG (random bytes, base64; *not* scanned, images are opaque) and
  ``text/plain``; some as matplotlib-like SVG (scanned);
- arrays and warnings: numpy reprs, ``FutureWarning`` lines with site-packages paths, pip output;
- rare: a cell that prints a secret (GitHub token, AWS key id, password in a URL, a JWT, a
  base64-encoded ``.env``), about one cell in 150, so the finding path is exercised.

Stream messages are 0.2-64 KB (ipykernel sends what was printed in each 200 ms). Names, values
and ids come from a seeded generator; no real secrets anywhere.

**What is timed.** ``gate``: `OutputFilter.apply` on each message's bytes (JSON parse, walk,
redaction, caps, re-encoding when something changed) and ``flush`` at each cell's end, exactly
as the relay calls them, with a profile's output policy from the built-in policy. ``scanner``:
`Redactor.redact` on the same text leaves, without the filter around it. MB are the UTF-8 bytes
of the text leaves that are scanned (image/png and image/jpeg payloads excluded, though they are
parsed: their cost is in the time); ``all_mb`` counts whole content frames.

Profiles: ``analyst`` (secrets, no PII), ``agent`` (secrets and all PII, normalised text, 16 KiB
stream head: most of a long cell's stream is counted, not scanned), ``analyst+exact`` (analyst with
two ``redact_values`` and one ``redact_env`` secret).

**Pathological inputs** (THREATS R18) go through `Redactor.redact` with secrets, all PII and two
exact secrets, 1-2 MB each; they must be linear, not fast.

**Build time** (``--build``): wall-clock seconds of ``build_output_rules`` for the analyst
profile, without and with its exact secrets (``analyst+exact``), each in a fresh process, with an
empty hyperscan cache (``cold``: ``XDG_CACHE_HOME`` a new directory) and a filled one
(``warm``); and what a warden forked from a spawner pays (``launch after warm-up``): the build
with the launch's exact secrets in a process that already built the profile without them, as
``spawner._warm_up`` does before it forks.

The legacy ``mixed`` corpus (log-like lines, 12% of them base64 of text) is kept from the first
version of this benchmark so numbers can be compared across versions.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import statistics
import string
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellblock.output.filter import OutputFilter, build_redactor
from cellblock.policy import OutputPolicy, load_policy
from cellblock.redact import Redactor

Message = tuple[str, dict[str, Any]]  # (msg_type, content)
Cell = list[Message]

_FIRST = ["Ana", "Bruno", "Chloé", "Dmitri", "Eve", "François", "Grace", "Hiroshi", "Ines",
          "José", "Kai", "Łukasz", "Mia", "Noah", "Olga", "Priya", "Quinn", "Renée", "Søren",
          "Tomás", "Uma", "Victor", "Wen", "Xavier", "Yara", "Zoë"]
_LAST = ["Smith", "García", "Müller", "Rossi", "Kowalski", "Nguyen", "Okafor", "Andersson",
         "Dubois", "Tanaka", "Silva", "Brown", "Novák", "Jensen", "Ivanova", "Patel"]
_CATEGORIES = ["books", "garden", "toys", "electronics", "grocery", "sports", "beauty"]
_MODULES = ["pandas/core/frame.py", "pandas/core/indexing.py", "sklearn/base.py",
            "numpy/core/fromnumeric.py", "torch/nn/modules/module.py",
            "requests/adapters.py", "urllib3/connectionpool.py", "matplotlib/axes/_axes.py"]
_SITE = "/opt/conda/lib/python3.11/site-packages/"
_SOURCE_LINES = ["return self._engine.get_loc(key)", "raise KeyError(key) from err",
                 "indexer = self.columns.get_loc(key)", "values = self._get_values(key)"]
_FUNCTIONS = ["DataFrame.__getitem__", "Index.get_loc", "_LocIndexer._getitem_axis"]
_CSS = """<style scoped>
    .dataframe tbody tr th:only-of-type {
        vertical-align: middle;
    }

    .dataframe tbody tr th {
        vertical-align: top;
    }

    .dataframe thead th {
        text-align: right;
    }
</style>
"""


class _Gen:
    """Seeded generators of realistic values."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def name(self) -> str:
        return f"{self.rng.choice(_FIRST)} {self.rng.choice(_LAST)}"

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def ts(self) -> str:
        r = self.rng
        return (f"2024-{r.randint(1, 12):02}-{r.randint(1, 28):02} "
                f"{r.randint(0, 23):02}:{r.randint(0, 59):02}:{r.randint(0, 59):02}")

    def token(self, alphabet: str, n: int) -> str:
        return "".join(self.rng.choice(alphabet) for _ in range(n))

    def records(self, n: int) -> list[dict[str, Any]]:
        r = self.rng
        return [{"id": self.uuid(), "name": self.name(), "amount": round(r.uniform(1, 5000), 2),
                 "currency": r.choice(["EUR", "USD", "GBP"]), "created_at": self.ts(),
                 "category": r.choice(_CATEGORIES), "active": r.random() < 0.8,
                 "url": f"https://api.example.com/v2/orders/{r.randint(10**5, 10**6)}"}
                for _ in range(n)]


def _stream(name: str, text: str) -> Message:
    return "stream", {"name": name, "text": text}


def _split_stream(name: str, text: str, g: _Gen) -> list[Message]:
    """Text as ipykernel would send it: pieces of 0.2-64 KB, cut at line ends."""
    out, pos = [], 0
    while pos < len(text):
        size = int(g.rng.choice([200, 800, 2_000, 8_000, 16_000, 32_000, 65_000]))
        end = text.find("\n", pos + size)
        end = len(text) if end < 0 else end + 1
        out.append(_stream(name, text[pos:end]))
        pos = end
    return out


def _cell_training(g: _Gen) -> Cell:
    r = g.rng
    lines, bars = [], []
    epochs = r.randint(5, 60)
    for e in range(1, epochs + 1):
        lines.append(f"Epoch {e}/{epochs} - loss: {r.random():.4f} - accuracy: {r.random():.4f}"
                     f" - val_loss: {r.random():.4f} - val_accuracy: {r.random():.4f}"
                     f" - lr: {r.choice([1e-3, 5e-4, 1e-4]):.0e}\n")
        total = r.choice([100, 250, 1000])
        steps = []
        for i in range(0, total + 1, total // 10):
            done = int(10 * i / total)
            bar = "\u2588" * done + ("\u258c" if done < 10 else "") + " " * (9 - done)
            rate = r.uniform(50, 400)
            steps.append(f"\r{100 * i // total:3d}%|{bar}| {i}/{total} "
                         f"[00:{i % 60:02d}<00:{(total - i) % 60:02d}, {rate:.2f}it/s]")
        bars.append("".join(steps) + "\n")
    return _split_stream("stdout", "".join(lines), g) + _split_stream("stderr", "".join(bars), g)


def _cell_dataframe(g: _Gen) -> Cell:
    r = g.rng
    rows = r.randint(5, 60)
    recs = g.records(rows)
    cols = ["id", "name", "amount", "currency", "created_at", "category", "active"]
    plain = ["     " + "  ".join(f"{c:>12}" for c in cols)]
    html = [f"<div>\n{_CSS}<table border=\"1\" class=\"dataframe\">\n  <thead>\n"
            "    <tr style=\"text-align: right;\">\n      <th></th>\n"]
    html += [f"      <th>{c}</th>\n" for c in cols]
    html.append("    </tr>\n  </thead>\n  <tbody>\n")
    for i, rec in enumerate(recs):
        plain.append(f"{i:<5}" + "  ".join(f"{rec[c]!s:>12}" for c in cols))
        html.append(f"    <tr>\n      <th>{i}</th>\n")
        html += [f"      <td>{rec[c]}</td>\n" for c in cols]
        html.append("    </tr>\n")
    html.append(f"  </tbody>\n</table>\n<p>{rows} rows \u00d7 {len(cols)} columns</p>\n</div>")
    plain.append(f"\n[{rows} rows x {len(cols)} columns]")
    data = {"text/plain": "\n".join(plain), "text/html": "".join(html)}
    return [("execute_result", {"data": data, "metadata": {},
                                "execution_count": r.randint(1, 500)})]


def _cell_logs(g: _Gen) -> Cell:
    r = g.rng
    out = []
    for i in range(r.randint(20, 400)):
        kind = r.random()
        if kind < 0.4:
            out.append(f"{g.ts()},{r.randint(0, 999):03} INFO [{r.choice(_MODULES).split('/')[-1]}:"
                       f"{r.randint(10, 2000)}] processed batch {i} in {r.uniform(0, 2):.3f}s\n")
        elif kind < 0.7:
            q = r.choice(["q=hello%20world&page=2", "filter%5Bstatus%5D=open&per_page=50",
                          "sort=-created_at&limit=100", "name=Jos%C3%A9&lang=es"])
            out.append(f"{g.ts()} GET https://api.example.com/v2/items/{r.randint(1, 10**6)}?{q}"
                       f" -> {r.choice([200, 200, 200, 404, 500])} ({r.uniform(5, 900):.1f} ms)\n")
        elif kind < 0.85:
            out.append(json.dumps({"ts": g.ts(), "level": "info", "event": "request",
                                   "request_id": g.uuid(), "duration_ms": r.randint(1, 900),
                                   "user": g.name()}) + "\n")
        else:
            out.append(f"WARNING:root:retrying {g.uuid()} after {r.uniform(0, 5):.2f}s "
                       f"(attempt {r.randint(1, 5)}/5)\n")
    return _split_stream("stdout", "".join(out), g)


def _cell_json(g: _Gen) -> Cell:
    r = g.rng
    data = {"data": g.records(r.randint(3, 40)),
            "meta": {"page": r.randint(1, 9), "per_page": 50,
                     "next": "https://api.example.com/v2/orders?page=3&per_page=50"
                             "&filter%5Bstatus%5D=open"}}
    if r.random() < 0.5:
        return [("execute_result", {"data": {"application/json": data,
                                             "text/plain": repr(data)[:4000]},
                                    "metadata": {"application/json": {"expanded": False}},
                                    "execution_count": r.randint(1, 500)})]
    return _split_stream("stdout", json.dumps(data, indent=r.choice([None, 2])) + "\n", g)


def _cell_error(g: _Gen) -> Cell:
    r = g.rng
    red, green, cyan, reset = "\x1b[0;31m", "\x1b[0;32m", "\x1b[0;36m", "\x1b[0m"
    frames = [f"{red}{'-' * 75}{reset}\n{red}KeyError{reset}{' ' * 25}Traceback (most recent "
              f"call last)\nCell {green}In[{r.randint(1, 99)}], line {r.randint(1, 30)}{reset}\n"
              f"{green}----> 1{reset} df[{r.choice(['amount', 'total'])!r}]"]
    for _ in range(r.randint(2, 8)):
        mod = r.choice(_MODULES)
        line = r.randint(100, 4000)
        body = "\n".join(f"{'---> ' if k == 2 else '     '}{line - 2 + k}     "
                         f"{r.choice(_SOURCE_LINES)}" for k in range(5))
        frames.append(f"File {green}{_SITE}{mod}:{line}{reset}, in {cyan}"
                      f"{r.choice(_FUNCTIONS)}{reset}(self, key)\n{body}\n")
    frames.append(f"{red}KeyError{reset}: 'amount'")
    return [("error", {"ename": "KeyError", "evalue": "'amount'", "traceback": frames})]


def _svg(g: _Gen) -> str:
    r = g.rng
    pts = " L ".join(f"{57.6 + 3.5 * i:.3f} {r.uniform(40, 300):.3f}" for i in range(200))
    hexd = "0123456789abcdef"
    ticks = "".join(
        f'   <g id="xtick_{i}">\n    <g id="line2d_{i}">\n     <defs>\n      <path id='
        f'"m{g.token(hexd, 10)}" d="M 0 0 L 0 3.5" style="stroke: #000000; stroke-width: 0.8"/>'
        f'\n     </defs>\n     <g>\n      <use xlink:href="#m{g.token(hexd, 10)}" '
        f'x="{57.6 + 60 * i:.3f}" y="307.584" style="stroke: #000000; stroke-width: 0.8"/>\n'
        '     </g>\n    </g>\n   </g>\n'
        for i in range(8))
    return ('<?xml version="1.0" encoding="utf-8" standalone="no"?>\n<!DOCTYPE svg PUBLIC '
            '"-//W3C//DTD SVG 1.1//EN"\n  "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
            '<svg xmlns:xlink="http://www.w3.org/1999/xlink" width="460.8pt" height="345.6pt" '
            'viewBox="0 0 460.8 345.6" xmlns="http://www.w3.org/2000/svg" version="1.1">\n'
            f' <metadata>\n  <rdf:RDF><cc:Work><dc:date>{g.ts()}</dc:date></cc:Work></rdf:RDF>\n'
            f' </metadata>\n <g id="figure_1">\n  <g id="axes_1">\n{ticks}'
            f'   <path d="M {pts}" clip-path="url(#p{g.token("0123456789abcdef", 10)})" '
            'style="fill: none; stroke: #1f77b4; stroke-width: 1.5; stroke-linecap: square"/>\n'
            '  </g>\n </g>\n</svg>\n')


def _cell_plot(g: _Gen) -> Cell:
    r = g.rng
    if r.random() < 0.3:
        data = {"image/svg+xml": _svg(g), "text/plain": "<Figure size 640x480 with 1 Axes>"}
    else:
        png = base64.b64encode(r.randbytes(r.randint(15_000, 60_000))).decode()
        data = {"image/png": png, "text/plain": "<Figure size 640x480 with 1 Axes>"}
    return [("display_data", {"data": data, "metadata": {}, "transient": {}})]


def _cell_misc(g: _Gen) -> Cell:
    r = g.rng
    kind = r.random()
    if kind < 0.4:
        vals = ", ".join(f"{r.gauss(0, 1):.8f}" for _ in range(r.randint(50, 2000)))
        text = f"array([{vals}], dtype=float32)\n"
    elif kind < 0.7:
        mod = r.choice(_MODULES)
        text = "".join(
            f"{_SITE}{mod}:{r.randint(10, 3000)}: FutureWarning: The default value of "
            f"numeric_only in DataFrame.{r.choice(['mean', 'sum', 'corr'])} is deprecated. In a "
            "future version, it will default to False. Select only valid columns or specify "
            "the value of numeric_only to silence this warning.\n" for _ in range(r.randint(1, 20)))
        return _split_stream("stderr", text, g)
    else:
        pkgs = ["numpy>=1.22", "pandas", "python-dateutil>=2.8.2", "pytz>=2020.1", "tzdata"]
        text = "".join(f"Requirement already satisfied: {p} in /opt/conda/lib/python3.11/"
                       f"site-packages (from scikit-learn) ({r.randint(1, 3)}.{r.randint(0, 30)}."
                       f"{r.randint(0, 9)})\n" for p in r.choices(pkgs, k=r.randint(5, 40)))
    return _split_stream("stdout", text, g)


def _cell_secret(g: _Gen) -> Cell:
    """A rare cell that prints a (fake) secret: the finding path is part of the workload."""
    r = g.rng
    alnum = string.ascii_letters + string.digits
    kind = r.randrange(5)
    if kind == 0:
        text = f"GITHUB_TOKEN=ghp_{g.token(alnum, 36)}\n"
    elif kind == 1:
        text = f"aws_access_key_id = AKIA{g.token('ABCDEFGHIJKLMNOPQRSTUVWXYZ234567', 16)}\n"
    elif kind == 2:
        text = f"connecting to postgresql://app:{g.token(alnum, 18)}@db.internal:5432/prod\n"
    elif kind == 3:
        head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
        body = base64.urlsafe_b64encode(b'{"sub":"1234"}').decode().rstrip("=")
        text = f"Authorization: Bearer {head}.{body}.{g.token(alnum + '-_', 43)}\n"
    else:
        env = f"DB_PASSWORD={g.token(alnum + '!#%', 20)}\nAPI_KEY=sk_live_{g.token(alnum, 24)}\n"
        text = f"data:\n  .env: {base64.b64encode(env.encode()).decode()}\n"
    return _split_stream("stdout", "loading configuration\n" * r.randint(1, 50) + text, g)


_KINDS: list[tuple[Callable[[_Gen], Cell], float]] = [
    (_cell_training, 12), (_cell_dataframe, 20), (_cell_logs, 18), (_cell_json, 12),
    (_cell_error, 8), (_cell_plot, 14), (_cell_misc, 15), (_cell_secret, 0.7),
]


def notebook_corpus(megabytes: float, seed: int = 7,
                    kinds: list[str] | None = None) -> list[Cell]:
    """Cells of messages until about `megabytes` MB of content frames (see the module doc).
    With `kinds`, the name of each cell's kind is appended to it."""
    g = _Gen(seed)
    makers = [k for k, _ in _KINDS]
    weights = [w for _, w in _KINDS]
    cells: list[Cell] = []
    size = 0
    while size < megabytes * 1e6:
        maker = g.rng.choices(makers, weights)[0]
        cell = maker(g)
        cells.append(cell)
        if kinds is not None:
            kinds.append(maker.__name__.removeprefix("_cell_"))
        size += sum(len(json.dumps(c, ensure_ascii=False).encode()) for _, c in cell)
    return cells


def mixed_corpus(megabytes: float, seed: int = 7) -> str:
    """The legacy log-like corpus (first version of this benchmark), one string."""
    rng = random.Random(seed)
    lines = [
        "Epoch {e}/50 - loss: {f:.4f} - accuracy: {g:.4f} - val_loss: {h:.4f}",
        "{i:>6}  {f:>10.4f}  2024-0{m}-1{d} 12:34:56  {u}  user_{i}@example.com",
        "INFO 2024-06-11 12:00:{d:02} worker.py:{i} processed batch {i} in {f:.3f}s",
        'File "/home/user/project/src/module_{i}.py", line {i}, in handler',
        "sha256={h64}  /data/shard-{i:05}.parquet",
        "The quick brown fox jumps over the lazy dog while the model trains ({f:.2f}%).",
        "{b64}",
        "GET https://api.example.com/v1/items/{i}?page={d}&limit=100 -> 200 ({f:.1f} ms)",
    ]
    out, size, n = [], 0, 0
    target = megabytes * 1_000_000
    while size < target:
        n += 1
        line = rng.choice(lines).format(
            e=n % 50, f=rng.random() * 100, g=rng.random(), h=rng.random(), i=n,
            m=rng.randint(1, 9), d=rng.randint(0, 9), u=uuid.UUID(int=rng.getrandbits(128)),
            h64=hashlib.sha256(str(n).encode()).hexdigest(),
            b64=base64.b64encode(f"ordinary text number {n}".encode()).decode(),
        )
        if n % 20_000 == 0:
            line += " token=ghp_" + "".join(rng.choice("abcdefABCDEF0123456789") for _ in range(36))
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


PATHOLOGICAL: dict[str, str] = {
    '"a"*1e6+"!"': "a" * 1_000_000 + "!",
    '"@"*1e6': "@" * 10**6,
    '"a."*1e6': "a." * 10**6,
    "1 MB base64 lines": base64.encodebytes(random.Random(1).randbytes(750_000)).decode(),
    '"password="*116k': "password=" * 116_000,
    '"password=Xk9#mQ2$vL "*50k': "password=Xk9#mQ2$vL " * 50_000,
    '"%41"*333k': "%41" * 333_333,
    '"\\u0041"*166k': "\\u0041" * 166_666,
    '"1111 "*200k': "1111 " * 200_000,
    '"a@b.co "*140k': "a@b.co " * 140_000,
    "PEM headers *30k": "-----BEGIN RSA PRIVATE KEY-----\n" * 30_000,
    "base64 of a .env *20k": "\n".join(
        [base64.b64encode(b"API_KEY=sk_live_" + b"x1Y2z3" * 4 + b"\n").decode()] * 20_000),
    '"ghp_"*250k': "ghp_" * 250_000,
    '"QUFB"*250k (base64 "AAA")': "QUFB" * 250_000,
    '"\\x1b["*500k': "\x1b[" * 500_000,
    '("\\x1b]" + "x"*10k)*100 (open OSC)': ("\x1b]" + "x" * 10_000) * 100,
    '"\\x1b[1;"*333k (CSI parameters)': "\x1b[1;" * 333_333,
    '"ab\\b"*333k': "ab\b" * 333_333,
    '"12%|###   |\\r"*83k (a bar on one line)': "12%|###   |\r" * 83_333,
    # issue 14's generic detector: long keys, quoted values, XML, curl, "token - value"
    '("key"*170 + "=Aa1Bb2Cc3 ")*1.9k': ("key" * 170 + "=Aa1Bb2Cc3 ") * 1_900,
    '("token"*90 + "=\"A1b2"*20 + "\" ")*2k': ("token" * 90 + '="' + "A1b2" * 20 + '" ') * 2_000,
    '("<" + "key"*150 + ">" + "x"*40)*2k': ("<" + "key" * 150 + ">" + "x" * 40 + "\n") * 2_000,
    '("curl " + "-u a:b "*70)*2k': ("curl " + "-u a:b " * 70 + "\n") * 2_000,
    "(\"token - 'Ab1\"*30 + \"' \")*10k": ("token - '" + "Ab1" * 30 + "' ") * 10_000,
}


# -- timing ------------------------------------------------------------------------------


def _cpu(fn: Callable[[], Any], runs: int) -> float:
    """Median CPU seconds of `fn` over `runs` runs."""
    times = []
    for _ in range(runs):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _policies() -> dict[str, tuple[OutputPolicy, dict[str, str]]]:
    policy = load_policy()
    analyst = policy.profile("analyst").output
    exact = analyst.model_copy(update={
        "redact_values": ("s3cr3t-value/with+odd=chars!", "hunter22-prod-db"),
        "redact_env": ("BENCH_SECRET",)})
    return {"analyst": (analyst, {}), "agent": (policy.profile("agent").output, {}),
            "analyst+exact": (exact, {"BENCH_SECRET": "bench-env-secret-9f3k2q"})}


def _frames(cells: list[Cell]) -> list[list[tuple[str, bytes]]]:
    return [[(t, json.dumps(c, ensure_ascii=False).encode("utf-8", "surrogatepass"))
             for t, c in cell] for cell in cells]


def _text_leaves(obj: Any, out: list[str], mime: str = "") -> None:
    if isinstance(obj, str):
        if mime not in ("image/png", "image/jpeg"):
            out.append(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.append(k)
            _text_leaves(v, out, k if k.startswith(("image/", "text/", "application/")) else mime)
    elif isinstance(obj, list):
        for v in obj:
            _text_leaves(v, out, mime)


class _Timed:
    """A Redactor that adds the CPU time of every call the gate makes to it to ``seconds``:
    what the gate spends scanning (normalising, scanning, checking, decoding, replacing), as
    opposed to parsing and re-encoding JSON and the filter's own bookkeeping."""

    def __init__(self, redactor: Any) -> None:
        self._redactor = redactor
        self.seconds = 0.0
        self.max_match_len = redactor.max_match_len

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._redactor, name)

        def timed(*args: Any) -> Any:
            start = time.process_time()
            try:
                return method(*args)
            finally:
                self.seconds += time.process_time() - start
        return timed


def _gate_run(policy: OutputPolicy, env: dict[str, str], frames: list[list[tuple[str, bytes]]],
              timed: list[float] | None = None) -> Callable[[], None]:
    """One pass of the corpus through a new OutputFilter, as the relay drives it. With
    `timed`, the CPU seconds spent inside the Redactor are appended to it."""
    def run() -> None:
        redactor = build_redactor(policy, env)
        if timed is not None and redactor is not None:
            redactor = _Timed(redactor)
        f = OutputFilter(policy, redactor, audit=None, nonce="bench0")
        for n, cell in enumerate(frames):
            parent = {"msg_id": f"cell-{n}"}
            for msg_type, content in cell:
                f.apply("iopub", msg_type, {"msg_type": msg_type}, parent, content, b"{}")
            f.flush(parent["msg_id"])
        if timed is not None and isinstance(redactor, _Timed):
            timed.append(redactor.seconds)
    return run


def measure(mb: float = 20, runs: int = 5, seed: int = 7, legacy: bool = True,
            pathological: bool = True, profiles: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the benchmark; return every number as a dict (what ``--json`` writes).

    Called by ``main`` and by the combined benchmark command. ``mb``: size of the notebook
    corpus (and of the legacy corpus); ``runs``: runs per median.
    """
    result: dict[str, Any] = {"method": "median CPU time (time.process_time) of "
                              f"{runs} runs, one thread", "mb": mb, "runs": runs, "seed": seed,
                              "python": sys.version.split()[0], "notebook": {}, "legacy": {},
                              "pathological": {}}
    kinds: list[str] = []
    cells = notebook_corpus(mb, seed, kinds)
    frames = _frames(cells)
    leaves: list[str] = []
    for cell in cells:
        for _, content in cell:
            _text_leaves(content, leaves)
    text_mb = sum(len(s.encode("utf-8", "surrogatepass")) for s in leaves) / 1e6
    all_mb = sum(len(c) for cell in frames for _, c in cell) / 1e6
    result["corpus"] = {"cells": len(cells), "messages": sum(map(len, cells)),
                        "text_mb": round(text_mb, 3), "all_mb": round(all_mb, 3),
                        "non_ascii_leaves": sum(not s.isascii() for s in leaves)}
    for name, (policy, env) in _policies().items():
        if profiles is not None and name not in profiles:
            continue
        redactor = build_redactor(policy, env)
        gate_s = _cpu(_gate_run(policy, env, frames), runs)
        inside: list[float] = []
        for _ in range(runs):
            _gate_run(policy, env, frames, inside)()
        per_string_s = _cpu(lambda r=redactor: [r.redact(s) for s in leaves], runs)
        by_kind = {}
        for kind in sorted(set(kinds)):
            picked = [c for c, k in zip(cells, kinds, strict=True) if k == kind]
            kind_leaves: list[str] = []
            for cell in picked:
                for _, content in cell:
                    _text_leaves(content, kind_leaves)
            kind_mb = sum(len(s.encode("utf-8", "surrogatepass")) for s in kind_leaves) / 1e6
            spent: list[float] = []
            for _ in range(runs):
                _gate_run(policy, env, _frames(picked), spent)()
            by_kind[kind] = {"mb": round(kind_mb, 3),
                             "gate_scanning_mb_s": round(kind_mb / statistics.median(spent), 1)}
        result["notebook"][name] = {
            "gate_mb_s": round(text_mb / gate_s, 1), "gate_all_mb_s": round(all_mb / gate_s, 1),
            "gate_scanning_mb_s": round(text_mb / statistics.median(inside), 1),
            "per_string_mb_s": round(text_mb / per_string_s, 1), "by_kind": by_kind}
    if legacy:
        plain = Redactor()
        text = mixed_corpus(mb, seed)
        mbytes = len(text) / 1e6
        result["legacy"]["mixed, one block, secrets"] = round(
            mbytes / _cpu(lambda: plain.redact(text), runs), 1)
        chunks = [text[i:i + 65_536] for i in range(0, len(text), 65_536)]
        result["legacy"]["mixed, 64 KB pieces, secrets"] = round(
            mbytes / _cpu(lambda: [plain.redact(c) for c in chunks], runs), 1)
    if pathological:
        full = Redactor(pii=("email", "phone", "card", "iban", "ssn"),
                        exact=("s3cr3t-value", "hunter22"))
        for name, text in PATHOLOGICAL.items():
            seconds = _cpu(lambda t=text: full.redact(t), max(1, min(runs, 3)))
            result["pathological"][name] = {"mb": round(len(text) / 1e6, 2),
                                            "mb_s": round(len(text) / 1e6 / seconds, 1)}
    return result


_BUILD_CHILD = """
import json, sys, time
from cellblock.output.filter import build_output_rules
sys.path.insert(0, sys.argv[2])
from bench_redact import _policies
policies = _policies()
(plain, _), (exact, env) = policies["analyst"], policies["analyst+exact"]
out = {}
if sys.argv[1] == "warden":
    build_output_rules(plain, audit=None, env={})
    start = time.perf_counter()
    build_output_rules(exact, audit=None, env=env)
else:
    policy, env = (exact, env) if sys.argv[1] == "exact" else (plain, {})
    start = time.perf_counter()
    build_output_rules(policy, audit=None, env=env)
print(time.perf_counter() - start)
"""


def measure_build(runs: int = 5) -> dict[str, float]:
    """Median wall-clock seconds of building the output rules (see the module doc)."""
    import subprocess
    import tempfile

    here = str(Path(__file__).resolve().parent)

    def once(mode: str, cache: str) -> float:
        done = subprocess.run([sys.executable, "-c", _BUILD_CHILD, mode, here],
                              env={**os.environ, "XDG_CACHE_HOME": cache},
                              capture_output=True, text=True, check=True)
        return float(done.stdout)

    times: dict[str, list[float]] = {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as warm:
            once("plain", warm)
            for mode, label in (("plain", "analyst"), ("exact", "analyst+exact")):
                with tempfile.TemporaryDirectory() as cold:
                    times.setdefault(f"{label}, cold cache", []).append(once(mode, cold))
                times.setdefault(f"{label}, warm cache", []).append(once(mode, warm))
            times.setdefault("analyst+exact launch after warm-up", []).append(
                once("warden", warm))
    return {name: round(statistics.median(t), 4) for name, t in times.items()}


def _print(result: dict[str, Any]) -> None:
    c = result.get("corpus", {})
    print(f"notebook corpus: {c.get('cells')} cells, {c.get('messages')} messages, "
          f"{c.get('text_mb')} MB of scanned text in {c.get('all_mb')} MB of content frames; "
          f"{result['method']}")
    print(f"{'profile':<16} {'gate':>8} {'(all bytes)':>12} {'scanning':>9} {'per string':>11}"
          "   MB/s of text, one core")
    for name, row in result["notebook"].items():
        print(f"{name:<16} {row['gate_mb_s']:>8.1f} {row['gate_all_mb_s']:>12.1f} "
              f"{row['gate_scanning_mb_s']:>9.1f} {row['per_string_mb_s']:>11.1f}")
    for name, row in result["notebook"].items():
        print(f"  {name} scanning by kind of cell: " + ", ".join(
            f"{kind} {v['gate_scanning_mb_s']:.0f} ({v['mb']:.2f} MB)"
            for kind, v in row["by_kind"].items()))
    for name, rate in result["legacy"].items():
        print(f"legacy {name:<40} {rate:>8.1f} MB/s")
    for name, row in result["pathological"].items():
        print(f"pathological {name:<34} {row['mb']:>5.2f} MB {row['mb_s']:>8.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20, help="corpus size (default 20)")
    parser.add_argument("--runs", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--quick", action="store_true", help="notebook corpus only")
    parser.add_argument("--cpu", type=int, help="pin to this CPU (os.sched_setaffinity)")
    parser.add_argument("--build", action="store_true",
                        help="only the build time of the output rules, in fresh processes")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.build:
        build = measure_build(args.runs)
        for name, seconds in build.items():
            print(f"build_output_rules, {name:<38} {seconds * 1000:>8.1f} ms")
        if args.json:
            args.json.write_text(json.dumps({"build_seconds": build}, indent=2) + "\n")
        return
    result = measure(args.mb, args.runs, args.seed, legacy=not args.quick,
                     pathological=not args.quick)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
