/* The batched forward pass: every chunk of every sequence in one pass, each linear (site) one
 * matrix product for all rows, attention per sequence over its paged KV cache.
 *
 * Row layout: the batch's T rows are the chunks' tokens, chunk after chunk. The q, k and v of a
 * row sit side by side in one buffer ([q | k | v], row stride ld_qkv), which is also what GPT-2's
 * fused c_attn produces, so both families share the attention code.
 *
 * Threads: all of a pass's threading is the scratch's pool (pool.c: this thread plus helpers,
 * ad_model_set_threads in all), and OpenBLAS runs single-threaded inside its items. A linear
 * over a few rows (decode) runs on the matvec kernel, one item per block of output rows; over
 * more rows, each item is an sgemm of a slice of the weight's output columns (or, from 256
 * rows, of x's rows). Prefill attention is one item per block of queries of one head, decode
 * attention one per (KV head, sequence); the adapter deltas (LoRA, DoRA, IA3 output scaling,
 * bias swaps) one per block of up to 8 rows of a group. So a
 * step never has two sets of threads waiting for work, and the helpers keep spinning between
 * the jobs of a pass (the deltas' job right after its linear starts at once). */
#include <assert.h>
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapterd/model.h"
#include "adapterd/util.h"
#include "internal.h"

/* ==========================================================================================
 * Scratch buffers */

enum {
    BUF_X,   /* [T, E] residual stream */
    BUF_XN,  /* [T, E] normed input of a sub-layer */
    BUF_QKV, /* [T, Hq + 2 KVd] */
    BUF_ATT, /* [T, Hq] attention output */
    BUF_Y,   /* [T, E] sub-layer output */
    BUF_FA,  /* [T, F] */
    BUF_FB,  /* [T, F] */
    BUF_COS, /* [T, hd / 2] */
    BUF_SIN, /* [T, hd / 2] */
    BUF_KG,  /* [ctx, KVd] gathered keys of one sequence (prefill chunks) */
    BUF_VG,  /* [ctx, KVd] */
    BUF_S,   /* [chunk, ctx] attention scores, one such block per pool thread */
    BUF_XO,  /* [n_logits, E] rows that produce logits */
    BUF_TMP, /* adapter deltas' work space; during a post_item job, pool thread t owns floats
              * [t AD_HOOK_LOCAL_TMP, (t + 1) AD_HOOK_LOCAL_TMP) */
    N_BUF,
};

/* A run of rows that share one hooks context (one mix of adapters). */
struct group {
    int r0, n;
    const void *ctx;
    bool x_scaled; /* set by sites_groups for the site in progress */
};

/* A chunk of one token (a decode step) and its row. */
struct dec_chunk {
    int chunk, row;
};

struct ad_scratch {
    float *buf[N_BUF];
    size_t cap[N_BUF];
    int32_t *pos; /* [T] */
    size_t pos_cap;
    struct group *groups;
    size_t groups_cap;
    int n_groups;
    struct dec_chunk *dec; /* [n_chunks] the batch's one-token chunks */
    size_t dec_cap;
    int n_dec;
    struct post_item *post; /* the items of a post_item job */
    size_t post_cap;

    const struct ad_kernels *k;
    const struct ad_hooks *hooks; /* of the pass in progress */
    struct ad_pool *pool; /* NULL: one thread */
    bool pool_tried;      /* the pool is started by the first pass */
};

static _Atomic int forward_threads;

void ad_model_set_threads(int n)
{
    atomic_store(&forward_threads, n);
    openblas_set_num_threads(1);
}

int ad_model_threads(void)
{
    int n = atomic_load(&forward_threads);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? n : ncpu > 0 ? (int)ncpu : 1;
}

struct ad_scratch *ad_scratch_new(void)
{
    return calloc(1, sizeof(struct ad_scratch));
}

void ad_scratch_free(struct ad_scratch *s)
{
    if (!s)
        return;
    for (int i = 0; i < N_BUF; i++)
        free(s->buf[i]);
    free(s->pos);
    free(s->groups);
    free(s->dec);
    free(s->post);
    ad_pool_free(s->pool);
    free(s);
}

static int reserve(float **p, size_t *cap, size_t n, size_t elem)
{
    if (n <= *cap)
        return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < n)
        c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q)
        return -ENOMEM;
    *p = q;
    *cap = c;
    return 0;
}

/* ==========================================================================================
 * Kernels */


/* A few sites that read the same rows of x (q, k, v; or gate, up), as one job for the pool: the
 * items are blocks of output rows of the sites one after the other. */
struct matvec_job {
    const struct ad_kernels *k;
    const float *x;
    int ldx, n_x, ldy, n_parts;
    struct {
        const struct ad_site *site;
        float *y;
        int first_item, rows; /* its items start at first_item, each is rows output rows */
    } part[3];
};

static void matvec_item(void *ctx, int item, int thread)
{
    const struct matvec_job *j = ctx;
    int p = 0;
    while (p + 1 < j->n_parts && item >= j->part[p + 1].first_item)
        p++;
    const struct ad_site *site = j->part[p].site;
    int j0 = (item - j->part[p].first_item) * j->part[p].rows;
    int j1 = j0 + j->part[p].rows < site->n_out ? j0 + j->part[p].rows : site->n_out;
    j->k->matvec(site->w, site->n_in, j->x, j->ldx, j->n_x, j->part[p].y, j->ldy, j0, j1);
    (void)thread;
}

