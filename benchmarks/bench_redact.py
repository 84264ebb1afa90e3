"""Redaction throughput, MB/s on one core: realistic mixed text and the pathological inputs.

    python benchmarks/bench_redact.py [--mb 50]

"plain" is the default gate configuration (secrets on, no PII, no exact secrets); "full" adds
all PII kinds and two exact secrets. Pathological inputs are 1-2 MB each (THREATS R18).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import random
import time
import uuid

from cellblock.redact import Redactor


def mixed_corpus(megabytes: int, seed: int = 7) -> str:
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
            e=n % 50,
            f=rng.random() * 100,
            g=rng.random(),
            h=rng.random(),
            i=n,
            m=rng.randint(1, 9),
            d=rng.randint(0, 9),
            u=uuid.UUID(int=rng.getrandbits(128)),
            h64=hashlib.sha256(str(n).encode()).hexdigest(),
            b64=base64.b64encode(f"ordinary text number {n}".encode()).decode(),
        )
        if n % 20_000 == 0:
            line += " token=ghp_" + "".join(rng.choice("abcdefABCDEF0123456789") for _ in range(36))
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


PATHOLOGICAL = {
    '"a"*1e6+"!"': "a" * 1_000_000 + "!",
    '"@"*1e6': "@" * 10**6,
    '"a."*1e6': "a." * 10**6,
    "1 MB base64 lines": base64.encodebytes(random.Random(1).randbytes(750_000)).decode(),
    '"password="*116k': "password=" * 116_000,
    '"%41"*333k': "%41" * 333_333,
    '"1111 "*200k': "1111 " * 200_000,
}


def mbps(redactor: Redactor, text: str, chunk: int | None = None) -> tuple[float, int]:
    start = time.perf_counter()
    found = 0
    if chunk is None:
        found = len(redactor.redact(text).findings)
    else:
        for i in range(0, len(text), chunk):
            found += len(redactor.redact(text[i : i + chunk]).findings)
    return len(text) / 1e6 / (time.perf_counter() - start), found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    plain = Redactor()
    full = Redactor(
        pii=("email", "phone", "card", "iban", "ssn"), exact=("s3cr3t-value", "hunter22")
    )
    corpus = mixed_corpus(args.mb)
    rows = [
        ("mixed, one 50 MB block", "plain", *mbps(plain, corpus)),
        ("mixed, 64 KB messages", "plain", *mbps(plain, corpus, 65_536)),
        ("mixed, 64 KB messages", "full", *mbps(full, corpus, 65_536)),
        ("mixed, 4 KB messages", "plain", *mbps(plain, corpus, 4096)),
    ]
    rows += [(name, "full", *mbps(full, text)) for name, text in PATHOLOGICAL.items()]
    print(f"{'input':<28} {'config':<6} {'MB/s':>8} {'findings':>9}")
    for name, config, rate, found in rows:
        print(f"{name:<28} {config:<6} {rate:>8.1f} {found:>9}")


if __name__ == "__main__":
    main()
