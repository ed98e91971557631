"""Who may read and who may write: the tokens of ``Authorization`` headers, checked in constant time.

Hand-written rather than a Starlette AuthenticationMiddleware: ccache sends its token as Basic
``user:token`` or Bearer, and the hot ccache path checks a token before routing (middleware.CcacheFastPath),
which needs a plain function of the header, not a request-scoped user object."""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field

from starlette.requests import Request


@dataclass
class AuthConfig:
    write_tokens: list[str] = field(default_factory=list)  # read and write
    read_tokens: list[str] = field(default_factory=list)  # read only
    anonymous_read: bool = True


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def presented_token(request: Request) -> str | None:
    """The token of the request's ``Authorization`` header (see token_of_header)."""
    return token_of_header(request.headers.get("authorization"))


def token_of_header(header: str | None) -> str | None:
    """The token of an ``Authorization`` header: ``Bearer <token>`` (ccache's ``bearer-token=``) or
    ``Basic base64(user:token)`` (ccache's ``http://user:token@host/``: the password is the token)."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Denied(401, "malformed Basic authorization header") from None
        _user, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise Denied(401, "unsupported Authorization header: use 'Bearer <token>' or Basic user:<token>")


def _matches(token: str, candidates: list[str]) -> bool:
    found = False
    for candidate in candidates:  # compare with all, in constant time each
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def has_valid_token(request: Request, auth: AuthConfig) -> bool:
    """Whether the request carries a valid read or write token (never raises)."""
    try:
        token = presented_token(request)
    except Denied:
        return False
    return token is not None and (_matches(token, auth.write_tokens) or _matches(token, auth.read_tokens))


def authorize(request: Request, auth: AuthConfig, write: bool) -> None:
    authorize_header(request.headers.get("authorization"), auth, write)


def authorize_header(header: str | None, auth: AuthConfig, write: bool) -> None:
    """Raises Denied unless the ``Authorization`` header (None: absent) may read (or write)."""
    token = token_of_header(header)
    if token is None:
        if write:
            raise Denied(401, "writing to the cache needs a token (Authorization: Bearer <token>)")
        if not auth.anonymous_read:
            raise Denied(401, "this cache needs a token for reads too (Authorization: Bearer <token>)")
        return
    if _matches(token, auth.write_tokens):
        return
    if _matches(token, auth.read_tokens):
        if write:
            raise Denied(403, "this token may only read")
        return
    raise Denied(401, "invalid token")


@dataclass(frozen=True)
class Access:
    """The one authorization dependency every handler is given: ``read``/``write`` raise Denied."""

    config: AuthConfig

    def read(self, request: Request) -> None:
        authorize(request, self.config, write=False)

    def write(self, request: Request) -> None:
        authorize(request, self.config, write=True)

    def trusted(self, request: Request) -> bool:
        return has_valid_token(request, self.config)
