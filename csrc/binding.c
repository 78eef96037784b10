/* binding.c - the `rjepa_latent._core` Python module: the only file that
 * includes Python.h and NumPy. API: docs/internals.md.
 *
 * Design choices:
 * - Arguments are checked here for type and shape (TypeError/ValueError
 *   naming the argument); values (ids, offsets, spans, layers) are checked by
 *   the engine, whose RL_ERR_INVALID message names the argument and index.
 * - Engine statuses map to exceptions (ValueError, MemoryError, RuntimeError,
 *   rjepa_latent.errors.DeviceError / DeviceMemoryError) with the engine's
 *   message, which carries file:line.
 * - Every engine call that may take time runs with the GIL released, under
 *   a per-Engine lock: two threads never share one workspace. Frees and
 *   device syncs (Engine.close and dealloc, a result's memory going back)
 *   release the GIL too.
 * - forward returns an ndarray over memory allocated for that result only; a
 *   HostBuffer owner, holding that allocation and the function that frees it
 *   (nothing of the Engine), is the array's base, so results outlive the
 *   Engine and its backend and are never views of reusable scratch.
 * - Multi-phase init (PEP 489): the exception classes and both types live in
 *   the module's state (types are heap types made from specs, each bound to
 *   its module), so there is no process-global Python object; a second
 *   module object (importlib.util.module_from_spec) is independent, and
 *   importlib.reload keeps the executed module as it is.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#define PY_ARRAY_UNIQUE_SYMBOL rl_ARRAY_API
#include <numpy/arrayobject.h>

#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "engine.h"
#include "ops_cpu.h"
#include "gemm_builtin.h"
#include "binding_quant.h"
#include "qweights.h"
#include "quant_hf.h"
#include "sites.h"

#ifndef RL_VERSION
#error "RL_VERSION (the package version, from pyproject.toml) is defined by setup.py"
#endif
#ifndef RL_CUDA_ARCHS
#define RL_CUDA_ARCHS ""
#endif

/* Per-module state (m_size = sizeof(core_state)). */
typedef struct {
    PyObject *DeviceError;          /* rjepa_latent.errors.DeviceError        */
    PyObject *DeviceMemoryError;    /* rjepa_latent.errors.DeviceMemoryError  */
    PyTypeObject *EngineType;
    PyTypeObject *HostBufferType;
} core_state;

static core_state *module_state(PyObject *mod) { return (core_state *)PyModule_GetState(mod); }

/* The state of the module that made `obj`'s type (Engine and HostBuffer are
 * final heap types bound to their module, so Py_TYPE is that exact type). */
static core_state *object_state(PyObject *obj)
{
    return (core_state *)PyType_GetModuleState(Py_TYPE(obj));
}

/* Raises the exception of `st` with the engine's last message; returns NULL. */
static PyObject *raise_status(const core_state *S, rl_status st)
{
    PyObject *exc = PyExc_RuntimeError;
    switch (st) {
    case RL_ERR_INVALID: exc = PyExc_ValueError; break;
    case RL_ERR_NOMEM: exc = PyExc_MemoryError; break;
    case RL_ERR_DEVICE: case RL_ERR_CUDA: case RL_ERR_BLAS: exc = S->DeviceError; break;
    case RL_ERR_DEVICE_MEMORY: exc = S->DeviceMemoryError; break;
    default: break;
    }
    /* The message says what is wrong, for users; where the engine found it
     * ("csrc/engine.c:123") is the attribute rjepa_where, for bug reports. */
    const char *msg = rl_last_error();
    PyObject *text = PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
    if (!text) return NULL;
    PyObject *e = PyObject_CallOneArg(exc, text);
    Py_DECREF(text);
    if (!e) return NULL;                        /* the exception's own failure */
    PyObject *where = PyUnicode_FromString(rl_last_error_where());
    if (!where || PyObject_SetAttrString(e, "rjepa_where", where) < 0) {
        Py_XDECREF(where);
        Py_DECREF(e);
        return NULL;
    }
    Py_DECREF(where);
    PyErr_SetObject((PyObject *)Py_TYPE(e), e);
    Py_DECREF(e);
    return NULL;
}

/* ---- argument parsing ---------------------------------------------------- */

static int get_int_field(PyObject *cfg, const char *key, int64_t *out, int required, int64_t dflt)
{
    PyObject *v = PyDict_GetItemString(cfg, key);   /* borrowed */
    if (!v) {
        if (!required) { *out = dflt; return 0; }
        PyErr_Format(PyExc_ValueError, "config is missing '%s'", key);
        return -1;
    }
    if (!PyIndex_Check(v) || PyBool_Check(v)) {
        PyErr_Format(PyExc_TypeError, "config['%s'] must be an int, got %R", key, v);
        return -1;
    }
    long long x = PyLong_AsLongLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = x;
    return 0;
}

static int get_flag_field(PyObject *cfg, const char *key, int *out)
{
    PyObject *v = PyDict_GetItemString(cfg, key);
    *out = 0;
    if (!v) return 0;
    int t = PyObject_IsTrue(v);
    if (t < 0) return -1;
    *out = t;
    return 0;
}

/* An optional float field (default 0). */
static int get_float_field(PyObject *cfg, const char *key, float *out)
{
    PyObject *v = PyDict_GetItemString(cfg, key);
    *out = 0.0f;
    if (!v || v == Py_None) return 0;
    if (PyBool_Check(v) || !PyNumber_Check(v)) {
        PyErr_Format(PyExc_TypeError, "config['%s'] must be a number, got %R", key, v);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

/* An optional small int field (default 0); a bool counts as 0/1. */
static int get_enum_field(PyObject *cfg, const char *key, int *out)
{
    PyObject *v = PyDict_GetItemString(cfg, key);
    *out = 0;
    if (!v) return 0;
    if (!PyIndex_Check(v)) {
        PyErr_Format(PyExc_TypeError, "config['%s'] must be an int, got %R", key, v);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT_MIN || x > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "config['%s'] is out of range: %ld", key, x);
        return -1;
    }
    *out = (int)x;
    return 0;
}

/* layer_sliding: a sequence of num_layers flags, needed when sliding_window > 0. */
static int get_layer_sliding(PyObject *cfg, rl_config *c)
{
    PyObject *v = PyDict_GetItemString(cfg, "layer_sliding");
    if (c->sliding_window <= 0) return 0;
    if (c->num_layers > RL_MAX_LAYERS) return 0;   /* rl_config_validate names the limit */
    if (!v) {
        PyErr_SetString(PyExc_ValueError, "config has a sliding_window but no 'layer_sliding' "
                        "(one flag per layer)");
        return -1;
    }
    PyObject *seq = PySequence_Fast(v, "config['layer_sliding'] must be a sequence of flags");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != c->num_layers) {
        PyErr_Format(PyExc_ValueError, "config['layer_sliding'] has %zd flags, expected "
                     "num_layers=%lld", n, (long long)c->num_layers);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int t = PyObject_IsTrue(PySequence_Fast_GET_ITEM(seq, i));
        if (t < 0) { Py_DECREF(seq); return -1; }
        c->layer_sliding[i] = (uint8_t)t;
    }
    Py_DECREF(seq);
    return 0;
}

