"""The one error type for problems a user can fix: bad specs, rows, configurations, experiment
files, stores, datasets, fits.

Every such error carries ``problems`` (each one names what is wrong and how to fix it, all of
them found at once rather than the first) and ``source`` (the file or object they were found
in, or ``None``). Command lines catch :class:`DmError` (``dm_assets.cli.run``) and print the
message instead of a traceback. Each subclass also keeps the builtin base it always had
(``ValueError`` for bad input, ``RuntimeError`` for a state that stops the work), so existing
``except ValueError`` handlers keep working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class DmError(Exception):
    """A problem the user can fix.

    Parameters
    ----------
    problems : str or sequence of str
        Every problem found, each with its fix. A single string is one problem.
    source : str or path-like, optional
        Where the problems were found (a file, a store, a fit folder), if anywhere.

    The message is :meth:`headline` followed by one ``  - problem`` line per problem; a
    subclass without a headline and a single problem has that problem as its message.
    """

    def __init__(
        self, problems: str | Sequence[str], source: str | os.PathLike[str] | None = None
    ) -> None:
        self.problems = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        self.source = None if source is None else os.fspath(source)
        super().__init__(self.render())

    def headline(self) -> str | None:
        """The first line of the message, before the list of problems (``None``: no list)."""
        return None

    def render(self) -> str:
        head = self.headline()
        if head is None and len(self.problems) == 1:
            return self.problems[0]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{head or 'problems'}:\n{lines}"
