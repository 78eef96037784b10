"""The package's shape, read from its source: imports point one way down the
flow (cli/tools -> run -> inputs, engine, store -> checkpoints -> the core), no
import circle between modules (module-level and function-level imports both
count), no module over MAX_LINES, no call circle between the C files of csrc/,
the public names of the API still import, and the module map of
docs/internals.md lists every module and nothing else."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rjepa_latent"
MAX_LINES = 800

# what each stage may import (besides itself); `api` is the public face
# (rjepa_latent/__init__.py and the re-export modules torch, ray,
# default_model): only the CLI may import it, never a stage
ALLOWED = {
    "core": set(),
    "checkpoints": {"core"},
    "engine": {"checkpoints", "core"},
    "inputs": {"checkpoints", "core"},
    "store": {"engine", "checkpoints", "core"},
    "run": {"inputs", "engine", "store", "checkpoints", "core"},
    "integrations": {"run", "inputs", "engine", "store", "checkpoints", "core"},
    "tools": {"run", "inputs", "engine", "store", "checkpoints", "core"},
    "api": {"integrations", "tools", "run", "inputs", "engine", "store", "checkpoints", "core"},
    "cli": {"api", "integrations", "tools", "run", "inputs", "engine", "store", "checkpoints", "core"},
    # helpers for users' test suites (and the pytest plugin): they use the
    # public API like a user would, and nothing in the package imports them
    "testing": {"api", "integrations", "tools", "run", "inputs", "engine", "store", "checkpoints",
                "core"},
}
STAGES = {"checkpoints", "engine", "inputs", "store", "run", "integrations", "tools", "testing"}
CORE = {"errors", "_native", "_core"}
API = {"__init__", "torch", "ray", "default_model"}

# the public names of the API: rjepa_latent's __all__ and the modules the
# README and docs/ tell users to import
PUBLIC = {
    "rjepa_latent": [
        "DeviceError", "DeviceMemoryError", "ModelFormatError", "StoreError", "InputError", "SequenceError",
        "SequenceTypeError", "TokenIdError", "SequenceLengthError", "SpanError", "SpanTypeError", "LayerError",
        "LayerTypeError", "build_info", "Model", "memory_plan", "check_parity", "extract_dataset",
        "open_latents", "encode_steps", "__version__"],
    "rjepa_latent.torch": ["LatentDataset", "StepPairs", "collate_steps", "TokenBatches"],
    "rjepa_latent.ray": ["INSTALL_HINT", "IN_FLIGHT", "MAX_RESTARTS", "SHARD_ATTEMPTS", "START_TIMEOUT_S",
                         "TOKEN_PREFIX", "StepLatents", "batch_rows", "connect", "extract", "latent_columns",
                         "placement", "require_ray", "add_arguments", "wanted", "run"],
    "rjepa_latent.default_model": ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NAME", "DEFAULT_MODEL_PACKAGE",
                                   "INSTALL_COMMAND", "DefaultModelMissing", "default_model_path"],
    "rjepa_latent.cli": ["main", "SUBCOMMANDS"],
    "rjepa_latent.testing": ["tiny_model", "fake_run", "sample_records", "assert_latents_close"],
}


def module_files() -> dict[str, Path]:
    """rjepa_latent's modules by dotted name (a package is its __init__.py)."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()
