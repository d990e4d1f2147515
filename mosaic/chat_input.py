"""What `mosaic chat` accepts from a person before any command is parsed: a size limit on a line,
and the commands whose argument is free text (`/note`, `/reject`), which are taken as written,
apostrophes and quotes included, instead of being split like shell words."""

from __future__ import annotations

import re

# A note or a reason is a few sentences. Every accepted line ends up in the audit log and the
# checkpoint database, so a pasted megabyte would bloat both for every later round.
MAX_INPUT_CHARS = 2000
FREE_TEXT_COMMANDS = ("note", "reject")
_FREE_TEXT = re.compile(r"\s*/(" + "|".join(FREE_TEXT_COMMANDS) + r")(?:\s+(.*))?\s*\Z",
                        re.IGNORECASE | re.DOTALL)


def input_problem(line: str, size: int | None = None) -> str | None:
    """Why `line` (`size` characters long when only its start was kept) is refused before it
    is read as a command or a message, or None."""
    n = len(line.rstrip("\r\n")) if size is None else size
    if n > MAX_INPUT_CHARS:
        return (f"that line is {n:,} characters; the chat takes at most {MAX_INPUT_CHARS:,} "
                f"per line (notes and reasons are a few sentences): shorten it and send it again")
    return None


def free_text_command(line: str) -> tuple[str, str] | None:
    """(command, text) for `/note TEXT` or `/reject TEXT` with TEXT exactly as typed (surrounding
    spaces trimmed); None for any other line."""
    m = _FREE_TEXT.match(line)
    if m is None:
        return None
    return m.group(1).lower(), (m.group(2) or "").strip()