static int parse_config(const core_state *S, PyObject *obj, rl_config *c)
{
    if (!PyDict_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "config must be a dict, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    memset(c, 0, sizeof *c);
    if (get_int_field(obj, "vocab_size", &c->vocab_size, 1, 0) ||
        get_int_field(obj, "hidden_size", &c->hidden_size, 1, 0) ||
        get_int_field(obj, "intermediate_size", &c->intermediate_size, 1, 0) ||
        get_int_field(obj, "num_layers", &c->num_layers, 1, 0) ||
        get_int_field(obj, "num_heads", &c->num_heads, 1, 0) ||
        get_int_field(obj, "num_kv_heads", &c->num_kv_heads, 1, 0) ||
        get_int_field(obj, "head_dim", &c->head_dim, 1, 0) ||
        get_int_field(obj, "max_layer", &c->max_layer, 0, c->num_layers))
        return -1;
    PyObject *eps = PyDict_GetItemString(obj, "rms_norm_eps");
    if (!eps) {
        PyErr_SetString(PyExc_ValueError, "config is missing 'rms_norm_eps'");
        return -1;
    }
    c->rms_norm_eps = PyFloat_AsDouble(eps);
    if (c->rms_norm_eps == -1.0 && PyErr_Occurred()) return -1;
    if (get_flag_field(obj, "attn_qkv_bias", &c->attn_qkv_bias) ||
        get_flag_field(obj, "attn_o_bias", &c->attn_o_bias) ||
        get_flag_field(obj, "mlp_bias", &c->mlp_bias) ||
        get_enum_field(obj, "qk_norm", &c->qk_norm) ||
        get_float_field(obj, "embed_scale", &c->embed_scale) ||
        get_float_field(obj, "norm_offset", &c->norm_offset) ||
        get_enum_field(obj, "act", &c->act) ||
        get_enum_field(obj, "norms", &c->norms) ||
        get_float_field(obj, "attn_scale", &c->attn_scale) ||
        get_float_field(obj, "attn_softcap", &c->attn_softcap) ||
        get_int_field(obj, "sliding_window", &c->sliding_window, 0, 0) ||
        get_layer_sliding(obj, c) ||
        get_flag_field(obj, "rope_swa", &c->rope_swa))
        return -1;
    rl_status st = rl_config_validate(c);
    if (st != RL_OK) { raise_status(S, st); return -1; }
    return 0;
}

/* "cpu" -> -1; "cuda" -> 0; "cuda:N" -> N. -2 with ValueError otherwise. */
static int parse_device(const char *dev)
{
    if (strcmp(dev, "cpu") == 0) return -1;
    if (strcmp(dev, "cuda") == 0) return 0;
    if (strncmp(dev, "cuda:", 5) == 0 && dev[5]) {
        long idx = 0;
        for (const char *p = dev + 5; *p; p++) {
            if (*p < '0' || *p > '9' || idx > 100000) goto bad;
            idx = idx * 10 + (*p - '0');
        }
        return (int)idx;
    }
bad:
    PyErr_Format(PyExc_ValueError, "device must be 'cpu', 'cuda' or 'cuda:N', got '%s'", dev);
    return -2;
}

static int parse_dtype(const char *s, rl_dtype *dt)
{
    if (strcmp(s, "float32") == 0) *dt = RL_F32;
    else if (strcmp(s, "bfloat16") == 0) *dt = RL_BF16;
    else if (strcmp(s, "float16") == 0) *dt = RL_F16;
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be 'float32', 'bfloat16' or 'float16', got '%s'", s);
        return -1;
    }
    return 0;
}

/* Engine storage dtype for a device: "float32" or "bfloat16"; NULL means
 * the device's default (CPU float32, CUDA bfloat16). -1 with ValueError
 * otherwise. Whether the device stores it is the backend's capability
 * (check_caps): the CPU refuses "bfloat16". */
static int parse_engine_dtype(const char *s, int device_idx, rl_dtype *dt)
{
    if (!s) {
        *dt = device_idx < 0 ? RL_F32 : RL_BF16;
        return 0;
    }
    if (strcmp(s, "float32") == 0) *dt = RL_F32;
    else if (strcmp(s, "bfloat16") == 0) *dt = RL_BF16;
    else {
        PyErr_Format(PyExc_ValueError, "dtype must be 'float32' or 'bfloat16', got '%s'", s);
        return -1;
    }
    return 0;
}

/* The device's name in messages ("cpu", "cuda:N"). */
static void device_name(int idx, char *buf, size_t cap)
{
    if (idx < 0) snprintf(buf, cap, "cpu");
    else snprintf(buf, cap, "cuda:%d", idx);
}

/* RL_OK when the backend of device `idx` can run `cfg` with `dt` storage;
 * RL_ERR_INVALID naming what it cannot; RL_ERR_DEVICE when its
 * capabilities are unknown (CUDA not built in). Needs no device. */
static rl_status check_caps(int idx, const rl_config *cfg, rl_dtype dt)
{
    rl_backend_caps caps;
    char name[32];
    RL_TRY(rl_backend_caps_get(idx, &caps));
    device_name(idx, name, sizeof name);
    return rl_caps_check_config(&caps, name, cfg, dt);
}

static int parse_kind(const char *s, rl_tensor_kind *kind)
{
    int k = rl_tensor_kind_from_name(s);
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "unknown tensor kind '%s' (kinds: embed, final_norm, "
                     "rope_inv_freq, attn_norm, q, k, v, q_bias, k_bias, v_bias, q_norm, k_norm, "
                     "o, o_bias, ffn_norm, gate, up, down, gate_bias, up_bias, down_bias, "
                     "rope_inv_freq_swa, post_attn_norm, post_ffn_norm)", s);
        return -1;
    }
    *kind = (rl_tensor_kind)k;
    return 0;
}

/* Checks every value of an integer array fits int32 (name[i] in the message). */
static int check_int32_range(PyArrayObject *a, const char *name)
{
    int uns = PyTypeNum_ISUNSIGNED(PyArray_TYPE(a));
    PyArrayObject *w = (PyArrayObject *)PyArray_FROMANY((PyObject *)a, uns ? NPY_UINT64 : NPY_INT64,
                                                        0, 0, NPY_ARRAY_CARRAY | NPY_ARRAY_FORCECAST);
    if (!w) return -1;
    npy_intp n = PyArray_SIZE(w);
    int rc = 0;
    for (npy_intp i = 0; i < n && rc == 0; i++) {
        if (uns) {
            unsigned long long v = ((const npy_uint64 *)PyArray_DATA(w))[i];
            if (v > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s[%zd]=%llu is out of the int32 range", name,
                             (Py_ssize_t)i, v);
                rc = -1;
            }
        } else {
            long long v = ((const npy_int64 *)PyArray_DATA(w))[i];
            if (v < INT32_MIN || v > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s[%zd]=%lld is out of the int32 range", name,
                             (Py_ssize_t)i, v);
                rc = -1;
            }
        }
    }
    Py_DECREF(w);
    return rc;
}

/* New reference to a C-contiguous int32 array with `ndim` dimensions made from
 * any integer array-like; TypeError for non-integer data, ValueError for a
 * wrong number of dimensions or values outside int32. */
