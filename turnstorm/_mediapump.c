/*
 * Native paced-media engine for the load generator (see loadgen/media.py, NativeMediaPump).
 *
 * One OS thread per engine sends every call's frames on time and reads their echoes,
 * without the GIL: a frame costs the send(2) and its echo the recvmsg(2), plus a few
 * hundred nanoseconds of bookkeeping, instead of ~10 us of interpreter work per pair.
 *
 * - Sending: flows sit in a binary heap keyed by their next due time (CLOCK_MONOTONIC,
 *   the clock of time.perf_counter() on Linux). The thread sleeps in epoll_wait until a
 *   timerfd fires `lead` seconds before the earliest frame, then sends every frame due
 *   before now + lead. A frame is the ChannelData header, the media header
 *   (seq u32, send time as a big-endian IEEE double) and zero padding: the same bytes as
 *   loadgen/wire.py's CHANNEL_HEADER. |sent - due| goes into the send-lag histogram.
 *   A shared RateBucket (the process's --max-pps bound, also charged by Python) is
 *   charged one packet per frame; when it runs ahead of now the thread waits for it.
 * - Reading: each time it wakes to send, the thread reads what is queued on every flow
 *   socket (a second epoll set, polled without waiting; one recvmmsg each). A
 *   ChannelData echo of a
 *   media frame updates the flow's statistics exactly as StreamStats.on_echo does
 *   (sequence/loss/reordering/duplicates, Welford delay mean/M2, RFC 3550 jitter, bytes)
 *   and queues the RTT's histogram bucket; the arrival time is the kernel's
 *   SO_TIMESTAMPNS stamp. Anything else (STUN responses, ICMP errors) is queued for
 *   Python (take_control), which is woken through an eventfd.
 * - Python pulls statistics with collect() and hands them to its StreamStats objects.
 *
 * Every method takes the engine mutex; the thread holds it except while it waits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define SUB_BUCKETS 1024
#define EXACT_LIMIT (2 * SUB_BUCKETS)
#define MEDIA_HEADER 12      /* seq u32 + send time f64 */
#define CHANNEL_HEADER 4
#define MAX_FRAME 65535
#define RECV_SIZE 65536
#define READS_PER_WAKE 8     /* datagrams read from one socket per wake-up, at most */
#define MAX_EVENTS 256
#define MAX_CATCH_UP 10
#define TAG_TIMER UINT64_MAX
#define TAG_WAKE (UINT64_MAX - 1)

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double realtime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* loadgen/metrics.py bucket_index, for a value already rounded to whole microseconds. */
static uint32_t bucket_index(uint64_t value) {
    if (value < EXACT_LIMIT) return (uint32_t)value;
    int bits = 64 - __builtin_clzll(value);
    int shift = bits - 11;
    return (uint32_t)(shift * SUB_BUCKETS + (value >> shift));
}

/* A growable list of bucket indices with the exact sum, min and max of their values. */
typedef struct {
    uint32_t *items;
    size_t len, cap;
    uint64_t total, min, max;
} Samples;

static int samples_add(Samples *s, double value_us) {
    /* Python's round(): half to even (the default rounding mode) */
    /* clamped: a corrupt send time must not overflow the cast (1e15 us is 31 years) */
    uint64_t value = value_us > 0 ? (uint64_t)nearbyint(value_us < 1e15 ? value_us : 1e15) : 0;
    if (s->len == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        uint32_t *items = realloc(s->items, cap * sizeof *items);
        if (items == NULL) return -1;
        s->items = items;
        s->cap = cap;
    }
    if (s->len == 0) {
        s->min = s->max = value;
        s->total = 0;
    } else if (value < s->min) {
        s->min = value;
    } else if (value > s->max) {
        s->max = value;
    }
    s->items[s->len++] = bucket_index(value);
    s->total += value;
    return 0;
}

/* (bytes of native uint32 bucket indices, total, min, max), then emptied. */
static PyObject *samples_take(Samples *s) {
    PyObject *out = Py_BuildValue("(y#KKK)", s->items ? (const char *)s->items : "",
                                  (Py_ssize_t)(s->len * sizeof(uint32_t)),
                                  (unsigned long long)s->total, (unsigned long long)s->min,
                                  (unsigned long long)s->max);
    s->len = 0;
    s->total = 0;
    return out;
}

/* -- the rate bucket ---------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    double interval;  /* seconds per packet */
    double burst;     /* seconds of unused budget that may be spent at once */
    double next;      /* when the next packet may leave */
} RateBucket;

/* Reserve `packets`; returns when they may leave (<= now: at once). */
static double bucket_reserve(RateBucket *b, double packets, double now) {
    pthread_mutex_lock(&b->mu);
    double slot = b->next > now - b->burst ? b->next : now - b->burst;
    b->next = slot + packets * b->interval;
    pthread_mutex_unlock(&b->mu);
    return slot;
}

static int RateBucket_init(RateBucket *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"rate", "burst", NULL};
    double rate, burst;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "dd", kwlist, &rate, &burst)) return -1;
    if (!(rate > 0) || !isfinite(rate) || !(burst >= 0) || !isfinite(burst)) {
        PyErr_SetString(PyExc_ValueError, "rate must be positive and burst non-negative");
        return -1;
    }
    self->interval = 1.0 / rate;
    self->burst = burst;
    self->next = 0;
    return 0;
}

