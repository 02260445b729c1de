"""Model resolution: what ``--model`` names, and which engine loads it.

``--model`` takes a preset name (``qwen2.5-coder-0.5b``, see :mod:`codestop.presets`), a GGUF file,
a local Hugging Face directory, or a hub id. The engine follows from the format unless ``--engine``
says otherwise: a GGUF goes to llama.cpp when its binding is installed (else to transformers,
which dequantizes it once and caches the result); a directory or hub id goes to transformers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from codestop.engines.base import Engine, check_options
from codestop.errors import CodestopError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # see DEFAULT_MODEL_WHY
DEFAULT_MODEL_WHY = (
    "the 0.5B's demo (~8,500 generated tokens) fits 5 minutes at its quiet 2-core speed and makes the point: its check "
    "talks it out of right answers (12 problems: vanilla 50% at 307 tokens, CoDE-Stop 75% at 197); the 1.5B "
    "decodes ~1.8x slower (same problem, same load: 84 s vs 46 s), so the same demo would take ~7-8 minutes"
)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``kind`` gguf (a file), hf-dir (a local directory) or hub (an id)."""

    kind: Literal["gguf", "hf-dir", "hub"]
    location: str
    name: str  # what the user asked for (a preset name, a path, a hub id)


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def resolve_model(model: str, *, allow_download: bool = True) -> ModelSource:
    """Say what ``model`` is; a preset is joined/verified here (once; reused afterwards)."""
    from codestop.presets import PRESETS, get_preset, preset_path

    if not model or not str(model).strip():
        raise CodestopError(
            "model: no model given; pass --model with a preset name "
            f"({', '.join(PRESETS)}), a .gguf file, a local directory or a hub id"
        )
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and any(path.glob("*.gguf")):
            ggufs = sorted(str(p) for p in path.glob("*.gguf"))
            raise CodestopError(f"model: {model!r} is a directory of GGUF files; pass one of them: {', '.join(ggufs[:4])}")
        return ModelSource("hf-dir", str(path), model)
    if path.is_file():
        if not is_gguf(path):
            raise CodestopError(
                f"model: {model!r} is not a GGUF file (it does not start with the GGUF magic bytes); "
                "give a .gguf file, a model directory, a preset name or a hub id"
            )
        return ModelSource("gguf", str(path), model)
    preset = get_preset(model)
    if preset is not None:
        return ModelSource("gguf", str(preset_path(preset, allow_download=allow_download)), preset.name)
    if model.startswith((".", "/", "~")) or model.endswith(".gguf"):
        raise CodestopError(f"model: {model!r} does not exist; give an existing .gguf file or directory, a preset name or a hub id")
    return ModelSource("hub", model, model)


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def pick_engine(source: ModelSource, engine: str | None) -> str:
    """The engine for ``source``: ``engine`` when given (checked), else from the format."""
    if engine is None:
        if source.kind == "gguf":
            return "llamacpp" if llamacpp_available() else "transformers"
        return "transformers"
    if engine not in ENGINES:
        raise CodestopError(f"engine: unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "llamacpp" and source.kind != "gguf":
        raise CodestopError(
            f"engine: llamacpp runs GGUF files and {source.name!r} is not one; use --engine transformers "
            "or give a .gguf file or preset"
        )
    return engine


def _load_llamacpp(source: ModelSource, **options: Any) -> Engine:
    from codestop.engines.llamacpp import LlamaCppEngine

    check_options("llamacpp", options, ("threads", "n_ctx"))
    return LlamaCppEngine.load(source.location, model_name=source.name, **options)


def _load_transformers(source: ModelSource, **options: Any) -> Engine:
    from codestop.engines.transformers import TransformersEngine

    check_options("transformers", options, ("dtype", "device", "trust_remote_code"))
    engine = TransformersEngine.load(
        source.location, gguf_file=source.location if source.kind == "gguf" else None, **options
    )
    engine.model_name = source.name
    return engine


# engine name -> loader(source, **options); another engine registers itself here
ENGINES: dict[str, Callable[..., Engine]] = {
    "llamacpp": _load_llamacpp,
    "transformers": _load_transformers,
}


def load_engine(model: str, *, engine: str | None = None, **options: Any) -> Engine:
    """Load ``model`` (a preset, .gguf file, local HF directory or hub id) on ``engine``.

    Options go to the engine, which names any it does not take in an error: dtype, device,
    trust_remote_code (transformers); threads, n_ctx (llama.cpp); base_url, tokenizer, wait and the
    :class:`~codestop.engines.server.ServerOptions` fields (server), where ``base_url`` is one URL
    or a list: two or more are replicas of one model behind one engine
    (:class:`~codestop.engines.replicas.ReplicaEngine`)."""
    if engine == "server" or (engine is None and options.get("base_url")):
        from codestop.engines.server import ServerEngine  # --model names one of the server's models;

        # the verbs' embedded default (a local preset) means "not given" here: the server's first model
        served = None if model in (None, "", DEFAULT_MODEL) else model
        urls = options.pop("base_url", None)
        if isinstance(urls, (list, tuple)):
            if len(urls) > 1:
                from codestop.engines.replicas import ReplicaEngine

                return ReplicaEngine.connect(urls, model=served, **options)
            urls = urls[0] if urls else None
        return ServerEngine.connect(urls, model=served, **options)
    if engine is not None and engine not in ENGINES:
        raise CodestopError(f"engine: unknown engine {engine!r}; choose one of {', '.join([*ENGINES, 'server'])}")
    source = resolve_model(model)
    chosen = pick_engine(source, engine)
    if chosen == "llamacpp" and not llamacpp_available():
        raise CodestopError(
            "engine: the llamacpp engine needs llama-cpp-python; pip install llama-cpp-python "
            "(or use --engine transformers)"
        )
    return ENGINES[chosen](source, **{k: v for k, v in options.items() if v is not None})  # None: not given
