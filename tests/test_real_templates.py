"""The families against the models' real chat templates (tests/fixtures/chat_templates, where each
comes from is in the README there): detection, the prompt as the template renders it (thinking
opened exactly once, the template's own switch honoured), what codestop appends when it probes and
when it stops, and conversations whose earlier reasoning the template drops.

Each template is rendered by transformers (the tokenizer path: a real tokenizer carrying the
model's template and special tokens, in a TransformersEngine over a tiny random-weight model of the
model's architecture, so model_type is the real one) and by codestop's GGUF renderer (the
llama.cpp path); no model runs: a template is text in, text out."""

from __future__ import annotations

import asyncio
import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from codestop.engines.transformers import TransformersEngine
from codestop.errors import ParameterError
from codestop.families import PROBE_PROMPT, Family, detect_family, get_family

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
QUESTION = "What is 2 + 2?"
R1_TOKENS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}


@dataclass(frozen=True)
class Model:
    template: str  # file under fixtures/chat_templates
    name: str  # the model id codestop is given
    model_type: str  # its config's model_type (the tiny model's architecture)
    family: str  # what codestop detects
    tail: str  # how codestop's prompt ends: the generation prompt, opened for thinking
    opened_by_template: bool  # the template's generation prompt opens the thinking itself
    special: dict[str, str] = field(default_factory=dict)
    arch: dict[str, Any] = field(default_factory=dict)


