"""Model resolution: what ``--model`` names, and which engine loads it."""

from __future__ import annotations

from pathlib import Path

from codestop.engines.base import CodestopError, Engine

ENGINES = ("transformers",)
DEFAULT_MODEL = "qwen2.5-coder-0.5b"  # the embedded default (a preset; see the embedded-default issue)


def load_engine(
    model: str,
    *,
    engine: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Engine:
    """Load ``model`` (a hub id, a local HF directory or a .gguf file) on ``engine``."""
    if not model or not str(model).strip():
        raise CodestopError("model: no model given; pass --model with a hub id, a local directory or a .gguf file")
    chosen = engine or "transformers"
    if chosen not in ENGINES:
        raise CodestopError(f"engine: unknown engine {chosen!r}; choose one of {', '.join(ENGINES)}")
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.endswith(".gguf")
    if looks_local and not path.exists():
        raise CodestopError(f"model: {model!r} does not exist; give an existing directory or .gguf file, or a hub id")
    from codestop.engines.transformers import TransformersEngine

    return TransformersEngine.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
