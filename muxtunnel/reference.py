"""The README's configuration reference, generated from the command line and the config code.

Every command of :data:`muxtunnel.cli.app` and every option it takes becomes one table row:
the flag with its metavariable, the environment variable that can set it, its key in the
``--config`` TOML file (or in the token file, for ``token add``), its default, whether a
running relay applies a change on SIGHUP or needs a restart, and its help text. Nothing is
copied by hand:

- flags, metavariables, help texts and typer defaults come from the typer app;
- TOML keys from the key sets and the ``flags`` dict each command passes to its config
  builder (:mod:`muxtunnel.config`), ``[[tunnel]]`` keys from that table's key set and
  ``[[token]]`` keys from :data:`muxtunnel.tokenstore.KNOWN_KEYS`;
- defaults from the ``_get(src, KEY, DEFAULT, ...)`` calls of the builder the command uses,
  else the ``(default: ...)`` of the help text;
- reloadability from :data:`muxtunnel.reload.RESTART_ONLY` (only the relay reloads);
- ``bench`` from the benchmark suite's own argument parser while it takes its arguments raw.

Usage (from a checkout)::

    python -m muxtunnel.reference           # rewrite README.md between the markers
    python -m muxtunnel.reference --check   # exit 1 if README.md is out of date

``tests/test_readme_reference.py`` runs the check, so the reference cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "BEGIN",
    "END",
    "FIX_COMMAND",
    "Row",
    "check_help_defaults",
    "main",
    "render",
    "rows_for",
    "splice",
]

#: Markers around the generated section of README.md.
BEGIN = "<!-- reference:begin -->"
END = "<!-- reference:end -->"
#: What a user runs to bring README.md up to date.
FIX_COMMAND = "python -m muxtunnel.reference"

#: Default README.md of a checkout (this file is muxtunnel/reference.py).
README = Path(__file__).resolve().parent.parent / "README.md"

_DEFAULT_SEGMENT = re.compile(r"^default(?::\s*|\s+)(?P<value>.+)$", re.DOTALL)
_BARE_DEFAULT = re.compile(r"(?P<value>[\w.$/~-]+) \(default\)")
_NUMBER = re.compile(r"^-?\d+(?:\.\d+)?$")
#: Width of the generated prose lines (the README's own wrapping).
_WIDTH = 96


@dataclass(frozen=True, slots=True)
class Row:
    """One option of one command, as rendered in the reference table."""

    flag: str
    env: str
    toml: str
    default: str
    reload: str | None
    meaning: str


@dataclass(frozen=True, slots=True)
class _CommandSource:
    """What the command's function tells about its options (from its source)."""

    #: typer parameter name -> config key (the ``flags`` dict passed to the builder).
    keys: dict[str, str]
    #: ``load_toml(config, SECTION)``: the TOML section, or None without a config file.
    section: str | None
    #: Name of the ``build_*_config`` function the command calls, if any.
    builder: str | None
    #: The command re-reads its configuration on SIGHUP (passes ``reload_config=``).
    reloads: bool


# --------------------------------------------------------------------------------------------
# Reading the code


def _function_ast(func: Callable[..., object]) -> ast.FunctionDef:
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        raise TypeError(f"{func!r} is not a plain function")
    return node


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _called(node: ast.AST) -> set[str]:
    return {
        n.func.id
        for n in ast.walk(node)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }


def _command_source(func: Callable[..., object]) -> _CommandSource:
    tree = _function_ast(func)
    keys: dict[str, str] = {}
    section: str | None = None
    reloads = False
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.AnnAssign | ast.Assign)
            and isinstance(node.value, ast.Dict)
            and any(
                isinstance(t, ast.Name) and t.id == "flags"
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
            )
        ):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    for name in _names(value):
                        keys[name] = key.value
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "load_toml"
            and len(node.args) == 2
        ):
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                section = arg.value
        if isinstance(node, ast.keyword) and node.arg == "reload_config":
            reloads = True
    builders = sorted(n for n in _called(tree) if n.startswith("build_") and n.endswith("_config"))
    return _CommandSource(
        keys=keys, section=section, builder=builders[0] if builders else None, reloads=reloads
    )


