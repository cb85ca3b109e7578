/*
 * aiosync._seqc: the memory ordering of aiosync's SeqCount and SeqRecord.
 *
 * This file is the only place in aiosync that knows about memory ordering. CPython
 * gives Python code no fences and does not promise that an 8-byte struct/memoryview
 * access is one access, so every load and store of a sequence counter, and every
 * copy of a record's payload that a counter guards, happens here, with C11
 * <stdatomic.h> (correct on x86-64 and aarch64 alike).
 *
 * Layout, at an 8-byte aligned address inside a buffer this object holds exported:
 *
 *     +0   uint64  seq       even: stable; odd: a write is in progress
 *     +8   uint64  holder    0, or the token (pid << 32 | start time) of the writer
 *     +16  payload copy 0    (records only) `size` bytes, padded to 8
 *     ...  payload copy 1    (latch records only)
 *
 * Writer (FreeBSD seqc(9)):
 *     claim holder 0 -> token (compare-and-swap: at most one writer at a time);
 *     seq += 1 (odd), store-release; release fence; payload stores;
 *     seq += 1 (even), store-release; holder = 0, store-release.
 * Reader:
 *     s1 = load-acquire seq; if odd, retry later;
 *     copy the payload (relaxed word loads); acquire fence; s2 = load seq;
 *     consistent if s1 == s2.
 * Latch mode (Linux seqcount_latch): two copies; readers read copy (seq & 1), so a
 * reader never waits for a writer: while copy 0 is written (seq odd) they read copy 1,
 * and copy 1 is brought up to date only once seq is even again.
 *
 * The payload is copied in 8-byte words with relaxed atomic loads and stores, so no
 * access is a data race in the C11 sense and no word is ever split.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "aiosync needs lock-free 64-bit atomics (they must work across processes)"
#endif

typedef _Atomic uint64_t atomic_u64;

_Static_assert(sizeof(atomic_u64) == 8, "a 64-bit atomic must take 8 bytes");

#define HEADER 16    /* seq + holder */
#define READ_TRIES 8 /* snapshot attempts per call while the counter keeps changing */

/* ---------------------------------------------------------------------------------
 * Exceptions of aiosync._errors, imported when first needed (never on a fast path).
 * --------------------------------------------------------------------------------- */

static PyObject *
aiosync_error(const char *name)
{
    PyObject *module = PyImport_ImportModule("aiosync._errors");
    if (module == NULL) {
        return NULL;
    }
    PyObject *cls = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return cls;
}

static void
raise_aiosync(const char *name, const char *message)
{
    PyObject *cls = aiosync_error(name);
    if (cls != NULL) {
        PyErr_SetString(cls, message);
        Py_DECREF(cls);
    }
}

/* ---------------------------------------------------------------------------------
 * Word copies: relaxed atomic accesses, 8 bytes at a time.
 * --------------------------------------------------------------------------------- */

static inline void
copy_out(char *dst, const unsigned char *src, Py_ssize_t size)
{
    const atomic_u64 *words = (const atomic_u64 *)(const void *)src;
    Py_ssize_t full = size / 8;
    for (Py_ssize_t i = 0; i < full; i++) {
        uint64_t v = atomic_load_explicit(&words[i], memory_order_relaxed);
        memcpy(dst + 8 * i, &v, 8);
    }
    if (size % 8) {
        uint64_t v = atomic_load_explicit(&words[full], memory_order_relaxed);
        memcpy(dst + 8 * full, &v, (size_t)(size % 8));
    }
}

static inline void
copy_in(unsigned char *dst, const char *src, Py_ssize_t size)
{
    atomic_u64 *words = (atomic_u64 *)(void *)dst;
    Py_ssize_t full = size / 8;
    for (Py_ssize_t i = 0; i < full; i++) {
        uint64_t v;
        memcpy(&v, src + 8 * i, 8);
        atomic_store_explicit(&words[i], v, memory_order_relaxed);
    }
    if (size % 8) {
        uint64_t v = 0;
        memcpy(&v, src + 8 * full, (size_t)(size % 8));
        atomic_store_explicit(&words[full], v, memory_order_relaxed);
    }
}

static inline void
copy_words(unsigned char *dst, const unsigned char *src, Py_ssize_t nwords)
{
    atomic_u64 *d = (atomic_u64 *)(void *)dst;
    const atomic_u64 *s = (const atomic_u64 *)(const void *)src;
    for (Py_ssize_t i = 0; i < nwords; i++) {
        atomic_store_explicit(
            &d[i], atomic_load_explicit(&s[i], memory_order_relaxed), memory_order_relaxed);
    }
}

