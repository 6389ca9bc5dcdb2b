"""README.md's configuration reference is generated from the code and must match it.

The section between ``<!-- reference:begin -->`` and ``<!-- reference:end -->`` is written by
``python -m muxtunnel.reference`` from the typer app, the config builders and the reload code;
these tests regenerate it and fail when README.md differs, so the reference cannot go stale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from muxtunnel import reference, reload
from muxtunnel.cli import app

README = Path(__file__).resolve().parent.parent / "README.md"


def _row(text: str, command: str, flag: str) -> list[str]:
    """The cells of ``flag``'s row in ``command``'s table."""
    section = text.split(f"### `{command}`\n", 1)[1].split("\n### ", 1)[0]
    for line in section.splitlines():
        if line.startswith(f"| `{flag}"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {flag} under {command}")


def test_readme_reference_is_up_to_date() -> None:
    current = README.read_text(encoding="utf-8")
    expected = reference.splice(current, reference.render())
    assert current == expected, (
        "README.md's configuration reference is out of date; run: "
        f"{reference.FIX_COMMAND}  (then review and commit README.md)"
    )


def test_every_command_and_option_is_listed() -> None:
    text = reference.render()
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)

    def walk(prefix: str, group: typer.core.TyperGroup) -> int:
        count = 0
        for name, command in group.commands.items():
            path = f"{prefix} {name}"
            if isinstance(command, typer.core.TyperGroup):
                count += walk(path, command)
                continue
            assert f"### `{path}`" in text
            for param in command.params:
                shown = param.opts[0] if param.param_type_name == "option" else param.metavar
                assert shown is not None
                _row(text, path, shown)
                count += 1
        return count

    assert walk("muxtunnel", root) > 60
    # bench passes its arguments to the benchmark suite: its parser's options are listed.
    assert _row(text, "muxtunnel bench", "--quick")


def test_columns_come_from_the_config_code() -> None:
    text = reference.render()
    listen = _row(text, "muxtunnel server", "--listen")
    assert listen[2:5] == ["`listen`", "`0.0.0.0:7835`", "restart"]
    assert _row(text, "muxtunnel server", "--ports")[3] == "`20000-29999`"
    token = _row(text, "muxtunnel client", "--token TOKEN")
    assert token[1] == "`MUXTUNNEL_TOKEN`"
    assert _row(text, "muxtunnel client", "--allow")[2] == "`[[tunnel]] allow`"
    assert _row(text, "muxtunnel visit", "--open-timeout")[3] == "`45`"
    assert _row(text, "muxtunnel token add", "--max-tunnels")[2] == "`[[token]] max_tunnels`"
    limits = _row(text, "muxtunnel server", "--max-sessions-per-token")
    assert limits[3:5] == ["`8`", "SIGHUP"]
    # Clients do not reload: every setting of theirs needs a restart.
    assert _row(text, "muxtunnel client", "--max-streams ")[4] == "restart"


def test_reload_column_reads_restart_only(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _row(reference.render(), "muxtunnel server", "--drain-timeout")[4] == "SIGHUP"
    monkeypatch.setitem(reload.RESTART_ONLY, "drain_timeout", "drain-timeout")
    assert _row(reference.render(), "muxtunnel server", "--drain-timeout")[4] == "restart"


def test_help_texts_state_the_defaults_the_code_uses() -> None:
    assert reference.check_help_defaults() == []


def test_check_fails_on_a_stale_readme_and_the_fix_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Configuration reference\n\n{reference.BEGIN}\nold\n{reference.END}\n\n## Security\n",
        encoding="utf-8",
    )
    assert reference.main(["--readme", str(readme), "--check"]) == 1
    assert reference.FIX_COMMAND in capsys.readouterr().out
    assert reference.main(["--readme", str(readme)]) == 0
    assert reference.main(["--readme", str(readme), "--check"]) == 0
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# x\n")
    assert text.endswith(f"{reference.END}\n\n## Security\n")
    assert "### `muxtunnel server`" in text


def test_markers_are_required() -> None:
    with pytest.raises(ValueError, match="markers"):
        reference.splice("# no markers\n", "x\n")
