"""tokenizer.json -> a `tokenizers.Tokenizer`, checked before the Rust library sees it.

The `tokenizers` library trusts its file: a post-processor that names a
special token it does not define panics (a `PanicException`, which is not an
`Exception`), an id of 2**31 makes it allocate gigabytes (and abort under a
memory limit), two tokens sharing an id fail later, in a round trip. So the
JSON is read here first and its token ids checked against sane bounds:

- the vocabulary (`model.vocab`: an object of token -> id, or Unigram's list
  of [token, score]) and `added_tokens` give every id; each must be an int in
  0 .. (number of tokens + `ID_SLACK`), so a file cannot ask for an id table
  far larger than itself;
- two different tokens never share an id (an added token may repeat its
  vocabulary entry; one with another entry's id is not loaded at that id by
  the library, which gives it a new one: the file and the ids would disagree);
- the post-processor (`TemplateProcessing`, `BertProcessing`,
  `RobertaProcessing`, nested in `Sequence`) names only special tokens it
  defines, and their ids are ids of the vocabulary.

Every refusal is a ModelFormatError naming the file and the key. What passes
is handed to `Tokenizer.from_str`; anything it still raises (a Rust panic
included) becomes a ModelFormatError too.
"""
from __future__ import annotations

import json
import os
from typing import Any

from ..errors import ModelFormatError

# gaps a real vocabulary may leave (added tokens placed past a padded vocabulary)
ID_SLACK = 1 << 16


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _vocabulary(spec: dict, file: str) -> dict[int, str]:
    """id -> token of the vocabulary and the added tokens, checked."""
    model = spec.get("model")
    if not isinstance(model, dict):
        raise ModelFormatError(f"{file}: 'model' must be an object")
    vocab = model.get("vocab", {})
    pairs: list[tuple[str, Any, str]] = []
    if isinstance(vocab, dict):
        pairs = [(tok, i, "model.vocab") for tok, i in vocab.items()]
    elif isinstance(vocab, list):              # Unigram: [[token, score], ...], ids by position
        for i, entry in enumerate(vocab):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
                raise ModelFormatError(f"{file}: model.vocab[{i}] must be [token, score], "
                                       f"got {entry!r:.80}")
            pairs.append((entry[0], i, "model.vocab"))
    else:
        raise ModelFormatError(f"{file}: model.vocab must be an object or a list")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list):
        raise ModelFormatError(f"{file}: 'added_tokens' must be a list")
    for k, tok in enumerate(added):
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str):
            raise ModelFormatError(f"{file}: added_tokens[{k}] must be an object with a string "
                                   "'content'")
        pairs.append((tok["content"], tok.get("id"), f"added_tokens[{k}]"))
    limit = len(pairs) + ID_SLACK
    by_id: dict[int, tuple[str, str]] = {}
    for token, i, key in pairs:
        if not _is_int(i) or not 0 <= i < limit:
            raise ModelFormatError(f"{file}: {key}: token {token!r:.60} has id {i!r:.40}, not an "
                                   f"integer in 0..{limit - 1} (the file holds {len(pairs)} "
                                   "tokens)")
        if i in by_id and by_id[i][0] != token:
            other, other_key = by_id[i]
            raise ModelFormatError(f"{file}: {key}: tokens {other!r:.60} ({other_key}) and "
                                   f"{token!r:.60} share the id {i}")
        by_id.setdefault(i, (token, key))
    return {i: tok for i, (tok, _) in by_id.items()}


def _check_post_processor(pp: Any, ids: dict[int, str], file: str, key: str) -> None:
    if pp is None:
        return
    if not isinstance(pp, dict):
        raise ModelFormatError(f"{file}: {key} must be an object")
    kind = pp.get("type")
    if kind == "Sequence":
        parts = pp.get("processors")
        if not isinstance(parts, list):
            raise ModelFormatError(f"{file}: {key}.processors must be a list")
        for n, part in enumerate(parts):
            _check_post_processor(part, ids, file, f"{key}.processors[{n}]")
    elif kind == "TemplateProcessing":
        specials = pp.get("special_tokens") or {}
        if not isinstance(specials, dict):
            raise ModelFormatError(f"{file}: {key}.special_tokens must be an object")
        for name, entry in specials.items():
            got = entry.get("ids") if isinstance(entry, dict) else None
            if not isinstance(got, list) or not isinstance(entry.get("tokens"), list) \
                    or len(got) != len(entry["tokens"]):
                raise ModelFormatError(f"{file}: {key}.special_tokens[{name!r:.60}] must hold "
                                       "'ids' and 'tokens' lists of one length")
            for i in got:
                if not _is_int(i) or i not in ids:
                    raise ModelFormatError(f"{file}: {key}.special_tokens[{name!r:.60}] has id "
                                           f"{i!r:.40}, which is not in the vocabulary")
        for part in ("single", "pair"):
            pieces = pp.get(part) or []
            if isinstance(pieces, str):      # "<s> $A": the special tokens are the words not $X
                pieces = [{"SpecialToken": {"id": w.split(":")[0]}}
                          for w in pieces.split() if not w.startswith("$")]
            if not isinstance(pieces, list):
                raise ModelFormatError(f"{file}: {key}.{part} must be a list of pieces")
            for piece in pieces:
                special = piece.get("SpecialToken") if isinstance(piece, dict) else None
                if special is None:
                    continue
                name = special.get("id") if isinstance(special, dict) else None
                if not isinstance(name, str) or name not in specials:
                    raise ModelFormatError(f"{file}: {key}.{part} names the special token "
                                           f"{name!r:.60}, which {key}.special_tokens does not "
                                           "define (not in the vocabulary)")
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for part in ("sep", "cls"):
            entry = pp.get(part)
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                    and _is_int(entry[1]) and entry[1] in ids):
                raise ModelFormatError(f"{file}: {key}.{part} must be [token, id] with an id of "
                                       f"the vocabulary, got {entry!r:.80}")


def check_tokenizer_spec(spec: Any, file: str) -> None:
    """Raises ModelFormatError naming `file` and the key where a parsed
    tokenizer.json could crash or exhaust the `tokenizers` library."""
    if not isinstance(spec, dict):
        raise ModelFormatError(f"{file}: top level must be a JSON object")
    ids = _vocabulary(spec, file)
    _check_post_processor(spec.get("post_processor"), ids, file, "post_processor")


def tokenizer_from_json(text: str, file: str) -> Any:
    """A `tokenizers.Tokenizer` from the JSON text of `file`, checked first."""
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise ModelFormatError(f"{file}: not valid JSON ({e})") from None
    except RecursionError:
        raise ModelFormatError(f"{file}: JSON nested too deeply to be a tokenizer") from None
    check_tokenizer_spec(spec, file)
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_str(text)
    except BaseException as e:  # noqa: BLE001  (a Rust panic is a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise ModelFormatError(f"{file}: cannot load tokenizer ({str(e)[:300]})") from None


def load_tokenizer_file(file: str | os.PathLike) -> Any:
    """tokenizer.json -> `tokenizers.Tokenizer` (see the module docstring)."""
    file = os.fspath(file)
    try:
        with open(file, "rb") as f:
            text = f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFormatError(f"{file}: not UTF-8 text ({e})") from None
    return tokenizer_from_json(text, file)
