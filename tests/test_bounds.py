"""Bounded work before refusals: a config whose sizes the tensors present
cannot have (absurd layer counts, sizes whose products overflow) is a
ModelFormatError at once, with little memory, for HF directories and GGUF
files; GGUF tensor data must be aligned (`general.alignment`, default 32),
inside the file and not overlapping, else a ModelFormatError naming the
tensor."""
import json
import shutil
import time
import tracemalloc

import numpy as np
import pytest

import rjepa_latent as rl

gguf = pytest.importorskip("gguf")
from rjepa_latent.checkpoints.gguf_loader import _open_reader  # noqa: E402
from test_gguf import write_gguf  # noqa: E402


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refused_fast(path, *needles):
    """Model(path) raises ModelFormatError containing every needle, in well
    under a second and a few MB of Python allocations (nothing sized by the
    config is allocated)."""
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(rl.ModelFormatError) as e:
        rl.Model(path, device="cpu")
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert dt < 2.0, dt
    assert peak < 50 << 20, peak
    return str(e.value)


@pytest.mark.parametrize("changes, needles", [
    ({"num_hidden_layers": 2**32 + 1}, ["num_hidden_layers=4294967297", "holds only"]),
    ({"hidden_size": 2**40, "intermediate_size": 2**40},
     ["hidden_size=1099511627776", "larger than every dimension", "largest is 320"]),
    ({"vocab_size": 2**62}, ["vocab_size=4611686018427387904", "largest is 320"]),
    ({"intermediate_size": 2**31}, ["intermediate_size=2147483648"]),
    ({"head_dim": 2**33}, ["head_dim=8589934592"]),
    ({"num_attention_heads": 2**31, "num_key_value_heads": 2**31, "head_dim": 16},
     ["num_heads x head_dim=34359738368"]),
])
def test_hf_config_checked_against_tensors(llama_dir, tmp_path, changes, needles):
    d = _edited(llama_dir, tmp_path / "m", **changes)
    msg = _refused_fast(d, *needles)
    assert str(d) in msg


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _patch_field(path, key, value):
    r = gguf.GGUFReader(str(path), "r+")
    r.fields[key].parts[-1][0] = value
    r.data.flush()
    del r


def test_gguf_config_checked_against_tensors(tmp_path):
    p = write_gguf(tmp_path / "a.gguf", "F32")
    _patch_field(p, "llama.block_count", 2**32 - 1)
    _refused_fast(p, "llama.block_count=4294967295", "holds only")
    p = write_gguf(tmp_path / "b.gguf", "F32")
    _patch_field(p, "llama.embedding_length", 2**31)
    _patch_field(p, "llama.rope.dimension_count", 2**31 // 4)
    _refused_fast(p, "hidden_size=2147483648", "larger than every dimension")
    p = write_gguf(tmp_path / "c.gguf", "F32")
    _patch_field(p, "llama.feed_forward_length", 2**32 - 1)
    _refused_fast(p, "intermediate_size=4294967295")
    from rjepa_latent.checkpoints.loader import read_config  # memory plans read the config only: same check
    with pytest.raises(rl.ModelFormatError, match="intermediate_size=4294967295"):
        read_config(p)


# -- the GGUF tensor table ---------------------------------------------------------

def _small_gguf(path, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_tensor("first", np.arange(10, dtype=np.float32))
    w.add_tensor("second", np.ones(24, np.float32))
    w.add_tensor("third", np.ones(5, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _set_offset(path, name, offset):
    r = gguf.GGUFReader(str(path), "r+")
    t = next(t for t in r.tensors if t.name == name)
    t.field.parts[-1][0] = offset
    r.data.flush()
    del r


def _offsets(path):
    r = gguf.GGUFReader(str(path), "r")
    return {t.name: int(t.data_offset - r.data_offset) for t in r.tensors}


@pytest.mark.parametrize("alignment", [None, 64])
def test_gguf_tensor_table_checks(tmp_path, alignment):
    align = alignment or 32
    good = _small_gguf(tmp_path / "good.gguf", alignment)
    r = _open_reader(str(good))
    assert [t.name for t in r.tensors] == ["first", "second", "third"]
    off = _offsets(good)
    assert all(o % align == 0 for o in off.values())
    cases = {
        "misaligned": ("second", off["second"] + align // 2,
                       [f"tensor 'second': data offset {off['second'] + align // 2} is not a "
                        f"multiple of general.alignment {align}"]),
        "outside": ("third", off["third"] + 1024 * align, ["tensor 'third'", "outside the file"]),
        "overlap": ("third", off["second"], ["tensor", "overlaps tensor", "'second'", "'third'"]),
    }
    for case, (name, offset, needles) in cases.items():
        p = tmp_path / f"{case}.gguf"
        shutil.copy(good, p)
        _set_offset(p, name, offset)
        with pytest.raises(rl.ModelFormatError) as e:
            _open_reader(str(p))
        msg = str(e.value)
        assert msg.startswith(str(p)) and "not a readable GGUF file" not in msg, msg
        for n in needles:
            assert n in msg, (case, msg)


def test_gguf_model_with_bad_table_is_refused_naming_the_tensor(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "Q4_1")
    off = _offsets(p)
    _set_offset(p, "blk.1.attn_k.weight", off["blk.1.attn_k.weight"] + 8)
    with pytest.raises(rl.ModelFormatError, match=r"tensor 'blk\.1\.attn_k\.weight': data offset "
                                                  r"\d+ is not a multiple of general.alignment 32"):
        rl.Model(p, device="cpu")


def test_10mb_step_through_extract_is_an_error_line_quickly(llama_dir, tmp_path):
    """End to end: a record with a 10 MB step is refused from its length (the
    tokenizer never sees it) and the other records are extracted."""
    data = tmp_path / "big.jsonl"
    data.write_text(json.dumps({"id": "big", "question": "Q", "steps": ["x" * (10 << 20)]}) + "\n" +
                    json.dumps({"id": "ok", "question": "Q", "steps": ["fine", "done"]}) + "\n")
    with rl.Model(llama_dir, device="cpu") as m:
        t0 = time.perf_counter()
        s = rl.extract_dataset(data, m, tmp_path / "run", progress=False)
        dt = time.perf_counter() - t0
    assert s["items"] == 1 and s["errors"] == 1
    (err,) = rl.open_latents(tmp_path / "run").errors
    assert err["id"] == "big" and "characters, so more than --max-tokens 1024" in err["reason"]
    assert dt < 10, dt  # reading and hashing 10 MB; tokenizing it alone takes longer
