"""How the CLI prints: listings as tables whose values are never cut short, ``--json`` documents,
UTC timestamps. Shared by the host's commands (``agent.cli``) and the remote ones (``agent.cli_remote``)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Column, Table

# Piped, a listing is as wide as its values (rich would fit it to 80 columns and cut them short);
# on a terminal, a value too wide for its column folds onto the next line instead of being cut.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 1 << 14)
err = Console(stderr=True, soft_wrap=True)


def table_of(*headers: str) -> Table:
    return Table(*(Column(h, overflow="fold") for h in headers))


def timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def say(message: str) -> None:
    """One line as it is: no rich markup, no highlighting (names and messages may hold brackets)."""
    out.print(message, markup=False, highlight=False)
