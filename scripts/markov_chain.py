"""A first-order Markov chain over token ids, defined only by ``(seed, states, vocab_size)``: its tables, seeded
walks (training data and prompts), queries (state of a token, legal walks, entropy) and its ``markov.json``
description, from which ``benchmarks/check.py --prompts markov`` rebuilds a trained checkpoint's prompts.

Used by ``scripts/train_markov_checkpoint.py`` and ``benchmarks/harness/check_engine.py`` (with scripts/ on
``sys.path``).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

MARKOV_FILE: str = "markov.json"
TRANSITION_PROBS: tuple[float, ...] = (0.7, 0.2, 0.1)


@dataclass(frozen=True)
class MarkovChain:
    """A first-order Markov chain over ``states`` token ids of a ``vocab_size``-token vocabulary.

    Everything is derived from ``(seed, states, vocab_size)`` (and ``probs``, fixed to (0.7, 0.2, 0.1) by
    default) with a CPU ``torch.Generator``: ``tokens`` are ``states`` distinct ids, ``randperm(vocab_size)[:states]``;
    ``successors[i]`` are ``len(probs)`` distinct state indices (a state may be its own successor), the
    ``j``-th taken with probability ``probs[j]``.

    Attributes:
        seed: seed of the generator that draws the chain.
        states: number of states (distinct token ids), ``len(probs) <= states <= vocab_size``.
        vocab_size: the model's vocabulary size; every token id is in ``[0, vocab_size)``.
        probs: transition probabilities, sum 1, non-increasing (so ``successors[:, 0]`` is the most likely).
        tokens: int64 ``[states]``, the token id of each state (derived).
        successors: int64 ``[states, len(probs)]``, state indices of each state's successors (derived).

    Raises:
        ValueError: invalid sizes or probabilities.
    """

    seed: int
    states: int
    vocab_size: int
    probs: tuple[float, ...] = TRANSITION_PROBS
    tokens: torch.Tensor = field(init=False, repr=False, compare=False)
    successors: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        k = len(self.probs)
        if k < 1 or any(p <= 0 for p in self.probs) or abs(sum(self.probs) - 1.0) > 1e-6:
            raise ValueError(f"probs must be positive and sum to 1, got {self.probs}")
        if any(a < b for a, b in zip(self.probs, self.probs[1:])):
            raise ValueError(f"probs must be non-increasing, got {self.probs}")
        if not k <= self.states <= self.vocab_size:
            raise ValueError(f"need {k} <= states <= vocab_size, got states={self.states}, "
                             f"vocab_size={self.vocab_size}")
        g = torch.Generator().manual_seed(int(self.seed))
        tokens = torch.randperm(self.vocab_size, generator=g)[: self.states]
        succ = torch.randint(0, self.states, (self.states, k), generator=g)
        while True:  # redraw the rows with a repeated successor (few: P(repeat) ~ k^2 / (2 * states) per row)
            s, _ = succ.sort(dim=1)
            bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().flatten()
            if bad.numel() == 0:
                break
            succ[bad] = torch.randint(0, self.states, (bad.numel(), k), generator=g)
        object.__setattr__(self, "probs", tuple(float(p) for p in self.probs))
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "successors", succ)

    # ------------------------------------------------------------------------------------------- sampling
    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """Sample ``batch`` independent walks of ``length`` tokens.

        Args:
            batch: number of walks (>= 1).
            length: tokens per walk (>= 1); the first state is uniform over the states.
            generator: a CPU ``torch.Generator`` (advanced by the call).

        Returns:
            int64 CPU tensor ``[batch, length]`` of token ids.
        """
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be >= 1, got {batch}, {length}")
        thresholds = torch.tensor(self.probs, dtype=torch.float64).cumsum(0)[:-1]
        state = torch.randint(0, self.states, (batch,), generator=generator)
        u = torch.rand(batch, length - 1, generator=generator, dtype=torch.float64)
        choice = torch.bucketize(u, thresholds, right=True)  # [batch, length-1] in [0, len(probs))
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = state
        for t in range(1, length):
            state = self.successors[state, choice[:, t - 1]]
            out[:, t] = state
        return self.tokens[out]

    def prompts(self, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
        """``n`` walks with lengths uniform in ``[lo, hi]``, deterministic for ``seed``.

        Returns:
            ``n`` lists of token ids (the lengths are drawn first, then each walk, from one generator).
        """
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
        g = torch.Generator().manual_seed(int(seed))
        lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
        return [self.sample(1, k, g)[0].tolist() for k in lens]

    # ------------------------------------------------------------------------------------------- queries
    def state_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """State index of each token id (int64, same shape as ``token_ids``); -1 for ids that are not states."""
        lookup = torch.full((self.vocab_size,), -1, dtype=torch.long)
        lookup[self.tokens] = torch.arange(self.states)
        return lookup[token_ids.cpu().long()]

    def successor_tokens(self) -> torch.Tensor:
        """int64 ``[states, len(probs)]``: the successors' token ids, most likely first."""
        return self.tokens[self.successors]

    def is_legal_walk(self, token_ids: list[int]) -> bool:
        """True when every id is a state and every consecutive pair is a transition of the chain."""
        if not token_ids:
            return True
        st = self.state_of(torch.tensor(token_ids))
        if (st < 0).any():
            return False
        return bool((self.successors[st[:-1]] == st[1:, None]).any(dim=1).all())

    def fingerprint(self) -> str:
        """A short hash of the derived tables: detects a torch whose RNG draws a different chain from the seed."""
        import hashlib

        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(self.successors.numpy().tobytes())
        return h.hexdigest()[:16]

    def entropy(self) -> float:
        """Entropy of one transition in nats (the lowest reachable average loss per predicted token)."""
        return -sum(p * math.log(p) for p in self.probs)

    # ------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """The chain as a JSON-able dict (seed, states, vocab_size, probs, fingerprint)."""
        return {"seed": int(self.seed), "states": int(self.states), "vocab_size": int(self.vocab_size),
                "probs": list(self.probs), "fingerprint": self.fingerprint()}

    @classmethod
    def from_json(cls, src: str | os.PathLike[str] | Mapping[str, Any]) -> MarkovChain:
        """Rebuild a chain from :meth:`to_json`'s dict, a ``markov.json`` path, or a checkpoint folder holding one.

        Extra keys (e.g. the training metadata of ``markov.json``) are ignored.

        Raises:
            ValueError: the file is missing or not JSON, a key is missing or invalid, or the fingerprint does not
                match the rebuilt chain (this torch draws a different chain from the same seed); the message names
                the file.
        """
        where = "<dict>"
        if isinstance(src, Mapping):
            d: Any = src
        else:
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, MARKOV_FILE)
            where = path
            if not os.path.isfile(path):
                raise ValueError(f"{path}: no such file (a checkpoint from scripts/train_markov_checkpoint.py has "
                                 f"{MARKOV_FILE}; use --prompts random for other checkpoints)")
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from e
        if not isinstance(d, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        try:
            chain = cls(seed=int(d["seed"]), states=int(d["states"]), vocab_size=int(d["vocab_size"]),
                        probs=tuple(float(p) for p in d.get("probs", TRANSITION_PROBS)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a Markov chain description ({type(e).__name__}: {e})") from e
        fp = d.get("fingerprint")
        if fp is not None and fp != chain.fingerprint():
            raise ValueError(f"{where}: fingerprint {fp} != {chain.fingerprint()} of the chain rebuilt by torch "
                             f"{torch.__version__} (its RNG draws a different chain from seed {chain.seed})")
        return chain