def _builder_facts(builder: str) -> tuple[dict[str, object], bool]:
    """``_get`` defaults of ``builder`` and the helpers it calls; whether it reads the env token.

    Returns:
        (config key -> default value, the builder resolves tokens from the environment).
    """
    from muxtunnel import config

    namespace = vars(config)
    functions: dict[str, ast.FunctionDef] = {}
    for statement in ast.parse(inspect.getsource(config)).body:
        if isinstance(statement, ast.FunctionDef):
            functions[statement.name] = statement
    seen: set[str] = set()
    todo = [builder]
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        todo.extend(_called(functions[name]))
    defaults: dict[str, object] = {}
    for name in sorted(seen):
        for node in ast.walk(functions[name]):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "_get"
                and len(node.args) >= 3
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
            ):
                expr = ast.Expression(node.args[2])
                ast.fix_missing_locations(expr)
                try:  # the project's own source; a local variable has no fixed default
                    value = eval(compile(expr, config.__file__, "eval"), dict(namespace))
                except NameError:
                    continue
                defaults[node.args[1].value] = value
    reads_env = any(
        namespace.get(n) == config.TOKEN_ENV for f in seen for n in _names(functions[f])
    )
    return defaults, reads_env


# --------------------------------------------------------------------------------------------
# Formatting


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _format_value(value: object) -> str | None:
    """A default as the user would write it; None when there is no fixed value."""
    from muxtunnel.config import format_host_port

    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple) and len(value) == 2:
        first, second = value
        if isinstance(first, str) and isinstance(second, int):
            return format_host_port(first, second)
        if isinstance(first, int) and isinstance(second, int):
            return f"{first}-{second}"
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value) if value else None
    return str(value)


def _split_parenthetical(text: str) -> tuple[str, str, str] | None:
    """``(head, inside, tail)`` of the last top-level ``(...)`` when only a period follows."""
    stripped = text.rstrip()
    tail = "." if stripped.endswith(".") else ""
    body = stripped[:-1] if tail else stripped
    if not body.endswith(")"):
        return None
    depth = 0
    for index in range(len(body) - 1, -1, -1):
        if body[index] == ")":
            depth += 1
        elif body[index] == "(":
            depth -= 1
            if depth == 0:
                return body[:index].rstrip(), body[index + 1 : -1], tail
    return None