static PyArrayObject *as_int32(PyObject *obj, const char *name, int ndim)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROM_O(obj);
    if (!a) return NULL;
    PyArrayObject *out = NULL;
    int tn = PyArray_TYPE(a);
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimension%s, got %d", name, ndim,
                     ndim == 1 ? "" : "s", PyArray_NDIM(a));
    } else if (PyArray_SIZE(a) > 0 && !PyTypeNum_ISINTEGER(tn)) {
        PyObject *dn = PyObject_Str((PyObject *)PyArray_DESCR(a));
        PyErr_Format(PyExc_TypeError, "%s must be an integer array (int32), got dtype %S", name,
                     dn ? dn : Py_None);
        Py_XDECREF(dn);
    } else if (tn == NPY_INT32 || PyArray_SIZE(a) == 0 || check_int32_range(a, name) == 0) {
        /* always a private copy: the engine validates these values and then
         * uses them as offsets with the GIL released, so another thread
         * writing the caller's array in between must not reach the engine */
        out = (PyArrayObject *)PyArray_FROMANY((PyObject *)a, NPY_INT32, ndim, ndim,
                                               NPY_ARRAY_CARRAY | NPY_ARRAY_FORCECAST |
                                               NPY_ARRAY_ENSURECOPY);
    }
    Py_DECREF(a);
    return out;
}

/* ---- HostBuffer: owner of one result ------------------------------------- */

/* Holds only its own allocation (and the function that frees it): a result
 * keeps neither the Engine nor its weights alive, so Engine.close() returns
 * the model's memory while results are still in use. */
typedef struct {
    PyObject_HEAD
    rl_result res;
} HostBufferObject;

typedef struct {
    PyObject_HEAD
    rl_model *m;            /* NULL before __init__ and once closed */
    int closed;
    PyThread_type_lock lock;
    char device[32];
} EngineObject;

/* Frees the result without the GIL: on CUDA that may be cudaFreeHost (a
 * device synchronization) when the pinned pool is full. */
static void hostbuffer_dealloc(HostBufferObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->res.data) {
        rl_result res = self->res;
        memset(&self->res, 0, sizeof self->res);
        Py_BEGIN_ALLOW_THREADS
        rl_result_free(&res);
        Py_END_ALLOW_THREADS
    }
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);   /* instances of heap types hold their type */
}

static PyType_Slot hostbuffer_slots[] = {
    {Py_tp_dealloc, (void *)hostbuffer_dealloc},
    {Py_tp_doc, (void *)"Owner of memory the engine allocated for one forward result (an "
                        "ndarray's base); it holds nothing else."},
    {0, NULL},
};

static PyType_Spec hostbuffer_spec = {
    .name = "rjepa_latent._core.HostBuffer",
    .basicsize = sizeof(HostBufferObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = hostbuffer_slots,
};

/* ---- Engine -------------------------------------------------------------- */

/* Runs `expr` without the GIL under the engine's lock. The model is
 * re-checked under the lock: close() from another thread may have run
 * between engine_ready and here. */
/* Runs `expr` without the GIL under the engine's lock, with `m` the model read
 * once under that lock: close() detaches the model (under the GIL) and then
 * takes the lock before freeing it, so a call in flight keeps a valid `m` and
 * a call after close sees NULL. */
#define ENGINE_CALL(self, st, m, expr)                                       \
    do {                                                                     \
        Py_BEGIN_ALLOW_THREADS                                               \
        PyThread_acquire_lock((self)->lock, WAIT_LOCK);                      \
        {                                                                    \
            rl_model *m = (self)->m;                                         \
            st = m ? (expr) : RL_FAIL(RL_ERR_STATE, "this Engine is closed"); \
        }                                                                    \
        PyThread_release_lock((self)->lock);                                 \
        Py_END_ALLOW_THREADS                                                 \
    } while (0)

static int engine_ready(EngineObject *self)
{
    if (!self->m) {
        PyErr_SetString(PyExc_RuntimeError, self->closed ? "this Engine is closed"
                                                         : "Engine is not initialized");
        return 0;
    }
    return 1;
}

static int engine_init(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", "device", "n_threads", "dtype", "keep", NULL};
    PyObject *cfg_obj, *keep_obj = NULL;
    const char *device, *dtype_s = NULL;
    int n_threads = 0;
    unsigned keep;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Os|izO", kwlist, &cfg_obj, &device, &n_threads,
                                     &dtype_s, &keep_obj) || rl_py_keep_mask(keep_obj, &keep) < 0)
        return -1;
    if (self->m || self->closed) {
        PyErr_SetString(PyExc_RuntimeError, self->closed ? "this Engine is closed (create a new one)"
                                                         : "Engine is already initialized");
        return -1;
    }
    core_state *S = object_state((PyObject *)self);
    rl_config cfg;
    if (parse_config(S, cfg_obj, &cfg) < 0) return -1;
    int idx = parse_device(device);
    if (idx == -2) return -1;
    rl_dtype dt;
    if (parse_engine_dtype(dtype_s, idx, &dt) < 0) return -1;
    /* what the backend cannot run fails here, before a device is touched */
    rl_status cst = check_caps(idx, &cfg, dt);
    if (cst != RL_OK) { raise_status(S, cst); return -1; }
    if (n_threads < 0) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 0, got %d", n_threads);
        return -1;
    }
    if (!self->lock && !(self->lock = PyThread_allocate_lock())) {
        PyErr_NoMemory();
        return -1;
    }
    rl_backend *be = NULL;
    rl_model *m = NULL;
    rl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = idx < 0 ? rl_backend_cpu_create(n_threads, &be) : rl_backend_cuda_create_ex(idx, dt, &be);
    if (st == RL_OK) st = rl_model_create_kept(&cfg, be, keep, &m);
    Py_END_ALLOW_THREADS
    if (st != RL_OK) { raise_status(S, st); return -1; }
    if (self->m) {   /* another thread's __init__ finished first: keep its model */
        Py_BEGIN_ALLOW_THREADS
        rl_model_free(m);
        Py_END_ALLOW_THREADS
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialized");
        return -1;
    }
    self->m = m;
    snprintf(self->device, sizeof self->device, "%s", rl_model_backend(m)->name);
    return 0;
}

/* Frees weights, workspace and backend now, waiting for a call in flight.
 * Results already returned stay valid (they own their memory). */
static void engine_release(EngineObject *self)
{
    /* detached while the GIL is held: getters and later calls see NULL from
     * here on; a call in flight holds the lock and its own copy of the model */
    rl_model *m = self->m;
    self->m = NULL;
    if (m) self->closed = 1;
    Py_BEGIN_ALLOW_THREADS
    if (self->lock) {   /* wait for a call in flight to finish with it */
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        PyThread_release_lock(self->lock);
    }
    rl_model_free(m);
    Py_END_ALLOW_THREADS
}

static PyObject *engine_close(EngineObject *self, PyObject *unused)
{
    engine_release(self);
    Py_RETURN_NONE;
}

static void engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    engine_release(self);
    if (self->lock) PyThread_free_lock(self->lock);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);   /* instances of heap types hold their type */
}

