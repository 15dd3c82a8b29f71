/* The engine thread: continuous batching over every adapter at once.
 *
 * A step: finish what was cancelled; admit waiting requests while KV blocks and max_seqs allow;
 * build one batch (a decode token for each running request that has finished its prompt, then
 * prefill chunks within max_batch_tokens); order it so rows of the same adapter mix are
 * adjacent (one delta group each); run the forward pass; sample and report. When the KV cache
 * runs out mid-step, the most recently admitted request is preempted: its blocks are freed and
 * it goes back to the head of the queue, to be recomputed (prompt + what it generated so far).
 *
 * Fairness: a free slot goes to a preempted request first, then to a waiting request of the
 * adapter (the first of its mix; the base counts as one adapter) with the fewest sequences
 * running, and among those the adapter admitted least recently (round robin); an adapter at
 * max_per_adapter running sequences is passed over. Within an adapter the order is FIFO. So
 * one busy adapter cannot starve the others, even with a single slot.
 * A request too large for the free KV blocks waits at its turn: smaller ones do not overtake
 * it, so it is not starved either. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/engine.h"
#include "adapterd/util.h"

struct ad_request {
    atomic_int refs;
    atomic_int finish_req; /* enum ad_finish asked for by another thread, or 0 */
    struct ad_request *next; /* waiting queue link (guarded by the engine lock) */
    bool preempted;          /* back in the queue after a preemption: admitted first */

    /* The sequence: virtual tokens (prompt tuning), the prompt, then what was generated. */
    int32_t *tokens;
    int n_tokens, cap, n_input, n_virtual, n_prompt;
    int max_tokens, min_tokens, n_logprobs;
    bool ignore_eos, prompt_logprobs;
    struct ad_sampler sampler;
    struct ad_mix mix; /* holds one reference per adapter */
    uint64_t mix_key;  /* identifies the mix's adapters and weights in the prefix cache */
    ad_request_cb cb;
    void *ud;

    /* engine thread only */
    struct ad_kv_seq seq;
    int n_cached;         /* tokens of `tokens` whose K/V are in the cache */
    int n_generated;
    int n_prompt_reported; /* prompt tokens already reported (not again after a preemption) */
    int n_prompt_cached;   /* prompt tokens found in the prefix cache at the first admission */
    bool admitted;         /* once admitted (a preempted request stays so) */
    float *carry;          /* the last logits row of a prompt chunk, for the next chunk's first */
};

#define RECENT_ADAPTERS 64 /* adapters remembered for round robin; the rest count as never */

struct ad_engine {
    const struct ad_model *m;
    struct ad_engine_config cfg;
    pthread_t thread;

    pthread_mutex_t lock; /* guards the queue, stop and the stats */
    pthread_cond_t cond;
    struct ad_request *wait_head, *wait_tail;
    int n_waiting;
    bool stop;
    struct ad_engine_stats stats;

    /* admission order of adapters, for round robin (guarded by the lock) */
    struct {
        const void *who;
        uint64_t tick;
    } recent[RECENT_ADAPTERS];
    uint64_t tick;

    /* engine thread only */
    struct ad_kv kv;
    struct ad_scratch *scratch;
    struct ad_request **running; /* in admission order */
    int n_running;
    struct ad_chunk *chunks;
    struct ad_request **chunk_req;
    float *logits, *work;
    size_t logits_cap;
};

/* ==========================================================================================
 * Requests */

