/*
 * aiosync._robust: the shared words of aiosync's Lock and Semaphore.
 *
 * Every load, store and compare-and-swap of a Lock's or Semaphore's shared memory
 * happens here, with C11 <stdatomic.h>, sequentially consistent (the protocol below
 * relies on store-then-load ordering between processes, Dekker style, in three places:
 * see give()). The rules -- who may change which word from what to what -- are argued
 * in the theory of operation of aiosync/_lock.py; this file states the layout and
 * keeps each transition one atomic instruction.
 *
 * Two types: Shared, the shared words and their transitions; and LockCore (at the end),
 * the base class of a Lock or Semaphore: what one process does on every hand-off (the
 * loop's reader, a woken waiter's turn, the line's bookkeeping, release's give), in C
 * next to the atomics it calls, so that a hand-off makes no Python call for it.
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
 * Interpreters: multi-phase initialisation, heap types and interned names kept in the
 * module state, no mutable statics (subinterpreters with their own GIL). Free-threaded
 * builds: a Shared's own fields (the buffer it holds) change only in its constructor
 * and in _release(), and every method uses them inside the object's critical section;
 * the shared memory needs no lock beyond its atomics. A LockCore's fields change only
 * with its wait queue's lock held (a real lock, _waitc's RLock), but for its list of
 * held units (each append or pop is one list operation) and the fields the Python side
 * sets before the object is shared. Hence Py_mod_gil = Py_MOD_GIL_NOT_USED.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030C0000
/* Before 3.12 the member types have no Py_ prefix (structmember.h). */
#include <structmember.h>
#define Py_T_BOOL T_BOOL
#define Py_T_INT T_INT
#define Py_T_PYSSIZET T_PYSSIZET
#define Py_T_ULONGLONG T_ULONGLONG
#endif

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

/* shared_take() results besides a unit index */
#define NONE_FREE (-1)
#define IS_BROKEN (-2)
#define CLOSED (-3) /* any shared_*(): the Shared was released (closed by another thread) */

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
    PyTypeObject *lock_core_type;
    /* interned names: the Python side's methods LockCore calls, the wait queue's */
    PyObject *s_first_use;
    PyObject *s_closed_error;
    PyObject *s_broken;
    PyObject *s_recover;
    PyObject *s_join_line;
    PyObject *s_lock;
    PyObject *s_acquire;
    PyObject *s_release;
    PyObject *s_ring;
    PyObject *s_slots;
    PyObject *s_wake_blockers;
    PyObject *s_blockers;
} robust_state;

#define STATE_FIELDS(X) \
    X(shared_type)      \
    X(lock_core_type)   \
    X(s_first_use)      \
    X(s_closed_error)   \
    X(s_broken)         \
    X(s_recover)        \
    X(s_join_line)      \
    X(s_lock)           \
    X(s_acquire)        \
    X(s_release)        \
    X(s_ring)           \
    X(s_slots)          \
    X(s_wake_blockers)  \
    X(s_blockers)

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
 * whether the waiting processes must be rung. Critical section held.
 *
 * The releaser's side of all three Dekker pairs of _lock.py: the CAS that changes the
 * unit is the store; the looks at the line after it (anyone_in_line() for pair 1,
 * in_line() for pairs 2 and 3) are the loads. The other sides: pair 1, Shared_join()'s
 * stores then LockCore's _queue_up() take; pair 2, shared_leave(); pair 3, the
 * recoverer's Shared_drop() CAS then its look at the units (_lock.py's _recover). */
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

/* The index of the unit this process (`me`) now holds: one handed to it, else a free
 * one; NONE_FREE; IS_BROKEN (a Lock made unrecoverable); or CLOSED. */