static PyObject *engine_tensor_shape(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "layer", NULL};
    const char *kind_s;
    long long layer = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s|L", kwlist, &kind_s, &layer)) return NULL;
    if (!engine_ready(self)) return NULL;
    rl_tensor_kind kind;
    if (parse_kind(kind_s, &kind) < 0) return NULL;
    const rl_config *c = rl_model_config(self->m);
    if (layer < 0) return PyErr_Format(PyExc_ValueError, "layer must be >= 0, got %lld", layer);
    if (!rl_tensor_kind_is_global(kind) && layer >= rl_config_loaded_layers(c)) Py_RETURN_NONE;
    int64_t s[2];
    int nd = rl_tensor_shape(c, kind, s);
    if (nd == 0) Py_RETURN_NONE;
    return nd == 1 ? Py_BuildValue("(L)", (long long)s[0])
                   : Py_BuildValue("(LL)", (long long)s[0], (long long)s[1]);
}

/* Parses a shape tuple/list of 1..8 non-negative ints. */
static int parse_shape(PyObject *obj, int64_t *shape, int *ndim)
{
    PyObject *seq = PySequence_Fast(obj, "shape must be a tuple of ints");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    int rc = 0;
    if (n < 1 || n > 8) {
        PyErr_Format(PyExc_ValueError, "shape must have 1 or 2 dimensions, got %zd", n);
        rc = -1;
    }
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) rc = -1;
        else if (v < 0 || v > ((long long)1 << 40)) {
            PyErr_Format(PyExc_ValueError, "shape[%zd]=%lld is out of range", i, v);
            rc = -1;
        } else shape[i] = v;
    }
    *ndim = (int)n;
    Py_DECREF(seq);
    return rc;
}

static PyObject *engine_set_tensor(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "layer", "data", "dtype", "shape", NULL};
    const char *kind_s, *dtype_s;
    long long layer;
    PyObject *data, *shape_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sLOsO", kwlist, &kind_s, &layer, &data,
                                     &dtype_s, &shape_obj))
        return NULL;
    if (!engine_ready(self)) return NULL;
    rl_tensor_kind kind;
    rl_dtype dt;
    int64_t shape[8];
    int ndim;
    if (parse_kind(kind_s, &kind) < 0 || parse_dtype(dtype_s, &dt) < 0 ||
        parse_shape(shape_obj, shape, &ndim) < 0)
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "data of tensor '%s' must be a C-contiguous buffer "
                            "(numpy array, memoryview), got %s", kind_s, Py_TYPE(data)->tp_name);
    }
    size_t need = rl_dtype_size(dt);
    for (int i = 0; i < ndim; i++) need *= (size_t)shape[i];
    if ((size_t)view.len != need) {
        PyBuffer_Release(&view);
        return PyErr_Format(PyExc_ValueError, "data of tensor '%s' (layer %lld) has %zd bytes but "
                            "its shape and dtype %s need %zu", kind_s, layer, view.len, dtype_s, need);
    }
    rl_status st;
    ENGINE_CALL(self, st, m, rl_model_set_tensor(m, kind, layer, view.buf, dt, shape, ndim));
    PyBuffer_Release(&view);
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    Py_RETURN_NONE;
}

static PyObject *engine_set_tensor_quantized(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"kind", "layer", "data", "ggml_type", "shape", "family", "group",
                             NULL};
    const char *kind_s;
    long long layer, group = 0;
    int ggml_type, family = RL_QF_GGUF;
    PyObject *data, *shape_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sLOiO|iL", kwlist, &kind_s, &layer, &data,
                                     &ggml_type, &shape_obj, &family, &group))
        return NULL;
    if (!engine_ready(self)) return NULL;
    rl_tensor_kind kind;
    int64_t shape[8];
    int ndim;
    if (parse_kind(kind_s, &kind) < 0 || parse_shape(shape_obj, shape, &ndim) < 0) return NULL;
    if (ndim != 2)
        return PyErr_Format(PyExc_ValueError, "a quantized tensor is a matrix: shape of '%s' "
                            "must have 2 dimensions, got %d", kind_s, ndim);
    rl_qtensor q;
    Py_buffer view, parts[RL_QUANT_MAX_PARTS];
    if (family == RL_QF_GGUF) {
        if (rl_py_gguf_qtensor(data, ggml_type, shape[0], shape[1], &q, &view) < 0) return NULL;
    } else if (rl_py_parts_qtensor(data, family, ggml_type, shape[0], shape[1], group, &q,
                                   parts) < 0) {
        return NULL;
    }
    rl_status st;
    ENGINE_CALL(self, st, m, rl_model_set_tensor_quantized(m, kind, layer, &q));
    if (family == RL_QF_GGUF) PyBuffer_Release(&view);
    else rl_py_release_parts(parts);
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    Py_RETURN_NONE;
}

static PyObject *engine_check_complete(EngineObject *self, PyObject *unused)
{
    if (!engine_ready(self)) return NULL;
    rl_status st;
    ENGINE_CALL(self, st, m, rl_model_check_complete(m));
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    Py_RETURN_NONE;
}

static PyObject *engine_reserve(EngineObject *self, PyObject *args)
{
    long long max_tokens;
    if (!PyArg_ParseTuple(args, "L", &max_tokens)) return NULL;
    if (!engine_ready(self)) return NULL;
    rl_status st;
    ENGINE_CALL(self, st, m, rl_model_reserve(m, max_tokens));
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    Py_RETURN_NONE;
}

static int parse_one_pooling(PyObject *o, rl_pool *p)
{
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (!s) {
        if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_UnicodeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "a pooling must be a str, got %s", Py_TYPE(o)->tp_name);
        }
        return -1;
    }
    int id = rl_pool_from_name(s);
    if (id < 0) {
        PyErr_Format(PyExc_ValueError, "pooling must be 'mean', 'first', 'last' or 'max', got "
                     "'%s'", s);
        return -1;
    }
    *p = (rl_pool)id;
    return 0;
}

/* `obj` is one pooling name (*n = 1, *many = 0) or a list / tuple of 1..RL_MAX_POOLINGS
 * names (*many = 1: the result gets a leading poolings axis). */
static int parse_poolings(PyObject *obj, rl_pool *out, int64_t *n, int *many)
{
    *many = !PyUnicode_Check(obj);
    if (!*many) {
        *n = 1;
        return parse_one_pooling(obj, out);
    }
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "pooling must be a str or a list / tuple of str, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(obj);
    if (len < 1 || len > RL_MAX_POOLINGS) {
        PyErr_Format(PyExc_ValueError, "pooling must list 1 to %d poolings, got %zd",
                     RL_MAX_POOLINGS, len);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++)
        if (parse_one_pooling(PySequence_Fast_GET_ITEM(obj, i), &out[i]) < 0) return -1;
    *n = (int64_t)len;
    return 0;
}

/* Wraps a result in an ndarray whose base is a new HostBuffer (takes res):
 * [P, nl, S, d] with `many`, else [nl, S, d] (P = 1). */