struct ad_request *ad_request_unref(struct ad_request *r)
{
    if (!r || atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return NULL;
    for (int i = 0; i < r->mix.n; i++)
        ad_adapter_unref(r->mix.a[i]);
    free(r->tokens);
    free(r->carry);
    free(r);
    return NULL;
}

/* The prefix cache's key of a mix: 0 for the base, else a keyed hash of its adapters' serials
 * and weights (a replaced adapter gets a new serial, so its old K/V are never found). */
static uint64_t mix_key(const struct ad_engine *e, const struct ad_mix *mix)
{
    struct {
        uint64_t serial;
        float w;
        uint32_t pad;
    } id[AD_MIX_MAX];
    if (mix->n == 0)
        return 0;
    memset(id, 0, sizeof(id));
    for (int i = 0; i < mix->n; i++) {
        id[i].serial = mix->a[i]->serial;
        id[i].w = mix->w[i];
    }
    return ad_kv_hash(&e->kv, id, (size_t)mix->n * sizeof(id[0]));
}

static void drop_mix(struct ad_mix *mix)
{
    for (int i = 0; i < mix->n; i++)
        ad_adapter_unref(mix->a[i]);
    mix->n = 0;
}

int ad_engine_submit(struct ad_engine *e, const struct ad_request_params *p, ad_request_cb cb,
                     void *ud, struct ad_request **ret, struct ad_err *err)
{
    struct ad_mix mix = p->mix;
    const struct ad_model_config *c = &e->m->cfg;
    struct ad_request *r = NULL;
    int rc;

    if (p->n_prompt < 1) {
        rc = ad_err_set(err, -EINVAL, "the prompt is empty");
        goto fail;
    }
    if (p->max_tokens < 0 || p->min_tokens < 0 || p->n_logprobs > AD_MAX_LOGPROBS ||
        !(p->temperature >= 0) || !(p->top_p > 0 && p->top_p <= 1) || p->top_k < 0) {
        rc = ad_err_set(err, -EINVAL, "invalid sampling parameters");
        goto fail;
    }
    for (int i = 0; i < p->n_prompt; i++)
        if (p->prompt[i] < 0 || p->prompt[i] >= c->n_vocab) {
            rc = ad_err_set(err, -EINVAL, "token id %d is outside the vocabulary (%d)",
                            p->prompt[i], c->n_vocab);
            goto fail;
        }
    if (mix.n && (rc = ad_mix_validate(&mix, err)) < 0)
        goto fail;
    int n_virtual = mix.n ? ad_mix_n_virtual(&mix) : 0, n_prefix = mix.n ? ad_mix_n_prefix(&mix) : 0;
    int max_tokens = p->max_tokens;
    long room = (long)c->n_ctx_max - n_prefix - n_virtual - p->n_prompt;
    if (p->max_tokens_fit && max_tokens > room && room >= 1)
        max_tokens = (int)room;
    long need = (long)n_prefix + n_virtual + p->n_prompt + max_tokens;
    if (need > c->n_ctx_max) {
        rc = ad_err_set(err, -E2BIG, "this model's maximum context length is %d tokens; the "
                        "request needs %ld (%d prompt + %d max_tokens%s)", c->n_ctx_max, need,
                        p->n_prompt, max_tokens,
                        n_prefix + n_virtual ? " + the adapter's virtual tokens" : "");
        goto fail;
    }
    /* a prefix-tuning adapter's virtual K/V is read from the adapter, not cached */
    if (ad_kv_blocks_for(&e->kv, (int)(need - n_prefix)) > e->kv.n_blocks) {
        rc = ad_err_set(err, -E2BIG, "the request needs %ld tokens of KV cache; the pool holds %d",
                        need - n_prefix, e->kv.n_blocks * e->kv.block_size);
        goto fail;
    }

    r = calloc(1, sizeof(*r));
    if (r) {
        r->cap = n_virtual + p->n_prompt + max_tokens + 1;
        r->tokens = malloc((size_t)r->cap * sizeof(int32_t));
    }
    if (!r || !r->tokens) {
        free(r);
        r = NULL;
        rc = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    atomic_init(&r->refs, 2); /* the caller's and the engine's */
    atomic_init(&r->finish_req, 0);
    for (int i = 0; i < n_virtual; i++)
        r->tokens[i] = -1 - i;
    memcpy(r->tokens + n_virtual, p->prompt, (size_t)p->n_prompt * sizeof(int32_t));
    r->n_virtual = n_virtual;
    r->n_prompt = p->n_prompt;
    r->n_tokens = r->n_input = n_virtual + p->n_prompt;
    r->max_tokens = max_tokens;
    r->min_tokens = p->min_tokens;
    r->ignore_eos = p->ignore_eos;
    r->n_logprobs = p->n_logprobs;
    r->prompt_logprobs = p->prompt_logprobs;
    ad_sampler_init(&r->sampler, p->temperature, p->top_k, p->top_p, p->seed);
    r->mix = mix;
    r->mix_key = mix_key(e, &mix);
    r->cb = cb;
    r->ud = ud;

    pthread_mutex_lock(&e->lock);
    if (e->stop || e->n_waiting >= e->cfg.max_queue) {
        bool stopping = e->stop;
        pthread_mutex_unlock(&e->lock);
        r->mix.n = 0; /* given back below */
        free(r->tokens);
        free(r);
        r = NULL;
        rc = stopping ? ad_err_set(err, -ESHUTDOWN, "the server is shutting down")
                      : ad_err_set(err, -EBUSY, "the queue is full (%d waiting)",
                                   e->cfg.max_queue);
        goto fail;
    }
    if (e->wait_tail)
        e->wait_tail->next = r;
    else
        e->wait_head = r;
    e->wait_tail = r;
    e->n_waiting++;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    *ret = r;
    return 0;
fail:
    drop_mix(&mix);
    return rc;
}

void ad_engine_finish(struct ad_engine *e, struct ad_request *r, enum ad_finish finish)
{
    int none = 0;
    if (atomic_compare_exchange_strong(&r->finish_req, &none, (int)finish)) {
        pthread_mutex_lock(&e->lock);
        pthread_cond_signal(&e->cond);
        pthread_mutex_unlock(&e->lock);
    }
}

/* ==========================================================================================
 * The step loop (engine thread) */

/* The pool's figures in the stats. Called with the lock held. */
static void kv_stats(struct ad_engine *e)
{
    e->stats.kv_blocks_free = e->kv.n_free;
    e->stats.kv_blocks_cached = e->kv.n_cached;
}

static void finish(struct ad_engine *e, struct ad_request *r, enum ad_finish why,
                   const char *error)
{
    struct ad_event ev = {.done = true, .finish = why, .error = error, .logprob = NAN,
                          .n_prompt_tokens = r->n_prompt, .n_cached_tokens = r->n_prompt_cached,
                          .n_generated = r->n_generated};
    ad_kv_seq_release(&e->kv, &r->seq);
    pthread_mutex_lock(&e->lock); /* current before the caller hears of the end */
    kv_stats(e);
    pthread_mutex_unlock(&e->lock);
    r->cb(r, &ev, r->ud);
    ad_request_unref(r);
}

static void remove_running(struct ad_engine *e, int i)
{
    memmove(&e->running[i], &e->running[i + 1],
            (size_t)(e->n_running - i - 1) * sizeof(*e->running));
    e->n_running--;
}

/* The adapter a request is accounted to for fairness: the first of its mix, NULL for the base. */
static const void *owner(const struct ad_request *r)
{
    return r->mix.n ? (const void *)r->mix.a[0] : NULL;
}

static int running_of(const struct ad_engine *e, const void *who)
{
    int n = 0;
    for (int i = 0; i < e->n_running; i++)
        n += owner(e->running[i]) == who;
    return n;
}

/* When an adapter last got a slot (0: not among the last RECENT_ADAPTERS). */
static uint64_t last_admitted(const struct ad_engine *e, const void *who)
{
    for (int i = 0; i < RECENT_ADAPTERS; i++)
        if (e->recent[i].tick && e->recent[i].who == who)
            return e->recent[i].tick;
    return 0;
}

static void note_admitted(struct ad_engine *e, const void *who)
{
    int slot = 0;
    for (int i = 0; i < RECENT_ADAPTERS; i++) {
        if (e->recent[i].tick && e->recent[i].who == who) {
            slot = i;
            break;
        }
        if (e->recent[i].tick < e->recent[slot].tick) /* the oldest entry, or a free one */
            slot = i;
    }
    e->recent[slot].who = who;
    e->recent[slot].tick = ++e->tick;
}

/* The link to the waiting request that gets the next slot (see the top of the file), or NULL.
 * Looks at the first FAIR_WINDOW waiting requests, so admission stays cheap with long queues.
 * Called with the lock held. */
#define FAIR_WINDOW 128
static struct ad_request **pick_waiting(struct ad_engine *e)
{
    struct ad_request **best = NULL;
    int best_n = 0, seen = 0;
    uint64_t best_tick = 0;
    if (e->wait_head && e->wait_head->preempted)
        return &e->wait_head;
    for (struct ad_request **pp = &e->wait_head; *pp && seen < FAIR_WINDOW;
         pp = &(*pp)->next, seen++) {
        const void *who = owner(*pp);
        int n = running_of(e, who);
        if (e->cfg.max_per_adapter > 0 && n >= e->cfg.max_per_adapter)
            continue;
        uint64_t tick = last_admitted(e, who);
        /* strictly better only: the oldest request of an adapter wins */
        if (!best || n < best_n || (n == best_n && tick < best_tick)) {
            best = pp;
            best_n = n;
            best_tick = tick;
        }
    }
    return best;
}

/* Attaches the KV blocks of the request's longest cached prefix (whole blocks, and never its
 * last token, whose logits it needs). Returns the tokens found, or -1 if it did not look: the
 * cache is off, or the request reports its prompt's logprobs (and so computes them all). */
static int match_prefix(struct ad_engine *e, struct ad_request *r)
{
    if (!e->cfg.prefix_cache || r->prompt_logprobs)
        return -1;
    int n_prefix = r->mix.n ? ad_mix_n_prefix(&r->mix) : 0;
    r->n_cached = ad_kv_seq_match(&e->kv, &r->seq, r->mix_key, n_prefix, r->tokens,
                                  r->n_tokens - 1);
    return r->n_cached;
}

/* Moves cancelled waiting requests out, and admits what fits. Returns false to stop. */
static bool admit(struct ad_engine *e)
{
    struct ad_request *cancelled = NULL;

    pthread_mutex_lock(&e->lock);
    for (;;) {
        /* cancelled while waiting: out of the queue */
        for (struct ad_request **pp = &e->wait_head; *pp;) {
            struct ad_request *r = *pp;
            if (atomic_load(&r->finish_req)) {
                *pp = r->next;
                e->n_waiting--;
                r->next = cancelled;
                cancelled = r;
            } else {
                pp = &r->next;
            }
        }
        e->wait_tail = e->wait_head;
        while (e->wait_tail && e->wait_tail->next)
            e->wait_tail = e->wait_tail->next;

        while (e->wait_head && e->n_running < e->cfg.max_seqs) {
            struct ad_request **pp = pick_waiting(e);
            if (!pp)
                break; /* every waiting adapter is at max_per_adapter */
            struct ad_request *r = *pp;
            /* a prefix takes no block; keep a block of headroom per running sequence for its
             * next decode. The prompt is not looked up (hashed) when not even a hit on all its
             * whole blocks would make it fit: a full pool does not cost a lookup per step. */
            int need = ad_kv_blocks_for(&e->kv, r->n_tokens + 1);
            bool may_fit =
                need - (r->n_tokens - 1) / e->kv.block_size <= e->kv.n_free - e->n_running;
            int hit = may_fit ? match_prefix(e, r) : -1;
            need -= r->seq.n_blocks;
            if (need > e->kv.n_free - e->n_running) {
                ad_kv_seq_release(&e->kv, &r->seq); /* the blocks found stay published */
                r->n_cached = 0;
                break;
            }
            if (hit >= 0) {
                e->stats.prefix_queries += (uint64_t)r->n_tokens;
                e->stats.prefix_hits += (uint64_t)hit;
            }
            if (!r->admitted) {
                int p = r->n_cached - r->n_virtual;
                r->n_prompt_cached = p < 0 ? 0 : p < r->n_prompt ? p : r->n_prompt;
                r->admitted = true;
            }
            *pp = r->next;
            if (e->wait_tail == r) { /* r was last: the tail is the one before it */
                e->wait_tail = NULL;
                for (struct ad_request *q = e->wait_head; q; q = q->next)
                    e->wait_tail = q;
            }
            r->next = NULL;
            r->preempted = false;
            e->n_waiting--;
            e->running[e->n_running++] = r;
            note_admitted(e, owner(r));
        }
        e->stats.waiting = e->n_waiting;
        e->stats.running = e->n_running;
        kv_stats(e);
        if (e->n_running == 0 && e->n_waiting == 0) /* idle: every block must be back */
            e->stats.kv_blocks_leaked = e->kv.n_blocks - e->kv.n_free;
        if (e->stop || e->n_running > 0 || cancelled)
            break;
        pthread_cond_wait(&e->cond, &e->lock);
    }
    bool stop = e->stop;
    pthread_mutex_unlock(&e->lock);

    while (cancelled) {
        struct ad_request *r = cancelled;
        cancelled = r->next;
        finish(e, r, (enum ad_finish)atomic_load(&r->finish_req), NULL);
    }
    return !stop;
}

/* Frees the blocks of the most recently admitted request and puts it back at the head of the
 * queue, to be recomputed later. */
static void preempt(struct ad_engine *e)
{
    struct ad_request *r = e->running[e->n_running - 1];
    e->n_running--;
    ad_kv_seq_release(&e->kv, &r->seq);
    r->n_cached = 0;
    r->preempted = true;
    pthread_mutex_lock(&e->lock);
    r->next = e->wait_head;
    e->wait_head = r;
    if (!e->wait_tail)
        e->wait_tail = r;
    e->n_waiting++;
    e->stats.preemptions++;
    pthread_mutex_unlock(&e->lock);
}

static bool same_mix(const struct ad_mix *a, const struct ad_mix *b)
{
    if (a->n != b->n)
        return false;
    for (int i = 0; i < a->n; i++)
        if (a->a[i] != b->a[i] || a->w[i] != b->w[i])
            return false;
    return true;
}

static int cmp_mix(const struct ad_mix *a, const struct ad_mix *b)
{
    if (a->n != b->n)
        return a->n < b->n ? -1 : 1;
    for (int i = 0; i < a->n; i++) {
        if (a->a[i] != b->a[i])
            return (uintptr_t)a->a[i] < (uintptr_t)b->a[i] ? -1 : 1;
        if (a->w[i] != b->w[i])
            return a->w[i] < b->w[i] ? -1 : 1;
    }
    return 0;
}

/* Builds the batch into e->chunks; returns the number of chunks. Rows of equal mixes end up
 * adjacent and share one mix pointer, so the forward pass makes one delta group of them. */
static int build_batch(struct ad_engine *e)
{
    int n = 0, budget = e->cfg.max_batch_tokens;

    for (int pass = 0; pass < 2; pass++) /* decodes first, then prefill chunks */
        for (int i = 0; i < e->n_running && budget > 0; i++) {
            struct ad_request *r = e->running[i];
            int left = r->n_tokens - r->n_cached;
            bool decode = r->n_cached >= r->n_input && left == 1;
            if (decode != (pass == 0) || left < 1)
                continue;
            int take = left < budget ? left : budget;
            bool reports_prompt = r->prompt_logprobs && r->n_prompt_reported < r->n_prompt;
            e->chunks[n] = (struct ad_chunk){.seq = &r->seq, .tokens = r->tokens + r->n_cached,
                                             .n_tokens = take, .all_logits = reports_prompt,
                                             .ctx = r->mix.n ? &r->mix : NULL};
            e->chunk_req[n++] = r;
            budget -= take;
        }
    /* insertion sort by mix (the chunks' ctx; batches are small), then share the first pointer of each run */
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0; j--) {
            const struct ad_mix *a = e->chunks[j - 1].ctx, *b = e->chunks[j].ctx;
            int c = !a ? (b ? -1 : 0) : !b ? 1 : cmp_mix(a, b);
            if (c <= 0)
                break;
            struct ad_chunk tc = e->chunks[j];
            struct ad_request *tr = e->chunk_req[j];
            e->chunks[j] = e->chunks[j - 1];
            e->chunk_req[j] = e->chunk_req[j - 1];
            e->chunks[j - 1] = tc;
            e->chunk_req[j - 1] = tr;
        }
    for (int i = 1; i < n; i++)
        if (e->chunks[i].ctx && e->chunks[i - 1].ctx &&
            same_mix(e->chunks[i].ctx, e->chunks[i - 1].ctx))
            e->chunks[i].ctx = e->chunks[i - 1].ctx;
    return n;
}

/* Top-N of log-probabilities lp. */
static int top_n(const float *lp, int V, int n, int32_t *ids, float *vals)
{
    int k = 0;
    for (int i = 0; i < V; i++) {
        if (k == n && lp[i] <= vals[k - 1])
            continue;
        int j = k < n ? k++ : n - 1;
        while (j > 0 && vals[j - 1] < lp[i]) {
            vals[j] = vals[j - 1];
            ids[j] = ids[j - 1];
            j--;
        }
        vals[j] = lp[i];
        ids[j] = i;
    }
    return k;
}

static void emit_token(struct ad_engine *e, struct ad_request *r, const float *logits,
                       int32_t tok, bool is_prompt)
{
    struct ad_event ev = {.token = tok, .is_prompt = is_prompt, .logprob = NAN};
    int V = e->m->cfg.n_vocab;
    if (logits && r->n_logprobs >= 0) {
        float *lp = e->work; /* 2 V floats; sampling is done with it */
        ad_log_softmax(logits, V, lp);
        ev.logprob = lp[tok];
        ev.n_top = top_n(lp, V, r->n_logprobs, ev.top_ids, ev.top_logprobs);
    }
    r->cb(r, &ev, r->ud);
}

/* After a forward pass: report prompt tokens, sample, finish. logits points at the chunk's
 * rows (all of them, or its last). Returns true if the request finished. */
static bool after_chunk(struct ad_engine *e, struct ad_request *r, const struct ad_chunk *ch,
                        float *logits)
{
    const struct ad_model_config *c = &e->m->cfg;
    int V = c->n_vocab, start = r->n_cached;

    r->n_cached += ch->n_tokens;
    if (ch->all_logits) {
        /* prompt token t (t >= 1) gets its logprob from the row of token t - 1 */
        for (int i = 0; i < ch->n_tokens; i++) {
            int pos = start + i - r->n_virtual; /* prompt index of this row's token */
            if (pos < 0 || pos >= r->n_prompt || pos < r->n_prompt_reported)
                continue;
            const float *prev = pos == 0 ? NULL
                                : i > 0     ? logits + (size_t)(i - 1) * V
                                            : r->carry;
            emit_token(e, r, prev, r->tokens[start + i], true);
            r->n_prompt_reported = pos + 1;
        }
        if (r->n_cached < r->n_input && r->n_prompt_reported < r->n_prompt) {
            if (!r->carry)
                r->carry = malloc((size_t)V * sizeof(float));
            if (r->carry) /* without it the next token's logprob is NAN: nothing worse */
                memcpy(r->carry, logits + (size_t)(ch->n_tokens - 1) * V,
                       (size_t)V * sizeof(float));
        }
        logits += (size_t)(ch->n_tokens - 1) * V;
    }
    if (r->n_cached < r->n_tokens)
        return false; /* more prompt to prefill */
    if (r->n_generated >= r->max_tokens) {
        finish(e, r, AD_FINISH_LENGTH, NULL);
        return true;
    }
    if (r->n_generated < r->min_tokens)
        for (int i = 0; i < c->n_eos; i++)
            logits[c->eos_ids[i]] = -INFINITY;
    int32_t tok = ad_sampler_sample(&r->sampler, logits, V, e->work);
    emit_token(e, r, logits, tok, false);
    r->tokens[r->n_tokens++] = tok;
    r->n_generated++;
    pthread_mutex_lock(&e->lock);
    e->stats.tokens_generated++;
    pthread_mutex_unlock(&e->lock);
    if (!r->ignore_eos && ad_model_is_eos(c, tok)) {
        finish(e, r, AD_FINISH_STOP, NULL);
        return true;
    }
    if (r->n_generated >= r->max_tokens) {
        finish(e, r, AD_FINISH_LENGTH, NULL);
        return true;
    }
    return false;
}

static int ensure_logits(struct ad_engine *e, int n_rows)
{
    size_t need = (size_t)n_rows * (size_t)e->m->cfg.n_vocab;
    if (need <= e->logits_cap)
        return 0;
    float *p = realloc(e->logits, need * sizeof(float));
    if (!p)
        return -ENOMEM;
    e->logits = p;
    e->logits_cap = need;
    return 0;
}

static void step(struct ad_engine *e)
{
    struct ad_err err;

    /* requests finished from outside */
    for (int i = 0; i < e->n_running;) {
        struct ad_request *r = e->running[i];
        int why = atomic_load(&r->finish_req);
        if (why) {
            remove_running(e, i);
            finish(e, r, (enum ad_finish)why, NULL);
        } else {
            i++;
        }
    }
    if (e->n_running == 0)
        return;

    for (;;) {
        int n = build_batch(e);
        if (n == 0)
            return;
        int rows = ad_batch_n_logits(e->chunks, n);
        if (ensure_logits(e, rows) < 0) {
            while (e->n_running > 0) {
                struct ad_request *r = e->running[--e->n_running];
                finish(e, r, AD_FINISH_ERROR, "out of memory");
            }
            return;
        }
        int rc = ad_model_forward(e->m, &e->kv, e->chunks, n, &ad_mix_hooks, e->scratch,
                                  e->logits, &err);
        if (rc == -ENOSPC && e->n_running > 1) {
            preempt(e);
            continue;
        }
        if (rc < 0) {
            /* cannot run even alone: fail the newest request, keep the others */
            struct ad_request *r = e->running[--e->n_running];
            finish(e, r, AD_FINISH_ERROR, rc == -ENOSPC ? "KV cache exhausted" : err.msg);
            continue;
        }
        if (e->cfg.prefix_cache) /* before a finished request releases its blocks */
            for (int i = 0; i < n; i++)
                ad_kv_seq_publish(&e->kv, &e->chunk_req[i]->seq, e->chunk_req[i]->mix_key,
                                  e->chunk_req[i]->tokens);
        int prefilled = 0;
        float *lg = e->logits;
        for (int i = 0; i < n; i++) {
            struct ad_request *r = e->chunk_req[i];
            int r_rows = e->chunks[i].all_logits ? e->chunks[i].n_tokens : 1;
            if (e->chunks[i].n_tokens > 1 || r->n_cached < r->n_input)
                prefilled += e->chunks[i].n_tokens;
            if (after_chunk(e, r, &e->chunks[i], lg))
                for (int k = 0; k < e->n_running; k++)
                    if (e->running[k] == r) {
                        remove_running(e, k);
                        break;
                    }
            lg += (size_t)r_rows * (size_t)e->m->cfg.n_vocab;
        }
        pthread_mutex_lock(&e->lock);
        e->stats.steps++;
        e->stats.tokens_prefilled += (uint64_t)prefilled;
        e->stats.running = e->n_running;
        kv_stats(e);
        pthread_mutex_unlock(&e->lock);
        return;
    }
}

static void *engine_main(void *arg)
{
    struct ad_engine *e = arg;
    while (admit(e))
        step(e);
    /* stopping: everything left is cancelled */
    while (e->n_running > 0) {
        struct ad_request *r = e->running[--e->n_running];
        finish(e, r, AD_FINISH_CANCELLED, NULL);
    }
    pthread_mutex_lock(&e->lock);
    struct ad_request *w = e->wait_head;
    e->wait_head = e->wait_tail = NULL;
    e->n_waiting = 0;
    pthread_mutex_unlock(&e->lock);
    while (w) {
        struct ad_request *next = w->next;
        finish(e, w, AD_FINISH_CANCELLED, NULL);
        w = next;
    }
    return NULL;
}

/* ==========================================================================================
 * Lifetime */

int ad_engine_new(const struct ad_model *m, const struct ad_engine_config *cfg,
                  struct ad_engine **ret, struct ad_err *err)
{
    struct ad_engine *e = calloc(1, sizeof(*e));
    int rc;

