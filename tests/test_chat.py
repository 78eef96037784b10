"""Chat templates: rendering equals transformers' apply_chat_template, and the
step ranges found in the rendered text are exact.

Templates: a Qwen3-style one (a <think> block from `reasoning_content`, a
default system turn, `namespace` and loop controls), a Llama-3-style one
(bos_token, `| trim`, headers), and the SmolLM2 GGUF's own (read from the
default model's metadata)."""
from __future__ import annotations

import functools
import json

import pytest

from rjepa_latent.inputs import chat
from rjepa_latent.default_model import default_model_path

QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{%- continue %}{%- endif %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA3_STYLE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

RECORDS = [
    ("Tom has 3 apples and buys 4 more. How many?", ["He has 3 + 4 = 7 apples.", "The answer is 7."], "7"),
    ("Ünïcödé question with {braces} and <tags>?", ["Step one: “quotes” & ampersands.", "  indented step",
                                                   "emoji 🤖 step"], None),
    ("", ["A single step with no question."], "42"),
]


_HF_TOKENIZERS: dict = {}


def _hf_render(source: str, messages, special: dict) -> str:
    """transformers' own rendering (a tokenizer carrying the template and the special tokens)."""
    key = (source, tuple(sorted(special.items())))
    if key not in _HF_TOKENIZERS:
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast
        _HF_TOKENIZERS[key] = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()),
                                                      chat_template=source, **special)
    return _HF_TOKENIZERS[key].apply_chat_template(messages, tokenize=False)


@functools.lru_cache(maxsize=1)
def _templates():
    g = chat.load_chat_template(default_model_path())
    return {"qwen3": chat.ChatTemplate(QWEN3_STYLE, {"eos_token": "<|im_end|>"}),
            "llama3": chat.ChatTemplate(LLAMA3_STYLE, {"bos_token": "<|begin_of_text|>",
                                                       "eos_token": "<|eot_id|>"}),
            "smollm2_gguf": g}


@pytest.mark.parametrize("name", ["qwen3", "llama3", "smollm2_gguf"])
@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("system", [None, "You solve math problems."])
def test_render_equals_transformers_and_ranges_are_exact(name, think, system):
    t = _templates()[name]
    for question, steps, answer in RECORDS:
        msgs, idx, field, ranges = chat.step_messages(question, steps, think=think, answer=answer,
                                                      system=system)
        assert t.render(msgs) == _hf_render(t.source, msgs, t.special_tokens)
        if think and name != "qwen3":   # a template without reasoning drops the steps: an error
            with pytest.raises(chat.ChatTemplateError, match="not in the rendered text") as e:
                t.render_steps(msgs, idx, field, ranges)
            # says why (the reasoning is dropped) and what to use instead
            assert "drops the assistant's reasoning (reasoning_content)" in str(e.value)
            assert "use --chat to give the steps as the assistant's answer" in str(e.value)
            continue
        text, found = t.render_steps(msgs, idx, field, ranges)
        assert text == _hf_render(t.source, msgs, t.special_tokens)
        # exact, except where the template itself trims a step's edge (llama3's `| trim`)
        assert [text[a:b] for a, b in found] == [s if name == "qwen3" or k else s.strip()
                                                 for k, s in enumerate(steps)]
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(found, found[1:]))


def test_qwen3_style_think_block():
    t = _templates()["qwen3"]
    msgs, idx, field, ranges = chat.step_messages("Q?", ["a step", "b step"], think=True, answer="42")
    text, found = t.render_steps(msgs, idx, field, ranges)
    assert "<think>\na step\nb step\n</think>\n\n42<|im_end|>" in text
    assert [text[a:b] for a, b in found] == ["a step", "b step"]


def test_trimmed_edge_falls_back_to_search_and_missing_step_is_an_error():
    t = _templates()["llama3"]   # `| trim` strips the content's edges: markers move, search finds
    msgs, idx, field, ranges = chat.step_messages("Q", ["  padded first step", "last"])
    text, found = t.render_steps(msgs, idx, field, ranges)
    assert [text[a:b] for a, b in found] == ["padded first step", "last"]
    dropping = chat.ChatTemplate("{{ messages[0].content }}")   # never shows the assistant turn
    msgs, idx, field, ranges = chat.step_messages("Q", ["invisible step"])
    with pytest.raises(chat.ChatTemplateError, match="step 1"):
        dropping.render_steps(msgs, idx, field, ranges)


def test_messages_records_steps_are_lines_of_the_last_assistant_turn():
    t = _templates()["qwen3"]
    messages = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "reasoning_content": "2 plus 3\n\n  is 5.  \n", "content": "5"}]
    msgs, idx, field, ranges = chat.steps_of_messages(messages)
    assert (idx, field) == (1, "reasoning_content")
    text, found = t.render_steps(msgs, idx, field, ranges)
    assert text == _hf_render(t.source, messages, t.special_tokens)
    assert [text[a:b] for a, b in found] == ["2 plus 3", "is 5."]
    with pytest.raises(chat.ChatTemplateError, match="no assistant"):
        chat.steps_of_messages([{"role": "user", "content": "x"}])
    with pytest.raises(chat.ChatTemplateError, match="non-empty list"):
        chat.steps_of_messages([])
    with pytest.raises(chat.ChatTemplateError, match="must be a string"):
        chat.steps_of_messages([{"role": "assistant", "content": 3}])


def test_loading_from_hf_directory_variants(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(chat.ChatTemplateError, match="no chat template"):
        chat.load_chat_template(d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
         "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3_STYLE}]}))
    t = chat.load_chat_template(d)
    assert t.source == LLAMA3_STYLE and t.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    (d / "chat_template.jinja").write_text(QWEN3_STYLE, encoding="utf-8")
    assert chat.load_chat_template(d).source == QWEN3_STYLE      # the .jinja file wins
    (d / "chat_template.jinja").write_text("{% for %}", encoding="utf-8")
    with pytest.raises(Exception, match="does not compile"):
        chat.load_chat_template(d)


def test_template_errors_are_clear():
    t = chat.ChatTemplate("{{ raise_exception('only user turns') }}")
    with pytest.raises(chat.ChatTemplateError, match="only user turns"):
        t.render([{"role": "user", "content": "x"}])
    unsafe = chat.ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception):
        unsafe.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("name", ["qwen3", "llama3", "smollm2_gguf"])
def test_every_sample_record_renders_as_transformers_does(name):
    """The package's 42 sample problems through each template (plain and, where
    the template shows reasoning, --chat-think), against apply_chat_template."""
    from rjepa_latent.tools.demo import SAMPLES_DIR
    t = _templates()[name]
    rows = [json.loads(line) for line in (SAMPLES_DIR / "word_problems.jsonl").read_text().splitlines()]
    assert len(rows) == 42
    for think in ([False, True] if name == "qwen3" else [False]):
        for r in rows:
            msgs, idx, field, ranges = chat.step_messages(r.get("question"), r["steps"], think=think,
                                                          answer=r.get("answer"), system="Be brief.")
            text, found = t.render_steps(msgs, idx, field, ranges)
            assert text == _hf_render(t.source, msgs, t.special_tokens)
            assert [text[a:b] for a, b in found] == [s.strip() if name == "llama3" and not k else s
                                                     for k, s in enumerate(r["steps"])]
