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
 *     ...  uint64  last      (records only) 0, or the token of the writer that began
 *                            the latest write (it stays when the write ends)
 *
 * Writer (FreeBSD seqc(9)):
 *     claim holder 0 -> token (compare-and-swap: at most one writer at a time);
 *     last = token (records; relaxed: the store-release of the even seq publishes it);
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
 *
 * Interpreters. The module uses multi-phase initialisation (PEP 489); its types are heap
 * types made from specs and kept in the module state, so each interpreter that imports
 * it has its own, and nothing here is a mutable static: it supports subinterpreters with
 * their own GIL. Free-threaded builds: an object's own fields (the buffer it holds, the
 * pointers into it, the unpack callable) change only in setup() and _release(), and
 * every method reads them inside the object's critical section (a no-op with a GIL), so
 * a _release() in one thread never pulls the memory from under a snapshot() in another;
 * inside a critical section nothing allocates with a chance of blocking or calls Python
 * code. The shared memory itself needs no lock: it is the C11 atomics above. Hence
 * Py_mod_gil = Py_MOD_GIL_NOT_USED.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX < 0x030D0000
/* Critical sections came with free threading (3.13); before that the GIL is the lock. */
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "aiosync needs lock-free 64-bit atomics (they must work across processes)"
#endif

typedef _Atomic uint64_t atomic_u64;

_Static_assert(sizeof(atomic_u64) == 8, "a 64-bit atomic must take 8 bytes");

#define HEADER 16    /* seq + holder */
#define LAST 8       /* records: the last writer's token, after the payload copies */
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

static PyObject *
closed_error(void)
{
    raise_aiosync("ClosedResourceError", "this object was closed");
    return NULL;
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
 * Module state: the types of this interpreter's copy of the module
 * --------------------------------------------------------------------------------- */

typedef struct {
    PyTypeObject *counter_type;
    PyTypeObject *record_type;
    PyTypeObject *ready_type;
    /* This process's writer token (pid << 32 | start time), 0 until the Python side
     * has computed it, and again in a forked child until it computes its own. */
    atomic_u64 token;
    PyObject *write_slow; /* the interned name "_write_slow" */
    PyObject *zero;       /* the int 0, pack_into's offset */
} seqc_state;

static inline seqc_state *
get_state(PyObject *module)
{
    return (seqc_state *)PyModule_GetState(module);
}

/* Bytes a counter and its records take: the header, `copies` payload copies of `size`
 * bytes padded to 8, and (records) the last writer's token; -1 if that overflows. */
static Py_ssize_t
span_of(Py_ssize_t size, int copies)
{
    Py_ssize_t stride = (size + 7) / 8 * 8;
    if (stride > (PY_SSIZE_T_MAX - HEADER - LAST) / 2) {
        return -1;
    }
    return HEADER + (Py_ssize_t)copies * stride + (copies ? LAST : 0);
}

/* ---------------------------------------------------------------------------------
 * The Counter type
 * --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer view;        /* held from construction until release() */
    atomic_u64 *seq;       /* NULL until set up, and once released */
    atomic_u64 *holder;
    atomic_u64 *last;      /* records only, else NULL */
    unsigned char *payload; /* copy 0 */
    Py_ssize_t size;        /* payload bytes */
    Py_ssize_t stride;      /* bytes from one copy to the next (size rounded up to 8) */
    int copies;             /* 0: bare counter, 1: record, 2: latch record */
    int set_up;             /* once set up, never again (the fields above stay put) */
    PyObject *unpack;       /* records: struct.Struct(fmt).unpack */
    PyObject *pack_into;    /* records with a fast write: struct.Struct(fmt).pack_into */
    PyObject *scratch;      /* ... and a bytearray of `size` bytes it packs into */
    int packing;            /* a write() of this process is packing into `scratch` */
} Counter;

