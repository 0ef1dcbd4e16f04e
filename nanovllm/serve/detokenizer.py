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


class StopStrings:
    """Cuts a growing text at the first of some stop strings (OpenAI's ``stop``), the stop string left out.

    :meth:`feed` returns the text that is safe to show: text that could still turn out to begin a stop string
    (a suffix equal to a stop string's start) is held back until more text decides it.

    Args:
        stops: the stop strings, each non-empty.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""  # everything fed
        self.shown = 0  # characters of ``text`` returned so far
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add ``delta``; return the new text to show (all of the rest when ``final``). Sets ``stopped`` when a
        stop string appeared; the text after it is never shown."""
        if self.stopped:
            return ""
        self.text += delta
        # a match starts at or after ``shown``: text that could begin a stop string is never shown
        hits = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            self.stopped = True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out = self.text[self.shown:end]
        self.shown = max(self.shown, end)
        return out

    def _held(self) -> int:
        """The length of the longest unshown suffix of the text that is a proper prefix of a stop string.

        Only suffixes shorter than the stop string and starting at or after ``shown`` are tried, longest first, so
        the work per call grows with the unshown text, not with the stop strings' lengths."""
        text, best = self.text, 0
        for s in self.stops:
            for i in range(max(self.shown, len(text) - len(s) + 1), len(text) - best):
                if text[i] == s[0] and s.startswith(text[i:]):
                    best = len(text) - i
                    break
        return best
