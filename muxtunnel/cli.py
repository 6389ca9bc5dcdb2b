"""The ``muxtunnel`` command: server, client, token, fingerprint, demo, bench.

This module only turns arguments into configs, sets up logging and signals, and maps errors
to exit codes (see :class:`muxtunnel.errors.ExitCode`): 0 clean shutdown, 2 usage or
configuration error, 3 authentication refused, 4 relay identity mismatch, 1 anything else.
Every error reaches the user as one line ``muxtunnel: error: <message>`` on stderr; ``--debug``
adds the traceback.

stdout carries only what users and scripts read: ``fingerprint: ...``, ``token: ...``, the
``muxtunnel relay listening on ...``, ``forwarding tcp://...``, ``private tunnel ...`` and
``visiting private tunnel ...`` lines. Logs go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import trio
import typer

from muxtunnel._version import __version__
from muxtunnel.clihelp import help_on_terminal, polish
from muxtunnel.config import (
    build_client_config,
    build_server_config,
    build_visit_config,
    default_state_dir,
    load_toml,
)
from muxtunnel.errors import ConfigError, ExitCode, MuxtunnelError
from muxtunnel.logsetup import configure_logging
from muxtunnel.tls import CERT_FILE_NAME, fingerprint_of_file, load_or_create_identity
from muxtunnel.tokens import (
    TOKEN_FILE_NAME,
    check_private_dir,
    check_private_file,
    load_or_create_token,
)
from muxtunnel.tokenstore import (
    TOKENS_FILE_NAME,
    add_token,
    list_tokens,
    load_token_file,
    policy_summary,
    remove_token,
    token_json,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from muxtunnel.config import ServerConfig

__all__ = ["app", "main", "run"]

logger = logging.getLogger("muxtunnel.cli")

app = typer.Typer(
    name="muxtunnel",
    help="Self-hosted raw TCP tunnel: many TCP streams multiplexed over one TLS connection.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def out(line: str) -> None:
    """Print one line to stdout at once (scripts and tests read it through a pipe)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:  # nobody reads stdout any more; keep running
        pass


# --------------------------------------------------------------------------------------------
# Shared options

LogLevelOpt = Annotated[
    str | None,
    typer.Option("--log-level", metavar="LEVEL", help="debug, info (default), warning or error."),
]
LogFormatOpt = Annotated[
    str | None,
    typer.Option("--log-format", metavar="FORMAT", help="text (default) or json, on stderr."),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", metavar="FILE", help="TOML file with the same option names as the flags."
    ),
]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        metavar="DIR",
        help="Where keys, tokens and pins live (default: $XDG_STATE_HOME/muxtunnel or ~/.local/state/muxtunnel).",
    ),
]
# Options shared by `client` and `visit` (the relay connection).
StallTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        metavar="SECONDS",
        help="Reset a stream whose data waits this long unread when memory is short (default: 30).",
    ),
]
ServerOpt = Annotated[
    str | None,
    typer.Option("--server", metavar="HOST[:PORT]", help="The relay (port default: 7835)."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(metavar="TOKEN", help="The relay's token (default: $MUXTUNNEL_TOKEN)."),
]
ClientTokenFileOpt = Annotated[
    Path | None, typer.Option(metavar="FILE", help="Read the token from this file.")
]
FingerprintOpt = Annotated[
    str | None, typer.Option(metavar="FP", help="Pin the relay's certificate (sha256:...).")
]
CaOpt = Annotated[
    Path | None, typer.Option(metavar="FILE", help="Verify the relay against this CA instead.")
]
MaxRetriesOpt = Annotated[
    int | None,
    typer.Option(metavar="N", help="Give up after N failed reconnects (default: never)."),
]
KeepaliveTimeoutOpt = Annotated[
    float | None,
    typer.Option(metavar="SECONDS", help="Declare a silent relay dead after this (default: 30)."),
]
BackoffCapOpt = Annotated[
    float | None,
    typer.Option(metavar="SECONDS", help="Longest wait between reconnects (default: 30)."),
]

AdminOpt = Annotated[
    str | None,
    typer.Option(
        "--admin",
        metavar="PATH|HOST:PORT|off",
        help="Local status endpoint read by `muxtunnel status` (default: a socket in the state "
        "dir's admin/ directory, mode 0600; HOST:PORT only if asked).",
        show_default=False,
    ),
]
MetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        metavar="HOST:PORT|off",
        help="Serve Prometheus metrics on http://HOST:PORT/metrics (default: off).",
        show_default=False,
    ),
]


