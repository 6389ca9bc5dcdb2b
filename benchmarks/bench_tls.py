"""TLS transport throughput: trio.SSLStream vs muxtunnel.tlsstream.TLSStream, two processes.

One TLS hop over loopback, the sender and the receiver in separate processes (each side of a
tunnel is its own process). For every write size and direction, each variant moves ``--bytes``
(512 MiB) ``--runs`` times (runs interleaved across variants, so load changes on this shared
machine hit every variant alike); the table shows the median MB/s (min-max) and the CPU each
side spent per MB (``time.process_time``, handshake excluded).

Variants:
  plain        trio.SocketStream both ends, no TLS (the ceiling of the trio I/O path)
  trio         trio.SSLStream both ends
  ours         TLSStream both ends, crypto inline on the trio thread
  ours-thread  TLSStream both ends, batches >= --offload bytes encrypted/decrypted in a worker

Directions: ``c2s`` = the TLS client sends (client -> relay), ``s2c`` = the TLS server sends.

Run:  .venv/bin/python benchmarks/bench_tls.py [--bytes 512MiB] [--runs 3] [--sizes 64KiB,256KiB]
      [--variants plain,trio,ours,ours-thread] [--aes128] [--json]

End to end (``e2e``): a real ``muxtunnel server`` + ``client`` pair per transfer, one stream of
``--bytes`` put (visitor -> service) and get, with trio.SSLStream vs TLSStream (chosen through
connection.FAST_TLS in those two processes, no file edited) and TLSStream with 256 KiB writer
batches; CPU per MB of the relay and of the client from /proc:
      .venv/bin/python benchmarks/bench_tls.py e2e [--bytes 1GiB] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

UNITS = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3}
VARIANTS = ("plain", "trio", "ours", "ours-thread")
RECEIVE_SIZE = 256 * 1024


def parse_size(text: str) -> int:
    t = text.strip().lower()
    for suffix, mult in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def fmt_size(n: int) -> str:
    for unit, mult in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# Child process: one end of the connection


async def child_main(args: argparse.Namespace) -> None:
    from muxtunnel.tls import ServerIdentity, client_ssl_context, server_ssl_context
    from muxtunnel.tlsstream import TLSStream

    is_server = args.tls_role == "server"
    if is_server:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(f"PORT {listeners[0].socket.getsockname()[1]}", flush=True)
        tcp = await listeners[0].accept()
        await listeners[0].aclose()
    else:
        tcp = await trio.open_tcp_stream("127.0.0.1", args.port)

    stream: trio.abc.Stream
    if args.variant == "plain":
        stream = tcp
    else:
        if is_server:
            ident = ServerIdentity(Path(args.cert), Path(args.key), "", False)
            ctx = server_ssl_context(ident)
        else:
            ctx = client_ssl_context(None)
        hostname = None if is_server else "localhost"
        if args.variant == "trio":
            tls: trio.SSLStream[trio.SocketStream] | TLSStream = trio.SSLStream(
                tcp, ctx, server_side=is_server, server_hostname=hostname
            )
        else:
            offload = args.offload if args.variant == "ours-thread" else None
            tls = TLSStream(
                tcp, ctx, server_side=is_server, server_hostname=hostname, offload_threshold=offload
            )
        await tls.do_handshake()
        stream = tls

    total = args.bytes
    calls = 0
    cpu0 = time.process_time()
    if args.data_role == "sender":
        block = (os.urandom(4096) * (args.write_size // 4096 + 1))[: args.write_size]
        t0 = time.perf_counter()
        sent = 0
        while sent < total:
            n = min(args.write_size, total - sent)
            await stream.send_all(block if n == len(block) else block[:n])
            sent += n
            calls += 1
        ack = await stream.receive_some(16)
        assert ack == b"!", ack
        elapsed = time.perf_counter() - t0
    else:
        got = 0
        t0 = time.perf_counter()
        while got < total:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise SystemExit(f"EOF after {got} bytes")
            got += len(data)
            calls += 1
        await stream.send_all(b"!")
        elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    info: dict[str, object] = {"elapsed": elapsed, "cpu": cpu, "calls": calls}
    if isinstance(stream, trio.SSLStream | TLSStream):
        info["cipher"] = stream.cipher()
    print("RESULT " + json.dumps(info), flush=True)
    await stream.aclose()


# --------------------------------------------------------------------------------------------
# Parent: run the matrix


def child_cmd(opts: dict[str, object]) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "_child"]
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd


def run_one(
    variant: str,
    size: int,
    direction: str,
    total: int,
    cert: Path,
    key: Path,
    offload: int,
    env: dict[str, str],
) -> dict[str, Any]:
    """One transfer; returns MB/s, sender/receiver CPU s, cipher."""
    server_role = "receiver" if direction == "c2s" else "sender"
    client_role = "sender" if direction == "c2s" else "receiver"
    common: dict[str, object] = {
        "variant": variant,
        "write_size": size,
        "bytes": total,
        "offload": offload,
        "cert": cert,
        "key": key,
    }
    server = subprocess.Popen(
        child_cmd({**common, "tls_role": "server", "data_role": server_role}),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    client = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"server child said {line!r}")
        port = int(line.split()[1])
        client = subprocess.Popen(
            child_cmd({**common, "port": port, "tls_role": "client", "data_role": client_role}),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        c_out, _ = client.communicate(timeout=300)
        s_out, _ = server.communicate(timeout=60)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    results: dict[str, dict[str, Any]] = {}
    for role, out in ((client_role, c_out), (server_role, s_out)):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{variant} {role}: no result (output {out!r})")
        results[role] = json.loads(lines[-1][len("RESULT ") :])
    snd, rcv = results["sender"], results["receiver"]
    mb = total / 1e6
    return {
        "mbps": mb / float(snd["elapsed"]),
        "cpu_send_us_per_mb": float(snd["cpu"]) / mb * 1e6,
        "cpu_recv_us_per_mb": float(rcv["cpu"]) / mb * 1e6,
        "recv_bytes_per_call": total / int(rcv["calls"]),
        "cipher": snd.get("cipher") or rcv.get("cipher"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", default="512MiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="64KiB,256KiB")
    parser.add_argument("--directions", default="c2s,s2c")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--offload", default="64KiB", help="ours-thread offload threshold")
    parser.add_argument("--aes128", action="store_true", help="force TLS_AES_128_GCM_SHA256")
    parser.add_argument("--json", action="store_true", help="also print all runs as JSON")
    args = parser.parse_args()
    total = parse_size(args.bytes)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    directions = args.directions.split(",")
    variants = args.variants.split(",")
    offload = parse_size(args.offload)
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"unknown variant {v!r}")

    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    from muxtunnel.tls import load_or_create_identity

    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        ident = load_or_create_identity(Path(tmp) / "state")
        env = dict(os.environ)
        if args.aes128:
            conf = Path(tmp) / "openssl.cnf"
            conf.write_text(
                "openssl_conf = init\n[init]\nssl_conf = ssl_sect\n[ssl_sect]\n"
                "system_default = sys\n[sys]\nCiphersuites = TLS_AES_128_GCM_SHA256\n"
            )
            env["OPENSSL_CONF"] = str(conf)
        runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
        started = time.monotonic()
        for run in range(args.runs):
            for size in sizes:
                for direction in directions:
                    for variant in variants:
                        res = run_one(
                            variant,
                            size,
                            direction,
                            total,
                            ident.cert_path,
                            ident.key_path,
                            offload,
                            env,
                        )
                        runs.setdefault((size, direction, variant), []).append(res)
                        print(
                            f"  run {run + 1}/{args.runs} {fmt_size(size):>8} {direction} "
                            f"{variant:<12} {res['mbps']:7.0f} MB/s",
                            file=sys.stderr,
                            flush=True,
                        )
        wall = time.monotonic() - started

    ciphers = {str(r["cipher"]) for rs in runs.values() for r in rs if r["cipher"]}
    print(f"\n{fmt_size(total)} per transfer, median of {args.runs} (min-max); cipher {ciphers}")
    print(f"offload threshold for ours-thread: {fmt_size(offload)}; total time {wall:.0f} s\n")
    header = (
        "| write | dir | variant | MB/s median (min-max) | vs trio | send CPU µs/MB "
        "| recv CPU µs/MB | hop CPU µs/MB | recv bytes/call |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for direction in directions:
            base = runs.get((size, direction, "trio"))
            base_med = statistics.median(float(r["mbps"]) for r in base) if base else None
            for variant in variants:
                rs = runs[(size, direction, variant)]
                mbps = [float(r["mbps"]) for r in rs]
                med = statistics.median(mbps)
                snd = statistics.median(float(r["cpu_send_us_per_mb"]) for r in rs)
                rcv = statistics.median(float(r["cpu_recv_us_per_mb"]) for r in rs)
                per_call = statistics.median(float(r["recv_bytes_per_call"]) for r in rs)
                ratio = f"{med / base_med:.2f}x" if base_med else "-"
                print(
                    f"| {fmt_size(size)} | {direction} | {variant} | {med:.0f} "
                    f"({min(mbps):.0f}-{max(mbps):.0f}) | {ratio} | {snd:.0f} | {rcv:.0f} "
                    f"| {snd + rcv:.0f} | {per_call / 1024:.1f} KiB |"
                )
    if args.json:
        print(
            json.dumps(
                [
                    {"write_size": s, "direction": d, "variant": v, "runs": rs}
                    for (s, d, v), rs in runs.items()
                ]
            )
        )


# --------------------------------------------------------------------------------------------
# End to end: visitor -> relay -> client -> service, real `muxtunnel server` / `client` processes

#: Runs the muxtunnel CLI with the tunnel's TLS chosen explicitly: connection.FAST_TLS when the
#: code has that switch, and trio.SSLStream replaced by TLSStream (same constructor signature)
#: for code that calls trio.SSLStream directly; server.py / client.py are not edited.
#: ``ours-256k`` also sets connection.WRITE_BATCH to 256 KiB (the writer's batch size).
E2E_VARIANTS = ("trio", "ours", "ours-256k")
_CLI_PRELUDE = {
    "trio": "c.FAST_TLS = False",
    "ours": "c.FAST_TLS = True; trio.SSLStream = TLSStream",
    "ours-256k": "c.FAST_TLS = True; trio.SSLStream = TLSStream; c.WRITE_BATCH = 262144",
}


def _patched_cli(variant: str) -> str:
    return (
        "import sys, trio; import muxtunnel.connection as c; "
        "from muxtunnel.tlsstream import TLSStream; "
        f"{_CLI_PRELUDE[variant]}; from muxtunnel.cli import run; sys.exit(run())"
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 30) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process {proc.args!r} exited before printing {pattern!r}")
        m = re.search(pattern, line)
        if m:
            return m
    raise RuntimeError(f"timeout waiting for {pattern!r}")


def run_e2e(variant: str, total: int, direction: str, tmp: Path) -> dict[str, Any]:
    """One tunnelled transfer through a fresh relay+client pair; MB/s and CPU per MB."""
    py = sys.executable
    procs: list[subprocess.Popen[str]] = []

    def spawn(cmd: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=tmp
        )
        procs.append(proc)
        return proc

    cli = [py, "-c", _patched_cli(variant)]
    token = "bench-token-" + os.urandom(8).hex()
    try:
        service = spawn([py, "-m", "muxtunnel.benchsuite.service", "--port", "0"])
        service_port = int(_wait_line(service, r"^listening \S+ (\d+)").group(1))
        lo = 30000 + int.from_bytes(os.urandom(2), "big") % 1800
        server = spawn(
            [
                *cli,
                *("server", "--listen", "127.0.0.1:0", "--bind", "127.0.0.1"),
                *("--ports", f"{lo}-{lo + 199}", "--state-dir", str(tmp / f"s-{variant}")),
                *("--token", token),
            ]
        )
        fp = _wait_line(server, r"^fingerprint: (sha256:[0-9a-f]{64})").group(1)
        relay_port = int(_wait_line(server, r"listening on \S+:(\d+)\s*$").group(1))
        client = spawn(
            [
                *cli,
                *("client", "--server", f"127.0.0.1:{relay_port}", "--token", token),
                *("--fingerprint", fp, "--state-dir", str(tmp / f"c-{variant}"), str(service_port)),
            ]
        )
        public = int(_wait_line(client, r"^forwarding tcp://\S+:(\d+) -> ").group(1))
        cpu0 = {name: _cpu_seconds(p.pid) for name, p in (("relay", server), ("client", client))}
        out = subprocess.run(
            [
                *(py, "-m", "muxtunnel.benchsuite.load", "multi", "--port", str(public)),
                *("--bytes", str(total), "--streams", "1", "--direction", direction),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        ).stdout
        cpu1 = {name: _cpu_seconds(p.pid) for name, p in (("relay", server), ("client", client))}
        result = next(json.loads(ln) for ln in out.splitlines() if ln.startswith('{"result"'))
        mb = total / 1e6
        return {
            "mbps": float(result["result"]["mbps"]),
            "relay_us_per_mb": (cpu1["relay"] - cpu0["relay"]) / mb * 1e6,
            "client_us_per_mb": (cpu1["client"] - cpu0["client"]) / mb * 1e6,
        }
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main_e2e(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_tls.py e2e")
    parser.add_argument("--bytes", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--directions", default="put,get")
    parser.add_argument("--variants", default=",".join(E2E_VARIANTS))
    args = parser.parse_args(argv)
    total = parse_size(args.bytes)
    print("command: " + shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    variants = args.variants.split(",")
    for v in variants:
        if v not in E2E_VARIANTS:
            parser.error(f"unknown variant {v!r}")
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-e2e-") as tmp:
        for run in range(args.runs):
            for direction in args.directions.split(","):
                for variant in variants:
                    res = run_e2e(variant, total, direction, Path(tmp))
                    runs.setdefault((direction, variant), []).append(res)
                    print(
                        f"  run {run + 1}/{args.runs} {direction} {variant:<9} "
                        f"{res['mbps']:7.0f} MB/s",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"\none stream, {fmt_size(total)} through relay+client, median of {args.runs} (min-max)\n"
    )
    print(
        "| dir | transport | MB/s median (min-max) | vs trio | relay CPU µs/MB | client CPU µs/MB |"
    )
    print("|---|---|---|---|---|---|")
    for direction in args.directions.split(","):
        base_runs = runs.get((direction, "trio"))
        base = statistics.median(float(r["mbps"]) for r in base_runs) if base_runs else None
        for variant in variants:
            rs = runs[(direction, variant)]
            mbps = [float(r["mbps"]) for r in rs]
            med = statistics.median(mbps)
            relay = statistics.median(float(r["relay_us_per_mb"]) for r in rs)
            client = statistics.median(float(r["client_us_per_mb"]) for r in rs)
            print(
                f"| {direction} | {variant} | {med:.0f} ({min(mbps):.0f}-{max(mbps):.0f}) "
                f"| {f'{med / base:.2f}x' if base else '-'} | {relay:.0f} | {client:.0f} |"
            )


def child_entry() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--tls-role", required=True, choices=("client", "server"))
    parser.add_argument("--data-role", required=True, choices=("sender", "receiver"))
    parser.add_argument("--write-size", type=int, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--offload", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    trio.run(child_main, parser.parse_args(sys.argv[2:]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_entry()
    elif len(sys.argv) > 1 and sys.argv[1] == "e2e":
        main_e2e(sys.argv[2:])
    else:
        main()
