"""What the proxy serves with, besides its engine: :class:`ServeOptions`, checked once where it is
made, and written as JSON values for ``codestop serve --workers N`` to hand to each worker process."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, cast

from codestop.config import GenerationConfig
from codestop.engines.server.routing import Routing
from codestop.errors import is_integer, is_number, require
from codestop.policy_file import PolicyFile
from codestop.serve.defaults import (
    DEFAULT_AUTO_AUDIT_FRACTION,
    DEFAULT_CONFIG,
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_SEGMENTS,
    DEFAULT_POLICY,
)
from codestop.serve.serving import Defaults, server_defaults


@dataclass(frozen=True)
class ServeOptions:
    """The proxy's server-wide settings (:func:`codestop.serve.app.create_app`).

    ``config`` and ``policy`` (a method and its knobs, as in a request's ``codestop`` field, or a
    :class:`~codestop.policy_file.PolicyFile`, whose guarantee ``/health`` states; options given
    as a mapping make an uncalibrated policy, the method defaulting to the proxy's) are what every
    request starts from. A chat answer after a stop follows ``config.answer`` (the proxy's default:
    "free", the model's own words), a raw completion just ends there, a request's
    ``codestop.answer`` overrides both.

    ``proxy_api_key``: with one, only ``/health``'s bare status is public: its details,
    ``/metrics`` and ``/v1`` ask for the key, and the API docs are off. ``close_engine``: the app
    closes its engine at shutdown (False: a shared engine). ``max_request_bytes``: a larger request
    body is a 413. ``served_model_name`` (one name or several, as vLLM's ``--served-model-name``)
    is what ``/v1/models`` lists and requests may name, responses carrying the one asked for (the
    first when none is); default: the engine's model name.

    ``shadow`` (a file): shadow mode (:mod:`codestop.serve.shadow`): a share ``shadow_fraction`` of
    the requests is answered as the upstream alone would (no stop, nothing appended) while codestop
    probes beside the stream, appends one trace per request to the file (no prompt or reasoning
    text unless ``shadow_text``) and counts in ``/metrics`` what the request's policy would have
    done.

    The guard (:mod:`codestop.serve.guard`): ``audit_fraction`` (a share of the requests served
    under the policy audited after their answer; default none, or ``DEFAULT_AUTO_AUDIT_FRACTION``
    in auto mode) feeds a watch of the risk ``changed`` at the policy file's guarantee (its
    ``max_risk``, else ``max_risk``; its ``alpha``, else ``alpha``; ``watch_alpha`` over both), which
    reverts the segment to answering as the upstream alone on an alarm. ``auto``: auto mode (shadow
    first, calibrated at ``max_risk`` and ``alpha`` on the traces collected, served, audited,
    watched). ``state_dir``: where the state lives (SQLite; required for auto mode, which resumes
    from it; else in memory). ``max_segments``: the most segment tags with a state of their own.

    Behind a router (:mod:`codestop.engines.server.routing`, docs/serving.md): ``router`` (one of
    vllm-router, sglang, llm-d, dynamo, production-stack) and ``routing_key_header`` (header names)
    put one key, unique to a client request (the client's own session header or ``user`` where it
    sends one), on every upstream request that request makes, so a router keeps them on one replica.

    Every value is checked here, when the options are made (a bad one is a ParameterError naming
    it, before any model loads); ``defaults`` is what the checks built."""

    config: GenerationConfig = DEFAULT_CONFIG
    policy: Mapping[str, Any] | PolicyFile = field(default_factory=lambda: dict(DEFAULT_POLICY))
    proxy_api_key: str | None = None
    close_engine: bool = True
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    served_model_name: str | Sequence[str] | None = None
    shadow: str | os.PathLike[str] | None = None
    shadow_fraction: float = 1.0
    shadow_text: bool = False
    audit_fraction: float | None = None
    watch_alpha: float | None = None
    auto: bool = False
    max_risk: float | None = None
    alpha: float | None = None
    state_dir: str | os.PathLike[str] | None = None
    max_segments: int = DEFAULT_MAX_SEGMENTS
    routing_key_header: str | Sequence[str] = ()
    router: str | None = None
    defaults: Defaults = field(init=False, repr=False, compare=False)
    routing: Routing = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        require(isinstance(self.config, GenerationConfig), "config", self.config, "must be a GenerationConfig")
        policy = self.policy
        if not isinstance(policy, PolicyFile):
            require(isinstance(policy, Mapping), "policy", policy, "must be a mapping of a method and its knobs, or a PolicyFile")
            policy = PolicyFile({"method": DEFAULT_POLICY["method"], **policy})
        object.__setattr__(self, "policy", policy)
        require(self.proxy_api_key is None or isinstance(self.proxy_api_key, str), "proxy_api_key", "...",
                "must be a string or None")  # never echoed
        require(isinstance(self.close_engine, bool), "close_engine", self.close_engine, "must be true or false")
        require(is_integer(self.max_request_bytes) and self.max_request_bytes >= 1, "max_request_bytes",
                self.max_request_bytes, "must be an integer >= 1")
        require(self.shadow is None or isinstance(self.shadow, (str, os.PathLike)), "shadow", self.shadow,
                "must be a file path or None")
        require(is_number(self.shadow_fraction) and 0 < self.shadow_fraction <= 1, "shadow_fraction",
                self.shadow_fraction, "must be a number in (0, 1]")
        require(isinstance(self.shadow_text, bool), "shadow_text", self.shadow_text, "must be true or false")
        self._check_guard(policy)
        names = self.routing_key_header
        require(isinstance(names, (str, list, tuple)), "routing_key_header", names, "must be a header name or a list of them")
        names = (names,) if isinstance(names, str) else tuple(names)
        object.__setattr__(self, "routing_key_header", names)
        object.__setattr__(self, "routing", Routing.of(self.router, names))
        # the default policy built once, the names checked: a bad default fails here, not per request
        object.__setattr__(self, "defaults", server_defaults(self.config, policy.policy, self.served_model_name))

    def _check_guard(self, policy: PolicyFile) -> None:
        def fraction(name: str) -> None:
            value = getattr(self, name)
            require(value is None or (is_number(value) and 0 < value < 1), name, value, "must be a number strictly between 0 and 1")

        require(self.audit_fraction is None or (is_number(self.audit_fraction) and 0 <= self.audit_fraction <= 1),
                "audit_fraction", self.audit_fraction, "must be a number in [0, 1]")
        for name in ("watch_alpha", "max_risk", "alpha"):
            fraction(name)
        require(isinstance(self.auto, bool), "auto", self.auto, "must be true or false")
        require(self.state_dir is None or isinstance(self.state_dir, (str, os.PathLike)), "state_dir", self.state_dir,
                "must be a directory path or None")
        require(is_integer(self.max_segments) and self.max_segments >= 1, "max_segments", self.max_segments,
                "must be an integer >= 1")
        if self.auto:
            require(policy.path is None and policy.guarantee is None, "auto", self.auto,
                    "chooses and certifies its own policy: give no policy file with it")
            require(self.max_risk is not None, "max_risk", self.max_risk, "must be a fraction in auto mode (the risk level it certifies)")
            require(self.alpha is not None, "alpha", self.alpha, "must be a fraction in auto mode (the error level of the whole run)")
            require(self.state_dir is not None, "state_dir", self.state_dir,
                    "must be a directory in auto mode (its traces, policy and watch live there and survive a restart)")
        elif self.audits > 0:
            g = policy.guarantee or {}
            require(g.get("max_risk", self.max_risk) is not None and (self.watch_alpha or g.get("alpha", self.alpha)) is not None,
                    "audit_fraction", self.audit_fraction, "watches a stated risk: give a calibrated policy file (its guarantee's "
                    "max_risk and alpha), or max_risk and alpha (or watch_alpha)")

    @property
    def audits(self) -> float:
        """The share of requests served under the policy that is audited (0: none)."""
        if self.audit_fraction is not None:
            return float(self.audit_fraction)
        return DEFAULT_AUTO_AUDIT_FRACTION if self.auto else 0.0

    @property
    def guarded(self) -> bool:
        """Whether the guard is on: auto mode, or audits of the policy file's policy."""
        return self.auto or self.audits > 0

    @property
    def watch_level(self) -> tuple[float, float]:
        """(max_risk, alpha) the watch tests a policy file's policy at: its guarantee's, where not given."""
        g = self.policy_file.guarantee or {}
        max_risk = g.get("max_risk", self.max_risk)
        alpha = self.watch_alpha or g.get("alpha", self.alpha)
        assert max_risk is not None and alpha is not None  # checked in __post_init__
        return float(max_risk), float(alpha)

    @property
    def policy_file(self) -> PolicyFile:
        return cast(PolicyFile, self.policy)  # made one in __post_init__

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON values (:meth:`from_dict` reads them back): what a worker process is given."""
        values: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(config=self.config.to_dict(), shadow=None if self.shadow is None else os.fspath(self.shadow),
                      state_dir=None if self.state_dir is None else os.fspath(self.state_dir),
                      routing_key_header=list(self.routing_key_header),
                      policy={"policy": self.policy_file.policy, "guarantee": self.policy_file.guarantee,
                              "path": self.policy_file.path})
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ServeOptions:
        return cls(**{**values, "config": GenerationConfig.from_dict(values["config"]), "policy": PolicyFile(**values["policy"])})