/* Columns [c0, c1) of y[n, n_out] (row stride ldy) = x[n, n_in] (row stride ldx) W^T, one
 * single-threaded BLAS call. */
static void blas_linear(const struct ad_site *st, const float *x, int ldx, int n, float *y,
                        int ldy, int c0, int c1)
{
    if (st->w_in_out && n == 1)
        cblas_sgemv(CblasRowMajor, CblasTrans, st->n_in, c1 - c0, 1.0f, st->w + c0, st->n_out,
                    x, 1, 0.0f, y + c0, 1);
    else if (st->w_in_out)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, c1 - c0, st->n_in, 1.0f, x,
                    ldx, st->w + c0, st->n_out, 0.0f, y + c0, ldy);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, c1 - c0, st->n_in, 1.0f, x, ldx,
                    st->w + (size_t)c0 * (size_t)st->n_in, st->n_in, 0.0f, y + c0, ldy);
}

/* Sites over more rows than the matvec kernel takes: each item is one slice of one site, of
 * its output columns (decode batches: each item packs its columns of W, which dominate) or of
 * the rows of x (prefill: each item packs its rows of x, which then dominate). Slices are
 * multiples of 16 wide; the last one takes the rest. */
struct sgemm_job {
    const struct ad_site *const *sites;
    float *const *ys;
    const float *x;
    int ldx, n, ldy, slices; /* slices per site */
    bool by_rows;
};

static void slice(int n, int k, int slices, int *lo, int *hi)
{
    *lo = (int)((int64_t)n * k / slices) & ~15;
    *hi = k + 1 == slices ? n : (int)((int64_t)n * (k + 1) / slices) & ~15;
}

static void sgemm_item(void *ctx, int item, int thread)
{
    const struct sgemm_job *j = ctx;
    int i = item / j->slices, k = item % j->slices, lo, hi;
    const struct ad_site *st = j->sites[i];
    if (j->by_rows) {
        slice(j->n, k, j->slices, &lo, &hi);
        if (hi > lo)
            blas_linear(st, j->x + (size_t)lo * (size_t)j->ldx, j->ldx, hi - lo,
                        j->ys[i] + (size_t)lo * (size_t)j->ldy, j->ldy, 0, st->n_out);
    } else {
        slice(st->n_out, k, j->slices, &lo, &hi);
        if (hi > lo)
            blas_linear(st, j->x, j->ldx, j->n, j->ys[i], j->ldy, lo, hi);
    }
    (void)thread;
}

/* Rows from which an sgemm job slices x instead of W. */
#define AD_SGEMM_ROW_SPLIT 256

/* Slices per site of an sgemm job: two per thread, so that the threads finish close together
 * when one of them is late; whole sites (one slice) when there is only one thread. Measured at
 * batch 32 on the 135M model: two and four per thread were equal, eight slower. */
#define AD_SGEMM_SLICES_PER_THREAD 2

/* y_i[n, n_out] (row stride ldy) = x[n, n_in] (row stride ldx) W_i^T + b_i for n_sites (<= 3)
 * sites: one pool job for all, on the matvec kernel (up to AD_MATVEC_MAX_ROWS rows) or sgemm
 * slices. */
static void linear(struct ad_scratch *s, const struct ad_site *const *sites, int n_sites,
                   const float *x, int ldx, int n, float *const *ys, int ldy)
{
    bool own = n <= AD_MATVEC_MAX_ROWS;
    for (int i = 0; i < n_sites; i++)
        own = own && !sites[i]->w_in_out; /* GPT-2's Conv1D layout: OpenBLAS's sgemv */
    if (!own) {
        struct sgemm_job job = {sites, ys, x, ldx, n, ldy, 1, n >= AD_SGEMM_ROW_SPLIT};
        if (ad_pool_threads(s->pool) > 1)
            job.slices = AD_SGEMM_SLICES_PER_THREAD * ad_pool_threads(s->pool);
        ad_pool_run(s->pool, n_sites * job.slices, sgemm_item, &job);
    } else {
        struct matvec_job job = {.k = s->k, .x = x, .ldx = ldx, .n_x = n, .ldy = ldy,
                                 .n_parts = n_sites};
        int n_items = 0, n_threads = ad_pool_threads(s->pool);
        for (int i = 0; i < n_sites; i++) {
            /* About 8 items per thread, so that the threads finish close together; 4 to 64
             * rows each. */
            int rows = (sites[i]->n_out + 8 * n_threads - 1) / (8 * n_threads);
            rows = rows < 4 ? 4 : rows > 64 ? 64 : (rows + 3) / 4 * 4;
            job.part[i].site = sites[i];
            job.part[i].y = ys[i];
            job.part[i].first_item = n_items;
            job.part[i].rows = rows;
            n_items += (sites[i]->n_out + rows - 1) / rows;
        }
        ad_pool_run(s->pool, n_items, matvec_item, &job);
    }
    for (int i = 0; i < n_sites; i++) {
        const struct ad_site *st = sites[i];
        if (st->b)
            for (int r = 0; r < n; r++) {
                float *row = ys[i] + (size_t)r * (size_t)ldy;
                for (int j = 0; j < st->n_out; j++)
                    row[j] += st->b[j];
            }
    }
}

static void rmsnorm(const float *x, const float *w, int n, float eps, float *out)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float scale = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        out[i] = x[i] * scale * w[i];
}

