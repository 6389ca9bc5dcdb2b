"""The client's live console: what ``muxtunnel client`` shows when stdout is a terminal.

One screen, redrawn about once a second from :class:`muxtunnel.stats.Stats` (the counters every
observer reads): the relay and the session's state (connecting / up / reconnecting in N s /
down), the smoothed RTT of the protocol's own PINGs, one line per tunnel (``PUBLIC -> LOCAL``,
state, open and total connections, bytes each way and the current rates) and the last warnings
and errors of the log.

The data path is not touched: the console only takes a snapshot of the counters once a second
(a few dict entries per tunnel and per open stream). Rates are the byte difference over the
last :data:`RATE_WINDOW` seconds of snapshots. Rich's own refresh thread is not used
(``auto_refresh=False``): a trio task redraws.

While the console is on, log records that would go to a terminal's stderr are kept for its
error pane instead (the last :data:`ERROR_LINES` of WARNING and above), so nothing scribbles
over the live view; other stderr destinations (a file, a pipe) still get every line. The
``forwarding ...`` lines on stdout are printed above the live view.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from muxtunnel.admin import format_age, format_bytes
from muxtunnel.stats import Stats

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from rich.console import Console, RenderableType
    from rich.text import Text

    from muxtunnel.config import ClientConfig

__all__ = [
    "ERROR_LINES",
    "REFRESH",
    "ClientConsole",
    "LogTail",
    "run_client_with_console",
    "want_console",
]

#: Seconds between two redraws.
REFRESH: Final = 1.0
#: Rates are computed over the snapshots of the last this many seconds.
RATE_WINDOW: Final = 2.0
#: Log lines (WARNING and above) the error pane keeps.
ERROR_LINES: Final = 5


def want_console(flag: bool | None, stream: Any = None) -> bool:
    """``--console/--no-console`` if given, else whether ``stream`` (stdout) is a terminal."""
    if flag is not None:
        return flag
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogTail(logging.Handler):
    """Keeps the last ``size`` formatted records (the console's error pane)."""

    def __init__(self, size: int = ERROR_LINES, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self.lines: collections.deque[str] = collections.deque(maxlen=size)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
        formatter.converter = time.gmtime
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        """Keep ``record`` as one line (line breaks shown as ``\\n``)."""
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.lines.append(text.replace("\r", "\\r").replace("\n", "\\n"))


def _to_terminal(handler: logging.Handler) -> bool:
    """Whether ``handler`` writes to a terminal (where it would scribble over the console)."""
    if not isinstance(handler, logging.StreamHandler):
        return False
    stream = handler.stream
    if stream is sys.__stderr__ or stream is sys.stderr:
        stream = sys.stderr  # muxtunnel.logsetup's handler writes to whatever sys.stderr is
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextmanager
def capture_logs(tail: LogTail) -> Iterator[None]:
    """Send the root logger's records to ``tail``; handlers writing to a terminal are set
    aside meanwhile (and put back after)."""
    root = logging.getLogger()
    parked = [h for h in root.handlers if _to_terminal(h)]
    for handler in parked:
        root.removeHandler(handler)
    root.addHandler(tail)
    try:
        yield
    finally:
        root.removeHandler(tail)
        for handler in parked:
            root.addHandler(handler)


def _rate(n: float) -> str:
    return f"{format_bytes(int(n))}/s"


#: The tunnel table's columns: name, and whether the values are right-aligned.
_COLUMNS = (
    ("TUNNEL", False),
    ("STATE", False),
    ("OPEN", True),
    ("TOTAL", True),
    ("IN", True),
    ("OUT", True),
    ("IN/s", True),
    ("OUT/s", True),
)
#: Between two columns.
_GAP = "   "


def _table(rows: list[tuple[list[str], str]]) -> Text:
    """The tunnel table as one styled Text: a header, a rule and a line per tunnel.

    Laid out here rather than with rich's Table: a Table costs several milliseconds of CPU
    per redraw (measured: 3.5 ms for two rows), time the client's event loop would not spend
    moving bytes; this costs a few hundredths of that.
    """
    from rich.text import Text

    widths = [len(name) for name, _ in _COLUMNS]
    for cells, _ in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, cells, strict=True)]

    def line(cells: list[str]) -> list[str]:
        return [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(cells, widths, _COLUMNS, strict=True)
        ]

    out = Text(" " + _GAP.join(line([name for name, _ in _COLUMNS])).rstrip(), style="bold")
    out.append("\n " + "\u2500" * (sum(widths) + len(_GAP) * (len(widths) - 1)), style="dim")
    for cells, state_style in rows:
        padded = line(cells)
        out.append("\n " + padded[0] + _GAP)
        out.append(padded[1], style=state_style)
        out.append(_GAP + _GAP.join(padded[2:]))
    return out