static PyObject *result_to_array(const core_state *S, rl_result *res, int many, npy_intp flat)
{
    HostBufferObject *owner = PyObject_New(HostBufferObject, S->HostBufferType);
    if (!owner) {
        Py_BEGIN_ALLOW_THREADS
        rl_result_free(res);
        Py_END_ALLOW_THREADS
        return NULL;
    }
    owner->res = *res;
    npy_intp dims[4] = {(npy_intp)res->n_poolings, (npy_intp)res->n_layers,
                        (npy_intp)res->n_spans, (npy_intp)res->hidden};
    /* outputs of several widths (sites): one flat array the caller slices */
    PyObject *arr = flat ? PyArray_SimpleNewFromData(1, &flat, NPY_FLOAT32, res->data)
                  : many ? PyArray_SimpleNewFromData(4, dims, NPY_FLOAT32, res->data)
                         : PyArray_SimpleNewFromData(3, dims + 1, NPY_FLOAT32, res->data);
    if (!arr) { Py_DECREF(owner); return NULL; }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, (PyObject *)owner) < 0) {  /* steals owner */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* rl_model_forward, and with a site among the outputs the result's length in
 * floats (*flat; 0 without sites) */
static rl_status forward_sites(rl_model *m, const rl_batch *b, rl_result *res, npy_intp *flat)
{
    rl_status st = rl_model_forward(m, b, res);
    int64_t width_total = 0, sites = 0;
    for (int64_t p = 0; st == RL_OK && p < b->n_layers; p++) {
        sites |= b->layers[p] < 0;
        width_total += rl_output_width(rl_model_config(m), b->layers[p]);
    }
    if (sites) *flat = (npy_intp)(res->n_poolings * res->n_spans * width_total);
    return st;
}

static PyObject *engine_forward(EngineObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tokens", "cu_seqlens", "layers", "spans", "span_seq", "pooling", NULL};
    PyObject *o[5], *pool_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOO", kwlist, &o[0], &o[1], &o[2], &o[3],
                                     &o[4], &pool_o))
        return NULL;
    if (!engine_ready(self)) return NULL;
    static const char *names[5] = {"tokens", "cu_seqlens", "layers", "spans", "span_seq"};
    static const int ndims[5] = {1, 1, 1, 2, 1};
    PyArrayObject *a[5] = {NULL};
    PyObject *ret = NULL;
    rl_pool pools[RL_MAX_POOLINGS];
    int64_t n_pools;
    int many;
    if (parse_poolings(pool_o, pools, &n_pools, &many) < 0) return NULL;
    for (int i = 0; i < 5; i++)
        if (!(a[i] = as_int32(o[i], names[i], ndims[i]))) goto done;
    npy_intp S = PyArray_DIM(a[3], 0);
    if (PyArray_DIM(a[3], 1) != 2) {
        PyErr_Format(PyExc_ValueError, "spans must have shape [S, 2], got [%zd, %zd]",
                     (Py_ssize_t)S, (Py_ssize_t)PyArray_DIM(a[3], 1));
        goto done;
    }
    if (PyArray_DIM(a[4], 0) != S) {
        PyErr_Format(PyExc_ValueError, "span_seq has %zd entries but spans has %zd",
                     (Py_ssize_t)PyArray_DIM(a[4], 0), (Py_ssize_t)S);
        goto done;
    }
    rl_batch b = {
        .tokens = PyArray_DATA(a[0]), .n_tokens = PyArray_DIM(a[0], 0),
        .cu_seqlens = PyArray_DATA(a[1]), .n_seqs = PyArray_DIM(a[1], 0) - 1,
        .layers = PyArray_DATA(a[2]), .n_layers = PyArray_DIM(a[2], 0),
        .spans = PyArray_DATA(a[3]), .span_seq = PyArray_DATA(a[4]), .n_spans = S,
        .poolings = pools, .n_poolings = n_pools,
    };
    rl_result res;
    rl_status st;
    npy_intp flat = 0;
    ENGINE_CALL(self, st, m, forward_sites(m, &b, &res, &flat));
    if (st != RL_OK) raise_status(object_state((PyObject *)self), st);
    else ret = result_to_array(object_state((PyObject *)self), &res, many, flat);
done:
    for (int i = 0; i < 5; i++) Py_XDECREF(a[i]);
    return ret;
}

/* weights, workspace, free and total bytes of one model (under the engine lock) */
static rl_status memory_of(rl_model *m, size_t out[4])
{
    rl_backend *be = rl_model_backend(m);
    out[0] = rl_model_weight_bytes(m);
    out[1] = rl_model_workspace_bytes(m);
    return be->mem_info(be, &out[2], &out[3]);
}

static PyObject *engine_memory_report(EngineObject *self, PyObject *unused)
{
    if (!engine_ready(self)) return NULL;
    size_t b[4] = {0, 0, 0, 0};
    rl_status st;
    ENGINE_CALL(self, st, m, memory_of(m, b));
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    return Py_BuildValue("{s:s,s:K,s:K,s:K,s:K}", "device", self->device,
                         "weight_bytes", (unsigned long long)b[0],
                         "workspace_bytes", (unsigned long long)b[1],
                         "free_bytes", (unsigned long long)b[2],
                         "total_bytes", (unsigned long long)b[3]);
}

static PyObject *engine_verify_resident(EngineObject *self, PyObject *unused)
{
    if (!engine_ready(self)) return NULL;
    rl_status st;
    ENGINE_CALL(self, st, m, rl_model_verify_resident(m));
    if (st != RL_OK) return raise_status(object_state((PyObject *)self), st);
    Py_RETURN_NONE;
}

static PyObject *engine_get_max_tokens(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyLong_FromLongLong(rl_model_max_tokens(self->m)) : NULL;
}
static PyObject *engine_get_device(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyUnicode_FromString(self->device) : NULL;
}
static PyObject *engine_get_dtype(EngineObject *self, void *c)
{
    if (!engine_ready(self)) return NULL;
    return PyUnicode_FromString(rl_model_backend(self->m)->weight_dtype == RL_F32 ? "float32"
                                                                                : "bfloat16");
}
static PyObject *engine_get_kernel(EngineObject *self, void *c)
{
    if (!engine_ready(self)) return NULL;
    const char *k = rl_model_backend(self->m)->kernel;
    return PyUnicode_FromString(k ? k : "");
}
static PyObject *engine_get_threads(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyLong_FromLong(rl_backend_cpu_threads(rl_model_backend(self->m)))
                              : NULL;
}
static PyObject *engine_get_dequant_threads(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyLong_FromLong(rl_model_dequant_team(self->m)) : NULL;
}
static PyObject *caps_to_dict(const rl_backend_caps *c, const char *device);

static PyObject *engine_get_caps(EngineObject *self, void *c)
{
    if (!engine_ready(self)) return NULL;
    return caps_to_dict(rl_model_backend(self->m)->caps, self->device);
}
static PyObject *engine_get_weight_bytes(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyLong_FromSize_t(rl_model_weight_bytes(self->m)) : NULL;
}
static PyObject *engine_get_workspace_bytes(EngineObject *self, void *c)
{
    return engine_ready(self) ? PyLong_FromSize_t(rl_model_workspace_bytes(self->m)) : NULL;
}

