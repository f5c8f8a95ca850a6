"""Commands whose single-valued options may be given once.

With click (under typer), ``--target-time A --target-time B`` keeps the last value without a
word, and ``-d a -d b`` of an option that takes one database restores only ``b``. A command
declared with ``cls=OnceCommand`` refuses a single-valued option given twice (a usage error, exit
2); options that take several values are declared as lists.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand

from keepwell.errors import UsageError


class OnceCommand(TyperCommand):
    """A command whose single-valued options may be given once: with click, the last of
    ``--target-time A --target-time B`` would win without a word."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        single = {o: p for p in self.params if getattr(p, "opts", None) and not p.multiple
                  and not getattr(p, "is_flag", False) and not getattr(p, "count", False)
                  for o in p.opts}
        valued = {o for p in self.params if not getattr(p, "is_flag", True)
                  for o in getattr(p, "opts", [])}
        seen: dict[str, str] = {}
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                break
            name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2] \
                if arg.startswith("-") and len(arg) > 1 else None
            if name in single:
                first = single[name].opts[0]
                if first in seen:
                    raise UsageError(f"{first} is given twice ({seen[first]} and {arg})",
                                     hint=f"{first} takes one value; see --help")
                seen[first] = arg
            if name in valued and arg == name:
                i += 1  # its value, which may look like an option
            i += 1
        return super().parse_args(ctx, args)
