"""The llama.cpp engine: GGUF models in-process on llama-cpp-python's C API, the fast CPU path.

Why llama-cpp-python and not xllamacpp: a probe must leave the session as it was, and the cheap
way is KV rollback: decode the probe on the live context, then remove its positions from the KV
cache (``llama_memory_seq_rm``) and restore the logits saved before it. llama-cpp-python exposes
the C API (decode, logits, KV removal) one call each; xllamacpp exposes llama.cpp's server
(JSON completions with a prompt cache), so every step and every probe would be a request that
re-matches the prompt prefix and the reasoning's sampling would have to happen server-side. The
measured figures are in BENCHMARKS.md ("Engines").

Sessions: one llama context (its own KV cache) per live session, from a pool that grows on demand
and keeps closed contexts for reuse, so sessions never see each other's tokens and starting one
costs no allocation after the first. The model's weights are shared by all contexts. Calls are
serialised by the engine's lock (two cores run one decode at a time best anyway).

Threads default to the cores this process may use (``os.sched_getaffinity``).

Before a model is loaded, :mod:`codestop.engines.native_check` makes sure llama.cpp's fast CPU path
(extra buffer types: AMX tiles, repacked weights) runs on this host, once per build, CPU and model
file, in a child process: where it dies (SIGILL on some AMX virtual machines) the model is loaded
without it and one line says so. ``CODESTOP_LLAMACPP_EXTRA_BUFTS=1`` / ``0`` decides without the check.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from codestop.engines import native_check
from codestop.engines.local import LocalBackend, LocalEngine
from codestop.errors import CodestopError, ContextTooLong
from codestop.sampling import Sampling

DEFAULT_MAX_CONTEXT = 16384  # the KV cache is allocated whole per session: cap the default window
BATCH = 512

_log_lock = threading.Lock()
_recent_errors: collections.deque[str] = collections.deque(maxlen=8)
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def _lib() -> Any:
    """The llama_cpp module, with llama.cpp's log routed to us (errors kept for our messages,
    everything printed only under CODESTOP_DEBUG)."""
    global _log_callback
    # llama.cpp's CPU threads meet at an OpenMP barrier after every op; spinning there (libgomp's
    # default) collapses decoding ~10x as soon as another process shares the cores (measured: 0.6
    # vs 8.8 tok/s on 2 busy cores), while on idle cores it is ~20% faster than sleeping (24-27 vs
    # 21 tok/s, 0.5B preset). So spin only when the load average says the cores are free. Read by
    # libgomp when llama_cpp loads it, so set before the import; a user's setting wins.
    busy = os.getloadavg()[0] > 0.5 * default_threads() if hasattr(os, "getloadavg") else True
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE" if busy else "ACTIVE")
    try:
        import llama_cpp
    except ImportError:
        raise CodestopError(
            "engine: the llamacpp engine needs llama-cpp-python; pip install llama-cpp-python "
            "(or use --engine transformers)"
        ) from None
    if _log_callback is None:

        @llama_cpp.llama_log_callback
        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            line = text.decode("utf-8", errors="replace") if text else ""
            if level == 3 and line.strip():  # GGML_LOG_LEVEL_ERROR
                with _log_lock:
                    _recent_errors.append(line.strip())
            if os.environ.get("CODESTOP_DEBUG"):
                print(line, end="", file=__import__("sys").stderr)

        _log_callback = on_log
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(LocalBackend):
    """One llama context: its KV cache and the next-token logits."""

    def __init__(self, engine: LlamaCppEngine, ctx: Any) -> None:
        self.engine = engine
        self.ctx = ctx
        self.memory = engine.lib.llama_get_memory(ctx)
        self._n = 0
        self._logits: np.ndarray | None = None
        self._batch = engine.lib.llama_batch_init(BATCH, 0, 1)

    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def can_crop(self) -> bool:
        return self.engine.can_crop

    def feed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        lib, batch = self.engine.lib, self._batch
        if self._n + len(ids) > self.engine.context_window:
            raise ContextTooLong(
                f"the context would grow to {self._n + len(ids)} tokens, past the model's window of "
                f"{self.engine.context_window}; shorten the question or lower max_reasoning_tokens"
            )
        for start in range(0, len(ids), BATCH):
            chunk = ids[start : start + BATCH]
            batch.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = self._n + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            batch.logits[len(chunk) - 1] = True
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                # 1: no KV slot (the context is full); others: an internal failure
                raise ContextTooLong(
                    f"llama.cpp could not decode at position {self._n} (code {rc}); the context window is "
                    f"{self.engine.context_window} tokens"
                ) if rc == 1 else CodestopError(f"llama.cpp: decode failed with code {rc}")
            self._n += len(chunk)
        ptr = lib.llama_get_logits_ith(self.ctx, -1)
        self._logits = np.ctypeslib.as_array(ptr, shape=(self.engine.n_vocab,)).copy()

    def crop(self, n_tokens: int) -> None:
        if n_tokens > self._n or n_tokens < 0:
            raise ValueError(f"n_tokens: {n_tokens} is outside the context (0..{self._n})")
        if n_tokens == self._n:
            return
        if not self.engine.lib.llama_memory_seq_rm(self.memory, 0, n_tokens, -1):
            raise CodestopError("llama.cpp: this model's cache cannot be rolled back partially")
        self._n = n_tokens  # the logits stay (stale) until feed/set_logits, as base.py documents

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits: feed tokens first")
        return self._logits

    def set_logits(self, logits: np.ndarray) -> None:
        self._logits = logits

    def snapshot(self) -> Any:
        if self.can_crop:
            return super().snapshot()
        # recurrent / hybrid models: their state cannot be cut back, so copy it whole
        lib = self.engine.lib
        size = lib.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self.ctx, buf, size, 0)
        return ("state", self._n, buf, written, np.array(self.logits(), copy=True))

    def restore(self, snap: Any) -> None:
        if not (isinstance(snap, tuple) and snap and snap[0] == "state"):
            super().restore(snap)
            return
        _, n, buf, written, logits = snap
        lib = self.engine.lib
        lib.llama_memory_seq_rm(self.memory, 0, -1, -1)
        if lib.llama_state_seq_set_data(self.ctx, buf, written, 0) == 0:
            raise CodestopError("llama.cpp: could not restore the session state after a probe")
        self._n, self._logits = n, logits

    def reset(self) -> None:
        self.engine.lib.llama_memory_clear(self.memory, True)
        self._n, self._logits = 0, None

    def close(self) -> None:
        self.engine.release_context(self)


class LlamaCppEngine(LocalEngine):
    name = "llamacpp"
    context_window: int  # always known here (set in __init__), unlike Engine's int | None

    def __init__(self, path: str, *, model_name: str = "", threads: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__()
        lib = self.lib = _lib()
        if threads is not None and threads < 1:
            raise ValueError(f"threads: {threads!r} must be >= 1")
        if n_ctx is not None and n_ctx < 16:
            raise ValueError(f"n_ctx: {n_ctx!r} must be >= 16")
        self.path = str(path)
        self.model_name = model_name or Path(path).name
        self.threads = threads or default_threads()
        _check_gguf_file(Path(path))
        # before the fast path can kill this process: does it run here? (a child finds out, once)
        self.native = native_check.choose(lib, self.path, self.threads)
        self.n_ubatch = self.native.n_ubatch or BATCH
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        if self.native.extra_bufts is not None:
            params.use_extra_bufts = self.native.extra_bufts
        with _log_lock:
            _recent_errors.clear()
        self.model = lib.llama_model_load_from_file(self.path.encode("utf-8"), params)
        if not self.model:
            with _log_lock:
                detail = next((e for e in reversed(_recent_errors)), "")
            raise CodestopError(
                f"model: llama.cpp could not load {self.path!r}{f' ({detail})' if detail else ''}; the file is "
                "truncated, corrupted or of an architecture this llama.cpp does not know"
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        train_ctx = int(lib.llama_model_n_ctx_train(self.model)) or DEFAULT_MAX_CONTEXT
        self.context_window = n_ctx or min(train_ctx, DEFAULT_MAX_CONTEXT)
        self.can_crop = not (lib.llama_model_is_recurrent(self.model) or lib.llama_model_is_hybrid(self.model))
        self.metadata = self._read_metadata()
        self._eos = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self.vocab, t))
        bos = int(lib.llama_vocab_bos(self.vocab))
        self._bos = bos if bos >= 0 and lib.llama_vocab_get_add_bos(self.vocab) else None
        self._idle: list[LlamaCppBackend] = []
        self._contexts: list[Any] = []
        self._template: Any = None

    @property
    def build_info(self) -> str:
        """This llama.cpp build: its version and the CPU kernels compiled in. Greedy tokens can
        differ between builds (pip compiles llama-cpp-python for the CPU it builds on, and AVX2 and
        AVX-512 kernels round differently), so a figure is only reproducible on the same build."""
        info = self.lib.llama_print_system_info().decode(errors="replace")
        features = [f.split(":")[-1].split("=")[0].strip() for f in info.split("|") if f.strip().endswith("= 1")]
        path = "" if self.native.name == "fast" else f", without the fast path ({self.native.name})"
        return f"llama-cpp-python {getattr(self.lib, '__version__', '?')}, CPU kernels: {' '.join(features)}{path}"

    @classmethod
    def load(cls, path: str, *, model_name: str = "", threads: int | None = None, n_ctx: int | None = None) -> LlamaCppEngine:
        return cls(path, model_name=model_name, threads=threads, n_ctx=n_ctx)

    # -- contexts ---------------------------------------------------------------------------
    def _new_context(self) -> Any:
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.context_window
        params.n_batch = BATCH
        params.n_ubatch = self.n_ubatch
        params.n_seq_max = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise CodestopError(
                f"llama.cpp could not create a {self.context_window}-token context for {self.model_name!r} "
                "(out of memory?); close other sessions or pass a smaller n_ctx"
            )
        self._contexts.append(ctx)
        return ctx

    def new_backend(self, prompt_ids: Sequence[int]) -> LlamaCppBackend:
        backend = self._idle.pop() if self._idle else LlamaCppBackend(self, self._new_context())
        try:
            backend.feed(prompt_ids)
        except BaseException:
            backend.reset()
            self._idle.append(backend)
            raise
        return backend

    def release_context(self, backend: LlamaCppBackend) -> None:
        """A closed session's context goes back to the pool, emptied (called under the engine's
        lock, by the session's close)."""
        if backend in self._idle:
            return
        backend.reset()
        self._idle.append(backend)

    @property
    def live_sessions(self) -> int:
        return len(self._contexts) - len(self._idle)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        lib = self.lib
        with self._lock:
            for backend in self._idle:
                lib.llama_batch_free(backend._batch)
            for ctx in self._contexts:
                lib.llama_free(ctx)
            self._idle, self._contexts = [], []
            if self.model:
                lib.llama_model_free(self.model)
                self.model = None

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 16
        buf = (self.lib.llama_token * size)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, False, True)
        if n < 0:
            size = -n
            buf = (self.lib.llama_token * size)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, size, False, True)
        return list(buf[:n])

    def detokenize(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        arr = (self.lib.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 64
        buf = ctypes.create_string_buffer(size)
        n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, True)
        if n < 0:
            size = -n + 1
            buf = ctypes.create_string_buffer(size)
            n = self.lib.llama_detokenize(self.vocab, arr, len(ids), buf, size, False, True)
        # a character split across tokens is dropped until its last byte arrives
        return buf.raw[:n].decode("utf-8", errors="ignore")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    def _token_text(self, token: int) -> str:
        return self.detokenize([token]) if 0 <= token < self.n_vocab else ""

    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        source = self.metadata.get("tokenizer.chat_template", "")
        if not source:
            return "\n\n".join(m["content"] for m in messages) + "\n\n"
        if self._template is None:
            self._template = _compile_template(source)
        eos = self.lib.llama_vocab_eos(self.vocab)
        bos = self.lib.llama_vocab_bos(self.vocab)
        return self._template.render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self._token_text(bos),
            eos_token=self._token_text(eos),
            **template_kwargs,
        )

    def default_sampling(self) -> Sampling:
        """Sampling keys a GGUF may carry (general.sampling.*); greedy when it has none."""
        meta = self.metadata
        temp = meta.get("general.sampling.temp")
        if temp is None:
            return Sampling(temperature=0.0)
        top_p = meta.get("general.sampling.top_p")
        top_k = meta.get("general.sampling.top_k")
        return Sampling(
            temperature=float(temp),
            top_p=float(top_p) if top_p is not None else None,
            top_k=int(top_k) if top_k is not None else None,
        )

    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "model_type": self.metadata.get("general.architecture", ""),
            "chat_template": self.metadata.get("tokenizer.chat_template", ""),
            "gguf_name": self.metadata.get("general.name", ""),
        }

    def _read_metadata(self) -> dict[str, str]:
        lib, out = self.lib, {}
        key_buf = ctypes.create_string_buffer(256)
        for i in range(lib.llama_model_meta_count(self.model)):
            n = lib.llama_model_meta_key_by_index(self.model, i, key_buf, len(key_buf))
            if n < 0:
                continue
            key = key_buf.value.decode("utf-8", errors="replace")
            size = lib.llama_model_meta_val_str_by_index(self.model, i, None, 0)
            if size < 0:
                continue
            val_buf = ctypes.create_string_buffer(size + 1)
            lib.llama_model_meta_val_str_by_index(self.model, i, val_buf, size + 1)
            out[key] = val_buf.value.decode("utf-8", errors="replace")
        return out


def _check_gguf_file(path: Path) -> None:
    """A readable file that starts with the GGUF magic; anything else gets a message, not a crash."""
    if not path.is_file():
        raise CodestopError(f"model: {str(path)!r} is not a file; give a .gguf file")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise CodestopError(
                f"model: {str(path)!r} is not a GGUF file (no GGUF magic bytes at its start); "
                "give a .gguf file, or a Hugging Face directory with --engine transformers"
            )


def _compile_template(source: str) -> Any:
    """The chat template as transformers renders it: jinja2's immutable sandbox, trimmed blocks,
    loop controls, tojson, raise_exception and strftime_now."""
    import json

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise CodestopError(f"chat template: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as err:
        raise CodestopError(f"chat template: the GGUF's template does not compile ({err})") from None