static Py_ssize_t
shared_take(Shared *self, uint64_t me)
{
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
    return failed ? CLOSED : got;
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

/* Release unit i, held by `me`: hand it on or free it, and ring the waiting processes
 * through `fd` when needed. GIVEN or RANG (given, and rung) if it was ours, 0 if not,
 * CLOSED. A Lock held INCONSISTENT is not given this way: see break_(). */
static int
shared_give(Shared *self, Py_ssize_t i, uint64_t me, int fd)
{
    int ours = 0, must_ring = 0, failed = 0;
    ENTER(self)
    {
        if (i >= 0 && i < self->n && load(&self->unit[i]) == me) {
            ours = 1;
            must_ring = give(self, i, me, me);
        }
    }
    LEAVE();
    if (failed) {
        return CLOSED;
    }
    if (must_ring) {
        ring(fd);
    }
    return ours ? (must_ring ? RANG : GIVEN) : 0;
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
        /* Dekker pair 1, the waiter's side: these stores put us in the line; the
         * caller looks at the units after them (LockCore's _queue_up()). */
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

/* To the back of the line (process `me` was served, others of it still wait): 0, or
 * CLOSED. The entry gets a fresh ticket if it is still ours. */
static int
shared_renew(Shared *self, int entry, uint64_t me)
{
    int failed = 0;
    ENTER(self)
    {
        if (entry >= 0 && entry < LINE && load(&self->line[entry].tag) == me) {
            atomic_store(&self->line[entry].ticket,
                         atomic_fetch_add(&self->head->tickets, 1) + 1);
        }
    }
    LEAVE();
    return failed ? CLOSED : 0;
}

/* Process `me` leaves the line (entry -1: it has none) and, if `counted`, the count; a
 * unit handed to it meanwhile is passed on (nobody of it waits any more), ringing
 * through `fd` if needed. 0, or CLOSED. */
static int
shared_leave(Shared *self, int entry, uint64_t me, int fd, int counted)
{
    int must_ring = 0, failed = 0;
    ENTER(self)
    {
        /* Dekker pair 2, the leaver's side: the stores that take us out of the line ... */
        if (entry >= 0 && entry < LINE && load(&self->line[entry].tag) == me) {
            atomic_store(&self->line[entry].ticket, 0);
            atomic_store(&self->line[entry].tag, 0);
        }
        if (counted) {
            atomic_fetch_sub(&self->head->inline_, 1); /* uncounted after it left */
        }
        /* ... then the look at the units for a hand-off to us (a releaser hands, then
         * looks at the line in give(): one of us sees the other). */
        for (Py_ssize_t i = 0; i < self->n; i++) {
            if (load(&self->unit[i]) == (me | HANDED)) {
                must_ring |= give(self, i, me, me | HANDED);
            }
        }
    }
    LEAVE();
    if (failed) {
        return CLOSED;
    }
    if (must_ring) {
        ring(fd);
    }
    return 0;
}

/* leave(entry, tag, ring_fd, counted): shared_leave() for close(). */
static PyObject *
Shared_leave(PyObject *op, PyObject *args)
{
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
    if (shared_leave((Shared *)op, entry, me, fd, counted) == CLOSED) {
        return closed_error();
    }
    Py_RETURN_NONE;
}

/* Whether a waiter of process `me` would find something now: a unit handed to it, a
 * free unit, or a broken Lock (to raise). 1, 0, or CLOSED. */
static int
shared_wants(Shared *self, uint64_t me)
{
    int found = 0, failed = 0;
    ENTER(self)
    {
        for (Py_ssize_t i = 0; i < self->n && !found; i++) {
            uint64_t w = load(&self->unit[i]);
            found = w == 0 || w == (me | HANDED) || (w & BROKEN);
        }
    }
    LEAVE();
    return failed ? CLOSED : found;
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
        /* Dekker pair 3, the recoverer's side: this store drops the dead process; the
         * recoverer looks at the units after it (_lock.py's _recover). */
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
    {"break_", Shared_break, METH_VARARGS, NULL},
    {"take_over", Shared_take_over, METH_VARARGS, NULL},
    {"free_dead", Shared_free_dead, METH_VARARGS, NULL},
    {"mark_consistent", Shared_mark_consistent, METH_O, NULL},
    {"units", Shared_units, METH_NOARGS, NULL},
    {"word", Shared_word, METH_O, NULL},
    {"free_units", Shared_free_units, METH_NOARGS, NULL},
    {"join", Shared_join, METH_O, NULL},
    {"leave", Shared_leave, METH_VARARGS, NULL},
    {"line", Shared_line, METH_NOARGS, NULL},
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

/* What drain() saw: SEEN (events), and DEATH besides if a close or a lost event was
 * among them (someone may have died: look). */
#define SEEN 1
#define DEATH 2

/* Read the pending events off the inotify fd `fd` (non-blocking): 0 (none), SEEN or
 * SEEN | DEATH; -1 with OSError set. One read takes them all unless the buffer could
 * have been too small (then it reads again); an event that comes after that read
 * leaves the fd readable, for the loop's reader or the next look. */
static long
drain(int fd)
{
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
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            seen |= SEEN;
            if (ev->mask & (IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_Q_OVERFLOW | IN_IGNORED)) {
                seen |= DEATH;
            }
            p += sizeof(struct inotify_event) + ev->len;
        }
        if ((size_t)n + sizeof(struct inotify_event) + NAME_MAX + 1 <= sizeof buf) {
            break; /* room was left: that was all */
        }
    }
    return seen;
}

/* ------------------------------------------------------------------------------
 * LockCore: this process's side of a Lock or Semaphore, on every event and turn
 *
 * The base class of _lock._Robust. What runs on every hand-off is here, so that it
 * makes no Python call: the loop's reader (_on_readable: drain, is it worth waking a
 * waiter, ring), a woken waiter's turn (_turn: take, or the rare death path, which
 * calls the Python _recover), the line's bookkeeping (_queue_up, _leave_line) and
 * release's give with the drain of its own ring (_give). The rules are _lock.py's
 * (its theory of operation); each is written once, here or there.
 *
 * Fields: this process's state (none of it shared; _lock._Robust._init_process sets
 * it), changed only with the wait queue's lock held, except `held` (a list: each
 * append or pop is one operation) and the fast path's reads of `in_line`, `closed`
 * and `tag`, which a slow path re-checks under the lock, as the Python code did.
 * The wait queue (a _waitc.Core) is reached through its Python attributes and
 * methods (its lock, ring, _slots): calls into C, no Python frame.
 * ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    robust_state *st;        /* its module's state (its type, which it holds, holds it) */
    PyObject *shared;        /* a Shared, or None before _attach */
    PyObject *waitq;         /* the wait queue, or None before _attach */
    PyObject *lock_acquire;  /* its lock's acquire and release (bound), or NULL */
    PyObject *lock_release;
    PyObject *held;          /* list: the units this process holds */
    unsigned long long tag;  /* our tag, from the first use on (0 before) */
    Py_ssize_t in_line;      /* our waiters: tasks and blocked threads */
    int priv;                /* our private description (its offset: our image id) */
    int ino;                 /* our inotify fd, from the first wait on */
    int entry;               /* our entry in the shared line (-1: none, or it is full) */
    int seen;                /* events drained by a loop's reader, not looked at yet */
    char joined;             /* in the line (and its count) while we have waiters */
    char closed;
} LockCore;