/* Call with the object's critical section held. */
static int
setup(Counter *self, PyObject *buffer, Py_ssize_t offset, Py_ssize_t size, int copies,
      PyObject *unpack)
{
    if (self->set_up) {
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
    Py_ssize_t span = span_of(size, copies);
    if (span < 0 || span > PY_SSIZE_T_MAX - offset) {
        PyErr_SetString(PyExc_OverflowError, "record too large");
        return -1;
    }
    Py_ssize_t needed = offset + span;

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
    Py_ssize_t stride = (size + 7) / 8 * 8;
    self->seq = (atomic_u64 *)(void *)base;
    self->holder = (atomic_u64 *)(void *)(base + 8);
    self->payload = base + HEADER;
    self->last = copies ? (atomic_u64 *)(void *)(base + HEADER + copies * stride) : NULL;
    self->size = size;
    self->stride = stride;
    self->copies = copies;
    self->set_up = 1;
    Py_XINCREF(unpack);
    self->unpack = unpack;
    return 0;
}

static int
setup_locked(Counter *self, PyObject *buffer, Py_ssize_t offset, Py_ssize_t size, int copies,
             PyObject *unpack)
{
    int result;
    Py_BEGIN_CRITICAL_SECTION(self);
    result = setup(self, buffer, offset, size, copies, unpack);
    Py_END_CRITICAL_SECTION();
    return result;
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
    return setup_locked(self, buffer, offset, size, copies, NULL);
}

static int
Record_init(Counter *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"buffer", "offset", "size", "copies", "unpack", "pack_into",
                               NULL};
    PyObject *buffer, *unpack, *pack_into = NULL;
    Py_ssize_t offset, size;
    int copies;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnniO|O:Record", keywords, &buffer, &offset,
                                     &size, &copies, &unpack, &pack_into)) {
        return -1;
    }
    if (copies < 1 || size < 1) {
        PyErr_SetString(PyExc_ValueError, "a record needs a payload and 1 or 2 copies of it");
        return -1;
    }
    if (!PyCallable_Check(unpack) || (pack_into != NULL && !PyCallable_Check(pack_into))) {
        PyErr_SetString(PyExc_TypeError, "unpack and pack_into must be callable");
        return -1;
    }
    PyObject *scratch = NULL;
    if (pack_into != NULL && (scratch = PyByteArray_FromStringAndSize(NULL, size)) == NULL) {
        return -1;
    }
    int result;
    Py_BEGIN_CRITICAL_SECTION(self);
    result = setup(self, buffer, offset, size, copies, unpack);
    if (result == 0 && pack_into != NULL) {
        self->pack_into = Py_NewRef(pack_into);
        self->scratch = Py_NewRef(scratch);
    }
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(scratch);
    return result;
}

/* Detach the buffer and the unpack callable from the object (call with its critical
 * section held); the caller releases them outside it. Returns 1 if this call released
 * the counter, 0 if it was not set up or already released. */
static int
detach(Counter *self, Py_buffer *view, PyObject **unpack, PyObject **pack_into,
       PyObject **scratch)
{
    int released = 0;
    if (self->seq != NULL) {
        self->seq = NULL;
        self->holder = NULL;
        self->last = NULL;
        self->payload = NULL;
        *view = self->view;
        memset(&self->view, 0, sizeof(self->view));
        released = 1;
    }
    *unpack = self->unpack;
    self->unpack = NULL;
    *pack_into = self->pack_into;
    self->pack_into = NULL;
    *scratch = self->scratch;
    self->scratch = NULL;
    return released;
}

static void
Counter_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    Py_buffer view;
    PyObject *unpack, *pack_into, *scratch;
    /* The last reference: no other thread can hold the object. */
    if (detach((Counter *)op, &view, &unpack, &pack_into, &scratch)) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(unpack);
    Py_XDECREF(pack_into);
    Py_XDECREF(scratch);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *
Counter_release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Py_buffer view;
    PyObject *unpack, *pack_into, *scratch;
    int released;
    Py_BEGIN_CRITICAL_SECTION(op);
    released = detach((Counter *)op, &view, &unpack, &pack_into, &scratch);
    Py_END_CRITICAL_SECTION();
    if (released) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(unpack);
    Py_XDECREF(pack_into);
    Py_XDECREF(scratch);
    Py_RETURN_NONE;
}

