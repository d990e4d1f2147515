"""Redaction of secrets (API keys, bearer tokens) from text before it is printed, logged or saved."""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "<redacted>"
# Shapes a key takes in server error bodies and pasted configs: never shown, whatever the field.
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;})\]]+")
_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_KEY_FIELD = re.compile(r"(?i)((?:api[_-]?key|x-api-key|authorization)['\"]?\s*[:=]\s*['\"]?)"
                        r"(?!bearer\b)[^\s'\",;})\]]+")
# A long run of letters and digits with no spaces, mixing both: how keys and tokens look.
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-.+/=]{24,}")


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every given secret value, `Bearer <token>`, `sk-...` tokens and
    `api_key=...` / `Authorization: ...` values replaced by <redacted>."""
    for secret in secrets:
        # Very short values ("x", "EMPTY" for local servers) are placeholders, not keys, and
        # replacing them everywhere would garble the message.
        if secret and len(secret) >= 6 and secret != "EMPTY":
            text = text.replace(secret, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _SK_TOKEN.sub(REDACTED, text)
    return _KEY_FIELD.sub(lambda m: m.group(1) + REDACTED, text)


def looks_secret(value: object) -> bool:
    """True for a string that may be a key: a shape `redact` hides, or a long token mixing
    letters and digits (values like that are not echoed back in error messages)."""
    if not isinstance(value, str):
        return False
    if redact(value) != value:
        return True
    return any(re.search(r"[A-Za-z]", m) and re.search(r"[0-9]", m)
               for m in _TOKEN_LIKE.findall(value))