static struct PyModuleDef robust_module;

/* Its module's state (noted at construction: never NULL). */
static inline robust_state *
lock_state(LockCore *self)
{
    return self->st;
}

/* Raise what self.<name>() returns (the Python side words the error); -1. */
static int
raise_returned(LockCore *self, PyObject *name)
{
    PyObject *exc = PyObject_CallMethodNoArgs((PyObject *)self, name);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return -1;
}

/* Our Shared (a new reference), or NULL with the closed error raised. */
static Shared *
lock_shared(robust_state *st, LockCore *self)
{
    if (Py_IS_TYPE(self->shared, st->shared_type)) {
        return (Shared *)Py_NewRef(self->shared);
    }
    raise_returned(self, st->s_closed_error);
    return NULL;
}

/* Take the wait queue's lock: its release method (a new reference, to pass to
 * lock_exit), or NULL with an error. */
static PyObject *
lock_enter(robust_state *st, LockCore *self)
{
    if (self->lock_acquire == NULL || self->lock_release == NULL) {
        raise_returned(self, st->s_closed_error); /* not attached */
        return NULL;
    }
    PyObject *release = Py_NewRef(self->lock_release);
    PyObject *r = PyObject_CallNoArgs(self->lock_acquire);
    if (r == NULL) {
        Py_DECREF(release);
        return NULL;
    }
    Py_DECREF(r);
    return release;
}