/* -- reading ------------------------------------------------------------------------ */

/* Load one word of the header (or the last writer's token) with an acquire load, or
 * raise ClosedResourceError. `which`: 0 seq, 1 holder, 2 last (0 when the counter has
 * none). */
static PyObject *
load_word(PyObject *op, int which)
{
    Counter *self = (Counter *)op;
    int open = 0;
    uint64_t value = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL) {
        open = 1;
        atomic_u64 *word = which == 0 ? self->seq : which == 1 ? self->holder : self->last;
        if (word != NULL) {
            value = atomic_load_explicit(word, memory_order_acquire);
        }
    }
    Py_END_CRITICAL_SECTION();
    return open ? PyLong_FromUnsignedLongLong(value) : closed_error();
}

static PyObject *
Counter_load(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return load_word(op, 0);
}

static PyObject *
Counter_writer(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return load_word(op, 1);
}

static PyObject *
Counter_last_writer(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    /* Acquire: pairs with nothing in particular (the writer's store is relaxed and
     * published by its store-release of the even counter); it keeps this load after
     * whatever snapshot the caller took before. */
    return load_word(op, 2);
}

static PyObject *
Counter_consistent(PyObject *op, PyObject *arg)
{
    Counter *self = (Counter *)op;
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
    int open = 0;
    uint64_t now = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL) {
        open = 1;
        /* Every load of the protected data before this point stays before the next load. */
        atomic_thread_fence(memory_order_acquire);
        now = atomic_load_explicit(self->seq, memory_order_relaxed);
    }
    Py_END_CRITICAL_SECTION();
    return open ? PyBool_FromLong(now == (uint64_t)seq) : closed_error();
}

/* One snapshot attempt loop into dst (self->size bytes); call with the critical section
 * held. Returns 1 on success, 0 when the counter was odd (non-latch) or kept changing
 * for READ_TRIES attempts. */
static int
copy_snapshot(Counter *self, char *dst)
{
    for (int tries = 0; tries < READ_TRIES; tries++) {
        uint64_t s1 = atomic_load_explicit(self->seq, memory_order_acquire);
        const unsigned char *src = self->payload;
        if (s1 & 1) {
            if (self->copies < 2) {
                return 0; /* a write is in progress */
            }
            src += self->stride; /* latch: copy 1 is stable while copy 0 is written */
        }
        copy_out(dst, src, self->size);
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(self->seq, memory_order_relaxed) == s1) {
            return 1;
        }
    }
    return 0;
}

/* A new reference to the unpacked snapshot, Py_None (new reference) when a write is in
 * progress or the record kept changing, or NULL with an exception (closed, no memory). */
static PyObject *
snapshot(PyObject *op)
{
    Counter *self = (Counter *)op;
    PyObject *bytes = NULL, *unpack = NULL;
    int status = -1; /* -1 closed, -2 out of memory, 0 busy, 1 copied */
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL && self->unpack != NULL) {
        /* A bytes object comes from the allocator and never blocks: the critical
         * section is not suspended here. */
        bytes = PyBytes_FromStringAndSize(NULL, self->size);
        if (bytes == NULL) {
            status = -2;
        }
        else {
            status = copy_snapshot(self, PyBytes_AS_STRING(bytes));
            if (status == 1) {
                unpack = Py_NewRef(self->unpack);
            }
        }
    }
    Py_END_CRITICAL_SECTION();
    if (status == 1) {
        /* Outside the critical section: unpack is Python code as far as we know. */
        PyObject *values = PyObject_CallOneArg(unpack, bytes);
        Py_DECREF(unpack);
        Py_DECREF(bytes);
        return values;
    }
    Py_XDECREF(bytes);
    if (status == 0) {
        Py_RETURN_NONE;
    }
    return status == -1 ? closed_error() : NULL;
}

static PyObject *
Counter_try_read(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return snapshot(op);
}

