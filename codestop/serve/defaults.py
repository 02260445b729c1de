"""The proxy's server-wide defaults, importable without the serve extra (FastAPI, pydantic): the
command line shows them in its help."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from codestop.config import GenerationConfig

DEFAULT_ANSWER = "free"  # a chat answer after a stop: the model's own words (a raw completion: "none")
DEFAULT_CONFIG = GenerationConfig(answer=DEFAULT_ANSWER)
DEFAULT_POLICY: Mapping[str, Any] = {"method": "codestop"}
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20  # the largest request body, by default (8 MiB)
DEFAULT_AUTO_AUDIT_FRACTION = 0.1  # --auto without --audit-fraction: the share of served requests audited
DEFAULT_MAX_SEGMENTS = 16  # segment tags with a state (and metric labels) of their own; later ones share MODEL/other