def _segments(inside: str) -> list[str]:
    """Split ``a; b (c; d); e`` at top-level semicolons."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in inside:
        depth += char == "("
        depth -= char == ")"
        if char == ";" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


def _help_default(help_text: str) -> tuple[str, str | None]:
    """Take a ``default: X`` out of the help text's final parenthetical.

    Returns:
        (the help text without it, X or None).
    """
    split = _split_parenthetical(help_text)
    if split is not None:
        head, inside, tail = split
        kept: list[str] = []
        found: str | None = None
        for segment in _segments(inside):
            match = _DEFAULT_SEGMENT.match(segment)
            if match is not None and found is None:
                found = match["value"].strip()
            else:
                kept.append(segment)
        if found is not None:
            rest = f"{head} ({'; '.join(kept)})" if kept else head
            return rest + tail, found
    bare = _BARE_DEFAULT.search(help_text)
    if bare is not None:
        return help_text, bare["value"]
    return help_text, None


def _same(code: str, documented: str) -> bool:
    if _NUMBER.match(code) and _NUMBER.match(documented):
        return float(code) == float(documented)
    return code == documented


def _default_cell(code: str | None, documented: str | None) -> str:
    if code is not None and documented is not None and not _same(code, documented):
        return f"{_code(code)}: {_cell(documented)}"
    if code is not None:
        return _code(code)
    if documented is not None:
        return _cell(documented) if " " in documented else _code(documented)
    return ""


# --------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True, slots=True)
class _Context:
    source: _CommandSource
    defaults: dict[str, object]
    env_token: bool
    toml_keys: frozenset[str]
    tunnel_keys: frozenset[str]
    token_keys: frozenset[str]
    restart_only: frozenset[str]
    #: Mismatches between the code's default and the help text's, for check_help_defaults().
    mismatches: list[str]


def _flag_text(param: Any) -> str:
    if param.param_type_name == "argument":
        return str(param.metavar or param.name.upper())
    names = "/".join([*param.opts, *param.secondary_opts])
    if param.is_flag:
        return names
    metavar = param.metavar or param.name.upper()
    return f"{' '.join(param.opts)} {metavar}" + (
        " /" + "/".join(param.secondary_opts) if param.secondary_opts else ""
    )


def _row(command: str, param: Any, ctx: _Context, *, with_reload: bool) -> Row:
    key = ctx.source.keys.get(param.name, param.name.replace("_", "-"))
    help_text = " ".join((param.help or "").split())
    meaning, documented = _help_default(help_text)
    if param.multiple and "repeatable" not in help_text.lower():
        meaning = f"{meaning} (repeatable)".strip()

    toml = ""
    table_key = key.replace("-", "_")
    if ctx.source.section is not None and key in ctx.toml_keys:
        toml = _code("[[tunnel]] tables") if key == "tunnel" else _code(key)
    elif ctx.source.section is not None and table_key in ctx.tunnel_keys:
        toml = _code(f"[[tunnel]] {table_key}")
    elif command == "token add" and table_key in ctx.token_keys:
        toml = _code(f"[[token]] {table_key}")

    env = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    if key == "token" and ctx.env_token:
        from muxtunnel.config import TOKEN_ENV

        env.append(TOKEN_ENV)

    code_default = _format_value(ctx.defaults[key]) if key in ctx.defaults else None
    if code_default is None and param.default is not None and not param.is_flag:
        code_default = _format_value(param.default)
    if param.param_type_name == "option" and param.is_flag:
        # A flag without a fixed default (None: decided at run time) or an eager one
        # (--version) has no default worth a cell.
        fixed = param.default is not None and not param.is_eager
        code_default = _format_value(bool(param.default)) if fixed else None
    if (
        code_default is not None
        and documented is not None
        and _NUMBER.match(code_default)
        and _NUMBER.match(documented)
        and not _same(code_default, documented)
    ):
        ctx.mismatches.append(
            f"muxtunnel {command} {_flag_text(param)}: the help says default {documented}, "
            f"the code uses {code_default}"
        )

    reload: str | None = None
    if with_reload:
        configures = bool(toml) or key == "config"
        if not configures:
            reload = ""
        elif not ctx.source.reloads or key in ctx.restart_only:
            reload = "restart"
        else:
            reload = "SIGHUP"
    return Row(
        flag=_code(_flag_text(param)),
        env=", ".join(_code(e) for e in env),
        toml=toml,
        default=_default_cell(code_default, documented),
        reload=reload,
        meaning=_cell(meaning),
    )


def _argparse_rows(parser: argparse.ArgumentParser) -> list[Row]:
    rows: list[Row] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        names = "/".join(action.option_strings)
        takes_value = action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)
        metavar = action.metavar or action.dest.upper()
        flag = f"{names} {metavar}" if takes_value else names
        meaning, documented = _help_default(" ".join((action.help or "").split()))
        default = action.default
        code_default = None if isinstance(default, bool) else _format_value(default)
        if isinstance(action, argparse._StoreTrueAction):
            code_default = "off"
        rows.append(
            Row(
                flag=_code(str(flag)),
                env="",
                toml="",
                default=_default_cell(code_default, documented),
                reload=None,
                meaning=_cell(meaning),
            )
        )
    return rows


def rows_for(mismatches: list[str] | None = None) -> list[tuple[str, str, list[Row]]]:
    """Every command: ``(command path, summary line, rows)``, in the order of ``--help``.

    ``mismatches`` collects options whose help text states another default than the code.
    """
    import typer

    from muxtunnel import config, reload, tokenstore
    from muxtunnel.cli import app

    sink: list[str] = [] if mismatches is None else mismatches
    restart_only = frozenset(reload.RESTART_ONLY.values())
    token_keys = frozenset(tokenstore.KNOWN_KEYS)
    tunnel_keys = frozenset(config._TUNNEL_TABLE_KEYS)
    common = frozenset(config._COMMON_KEYS)
    callbacks: dict[str, Callable[..., object]] = {}

    def collect(prefix: str, typer_app: typer.Typer) -> None:
        for info in typer_app.registered_commands:
            if info.callback is None:
                continue
            name = info.name or info.callback.__name__.replace("_", "-")
            callbacks[f"{prefix}{name}"] = info.callback
        for group in typer_app.registered_groups:
            if group.typer_instance is not None:
                collect(f"{prefix}{group.typer_instance.info.name} ", group.typer_instance)

    collect("", app)
    root: Any = typer.main.get_command(app)
    result: list[tuple[str, str, list[Row]]] = []

    def empty_ctx() -> _Context:
        return _Context(
            source=_CommandSource(keys={}, section=None, builder=None, reloads=False),
            defaults={},
            env_token=False,
            toml_keys=frozenset(),
            tunnel_keys=tunnel_keys,
            token_keys=token_keys,
            restart_only=restart_only,
            mismatches=sink,
        )

    result.append(
        (
            "muxtunnel",
            "Options before the command.",
            [_row("", p, empty_ctx(), with_reload=False) for p in root.params],
        )
    )

    def walk(prefix: str, group: Any) -> None:
        for name, command in group.commands.items():
            path = f"{prefix}{name}"
            if hasattr(command, "commands"):
                walk(f"{path} ", command)
                continue
            summary = (command.help or "").strip().split("\n\n")[0]
            summary = " ".join(summary.split())
            func = callbacks.get(path)
            source = _command_source(func) if func is not None else empty_ctx().source
            defaults: dict[str, object] = {}
            env_token = False
            if source.builder is not None:
                defaults, env_token = _builder_facts(source.builder)
            toml_keys: frozenset[str] = frozenset()
            if source.section is not None:
                toml_keys = frozenset(config._SECTIONS[source.section]) | common
            ctx = _Context(
                source=source,
                defaults=defaults,
                env_token=env_token,
                toml_keys=toml_keys,
                tunnel_keys=tunnel_keys,
                token_keys=token_keys,
                restart_only=restart_only,
                mismatches=sink,
            )
            params = list(command.params)
            passes_on = (command.context_settings or {}).get("allow_extra_args", False)
            if not params and passes_on:
                rows = _bench_rows(path)
            else:
                with_reload = source.section is not None
                rows = [_row(path, p, ctx, with_reload=with_reload) for p in params]
                listed = {ctx.source.keys.get(p.name, p.name.replace("_", "-")) for p in params}
                rows.extend(_file_only_rows(ctx, sorted(toml_keys - listed), help_by_key))
            result.append((f"muxtunnel {path}", summary, rows))

    help_by_key: dict[str, str] = {}
    for path, func in callbacks.items():
        keys = _command_source(func).keys
        command: Any = root
        for part in path.split():
            command = command.commands[part]
        for param in command.params:
            key = keys.get(param.name, param.name.replace("_", "-"))
            help_by_key.setdefault(key, " ".join((param.help or "").split()))
    walk("", root)
    return result


def _bench_rows(path: str) -> list[Row]:
    """A command that passes its arguments on (``bench``): its own parser's options."""
    from muxtunnel import benchsuite

    return _argparse_rows(benchsuite._parser())