static PyObject *
Counter_read_nowait(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    PyObject *result = snapshot(op);
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

static PyObject *
ready_new(PyTypeObject *type, PyObject *value)
{
    Ready *ready = PyObject_New(Ready, type);
    if (ready == NULL) {
        Py_DECREF(value);
        return NULL;
    }
    ready->value = value; /* steals the reference */
    return (PyObject *)ready;
}

/* Dropped without being awaited (a forgotten `await`): warn as CPython does for a
 * coroutine that was never awaited. The warning may raise (warnings as errors); a
 * deallocator cannot, so that goes to the unraisable hook, as for coroutines. */
static void
ready_warn_unawaited(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
#endif
    if (PyErr_WarnEx(PyExc_RuntimeWarning,
                     "coroutine 'SeqRecord.read' was never awaited "
                     "(use `await record.read()`, or record.read_nowait())",
                     1) < 0) {
        PyErr_WriteUnraisable(NULL);
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(type, value, tb);
#endif
}

static void
Ready_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    if (((Ready *)op)->value != NULL) {
        ready_warn_unawaited();
    }
    Py_XDECREF(((Ready *)op)->value);
    PyObject_Free(op);
    Py_DECREF(tp);
}

static PyObject *
Ready_await(PyObject *self)
{
    return Py_NewRef(self);
}

/* The snapshot, once: two threads stepping the same object get it once between them. */
static int
ready_take(PyObject *op, PyObject **value)
{
    Py_BEGIN_CRITICAL_SECTION(op);
    *value = ((Ready *)op)->value;
    ((Ready *)op)->value = NULL;
    Py_END_CRITICAL_SECTION();
    if (*value == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited read()");
        return -1;
    }
    return 0;
}

static void
ready_drop(PyObject *op)
{
    PyObject *value;
    Py_BEGIN_CRITICAL_SECTION(op);
    value = ((Ready *)op)->value;
    ((Ready *)op)->value = NULL;
    Py_END_CRITICAL_SECTION();
    Py_XDECREF(value);
}

static PySendResult
Ready_am_send(PyObject *self, PyObject *Py_UNUSED(arg), PyObject **result)
{
    if (ready_take(self, result) < 0) {
        return PYGEN_ERROR;
    }
    return PYGEN_RETURN;
}

static PyObject *
Ready_next(PyObject *self)
{
    PyObject *value;
    if (ready_take(self, &value) < 0) {
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
Ready_throw(PyObject *self, PyObject *args)
{
    PyObject *type, *value = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &type, &value, &tb)) {
        return NULL;
    }
    ready_drop(self);
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

/* Not iterable: `a, b = record.read()` (a forgotten `await`) would otherwise unpack an
 * empty iteration and fail with a puzzling "not enough values to unpack". */
static PyObject *
Ready_iter(PyObject *self)
{
    ready_drop(self);
    PyErr_SetString(PyExc_TypeError,
                    "SeqRecord.read() must be awaited: `await record.read()` (or "
                    "record.read_nowait() without a loop)");
    return NULL;
}

static PyObject *
Ready_close(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    ready_drop(self);
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

/* Slots hold functions as void *; ISO C converts a function pointer to an object pointer
 * only through an integer, so that is the way they go in (-Wpedantic stays quiet). */
#define FUNC(f) ((void *)(uintptr_t)(f))

static PyType_Slot Ready_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The coroutine of a read() that needed no wait.")},
    {Py_tp_dealloc, FUNC(Ready_dealloc)},
    {Py_am_await, FUNC(Ready_await)},
    {Py_am_send, FUNC(Ready_am_send)},
    {Py_tp_iter, FUNC(Ready_iter)},
    {Py_tp_iternext, FUNC(Ready_next)},
    {Py_tp_methods, Ready_methods},
    {Py_tp_getset, Ready_getset},
    {0, NULL},
};

static PyType_Spec Ready_spec = {
    .name = "aiosync._seqc.Ready",
    .basicsize = sizeof(Ready),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Ready_slots,
};

/* METH_METHOD: `defining_class` is this interpreter's Record type, whose module state
 * holds its Ready type (no lookup through the instance's MRO on the fast path). */
static PyObject *
Record_read(PyObject *self, PyTypeObject *defining_class, PyObject *const *args,
            Py_ssize_t nargs, PyObject *kwnames)
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
        PyObject *values = snapshot(self);
        if (values == NULL) {
            return NULL;
        }
        if (values != Py_None) {
            seqc_state *state = (seqc_state *)PyType_GetModuleState(defining_class);
            return ready_new(state->ready_type, values);
        }
        Py_DECREF(values);
    }
    return PyObject_CallMethod(self, "_read_slow", "O", max_attempts);
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

static int
parse_token(PyObject *arg, uint64_t *token)
{
    if (parse_u64(arg, "token", token) < 0) {
        return -1;
    }
    if (*token == 0) {
        PyErr_SetString(PyExc_ValueError, "token must not be 0");
        return -1;
    }
    return 0;
}

/* Claim the counter for `token` if its holder is `expected`; 0 on success, else
 * the holder found (which may be 0 if `expected` was not). Call with the object's
 * critical section held, the counter open. */
static int
begin(Counter *self, uint64_t token, uint64_t expected, uint64_t *found)
{
    uint64_t holder = expected;
    if (!atomic_compare_exchange_strong_explicit(self->holder, &holder, token,
                                                 memory_order_acq_rel, memory_order_acquire)) {
        *found = holder;
        return -1;
    }
    if (self->last != NULL) {
        /* Relaxed: the store-release of the next even counter (end()) publishes it. */
        atomic_store_explicit(self->last, token, memory_order_relaxed);
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

/* Call with the object's critical section held, the counter open. */
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
Counter_try_begin(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    Counter *self = (Counter *)op;
    uint64_t token, expected, found = 0;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "try_begin() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (parse_token(args[0], &token) < 0 || parse_u64(args[1], "expected", &expected) < 0) {
        return NULL;
    }
    int status = -1; /* -1 closed, 0 claimed, 1 held by `found` */
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL) {
        status = begin(self, token, expected, &found) < 0;
    }
    Py_END_CRITICAL_SECTION();
    if (status < 0) {
        return closed_error();
    }
    if (status) {
        return PyLong_FromUnsignedLongLong(found);
    }
    Py_RETURN_NONE;
}

static PyObject *
Counter_end(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Counter *self = (Counter *)op;
    int open = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL) {
        open = 1;
        end(self);
    }
    Py_END_CRITICAL_SECTION();
    if (!open) {
        return closed_error();
    }
    Py_RETURN_NONE;
}

