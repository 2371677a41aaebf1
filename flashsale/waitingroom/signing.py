"""Signed strings of the waiting room, each verified in-process with one HMAC.

- ticket: proves an entry ("<sale>.<user>.<kind><position>.<entered ms>.<mac>"); the same
  entry always signs to the same ticket, so entering twice returns the same one.
- join token: an admission, bound to user and sale, valid until its window ends
  ("<expires ms>.<mac>"); it is also the hidden path segment of the shopper's join URL.
- challenge: a proof-of-work puzzle bound to user and sale; a solution is a string whose
  SHA-256 with the challenge starts with ``difficulty`` zero bits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from flashsale.settings import hkdf_sha256
from flashsale.timing import CHALLENGE_MAX_AGE_MS

KEY_LABEL: Final = b"flashsale/waiting-room/v1"
MAC_BYTES: Final = 16
MAX_SIGNED_LEN: Final = 200
# tickets whose signature was checked, kept per worker: a waiting crowd polls the same
# ticket every few seconds, and a check costs an HMAC (3 µs of a 45 µs poll); 100k
# tickets of ~60 characters keep about 15 MB
TICKETS_KEPT: Final = 100_000
MAX_SOLUTION_LEN: Final = 64


@dataclass(frozen=True, slots=True)
class Ticket:
    sale_id: int
    user_id: int
    kind: str  # "L": entered before the draw (lottery), "F": after it (first come)
    position: int  # 0 for a lottery entrant: its place is the rank of its draw
    entered_ms: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        return bits + 8 - byte.bit_length()
    return bits


def solve(challenge: str, difficulty: int) -> str:
    """A solution of ``challenge`` (what a shopper's page does; tests and Locust use it)."""
    n = 0
    while True:
        candidate = format(n, "x")
        if proof_ok(challenge, candidate, difficulty):
            return candidate
        n += 1


def proof_ok(challenge: str, solution: str, difficulty: int) -> bool:
    digest = hashlib.sha256(f"{challenge}:{solution}".encode()).digest()
    return leading_zero_bits(digest) >= difficulty


class Signer:
    """Signs and checks the waiting room's strings with a key derived from the secret key."""

    def __init__(self, secret: str) -> None:
        self._key = hkdf_sha256(secret.encode(), KEY_LABEL)
        self._tickets: dict[str, Ticket] = {}

    def _mac(self, purpose: str, body: str) -> str:
        return _b64(
            hmac.new(self._key, f"{purpose}|{body}".encode(), "sha256").digest()[:MAC_BYTES]
        )

    def _split(self, purpose: str, signed: str, parts: int) -> list[str] | None:
        # a client's string: anything but ASCII (which hmac cannot even compare) is not ours
        if len(signed) > MAX_SIGNED_LEN or not signed.isascii():
            return None
        body, dot, mac = signed.rpartition(".")
        if not dot or not hmac.compare_digest(mac, self._mac(purpose, body)):
            return None
        fields = body.split(".")
        return fields if len(fields) == parts else None

    def ticket(self, t: Ticket) -> str:
        body = f"{t.sale_id}.{t.user_id}.{t.kind}{t.position}.{t.entered_ms}"
        return f"{body}.{self._mac('t', body)}"

    def read_ticket(self, signed: str) -> Ticket | None:
        ticket = self._tickets.get(signed)
        if ticket is not None:
            return ticket
        f = self._split("t", signed, 4)
        if f is None or len(f[2]) < 2:
            return None
        ticket = Ticket(int(f[0]), int(f[1]), f[2][0], int(f[2][1:]), int(f[3]))
        if len(self._tickets) >= TICKETS_KEPT:
            self._tickets.clear()
        self._tickets[signed] = ticket
        return ticket

    def join_token(self, sale_id: int, user_id: int, expires_ms: int) -> str:
        return f"{expires_ms}.{self._mac('j', f'{sale_id}.{user_id}.{expires_ms}')}"

    def join_token_expiry(self, token: str, sale_id: int, user_id: int) -> int | None:
        """The token's expiry (ms) if it was signed for this user and sale, else None."""
        exp, dot, mac = token.partition(".")
        if not dot or not token.isascii() or not exp.isdigit() or len(exp) > 15:
            return None
        if not hmac.compare_digest(mac, self._mac("j", f"{sale_id}.{user_id}.{exp}")):
            return None
        return int(exp)

    def challenge(self, sale_id: int, user_id: int, issued_ms: int, difficulty: int) -> str:
        body = f"{sale_id}.{user_id}.{issued_ms}.{difficulty}"
        return f"{body}.{self._mac('c', body)}"

    def proof_valid(
        self,
        challenge: str,
        solution: str,
        *,
        sale_id: int,
        user_id: int,
        now_ms: int,
        difficulty: int,
    ) -> bool:
        """The challenge is ours, for this user and sale, fresh, at least as hard as the
        sale asks now, and ``solution`` solves it."""
        f = self._split("c", challenge, 4)
        if f is None or len(solution) > MAX_SOLUTION_LEN or not solution.isascii():
            return False
        if (int(f[0]), int(f[1])) != (sale_id, user_id):
            return False
        if not 0 <= now_ms - int(f[2]) <= CHALLENGE_MAX_AGE_MS:
            return False
        return int(f[3]) >= difficulty and proof_ok(challenge, solution, int(f[3]))