/* ---------------------------------------------------------------------------------
 * The Counter type
 * --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* held from construction until release() */
    atomic_u64 *seq;       /* NULL once released */
    atomic_u64 *holder;
    unsigned char *payload; /* copy 0 */
    Py_ssize_t size;        /* payload bytes */
    Py_ssize_t stride;      /* bytes from one copy to the next (size rounded up to 8) */
    int copies;             /* 0: bare counter, 1: record, 2: latch record */
    PyObject *unpack;       /* records: struct.Struct(fmt).unpack */
} Counter;

static int
check_open(Counter *self)
{
    if (self->seq == NULL) {
        raise_aiosync("ClosedResourceError", "this object was closed");
        return -1;
    }
    return 0;
}

static int
setup(Counter *self, PyObject *buffer, Py_ssize_t offset, Py_ssize_t size, int copies,
      PyObject *unpack)
{
    if (self->seq != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "already initialized");
        return -1;
    }
    if (offset < 0 || offset % 8) {
        PyErr_Format(PyExc_ValueError, "offset must be a multiple of 8 and >= 0, not %zd", offset);
        return -1;
    }
    if (copies < 0 || copies > 2 || size < 0 || (copies == 0) != (size == 0)) {
        PyErr_SetString(PyExc_ValueError, "bad record geometry");
        return -1;
    }
    Py_ssize_t stride = (size + 7) / 8 * 8;
    if (stride > (PY_SSIZE_T_MAX - HEADER - offset) / 2) {
        PyErr_SetString(PyExc_OverflowError, "record too large");
        return -1;
    }
    Py_ssize_t needed = offset + HEADER + (Py_ssize_t)copies * stride;

    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (self->view.len < needed) {
        PyErr_Format(PyExc_ValueError,
                     "the buffer is too small: %zd bytes from offset %zd are needed, it has %zd",
                     needed - offset, offset, self->view.len);
        PyBuffer_Release(&self->view);
        return -1;
    }
    unsigned char *base = (unsigned char *)self->view.buf + offset;
    if ((uintptr_t)base % 8) {
        PyErr_Format(PyExc_ValueError,
                     "the counter's address is not 8-byte aligned (the buffer starts %zu "
                     "bytes past an 8-byte boundary)",
                     (size_t)((uintptr_t)self->view.buf % 8));
        PyBuffer_Release(&self->view);
        return -1;
    }
    self->seq = (atomic_u64 *)(void *)base;
    self->holder = (atomic_u64 *)(void *)(base + 8);
    self->payload = base + HEADER;
    self->size = size;
    self->stride = stride;
    self->copies = copies;
    Py_XINCREF(unpack);
    Py_XSETREF(self->unpack, unpack);
    return 0;
}

static int
Counter_init(Counter *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"buffer", "offset", "size", "copies", NULL};
    PyObject *buffer;
    Py_ssize_t offset, size = 0;
    int copies = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|ni:Counter", keywords, &buffer, &offset,
                                     &size, &copies)) {
        return -1;
    }
    return setup(self, buffer, offset, size, copies, NULL);
}

static int
Record_init(Counter *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"buffer", "offset", "size", "copies", "unpack", NULL};
    PyObject *buffer, *unpack;
    Py_ssize_t offset, size;
    int copies;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnniO:Record", keywords, &buffer, &offset,
                                     &size, &copies, &unpack)) {
        return -1;
    }
    if (copies < 1 || size < 1) {
        PyErr_SetString(PyExc_ValueError, "a record needs a payload and 1 or 2 copies of it");
        return -1;
    }
    if (!PyCallable_Check(unpack)) {
        PyErr_SetString(PyExc_TypeError, "unpack must be callable");
        return -1;
    }
    return setup(self, buffer, offset, size, copies, unpack);
}

static void
release(Counter *self)
{
    if (self->seq != NULL) {
        self->seq = NULL;
        self->holder = NULL;
        self->payload = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->unpack);
}

static void
Counter_dealloc(Counter *self)
{
    release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Counter_release(Counter *self, PyObject *Py_UNUSED(ignored))
{
    release(self);
    Py_RETURN_NONE;
}

static PyObject *
Counter_get_released(Counter *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->seq == NULL);
}