static PyMethodDef engine_methods[] = {
    {"tensor_shape", (PyCFunction)(void (*)(void))engine_tensor_shape, METH_VARARGS | METH_KEYWORDS,
     "tensor_shape(kind, layer=0) -> tuple | None (None: not used or not loaded)"},
    {"set_tensor", (PyCFunction)(void (*)(void))engine_set_tensor, METH_VARARGS | METH_KEYWORDS,
     "set_tensor(kind, layer, data, dtype, shape): copy one checkpoint tensor in"},
    {"set_tensor_quantized", (PyCFunction)(void (*)(void))engine_set_tensor_quantized,
     METH_VARARGS | METH_KEYWORDS,
     "set_tensor_quantized(kind, layer, data, ggml_type, shape, family=1, group=0): copy the "
     "GGUF blocks of a kind kept quantized (Engine(keep=...)) in, unchanged; family 2/3/4 "
     "(AWQ, GPTQ, FP8 blocks): data is the tuple of parts, ggml_type the subtype of "
     "csrc/quant_hf.h, group the group size or block edge"},
    {"check_complete", (PyCFunction)engine_check_complete, METH_NOARGS,
     "raise RuntimeError naming the first tensor never set"},
    {"reserve", (PyCFunction)engine_reserve, METH_VARARGS,
     "reserve(max_tokens): (re)allocate the workspace with a capacity of max_tokens tokens"},
    {"forward", (PyCFunction)(void (*)(void))engine_forward, METH_VARARGS | METH_KEYWORDS,
     "forward(tokens, cu_seqlens, layers, spans, span_seq, pooling) -> float32 [nl, S, d]; "
     "pooling a list / tuple of names: [P, nl, S, d], each span pooled once per entry"},
    {"memory_report", (PyCFunction)engine_memory_report, METH_NOARGS, "weight/workspace/free/total bytes"},
    {"close", (PyCFunction)engine_close, METH_NOARGS,
     "free weights, workspace and device now (results already returned stay valid)"},
    {"verify_resident", (PyCFunction)engine_verify_resident, METH_NOARGS,
     "raise DeviceError if a weight is not in device memory"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"max_tokens", (getter)engine_get_max_tokens, NULL, "workspace capacity in tokens", NULL},
    {"device", (getter)engine_get_device, NULL, "'cpu' or 'cuda:N'", NULL},
    {"dtype", (getter)engine_get_dtype, NULL, "storage dtype of weights and GEMM operands", NULL},
    {"kernel", (getter)engine_get_kernel, NULL,
     "what decides the result bits besides the weights (BLAS and core; GPU arch and cuBLAS)", NULL},
    {"threads", (getter)engine_get_threads, NULL,
     "threads of the CPU backend's OpenMP teams (1 on CUDA)", NULL},
    {"dequant_threads", (getter)engine_get_dequant_threads, NULL,
     "the largest OpenMP team a CPU dequantization of kept weights ran on so far (0: none)",
     NULL},
    {"caps", (getter)engine_get_caps, NULL,
     "what this engine's backend supports (the dict of _core.backend_caps)", NULL},
    {"weight_bytes", (getter)engine_get_weight_bytes, NULL, "bytes held by weights", NULL},
    {"workspace_bytes", (getter)engine_get_workspace_bytes, NULL, "bytes held by the workspace", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot engine_slots[] = {
    {Py_tp_dealloc, (void *)engine_dealloc},
    {Py_tp_doc, (void *)"Engine(config: dict, device: str, n_threads: int = 0, dtype: str | None "
                        "= None): one model on one device; dtype 'float32' or 'bfloat16' (CUDA "
                        "only), None: the device's default (CPU float32, CUDA bfloat16)."},
    {Py_tp_methods, engine_methods},
    {Py_tp_getset, engine_getset},
    {Py_tp_init, (void *)engine_init},
    {Py_tp_new, (void *)PyType_GenericNew},
    {0, NULL},
};

/* Not a base type: Py_TYPE(self) is always the module's own Engine type
 * (object_state relies on it). */
static PyType_Spec engine_spec = {
    .name = "rjepa_latent._core.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = engine_slots,
};

/* ---- module functions ---------------------------------------------------- */

static PyObject *core_build_info(PyObject *mod, PyObject *unused)
{
    char blas[192];
    rl_cpu_blas_name(blas, sizeof blas);
#ifdef _OPENMP
    PyObject *omp = Py_True;
#else
    PyObject *omp = Py_False;
#endif
    /* the CPU GEMM's kernels: the ones a CPU Model made now would use
     * (RJEPA_CPU_ISA, else the widest), and all this CPU runs */
    rl_cpu_isa isa;
    char isa_s[256], isas[64] = "";
    if (rl_gemm_isa_from_env(&isa, isa_s, sizeof isa_s) == 0)
        snprintf(isa_s, sizeof isa_s, "%s", rl_gemm_isa_name(isa));
    for (int i = RL_ISA_COUNT - 1; i >= 0; i--)
        if (rl_gemm_isa_available((rl_cpu_isa)i))
            snprintf(isas + strlen(isas), sizeof isas - strlen(isas), "%s%s", *isas ? " " : "",
                     rl_gemm_isa_name((rl_cpu_isa)i));
    return Py_BuildValue("{s:s,s:s,s:O,s:s,s:O,s:s,s:s}", "version", RL_VERSION, "blas", blas,
                         "cuda", rl_cuda_compiled() ? Py_True : Py_False,
                         "cuda_arch", rl_cuda_compiled() ? RL_CUDA_ARCHS : "", "openmp", omp,
                         "cpu_isa", isa_s, "cpu_isas", isas);
}

static int append_str(PyObject *list, const char *str)
{
    PyObject *v = PyUnicode_FromString(str);
    int rc = v ? PyList_Append(list, v) : -1;
    Py_XDECREF(v);
    return rc;
}

/* {"device", "dtypes", "poolings", "head_dims" (None: any even), "max_heads"
 * (None: no limit)} */
static PyObject *caps_to_dict(const rl_backend_caps *c, const char *device)
{
    PyObject *dtypes = PyList_New(0), *poolings = PyList_New(0), *dims = NULL, *d = NULL;
    PyObject *features = PyList_New(0);
    if (!dtypes || !poolings || !features) goto done;
    for (int i = 0; i < RL_FEAT_COUNT; i++)
        if ((c->features & (1u << i)) && append_str(features, rl_feature_name(i)) < 0) goto done;
    for (int i = 0; i < 3; i++)
        if ((c->dtypes & (1u << i)) && append_str(dtypes, rl_dtype_name((rl_dtype)i)) < 0)
            goto done;
    for (int i = 0; i < RL_POOL_COUNT; i++)
        if ((c->poolings & (1u << i)) && append_str(poolings, rl_pool_name(i)) < 0) goto done;
    if (c->head_dims) {
        if (!(dims = PyList_New(c->n_head_dims))) goto done;
        for (int i = 0; i < c->n_head_dims; i++) {
            PyObject *v = PyLong_FromLong(c->head_dims[i]);
            if (!v) goto done;
            PyList_SET_ITEM(dims, i, v);
        }
    } else {
        dims = Py_NewRef(Py_None);
    }
    d = Py_BuildValue("{s:s,s:O,s:O,s:O,s:N,s:O}", "device", device, "dtypes", dtypes, "poolings",
                      poolings, "head_dims", dims, "max_heads",
                      c->max_heads > 0 ? PyLong_FromLongLong(c->max_heads) : Py_NewRef(Py_None),
                      "features", features);
done:
    Py_XDECREF(features);
    Py_XDECREF(dtypes);
    Py_XDECREF(poolings);
    Py_XDECREF(dims);
    return d;
}

static PyObject *core_backend_caps(PyObject *mod, PyObject *args)
{
    const char *device;
    if (!PyArg_ParseTuple(args, "s", &device)) return NULL;
    int idx = parse_device(device);
    if (idx == -2) return NULL;
    rl_backend_caps caps;
    rl_status st = rl_backend_caps_get(idx, &caps);
    if (st != RL_OK) return raise_status(module_state(mod), st);
    char name[32];
    device_name(idx, name, sizeof name);
    return caps_to_dict(&caps, name);
}

static PyObject *core_check_config(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", "device", "dtype", NULL};
    PyObject *cfg_obj;
    const char *device, *dtype_s = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Os|z", kwlist, &cfg_obj, &device, &dtype_s))
        return NULL;
    core_state *S = module_state(mod);
    rl_config cfg;
    if (parse_config(S, cfg_obj, &cfg) < 0) return NULL;
    int idx = parse_device(device);
    if (idx == -2) return NULL;
    rl_dtype dt;
    if (parse_engine_dtype(dtype_s, idx, &dt) < 0) return NULL;
    rl_status st = check_caps(idx, &cfg, dt);
    if (st != RL_OK) return raise_status(S, st);
    Py_RETURN_NONE;
}

static PyObject *core_cuda_pinned_pool(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"trim", NULL};
    int trim = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p", kwlist, &trim)) return NULL;
    rl_pinned_pool_stats ps;
    Py_BEGIN_ALLOW_THREADS
    if (trim) rl_cuda_pinned_pool_trim();
    rl_cuda_pinned_pool_stats(&ps);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "cap_bytes", (unsigned long long)ps.cap_bytes,
                         "cached_bytes", (unsigned long long)ps.cached_bytes,
                         "live_bytes", (unsigned long long)ps.live_bytes,
                         "reused", (unsigned long long)ps.reused,
                         "allocated", (unsigned long long)ps.allocated,
                         "freed", (unsigned long long)ps.freed);
}

