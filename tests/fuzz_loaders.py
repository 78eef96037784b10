"""Fuzz the model loaders: mutate a tiny safetensors checkpoint, a tiny GGUF
file, and the checkpoint's config.json and tokenizer.json; load every mutant
(rl.Model(..., device="cpu"), one forward, one text tokenized) in a pool of
subprocesses, and count what happened:

  loaded       the mutant loaded and ran a forward
  refused      ModelFormatError (the clean refusal), or another named Python
               exception (its class is counted on its own row)
  crash        the worker died by a signal (segfault, abort, ...) on it
  hang         it ran past the per-mutant alarm (SIGALRM's default action
               ends the worker even inside C code)

Mutations: byte flips, truncations, inserted bytes, deleted bytes, little-endian
integers overwritten with boundary values, and edits of the header itself (the
safetensors JSON: shapes, offsets, dtypes, names; GGUF: counts, lengths,
types); for config.json and tokenizer.json, edits of the parsed JSON at a
random place (a value replaced by a boundary number or a value of another
type, a key deleted or renamed, a value nested deeply, a token's id moved onto
another's). Mutant i of a run is a pure function of (--seed, i), so a failure is
reproduced with `--only i`.

    python tests/fuzz_loaders.py --n 10000          # table; exit 1 on a crash or hang
    python tests/fuzz_loaders.py --only 1234 -v     # one mutant, its outcome
    python tests/fuzz_loaders.py --keep DIR         # write crash/hang mutants to DIR

Not collected by pytest (no test_ prefix); tests/test_fuzz.py runs 1,000.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("safetensors", "gguf", "config", "tokenizer")
BOUNDARY = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
            0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF)

# ---------------------------------------------------------------- seed files

V, D, FF, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 40, 32, 64, 2, 2, 1, 16


def _weights(rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(vocab, D), "model.norm.weight": np.ones(D, np.float32)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = np.ones(D, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(D, np.float32)
        w[p + "self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, D)
        w[p + "self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, D)
        w[p + "self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, D)
        w[p + "self_attn.o_proj.weight"] = mat(D, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = mat(FF, D)
        w[p + "mlp.up_proj.weight"] = mat(FF, D)
        w[p + "mlp.down_proj.weight"] = mat(D, FF)
    return w


def write_safetensors_seed(directory: Path) -> Path:
    """config.json + model.safetensors (F32, one tensor F16, one BF16)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
           "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
           "tie_word_embeddings": True, "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(cfg))
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, arr in _weights(np.random.default_rng(0), V).items():
        if name.endswith("0.mlp.up_proj.weight"):
            raw, dt = arr.astype(np.float16).tobytes(), "F16"
        elif name.endswith("1.mlp.gate_proj.weight"):
            raw, dt = (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes(), "BF16"
        else:
            raw, dt = arr.tobytes(), "F32"
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
    return path


def write_tokenizer_seed(path: Path) -> Path:
    """A small byte-level BPE tokenizer.json with two added specials and a
    template post-processor, as HF checkpoints carry."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["she sold 48 clips in April and half as many in May"] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    tok.save(str(path))
    return path


def write_gguf_seed(path: Path) -> Path:
    """A tiny llama GGUF: norms F32, other weights F16 / Q8_0 / Q4_0 / Q4_1, a
    byte-level BPE vocabulary (so the tokenizer is rebuilt too)."""
    import gguf
    from rjepa_latent.checkpoints.gguf_loader import _byte_alphabet
    alphabet = [_byte_alphabet()[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>"] + alphabet + ["Ġt", "he", "Ġthe"]
    types = [3] + [1] * (len(tokens) - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(True)
    hf = _weights(np.random.default_rng(1), len(tokens))
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    sub = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
    qtypes = ["F16", "Q8_0", "Q4_0", "Q4_1"]
    for k, (name, arr) in enumerate(hf.items()):
        if name not in names:
            i, rest = name.split(".", 3)[2], name.split(".", 3)[3].rsplit(".", 1)[0]
            names[name] = f"blk.{i}.{sub[rest]}.weight"
        gname = names[name]
        q = qtypes[k % len(qtypes)]
        if arr.ndim == 1:
            w.add_tensor(gname, arr)
        elif q == "F16":
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            t = getattr(gguf.GGMLQuantizationType, q)
            w.add_tensor(gname, gguf.quants.quantize(arr, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---------------------------------------------------------------- mutations

_GGUF_FIELDS: dict[int, tuple[int, list[tuple[int, int]]]] = {}
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_layout(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """The seed's integer fields as (offset, width): version, counts, key and
    string lengths, value types, array item types and lengths, tensor n_dims,
    dims, GGML types and data offsets; and where the tensor data starts (the
    region worth editing). The seed is valid: no bounds checks here."""
    key = len(data)
    if key in _GGUF_FIELDS:
        return _GGUF_FIELDS[key]
    fields: list[tuple[int, int]] = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    off = 24

    def u(width: int) -> int:
        nonlocal off
        fields.append((off, width))
        v = int.from_bytes(data[off:off + width], "little")
        off += width
        return v

    def value(t: int) -> None:
        nonlocal off
        if t in _SCALAR:
            off += _SCALAR[t]
        elif t == 8:
            n = u(8)          # (not `off += u(8)`: that reads off before u moves it)
            off += n
        else:
            it, n = u(4), u(8)
            if it in _SCALAR:
                off += n * _SCALAR[it]
            else:
                for _ in range(n):
                    value(it)

    for _ in range(n_kv):
        n = u(8)
        off += n
        value(u(4))
    for _ in range(n_tensors):
        n = u(8)
        off += n
        for _ in range(u(4)):
            u(8)
        u(4)
        u(8)
    _GGUF_FIELDS[key] = (off + (-off % 32), fields)
    return _GGUF_FIELDS[key]


def _gguf_header_end(data: bytes) -> int:
    return _gguf_layout(data)[0]


def _edit_st_header(data: bytearray, rng: random.Random) -> bytearray:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(bytes(data[8:8 + n]))
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(9)
    weird = rng.choice([0, -1, 1, 2 ** 31, 2 ** 32 + 1, 2 ** 63, 2 ** 64, 10 ** 30, 1.5, "7", None,
                        [], {}, True])
    if op == 0:
        entry["shape"][rng.randrange(len(entry["shape"]))] = weird
    elif op == 1:
        entry["shape"] = rng.choice([[], [0], [weird], entry["shape"] * 2, "x", None])
    elif op == 2:
        entry["data_offsets"][rng.randrange(2)] = weird
    elif op == 3:
        entry["data_offsets"] = rng.choice([[], [0], [1, 2, 3], None, "0,1", entry["data_offsets"][::-1]])
    elif op == 4:
        entry["dtype"] = rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "", "f32", 3, None, "BF16",
                                     "F16", "F32"])
    elif op == 5:
        header[name + rng.choice(["", ".x", "\u0000", "é"])] = header.pop(name)
    elif op == 6:
        del header[name]
    elif op == 7:
        header[name] = rng.choice([None, 1, "s", [], {}, {"dtype": "F32"}])
    else:
        header["__metadata__"] = rng.choice([None, 1, [], {"a": 1}, {"format": ["pt"]}])
    try:
        raw = json.dumps(header).encode()
    except (TypeError, ValueError):
        return data
    length = len(raw) if rng.random() < 0.9 else rng.choice(BOUNDARY)
    return bytearray(struct.pack("<Q", length & 0xFFFFFFFFFFFFFFFF) + raw + data[8 + n:])


def _edit_gguf_header(data: bytearray, rng: random.Random) -> bytearray:
    """Overwrite one or two of the seed's integer fields (counts, lengths,
    types, dims, offsets) with a boundary value, a near miss or a random one."""
    _, fields = _gguf_layout(bytes(data))
    for _ in range(rng.choice((1, 1, 2))):
        pos, width = rng.choice(fields)
        old = int.from_bytes(data[pos:pos + width], "little")
        v = rng.choice(BOUNDARY + (old + 1, old - 1, old * 2, old + 2 ** 32, rng.randrange(2 ** 16),
                                   rng.randrange(2 ** (8 * width)), len(data)))
        data[pos:pos + width] = (v % 2 ** (8 * width)).to_bytes(width, "little")
    return data


_WEIRD_JSON = (0, -1, 1, 2 ** 31, 2 ** 31 - 1, 2 ** 32 + 1, 2 ** 63, 2 ** 64, 10 ** 30, -2 ** 63,
               1.5, 1e308, float("inf"), float("nan"), "7", "", None, True, [], {}, [1, 2], {"a": 1},
               "llama", "mistral", "<s>")


def _edit_json(data: bytearray, rng: random.Random) -> bytearray:
    """One structural edit of a JSON file at a random place: walk down a
    random path, then replace, delete, rename or add a key (or list item),
    nest a value deeply, or give a token the id of another."""
    try:
        root = json.loads(bytes(data))
    except ValueError:
        return data
    node = root
    while rng.random() < 0.65:
        children = [v for v in (node.values() if isinstance(node, dict) else node)
                    if isinstance(v, (dict, list)) and v]
        if not children:
            break
        node = rng.choice(children)
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    if not keys:
        return data
    key = rng.choice(keys)
    op = rng.randrange(7)
    if op <= 2:
        node[key] = rng.choice(_WEIRD_JSON)
    elif op == 3:
        del node[key]
    elif op == 4 and isinstance(node, dict):
        node[str(key) + rng.choice(["_", "x", "\u0000"])] = node.pop(key)
    elif op == 4:
        node.insert(key, rng.choice(_WEIRD_JSON))
    elif op == 5:
        depth = rng.choice((50, 500, 5000, 100_000))
        return bytearray(_nest(root, node, key, depth))
    else:
        other = rng.choice(keys)
        node[key] = node[other]
    try:
        return bytearray(json.dumps(root).encode())
    except (TypeError, ValueError):
        return data


def _nest(root, node, key, depth: int) -> bytes:
    """`root` as JSON with node[key] wrapped in `depth` lists (json.dumps
    itself would recurse that deep)."""
    marker = "\u0001NEST\u0001"
    value = node[key]
    node[key] = marker
    text = json.dumps(root)
    node[key] = value
    return text.replace(json.dumps(marker), "[" * depth + json.dumps(value) + "]" * depth, 1).encode()


def mutate(seed: bytes, kind: str, rng: random.Random) -> tuple[bytearray, str]:
    data = bytearray(seed)
    if kind == "safetensors":
        end = 8 + struct.unpack("<Q", seed[:8])[0]
    elif kind == "gguf":
        end = _gguf_header_end(seed)
    else:
        end = len(seed)
    ops = ("flip", "flip", "truncate", "insert", "delete", "int", "header", "header")
    if kind in ("config", "tokenizer"):   # mostly still JSON: the checks past the parser
        ops = ("flip", "truncate", "insert", "delete", "int") + ("header",) * 7
    op = rng.choice(ops)
    near = lambda: rng.randrange(0, end) if rng.random() < 0.7 else rng.randrange(0, len(data))  # noqa: E731
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            p = near()
            data[p] = rng.randrange(256) if rng.random() < 0.5 else data[p] ^ (1 << rng.randrange(8))
    elif op == "truncate":
        data = data[:rng.randrange(0, len(data))] if rng.random() < 0.7 else data[:near()]
    elif op == "insert":
        p = near()
        data[p:p] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 2, 4, 8, 13, 64))))
    elif op == "delete":
        p = near()
        del data[p:p + rng.choice((1, 2, 4, 8, 13, 64))]
    elif op == "int":
        width = rng.choice((1, 2, 4, 8))
        p = min(near(), max(0, len(data) - width))
        v = rng.choice(BOUNDARY)
        data[p:p + width] = (v & (2 ** (8 * width) - 1)).to_bytes(width, "little")
    elif kind == "safetensors":
        data = _edit_st_header(data, rng)
    elif kind == "gguf":
        data = _edit_gguf_header(data, rng)
    else:
        data = _edit_json(data, rng)
    return data, op


def mutant(seeds: dict[str, bytes], run_seed: int, i: int) -> tuple[str, bytearray, str]:
    rng = random.Random(run_seed * 1_000_003 + i)
    kind = KINDS[i % len(KINDS)]
    data, op = mutate(seeds[kind], kind, rng)
    return kind, data, op


# ---------------------------------------------------------------- the worker

def read_seeds(seed_dir: Path) -> dict[str, bytes]:
    st = seed_dir / "st"
    return {"safetensors": (st / "model.safetensors").read_bytes(),
            "gguf": (seed_dir / "model.gguf").read_bytes(),
            "config": (st / "config.json").read_bytes(),
            "tokenizer": (st / "tokenizer.json").read_bytes()}


def worker(seed_dir: str, run_seed: int, indices: list[int], alarm_s: int) -> None:
    """Loads mutants `indices` in turn; one line per mutant on stdout:
    "BEGIN i" before, "END i outcome" after (a missing END names the culprit)."""
    import resource
    import signal
    import warnings
    lim = 4 << 30   # a header asking for terabytes gets MemoryError, not the OOM killer
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)   # the default action ends the process
    warnings.simplefilter("ignore")
    import rjepa_latent as rl
    seeds = read_seeds(Path(seed_dir))
    work = Path(tempfile.mkdtemp(prefix="fuzz-"))
    st_dir = work / "st"
    st_dir.mkdir()
    st_files = {"safetensors": "model.safetensors", "config": "config.json",
                "tokenizer": "tokenizer.json"}
    # the harness's own check: FUZZ_SELFTEST="crash=3,hang=5" makes mutant 3
    # die by SIGSEGV and mutant 5 sleep past the alarm
    selftest = dict(kv.split("=") for kv in os.environ.get("FUZZ_SELFTEST", "").split(",") if kv)
    out = sys.stdout
    for i in indices:
        kind, data, _ = mutant(seeds, run_seed, i)
        if kind == "gguf":
            target = work / "m.gguf"
            target.write_bytes(bytes(data))
        else:   # the mutated file beside the other two seed files
            target = st_dir
            for k, name in st_files.items():
                (st_dir / name).write_bytes(bytes(data) if k == kind else seeds[k])
        out.write(f"BEGIN {i}\n")
        out.flush()
        signal.alarm(alarm_s)
        if selftest.get("crash") == str(i):
            os.kill(os.getpid(), signal.SIGSEGV)
        if selftest.get("hang") == str(i):
            time.sleep(alarm_s + 60)
        try:
            m = rl.Model(target, device="cpu", max_batch_tokens=32)
            m.extract([[1, 2, 3, 4]], layers=(0, -1))
            if m.tokenizer is not None:
                rl.encode_steps(m, "she sold", ["48 clips", "in May"])
            del m
            outcome = "loaded"
        except rl.ModelFormatError as e:
            outcome = "ModelFormatError" if str(e) else "ModelFormatError(empty message)"
        except Exception as e:  # noqa: BLE001  (named, counted on its own row)
            outcome = type(e).__name__
        signal.alarm(0)
        out.write(f"END {i} {outcome}\n")
        out.flush()


def _run_batch(seed_dir: str, run_seed: int, indices: list[int], alarm_s: int,
               verbose: bool) -> dict[int, str]:
    """Outcomes of `indices`; a worker that dies is restarted after the culprit."""
    import signal
    results: dict[int, str] = {}
    todo = list(indices)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", seed_dir, str(run_seed),
               ",".join(map(str, todo)), str(alarm_s)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=alarm_s * (len(todo) + 2) + 30)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:  # should not happen: the alarm fires first
            rc, stdout, stderr = -signal.SIGALRM, e.stdout or "", e.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        begun = None
        for line in stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "BEGIN":
                begun = int(parts[1])
            elif len(parts) >= 3 and parts[0] == "END":
                results[int(parts[1])] = parts[2]
                begun = None
        if rc == 0 and begun is None:
            break
        if begun is None:   # died outside a mutant (import, setup): report the rest
            for i in todo:
                results.setdefault(i, f"worker-error(rc={rc})")
            if verbose:
                print(stderr[-3000:], file=sys.stderr)
            break
        if rc == -signal.SIGALRM:
            results[begun] = "hang"
        else:
            name = signal.Signals(-rc).name if rc < 0 else f"exit {rc}"
            results[begun] = f"crash({name})"
        if verbose:
            print(f"mutant {begun}: {results[begun]}\n{stderr[-2000:]}", file=sys.stderr)
        todo = [i for i in todo if i not in results]
    return results


def _category(outcome: str) -> str:
    if outcome == "loaded":
        return "loaded"
    if outcome == "hang":
        return "hang"
    if outcome.startswith(("crash", "worker-error")):
        return "crash"
    return "refused"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], int(argv[2]), [int(x) for x in argv[3].split(",")], int(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="mutants (a quarter each kind)")
    ap.add_argument("--seed", type=int, default=0, help="run seed (mutant i is f(seed, i))")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=0, help="mutants per subprocess (0: n/jobs/4)")
    ap.add_argument("--alarm", type=int, default=10, help="seconds per mutant before it is a hang")
    ap.add_argument("--only", type=int, nargs="*", help="just these mutant indices")
    ap.add_argument("--keep", type=Path, help="write the crash/hang mutants here")
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON line too")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-seeds-")
    seed_dir = Path(tmp.name)
    write_safetensors_seed(seed_dir / "st")
    write_tokenizer_seed(seed_dir / "st" / "tokenizer.json")
    write_gguf_seed(seed_dir / "model.gguf")
    indices = args.only if args.only else list(range(args.n))
    batch = args.batch or max(1, min(250, -(-len(indices) // (args.jobs * 4))))
    chunks = [indices[k:k + batch] for k in range(0, len(indices), batch)]
    results: dict[int, str] = {}
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(_run_batch, str(seed_dir), args.seed, c, args.alarm, args.verbose)
                for c in chunks]
        for f in futs:
            results.update(f.result())
    elapsed = time.time() - t0

    seeds = read_seeds(seed_dir)
    table: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    cats: dict[str, collections.Counter] = {k: collections.Counter() for k in KINDS}
    bad = []
    for i, outcome in sorted(results.items()):
        kind, data, op = mutant(seeds, args.seed, i)
        table[kind][outcome] += 1
        cats[kind][_category(outcome)] += 1
        if _category(outcome) in ("crash", "hang"):
            bad.append((i, kind, op, outcome))
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                (args.keep / f"{i}-{kind}-{op}.bin").write_bytes(bytes(data))
        if args.verbose and args.only:
            print(f"mutant {i}: {kind} {op} -> {outcome}")

    rows = sorted({o for c in table.values() for o in c}, key=lambda o: (_category(o) != "loaded",
                                                                       _category(o), o))
    print(f"{len(results)} mutants in {elapsed:.1f} s ({args.jobs} jobs, batches of {batch}, "
          f"alarm {args.alarm} s, seed {args.seed})")
    print(f"{'outcome':<34}" + "".join(f"{k:>12}" for k in KINDS) + f"{'total':>8}")
    for o in rows:
        label = o if _category(o) != "refused" or o == "ModelFormatError" else f"{o} (other)"
        print(f"{label:<34}" + "".join(f"{table[k][o]:>12}" for k in KINDS)
              + f"{sum(table[k][o] for k in KINDS):>8}")
    print("-" * (42 + 12 * len(KINDS)))
    for c in ("loaded", "refused", "crash", "hang"):
        print(f"{c:<34}" + "".join(f"{cats[k][c]:>12}" for k in KINDS)
              + f"{sum(cats[k][c] for k in KINDS):>8}")
    for i, kind, op, outcome in bad[:20]:
        print(f"  FAIL mutant {i} ({kind}, {op}): {outcome}   rerun: --seed {args.seed} --only {i} -v")
    if args.json:
        print("FUZZJSON " + json.dumps({k: dict(v) for k, v in cats.items()}
                                       | {"outcomes": {k: dict(v) for k, v in table.items()},
                                          "seconds": round(elapsed, 1)}))
    tmp.cleanup()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