/* The payload to store, as a buffer of exactly the record's size. `size` is read
 * without the critical section: it is set before the object is shared and never
 * changes (set_up), and a wrong guess only fails the call. */
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
Counter_store(PyObject *op, PyObject *data)
{
    Counter *self = (Counter *)op;
    Py_buffer view;
    if (payload_arg(self, data, &view) < 0) {
        return NULL;
    }
    int open = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL && self->size == view.len) {
        open = 1;
        copy_in(self->payload, view.buf, self->size);
    }
    Py_END_CRITICAL_SECTION();
    PyBuffer_Release(&view);
    if (!open) {
        return closed_error();
    }
    Py_RETURN_NONE;
}

static PyObject *
Counter_write(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    Counter *self = (Counter *)op;
    Py_buffer view;
    uint64_t token, found = 0;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "write() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (parse_token(args[1], &token) < 0 || payload_arg(self, args[0], &view) < 0) {
        return NULL;
    }
    int status = -1; /* -1 closed, 0 written, 1 held by `found` */
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL && self->size == view.len) {
        status = begin(self, token, 0, &found) < 0;
        if (status == 0) {
            copy_in(self->payload, view.buf, self->size);
            end(self);
        }
    }
    Py_END_CRITICAL_SECTION();
    PyBuffer_Release(&view);
    if (status < 0) {
        return closed_error();
    }
    if (status) {
        return PyLong_FromUnsignedLongLong(found);
    }
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
     "    seq (int): the value `read()` returned before the data was copied.\n\n"
     "Returns:\n"
     "    True if the copy is what the writer stored; False if it must be made\n"
     "    again.\n\n"
     "Raises:\n"
     "    TypeError: `seq` is not an int.\n"
     "    ClosedResourceError: the object was closed."},
    COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

