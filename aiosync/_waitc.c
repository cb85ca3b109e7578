/*
 * aiosync._waitc: the per-event and per-wait half of the wait core, in C.
 *
 * aiosync/_waitq.py keeps the rules that are not per event (loops coming and going,
 * registrations, abandoning, closing, fork, the blocking twins); this file holds what
 * runs on every event and every wait, so that a round trip makes no Python call it can
 * do without:
 *
 *   Waiter      one task waiting: its future, its condition, its loop's slot, its state
 *               (PENDING -> RELEASED or ABANDONED), and the transitions (release, fail,
 *               _abandon): the only code that changes a waiter's state or the counts.
 *   LoopSlot    the waiters and registrations of one event loop.
 *   Core        the base of _waitq.WaitQueue: the lock, the counts, the slots, the
 *               waiting side (park, wait, wait_turn: the awaitable Wait) and the
 *               releasing side (first, pending, ring).
 *   RLock       the queue's re-entrant lock, taken here without a Python call.
 *   dispatch    what loop.add_reader calls, one registration per (loop, fd): checks
 *               that the primitive is alive and someone of that loop waits, then hands
 *               the event to the primitive's _on_readable, with the lock held.
 *   BarrierCore the base of Barrier: its fds, counter and abort flags, place()'s
 *               write, systemd's read loop (_pump), what a waiter's condition says now
 *               (_verdict) and the release of every waiter whose condition holds.
 *   CompletionCore the base of Completion: its two eventfds, the callback's rings, a
 *               woken waiter's take, complete()'s write.
 *   Gather      one future for a BarrierGroup's N waiters (their futures are Shares).
 *   Round       a BarrierGroup's sync, start to outcomes: what `await sync_round(...)`
 *               awaits.
 *
 * The rules themselves are the ones docs/design.md states (§3-§5, §10-§12); each is
 * written here once, and the Python modules call these for it.
 *
 * Locking. Every field of these objects changes only with the queue's lock held (the
 * RLock above, the same object the Python code takes with `with queue.lock`), and the
 * Python code reads them under that lock, except a few machine words read for a fast
 * path that re-checks under the lock (the counts `waiting` and `turns`, an object's
 * fds, which close() sets to -1), as the Python code this replaces did. A Gather and
 * its Shares are used only in their group's loop thread (a release from another thread
 * reaches a future through that loop's call_soon_threadsafe). Nothing here is a
 * mutable static: types, cached functions and interned names live in the module state,
 * so each interpreter has its own (per-interpreter GIL supported). Free-threaded
 * builds: the queue's lock is what serializes every writer, so the module does not
 * need the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030C0000
/* Before 3.12 the member types and flags have no Py_ prefix (structmember.h). */
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_T_BOOL T_BOOL
#define Py_T_INT T_INT
#define Py_T_LONGLONG T_LONGLONG
#define Py_READONLY READONLY
#endif

#define PENDING 0
#define RELEASED 1
#define ABANDONED 2

#define ABORTION INT64_MAX /* what Barrier.abort() writes */

#define FUNC(f) ((void *)(uintptr_t)(f))          /* a slot's function */
#define FASTCALL(f) ((PyCFunction)(void (*)(void))(f)) /* a METH_FASTCALL method */

typedef struct {
    PyTypeObject *waiter_type;
    PyTypeObject *slot_type;
    PyTypeObject *core_type;
    PyTypeObject *barrier_type;
    PyTypeObject *completion_type;
    PyTypeObject *wait_type;
    PyTypeObject *rlock_type;
    PyTypeObject *gather_type;
    PyTypeObject *share_type;
    PyTypeObject *round_type;
    /* Forks this process's interpreter has seen (in a child, _waitq calls _forked()):
     * a wait or hold taken before the last fork is the parent's, and a child that ends
     * it (its task inherited, then cancelled or dropped) gives nothing back. */
    unsigned long forks;
    PyObject *get_running_loop; /* asyncio.get_running_loop */
    PyObject *deque;            /* collections.deque */
    /* Methods of asyncio.Future and collections.deque, called directly on objects of
     * exactly those types (no lookup in the type and the instance's dict per call). */
    PyObject *future_type;
    PyObject *future_done;
    PyObject *future_set_result;
    PyObject *future_set_exception;
    PyObject *deque_append;
    PyObject *deque_popleft;
    PyObject *set_result_soon;  /* this module's _set_result, for another thread's loop */
    PyObject *set_exception_soon;
    /* interned method names */
    PyObject *s_acquire;
    PyObject *s_release;
    PyObject *s_append;
    PyObject *s_appendleft;
    PyObject *s_popleft;
    PyObject *s_done;
    PyObject *s_set_result;
    PyObject *s_set_exception;
    PyObject *s_create_future;
    PyObject *s_call_soon_threadsafe;
    PyObject *s_remove_reader;
    PyObject *s_on_readable;
    PyObject *s_new_slot;
    PyObject *s_register;
    PyObject *s_unregister;
    PyObject *s_reregister;
    PyObject *s_wake_blockers;
    PyObject *s_abandon;
    PyObject *s_cancelled;
    PyObject *s_throw;
    PyObject *s_close;
    PyObject *s_abort;
} waitc_state;

static struct PyModuleDef waitc_module;

static inline waitc_state *
get_state(PyObject *module)
{
    return (waitc_state *)PyModule_GetState(module);
}

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *future;
    PyObject *cond;
    PyObject *slot; /* a LoopSlot */
    unsigned long born; /* st->forks when it was parked */
    int state;
} Waiter;

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *queue; /* a Core */
    PyObject *loop;
    PyObject *waiters; /* collections.deque of Waiter, oldest first */
    PyObject *woken;   /* the Waiter woken for its turn that has not run yet, or None */
    unsigned long thread;
    Py_ssize_t live; /* waiters in state PENDING */
    char registered;
    char stale;
    char stale_events;
} LoopSlot;

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *lock;
    PyObject *owner; /* weakref.ref to the primitive */
    PyObject *slots; /* dict: loop -> LoopSlot */
    PyObject *fds;   /* tuple of int */
    PyObject *closed_error;
    PyObject *blockers; /* dict: thread -> wake eventfd of its blocking wait */
    Py_ssize_t waiting;
    Py_ssize_t turns;
    Py_ssize_t held; /* BarrierGroup rounds in progress over this Barrier (design §11) */
    char closed;
} Core;

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *waitq; /* a Core */
    long long barriers;
    int me;
    int them;
    int pipe_r;
    int pipe_w;
    char i_aborted;
    char they_aborted;
    char peer_exited;
} BarrierCore;

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *ring_turn; /* what a waiter woken by `count` is handed */
    PyObject *ring_all;  /* what every waiter is handed while `all` is set */
    int count;
    int all;
} CompletionCore;

typedef struct {
    PyObject_HEAD
    waitc_state *st; /* its module's state (the type, which it holds, holds the module) */
    PyObject *queue;  /* a Core */
    PyObject *waiter; /* a Waiter; NULL until a wait_turn() parks it */
    PyObject *inner;  /* the future's __await__() iterator, once started; NULL before */
    PyObject *cond;   /* wait_turn(): what it waits for (parked at the first send) */
    PyObject *take;   /* wait_turn(): take(result) in the woken task; NULL for wait() */
    char over;        /* returned or raised: nothing more to abandon */
} Wait;

typedef struct {
    PyObject_HEAD
    waitc_state *st;
    PyThread_type_lock lock;
    _Atomic unsigned long owner; /* the thread holding it, 0: none */
    unsigned long count;         /* how many times its owner acquired it */
} RLock;

typedef struct {
    PyObject_HEAD
    waitc_state *st;
    PyObject *future; /* the one asyncio future its task awaits, or None between waits */
    Py_ssize_t pending; /* shares not resolved yet */
    char first;         /* wake at the first resolved share (else at the last, or a failure) */
    char fired;         /* it was due to wake since the last arm() (maybe before any) */
} Gather;

typedef struct {
    PyObject_HEAD
    waitc_state *st;
    PyObject *gather; /* its Gather */
    PyObject *result; /* NULL until resolved */
    char failed;      /* `result` is an exception */
} Share;

/* What every object of this module's types starts with. */
typedef struct {
    PyObject_HEAD
    waitc_state *st;
} Object;

/* The module state of an object of one of this module's types (or a subclass). */
static inline waitc_state *
state_of(PyObject *self)
{
    return ((Object *)self)->st;
}

/* The module state for a new object of `type` (or a subclass), or NULL with an error. */
static waitc_state *
state_for(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &waitc_module);
    return module == NULL ? NULL : get_state(module);
}

/* ---------------------------------------------------------------------------------
 * Small helpers
 * --------------------------------------------------------------------------------- */

