"""Bounded-time fuzzing of the frame codec and the session (sans-IO core).

Run: ``python benchmarks/fuzz.py [--runs N] [--max-time S] [--engine auto|atheris|builtin]
[--targets codec,session-client,session-server] [--seed N]``

The targets live in ``tests/protocol/fuzz_targets.py`` (see its docstring): ``codec`` feeds
MAGIC + arbitrary bytes to the frame reader and decoder, ``session-client`` and
``session-server`` drive an authenticated :class:`~muxtunnel.protocol.session.Session` with an
input read as a program of peer frames and local API calls. A crash is any exception other
than a ``MuxtunnelError`` subclass, including a broken invariant.

Engines:

* ``atheris`` (``pip install 'muxtunnel[fuzz]'``): coverage-guided libFuzzer, one child
  process per target with ``muxtunnel.protocol`` instrumented; the corpus grows in
  ``build/fuzz/corpus/TARGET`` and is reused by the next run.
* ``builtin``: a mutation fuzzer with a fixed seed over the seed corpus (protocol-spec.md
  Appendix A vectors and scripted sessions, plus ``build/fuzz/corpus/TARGET`` when an atheris
  run left one; the same inputs every run for the same corpus); no extra dependency.
* ``auto`` (default): atheris if it imports, else builtin.

Each target stops after ``--runs`` inputs or ``--max-time`` seconds, whichever comes first.
For every target the script prints the inputs run, the duration and each distinct crash
(exception type and place) with its minimised input in hex and its traceback; crashing
inputs are also written to ``build/fuzz/crashes/``. Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "fuzz"
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------
# Crash bookkeeping


def crash_key(exc: BaseException) -> str:
    """Exception type and the innermost frame inside muxtunnel (or the test harness)."""
    frames = traceback.extract_tb(exc.__traceback__)
    place = frames[-1] if frames else None
    for frame in reversed(frames):
        if "/muxtunnel/" in frame.filename:
            place = frame
            break
    where = f"{Path(place.filename).name}:{place.lineno}" if place else "?"
    return f"{type(exc).__name__} at {where}"


def run_one(target: Callable[[bytes], None], data: bytes) -> BaseException | None:
    """Run one input; return the crash (None if the outcome is acceptable)."""
    from muxtunnel.errors import MuxtunnelError

    try:
        target(data)
    except MuxtunnelError:
        return None  # the targets catch these themselves; an escaped one is still acceptable
    except Exception as exc:
        return exc
    return None


class CrashLog:
    """Distinct crashes of one target, appended to a JSON-lines file as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, int] = {}

    def add(self, exc: BaseException, data: bytes) -> None:
        key = crash_key(exc)
        first = key not in self.seen
        self.seen[key] = self.seen.get(key, 0) + 1
        if first:
            tb = "".join(traceback.format_exception(exc))
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "hex": data.hex(), "traceback": tb}) + "\n")
                f.flush()