class ClientConsole:
    """Renders a client's :class:`~muxtunnel.stats.Stats` (call :meth:`sample` once a second)."""

    def __init__(
        self,
        stats: Stats,
        relay: str,
        tail: LogTail | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.relay = relay
        self.tail = LogTail() if tail is None else tail
        self.clock = clock
        #: The latest snapshot, and (time, {tunnel id: (in, out)}) of the recent ones.
        self.snapshot: dict[str, Any] = {}
        self.history: collections.deque[tuple[float, dict[int, tuple[int, int]]]] = (
            collections.deque()
        )

    def sample(self) -> None:
        """Take a snapshot of the counters (the only thing that touches the stats)."""
        now = self.clock()
        self.snapshot = self.stats.snapshot()
        counts = {
            int(t["id"]): (int(t["bytes_in"]), int(t["bytes_out"]))
            for s in self.snapshot["sessions"]
            for t in s["tunnels"]
        }
        self.history.append((now, counts))
        while len(self.history) > 2 and now - self.history[1][0] >= RATE_WINDOW:
            self.history.popleft()

    def rates(self, tunnel_id: int) -> tuple[float, float]:
        """Bytes per second (in, out) of ``tunnel_id`` over the recent snapshots."""
        if not self.history:
            return 0.0, 0.0
        t1, last = self.history[-1]
        if tunnel_id not in last:
            return 0.0, 0.0
        # The oldest snapshot that knows the tunnel (a client's tunnels appear once it runs).
        t0, first = next((t, c) for t, c in self.history if tunnel_id in c)
        if t1 <= t0:
            return 0.0, 0.0
        (in0, out0), (in1, out1) = first[tunnel_id], last[tunnel_id]
        return max(0, in1 - in0) / (t1 - t0), max(0, out1 - out0) / (t1 - t0)

    def _session_line(self, session: dict[str, Any], wall: float) -> str:
        state = str(session.get("state", "up"))
        if state == "reconnecting" and session.get("retry_at") is not None:
            left = max(0.0, float(session["retry_at"]) - wall)
            state = f"reconnecting in {left:.0f} s"
        elif state == "up":
            state = f"up for {format_age(wall - float(session.get('since', wall)))}"
        rtt = session.get("rtt")
        rtt_text = f"{float(rtt) * 1000:.1f} ms" if isinstance(rtt, int | float) else "-"
        return f"session: {state}   rtt: {rtt_text}"

    def render(self) -> RenderableType:
        """The whole screen, from the latest :meth:`sample`."""
        from rich.console import Group
        from rich.text import Text

        wall = self.stats.clock()
        sessions = self.snapshot.get("sessions", [])
        session: dict[str, Any] = sessions[0] if sessions else {"state": "connecting"}
        head = Text()
        head.append("muxtunnel client", style="bold")
        head.append(f"   relay {self.relay}   ")
        state = str(session.get("state", "up"))
        style = {
            "up": "green",
            "connecting": "yellow",
            "reconnecting": "yellow",
            "resuming": "yellow",
        }.get(state, "red")
        head.append(self._session_line(session, wall), style=style)

        why = Text(style="yellow")
        rows: list[tuple[list[str], str]] = []  # cells, and the style of the STATE cell
        for tunnel in session.get("tunnels", []):
            state = str(tunnel.get("state", "?"))
            label = f"{state} (retrying)" if state == "pending" else state
            if state != "up" and tunnel.get("last_error"):
                # Why it is not up, under the table (a long reason would squeeze the columns).
                why.append(f"\n  {tunnel.get('public', '?')}: {state}: {tunnel['last_error']}")
            rate_in, rate_out = self.rates(int(tunnel.get("id", 0)))
            cells = [
                f"{tunnel.get('public', '?')} -> {tunnel.get('local') or '-'}",
                label,
                str(tunnel.get("open", 0)),
                str(tunnel.get("total", 0)),
                format_bytes(int(tunnel.get("bytes_in", 0))),
                format_bytes(int(tunnel.get("bytes_out", 0))),
                _rate(rate_in),
                _rate(rate_out),
            ]
            rows.append((cells, {"up": "green", "pending": "yellow"}.get(state, "red")))
        table = _table(rows)
        errors = Text("recent errors:", style="bold")
        for line in self.tail.lines:
            errors.append("\n  " + line, style="red" if " ERROR " in line else "yellow")
        if not self.tail.lines:
            errors.append(" none", style="dim")
        parts: list[RenderableType] = [head, table]
        if why:
            parts.append(Text("not up:", style="bold") + why)
        return Group(*parts, errors)

    async def run(
        self, console: Console, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Redraw every :data:`REFRESH` seconds until cancelled; the last frame stays."""
        from rich.live import Live

        self.sample()
        with Live(
            self.render(),
            console=console,
            auto_refresh=False,
            redirect_stdout=True,
            redirect_stderr=False,
        ) as live:
            task_status.started()
            try:
                while True:
                    await trio.sleep(REFRESH)
                    self.sample()
                    live.update(self.render(), refresh=True)
            finally:  # the final counters stay on the screen
                self.sample()
                live.update(self.render(), refresh=True)


async def run_client_with_console(
    config: ClientConfig,
    *,
    shutdown: trio.Event,
    report: Callable[[str], None],
    console: Console | None = None,
    **kwargs: Any,
) -> None:
    """:func:`muxtunnel.client.run_client` with the live console on ``console`` (stdout)."""
    from rich.console import Console

    from muxtunnel.client import run_client

    stats = Stats("client")
    tail = LogTail()
    view = ClientConsole(stats, config.server_key, tail)
    if console is None:
        console = Console(file=sys.stdout, force_terminal=True)
    error: Exception | None = None
    with capture_logs(tail):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(view.run, console))
            try:
                await run_client(config, shutdown=shutdown, report=report, stats=stats, **kwargs)
            except Exception as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
                error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