/* Release the lock lock_enter took (whether an error is pending or not): `rc`, or -1
 * if releasing failed. */
static int
lock_exit(robust_state *Py_UNUSED(st), PyObject *release, int rc)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallNoArgs(release);
    Py_DECREF(release);
    if (r == NULL) {
        if (type != NULL) { /* keep the first error; this one says less */
            PyErr_WriteUnraisable(NULL);
            PyErr_Restore(type, value, tb);
        }
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return rc;
}

/* Our tag; the first use opens our private description (the Python _first_use). */
static int
lock_tag(robust_state *st, LockCore *self, uint64_t *me)
{
    if (self->tag != 0) {
        *me = self->tag;
        return 0;
    }
    PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, st->s_first_use);
    if (r == NULL) {
        return -1;
    }
    *me = PyLong_AsUnsignedLongLong(r);
    Py_DECREF(r);
    return *me == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

/* Take a unit handed to us or a free one; never waits. 1 took, 0 nothing there, -1
 * with an error (BrokenResourceError, ClosedResourceError). */
static int
try_take(robust_state *st, LockCore *self)
{
    uint64_t me;
    if (lock_tag(st, self, &me) < 0) {
        return -1;
    }
    Shared *shared = lock_shared(st, self);
    if (shared == NULL) {
        return -1;
    }
    Py_ssize_t got = shared_take(shared, me);
    Py_DECREF(shared);
    if (got >= 0) {
        PyObject *unit = PyLong_FromSsize_t(got);
        int rc = unit == NULL ? -1 : PyList_Append(self->held, unit);
        Py_XDECREF(unit);
        return rc < 0 ? -1 : 1;
    }
    if (got == IS_BROKEN) {
        return raise_returned(self, st->s_broken);
    }
    if (got == CLOSED) {
        return raise_returned(self, st->s_closed_error);
    }
    return 0;
}

/* Whether a waiter of ours would find something now (lock held): 1, 0, -1. */
static int
worth_waking(robust_state *st, LockCore *self)
{
    if (self->seen & DEATH) {
        return 1;
    }
    Shared *shared = lock_shared(st, self);
    if (shared == NULL) {
        return -1;
    }
    int found = shared_wants(shared, self->tag);
    Py_DECREF(shared);
    return found == CLOSED ? raise_returned(self, st->s_closed_error) : found;
}

/* Drain our events; whether a waiter of ours would find something (lock held). */
static int
look(robust_state *st, LockCore *self)
{
    if (self->ino >= 0) {
        long got = drain(self->ino);
        if (got < 0) {
            return -1;
        }
        self->seen |= (int)got;
    }
    return worth_waking(st, self);
}

