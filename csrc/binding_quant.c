/* binding_quant.c - `_core` functions for weights kept quantized: the keep
 * mask, GGUF and multi-part (AWQ, GPTQ, FP8) descriptors over Python
 * buffers, and dequantize_gguf (the CPU dequantization, exposed so loaders
 * and tests use the engine's own). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PY_ARRAY_UNIQUE_SYMBOL rl_ARRAY_API
#define NO_IMPORT_ARRAY
#include <numpy/arrayobject.h>

#include <omp.h>
#include <string.h>

#include "binding_quant.h"
#include "common.h"
#include "ops_cpu.h"
#include "qweights.h"

int rl_py_threads(int threads)
{
    if (threads < 0 || threads > RL_CPU_MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "threads must be in [0, %d] (0: one per core), got %d",
                     RL_CPU_MAX_THREADS, threads);
        return -1;
    }
    return threads ? threads : omp_get_num_procs();
}

int rl_py_keep_mask(PyObject *kinds, unsigned *mask)
{
    *mask = 0;
    if (!kinds || kinds == Py_None) return 0;
    PyObject *seq = PySequence_Fast(kinds, "keep must be a sequence of tensor kind names");
    if (!seq) return -1;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
        const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
        int k = s ? rl_tensor_kind_from_name(s) : -1;
        if (k < 0 || !((RL_QW_KEEPABLE >> k) & 1u)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "keep: %R is not a kind that can be kept quantized "
                             "(embed, q, k, v, o, gate, up, down)", o);
            Py_DECREF(seq);
            return -1;
        }
        *mask |= 1u << k;
    }
    Py_DECREF(seq);
    return 0;
}

int rl_py_gguf_qtensor(PyObject *data, int ggml_type, long long rows, long long cols,
                       rl_qtensor *q, Py_buffer *view)
{
    if (PyObject_GetBuffer(data, view, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "quantized data must be a C-contiguous buffer, got %s",
                     Py_TYPE(data)->tp_name);
        return -1;
    }
    memset(q, 0, sizeof *q);
    q->family = RL_QF_GGUF;
    q->subtype = ggml_type;
    q->rows = rows;
    q->cols = cols;
    q->part[0] = view->buf;
    q->part_bytes[0] = (size_t)view->len;
    return 0;
}

int rl_py_parts_qtensor(PyObject *parts, int family, int subtype, long long rows,
                        long long cols, long long group, rl_qtensor *q,
                        Py_buffer views[RL_QUANT_MAX_PARTS])
{
    memset(q, 0, sizeof *q);
    for (int i = 0; i < RL_QUANT_MAX_PARTS; i++) views[i].obj = NULL;
    if (!PyTuple_Check(parts) || PyTuple_GET_SIZE(parts) < 1 ||
        PyTuple_GET_SIZE(parts) > RL_QUANT_MAX_PARTS) {
        PyErr_Format(PyExc_ValueError, "the parts of a quantized tensor are a tuple of 1 to %d "
                     "buffers (or None), got %R", RL_QUANT_MAX_PARTS, parts);
        return -1;
    }
    q->family = family;
    q->subtype = subtype;
    q->rows = rows;
    q->cols = cols;
    q->group = group;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
        PyObject *o = PyTuple_GET_ITEM(parts, i);
        if (o == Py_None) continue;
        if (PyObject_GetBuffer(o, &views[i], PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            views[i].obj = NULL;
            rl_py_release_parts(views);
            PyErr_Format(PyExc_TypeError, "part %zd of a quantized tensor must be a C-contiguous "
                         "buffer or None, got %s", i, Py_TYPE(o)->tp_name);
            return -1;
        }
        q->part[i] = views[i].buf;
        q->part_bytes[i] = (size_t)views[i].len;
    }
    return 0;
}

void rl_py_release_parts(Py_buffer views[RL_QUANT_MAX_PARTS])
{
    for (int i = 0; i < RL_QUANT_MAX_PARTS; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

PyObject *rl_py_dequantize_gguf(PyObject *mod, PyObject *args, PyObject *kwds)
{
    (void)mod;
    static char *kwlist[] = {"data", "ggml_type", "rows", "cols", "threads", NULL};
    PyObject *data;
    int type, nt = 0;
    long long rows, cols;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OiLL|i", kwlist, &data, &type, &rows, &cols,
                                     &nt))
        return NULL;
    if ((nt = rl_py_threads(nt)) < 0) return NULL;
    rl_qtensor q;
    Py_buffer view;
    if (rl_py_gguf_qtensor(data, type, rows, cols, &q, &view) < 0) return NULL;
    char err[256] = "";
    int bad = rl_qtensor_validate(&q, err, sizeof err);
    PyObject *arr = NULL;
    if (!bad) {
        npy_intp dims[2] = {(npy_intp)rows, (npy_intp)cols};
        arr = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
    }
    if (arr) {
        float *out = PyArray_DATA((PyArrayObject *)arr);
        Py_BEGIN_ALLOW_THREADS
        int64_t chunk = (rows + nt - 1) / nt;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(|:bad) if (rows * cols > 65536)
        for (int i = 0; i < nt; i++) {
            int64_t r0 = (int64_t)i * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
            char e[256];
            if (r0 < r1 && rl_dequant_rows_f32(&q, r0, r1, out + r0 * cols, e, sizeof e)) bad = 1;
        }
        Py_END_ALLOW_THREADS
        if (bad) snprintf(err, sizeof err, "cannot dequantize these blocks");
    }
    PyBuffer_Release(&view);
    if (bad) {
        Py_XDECREF(arr);
        return PyErr_Format(PyExc_ValueError, "%s", err);
    }
    return arr;
}

PyObject *rl_py_gguf_type_info(PyObject *mod, PyObject *args)
{
    (void)mod;
    int type;
    if (!PyArg_ParseTuple(args, "i", &type)) return NULL;
    int64_t block, bytes;
    if (!rl_gguf_type_info(type, &block, &bytes)) Py_RETURN_NONE;
    return Py_BuildValue("(LL)", (long long)block, (long long)bytes);
}