static PyObject *RateBucket_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    RateBucket *self = (RateBucket *)type->tp_alloc(type, 0);
    if (self != NULL) pthread_mutex_init(&self->mu, NULL);
    return (PyObject *)self;
}

static void RateBucket_dealloc(RateBucket *self) {
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *RateBucket_reserve(RateBucket *self, PyObject *args) {
    double packets, now;
    if (!PyArg_ParseTuple(args, "dd", &packets, &now)) return NULL;
    return PyFloat_FromDouble(bucket_reserve(self, packets, now));
}

static PyMethodDef RateBucket_methods[] = {
    {"reserve", (PyCFunction)RateBucket_reserve, METH_VARARGS,
     "reserve(packets, now) -> when they may leave (perf_counter seconds)"},
    {NULL}};

static PyTypeObject RateBucketType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "turnstorm._mediapump.RateBucket",
    .tp_basicsize = sizeof(RateBucket),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = RateBucket_new,
    .tp_init = (initproc)RateBucket_init,
    .tp_dealloc = (destructor)RateBucket_dealloc,
    .tp_methods = RateBucket_methods,
    .tp_doc = "A packets-per-second bound shared by Python code and engine threads.",
};

/* -- flows ------------------------------------------------------------------------------- */

typedef struct {
    long long id;      /* 0: free slot */
    int fd;
    int reading;       /* the socket is in the epoll set */
    int measuring;     /* echoes are measured here (else handed to Python) */
    uint16_t channel;
    uint16_t frame_bytes;
    double interval;
    double next_due;
    uint64_t sent, send_errors;
    int dirty;
    /* StreamStats, mirrored */
    int have_first;
    long long first, highest;
    uint64_t window;
    uint64_t received, reordered, duplicates, received_bytes;
    uint64_t delay_count;
    double mean, m2;
    double jitter;
    uint64_t jitter_samples;
    int have_last;
    double last_transit;
    Samples rtt;
} Flow;

typedef struct {
    long long id;
    double arrival;
    int error;
    char *data;
    size_t len;
} Control;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_t thread;
    int started, stop;
    int epfd, flow_ep, tfd, wake_fd, notify_fd;  /* epfd: timer + wake; flow_ep: sockets */
    double lead;
    Flow *flows;
    size_t nflows;         /* slots in use or free */
    size_t *free_slots;
    size_t nfree;
    size_t *heap;          /* slot indices, by next_due */
    size_t heap_len;
    long long next_id;
    RateBucket *bucket;    /* owned reference or NULL */
    Samples lag;
    uint64_t sent, send_errors;
    double waited;         /* seconds the thread waited for the rate bucket */
    Control *ctl;
    size_t ctl_len, ctl_cap;
    int notified;
    int failed;            /* out of memory in the thread */
    unsigned memory_failures;  /* reported by take_control so far */
    unsigned char frame[CHANNEL_HEADER + MAX_FRAME];
    unsigned char rbuf[READS_PER_WAKE][RECV_SIZE];
} Engine;

static void heap_swap(Engine *e, size_t a, size_t b) {
    size_t t = e->heap[a];
    e->heap[a] = e->heap[b];
    e->heap[b] = t;
}

static void heap_push(Engine *e, size_t slot) {
    size_t i = e->heap_len++;
    e->heap[i] = slot;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (e->flows[e->heap[parent]].next_due <= e->flows[e->heap[i]].next_due) break;
        heap_swap(e, parent, i);
        i = parent;
    }
}

static size_t heap_pop(Engine *e) {
    size_t top = e->heap[0];
    e->heap[0] = e->heap[--e->heap_len];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < e->heap_len && e->flows[e->heap[l]].next_due < e->flows[e->heap[m]].next_due) m = l;
        if (r < e->heap_len && e->flows[e->heap[r]].next_due < e->flows[e->heap[m]].next_due) m = r;
        if (m == i) break;
        heap_swap(e, i, m);
        i = m;
    }
    return top;
}

static void notify(Engine *e) {
    if (!e->notified) {
        uint64_t one = 1;
        ssize_t n = write(e->notify_fd, &one, sizeof one);
        (void)n;
        e->notified = 1;
    }
}

static void queue_control(Engine *e, Flow *f, const unsigned char *data, size_t len,
                          double arrival, int error) {
    if (e->ctl_len == e->ctl_cap) {
        size_t cap = e->ctl_cap ? e->ctl_cap * 2 : 64;
        Control *ctl = realloc(e->ctl, cap * sizeof *ctl);
        if (ctl == NULL) { e->failed = 1; return; }
        e->ctl = ctl;
        e->ctl_cap = cap;
    }
    Control *c = &e->ctl[e->ctl_len];
    c->data = NULL;
    if (len) {
        c->data = malloc(len);
        if (c->data == NULL) { e->failed = 1; return; }
        memcpy(c->data, data, len);
    }
    c->id = f->id;
    c->len = len;
    c->arrival = arrival;
    c->error = error;
    e->ctl_len++;
    notify(e);
}

