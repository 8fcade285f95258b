"""Who may steer sagas from the console: operators named in SAGA_WEB_OPERATORS.

An operator signs in with a password and gets a signed session cookie (SameSite=Strict,
HttpOnly). Every form that changes something carries the session's CSRF token, checked on
arrival, so another site cannot act in an operator's name. Reading needs no sign-in.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

from pydantic import SecretStr

_USER = "operator"
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
        """The operator this session belongs to, if they are still an operator."""
        name = session.get(_USER)
        return name if isinstance(name, str) and name in self._passwords else None


def sign_in(session: MutableMapping[str, Any], name: str) -> None:
    """Start a session for ``name``, with a new CSRF token (never one from before)."""
    session.clear()
    session[_USER] = name
    session[_CSRF] = secrets.token_urlsafe(32)


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