KNOWN = set(MODULES) | {"rjepa_latent._core"}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    base = package.split(".")
    if node.level > 1:
        base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """Every rjepa_latent module `module` imports, at any depth of its code
    (functions included), and every module named in a string constant
    (importlib.import_module targets)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in KNOWN else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in KNOWN:
            found.add(node.value)
    return {m for m in found if m in KNOWN and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in STAGES:
        return parts[1]
    if parts[1] in CORE:
        return "core"
    if parts[1] in API:
        return "api"
    if parts[1] == "cli":
        return "cli"
    raise AssertionError(f"{module} belongs to no stage: put it in one of {sorted(STAGES)}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_read_at_every_depth():
    # run/cli.py imports run/ray_cli.py only inside functions; cli.py names its
    # subcommands' modules as strings
    assert "rjepa_latent.run.ray_cli" in GRAPH["rjepa_latent.run.cli"]
    assert "rjepa_latent.tools.parity" in GRAPH["rjepa_latent.cli"]
    assert "rjepa_latent.checkpoints.arch" in GRAPH["rjepa_latent.checkpoints.checkpoint"]


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_imports_point_down_the_flow():
    wrong = [f"{m} ({stage_of(m)}) imports {d} ({stage_of(d)})"
             for m, deps in GRAPH.items() for d in sorted(deps)
             if stage_of(d) != stage_of(m) and stage_of(d) not in ALLOWED[stage_of(m)]]
    assert wrong == []


def test_every_stage_says_what_it_does_and_may_import():
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((PKG / stage / "__init__.py").read_text()))
        assert doc and "import" in doc, f"rjepa_latent/{stage}/__init__.py needs a docstring"


def test_no_module_over_the_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [n for n in PUBLIC[module] if not hasattr(mod, n)]
    assert missing == []
    if module == "rjepa_latent":
        assert set(mod.__all__) == set(PUBLIC[module]) - {"__version__"}


def test_names_in_the_docs_resolve():
    """Every `rjepa_latent.x.y` the README and docs/ name is a module or a name in one."""
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    bad = []
    for path in texts:
        for ref in sorted(set(re.findall(r"\brjepa_latent(?:\.[A-Za-z_]\w*)+", path.read_text()))):
            parts = ref.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for name in parts[cut:]:
                        obj = getattr(obj, name)
                except AttributeError:
                    bad.append(f"{path.name}: {ref}")
                break
            else:
                bad.append(f"{path.name}: {ref}")
    assert bad == []


def test_module_map_lists_every_module():
    """docs/internals.md's module map: every module of the package, no stale entry."""
    text = (ROOT / "docs" / "internals.md").read_text()
    listed = set(re.findall(r"^\| `(rjepa_latent/[\w/]+\.py)` \|", text, re.M))
    on_disk = {str(p.relative_to(ROOT)) for p in MODULES.values()}
    assert sorted(on_disk - listed) == [] and sorted(listed - on_disk) == []


def test_architecture_tree_names_every_folder():
    text = (ROOT / "docs" / "architecture.md").read_text()
    folders = {p.parent.relative_to(PKG).as_posix() for p in PKG.rglob("__init__.py")} - {"."}
    assert [f for f in sorted(folders) if f"{f.split('/')[-1]}/" not in text] == []


# ------------------------------------------------------------ C: csrc/

_C_DEF = re.compile(r"^(?!static\b)[A-Za-z_][\w \t\*]*?\b(rl_\w+)\s*\(([^;{}]*?)\)\s*\{", re.M)
_C_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)


def c_graph(csrc: Path = ROOT / "csrc") -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """csrc's C files: which file needs which, and which header includes which.
    A .c file needs another when it calls a function the other defines, or
    includes (at any depth) a header that declares one: a header that declares
    the functions of several files ties whoever includes it to all of them."""
    src = {p.name: _C_COMMENT.sub("", p.read_text()) for p in sorted(csrc.glob("*.[ch]"))}
    owner = {f: name for name, text in src.items() if name.endswith(".c")
             for f, _ in _C_DEF.findall(text)}
    named = {name: {w for w in re.findall(r"\b(rl_\w+)\s*\(", text) if w in owner}
             for name, text in src.items()}
    includes = {name: {h for h in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M) if h in src}
                for name, text in src.items()}

    def seen(name, acc):
        for h in includes[name] - acc:
            acc.add(h)
            seen(h, acc)
        return acc

    needs = {}
    for name in src:
        if name.endswith(".c"):
            funcs = named[name] | {f for h in seen(name, set()) for f in named[h]}
            needs[name] = {owner[f] for f in funcs} - {name}
    return needs, includes


def test_c_reader_sees_calls_and_declarations(tmp_path):
    needs, includes = c_graph()
    assert {"common.c", "ops_cpu.c"} <= needs["engine.c"] and "engine.c" in needs["binding.c"]
    assert "common.h" in includes["engine.h"]
    # a header declaring the functions of two files that use each other is a circle
    (tmp_path / "both.h").write_text("int rl_a(void);\nint rl_b(void);\n")
    (tmp_path / "a.c").write_text('#include "both.h"\nint rl_a(void) { return 1; }\n')
    (tmp_path / "b.c").write_text('#include "both.h"\nint rl_b(void) { return rl_a(); }\n')
    assert cycles(c_graph(tmp_path)[0]) == [["a.c", "b.c"]]


def test_no_c_circle():
    needs, includes = c_graph()
    assert cycles(needs) == []
    assert cycles(includes) == []