/* StreamStats.on_echo, for one echoed frame; -1 when out of memory. */
static int on_echo(Flow *f, long long seq, double sent, double received, unsigned size) {
    if (f->have_first && seq == f->highest + 1) {
        f->window = (f->window << 1) | 1;
        f->highest = seq;
        f->received++;
    } else if (!f->have_first) {
        f->have_first = 1;
        f->first = f->highest = seq;
        f->window = 1;
        f->received++;
    } else if (seq > f->highest) {
        long long shift = seq - f->highest;
        f->window = shift >= 64 ? 1 : ((f->window << shift) | 1);
        f->highest = seq;
        f->received++;
    } else {
        long long behind = f->highest - seq;
        uint64_t bit = behind < 64 ? (uint64_t)1 << behind : 0;
        if (f->window & bit) {
            f->duplicates++;
            f->dirty = 1;
            return 0;
        }
        f->window |= bit;
        f->reordered++;
        f->received++;
    }
    double rtt = received - sent;
    int rc = samples_add(&f->rtt, rtt * 1e6);
    f->delay_count++;
    double delta = rtt - f->mean;
    f->mean += delta / (double)f->delay_count;
    f->m2 += delta * (rtt - f->mean);
    if (f->have_last) {
        double d = rtt >= f->last_transit ? rtt - f->last_transit : f->last_transit - rtt;
        f->jitter += (d - f->jitter) / 16;
        f->jitter_samples++;
    }
    f->have_last = 1;
    f->last_transit = rtt;
    f->received_bytes += size;
    f->dirty = 1;
    return rc;
}

typedef union {  /* aligned for struct cmsghdr */
    char buf[CMSG_SPACE(sizeof(struct timespec)) + 64];
    struct cmsghdr align;
} Ancillary;

/* Read what is queued on a flow's socket, up to READS_PER_WAKE datagrams, in one
 * recvmmsg (with one datagram queued, as usual, that is one system call). */
static void read_flow(Engine *e, Flow *f, double offset) {
    struct mmsghdr msgs[READS_PER_WAKE];
    struct iovec iov[READS_PER_WAKE];
    Ancillary anc[READS_PER_WAKE];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < READS_PER_WAKE; i++) {
        iov[i].iov_base = e->rbuf[i];
        iov[i].iov_len = sizeof e->rbuf[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = anc[i].buf;
        msgs[i].msg_hdr.msg_controllen = sizeof anc[i].buf;
    }
    int got = recvmmsg(f->fd, msgs, READS_PER_WAKE, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            queue_control(e, f, NULL, 0, mono(), errno);
        return;
    }
    for (int n = 0; n < got; n++) {
        struct msghdr *msg = &msgs[n].msg_hdr;
        double arrival = -1;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(c), sizeof ts);
                arrival = (double)ts.tv_sec - offset + (double)ts.tv_nsec * 1e-9;
            }
        }
        if (arrival < 0) arrival = mono();
        const unsigned char *d = e->rbuf[n];
        size_t len = msgs[n].msg_len;
        if (len >= CHANNEL_HEADER && d[0] >= 0x40 && d[0] <= 0x4F && f->measuring) {
            if (len >= CHANNEL_HEADER + MEDIA_HEADER) {
                unsigned length = ((unsigned)d[2] << 8) | d[3];
                if (length >= MEDIA_HEADER && length <= len - CHANNEL_HEADER) {
                    uint32_t seq = ((uint32_t)d[4] << 24) | ((uint32_t)d[5] << 16) |
                                   ((uint32_t)d[6] << 8) | d[7];
                    uint64_t bits = 0;
                    for (int i = 0; i < 8; i++) bits = (bits << 8) | d[8 + i];
                    double sent;
                    memcpy(&sent, &bits, sizeof sent);
                    if (on_echo(f, seq, sent, arrival, length) < 0) e->failed = 1;
                }
            }
            continue;  /* other ChannelData is dropped, as UdpClient.dispatch does */
        }
        queue_control(e, f, d, len, arrival, 0);
    }
}

static void send_frame(Engine *e, Flow *f, double now) {
    unsigned char *p = e->frame;
    size_t size = CHANNEL_HEADER + f->frame_bytes;
    p[0] = f->channel >> 8;
    p[1] = f->channel & 0xFF;
    p[2] = f->frame_bytes >> 8;
    p[3] = f->frame_bytes & 0xFF;
    uint32_t seq = (uint32_t)f->sent;
    p[4] = seq >> 24;
    p[5] = (seq >> 16) & 0xFF;
    p[6] = (seq >> 8) & 0xFF;
    p[7] = seq & 0xFF;
    uint64_t bits;
    memcpy(&bits, &now, sizeof bits);
    for (int i = 7; i >= 0; i--) {
        p[8 + i] = bits & 0xFF;
        bits >>= 8;
    }
    /* the padding after the header stays zero (frame_bytes >= MEDIA_HEADER) */
    if (send(f->fd, p, size, MSG_DONTWAIT) < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) {
            f->send_errors++;
            e->send_errors++;
        }
        /* ECONNREFUSED and the like: the echo is simply missing */
    }
    f->sent++;
    e->sent++;
    f->dirty = 1;
}

