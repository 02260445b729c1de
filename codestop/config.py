"""How one question is generated: every knob outside the stopping policy, in one validated value.

:class:`GenerationConfig` is built from CLI flags (:func:`add_generation_options` /
:meth:`GenerationConfig.from_args`), from a proxy request's ``codestop`` field
(:meth:`GenerationConfig.with_options`) and from a run file (:meth:`GenerationConfig.from_dict`),
and written into every run's config (:meth:`GenerationConfig.to_dict`). It validates once, at
construction, with errors that name the field, so no later code re-checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from codestop.families import FAMILIES
from codestop.steps import StepRules

DEFAULT_BOUNDARIES = ("\n\n", "Wait", "But wait", "Alternatively")
ANSWER_MODES = ("boxed", "free", "none")
PROBE_MODES = ("overlapped", "sequential")


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _require(ok: bool, name: str, value: object, must: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {value!r} {must}")


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
        _require(t is None or (_number(t) and t >= 0), "temperature", t, "must be a number >= 0")
        _require(p is None or (_number(p) and 0 < p <= 1), "top_p", p, "must be in (0, 1]")
        _require(k is None or (_integer(k) and k >= 0), "top_k", k, "must be an integer >= 0 (0 = off)")
        _require(s is None or _integer(s), "seed", s, "must be an integer")

    def merged(self, defaults: Sampling) -> Sampling:
        """Fill the unset fields from ``defaults`` (the model's generation config)."""
        return Sampling(*(a if a is not None else b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(defaults))))

    def greedy(self) -> Sampling:
        return Sampling(temperature=0.0, seed=self.seed)


