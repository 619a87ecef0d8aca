"""Who a commit is by and what it says: an author or committer (`Identity`), and its `message`."""

from __future__ import annotations

import re
from dataclasses import dataclass

_IDENTITY = re.compile(r"^(?P<name>[^<>\n]*[^<>\s]) *<(?P<email>[^<>\s]+)>$")
_MAX_REASON = 2000
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@dataclass(frozen=True, slots=True)
class Identity:
    """An author or committer: `Name <email>`."""

    name: str
    email: str

    @classmethod
    def parse(cls, text: str) -> Identity:
        """`Name <email>`; ValueError for anything git would not take as one."""
        match = _IDENTITY.match(text.strip())
        if match is None:
            raise ValueError(f"not an identity of the form `Name <email>`: {text!r}")
        return cls(match["name"].strip(), match["email"])

    @classmethod
    def client(cls, name: str) -> Identity:
        """The author of a write by the API client `name` (docs/reference.md §8)."""
        return cls(name, f"{name}@clients.switchboard.invalid")

    def line(self, when: int) -> str:
        return f"{self.name} <{self.email}> {when} +0000"

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


def message(subject: str, reason: str | None, client: str) -> str:
    """A commit message: the subject, the reason (the request's X-Switchboard-Reason) as the body,
    and a `Switchboard-Client` trailer."""
    parts = [subject.strip()]
    # One paragraph of text: a header's bytes that are not UTF-8 come as lone surrogates, which
    # no commit can hold; control characters (and line breaks) become spaces.
    text = _UNPRINTABLE.sub(" ", _SURROGATE.sub("\ufffd", reason or ""))
    text = " ".join(text.split())[:_MAX_REASON]
    if text:
        parts.append(text)
    parts.append(f"Switchboard-Client: {client}")
    return "\n\n".join(parts) + "\n"
