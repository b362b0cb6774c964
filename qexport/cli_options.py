"""Commands whose options depend on a choice made on the same command line (``--method M``, ``--target T``).

``calibrate`` and ``run`` take the options of the chosen method, ``build-engine`` those of the chosen runtime,
as ordinary flags. Typer declares options statically, so these commands use :func:`selector_command`: before
click parses the line, the chosen method's flags are taken out and parsed against its config dataclass
(:mod:`qexport.options`); ``--help`` appends the chosen method's options. The command then calls
:func:`collected_options` to merge ``--options FILE.json`` < ``--opt key=value`` < flags into typed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import typer
from typer.core import TyperCommand

from qexport.errors import QexportError
from qexport.options import (flag_owners, options_help, parse_opt_pairs, read_options_file, split_option_args,
                             typed_values)

_META = "qexport.selector"


def scan_flag(args: list[str], flag: str) -> str | None:
    """The value of ``flag`` on a command line (last one wins), or None."""
    found = None
    for i, tok in enumerate(args):
        if tok == "--":
            break
        if tok == flag and i + 1 < len(args):
            found = args[i + 1]
        elif tok.startswith(flag + "="):
            found = tok.split("=", 1)[1]
    return found


def _generic_flags(command) -> dict[str, bool]:
    """The command's own flags -> whether each takes a value."""
    out = {"--help": False}
    for p in command.params:
        takes = not getattr(p, "is_flag", False) and not getattr(p, "count", False)
        for o in list(getattr(p, "opts", [])) + list(getattr(p, "secondary_opts", [])):
            if o.startswith("-"):
                out[o] = takes
    return out


def selector_command(*, selector: str, default: str, kind: str, command: str,
                     resolve: Callable[[str], type], everyone: Callable[[], dict[str, type]],
                     pick: Callable[[list[str]], str | None] | None = None) -> type:
    """A TyperCommand class that takes the options of the thing chosen by ``selector``.

    Args:
        selector: the choosing flag, ``--method`` or ``--target``.
        default: the choice when the flag is absent.
        kind: ``method`` or ``runtime``, for help text.
        command: the command's name, for messages.
        resolve: choice -> its config class (raises QexportError for an unknown choice).
        everyone: every choice -> config class (to say whose option a stray flag is).
        pick: optional: finds the choice on the command line before ``selector`` does (e.g. from ``--replay``).

    Returns:
        The command class (pass it as ``cls=`` to ``app.command``).
    """

    class SelectorCommand(TyperCommand):
        def parse_args(self, ctx, args):
            name = (pick(args) if pick else None) or scan_flag(args, selector) or default
            ctx.meta[_META] = {"name": name, "values": {}}
            if "--help" in args:
                return super().parse_args(ctx, ["--help"])
            config_cls = resolve(name)
            owner = f"{selector} {name}"
            others = {k: v for k, v in flag_owners(everyone()).items() if name not in v}
            rest, values = split_option_args(args, config_cls, owner, _generic_flags(self), others,
                                             see=f"qexport {command} {selector} {name} --help")
            ctx.meta[_META].update(values=values, config=config_cls, owner=owner)
            return super().parse_args(ctx, rest)

        def format_help(self, ctx, formatter):
            super().format_help(ctx, formatter)
            name = ctx.meta.get(_META, {}).get("name", default)
            try:
                text = f"Options of {selector} {name} (also as --opt key=value or in --options FILE.json):\n" + \
                       options_help(resolve(name))
            except QexportError as e:
                text = f"{e}"
            text += f"\n\nThe options of another {kind}: qexport {command} {selector} NAME --help"
            if getattr(self, "rich_markup_mode", None) is not None and _has_rich():
                typer.echo("\n" + text)  # rich printed the help directly
            else:
                formatter.write("\n" + text + "\n")

    return SelectorCommand


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def collected_options(ctx: typer.Context, options_file: Path | None, opt: list[str]) -> dict:
    """The chosen method's (or runtime's) options: ``--options FILE`` < ``--opt key=value`` < flags.

    Args:
        ctx: the command's context (filled by the selector command).
        options_file: the ``--options`` file, if given.
        opt: the ``--opt`` pairs.

    Returns:
        name -> typed value (only what was given; the config's defaults fill the rest).
    """
    meta = ctx.meta[_META]
    cls, owner = meta["config"], meta["owner"]
    merged: dict = {}
    if options_file is not None:
        merged.update({str(k).replace("-", "_"): v for k, v in read_options_file(options_file, owner).items()})
    text = dict(parse_opt_pairs(opt))
    text.update(meta["values"])
    merged.update(typed_values(cls, text, owner))
    return merged


def check_replay_alone(ctx: typer.Context, method_options: dict, allowed: tuple[str, ...]) -> None:
    """With ``--replay`` the recipe decides everything but the output: refuse anything else given.

    Args:
        ctx: the command's context.
        method_options: the method options given on the command line.
        allowed: parameter names that may be given with ``--replay``.
    """
    given = []
    for p in ctx.command.params:
        src = ctx.get_parameter_source(p.name)
        if p.name not in allowed and src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP"):
            given.append(p.opts[0] if p.opts and p.opts[0].startswith("-") else p.name.upper())
    given += ["--" + k.replace("_", "-") for k in method_options]
    if given:
        raise QexportError(f"--replay reruns the recipe's own settings; drop {', '.join(given)} (or calibrate "
                           "without --replay to change them)")
