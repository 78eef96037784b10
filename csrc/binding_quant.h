/* binding_quant.h - the `_core` pieces for weights kept quantized
 * (binding_quant.c), used by binding.c's Engine and method table. */
#ifndef RL_BINDING_QUANT_H
#define RL_BINDING_QUANT_H

#include <Python.h>

#include "quant.h"

/* A sequence of tensor kind names ("q", "embed", ...) -> a keep mask; None or
 * NULL -> 0. -1 with a Python exception when a name is not a kind. */
int rl_py_keep_mask(PyObject *kinds, unsigned *mask);
/* A GGUF descriptor over a C-contiguous buffer of blocks (the buffer is held
 * in *view: release it after use). -1 with a Python exception. */
int rl_py_gguf_qtensor(PyObject *data, int ggml_type, long long rows, long long cols,
                       rl_qtensor *q, Py_buffer *view);

/* An AWQ / GPTQ / FP8 descriptor (quant_hf.h) over a tuple of up to
 * RL_QUANT_MAX_PARTS C-contiguous buffers or None, held in views (release
 * them with rl_py_release_parts). -1 with a Python exception. */
int rl_py_parts_qtensor(PyObject *parts, int family, int subtype, long long rows,
                        long long cols, long long group, rl_qtensor *q,
                        Py_buffer views[RL_QUANT_MAX_PARTS]);
void rl_py_release_parts(Py_buffer views[RL_QUANT_MAX_PARTS]);

/* A `threads` argument resolved (0: one per core); -1 with ValueError when
 * out of range. */
int rl_py_threads(int threads);
PyObject *rl_py_dequantize_gguf(PyObject *mod, PyObject *args, PyObject *kwds);
PyObject *rl_py_gguf_type_info(PyObject *mod, PyObject *args);

#define RL_QUANT_METHODS                                                                     \
    {"dequantize_gguf", (PyCFunction)(void (*)(void))rl_py_dequantize_gguf,                  \
     METH_VARARGS | METH_KEYWORDS,                                                           \
     "dequantize_gguf(data, ggml_type, rows, cols, threads=0) -> float32 [rows, cols]: "      \
     "GGUF blocks dequantized as gguf-py does, on `threads` threads (0: one per core); "      \
     "ValueError when the blocks are inconsistent or hold a non-finite scale"},               \
    {"gguf_type_info", rl_py_gguf_type_info, METH_VARARGS,                                   \
     "gguf_type_info(ggml_type) -> (block_elems, block_bytes), or None when unsupported"},


#endif /* RL_BINDING_QUANT_H */
