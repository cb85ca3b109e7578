/*
 * aiosync._robust: the shared words of aiosync's Lock and Semaphore.
 *
 * Every load, store and compare-and-swap of a Lock's or Semaphore's shared memory
 * happens here, with C11 <stdatomic.h>, sequentially consistent (the protocol below
 * relies on store-then-load ordering between processes, Dekker style, in two places).
 * The rules -- who may change which word from what to what -- are argued in the theory
 * of operation of aiosync/_lock.py; this file states the layout and keeps each
 * transition one atomic instruction.
 *
 * Layout (a memfd mapped shared by every process holding the object; 8-byte words):
 *
 *     +0     magic      "aiosyncR"
 *     +8     units      how many units (1 for a Lock)
 *     +16    images     last process-image id handed out (fetch-add)
 *     +24    tickets    last waiting-line ticket handed out (fetch-add)
 *     +32    dead_pid   Lock: the pid whose death left the lock inconsistent
 *     +40    next       Semaphore: where the next search for a free unit starts (a hint)
 *     +48    inline     how many processes may be in the line: never below the truth (a
 *                       joiner counts itself before it takes an entry, a leaver after it
 *                       left; a dead one's count stays), so 0 means nobody is
 *     +56               unused
 *     +64    hints[64]  (pid << 32 | fd): where process pid keeps its private description
 *     +576   line[64]   {tag, ticket}: processes with waiters, oldest ticket first served
 *     +1600  unit[n]    one word per unit (below)
 *
 * A unit word is 0 (free), a holder's tag, or BROKEN | pid (a Lock made unrecoverable):
 *
 *     bits 0-21   pid of the holder (Linux pids are below 2**22)
 *     bits 22-60  the holder's process-image id (see _lock.py)
 *     bit  61     BROKEN: no tag; bits 0-21 name the pid whose death broke the lock
 *     bit  62     INCONSISTENT: held by a taker-over of a dead holder (Lock)
 *     bit  63     HANDED: handed to that process by a release, not accepted yet
 *
 * Interpreters: multi-phase initialisation, one heap type kept in the module state, no
 * mutable statics (subinterpreters with their own GIL). Free-threaded builds: an
 * object's own fields (the buffer it holds) change only in its constructor and in
 * _release(), and every method uses them inside the object's critical section; the
 * shared memory needs no lock beyond its atomics. Hence Py_mod_gil = Py_MOD_GIL_NOT_USED.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030D0000
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "aiosync needs lock-free 64-bit atomics (they must work across processes)"
#endif

typedef _Atomic uint64_t atomic_u64;

#define MAGIC UINT64_C(0x52636e79736f6961) /* "aiosyncR" in a little-endian word */
#define LINE 64
#define HINTS 64
#define OFF_HINTS 64
#define OFF_LINE (OFF_HINTS + 8 * HINTS)
#define OFF_UNITS (OFF_LINE + 16 * LINE)
#define MAX_UNITS 65536

#define PID_MASK ((UINT64_C(1) << 22) - 1)
#define IMAGE_BITS 39
#define IMAGE_MASK ((UINT64_C(1) << IMAGE_BITS) - 1)
#define TAG_MASK ((UINT64_C(1) << 61) - 1)
#define BROKEN (UINT64_C(1) << 61)
#define INCONSISTENT (UINT64_C(1) << 62)
#define HANDED (UINT64_C(1) << 63)

/* give() results: 0 (not ours) or */
#define GIVEN 1
#define RANG 2 /* given, and the waiting processes were rung */

/* take() results besides a unit index */
#define NONE_FREE (-1)
#define IS_BROKEN (-2)

typedef struct {
    atomic_u64 magic;
    atomic_u64 units;
    atomic_u64 images;
    atomic_u64 tickets;
    atomic_u64 dead_pid;
    atomic_u64 next;
    atomic_u64 inline_;
    atomic_u64 unused;
} header_t;

typedef struct {
    atomic_u64 tag;
    atomic_u64 ticket;
} entry_t;

_Static_assert(sizeof(header_t) == 64, "header layout");
_Static_assert(sizeof(entry_t) == 16, "entry layout");

typedef struct {
    PyObject_HEAD
    Py_buffer view;    /* held from construction until _release() */
    header_t *head;    /* NULL once released */
    atomic_u64 *hints;
    entry_t *line;
    atomic_u64 *unit;
    Py_ssize_t n;
} Shared;