def _file_only_rows(ctx: _Context, keys: Iterable[str], help_by_key: dict[str, str]) -> list[Row]:
    """Keys the config file takes without a flag, and the ``[[tunnel]]`` table's own keys."""
    rows: list[Row] = []
    for key in keys:
        meaning, documented = _help_default(help_by_key.get(key, ""))
        code = _format_value(ctx.defaults[key]) if key in ctx.defaults else None
        reload = "restart" if not ctx.source.reloads or key in ctx.restart_only else "SIGHUP"
        rows.append(
            Row(
                flag="(file only)",
                env="",
                toml=_code(key),
                default=_default_cell(code, documented),
                reload=reload,
                meaning=_cell(meaning),
            )
        )
    if ctx.source.keys.get("specs") == "tunnel":
        from muxtunnel.config import TunnelSpec

        described = {
            "local_port": "The local port (required).",
            "remote_port": "The relay's public port; 0: the relay picks one.",
            "local_host": "The local host.",
        }
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(TunnelSpec)
            if f.name in described and f.default is not dataclasses.MISSING
        }
        rows.extend(
            Row(
                flag="(file only)",
                env="",
                toml=_code(f"[[tunnel]] {key}"),
                default=_code(_format_value(defaults.get(key)) or ""),
                reload="restart",
                meaning=described[key],
            )
            for key in sorted(described)
            if key in ctx.tunnel_keys
        )
    return rows


