"""Bad model files, as a table: each case edits the config.json or the
tokenizer.json of the tiny llama checkpoint and loads it in a subprocess under
a 2 GiB address-space limit and a time limit. The outcome must be a
ModelFormatError naming the file (the directory, where sizes are refused
against the tensors) and the key (its words), within a second or
so; never another exception, a Rust panic, an abort or a hang."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOAD = textwrap.dedent("""
    import resource, sys, time
    lim = 2 << 30
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import rjepa_latent as rl
    t0 = time.perf_counter()
    try:
        m = rl.Model(sys.argv[1], device="cpu")
        rl.encode_steps(m, "Q", ["she sold 48 clips"])
        print("OUTCOME loaded")
    except rl.ModelFormatError as e:
        print("OUTCOME ModelFormatError", str(e).replace("\\n", " "))
    except BaseException as e:  # a Rust panic is a BaseException
        print("OUTCOME", type(e).__name__, e)
    print("SECONDS", time.perf_counter() - t0)
""")


def _set(key, value):
    def edit(cfg):
        cfg[key] = value
    return edit


def _post_processor_names_unknown(tok):
    tok["post_processor"]["single"][0]["SpecialToken"]["id"] = "<x>"


def _post_processor_id_outside(tok):
    tok["post_processor"]["special_tokens"]["<s>"]["ids"] = [999_999]


def _two_tokens_one_id(tok):
    vocab = tok["model"]["vocab"]
    vocab["zz-second"] = vocab["$"]


def _added_token_shares_id(tok):
    tok["added_tokens"].append(dict(tok["added_tokens"][1], content="<other>"))


def _id_2_31(tok):
    tok["model"]["vocab"]["zz-huge"] = 2 ** 31


def _added_id_2_31(tok):
    tok["added_tokens"].append(dict(tok["added_tokens"][1], id=2 ** 31, content="<huge>"))


def _id_not_int(tok):
    tok["model"]["vocab"]["zz-text"] = "12"


def _vocab_not_object(tok):
    tok["model"]["vocab"] = 7


def _roberta_sep_unknown(tok):
    tok["post_processor"] = {"type": "RobertaProcessing", "sep": ["</s>", 1], "cls": ["<s>", 10 ** 9],
                             "trim_offsets": True, "add_prefix_space": False}


@dataclass
class Case:
    name: str
    file: str                                   # config.json | tokenizer.json
    edit: Callable | None = None                # edits the parsed JSON in place
    text: str | None = None                     # or: the file's whole text
    words: tuple = ()
    names_dir: bool = False                     # refused against the tensors: names the directory


CASES = [
    Case("architectures_not_a_list", "config.json", _set("architectures", 7),
         words=("'architectures'", "list", "7")),
    Case("architectures_of_numbers", "config.json", _set("architectures", [1, 2]),
         words=("'architectures'",)),
    Case("model_type_null_architectures_int", "config.json",
         lambda c: c.update(model_type=None, architectures=7), words=("'architectures'",)),
    Case("model_type_null_no_architectures", "config.json",
         lambda c: (c.update(model_type=None), c.pop("architectures", None)),
         words=("model_type", "None", "not supported")),
    Case("model_type_a_number", "config.json", _set("model_type", 7), words=("'model_type'", "string")),
    Case("mistral_hidden_size_2_63", "config.json",
         lambda c: c.update(model_type="mistral", hidden_size=2 ** 63, sliding_window=4096),
         words=("'hidden_size'", str(2 ** 63))),
    Case("hidden_size_2_63", "config.json", _set("hidden_size", 2 ** 63), words=("'hidden_size'",)),
    Case("layers_2_40", "config.json", _set("num_hidden_layers", 2 ** 40),
         words=("num_hidden_layers=1099511627776", "holds only"), names_dir=True),
    Case("mistral_layers_2_40", "config.json",
         lambda c: c.update(model_type="mistral", num_hidden_layers=2 ** 40, sliding_window=64),
         words=("'num_hidden_layers'", "more than 4096")),
    Case("mistral_hidden_size_2_40", "config.json",
         lambda c: c.update(model_type="mistral", hidden_size=2 ** 40, sliding_window=64),
         words=("hidden_size=1099511627776",), names_dir=True),
    Case("vocab_2_40", "config.json", _set("vocab_size", 2 ** 40), words=("vocab_size=1099511627776",),
         names_dir=True),
    Case("mistral_window_2_63", "config.json",
         lambda c: c.update(model_type="mistral", sliding_window=2 ** 63), words=("'sliding_window'",)),
    Case("positions_a_string", "config.json", _set("max_position_embeddings", "4096"),
         words=("'max_position_embeddings'",)),
    Case("eps_infinite", "config.json", _set("rms_norm_eps", float("inf")), words=("rms_norm_eps",)),
    Case("config_nested_100k_deep", "config.json", text='{"a":' * 100_000 + "1" + "}" * 100_000,
         words=("nested too deeply",)),
    Case("tokenizer_nested_100k_deep", "tokenizer.json", text="[" * 100_000 + "]" * 100_000,
         words=("nested too deeply",)),
    Case("post_processor_names_unknown_token", "tokenizer.json", _post_processor_names_unknown,
         words=("post_processor.single", "'<x>'", "not in the vocabulary")),
    Case("post_processor_id_outside_vocab", "tokenizer.json", _post_processor_id_outside,
         words=("post_processor.special_tokens['<s>']", "999999")),
    Case("roberta_cls_id_outside_vocab", "tokenizer.json", _roberta_sep_unknown,
         words=("post_processor.cls",)),
    Case("two_tokens_share_an_id", "tokenizer.json", _two_tokens_one_id,
         words=("model.vocab", "'zz-second'", "share the id")),
    Case("added_token_shares_an_id", "tokenizer.json", _added_token_shares_id,
         words=("added_tokens[2]", "'<other>'", "share the id 1")),
    Case("vocab_id_2_31", "tokenizer.json", _id_2_31, words=("model.vocab", "'zz-huge'", "2147483648")),
    Case("added_id_2_31", "tokenizer.json", _added_id_2_31, words=("added_tokens[2]", "2147483648")),
    Case("vocab_id_a_string", "tokenizer.json", _id_not_int, words=("model.vocab", "'zz-text'")),
    Case("vocab_not_an_object", "tokenizer.json", _vocab_not_object, words=("model.vocab",)),
    Case("tokenizer_top_level_list", "tokenizer.json", text="[1, 2]", words=("top level",)),
]


@pytest.fixture(scope="module")
def good_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_model_file(case: Case, good_dir, tmp_path):
    work = tmp_path / "model"
    shutil.copytree(good_dir, work)
    target = work / case.file
    if case.text is not None:
        target.write_text(case.text)
    else:
        data = json.loads(target.read_text())
        case.edit(data)
        target.write_text(json.dumps(data))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(work)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-2000:]}"
    outcome = [x for x in proc.stdout.splitlines() if x.startswith("OUTCOME ")][-1][8:]
    seconds = float([x for x in proc.stdout.splitlines() if x.startswith("SECONDS ")][-1][8:])
    assert outcome.startswith("ModelFormatError "), outcome
    assert (f"{work}:" if case.names_dir else str(target)) in outcome, outcome
    for word in case.words:
        assert word in outcome, (word, outcome)
    assert seconds < 5, seconds
    assert "panicked" not in proc.stderr, proc.stderr[-2000:]


def test_the_table_is_broad():
    assert len(CASES) >= 20
    assert {c.file for c in CASES} == {"config.json", "tokenizer.json"}


def test_real_tokenizers_pass_the_checks(good_dir, tmp_path):
    """The checks refuse nothing the tokenizers library writes itself: a
    byte-level BPE with a template post-processor (the tiny model's), a
    WordPiece with BertProcessing, a Unigram (list vocabulary) and a BPE with
    added tokens past the vocabulary and a Sequence post-processor."""
    from tokenizers import Tokenizer, models, processors, AddedToken
    from rjepa_latent.checkpoints.tokenizer_file import load_tokenizer_file, tokenizer_from_json
    bpe = load_tokenizer_file(good_dir / "tokenizer.json")
    assert bpe.encode("she sold").ids[0] == 0
    wp = Tokenizer(models.WordPiece({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}, unk_token="[UNK]"))
    wp.post_processor = processors.BertProcessing(("[SEP]", 2), ("[CLS]", 1))
    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0, False))
    seq = Tokenizer.from_str(bpe.to_str())
    seq.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    seq.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|im_start|> $A <|im_end|>",
                                      special_tokens=[("<|im_start|>", seq.token_to_id("<|im_start|>")),
                                                      ("<|im_end|>", seq.token_to_id("<|im_end|>"))])])
    for name, tok in (("wordpiece", wp), ("unigram", uni), ("sequence", seq)):
        again = tokenizer_from_json(tok.to_str(), name)
        assert again.encode("a").ids == tok.encode("a").ids, name
