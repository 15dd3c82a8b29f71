/* A small pool of helper threads for the forward pass: the calling thread and n - 1 helpers
 * share the items of one job (rows of a matrix-vector product, heads of a decode attention).
 *
 * It is the forward pass's only threading: OpenBLAS runs single-threaded inside its items
 * (forward.c slices every sgemm). Why not OpenBLAS's threads: at batch 1 every linear is a
 * matrix-vector product of a few microseconds to a few milliseconds, 211 of them per decode
 * step. OpenBLAS's threads wait for work by calling sched_yield, a system call, which is
 * expensive in a VM; measured, a quarter of a batch-1 decode step went there, and in bigger
 * batches its spinning workers competed with these helpers for the cores. These helpers wait
 * by spinning on one atomic word (with the pause instruction) for a short while and then sleep
 * on a condition variable.
 *
 * Work sharing: items are claimed one at a time from an atomic counter, so a helper that is
 * late (asleep, or preempted by another process on a shared machine) does not hold the caller
 * up: the caller claims whatever is left and only waits for items a helper has already started.
 * The counter and the job's generation share one 64-bit word, so a helper that wakes up late
 * can never claim an item of a newer job with the parameters of an older one; and a finished
 * job is closed (its counter set past any item) before the next one is written, so it cannot
 * claim an item past the end of an older job with the parameters of a newer one either.
 *
 * A helper preempted in the middle of an item still holds the caller up until it runs again,
 * which on a machine busy with other processes costs milliseconds per job: measured there, two
 * threads ran at half the speed of one. So the caller keeps a moving average of the share of a
 * job's time it spends waiting for helpers (beyond about one item's time, which any job of few
 * items waits), and when it exceeds AD_POOL_LATE it runs the next AD_POOL_SOLO jobs alone, then
 * tries the helpers again. */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "adapterd/util.h"
#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define AD_POOL_MAX 16        /* threads, the caller included */
#define AD_POOL_SPIN_SEC 1e-3 /* how long an idle helper spins before it sleeps (spin mode) */
#define AD_POOL_LATE 0.3      /* share of a job's time spent waiting for helpers: go solo */
#define AD_POOL_SOLO 1024     /* jobs run without helpers then */

struct ad_pool;

/* What a helper thread is started with. */
struct helper_arg {
    struct ad_pool *p;
    int thread; /* 1, 2, ... (the caller is 0) */
};

struct ad_pool {
    int n_threads; /* running helpers + 1 (the caller) */
    pthread_t tid[AD_POOL_MAX];
    struct helper_arg arg[AD_POOL_MAX];

    /* The job in progress: written by the caller before it publishes a new generation.
     * Atomic because a late helper may read them while they change; acquire/release so that a
     * helper that reads the next job's values also sees the job before it closed (work()). */
    _Atomic(ad_pool_fn *) fn;
    _Atomic(void *) ctx;
    _Atomic int n_items;

    /* (generation << 32) | next unclaimed item: claimed with compare-and-swap. */
    _Atomic uint64_t state;
    _Atomic int n_done;     /* items of the current job finished */
    _Atomic bool spin;      /* helpers spin between jobs (set per pass by the caller) */
    _Atomic int n_sleeping; /* helpers in (or entering) cond_wait */
    _Atomic bool stop;

    /* The caller's own: see the top of the file. */
    double late; /* moving average of the share of a job's time spent waiting */
    int solo;    /* jobs left to run without the helpers */

    pthread_mutex_t lock; /* guards the sleep and wake-up only */
    pthread_cond_t wake;
};

static uint32_t gen_of(uint64_t state)
{
    return (uint32_t)(state >> 32);
}

/* The item part of a finished job's state: no claim can succeed on it (see ad_pool_run). */
#define AD_POOL_CLOSED UINT32_MAX

/* Claims and runs items of generation gen until none is left. Returns when this thread cannot
 * claim any more (the job may still be running on other threads), with the number it ran. */
