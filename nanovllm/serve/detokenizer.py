"""Incremental detokenization: text deltas of a growing list of token ids whose concatenation is the full decode."""
from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"  # what a byte-level decode shows for the first bytes of a multi-byte character


class IncrementalDetokenizer:
    """Turns the token ids of one request, as they arrive, into new text.

    Each call decodes only a short window: the ids since the last emitted text (``read``) plus the ids of the
    emission before (from ``prefix``), for context, and emits what the window's text adds beyond its context.
    Text that ends in the replacement character (a multi-byte character cut between tokens) is held back until
    the next token completes it. :meth:`finish` decodes the whole list once and emits whatever makes the
    concatenation equal ``tokenizer.decode(ids, skip_special_tokens=True)``, the text ``LLM.generate`` returns.

    Args:
        tokenizer: a transformers tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids before this index are already emitted as text
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: list[int]) -> str:
        """Append ``new_ids`` and return the text they complete ("" while a character is incomplete)."""
        self.ids.extend(new_ids)
        context = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if window.endswith(_INCOMPLETE) or len(window) <= len(context) or not window.startswith(context):
            return ""
        delta = window[len(context):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The rest of the text: the full decode minus what was emitted (the full decode when the emitted text
        is not its prefix, which a byte-level tokenizer never causes)."""
        full = self._decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else full
        self.text = full
        return delta
