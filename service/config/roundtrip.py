"""Editing a YAML file a person wrote, keeping what they wrote: comments, order, quotes, indentation.

`keygen`, `rotate` and `token create` change one value of `.sops.yaml` or of the clients
file; everything else must come out as it went in, or every run would turn into a diff in
a pull request (and lose the notes people leave there). ruamel.yaml's round trip carries
comments and quotes; the indentation is guessed from the file and used again.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

__all__ = ["CommentedMap", "CommentedSeq", "Document", "YAMLError"]


class Document:
    """One YAML file loaded for editing: `data` (ruamel's round-trip tree), then `dump()`."""

    def __init__(self, text: str | None) -> None:
        self._yaml = YAML()  # round trip
        self._yaml.preserve_quotes = True
        self._yaml.width = 4096  # never fold a long line (a list of recipients)
        self.data: Any = CommentedMap()
        if not text or not text.strip():
            return
        # Raises YAMLError. `indent` is where a sequence's items start, `block_seq_indent`
        # where its dashes are; a mapping inside an item is indented by their difference.
        _, indent, block_seq_indent = load_yaml_guess_indent(text)
        offset = block_seq_indent or 0
        sequence = indent or 2
        self._yaml.indent(mapping=max(sequence - offset, 2), sequence=sequence, offset=offset)
        loaded = self._yaml.load(text)  # by this instance, so that it keeps the quotes it reads
        if loaded is not None:
            self.data = loaded

    @classmethod
    def read(cls, path: Path) -> Document:
        """The file at `path`, or an empty document when there is none."""
        return cls(path.read_text(encoding="utf-8") if path.exists() else None)

    def dump(self) -> str:
        out = io.StringIO()
        self._yaml.dump(self.data, out)
        return out.getvalue()


def append(sequence: CommentedSeq, value: Any) -> None:
    """Append `value` after the last item, before the comment lines that followed that item.

    ruamel keeps the comment lines after a sequence with its last item's end-of-line comment;
    a plain append would put the new item below them, under the next section's heading.
    """
    sequence.append(value)
    last = len(sequence) - 2
    entry = sequence.ca.items.get(last)
    if last < 0 or not entry or entry[0] is None:
        return
    token = entry[0]
    own, newline, following = token.value.partition("\n")
    if not following:
        return
    token.value = own + newline
    moved = copy.copy(token)
    moved.value = "\n" + following
    sequence.ca.items[last + 1] = [moved, None, None, None]