def minimise(target: Callable[[bytes], None], data: bytes, key: str, budget: int = 20_000) -> bytes:
    """Remove chunks (halving their size) while the same crash still happens."""
    tries = 0
    chunk = max(1, len(data) // 2)
    while chunk >= 1 and tries < budget:
        i = 0
        changed = False
        while i < len(data) and tries < budget:
            candidate = data[:i] + data[i + chunk :]
            tries += 1
            exc = run_one(target, candidate)
            if candidate and exc is not None and crash_key(exc) == key:
                data = candidate
                changed = True
            else:
                i += chunk
        if not changed:
            chunk //= 2
    return data


# ---------------------------------------------------------------------------------------------
# Seeds


def seeds(name: str) -> list[bytes]:
    """The seed corpus of a target."""
    from tests.protocol.fuzz_targets import codec_seeds, session_seeds

    return codec_seeds() if name == "codec" else session_seeds()


# ---------------------------------------------------------------------------------------------
# The builtin engine

_INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 0x7F, 0x80, 0xFF]
_INTERESTING32 = [0, 1, 8, 12, 16, 1024, 4096, 4097, 16_384, 65_536, 65_537, 2**31 - 1, 2**32 - 1]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """One to four random edits: bit flips, interesting values, inserts, deletes, splices."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(9)
        n = len(buf)
        pos = rng.randrange(n) if n else 0
        if kind == 0 and n:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and n:
            buf[pos] = rng.choice(_INTERESTING)
        elif kind == 2 and n:
            buf[pos] = rng.randrange(256)
        elif kind == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 4 and n > 1:
            del buf[pos : pos + rng.randint(1, 16)]
        elif kind == 5 and n:
            end = min(n, pos + rng.randint(1, 32))
            buf[pos:pos] = buf[pos:end]
        elif kind == 6:
            other = rng.choice(corpus)
            if other:
                start = rng.randrange(len(other))
                buf[pos:pos] = other[start : start + rng.randint(1, 64)]
        elif kind == 7 and n >= 4:
            at = rng.randrange(n - 3)
            buf[at : at + 4] = rng.choice(_INTERESTING32).to_bytes(4, "big")
        elif kind == 8 and n > 2:
            del buf[rng.randrange(1, n) :]
    return bytes(buf[:4096])


#: Inputs taken from an atheris corpus as extra seeds of the builtin engine, at most.
_MAX_SAVED = 5_000


def run_builtin(
    name: str, runs: int, max_time: float, seed: int, log: CrashLog
) -> tuple[int, float]:
    from tests.protocol.fuzz_targets import TARGETS

    target = TARGETS[name]
    rng = random.Random(f"{seed}:{name}")
    corpus = seeds(name)
    saved = BUILD / "corpus" / name  # grown by earlier atheris runs, if any
    if saved.is_dir():
        corpus += [p.read_bytes() for p in sorted(saved.iterdir())[:_MAX_SAVED] if p.is_file()]
    print(f"  {name}: {len(corpus)} seed inputs", flush=True)
    count = 0
    start = time.perf_counter()
    deadline = start + max_time
    for data in corpus:
        exc = run_one(target, data)
        if exc is not None:
            log.add(exc, data)
        count += 1
    while count < runs:
        if count % 256 == 0 and time.perf_counter() > deadline:
            break
        roll = rng.random()
        if roll < 0.05:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))
        else:
            data = mutate(rng, rng.choice(corpus), corpus)
            if roll > 0.995 and len(corpus) < 5_000:
                corpus.append(data)  # drift slowly away from the seeds
        exc = run_one(target, data)
        if exc is not None:
            log.add(exc, data)
        count += 1
        if count % 100_000 == 0:
            print(f"  {name}: {count} inputs, {time.perf_counter() - start:.0f} s", flush=True)
    return count, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The atheris engine (child process per target)


def atheris_child(name: str, runs: int, max_time: float, seed: int, crash_file: Path) -> None:
    atheris = importlib.import_module("atheris")  # optional: the "fuzz" extra, no type stubs

    with atheris.instrument_imports(include=["muxtunnel.protocol"]):
        from tests.protocol.fuzz_targets import TARGETS
    target = TARGETS[name]
    log = CrashLog(crash_file)

    def one(data: bytes) -> None:
        exc = run_one(target, data)
        if exc is not None:
            log.add(exc, data)

    corpus = BUILD / "corpus" / name
    seed_dir = BUILD / "seeds" / name
    corpus.mkdir(parents=True, exist_ok=True)
    seed_dir.mkdir(parents=True, exist_ok=True)
    for data in seeds(name):
        (seed_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
    args = [
        sys.argv[0],
        f"-runs={runs}",
        f"-max_total_time={max(1, int(max_time))}",
        f"-seed={seed + 1}",
        f"-max_len={1024 if name == 'codec' else 4096}",
        "-rss_limit_mb=2048",
        "-timeout=30",
        "-print_final_stats=1",
        str(corpus),
        str(seed_dir),
    ]
    atheris.Setup(args, one)
    atheris.Fuzz()


def run_atheris(
    name: str, runs: int, max_time: float, seed: int, crash_file: Path
) -> tuple[int, float]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--runs",
        str(runs),
        "--max-time",
        str(max_time),
        "--seed",
        str(seed),
        "--crash-file",
        str(crash_file),
    ]
    log_path = crash_file.with_suffix(".libfuzzer.log")
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - start
    output = log_path.read_text(encoding="utf-8", errors="replace")
    done = re.search(r"Done (\d+) runs in (\d+) second", output)
    if done is None:
        sys.stderr.write(output[-4000:])
        raise SystemExit(f"{name}: the atheris child failed (exit {proc.returncode})")
    for line in output.splitlines():
        if line.startswith("stat::") or "DONE" in line:
            print(f"  {line.strip()}")
    return int(done.group(1)), elapsed


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="codec,session-client,session-server")
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--max-time", type=float, default=1800.0, help="seconds per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "builtin"), default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--crash-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        atheris_child(args.child, args.runs, args.max_time, args.seed, args.crash_file)
        return 0

    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") is not None else "builtin"
    from tests.protocol.fuzz_targets import TARGETS

    crash_dir = BUILD / "crashes"
    crash_dir.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    print(
        f"engine {engine}, seed {args.seed}, up to {args.runs} inputs or "
        f"{args.max_time:.0f} s per target, Python {sys.version.split()[0]}, pid {os.getpid()}"
    )
    crashed = False
    for name in names:
        crash_file = crash_dir / f"{name}-{os.getpid()}.jsonl"
        crash_file.unlink(missing_ok=True)
        log = CrashLog(crash_file)
        if engine == "atheris":
            count, elapsed = run_atheris(name, args.runs, args.max_time, args.seed, crash_file)
        else:
            count, elapsed = run_builtin(name, args.runs, args.max_time, args.seed, log)
        records = []
        if crash_file.exists():
            records = [json.loads(line) for line in crash_file.read_text().splitlines()]
        print(
            f"{name}: {count} inputs in {elapsed:.1f} s ({count / elapsed:.0f}/s), "
            f"{len(records)} distinct crash(es)"
        )
        target = TARGETS[name]
        for record in records:
            crashed = True
            data = minimise(target, bytes.fromhex(record["hex"]), record["key"])
            exc = run_one(target, data)
            tb = "".join(traceback.format_exception(exc)) if exc else record["traceback"]
            (crash_dir / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}.bin").write_bytes(data)
            print(f"  CRASH {record['key']}\n  minimal input ({len(data)} bytes): {data.hex()}")
            print("  " + tb.rstrip().replace("\n", "\n  "))
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