/* -- reading ------------------------------------------------------------------------ */

static PyObject *
Counter_load(Counter *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(self->seq, memory_order_acquire));
}

static PyObject *
Counter_consistent(Counter *self, PyObject *arg)
{
    if (check_open(self) < 0) {
        return NULL;
    }
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "seq must be an int returned by read(), not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (seq == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "seq must be a value returned by read()");
        return NULL;
    }
    /* Every load of the protected data before this point stays before the next load. */
    atomic_thread_fence(memory_order_acquire);
    uint64_t now = atomic_load_explicit(self->seq, memory_order_relaxed);
    return PyBool_FromLong(now == (uint64_t)seq);
}

static PyObject *
Counter_writer(Counter *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(self->holder, memory_order_acquire));
}

/* One snapshot attempt loop. Returns a new reference to the snapshot (unpacked when
 * an unpack callable was given), or Py_None (new reference) when the counter was odd
 * (non-latch) or kept changing for READ_TRIES attempts. */
static PyObject *
snapshot(Counter *self)
{
    PyObject *bytes = PyBytes_FromStringAndSize(NULL, self->size);
    if (bytes == NULL) {
        return NULL;
    }
    char *dst = PyBytes_AS_STRING(bytes);
    for (int tries = 0; tries < READ_TRIES; tries++) {
        uint64_t s1 = atomic_load_explicit(self->seq, memory_order_acquire);
        const unsigned char *src = self->payload;
        if (s1 & 1) {
            if (self->copies < 2) {
                break; /* a write is in progress */
            }
            src += self->stride; /* latch: copy 1 is stable while copy 0 is written */
        }
        copy_out(dst, src, self->size);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(self->seq, memory_order_relaxed) == s1) {
            PyObject *values = PyObject_CallOneArg(self->unpack, bytes);
            Py_DECREF(bytes);
            return values;
        }
    }
    Py_DECREF(bytes);
    Py_RETURN_NONE;
}

static PyObject *
Counter_try_read(Counter *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    return snapshot(self);
}

static PyObject *
Counter_read_nowait(Counter *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *result = Counter_try_read(self, NULL);
    if (result == Py_None) {
        Py_DECREF(result);
        raise_aiosync("WouldBlock", "a write is in progress");
        return NULL;
    }
    return result;
}

/* -- await record.read(): an already finished coroutine when no wait is needed ------- */

/* `await record.read()` returns at once when a snapshot is available (asyncio's own
 * fast-path convention). A Python coroutine would cost a frame and a coroutine object
 * on every call, doubling the read; instead Record.read() returns a Ready: an object
 * that follows the coroutine protocol (__await__, send, throw, close; so asyncio and
 * uvloop accept it as a coroutine, create_task() included) and finishes on its first
 * step with the snapshot. When a wait is needed, read() returns the coroutine of the
 * Python method _read_slow() instead. */

typedef struct {
    PyObject_HEAD
    PyObject *value; /* NULL once taken */
} Ready;

static PyTypeObject ReadyType;

static PyObject *
ready_new(PyObject *value)
{
    Ready *ready = PyObject_New(Ready, &ReadyType);
    if (ready == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    ready->value = value; /* steals the reference */
    return (PyObject *)ready;
}

static void
Ready_dealloc(Ready *self)
{
    Py_XDECREF(self->value);
    PyObject_Free(self);
}

static PyObject *
Ready_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

static int
ready_take(Ready *self, PyObject **value)
{
    *value = self->value;
    self->value = NULL;
    if (*value == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited read()");
        return -1;
    }
    return 0;
}

static PySendResult
Ready_am_send(PyObject *self, PyObject *Py_UNUSED(arg), PyObject **result)
{
    if (ready_take((Ready *)self, result) < 0) {
        return PYGEN_ERROR;
    }
    return PYGEN_RETURN;
}

static PyObject *
Ready_next(PyObject *self)
{
    PyObject *value;
    if (ready_take((Ready *)self, &value) < 0) {
        return NULL;
    }
    PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, value);
    Py_DECREF(value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

static PyObject *
Ready_send(PyObject *self, PyObject *Py_UNUSED(arg))
{
    return Ready_next(self);
}

static PyObject *
Ready_throw(Ready *self, PyObject *args)
{
    PyObject *type, *value = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &type, &value, &tb)) {
        return NULL;
    }
    Py_CLEAR(self->value);
    if (PyExceptionInstance_Check(type)) {
        PyErr_SetObject((PyObject *)Py_TYPE(type), type);
    }
    else if (PyExceptionClass_Check(type)) {
        PyErr_SetObject(type, value);
    }
    else {
        PyErr_SetString(PyExc_TypeError, "exceptions must derive from BaseException");
    }
    return NULL;
}