/* self._write_slow(*args, **kwnames) */
static PyObject *
write_slow(PyObject *op, seqc_state *state, PyObject *const *args, Py_ssize_t nargs,
           PyObject *kwnames)
{
    PyObject *method = PyObject_GetAttr(op, state->write_slow);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, (size_t)nargs, kwnames);
    Py_DECREF(method);
    return result;
}

/* Record.write(*values): the whole write in one call when nothing stands in the way.
 *
 * Pack the values with struct's pack_into into the record's private scratch bytearray
 * (a call, so outside the critical section; `packing` keeps a second thread of this
 * process off the scratch meanwhile), then claim the record (the compare-and-swap every
 * write makes: a second writer, here or in another process, finds it held), copy the
 * values into the payload with relaxed atomic stores and end the write. Values that do
 * not fit are refused before anything is begun.
 *
 * Everything else goes to the Python method _write_slow(*values), which knows the rules
 * and the messages: the token not known yet (this process's first write), the scratch
 * busy, the record held (a bracketing `with record.seqcount.write()` of this task,
 * another writer, a dead one to take over), values that do not fit, closed. */
static PyObject *
Record_write(PyObject *op, PyTypeObject *defining_class, PyObject *const *args,
             Py_ssize_t nargs, PyObject *kwnames)
{
    Counter *self = (Counter *)op;
    seqc_state *state = (seqc_state *)PyType_GetModuleState(defining_class);
    uint64_t token = atomic_load_explicit(&state->token, memory_order_relaxed);
    PyObject *pack_into = NULL, *scratch = NULL;
    if (token == 0 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0) || nargs > 16) {
        return write_slow(op, state, args, nargs, kwnames);
    }
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL && self->pack_into != NULL && !self->packing) {
        self->packing = 1;
        pack_into = Py_NewRef(self->pack_into);
        scratch = Py_NewRef(self->scratch);
    }
    Py_END_CRITICAL_SECTION();
    if (pack_into == NULL) {
        return write_slow(op, state, args, nargs, kwnames);
    }
    /* pack_into(scratch, 0, *values) */
    PyObject *stack[2 + 16];
    stack[0] = scratch;
    stack[1] = state->zero;
    memcpy(stack + 2, args, (size_t)nargs * sizeof(PyObject *));
    PyObject *packed = PyObject_Vectorcall(pack_into, stack, (size_t)(nargs + 2), NULL);
    int status = -1; /* -1 closed, 0 written, 1 held (or not packed) */
    uint64_t found = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (self->seq != NULL) {
        status = 1;
        if (packed != NULL && begin(self, token, 0, &found) == 0) {
            copy_in(self->payload, PyByteArray_AS_STRING(scratch), self->size);
            end(self);
            status = 0;
        }
    }
    self->packing = 0;
    Py_END_CRITICAL_SECTION();
    Py_DECREF(pack_into);
    Py_DECREF(scratch);
    if (packed == NULL) {
        /* Values that do not fit: the Python method packs them again and says why. */
        PyErr_Clear();
        return write_slow(op, state, args, nargs, NULL);
    }
    Py_DECREF(packed);
    if (status == 0) {
        Py_RETURN_NONE;
    }
    return write_slow(op, state, args, nargs, NULL); /* held, or closed: it says which */
}