static void layernorm(const float *x, const float *w, const float *b, int n, float eps,
                      float *out)
{
    double mean = 0, var = 0;
    for (int i = 0; i < n; i++)
        mean += x[i];
    mean /= n;
    for (int i = 0; i < n; i++)
        var += ((double)x[i] - mean) * ((double)x[i] - mean);
    float scale = (float)(1.0 / sqrt(var / n + eps));
    for (int i = 0; i < n; i++)
        out[i] = ((float)(x[i] - mean)) * scale * w[i] + b[i];
}

static void norm_rows(const struct ad_model *m, const float *w, const float *b, const float *x,
                      int n_rows, float *out)
{
    int E = m->cfg.n_embd;
    for (int r = 0; r < n_rows; r++) {
        if (m->arch->layer_norm)
            layernorm(x + (size_t)r * E, w, b, E, m->cfg.norm_eps, out + (size_t)r * E);
        else
            rmsnorm(x + (size_t)r * E, w, E, m->cfg.norm_eps, out + (size_t)r * E);
    }
}

/* A layer's norm over every row, with each group's adapters free to replace the parameters. */
static void norm_groups(const struct ad_model *m, const struct ad_scratch *s, int layer,
                        enum ad_norm_slot slot, const float *x, float *out)
{
    const struct ad_layer *L = layer >= 0 ? &m->layers[layer] : NULL;
    const float *bw = slot == AD_NORM_FINAL ? m->final_norm_w
                      : slot == AD_NORM_ATTN ? L->norm1_w : L->norm2_w;
    const float *bb = slot == AD_NORM_FINAL ? m->final_norm_b
                      : slot == AD_NORM_ATTN ? L->norm1_b : L->norm2_b;
    size_t E = (size_t)m->cfg.n_embd;

    for (int g = 0; g < s->n_groups; g++) {
        const struct group *G = &s->groups[g];
        const float *w = bw, *b = bb;
        if (G->ctx && s->hooks->norm)
            s->hooks->norm(G->ctx, layer, slot, &w, &b);
        norm_rows(m, w, b, x + (size_t)G->r0 * E, G->n, out + (size_t)G->r0 * E);
    }
}

/* The adapter deltas of one sites_groups call as one pool job: an item is a block of up to
 * AD_POST_ROWS rows of one group, at every site of the call whose hook runs on the adapters' own
 * kernels (hooks->site_post_local: no BLAS call, so it may run on a helper). Adapters are
 * read-only, x is read-only once the input-side deltas are applied, and each item writes only
 * its own rows; each thread has its own AD_HOOK_LOCAL_TMP floats of BUF_TMP. One item takes all
 * sites (q, k and v; or gate and up) so that one thread reads one adapter's factors for them
 * in a row, where the loader put them next to each other. Items are claimed one by one, so
 * groups of different costs (mixes of several adapters, a prefill chunk beside decode rows)
 * balance out; each item reads its adapter's factors again, from cache after the first. */
#define AD_POST_ROWS 8

struct post_item {
    int r0, n;          /* rows [r0, r0 + n) of the batch, all in group */
    unsigned sites;     /* bit i: site i of the call */
    const struct group *group;
};

struct post_job {
    const struct ad_hooks *hooks;
    const struct ad_site *const *sites;
    int n_sites;
    const struct post_item *items;
    int ldx, ldy;
    const float *x;
    float *const *ys;
    float *tmp; /* thread t's work space starts at tmp + t * AD_HOOK_LOCAL_TMP */
};

static void post_item(void *ctx, int item, int thread)
{
    const struct post_job *j = ctx;
    const struct post_item *it = &j->items[item];
    for (int i = 0; i < j->n_sites; i++)
        if (it->sites & (1u << i))
            j->hooks->site_post(it->group->ctx, j->sites[i],
                             j->x + (size_t)it->r0 * (size_t)j->ldx, j->ldx,
                             it->group->x_scaled, j->ys[i] + (size_t)it->r0 * (size_t)j->ldy,
                             j->ldy, it->n, j->tmp + (size_t)thread * AD_HOOK_LOCAL_TMP,
                             AD_HOOK_LOCAL_TMP);
}

/* Sites over every row: one matrix product (or one pool job) for the whole batch, then each
 * group's adapter deltas on its own rows. Several sites (q, k, v; gate, up) read the same x and
 * write to ys[i] with one row stride. x_exclusive (one site only): no other site reads x, so
 * input-side deltas may scale it in place (on this thread, before the linear). The deltas that
 * call BLAS (replaced modules, IA3 on a shared input) run on this thread with the whole work
 * space; the others are one pool job (post_item). */
static void sites_groups(const struct ad_site *const *sites, int n_sites, struct ad_scratch *s,
                         float *x, int ldx, bool x_exclusive, int T, float *const *ys, int ldy)
{
    assert(n_sites == 1 || !x_exclusive);
    assert(n_sites <= 3);
    for (int g = 0; g < s->n_groups; g++) {
        struct group *G = &s->groups[g];
        G->x_scaled = x_exclusive && G->ctx && s->hooks->site_pre &&
                      s->hooks->site_pre(G->ctx, sites[0], x + (size_t)G->r0 * ldx, ldx, G->n);
    }
    linear(s, sites, n_sites, x, ldx, T, ys, ldy);

    int n_items = 0;
    for (int g = 0; g < s->n_groups; g++) {
        const struct group *G = &s->groups[g];
        unsigned local = 0;
        if (!G->ctx || !s->hooks->site_post)
            continue;
        for (int i = 0; i < n_sites; i++) {
            if (s->hooks->site_post_local && s->hooks->site_post_local(G->ctx, sites[i],
                                                                       G->x_scaled))
                local |= 1u << i;
            else
                s->hooks->site_post(G->ctx, sites[i], x + (size_t)G->r0 * ldx, ldx, G->x_scaled,
                                 ys[i] + (size_t)G->r0 * ldy, ldy, G->n, s->buf[BUF_TMP],
                                 s->cap[BUF_TMP]);
        }
        for (int r = 0; local && r < G->n; r += AD_POST_ROWS)
            s->post[n_items++] = (struct post_item){
                G->r0 + r, G->n - r < AD_POST_ROWS ? G->n - r : AD_POST_ROWS, local, G};
    }
    struct post_job job = {s->hooks, sites, n_sites, s->post, ldx, ldy, x, ys, s->buf[BUF_TMP]};
    ad_pool_run(s->pool, n_items, post_item, &job);
}

