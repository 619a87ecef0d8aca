"""Changes made to a sops file without its identity that sops' MAC lets through.

sops' MAC hashes the file's values concatenated in order, with no separators, no key names
and no structure: bytes moved between adjacent values, or a key renamed, keep it valid. Each
tamper here is such a change of `provider_yaml`'s text, and applies as well to the plaintext
(as `switchboard edit` shows it) as to the encrypted file, so that the same change can be made
the legitimate way for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import SopsProject

URL = "https://llm.company.com/v1"


@dataclass(frozen=True)
class Tamper:
    """One change: `before` becomes `after` in the file's text; `url` is where the key goes then."""

    name: str
    before: str
    after: str
    url: str

    def apply(self, text: str) -> str:
        assert text.count(self.before) == 1, text
        return text.replace(self.before, self.after)


TAMPERS = (
    Tamper(  # the end of the host moves into the next value
        "trim a host into the next value",
        f"base_url: {URL}\nname: GPU box\n",
        'base_url: https://llm.com\nname: "pany.com/v1GPU box"\n',
        "https://llm.com",
    ),
    Tamper(  # the end of the previous value becomes the start of the URL
        "take bytes from the previous value",
        f"name: GPU box https://wiki.example/\nbase_url: {URL}\n",
        f"name: 'GPU box '\nbase_url: https://wiki.example/{URL}\n",
        f"https://wiki.example/{URL}",
    ),
    Tamper(  # a disabled provider turned on
        "rename a key",
        f"base_url: {URL}\nenabled: false\n",
        f"base_url: {URL}\nname: 'False'\n",
        URL,
    ),
)


def provider_yaml(provider_id: str, tamper: Tamper, key: str = "sk-vendor-5d80aaaa1111bbbb5d80") -> str:
    """An `ai_server` file holding a key, in plaintext, with `tamper.before` in its middle."""
    return (
        f"kind: ai_server\nid: {provider_id}\nserver_type: vllm\n{tamper.before}"
        f"api_key: {key}\npurposes: [embeddings]\n"
    )


def encrypted_vendor(project: SopsProject, tamper: Tamper) -> Path:
    """`providers.d/vendor.yaml` of `project`: `provider_yaml("vendor", tamper)` encrypted by sops."""
    path = project.providers / "vendor.yaml"
    path.write_text(provider_yaml("vendor", tamper))
    project.sops.encrypt_in_place(path)
    return path
