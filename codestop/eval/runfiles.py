"""Run files: the JSON-lines output of ``codestop eval`` and ``codestop record``, resumable.

Every line carries the run's ``config`` (:func:`run_config`: model, engine, policy and its
options, generation options, prompt, codestop version); re-running the same command skips the ids
already there, a half-written last line is dropped (saying so) and redone, and a file whose config
differs is refused rather than mixed. ``--log-samples`` writes a second file beside it
(:func:`samples_path`, :class:`SampleLog`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codestop.config import GenerationConfig, current_names
from codestop.engines.base import Engine
from codestop.errors import CodestopError
from codestop.eval.prompts import PromptStyle, resolve_prompt
from codestop.jsonl import read_jsonl
from codestop.policies import Policy, policy_options
from codestop.version import __version__

RUN_SCHEMA = 1
# config keys that describe a line without defining the run: a resume may differ in them
INFORMATIONAL_KEYS = ("codestop_version",)


def current_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run config as this codestop writes it, from one written before a key was renamed: ``method``
    (the policy's options) is ``policy``, ``generation.max_new_tokens`` is ``max_reasoning_tokens``."""
    if "method" in config and "policy" not in config:
        config = {**{k: v for k, v in config.items() if k != "method"}, "policy": config["method"]}
    if isinstance(config.get("generation"), dict):
        config = {**config, "generation": current_names(config["generation"])}
    return config


def check_config(path: Path, records: Sequence[dict[str, Any]], config: dict[str, Any]) -> None:
    """Refuse to resume ``path`` when its lines were written under another config (the codestop
    version aside: each line records its own, and a fix release should not strand a long run)."""
    for n, rec in enumerate(records, start=1):
        theirs = rec.get("config")
        if theirs == config:
            continue
        if not isinstance(theirs, dict):
            raise CodestopError(f"out: {path} line {n} has no run config; it was not written by this command. Choose another --out")
        theirs = current_config(theirs)
        keys = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k) and k not in INFORMATIONAL_KEYS)
        if not keys:
            continue
        detail = "; ".join(f"{k}: file has {json.dumps(theirs.get(k))}, this run {json.dumps(config.get(k))}" for k in keys[:3])
        raise CodestopError(
            f"out: {path} holds a different run ({detail}); resume with the same options, or choose another --out"
        )


@dataclass
class RunFile:
    """An append-only JSON-lines output with resume: ``done`` holds the ids already written."""

    path: Path
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: dict[str, Any]) -> RunFile:
        p = Path(path).expanduser()
        records: list[dict[str, Any]] = []
        if p.exists():
            records = read_jsonl(p, repair=True)
            check_config(p, records, config)
        else:
            if p.parent and not p.parent.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
        return cls(p, config, records)

    @property
    def done(self) -> set[str]:
        return {str(r.get("id")) for r in self.records}

    def append(self, record: dict[str, Any]) -> None:
        record = {**record, "config": self.config}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(record)


def samples_path(out: str | os.PathLike[str]) -> Path:
    """Where ``--log-samples`` writes beside a run file: ``run.jsonl`` -> ``run.samples.jsonl``."""
    p = Path(out).expanduser()
    return p.with_name(p.name.removesuffix(".jsonl") + ".samples.jsonl")


@dataclass
class SampleLog:
    """The ``--log-samples`` file: one line per question, appended as it finishes; a question
    already logged (a resumed run) is not logged twice."""

    path: Path
    logged: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SampleLog:
        p = Path(path)
        logged = {str(r.get("id")) for r in read_jsonl(p, repair=True)} if p.exists() else set()
        return cls(p, logged)

    def append(self, sample: dict[str, Any]) -> None:
        if str(sample["id"]) in self.logged:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
            fh.flush()
        self.logged.add(str(sample["id"]))


def model_sha256(model: Engine | str) -> str | None:
    """The sha256 of a model that is a local file (hashed once per file version, see
    :func:`codestop.presets.cached_sha256`), a preset's published one (without joining it), else
    None (a hub id or a directory: nothing single to hash)."""
    if isinstance(model, Engine):
        return None
    from codestop.presets import cached_sha256, get_preset

    path = Path(model).expanduser()
    if path.is_file():
        return cached_sha256(path)
    preset = get_preset(model)
    return preset.sha256 if preset is not None else None


def run_config(
    kind: str, dataset: str, model: str, engine_name: str | None, policy: Policy, generation: GenerationConfig,
    prompt: PromptStyle | None = None, sha256: str | None = None, offset: int = 0, split: str | None = None,
) -> dict[str, Any]:
    """What defines a run (a resume must match it), and what produced it. ``offset`` and ``split``
    (a name for the questions chosen, e.g. "held-out") appear only when set, so older run files
    still resume."""
    chosen: dict[str, Any] = {"offset": offset} if offset else {}
    if split is not None:
        chosen["split"] = split
    return {
        **chosen,
        "kind": kind,
        "schema": RUN_SCHEMA,
        "dataset": dataset,
        "model": model,
        "model_sha256": sha256,
        "engine": engine_name,
        "policy": policy_options(policy),
        "generation": generation.to_dict(),
        "prompt": (prompt or resolve_prompt()).to_config(),
        "codestop_version": __version__,
    }