static void site_groups(const struct ad_site *site, struct ad_scratch *s, float *x, int ldx,
                        bool x_exclusive, int T, float *y, int ldy)
{
    sites_groups(&site, 1, s, x, ldx, x_exclusive, T, &y, ldy);
}

static void sublayer_groups(const struct ad_model *m, struct ad_scratch *s, int layer,
                            enum ad_norm_slot slot, const float *x, float *y)
{
    size_t E = (size_t)m->cfg.n_embd;
    for (int g = 0; g < s->n_groups; g++) {
        const struct group *G = &s->groups[g];
        if (G->ctx && s->hooks->sublayer)
            s->hooks->sublayer(G->ctx, layer, slot, x + (size_t)G->r0 * E, y + (size_t)G->r0 * E,
                            G->n, s->buf[BUF_TMP], s->cap[BUF_TMP]);
    }
}

/* Softmax of row[0..n) in place; entries outside [lo, hi) become 0. */
static void softmax_range(const struct ad_kernels *k, float *row, int n, int lo, int hi)
{
    float mx = -INFINITY;
    for (int j = lo; j < hi; j++)
        mx = row[j] > mx ? row[j] : mx;
    float inv = 1.0f / k->exp_sum(row + lo, hi - lo, mx);
    for (int j = 0; j < lo; j++)
        row[j] = 0;
    for (int j = lo; j < hi; j++)
        row[j] *= inv;
    for (int j = hi; j < n; j++)
        row[j] = 0;
}

/* ==========================================================================================
 * Attention of one chunk in one layer */

/* The cache slot of position pos (>= s->n_shared) of a sequence's keys (base kv->k) or values
 * (kv->v) in a layer: slot pos - n_shared of its block table. */
static float *kv_slot(const struct ad_kv *kv, float *base, int layer, const struct ad_kv_seq *s,
                      int pos)
{
    int i = pos - s->n_shared;
    size_t block = (size_t)s->blocks[i / kv->block_size];
    size_t slot = (size_t)(i % kv->block_size);
    size_t per_layer = (size_t)kv->n_blocks * (size_t)kv->block_size * (size_t)kv->kv_dim;
    return base + (size_t)layer * per_layer +
           (block * (size_t)kv->block_size + slot) * (size_t)kv->kv_dim;
}

/* The shared prefix of a chunk's sequence in a layer: its keys (kv = 0) or values (kv = 1) as
 * [seq->n_shared, KVd], borrowed from the hooks (the request holds its adapters); NULL if the
 * sequence has none. */
static const float *shared_prefix(const struct ad_hooks *h, const struct ad_chunk *ch, int layer,
                                  int kv)
{
    return ch->seq->n_shared > 0 ? h->prefix(ch->ctx, layer, kv) : NULL;
}

/* Prefix positions and virtual tokens of a chunk's context (0 for the base). */
static int n_prefix_of(const struct ad_hooks *h, const void *ctx)
{
    return ctx && h && h->n_prefix ? h->n_prefix(ctx) : 0;
}

static int n_virtual_of(const struct ad_hooks *h, const void *ctx)
{
    return ctx && h && h->n_virtual ? h->n_virtual(ctx) : 0;
}

/* Gathers positions [lo, hi) of a sequence's K (or V) into dst [hi - lo, KVd]: the shared
 * prefix's, then runs of cache slots block by block. */
static void kv_gather(const struct ad_kv *kv, float *base, const float *prefix, int layer,
                      const struct ad_kv_seq *s, int lo, int hi, float *dst)
{
    int B = kv->block_size;
    size_t KVd = (size_t)kv->kv_dim;
    int p = lo;
    if (p < s->n_shared) {
        int n = (hi < s->n_shared ? hi : s->n_shared) - p;
        memcpy(dst, prefix + (size_t)p * KVd, (size_t)n * KVd * sizeof(float));
        dst += (size_t)n * KVd;
        p += n;
    }
    while (p < hi) {
        int n = B - (p - s->n_shared) % B;
        if (n > hi - p)
            n = hi - p;
        memcpy(dst, kv_slot(kv, base, layer, s, p), (size_t)n * KVd * sizeof(float));
        dst += (size_t)n * KVd;
        p += n;
    }
}

/* The first position a query at position p sees: p - W + 1 under a sliding window of W (> 0),
 * else 0. */
static int first_key(int p, int W)
{
    return W > 0 && p - W + 1 > 0 ? p - W + 1 : 0;
}

/* One block of up to AD_ATTN_QBLOCK queries of one head of a prefill chunk: scores against
 * the keys the block's queries see (up to its last query's position: a causal chunk's blocks
 * skip the keys after them, half the work of the whole square on long prompts), causal
 * softmax, weighted values. */