MODELS = {
    "qwen3": Model("qwen3.jinja", "Qwen/Qwen3-4B", "qwen3", "qwen3", "<|im_start|>assistant\n<think>\n", False),
    "qwq": Model("qwq-32b.jinja", "Qwen/QwQ-32B", "qwen2", "qwq", "<|im_start|>assistant\n<think>\n", True),
    "r1-original": Model("deepseek-r1-distill-qwen-original.jinja", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "qwen2",
                         "deepseek-r1", "<｜Assistant｜><think>\n", False, R1_TOKENS),
    "r1-later": Model("deepseek-r1-distill-qwen-later.jinja", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2",
                      "deepseek-r1", "<｜Assistant｜><think>\n", True, R1_TOKENS),
    "nemotron-v1": Model("llama-nemotron-super-v1.jinja", "nvidia/Llama-3_3-Nemotron-Super-49B-v1", "llama", "nemotron",
                         "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<think>\n", False,
                         {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "nemotron-nano-v2": Model("nemotron-nano-v2.jinja", "nvidia/NVIDIA-Nemotron-Nano-9B-v2", "nemotron_h", "nemotron-v2",
                              "\n<SPECIAL_11>Assistant\n<think>\n", True,
                              arch=dict(hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16)),
    "gpt-oss": Model("gpt-oss.jinja", "openai/gpt-oss-20b", "gpt_oss", "gpt-oss", "<|end|><|start|>assistant<|channel|>analysis<|message|>", False,
                     {"eos_token": "<|return|>"},
                     dict(num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention", "sliding_attention"], sliding_window=16)),
}


def _tiny(model_type: str, vocab: int, **arch: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, **arch)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()


@pytest.fixture(scope="module")
def engine_for(tokenizer):
    """The engine of a model in MODELS, built once; ``name`` overrides the model id it is given."""
    built: dict[tuple[str, str | None], TransformersEngine] = {}

    def make(key: str, name: str | None = None) -> TransformersEngine:
        if (key, name) not in built:
            model = MODELS[key]
            tok = copy.deepcopy(tokenizer)
            tok.chat_template = (TEMPLATES / model.template).read_text(encoding="utf-8")
            if model.special:
                tok.add_special_tokens(model.special)
            built[key, name] = TransformersEngine(_tiny(model.model_type, len(tok), **model.arch), tok,
                                                  model.name if name is None else name)
        return built[key, name]

    return make


def _opener(family: Family) -> str:
    return family.think_start


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_the_family_is_detected_from_the_model(engine_for, key):
    assert detect_family(engine_for(key)).name == MODELS[key].family


@pytest.mark.parametrize("key, family", [
    ("r1-original", "deepseek-r1"),  # the original template has no "<think>", only its "</think>" split
    ("r1-later", "deepseek-r1"),
    ("qwq", "think"),  # a <think> template of no known name
    ("qwen3", "qwen3"),  # model_type qwen3
    ("gpt-oss", "gpt-oss"),  # harmony channels in the template, model_type gpt_oss
    ("nemotron-nano-v2", "think"),
    ("nemotron-v1", "nemotron"),  # a Llama-3 template that drops earlier thinking
])
def test_a_model_served_under_another_name_is_told_by_its_template(engine_for, key, family):
    assert detect_family(engine_for(key, name="served-model")).name == family


@pytest.fixture(scope="module")
def r1_original_gguf(tmp_path_factory, smollm2_path):
    """SmolLM2's GGUF carrying the original R1 distill's template and general.name, under a file
    name that says nothing (as a GGUF is often served): what a LlamaCppEngine reads from a real
    R1 distill GGUF's header, without its 7B weights."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    reader = gguf.GGUFReader(str(smollm2_path), "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    template = (TEMPLATES / "deepseek-r1-distill-qwen-original.jinja").read_text(encoding="utf-8")
    copy_with_new_metadata(reader, writer, {
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template),
        gguf.Keys.General.NAME: MetadataDetails(gguf.GGUFValueType.STRING, "DeepSeek R1 Distill Qwen 7B"),
    }, [])
    return out


def test_an_r1_distill_gguf_is_told_by_its_header_and_opened_by_codestop(r1_original_gguf):
    from codestop.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine.load(str(r1_original_gguf), n_ctx=256, threads=1)
    assert engine.model_info()["gguf_name"] == "DeepSeek R1 Distill Qwen 7B" and engine.model_name == "model.gguf"
    family = detect_family(engine)
    assert family.name == "deepseek-r1"
    prompt = family.build_prompt(engine, QUESTION)  # rendered by codestop's GGUF renderer
    assert prompt.endswith("\\boxed{}.<｜Assistant｜><think>\n") and prompt.count("<think>") == 1


# --------------------------------------------------------------------------------------------
# the prompt: thinking opened exactly once, by the template or by codestop, nothing else added
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_the_prompt_opens_the_thinking_exactly_once(engine_for, key):
    model, engine = MODELS[key], engine_for(key)
    family = detect_family(engine)
    prompt = family.build_prompt(engine, QUESTION)
    assert prompt.endswith(model.tail)
    assert prompt.count(_opener(family)) == 1 and family.think_end not in prompt.split(_opener(family))[-1]
    # codestop adds the opening only where the template's generation prompt lacks it
    as_the_template_renders = engine.chat_template(family._with_system(family.messages(QUESTION)), **family.template_kwargs)
    assert prompt == as_the_template_renders + ("" if model.opened_by_template else family.open_thinking)
    assert QUESTION in prompt and "\\boxed{}" in prompt


def test_nemotron_v1_is_told_to_think_by_its_system_prompt(engine_for):
    engine = engine_for("nemotron-v1")
    prompt = get_family(None, engine).build_prompt(engine, QUESTION)
    assert "<|start_header_id|>system<|end_header_id|>\n\ndetailed thinking on<|eot_id|>" in prompt
    # Nemotron v2 switches with /think and /no_think, which its template reads and strips: no v1 switch
    engine = engine_for("nemotron-nano-v2")
    prompt = get_family(None, engine).build_prompt(engine, QUESTION)
    assert "detailed thinking" not in prompt and "/think" not in prompt and prompt.startswith("<SPECIAL_10>System\n")


@pytest.mark.parametrize("key, tail", [
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),  # the template's own enable_thinking
    ("nemotron-v1", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("nemotron-nano-v2", "<SPECIAL_11>Assistant\n<think></think>"),
])
def test_enable_thinking_false_is_the_templates_own_switch(engine_for, key, tail):
    engine = engine_for(key)
    family = get_family(None, engine, enable_thinking=False)
    prompt = family.build_prompt(engine, QUESTION)
    assert not family.thinks and prompt.endswith(tail)
    assert prompt.count("<think>") == (0 if key == "nemotron-v1" else 1)  # never opened again by codestop
    if key == "nemotron-v1":
        assert "system<|end_header_id|>\n\ndetailed thinking off<|eot_id|>" in prompt
    if key == "nemotron-nano-v2":
        assert "/no_think" not in prompt  # the template reads the tag and removes it
    on = get_family(None, engine, enable_thinking=True)
    assert on.thinks and on.build_prompt(engine, QUESTION).endswith(MODELS[key].tail)


@pytest.mark.parametrize("key", ["qwq", "r1-original", "r1-later", "gpt-oss"])
def test_enable_thinking_false_is_refused_where_the_template_has_no_switch(engine_for, key):
    with pytest.raises(ParameterError, match="enable_thinking: False cannot be honoured"):
        get_family(None, engine_for(key), enable_thinking=False)
    assert get_family(None, engine_for(key), enable_thinking=True).thinks


# --------------------------------------------------------------------------------------------
# what codestop appends: probes stay inside the thinking, a stop closes it once, as the model writes it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_probes_stay_inside_and_a_stop_closes_the_thinking_once(engine_for, key):
    engine = engine_for(key)
    family = detect_family(engine)
    prompt = family.build_prompt(engine, QUESTION)
    reasoning = "Two plus two.\n\nThat makes four."
    assert family.probe_prompt == PROBE_PROMPT and family.think_end not in family.probe_prompt
    probed = prompt + reasoning + family.probe_prompt
    assert probed.count(_opener(family)) == 1 and family.think_end not in probed.split(_opener(family))[-1]
    stopped = prompt + reasoning + family.forced_answer_text()
    after = stopped.split(_opener(family))[-1]
    assert after.count(family.think_end) == 1 and stopped.endswith(family.close_thinking + family.answer_prompt)
    if key == "gpt-oss":
        return  # harmony's history carries the answer alone (test below); the analysis is never resent
    # the close is the marker the template cuts earlier turns at: resent as history, the reasoning goes
    history = [*family.messages(QUESTION), {"role": "assistant", "content": reasoning + family.forced_answer_text() + "4}"},
               {"role": "user", "content": "And 3 + 3?"}]
    again = family.open(engine, history)[1]
    assert "That makes four." not in again and "The final answer is \\boxed{4}" in again


@pytest.mark.parametrize("key, turn", [
    # the template's own rendering of a finished turn (reasoning_content / harmony's "thinking")
    ("qwen3", {"role": "assistant", "content": "\\boxed{4}", "reasoning_content": "Two plus two is four."}),
    ("gpt-oss", {"role": "assistant", "content": "\\boxed{4}", "thinking": "Two plus two is four."}),
])
def test_a_stopped_turn_is_written_as_the_template_writes_a_finished_one(engine_for, key, turn):
    """What codestop builds (prompt, reasoning, close, answer) is the text the template renders for
    that turn: the closing markup is the model's own, not a guess."""
    engine = engine_for(key)
    family = detect_family(engine)
    messages = family.messages(QUESTION)
    built = family.build_prompt(engine, QUESTION) + turn["reasoning_content" if key == "qwen3" else "thinking"]
    built += family.close_thinking + turn["content"]
    kwargs = {"enable_thinking": True} if key == "qwen3" else {}
    finished = engine.tokenizer.apply_chat_template(messages + [turn], tokenize=False, add_generation_prompt=False, **kwargs)
    assert finished.startswith(built)
    assert finished[len(built):] in ("<|im_end|>\n", "<|return|>")


# --------------------------------------------------------------------------------------------
# conversations: earlier reasoning is dropped by the template, never resent by codestop
# --------------------------------------------------------------------------------------------


def _conversation(key: str, inline_reasoning: bool) -> list[dict[str, str]]:
    answer = "The answer is \\boxed{4}."
    earlier = f"<think>\nEARLIER-REASONING adds two and two.\n</think>\n\n{answer}" if inline_reasoning else answer
    return [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": earlier},
            {"role": "user", "content": "And 3 + 3?"}]


# harmony (gpt-oss): a client sends earlier reasoning as 'thinking', never inline, so that case is not asked of it
@pytest.mark.parametrize(("key", "inline"), [(k, inline) for k in MODELS for inline in (False, True) if not (inline and k == "gpt-oss")],
                         ids=lambda v: v if isinstance(v, str) else ("reasoning-inline" if v else "as-codestop-answered"))
def test_a_conversation_drops_its_earlier_reasoning_and_opens_once(engine_for, key, inline):
    engine = engine_for(key)
    family = detect_family(engine)
    messages = _conversation(key, inline)
    sent = copy.deepcopy(messages)
    switched, prompt = family.open(engine, messages)
    assert messages == sent  # the client's messages are not changed
    assert switched == family and prompt.endswith(MODELS[key].tail)
    assert "EARLIER-REASONING" not in prompt and "The answer is \\boxed{4}." in prompt and "And 3 + 3?" in prompt
    assert prompt.count(_opener(family)) == 1
    if key == "nemotron-v1":  # the switch is added once, before the conversation
        assert prompt.count("detailed thinking on") == 1


def test_a_conversation_sets_its_own_switch(engine_for):
    # Nemotron v1: the client's own system prompt turns thinking off
    engine = engine_for("nemotron-v1")
    family, prompt = detect_family(engine).open(engine, [{"role": "system", "content": "detailed thinking off"},
                                                         {"role": "user", "content": QUESTION}])
    assert not family.thinks and prompt.endswith("assistant<|end_header_id|>\n\n") and prompt.count("detailed thinking") == 1
    # ... or keeps it on, with the client's own instructions after the switch codestop adds
    family, prompt = detect_family(engine).open(engine, [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": QUESTION}])
    assert family.thinks and "system<|end_header_id|>\n\ndetailed thinking on\nBe brief.<|eot_id|>" in prompt
    # Nemotron v2: its template reads /no_think and closes an empty block; codestop must not open another
    engine = engine_for("nemotron-nano-v2")
    family, prompt = detect_family(engine).open(engine, [{"role": "system", "content": "/no_think"},
                                                         {"role": "user", "content": QUESTION}])
    assert not family.thinks and prompt.endswith("<think></think>") and prompt.count("<think>") == 1
    # the conversation's own switch wins over the request's enable_thinking, both ways
    engine = engine_for("nemotron-v1")
    family, prompt = get_family(None, engine, enable_thinking=False).open(
        engine, [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": QUESTION}])
    assert family.thinks and prompt.endswith(MODELS["nemotron-v1"].tail) and prompt.count("detailed thinking") == 1
    engine = engine_for("nemotron-nano-v2")
    family, prompt = get_family(None, engine, enable_thinking=False).open(
        engine, [{"role": "system", "content": "/think"}, {"role": "user", "content": QUESTION}])
    assert family.thinks and family.close_thinking == "\n</think>\n\n" and prompt.endswith(MODELS["nemotron-nano-v2"].tail)
    # Qwen3: the last /think or /no_think in the conversation wins, as the model reads it
    engine = engine_for("qwen3")
    messages = [{"role": "user", "content": "Hi /think"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": f"{QUESTION} /no_think"}]
    family, prompt = detect_family(engine).open(engine, messages)
    assert not family.thinks and prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    family, prompt = detect_family(engine).open(engine, messages[:2] + [{"role": "user", "content": f"{QUESTION} /think"}])
    assert family.thinks and prompt.endswith("<|im_start|>assistant\n<think>\n") and prompt.count("<think>") == 1


def test_the_proxy_renders_a_conversation_with_its_switch(engine_for):
    """The proxy's rendering (serve.serving.render_messages) hands on the family as the
    conversation switched it, so a /no_think chat is answered without a thinking phase."""
    from codestop.serve.serving import render_messages

    engine = engine_for("nemotron-nano-v2")
    family, prompt = asyncio.run(render_messages(engine, detect_family(engine), [
        {"role": "system", "content": "You are terse. /no_think"}, {"role": "user", "content": QUESTION}]))
    assert not family.thinks and prompt.endswith("<think></think>") and "You are terse." in prompt


def test_harmony_markup_resent_as_content_is_a_400_naming_messages(engine_for):
    """gpt-oss's template refuses channel markup in an assistant's content (the client must send
    the answer alone, as the proxy returns it): the proxy says so, naming ``messages``."""
    from codestop.serve.protocol import RequestError
    from codestop.serve.serving import render_messages

    engine = engine_for("gpt-oss")
    messages = [{"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "<|channel|>final<|message|>4"}, {"role": "user", "content": "And 3 + 3?"}]
    with pytest.raises(RequestError, match="messages: the model's chat template cannot render them.*channel"):
        asyncio.run(render_messages(engine, detect_family(engine), messages))


# --------------------------------------------------------------------------------------------
# the GGUF path: codestop's own renderer (engines/llamacpp.py) gives what transformers gives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_the_gguf_renderer_agrees_with_transformers(engine_for, key):
    from codestop.engines.llamacpp import _compile_template

    engine = engine_for(key)
    family = detect_family(engine)
    tok = engine.tokenizer
    template = _compile_template(tok.chat_template)
    for messages in (family._with_system(family.messages(QUESTION)), family._with_system(_conversation(key, False))):
        ours = template.render(messages=messages, add_generation_prompt=True, bos_token=tok.bos_token or "",
                               eos_token=tok.eos_token or "", **family.template_kwargs)
        theirs = engine.chat_template(messages, **family.template_kwargs)
        # gpt-oss's system message carries today's date (strftime_now): the one thing that may differ
        assert re.sub(r"Current date: [\d-]+", "", ours) == re.sub(r"Current date: [\d-]+", "", theirs)


@pytest.mark.parametrize("key", [k for k in MODELS if k != "nemotron-nano-v2"])  # (a Mamba model: slow on CPU)
def test_a_generation_stopped_by_codestop_appends_the_familys_close(engine_for, key):
    """Through the controller, on the tiny model: the prompt it feeds is the opened one, and a
    stop closes the thinking with the family's close before the answer prompt."""
    from codestop import TokenBudget, generate

    engine = engine_for(key)
    family = detect_family(engine)
    result = generate(engine, QUESTION, TokenBudget(budget=6), temperature=0.0, answer="boxed", max_reasoning_tokens=64)
    assert result.family == family.name and result.stop_reason == "budget"
    assert result.tokens["prompt"] == len(engine.tokenize(family.build_prompt(engine, QUESTION)))
    assert result.answer_text.startswith(family.close_thinking + family.answer_prompt)


def test_the_proxy_follows_a_conversations_switch_end_to_end(engine_for):
    """Through the proxy over the tiny model with Llama-Nemotron v1's template: a chat without a
    system prompt thinks (codestop adds the switch), one whose system prompt says "detailed
    thinking off" is answered without a thinking phase."""
    from harness import InProcessProxy

    p = InProcessProxy(engine_for("nemotron-v1"), close_engine=False)
    try:
        client = p.client()
        knobs = {"codestop": {"method": "vanilla", "max_reasoning_tokens": 6}}
        on = client.chat.completions.create(model=MODELS["nemotron-v1"].name, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=10, temperature=0.0, extra_body=knobs)
        assert on.usage.completion_tokens_details.reasoning_tokens == 6
        assert (on.choices[0].message.model_extra or {}).get("reasoning_content")
        off = client.chat.completions.create(model=MODELS["nemotron-v1"].name, max_tokens=10, temperature=0.0, extra_body=knobs,
                                             messages=[{"role": "system", "content": "detailed thinking off"},
                                                       {"role": "user", "content": QUESTION}])
        assert off.usage.completion_tokens_details.reasoning_tokens == 0
        assert not (off.choices[0].message.model_extra or {}).get("reasoning_content") and off.choices[0].message.content
    finally:
        p.stop()