/* Frames due at or before `limit` in the heap below index i. */
static size_t count_due(Engine *e, size_t i, double limit) {
    if (i >= e->heap_len || e->flows[e->heap[i]].next_due > limit) return 0;
    return 1 + count_due(e, 2 * i + 1, limit) + count_due(e, 2 * i + 2, limit);
}

/* Send every frame due before now + lead. With a rate bucket the batch is charged at
 * once (as the Python side charges its batches: turns in proportion to what each
 * asks), and the mutex is released while the bucket makes the thread wait. */
static void send_due(Engine *e) {
    while (e->heap_len > 0 && !e->stop) {
        double now = mono();
        if (e->flows[e->heap[0]].next_due > now + e->lead) return;
        size_t budget = SIZE_MAX;
        if (e->bucket != NULL) {
            budget = count_due(e, 0, now + e->lead);
            double at = bucket_reserve(e->bucket, (double)budget, now);
            if (at > now) {
                struct timespec ts;
                double wait = at - now;
                ts.tv_sec = (time_t)wait;
                ts.tv_nsec = (long)((wait - (double)ts.tv_sec) * 1e9);
                e->waited += wait;
                pthread_mutex_unlock(&e->mu);
                nanosleep(&ts, NULL);
                pthread_mutex_lock(&e->mu);
            }
        }
        double limit = mono() + e->lead;
        for (size_t sent = 0; sent < budget && e->heap_len > 0 && !e->stop; sent++) {
            size_t slot = e->heap[0];
            Flow *f = &e->flows[slot];
            if (f->next_due > limit) break;
            heap_pop(e);
            double sent_at = mono();
            if (samples_add(&e->lag, fabs(sent_at - f->next_due) * 1e6) < 0) e->failed = 1;
            send_frame(e, f, sent_at);
            double due = f->next_due + f->interval;
            if (due < sent_at - MAX_CATCH_UP * f->interval) due = sent_at + f->interval;
            f->next_due = due;
            heap_push(e, slot);
        }
        if (budget != SIZE_MAX) continue;  /* paid-for batch done: check what is due now */
        return;
    }
}

/* Read every flow socket that has datagrams queued. The thread does not wake
 * for each echo (a wake-up per datagram costs more than the datagram): it reads what
 * arrived when it wakes to send, and the kernel's arrival stamps keep the RTTs exact.
 * epoll is level-triggered, so a socket with more queued is reported again next time. */
static void read_ready(Engine *e, struct epoll_event *events) {
    double offset = realtime() - mono();
    /* every socket once, then back to sending (level-triggered: the rest is read at the
     * next wake-up) */
    size_t rounds = (e->nflows - e->nfree) / MAX_EVENTS + 1;
    for (size_t round = 0; round < rounds; round++) {
        int n = epoll_wait(e->flow_ep, events, MAX_EVENTS, 0);
        for (int i = 0; i < n; i++) {
            uint64_t tag = events[i].data.u64;
            size_t slot = (size_t)(tag & 0xFFFFFFFFu);
            long long id = (long long)(tag >> 32);
            if (slot < e->nflows && e->flows[slot].id == id && e->flows[slot].reading)
                read_flow(e, &e->flows[slot], offset);
        }
        if (n < MAX_EVENTS) return;
    }
}

static void *engine_main(void *arg) {
    Engine *e = arg;
    struct epoll_event events[MAX_EVENTS];
    pthread_mutex_lock(&e->mu);
    while (!e->stop) {
        send_due(e);
        if (e->stop) break;
        struct itimerspec when = {0};
        if (e->heap_len > 0) {
            double at = e->flows[e->heap[0]].next_due - e->lead;
            if (at <= 0) at = 1e-9;
            when.it_value.tv_sec = (time_t)at;
            when.it_value.tv_nsec = (long)((at - (double)when.it_value.tv_sec) * 1e9);
            if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0) when.it_value.tv_nsec = 1;
        }
        timerfd_settime(e->tfd, TFD_TIMER_ABSTIME, &when, NULL);
        pthread_mutex_unlock(&e->mu);
        int n = epoll_wait(e->epfd, events, MAX_EVENTS, -1);
        pthread_mutex_lock(&e->mu);
        for (int i = 0; i < n; i++) {
            uint64_t drained;
            ssize_t r = read(events[i].data.u64 == TAG_TIMER ? e->tfd : e->wake_fd, &drained,
                             sizeof drained);
            (void)r;
        }
        send_due(e);  /* the frames due first: the reads' time never makes them late */
        read_ready(e, events);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

static void wake(Engine *e) {
    uint64_t one = 1;
    ssize_t n = write(e->wake_fd, &one, sizeof one);
    (void)n;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    pthread_mutex_init(&self->mu, NULL);
    self->epfd = self->flow_ep = self->tfd = self->wake_fd = self->notify_fd = -1;
    self->next_id = 1;
    return (PyObject *)self;
}

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"lead", "bucket", NULL};
    double lead = 0.0002;
    PyObject *bucket = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|dO", kwlist, &lead, &bucket)) return -1;
    if (self->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine already initialised");
        return -1;
    }
    if (bucket != Py_None && !PyObject_TypeCheck(bucket, &RateBucketType)) {
        PyErr_SetString(PyExc_TypeError, "bucket must be a RateBucket or None");
        return -1;
    }
    if (!isfinite(lead) || lead < 0 || lead > 0.1) {
        PyErr_SetString(PyExc_ValueError, "lead must be between 0 and 0.1 s");
        return -1;
    }
    self->lead = lead;
    if (bucket != Py_None) {
        Py_INCREF(bucket);
        self->bucket = (RateBucket *)bucket;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->flow_ep = epoll_create1(EPOLL_CLOEXEC);
    self->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    self->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->flow_ep < 0 || self->tfd < 0 || self->wake_fd < 0 || self->notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = TAG_TIMER;
    epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->tfd, &ev);
    ev.data.u64 = TAG_WAKE;
    epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->wake_fd, &ev);
    return 0;
}

