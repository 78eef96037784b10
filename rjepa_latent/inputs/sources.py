"""Input files and Datasets: what a DATA path is (sniffed before any work), and
its raw records, lazily and in order (.jsonl, .json, .parquet, .gz, a
`datasets.Dataset`), with the line or row each came from."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator


DATASET_SOURCE = "dataset"   # the source name of a datasets.Dataset's records
PARQUET_SUFFIXES = (".parquet", ".pq")



class InputFileError(ValueError):
    """A data file that is not records at all (binary, not UTF-8, not JSON):
    refused up front, naming the file and what it looks like."""


SNIFF_BYTES = 1 << 16   # how much of each data file is looked at before any work


GZ_SUFFIXES = (".jsonl.gz", ".json.gz")


_DATA_HINT = "DATA takes .jsonl, .json (an array), .parquet / .pq, .jsonl.gz or .json.gz files of records"


# magic bytes -> (what it is, what to do); Parquet has its own suffix, gzip its own when named .gz
_MAGIC = (
    (b"GGUF", "a GGUF model file", "pass it as --model, not as data"),
    (b"PK\x03\x04", "a zip archive (a PyTorch .bin / .pt checkpoint is one)",
     "unzip it and pass the records inside"),
    (b"\x1f\x8b", "gzip-compressed data", "name it .jsonl.gz or .json.gz to have it read as such"),
    (b"PAR1", "a Parquet file", "name it .parquet"),
    (b"\xfd7zXZ\x00", "xz-compressed data", "decompress it (xz -d)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data", "decompress it (zstd -d)"),
    (b"BZh", "bzip2-compressed data", "decompress it (bunzip2)"),
    (b"\x89PNG", "a PNG image", ""), (b"%PDF", "a PDF document", ""),
    (b"\x7fELF", "an executable (ELF)", ""),
    (b"\xff\xfe", "UTF-16 text (little-endian byte order mark)", "convert it: iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 text (big-endian byte order mark)", "convert it: iconv -f UTF-16 -t UTF-8"),
)


_BLANK = " \t\n\r\x0b\x0c"            # what a blank line may hold (ASCII whitespace, as before)


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")   # an undecodable byte, under errors="surrogateescape"


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _kind(path: Path) -> str:
    """'parquet', 'json' or 'jsonl' (any other suffix is read as JSON Lines, as before)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "json" if name.endswith((".json", ".json.gz")) else "jsonl"


def source_stem(name: str) -> str:
    """The default-id prefix of a source: its file name without the suffix (`.gz` too)."""
    if name == DATASET_SOURCE:
        return name
    p = Path(name)
    return Path(p.stem).stem if p.name.lower().endswith(GZ_SUFFIXES) else p.stem


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if _is_gz(path) else open(path, "rb")


def _refuse(path: Path, what: str, todo: str = "") -> InputFileError:
    return InputFileError(f"input file {str(path)!r} {what}; {todo + '; ' if todo else ''}{_DATA_HINT}; "
                          "nothing was written")