def _setup_logging(file_values: dict[str, object], level: str | None, fmt: str | None) -> None:
    chosen: list[str] = []
    for key, flag in (("log-level", level), ("log-format", fmt)):
        value = (
            flag
            if flag is not None
            else file_values.get(key, "info" if key == "log-level" else "text")
        )
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        chosen.append(value)
    configure_logging(chosen[0], chosen[1])


def _version_callback(value: bool) -> None:
    if value:
        out(f"muxtunnel {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Self-hosted raw TCP tunnel: many TCP streams multiplexed over one TLS connection."""


def _warn_exposed_token(
    on_command_line: bool, config: Path | None, file_values: dict[str, object]
) -> None:
    """Warn (once the configuration is valid) about a token other local users can read.

    ``--token`` is in the process's arguments, which every local user can read; a config file
    holding a token must be private like a token file.
    """
    if on_command_line:
        logger.warning(
            "--token on the command line is visible to other local users (ps, "
            "/proc/PID/cmdline); use --token-file FILE (mode 600) or the MUXTUNNEL_TOKEN "
            "environment variable instead"
        )
    if config is not None and "token" in file_values:
        check_private_file(config, "config file", " and holds a token")


# --------------------------------------------------------------------------------------------
# Running async entry points with signal handling


class _ForcedStop(MuxtunnelError):
    """A second SIGINT/SIGTERM arrived while draining."""


#: A repeat of the first signal within this many seconds is the same request, not "stop now":
#: ``timeout(1)`` and some supervisors signal both the process and its process group.
SIGNAL_REPEAT_WINDOW = 0.5


class _SignalState:
    """Whether a stop signal was received (then the process is on its way out)."""

    def __init__(self) -> None:
        self.received = False


async def _with_signals(
    start: Callable[[trio.Event], Awaitable[object]],
    drain: bool,
    state: _SignalState | None = None,
) -> object:
    """Run ``start(shutdown)`` with SIGINT/SIGTERM handled.

    The first signal sets ``shutdown`` so ``start`` drains and returns (without ``drain`` it
    cancels ``start`` instead); a later signal cancels at once and raises ``_ForcedStop``.
    """
    state = state if state is not None else _SignalState()
    shutdown = trio.Event()
    forced = False
    result: object = None
    # The receiver encloses the nursery: on any exit the watcher is cancelled first,
    # before the receiver closes under it.
    with (
        trio.CancelScope() as work_scope,
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
    ):
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal forced
                first: tuple[int, float] | None = None
                async for signum in signals:
                    name = signal.Signals(signum).name
                    now = trio.current_time()
                    state.received = True
                    if first is None:
                        first = (signum, now)
                        if drain:
                            logger.info(
                                "received %s: shutting down (send it again to stop at once)",
                                name,
                            )
                        shutdown.set()
                        if not drain:
                            work_scope.cancel()
                    elif signum == first[0] and now - first[1] < SIGNAL_REPEAT_WINDOW:
                        logger.debug("received %s again at once: same request", name)
                    else:
                        forced = True
                        logger.warning("received %s again: stopping without draining", name)
                        work_scope.cancel()

            nursery.start_soon(watch)
            result = await start(shutdown)
            nursery.cancel_scope.cancel()
    if forced:
        raise _ForcedStop("stopped by a second signal without draining open streams")
    return result


def _run_async(start: Callable[[trio.Event], Awaitable[object]], *, drain: bool = True) -> object:
    state = _SignalState()
    try:
        return trio.run(_with_signals, start, drain, state)
    finally:
        if state.received:
            # We are exiting because of a signal: a late duplicate must not kill the process
            # with the default action (exit status 143) after a clean shutdown.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# Commands


@app.command()
def server(
    listen: Annotated[
        str | None,
        typer.Option(metavar="HOST:PORT", help="TLS control listener (default: 0.0.0.0:7835)."),
    ] = None,
    ports: Annotated[
        str | None,
        typer.Option(metavar="LO-HI", help="Public ports tunnels may use (default: 20000-29999)."),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option(metavar="HOST", help="Address public ports bind on (default: 0.0.0.0)."),
    ] = None,
    token: Annotated[
        list[str] | None,
        typer.Option(
            metavar="TOKEN",
            help="Accepted client token (repeatable; default: $MUXTUNNEL_TOKEN, else generated).",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Accepted tokens: one per line, or a TOML file of named tokens "
            "(`muxtunnel token add`; default when no token is given: tokens.toml in the state "
            "dir if it exists).",
        ),
    ] = None,
    state_dir: StateDirOpt = None,
    cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Certificate (chain) PEM; needs --key.")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Private key PEM for --cert.")
    ] = None,
    config: ConfigOpt = None,
    keepalive_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Declare a silent client dead after this (default: 30)."
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Keep a gone client's ports reserved this long, across relay restarts "
            "(default: 60).",
        ),
    ] = None,
    resume_window: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Keep a session whose connection dropped this long for the client to resume "
            "it; 0: never (default: the --lease time).",
        ),
    ] = None,
    max_connections_per_session: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="TLS connections one client session may run over (client --connections), "
            "the first included; 1: one only (default: 8).",
        ),
    ] = None,
    drain_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="On SIGTERM, let streams finish this long (default: 10)."
        ),
    ] = None,
    max_tunnels_per_client: Annotated[
        int | None,
        typer.Option(metavar="N", help="Most tunnels one client may bind (default: 64)."),
    ] = None,
    handshake_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Time a client gets for TLS and authentication (default: 10)."
        ),
    ] = None,
    max_startups: Annotated[
        int | None,
        typer.Option(metavar="N", help="Connections in TLS+auth at once, total (default: 256)."),
    ] = None,
    max_startups_per_source: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Connections in TLS+auth at once per source address (default: 10)."
        ),
    ] = None,
    auth_failures: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Failed logins per source in 60 s before a ban (default: 5)."
        ),
    ] = None,
    auth_ban: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="First ban; doubles on repeat, up to 3600 (default: 60)."
        ),
    ] = None,
    max_sessions_per_token: Annotated[
        int | None,
        typer.Option(metavar="N", help="Sessions one token may have at once (default: 8)."),
    ] = None,
    max_tunnels_per_token: Annotated[
        int | None,
        typer.Option(
            metavar="N", help="Tunnels one token may hold, all sessions and leases (default: 64)."
        ),
    ] = None,
    max_streams_per_token: Annotated[
        int | None,
        typer.Option(metavar="N", help="Open visitor streams per token (default: 1024)."),
    ] = None,
    max_visitors_per_tunnel: Annotated[
        int | None,
        typer.Option(metavar="N", help="Visitors one tunnel may have at once (default: 256)."),
    ] = None,
    max_visit_streams: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Streams one client may open at once to visit private tunnels; 0: none "
            "(default: 256).",
        ),
    ] = None,
    open_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS", help="Time a client gets to answer a new stream (default: 30)."
        ),
    ] = None,
    stall_timeout: StallTimeoutOpt = None,
    admin: AdminOpt = None,
    metrics: MetricsOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Run the relay: accept tunnel clients over TLS and expose their tunnels on public ports."""
    file_values = load_toml(config, "server") if config is not None else {}
    _setup_logging(file_values, log_level, log_format)
    flags: dict[str, object] = {
        "listen": listen,
        "ports": ports,
        "bind": bind,
        "token": token,
        "token-file": token_file,
        "state-dir": state_dir,
        "cert": cert,
        "key": key,
        "keepalive-timeout": keepalive_timeout,
        "lease": lease,
        "resume-window": resume_window,
        "max-connections-per-session": max_connections_per_session,
        "drain-timeout": drain_timeout,
        "max-tunnels-per-client": max_tunnels_per_client,
        "handshake-timeout": handshake_timeout,
        "max-startups": max_startups,
        "max-startups-per-source": max_startups_per_source,
        "auth-failures": auth_failures,
        "auth-ban": auth_ban,
        "max-sessions-per-token": max_sessions_per_token,
        "max-tunnels-per-token": max_tunnels_per_token,
        "max-streams-per-token": max_streams_per_token,
        "max-visitors-per-tunnel": max_visitors_per_tunnel,
        "max-visit-streams": max_visit_streams,
        "open-timeout": open_timeout,
        "stall-timeout": stall_timeout,
        "admin": admin,
        "metrics": metrics,
    }
    cfg = build_server_config(file_values, flags, config_path=config)
    _warn_exposed_token(bool(token), config, file_values)
    check_private_dir(cfg.state_dir)  # only a warning, about an existing dir
    _check_listeners(cfg)  # a taken port is reported before any certificate or token exists
    if cfg.metrics is not None:  # like --listen: a taken port is reported before any token
        from muxtunnel.preflight import check_listen

        check_listen(*cfg.metrics, "--metrics")
    identity = load_or_create_identity(cfg.state_dir, cfg.cert_file, cfg.key_file)
    out(f"fingerprint: {identity.fingerprint}")
    cfg = _state_dir_tokens(cfg)
    if not cfg.tokens and not cfg.token_entries:
        generated, created = load_or_create_token(cfg.state_dir)
        path = cfg.state_dir / TOKEN_FILE_NAME
        if created:
            out(f"token: {generated}")
            out(
                f"hint: clients need this token (MUXTUNNEL_TOKEN or --token-file); it is stored in {path} "
                "and will not be shown again"
            )
        else:
            logger.info("using the token stored in %s", path)
        cfg = dataclasses.replace(cfg, tokens=(generated,))

    from muxtunnel.server import serve  # lazy: keeps `muxtunnel --version` fast

    def reload_config() -> ServerConfig:
        """SIGHUP: the same flags over a fresh read of --config and the token files."""
        values = load_toml(config, "server") if config is not None else {}
        fresh = _state_dir_tokens(build_server_config(values, flags, config_path=config))
        if not fresh.tokens and not fresh.token_entries:
            stored = fresh.state_dir / TOKEN_FILE_NAME
            if not stored.exists():
                raise ConfigError("no token configured")
            fresh = dataclasses.replace(fresh, tokens=(load_or_create_token(fresh.state_dir)[0],))
        _setup_logging(values, log_level, log_format)
        return fresh

    # SIGHUP reloads once the relay runs (muxtunnel.reload); until its handler is installed a
    # SIGHUP (an eager `systemctl reload`) is ignored instead of killing the relay.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _run_async(
        lambda shutdown: serve(cfg, shutdown=shutdown, report=out, reload_config=reload_config)
    )


def _check_listeners(cfg: ServerConfig) -> None:
    """Fail before anything is generated or printed if --listen (or --admin) cannot be bound."""
    from muxtunnel.admin import resolve_admin
    from muxtunnel.preflight import check_listen

    check_listen(cfg.listen_host, cfg.listen_port, "--listen")
    admin = resolve_admin(cfg.admin, cfg.state_dir, "relay")
    if admin is not None and admin.path is None:
        check_listen(admin.host, admin.port, "--admin")


def _state_dir_tokens(cfg: ServerConfig) -> ServerConfig:
    """Without configured tokens, the state dir's ``tokens.toml`` if it exists."""
    named = cfg.state_dir / TOKENS_FILE_NAME
    if not cfg.tokens and not cfg.token_entries and named.exists():
        # Tokens managed with `muxtunnel token add` take the place of the generated one.
        tokens, entries = load_token_file(named)
        logger.info("using the tokens in %s", named)
        cfg = dataclasses.replace(cfg, tokens=tokens, token_entries=entries)
    return cfg


