/*
 * bridge.c: the completion queue, its poller thread and the eventfd.
 *
 * The baton (DESIGN.md section 3): only the baton holder calls
 * grpc_completion_queue_next. When idle the poller holds it and blocks in
 * cq_next with no GIL; it takes exactly one event, parks it in the slot,
 * passes the baton to the loop and writes the eventfd. The loop then polls
 * the queue itself, non-blocking, until it has seen two empty polls in a row
 * (server.c), and hands the baton back with bridge_hand_back().
 *
 * This file never touches a Python object: the poller thread runs without
 * the GIL for its whole life.
 */
#include "bridge.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int
bridge_init(Bridge *b, Counters *counters)
{
    memset(b, 0, sizeof(*b));
    b->eventfd = -1;
    b->counters = counters;
    b->baton = BATON_POLLER;
    b->eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (b->eventfd < 0) {
        return -1;
    }
    int err = pthread_mutex_init(&b->mu, NULL);
    if (err != 0) {
        close(b->eventfd);
        b->eventfd = -1;
        errno = err;
        return -1;
    }
    err = pthread_cond_init(&b->cv, NULL);
    if (err != 0) {
        pthread_mutex_destroy(&b->mu);
        close(b->eventfd);
        b->eventfd = -1;
        errno = err;
        return -1;
    }
    b->cq = grpc_completion_queue_create_for_next(NULL);
    return 0;
}

/* Called with mu held: wake the loop. The slot was empty (the poller only
 * fills it while holding the baton, and the loop empties it before it polls),
 * so every write here is an empty -> non-empty edge. */
static void
wake_loop_locked(Bridge *b)
{
    uint64_t one = 1;
    ssize_t n;
    do {
        n = write(b->eventfd, &one, sizeof(one));
    } while (n < 0 && errno == EINTR);
    /* EAGAIN means the counter is saturated: the loop is already woken. */
    /* Pollers of several servers add to the one module-wide counter, each
     * under its own mutex: the increment must be atomic. */
    __atomic_fetch_add(&b->counters->eventfd_writes, 1, __ATOMIC_RELAXED);
}

static void *
poller_main(void *arg)
{
    Bridge *b = (Bridge *)arg;
    pthread_mutex_lock(&b->mu);
    for (;;) {
        while (b->baton != BATON_POLLER && !b->stop) {
            pthread_cond_wait(&b->cv, &b->mu);
        }
        if (b->stop) {
            break;
        }
        pthread_mutex_unlock(&b->mu);
        grpc_event ev = grpc_completion_queue_next(
            b->cq, gpr_inf_future(GPR_CLOCK_MONOTONIC), NULL);
        pthread_mutex_lock(&b->mu);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            b->queue_shutdown_seen = 1;
            b->baton = BATON_LOOP;
            break;
        }
        if (ev.type == GRPC_QUEUE_TIMEOUT) {
            continue;   /* cannot happen with an infinite deadline */
        }
        b->slot = ev;
        b->slot_full = 1;
        b->baton = BATON_LOOP;
        b->pending_empty = 0;
        wake_loop_locked(b);
    }
    pthread_mutex_unlock(&b->mu);
    return NULL;
}

int
bridge_start(Bridge *b)
{
    int err = pthread_create(&b->thread, NULL, poller_main, b);
    if (err == 0) {
        b->thread_started = 1;
    }
    return err;
}

int
bridge_take(Bridge *b, grpc_event *ev)
{
    int have = 0;
    pthread_mutex_lock(&b->mu);
    if (b->slot_full) {
        *ev = b->slot;
        b->slot_full = 0;
        have = 1;
    }
    pthread_mutex_unlock(&b->mu);
    if (have) {
        b->counters->events_via_ring++;
    }
    return have;
}

void
bridge_ack_wakeup(Bridge *b)
{
    uint64_t value;
    ssize_t n;
    do {
        n = read(b->eventfd, &value, sizeof(value));
    } while (n < 0 && errno == EINTR);
    /* EAGAIN: nothing to read (a spurious callback); harmless. */
}

grpc_event
bridge_poll(Bridge *b, int look)
{
    grpc_event ev = grpc_completion_queue_next(
        b->cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_QUEUE_TIMEOUT && ((++b->empty_polls & 3) == 0 || look)) {
        /* A batch completed on this thread kicks the pollset while nobody
         * polls it; the next poll then only consumes that kick and returns
         * empty without reading the sockets (epoll1: kicked_without_poller).
         * A server streaming without pause would then never read its
         * sockets (cancels, other clients, pings starve). So every fourth
         * empty answer is polled once more, which looks at the sockets;
         * doing it every time cost streaming about 10% (each costs an
         * epoll_wait). */
        ev = grpc_completion_queue_next(b->cq, gpr_inf_past(GPR_CLOCK_MONOTONIC),
                                        NULL);
    }
    if (ev.type == GRPC_OP_COMPLETE) {
        b->counters->events_inline++;
    }
    return ev;
}

void
bridge_hand_back(Bridge *b)
{
    pthread_mutex_lock(&b->mu);
    b->baton = BATON_POLLER;
    b->pending_empty = 0;
    b->counters->baton_to_poller++;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

int
bridge_loop_holds_baton(Bridge *b)
{
    pthread_mutex_lock(&b->mu);
    int held = b->baton == BATON_LOOP;
    pthread_mutex_unlock(&b->mu);
    return held;
}

void
bridge_stop_and_join(Bridge *b)
{
    if (!b->thread_started) {
        return;
    }
    pthread_mutex_lock(&b->mu);
    b->stop = 1;
    pthread_cond_signal(&b->cv);
    pthread_mutex_unlock(&b->mu);
    pthread_join(b->thread, NULL);
    b->thread_started = 0;
    /* From here on only the caller's thread touches the queue. */
    b->baton = BATON_LOOP;
}

void
bridge_destroy(Bridge *b)
{
    if (b->cq != NULL) {
        grpc_completion_queue_destroy(b->cq);
        b->cq = NULL;
    }
    if (b->eventfd >= 0) {
        close(b->eventfd);
        b->eventfd = -1;
    }
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
}