static PyMethodDef Record_methods[] = {
    {"write", (PyCFunction)(void (*)(void))Record_write, METH_METHOD | METH_FASTCALL | METH_KEYWORDS,
     "write($self, /, *values)\n--\n\n"
     "Publish new values (one per field of the format); never blocks.\n\n"
     "Readers see the old values or the new ones, never a mix. Inside a\n"
     "``with record.seqcount.write():`` block of this task, only stores the values.\n\n"
     "Args:\n"
     "    *values (Any): one value per field of the record's format.\n\n"
     "Raises:\n"
     "    BusyResourceError: another write is in progress (writers must take turns).\n"
     "    TypeError: the wrong number of values, or a value of the wrong type.\n"
     "    ValueError: a value out of its field's range.\n"
     "    ClosedResourceError: the record was closed."},
    {"read", (PyCFunction)(void (*)(void))Record_read, METH_METHOD | METH_FASTCALL | METH_KEYWORDS,
     "read($self, /, *, max_attempts=None)\n--\n\n"
     "Await it: a consistent snapshot of the record (a tuple).\n\n"
     "Finishes at once, without a loop round trip, when no write is in progress (in\n"
     "latch mode: always, unless the record keeps changing under the copy). While a\n"
     "write is in progress, backs off asynchronously (see `backoff`) and tries again.\n\n"
     "Starvation: wrap it in asyncio.timeout() (cancellation is clean: a reader\n"
     "holds nothing), or pass max_attempts. It returns a coroutine-like object:\n"
     "await it, or pass it to create_task().\n\n"
     "Args:\n"
     "    max_attempts (int | None): give up after this many unsuccessful attempts\n"
     "        (None: never).\n\n"
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
    {"_last_writer", (PyCFunction)Counter_last_writer, METH_NOARGS,
     "_last_writer() -> int\n--\n\n"
     "The token of the writer that began the latest write (0: never written)."},
    {"_store", (PyCFunction)Counter_store, METH_O,
     "_store(data) -> None\n--\n\nCopy data into the payload, inside a write."},
    {"_write", (PyCFunction)(void (*)(void))Counter_write, METH_FASTCALL,
     "_write(data, token) -> int | None\n--\n\n"
     "_try_begin(token, 0), _store(data), _end() in one call; None on success, else\n"
     "the holder found (nothing was written)."},
    COMMON_METHODS,
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Counter_slots[] = {
    {Py_tp_doc,
     (void *)PyDoc_STR(
         "Counter(buffer, offset, size=0, copies=0)\n--\n\n"
         "A sequence counter at `offset` of a writable buffer, which stays exported until\n"
         "_release(). `size` and `copies` describe the payload that follows it, if any\n"
         "(the writer's side of a latch needs them).")},
    {Py_tp_new, FUNC(PyType_GenericNew)},
    {Py_tp_init, FUNC(Counter_init)},
    {Py_tp_dealloc, FUNC(Counter_dealloc)},
    {Py_tp_methods, Counter_methods},
    {0, NULL},
};

static PyType_Slot Record_slots[] = {
    {Py_tp_doc,
     (void *)PyDoc_STR(
         "Record(buffer, offset, size, copies, unpack)\n--\n\n"
         "A sequence counter followed by `copies` (1, or 2 for a latch) copies of a\n"
         "`size`-byte payload and the last writer's token; snapshots are passed to "
         "`unpack`.")},
    {Py_tp_new, FUNC(PyType_GenericNew)},
    {Py_tp_init, FUNC(Record_init)},
    {Py_tp_dealloc, FUNC(Counter_dealloc)},
    {Py_tp_methods, Record_methods},
    {0, NULL},
};

static PyType_Spec Counter_spec = {
    .name = "aiosync._seqc.Counter",
    .basicsize = sizeof(Counter),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Counter_slots,
};

static PyType_Spec Record_spec = {
    .name = "aiosync._seqc.Record",
    .basicsize = sizeof(Counter),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Record_slots,
};

/* ---------------------------------------------------------------------------------
 * The module
 * --------------------------------------------------------------------------------- */

static PyObject *
seqc_span(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "span() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    Py_ssize_t size = PyLong_AsSsize_t(args[0]);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    long copies = PyLong_AsLong(args[1]);
    if (copies == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (copies < 0 || copies > 2 || size < 0 || (copies == 0) != (size == 0)) {
        PyErr_SetString(PyExc_ValueError, "bad record geometry");
        return NULL;
    }
    Py_ssize_t span = span_of(size, (int)copies);
    if (span < 0) {
        PyErr_SetString(PyExc_OverflowError, "record too large");
        return NULL;
    }
    return PyLong_FromSsize_t(span);
}

static PyObject *
seqc_set_token(PyObject *module, PyObject *arg)
{
    uint64_t token;
    if (parse_u64(arg, "token", &token) < 0) {
        return NULL;
    }
    atomic_store_explicit(&get_state(module)->token, token, memory_order_relaxed);
    Py_RETURN_NONE;
}

static PyMethodDef seqc_functions[] = {
    {"set_token", (PyCFunction)seqc_set_token, METH_O,
     "set_token(token) -> None\n--\n\n"
     "This process's writer token for Record.write's fast path (0: not known, use the\n"
     "Python path, which computes it)."},
    {"span", (PyCFunction)(void (*)(void))seqc_span, METH_FASTCALL,
     "span(size, copies) -> int\n--\n\n"
     "Bytes from a counter's offset to the end of what it uses: the header, `copies`\n"
     "copies of a `size`-byte payload padded to 8, and (records) the last writer's token."},
    {NULL, NULL, 0, NULL},
};

static int
seqc_exec(PyObject *module)
{
    atomic_u64 probe = 0;
    if (!atomic_is_lock_free(&probe)) {
        PyErr_SetString(PyExc_ImportError,
                        "aiosync needs lock-free 64-bit atomics (they must work across "
                        "processes)");
        return -1;
    }
    seqc_state *state = get_state(module);
    state->counter_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Counter_spec, NULL);
    if (state->counter_type == NULL || PyModule_AddType(module, state->counter_type) < 0) {
        return -1;
    }
    state->record_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Record_spec, NULL);
    if (state->record_type == NULL || PyModule_AddType(module, state->record_type) < 0) {
        return -1;
    }
    state->ready_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Ready_spec, NULL);
    if (state->ready_type == NULL) {
        return -1;
    }
    state->write_slow = PyUnicode_InternFromString("_write_slow");
    state->zero = PyLong_FromLong(0);
    if (state->write_slow == NULL || state->zero == NULL) {
        return -1;
    }
    atomic_store_explicit(&state->token, 0, memory_order_relaxed);
    return PyModule_AddIntConstant(module, "HEADER", HEADER);
}