static PyObject *core_cuda_device_count(PyObject *mod, PyObject *unused)
{
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = rl_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *core_cuda_check_device(PyObject *mod, PyObject *args)
{
    int idx;
    if (!PyArg_ParseTuple(args, "i", &idx)) return NULL;
    rl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rl_cuda_check_device(idx);
    Py_END_ALLOW_THREADS
    if (st != RL_OK) return raise_status(module_state(mod), st);
    Py_RETURN_NONE;
}

static PyObject *core_cuda_mem_info(PyObject *mod, PyObject *args)
{
    int idx;
    if (!PyArg_ParseTuple(args, "i", &idx)) return NULL;
    size_t free_b = 0, total_b = 0;
    rl_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rl_cuda_mem_info(idx, &free_b, &total_b);
    Py_END_ALLOW_THREADS
    if (st != RL_OK) return raise_status(module_state(mod), st);
    return Py_BuildValue("(KK)", (unsigned long long)free_b, (unsigned long long)total_b);
}

/* dequant_hf(family, subtype, rows, cols, group, parts, out, r0, r1, threads=0): rows
 * [r0, r1) of an AWQ / GPTQ / FP8-block weight (quant_hf.h) into `out`, a writable
 * C-contiguous buffer of (r1 - r0) * cols float32, on `threads` threads (0: one per core);
 * `parts`: a tuple of up to 4 buffers or None. Returns the OpenMP team that ran; ValueError
 * with the reason when the parts are inconsistent or damaged. */
static PyObject *core_dequant_hf(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"family", "subtype", "rows", "cols", "group", "parts", "out", "r0",
                             "r1", "threads", NULL};
    int family, subtype, nt = 0, team = 0;
    long long rows, cols, group, r0, r1;
    PyObject *parts, *out_obj;
    (void)mod;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiLLLO!OLL|i", kwlist, &family, &subtype,
                                     &rows, &cols, &group, &PyTuple_Type, &parts, &out_obj, &r0,
                                     &r1, &nt))
        return NULL;
    if ((nt = rl_py_threads(nt)) < 0) return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(parts);
    if (n > RL_QUANT_MAX_PARTS)
        return PyErr_Format(PyExc_ValueError, "parts has %zd entries, at most %d", n,
                            RL_QUANT_MAX_PARTS);
    rl_qtensor q;
    memset(&q, 0, sizeof q);
    q.family = family;
    q.subtype = subtype;
    q.rows = rows;
    q.cols = cols;
    q.group = group;
    Py_buffer views[RL_QUANT_MAX_PARTS], outv;
    int got = 0;
    PyObject *ret = NULL;
    for (; got < n; got++) {
        PyObject *o = PyTuple_GET_ITEM(parts, got);
        if (o == Py_None) { views[got].obj = NULL; continue; }
        if (PyObject_GetBuffer(o, &views[got], PyBUF_C_CONTIGUOUS) < 0) goto done;
        q.part[got] = views[got].buf;
        q.part_bytes[got] = (size_t)views[got].len;
    }
    if (PyObject_GetBuffer(out_obj, &outv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    if (r0 < 0 || r1 < r0 || r1 > rows || cols <= 0 ||
        (size_t)outv.len != (size_t)(r1 - r0) * (size_t)cols * sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "out has %zd bytes; rows [%lld, %lld) of %lld columns of "
                     "float32 need %lld", outv.len, r0, r1, cols,
                     (r1 - r0) * cols * (long long)sizeof(float));
    } else {
        char err[256] = {0};
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = rl_dequant_hf_rows_f32(&q, r0, r1, (float *)outv.buf, nt, &team, err, sizeof err);
        Py_END_ALLOW_THREADS
        if (rc < 0) PyErr_SetString(PyExc_ValueError, err);
        else ret = PyLong_FromLong(team);
    }
    PyBuffer_Release(&outv);
done:
    for (int i = 0; i < got; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
    return ret;
}

static PyObject *core_plan_bytes(PyObject *mod, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", "device", "max_tokens", "dtype", "keep", NULL};
    PyObject *cfg_obj, *keep_obj = NULL;
    const char *device, *dtype_s = NULL;
    long long max_tokens;
    unsigned keep;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OsL|zO", kwlist, &cfg_obj, &device, &max_tokens,
                                     &dtype_s, &keep_obj) || rl_py_keep_mask(keep_obj, &keep) < 0)
        return NULL;
    core_state *S = module_state(mod);
    rl_config cfg;
    if (parse_config(S, cfg_obj, &cfg) < 0) return NULL;
    int idx = parse_device(device);
    if (idx == -2) return NULL;
    rl_dtype wd;   /* weights and GEMM operands; the residual is f32 everywhere */
    if (parse_engine_dtype(dtype_s, idx, &wd) < 0) return NULL;
    /* a plan the backend could not run is refused; a CPU-only build still
     * plans for CUDA (its capabilities are then unknown) */
    rl_status st = check_caps(idx, &cfg, wd);
    if (st != RL_OK && st != RL_ERR_DEVICE) return raise_status(S, st);
    if (max_tokens < 1 || max_tokens > (1LL << 30))   /* rl_model_reserve's range */
        return PyErr_Format(PyExc_ValueError, "max_tokens must be in [1, 2^30], got %lld",
                            max_tokens);
    /* kept kinds: no dense buffer, one scratch (their stored bytes are the caller's to add) */
    const int64_t ra = idx < 0 ? rl_cpu_gemm_row_align() : 1;   /* its GEMM weight layout */
    size_t w = rl_weights_bytes(&cfg, wd, ra) - rl_qw_dense_bytes_kept(&cfg, keep, wd, ra)
             + rl_qw_scratch_bytes(&cfg, keep, wd, ra);
    size_t ws = rl_workspace_bytes(&cfg, wd, RL_F32, max_tokens);
    return Py_BuildValue("(KK)", (unsigned long long)w, (unsigned long long)ws);
}

