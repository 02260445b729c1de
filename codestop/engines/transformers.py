"""The transformers engine: any AutoModelForCausalLM, in-process, CPU or GPU.

One DynamicCache per session. A probe runs greedily on the live cache and is rolled back with
``crop`` (a slice of each layer's tensors: no copy, no recomputation); caches whose layers cannot be
cropped exactly (sliding-window, linear-attention, quantized layers) are deep-copied instead.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from codestop.engines.local import LocalBackend, LocalEngine
from codestop.engines.tokens import HFTokens
from codestop.errors import CodestopError
from codestop.sampling import Sampling

DTYPES = ("auto", "float32", "bfloat16", "float16")


def cache_dir() -> Path:
    """Where codestop keeps what it builds once (joined GGUFs, GGUFs converted for transformers)."""
    root = os.environ.get("CODESTOP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "codestop"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class _DeepCopy:
    n: int
    cache: Any
    logits: np.ndarray | None


class TransformersBackend(LocalBackend):
    def __init__(self, engine: TransformersEngine, prompt_ids: Sequence[int]) -> None:
        from transformers import DynamicCache

        self.engine = engine
        self.cache = DynamicCache(config=engine.model.config)
        self._n = 0
        self._logits: np.ndarray | None = None
        self.feed(prompt_ids)

    @property
    def n_tokens(self) -> int:
        return self._n

    @property
    def can_crop(self) -> bool:
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def feed(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        torch = self.engine.torch
        with torch.inference_mode():
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.engine.device)
            out = self.engine.model(input_ids=input_ids, use_cache=True, **{self.engine.cache_kwarg: self.cache}, **self.engine.last_logits_only)
        self._n += len(ids)
        self._logits = out.logits[0, -1].float().cpu().numpy()

    def crop(self, n_tokens: int) -> None:
        remove = self._n - n_tokens
        if remove < 0:
            raise ValueError(f"n_tokens: {n_tokens} is past the end of the context ({self._n})")
        if remove:
            self.cache.crop(-remove)
            self._n = n_tokens

    def snapshot(self) -> Any:
        if self.can_crop:
            return super().snapshot()
        return _DeepCopy(self._n, copy.deepcopy(self.cache), self._logits)

    def restore(self, snap: Any) -> None:
        if isinstance(snap, _DeepCopy):
            self._n, self.cache, self._logits = snap.n, snap.cache, snap.logits
        else:
            super().restore(snap)

    def logits(self) -> np.ndarray:
        assert self._logits is not None
        return self._logits

    def set_logits(self, logits: np.ndarray) -> None:
        self._logits = logits


class TransformersEngine(LocalEngine):
    name = "transformers"

    def __init__(self, model: Any, tokenizer: Any, model_name: str = "") -> None:
        super().__init__()
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.tokens = HFTokens(tokenizer, self.model_name)
        self.device = next(model.parameters()).device
        self.context_window = getattr(model.config, "max_position_embeddings", None)
        # transformers 5 renamed forward's past_key_values to cache
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are read: skip the vocabulary projection for the rest
        self.last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        eos: set[int] = set()
        gen = getattr(model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(x) for x in source)
        self._eos = frozenset(eos)

    # -- loading ----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str,
        *,
        gguf_file: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        trust_remote_code: bool = False,
    ) -> TransformersEngine:
        """Load a hub id, a local HF directory, or a GGUF file (dequantized once, cached)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"dtype: {dtype!r} must be one of {', '.join(DTYPES)}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype: Any
        if dtype == "auto":
            torch_dtype = torch.float32 if device == "cpu" else "auto"
        else:
            torch_dtype = getattr(torch, dtype)
        path = Path(model).expanduser()
        if gguf_file is None and path.suffix == ".gguf":
            gguf_file = str(path)
        try:
            if gguf_file is not None:
                source = _converted_gguf(Path(gguf_file))
            else:
                source = str(path) if path.exists() else model
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            hf_model = AutoModelForCausalLM.from_pretrained(
                source, dtype=torch_dtype, trust_remote_code=trust_remote_code
            ).to(device)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound self from mypy
        except (OSError, ValueError) as err:
            raise CodestopError(
                f"model: could not load {model!r} with transformers ({_first_line(err)}); give a local model "
                "directory, a .gguf file, a preset name, or a hub id reachable from this machine"
            ) from None
        return cls(hf_model, tokenizer, model_name=model)

    # -- tokenizer --------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokens.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokens.detokenize(ids)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def chat_template(self, messages: list[dict[str, str]], **template_kwargs: Any) -> str:
        rendered = self.tokens.render(messages, **template_kwargs)
        if rendered is None:  # a base model: a plain prompt
            return "\n\n".join(m["content"] for m in messages) + "\n\n"
        return rendered

    def default_sampling(self) -> Sampling:
        gen = getattr(self.model, "generation_config", None)
        if gen is None or not getattr(gen, "do_sample", False):
            return Sampling(temperature=0.0)
        return Sampling(
            temperature=getattr(gen, "temperature", None) or 1.0,
            top_p=getattr(gen, "top_p", None),
            top_k=getattr(gen, "top_k", None),
        )

    def model_info(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "model_type": getattr(self.model.config, "model_type", ""),
            "chat_template": self.tokens.chat_template_text(),
        }

    def new_backend(self, prompt_ids: Sequence[int]) -> TransformersBackend:
        return TransformersBackend(self, prompt_ids)

    async def aclose(self) -> None:
        """Drop the model so its memory (and the GPU's) is freed; the engine is unusable after."""
        await self.run_blocking(self._release)

    def _release(self) -> None:
        import gc

        self.model = None
        gc.collect()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _converted_gguf(gguf: Path) -> str:
    """transformers dequantizes a GGUF on every load (slow); do it once and keep the result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise CodestopError(f"model: {str(gguf)!r} is not a file")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "hf-from-gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers >= 5 keeps GGUF weights packed (not serializable) unless told to dequantize
    try:
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4 always dequantizes
        unpack = {}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **unpack)
    # the weights are already dequantized; drop the GGUF quantizer so they can be saved plainly
    model.hf_quantizer = None  # type: ignore[assignment]  # set dynamically; torch types Module.__setattr__ as Tensor | Module only
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return str(target)