typedef struct {
    PyTypeObject *shared_type;
} robust_state;

#define FUNC(f) ((void *)(uintptr_t)(f))

/* ------------------------------------------------------------------------------ */

static inline uint64_t
load(atomic_u64 *p)
{
    return atomic_load(p);
}

static inline int
cas(atomic_u64 *p, uint64_t expected, uint64_t desired)
{
    return atomic_compare_exchange_strong(p, &expected, desired);
}

static PyObject *
closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "the shared memory was released");
    return NULL;
}

/* The waiting process that has waited longest, other than `me`: its tag, or 0. */
static uint64_t
oldest_waiter(Shared *self, uint64_t me)
{
    uint64_t best_tag = 0, best_ticket = UINT64_MAX;
    if (load(&self->head->inline_) == 0) {
        return 0; /* the uncontended release: nobody waits, nothing to scan */
    }
    for (int i = 0; i < LINE; i++) {
        uint64_t tag = load(&self->line[i].tag);
        if (tag == 0 || tag == me) {
            continue;
        }
        uint64_t ticket = load(&self->line[i].ticket);
        if (ticket != 0 && ticket < best_ticket) {
            best_ticket = ticket;
            best_tag = tag;
        }
    }
    return best_tag;
}

static int
in_line(Shared *self, uint64_t tag)
{
    for (int i = 0; i < LINE; i++) {
        if (load(&self->line[i].tag) == tag) {
            return 1;
        }
    }
    return 0;
}

static int
anyone_in_line(Shared *self)
{
    if (load(&self->head->inline_) == 0) {
        return 0;
    }
    for (int i = 0; i < LINE; i++) {
        if (load(&self->line[i].tag) != 0) {
            return 1;
        }
    }
    return 0;
}

/* Let go of unit `i`, which holds `word` (our tag, or our tag | HANDED when we pass a
 * hand-off on): hand it to the process that has waited longest, or free it. Returns
 * whether the waiting processes must be rung. Critical section held. */
static int
give(Shared *self, Py_ssize_t i, uint64_t me, uint64_t word)
{
    atomic_u64 *u = &self->unit[i];
    for (;;) {
        uint64_t to = oldest_waiter(self, me);
        if (!cas(u, word, to ? (to | HANDED) : 0)) {
            return 1; /* changed under us: someone else moved it on; ring anyway */
        }
        if (to == 0) {
            /* Freed. A process that joined the line after our scan saw the unit
             * still ours when it last looked (it joins, then looks): ring it. */
            return anyone_in_line(self);
        }
        /* Handed to `to`. If it left the line meanwhile (it leaves, then looks for a
         * hand-off to pass on), one of us two takes the unit back: whoever's CAS wins
         * passes it on again. */
        if (in_line(self, to)) {
            return 1;
        }
        if (!cas(u, to | HANDED, me)) {
            return 1; /* `to` took it back to pass it on, or accepted it */
        }
        word = me;
    }
}

static void
ring(int fd)
{
    char c;
    /* A read of the shared memory through our private description: every process
     * watching it with inotify gets IN_ACCESS. Nothing is consumed. */
    ssize_t r;
    do {
        r = pread(fd, &c, 1, 0);
    } while (r < 0 && errno == EINTR);
}

/* ------------------------------------------------------------------------------ */

static int
Shared_init(PyObject *op, PyObject *args, PyObject *kwds)
{
    Shared *self = (Shared *)op;
    static char *kwlist[] = {"buffer", "units", "create", NULL};
    PyObject *buffer;
    Py_ssize_t units;
    int create = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p", kwlist, &buffer, &units, &create)) {
        return -1;
    }
    if (self->head != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    if (units < 1 || units > MAX_UNITS) {
        PyErr_SetString(PyExc_ValueError, "units out of range");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        return -1;
    }
    if (self->view.len < OFF_UNITS + 8 * units || ((uintptr_t)self->view.buf & 7) != 0) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "the buffer is too small or misaligned");
        return -1;
    }
    char *base = self->view.buf;
    header_t *head = (header_t *)base;
    if (create) {
        atomic_store(&head->units, (uint64_t)units);
        atomic_store(&head->magic, MAGIC);
    }
    else if (load(&head->magic) != MAGIC || load(&head->units) != (uint64_t)units) {
        PyBuffer_Release(&self->view);
        PyErr_SetString(PyExc_ValueError, "not the shared memory of a Lock or Semaphore");
        return -1;
    }
    self->head = head;
    self->hints = (atomic_u64 *)(base + OFF_HINTS);
    self->line = (entry_t *)(base + OFF_LINE);
    self->unit = (atomic_u64 *)(base + OFF_UNITS);
    self->n = units;
    return 0;
}