/* Wake the next waiter of each loop and every blocked thread of ours (lock held). */
static int
ring_here(robust_state *st, LockCore *self)
{
    if (self->in_line == 0) {
        return 0;
    }
    PyObject *slots = PyObject_GetAttr(self->waitq, st->s_slots);
    if (slots == NULL) {
        return -1;
    }
    PyObject *each = PyDict_Check(slots) ? PyDict_Values(slots) : NULL;
    Py_DECREF(slots);
    if (each == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "the wait queue's _slots is not a dict");
        }
        return -1;
    }
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(each); i++) {
        PyObject *r = PyObject_CallMethodObjArgs(self->waitq, st->s_ring,
                                                 PyList_GET_ITEM(each, i), Py_None, NULL);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    Py_DECREF(each);
    if (rc < 0) {
        return -1;
    }
    /* Threads blocked in acquire_blocking(): only if there are any (a Python call). */
    PyObject *blockers = PyObject_GetAttr(self->waitq, st->s_blockers);
    if (blockers == NULL) {
        return -1;
    }
    int some = !PyDict_Check(blockers) || PyDict_GET_SIZE(blockers) != 0;
    Py_DECREF(blockers);
    if (some) {
        PyObject *r = PyObject_CallMethodNoArgs(self->waitq, st->s_wake_blockers);
        rc = r == NULL ? -1 : 0;
        Py_XDECREF(r);
    }
    return rc;
}

/* One waiter of ours fewer (lock held); the last leaves the shared line. An acquirer
 * whose process still has waiters goes to the back of the line; a waiter that gives
 * up without looking passes on what it was woken for. */
static int
leave_line(robust_state *st, LockCore *self, int acquired)
{
    self->in_line -= 1;
    if (self->closed) {
        return 0;
    }
    if (self->in_line == 0) {
        if (!self->joined) {
            return 0;
        }
        int entry = self->entry;
        self->entry = -1;
        self->joined = 0;
        Shared *shared = lock_shared(st, self);
        if (shared == NULL) {
            return -1;
        }
        int rc = shared_leave(shared, entry, self->tag, self->priv, 1);
        Py_DECREF(shared);
        return rc == CLOSED ? raise_returned(self, st->s_closed_error) : 0;
    }
    if (acquired) {
        if (self->entry < 0) {
            return 0;
        }
        Shared *shared = lock_shared(st, self);
        if (shared == NULL) {
            return -1;
        }
        int rc = shared_renew(shared, self->entry, self->tag);
        Py_DECREF(shared);
        return rc == CLOSED ? raise_returned(self, st->s_closed_error) : 0;
    }
    int worth = worth_waking(st, self);
    return worth <= 0 ? worth : ring_here(st, self);
}

/* leave_line() keeping the error that made us leave (a new one is reported apart). */
static void
leave_line_failing(robust_state *st, LockCore *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (leave_line(st, self, 0) < 0) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    PyErr_Restore(type, value, tb);
}

/* _queue_up() -> bool: one more waiter of ours, in line (see acquire()). Takes the
 * lock. The first of this process joins the shared line (the Python _join_line), then
 * tries to take: Dekker pair 1, the waiter's side -- join()'s stores put us in the
 * line, then shared_take() looks at the units, so a releaser either saw us in the line
 * (and rings) or released before this look. Later waiters queue behind the ones
 * already there, without looking. True if it took a unit (then it has left the line,
 * as an acquirer: see leave_line()); on an error it has left the line too. */
static PyObject *
LockCore_queue_up(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    PyObject *lock = lock_enter(st, self);
    if (lock == NULL) {
        return NULL;
    }
    int took = 0;
    if (self->closed) {
        took = raise_returned(self, st->s_closed_error);
    }
    else if (++self->in_line == 1) {
        /* Joins (and, watching for the first time, recovers from deaths before it):
         * on failure it has left the line itself. */
        PyObject *r = PyObject_CallMethodNoArgs(op, st->s_join_line);
        took = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
        if (took == 0 && self->in_line == 1) {
            took = try_take(st, self);
            if (took < 0) {
                leave_line_failing(st, self);
            }
        }
        if (took > 0 && leave_line(st, self, 1) < 0) {
            PyErr_WriteUnraisable(op); /* it took: the caller holds it all the same */
        }
    }
    took = lock_exit(st, lock, took);
    return took < 0 ? NULL : PyBool_FromLong(took);
}