struct head_job {
    const struct ad_kernels *k;
    const float *q, *kg, *vg;
    float *att, *S; /* S: thread t's scores at S + t * n * nk */
    int ld_q, ld_att, hd, kvd, group, n, nk, pos0, lo, W, n_blocks;
    float scale;
};

#define AD_ATTN_QBLOCK 64

static void head_item(void *ctx, int item, int thread)
{
    const struct head_job *j = ctx;
    int h = item / j->n_blocks, b = item % j->n_blocks;
    int hd = j->hd, lo = j->lo, W = j->W;
    int q0 = b * AD_ATTN_QBLOCK, q1 = q0 + AD_ATTN_QBLOCK < j->n ? q0 + AD_ATTN_QBLOCK : j->n;
    /* keys [k0, k1) of the gathered [lo, hi): those of positions up to the last query's */
    int p0 = j->pos0 + q0;
    int k0 = first_key(p0, W) - lo, k1 = j->pos0 + q1 - lo, nk = k1 - k0;
    const float *qh = j->q + (size_t)q0 * (size_t)j->ld_q + h * hd;
    const float *kh = j->kg + (size_t)k0 * (size_t)j->kvd + (h / j->group) * hd;
    const float *vh = j->vg + (size_t)k0 * (size_t)j->kvd + (h / j->group) * hd;
    float *S = j->S + (size_t)thread * (size_t)j->n * (size_t)j->nk;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, q1 - q0, nk, hd, j->scale, qh, j->ld_q,
                kh, j->kvd, 0.0f, S, nk);
    for (int i = q0; i < q1; i++) {
        int p = j->pos0 + i; /* query position: sees keys [first_key(p), p] */
        softmax_range(j->k, S + (size_t)(i - q0) * nk, nk, first_key(p, W) - lo - k0,
                      p + 1 - lo - k0);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, q1 - q0, hd, nk, 1.0f, S, nk, vh,
                j->kvd, 0.0f, j->att + (size_t)q0 * (size_t)j->ld_att + h * hd, j->ld_att);
}

/* q holds the chunk's n queries (already rotated), one row each; their keys and values are
 * already in the cache at positions [pos0, pos0 + n), pos0 = ch->seq->n_tokens. Writes n att
 * rows. For chunks of more than one token (prefill): the keys and values are gathered, then
 * one pool job, an item per block of queries of one head (two sgemm calls). */
static void attend_chunk(const struct ad_model *m, const struct ad_kv *kv, struct ad_scratch *s,
                         int layer, const struct ad_chunk *ch, const float *q, int ld_q,
                         float *att, int ld_att)
{
    const struct ad_model_config *c = &m->cfg;
    const struct ad_kv_seq *seq = ch->seq;
    int W = c->sliding_window;
    int pos0 = seq->n_tokens, n = ch->n_tokens, hi = pos0 + n;
    int lo = first_key(pos0, W);
    float *kg = s->buf[BUF_KG], *vg = s->buf[BUF_VG];

    kv_gather(kv, kv->k, shared_prefix(s->hooks, ch, layer, 0), layer, seq, lo, hi, kg);
    kv_gather(kv, kv->v, shared_prefix(s->hooks, ch, layer, 1), layer, seq, lo, hi, vg);
    int n_blocks = (n + AD_ATTN_QBLOCK - 1) / AD_ATTN_QBLOCK;
    struct head_job j = {s->k, q, kg, vg, att, s->buf[BUF_S], ld_q, ld_att, c->head_dim,
                         kv->kv_dim, c->n_head / c->n_kv_head, n, hi - lo, pos0, lo, W, n_blocks,
                         1.0f / sqrtf((float)c->head_dim)};
    ad_pool_run(s->pool, c->n_head * n_blocks, head_item, &j);
}

/* The one-token chunks of a layer: one pool job whose items are (KV head, chunk) pairs, each
 * for the query heads that share that KV head, KV head first: chunks that share cached prefix
 * blocks are adjacent in the batch (it is sorted by ctx), so their items read those blocks one
 * after the other, from cache after the first. It reads the keys and values in place, run by
 * run: the shared prefix, then each cache block's slots, with an online softmax (the attn
 * kernel), so it needs no gather and no score buffer. */
struct dec_job {
    const struct ad_kernels *k;
    const struct ad_hooks *hooks;
    const struct ad_model *m;
    const struct ad_kv *kv;
    const struct ad_chunk *chunks;
    const struct dec_chunk *dec;
    int n_dec, layer, ld_qkv, ld_att;
    const float *qkv;
    float *att;
};

#define AD_MAX_GROUP 16 /* query heads the attn kernel takes at once */