    if (!e)
        return ad_err_set(err, -ENOMEM, "out of memory");
    if (cfg->kv_blocks < 1 || cfg->kv_block_size < 1 || cfg->max_batch_tokens < 1 ||
        cfg->max_seqs < 1 || cfg->max_queue < 0) {
        free(e);
        return ad_err_set(err, -EINVAL, "invalid engine configuration");
    }
    e->m = m;
    e->cfg = *cfg;
    rc = ad_kv_init(&e->kv, &m->cfg, cfg->kv_blocks, cfg->kv_block_size);
    if (rc < 0) {
        free(e);
        return ad_err_set(err, rc, "cannot allocate a KV cache of %d blocks of %d tokens",
                          cfg->kv_blocks, cfg->kv_block_size);
    }
    e->scratch = ad_scratch_new();
    e->running = calloc((size_t)cfg->max_seqs, sizeof(*e->running));
    e->chunks = calloc((size_t)cfg->max_seqs, sizeof(*e->chunks));
    e->chunk_req = calloc((size_t)cfg->max_seqs, sizeof(*e->chunk_req));
    e->work = malloc(2 * (size_t)m->cfg.n_vocab * sizeof(float));
    if (!e->scratch || !e->running || !e->chunks || !e->chunk_req || !e->work) {
        rc = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    e->stats.kv_blocks_total = cfg->kv_blocks;
    e->stats.kv_blocks_free = e->kv.n_free;
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc != 0) {
        rc = ad_err_set(err, -rc, "cannot start the engine thread");
        pthread_mutex_destroy(&e->lock);
        pthread_cond_destroy(&e->cond);
        goto fail;
    }
    *ret = e;
    return 0;
fail:
    ad_kv_fini(&e->kv);
    ad_scratch_free(e->scratch);
    free(e->running);
    free(e->chunks);
    free(e->chunk_req);
    free(e->work);
    free(e);
    return rc;
}

void ad_engine_free(struct ad_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->lock);
    e->stop = true;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->thread, NULL);
    ad_kv_fini(&e->kv);
    ad_scratch_free(e->scratch);
    free(e->running);
    free(e->chunks);
    free(e->chunk_req);
    free(e->logits);
    free(e->work);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->cond);
    free(e);
}

void ad_engine_stats(struct ad_engine *e, struct ad_engine_stats *ret)
{
    pthread_mutex_lock(&e->lock);
    *ret = e->stats;
    pthread_mutex_unlock(&e->lock);
}