@app.command()
def client(
    specs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SPEC...",
            help="[REMOTE_PORT:][LOCAL_HOST:]LOCAL_PORT; remote port 0 or omitted: the relay picks one.",
            show_default=False,
        ),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    token_file: ClientTokenFileOpt = None,
    fingerprint: FingerprintOpt = None,
    ca: CaOpt = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="CIDR",
            help="Only visitors from this network reach the SPECs (repeatable; IPv4 or IPv6; "
            "the relay resets the others).",
            show_default=False,
        ),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option(
            "--deny",
            metavar="CIDR",
            help="Visitors from this network are reset by the relay (repeatable).",
            show_default=False,
        ),
    ] = None,
    proxy_protocol: Annotated[
        str | None,
        typer.Option(
            "--proxy-protocol",
            metavar="v1|v2",
            help="Send a PROXY protocol header with the visitor's address to the local service.",
        ),
    ] = None,
    private: Annotated[
        str | None,
        typer.Option(
            "--private",
            metavar="NAME",
            help="Publish the one SPEC ([LOCAL_HOST:]LOCAL_PORT) as private tunnel NAME: no "
            "public port; reached with `muxtunnel visit NAME`.",
        ),
    ] = None,
    max_retries: MaxRetriesOpt = None,
    keepalive_timeout: KeepaliveTimeoutOpt = None,
    resume_window: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="After the connection to the relay drops, keep the session and its streams "
            "this long while dialing again to resume it; 0: never (default: 60).",
        ),
    ] = None,
    connections: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Run the session over N TLS connections to the relay; each new stream goes on "
            "the least-loaded one, and a lost one's streams resume on another (default: 1).",
        ),
    ] = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Timeout dialing the local service (default: 10)."),
    ] = None,
    backoff_cap: BackoffCapOpt = None,
    max_streams_per_tunnel: Annotated[
        int | None,
        typer.Option(metavar="N", help="Most local connections per tunnel at once (default: 256)."),
    ] = None,
    max_streams: Annotated[
        int | None,
        typer.Option(metavar="N", help="Most local connections at once, total (default: 512)."),
    ] = None,
    max_open_rate: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Most new streams the relay may open per second; more are refused "
            "(default: 5000).",
        ),
    ] = None,
    stall_timeout: StallTimeoutOpt = None,
    admin: AdminOpt = None,
    metrics: MetricsOpt = None,
    console: Annotated[
        bool | None,
        typer.Option(
            "--console/--no-console",
            help="Live view of the session and tunnels on stdout (default: on if stdout is a "
            "terminal).",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Connect to a relay and expose local TCP services on its public ports.

    Without --fingerprint or --ca, the relay's certificate is pinned on first use.
    """
    file_values = load_toml(config, "client") if config is not None else {}
    _setup_logging(file_values, log_level, log_format)
    flags: dict[str, object] = {
        "server": server,
        "token": [token] if token is not None else None,
        "token-file": token_file,
        "fingerprint": fingerprint,
        "ca": ca,
        "state-dir": state_dir,
        "tunnel": specs,
        "allow": allow,
        "deny": deny,
        "proxy-protocol": proxy_protocol,
        "private": private,
        "max-retries": max_retries,
        "keepalive-timeout": keepalive_timeout,
        "resume-window": resume_window,
        "connections": connections,
        "connect-timeout": connect_timeout,
        "backoff-cap": backoff_cap,
        "max-streams-per-tunnel": max_streams_per_tunnel,
        "max-streams": max_streams,
        "max-open-rate": max_open_rate,
        "stall-timeout": stall_timeout,
        "admin": admin,
        "metrics": metrics,
    }
    cfg = build_client_config(file_values, flags, config_path=config)
    _warn_exposed_token(token is not None, config, file_values)

    from muxtunnel.client import run_client
    from muxtunnel.console import run_client_with_console, want_console

    start = run_client_with_console if want_console(console) else run_client
    _run_async(lambda shutdown: start(cfg, shutdown=shutdown, report=out, handle_signals=True))


@app.command()
def visit(
    name: Annotated[
        str | None,
        typer.Argument(
            metavar="NAME",
            help="The private tunnel (published with `muxtunnel client --private NAME`).",
            show_default=False,
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Argument(
            metavar="[LOCAL_HOST:]LOCAL_PORT",
            help="Where to accept connections (host default: 127.0.0.1).",
            show_default=False,
        ),
    ] = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    token_file: ClientTokenFileOpt = None,
    fingerprint: FingerprintOpt = None,
    ca: CaOpt = None,
    state_dir: StateDirOpt = None,
    config: ConfigOpt = None,
    max_retries: MaxRetriesOpt = None,
    keepalive_timeout: KeepaliveTimeoutOpt = None,
    backoff_cap: BackoffCapOpt = None,
    open_timeout: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            help="Time the relay gets to answer a new connection (default: 45).",
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(metavar="N", help="Local connections carried at once (default: 256)."),
    ] = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Reach a private tunnel: every connection to the local port is carried to it.

    Nothing listens for it on the relay's public side. The token must be the publisher's, or one the relay's policy lets visit NAME.
    """
    file_values = load_toml(config, "visit") if config is not None else {}
    _setup_logging(file_values, log_level, log_format)
    flags: dict[str, object] = {
        "name": name,
        "listen": listen,
        "server": server,
        "token": [token] if token is not None else None,
        "token-file": token_file,
        "fingerprint": fingerprint,
        "ca": ca,
        "state-dir": state_dir,
        "max-retries": max_retries,
        "keepalive-timeout": keepalive_timeout,
        "backoff-cap": backoff_cap,
        "open-timeout": open_timeout,
        "max-connections": max_connections,
    }
    cfg = build_visit_config(file_values, flags, config_path=config)
    _warn_exposed_token(token is not None, config, file_values)

    from muxtunnel.visitor import run_visitor

    _run_async(lambda shutdown: run_visitor(cfg, shutdown=shutdown, report=out))


@app.command()
def status(
    state_dir: StateDirOpt = None,
    admin: Annotated[
        str | None,
        typer.Option(
            "--admin",
            metavar="PATH|HOST:PORT",
            help="Query only this endpoint (the --admin of a relay or client).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the snapshots as one JSON array.")
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Show the sessions and tunnels of the running relay and clients of a state dir."""
    from muxtunnel import admin as admin_mod

    if state_dir is not None and admin is not None:
        raise ConfigError("use either --state-dir or --admin, not both")
    directory = state_dir if state_dir is not None else default_state_dir()
    if admin is not None:
        addresses = [admin_mod.parse_admin(admin)]
    else:
        addresses = admin_mod.discover(directory)
    snapshots, errors = trio.run(admin_mod.query_all, addresses)
    for error in errors:
        # Sockets nobody listens on (a process killed hard) are skipped in a state dir.
        if snapshots and not isinstance(error, admin_mod.StaleEndpointError):
            _err(f"muxtunnel status: {error}")
    if not snapshots:
        if admin is not None:
            raise errors[0]
        raise admin_mod.StatusError(
            f"no muxtunnel relay or client found in {directory} (is it running? --admin off?)"
        )
    if as_json:
        out(json.dumps(snapshots, indent=2))
    else:
        admin_mod.print_status(snapshots)


@app.command("fingerprint")
def fingerprint_command(
    state_dir: StateDirOpt = None,
    cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Read this certificate instead.")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Print the relay's certificate fingerprint, in the form --fingerprint accepts."""
    if state_dir is not None and cert is not None:
        raise ConfigError("use either --state-dir or --cert, not both")
    if cert is None:
        directory = state_dir if state_dir is not None else default_state_dir()
        cert = directory / CERT_FILE_NAME
        if not cert.exists():
            raise ConfigError(
                f"no certificate in {directory}: the relay creates {CERT_FILE_NAME} there on first start "
                "(`muxtunnel server`); or pass --cert FILE"
            )
    out(fingerprint_of_file(cert))


@app.command()
def demo(
    local: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            min=1,
            max=65535,
            help="Expose this local port instead of the built-in echo service.",
        ),
    ] = None,
    once: Annotated[
        bool, typer.Option("--once", help="Exit after the self-check (0 on success).")
    ] = False,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Zero-config demo: relay + client + echo service in one process on loopback."""
    _setup_logging({}, log_level, log_format)

    from muxtunnel.demo import run_demo

    ok = _run_async(
        lambda shutdown: run_demo(local_port=local, once=once, report=out, shutdown=shutdown)
    )
    if ok is False:
        raise MuxtunnelError("the demo's self-check failed")


#: The bench targets (muxtunnel.benchsuite.targets.ALL_TARGETS; not imported for --help).
BENCH_TARGETS = "direct,muxtunnel,ssh,ssh-aes128"


@app.command()
def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="Small smoke run (< 60 s, no network namespaces); fails on wrong bytes."
        ),
    ] = False,
    scenarios: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            help="Comma-separated scenario numbers, e.g. 1,3,5 (default: all; --quick: 1-6).",
            show_default=False,
        ),
    ] = None,
    targets: Annotated[
        str,
        typer.Option(
            metavar="LIST",
            help=f"Comma-separated subset of {BENCH_TARGETS} (default: all).",
            show_default=False,
        ),
    ] = BENCH_TARGETS,
    runs: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            help="Runs per loopback scenario, medians reported (default: 3, scenario 8: 5; --quick: 1).",
        ),
    ] = None,
    wan_runs: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            help="Runs of the 50 ms path scenarios 7 and 7loss, medians reported (default: 3; "
            "--quick: 1).",
        ),
    ] = None,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="CRC-check every byte (default: on with --quick, off otherwise).",
            show_default=False,
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", metavar="FILE", help="Write all results as JSON.")
    ] = None,
    png: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Write a chart (needs matplotlib).")
    ] = None,
    write_results: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE", help="Write the markdown results file (benchmarks/RESULTS.md)."
        ),
    ] = None,
    keep_logs: Annotated[
        bool, typer.Option("--keep-logs", help="Keep the temporary directory.")
    ] = False,
    profile: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="py-spy the muxtunnel relay and client during every run (raw stacks into DIR).",
        ),
    ] = None,
    streams: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            help="Scenario 2 with N concurrent streams instead of 100 (--quick: 8).",
        ),
    ] = None,
    stream_bytes: Annotated[
        int | None,
        typer.Option(
            metavar="BYTES",
            min=1,
            help="Scenario 2: bytes per stream (default: 10 MiB; --quick: 1 MiB).",
        ),
    ] = None,
    render: Annotated[
        Path | None,
        typer.Option(
            metavar="JSON",
            help="Measure nothing: print and write the outputs of an earlier --json file.",
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Benchmark muxtunnel against direct TCP and ssh -R (scenarios 1-8; 8 is pgbench through each)."""
    try:
        from muxtunnel.benchsuite import main as bench_main
    except ImportError as exc:
        raise MuxtunnelError(
            f"the benchmark suite is not available in this installation ({exc})"
        ) from None
    argv = [*(["--quick"] if quick else []), *(["--keep-logs"] if keep_logs else [])]
    if verify is not None:
        argv.append("--verify" if verify else "--no-verify")
    if targets != BENCH_TARGETS:
        argv += ["--targets", targets]
    values: dict[str, object] = {
        "--scenarios": scenarios,
        "--runs": runs,
        "--wan-runs": wan_runs,
        "--json": json_file,
        "--png": png,
        "--write-results": write_results,
        "--profile": profile,
        "--streams": streams,
        "--stream-bytes": stream_bytes,
        "--render": render,
    }
    for flag, value in values.items():
        if value is not None:
            argv += [flag, str(value)]
    raise typer.Exit(bench_main(argv))


# --------------------------------------------------------------------------------------------
# Token management (the relay's named token file)

token_app = typer.Typer(
    name="token",
    help="Manage the relay's named tokens (a TOML file holding hashes, not the tokens). "
    "A running relay picks up changes on a reload (SIGHUP) or a restart.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(token_app)

TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--file",
        metavar="FILE",
        help="The token file (default: tokens.toml in the state dir, which the relay uses when "
        "no token is configured).",
    ),
]


def _token_file(file: Path | None, state_dir: Path | None) -> Path:
    if file is not None and state_dir is not None:
        raise ConfigError("use either --file or --state-dir, not both")
    if file is not None:
        return file
    return (state_dir if state_dir is not None else default_state_dir()) / TOKENS_FILE_NAME


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@token_app.command("add")
def token_add(
    name: Annotated[
        str,
        typer.Argument(
            metavar="NAME",
            help="Unique name (letters, digits . _ -), shown in the relay's logs.",
            show_default=False,
        ),
    ],
    file: TokenFileOpt = None,
    state_dir: StateDirOpt = None,
    ports: Annotated[
        list[str] | None,
        typer.Option(
            "--ports",
            metavar="PORTS",
            help="Ports or ranges it may bind, e.g. 2200-2299,5432 (repeatable; default: the "
            "relay's range).",
            show_default=False,
        ),
    ] = None,
    max_tunnels: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Tunnels over all its sessions.")
    ] = None,
    max_streams: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Visitor streams open at once.")
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Client sessions at once.")
    ] = None,
    max_visitors: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Visitors per tunnel at once.")
    ] = None,
    bandwidth: Annotated[
        str | None,
        typer.Option(
            metavar="RATE",
            help="Bytes per second over all its streams, each direction: 10M, 512K, 1G "
            "(1000-based) or an integer.",
        ),
    ] = None,
    tunnel_bandwidth: Annotated[
        str | None, typer.Option(metavar="RATE", help="Bytes per second per tunnel, each way.")
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            metavar="CIDR",
            help="Only visitors from this network reach its tunnels (repeatable).",
            show_default=False,
        ),
    ] = None,
    deny: Annotated[
        list[str] | None,
        typer.Option(
            "--deny",
            metavar="CIDR",
            help="Visitors from this network are refused (repeatable).",
            show_default=False,
        ),
    ] = None,
    publish: Annotated[
        list[str] | None,
        typer.Option(
            "--publish",
            metavar="PATTERN",
            help="Private tunnel names it may publish, e.g. 'ssh-*' (repeatable; default: any).",
            show_default=False,
        ),
    ] = None,
    visit: Annotated[
        list[str] | None,
        typer.Option(
            "--visit",
            metavar="PATTERN",
            help="Other tokens' private tunnels it may visit (repeatable; default: none).",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Create a token: store its hash under NAME and print the token once on stdout.

    A running relay accepts the new token after a reload (SIGHUP) or a restart.
    """
    configure_logging("info", "text")
    path = _token_file(file, state_dir)
    token = add_token(
        path,
        name,
        ports=ports,
        max_tunnels=max_tunnels,
        max_streams=max_streams,
        max_sessions=max_sessions,
        max_visitors=max_visitors,
        bandwidth=bandwidth,
        tunnel_bandwidth=tunnel_bandwidth,
        allow=allow or (),
        deny=deny or (),
        publish=publish,
        visit=visit or (),
    )
    out(token)
    _err(
        f"token {name!r} added to {path}; it is shown only this once. Clients use it with "
        "MUXTUNNEL_TOKEN=<token> muxtunnel client --server HOST ... (or --token-file FILE, "
        "mode 600). A running relay accepts it after a reload (SIGHUP) or a restart."
    )


@token_app.command("list")
def token_list(
    file: TokenFileOpt = None,
    state_dir: StateDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the tokens of a token file: name, creation time and policy (never a secret)."""
    configure_logging("info", "text")
    stored = list_tokens(_token_file(file, state_dir))
    if as_json:
        out(json.dumps([token_json(s) for s in stored], indent=2))
        return
    rows = [
        (
            s.entry.name,
            s.created or "-",
            policy_summary(s.entry.policy) + (" (token in clear)" if s.entry.secret else ""),
        )
        for s in stored
    ]
    header = ("NAME", "CREATED", "POLICY")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for row in [header, *rows]:
        out(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")


@token_app.command("remove")
def token_remove(
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
    file: TokenFileOpt = None,
    state_dir: StateDirOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Remove the token NAME; a running relay refuses it after a reload (SIGHUP) or restart."""
    configure_logging("info", "text")
    path = _token_file(file, state_dir)
    remove_token(path, name)
    _err(
        f"token {name!r} removed from {path}; a running relay refuses it after a reload "
        "(SIGHUP) or a restart."
    )


# --------------------------------------------------------------------------------------------
# Entry point and error mapping


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _primary(exc: BaseException) -> BaseException:
    """Pick the exception that explains a failure, unwrapping trio's exception groups."""
    leaves = _leaves(exc)

    def rank(e: BaseException) -> int:
        if isinstance(e, MuxtunnelError):
            return 0 if e.exit_code != ExitCode.FAILURE else 1
        if isinstance(e, typer.TyperException):
            return 2
        if isinstance(e, KeyboardInterrupt | trio.Cancelled):
            return 4
        return 3

    return min(leaves, key=rank)


def _describe(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, MuxtunnelError):
        return str(exc) or type(exc).__name__, int(exc.exit_code)
    if isinstance(exc, typer.TyperException):
        message = exc.format_message()
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help goes to stdout
            out(message.rstrip("\n"))
            message = ""
        usage_ctx = getattr(exc, "ctx", None)
        path = getattr(usage_ctx, "command_path", "muxtunnel")
        if not message:
            message = "missing command"
        code = exc.exit_code
        if code == ExitCode.USAGE:
            message += f" (see `{path} --help`)"
        return message, code
    if isinstance(exc, typer.Abort):
        return "aborted", int(ExitCode.FAILURE)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}", int(ExitCode.FAILURE)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, int(ExitCode.FAILURE)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    command = polish(typer.main.get_command(app), rich=help_on_terminal())
    try:
        result = command.main(args=args, prog_name="muxtunnel", standalone_mode=False)
    except KeyboardInterrupt:
        print("muxtunnel: interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # the one place every error ends up
        if isinstance(exc, SystemExit):
            raise
        primary = _primary(exc)
        if isinstance(primary, KeyboardInterrupt):
            print("muxtunnel: interrupted", file=sys.stderr)
            return 130
        message, code = _describe(primary)
        if debug:
            traceback.print_exception(exc)
        one_line = " ".join(message.split())
        print(f"muxtunnel: error: {one_line}", file=sys.stderr, flush=True)
        return code
    return result if isinstance(result, int) else 0


def main() -> NoReturn:
    """Console-script entry point."""
    sys.exit(run())