static void stop_thread(Engine *self) {
    if (!self->started) return;
    pthread_t thread = self->thread;
    self->started = 0;  /* before the GIL is released: one caller joins */
    pthread_mutex_lock(&self->mu);
    self->stop = 1;
    pthread_mutex_unlock(&self->mu);
    wake(self);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(thread, NULL);
    Py_END_ALLOW_THREADS
}

static void Engine_dealloc(Engine *self) {
    stop_thread(self);
    for (size_t i = 0; i < self->nflows; i++) free(self->flows[i].rtt.items);
    for (size_t i = 0; i < self->ctl_len; i++) free(self->ctl[i].data);
    free(self->ctl);
    free(self->flows);
    free(self->free_slots);
    free(self->heap);
    free(self->lag.items);
    if (self->epfd >= 0) close(self->epfd);
    if (self->flow_ep >= 0) close(self->flow_ep);
    if (self->tfd >= 0) close(self->tfd);
    if (self->wake_fd >= 0) close(self->wake_fd);
    if (self->notify_fd >= 0) close(self->notify_fd);
    Py_XDECREF(self->bucket);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_start(Engine *self, PyObject *Py_UNUSED(ignored)) {
    if (self->started) Py_RETURN_NONE;
    if (self->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "engine not initialised");
        return NULL;
    }
    self->stop = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    /* A real-time caller (a benchmark at SCHED_FIFO) gets a sender one priority above
     * itself: the interpreter's own work never holds a frame back. */
    int policy;
    struct sched_param param;
    if (pthread_getschedparam(pthread_self(), &policy, &param) == 0 &&
        ((policy &= ~SCHED_RESET_ON_FORK) == SCHED_FIFO || policy == SCHED_RR) &&
        param.sched_priority < sched_get_priority_max(policy)) {
        param.sched_priority += 1;
        pthread_attr_setinheritsched(&attr, PTHREAD_EXPLICIT_SCHED);
        pthread_attr_setschedpolicy(&attr, policy);
        pthread_attr_setschedparam(&attr, &param);
    }
    int rc = pthread_create(&self->thread, &attr, engine_main, self);
    pthread_attr_destroy(&attr);
    if (rc == EPERM)  /* not allowed to raise the priority: an ordinary thread */
        rc = pthread_create(&self->thread, NULL, engine_main, self);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->started = 1;
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *self, PyObject *Py_UNUSED(ignored)) {
    stop_thread(self);
    Py_RETURN_NONE;
}

static int grow(Engine *self) {
    size_t cap = self->nflows ? self->nflows * 2 : 64;
    Flow *flows = realloc(self->flows, cap * sizeof *flows);
    if (flows == NULL) return -1;
    self->flows = flows;
    size_t *heap = realloc(self->heap, cap * sizeof *heap);
    if (heap == NULL) return -1;
    self->heap = heap;
    size_t *free_slots = realloc(self->free_slots, cap * sizeof *free_slots);
    if (free_slots == NULL) return -1;
    self->free_slots = free_slots;
    for (size_t i = cap; i > self->nflows; i--) {
        memset(&flows[i - 1], 0, sizeof *flows);
        free_slots[self->nfree++] = i - 1;
    }
    self->nflows = cap;
    return 0;
}

static Flow *find(Engine *self, long long id, size_t *slot_out) {
    for (size_t i = 0; i < self->nflows; i++) {
        if (self->flows[i].id == id) {
            if (slot_out) *slot_out = i;
            return &self->flows[i];
        }
    }
    return NULL;
}

/* A StreamStats starting point: (first or None, highest, window, received, reordered,
 * duplicates, delay_count, mean, m2, jitter, jitter_samples, last_transit or None,
 * received_bytes). Marks the flow as measuring its echoes. */
static int parse_stats(PyObject *stats, Flow *init) {
    PyObject *first, *last;
    unsigned long long window, received, reordered, duplicates, dcount, jsamples, bytes;
    long long highest;
    if (!PyArg_ParseTuple(stats, "OLKKKKKdddKOK", &first, &highest, &window, &received,
                          &reordered, &duplicates, &dcount, &init->mean, &init->m2,
                          &init->jitter, &jsamples, &last, &bytes))
        return -1;
    if (first != Py_None) {
        init->have_first = 1;
        init->first = PyLong_AsLongLong(first);
        if (init->first == -1 && PyErr_Occurred()) return -1;
    }
    if (last != Py_None) {
        init->have_last = 1;
        init->last_transit = PyFloat_AsDouble(last);
        if (init->last_transit == -1 && PyErr_Occurred()) return -1;
    }
    init->highest = highest;
    init->window = window;
    init->received = received;
    init->reordered = reordered;
    init->duplicates = duplicates;
    init->delay_count = dcount;
    init->jitter_samples = jsamples;
    init->received_bytes = bytes;
    init->measuring = 1;
    return 0;
}

