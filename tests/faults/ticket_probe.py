"""A client session that probes the relay's ticket rules (protocol-spec.md §10.6.5) from a lab
namespace: ``python ticket_probe.py HOST:PORT TOKEN OTHER_TOKEN``.

1. A session authenticates with TOKEN and gets ticket t1; it resumes twice over new
   connections (the relay rotates t1 -> t2 -> t3).
2. A RESUME with t1 (stale: two resumes later) and one with t3 presented with OTHER_TOKEN
   (foreign) must both be refused; the session then still resumes with its current ticket.
3. It prints ``ready``, waits until its connection is lost (the test cuts the link; the
   keepalive notices within seconds), prints ``suspended`` and dials again every second: the
   test has removed TOKEN by a reload meanwhile, so the resume must be refused.

The last line is a JSON object: the statuses seen for the stale and foreign tickets, whether
the current ticket resumed, and the error of the resume after the revocation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from muxtunnel.connection import MuxConnection, ResumeRefusedError, make_session
from muxtunnel.errors import AuthError, MuxtunnelError
from muxtunnel.handshake import client_credential, client_handshake
from muxtunnel.protocol.constants import ResultStatus, Role
from tests.test_resume_relay import dial, raw_resume


async def _new_ticket(conn: MuxConnection, old: bytes | None) -> bytes:
    """Wait (bounded) for the TICKET that follows a resume."""
    with trio.fail_after(15):
        # The connection keeps the newest ticket but has no event for it: poll, bounded.
        while conn.ticket is None or conn.ticket == old:  # noqa: ASYNC110
            await trio.sleep(0.02)
    return conn.ticket


def _name(status: int) -> str:
    try:
        return ResultStatus(status).name
    except ValueError:
        return str(status)


async def main(address: str, token: str, other: str) -> dict[str, object]:
    host, port_text = address.rsplit(":", 1)
    port = int(port_text)

    def credential(nonce: bytes, minor: int) -> tuple[int, bytes]:
        return client_credential(token, nonce, minor)

    outcome: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        session = make_session(
            Role.CLIENT, idle_timeout=4.0, settings_overrides={"resume_window": 60}
        )
        conn = MuxConnection(await dial(port, host), session, name="probe")
        await nursery.start(conn.run)
        with trio.fail_after(15):
            await client_handshake(conn, token, [])
        t1 = await _new_ticket(conn, None)
        with trio.fail_after(15):
            await conn.resume_over(await dial(port, host), credential)
        t2 = await _new_ticket(conn, t1)
        with trio.fail_after(15):
            await conn.resume_over(await dial(port, host), credential)
        t3 = await _new_ticket(conn, t2)
        _auth, stale = await raw_resume(port, token, t1, host=host)
        _auth, foreign = await raw_resume(port, other, t3, host=host)
        outcome["stale"], outcome["foreign"] = _name(stale), _name(foreign)
        with trio.fail_after(15):
            await conn.resume_over(await dial(port, host), credential)
        outcome["current_resumes"] = await _new_ticket(conn, t3) != t3
        print("ready", flush=True)
        with trio.fail_after(30):
            await conn.wait_suspended()
        print("suspended", flush=True)
        with trio.fail_after(45):
            while True:
                try:
                    with trio.fail_after(5):
                        await conn.resume_over(await dial(port, host), credential)
                except (AuthError, ResumeRefusedError) as exc:
                    outcome["revoked"] = str(exc)
                    break
                except (OSError, trio.TooSlowError, trio.BrokenResourceError, MuxtunnelError):
                    await trio.sleep(1.0)
                    continue
                outcome["revoked"] = "resumed: the revoked token was not refused"
                break
        conn.close()
        nursery.cancel_scope.cancel()
    return outcome


if __name__ == "__main__":
    result = trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
    print(json.dumps(result), flush=True)