static int work(struct ad_pool *p, uint32_t gen, int thread)
{
    uint64_t st = atomic_load_explicit(&p->state, memory_order_acquire);
    int n_run = 0;
    for (;;) {
        if (gen_of(st) != gen)
            return n_run;
        /* Read the job before claiming: if the claim succeeds, the job was still this one
         * when it was read. The caller closes a job (AD_POOL_CLOSED) before it writes the next
         * one, so a claim made with the next job's n_items but an older state (all items
         * claimed, the next generation not yet published) fails. */
        ad_pool_fn *fn = atomic_load_explicit(&p->fn, memory_order_acquire);
        void *ctx = atomic_load_explicit(&p->ctx, memory_order_acquire);
        int n_items = atomic_load_explicit(&p->n_items, memory_order_acquire);
        uint32_t item = (uint32_t)st;
        if (item >= (uint32_t)n_items)
            return n_run;
        if (!atomic_compare_exchange_weak_explicit(&p->state, &st, st + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue; /* st now holds the current value */
        fn(ctx, (int)item, thread);
        n_run++;
        atomic_fetch_add_explicit(&p->n_done, 1, memory_order_release);
        st = atomic_load_explicit(&p->state, memory_order_acquire);
    }
}

static void *helper(void *arg_)
{
    struct helper_arg *arg = arg_;
    struct ad_pool *p = arg->p;
    uint32_t seen = 0; /* ad_pool_new starts the helpers before the first job (generation 1) */

    for (;;) {
        /* Spin for a new generation while the caller says more jobs follow soon. */
        double t0 = 0;
        for (unsigned i = 0; atomic_load_explicit(&p->spin, memory_order_relaxed); i++) {
            if (gen_of(atomic_load_explicit(&p->state, memory_order_acquire)) != seen)
                break;
            cpu_relax();
            if (i % 256 == 255) {
                double now = ad_now();
                if (t0 == 0)
                    t0 = now;
                else if (now - t0 > AD_POOL_SPIN_SEC)
                    break;
            }
        }
        /* Sleep until a new generation (or stop). n_sleeping is raised before the check, so a
         * caller that publishes after the check sees it and signals (see ad_pool_run). */
        if (gen_of(atomic_load_explicit(&p->state, memory_order_acquire)) == seen) {
            pthread_mutex_lock(&p->lock);
            atomic_fetch_add(&p->n_sleeping, 1);
            while (gen_of(atomic_load(&p->state)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->wake, &p->lock);
            atomic_fetch_sub(&p->n_sleeping, 1);
            pthread_mutex_unlock(&p->lock);
        }
        if (atomic_load(&p->stop))
            return NULL;

        seen = gen_of(atomic_load_explicit(&p->state, memory_order_acquire));
        work(p, seen, arg->thread);
    }
}

struct ad_pool *ad_pool_new(int n_threads)
{
    if (n_threads > AD_POOL_MAX)
        n_threads = AD_POOL_MAX;
    if (n_threads <= 1)
        return NULL;
    struct ad_pool *p = calloc(1, sizeof(*p));
    if (!p)
        return NULL;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        free(p);
        return NULL;
    }
    if (pthread_cond_init(&p->wake, NULL) != 0) {
        pthread_mutex_destroy(&p->lock);
        free(p);
        return NULL;
    }
    p->n_threads = 1;
    for (int i = 1; i < n_threads; i++) {
        p->arg[i] = (struct helper_arg){p, i};
        if (pthread_create(&p->tid[i], NULL, helper, &p->arg[i]) != 0)
            break; /* fewer helpers than asked for still work */
        p->n_threads++;
    }
    if (p->n_threads == 1) {
        ad_pool_free(p);
        return NULL;
    }
    return p;
}

void ad_pool_free(struct ad_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 1; i < p->n_threads; i++)
        pthread_join(p->tid[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

int ad_pool_threads(const struct ad_pool *p)
{
    return p ? p->n_threads : 1;
}

void ad_pool_spin(struct ad_pool *p, bool on)
{
    if (p)
        atomic_store_explicit(&p->spin, on, memory_order_relaxed);
}

void ad_pool_run(struct ad_pool *p, int n_items, ad_pool_fn *fn, void *ctx)
{
    if (!p || n_items <= 1 || p->solo > 0) {
        if (p && p->solo > 0)
            p->solo--;
        for (int i = 0; i < n_items; i++)
            fn(ctx, i, 0);
        return;
    }
    double t0 = ad_now();
    /* Publish: the job first, then the new generation with item 0 (release). */
    atomic_store_explicit(&p->fn, fn, memory_order_release);
    atomic_store_explicit(&p->ctx, ctx, memory_order_release);
    atomic_store_explicit(&p->n_items, n_items, memory_order_release);
    atomic_store_explicit(&p->n_done, 0, memory_order_relaxed);
    uint32_t gen = gen_of(atomic_load_explicit(&p->state, memory_order_relaxed)) + 1;
    atomic_store(&p->state, (uint64_t)gen << 32); /* seq_cst: ordered before the load below */
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->lock);
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
    }

    int n_run = work(p, gen, 0);
    /* Every item is claimed; wait for those the helpers are still running. */
    double t1 = ad_now();
    for (unsigned i = 0; atomic_load_explicit(&p->n_done, memory_order_acquire) < n_items; i++) {
        cpu_relax();
        if (i % 4096 == 4095)
            sched_yield(); /* a helper was preempted: let it run */
    }
    /* Close the job before the next one is written: a helper that read the state while the
     * last items were running, and n_items after the next job changed it, would otherwise
     * claim an item past the end of this job (and run it with the next job's fn and ctx, and
     * count it as done in the next job). acq_rel: the next job's stores stay after it. */
    atomic_exchange_explicit(&p->state, ((uint64_t)gen << 32) | AD_POOL_CLOSED,
                             memory_order_acq_rel);
    double t2 = ad_now();
    /* Waiting up to about an item's time is the job's granularity, not a late helper: a job
     * of 2 or 3 items of different sizes (the adapter deltas of q, k and v at batch 1) waits
     * for most of one. Allow twice the caller's mean item; a preempted helper costs far more. */
    if (n_run == 0)
        return; /* the helpers took every item: nothing to compare with */
    double wait = (t2 - t1) - 2 * (t1 - t0) / n_run;
    p->late = 0.95 * p->late + 0.05 * (wait > 0 ? wait : 0) / (t2 - t0 + 1e-9);
    if (p->late > AD_POOL_LATE) {
        p->late = 0;
        p->solo = AD_POOL_SOLO;
    }
}