static PyObject *
Ready_close(Ready *self, PyObject *Py_UNUSED(ignored))
{
    Py_CLEAR(self->value);
    Py_RETURN_NONE;
}

static PyMethodDef Ready_methods[] = {
    {"send", (PyCFunction)Ready_send, METH_O, "Finish: raise StopIteration(snapshot)."},
    {"throw", (PyCFunction)Ready_throw, METH_VARARGS, "Raise the exception given."},
    {"close", (PyCFunction)Ready_close, METH_NOARGS, "Drop the snapshot."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Ready_name(PyObject *Py_UNUSED(self), void *closure)
{
    return PyUnicode_FromString((const char *)closure);
}

static PyGetSetDef Ready_getset[] = {
    {"__name__", (getter)Ready_name, NULL, NULL, "read"},
    {"__qualname__", (getter)Ready_name, NULL, NULL, "SeqRecord.read"},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyAsyncMethods Ready_async = {
    .am_await = Ready_await,
    .am_send = Ready_am_send,
};

static PyTypeObject ReadyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aiosync._seqc.Ready",
    .tp_doc = PyDoc_STR("The coroutine of a read() that needed no wait."),
    .tp_basicsize = sizeof(Ready),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)Ready_dealloc,
    .tp_as_async = &Ready_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = Ready_next,
    .tp_methods = Ready_methods,
    .tp_getset = Ready_getset,
};

static PyObject *
Record_read(Counter *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *max_attempts = Py_None;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs != 0 || nkw > 1
        || (nkw == 1
            && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "max_attempts"))) {
        PyErr_SetString(PyExc_TypeError, "read() takes only the keyword argument max_attempts");
        return NULL;
    }
    if (nkw == 1) {
        max_attempts = args[0];
    }
    if (max_attempts == Py_None) {
        if (check_open(self) < 0) {
            return NULL;
        }
        PyObject *values = snapshot(self);
        if (values != Py_None) {
            return values == NULL ? NULL : ready_new(values);
        }
        Py_DECREF(values);
    }
    return PyObject_CallMethod((PyObject *)self, "_read_slow", "O", max_attempts);
}

/* -- writing ------------------------------------------------------------------------ */

static int
parse_u64(PyObject *arg, const char *what, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Format(PyExc_ValueError, "%s must be an unsigned 64-bit int", what);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* Claim the counter for `token` if its holder is `expected`; 0 on success, else
 * the holder found (which may be 0 if `expected` was not). */
static int
begin(Counter *self, uint64_t token, uint64_t expected, uint64_t *found)
{
    uint64_t holder = expected;
    if (!atomic_compare_exchange_strong_explicit(self->holder, &holder, token,
                                                 memory_order_acq_rel, memory_order_acquire)) {
        *found = holder;
        return -1;
    }
    uint64_t seq = atomic_load_explicit(self->seq, memory_order_relaxed);
    if (!(seq & 1)) {
        if (expected != 0 && self->copies == 2) {
            /* Taking over from a writer that died after making the counter even but
             * maybe before copy 1 was complete: readers are about to switch to copy 1,
             * so repair it from copy 0 (complete, since the counter is even) first. */
            copy_words(self->payload + self->stride, self->payload, self->stride / 8);
        }
        /* Release: the holder is visible to whoever sees the counter odd. */
        atomic_store_explicit(self->seq, seq + 1, memory_order_release);
    }
    /* Odd (taking over from a dead writer): it stays odd until our end(). */
    /* Release fence: the odd counter is visible before any payload store after it. */
    atomic_thread_fence(memory_order_release);
    return 0;
}

static void
end(Counter *self)
{
    uint64_t seq = atomic_load_explicit(self->seq, memory_order_relaxed);
    if (seq & 1) {
        /* Release: every payload store of the write is visible to whoever sees this. */
        atomic_store_explicit(self->seq, seq + 1, memory_order_release);
    }
    if (self->copies == 2) {
        /* Latch: readers now read copy 0; bring copy 1 up to date. The fence keeps
         * the even counter ahead of the copy 1 stores. */
        atomic_thread_fence(memory_order_release);
        copy_words(self->payload + self->stride, self->payload, self->stride / 8);
    }
    atomic_store_explicit(self->holder, 0, memory_order_release);
}

static PyObject *
Counter_try_begin(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t token, expected, found;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "try_begin() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (check_open(self) < 0) {
        return NULL;
    }
    if (parse_u64(args[0], "token", &token) < 0 || parse_u64(args[1], "expected", &expected) < 0) {
        return NULL;
    }
    if (token == 0) {
        PyErr_SetString(PyExc_ValueError, "token must not be 0");
        return NULL;
    }
    if (begin(self, token, expected, &found) < 0) {
        return PyLong_FromUnsignedLongLong(found);
    }
    Py_RETURN_NONE;
}

