"""How the reasoning is sampled: the one value every engine needs from the generation config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from codestop.errors import is_integer, is_number, require


@dataclass(frozen=True)
class Sampling:
    """Sampling for the reasoning itself. None means the model's own default (its generation
    config); temperature 0 means greedy."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k, s = self.temperature, self.top_p, self.top_k, self.seed
        require(t is None or (is_number(t) and t >= 0), "temperature", t, "must be a number >= 0")
        require(p is None or (is_number(p) and 0 < p <= 1), "top_p", p, "must be in (0, 1]")
        require(k is None or (is_integer(k) and k >= 0), "top_k", k, "must be an integer >= 0 (0 = off)")
        require(s is None or is_integer(s), "seed", s, "must be an integer")

    def merged(self, defaults: Sampling) -> Sampling:
        """Fill the unset fields from ``defaults`` (the model's generation config)."""
        return Sampling(*(a if a is not None else b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(defaults))))

    def greedy(self) -> Sampling:
        return Sampling(temperature=0.0, seed=self.seed)
