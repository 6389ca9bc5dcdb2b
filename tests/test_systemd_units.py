"""The unit files in contrib/systemd/ have the keys that make them notify services, hardened
and restartable, and ``systemd-analyze verify`` (where installed) finds nothing to report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
UNITS = REPO_ROOT / "contrib" / "systemd"
SERVER = UNITS / "muxtunnel-server.service"
CLIENT = UNITS / "muxtunnel-client@.service"
INSTALLED_PATH = "/usr/local/bin/muxtunnel"

#: Keys both units must set, with their exact value.
COMMON = {
    "Type": "notify",
    "NotifyAccess": "main",
    "DynamicUser": "yes",
    "Restart": "on-failure",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictNamespaces": "yes",
    "StateDirectoryMode": "0700",
}
#: Keys both units must set to something.
PRESENT = ("RestartSec", "WatchdogSec", "LimitNOFILE", "TimeoutStopSec", "StateDirectory")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd allows repeated keys)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path.name}:{number}: keep each setting on one line"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}:{number}: setting outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.mark.parametrize("unit", [SERVER, CLIENT], ids=lambda p: p.name)
def test_unit_has_required_keys(unit: Path) -> None:
    service = parse_unit(unit)["Service"]
    for key, value in COMMON.items():
        assert service.get(key, [None])[-1] == value, f"{unit.name}: {key}={value} expected"
    for key in PRESENT:
        assert service.get(key, [""])[-1], f"{unit.name}: {key}= missing"
    assert "@system-service" in service["SystemCallFilter"]
    (start,) = service["ExecStart"]
    assert start.startswith(INSTALLED_PATH + " ")
    assert "--state-dir ${STATE_DIRECTORY}" in start
    assert "--config /etc/muxtunnel/" in start
    # A capability for ports below 1024 is documented, never granted by default.
    assert service.get("AmbientCapabilities", [""])[-1] == ""


def test_server_unit_reloads_with_sighup() -> None:
    sections = parse_unit(SERVER)
    service = sections["Service"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["ExecStart"][0].split()[1] == "server"
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in SERVER.read_text(encoding="utf-8")
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]


def test_client_unit_gets_its_token_as_a_credential() -> None:
    service = parse_unit(CLIENT)["Service"]
    assert service["LoadCredential"] == ["token:/etc/muxtunnel/client-%i.token"]
    start = service["ExecStart"][0]
    assert start.split()[1] == "client"
    assert "--token-file ${CREDENTIALS_DIRECTORY}/token" in start
    assert "--token " not in start
    assert "Environment" not in service
    # Refused/revoked token (3) and identity mismatch (4) are not retried by systemd either.
    assert set(service["RestartPreventExitStatus"][0].split()) == {"2", "3", "4"}
    assert "ExecReload" not in service


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """Where systemd-analyze exists, it verifies both units without a warning; the units are
    copied with ExecStart pointing at this installation's ``muxtunnel`` (verify checks that
    the program exists)."""
    analyze = shutil.which("systemd-analyze")
    program = Path(sys.executable).parent / "muxtunnel"
    assert program.exists(), program
    copies = []
    for unit, name in ((SERVER, SERVER.name), (CLIENT, "muxtunnel-client@office.service")):
        text = unit.read_text(encoding="utf-8")
        assert INSTALLED_PATH in text
        copy = tmp_path / name
        copy.write_text(text.replace(INSTALLED_PATH, str(program)), encoding="utf-8")
        copies.append(copy)
    # A copy with a misspelt key shows that a warning would be noticed.
    bad = tmp_path / "muxtunnel-bad.service"
    bad.write_text(
        SERVER.read_text(encoding="utf-8")
        .replace(INSTALLED_PATH, str(program))
        .replace("LockPersonality=yes", "LockPersonalty=yes"),
        encoding="utf-8",
    )
    if analyze is None:
        # No systemd here: the key checks above are all that can run.
        assert parse_unit(bad)["Service"]["LockPersonalty"] == ["yes"]
        return
    for copy in [*copies, bad]:
        result = subprocess.run(
            [analyze, "verify", "--man=no", str(copy)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
        report = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        if copy is bad:
            assert any("LockPersonalty" in line for line in report), report
        else:
            assert result.returncode == 0, report
            assert report == [], report
