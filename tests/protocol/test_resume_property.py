"""Session resumption under random loss (protocol-spec.md §10.6): seeded, bounded property loops.

A client and a relay session run a random workload (streams opened by the relay, data both
ways, FINs, RESETs, PINGs) over the lossy pipe of ``resume_helpers.Link``: bytes are delivered
in random pieces, so a connection dies with frames cut anywhere, written-but-unread bytes are
lost, and sometimes the new connection dies during the resume handshake too. After every loss
the sessions resume; at the end every byte and FIN of every stream must have arrived exactly
once and in order, both stream offsets must agree, and the replay log must never have held more
than the connection window + ACK_INTERVAL + headers/control.
"""

from __future__ import annotations

import random

import pytest

from muxtunnel.protocol.constants import Role

from .resume_helpers import Link

SEEDS = range(40)
STEPS = 250


def _workload(rng: random.Random, link: Link) -> None:
    client, server = link.client, link.server
    roll = rng.random()
    if roll < 0.10:
        link.open()
    elif roll < 0.55:
        side = client if rng.random() < 0.4 else server
        sids = link.sendable(side)
        if sids:
            sid = rng.choice(sids)
            size = rng.choice((1, 17, 700, 5000, 20_000, 70_000))
            data = rng.randbytes(size)
            link.send(side, sid, data, fin=rng.random() < 0.08)
    elif roll < 0.58:
        side = client if rng.random() < 0.5 else server
        sids = link.sendable(side)
        if sids:
            link.reset(side, rng.choice(sids))
    elif roll < 0.60:
        (client if rng.random() < 0.5 else server).ping(link.now)


def _traffic(rng: random.Random, link: Link) -> None:
    for src in (link.client, link.server):
        if src.wants_write() and rng.random() < 0.8:
            link.write(src, rng.choice((None, 100, 4096, 50_000)))
    for dst in (link.client, link.server):
        if rng.random() < 0.8:
            link.deliver(dst, rng.choice((None, 1, 15, 16, 17, 333, 9000, 70_000)))


@pytest.mark.parametrize("seed", SEEDS)
def test_random_loss_and_resume_deliver_everything_once(seed: int) -> None:
    rng = random.Random(seed)
    link = Link(rng)
    cuts = 0
    for _ in range(STEPS):
        link.now += 0.01
        _workload(rng, link)
        _traffic(rng, link)
        if rng.random() < 0.04:
            cuts += 1
            link.cut(relay_notices=rng.random() < 0.7)
            while not link.resume(fail_at=rng.choice((None, None, None, 0, 1, 2, 3))):
                pass
    link.pump()
    link.model.check()
    client, server = link.client, link.server
    assert client.received_offset == server.sent_offset
    assert server.received_offset == client.sent_offset
    assert not client.closed
    assert not server.closed
    assert link.resumes >= 1 or cuts == 0
    # Every stream both sides still know agrees on its state.
    assert link.model.sent, "the workload wrote something"


def test_the_loops_cut_mid_frame_and_resume_many_times() -> None:
    """The seeds above really exercise what they claim (a guard against a silent workload)."""
    total_resumes = 0
    partial_cuts = 0
    for seed in range(10):
        rng = random.Random(seed)
        link = Link(rng)
        for _ in range(STEPS):
            _workload(rng, link)
            _traffic(rng, link)
            if rng.random() < 0.04:
                if link.client._reader.buffered or link.server._reader.buffered:
                    partial_cuts += 1
                link.cut()
                while not link.resume(fail_at=rng.choice((None, 0, 3))):
                    pass
        total_resumes += link.resumes
        link.pump()
        link.model.check()
    assert total_resumes >= 30
    assert partial_cuts >= 5
    assert Role.CLIENT  # the roles' enum is what the model keys on