static void attend_one(void *ctx, int item, int thread)
{
    const struct dec_job *j = ctx;
    const struct ad_model_config *c = &j->m->cfg;
    const struct ad_kv *kv = j->kv;
    int hd = c->head_dim, group = c->n_head / c->n_kv_head, kvh = item / j->n_dec;
    const struct dec_chunk *d = &j->dec[item % j->n_dec];
    const struct ad_chunk *ch = &j->chunks[d->chunk];
    const struct ad_kv_seq *seq = ch->seq;
    int hi = seq->n_tokens + 1, W = c->sliding_window; /* the token's own K/V is at hi - 1 */
    int lo = first_key(hi - 1, W), B = kv->block_size;
    size_t ld = (size_t)kv->kv_dim, off = (size_t)kvh * (size_t)hd;
    float scale = 1.0f / sqrtf((float)hd), mx[AD_MAX_GROUP], sum[AD_MAX_GROUP];
    (void)thread;

    for (int h0 = 0; h0 < group; h0 += AD_MAX_GROUP) {
        int g = group - h0 < AD_MAX_GROUP ? group - h0 : AD_MAX_GROUP;
        size_t first = ((size_t)kvh * (size_t)group + (size_t)h0) * (size_t)hd;
        const float *q = j->qkv + (size_t)d->row * (size_t)j->ld_qkv + first;
        float *out = j->att + (size_t)d->row * (size_t)j->ld_att + first;
        for (int h = 0; h < g; h++) {
            mx[h] = -INFINITY;
            sum[h] = 0;
        }
        memset(out, 0, (size_t)g * (size_t)hd * sizeof(float));
        int p = lo;
        if (p < seq->n_shared) { /* the prefix, one run */
            int n = (hi < seq->n_shared ? hi : seq->n_shared) - p;
            const float *pk = shared_prefix(j->hooks, ch, j->layer, 0);
            const float *pv = shared_prefix(j->hooks, ch, j->layer, 1);
            j->k->attn(q, g, hd, pk + (size_t)p * ld + off, pv + (size_t)p * ld + off, ld, n,
                       scale, mx, sum, out);
            p += n;
        }
        while (p < hi) { /* the cache, a run per block */
            int n = B - (p - seq->n_shared) % B;
            n = n < hi - p ? n : hi - p;
            j->k->attn(q, g, hd, kv_slot(kv, kv->k, j->layer, seq, p) + off,
                       kv_slot(kv, kv->v, j->layer, seq, p) + off, ld, n, scale, mx, sum, out);
            p += n;
        }
        for (int h = 0; h < g; h++) {
            float inv = 1.0f / sum[h];
            for (int i = 0; i < hd; i++)
                out[(size_t)h * (size_t)hd + (size_t)i] *= inv;
        }
    }
}

/* ==========================================================================================
 * The pass */

int ad_batch_n_logits(const struct ad_chunk *chunks, int n_chunks)
{
    int n = 0;
    for (int i = 0; i < n_chunks; i++)
        n += chunks[i].all_logits ? chunks[i].n_tokens : 1;
    return n;
}

/* Positions of a chunk's sequence before the chunk: a new sequence starts with its context's
 * prefix, if any (read in place through the hooks, not cached: seq->n_shared). */
static int past_of(const struct ad_hooks *h, const struct ad_chunk *ch)
{
    return ch->seq->n_tokens == 0 ? n_prefix_of(h, ch->ctx) : ch->seq->n_tokens;
}

static int prepare(const struct ad_model *m, struct ad_kv *kv, const struct ad_chunk *chunks,
                   int n_chunks, const struct ad_hooks *hooks, struct ad_scratch *s,
                   struct ad_err *err)
{
    const struct ad_model_config *c = &m->cfg;
    size_t T = 0, max_n = 0, max_ctx = 0, n_out = 0;
    int blocks = 0;

    for (int i = 0; i < n_chunks; i++) {
        const struct ad_chunk *ch = &chunks[i];
        int end = past_of(hooks, ch) + ch->n_tokens;
        int n_virtual = n_virtual_of(hooks, ch->ctx);
        if (ch->n_tokens <= 0)
            return ad_err_set(err, -EINVAL, "chunk %d has no tokens", i);
        if (end > c->n_ctx_max)
            return ad_err_set(err, -EINVAL, "sequence of %d tokens exceeds the model's context "
                              "of %d", end, c->n_ctx_max);
        for (int j = 0; j < ch->n_tokens; j++)
            if (ch->tokens[j] < -n_virtual || ch->tokens[j] >= c->n_vocab)
                return ad_err_set(err, -EINVAL, "token id %d is outside the vocabulary (%d)",
                                  ch->tokens[j], c->n_vocab);
        for (int k = 0; k < i; k++)
            if (chunks[k].seq == ch->seq)
                return ad_err_set(err, -EINVAL, "a sequence appears twice in one batch");
        /* the shared prefix is read through the chunk's ctx: every chunk must carry it */
        assert(!ch->seq->n_shared || n_prefix_of(hooks, ch->ctx) == ch->seq->n_shared);
        if (ch->ctx && !hooks)
            return ad_err_set(err, -EINVAL, "chunk %d has a context but the pass no hooks", i);
        /* cached tokens after the chunk (a new sequence has n_tokens = n_shared = 0 here) */
        blocks += ad_kv_blocks_for(kv, ch->seq->n_tokens - ch->seq->n_shared + ch->n_tokens) -
                  ch->seq->n_blocks;
        T += (size_t)ch->n_tokens;
        max_n = (size_t)ch->n_tokens > max_n ? (size_t)ch->n_tokens : max_n;
        max_ctx = (size_t)end > max_ctx ? (size_t)end : max_ctx;
        n_out += ch->all_logits ? (size_t)ch->n_tokens : 1;
    }
    if (blocks > kv->n_free)
        return ad_err_set(err, -ENOSPC, "KV cache full: %d blocks needed, %d free", blocks,
                          kv->n_free);

    size_t E = (size_t)c->n_embd, Hq = (size_t)c->n_head * (size_t)c->head_dim;
    size_t KVd = (size_t)kv->kv_dim, F = (size_t)c->n_ff, half = (size_t)c->head_dim / 2;
    size_t widest = F > Hq + 2 * KVd ? F : Hq + 2 * KVd;

