"""The one redaction of secrets (API keys, Basic/Bearer credentials, credentials in URLs) applied
to every text MOSAIC prints or writes: terminal output, atomic file writes, the audit log, the
checkpoint database and the replies endpoints send back (a key echoed in a 200 reply included).

Secrets are known two ways. Shapes are recognised anywhere (`Bearer x`, `Basic x`, `sk-...`,
`api_key=x`, `https://user:pass@host`, `?token=x`). Values are registered when a config is
loaded (`register_config_secrets`): the key in every configured `api_key_env` variable, at any
length, with its base64 and masked (`abcd...wxyz`) forms, and the credentials in base URLs.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

REDACTED = "<redacted>"
URL_MASK = "***"  # inside URLs (`<`/`>` are not URL characters; `mosaic config` shows this)
# Shapes a key takes in server error bodies and pasted configs: never shown, whatever the field.
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?!<redacted>)[^\s'\",;})\]]+")
# `Basic <base64 of user:password>`; "basic" is an everyday word, so only a token that decodes
# to text holding a colon counts (see _basic).
_BASIC = re.compile(r"(?i)\b(basic)\s+([A-Za-z0-9+/_\-]{4,}={0,2})")
_SK_TOKEN = re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}")
_KEY_FIELD = re.compile(r"(?i)((?:api[_-]?key|x-api-key|authorization)['\"]?\s*[:=]\s*['\"]?)"
                        r"(?!bearer\b|basic\b|<redacted>|\*\*\*)[^\s'\",;})\]]+")
# scheme://user:pass@host (or scheme://token@host): the userinfo goes.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#@'\"<>]+@")
# Query parameters that carry credentials, in a URL or a form body.
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:api[_-]?key|key|token|access[_-]?token|auth|"
                           r"password|passwd|pwd|secret|sig|signature|code)=)[^&#\s'\"<>]+")
# A long run of letters and digits with no spaces, mixing both: how keys and tokens look.
_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-.+/=]{24,}")
# Masks that servers and UIs print for a key: its first and last few characters around dots,
# an ellipsis or stars ("sk-t...T123", "sk-t****T123").
_MASK_RUN = r"(?:\.{2,}|\u2026|\*{2,}|x{4,})"
# Placeholders local servers accept in place of a key: not secrets, and replacing them
# everywhere would garble text.
_PLACEHOLDERS = {"", "EMPTY", "none", "None", "null", "x", "-", URL_MASK}

_lock = threading.Lock()
_registered: set[str] = set()


def _variants(secret: str) -> set[str]:
    """`secret` and its base64 forms (standard and URL-safe, padded or not)."""
    out = {secret}
    raw = secret.encode("utf-8")
    for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = enc.decode("ascii")
        out.update({text, text.rstrip("=")})
    return out


def register_secrets(values: Iterable[str | None]) -> None:
    """Hide these values (and their base64 and masked forms) in every later `redact` call in
    this process, whoever calls it."""
    with _lock:
        for value in values:
            if value and value not in _PLACEHOLDERS:
                _registered.add(value)


def registered_secrets() -> frozenset[str]:
    with _lock:
        return frozenset(_registered)


def url_secrets(url: str | None) -> list[str]:
    """The credentials a URL carries: its password (as is and as `user:password`) or a bare
    token in the user's place, and the values of credential query parameters."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    out: list[str] = []
    if parts.username or parts.password:
        # The user name alone is not a secret (and hiding "admin" everywhere would garble
        # text); the password, or a bare token in the user's place, is.
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        raw = parts.netloc.rsplit("@", 1)[0]
        out += [password, f"{user}:{password}", raw] if parts.password else [user, raw]
    for name, value in parse_qsl(parts.query, keep_blank_values=False):
        if _QUERY_SECRET.match(f"?{name}=x"):
            out.append(value)
    return [v for v in out if v and v not in _PLACEHOLDERS]


def register_config_secrets(config: Any) -> None:
    """Register the secrets a loaded config points at: the value of every `api_key_env` (and
    OPENAI_API_KEY, the SDK's default) and the credentials in every endpoint's base URL."""
    names = {"OPENAI_API_KEY"}
    values: list[str] = []
    for endpoint in _endpoints(config):
        names.add(endpoint.api_key_env)
        values += url_secrets(endpoint.base_url)
    values += [os.environ.get(name) or "" for name in sorted(names)]
    register_secrets(values)


