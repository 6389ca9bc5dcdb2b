"""Property tests over the fuzz targets: nothing but events and MuxtunnelError, ever.

The targets (``fuzz_targets.py``) drive the frame codec and an authenticated session of
either role with arbitrary or scripted input: peer frames with fuzzed headers, well-formed
frames that follow the session's state, protocol-spec.md Appendix A vectors, and local API
calls made the way a correct application makes them. They raise on any other exception and
check the session's accounting after every step (open/pending stream counts within the
declared limits, the bytes the application holds equal to the bytes the session counts as
held, every byte sent decodes as a valid frame). ``benchmarks/fuzz.py`` runs the same targets
for millions of inputs; these tests keep a deterministic, bounded sample in CI.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from .fuzz_targets import (
    FRAGMENTS,
    TARGETS,
    VECTORS,
    codec_seeds,
    run_codec,
    run_session_client,
    run_session_server,
    session_seeds,
)

# Deterministic (same examples every run, no example database), bounded in count and time.
BOUNDED = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SESSION_TARGETS = {"client": run_session_client, "server": run_session_server}

#: A session program: a setup byte, then scripted fragments mixed with arbitrary bytes.
PROGRAMS = st.builds(
    lambda setup, parts: bytes([setup]) + b"".join(parts),
    st.integers(0, 15),
    st.lists(
        st.one_of(st.sampled_from(sorted(FRAGMENTS.values())), st.binary(min_size=1, max_size=8)),
        max_size=30,
    ),
)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


MUTATED_VECTORS = st.builds(
    lambda step, picks, edits: bytes([step]) + _mutate(b"".join(VECTORS[i] for i in picks), edits),
    st.integers(0, 255),
    st.lists(st.integers(0, len(VECTORS) - 1), min_size=1, max_size=4),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seed_corpus_runs_clean(name: str) -> None:
    """Every seed of ``benchmarks/fuzz.py`` is an acceptable input (the fuzzer starts clean)."""
    corpus = codec_seeds() if name == "codec" else session_seeds()
    assert len(corpus) >= 50
    for data in corpus:
        TARGETS[name](data)


@BOUNDED
@given(st.sampled_from(sorted(SESSION_TARGETS)), PROGRAMS)
def test_session_programs(role: str, program: bytes) -> None:
    SESSION_TARGETS[role](program)


@BOUNDED
@given(st.sampled_from(sorted(SESSION_TARGETS)), st.binary(min_size=1, max_size=300))
def test_session_arbitrary_input(role: str, data: bytes) -> None:
    SESSION_TARGETS[role](data)


@BOUNDED
@given(st.one_of(MUTATED_VECTORS, st.binary(max_size=300)))
def test_codec_mutated_vectors_and_arbitrary_bytes(data: bytes) -> None:
    run_codec(data)