/* add(fd, channel, interval, frame_bytes, first_due, read, stats) -> flow id
 * stats: None (echoes go to Python) or the StreamStats starting point
 * (first or None, highest, window, received, reordered, duplicates, delay_count, mean, m2,
 *  jitter, jitter_samples, last_transit or None, received_bytes). */
static PyObject *Engine_add(Engine *self, PyObject *args) {
    int fd, channel, frame_bytes, reading;
    double interval, first_due;
    PyObject *stats;
    if (!PyArg_ParseTuple(args, "iiddipO", &fd, &channel, &interval, &first_due, &frame_bytes,
                          &reading, &stats))
        return NULL;
    if (fd < 0 || channel < 0x4000 || channel > 0x4FFF || frame_bytes < MEDIA_HEADER ||
        frame_bytes > MAX_FRAME || !(interval > 0) || !isfinite(interval) ||
        !isfinite(first_due)) {
        PyErr_SetString(PyExc_ValueError, "bad flow parameters");
        return NULL;
    }
    Flow init = {0};
    if (stats != Py_None && parse_stats(stats, &init) < 0) return NULL;
    pthread_mutex_lock(&self->mu);
    if (self->nfree == 0 && grow(self) < 0) {
        pthread_mutex_unlock(&self->mu);
        return PyErr_NoMemory();
    }
    size_t slot = self->free_slots[--self->nfree];
    Flow *f = &self->flows[slot];
    *f = init;
    f->id = self->next_id++;
    f->fd = fd;
    f->channel = (uint16_t)channel;
    f->frame_bytes = (uint16_t)frame_bytes;
    f->interval = interval;
    f->next_due = first_due;
    if (reading) {
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = ((uint64_t)f->id << 32) | slot;
        if (epoll_ctl(self->flow_ep, EPOLL_CTL_ADD, fd, &ev) < 0 &&
            !(errno == EEXIST && epoll_ctl(self->flow_ep, EPOLL_CTL_MOD, fd, &ev) == 0)) {
            int err = errno;
            f->id = 0;
            self->free_slots[self->nfree++] = slot;
            pthread_mutex_unlock(&self->mu);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        /* a flow already reading this socket hands it over */
        for (size_t i = 0; i < self->nflows; i++)
            if (i != slot && self->flows[i].id && self->flows[i].fd == fd) self->flows[i].reading = 0;
        f->reading = 1;
    }
    heap_push(self, slot);
    long long id = f->id;
    pthread_mutex_unlock(&self->mu);
    wake(self);
    return PyLong_FromLongLong(id);
}

/* The statistics of a flow copied out under the mutex (taking its RTT samples), built
 * into Python objects after the mutex is released: the thread never waits for the
 * interpreter (its allocations, a garbage collection). */
static void snapshot(Flow *f, Flow *out) {
    *out = *f;
    memset(&f->rtt, 0, sizeof f->rtt);
    f->dirty = 0;
}

/* (id, sent, send_errors, stream numbers, rtt samples); frees the snapshot's samples. */
static PyObject *snapshot_stats(Flow *f) {
    PyObject *first = f->have_first ? PyLong_FromLongLong(f->first) : Py_NewRef(Py_None);
    PyObject *last = f->have_last ? PyFloat_FromDouble(f->last_transit) : Py_NewRef(Py_None);
    PyObject *rtt = samples_take(&f->rtt);
    free(f->rtt.items);
    memset(&f->rtt, 0, sizeof f->rtt);
    if (first == NULL || last == NULL || rtt == NULL) {
        Py_XDECREF(first);
        Py_XDECREF(last);
        Py_XDECREF(rtt);
        return NULL;
    }
    return Py_BuildValue("(LKK(NLKKKKKdddKNK)N)", f->id, (unsigned long long)f->sent,
                         (unsigned long long)f->send_errors, first, f->highest,
                         (unsigned long long)f->window, (unsigned long long)f->received,
                         (unsigned long long)f->reordered, (unsigned long long)f->duplicates,
                         (unsigned long long)f->delay_count, f->mean, f->m2, f->jitter,
                         (unsigned long long)f->jitter_samples, last,
                         (unsigned long long)f->received_bytes, rtt);
}

static void release_slot(Engine *self, size_t slot) {
    Flow *f = &self->flows[slot];
    for (size_t i = 0; i < self->heap_len; i++) {
        if (self->heap[i] == slot) {
            /* remove heap entry i: move the last one here and restore order */
            f->next_due = -INFINITY;
            while (i > 0) {
                size_t parent = (i - 1) / 2;
                heap_swap(self, parent, i);
                i = parent;
            }
            heap_pop(self);
            break;
        }
    }
    /* only the flow reading the socket has it in the epoll set (a later flow on the
     * same socket takes it over, see add) */
    if (f->reading) epoll_ctl(self->flow_ep, EPOLL_CTL_DEL, f->fd, NULL);
    free(f->rtt.items);  /* NULL after a snapshot */
    memset(f, 0, sizeof *f);
    self->free_slots[self->nfree++] = slot;
}

/* remove(id) -> the flow's final statistics (see collect), or None if unknown. After it
 * returns the engine no longer touches the socket. */
static PyObject *Engine_remove(Engine *self, PyObject *args) {
    long long id;
    if (!PyArg_ParseTuple(args, "L", &id)) return NULL;
    Flow copy;
    pthread_mutex_lock(&self->mu);
    size_t slot;
    Flow *f = find(self, id, &slot);
    if (f == NULL) {
        pthread_mutex_unlock(&self->mu);
        Py_RETURN_NONE;
    }
    snapshot(f, &copy);
    release_slot(self, slot);
    pthread_mutex_unlock(&self->mu);
    return snapshot_stats(&copy);
}

/* collect() -> list of (id, sent, send_errors, stats or None, rtt) for flows changed since
 * the last collect; rtt = (bucket indices as native uint32 bytes, total, min, max). */
static PyObject *Engine_collect(Engine *self, PyObject *Py_UNUSED(ignored)) {
    /* only this (GIL-holding) caller adds flows: nflows cannot grow meanwhile */
    size_t capacity = self->nflows, n = 0;
    Flow *copies = capacity ? malloc(capacity * sizeof *copies) : NULL;
    if (capacity && copies == NULL) return PyErr_NoMemory();
    pthread_mutex_lock(&self->mu);
    for (size_t i = 0; i < self->nflows && n < capacity; i++) {
        Flow *f = &self->flows[i];
        if (f->id && f->dirty) snapshot(f, &copies[n++]);
    }
    pthread_mutex_unlock(&self->mu);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; i < n; i++) {
        PyObject *item = snapshot_stats(&copies[i]);  /* frees the copy's samples */
        if (out != NULL && (item == NULL || PyList_Append(out, item) < 0)) Py_CLEAR(out);
        Py_XDECREF(item);
    }
    free(copies);
    return out;
}