/* _leave_line(acquired) -> None: leave_line(), taking the lock. */
static PyObject *
LockCore_leave_line(PyObject *op, PyObject *arg)
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    int acquired = PyObject_IsTrue(arg);
    if (acquired < 0) {
        return NULL;
    }
    PyObject *lock = lock_enter(st, self);
    if (lock == NULL) {
        return NULL;
    }
    int rc = lock_exit(st, lock, leave_line(st, self, acquired));
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

static PyObject *
LockCore_try_take(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    int took = try_take(st, self);
    return took < 0 ? NULL : PyBool_FromLong(took);
}

/* _turn(ring) -> bool: a woken waiter's turn (lock held). The loop's reader drained
 * the events that woke it (later ones make the fd readable again): see what they
 * meant, take if it can; a death among them sends it to the Python _recover. True if
 * it took a unit: then it has left the line too, as an acquirer (leave_line(), under
 * the lock it already holds: no second round of the lock after the wait). */
static PyObject *
LockCore_turn(PyObject *op, PyObject *Py_UNUSED(ring))
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    if (self->closed) {
        raise_returned(self, st->s_closed_error);
        return NULL;
    }
    int seen = self->seen;
    self->seen = 0;
    int took = try_take(st, self);
    if (took == 0 && seen & DEATH) {
        PyObject *r = PyObject_CallMethodNoArgs(op, st->s_recover);
        took = r == NULL ? -1 : PyObject_IsTrue(r);
        Py_XDECREF(r);
    }
    if (took > 0 && leave_line(st, self, 1) < 0) {
        PyErr_WriteUnraisable(op); /* it took: the caller holds it all the same */
    }
    return took < 0 ? NULL : PyBool_FromLong(took);
}

/* _look() -> bool: drain our events; whether a waiter of ours would find something
 * (lock held). */
static PyObject *
LockCore_look(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    int worth = look(st, self);
    return worth < 0 ? NULL : PyBool_FromLong(worth);
}

/* _on_readable(slot, fd): the loop's reader (lock held). It takes nothing: it drains
 * the events (notifications, not resources; a death among them is kept for the waiter
 * to look into) and wakes the oldest waiter of this loop only if that waiter would
 * find something (a ring that handed the lock to another process, our own release's
 * ring included, wakes nobody here). */
static PyObject *
LockCore_on_readable(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_on_readable(slot, fd) takes 2 arguments");
        return NULL;
    }
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    if (self->closed) { /* closed by another thread: its queue's close() fails them */
        Py_RETURN_NONE;
    }
    int worth = look(st, self);
    if (worth <= 0) {
        return worth < 0 ? NULL : Py_NewRef(Py_None);
    }
    return PyObject_CallMethodObjArgs(self->waitq, st->s_ring, args[0], Py_None, NULL);
}

/* _give(unit) -> int: release's transition (see Shared's give()): GIVEN, RANG or 0
 * (the unit was not ours). Our own ring reached our inotify fd too: it is read now
 * (lock taken), rather than have our loop wake up for it, and our waiters are woken
 * only if there is something for them. */
static PyObject *
LockCore_give(PyObject *op, PyObject *arg)
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    Py_ssize_t unit = PyLong_AsSsize_t(arg);
    if (unit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    Shared *shared = lock_shared(st, self);
    if (shared == NULL) {
        return NULL;
    }
    int given = shared_give(shared, unit, self->tag, self->priv);
    Py_DECREF(shared);
    if (given == CLOSED) {
        raise_returned(self, st->s_closed_error);
        return NULL;
    }
    if (given == RANG && self->ino >= 0) {
        PyObject *lock = lock_enter(st, self);
        if (lock == NULL) {
            return NULL;
        }
        int rc = 0;
        if (!self->closed) {
            rc = look(st, self);
            if (rc > 0) {
                rc = ring_here(st, self);
            }
        }
        if (lock_exit(st, lock, rc) < 0) {
            return NULL;
        }
    }
    return PyLong_FromLong(given);
}