static PyObject *
call_method0(PyObject *self, PyObject *name)
{
    PyObject *args[] = {self};
    return PyObject_VectorcallMethod(name, args, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call_method1(PyObject *self, PyObject *name, PyObject *arg)
{
    PyObject *args[] = {self, arg};
    return PyObject_VectorcallMethod(name, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

static PyObject *
call_method2(PyObject *self, PyObject *name, PyObject *a, PyObject *b)
{
    PyObject *args[] = {self, a, b};
    return PyObject_VectorcallMethod(name, args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* self.name(*args[1:]) (args[0] is self), through `method` (the type's own function)
 * when self is exactly of `type`. */
static PyObject *
call_known(PyObject *type, PyObject *method, PyObject *name, PyObject **args, size_t n)
{
    if ((PyObject *)Py_TYPE(args[0]) == type) {
        return PyObject_Vectorcall(method, args, n, NULL);
    }
    return PyObject_VectorcallMethod(name, args, n | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* The exception being raised, set aside while something else runs (PyErr_Fetch and
 * PyErr_Restore are deprecated from 3.12). */
typedef struct {
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc;
#else
    PyObject *type, *value, *tb;
#endif
} saved_error;

static void
save_error(saved_error *saved)
{
#if PY_VERSION_HEX >= 0x030C0000
    saved->exc = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&saved->type, &saved->value, &saved->tb);
#endif
}

static int
saved_some(const saved_error *saved)
{
#if PY_VERSION_HEX >= 0x030C0000
    return saved->exc != NULL;
#else
    return saved->type != NULL;
#endif
}

static void
restore_error(saved_error *saved)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(saved->exc);
#else
    PyErr_Restore(saved->type, saved->value, saved->tb);
#endif
}

/* Call a method for its effect only: 0, or -1 with an exception set. */
static int
do_method0(PyObject *self, PyObject *name)
{
    PyObject *r = call_method0(self, name);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static int
do_method1(PyObject *self, PyObject *name, PyObject *arg)
{
    PyObject *r = call_method1(self, name, arg);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static int
do_method2(PyObject *self, PyObject *name, PyObject *a, PyObject *b)
{
    PyObject *r = call_method2(self, name, a, b);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static int share_done(Share *self); /* a BarrierGroup's Share (see Gather, below) */
static PyObject *share_resolve(Share *self, PyObject *value, int failed);

/* future.done(): 1, 0, or -1 with an exception set. */
static int
future_done(waitc_state *st, PyObject *future)
{
    if (Py_IS_TYPE(future, st->share_type)) {
        return share_done((Share *)future);
    }
    PyObject *args[] = {future};
    PyObject *r = call_known(st->future_type, st->future_done, st->s_done, args, 1);
    if (r == NULL) {
        return -1;
    }
    int done = PyObject_IsTrue(r);
    Py_DECREF(r);
    return done;
}

/* A weak reference's referent as a new reference, or NULL (dead) without an error. */
static PyObject *
deref(PyObject *ref)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *obj = NULL;
    if (PyWeakref_GetRef(ref, &obj) < 0) {
        PyErr_Clear();
        return NULL;
    }
    return obj;
#else
    PyObject *obj = PyWeakref_GetObject(ref);
    if (obj == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (obj == Py_None) {
        return NULL;
    }
    return Py_NewRef(obj);
#endif
}

/* An fd number from Python: 0 or more, or -1 with an error set. */
static int
as_fd(PyObject *obj)
{
    long fd = PyLong_AsLong(obj);
    if (fd == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (fd < 0 || fd > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    return (int)fd;
}

static void
raise_closed(const char *message)
{
    PyObject *module = PyImport_ImportModule("aiosync._errors");
    if (module == NULL) {
        return;
    }
    PyObject *cls = PyObject_GetAttrString(module, "ClosedResourceError");
    Py_DECREF(module);
    if (cls != NULL) {
        PyErr_SetString(cls, message);
        Py_DECREF(cls);
    }
}

/* One read of an eventfd (non-blocking): its value in *value, 0 if it held nothing;
 * 0, or -1 with an error set (ClosedResourceError for a closed fd). */
static int
eventfd_read(int fd, uint64_t *value)
{
    *value = 0;
    ssize_t n = -1;
    errno = EBADF;
    while (fd >= 0 && (n = read(fd, value, sizeof *value)) < 0 && errno == EINTR) {
    }
    if (n == (ssize_t)sizeof *value) {
        return 0;
    }
    *value = 0;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return 0;
    }
    if (n < 0 && errno == EBADF) {
        raise_closed("the object was closed (by another thread) during this call");
    }
    else if (n < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else {
        PyErr_SetString(PyExc_OSError, "short read from an eventfd");
    }
    return -1;
}

/* Add `value` to an eventfd: 1 written, 0 refused by the kernel (it would overflow),
 * -1 with an error set (ClosedResourceError for a closed fd). */
static int
eventfd_write(int fd, uint64_t value)
{
    ssize_t n = -1;
    errno = EBADF;
    while (fd >= 0 && (n = write(fd, &value, sizeof value)) < 0 && errno == EINTR) {
    }
    if (n == (ssize_t)sizeof value) {
        return 1;
    }
    if (n < 0 && errno == EBADF) {
        raise_closed("the object was closed (by another thread) during this call");
        return -1;
    }
    return 0;
}

/* The dealloc of every type here that holds objects: untrack, `clear` (the type's
 * own), free, and drop the instance's reference to its heap type. */
static void
gc_dealloc(PyObject *op, inquiry clear)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    (void)clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* ---------------------------------------------------------------------------------
 * Waiter: its transitions (lock held)
 * --------------------------------------------------------------------------------- */

static inline LoopSlot *
slot_of(Waiter *w)
{
    return (LoopSlot *)w->slot;
}

static inline Core *
queue_of_slot(LoopSlot *slot)
{
    return (Core *)slot->queue;
}

/* Leave PENDING for RELEASED: the counts follow. */
static void
mark_released(Waiter *w)
{
    LoopSlot *slot = slot_of(w);
    w->state = RELEASED;
    slot->live -= 1;
    queue_of_slot(slot)->waiting -= 1;
}

/* The future's set_result / set_exception failed with RuntimeError: its loop is closed,
 * nobody will ever take it. Any other error propagates. */
static int
closed_loop_or_error(Waiter *w)
{
    if (PyErr_ExceptionMatches(PyExc_RuntimeError)) {
        PyErr_Clear();
        w->state = ABANDONED;
        return 0;
    }
    return -1;
}

/* Hand `value` to a pending waiter, as a result or (exception) an exception, from any
 * thread. A future of another thread's loop is set in that loop's thread, unless it is
 * done by then. */
static int
resolve(waitc_state *st, Waiter *w, PyObject *value, int exception)
{
    LoopSlot *slot = slot_of(w);
    mark_released(w);
    PyObject *future = Py_NewRef(w->future);
    PyObject *r;
    if (slot->thread == PyThread_get_thread_ident()) {
        int done = exception ? future_done(st, future) : 0;
        if (done < 0) {
            Py_DECREF(future);
            return -1;
        }
        if (done) {
            Py_DECREF(future);
            return 0;
        }
        PyObject *args[] = {future, value};
        if (Py_IS_TYPE(future, st->share_type)) {
            r = share_resolve((Share *)future, value, exception);
        }
        else {
            r = exception ? call_known(st->future_type, st->future_set_exception,
                                       st->s_set_exception, args, 2)
                          : call_known(st->future_type, st->future_set_result,
                                       st->s_set_result, args, 2);
        }
    }
    else {
        PyObject *loop = Py_NewRef(slot->loop);
        PyObject *args[] = {loop, exception ? st->set_exception_soon : st->set_result_soon,
                            future, value};
        r = PyObject_VectorcallMethod(st->s_call_soon_threadsafe, args,
                                      4 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(loop);
    }
    Py_DECREF(future);
    if (r == NULL) {
        return closed_loop_or_error(w);
    }
    Py_DECREF(r);
    return 0;
}

static int
release(waitc_state *st, Waiter *w, PyObject *result)
{
    return resolve(st, w, result, 0);
}

/* Its task stopped waiting. */
static void
abandon(Waiter *w)
{
    if (w->born != w->st->forks) { /* parked by the parent: none of our counts */
        w->state = ABANDONED;
        return;
    }
    LoopSlot *slot = slot_of(w);
    Core *queue = queue_of_slot(slot);
    if (w->state == PENDING) {
        w->state = ABANDONED;
        slot->live -= 1;
        queue->waiting -= 1;
    }
    if (slot->woken == (PyObject *)w) { /* woken for a turn it will not take: took nothing */
        PyObject *old = slot->woken;
        slot->woken = Py_NewRef(Py_None);
        queue->turns -= 1;
        Py_DECREF(old);
    }
}

/* Pending, and its future not done: 1, 0, -1 with an exception. */
static int
alive(waitc_state *st, Waiter *w)
{
    if (w->state != PENDING) {
        return 0;
    }
    int done = future_done(st, w->future);
    return done < 0 ? -1 : !done;
}

/* A waiter whose future is done but which was never released was cancelled, and its
 * task has not resumed yet: it must not be handed anything. */
static int
settle(waitc_state *st, Waiter *w)
{
    if (w->state != PENDING) {
        return 0;
    }
    int done = future_done(st, w->future);
    if (done < 0) {
        return -1;
    }
    if (done) {
        abandon(w);
    }
    return 0;
}

static int
Waiter_traverse(PyObject *op, visitproc visit, void *arg)
{
    Waiter *self = (Waiter *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->future);
    Py_VISIT(self->cond);
    Py_VISIT(self->slot);
    return 0;
}

static int
Waiter_clear(PyObject *op)
{
    Waiter *self = (Waiter *)op;
    Py_CLEAR(self->future);
    Py_CLEAR(self->cond);
    Py_CLEAR(self->slot);
    return 0;
}

static void
Waiter_dealloc(PyObject *op)
{
    gc_dealloc(op, Waiter_clear);
}

static Waiter *
new_waiter(waitc_state *st, PyObject *future, PyObject *cond, PyObject *slot)
{
    Waiter *w = PyObject_GC_New(Waiter, st->waiter_type);
    if (w == NULL) {
        return NULL;
    }
    w->st = st;
    w->future = Py_NewRef(future);
    w->cond = Py_NewRef(cond);
    w->slot = Py_NewRef(slot);
    w->born = st->forks;
    w->state = PENDING;
    PyObject_GC_Track(w);
    return w;
}

static PyObject *
Waiter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"future", "cond", "slot", NULL};
    PyObject *future, *cond, *slot;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO:Waiter", kwlist, &future, &cond, &slot)) {
        return NULL;
    }
    PyObject *module = PyType_GetModuleByDef(type, &waitc_module);
    if (module == NULL) {
        return NULL;
    }
    waitc_state *st = get_state(module);
    if (!Py_IS_TYPE(slot, st->slot_type)) {
        PyErr_SetString(PyExc_TypeError, "Waiter(future, cond, slot): slot must be a LoopSlot");
        return NULL;
    }
    return (PyObject *)new_waiter(st, future, cond, slot);
}

static PyObject *
Waiter_release(PyObject *op, PyObject *result)
{
    waitc_state *st = state_of(op);
    if (st == NULL || release(st, (Waiter *)op, result) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Waiter_fail(PyObject *op, PyObject *exc)
{
    waitc_state *st = state_of(op);
    if (st == NULL || resolve(st, (Waiter *)op, exc, 1) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Waiter_abandon(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    abandon((Waiter *)op);
    Py_RETURN_NONE;
}

static PyObject *
get_object(PyObject *const *field)
{
    return Py_NewRef(*field);
}

static int
set_object(PyObject **field, PyObject *value, const char *name)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    Py_SETREF(*field, Py_NewRef(value));
    return 0;
}

static PyObject *
Waiter_get_future(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((Waiter *)op)->future);
}

static int
Waiter_set_future(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return set_object(&((Waiter *)op)->future, value, "future");
}

static PyObject *
Waiter_get_state(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(((Waiter *)op)->state);
}

static int
Waiter_set_state(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete state");
        return -1;
    }
    long state = PyLong_AsLong(value);
    if (state == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (state < PENDING || state > ABANDONED) {
        PyErr_SetString(PyExc_ValueError, "state must be PENDING, RELEASED or ABANDONED");
        return -1;
    }
    ((Waiter *)op)->state = (int)state;
    return 0;
}

static PyMethodDef Waiter_methods[] = {
    {"release", Waiter_release, METH_O,
     "release(result) -> None\n--\n\n"
     "Hand `result` to this pending waiter (from any thread; lock held)."},
    {"fail", Waiter_fail, METH_O,
     "fail(exc) -> None\n--\n\n"
     "Raise `exc` in this pending waiter (from any thread; lock held)."},
    {"_abandon", Waiter_abandon, METH_NOARGS,
     "_abandon() -> None\n--\n\nIts task stopped waiting (lock held)."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS, "See PEP 585."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Waiter_members[] = {
    {"cond", Py_T_OBJECT_EX, offsetof(Waiter, cond), Py_READONLY, "What it waits for."},
    {"slot", Py_T_OBJECT_EX, offsetof(Waiter, slot), Py_READONLY, "Its loop's LoopSlot."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Waiter_getset[] = {
    {"future", Waiter_get_future, Waiter_set_future, "What its task awaits.", NULL},
    {"state", Waiter_get_state, Waiter_set_state, "PENDING, RELEASED or ABANDONED.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Waiter_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("Waiter(future, cond, slot)\n--\n\n"
                                  "One task waiting on a WaitQueue for `cond`.")},
    {Py_tp_new, FUNC(Waiter_new)},
    {Py_tp_dealloc, FUNC(Waiter_dealloc)},
    {Py_tp_traverse, FUNC(Waiter_traverse)},
    {Py_tp_clear, FUNC(Waiter_clear)},
    {Py_tp_methods, Waiter_methods},
    {Py_tp_members, Waiter_members},
    {Py_tp_getset, Waiter_getset},
    {0, NULL},
};

static PyType_Spec Waiter_spec = {
    .name = "aiosync._waitc.Waiter",
    .basicsize = sizeof(Waiter),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Waiter_slots,
};

/* ---------------------------------------------------------------------------------
 * LoopSlot
 * --------------------------------------------------------------------------------- */

static int
LoopSlot_traverse(PyObject *op, visitproc visit, void *arg)
{
    LoopSlot *self = (LoopSlot *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->queue);
    Py_VISIT(self->loop);
    Py_VISIT(self->waiters);
    Py_VISIT(self->woken);
    return 0;
}

static int
LoopSlot_clear(PyObject *op)
{
    LoopSlot *self = (LoopSlot *)op;
    Py_CLEAR(self->queue);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->waiters);
    Py_CLEAR(self->woken);
    return 0;
}

static void
LoopSlot_dealloc(PyObject *op)
{
    gc_dealloc(op, LoopSlot_clear);
}

static PyObject *
LoopSlot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"queue", "loop", "stale_events", NULL};
    PyObject *queue, *loop;
    int stale_events;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOp:LoopSlot", kwlist, &queue, &loop,
                                     &stale_events)) {
        return NULL;
    }
    PyObject *module = PyType_GetModuleByDef(type, &waitc_module);
    if (module == NULL) {
        return NULL;
    }
    waitc_state *st = get_state(module);
    if (!PyObject_TypeCheck(queue, st->core_type)) {
        PyErr_SetString(PyExc_TypeError, "LoopSlot(queue, ...): queue must be a WaitQueue");
        return NULL;
    }
    PyObject *waiters = PyObject_CallNoArgs(st->deque);
    if (waiters == NULL) {
        return NULL;
    }
    LoopSlot *self = PyObject_GC_New(LoopSlot, type);
    if (self == NULL) {
        Py_DECREF(waiters);
        return NULL;
    }
    self->st = st;
    self->queue = Py_NewRef(queue);
    self->loop = Py_NewRef(loop);
    self->waiters = waiters;
    self->woken = Py_NewRef(Py_None);
    self->thread = PyThread_get_thread_ident();
    self->live = 0;
    self->registered = 0;
    self->stale = 0;
    self->stale_events = (char)stale_events;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
LoopSlot_get_waiters(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((LoopSlot *)op)->waiters);
}

static int
LoopSlot_set_waiters(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(op), &waitc_module);
    if (module == NULL) {
        return -1;
    }
    if (value != NULL && !PyObject_TypeCheck(value, (PyTypeObject *)get_state(module)->deque)) {
        PyErr_SetString(PyExc_TypeError, "waiters must be a collections.deque");
        return -1;
    }
    return set_object(&((LoopSlot *)op)->waiters, value, "waiters");
}

static PyObject *
LoopSlot_get_woken(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((LoopSlot *)op)->woken);
}

static int
LoopSlot_set_woken(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    PyObject *module = PyType_GetModuleByDef(Py_TYPE(op), &waitc_module);
    if (module == NULL) {
        return -1;
    }
    if (value != NULL && value != Py_None &&
        !Py_IS_TYPE(value, get_state(module)->waiter_type)) {
        PyErr_SetString(PyExc_TypeError, "woken must be a Waiter or None");
        return -1;
    }
    return set_object(&((LoopSlot *)op)->woken, value, "woken");
}

static PyObject *
LoopSlot_get_thread(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(((LoopSlot *)op)->thread);
}

static PyMemberDef LoopSlot_members[] = {
    {"queue", Py_T_OBJECT_EX, offsetof(LoopSlot, queue), Py_READONLY, "Its WaitQueue."},
    {"loop", Py_T_OBJECT_EX, offsetof(LoopSlot, loop), Py_READONLY, "Its event loop."},
    {"live", Py_T_PYSSIZET, offsetof(LoopSlot, live), 0, "Its waiters in state PENDING."},
    {"registered", Py_T_BOOL, offsetof(LoopSlot, registered), 0,
     "Its fds are registered with its loop."},
    {"stale", Py_T_BOOL, offsetof(LoopSlot, stale), 0,
     "A woken waiter took its turn since the last event."},
    {"stale_events", Py_T_BOOL, offsetof(LoopSlot, stale_events), Py_READONLY,
     "Its loop may report an event a woken waiter has since taken (the standard loop)."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef LoopSlot_getset[] = {
    {"waiters", LoopSlot_get_waiters, LoopSlot_set_waiters,
     "Its waiters (collections.deque), oldest first.", NULL},
    {"woken", LoopSlot_get_woken, LoopSlot_set_woken,
     "Woken for its turn and not run yet, or None.", NULL},
    {"thread", LoopSlot_get_thread, NULL, "The thread ident of its loop.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef LoopSlot_methods[] = {
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS, "See PEP 585."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot LoopSlot_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("LoopSlot(queue, loop, stale_events)\n--\n\n"
                                  "The waiters and the registrations of one event loop.")},
    {Py_tp_new, FUNC(LoopSlot_new)},
    {Py_tp_dealloc, FUNC(LoopSlot_dealloc)},
    {Py_tp_traverse, FUNC(LoopSlot_traverse)},
    {Py_tp_clear, FUNC(LoopSlot_clear)},
    {Py_tp_members, LoopSlot_members},
    {Py_tp_getset, LoopSlot_getset},
    {Py_tp_methods, LoopSlot_methods},
    {0, NULL},
};

static PyType_Spec LoopSlot_spec = {
    .name = "aiosync._waitc.LoopSlot",
    .basicsize = sizeof(LoopSlot),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = LoopSlot_slots,
};

/* ---------------------------------------------------------------------------------
 * RLock: the queue's re-entrant lock, taken from C without a Python call
 * --------------------------------------------------------------------------------- */

/* Acquire (blocking, re-entrant): 0, or -1 with an error set. The wait, if any, runs
 * without the GIL; it is not interrupted by signals (the lock is held only briefly). */
static int
rlock_enter(RLock *self)
{
    unsigned long me = PyThread_get_thread_ident();
    if (atomic_load_explicit(&self->owner, memory_order_relaxed) == me) {
        if (self->count == ULONG_MAX) {
            PyErr_SetString(PyExc_OverflowError, "the lock was acquired too many times");
            return -1;
        }
        self->count += 1;
        return 0;
    }
    if (!PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        (void)PyThread_acquire_lock(self->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    atomic_store_explicit(&self->owner, me, memory_order_relaxed);
    self->count = 1;
    return 0;
}

static int
rlock_exit(RLock *self)
{
    if (atomic_load_explicit(&self->owner, memory_order_relaxed) !=
            PyThread_get_thread_ident() ||
        self->count == 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    self->count -= 1;
    if (self->count == 0) {
        atomic_store_explicit(&self->owner, 0, memory_order_relaxed);
        PyThread_release_lock(self->lock);
    }
    return 0;
}

static PyObject *
RLock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "RLock() takes no arguments");
        return NULL;
    }
    waitc_state *st = state_for(type);
    if (st == NULL) {
        return NULL;
    }
    RLock *self = (RLock *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->lock = PyThread_allocate_lock();
    atomic_store_explicit(&self->owner, 0, memory_order_relaxed);
    self->count = 0;
    if (self->lock == NULL) {
        Py_DECREF(self);
        PyErr_SetString(PyExc_MemoryError, "cannot allocate a lock");
        return NULL;
    }
    return (PyObject *)self;
}

static void
RLock_dealloc(PyObject *op)
{
    RLock *self = (RLock *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->lock != NULL) {
        if (self->count) {
            PyThread_release_lock(self->lock);
        }
        PyThread_free_lock(self->lock);
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *
RLock_acquire(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    if (rlock_enter((RLock *)op) < 0) {
        return NULL;
    }
    Py_RETURN_TRUE;
}

static PyObject *
RLock_release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    if (rlock_exit((RLock *)op) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
RLock_exit(PyObject *op, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    return RLock_release(op, NULL);
}

static PyObject *
RLock_is_owned(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    RLock *self = (RLock *)op;
    return PyBool_FromLong(atomic_load_explicit(&self->owner, memory_order_relaxed) ==
                               PyThread_get_thread_ident() &&
                           self->count > 0);
}

static PyMethodDef RLock_methods[] = {
    {"acquire", RLock_acquire, METH_NOARGS,
     "acquire() -> True\n--\n\nAcquire the lock (again, if this thread holds it); blocks."},
    {"release", RLock_release, METH_NOARGS,
     "release() -> None\n--\n\nRelease it once (RuntimeError if this thread does not hold it)."},
    {"__enter__", RLock_acquire, METH_NOARGS, "__enter__() -> True\n--\n\nacquire()."},
    {"__exit__", FASTCALL(RLock_exit), METH_FASTCALL, "__exit__(*exc) -> None\n--\n\nrelease()."},
    {"_is_owned", RLock_is_owned, METH_NOARGS,
     "_is_owned() -> bool\n--\n\nThis thread holds it."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot RLock_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("RLock()\n--\n\n"
                                  "A re-entrant lock, as threading.RLock, that the wait core's C\n"
                                  "code takes without a Python call.")},
    {Py_tp_new, FUNC(RLock_new)},
    {Py_tp_dealloc, FUNC(RLock_dealloc)},
    {Py_tp_methods, RLock_methods},
    {0, NULL},
};

static PyType_Spec RLock_spec = {
    .name = "aiosync._waitc.RLock",
    .basicsize = sizeof(RLock),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = RLock_slots,
};

static int
lock_acquire(waitc_state *st, PyObject *lock)
{
    if (Py_IS_TYPE(lock, st->rlock_type)) {
        return rlock_enter((RLock *)lock);
    }
    return do_method0(lock, st->s_acquire);
}

/* Release the lock, keeping any exception already set. */
static int
lock_release(waitc_state *st, PyObject *lock)
{
    if (Py_IS_TYPE(lock, st->rlock_type)) {
        int rc = rlock_exit((RLock *)lock);
        return PyErr_Occurred() ? -1 : rc;
    }
    saved_error saved;
    save_error(&saved);
    int rc = do_method0(lock, st->s_release);
    if (saved_some(&saved)) {
        if (rc < 0) {
            PyErr_Clear();
        }
        restore_error(&saved);
        return -1;
    }
    return rc;
}

/* ---------------------------------------------------------------------------------
 * The releasing side (lock held)
 * --------------------------------------------------------------------------------- */

/* waiters.popleft(), for its effect: 0, or -1 with an error set. */
static int
popleft(waitc_state *st, PyObject *waiters)
{
    PyObject *args[] = {waiters};
    PyObject *r = call_known(st->deque, st->deque_popleft, st->s_popleft, args, 1);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* The oldest pending waiter of `slot` (dropping dead ones before it): a new reference,
 * or NULL: none (no error set) or an error (set). */
static Waiter *
first(waitc_state *st, LoopSlot *slot)
{
    for (;;) {
        PyObject *waiters = Py_NewRef(slot->waiters);
        Py_ssize_t n = PySequence_Size(waiters);
        Waiter *w = n > 0 ? (Waiter *)PySequence_GetItem(waiters, 0) : NULL;
        if (w == NULL) {
            Py_DECREF(waiters);
            return NULL; /* none, or an error (set) */
        }
        int ok = alive(st, w);
        if (ok == 0 && (popleft(st, waiters) < 0 || settle(st, w) < 0)) {
            ok = -1;
        }
        Py_DECREF(waiters);
        if (ok != 0) {
            if (ok < 0) {
                Py_CLEAR(w);
            }
            return w;
        }
        Py_DECREF(w);
    }
}

static PyObject *pending_settled(waitc_state *st, LoopSlot *slot);

/* All pending waiters of `slot`, oldest first, as a new list; dead ones are dropped. */
static PyObject *
pending(waitc_state *st, LoopSlot *slot)
{
    if (!slot->live) { /* nothing to hand out here; dead ones go with the next hand-out */
        return PyList_New(0);
    }
    PyObject *waiters = Py_NewRef(slot->waiters);
    if (PySequence_Size(waiters) == 1) { /* the usual case, without a copy */
        Waiter *w = (Waiter *)PySequence_GetItem(waiters, 0);
        int ok = w == NULL ? -1 : alive(st, w);
        Py_DECREF(waiters);
        if (ok <= 0) {
            Py_XDECREF(w);
            return ok < 0 ? NULL : pending_settled(st, slot);
        }
        PyObject *living = PyList_New(1);
        if (living == NULL) {
            Py_DECREF(w);
            return NULL;
        }
        PyList_SET_ITEM(living, 0, (PyObject *)w);
        return living;
    }
    Py_DECREF(waiters);
    return pending_settled(st, slot);
}

/* pending(), the general case: every waiter checked, the dead ones dropped. */
static PyObject *
pending_settled(waitc_state *st, LoopSlot *slot)
{
    PyObject *waiters = Py_NewRef(slot->waiters);
    PyObject *all = PySequence_List(waiters);
    if (all == NULL) {
        Py_DECREF(waiters);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(all);
    PyObject *living = PyList_New(0);
    if (living == NULL) {
        goto error;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Waiter *w = (Waiter *)PyList_GET_ITEM(all, i);
        int ok = alive(st, w);
        if (ok < 0 || (ok && PyList_Append(living, (PyObject *)w) < 0)) {
            goto error;
        }
    }
    if (PyList_GET_SIZE(living) != n) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (settle(st, (Waiter *)PyList_GET_ITEM(all, i)) < 0) {
                goto error;
            }
        }
        PyObject *fresh = PyObject_CallOneArg(st->deque, living);
        if (fresh == NULL) {
            goto error;
        }
        Py_SETREF(slot->waiters, fresh);
    }
    Py_DECREF(all);
    Py_DECREF(waiters);
    return living;
error:
    Py_XDECREF(living);
    Py_DECREF(all);
    Py_DECREF(waiters);
    return NULL;
}

/* Wake the oldest waiter of `slot` for its turn, unless one woken has not run yet. */
static int
ring(waitc_state *st, LoopSlot *slot, PyObject *result)
{
    if (slot->woken != Py_None) {
        return 0;
    }
    Waiter *w = first(st, slot);
    if (w == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    Core *queue = queue_of_slot(slot);
    if (popleft(st, slot->waiters) < 0) {
        Py_DECREF(w);
        return -1;
    }
    Py_SETREF(slot->woken, Py_NewRef((PyObject *)w));
    queue->turns += 1;
    int rc = release(st, w, result);
    if (rc == 0 && w->state == ABANDONED && slot->woken == (PyObject *)w) { /* loop closed */
        Py_SETREF(slot->woken, Py_NewRef(Py_None));
        queue->turns -= 1;
    }
    Py_DECREF(w);
    return rc;
}

/* ---------------------------------------------------------------------------------
 * Core: the base of _waitq.WaitQueue
 * --------------------------------------------------------------------------------- */

static int
Core_traverse(PyObject *op, visitproc visit, void *arg)
{
    Core *self = (Core *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->lock);
    Py_VISIT(self->owner);
    Py_VISIT(self->slots);
    Py_VISIT(self->fds);
    Py_VISIT(self->closed_error);
    Py_VISIT(self->blockers);
    return 0;
}

static int
Core_clear(PyObject *op)
{
    Core *self = (Core *)op;
    Py_CLEAR(self->lock);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->slots);
    Py_CLEAR(self->fds);
    Py_CLEAR(self->closed_error);
    Py_CLEAR(self->blockers);
    return 0;
}

static void
Core_dealloc(PyObject *op)
{
    gc_dealloc(op, Core_clear);
}

static PyObject *
Core_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    waitc_state *st = state_for(type);
    if (st == NULL) {
        return NULL;
    }
    Core *self = (Core *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->lock = Py_NewRef(Py_None);
    self->owner = Py_NewRef(Py_None);
    self->closed_error = Py_NewRef(Py_None);
    self->fds = PyTuple_New(0);
    self->slots = PyDict_New();
    self->blockers = PyDict_New();
    if (self->fds == NULL || self->slots == NULL || self->blockers == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* The object fields Python may set (lock held, or before anyone waits). */
#define CORE_FIELD(name, check, what)                                                       \
    static PyObject *Core_get_##name(PyObject *op, void *Py_UNUSED(closure))                \
    {                                                                                       \
        return get_object(&((Core *)op)->name);                                             \
    }                                                                                       \
    static int Core_set_##name(PyObject *op, PyObject *value, void *Py_UNUSED(closure))     \
    {                                                                                       \
        if (value != NULL && !(check)) {                                                    \
            PyErr_SetString(PyExc_TypeError, what);                                         \
            return -1;                                                                      \
        }                                                                                   \
        return set_object(&((Core *)op)->name, value, #name);                               \
    }

CORE_FIELD(lock, 1, "")
CORE_FIELD(owner, PyWeakref_CheckRef(value), "_owner must be a weakref.ref")
CORE_FIELD(slots, PyDict_CheckExact(value), "_slots must be a dict")
CORE_FIELD(fds, PyTuple_CheckExact(value), "_fds must be a tuple")
CORE_FIELD(closed_error, PyCallable_Check(value), "_closed_error must be callable")
CORE_FIELD(blockers, PyDict_CheckExact(value), "blockers must be a dict")

static PyObject *
Core_get_waiting(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(((Core *)op)->waiting);
}

static int
Core_set_count(Py_ssize_t *field, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete a count");
        return -1;
    }
    Py_ssize_t n = PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    *field = n;
    return 0;
}

static int
Core_set_waiting(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return Core_set_count(&((Core *)op)->waiting, value);
}

static PyObject *
Core_get_turns(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(((Core *)op)->turns);
}

static int
Core_set_turns(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return Core_set_count(&((Core *)op)->turns, value);
}

static PyObject *
Core_get_held(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(((Core *)op)->held);
}

static int
Core_set_held(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return Core_set_count(&((Core *)op)->held, value);
}

static PyObject *
Core_get_closed(PyObject *op, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(((Core *)op)->closed);
}

static int
Core_set_closed(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete _closed");
        return -1;
    }
    int closed = PyObject_IsTrue(value);
    if (closed < 0) {
        return -1;
    }
    ((Core *)op)->closed = (char)closed;
    return 0;
}

static LoopSlot *
check_slot(waitc_state *st, PyObject *slot)
{
    if (!Py_IS_TYPE(slot, st->slot_type)) {
        PyErr_SetString(PyExc_TypeError, "expected a LoopSlot");
        return NULL;
    }
    return (LoopSlot *)slot;
}

/* Raise the primitive's ClosedResourceError (its queue was closed). */
static PyObject *
raise_closed_error(Core *queue)
{
    PyObject *exc = PyObject_CallNoArgs(queue->closed_error);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* park(cond), its waiter's future given (NULL: a new one of the running loop). */
static PyObject *
park(PyObject *op, PyObject *cond, PyObject *given)
{
    Core *self = (Core *)op;
    waitc_state *st = state_of(op);
    if (st == NULL) {
        return NULL;
    }
    if (self->closed) {
        return raise_closed_error(self);
    }
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop == NULL) {
        return NULL;
    }
    PyObject *slot = PyDict_GetItemWithError(self->slots, loop); /* borrowed */
    if (slot != NULL) {
        Py_INCREF(slot);
    }
    else if (PyErr_Occurred()) {
        Py_DECREF(loop);
        return NULL;
    }
    else {
        slot = call_method1(op, st->s_new_slot, loop);
        if (slot == NULL) {
            Py_DECREF(loop);
            return NULL;
        }
        if (check_slot(st, slot) == NULL) {
            Py_DECREF(slot);
            Py_DECREF(loop);
            return NULL;
        }
    }
    PyObject *future = given != NULL ? Py_NewRef(given) : call_method0(loop, st->s_create_future);
    Py_DECREF(loop);
    if (future == NULL) {
        Py_DECREF(slot);
        return NULL;
    }
    Waiter *w = new_waiter(st, future, cond, slot);
    Py_DECREF(future);
    if (w == NULL) {
        Py_DECREF(slot);
        return NULL;
    }
    LoopSlot *s = (LoopSlot *)slot;
    PyObject *args[] = {s->waiters, (PyObject *)w};
    PyObject *appended = call_known(st->deque, st->deque_append, st->s_append, args, 2);
    Py_XDECREF(appended);
    if (appended == NULL) {
        goto error;
    }
    s->live += 1;
    self->waiting += 1;
    if (!s->registered && do_method1(op, st->s_register, slot) < 0) {
        goto error;
    }
    Py_DECREF(slot);
    return (PyObject *)w;
error:
    Py_DECREF(slot);
    Py_DECREF(w);
    return NULL;
}

static PyObject *
Core_park(PyObject *op, PyObject *cond)
{
    return park(op, cond, NULL);
}

static PyObject *
Core_first(PyObject *op, PyObject *arg)
{
    waitc_state *st = state_of(op);
    LoopSlot *slot = st == NULL ? NULL : check_slot(st, arg);
    if (slot == NULL) {
        return NULL;
    }
    Waiter *w = first(st, slot);
    if (w == NULL && !PyErr_Occurred()) {
        Py_RETURN_NONE;
    }
    return (PyObject *)w;
}

static PyObject *
Core_pending(PyObject *op, PyObject *arg)
{
    waitc_state *st = state_of(op);
    LoopSlot *slot = st == NULL ? NULL : check_slot(st, arg);
    return slot == NULL ? NULL : pending(st, slot);
}

static PyObject *
Core_ring(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ring(slot, result) takes 2 arguments");
        return NULL;
    }
    waitc_state *st = state_of(op);
    LoopSlot *slot = st == NULL ? NULL : check_slot(st, args[0]);
    if (slot == NULL || ring(st, slot, args[1]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------------------------
 * Wait: what `await queue.wait(waiter)` awaits
 * --------------------------------------------------------------------------------- */

/* throw(exc) on an awaitable not suspended in anything: raise it here, as a coroutine
 * would at its start. */
static void
raise_thrown(PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *thrown = args[0];
    if (PyExceptionClass_Check(thrown)) {
        PyErr_SetObject(thrown, nargs > 1 ? args[1] : NULL);
    }
    else {
        PyErr_SetObject((PyObject *)Py_TYPE(thrown), thrown);
    }
}

/* throw(*args) into `inner`, the iterator an awaitable is suspended in. */
static PyObject *
throw_into(waitc_state *st, PyObject *inner, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *call[4] = {inner, NULL, NULL, NULL};
    for (Py_ssize_t i = 0; i < nargs; i++) {
        call[i + 1] = args[i];
    }
    return PyObject_VectorcallMethod(st->s_throw, call,
                                     (size_t)(nargs + 1) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
}

/* The wait is over by an exception (cancelled, timed out, its loop closed, the
 * coroutine closed): queue.abandon(waiter), keeping that exception. */
static void
wait_abandon(waitc_state *st, Wait *self)
{
    self->over = 1;
    if (self->waiter == NULL) { /* a wait_turn() that never parked: nothing to give back */
        return;
    }
    saved_error saved;
    save_error(&saved);
    PyObject *r = call_method1(self->queue, st->s_abandon, self->waiter);
    if (r == NULL) { /* keep the first exception; this one says less */
        PyErr_WriteUnraisable(self->queue);
    }
    Py_XDECREF(r);
    restore_error(&saved);
}

/* End the iteration with `result` (StopIteration); steals it. */
static PyObject *
wait_return(Wait *self, PyObject *result)
{
    self->over = 1;
    if (result == Py_None) {
        PyErr_SetNone(PyExc_StopIteration);
    }
    else {
        PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
        if (stop != NULL) {
            PyErr_SetObject(PyExc_StopIteration, stop);
            Py_DECREF(stop);
        }
    }
    Py_DECREF(result);
    return NULL;
}

static int
wait_start(Wait *self)
{
    if (self->inner != NULL) {
        return 0;
    }
    PyObject *future = ((Waiter *)self->waiter)->future;
    PyAsyncMethods *am = Py_TYPE(future)->tp_as_async;
    if (am == NULL || am->am_await == NULL) {
        PyErr_SetString(PyExc_TypeError, "the waiter's future is not awaitable");
        return -1;
    }
    self->inner = am->am_await(future);
    return self->inner == NULL ? -1 : 0;
}

/* wait_turn(): the woken waiter's turn, in its task, under the lock: 1 it took (the
 * wait is over), 0 it found nothing and waits again first in its loop's line, -1 with
 * an error (the queue was closed, or take() raised). */
static int
turn(waitc_state *st, Wait *self, PyObject *result)
{
    Core *queue = (Core *)self->queue;
    Waiter *w = (Waiter *)self->waiter;
    LoopSlot *slot = (LoopSlot *)Py_NewRef(w->slot);
    PyObject *lock = Py_NewRef(queue->lock);
    int rc = -1;
    if (lock_acquire(st, lock) < 0) {
        goto done;
    }
    if (slot->woken == (PyObject *)w) {
        Py_SETREF(slot->woken, Py_NewRef(Py_None));
        queue->turns -= 1;
    }
    if (queue->closed) {
        raise_closed_error(queue);
    }
    else {
        PyObject *taken = PyObject_CallOneArg(self->take, result);
        int ok = taken == NULL ? -1 : PyObject_IsTrue(taken);
        Py_XDECREF(taken);
        if (ok > 0) {
            slot->stale = slot->stale_events;
            rc = 1;
        }
        else if (ok == 0) {
            /* Another process was faster: wait again, first in line. */
            PyObject *future = call_method0(slot->loop, st->s_create_future);
            if (future != NULL) {
                Py_SETREF(w->future, future);
                w->state = PENDING;
                if (do_method1(slot->waiters, st->s_appendleft, (PyObject *)w) == 0) {
                    slot->live += 1;
                    queue->waiting += 1;
                    rc = 0;
                    if (!slot->registered &&
                        do_method1((PyObject *)queue, st->s_register, (PyObject *)slot) < 0) {
                        rc = -1;
                    }
                }
            }
        }
    }
    if (lock_release(st, lock) < 0) {
        rc = -1;
    }
done:
    Py_DECREF(lock);
    Py_DECREF(slot);
    return rc;
}

/* wait_turn(): park its waiter at the first send, under the lock. */
static int
wait_park(waitc_state *st, Wait *self)
{
    Core *queue = (Core *)self->queue;
    PyObject *lock = Py_NewRef(queue->lock);
    if (lock_acquire(st, lock) < 0) {
        Py_DECREF(lock);
        return -1;
    }
    PyObject *w = Core_park(self->queue, self->cond);
    if (lock_release(st, lock) < 0) {
        Py_CLEAR(w);
    }
    Py_DECREF(lock);
    if (w == NULL) {
        return -1;
    }
    self->waiter = w;
    return 0;
}

static PyObject *
Wait_send(PyObject *op, PyObject *value)
{
    Wait *self = (Wait *)op;
    waitc_state *st = state_of(op);
    if (self->over) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an awaited wait");
        return NULL;
    }
    if (self->waiter == NULL && wait_park(st, self) < 0) {
        self->over = 1;
        return NULL;
    }
    for (;;) {
        if (wait_start(self) < 0) {
            wait_abandon(st, self);
            return NULL;
        }
        PyObject *result = NULL;
        PySendResult sent = PyIter_Send(self->inner, value, &result);
        if (sent == PYGEN_NEXT) {
            return result;
        }
        if (sent == PYGEN_ERROR) {
            wait_abandon(st, self);
            return NULL;
        }
        if (self->take == NULL) {
            return wait_return(self, result);
        }
        Py_CLEAR(self->inner);
        int rc = turn(st, self, result);
        Py_DECREF(result);
        if (rc != 0) {
            self->over = 1;
            return rc < 0 ? NULL : wait_return(self, Py_NewRef(Py_None));
        }
        value = Py_None; /* parked again: await the new future */
    }
}

static PyObject *
Wait_iternext(PyObject *op)
{
    return Wait_send(op, Py_None);
}

static PyObject *
Wait_throw(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    Wait *self = (Wait *)op;
    waitc_state *st = state_of(op);
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes 1 to 3 arguments");
        return NULL;
    }
    if (self->inner == NULL || self->over) { /* not started (or over) */
        raise_thrown(args, nargs);
        if (!self->over) {
            wait_abandon(st, self);
        }
        return NULL;
    }
    PyObject *result = throw_into(st, self->inner, args, nargs);
    if (result != NULL) {
        return result;
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration) && self->take == NULL) {
        self->over = 1; /* the future was done meanwhile: its result is the wait's */
        return NULL;
    }
    wait_abandon(st, self);
    return NULL;
}

static PyObject *
Wait_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Wait *self = (Wait *)op;
    waitc_state *st = state_of(op);
    if (self->inner != NULL && do_method0(self->inner, st->s_close) < 0) {
        PyErr_Clear();
    }
    if (!self->over) {
        self->over = 1;
        if (self->waiter != NULL) {
            PyObject *r = call_method1(self->queue, st->s_abandon, self->waiter);
            if (r == NULL) {
                return NULL;
            }
            Py_DECREF(r);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *
Wait_await(PyObject *op)
{
    return Py_NewRef(op);
}

static int
Wait_traverse(PyObject *op, visitproc visit, void *arg)
{
    Wait *self = (Wait *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->queue);
    Py_VISIT(self->waiter);
    Py_VISIT(self->inner);
    Py_VISIT(self->cond);
    Py_VISIT(self->take);
    return 0;
}

static int
Wait_clear(PyObject *op)
{
    Wait *self = (Wait *)op;
    Py_CLEAR(self->queue);
    Py_CLEAR(self->waiter);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->cond);
    Py_CLEAR(self->take);
    return 0;
}

static void
Wait_dealloc(PyObject *op)
{
    gc_dealloc(op, Wait_clear);
}

static PyMethodDef Wait_methods[] = {
    {"send", Wait_send, METH_O, "send(value) -> Any\n--\n\nAs a coroutine's send()."},
    {"throw", FASTCALL(Wait_throw), METH_FASTCALL,
     "throw(exc) -> Any\n--\n\nAs a coroutine's throw(): the waiter is abandoned."},
    {"close", Wait_close, METH_NOARGS,
     "close() -> None\n--\n\nAs a coroutine's close(): the waiter is abandoned."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Wait_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("What `await queue.wait(waiter)` awaits: the waiter's\n"
                                  "future; on any exception the waiter is abandoned.")},
    {Py_am_await, FUNC(Wait_await)},
    {Py_tp_iter, FUNC(Wait_await)},
    {Py_tp_iternext, FUNC(Wait_iternext)},
    {Py_tp_dealloc, FUNC(Wait_dealloc)},
    {Py_tp_traverse, FUNC(Wait_traverse)},
    {Py_tp_clear, FUNC(Wait_clear)},
    {Py_tp_methods, Wait_methods},
    {0, NULL},
};

static PyType_Spec Wait_spec = {
    .name = "aiosync._waitc.Wait",
    .basicsize = sizeof(Wait),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Wait_slots,
};

static Wait *
new_wait(waitc_state *st, PyObject *queue, PyObject *waiter, PyObject *cond, PyObject *take)
{
    Wait *self = PyObject_GC_New(Wait, st->wait_type);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->queue = Py_NewRef(queue);
    self->waiter = Py_XNewRef(waiter);
    self->inner = NULL;
    self->cond = Py_XNewRef(cond);
    self->take = Py_XNewRef(take);
    self->over = 0;
    PyObject_GC_Track(self);
    return self;
}

static PyObject *
Core_wait(PyObject *op, PyObject *waiter)
{
    waitc_state *st = state_of(op);
    if (!Py_IS_TYPE(waiter, st->waiter_type)) {
        PyErr_SetString(PyExc_TypeError, "wait(waiter): expected a Waiter");
        return NULL;
    }
    return (PyObject *)new_wait(st, op, waiter, NULL, NULL);
}

static PyObject *
Core_wait_turn(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "wait_turn(cond, take) takes 2 arguments");
        return NULL;
    }
    if (!PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "wait_turn(cond, take): take must be callable");
        return NULL;
    }
    return (PyObject *)new_wait(state_of(op), op, NULL, args[0], args[1]);
}

static PyMethodDef Core_methods[] = {
    {"wait_turn", FASTCALL(Core_wait_turn), METH_FASTCALL,
     "wait_turn(cond, take) -> Awaitable[None]\n--\n\n"
     "Wait in line until `take` succeeds in this task (await it).\n\n"
     "The caller has tried its fast path already (a take when nobody of this process is\n"
     "in line: ``waiting`` and ``turns`` both 0). This parks a waiter at the end of its\n"
     "loop's line; each time a ring wakes it, ``take(result)`` runs in this task with the\n"
     "lock held; if it finds nothing, the waiter waits again at the head of the line. On\n"
     "cancellation nothing is left behind, and nothing was taken."},
    {"wait", Core_wait, METH_O,
     "wait(waiter) -> Awaitable\n--\n\n"
     "Wait for `waiter` to be released (await it); on any exception (cancellation, a\n"
     "timeout, the coroutine closed) abandon it: leave nothing behind."},
    {"park", Core_park, METH_O,
     "park(cond) -> Waiter\n--\n\n"
     "Queue a waiter of the running loop for `cond`. Call with ``lock`` held.\n\n"
     "Raises the primitive's ClosedResourceError if it was closed, by any thread."},
    {"first", Core_first, METH_O,
     "first(slot) -> Waiter | None\n--\n\n"
     "The oldest pending waiter of `slot` (dropping dead ones before it), or None."},
    {"pending", Core_pending, METH_O,
     "pending(slot) -> list[Waiter]\n--\n\n"
     "All pending waiters of `slot`, oldest first; dead ones are dropped."},
    {"ring", FASTCALL(Core_ring), METH_FASTCALL,
     "ring(slot, result) -> None\n--\n\n"
     "Wake the oldest waiter of `slot` for its turn, unless one woken has not run yet."},
    {"__class_getitem__", Py_GenericAlias, METH_O | METH_CLASS, "See PEP 585."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"lock", Core_get_lock, Core_set_lock, "The primitive's lock (re-entrant).", NULL},
    {"_owner", Core_get_owner, Core_set_owner, "A weak reference to the primitive.", NULL},
    {"_slots", Core_get_slots, Core_set_slots, "loop -> LoopSlot.", NULL},
    {"_fds", Core_get_fds, Core_set_fds, "The fds waiters wait on.", NULL},
    {"_closed_error", Core_get_closed_error, Core_set_closed_error,
     "Makes the primitive's ClosedResourceError.", NULL},
    {"blockers", Core_get_blockers, Core_set_blockers,
     "thread -> wake eventfd of its blocking wait.", NULL},
    {"waiting", Core_get_waiting, Core_set_waiting, "Pending waiters over all loops.", NULL},
    {"turns", Core_get_turns, Core_set_turns,
     "Waiters woken for their turn that have not run yet, all loops.", NULL},
    {"held", Core_get_held, Core_set_held,
     "BarrierGroup rounds in progress over this (Barrier's) queue.", NULL},
    {"_closed", Core_get_closed, Core_set_closed, "The queue was closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Core_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The fields and the releasing side of a WaitQueue.")},
    {Py_tp_new, FUNC(Core_new)},
    {Py_tp_dealloc, FUNC(Core_dealloc)},
    {Py_tp_traverse, FUNC(Core_traverse)},
    {Py_tp_clear, FUNC(Core_clear)},
    {Py_tp_methods, Core_methods},
    {Py_tp_getset, Core_getset},
    {0, NULL},
};

static PyType_Spec Core_spec = {
    .name = "aiosync._waitc.Core",
    .basicsize = sizeof(Core),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Core_slots,
};

/* ---------------------------------------------------------------------------------
 * dispatch: what loop.add_reader calls
 * --------------------------------------------------------------------------------- */

/* fd is readable (or hung up) right now: 1, 0, or -1 with OSError set. */
static int
poll_now(int fd, short events)
{
    struct pollfd p = {.fd = fd, .events = events, .revents = 0};
    int n;
    do {
        n = poll(&p, 1, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return n > 0;
}

/* With the lock held: the event's work. */
static int
dispatch_locked(waitc_state *st, Core *queue, LoopSlot *slot, PyObject *owner,
                PyObject *fd_obj)
{
    if (slot->stale) {
        /* The first event after a woken waiter took its turn may report what it took:
         * ringing for it would wake the next waiter for nothing. */
        slot->stale = 0;
        int fd = as_fd(fd_obj);
        if (fd < 0) {
            return -1;
        }
        int ready = poll_now(fd, POLLIN);
        if (ready <= 0) {
            return ready;
        }
    }
    Waiter *w = NULL;
    if (slot->live) {
        w = first(st, slot);
        if (w == NULL && PyErr_Occurred()) {
            return -1;
        }
    }
    if (w == NULL && !queue->held) {
        /* Nobody of this loop waits (a waiter whose task was cancelled but has not
         * resumed yet does not count: `first` settles it). Read nothing, and drop this
         * fd's registration (the others stay until they fire too) rather than be called
         * again and again for an fd nobody asked about; but not while a woken waiter
         * has not run (it may need it again). A Barrier held by a group's round is
         * read all the same (see pump). */
        if (slot->woken == Py_None) {
            return do_method2((PyObject *)queue, st->s_unregister, (PyObject *)slot, fd_obj);
        }
        return 0;
    }
    Py_XDECREF(w);
    PyObject *r = call_method2(owner, st->s_on_readable, (PyObject *)slot, fd_obj);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *
waitc_dispatch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "dispatch(queue_ref, slot, fd) takes 3 arguments");
        return NULL;
    }
    waitc_state *st = get_state(module);
    LoopSlot *slot = check_slot(st, args[1]);
    if (slot == NULL) {
        return NULL;
    }
    PyObject *fd_obj = args[2];
    PyObject *queue = deref(args[0]);
    PyObject *owner = NULL;
    if (queue != NULL) {
        if (!PyObject_TypeCheck(queue, st->core_type)) {
            Py_DECREF(queue);
            PyErr_SetString(PyExc_TypeError, "dispatch: not a WaitQueue");
            return NULL;
        }
        PyObject *ref = ((Core *)queue)->owner;
        owner = PyWeakref_CheckRef(ref) ? deref(ref) : NULL;
    }
    if (owner == NULL) { /* finalized without close(): __del__ prevents this */
        Py_XDECREF(queue);
        PyObject *loop = Py_NewRef(slot->loop);
        PyObject *r = call_method1(loop, st->s_remove_reader, fd_obj);
        Py_DECREF(loop);
        Py_XDECREF(r);
        return r == NULL ? NULL : Py_NewRef(Py_None);
    }
    Py_INCREF(slot);
    PyObject *lock = Py_NewRef(((Core *)queue)->lock);
    int rc = lock_acquire(st, lock);
    if (rc == 0) {
        rc = dispatch_locked(st, (Core *)queue, slot, owner, fd_obj);
        if (lock_release(st, lock) < 0) {
            rc = -1;
        }
    }
    Py_DECREF(lock);
    Py_DECREF(slot);
    Py_DECREF(owner);
    Py_DECREF(queue);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Set a future of another thread's loop, in that thread, unless it is done by then. */
static PyObject *
waitc_set_soon(PyObject *module, PyObject *const *args, Py_ssize_t nargs, int exception)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "takes (future, value)");
        return NULL;
    }
    waitc_state *st = get_state(module);
    int done = future_done(st, args[0]);
    if (done < 0) {
        return NULL;
    }
    if (!done) { /* cancelled meanwhile: nobody needs it */
        PyObject *r =
            call_method1(args[0], exception ? st->s_set_exception : st->s_set_result, args[1]);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *
waitc_set_result(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return waitc_set_soon(module, args, nargs, 0);
}

static PyObject *
waitc_set_exception(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    return waitc_set_soon(module, args, nargs, 1);
}

/* ---------------------------------------------------------------------------------
 * BarrierCore: the Barrier's counter, flags and read loop (see _barrier.py's top)
 * --------------------------------------------------------------------------------- */

static int
BarrierCore_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((BarrierCore *)op)->waitq);
    return 0;
}

static int
BarrierCore_clear(PyObject *op)
{
    Py_CLEAR(((BarrierCore *)op)->waitq);
    return 0;
}

static void
BarrierCore_dealloc(PyObject *op)
{
    gc_dealloc(op, BarrierCore_clear);
}

static PyObject *
BarrierCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    waitc_state *st = state_for(type);
    if (st == NULL) {
        return NULL;
    }
    BarrierCore *self = (BarrierCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->waitq = Py_NewRef(Py_None);
    self->me = self->them = self->pipe_r = self->pipe_w = -1;
    return (PyObject *)self;
}

/* The pipe end this side holds once its role is set (the other one is closed then). */
static inline int
pipe_end(BarrierCore *self)
{
    return self->pipe_r >= 0 ? self->pipe_r : self->pipe_w;
}

/* What a wait for `cond` says now: Py_True / Py_False (borrowed), NULL: it waits on (no
 * error set), or NULL with an error. `cond` is a threshold (wait while barriers > it)
 * or anything else for "until the peer aborts". */
static PyObject *
verdict(BarrierCore *self, PyObject *cond)
{
    if (!PyLong_CheckExact(cond)) { /* UNTIL_ABORTED: this side's own abort does not count */
        if (self->they_aborted) {
            return self->i_aborted ? Py_False : Py_True;
        }
        return NULL;
    }
    if (self->i_aborted || self->they_aborted) {
        return Py_False;
    }
    int overflow;
    long long threshold = PyLong_AsLongLongAndOverflow(cond, &overflow);
    if (threshold == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow > 0 || (overflow == 0 && self->barriers <= threshold)) {
        return Py_True;
    }
    return NULL;
}

static Core *
waitq_of(BarrierCore *self, waitc_state *st)
{
    if (!PyObject_TypeCheck(self->waitq, st->core_type)) {
        PyErr_SetString(PyExc_RuntimeError, "the Barrier has no wait queue");
        return NULL;
    }
    return (Core *)self->waitq;
}

/* Release every waiter whose condition holds, with its result as of now. */
static int
wake(waitc_state *st, BarrierCore *self)
{
    Core *queue = waitq_of(self, st);
    if (queue == NULL) {
        return -1;
    }
    if (PyDict_GET_SIZE(queue->blockers) &&
        do_method0((PyObject *)queue, st->s_wake_blockers) < 0) {
        return -1;
    }
    if (!queue->waiting) {
        return 0;
    }
    /* Releasing runs Python code (a future's callbacks are scheduled), which never adds
     * or removes a slot; should the dict change all the same, an entry seen twice has
     * no pending waiter left, and the slot is held while it is used. */
    PyObject *slots = Py_NewRef(queue->slots);
    Py_ssize_t pos = 0;
    PyObject *key, *slot;
    int rc = 0;
    while (rc == 0 && PyDict_Next(slots, &pos, &key, &slot)) {
        Py_INCREF(slot);
        PyObject *living = pending(st, (LoopSlot *)slot);
        Py_DECREF(slot);
        if (living == NULL) {
            rc = -1;
            break;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(living); j++) {
            Waiter *w = (Waiter *)PyList_GET_ITEM(living, j);
            PyObject *result = verdict(self, w->cond);
            if (result == NULL) {
                if (PyErr_Occurred()) {
                    rc = -1;
                    break;
                }
                continue;
            }
            if (w->state == PENDING && release(st, w, result) < 0) {
                rc = -1;
                break;
            }
        }
        Py_DECREF(living);
    }
    Py_DECREF(slots);
    return rc;
}

/* One read of `them`: its value, 0 if empty; -1 with an error set. */
static int
read_them(BarrierCore *self, uint64_t *value)
{
    return eventfd_read(self->them, value);
}

static void
apply(BarrierCore *self, uint64_t value)
{
    if (value >= (uint64_t)ABORTION) {
        self->they_aborted = 1;
    }
    else if (!(self->i_aborted || self->they_aborted)) {
        self->barriers -= (long long)value;
    }
}

/* systemd's read loop, run once for everyone waiting now (lock held). `cond`: a
 * blocking twin of this thread waits for it too (NULL: none does). While nobody waits
 * but a group's round holds the Barrier (design §11), the eventfd is read all the same
 * (what a wait would read now), and the pipe is not looked at: an exit is noticed only
 * by a wait. */
static int
pump(waitc_state *st, BarrierCore *self, PyObject *cond)
{
    Core *queue = waitq_of(self, st);
    if (queue == NULL) {
        return -1;
    }
    Py_INCREF(queue);
    int rc = 0;
    while (!self->they_aborted) {
        int held_only = 0;
        if (!queue->waiting) {
            if (cond == NULL) {
                if (!queue->held) {
                    break;
                }
                held_only = 1;
            }
            else {
                PyObject *said = verdict(self, cond);
                if (said != NULL) {
                    break;
                }
                if (PyErr_Occurred()) {
                    rc = -1;
                    break;
                }
            }
        }
        uint64_t value;
        if (read_them(self, &value) < 0) {
            rc = -1;
            break;
        }
        if (!value && held_only) {
            break;
        }
        if (!value) {
            int gone = poll_now(pipe_end(self), 0); /* POLLHUP, POLLERR: always reported */
            if (gone <= 0) {
                rc = gone;
                break;
            }
            /* The peer is gone. What it placed before exiting comes first; read once
             * more, as a last write may have raced the poll. */
            if (read_them(self, &value) < 0) {
                rc = -1;
                break;
            }
            if (!value) {
                value = (uint64_t)ABORTION;
                self->peer_exited = 1;
            }
        }
        apply(self, value);
        if (wake(st, self) < 0) {
            rc = -1;
            break;
        }
    }
    Py_DECREF(queue);
    return rc;
}

/* Both sides count as aborted: the peer can no longer be told anything (systemd makes
 * this fatal). */
static int
broken(waitc_state *st, BarrierCore *self)
{
    self->i_aborted = self->they_aborted = 1;
    return wake(st, self);
}

/* place(), lock held: 1 placed, 0 not (aborted, or the write failed: then broken), -1
 * with an error set. */
static int
place(waitc_state *st, BarrierCore *self)
{
    if (self->i_aborted || self->they_aborted) {
        return 0;
    }
    int written = eventfd_write(self->me, 1);
    if (written > 0) {
        self->barriers += 1;
        return 1;
    }
    return written < 0 || broken(st, self) < 0 ? -1 : 0;
}

static PyObject *
BarrierCore_place(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    waitc_state *st = state_of(op);
    int placed = st == NULL ? -1 : place(st, (BarrierCore *)op);
    return placed < 0 ? NULL : PyBool_FromLong(placed);
}

static PyObject *
BarrierCore_broken(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    waitc_state *st = state_of(op);
    if (st == NULL || broken(st, (BarrierCore *)op) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The first half of a wait for `cond`, under the lock: its result at once (Py_True,
 * Py_False), or a waiter parked on the queue (a new reference); NULL with an error.
 * With `placing`, place() first (place_and_sync): if that places nothing, False. A
 * parked waiter's future is `future` if given (a Share of a Gather), else a new one.
 * With `hold`, a group's round holds the Barrier from now on (unless this fails). */
static PyObject *
start_wait(waitc_state *st, BarrierCore *self, PyObject *cond, int placing, PyObject *future,
           int hold)
{
    Core *queue = waitq_of(self, st);
    if (queue == NULL) {
        return NULL;
    }
    Py_INCREF(queue);
    PyObject *lock = Py_NewRef(queue->lock);
    PyObject *result = NULL;
    if (lock_acquire(st, lock) == 0) {
        int placed = placing ? place(st, self) : 1;
        if (placed == 0) {
            result = Py_NewRef(Py_False); /* aborted: sync() would return False at once too */
        }
        else if (placed > 0) {
            result = verdict(self, cond);
            if (result != NULL) {
                Py_INCREF(result);
            }
            else if (!PyErr_Occurred()) {
                result = park((PyObject *)queue, cond, future);
            }
        }
        if (result != NULL && hold) {
            queue->held += 1;
        }
        if (lock_release(st, lock) < 0) {
            Py_CLEAR(result);
        }
    }
    Py_DECREF(lock);
    Py_DECREF(queue);
    return result;
}

static PyObject *
BarrierCore_start_wait(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError,
                        "_start_wait(cond, place=False, future=None) takes 1 to 3 arguments");
        return NULL;
    }
    int placing = 0;
    if (nargs >= 2 && (placing = PyObject_IsTrue(args[1])) < 0) {
        return NULL;
    }
    PyObject *future = nargs == 3 && args[2] != Py_None ? args[2] : NULL;
    BarrierCore *self = (BarrierCore *)op;
    if (self->me < 0) { /* closed (a member of a group, say, closed alone) */
        raise_closed("this Barrier was closed");
        return NULL;
    }
    return start_wait(state_of(op), self, args[0], placing, future, 0);
}


static PyObject *
BarrierCore_on_readable(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_on_readable(slot, fd) takes 2 arguments");
        return NULL;
    }
    BarrierCore *self = (BarrierCore *)op;
    if (self->me < 0) { /* closed */
        Py_RETURN_NONE;
    }
    waitc_state *st = state_of(op);
    if (st == NULL || pump(st, self, NULL) < 0) {
        return NULL;
    }
    int fd = as_fd(args[1]);
    if (fd < 0) {
        return NULL;
    }
    if (fd != self->them && !self->they_aborted) {
        /* The pipe fired but did not end the wait. uvloop reports a pipe write end's
         * error only once per registration, so register afresh (now, or with this
         * loop's next waiter) rather than keep a spent registration. */
        PyObject *r = call_method1(self->waitq, st->s_reregister, args[0]);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
    }
    else if (self->they_aborted && ((Core *)self->waitq)->held &&
             check_slot(st, args[0]) != NULL && !((LoopSlot *)args[0])->live) {
        /* Called for a group's round alone (see dispatch_locked), and nothing more will
         * be read: drop it rather than be called again and again. */
        PyObject *r = call_method2(self->waitq, st->s_unregister, args[0], args[1]);
        if (r == NULL) {
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyObject *
BarrierCore_pump(PyObject *op, PyObject *cond)
{
    waitc_state *st = state_of(op);
    if (st == NULL || pump(st, (BarrierCore *)op, cond == Py_None ? NULL : cond) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
BarrierCore_wake(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    waitc_state *st = state_of(op);
    if (st == NULL || wake(st, (BarrierCore *)op) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
BarrierCore_verdict(PyObject *op, PyObject *cond)
{
    PyObject *said = verdict((BarrierCore *)op, cond);
    if (said == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_NewRef(said);
}

static PyObject *
BarrierCore_apply(PyObject *op, PyObject *arg)
{
    unsigned long long value = PyLong_AsUnsignedLongLong(arg);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    apply((BarrierCore *)op, (uint64_t)value);
    Py_RETURN_NONE;
}

static PyObject *
BarrierCore_get_pipe_end(PyObject *op, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(pipe_end((BarrierCore *)op));
}

static PyObject *
BarrierCore_get_waitq(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((BarrierCore *)op)->waitq);
}

static int
BarrierCore_set_waitq(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    waitc_state *st = state_of(op);
    if (st == NULL) {
        return -1;
    }
    if (value != NULL && !PyObject_TypeCheck(value, st->core_type)) {
        PyErr_SetString(PyExc_TypeError, "_waitq must be a WaitQueue");
        return -1;
    }
    return set_object(&((BarrierCore *)op)->waitq, value, "_waitq");
}

static PyMethodDef BarrierCore_methods[] = {
    {"_on_readable", FASTCALL(BarrierCore_on_readable), METH_FASTCALL,
     "_on_readable(slot, fd) -> None\n--\n\n"
     "One of the watched fds fired in `slot`'s loop, where someone waits (lock held):\n"
     "run the read loop; register afresh after a pipe event that did not end the wait."},
    {"_place", BarrierCore_place, METH_NOARGS,
     "_place() -> bool\n--\n\n"
     "place() with the lock held: write 1 to this side's eventfd and count it. False\n"
     "without writing if either side aborted, and False if the write failed (the\n"
     "barrier is then aborted on both sides: see _broken)."},
    {"_broken", BarrierCore_broken, METH_NOARGS,
     "_broken() -> None\n--\n\n"
     "A write to the peer failed: it can no longer be told anything, so both sides\n"
     "count as aborted (systemd makes this fatal); waiters are released (lock held)."},
    {"_start_wait", FASTCALL(BarrierCore_start_wait), METH_FASTCALL,
     "_start_wait(cond, place=False, future=None) -> bool | Waiter\n--\n\n"
     "The first half of a wait for `cond`, under the lock: its result at once if no\n"
     "wait is needed (`_verdict`), or a waiter parked on the queue (`park`). With\n"
     "`place`, place() first in the same step (place_and_sync): False if that placed\n"
     "nothing (either side aborted, or the write failed). A parked waiter's future is\n"
     "`future` if given (a BarrierGroup's Share), else a new one of the running loop.\n"
     "ClosedResourceError once closed."},
    {"_pump", BarrierCore_pump, METH_O,
     "_pump(cond) -> None\n--\n\n"
     "systemd's read loop, run once for everyone waiting now (lock held): read while\n"
     "someone waits (a waiter of a loop, or this thread for `cond` unless it is None)\n"
     "and the peer has not aborted; apply each value, then release whoever it frees."},
    {"_wake", BarrierCore_wake, METH_NOARGS,
     "_wake() -> None\n--\n\n"
     "Release every waiter whose condition holds, with its result as of now, and wake\n"
     "the blocking twins of other threads (lock held)."},
    {"_verdict", BarrierCore_verdict, METH_O,
     "_verdict(cond) -> bool | None\n--\n\n"
     "What a wait for `cond` returns now, or None while it must wait: `cond` is a\n"
     "threshold (True once barriers <= it, False once either side aborted) or\n"
     "UNTIL_ABORTED (once the peer aborted: True unless this side aborted too)."},
    {"_apply", BarrierCore_apply, METH_O,
     "_apply(value) -> None\n--\n\nApply a value read from the peer's eventfd."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef BarrierCore_members[] = {
    {"_barriers", Py_T_LONGLONG, offsetof(BarrierCore, barriers), 0,
     "Barriers placed here minus the peer's read here."},
    {"_me", Py_T_INT, offsetof(BarrierCore, me), 0, "The eventfd this side writes."},
    {"_them", Py_T_INT, offsetof(BarrierCore, them), 0, "The eventfd this side reads."},
    {"_pipe_r", Py_T_INT, offsetof(BarrierCore, pipe_r), 0, "The pipe's read end, or -1."},
    {"_pipe_w", Py_T_INT, offsetof(BarrierCore, pipe_w), 0, "The pipe's write end, or -1."},
    {"_i_aborted", Py_T_BOOL, offsetof(BarrierCore, i_aborted), 0, "This side aborted."},
    {"_they_aborted", Py_T_BOOL, offsetof(BarrierCore, they_aborted), 0,
     "The peer aborted or exited."},
    {"_peer_exited", Py_T_BOOL, offsetof(BarrierCore, peer_exited), 0,
     "The peer exited without aborting."},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef BarrierCore_getset[] = {
    {"_pipe_end", BarrierCore_get_pipe_end, NULL,
     "The pipe end this side holds once its role is set.", NULL},
    {"_waitq", BarrierCore_get_waitq, BarrierCore_set_waitq, "The wait queue.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot BarrierCore_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The state and the read loop of a Barrier side.")},
    {Py_tp_new, FUNC(BarrierCore_new)},
    {Py_tp_dealloc, FUNC(BarrierCore_dealloc)},
    {Py_tp_traverse, FUNC(BarrierCore_traverse)},
    {Py_tp_clear, FUNC(BarrierCore_clear)},
    {Py_tp_methods, BarrierCore_methods},
    {Py_tp_members, BarrierCore_members},
    {Py_tp_getset, BarrierCore_getset},
    {0, NULL},
};

static PyType_Spec BarrierCore_spec = {
    .name = "aiosync._waitc.BarrierCore",
    .basicsize = sizeof(BarrierCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = BarrierCore_slots,
};

/* ---------------------------------------------------------------------------------
 * CompletionCore: the Completion's two eventfds (see _completion.py's top)
 * --------------------------------------------------------------------------------- */

static int
CompletionCore_traverse(PyObject *op, visitproc visit, void *arg)
{
    CompletionCore *self = (CompletionCore *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->ring_turn);
    Py_VISIT(self->ring_all);
    return 0;
}

static int
CompletionCore_clear(PyObject *op)
{
    CompletionCore *self = (CompletionCore *)op;
    Py_CLEAR(self->ring_turn);
    Py_CLEAR(self->ring_all);
    return 0;
}

static void
CompletionCore_dealloc(PyObject *op)
{
    gc_dealloc(op, CompletionCore_clear);
}

static PyObject *
CompletionCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    waitc_state *st = state_for(type);
    if (st == NULL) {
        return NULL;
    }
    CompletionCore *self = (CompletionCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->ring_turn = Py_NewRef(Py_None);
    self->ring_all = Py_NewRef(Py_None);
    self->count = self->all = -1;
    return (PyObject *)self;
}

/* (all done, a count is available) now: one zero-timeout poll, nothing read. */
static int
completion_poll(CompletionCore *self, int *all_done, int *available)
{
    *all_done = *available = 0;
    if (self->count < 0 || self->all < 0) { /* closed (by another thread) since the check */
        raise_closed("this Completion was closed");
        return -1;
    }
    struct pollfd p[2] = {
        {.fd = self->count, .events = POLLIN, .revents = 0},
        {.fd = self->all, .events = POLLIN, .revents = 0},
    };
    int n;
    do {
        n = poll(p, 2, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *available = (p[0].revents & POLLIN) != 0;
    *all_done = (p[1].revents & POLLIN) != 0;
    return 0;
}

/* Take one count (a semaphore-mode read): 1 taken, 0 none there, -1 with an error. */
static int
completion_take_count(CompletionCore *self)
{
    uint64_t value;
    return eventfd_read(self->count, &value) < 0 ? -1 : value != 0;
}

static PyObject *
CompletionCore_poll(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    int all_done, available;
    if (completion_poll((CompletionCore *)op, &all_done, &available) < 0) {
        return NULL;
    }
    return Py_BuildValue("(OO)", all_done ? Py_True : Py_False, available ? Py_True : Py_False);
}

static PyObject *
CompletionCore_try_take(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CompletionCore *self = (CompletionCore *)op;
    int all_done, available;
    if (completion_poll(self, &all_done, &available) < 0) {
        return NULL;
    }
    if (all_done) {
        Py_RETURN_TRUE;
    }
    if (!available) {
        Py_RETURN_FALSE;
    }
    int taken = completion_take_count(self);
    return taken < 0 ? NULL : PyBool_FromLong(taken);
}

static PyObject *
CompletionCore_take(PyObject *op, PyObject *ring)
{
    CompletionCore *self = (CompletionCore *)op;
    if (ring == self->ring_all) {
        Py_RETURN_TRUE;
    }
    /* Woken by `count`: most likely there, so read first. */
    int taken = completion_take_count(self);
    if (taken < 0) {
        return NULL;
    }
    if (taken) {
        Py_RETURN_TRUE;
    }
    int all_done, available;
    if (completion_poll(self, &all_done, &available) < 0) {
        return NULL;
    }
    return PyBool_FromLong(all_done);
}

static PyObject *
CompletionCore_complete(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CompletionCore *self = (CompletionCore *)op;
    if (self->count < 0) {
        raise_closed("this Completion was closed");
        return NULL;
    }
    int written = eventfd_write(self->count, 1);
    if (written == 0) {
        PyErr_SetString(PyExc_OverflowError,
                        "too many completions are pending (the eventfd is full)");
    }
    if (written <= 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
CompletionCore_on_readable(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_on_readable(slot, fd) takes 2 arguments");
        return NULL;
    }
    CompletionCore *self = (CompletionCore *)op;
    waitc_state *st = state_of(op);
    LoopSlot *slot = st == NULL ? NULL : check_slot(st, args[0]);
    if (slot == NULL) {
        return NULL;
    }
    int fd = as_fd(args[1]);
    if (fd < 0) {
        return NULL;
    }
    PyObject *ring_all = Py_NewRef(self->ring_all);
    int rc = 0;
    if (fd == self->all) { /* complete_all() is in force: everyone goes, taking nothing */
        PyObject *living = pending(st, slot);
        if (living == NULL) {
            rc = -1;
        }
        else {
            for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(living); i++) {
                Waiter *w = (Waiter *)PyList_GET_ITEM(living, i);
                if (w->state == PENDING) {
                    rc = release(st, w, ring_all);
                }
            }
            Py_DECREF(living);
        }
    }
    else {
        PyObject *ring_turn = Py_NewRef(self->ring_turn);
        rc = ring(st, slot, ring_turn);
        Py_DECREF(ring_turn);
    }
    Py_DECREF(ring_all);
    if (rc < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef CompletionCore_methods[] = {
    {"_on_readable", FASTCALL(CompletionCore_on_readable), METH_FASTCALL,
     "_on_readable(slot, fd) -> None\n--\n\n"
     "The loop's reader (lock held). Reads nothing: `count` rings the oldest waiter of\n"
     "the slot's loop for its turn; `all` releases all of them, taking nothing."},
    {"_take", CompletionCore_take, METH_O,
     "_take(ring) -> bool\n--\n\n"
     "A woken waiter's turn (lock held): take a count, or pass while all are done."},
    {"_try_take", CompletionCore_try_take, METH_NOARGS,
     "_try_take() -> bool\n--\n\n"
     "Take one count if one is there (True), pass if all are done (True), else False;\n"
     "never blocks."},
    {"_poll", CompletionCore_poll, METH_NOARGS,
     "_poll() -> tuple[bool, bool]\n--\n\n"
     "(all done, a count is available) now: one zero-timeout poll, nothing read."},
    {"_complete", CompletionCore_complete, METH_NOARGS,
     "_complete() -> None\n--\n\n"
     "complete(): write 1 to `count` (OverflowError if the eventfd is full,\n"
     "ClosedResourceError once closed); takes no lock."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef CompletionCore_members[] = {
    {"_count", Py_T_INT, offsetof(CompletionCore, count), 0,
     "The semaphore-mode eventfd of the counts, or -1."},
    {"_all", Py_T_INT, offsetof(CompletionCore, all), 0,
     "The eventfd whose value says all are done, or -1."},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
CompletionCore_get_ring_turn(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((CompletionCore *)op)->ring_turn);
}

static int
CompletionCore_set_ring_turn(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return set_object(&((CompletionCore *)op)->ring_turn, value, "_ring_turn");
}

static PyObject *
CompletionCore_get_ring_all(PyObject *op, void *Py_UNUSED(closure))
{
    return get_object(&((CompletionCore *)op)->ring_all);
}

static int
CompletionCore_set_ring_all(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    return set_object(&((CompletionCore *)op)->ring_all, value, "_ring_all");
}

static PyGetSetDef CompletionCore_getset[] = {
    {"_ring_turn", CompletionCore_get_ring_turn, CompletionCore_set_ring_turn,
     "What a waiter woken by `count` is handed.", NULL},
    {"_ring_all", CompletionCore_get_ring_all, CompletionCore_set_ring_all,
     "What every waiter is handed while `all` is set.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot CompletionCore_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The eventfds, the takes and the reader of a Completion.")},
    {Py_tp_new, FUNC(CompletionCore_new)},
    {Py_tp_dealloc, FUNC(CompletionCore_dealloc)},
    {Py_tp_traverse, FUNC(CompletionCore_traverse)},
    {Py_tp_clear, FUNC(CompletionCore_clear)},
    {Py_tp_methods, CompletionCore_methods},
    {Py_tp_members, CompletionCore_members},
    {Py_tp_getset, CompletionCore_getset},
    {0, NULL},
};

static PyType_Spec CompletionCore_spec = {
    .name = "aiosync._waitc.CompletionCore",
    .basicsize = sizeof(CompletionCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = CompletionCore_slots,
};

/* ---------------------------------------------------------------------------------
 * Gather and Share: one future for a BarrierGroup's N waiters
 *
 * A BarrierGroup parks one waiter per member; each waiter's "future" is a Share of one
 * Gather, and the group's task awaits the Gather's single asyncio future, set when
 * the last share is resolved (or the first, or the first to fail). To the wait core a
 * Share is a future: done() is true once it is resolved, or once the Gather's future
 * was cancelled (the group's task stopped waiting: every share is then dead, as a
 * cancelled waiter's future is).
 * --------------------------------------------------------------------------------- */

static int
Gather_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((Gather *)op)->future);
    return 0;
}

static int
Gather_clear(PyObject *op)
{
    Py_CLEAR(((Gather *)op)->future);
    return 0;
}

static void
Gather_dealloc(PyObject *op)
{
    gc_dealloc(op, Gather_clear);
}

static PyObject *
new_gather(waitc_state *st, PyTypeObject *type, int first)
{
    Gather *self = PyObject_GC_New(Gather, type);
    if (self == NULL) {
        return NULL;
    }
    self->st = st;
    self->future = Py_NewRef(Py_None);
    self->pending = 0;
    self->first = (char)first;
    self->fired = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
Gather_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int first = 0;
    if (PyTuple_GET_SIZE(args) > 1 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Gather(first=False, /) takes at most 1 argument");
        return NULL;
    }
    if (PyTuple_GET_SIZE(args) == 1 && (first = PyObject_IsTrue(PyTuple_GET_ITEM(args, 0))) < 0) {
        return NULL;
    }
    waitc_state *st = state_for(type);
    return st == NULL ? NULL : new_gather(st, type, first);
}

/* Wake the Gather's task: set its future, or, if it has none pending (not armed
 * yet, or woken already and not armed again), make the next arm() done at once. 0, or
 * -1 with an error set (RuntimeError: its loop is closed). */
static int
gather_wake(waitc_state *st, Gather *g)
{
    if (g->future == Py_None) {
        g->fired = 1;
        return 0;
    }
    PyObject *future = Py_NewRef(g->future);
    int done = future_done(st, future);
    int rc = done;
    if (done > 0) {
        g->fired = 1;
    }
    else if (done == 0) {
        PyObject *args[] = {future, Py_None};
        PyObject *r = call_known(st->future_type, st->future_set_result, st->s_set_result,
                                 args, 2);
        Py_XDECREF(r);
        rc = r == NULL ? -1 : 0;
    }
    Py_DECREF(future);
    return rc < 0 ? -1 : 0;
}

static PyObject *
Gather_share(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Gather *g = (Gather *)op;
    waitc_state *st = g->st;
    Share *share = PyObject_GC_New(Share, st->share_type);
    if (share == NULL) {
        return NULL;
    }
    share->st = st;
    share->gather = Py_NewRef(op);
    share->result = NULL;
    share->failed = 0;
    g->pending += 1;
    PyObject_GC_Track(share);
    return (PyObject *)share;
}

/* arm() in `loop` (the running one). */
static PyObject *
gather_arm(Gather *g, PyObject *loop)
{
    waitc_state *st = g->st;
    PyObject *future = call_method0(loop, st->s_create_future);
    if (future == NULL) {
        return NULL;
    }
    Py_SETREF(g->future, Py_NewRef(future));
    if (g->fired) { /* due already (a share resolved before this arm): done at once */
        g->fired = 0;
        if (gather_wake(st, g) < 0) {
            Py_DECREF(future);
            return NULL;
        }
    }
    return future;
}

static PyObject *
Gather_arm(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    waitc_state *st = ((Gather *)op)->st;
    PyObject *loop = PyObject_CallNoArgs(st->get_running_loop);
    if (loop == NULL) {
        return NULL;
    }
    PyObject *future = gather_arm((Gather *)op, loop);
    Py_DECREF(loop);
    return future;
}

static PyMethodDef Gather_methods[] = {
    {"share", Gather_share, METH_NOARGS,
     "share() -> Share\n--\n\nA new share: the future of one member's waiter."},
    {"arm", Gather_arm, METH_NOARGS,
     "arm() -> asyncio.Future[None]\n--\n\n"
     "A new future of the running loop for the group's task to await: set when the\n"
     "last share is resolved (or the first, with first=True), or one fails; done at\n"
     "once if that happened since the last arm() (or before the first)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Gather_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("Gather(first=False, /)\n--\n\n"
                                  "One future for the waiters a BarrierGroup parks.")},
    {Py_tp_new, FUNC(Gather_new)},
    {Py_tp_dealloc, FUNC(Gather_dealloc)},
    {Py_tp_traverse, FUNC(Gather_traverse)},
    {Py_tp_clear, FUNC(Gather_clear)},
    {Py_tp_methods, Gather_methods},
    {0, NULL},
};

static PyType_Spec Gather_spec = {
    .name = "aiosync._waitc.Gather",
    .basicsize = sizeof(Gather),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Gather_slots,
};

static int
Share_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((Share *)op)->gather);
    Py_VISIT(((Share *)op)->result);
    return 0;
}

static int
Share_clear(PyObject *op)
{
    Py_CLEAR(((Share *)op)->gather);
    Py_CLEAR(((Share *)op)->result);
    return 0;
}

static void
Share_dealloc(PyObject *op)
{
    gc_dealloc(op, Share_clear);
}

/* done(): resolved, or its Gather's task stopped waiting (its future was cancelled). */
static int
share_done(Share *self)
{
    if (self->result != NULL) {
        return 1;
    }
    Gather *g = (Gather *)self->gather;
    if (g->future == Py_None) {
        return 0;
    }
    PyObject *r = call_method0(g->future, self->st->s_cancelled);
    if (r == NULL) {
        return -1;
    }
    int cancelled = PyObject_IsTrue(r);
    Py_DECREF(r);
    return cancelled;
}

static PyObject *
Share_done(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    int done = share_done((Share *)op);
    return done < 0 ? NULL : PyBool_FromLong(done);
}

static PyObject *
share_resolve(Share *self, PyObject *value, int failed)
{
    int done = share_done(self);
    if (done != 0) {
        if (done > 0) {
            PyErr_SetString(PyExc_RuntimeError, "this share was resolved already");
        }
        return NULL;
    }
    Gather *g = (Gather *)self->gather;
    self->result = Py_NewRef(value);
    self->failed = (char)failed;
    g->pending -= 1;
    if ((failed || g->first || g->pending == 0) && gather_wake(self->st, g) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Share_set_result(PyObject *op, PyObject *value)
{
    return share_resolve((Share *)op, value, 0);
}

static PyObject *
Share_set_exception(PyObject *op, PyObject *exc)
{
    return share_resolve((Share *)op, exc, 1);
}

static PyObject *
Share_result(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Share *self = (Share *)op;
    if (self->result == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this share is not resolved yet");
        return NULL;
    }
    if (self->failed) {
        PyObject *exc = self->result;
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        return NULL;
    }
    return Py_NewRef(self->result);
}

static PyMethodDef Share_methods[] = {
    {"done", Share_done, METH_NOARGS,
     "done() -> bool\n--\n\nResolved, or its group's task stopped waiting."},
    {"set_result", Share_set_result, METH_O,
     "set_result(result) -> None\n--\n\nResolve it (its waiter was released)."},
    {"set_exception", Share_set_exception, METH_O,
     "set_exception(exc) -> None\n--\n\nFail it (its waiter was failed)."},
    {"result", Share_result, METH_NOARGS,
     "result() -> Any\n--\n\nWhat it was resolved with (or raise how it failed)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Share_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("The future of one waiter of a Gather.")},
    {Py_tp_dealloc, FUNC(Share_dealloc)},
    {Py_tp_traverse, FUNC(Share_traverse)},
    {Py_tp_clear, FUNC(Share_clear)},
    {Py_tp_methods, Share_methods},
    {0, NULL},
};

static PyType_Spec Share_spec = {
    .name = "aiosync._waitc.Share",
    .basicsize = sizeof(Share),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Share_slots,
};

/* ---------------------------------------------------------------------------------
 * Round: a BarrierGroup's sync, from its start to every member's outcome
 *
 * `await sync_round(group, members, place, abort_on_failure)` is the group's sync
 * (design §11) in one C object, so that a round makes no Python call on its way when
 * all goes well: per member the first half of its own sync (start_wait, placing first
 * with `place`); a member that needs no wait is sorted at once; the others' waiters,
 * whose futures are Shares of one Gather, are awaited together through the Gather's
 * future, and each member is sorted when the task resumes after its release (before
 * anything else of this task can change it). With abort_on_failure, a failed member
 * aborts the group (group.abort()): after the start, and at each failure released.
 * On the way out, whatever the reason, every waiter still parked is abandoned
 * (queue.abandon, as a cancelled Barrier.sync() abandons its own) and every hold is
 * given back.
 *
 * From its start to its end the round holds every member (Core.held): what a child
 * writes meanwhile is read and counted, though no waiter of that member is left (see
 * pump). Without it, a child one round ahead fires the parent's reader while nobody
 * waits on that member, its registration is dropped, and the next round adds it back.
 * --------------------------------------------------------------------------------- */

/* What became of one child: the values of _group.Outcome, which takes them from here. */
#define SYNCED 0
#define ABORTED 1
#define DIED 2
#define STOPPED 3
#define UNREPORTED (-1)

typedef struct {
    PyObject_HEAD
    waitc_state *st;
    PyObject *group;       /* its abort() is called with abort_on_failure */
    PyObject *members;     /* tuple of BarrierCore */
    PyObject *gather;      /* the Gather, once started */
    PyObject *inner;       /* the armed future's __await__() iterator, or NULL */
    PyObject **waiters;    /* per member: its parked Waiter, or NULL */
    signed char *outcomes; /* per member: an outcome, or UNREPORTED */
    Py_ssize_t n;
    Py_ssize_t parked; /* waiters parked and not sorted yet */
    Py_ssize_t held;   /* members 0 .. held - 1 are held */
    unsigned long born; /* st->forks when it took its holds */
    char place;
    char first; /* abort_on_failure */
    char started;
    char over;
} Round;

/* A member's outcome, from the result of its sync and its state now. */
static int
outcome_of(BarrierCore *b, int synced)
{
    if (synced) {
        return SYNCED;
    }
    if (b->peer_exited) {
        return DIED;
    }
    if (b->they_aborted) {
        return ABORTED;
    }
    if (b->barriers <= 0) {
        return SYNCED; /* it had caught up: only this side's abort said False */
    }
    return STOPPED;
}

static inline int
failed_outcome(int outcome)
{
    return outcome == ABORTED || outcome == DIED;
}

static inline BarrierCore *
round_member(Round *self, Py_ssize_t i)
{
    return (BarrierCore *)PyTuple_GET_ITEM(self->members, i);
}

/* Every member's first half of the sync: 0, or -1 with an error set. */
static int
round_start(Round *self)
{
    waitc_state *st = self->st;
    for (Py_ssize_t i = 0; i < self->n; i++) { /* before anything is placed anywhere */
        if (round_member(self, i)->me < 0) {
            raise_closed("this Barrier was closed");
            return -1;
        }
    }
    self->gather = new_gather(st, st->gather_type, self->first);
    if (self->gather == NULL) {
        return -1;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) {
        return -1;
    }
    PyObject *share = NULL; /* kept for the next member while no waiter took it */
    int rc = 0, failed = 0;
    self->born = st->forks; /* the holds below are this process's */
    for (Py_ssize_t i = 0; i < self->n; i++) {
        if (share == NULL && (share = Gather_share(self->gather, NULL)) == NULL) {
            rc = -1;
            break;
        }
        BarrierCore *b = round_member(self, i);
        PyObject *started = start_wait(st, b, zero, self->place, share, 1);
        if (started == NULL) {
            rc = -1;
            break;
        }
        self->held = i + 1;
        if (PyBool_Check(started)) { /* nothing to wait for */
            int outcome = outcome_of(b, started == Py_True);
            self->outcomes[i] = (signed char)outcome;
            failed |= failed_outcome(outcome);
            Py_DECREF(started);
        }
        else {
            self->waiters[i] = started;
            self->parked += 1;
            Py_CLEAR(share);
        }
    }
    if (share != NULL) { /* made, never handed out */
        ((Gather *)self->gather)->pending -= 1;
        Py_DECREF(share);
    }
    Py_DECREF(zero);
    if (rc == 0 && failed && self->first) {
        rc = do_method0(self->group, st->s_abort); /* releases every parked sync */
    }
    return rc;
}

/* Sort every member whose waiter was released: 0, or -1 with an error set (a member
 * was closed meanwhile, or group.abort() failed). */
static int
round_collect(Round *self)
{
    for (Py_ssize_t i = 0; i < self->n; i++) {
        Waiter *w = (Waiter *)self->waiters[i];
        if (w == NULL) {
            continue;
        }
        Share *share = (Share *)w->future;
        if (share->result == NULL) {
            continue;
        }
        if (share->failed) { /* ClosedResourceError */
            PyObject *exc = share->result;
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            return -1;
        }
        int outcome = outcome_of(round_member(self, i), share->result == Py_True);
        self->outcomes[i] = (signed char)outcome;
        Py_CLEAR(self->waiters[i]);
        self->parked -= 1;
        if (self->first && failed_outcome(outcome) &&
            do_method0(self->group, self->st->s_abort) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Give member i's hold back: 0, or -1 with an error set. */
static int
round_unhold(Round *self, Py_ssize_t i)
{
    if (self->born != self->st->forks) {
        return 0; /* the parent's holds: a forked child's counts start at zero */
    }
    Core *queue = waitq_of(round_member(self, i), self->st);
    if (queue == NULL) {
        return -1;
    }
    PyObject *lock = Py_NewRef(queue->lock);
    int rc = lock_acquire(self->st, lock);
    if (rc == 0) {
        queue->held -= 1;
        rc = lock_release(self->st, lock);
    }
    Py_DECREF(lock);
    return rc;
}

/* The way out, whatever the reason: abandon every waiter still parked, give every
 * hold back. An exception already set is kept (a later one is reported unraisable);
 * 0, or -1 with an error set by this cleanup. Runs once. */
static int
round_end(Round *self)
{
    if (self->over) {
        return 0;
    }
    self->over = 1;
    saved_error saved;
    save_error(&saved);
    int rc = 0;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        PyObject *w = self->waiters[i];
        if (w == NULL) {
            continue;
        }
        self->waiters[i] = NULL;
        PyObject *queue = round_member(self, i)->waitq;
        PyObject *r = call_method1(queue, self->st->s_abandon, w);
        Py_DECREF(w);
        if (r == NULL) {
            if (rc < 0 || saved_some(&saved)) {
                PyErr_WriteUnraisable(queue);
            }
            rc = -1;
        }
        Py_XDECREF(r);
    }
    self->parked = 0;
    for (Py_ssize_t i = 0; i < self->held; i++) {
        if (round_unhold(self, i) < 0) {
            if (rc < 0 || saved_some(&saved)) {
                PyErr_WriteUnraisable(self->members);
            }
            rc = -1;
        }
    }
    self->held = 0;
    if (saved_some(&saved)) {
        restore_error(&saved);
        return -1;
    }
    return rc;
}

/* The round is over, every member sorted: None if every child synced, else the
 * outcome of each (None: unreported), or NULL with an error set. */
static PyObject *
round_return(Round *self)
{
    if (round_end(self) < 0) {
        return NULL;
    }
    int all_synced = 1;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        all_synced &= self->outcomes[i] == SYNCED;
    }
    if (all_synced) {
        return Py_NewRef(Py_None);
    }
    PyObject *outcomes = PyTuple_New(self->n);
    if (outcomes == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->n; i++) {
        int outcome = self->outcomes[i];
        PyObject *item = outcome == UNREPORTED ? Py_NewRef(Py_None) : PyLong_FromLong(outcome);
        if (item == NULL) {
            Py_DECREF(outcomes);
            return NULL;
        }
        PyTuple_SET_ITEM(outcomes, i, item);
    }
    return outcomes;
}

/* The loop the round's waiters were parked in (the running one). */
static PyObject *
round_loop(Round *self)
{
    for (Py_ssize_t i = 0; i < self->n; i++) {
        if (self->waiters[i] != NULL) {
            return slot_of((Waiter *)self->waiters[i])->loop;
        }
    }
    return NULL; /* not reached: called while some waiter is parked */
}

/* On from where the round is, sending `value` into the future awaited now (am_send:
 * the round's result is returned, not raised as StopIteration). */
static PySendResult
round_send(Round *self, PyObject *value, PyObject **result)
{
    *result = NULL;
    if (self->over) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse an awaited round");
        return PYGEN_ERROR;
    }
    if (!self->started) {
        self->started = 1;
        if (round_start(self) < 0) {
            goto fail;
        }
    }
    for (;;) {
        if (self->inner == NULL) {
            if (!self->parked) {
                *result = round_return(self);
                return *result == NULL ? PYGEN_ERROR : PYGEN_RETURN;
            }
            /* Done at once if the shares it waits for were released already (by our
             * own abort, say). */
            PyObject *future = gather_arm((Gather *)self->gather, round_loop(self));
            if (future == NULL) {
                goto fail;
            }
            self->inner = Py_TYPE(future)->tp_as_async->am_await(future);
            Py_DECREF(future);
            if (self->inner == NULL) {
                goto fail;
            }
            value = Py_None;
        }
        PyObject *sent_back = NULL;
        PySendResult sent = PyIter_Send(self->inner, value, &sent_back);
        if (sent == PYGEN_NEXT) {
            *result = sent_back;
            return PYGEN_NEXT;
        }
        if (sent == PYGEN_ERROR) {
            goto fail;
        }
        Py_DECREF(sent_back);
        Py_CLEAR(self->inner);
        if (round_collect(self) < 0) {
            goto fail;
        }
    }
fail:
    Py_CLEAR(self->inner);
    round_end(self);
    return PYGEN_ERROR;
}

static PySendResult
Round_am_send(PyObject *op, PyObject *value, PyObject **result)
{
    return round_send((Round *)op, value, result);
}

/* round_send() for send() and __next__(): the result raised as StopIteration. */
static PyObject *
round_step(Round *self, PyObject *value)
{
    PyObject *result;
    PySendResult sent = round_send(self, value, &result);
    if (sent == PYGEN_RETURN) {
        if (result == Py_None) {
            PyErr_SetNone(PyExc_StopIteration);
        }
        else {
            PyObject *stop = PyObject_CallOneArg(PyExc_StopIteration, result);
            if (stop != NULL) {
                PyErr_SetObject(PyExc_StopIteration, stop);
                Py_DECREF(stop);
            }
        }
        Py_DECREF(result);
        return NULL;
    }
    return result; /* PYGEN_NEXT: what was yielded; PYGEN_ERROR: NULL */
}

static PyObject *
Round_send(PyObject *op, PyObject *value)
{
    return round_step((Round *)op, value);
}

static PyObject *
Round_iternext(PyObject *op)
{
    return round_step((Round *)op, Py_None);
}

static PyObject *
Round_throw(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    Round *self = (Round *)op;
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw() takes 1 to 3 arguments");
        return NULL;
    }
    if (self->inner == NULL) { /* not started, or over */
        raise_thrown(args, nargs);
        round_end(self);
        return NULL;
    }
    PyObject *result = throw_into(self->st, self->inner, args, nargs);
    if (result != NULL) {
        return result;
    }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) { /* the future was done meanwhile */
        PyErr_Clear();
        Py_CLEAR(self->inner);
        if (round_collect(self) < 0) {
            round_end(self);
            return NULL;
        }
        return round_step(self, Py_None);
    }
    Py_CLEAR(self->inner);
    round_end(self);
    return NULL;
}

static PyObject *
Round_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Round *self = (Round *)op;
    if (self->inner != NULL && do_method0(self->inner, self->st->s_close) < 0) {
        PyErr_Clear();
    }
    Py_CLEAR(self->inner);
    if (round_end(self) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Round_await(PyObject *op)
{
    return Py_NewRef(op);
}

/* Dropped unfinished (its task was garbage-collected): leave nothing parked or held. */
static void
Round_finalize(PyObject *op)
{
    Round *self = (Round *)op;
    if (self->over || !self->started || self->waiters == NULL) {
        return;
    }
    saved_error saved;
    save_error(&saved);
    Py_CLEAR(self->inner);
    if (round_end(self) < 0) {
        PyErr_WriteUnraisable(op);
    }
    restore_error(&saved);
}

static int
Round_traverse(PyObject *op, visitproc visit, void *arg)
{
    Round *self = (Round *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->group);
    Py_VISIT(self->members);
    Py_VISIT(self->gather);
    Py_VISIT(self->inner);
    for (Py_ssize_t i = 0; self->waiters != NULL && i < self->n; i++) {
        Py_VISIT(self->waiters[i]);
    }
    return 0;
}

static int
Round_clear(PyObject *op)
{
    Round *self = (Round *)op;
    self->over = 1;
    Py_CLEAR(self->group);
    Py_CLEAR(self->members);
    Py_CLEAR(self->gather);
    Py_CLEAR(self->inner);
    for (Py_ssize_t i = 0; self->waiters != NULL && i < self->n; i++) {
        Py_CLEAR(self->waiters[i]);
    }
    return 0;
}

static void
Round_dealloc(PyObject *op)
{
    if (PyObject_CallFinalizerFromDealloc(op) < 0) {
        return; /* resurrected */
    }
    Round *self = (Round *)op;
    PyObject **waiters = self->waiters;
    signed char *outcomes = self->outcomes;
    gc_dealloc(op, Round_clear);
    PyMem_Free(waiters);
    PyMem_Free(outcomes);
}

static PyMethodDef Round_methods[] = {
    {"send", Round_send, METH_O, "send(value) -> Any\n--\n\nAs a coroutine's send()."},
    {"throw", FASTCALL(Round_throw), METH_FASTCALL,
     "throw(exc) -> Any\n--\n\nAs a coroutine's throw(): the round is abandoned."},
    {"close", Round_close, METH_NOARGS,
     "close() -> None\n--\n\nAs a coroutine's close(): the round is abandoned."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Round_slots[] = {
    {Py_tp_doc, (void *)PyDoc_STR("What `await sync_round(...)` awaits: a BarrierGroup's\n"
                                  "sync, from its start to every member's outcome.")},
    {Py_am_await, FUNC(Round_await)},
    {Py_am_send, FUNC(Round_am_send)},
    {Py_tp_iter, FUNC(Round_await)},
    {Py_tp_iternext, FUNC(Round_iternext)},
    {Py_tp_finalize, FUNC(Round_finalize)},
    {Py_tp_dealloc, FUNC(Round_dealloc)},
    {Py_tp_traverse, FUNC(Round_traverse)},
    {Py_tp_clear, FUNC(Round_clear)},
    {Py_tp_methods, Round_methods},
    {0, NULL},
};

static PyType_Spec Round_spec = {
    .name = "aiosync._waitc.Round",
    .basicsize = sizeof(Round),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = Round_slots,
};

static PyObject *
waitc_sync_round(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "sync_round(group, members, place, abort_on_failure) takes 4 arguments");
        return NULL;
    }
    waitc_state *st = get_state(module);
    PyObject *members = args[1];
    if (!PyTuple_CheckExact(members) || PyTuple_GET_SIZE(members) == 0) {
        PyErr_SetString(PyExc_TypeError, "sync_round: members must be a non-empty tuple");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(members);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(members, i), st->barrier_type)) {
            PyErr_SetString(PyExc_TypeError, "sync_round: every member must be a Barrier");
            return NULL;
        }
    }
    int place = PyObject_IsTrue(args[2]);
    int first = place < 0 ? -1 : PyObject_IsTrue(args[3]);
    if (first < 0) {
        return NULL;
    }
    PyObject **waiters = PyMem_Calloc((size_t)n, sizeof(PyObject *));
    signed char *outcomes = PyMem_Malloc((size_t)n);
    if (waiters == NULL || outcomes == NULL) {
        PyMem_Free(waiters);
        PyMem_Free(outcomes);
        return PyErr_NoMemory();
    }
    memset(outcomes, UNREPORTED, (size_t)n);
    Round *self = PyObject_GC_New(Round, st->round_type);
    if (self == NULL) {
        PyMem_Free(waiters);
        PyMem_Free(outcomes);
        return NULL;
    }
    self->st = st;
    self->group = Py_NewRef(args[0]);
    self->members = Py_NewRef(members);
    self->gather = NULL;
    self->inner = NULL;
    self->waiters = waiters;
    self->outcomes = outcomes;
    self->n = n;
    self->parked = self->held = 0;
    self->born = st->forks;
    self->place = (char)place;
    self->first = (char)first;
    self->started = self->over = 0;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* ---------------------------------------------------------------------------------
 * The module
 * --------------------------------------------------------------------------------- */

/* _forked(): called in a forked child, before its queues forget the parent's state. */
static PyObject *
waitc_forked(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    get_state(module)->forks += 1;
    Py_RETURN_NONE;
}

static PyMethodDef waitc_functions[] = {
    {"_forked", waitc_forked, METH_NOARGS,
     "_forked() -> None\n--\n\n"
     "In a forked child: every wait and group hold taken so far is the parent's (a child\n"
     "that ends one gives nothing back to its queue's counts)."},
    {"dispatch", FASTCALL(waitc_dispatch), METH_FASTCALL,
     "dispatch(queue_ref, slot, fd) -> None\n--\n\n"
     "The reader callback of one (loop, fd) registration: if the primitive is alive and\n"
     "someone of the slot's loop waits, call its _on_readable(slot, fd) with the lock\n"
     "held; else drop the registration (see _waitq's top)."},
    {"sync_round", FASTCALL(waitc_sync_round), METH_FASTCALL,
     "sync_round(group, members, place, abort_on_failure) -> Awaitable\n--\n\n"
     "A BarrierGroup's sync (await it): None once every child synced, else each\n"
     "member's outcome (an int, or None: not reported). See the Round section."},
    {"_set_result", FASTCALL(waitc_set_result), METH_FASTCALL,
     "_set_result(future, result) -> None\n--\n\n"
     "future.set_result(result) unless it is done (in another thread's loop)."},
    {"_set_exception", FASTCALL(waitc_set_exception), METH_FASTCALL,
     "_set_exception(future, exc) -> None\n--\n\n"
     "future.set_exception(exc) unless it is done (in another thread's loop)."},
    {NULL, NULL, 0, NULL},
};

static int
intern(PyObject **field, const char *name)
{
    *field = PyUnicode_InternFromString(name);
    return *field == NULL ? -1 : 0;
}

static PyObject *
import_attr(const char *module_name, const char *name)
{
    PyObject *module = PyImport_ImportModule(module_name);
    if (module == NULL) {
        return NULL;
    }
    PyObject *attr = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return attr;
}

static PyTypeObject *
add_type(PyObject *module, PyType_Spec *spec)
{
    PyTypeObject *type = (PyTypeObject *)PyType_FromModuleAndSpec(module, spec, NULL);
    if (type == NULL || PyModule_AddType(module, type) < 0) {
        Py_XDECREF(type);
        return NULL;
    }
    return type;
}

static int
waitc_exec(PyObject *module)
{
    waitc_state *st = get_state(module);
    if ((st->waiter_type = add_type(module, &Waiter_spec)) == NULL ||
        (st->slot_type = add_type(module, &LoopSlot_spec)) == NULL ||
        (st->core_type = add_type(module, &Core_spec)) == NULL ||
        (st->barrier_type = add_type(module, &BarrierCore_spec)) == NULL ||
        (st->completion_type = add_type(module, &CompletionCore_spec)) == NULL ||
        (st->wait_type = add_type(module, &Wait_spec)) == NULL ||
        (st->rlock_type = add_type(module, &RLock_spec)) == NULL ||
        (st->gather_type = add_type(module, &Gather_spec)) == NULL ||
        (st->share_type = add_type(module, &Share_spec)) == NULL ||
        (st->round_type = add_type(module, &Round_spec)) == NULL) {
        return -1;
    }
    if ((st->get_running_loop = import_attr("asyncio", "get_running_loop")) == NULL ||
        (st->deque = import_attr("collections", "deque")) == NULL ||
        (st->future_type = import_attr("asyncio", "Future")) == NULL ||
        (st->future_done = PyObject_GetAttrString(st->future_type, "done")) == NULL ||
        (st->future_set_result = PyObject_GetAttrString(st->future_type, "set_result")) ==
            NULL ||
        (st->future_set_exception = PyObject_GetAttrString(st->future_type, "set_exception")) ==
            NULL ||
        (st->deque_append = PyObject_GetAttrString(st->deque, "append")) == NULL ||
        (st->deque_popleft = PyObject_GetAttrString(st->deque, "popleft")) == NULL ||
        (st->set_result_soon = PyObject_GetAttrString(module, "_set_result")) == NULL ||
        (st->set_exception_soon = PyObject_GetAttrString(module, "_set_exception")) == NULL) {
        return -1;
    }
    if (intern(&st->s_acquire, "acquire") < 0 || intern(&st->s_release, "release") < 0 ||
        intern(&st->s_append, "append") < 0 || intern(&st->s_appendleft, "appendleft") < 0 ||
        intern(&st->s_popleft, "popleft") < 0 || intern(&st->s_done, "done") < 0 ||
        intern(&st->s_set_result, "set_result") < 0 ||
        intern(&st->s_set_exception, "set_exception") < 0 ||
        intern(&st->s_create_future, "create_future") < 0 ||
        intern(&st->s_call_soon_threadsafe, "call_soon_threadsafe") < 0 ||
        intern(&st->s_remove_reader, "remove_reader") < 0 ||
        intern(&st->s_on_readable, "_on_readable") < 0 ||
        intern(&st->s_new_slot, "_new_slot") < 0 || intern(&st->s_register, "_register") < 0 ||
        intern(&st->s_unregister, "_unregister") < 0 ||
        intern(&st->s_reregister, "reregister") < 0 ||
        intern(&st->s_wake_blockers, "wake_blockers") < 0 ||
        intern(&st->s_abandon, "abandon") < 0 || intern(&st->s_throw, "throw") < 0 ||
        intern(&st->s_cancelled, "cancelled") < 0 ||
        intern(&st->s_close, "close") < 0 || intern(&st->s_abort, "abort") < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "PENDING", PENDING) < 0 ||
        PyModule_AddIntConstant(module, "RELEASED", RELEASED) < 0 ||
        PyModule_AddIntConstant(module, "ABANDONED", ABANDONED) < 0 ||
        PyModule_AddIntConstant(module, "SYNCED", SYNCED) < 0 ||
        PyModule_AddIntConstant(module, "ABORTED", ABORTED) < 0 ||
        PyModule_AddIntConstant(module, "DIED", DIED) < 0 ||
        PyModule_AddIntConstant(module, "STOPPED", STOPPED) < 0) {
        return -1;
    }
    return 0;
}

#define STATE_FIELDS(X)                                                                     \
    X(waiter_type)                                                                          \
    X(slot_type)                                                                            \
    X(core_type)                                                                            \
    X(barrier_type)                                                                         \
    X(completion_type)                                                                      \
    X(wait_type)                                                                            \
    X(rlock_type)                                                                           \
    X(gather_type)                                                                          \
    X(share_type)                                                                           \
    X(round_type)                                                                           \
    X(get_running_loop)                                                                     \
    X(deque)                                                                                \
    X(future_type)                                                                          \
    X(future_done)                                                                          \
    X(future_set_result)                                                                    \
    X(future_set_exception)                                                                 \
    X(deque_append)                                                                         \
    X(deque_popleft)                                                                        \
    X(set_result_soon)                                                                      \
    X(set_exception_soon)                                                                   \
    X(s_acquire)                                                                            \
    X(s_release)                                                                            \
    X(s_append)                                                                             \
    X(s_appendleft)                                                                         \
    X(s_popleft)                                                                            \
    X(s_done)                                                                               \
    X(s_set_result)                                                                         \
    X(s_set_exception)                                                                      \
    X(s_create_future)                                                                      \
    X(s_call_soon_threadsafe)                                                               \
    X(s_remove_reader)                                                                      \
    X(s_on_readable)                                                                        \
    X(s_new_slot)                                                                           \
    X(s_register)                                                                           \
    X(s_unregister)                                                                         \
    X(s_reregister)                                                                         \
    X(s_wake_blockers)                                                                      \
    X(s_abandon)                                                                            \
    X(s_cancelled)                                                                          \
    X(s_throw)                                                                              \
    X(s_close)                                                                              \
    X(s_abort)

static int
waitc_traverse(PyObject *module, visitproc visit, void *arg)
{
    waitc_state *st = get_state(module);
#define VISIT(f) Py_VISIT(st->f);
    STATE_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
waitc_clear(PyObject *module)
{
    waitc_state *st = get_state(module);
#define CLEAR(f) Py_CLEAR(st->f);
    STATE_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
waitc_free(void *module)
{
    (void)waitc_clear((PyObject *)module);
}

static PyModuleDef_Slot waitc_slots[] = {
    {Py_mod_exec, FUNC(waitc_exec)},
#if PY_VERSION_HEX >= 0x030C0000
    /* No mutable statics, types per interpreter: safe under a per-interpreter GIL. */
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    /* Every writer holds the queue's lock (see the top of this file). */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef waitc_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiosync._waitc",
    .m_doc = "The per-event and per-wait half of aiosync's wait core.",
    .m_size = sizeof(waitc_state),
    .m_methods = waitc_functions,
    .m_slots = waitc_slots,
    .m_traverse = waitc_traverse,
    .m_clear = waitc_clear,
    .m_free = waitc_free,
};

PyMODINIT_FUNC
PyInit__waitc(void)
{
    return PyModuleDef_Init(&waitc_module);
}
