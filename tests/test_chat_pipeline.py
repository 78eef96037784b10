"""--chat / --chat-think / --system end to end on a tiny llama whose directory
carries a chat template (a copy of the conftest model plus a
tokenizer_config.json): the stored text is transformers' own
apply_chat_template rendering, its ids are apply_chat_template's tokenized
ids, the stored spans are the span rule on that text, the latents are
Model.extract on those ids and spans; messages records; template errors per
record (the record's fault) or up front (the model's); chat options are part
of the run configuration."""
import json
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

import rjepa_latent as rl
from rjepa_latent.inputs.chat import ChatTemplateError
from rjepa_latent.cli import main as cli_main
from rjepa_latent.inputs.tokenize import step_spans
from test_chat import QWEN3_STYLE

RECORDS = [
    {"id": "a", "question": "Natalia sold 48 clips in April. How many in May?",
     "steps": ["In May she sold 48 / 2 = 24 clips.", "In total 48 + 24 = 72 clips."], "answer": "72"},
    {"id": "b", "question": "Ünïcödé {braces} <tags>?", "steps": ["Step one: “quotes” & more.", "  indented step",
                                                                 "emoji 🤖 step"]},
    {"id": "c", "steps": ["A single step with no question."], "answer": "10", "level": 3},
]
SYSTEM = "You solve math problems."


def _chat_model(tmp_path, tiny_model_dir, template=QWEN3_STYLE, name="chat_llama"):
    d = tmp_path / name
    shutil.copytree(tiny_model_dir("llama"), d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])   # ids 300, 301 < vocab_size 320
    tok.add_tokens(["<think>", "</think>"])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>"}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, tiny_model_dir):
    return _chat_model(tmp_path_factory.mktemp("chat"), tiny_model_dir)