def sniff_input(path: Path) -> None:
    """Refuses (InputFileError) a data file that cannot hold records, from its
    first 64 KiB (decompressed, for .gz): a known binary magic (GGUF,
    safetensors, zip, gzip not named .gz, ...), NUL bytes, no UTF-8 line, or
    no line that starts like JSON. Records in a file that passes are judged
    one by one (a bad one is an error record)."""
    kind = _kind(path)
    if kind == "parquet":
        _open_parquet(path)
        return
    if _is_gz(path) and not path.name.lower().endswith(GZ_SUFFIXES):
        raise _refuse(path, "is compressed data of an unknown kind", "only .jsonl.gz and .json.gz are read")
    try:
        with _open_bytes(path) as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise _refuse(path, f"is named .gz but is not readable gzip data ({e})",
                      "compress it with gzip, or drop the .gz from its name") from None
    cut = len(head) == SNIFF_BYTES      # the sample may end inside a line
    for magic, what, todo in _MAGIC:
        if head.startswith(magic):
            raise _refuse(path, f"is not JSON text: it starts with {magic[:4]!r}, the mark of {what}", todo)
    if len(head) >= 10 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (1 << 31):
        raise _refuse(path, "is not JSON text: it is a safetensors file (model weights)",
                      "pass its checkpoint directory as --model, not as data")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    nul = head.find(b"\x00")
    if nul >= 0:
        odd = head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4
        what = ("looks like UTF-16 text without a byte order mark (NUL bytes every other byte)" if odd
                else f"is a binary file, not JSON text (a NUL byte at byte {nul})")
        raise _refuse(path, what, "convert it: iconv -f UTF-16 -t UTF-8" if odd else "")
    lines = re.split(rb"\r\n|\n|\r", head)
    if cut and len(lines) > 1:
        lines.pop()                      # an incomplete last line
    lines = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip(_BLANK.encode())]
    if not lines:
        return                           # empty, or blank lines only: no records
    decoded, first_bad, last = [], None, lines[-1][0]
    for i, ln in lines:
        try:
            decoded.append((i, ln.decode("utf-8")))
        except UnicodeDecodeError as e:
            if cut and i == last and e.reason == "unexpected end of data":
                decoded.append((i, ln[:e.start].decode("utf-8")))   # a character cut by the sample
            elif first_bad is None:
                first_bad = (i, e)
    if not decoded:
        i, e = first_bad
        raise _refuse(path, f"is not UTF-8 text: line {i} has byte 0x{e.object[e.start]:02x} at byte "
                            f"{e.start} (Latin-1 or Windows-1252 text?)",
                      "convert it to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8")
    first = decoded[0][1].lstrip(_BLANK)
    if kind == "json":
        if not first.startswith(("[", "{")):
            raise _refuse(path, f"is not JSON: it starts with {first[:40]!r}", "a .json input is one array "
                          "of record objects")
        return
    if first.rstrip(_BLANK) == "[":
        raise _refuse(path, "is not JSON Lines: its first line is '[' (a JSON array spread over lines)",
                      "name it .json to read it as one array of records")
    if not any(t.lstrip(_BLANK).startswith(("{", "[")) for _, t in decoded):
        what = f"is not JSON Lines: no line starts with '{{' (line {decoded[0][0]} reads {first[:40]!r}"
        what += ", a CSV header?)" if "," in first and "{" not in first else ")"
        raise _refuse(path, what, "each line must be one JSON object (a record)")


def _json_number(s: str) -> float:
    """JSON float hook: a number too large for a float (1e999) is not let through as inf."""
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:40]} is out of the range of a float")
    return v


def _json_constant(name: str) -> float:
    """NaN, Infinity, -Infinity (what Python's json module writes): read as those
    floats, so a JSONL record follows the one rule of Parquet and Dataset rows:
    a non-finite number in a carried field is stored as null and named in the
    item's `nonfinite_fields` (store._sidecar_row); anywhere else it is the
    field's usual type error."""
    return float(name)


_DECODER = json.JSONDecoder(parse_float=_json_number, parse_constant=_json_constant)   # built once


def _loads(text: str):
    """json.loads, refusing numbers that overflow a float (NaN / Infinity are read: `_json_constant`);
    nesting too deep for the parser is a ValueError, not a RecursionError."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise _TooDeep("record is nested too deeply: objects / arrays inside each other deeper than the "
                       f"JSON parser takes (about {sys.getrecursionlimit()} levels); flatten it") from None


class _TooDeep(ValueError):
    """JSON nested beyond the parser's recursion limit."""


def _utf8_reason(line: str) -> str:
    """Where the first undecodable byte of a line (read with surrogateescape) is."""
    m = _ESCAPED_BYTE.search(line)
    at = len(line[:m.start()].encode("utf-8", "surrogateescape"))
    return (f"line is not valid UTF-8: byte 0x{ord(m.group()) - 0xdc00:02x} at byte {at} of the line; "
            "convert the file to UTF-8 (e.g. iconv -f WINDOWS-1252 -t UTF-8)")