def _endpoints(config: Any) -> list[Any]:
    guard = getattr(config.judge, "guard", None)
    found = [config.inference.endpoint, config.judge.endpoint, config.planner.endpoint,
             config.chat.endpoint, guard.fallback_endpoint if guard is not None else None]
    return [e for e in found if e is not None]


def redact_url(url: str | None) -> str | None:
    """`url` with its userinfo and credential query values shown as ***."""
    if url is None:
        return None
    url = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{URL_MASK}@", url)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + URL_MASK, url)


def _replace_value(text: str, secret: str) -> str:
    if len(secret) < 8:
        # A short key is replaced only where it stands alone (not inside a longer word), so a
        # three-letter key does not garble every word that happens to contain it.
        return re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, text)
    return text.replace(secret, REDACTED)


def _replace_masked(text: str, secret: str) -> str:
    if len(secret) < 8:
        return text  # a mask of a short key shows most of it; the key itself is caught above
    head, tail = re.escape(secret[:4]), re.escape(secret[-4:])
    return re.sub(rf"{head}[^\s'\"]{{0,12}}?{_MASK_RUN}[^\s'\"]{{0,12}}?{tail}", REDACTED, text)


def _basic(m: re.Match[str]) -> str:
    token = m.group(2)
    try:
        decoded = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                   validate=True).decode("utf-8")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return m.group(0)
    return f"{m.group(1)} {REDACTED}" if ":" in decoded else m.group(0)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every registered or given secret value (raw, base64, masked), `Bearer`/
    `Basic` credentials, `sk-...` tokens, `api_key=...` / `Authorization: ...` values and
    URL credentials replaced by <redacted> (*** inside a URL)."""
    if not text:
        return text
    values = set(registered_secrets())
    values.update(s for s in secrets if s and s not in _PLACEHOLDERS)
    # Longest first: a key that contains another registered value is replaced whole.
    for secret in sorted({v for s in values for v in _variants(s)}, key=len, reverse=True):
        text = _replace_value(text, secret)
    for secret in values:
        text = _replace_masked(text, secret)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{URL_MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: m.group(1) + URL_MASK, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _BASIC.sub(_basic, text)
    text = _SK_TOKEN.sub(REDACTED, text)
    return _KEY_FIELD.sub(lambda m: m.group(1) + REDACTED, text)


def redact_data(value: Any) -> Any:
    """A copy of a JSON-shaped value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_data(k): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(v) for v in value)
    return value


def looks_secret(value: object) -> bool:
    """True for a string that may be a key: a shape `redact` hides, or a long token mixing
    letters and digits (values like that are not echoed back in error messages)."""
    if not isinstance(value, str):
        return False
    if redact(value) != value:
        return True
    return any(re.search(r"[A-Za-z]", m) and re.search(r"[0-9]", m)
               for m in _TOKEN_LIKE.findall(value))


class RedactingStream:
    """A text stream that redacts each write before passing it on (stdout and stderr of the
    `mosaic` command). Everything else (isatty, fileno, encoding) is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    @property
    def encoding(self) -> str:
        return getattr(self._stream, "encoding", None) or "utf-8"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install_stream_redaction() -> None:
    """Wrap sys.stdout and sys.stderr (once) so nothing printed carries a secret: MOSAIC's own
    messages, library warnings and log lines alike."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))


def _redact_state(value: Any) -> Any:
    """`redact_data` for checkpoint values: JSON-shaped parts are redacted, other objects (a
    checkpoint's own records) pass through as they are."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_state(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_redact_state(v) for v in value)
    fields = getattr(type(value), "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_copy"):
        # A pydantic record in the state (a planner conversation's messages): its fields.
        update = {}
        for name in fields:
            old = getattr(value, name, None)
            new = _redact_state(old)
            if new is not old and new != old:
                update[name] = new
        return value.model_copy(update=update) if update else value
    return value


class RedactingSerde:
    """Wraps a LangGraph checkpoint serializer so that no state it saves carries a secret (a
    note typed in chat, a planner's rationale): strings are redacted before they are encoded.
    Everything else is the wrapped serializer's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return self._inner.dumps_typed(_redact_state(obj))

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self._inner.loads_typed(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