    /* The helper threads: ad_model_set_threads in all, or just this one if they cannot be
     * started. OpenBLAS runs single-threaded inside the pool's items. */
    if (!s->pool_tried) {
        s->k = ad_kernels_get();
        openblas_set_num_threads(1);
        s->pool = ad_pool_new(ad_model_threads());
        s->pool_tried = true;
    }
    size_t n_threads = (size_t)ad_pool_threads(s->pool);
    size_t tmp = T * (widest + E) + 4096;
    if (tmp < n_threads * AD_HOOK_LOCAL_TMP)
        tmp = n_threads * AD_HOOK_LOCAL_TMP;
    size_t sizes[N_BUF] = {
        [BUF_X] = T * E,         [BUF_XN] = T * E,     [BUF_QKV] = T * (Hq + 2 * KVd),
        [BUF_ATT] = T * Hq,      [BUF_Y] = T * E,      [BUF_FA] = T * F,
        [BUF_FB] = T * F,        [BUF_COS] = T * half, [BUF_SIN] = T * half,
        [BUF_KG] = max_ctx * KVd, [BUF_VG] = max_ctx * KVd, [BUF_S] = n_threads * max_n * max_ctx,
        [BUF_XO] = n_out * E,    [BUF_TMP] = tmp,
    };
    for (int i = 0; i < N_BUF; i++)
        if (reserve(&s->buf[i], &s->cap[i], sizes[i], sizeof(float)) < 0)
            return ad_err_set(err, -ENOMEM, "out of memory for a batch of %zu tokens", T);
    if (reserve((float **)&s->pos, &s->pos_cap, T, sizeof(int32_t)) < 0 ||
        reserve((float **)&s->groups, &s->groups_cap, (size_t)n_chunks, sizeof(struct group)) < 0 ||
        reserve((float **)&s->dec, &s->dec_cap, (size_t)n_chunks, sizeof(struct dec_chunk)) < 0 ||
        reserve((float **)&s->post, &s->post_cap, T / AD_POST_ROWS + (size_t)n_chunks,
                sizeof(struct post_item)) < 0)
        return ad_err_set(err, -ENOMEM, "out of memory for a batch of %zu tokens", T);

    s->n_dec = 0;
    for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++)
        if (chunks[i].n_tokens == 1)
            s->dec[s->n_dec++] = (struct dec_chunk){i, r};

    /* Row groups: runs of adjacent chunks with the same mix. */
    s->n_groups = 0;
    for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++) {
        struct group *last = s->n_groups ? &s->groups[s->n_groups - 1] : NULL;
        if (last && last->ctx == chunks[i].ctx)
            last->n += chunks[i].n_tokens;
        else
            s->groups[s->n_groups++] = (struct group){r, chunks[i].n_tokens, chunks[i].ctx, false};
    }

    for (int i = 0; i < n_chunks; i++) {
        struct ad_kv_seq *seq = chunks[i].seq;
        if (seq->n_tokens == 0) /* a new sequence: its prefix is read from the adapter */
            seq->n_tokens = seq->n_shared = n_prefix_of(hooks, chunks[i].ctx);
        int r = ad_kv_seq_reserve(kv, seq, seq->n_tokens + chunks[i].n_tokens);
        if (r < 0)
            return ad_err_set(err, r, "KV cache: cannot reserve blocks");
    }
    return (int)T;
}