# --------------------------------------------------------------------------------------------
# Rendering and README


def _table(rows: Sequence[Row]) -> list[str]:
    with_reload = any(row.reload is not None for row in rows)
    header = ["flag", "environment", "TOML key", "default"]
    if with_reload:
        header.append("reload")
    header.append("meaning")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.flag, row.env, row.toml, row.default]
        if with_reload:
            cells.append(row.reload or "")
        cells.append(row.meaning)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render() -> str:
    """The generated Markdown (without the markers)."""
    intro = (
        "Precedence: a flag, then the environment variable (`MUXTUNNEL_TOKEN` only), then the "
        "`--config` file, then the default. TOML keys take dashes or underscores and may sit "
        "at the top level or in a `[server]`, `[client]` or `[visit]` table. *reload*: "
        "`SIGHUP` means a running relay applies a change when it gets SIGHUP (it re-reads "
        "`--config` and the token files); `restart` means the process must be restarted "
        "(clients do not reload)."
    )
    lines = [
        f"<!-- generated by `{FIX_COMMAND}` from muxtunnel/cli.py, muxtunnel/config.py "
        "and muxtunnel/reload.py: edit those, then run it -->",
        "",
        textwrap.fill(intro, width=_WIDTH, break_on_hyphens=False, break_long_words=False),
    ]
    for path, summary, rows in rows_for():
        if not rows:
            continue
        if any(row.toml.startswith("`[[token]]") for row in rows):
            summary += (
                " The TOML keys are those of the token's `[[token]]` table in the token file."
            )
        summary = textwrap.fill(
            summary, width=_WIDTH, break_on_hyphens=False, break_long_words=False
        )
        lines += ["", f"### `{path}`", "", summary, "", *_table(rows)]
    return "\n".join(lines) + "\n"


def splice(readme: str, generated: str) -> str:
    """Replace what lies between the markers of ``readme`` with ``generated``.

    Raises:
        ValueError: The markers are missing or out of order.
    """
    start = readme.find(BEGIN)
    end = readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the markers {BEGIN} and {END}, in that order")
    return readme[: start + len(BEGIN)] + "\n" + generated + readme[end:]


def check_help_defaults() -> list[str]:
    """Options whose help text states another number as default than the code uses."""
    mismatches: list[str] = []
    rows_for(mismatches)
    return mismatches


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with ``--check`` compare) the reference section of README.md."""
    parser = argparse.ArgumentParser(prog="python -m muxtunnel.reference", description=__doc__)
    parser.add_argument("--readme", type=Path, default=README, metavar="FILE")
    parser.add_argument("--check", action="store_true", help="exit 1 if FILE is out of date")
    args = parser.parse_args(argv)
    path: Path = args.readme
    current = path.read_text(encoding="utf-8")
    updated = splice(current, render())
    for line in check_help_defaults():
        print(f"warning: {line}", file=sys.stderr)
    if args.check:
        if updated != current:
            print(f"{path}: the configuration reference is out of date; run: {FIX_COMMAND}")
            return 1
        return 0
    if updated != current:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: configuration reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
