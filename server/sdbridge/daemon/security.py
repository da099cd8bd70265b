"""Who may talk to the daemon: loopback by default, a secret token for anything wider.

The token travels as the password of the ZMTP PLAIN mechanism (RFC 24) and the daemon checks it
in its own ZAP handler (daemon.py). It is a password, not encryption: docs/security.md says how
to tunnel over SSH when the network is not trusted.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ..wire.protocol import TOKEN_ENV
from ..wire.zmtp import parse_address

log = logging.getLogger(__name__)

# Long enough that guessing over the network is hopeless, short enough for PLAIN (255 bytes).
MIN_TOKEN_BYTES = 16
MAX_TOKEN_BYTES = 255


class TokenError(ValueError):
    """No usable token where one is needed; the message tells the operator what to do."""


def is_loopback(address: str) -> bool:
    """True if a ZeroMQ bind address can only be reached from this machine.

    A host name counts only if every address it resolves to is a loopback address; wildcards
    (`*`) and interface names count as reachable from the network.
    """
    scheme = address.partition("://")[0]
    if scheme in ("ipc", "inproc"):
        return True
    try:
        host, _ = parse_address(address.replace("://*:", "://0.0.0.0:"))
    except ValueError:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass  # a host name: decide by what it resolves to
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # an interface name, or nothing: libzmq may still bind it, so not "local"
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def read_token(token_file: str | None, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The token from ``token_file`` (surrounding whitespace stripped) or ``$SDBRIDGE_TOKEN``.

    None when neither is set. Raises `TokenError` for an unreadable file or an unfit token.
    """
    environ = os.environ if environ is None else environ
    if token_file:
        path = Path(token_file).expanduser()
        try:
            token = path.read_bytes().strip()
            mode = path.stat().st_mode
        except OSError as exc:
            raise TokenError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the token file %s is readable by other users: chmod 600 it", path)
        source = f"the token file {path}"
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip().encode()
        source = f"${TOKEN_ENV}"
    else:
        return None
    if not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
        raise TokenError(
            f"the token in {source} is {len(token)} bytes; it must be {MIN_TOKEN_BYTES}.."
            f"{MAX_TOKEN_BYTES}. Make one with: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'"
        )
    return token


def check_listen(address: str, token: bytes | None) -> None:
    """Refuse to serve beyond loopback without a token."""
    if token is None and not is_loopback(address):
        raise TokenError(
            f"refusing to listen on {address} without a token: anyone who can reach that "
            f"address could use the daemon. Put a secret in a file (chmod 600) and pass "
            f"--token-file FILE, or set {TOKEN_ENV}; clients then need the same token "
            "(see docs/security.md). Or listen on loopback (tcp://127.0.0.1:PORT) and tunnel."
        )


class LoginGuard:
    """Wrong tokens from one address: a few are let through, then every login attempt from that
    address is refused until the window has passed, so guessing runs at a handful a minute
    instead of ~1,300 a second. Refusals are logged once per address and window, not one line
    each, so that a guesser cannot fill the operator's disk."""

    def __init__(
        self,
        failures_allowed: int = 5,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures_allowed = failures_allowed
        self.window_s = window_s
        self._clock = clock
        # address -> (when its window began, refusals in it)
        self._refusals: dict[str, tuple[float, int]] = {}

    def locked_out(self, address: str) -> bool:
        """True while ``address`` has used up its wrong tokens for this window."""
        self._expire()
        _, count = self._refusals.get(address, (0.0, 0))
        return count >= self.failures_allowed

    def refused(self, address: str) -> None:
        """Count a refused login (wrong token, or one attempted while locked out)."""
        self._expire()
        began, count = self._refusals.get(address, (self._clock(), 0))
        self._refusals[address] = (began, count + 1)
        if count == 0:
            log.warning("refused a peer from %s: wrong or missing token", address)
        elif count + 1 == self.failures_allowed:
            log.warning(
                "refused %d logins from %s: refusing every login from it for %g s",
                count + 1,
                address,
                self.window_s,
            )

    def _expire(self) -> None:
        now = self._clock()
        for address, (began, count) in list(self._refusals.items()):
            if now - began >= self.window_s:
                del self._refusals[address]
                if count > self.failures_allowed:
                    log.warning("refused %d logins from %s in %g s", count, address, self.window_s)
