"""``codestop serve``: an OpenAI-compatible HTTP server that applies a stopping policy to every
request, in front of a completions server (vLLM, SGLang, llama.cpp) or an in-process engine.

Clients talk to it as to any OpenAI endpoint (``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``; streaming or not). The reasoning comes back in ``reasoning_content`` (as vLLM's
reasoning parsers put it) and the answer in ``content``.

* :mod:`codestop.serve.protocol`: the typed request models and OpenAI's error shape;
* :mod:`codestop.serve.serving`: a request made into a policy, config and prompt, run, and shaped
  as a response or a stream;
* :mod:`codestop.serve.app`: the app (:func:`create_app`), its routes, key check and middlewares;
* :mod:`codestop.serve.options`: :class:`ServeOptions`, what the app serves with besides its engine;
* :mod:`codestop.serve.shadow`: shadow mode (answered without stopping, one trace per request);
* :mod:`codestop.serve.metrics`: the Prometheus metrics;
* :mod:`codestop.serve.defaults`: the server-wide defaults.

The names below load on first use: the command line reads the defaults without the serve extra
(FastAPI, pydantic) installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from codestop.lazy import lazy_exports
from codestop.serve.defaults import DEFAULT_ANSWER, DEFAULT_CONFIG, DEFAULT_MAX_REQUEST_BYTES, DEFAULT_POLICY

# name -> the module that defines it
_EXPORTS = {"create_app": "codestop.serve.app", "Metrics": "codestop.serve.metrics", "ServeOptions": "codestop.serve.options"}
__all__ = ["DEFAULT_ANSWER", "DEFAULT_CONFIG", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_POLICY", "Metrics", "ServeOptions",
           "create_app"]

if TYPE_CHECKING:
    from codestop.serve.app import create_app
    from codestop.serve.metrics import Metrics
    from codestop.serve.options import ServeOptions


__getattr__ = lazy_exports("codestop.serve", _EXPORTS, globals())