/* Every tensor the engine needs under `config` (its max_layer included), in
 * feed order: [(kind, layer, shape)]. The one definition of model structure
 * that both checkpoint loaders follow. */
static PyObject *core_tensor_layout(PyObject *mod, PyObject *args)
{
    PyObject *cfg_obj;
    if (!PyArg_ParseTuple(args, "O", &cfg_obj)) return NULL;
    rl_config cfg;
    if (parse_config(module_state(mod), cfg_obj, &cfg) < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    int64_t n_loaded = rl_config_loaded_layers(&cfg);
    for (int64_t slot = 0; slot <= n_loaded; slot++)
        for (int k = 0; k < RL_T_COUNT; k++) {
            if (rl_tensor_kind_is_global((rl_tensor_kind)k) != (slot == 0)) continue;
            int64_t s[2];
            int nd = rl_tensor_shape(&cfg, (rl_tensor_kind)k, s);
            if (nd == 0) continue;
            PyObject *shape = nd == 1 ? Py_BuildValue("(L)", (long long)s[0])
                                      : Py_BuildValue("(LL)", (long long)s[0], (long long)s[1]);
            PyObject *row = shape ? Py_BuildValue("(sLN)", rl_tensor_kind_name((rl_tensor_kind)k),
                                                  (long long)(slot ? slot - 1 : 0), shape) : NULL;
            if (!row || PyList_Append(out, row) < 0) {
                Py_XDECREF(row);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(row);
        }
    return out;
}

static PyMethodDef core_methods[] = {
    {"tensor_layout", core_tensor_layout, METH_VARARGS,
     "tensor_layout(config) -> [(kind, layer, shape)]: every tensor the engine needs"},
    {"build_info", core_build_info, METH_NOARGS, "version, blas, cuda, cuda_arch, openmp"},
    {"backend_caps", core_backend_caps, METH_VARARGS,
     "backend_caps(device) -> {device, dtypes, poolings, head_dims, max_heads}: what the "
     "backend of device supports (no device needed; DeviceError if CUDA is not built in)"},
    {"check_config", (PyCFunction)(void (*)(void))core_check_config, METH_VARARGS | METH_KEYWORDS,
     "check_config(config, device, dtype=None): ValueError naming what that backend cannot run"},
    {"cuda_device_count", core_cuda_device_count, METH_NOARGS, "usable CUDA devices (0 if none)"},
    {"cuda_check_device", core_cuda_check_device, METH_VARARGS, "raise DeviceError if unusable"},
    {"cuda_mem_info", core_cuda_mem_info, METH_VARARGS, "(free_bytes, total_bytes) of a device"},
    {"cuda_pinned_pool", (PyCFunction)(void (*)(void))core_cuda_pinned_pool,
     METH_VARARGS | METH_KEYWORDS,
     "cuda_pinned_pool(trim=False) -> {cap_bytes, cached_bytes, live_bytes, reused, allocated, "
     "freed}: the pinned pool CUDA results live in (trim: free its cached blocks first)"},
    {"plan_bytes", (PyCFunction)(void (*)(void))core_plan_bytes, METH_VARARGS | METH_KEYWORDS,
     "plan_bytes(config, device, max_tokens, dtype=None) -> (weight_bytes, workspace_bytes) of "
     "an engine with a workspace of max_tokens tokens; ValueError if that backend cannot run "
     "config; keep: kinds kept quantized (their dense bytes left out, the scratch counted)"},
    RL_QUANT_METHODS
    {"dequant_hf", (PyCFunction)(void (*)(void))core_dequant_hf, METH_VARARGS | METH_KEYWORDS,
     "dequant_hf(family, subtype, rows, cols, group, parts, out, r0, r1, threads=0) -> team: "
     "rows [r0, r1) of an AWQ / GPTQ / FP8-block weight into out (float32) on `threads` "
     "threads (0: one per core), returning the team that ran; ValueError naming what is wrong"},
    {NULL, NULL, 0, NULL},
};

/* ---- module lifetime (PEP 489) ------------------------------------------- */

static int core_traverse(PyObject *mod, visitproc visit, void *arg)
{
    core_state *S = module_state(mod);
    if (!S) return 0;
    Py_VISIT(S->DeviceError);
    Py_VISIT(S->DeviceMemoryError);
    Py_VISIT(S->EngineType);
    Py_VISIT(S->HostBufferType);
    return 0;
}

static int core_clear(PyObject *mod)
{
    core_state *S = module_state(mod);
    if (!S) return 0;
    Py_CLEAR(S->DeviceError);
    Py_CLEAR(S->DeviceMemoryError);
    Py_CLEAR(S->EngineType);
    Py_CLEAR(S->HostBufferType);
    return 0;
}

static void core_free(void *mod) { (void)core_clear((PyObject *)mod); }

/* Runs once per module object: NumPy's C API (a table of C pointers, the
 * same for every module object), the exception classes, the types. */
static int core_exec(PyObject *mod)
{
    core_state *S = module_state(mod);
    if (_import_array() < 0) return -1;
    PyObject *errors = PyImport_ImportModule("rjepa_latent.errors");
    if (!errors) return -1;
    S->DeviceError = PyObject_GetAttrString(errors, "DeviceError");
    S->DeviceMemoryError = S->DeviceError ? PyObject_GetAttrString(errors, "DeviceMemoryError")
                                          : NULL;
    Py_DECREF(errors);
    if (!S->DeviceError || !S->DeviceMemoryError) return -1;
    S->EngineType = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &engine_spec, NULL);
    if (!S->EngineType) return -1;
    S->HostBufferType = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &hostbuffer_spec, NULL);
    if (!S->HostBufferType) return -1;
    if (PyModule_AddType(mod, S->EngineType) < 0 || PyModule_AddType(mod, S->HostBufferType) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, (void *)core_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* NumPy does not support subinterpreters */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_core",
    .m_doc = "C engine of rjepa_latent (see docs/internals.md).",
    .m_size = sizeof(core_state),
    .m_methods = core_methods,
    .m_slots = core_slots,
    .m_traverse = core_traverse,
    .m_clear = core_clear,
    .m_free = core_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&core_module); }
