"""llama.cpp as a peer in the CPU benchmarks (tests/bench_cpu.py, tests/bench_quant.py).

- `find_or_build(spec)`: `off` -> None; a path -> the llama.cpp build there (a
  directory holding `llama-embedding`, or a build directory with `bin/`);
  `auto` -> the newest build in the cache, else builds one: downloads the
  `llama-cpp-python` sdist (package registry; it vendors llama.cpp), unpacks
  it and builds `llama-embedding` and `llama-bench` with cmake (Release,
  GGML_NATIVE) into `$RJEPA_CACHE_DIR` (else `$XDG_CACHE_HOME/rjepa_latent`,
  else `~/.cache/rjepa_latent`)`/llama.cpp-<version>/`. Needs cmake and a C++
  compiler; minutes of build on a few cores. A build is checked by running it
  on a one-layer cut of the default model; when the native build dies on a
  signal (some virtual machines list AMX in /proc/cpuinfo but fault on its
  instructions), ggml's CPU backend is rebuilt for the CPU's listed
  extensions without AMX, and said so.
- `LlamaCpp.embed(gguf, texts, ...)`: llama.cpp's prompt processing over
  `texts` with `llama-embedding` (mean pooling, every text, packed into
  batches of up to `ctx` tokens like this engine's packed batches, causal
  attention so the ubatch size holds): the time from its first batch to its
  end (from its log's time stamps: the prompt-eval time of its perf report
  stops before the CPU backend's work ends in this version and reads ~0 ms),
  the tokens of every text (to check the tokenizer against ours), the
  process's peak RSS. It runs with GOMP_SPINCOUNT=0 unless the environment
  sets it, as this engine sets for itself: with the default spinning, idle
  OpenMP workers starve the working ones on a busy machine (a 2-thread
  run took 2.7x the time of a 1-thread one here).
- `LlamaCpp.bench(gguf, n_prompt, ...)`: `llama-bench -p N -n 0`, a synthetic
  check (random tokens, one sequence).
- `rewrite_gguf`: a GGUF copied with its tensors dequantized to F32 and/or its
  depth cut to the layers a job runs, and `padded_vocab`: a GGUF file's
  tokenizer metadata with its token list padded to a model's vocabulary size.

Texts contain newlines (chains of thought do), so they are passed in one file
joined by a separator string (`--embd-separator`), never split on newlines.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SEPARATOR = "\n<|rjepa-text-separator|>\n"
TARGETS = ("llama-embedding", "llama-bench")
# log lines start with the time since start, minutes.seconds.ms.us
STAMP = r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I "
FIRST_RE = re.compile(STAMP + r"batch_decode: n_tokens", re.M)
LAST_RE = re.compile(STAMP + r"llama_perf_context_print:", re.M)
LOAD_RE = re.compile(r"load time =\s*([0-9.]+) ms")
COUNT_RE = re.compile(r"number of tokens in prompt = (\d+)")
TOKEN_RE = re.compile(r"^\s*(\d+) -> '", re.M)


def say(msg: str) -> None:
    print(f"llama.cpp: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where builds live: the project's cache directory (as the store's notes)."""
    if os.environ.get("RJEPA_CACHE_DIR"):
        return Path(os.environ["RJEPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rjepa_latent"


def _bin_dir(path: Path) -> Path | None:
    for d in (path, path / "bin", path / "build" / "bin"):
        if (d / "llama-embedding").is_file():
            return d
    return None


# /proc/cpuinfo flag -> ggml's cmake option, for a build without -march=native (nor AMX)
ISA_OPTIONS = {"sse4_2": "GGML_SSE42", "f16c": "GGML_F16C", "fma": "GGML_FMA", "bmi2": "GGML_BMI2",
               "avx": "GGML_AVX", "avx2": "GGML_AVX2", "avx_vnni": "GGML_AVX_VNNI",
               "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vbmi": "GGML_AVX512_VBMI",
               "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}
AVX512 = {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}   # ggml's GGML_AVX512
CHECKED = "rjepa-checked"   # marker file in a build directory that passed the check


def _cpu_isa_options() -> list[str]:
    flags: set[str] = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    opts = {ISA_OPTIONS[f] for f in flags if f in ISA_OPTIONS}
    if AVX512 <= flags:
        opts.add("GGML_AVX512")
    return [f"-D{o}=ON" for o in sorted(opts)]


def _version_key(p: Path) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", p.name.split("-", 1)[1]))


def find_or_build(spec: str) -> "LlamaCpp | None":
    """The llama.cpp that `spec` (off, auto or a path) names, built when `auto`
    finds none; ValueError for a path without llama-embedding."""
    if spec == "off":
        return None
    if spec != "auto":
        d = _bin_dir(Path(spec).expanduser())
        if d is None:
            raise ValueError(f"--llama-cpp {spec}: no llama-embedding there (nor in bin/ or "
                             "build/bin/); give a llama.cpp build directory, or auto to build one")
        return LlamaCpp(d)
    builds = sorted((p for p in cache_root().glob("llama.cpp-*") if _bin_dir(p / "build")),
                    key=_version_key)
    if builds:
        home = builds[-1]
        say(f"using the build in {home}")
        if not (home / "build" / CHECKED).exists():
            _checked(home)
        return LlamaCpp(_bin_dir(home / "build"))
    return LlamaCpp(build(cache_root()))


def _source(home: Path) -> Path:
    return next(home.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _compile(home: Path, native: bool) -> None:
    out = home / "build"
    isa = ["-DGGML_NATIVE=ON"] if native else ["-DGGML_NATIVE=OFF", *_cpu_isa_options()]
    log = home / "build.log"
    say(f"configuring with cmake (Release, {' '.join(i[2:] for i in isa)}) in {out}; "
        f"compiler output in {log}")
    with open(log, "a") as f:
        for step, cmd in (("configure", ["cmake", "-S", str(_source(home)), "-B", str(out),
                                         "-DCMAKE_BUILD_TYPE=Release", *isa, "-DLLAMA_CURL=OFF",
                                         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                                         "-DLLAMA_BUILD_SERVER=OFF"]),
                          ("build", ["cmake", "--build", str(out), "-j", str(os.cpu_count() or 1),
                                     "--target", *TARGETS])):
            if step == "build":
                say(f"building {', '.join(TARGETS)} on {os.cpu_count()} cores (minutes)")
            t = time.perf_counter()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"llama.cpp's cmake {step} failed; see {log}")
    say(f"built in {time.perf_counter() - t:.0f} s")


def _check(bin_dir: Path) -> int:
    """Exit status of llama-embedding on a one-layer cut of the default model."""
    from rjepa_latent.checkpoints.default_model import default_model_path
    with tempfile.TemporaryDirectory() as d:
        g = rewrite_gguf(default_model_path(), Path(d) / "check.gguf", f32=False, layers=1)
        r = subprocess.run([str(bin_dir / "llama-embedding"), "-m", str(g), "-p", "2 + 2 = 4",
                            "--pooling", "mean", "-t", "1"], capture_output=True)
    return r.returncode


def _checked(home: Path) -> None:
    """Check the build; rebuild without -march=native (AMX) when it dies on a signal."""
    bin_dir = home / "build" / "bin"
    code = _check(bin_dir)
    if code < 0:
        say(f"the native build died on signal {-code} (this CPU lists AMX, which faults on "
            "some virtual machines): rebuilding ggml's CPU backend without AMX")
        _compile(home, native=False)
        code = _check(bin_dir)
    if code != 0:
        raise RuntimeError(f"{bin_dir}/llama-embedding fails on a one-layer model (exit {code})")
    (home / "build" / CHECKED).touch()


def build(root: Path) -> Path:
    """Download the llama-cpp-python sdist, unpack it under `root` and build
    the tools; returns the directory of the binaries."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool} on PATH")
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-", dir=root) as d:
        say("downloading the llama-cpp-python sdist (it vendors llama.cpp) from the package index")
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "-d", d, "llama-cpp-python"]
        # --no-build-isolation spares pip a build environment just to read metadata
        if subprocess.run(base + ["--no-build-isolation"]).returncode != 0:
            subprocess.run(base, check=True)
        sdist = next(Path(d).glob("llama_cpp_python-*.tar.gz"))
        version = sdist.name[len("llama_cpp_python-"):-len(".tar.gz")]
        home = root / f"llama.cpp-{version}"
        say(f"unpacking {sdist.name} into {home}")
        with tarfile.open(sdist) as tar:
            tar.extractall(home, filter="data")
    _compile(home, native=True)
    _checked(home)
    return home / "build" / "bin"


@dataclass
class Run:
    """One llama-embedding run over a list of texts."""
    tokens: int                   # tokens of all texts, as llama.cpp tokenized them
    seconds: float                # from its first batch to its end
    load_s: float
    wall_s: float
    peak_rss: int                 # bytes (the process's max RSS, mapped file pages included)
    text_tokens: list[int]        # tokens of each text, as llama.cpp tokenized them
    token_ids: list[list[int]] = field(default_factory=list)
    ubatch: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class LlamaCpp:
    def __init__(self, bin_dir: Path):
        self.bin = Path(bin_dir)
        r = subprocess.run([str(self.bin / "llama-embedding"), "--version"], capture_output=True,
                           text=True)
        m = re.search(r"^version: (.*)$", r.stdout + r.stderr, re.M)
        self.version = m.group(1).strip() if m else "unknown version"
        sdist = next(self.bin.parent.parent.glob("llama_cpp_python-*"), None)
        if sdist is not None:   # a cached build: name the sdist it came from
            self.version += f", from {sdist.name}"

    def _run(self, cmd: list[str]) -> tuple[str, int, float]:
        """stdout+stderr, peak RSS in bytes (this child's, from wait4), wall seconds."""
        env = {"GOMP_SPINCOUNT": "0", **os.environ}
        with tempfile.TemporaryFile() as log:
            t = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t
            p.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            out = log.read().decode("utf-8", "replace")
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
        return out, usage.ru_maxrss * 1024, wall

    def embed(self, gguf: str | Path, texts: list[str], *, threads: int, ctx: int = 2048,
              ubatch: int = 512) -> Run:
        if any(SEPARATOR in t for t in texts):
            raise ValueError("a text contains the separator string")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
            # llama-embedding drops one trailing newline of the file: keep the last text whole
            f.write(SEPARATOR.join(texts) + "\n")
            f.flush()
            cmd = [str(self.bin / "llama-embedding"), "-m", str(gguf), "-f", f.name,
                   "--embd-separator", SEPARATOR, "--pooling", "mean", "--attention", "causal",
                   "-t", str(threads),
                   "-tb", str(threads), "-c", str(ctx), "-b", str(ctx), "-ub", str(ubatch),
                   "--verbose-prompt", "-lv", "4"]   # 4: the time stamps and the perf report
            out, rss, wall = self._run(cmd)
        first, last = FIRST_RE.search(out), LAST_RE.search(out)
        if first is None or last is None:
            raise RuntimeError(f"no batch or perf report in llama-embedding's output:\n{out[-2000:]}")
        sec = [int(a) * 60 + int(b) + int(c) / 1e3 + int(d) / 1e6
               for a, b, c, d in (first.groups(), last.groups())]
        load = LOAD_RE.search(out)
        counts = [int(c) for c in COUNT_RE.findall(out)]
        ids = [int(i) for i in TOKEN_RE.findall(out)]
        per_text, k = [], 0
        if sum(counts) == len(ids):
            for c in counts:
                per_text.append(ids[k:k + c])
                k += c
        return Run(sum(counts), sec[1] - sec[0], float(load.group(1)) / 1e3 if load else 0.0,
                   wall, rss, counts, per_text, ubatch)

    def best_embed(self, gguf, texts, *, threads: int, ctx: int = 2048,
                   ubatches=(256, 512, 2048), repeats: int = 1) -> tuple[Run, list[Run]]:
        """The fastest of `repeats` rounds over each ubatch size (interleaved)."""
        runs = [self.embed(gguf, texts, threads=threads, ctx=ctx, ubatch=u)
                for _ in range(repeats) for u in ubatches if u <= ctx]
        return max(runs, key=lambda r: r.tokens_per_s), runs

    def bench(self, gguf, n_prompt: int, *, threads: int, ubatch: int = 512,
              repeats: int = 3) -> float:
        """llama-bench -p N -n 0: prompt tokens/s (random tokens, one sequence)."""
        import json
        cmd = [str(self.bin / "llama-bench"), "-m", str(gguf), "-p", str(n_prompt), "-n", "0",
               "-t", str(threads), "-ub", str(ubatch), "-r", str(repeats), "-o", "json"]
        out, _, _ = self._run(cmd)
        rows = json.loads(out[out.index("["):out.rindex("]") + 1])
        return float(rows[0]["avg_ts"])


# ------------------------------------------------------------------ GGUF files

def _copy_fields(reader, writer, skip: set[str], replace: dict) -> None:
    import gguf
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        if key in replace:
            value, vtype, sub = replace[key]
        else:
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = f.contents()
        writer.add_key_value(key, value, vtype, sub_type=sub)


def padded_vocab(src: str | Path, n_vocab: int) -> dict:
    """The tokenizer metadata (tokenizer.*) of GGUF `src`, its token list padded
    to `n_vocab` with unused tokens (never produced by the tokenizer), as
    {key: (value, type, array element type)} for `write_fields`."""
    import gguf
    V = gguf.GGUFValueType
    r = gguf.GGUFReader(str(src))
    out = {}
    for key, f in r.fields.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            vtype = f.types[0]
            out[key] = (f.contents(), vtype, f.types[-1] if vtype == V.ARRAY else None)
    tokens = out["tokenizer.ggml.tokens"][0]
    extra = n_vocab - len(tokens)
    if extra < 0:
        raise ValueError(f"{src}: {len(tokens)} tokens, more than the model's vocabulary {n_vocab}")
    out["tokenizer.ggml.tokens"] = (tokens + [f"<|unused-{i}|>" for i in range(extra)],
                                    V.ARRAY, V.STRING)
    types = out["tokenizer.ggml.token_type"]
    out["tokenizer.ggml.token_type"] = (list(types[0]) + [int(gguf.TokenType.UNUSED)] * extra,
                                        V.ARRAY, types[2])
    if "tokenizer.ggml.scores" in out:
        s = out["tokenizer.ggml.scores"]
        out["tokenizer.ggml.scores"] = (list(s[0]) + [0.0] * extra, V.ARRAY, s[2])
    return out


def write_fields(writer, fields: dict) -> None:
    for key, (value, vtype, sub) in fields.items():
        writer.add_key_value(key, value, vtype, sub_type=sub)


def rewrite_gguf(src: str | Path, dst: str | Path, *, f32: bool, layers: int | None = None) -> Path:
    """GGUF `src` copied to `dst` with every tensor dequantized to F32 (`f32`)
    or kept as stored, and only its first `layers` blocks (the layers a job up
    to layer `layers` runs; llama.cpp then runs exactly those)."""
    import gguf
    import numpy as np
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    n = int(r.fields[f"{arch}.block_count"].contents())
    keep = n if layers is None else layers
    if not 1 <= keep <= n:
        raise ValueError(f"{src}: cannot keep {layers} of its {n} layers")
    w = gguf.GGUFWriter(str(dst), arch)
    V = gguf.GGUFValueType
    replace = {f"{arch}.block_count": (keep, V.UINT32, None)}
    if f32:
        replace["general.file_type"] = (int(gguf.LlamaFileType.ALL_F32), V.UINT32, None)
    _copy_fields(r, w, set(), replace)
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m and int(m.group(1)) >= keep:
            continue
        if f32 and t.tensor_type != gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, np.ascontiguousarray(
                gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        else:
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def workload_texts(data: str, tokenizer, n: int, max_tokens: int | None):
    """(texts, token ids, step spans) of the `n` sequences `rjepa-latent bench`
    makes from `data` with `tokenizer` (the same records, template and cycling)."""
    from rjepa_latent.inputs.data import ErrorRecord, read_records
    from rjepa_latent.inputs.tokenize import Item, prepare_tokenizer, tokenize_records
    records = [r for r in read_records([data]) if not isinstance(r, ErrorRecord)]
    items = [t for t in tokenize_records(prepare_tokenizer(tokenizer), records, max_tokens)
             if isinstance(t, Item)]
    chosen = [items[i % len(items)] for i in range(n)]
    return ([it.text for it in chosen], [it.ids.tolist() for it in chosen],
            [it.spans for it in chosen])


def check_tokens(run: Run, ours: list[list[int]]) -> str:
    """Whether llama.cpp tokenized every text as we did: a line for the report."""
    n_ours = sum(len(x) for x in ours)
    if run.text_tokens != [len(x) for x in ours]:
        bad = sum(a != len(b) for a, b in zip(run.text_tokens, ours))
        return (f"token counts DIFFER: llama.cpp {sum(run.text_tokens)}, ours {n_ours} "
                f"({bad} of {len(ours)} texts differ)")
    same = "same token ids" if run.token_ids == ours else (
        "same counts, ids not compared" if not run.token_ids else "same counts, DIFFERENT ids")
    return f"llama.cpp tokenized the {len(ours)} texts into {n_ours} tokens, as we did ({same})"