def _flag(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation knob of one question (the policy is separate: :mod:`codestop.policies`)."""

    max_new_tokens: int = field(default=32768, metadata=_flag("most reasoning tokens; the thinking is closed there"))
    probe_interval: int = field(default=32, metadata=_flag("least reasoning tokens between two probes"))
    boundaries: tuple[str, ...] = field(
        default=DEFAULT_BOUNDARIES,
        metadata=_flag('step boundaries, comma-separated, e.g. "\\n\\n,Wait": whitespace-only ones end a step '
                       "after them, words before them (default: blank line, Wait, But wait, Alternatively)"),
    )
    temperature: float | None = field(default=None, metadata=_flag("reasoning temperature (default: the model's)"))
    top_p: float | None = field(default=None, metadata=_flag("reasoning top-p (default: the model's)"))
    top_k: int | None = field(default=None, metadata=_flag("reasoning top-k (default: the model's)"))
    seed: int | None = field(default=None, metadata=_flag("sampling seed"))
    family: str | None = field(default=None, metadata=_flag(f"model family (default: detected): {', '.join(FAMILIES)}"))
    enable_thinking: bool | None = field(default=None, metadata=_flag("Qwen3's thinking switch (default: on)"))
    answer: str = field(
        default="boxed",
        metadata=_flag('how the answer is had after a stop: "boxed" (the paper: close the thinking, force '
                       '"The final answer is \\boxed{", read the box), "free" (close the thinking and let the model '
                       'answer in its own words), "none" (end the output at the stop)'),
    )
    probe_mode: str = field(
        default="overlapped",
        metadata=_flag('"overlapped": on a completions server the reasoning streams on past a boundary while its '
                       'probe runs as a separate request (what is generated past the stop is counted as overrun); '
                       '"sequential": the reasoning waits for each probe (what replay\'s cost model assumes). '
                       "In-process engines always probe sequentially"),
    )
    # not flags: an OpenAI request's own fields (the proxy), and what the verbs set
    max_tokens: int | None = None  # hard cap on completion tokens: reasoning + answer (probes apart)
    stop: tuple[str, ...] = ()  # a client's stop strings: end the visible output, not included
    # not flags: set by the verbs that need them
    always_probe: bool = False  # probe at every boundary (probe_interval apart) even when the policy needs none: recording
    live_text: bool = False  # the text is shown as it comes: server engines stream each step token by token

    def __post_init__(self) -> None:
        _require(_integer(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        _require(_integer(self.probe_interval) and self.probe_interval >= 0, "probe_interval", self.probe_interval, "must be an integer >= 0")
        b = self.boundaries
        if isinstance(b, list):
            b = tuple(b)
            object.__setattr__(self, "boundaries", b)
        _require(
            isinstance(b, tuple) and len(b) > 0 and all(isinstance(x, str) and x for x in b),
            "boundaries", b, 'must be a non-empty list of non-empty strings, e.g. ["\\n\\n", "Wait"]',
        )
        Sampling(self.temperature, self.top_p, self.top_k, self.seed)  # validates those four
        _require(self.family is None or self.family in FAMILIES, "family", self.family, f"must be one of {', '.join(FAMILIES)}")
        _require(self.answer in ANSWER_MODES, "answer", self.answer, f"must be one of {', '.join(ANSWER_MODES)}")
        _require(self.probe_mode in PROBE_MODES, "probe_mode", self.probe_mode, f"must be one of {', '.join(PROBE_MODES)}")
        _require(self.max_tokens is None or (_integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens", self.max_tokens, "must be an integer >= 1")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        _require(all(isinstance(x, str) and x for x in self.stop), "stop", self.stop, "must be a string or a list of non-empty strings")
        for name in ("enable_thinking",):
            v = getattr(self, name)
            _require(v is None or isinstance(v, bool), name, v, "must be true or false")
        for name in ("always_probe", "live_text"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")

    # -- what engines and the controller read ------------------------------------------------
    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_p, self.top_k, self.seed)

    @property
    def separators(self) -> tuple[str, ...]:
        return tuple(s for s in self.boundaries if not s.strip())

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(s for s in self.boundaries if s.strip())

    def step_rules(self, stop_texts: tuple[str, ...] = (), probing: bool = True) -> StepRules:
        """The reasoning's step rules; with ``probing`` off a step runs to the end (no boundary)."""
        if not probing:
            return StepRules(stop_texts=stop_texts)
        return StepRules(self.separators, self.words, stop_texts)

    # -- building and writing -----------------------------------------------------------------
    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["boundaries"] = list(self.boundaries)
        d["stop"] = list(self.stop)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> GenerationConfig:
        """From a run file's ``generation`` (or any mapping of field names): unknown keys are
        errors naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}{unknown[0]}: unknown generation option; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def with_options(self, options: Mapping[str, Any], prefix: str = "") -> GenerationConfig:
        """This config with ``options`` (field names, JSON values) applied, validated; an error
        names the field with ``prefix`` (e.g. "codestop.")."""
        try:
            return dataclasses.replace(self, **dict(options))
        except TypeError as err:
            raise ValueError(f"{prefix}{err}") from None
        except ValueError as err:
            raise ValueError(f"{prefix}{err}") from None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed: Any) -> GenerationConfig:
        """From the flags :func:`add_generation_options` added (unset flags keep the defaults)."""
        values: dict[str, Any] = {}
        for f in cli_fields():
            v = getattr(args, f.name, None)
            if v is not None:
                values[f.name] = v
        return cls(**{**values, **fixed})


def cli_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(GenerationConfig) if "help" in f.metadata]


def parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_boundaries(text: str) -> tuple[str, ...]:
    """``"\\n\\n,Wait"`` (escapes allowed) to ``("\\n\\n", "Wait")``."""
    return tuple(b.encode().decode("unicode_escape") for b in text.split(","))


_FLAG_TYPES: dict[str, Any] = {
    "max_new_tokens": int, "probe_interval": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
    "family": str, "enable_thinking": parse_bool, "boundaries": parse_boundaries, "answer": str,
    "probe_mode": str,
}


def add_generation_options(parser: argparse.ArgumentParser, **defaults: Any) -> None:
    """One flag per CLI field of :class:`GenerationConfig` (``max_new_tokens`` -> ``--max-new-tokens``);
    ``defaults`` overrides the config's defaults for this verb (shown in the help)."""
    g = parser.add_argument_group("generation")
    for f in cli_fields():
        default = defaults.get(f.name)
        help_text = f.metadata["help"]
        if default is None and f.default is not None and not isinstance(f.default, tuple) and f.name != "answer":
            help_text += f" (default {f.default})"
        elif default is not None:
            help_text += f" (default here {default})"
        kwargs: dict[str, Any] = {"type": _FLAG_TYPES[f.name], "default": default, "help": help_text}
        if f.name == "enable_thinking":
            kwargs["metavar"] = "{true,false}"
        if f.name == "probe_mode":
            kwargs["choices"] = PROBE_MODES
        g.add_argument("--" + f.name.replace("_", "-"), **kwargs)