/* collect_flow(id) -> the statistics of one flow (as collect), or None if unknown. */
static PyObject *Engine_collect_flow(Engine *self, PyObject *args) {
    long long id;
    if (!PyArg_ParseTuple(args, "L", &id)) return NULL;
    Flow copy;
    pthread_mutex_lock(&self->mu);
    Flow *f = find(self, id, NULL);
    if (f == NULL) {
        pthread_mutex_unlock(&self->mu);
        Py_RETURN_NONE;
    }
    snapshot(f, &copy);
    pthread_mutex_unlock(&self->mu);
    return snapshot_stats(&copy);
}

/* take_control() -> list of (id, data, arrival, errno) queued for Python. */
static PyObject *Engine_take_control(Engine *self, PyObject *Py_UNUSED(ignored)) {
    uint64_t drained;
    ssize_t r = read(self->notify_fd, &drained, sizeof drained);
    (void)r;
    pthread_mutex_lock(&self->mu);
    Control *ctl = self->ctl;
    size_t n = self->ctl_len;
    self->ctl = NULL;
    self->ctl_len = self->ctl_cap = 0;
    self->notified = 0;
    int failed = self->failed;
    self->failed = 0;  /* reported once */
    pthread_mutex_unlock(&self->mu);
    PyObject *out = PyList_New(0);
    for (size_t i = 0; i < n; i++) {
        if (out != NULL) {
            PyObject *item = Py_BuildValue("(Ly#di)", ctl[i].id, ctl[i].data ? ctl[i].data : "",
                                           (Py_ssize_t)ctl[i].len, ctl[i].arrival, ctl[i].error);
            if (item == NULL || PyList_Append(out, item) < 0) Py_CLEAR(out);
            Py_XDECREF(item);
        }
        free(ctl[i].data);
    }
    free(ctl);
    /* an allocation the thread could not make (a sample or a datagram lost) is counted,
     * never a reason to drop what was queued */
    self->memory_failures += (unsigned)failed;
    return out;
}

/* take_lag() -> (bucket indices, total, min, max) of send-timing errors since last time,
 * with the frames sent and refused so far and the seconds waited for the rate bucket. */
static PyObject *Engine_take_lag(Engine *self, PyObject *Py_UNUSED(ignored)) {
    pthread_mutex_lock(&self->mu);
    Samples lag = self->lag;
    memset(&self->lag, 0, sizeof self->lag);
    unsigned long long sent = self->sent, errors = self->send_errors;
    double waited = self->waited;
    pthread_mutex_unlock(&self->mu);
    PyObject *samples = samples_take(&lag);
    free(lag.items);
    if (samples == NULL) return NULL;
    return Py_BuildValue("(NKKd)", samples, sent, errors, waited);
}

static PyObject *Engine_notify_fd(Engine *self, void *closure) {
    return PyLong_FromLong(self->notify_fd);
}

