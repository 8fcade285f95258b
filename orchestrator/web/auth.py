"""Who may steer sagas from the console: operators named in SAGA_WEB_OPERATORS.

An operator signs in with a password and gets a signed session cookie (SameSite=Strict,
HttpOnly). Every form that changes something carries the session's CSRF token, checked on
arrival, so another site cannot act in an operator's name. Reading needs no sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

from pydantic import SecretStr

_USER = "operator"
_KEY = "key"
_CSRF = "csrf"


class Operators:
    """The operators and their passwords, as the settings give them."""

    def __init__(self, passwords: Mapping[str, SecretStr]) -> None:
        self._passwords = {name: p.get_secret_value().encode() for name, p in passwords.items()}

    @property
    def configured(self) -> bool:
        """Whether anyone may sign in; without operators the console is read-only."""
        return bool(self._passwords)

    def check(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; as slow for an unknown name as a known one."""
        expected = self._passwords.get(name)
        given = password.encode()
        if expected is None:
            hmac.compare_digest(given, given)
            return False
        return hmac.compare_digest(given, expected)

    def signed_in(self, session: Mapping[str, Any]) -> str | None:
        """The operator this session belongs to, while they are an operator with the
        password they signed in with (a new password signs their sessions out)."""
        name = session.get(_USER)
        if not isinstance(name, str) or name not in self._passwords:
            return None
        given = session.get(_KEY)
        if not isinstance(given, str) or not hmac.compare_digest(given, self._key(name)):
            return None
        return name

    def sign_in(self, session: MutableMapping[str, Any], name: str) -> None:
        """Start a session for ``name``, with a new CSRF token (never one from before)."""
        session.clear()
        session[_USER] = name
        session[_KEY] = self._key(name)
        session[_CSRF] = secrets.token_urlsafe(32)

    def _key(self, name: str) -> str:
        """What a session keeps of the password: a keyed hash, never the password."""
        return hmac.new(self._passwords[name], name.encode(), hashlib.sha256).hexdigest()


def sign_out(session: MutableMapping[str, Any]) -> None:
    session.clear()


def csrf_token(session: MutableMapping[str, Any]) -> str:
    """This session's CSRF token, made on first use (the sign-in form needs one too)."""
    token = session.get(_CSRF)
    if not isinstance(token, str):
        token = session[_CSRF] = secrets.token_urlsafe(32)
    return token


def csrf_ok(session: Mapping[str, Any], given: object) -> bool:
    """Whether a form's token is this session's."""
    token = session.get(_CSRF)
    if not isinstance(token, str) or not isinstance(given, str):
        return False
    return hmac.compare_digest(token.encode(), given.encode())