#define ENTER(self)                           \
    Py_BEGIN_CRITICAL_SECTION(self);          \
    if ((self)->head == NULL) {               \
        failed = 1;                           \
    }                                         \
    else

#define LEAVE() Py_END_CRITICAL_SECTION()

static uint64_t
tag_arg(PyObject *arg, int *bad)
{
    uint64_t tag = PyLong_AsUnsignedLongLong(arg);
    *bad = (tag == (uint64_t)-1 && PyErr_Occurred()) || tag == 0 || (tag & ~TAG_MASK);
    if (*bad && !PyErr_Occurred()) {
        PyErr_SetString(PyExc_ValueError, "bad tag");
    }
    return tag;
}

/* image(pid, fd) -> a new process-image id; notes where pid keeps its description. */
static PyObject *
Shared_image(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    unsigned int pid, fd;
    if (!PyArg_ParseTuple(args, "II", &pid, &fd)) {
        return NULL;
    }
    uint64_t image = 0;
    int failed = 0;
    ENTER(self)
    {
        image = atomic_fetch_add(&self->head->images, 1) + 1;
        atomic_store(&self->hints[pid % HINTS], (uint64_t)pid << 32 | fd);
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    if (image > IMAGE_MASK) {
        PyErr_SetString(PyExc_OverflowError, "process-image ids exhausted");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(image);
}

/* hint(pid) -> the fd where pid said it keeps its description, or -1. */
static PyObject *
Shared_hint(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    unsigned long pid = PyLong_AsUnsignedLong(arg);
    if (pid == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    long fd = -1;
    int failed = 0;
    ENTER(self)
    {
        uint64_t h = load(&self->hints[pid % HINTS]);
        if ((h >> 32) == pid) {
            fd = (long)(h & 0xffffffffu);
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyLong_FromLong(fd);
}

/* take(tag) -> the index of the unit this process now holds: one handed to it, else a
 * free one; NONE_FREE; or IS_BROKEN (a Lock made unrecoverable). */
static PyObject *
Shared_take(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    int bad;
    uint64_t me = tag_arg(arg, &bad);
    if (bad) {
        return NULL;
    }
    Py_ssize_t got = NONE_FREE;
    int failed = 0;
    ENTER(self)
    {
        Py_ssize_t n = self->n;
        Py_ssize_t start = n == 1 ? 0 : (Py_ssize_t)(load(&self->head->next) % (uint64_t)n);
        for (Py_ssize_t k = 0; k < n && got == NONE_FREE; k++) {
            Py_ssize_t i = (start + k) % n;
            uint64_t w = load(&self->unit[i]);
            if (w == (me | HANDED)) {
                if (cas(&self->unit[i], w, me)) {
                    got = i; /* accepted a hand-off */
                }
            }
            else if (w & BROKEN) {
                got = IS_BROKEN;
            }
            else if (w == 0 && cas(&self->unit[i], 0, me)) {
                got = i;
                if (n > 1) {
                    atomic_store(&self->head->next, (uint64_t)(i + 1));
                }
            }
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyLong_FromSsize_t(got);
}

static int
unit_arg(Shared *self, PyObject *args, Py_ssize_t *i, uint64_t *tag, int *fd)
{
    PyObject *tag_obj;
    if (!PyArg_ParseTuple(args, "nOi", i, &tag_obj, fd)) {
        return -1;
    }
    int bad;
    *tag = tag_arg(tag_obj, &bad);
    if (bad) {
        return -1;
    }
    if (*i < 0 || *i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such unit");
        return -1;
    }
    return 0;
}

/* give(i, tag, ring_fd) -> GIVEN or RANG if unit i was ours (and is now handed on or
 * free; RANG: and the waiting processes were rung), 0 if it was not ours. Rings the waiting processes when needed. A Lock held
 * INCONSISTENT is not given this way: see break_(). (Every release: fast-call.) */
static PyObject *
Shared_give(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    Shared *self = (Shared *)op;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "give() takes (unit, tag, ring_fd)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[0]);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    int bad;
    uint64_t me = tag_arg(args[1], &bad);
    if (bad) {
        return NULL;
    }
    long fd = PyLong_AsLong(args[2]);
    if (fd == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such unit");
        return NULL;
    }
    int ours = 0, must_ring = 0, failed = 0;
    ENTER(self)
    {
        if (load(&self->unit[i]) == me) {
            ours = 1;
            must_ring = give(self, i, me, me);
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    if (must_ring) {
        ring((int)fd);
    }
    return PyLong_FromLong(ours ? (must_ring ? RANG : GIVEN) : 0);
}

/* break_(i, tag, ring_fd) -> True: unit i, held INCONSISTENT by tag, becomes BROKEN
 * (naming dead_pid) and everyone is rung; False if it was not so held. */
static PyObject *
Shared_break(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    Py_ssize_t i;
    uint64_t me;
    int fd;
    if (unit_arg(self, args, &i, &me, &fd) < 0) {
        return NULL;
    }
    int done = 0, failed = 0;
    ENTER(self)
    {
        uint64_t dead = load(&self->head->dead_pid) & PID_MASK;
        done = cas(&self->unit[i], me | INCONSISTENT, BROKEN | dead);
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    if (done) {
        ring(fd);
    }
    return PyBool_FromLong(done);
}

/* take_over(i, word, tag, inconsistent) -> True if unit i still held `word` (a dead
 * process's) and is now ours (with INCONSISTENT if asked; the dead pid noted). */
static PyObject *
Shared_take_over(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    Py_ssize_t i;
    unsigned long long word;
    PyObject *tag_obj;
    int inconsistent;
    if (!PyArg_ParseTuple(args, "nKOp", &i, &word, &tag_obj, &inconsistent)) {
        return NULL;
    }
    int bad;
    uint64_t me = tag_arg(tag_obj, &bad);
    if (bad) {
        return NULL;
    }
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such unit");
        return NULL;
    }
    int done = 0, failed = 0;
    ENTER(self)
    {
        done = cas(&self->unit[i], word, inconsistent ? (me | INCONSISTENT) : me);
        if (done && inconsistent) {
            /* Not atomic with the CAS: a taker-over killed in between leaves the older
             * dead pid here (or none), and its own death is taken over next. */
            atomic_store(&self->head->dead_pid, word & PID_MASK);
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyBool_FromLong(done);
}

/* free_dead(i, word, ring_fd) -> True if unit i still held `word` (a dead process's
 * unit, or one handed to a dead process) and is now free; rings if anyone waits. */
static PyObject *
Shared_free_dead(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    Py_ssize_t i;
    unsigned long long word;
    int fd;
    if (!PyArg_ParseTuple(args, "nKi", &i, &word, &fd)) {
        return NULL;
    }
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "no such unit");
        return NULL;
    }
    int done = 0, must_ring = 0, failed = 0;
    ENTER(self)
    {
        done = cas(&self->unit[i], word, 0);
        must_ring = done && anyone_in_line(self);
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    if (must_ring) {
        ring(fd);
    }
    return PyBool_FromLong(done);
}

/* mark_consistent(tag) -> True if the Lock was held INCONSISTENT by tag and is now
 * held consistent. */
static PyObject *
Shared_mark_consistent(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    int bad;
    uint64_t me = tag_arg(arg, &bad);
    if (bad) {
        return NULL;
    }
    int done = 0, failed = 0;
    ENTER(self)
    {
        done = cas(&self->unit[0], me | INCONSISTENT, me);
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyBool_FromLong(done);
}

/* units() -> a tuple of every unit word, now (one relaxed snapshot per word). */
static PyObject *
Shared_units(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Shared *self = (Shared *)op;
    PyObject *result = NULL;
    int failed = 0;
    ENTER(self)
    {
        result = PyTuple_New(self->n);
        if (result != NULL) {
            for (Py_ssize_t i = 0; i < self->n; i++) {
                PyObject *w = PyLong_FromUnsignedLongLong(load(&self->unit[i]));
                if (w == NULL) {
                    Py_CLEAR(result);
                    break;
                }
                PyTuple_SET_ITEM(result, i, w);
            }
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return result;
}

/* word(i) -> unit i's word now. */
static PyObject *
Shared_word(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    uint64_t w = 0;
    int failed = 0;
    ENTER(self)
    {
        if (i < 0 || i >= self->n) {
            failed = 2;
        }
        else {
            w = load(&self->unit[i]);
        }
    }
    LEAVE();
    if (failed == 2) {
        PyErr_SetString(PyExc_IndexError, "no such unit");
        return NULL;
    }
    if (failed) {
        return closed_error();
    }
    return PyLong_FromUnsignedLongLong(w);
}

/* free_units() -> how many units are free now. */
static PyObject *
Shared_free_units(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Shared *self = (Shared *)op;
    Py_ssize_t count = 0;
    int failed = 0;
    ENTER(self)
    {
        for (Py_ssize_t i = 0; i < self->n; i++) {
            count += load(&self->unit[i]) == 0;
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyLong_FromSsize_t(count);
}

/* join(tag) -> the line entry this process now has (a fresh ticket), or -1 if the
 * line is full. */
static PyObject *
Shared_join(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    int bad;
    uint64_t me = tag_arg(arg, &bad);
    if (bad) {
        return NULL;
    }
    long got = -1;
    int failed = 0;
    ENTER(self)
    {
        atomic_fetch_add(&self->head->inline_, 1); /* counted before it is there */
        for (int i = 0; i < LINE && got < 0; i++) {
            if (cas(&self->line[i].tag, 0, me)) {
                /* Ticket 0 until this store: a releaser passes over the entry meanwhile
                 * but still rings (the entry is there), and we look at the units after
                 * this anyway. */
                atomic_store(&self->line[i].ticket, atomic_fetch_add(&self->head->tickets, 1) + 1);
                got = i;
            }
        }
        /* Line full: still counted (a releaser rings while we are there); leave()
         * with entry -1 takes the count back. */
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyLong_FromLong(got);
}

/* renew(entry, tag): to the back of the line (this process was served, others of it
 * still wait). */
static PyObject *
Shared_renew(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    int entry;
    PyObject *tag_obj;
    if (!PyArg_ParseTuple(args, "iO", &entry, &tag_obj)) {
        return NULL;
    }
    int bad;
    uint64_t me = tag_arg(tag_obj, &bad);
    if (bad) {
        return NULL;
    }
    if (entry < 0 || entry >= LINE) {
        PyErr_SetString(PyExc_IndexError, "no such line entry");
        return NULL;
    }
    int failed = 0;
    ENTER(self)
    {
        if (load(&self->line[entry].tag) == me) {
            atomic_store(&self->line[entry].ticket,
                         atomic_fetch_add(&self->head->tickets, 1) + 1);
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    Py_RETURN_NONE;
}

/* leave(entry, tag, ring_fd, counted): out of the line (and out of the count, if join()
 * counted us); a unit handed to this process meanwhile is passed on (nobody here waits
 * for it any more). */
static PyObject *
Shared_leave(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    int entry, fd, counted;
    PyObject *tag_obj;
    if (!PyArg_ParseTuple(args, "iOip", &entry, &tag_obj, &fd, &counted)) {
        return NULL;
    }
    int bad;
    uint64_t me = tag_arg(tag_obj, &bad);
    if (bad) {
        return NULL;
    }
    if (entry < -1 || entry >= LINE) {
        PyErr_SetString(PyExc_IndexError, "no such line entry");
        return NULL;
    }
    int must_ring = 0, failed = 0;
    ENTER(self)
    {
        if (entry >= 0 && load(&self->line[entry].tag) == me) {
            atomic_store(&self->line[entry].ticket, 0);
            atomic_store(&self->line[entry].tag, 0);
        }
        if (counted) {
            atomic_fetch_sub(&self->head->inline_, 1); /* uncounted after it left */
        }
        /* Left, then look (a releaser hands, then looks: one of us sees the other). */
        for (Py_ssize_t i = 0; i < self->n; i++) {
            if (load(&self->unit[i]) == (me | HANDED)) {
                must_ring |= give(self, i, me, me | HANDED);
            }
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    if (must_ring) {
        ring(fd);
    }
    Py_RETURN_NONE;
}

/* wants(tag) -> whether a waiter of process `tag` would find something now: a unit
 * handed to it, a free unit, or a broken Lock (to raise). */
static PyObject *
Shared_wants(PyObject *op, PyObject *arg)
{
    Shared *self = (Shared *)op;
    int bad;
    uint64_t me = tag_arg(arg, &bad);
    if (bad) {
        return NULL;
    }
    int found = 0, failed = 0;
    ENTER(self)
    {
        for (Py_ssize_t i = 0; i < self->n && !found; i++) {
            uint64_t w = load(&self->unit[i]);
            found = w == 0 || w == (me | HANDED) || (w & BROKEN);
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyBool_FromLong(found);
}

/* line() -> ((entry, tag), ...) of every process in the line now. */
static PyObject *
Shared_line(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Shared *self = (Shared *)op;
    PyObject *result = NULL;
    int failed = 0;
    uint64_t tags[LINE];
    int entries[LINE];
    int count = 0;
    ENTER(self)
    {
        for (int i = 0; i < LINE; i++) {
            uint64_t tag = load(&self->line[i].tag);
            if (tag != 0) {
                tags[count] = tag;
                entries[count++] = i;
            }
        }
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    result = PyTuple_New(count);
    for (int k = 0; result != NULL && k < count; k++) {
        PyObject *item = Py_BuildValue("(iK)", entries[k], (unsigned long long)tags[k]);
        if (item == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyTuple_SET_ITEM(result, k, item);
    }
    return result;
}

/* drop(entry, tag) -> True if the entry still belonged to tag (a dead process) and is
 * now free. */
static PyObject *
Shared_drop(PyObject *op, PyObject *args)
{
    Shared *self = (Shared *)op;
    int entry;
    unsigned long long tag;
    if (!PyArg_ParseTuple(args, "iK", &entry, &tag)) {
        return NULL;
    }
    if (entry < 0 || entry >= LINE) {
        PyErr_SetString(PyExc_IndexError, "no such line entry");
        return NULL;
    }
    int done = 0, failed = 0;
    ENTER(self)
    {
        done = cas(&self->line[entry].tag, tag, 0);
    }
    LEAVE();
    if (failed) {
        return closed_error();
    }
    return PyBool_FromLong(done);
}

static PyObject *
Shared_release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    Shared *self = (Shared *)op;
    Py_buffer view;
    int held = 0;
    Py_BEGIN_CRITICAL_SECTION(self);
    if (self->head != NULL) {
        view = self->view;
        held = 1;
        self->head = NULL;
        self->hints = NULL;
        self->line = NULL;
        self->unit = NULL;
    }
    Py_END_CRITICAL_SECTION();
    if (held) {
        PyBuffer_Release(&view);
    }
    Py_RETURN_NONE;
}

static void
Shared_dealloc(PyObject *op)
{
    Shared *self = (Shared *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->head != NULL) {
        PyBuffer_Release(&self->view);
        self->head = NULL;
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyMethodDef Shared_methods[] = {
    {"image", Shared_image, METH_VARARGS, NULL},
    {"hint", Shared_hint, METH_O, NULL},
    {"take", Shared_take, METH_O, NULL},
    {"give", (PyCFunction)(void (*)(void))Shared_give, METH_FASTCALL, NULL},
    {"break_", Shared_break, METH_VARARGS, NULL},
    {"take_over", Shared_take_over, METH_VARARGS, NULL},
    {"free_dead", Shared_free_dead, METH_VARARGS, NULL},
    {"mark_consistent", Shared_mark_consistent, METH_O, NULL},
    {"units", Shared_units, METH_NOARGS, NULL},
    {"word", Shared_word, METH_O, NULL},
    {"free_units", Shared_free_units, METH_NOARGS, NULL},
    {"join", Shared_join, METH_O, NULL},
    {"renew", Shared_renew, METH_VARARGS, NULL},
    {"leave", Shared_leave, METH_VARARGS, NULL},
    {"line", Shared_line, METH_NOARGS, NULL},
    {"wants", Shared_wants, METH_O, NULL},
    {"drop", Shared_drop, METH_VARARGS, NULL},
    {"_release", Shared_release, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Shared_slots[] = {
    {Py_tp_init, FUNC(Shared_init)},
    {Py_tp_new, FUNC(PyType_GenericNew)},
    {Py_tp_dealloc, FUNC(Shared_dealloc)},
    {Py_tp_methods, Shared_methods},
    {Py_tp_doc, (void *)"The shared words of a Lock or Semaphore (see aiosync/_lock.py)."},
    {0, NULL},
};

static PyType_Spec Shared_spec = {
    .name = "aiosync._robust.Shared",
    .basicsize = sizeof(Shared),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Shared_slots,
};

/* ------------------------------------------------------------------------------ */

/* watch(fd) -> a new non-blocking, close-on-exec inotify fd watching the file `fd`
 * refers to for reads (a release's ring) and closes (a user's exit, exec or close). */
static PyObject *
robust_watch(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int fd;
    if (!PyArg_Parse(arg, "i", &fd)) {
        return NULL;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    int ino = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (ino < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (inotify_add_watch(ino, path, IN_ACCESS | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE) < 0) {
        int saved = errno;
        close(ino);
        errno = saved;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, path);
    }
    return PyLong_FromLong(ino);
}

/* drain(inotify_fd) -> 0: nothing; 1: only reads (rings); 3: a close or a lost event
 * among them (someone may have died: look). */
static PyObject *
robust_drain(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int fd;
    if (!PyArg_Parse(arg, "i", &fd)) {
        return NULL;
    }
    long seen = 0;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    for (;;) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                break;
            }
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            seen |= 1;
            if (ev->mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_Q_OVERFLOW | IN_IGNORED)) {
                seen |= 3;
            }
            p += sizeof(struct inotify_event) + ev->len;
        }
    }
    return PyLong_FromLong(seen);
}

static PyMethodDef robust_functions[] = {
    {"watch", robust_watch, METH_O, NULL},
    {"drain", robust_drain, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static robust_state *
get_state(PyObject *module)
{
    return (robust_state *)PyModule_GetState(module);
}

static int
robust_exec(PyObject *module)
{
    atomic_u64 probe = 0;
    if (!atomic_is_lock_free(&probe)) {
        PyErr_SetString(PyExc_ImportError, "aiosync needs lock-free 64-bit atomics");
        return -1;
    }
    robust_state *state = get_state(module);
    state->shared_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &Shared_spec, NULL);
    if (state->shared_type == NULL || PyModule_AddType(module, state->shared_type) < 0) {
        return -1;
    }
    if (PyModule_AddIntConstant(module, "HEADER", OFF_UNITS) < 0 ||
        PyModule_AddIntConstant(module, "MAX_UNITS", MAX_UNITS) < 0 ||
        PyModule_AddIntConstant(module, "NONE_FREE", NONE_FREE) < 0 ||
        PyModule_AddIntConstant(module, "IS_BROKEN", IS_BROKEN) < 0 ||
        PyModule_AddIntConstant(module, "GIVEN", GIVEN) < 0 ||
        PyModule_AddIntConstant(module, "RANG", RANG) < 0 ||
        PyModule_AddIntConstant(module, "PID_BITS", 22) < 0 ||
        PyModule_AddIntConstant(module, "IMAGE_BITS", IMAGE_BITS) < 0) {
        return -1;
    }
    PyObject *flags = Py_BuildValue("(KKKK)", (unsigned long long)TAG_MASK,
                                    (unsigned long long)BROKEN,
                                    (unsigned long long)INCONSISTENT,
                                    (unsigned long long)HANDED);
    if (flags == NULL) {
        return -1;
    }
    int added = PyModule_AddObjectRef(module, "BITS", flags);
    Py_DECREF(flags);
    return added;
}

static int
robust_traverse(PyObject *module, visitproc visit, void *arg)
{
    Py_VISIT(get_state(module)->shared_type);
    return 0;
}

static int
robust_clear(PyObject *module)
{
    Py_CLEAR(get_state(module)->shared_type);
    return 0;
}

static void
robust_free(void *module)
{
    (void)robust_clear((PyObject *)module);
}

static PyModuleDef_Slot robust_slots[] = {
    {Py_mod_exec, FUNC(robust_exec)},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef robust_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiosync._robust",
    .m_doc = "The shared words of Lock and Semaphore, with C11 atomics.",
    .m_size = sizeof(robust_state),
    .m_methods = robust_functions,
    .m_slots = robust_slots,
    .m_traverse = robust_traverse,
    .m_clear = robust_clear,
    .m_free = robust_free,
};

PyMODINIT_FUNC
PyInit__robust(void)
{
    return PyModuleDef_Init(&robust_module);
}