int ad_model_forward(const struct ad_model *m, struct ad_kv *kv, struct ad_chunk *chunks,
                     int n_chunks, const struct ad_hooks *hooks, struct ad_scratch *s,
                     float *logits, struct ad_err *err)
{
    const struct ad_model_config *c = &m->cfg;
    int T = prepare(m, kv, chunks, n_chunks, hooks, s, err);
    if (T < 0)
        return T;
    s->hooks = hooks;
    /* The helpers spin between the jobs of a pass (see pool.c). */
    ad_pool_spin(s->pool, true);

    int E = c->n_embd, hd = c->head_dim, half = hd / 2, F = c->n_ff;
    int Hq = c->n_head * hd, KVd = kv->kv_dim, ld_qkv = Hq + 2 * KVd;
    float *x = s->buf[BUF_X], *xn = s->buf[BUF_XN], *qkv = s->buf[BUF_QKV];
    float *att = s->buf[BUF_ATT], *y = s->buf[BUF_Y], *fa = s->buf[BUF_FA], *fb = s->buf[BUF_FB];
    int32_t *pos = s->pos;

    /* Embeddings (virtual tokens from the prompt adapter) and per-row positions (+ RoPE). */
    for (int i = 0, r = 0; i < n_chunks; i++)
        for (int j = 0; j < chunks[i].n_tokens; j++, r++) {
            int tok = chunks[i].tokens[j];
            const void *ctx = chunks[i].ctx;
            const float *emb = tok < 0 ? hooks->virtual_embedding(ctx, -1 - tok)
                               : ctx && hooks->embedding ? hooks->embedding(ctx, tok) : NULL;
            pos[r] = chunks[i].seq->n_tokens + j;
            memcpy(x + (size_t)r * E, emb ? emb : m->tok_embd + (size_t)tok * E,
                   (size_t)E * sizeof(float));
            const float *pe = ctx && hooks->position ? hooks->position(ctx, pos[r]) : NULL;
            if (m->pos_embd)
                for (int e = 0; e < E; e++)
                    x[(size_t)r * E + e] += pe ? pe[e] : m->pos_embd[(size_t)pos[r] * E + e];
            if (m->rope_inv_freq)
                for (int k = 0; k < half; k++) {
                    double a = (double)pos[r] * (double)m->rope_inv_freq[k];
                    s->buf[BUF_COS][(size_t)r * half + k] = (float)cos(a);
                    s->buf[BUF_SIN][(size_t)r * half + k] = (float)sin(a);
                }
        }

    for (int l = 0; l < c->n_layer; l++) {
        const struct ad_layer *L = &m->layers[l];

        /* Attention: q, k, v sites (or the fused one), RoPE, cache, attend, o site. */
        norm_groups(m, s, l, AD_NORM_ATTN, x, xn);
        if (L->site[AD_ROLE_QKV]) {
            site_groups(L->site[AD_ROLE_QKV], s, xn, E, true, T, qkv, ld_qkv);
        } else {
            const struct ad_site *qkv_sites[3] = {L->site[AD_ROLE_Q], L->site[AD_ROLE_K],
                                                  L->site[AD_ROLE_V]};
            float *qkv_out[3] = {qkv, qkv + Hq, qkv + Hq + KVd};
            sites_groups(qkv_sites, 3, s, xn, E, false, T, qkv_out, ld_qkv);
        }
        for (int i = 0, r = 0; i < n_chunks; i++)
            for (int j = 0; j < chunks[i].n_tokens; j++, r++) {
                float *row = qkv + (size_t)r * ld_qkv;
                if (m->rope_inv_freq) {
                    const float *cs = s->buf[BUF_COS] + (size_t)r * half;
                    const float *sn = s->buf[BUF_SIN] + (size_t)r * half;
                    ad_rope(row, c->n_head, hd, cs, sn);
                    ad_rope(row + Hq, c->n_kv_head, hd, cs, sn);
                }
                memcpy(kv_slot(kv, kv->k, l, chunks[i].seq, pos[r]), row + Hq,
                       (size_t)KVd * sizeof(float));
                memcpy(kv_slot(kv, kv->v, l, chunks[i].seq, pos[r]), row + Hq + KVd,
                       (size_t)KVd * sizeof(float));
            }
        for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++)
            if (chunks[i].n_tokens > 1)
                attend_chunk(m, kv, s, l, &chunks[i], qkv + (size_t)r * ld_qkv, ld_qkv,
                             att + (size_t)r * Hq, Hq);
        struct dec_job dj = {s->k, hooks, m, kv, chunks, s->dec, s->n_dec, l, ld_qkv, Hq, qkv, att};
        ad_pool_run(s->pool, s->n_dec * c->n_kv_head, attend_one, &dj);
        site_groups(L->site[AD_ROLE_O], s, att, Hq, true, T, y, E);
        sublayer_groups(m, s, l, AD_NORM_ATTN, x, y);
        for (size_t i = 0; i < (size_t)T * E; i++)
            x[i] += y[i];

        /* MLP: gate/up (or up alone), activation, down. */
        norm_groups(m, s, l, AD_NORM_MLP, x, xn);
        bool gated = L->site[AD_ROLE_GATE] != NULL;
        if (gated) {
            /* in site order, the order of an adapter's factors in memory (lora.c) */
            const struct ad_site *gu_sites[2] = {L->site[AD_ROLE_GATE], L->site[AD_ROLE_UP]};
            float *gu_out[2] = {fb, fa};
            sites_groups(gu_sites, 2, s, xn, E, false, T, gu_out, F);
        } else {
            site_groups(L->site[AD_ROLE_UP], s, xn, E, true, T, fa, F);
        }
        if (c->act == AD_ACT_SILU)
            s->k->silu_mul(fa, gated ? fb : NULL, (size_t)T * F);
        else if (gated)
            for (size_t i = 0; i < (size_t)T * F; i++)
                fa[i] *= ad_act(c->act, fb[i]);
        else
            for (size_t i = 0; i < (size_t)T * F; i++)
                fa[i] = ad_act(c->act, fa[i]);
        site_groups(L->site[AD_ROLE_DOWN], s, fa, F, true, T, y, E);
        sublayer_groups(m, s, l, AD_NORM_MLP, x, y);
        for (size_t i = 0; i < (size_t)T * E; i++)
            x[i] += y[i];
    }

    /* Final norm and lm_head, for the rows that want logits only: the groups are remapped to
     * the output rows. */
    float *xo = s->buf[BUF_XO];
    int n_out = 0;
    s->n_groups = 0;
    for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++) {
        int first = chunks[i].all_logits ? 0 : chunks[i].n_tokens - 1;
        int n = chunks[i].n_tokens - first;
        memcpy(xo + (size_t)n_out * E, x + (size_t)(r + first) * E, (size_t)n * E * sizeof(float));
        struct group *last = s->n_groups ? &s->groups[s->n_groups - 1] : NULL;
        if (last && last->ctx == chunks[i].ctx)
            last->n += n;
        else
            s->groups[s->n_groups++] = (struct group){n_out, n, chunks[i].ctx, false};
        n_out += n;
    }
    norm_groups(m, s, -1, AD_NORM_FINAL, xo, xo);
    site_groups(&m->sites[m->n_sites - 1], s, xo, E, true, n_out, logits, c->n_vocab);

    ad_pool_spin(s->pool, false);

    for (int i = 0; i < n_chunks; i++)
        chunks[i].seq->n_tokens += chunks[i].n_tokens;
    return 0;
}