static int
seqc_traverse(PyObject *module, visitproc visit, void *arg)
{
    seqc_state *state = get_state(module);
    Py_VISIT(state->counter_type);
    Py_VISIT(state->record_type);
    Py_VISIT(state->ready_type);
    Py_VISIT(state->write_slow);
    Py_VISIT(state->zero);
    return 0;
}

static int
seqc_clear(PyObject *module)
{
    seqc_state *state = get_state(module);
    Py_CLEAR(state->counter_type);
    Py_CLEAR(state->record_type);
    Py_CLEAR(state->ready_type);
    Py_CLEAR(state->write_slow);
    Py_CLEAR(state->zero);
    return 0;
}

static void
seqc_free(void *module)
{
    (void)seqc_clear((PyObject *)module);
}

static PyModuleDef_Slot seqc_slots[] = {
    {Py_mod_exec, FUNC(seqc_exec)},
#if PY_VERSION_HEX >= 0x030C0000
    /* No mutable statics, types per interpreter: safe under a per-interpreter GIL. */
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    /* Every method is safe without the GIL (see the top of this file). */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef seqc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiosync._seqc",
    .m_doc = "Sequence counters in shared memory, with C11 memory ordering.",
    .m_size = sizeof(seqc_state),
    .m_methods = seqc_functions,
    .m_slots = seqc_slots,
    .m_traverse = seqc_traverse,
    .m_clear = seqc_clear,
    .m_free = seqc_free,
};

PyMODINIT_FUNC
PyInit__seqc(void)
{
    return PyModuleDef_Init(&seqc_module);
}
