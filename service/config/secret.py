"""Secrets as a type: decrypted keys whose str/repr are always masked.

A `Secret` holds a decrypted value; `Sealed` holds a SOPS ciphertext as it sits in git.
Neither prints its content: logging, tracebacks and f-strings all see the mask.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, NoReturn

SOPS_VALUE = re.compile(
    r"^ENC\[AES256_GCM,data:[A-Za-z0-9+/=]*,iv:[A-Za-z0-9+/=]+,tag:[A-Za-z0-9+/=]+,type:\w+\]$"
)
"""A value encrypted by sops, as it appears in a file."""
SOPS_STRING = ",type:str]"
"""How a value sops encrypted as a string ends; a secret is one (docs/reference.md §2.4)."""
NOT_A_STRING = 'must be a string: quote it (`api_key: "0123…"`) and encrypt the file again'
"""Why a secret sops encrypted as a number or a boolean (written unquoted) is refused."""

_MIN_SHOWN_LENGTH = 12
MASK = "****"
"""What a masked value begins with (no key does)."""


def mask(value: str) -> str:
    """`****` and the last four characters, or `****` alone for a value under 12 characters."""
    if len(value) < _MIN_SHOWN_LENGTH:
        return MASK
    return MASK + value[-4:]


def unsendable(value: str) -> bool:
    """Whether a key holds a control character (a line break, a NUL...): no HTTP header can carry it."""
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


class Secret:
    """A decrypted secret. Only `reveal()` gives the value; everything else sees the mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The plaintext: call only where it is sent to an upstream or to a `secrets:read` client."""
        return self._value

    @property
    def masked(self) -> str:
        return mask(self._value)

    def __repr__(self) -> str:
        return f"Secret({self.masked!r})"

    def __str__(self) -> str:
        return self.masked

    def __format__(self, spec: str) -> str:
        return format(self.masked, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


class Sealed:
    """A secret still encrypted, as read from git without a key: equal when the ciphertext is."""

    __slots__ = ("ciphertext",)

    def __init__(self, ciphertext: str) -> None:
        self.ciphertext = ciphertext

    @property
    def masked(self) -> str:
        return "****"

    def __repr__(self) -> str:
        return "Sealed(****)"

    def __str__(self) -> str:
        return "****"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sealed) and other.ciphertext == self.ciphertext

    def __hash__(self) -> int:
        return hash(("Sealed", self.ciphertext))

    def __deepcopy__(self, memo: dict[int, Any]) -> Sealed:
        return self