def _iter_raw(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Yield (line, parsed value, parse error) for each record of one file;
    `.jsonl.gz` / `.json.gz` are decompressed on the fly."""
    kind = _kind(path)
    if kind == "parquet":
        yield from _iter_parquet(path)
        return
    if kind == "json":
        yield from _iter_json(path)
        return
    lineno = 0
    try:
        with _open_bytes(path) as raw:
            head = raw.read(SNIFF_BYTES)
        # \n ends a line (\r\n too: the \r is JSON whitespace), and so does a lone \r in a
        # file of old Mac line endings (no \n at all in its first 64 KiB; elsewhere a raw \r
        # is whitespace between JSON tokens, as before); undecodable bytes are kept, to name them
        cr_only = b"\r" in head and b"\n" not in head
        with _open_bytes(path) as raw:
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape",
                                 newline=None if cr_only else "\n")
            for lineno, line in enumerate(f, 1):
                if not line.strip(_BLANK):
                    continue  # blank lines are not records
                if line.startswith("\ufeff"):
                    line = line[1:]   # a byte order mark where files were concatenated
                if _ESCAPED_BYTE.search(line):
                    yield lineno, line, _utf8_reason(line)
                    continue
                try:
                    yield lineno, _loads(line), None
                except ValueError as e:  # the raw text, to salvage the id
                    yield lineno, line, str(e) if isinstance(e, _TooDeep) else f"invalid JSON: {e}"
    except (OSError, EOFError, zlib.error) as e:
        if not _is_gz(path):
            raise
        raise InputFileError(f"input file {str(path)!r}: the gzip data is damaged or truncated after line "
                             f"{lineno} ({e}); re-create the file "
                             "(gzip -t tests it)") from None


def _iter_json(path: Path) -> Iterator[tuple[int, object, str | None]]:
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        if not _is_gz(path):
            raise
        raise InputFileError(f"input file {str(path)!r}: the gzip data is damaged or truncated ({e}); "
                             "re-create the file (gzip -t tests it)") from None
    try:
        value = _loads(data.decode("utf-8-sig"))  # a BOM is not an error
    except UnicodeDecodeError as e:
        yield 1, None, (f"file is not valid UTF-8: byte 0x{e.object[e.start]:02x} at byte {e.start}; "
                        "convert it to UTF-8")
        return
    except _TooDeep as e:
        yield 1, None, str(e).replace("record is", "the file is", 1)
        return
    except ValueError as e:
        hint = ("; it looks like JSON Lines (one object per line): name it .jsonl"
                if "Extra data" in str(e) and data.lstrip(_BLANK.encode() + b"\xef\xbb\xbf").startswith(b"{")
                else "")
        yield 1, None, f"file is not valid JSON: {e}{hint}"
        return
    if not isinstance(value, list):
        yield 1, None, f"a .json input must be an array of records, got {type(value).__name__}"
        return
    for i, v in enumerate(value):
        yield i + 1, v, None


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'pyarrow>=14'") from None
    return pyarrow


def _open_parquet(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"input file {str(path)!r} is not a readable Parquet file: {e}; check that it "
                             "was written completely (or re-export it); nothing was written") from None


def _iter_parquet(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """Rows in file order (row groups in order), line = row index + 1; the
    values are Arrow's `to_pylist` (struct -> dict, list -> list)."""
    pa = _pyarrow()
    pf = _open_parquet(path)
    line = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                line += 1
                yield line, row, None
    except pa.ArrowException as e:   # damage inside the file: no row count to go on with
        raise ValueError(f"input file {str(path)!r}: cannot read Parquet after row {line}: {e}") from None


def is_dataset(obj: object) -> bool:
    """Whether `obj` is an HF datasets.Dataset (TypeError for the other datasets
    containers, which have no one record order or no length)."""
    datasets = sys.modules.get("datasets")   # not imported: it cannot be one
    if datasets is None or isinstance(obj, (str, os.PathLike, list, tuple)):
        return False
    if isinstance(obj, datasets.Dataset):
        return True
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"a {type(obj).__name__} holds several splits: pick one (ds['test'])")
    if isinstance(obj, datasets.IterableDataset):
        raise TypeError("an IterableDataset has no length or fingerprint; materialize it "
                        "(datasets.Dataset.from_generator or .from_list)")
    return False


def _iter_dataset(ds) -> Iterator[tuple[int, object, str | None]]:
    """Rows of a datasets.Dataset in its order (selections and shuffles
    included), as Arrow rows -> Python values (whatever `with_format` it has)."""
    line = 0
    for table in ds.with_format("arrow").iter(batch_size=1024):
        for row in table.to_pylist():
            line += 1
            yield line, row, None


def dataset_fingerprint(ds) -> dict:
    """The identity of a datasets.Dataset: its row count and the sha256 of its
    rows as read (JSON of each row's values, in order), so the same rows give
    the same fingerprint whatever the cache, the chunking or the datasets version."""
    h = hashlib.sha256()
    n = 0
    for _, row, _ in _iter_dataset(ds):
        h.update(json.dumps(row, ensure_ascii=False, default=repr).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
        n += 1
    return {"name": DATASET_SOURCE, "rows": n, "sha256": h.hexdigest()}


def input_sources(inputs: Any) -> list[tuple[str, Callable[[], Iterator]]]:
    """(source name, row iterator factory) of each input: files (checked to exist
    and sniffed, `sniff_input`; a Parquet file's footer checked) or one datasets.Dataset."""
    if is_dataset(inputs):
        return [(DATASET_SOURCE, lambda: _iter_dataset(inputs))]
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist or is not a file")
        sniff_input(p)   # binary, not UTF-8, not JSON: refused now, naming the file
    return [(p.name, (lambda p=p: _iter_raw(p))) for p in paths]
