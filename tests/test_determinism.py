"""Results must not depend on how the CPU engine is run: the thread count (a
run resumed on a machine with another core count must give the same bytes)
and packing, also for sequences long enough that their GEMMs are split by
columns (ops_cpu.c: GEMM_SPLIT_ROWS, GEMM_COLS)."""
import numpy as np

from test_core_engine import make_config, make_engine, make_weights, run

# wide enough that q/k/v, gate/up and down have several 256-column jobs
WIDE = dict(hidden_size=320, intermediate_size=640, num_heads=5, num_kv_heads=1, head_dim=64,
            vocab_size=211)


def test_results_do_not_depend_on_thread_count_or_packing():
    cfg = make_config(**WIDE)
    w = make_weights(cfg, seed=11)
    rng = np.random.default_rng(12)
    seqs = [rng.integers(0, cfg["vocab_size"], n) for n in (300, 7, 257, 120)]
    spans = [[(0, len(s)), (len(s) // 2, len(s))] for s in seqs]
    layers = [1, 2, 3]
    results = {}
    for threads in (1, 2, 3):
        eng = make_engine(cfg, w, max_tokens=1024, n_threads=threads)
        packed = run(eng, seqs, layers, spans)
        alone = np.concatenate([run(eng, [s], layers, [sp]) for s, sp in zip(seqs, spans)], 1)
        assert np.array_equal(packed, alone), f"packing changed results at {threads} threads"
        results[threads] = packed
    assert np.array_equal(results[1], results[2])
    assert np.array_equal(results[1], results[3])