static PyObject *
Counter_end(Counter *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0) {
        return NULL;
    }
    end(self);
    Py_RETURN_NONE;
}

static int
payload_arg(Counter *self, PyObject *data, Py_buffer *view)
{
    if (PyObject_GetBuffer(data, view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (view->len != self->size) {
        PyErr_Format(PyExc_ValueError, "the payload is %zd bytes, not %zd", self->size,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
Counter_store(Counter *self, PyObject *data)
{
    Py_buffer view;
    if (check_open(self) < 0 || payload_arg(self, data, &view) < 0) {
        return NULL;
    }
    copy_in(self->payload, view.buf, self->size);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyObject *
Counter_write(Counter *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    uint64_t token, found;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (check_open(self) < 0) {
        return NULL;
    }
    if (parse_u64(args[1], "token", &token) < 0) {
        return NULL;
    }
    if (token == 0) {
        PyErr_SetString(PyExc_ValueError, "token must not be 0");
        return NULL;
    }
    if (payload_arg(self, args[0], &view) < 0) {
        return NULL;
    }
    if (begin(self, token, 0, &found) < 0) {
        PyBuffer_Release(&view);
        return PyLong_FromUnsignedLongLong(found);
    }
    copy_in(self->payload, view.buf, self->size);
    end(self);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

#define COMMON_METHODS                                                                     \
    {"_writer", (PyCFunction)Counter_writer, METH_NOARGS,                                  \
     "_writer() -> int\n--\n\nThe holder's token (0 when no write is in progress)."},      \
    {"_try_begin", (PyCFunction)(void (*)(void))Counter_try_begin, METH_FASTCALL,          \
     "_try_begin(token, expected) -> int | None\n--\n\n"                                   \
     "Claim the counter (holder: expected -> token), make it odd, release fence.\n"        \
     "Returns None on success, else the holder found."},                                   \
    {"_end", (PyCFunction)Counter_end, METH_NOARGS,                                        \
     "_end() -> None\n--\n\nMake the counter even (store-release) and drop the claim."},   \
    {"_release", (PyCFunction)Counter_release, METH_NOARGS,                                \
     "_release() -> None\n--\n\nLet go of the buffer; every later call raises "            \
     "aiosync.ClosedResourceError."}

static PyMethodDef Counter_methods[] = {
    {"read_any", (PyCFunction)Counter_load, METH_NOARGS,
     "read_any($self, /)\n--\n\n"
     "The counter's current value, odd or even, without waiting (an acquire load).\n\n"
     "Returns:\n"
     "    The counter: even while no write is in progress, odd during one.\n\n"
     "Raises:\n"
     "    ClosedResourceError: the object was closed."},
    {"consistent", (PyCFunction)Counter_consistent, METH_O,
     "consistent($self, seq, /)\n--\n\n"
     "True if nothing was written since `seq` was read: an acquire fence, then a\n"
     "comparison with the counter. Loads of the protected data made before the call\n"
     "are ordered before it.\n\n"
     "Args:\n"
     "    seq: the value `read()` returned before the data was copied.\n\n"
     "Returns:\n"
     "    True if the copy is what the writer stored; False if it must be made\n"
     "    again.\n\n"
     "Raises:\n"
     "    TypeError: `seq` is not an int.\n"
     "    ClosedResourceError: the object was closed."},
    COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

static PyMethodDef Record_methods[] = {
    {"read", (PyCFunction)(void (*)(void))Record_read, METH_FASTCALL | METH_KEYWORDS,
     "read($self, /, *, max_attempts=None)\n--\n\n"
     "Await it: a consistent snapshot of the record (a tuple).\n\n"
     "Finishes at once, without a loop round trip, when no write is in progress (in\n"
     "latch mode: always, unless the record keeps changing under the copy). While a\n"
     "write is in progress, backs off asynchronously (see `backoff`) and tries again.\n\n"
     "Starvation: wrap it in asyncio.timeout() (cancellation is clean: a reader\n"
     "holds nothing), or pass max_attempts. It returns a coroutine-like object:\n"
     "await it, or pass it to create_task().\n\n"
     "Args:\n"
     "    max_attempts: give up after this many unsuccessful attempts (None: never).\n\n"
     "Returns:\n"
     "    A tuple, one value per field of the format.\n\n"
     "Raises:\n"
     "    BusyResourceError: `max_attempts` attempts found a write in progress (or\n"
     "        the record changing under the copy).\n"
     "    BrokenResourceError: the writer died inside a write (its process is gone\n"
     "        or a zombie while the counter stays odd), naming its pid.\n"
     "    TypeError: `max_attempts` is not an int or None.\n"
     "    ValueError: `max_attempts` is below 1.\n"
     "    ClosedResourceError: the record was closed, before or during the wait."},
    {"read_nowait", (PyCFunction)Counter_read_nowait, METH_NOARGS,
     "read_nowait($self, /)\n--\n\n"
     "A consistent snapshot of the record, without waiting.\n\n"
     "Returns:\n"
     "    A tuple, one value per field of the format.\n\n"
     "Raises:\n"
     "    WouldBlock: a write is in progress (never, in latch mode, unless the\n"
     "        record keeps changing under the copy).\n"
     "    ClosedResourceError: the record was closed."},
    {"_try_read", (PyCFunction)Counter_try_read, METH_NOARGS,
     "_try_read() -> tuple | None\n--\n\n"
     "A consistent snapshot, or None if a write is in progress (or the counter kept\n"
     "changing)."},
    {"_load", (PyCFunction)Counter_load, METH_NOARGS,
     "_load() -> int\n--\n\nThe counter, with an acquire load."},
    {"_store", (PyCFunction)Counter_store, METH_O,
     "_store(data) -> None\n--\n\nCopy data into the payload, inside a write."},
    {"_write", (PyCFunction)(void (*)(void))Counter_write, METH_FASTCALL,
     "_write(data, token) -> int | None\n--\n\n"
     "_try_begin(token, 0), _store(data), _end() in one call; None on success, else\n"
     "the holder found (nothing was written)."},
    COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Counter_getset[] = {
    {"_released", (getter)Counter_get_released, NULL, "True after _release().", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aiosync._seqc.Counter",
    .tp_doc = PyDoc_STR(
        "Counter(buffer, offset, size=0, copies=0)\n--\n\n"
        "A sequence counter at `offset` of a writable buffer, which stays exported until\n"
        "_release(). `size` and `copies` describe the payload that follows it, if any\n"
        "(the writer's side of a latch needs them)."),
    .tp_basicsize = sizeof(Counter),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Counter_init,
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_methods = Counter_methods,
    .tp_getset = Counter_getset,
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aiosync._seqc.Record",
    .tp_doc = PyDoc_STR(
        "Record(buffer, offset, size, copies, unpack)\n--\n\n"
        "A sequence counter followed by `copies` (1, or 2 for a latch) copies of a\n"
        "`size`-byte payload; snapshots are passed to `unpack`."),
    .tp_basicsize = sizeof(Counter),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Record_init,
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_methods = Record_methods,
    .tp_getset = Counter_getset,
};

static struct PyModuleDef seqc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiosync._seqc",
    .m_doc = "Sequence counters in shared memory, with C11 memory ordering.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__seqc(void)
{
    atomic_u64 probe = 0;
    if (!atomic_is_lock_free(&probe)) {
        PyErr_SetString(PyExc_ImportError,
                        "aiosync needs lock-free 64-bit atomics (they must work across "
                        "processes)");
        return NULL;
    }
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&RecordType) < 0
        || PyType_Ready(&ReadyType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&seqc_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&CounterType);
    if (PyModule_AddObject(module, "Counter", (PyObject *)&CounterType) < 0) {
        Py_DECREF(&CounterType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(module, "Record", (PyObject *)&RecordType) < 0) {
        Py_DECREF(&RecordType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "HEADER", HEADER) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