@pytest.fixture(scope="module")
def chat_model(chat_dir):
    return rl.Model(chat_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_tok(chat_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(chat_dir))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _messages(rec, think, system):
    """The conversation as a user of transformers would write it for this record."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": rec.get("question", "")})
    body = "\n".join(rec["steps"])
    msgs.append({"role": "assistant", "reasoning_content": body, "content": rec.get("answer", "")}
                if think else {"role": "assistant", "content": body})
    return msgs


def _hf_ids(hf_tok, msgs):
    enc = hf_tok.apply_chat_template(msgs, tokenize=True)
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


def _check_item(item, text, steps, hf_ids, tok, model, layers):
    """Stored text, spans (the span rule on that text) and latents (Model.extract)."""
    assert item.meta["text"] == text
    ranges, pos = [], text.rindex("<|im_start|>assistant")
    for s in steps:            # each step's range in transformers' text (its last turn), found independently
        a = text.index(s, pos)
        ranges.append((a, a + len(s)))
        pos = a + len(s)
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.ids == hf_ids and item.meta["num_tokens"] == len(hf_ids)
    spans, missing = step_spans(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), ranges)
    assert missing is None and np.array_equal(item.token_spans, spans)
    (ref,) = model.extract([np.asarray(hf_ids)], [spans], layers=layers)
    assert np.array_equal(item.latents, ref)


@pytest.mark.parametrize("think,system", [(False, None), (True, SYSTEM)])
def test_chat_text_ids_spans_latents_equal_transformers(chat_model, chat_dir, hf_tok, tmp_path, think, system):
    src = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    out = tmp_path / "run"
    s = rl.extract_dataset(src, chat_model, out, layers=(1, -1), shard_size=2, progress=False,
                           chat=not think, chat_think=think, system=system)
    assert s["items"] == len(RECORDS) and s["errors"] == 0
    store = rl.open_latents(out)
    assert store.config["chat"] is True and store.config["chat_think"] is think
    assert store.config["system"] == system and len(store.config["chat_template_sha256"]) == 64
    tok = Tokenizer.from_file(str(chat_dir / "tokenizer.json"))
    for rec in RECORDS:
        item = store[rec["id"]]
        msgs = _messages(rec, think, system)
        text = hf_tok.apply_chat_template(msgs, tokenize=False)
        if think:
            assert "<think>\n" + "\n".join(rec["steps"]).strip("\n") + "\n</think>\n\n" in text
            assert text.count(SYSTEM) == 1
        _check_item(item, text, rec["steps"], _hf_ids(hf_tok, msgs), tok, chat_model, (1, -1))
    assert store["c"].meta["level"] == 3 and store["c"].meta["answer"] == "10"  # still carried


def test_messages_records_and_per_record_errors(chat_model, chat_dir, hf_tok, tmp_path):
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 48 + 24?"},
            {"role": "assistant", "reasoning_content": "48 + 24\n\n  = 72.  \n", "content": "72"}]
    plain = [{"role": "user", "content": "Count clips."},
             {"role": "assistant", "content": "She sold 48.\r\nThen 24.\nIn total 72."}]
    rows = [{"id": "m1", "messages": conv, "source": "mine"},
            {"id": "m2", "messages": plain},
            {"id": "nouser", "messages": [{"role": "user", "content": "only a question"}]},
            {"id": "badrole", "messages": [{"content": "x"}]},
            {"id": "g", "question": "Natalia sold 48 clips.", "answer": "She sold 48 / 2 = 24.\n#### 24"}]
    src = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "run"
    s = rl.extract_dataset(src, chat_model, out, layers=(-2,), progress=False, chat=True)
    store = rl.open_latents(out)
    assert store.ids == ["m1", "m2", "g"] and s["errors"] == 2
    reasons = {e["id"]: e["reason"] for e in store.errors}
    assert "no assistant message" in reasons["nouser"] and "string 'role'" in reasons["badrole"]
    tok = Tokenizer.from_file(str(chat_dir / "tokenizer.json"))
    for rid, msgs, steps in (("m1", conv, ["48 + 24", "= 72."]),
                             ("m2", plain, ["She sold 48.", "Then 24.", "In total 72."])):
        text = hf_tok.apply_chat_template(msgs, tokenize=False)
        _check_item(store[rid], text, steps, _hf_ids(hf_tok, msgs), tok, chat_model, (-2,))
    assert store["m1"].meta["record_source"] == "mine"
    g_msgs = [{"role": "user", "content": rows[4]["question"]},
              {"role": "assistant", "content": "She sold 48 / 2 = 24.\n#### 24"}]
    _check_item(store["g"], hf_tok.apply_chat_template(g_msgs, tokenize=False),
                ["She sold 48 / 2 = 24.", "#### 24"], _hf_ids(hf_tok, g_msgs), tok, chat_model, (-2,))

    # --system beside a record's own system message: that record's error; without --chat: every one's
    s = rl.extract_dataset(src, chat_model, tmp_path / "sys", progress=False, chat=True, system="S")
    reasons = {e["id"]: e["reason"] for e in rl.open_latents(tmp_path / "sys").errors}
    assert "own system message and --system was given" in reasons["m1"] and "m2" not in reasons
    s = rl.extract_dataset(src, chat_model, tmp_path / "nochat", progress=False)
    reasons = {e["id"]: e["reason"] for e in rl.open_latents(tmp_path / "nochat").errors}
    assert s["items"] == 1 and "pass --chat" in reasons["m1"] and "pass --chat" in reasons["m2"]
    with pytest.raises(ValueError, match="format 'messages'.*pass --chat"):
        rl.extract_dataset(src, chat_model, tmp_path / "x", format="messages", progress=False)


def test_a_record_the_template_refuses_is_an_error_record(tmp_path, tiny_model_dir):
    picky = ("{%- for m in messages %}{%- if 'forbidden' in m.content %}"
             "{{ raise_exception('forbidden word in turn ' ~ loop.index0) }}{%- endif %}"
             "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}")
    d = _chat_model(tmp_path, tiny_model_dir, picky, "picky")
    rows = [{"id": "ok", "steps": ["she sold 48"]}, {"id": "no", "question": "a forbidden question",
                                                      "steps": ["she sold 48"]},
            {"id": "typed", "question": None, "steps": ["x"], "answer": 5}]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    s = rl.extract_dataset(src, rl.Model(d, device="cpu"), tmp_path / "run", progress=False, chat=True)
    store = rl.open_latents(tmp_path / "run")
    assert store.ids == ["ok", "typed"] and s["errors"] == 1    # the answer is not used without think
    (err,) = store.errors
    assert err["id"] == "no" and "refused the messages: forbidden word in turn 0" in err["reason"]


def test_the_models_fault_is_refused_up_front(tmp_path, tiny_model_dir, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    none = _chat_model(tmp_path, tiny_model_dir, None, "none")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        rl.extract_dataset(src, rl.Model(none, device="cpu"), tmp_path / "run", progress=False, chat=True)
    assert not (tmp_path / "run").exists()
    args = ["extract", str(src), "--device", "cpu", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--model", str(none), "--chat"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "Traceback" not in err and not (tmp_path / "run").exists()

    no_system = ("{%- for m in messages %}{%- if m.role == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{%- endif %}"
                 "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}")
    d = _chat_model(tmp_path, tiny_model_dir, no_system, "nosys")
    assert cli_main([*args, "--model", str(d), "--chat", "--system", "Be brief."]) == 2
    err = capsys.readouterr().err
    assert "cannot render a plain conversation with --system" in err and "System role not supported" in err
    # a template without reasoning cannot show the steps of --chat-think: refused before any record
    assert cli_main([*args, "--model", str(d), "--chat-think"]) == 2
    assert "with --chat-think" in capsys.readouterr().err and not (tmp_path / "run").exists()
    broken = _chat_model(tmp_path, tiny_model_dir, "{% for %}", "broken")
    assert cli_main([*args, "--model", str(broken), "--chat"]) == 2
    assert "does not compile" in capsys.readouterr().err
    assert cli_main([*args, "--model", str(d), "--system", "S"]) == 2      # --system needs --chat
    assert "system needs chat" in capsys.readouterr().err
    assert cli_main([*args, "--model", str(d), "--chat", "--template", "{steps}"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_chat_options_are_part_of_the_configuration(chat_model, tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", RECORDS)
    out = tmp_path / "run"
    rl.extract_dataset(src, chat_model, out, progress=False, chat=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert rl.extract_dataset(src, chat_model, out, progress=False, chat=True)["noop"]
    plain = tmp_path / "plain"
    rl.extract_dataset(src, chat_model, plain, progress=False)
    assert not {"chat", "chat_think", "system", "segment", "strip_annotations"} & set(
        rl.open_latents(plain).config)   # defaults are not recorded: configurations as before
    with pytest.raises(rl.StoreError, match=r"chat: stored None, requested True"):
        rl.extract_dataset(src, chat_model, plain, progress=False, chat=True)
    for kw, key in ((dict(), "chat"), (dict(chat_think=True), "chat_think"),
                    (dict(chat=True, system="S"), "system")):
        with pytest.raises(rl.StoreError, match=rf"(?s)different configuration.*{key}: stored"):
            rl.extract_dataset(src, chat_model, out, progress=False, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_segmentation_and_step_ranges_inside_a_chat_render(tmp_path):
    """(data level) a text record's segmented steps and a messages record under
    --segment keep exact ranges in the rendered text, equal to transformers'."""
    from rjepa_latent.inputs import chat as chat_mod
    from rjepa_latent.inputs.data import Chat, ErrorRecord, read_records
    from test_chat import _hf_render
    c = Chat(chat_mod.ChatTemplate(QWEN3_STYLE, {"eos_token": "<|im_end|>"}), think=True)
    text = "First, 48 / 2 = <<48/2=24>>24.  Then 48 + 24 = 72!\r\n\r\nSo 72."
    conv = [{"role": "user", "content": "Q?"},
            {"role": "assistant", "reasoning_content": "One. Two?\n\nThree.", "content": "3"}]
    rows = [{"id": "t", "statement": "How many?", "text": text, "answer": "72"},  # question+answer: gsm8k
            {"id": "r", "text": "abc def", "step_ranges": [[0, 3], [4, 7]]},
            {"id": "m", "messages": conv},
            {"id": "bad", "steps": ["x"], "answer": 72}]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    t, r, m, bad = list(read_records([src], segment="sentences", strip_annotations=True, chat=c))
    stripped = "First, 48 / 2 = 24.  Then 48 + 24 = 72!\r\n\r\nSo 72."
    hf = _hf_render(QWEN3_STYLE, [{"role": "user", "content": "How many?"},
                                  {"role": "assistant", "reasoning_content": stripped, "content": "72"}],
                    {"eos_token": "<|im_end|>"})
    assert t.text == hf and [t.text[a:b] for a, b in t.steps] == ["First, 48 / 2 = 24.", "Then 48 + 24 = 72!",
                                                                  "So 72."]
    assert [r.text[a:b] for a, b in r.steps] == ["abc", "def"] and r.text.count("abc def") == 1
    assert m.text == _hf_render(QWEN3_STYLE, conv, {"eos_token": "<|im_end|>"})
    assert [m.text[a:b] for a, b in m.steps] == ["One.", "Two?", "Three."]
    assert isinstance(bad, ErrorRecord) and "'answer' must be a string" in bad.reason


def test_messages_from_parquet(tmp_path):
    """A list<struct> messages column: Arrow's nulls for a struct field absent from a
    message render as transformers renders the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from rjepa_latent.inputs import chat as chat_mod
    from rjepa_latent.inputs.data import Chat, read_records
    from test_chat import _hf_render
    conv = [[{"role": "user", "content": "2+3?"},
             {"role": "assistant", "content": "5", "reasoning_content": "2 plus 3\nis 5."}],
            [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "Add.\n2."}]]
    pq.write_table(pa.table({"id": ["x", "y"], "messages": conv}), tmp_path / "m.parquet")
    rows = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert rows[1]["messages"][1]["reasoning_content"] is None   # Arrow: the field is there, null
    c = Chat(chat_mod.ChatTemplate(QWEN3_STYLE, {"eos_token": "<|im_end|>"}))
    x, y = list(read_records([tmp_path / "m.parquet"], chat=c))
    for rec, row in ((x, rows[0]), (y, rows[1])):
        assert rec.text == _hf_render(QWEN3_STYLE, row["messages"], {"eos_token": "<|im_end|>"})
    assert [x.text[a:b] for a, b in x.steps] == ["2 plus 3", "is 5."]
    assert [y.text[a:b] for a, b in y.steps] == ["Add.", "2."]


@pytest.mark.slow
def test_gguf_model_chat_end_to_end(tmp_path):
    """The default GGUF model (SmolLM2, its template in tokenizer.chat_template):
    the text is transformers' rendering of that template, the special tokens are
    single tokens, spans follow the span rule, latents equal Model.extract."""
    from rjepa_latent.inputs import chat as chat_mod
    from rjepa_latent.default_model import default_model_path
    from test_chat import _hf_render
    path = default_model_path()
    tmpl = chat_mod.load_chat_template(path)
    rows = RECORDS[:2]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    with rl.Model(path, device="cpu") as m:
        rl.extract_dataset(src, m, tmp_path / "run", progress=False, chat=True, system=SYSTEM, layers=(-2,))
        store = rl.open_latents(tmp_path / "run")
        for rec in rows:
            item = store[rec["id"]]
            text = _hf_render(tmpl.source, _messages(rec, False, SYSTEM), tmpl.special_tokens)
            assert item.meta["text"] == text
            enc = m.tokenizer.encode(text, add_special_tokens=False)
            assert enc.tokens[0] == "<|im_start|>" and item.meta["num_tokens"] == len(enc.ids)
            a0 = text.rindex("<|im_start|>assistant")
            ranges = []
            for s in rec["steps"]:
                a0 = text.index(s, a0)
                ranges.append((a0, a0 + len(s)))
                a0 += len(s)
            spans, missing = step_spans(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), ranges)
            assert missing is None and np.array_equal(item.token_spans, spans)
            (ref,) = m.extract([np.asarray(enc.ids)], [spans], layers=(-2,))
            assert np.array_equal(item.latents, ref)


def test_any_exception_inside_the_template_is_that_records_error(tmp_path):
    from rjepa_latent.inputs import chat as chat_mod
    from rjepa_latent.inputs.data import Chat, ErrorRecord, read_records
    # compares a question holding "boom" with a number: a TypeError in that record only
    t = chat_mod.ChatTemplate("{{ messages[0].content }}{% if 'boom' in messages[0].content %}"
                              "{{ messages[0].content > 3 }}{% endif %}{{ messages[1].content }}")
    src = write_jsonl(tmp_path / "r.jsonl", [{"id": "q", "question": "boom", "steps": ["s"]},
                                             {"id": "ok", "question": "fine?", "steps": ["fine"]}])
    q, ok = list(read_records([src], chat=Chat(t)))
    assert isinstance(q, ErrorRecord) and "failed on this record: TypeError" in q.reason
    assert ok.text == "fine?fine" and ok.text[slice(*ok.steps[0])] == "fine"
