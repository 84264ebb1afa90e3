"""What a kernel's files cost: upload to the inbox and download from the outbox, through the
warden (cellblock.files), against a plain copy of the same bytes on the same machine.

    python benchmarks/bench_files.py [--profile agent] [--mib 8] [--repeat 5]

One jailed kernel of the profile. For each size: ``upload`` (bytes -> the warden -> a file
renamed into the inbox), ``download`` of a text file (read with openat2 beneath the jail's
outbox, decoded, passed through the profile's redaction) and of a PNG-headed file (read,
magic-number check); the baseline is ``shutil.copyfile`` of the same bytes between two temp
files. Prints the median seconds and the ratio to the copy. Not a test: nothing asserts on
time; compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from cellblock.sandbox import SyncSandbox


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="agent")
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    text = (b"day,region,amount\n" + b"1,north,10\n" * (size // 11))[:size]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        with open(src, "wb") as f:
            f.write(text)
        copy = median_seconds(lambda: shutil.copyfile(src, dst), args.repeat)
    with SyncSandbox(args.profile) as sb:
        upload = median_seconds(lambda: sb.upload("bench.csv", text), args.repeat)
        r = sb.run(f"import shutil\nshutil.copyfile('/inbox/bench.csv', '/outbox/bench.csv')\n"
                   f"open('/outbox/bench.png', 'wb').write(b'\\x89PNG\\r\\n\\x1a\\n' + "
                   f"b'\\x00' * ({size} - 8))")
        assert r.ok, r.errors
        down_text = median_seconds(lambda: sb.download("bench.csv"), args.repeat)
        down_png = median_seconds(lambda: sb.download("bench.png"), args.repeat)
    print(f"profile {args.profile}, {args.mib} MiB, median of {args.repeat}")
    print(f"{'copy (baseline)':<22}{copy:9.4f} s   1.0x")
    for name, seconds in (("upload", upload), ("download text", down_text),
                          ("download png", down_png)):
        print(f"{name:<22}{seconds:9.4f} s  {seconds / copy:5.1f}x  "
              f"{args.mib / seconds:7.1f} MiB/s")


if __name__ == "__main__":
    main()