static int
LockCore_traverse(PyObject *op, visitproc visit, void *arg)
{
    LockCore *self = (LockCore *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->shared);
    Py_VISIT(self->waitq);
    Py_VISIT(self->lock_acquire);
    Py_VISIT(self->lock_release);
    Py_VISIT(self->held);
    return 0;
}

static int
LockCore_clear(PyObject *op)
{
    LockCore *self = (LockCore *)op;
    Py_CLEAR(self->shared);
    Py_CLEAR(self->waitq);
    Py_CLEAR(self->lock_acquire);
    Py_CLEAR(self->lock_release);
    Py_CLEAR(self->held);
    return 0;
}

static void
LockCore_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    (void)LockCore_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *
LockCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    PyObject *module = PyType_GetModuleByDef(type, &robust_module);
    if (module == NULL) {
        return NULL;
    }
    LockCore *self = (LockCore *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = (robust_state *)PyModule_GetState(module);
    self->held = PyList_New(0);
    if (self->held == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->shared = Py_NewRef(Py_None);
    self->waitq = Py_NewRef(Py_None);
    self->priv = self->ino = self->entry = -1;
    self->closed = 1; /* until _attach */
    return (PyObject *)self;
}

static PyObject *
LockCore_get_shared(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((LockCore *)op)->shared);
}

static int
LockCore_set_shared(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    robust_state *st = lock_state((LockCore *)op);
    if (value == NULL || !Py_IS_TYPE(value, st->shared_type)) {
        PyErr_SetString(PyExc_TypeError, "_shared must be a Shared");
        return -1;
    }
    Py_SETREF(((LockCore *)op)->shared, Py_NewRef(value));
    return 0;
}

static PyObject *
LockCore_get_waitq(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((LockCore *)op)->waitq);
}

/* Setting the wait queue takes note of its lock's methods (set it again when the queue
 * gets a new lock: in a forked child). */
static int
LockCore_set_waitq(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    LockCore *self = (LockCore *)op;
    robust_state *st = lock_state(self);
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete _waitq");
        return -1;
    }
    PyObject *lock = PyObject_GetAttr(value, st->s_lock);
    if (lock == NULL) {
        return -1;
    }
    PyObject *acquire = PyObject_GetAttr(lock, st->s_acquire);
    PyObject *release = acquire == NULL ? NULL : PyObject_GetAttr(lock, st->s_release);
    Py_DECREF(lock);
    if (release == NULL) {
        Py_XDECREF(acquire);
        return -1;
    }
    Py_SETREF(self->waitq, Py_NewRef(value));
    Py_XSETREF(self->lock_acquire, acquire);
    Py_XSETREF(self->lock_release, release);
    return 0;
}

static PyObject *
LockCore_get_held(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(((LockCore *)op)->held);
}

static int
LockCore_set_held(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || !PyList_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "_held must be a list");
        return -1;
    }
    Py_SETREF(((LockCore *)op)->held, Py_NewRef(value));
    return 0;
}

