"""How one question is generated: every knob outside the stopping policy, in one validated value.

:class:`GenerationConfig` is built from CLI flags (:mod:`codestop.cli.options`), from a proxy request's ``codestop`` field
(:meth:`GenerationConfig.with_options`) and from a run file (:meth:`GenerationConfig.from_dict`),
and written into every run's config (:meth:`GenerationConfig.to_dict`). It validates once, at
construction, with errors that name the field, so no later code re-checks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from codestop.errors import ParameterError, is_integer, require
from codestop.families import FAMILIES
from codestop.sampling import Sampling
from codestop.steps import StepRules

DEFAULT_BOUNDARIES = ("\n\n", "Wait", "But wait", "Alternatively")
ANSWER_MODES = ("boxed", "free", "none")
PROBE_MODES = ("overlapped", "sequential")
# names a field had before (docs/vocabulary.md): run files, traces and requests that use them still read
OLD_NAMES = {"max_new_tokens": "max_reasoning_tokens"}


def current_names(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every old field name replaced by its current one."""
    return {OLD_NAMES.get(k, k): v for k, v in options.items()}


def _flag(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


@dataclass(frozen=True)
class GenerationConfig:
    """Every generation knob of one question (the policy is separate: :mod:`codestop.policies`)."""

    max_reasoning_tokens: int = field(default=32768, metadata=_flag("most reasoning tokens; the thinking is closed there"))
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
    enable_thinking: bool | None = field(default=None, metadata=_flag("the template's thinking switch: Qwen3's, Nemotron's (default: on)"))
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
        n = self.max_reasoning_tokens
        require(is_integer(n) and n >= 1, "max_reasoning_tokens", n, "must be an integer >= 1")
        require(is_integer(self.probe_interval) and self.probe_interval >= 0, "probe_interval", self.probe_interval, "must be an integer >= 0")
        b = self.boundaries
        if isinstance(b, list):
            b = tuple(b)
            object.__setattr__(self, "boundaries", b)
        require(
            isinstance(b, tuple) and len(b) > 0 and all(isinstance(x, str) and x for x in b),
            "boundaries", b, 'must be a non-empty list of non-empty strings, e.g. ["\\n\\n", "Wait"]',
        )
        Sampling(self.temperature, self.top_p, self.top_k, self.seed)  # validates those four
        require(self.family is None or self.family in FAMILIES, "family", self.family, f"must be one of {', '.join(FAMILIES)}")
        require(self.answer in ANSWER_MODES, "answer", self.answer, f"must be one of {', '.join(ANSWER_MODES)}")
        require(self.probe_mode in PROBE_MODES, "probe_mode", self.probe_mode, f"must be one of {', '.join(PROBE_MODES)}")
        require(self.max_tokens is None or (is_integer(self.max_tokens) and self.max_tokens >= 1), "max_tokens", self.max_tokens, "must be an integer >= 1")
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        require(all(isinstance(x, str) and x for x in self.stop), "stop", self.stop, "must be a string or a list of non-empty strings")
        for name in ("enable_thinking",):
            v = getattr(self, name)
            require(v is None or isinstance(v, bool), name, v, "must be true or false")
        for name in ("always_probe", "live_text"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "must be true or false")

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
        data = current_names(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}{unknown[0]}: unknown generation option; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def with_options(self, options: Mapping[str, Any], prefix: str = "") -> GenerationConfig:
        """This config with ``options`` (field names, JSON values) applied, validated; an error
        names the field with ``prefix`` (e.g. "codestop.")."""
        options = current_names(options)
        known = {f.name for f in dataclasses.fields(self)}
        for name in options:
            require(name in known, prefix + str(name), options[name], "is not a generation option")
        try:
            return dataclasses.replace(self, **dict(options))
        except ParameterError as err:
            raise err.under(prefix) from None


def cli_fields() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(GenerationConfig) if "help" in f.metadata]
