"""``--served-model-name`` / ``ServeOptions(served_model_name=...)``: the names the proxy serves its model
under, as vLLM's flag (a scripted in-process engine: nothing depends on what a model writes)."""

from __future__ import annotations

import httpx
import pytest
from harness import InProcessProxy, wait_for
from scripted import ScriptedEngine

from codestop import serve
from codestop.cli import build_parser
from codestop.cli import serve as cli_serve
from codestop.errors import CodestopError

CHAT = {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 3}


@pytest.fixture(scope="module")
def scripted(toy_tokenizer):
    return ScriptedEngine(toy_tokenizer, "Step. " * 20)


def test_the_served_names_are_listed_accepted_and_answered_with(scripted):
    p = InProcessProxy(scripted, policy={"method": "vanilla"}, close_engine=False, served_model_name=["smol", "smol-latest"])
    try:
        assert [m["id"] for m in httpx.get(p.url + "/v1/models").json()["data"]] == ["smol", "smol-latest"]
        for asked, named in (("smol", "smol"), ("smol-latest", "smol-latest"), (None, "smol")):  # none asked: the first
            model = {} if asked is None else {"model": asked}
            r = httpx.post(p.url + "/v1/chat/completions", json={**CHAT, **model}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == named, r.text
            r = httpx.post(p.url + "/v1/completions", json={"prompt": "Go.", "max_tokens": 3, **model}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == named, r.text
            with httpx.stream("POST", p.url + "/v1/chat/completions", json={**CHAT, **model, "stream": True}, timeout=30) as s:
                chunks = [line for line in s.iter_lines() if line.startswith("data: {")]
            assert chunks and all(f'"model": "{named}"' in c for c in chunks), chunks
        for other in ("scripted", "gpt-4o"):  # the engine's own name is no longer served, as with vLLM's flag
            r = httpx.post(p.url + "/v1/chat/completions", json={**CHAT, "model": other}, timeout=30)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
            assert "smol, smol-latest" in r.json()["error"]["message"]
    finally:
        p.stop()
    one = InProcessProxy(scripted, policy={"method": "vanilla"}, close_engine=False, served_model_name="smol")
    try:
        assert [m["id"] for m in httpx.get(one.url + "/v1/models").json()["data"]] == ["smol"]
    finally:
        one.stop()
    plain = InProcessProxy(scripted, policy={"method": "vanilla"}, close_engine=False)  # the default is unchanged
    try:
        assert [m["id"] for m in httpx.get(plain.url + "/v1/models").json()["data"]] == ["scripted"]
        assert httpx.post(plain.url + "/v1/chat/completions", json=CHAT, timeout=30).json()["model"] == "scripted"
    finally:
        plain.stop()
    for bad in ([], [""], ["ok", 3]):
        with pytest.raises(CodestopError, match="served_model_name"):
            serve.ServeOptions(served_model_name=bad)


def test_the_cli_flag_reaches_the_app(toy_tokenizer, monkeypatch):
    """``codestop serve --served-model-name A B`` as parsed, through cmd_serve to the running app
    (uvicorn's server replaced by one that asks the app in-process)."""
    import uvicorn
    from starlette.testclient import TestClient

    seen: dict[str, object] = {}

    class Server:
        def __init__(self, config) -> None:
            self.app, self.should_exit = config.app, False

        def run(self) -> None:
            with TestClient(self.app) as client:  # runs the lifespan: the engine is built
                wait_for(lambda: client.get("/health").status_code == 200)
                seen["models"] = [m["id"] for m in client.get("/v1/models").json()["data"]]
                seen["model"] = client.post("/v1/chat/completions", json=CHAT).json()["model"]

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(cli_serve, "build_engine", lambda spec: ScriptedEngine(toy_tokenizer, "Step. " * 20))  # closed at shutdown
    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "/models/x.gguf"]).served_model_name is None  # default: the model's
    args = parser.parse_args(["serve", "--model", "/models/x.gguf", "--served-model-name", "x", "x-latest", "--method", "vanilla"])
    assert args.served_model_name == ["x", "x-latest"]
    assert args.func(args) == 0
    assert seen == {"models": ["x", "x-latest"], "model": "x"}