static PyGetSetDef LockCore_getset[] = {
    {"_shared", LockCore_get_shared, LockCore_set_shared, "The shared words (a Shared).", NULL},
    {"_waitq", LockCore_get_waitq, LockCore_set_waitq, "The wait queue.", NULL},
    {"_held", LockCore_get_held, LockCore_set_held, "The units this process holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef LockCore_members[] = {
    {"_tag", Py_T_ULONGLONG, offsetof(LockCore, tag), 0, "Our tag (0 before the first use)."},
    {"_in_line", Py_T_PYSSIZET, offsetof(LockCore, in_line), 0, "Our waiters."},
    {"_priv", Py_T_INT, offsetof(LockCore, priv), 0, "Our private description, or -1."},
    {"_ino", Py_T_INT, offsetof(LockCore, ino), 0, "Our inotify fd, or -1."},
    {"_entry", Py_T_INT, offsetof(LockCore, entry), 0, "Our line entry, or -1."},
    {"_seen", Py_T_INT, offsetof(LockCore, seen), 0, "Events drained, not looked at."},
    {"_joined", Py_T_BOOL, offsetof(LockCore, joined), 0, "In the shared line."},
    {"_closed", Py_T_BOOL, offsetof(LockCore, closed), 0, "Closed (or not attached yet)."},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef LockCore_methods[] = {
    {"_on_readable", (PyCFunction)(void (*)(void))LockCore_on_readable, METH_FASTCALL, NULL},
    {"_turn", LockCore_turn, METH_O, NULL},
    {"_try_take", LockCore_try_take, METH_NOARGS, NULL},
    {"_queue_up", LockCore_queue_up, METH_NOARGS, NULL},
    {"_leave_line", LockCore_leave_line, METH_O, NULL},
    {"_look", LockCore_look, METH_NOARGS, NULL},
    {"_give", LockCore_give, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot LockCore_slots[] = {
    {Py_tp_new, FUNC(LockCore_new)},
    {Py_tp_dealloc, FUNC(LockCore_dealloc)},
    {Py_tp_traverse, FUNC(LockCore_traverse)},
    {Py_tp_clear, FUNC(LockCore_clear)},
    {Py_tp_methods, LockCore_methods},
    {Py_tp_members, LockCore_members},
    {Py_tp_getset, LockCore_getset},
    {Py_tp_doc, (void *)"This process's side of a Lock or Semaphore (see aiosync/_lock.py)."},
    {0, NULL},
};

static PyType_Spec LockCore_spec = {
    .name = "aiosync._robust.LockCore",
    .basicsize = sizeof(LockCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = LockCore_slots,
};

/* ------------------------------------------------------------------------------ */

static PyMethodDef robust_functions[] = {
    {"watch", robust_watch, METH_O, NULL},
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
    state->lock_core_type =
        (PyTypeObject *)PyType_FromModuleAndSpec(module, &LockCore_spec, NULL);
    if (state->lock_core_type == NULL || PyModule_AddType(module, state->lock_core_type) < 0) {
        return -1;
    }
    if ((state->s_first_use = PyUnicode_InternFromString("_first_use")) == NULL ||
        (state->s_closed_error = PyUnicode_InternFromString("_closed_error")) == NULL ||
        (state->s_broken = PyUnicode_InternFromString("_broken")) == NULL ||
        (state->s_recover = PyUnicode_InternFromString("_recover")) == NULL ||
        (state->s_join_line = PyUnicode_InternFromString("_join_line")) == NULL ||
        (state->s_lock = PyUnicode_InternFromString("lock")) == NULL ||
        (state->s_acquire = PyUnicode_InternFromString("acquire")) == NULL ||
        (state->s_release = PyUnicode_InternFromString("release")) == NULL ||
        (state->s_ring = PyUnicode_InternFromString("ring")) == NULL ||
        (state->s_slots = PyUnicode_InternFromString("_slots")) == NULL ||
        (state->s_wake_blockers = PyUnicode_InternFromString("wake_blockers")) == NULL ||
        (state->s_blockers = PyUnicode_InternFromString("blockers")) == NULL) {
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
    robust_state *state = get_state(module);
#define VISIT(f) Py_VISIT(state->f);
    STATE_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
robust_clear(PyObject *module)
{
    robust_state *state = get_state(module);
#define CLEAR(f) Py_CLEAR(state->f);
    STATE_FIELDS(CLEAR)
#undef CLEAR
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