static PyObject *Engine_flows(Engine *self, void *closure) {
    pthread_mutex_lock(&self->mu);
    size_t n = self->nflows - self->nfree;
    pthread_mutex_unlock(&self->mu);
    return PyLong_FromSize_t(n);
}

static PyObject *Engine_memory_failures(Engine *self, void *closure) {
    return PyLong_FromUnsignedLong(self->memory_failures);
}

static PyGetSetDef Engine_getset[] = {
    {"memory_failures", (getter)Engine_memory_failures, NULL,
     "Times the thread could not allocate (a sample or datagram lost)", NULL},
    {"notify_fd", (getter)Engine_notify_fd, NULL,
     "An eventfd that becomes readable when take_control() has something", NULL},
    {"flows", (getter)Engine_flows, NULL, "Flows registered", NULL},
    {NULL}};

static PyMethodDef Engine_methods[] = {
    {"start", (PyCFunction)Engine_start, METH_NOARGS, "Start the engine's thread"},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS, "Stop and join the engine's thread"},
    {"add", (PyCFunction)Engine_add, METH_VARARGS,
     "add(fd, channel, interval, first_due, frame_bytes, read, stats) -> id"},
    {"remove", (PyCFunction)Engine_remove, METH_VARARGS, "remove(id) -> final stats or None"},
    {"collect", (PyCFunction)Engine_collect, METH_NOARGS, "Statistics of changed flows"},
    {"collect_flow", (PyCFunction)Engine_collect_flow, METH_VARARGS,
     "collect_flow(id) -> statistics of one flow, or None"},
    {"take_control", (PyCFunction)Engine_take_control, METH_NOARGS,
     "Datagrams and errors queued for Python"},
    {"take_lag", (PyCFunction)Engine_take_lag, METH_NOARGS, "Send-timing samples and counters"},
    {NULL}};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "turnstorm._mediapump.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Engine_new,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
    .tp_doc = "Paced media sender and echo reader running in its own thread.",
};

/* measure(stats, echoes) -> the flow numbers and RTT samples after the echoes
 * [(seq, sent, received, size), ...], starting from `stats`: the engine's per-echo
 * arithmetic, for checking it against StreamStats.on_echo. */
static PyObject *measure(PyObject *module, PyObject *args) {
    PyObject *stats, *echoes;
    if (!PyArg_ParseTuple(args, "OO", &stats, &echoes)) return NULL;
    Flow f = {0};
    if (parse_stats(stats, &f) < 0) return NULL;
    PyObject *seq = PySequence_Fast(echoes, "echoes must be a sequence");
    if (seq == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        long long number;
        double sent, received;
        unsigned size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "LddI", &number, &sent,
                              &received, &size)) {
            Py_DECREF(seq);
            free(f.rtt.items);
            return NULL;
        }
        if (on_echo(&f, number, sent, received, size) < 0) {
            Py_DECREF(seq);
            free(f.rtt.items);
            return PyErr_NoMemory();
        }
    }
    Py_DECREF(seq);
    return snapshot_stats(&f);  /* frees the samples */
}

/* wake_lateness(seconds, interval) -> samples of how late this thread wakes from a
 * timerfd armed every `interval` seconds (absolute deadlines), for `seconds`: the floor
 * under any sender's timing on this machine (hypervisor steal, interrupts). */
static PyObject *wake_lateness(PyObject *module, PyObject *args) {
    double seconds, interval;
    if (!PyArg_ParseTuple(args, "dd", &seconds, &interval)) return NULL;
    if (!(seconds > 0 && seconds <= 60 && interval >= 1e-5 && interval <= 1)) {
        PyErr_SetString(PyExc_ValueError, "seconds must be in (0, 60], interval in [1e-5, 1]");
        return NULL;
    }
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    if (tfd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Samples lateness = {0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    double start = mono();
    for (double at = start + interval; at < start + seconds && !failed; at += interval) {
        struct itimerspec when = {0};
        when.it_value.tv_sec = (time_t)at;
        when.it_value.tv_nsec = (long)((at - (double)when.it_value.tv_sec) * 1e9);
        uint64_t expirations;
        if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &when, NULL) < 0 ||
            read(tfd, &expirations, sizeof expirations) < 0) {
            failed = errno ? errno : EIO;
            break;
        }
        if (samples_add(&lateness, (mono() - at) * 1e6) < 0) failed = ENOMEM;
    }
    Py_END_ALLOW_THREADS
    close(tfd);
    if (failed) {
        free(lateness.items);
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = samples_take(&lateness);
    free(lateness.items);
    return out;
}

static PyMethodDef module_methods[] = {
    {"measure", measure, METH_VARARGS,
     "measure(stats, echoes) -> (0, 0, 0, numbers, rtt samples) after the echoes"},
    {"wake_lateness", wake_lateness, METH_VARARGS,
     "wake_lateness(seconds, interval) -> (bucket indices, total, min, max) in us"},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "turnstorm._mediapump",
    "Native paced-media engine of the load generator (see loadgen/media.py).", -1,
    module_methods};

PyMODINIT_FUNC PyInit__mediapump(void) {
    if (PyType_Ready(&RateBucketType) < 0 || PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&RateBucketType);
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "RateBucket", (PyObject *)&RateBucketType) < 0 ||
        PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
