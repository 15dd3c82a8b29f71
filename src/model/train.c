/* Training passes: the forward over a dense batch, keeping what the backward needs, then the
 * backward, to the gradients of the hooks' parameters and (full fine-tuning) the base's.
 *
 * Row layout: the batch's T rows are its sequences one after another, each the hooks' virtual
 * tokens (prompt tuning) then its tokens. A sequence attends to its own rows and the hooks'
 * prefix keys and values (prefix tuning), which come first in position: real positions start at
 * n_prefix, RoPE rotates by position, exactly as serving does (forward.c).
 *
 * What is kept (per layer, for the backward): the layer's input x, q (rotated), k (rotated), v,
 * the attention output and its log-sum-exp per head, the residual after attention, the MLP's
 * pre-activations, each norm's 1/rms (and mean); the norms' outputs and the MLP's activation
 * are recomputed from those in the backward (elementwise, cheap). Sites whose hooks need the
 * base's output (IA3, DoRA) keep it too, and sub-layers with hooks keep their input.
 *
 * Threads: the scratch's pool, as in forward.c; every matrix product is one pool job of
 * single-threaded sgemm slices (gemm()), attention one item per (sequence, KV head), the MLP's
 * elementwise maths spans of its elements, the loss one item per row of a block. The hooks run
 * on the calling thread and reach the pool through ad_train_sgemm. */
#include <assert.h>
#include <cblas.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/model.h"
#include "adapterd/util.h"
#include "internal.h"

/* ==========================================================================================
 * Gradients and tensors of the base */

struct ad_model_grads {
    float *tok_embd, *pos_embd, *final_norm_w, *final_norm_b;
    float **norm_w, **norm_b; /* [2 n_layer]: layer l's attention norm at 2 l, its MLP's at 2 l + 1 */
    float **site_w, **site_b; /* [n_sites]; a tied lm_head's weight is tok_embd's */
    void **owned;
    int n_owned;
};

/* Each distinct weight of m with its gradient slot in g: calls fn for it. */
typedef int tensor_fn(void *ud, const char *name, const float *w, float **g, size_t n,
                      int n_dims, int64_t d0, int64_t d1, int kind);
enum { T_EMBD, T_NORM, T_BIAS, T_LINEAR };

static int for_each_tensor(const struct ad_model *m, struct ad_model_grads *g, tensor_fn *fn,
                           void *ud)
{
    const struct ad_arch *a = m->arch;
    const struct ad_model_config *c = &m->cfg;
    static float *none;
    char name[160], pfx[64];
    size_t E = (size_t)c->n_embd;
    int r;
#define G(field) (g ? &g->field : &none)
    snprintf(name, sizeof(name), "%s%s.weight", a->root, a->tok_embd);
    if ((r = fn(ud, name, m->tok_embd, G(tok_embd), (size_t)c->n_vocab * E, 2, c->n_vocab,
                c->n_embd, T_EMBD)) < 0)
        return r;
    if (m->pos_embd) {
        snprintf(name, sizeof(name), "%s%s.weight", a->root, a->pos_embd);
        if ((r = fn(ud, name, m->pos_embd, G(pos_embd), (size_t)c->n_ctx_max * E, 2,
                    c->n_ctx_max, c->n_embd, T_EMBD)) < 0)
            return r;
    }
    int si = 0;
    for (int l = 0; l < c->n_layer; l++) {
        const struct ad_layer *L = &m->layers[l];
        snprintf(pfx, sizeof(pfx), a->layer_fmt, l);
        const float *nw[2] = {L->norm1_w, L->norm2_w}, *nb[2] = {L->norm1_b, L->norm2_b};
        const char *nn[2] = {a->norm1, a->norm2};
        for (int k = 0; k < 2; k++) {
            snprintf(name, sizeof(name), "%s%s%s.weight", a->root, pfx, nn[k]);
            if ((r = fn(ud, name, nw[k], g ? &g->norm_w[2 * l + k] : &none, E, 1, c->n_embd, 0,
                        T_NORM)) < 0)
                return r;
            snprintf(name, sizeof(name), "%s%s%s.bias", a->root, pfx, nn[k]);
            if (nb[k] && (r = fn(ud, name, nb[k], g ? &g->norm_b[2 * l + k] : &none, E, 1,
                                 c->n_embd, 0, T_NORM)) < 0)
                return r;
        }
        for (int i = 0; i < a->n_modules; i++, si++) {
            const struct ad_site *s = &m->sites[si];
            size_t n = (size_t)s->n_in * (size_t)s->n_out;
            snprintf(name, sizeof(name), "%s.weight", s->path);
            if ((r = fn(ud, name, s->w, g ? &g->site_w[si] : &none, n, 2,
                        s->w_in_out ? s->n_in : s->n_out, s->w_in_out ? s->n_out : s->n_in,
                        T_LINEAR)) < 0)
                return r;
            snprintf(name, sizeof(name), "%s.bias", s->path);
            if (s->b && (r = fn(ud, name, s->b, g ? &g->site_b[si] : &none, (size_t)s->n_out, 1,
                                s->n_out, 0, T_BIAS)) < 0)
                return r;
        }
    }
    snprintf(name, sizeof(name), "%s%s.weight", a->root, a->final_norm);
    if ((r = fn(ud, name, m->final_norm_w, G(final_norm_w), E, 1, c->n_embd, 0, T_NORM)) < 0)
        return r;
    snprintf(name, sizeof(name), "%s%s.bias", a->root, a->final_norm);
    if (m->final_norm_b &&
        (r = fn(ud, name, m->final_norm_b, G(final_norm_b), E, 1, c->n_embd, 0, T_NORM)) < 0)
        return r;
    const struct ad_site *head = &m->sites[m->n_sites - 1];
    if (head->w != m->tok_embd) {
        snprintf(name, sizeof(name), "%s.weight", head->path);
        if ((r = fn(ud, name, head->w, g ? &g->site_w[m->n_sites - 1] : &none,
                    (size_t)head->n_in * (size_t)head->n_out, 2, head->n_out, head->n_in,
                    T_LINEAR)) < 0)
            return r;
    }
#undef G
    return 0;
}

static int alloc_grad(void *ud, const char *name, const float *w, float **g, size_t n,
                      int n_dims, int64_t d0, int64_t d1, int kind)
{
    struct ad_model_grads *mg = ud;
    (void)name, (void)w, (void)n_dims, (void)d0, (void)d1, (void)kind;
    float *p = calloc(n, sizeof(float));
    void **o = p ? realloc(mg->owned, sizeof(*o) * (size_t)(mg->n_owned + 1)) : NULL;
    if (!o) {
        free(p);
        return -ENOMEM;
    }
    mg->owned = o;
    mg->owned[mg->n_owned++] = p;
    *g = p;
    return 0;
}

struct ad_model_grads *ad_model_grads_new(const struct ad_model *m)
{
    struct ad_model_grads *g = calloc(1, sizeof(*g));
    size_t nl = 2 * (size_t)m->cfg.n_layer, ns = (size_t)m->n_sites;
    if (!g)
        return NULL;
    g->norm_w = calloc(nl, sizeof(float *));
    g->norm_b = calloc(nl, sizeof(float *));
    g->site_w = calloc(ns, sizeof(float *));
    g->site_b = calloc(ns, sizeof(float *));
    if (!g->norm_w || !g->norm_b || !g->site_w || !g->site_b ||
        for_each_tensor(m, g, alloc_grad, g) < 0) {
        ad_model_grads_free(g);
        return NULL;
    }
    if (m->sites[m->n_sites - 1].w == m->tok_embd) /* tied: one gradient for both uses */
        g->site_w[m->n_sites - 1] = g->tok_embd;
    return g;
}

void ad_model_grads_free(struct ad_model_grads *g)
{
    if (!g)
        return;
    for (int i = 0; i < g->n_owned; i++)
        free(g->owned[i]);
    free(g->owned);
    free(g->norm_w);
    free(g->norm_b);
    free(g->site_w);
    free(g->site_b);
    free(g);
}

struct tensor_list {
    struct ad_model_tensor *t;
    int n;
};

static int list_tensor(void *ud, const char *name, const float *w, float **g, size_t n,
                       int n_dims, int64_t d0, int64_t d1, int kind)
{
    struct tensor_list *l = ud;
    if (l->t) {
        struct ad_model_tensor *t = &l->t[l->n];
        snprintf(t->name, sizeof(t->name), "%s", name);
        t->w = (float *)w; /* writable when the model is a clone (its own arrays) */
        t->g = *g;
        t->n = n;
        t->n_dims = n_dims;
        t->shape[0] = d0;
        t->shape[1] = d1;
        t->embedding = kind == T_EMBD;
        t->norm = kind == T_NORM;
        t->bias = kind == T_BIAS;
    }
    l->n++;
    return 0;
}

int ad_model_tensors(const struct ad_model *m, struct ad_model_grads *g,
                     struct ad_model_tensor **ret)
{
    struct tensor_list l = {0};
    for_each_tensor(m, g, list_tensor, &l); /* count */
    l.t = calloc((size_t)l.n + 1, sizeof(*l.t));
    if (!l.t)
        return -ENOMEM;
    l.n = 0;
    for_each_tensor(m, g, list_tensor, &l);
    *ret = l.t;
    return l.n;
}

/* ==========================================================================================
 * A model of one's own: every weight copied */

static const float *copy_of(struct ad_model *m, const float *w, size_t n)
{
    if (!w)
        return NULL;
    float *p = malloc(n * sizeof(float));
    void **o = p ? realloc(m->owned, sizeof(*o) * (size_t)(m->n_owned + 1)) : NULL;
    if (!o) {
        free(p);
        return NULL;
    }
    memcpy(p, w, n * sizeof(float));
    m->owned = o;
    m->owned[m->n_owned++] = p;
    return p;
}

int ad_model_clone(const struct ad_model *m, struct ad_model **ret, struct ad_err *err)
{
    const struct ad_model_config *c = &m->cfg;
    struct ad_model *k = calloc(1, sizeof(*k));
    size_t E = (size_t)c->n_embd, nl = (size_t)c->n_layer, ns = (size_t)m->n_sites;
    bool ok = k != NULL;
    if (ok) {
        *k = *m;
        k->files = NULL;
        k->n_files = 0;
        k->owned = NULL;
        k->n_owned = 0;
        k->layers = calloc(nl, sizeof(*k->layers));
        k->sites = calloc(ns, sizeof(*k->sites));
        k->rope_inv_freq = NULL;
        ok = k->layers && k->sites;
    }
    if (ok && m->rope_inv_freq) {
        k->rope_inv_freq = malloc((size_t)c->head_dim / 2 * sizeof(float));
        ok = k->rope_inv_freq != NULL;
        if (ok)
            memcpy(k->rope_inv_freq, m->rope_inv_freq, (size_t)c->head_dim / 2 * sizeof(float));
    }
#define COPY(dst, src, n)                                                                      \
    do {                                                                                       \
        if (ok && (src)) {                                                                     \
            dst = copy_of(k, src, n);                                                          \
            ok = dst != NULL;                                                                  \
        }                                                                                      \
    } while (0)
    COPY(k->tok_embd, m->tok_embd, (size_t)c->n_vocab * E);
    COPY(k->pos_embd, m->pos_embd, (size_t)c->n_ctx_max * E);
    COPY(k->final_norm_w, m->final_norm_w, E);
    COPY(k->final_norm_b, m->final_norm_b, E);
    for (size_t i = 0; ok && i < ns; i++) {
        const struct ad_site *s = &m->sites[i];
        k->sites[i] = *s;
        if (s->w == m->tok_embd)
            k->sites[i].w = k->tok_embd;
        else
            COPY(k->sites[i].w, s->w, (size_t)s->n_in * (size_t)s->n_out);
        COPY(k->sites[i].b, s->b, (size_t)s->n_out);
    }
    for (size_t l = 0; ok && l < nl; l++) {
        const struct ad_layer *L = &m->layers[l];
        struct ad_layer *K = &k->layers[l];
        COPY(K->norm1_w, L->norm1_w, E);
        COPY(K->norm1_b, L->norm1_b, E);
        COPY(K->norm2_w, L->norm2_w, E);
        COPY(K->norm2_b, L->norm2_b, E);
        for (int r = 0; r < AD_ROLE_COUNT; r++)
            K->site[r] = L->site[r] ? &k->sites[L->site[r] - m->sites] : NULL;
    }
#undef COPY
    if (!ok) {
        ad_model_free(k);
        return ad_err_set(err, -ENOMEM, "out of memory copying the model");
    }
    *ret = k;
    return 0;
}

/* ==========================================================================================
 * Threads: matrix products on the pool */

struct ad_train_scratch {
    struct ad_pool *pool;
    float *buf;
    size_t cap;
    int32_t *ibuf;
    size_t icap;
};

static _Thread_local struct ad_pool *current_pool; /* the pass in progress on this thread */

struct gemm_job {
    bool t_a, t_b, by_rows;
    int m, n, k, lda, ldb, ldc, slices;
    float alpha, beta;
    const float *a, *b;
    float *c;
};

static void gemm_item(void *ctx, int item, int thread)
{
    const struct gemm_job *j = ctx;
    int total = j->by_rows ? j->m : j->n, align = j->by_rows ? 1 : 16;
    int lo = (int)((int64_t)total * item / j->slices) / align * align;
    int hi = item + 1 == j->slices ? total : (int)((int64_t)total * (item + 1) / j->slices) /
                                                 align * align;
    (void)thread;
    if (hi <= lo)
        return;
    if (j->by_rows) {
        const float *a = j->t_a ? j->a + lo : j->a + (size_t)lo * (size_t)j->lda;
        cblas_sgemm(CblasRowMajor, j->t_a ? CblasTrans : CblasNoTrans,
                    j->t_b ? CblasTrans : CblasNoTrans, hi - lo, j->n, j->k, j->alpha, a, j->lda,
                    j->b, j->ldb, j->beta, j->c + (size_t)lo * (size_t)j->ldc, j->ldc);
    } else {
        const float *b = j->t_b ? j->b + (size_t)lo * (size_t)j->ldb : j->b + lo;
        cblas_sgemm(CblasRowMajor, j->t_a ? CblasTrans : CblasNoTrans,
                    j->t_b ? CblasTrans : CblasNoTrans, j->m, hi - lo, j->k, j->alpha, j->a,
                    j->lda, b, j->ldb, j->beta, j->c + lo, j->ldc);
    }
}

/* C[m, n] = alpha op(A) op(B) + beta C, sliced over the pool: by rows of C when it has many,
 * else by columns (slices of 16). */
static void gemm(struct ad_pool *pool, bool t_a, bool t_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    int threads = ad_pool_threads(pool);
    if (m <= 0 || n <= 0)
        return;
    if (k <= 0) { /* nothing to multiply: C = beta C, as BLAS does */
        for (int i = 0; i < m; i++)
            for (int j = 0; j < n; j++)
                c[(size_t)i * ldc + j] = beta == 0 ? 0 : beta * c[(size_t)i * ldc + j];
        return;
    }
    struct gemm_job job = {t_a, t_b, m >= 64 * threads || n < 32 * threads, m, n, k,
                           lda, ldb, ldc, threads > 1 ? 2 * threads : 1, alpha, beta, a, b, c};
    ad_pool_run(pool, job.slices, gemm_item, &job);
}

void ad_train_sgemm(bool t_a, bool t_b, int m, int n, int k, float alpha, const float *a,
                    int lda, const float *b, int ldb, float beta, float *c, int ldc)
{
    gemm(current_pool, t_a, t_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

struct ad_train_scratch *ad_train_scratch_new(int n_threads)
{
    struct ad_train_scratch *ts = calloc(1, sizeof(*ts));
    if (ts)
        ts->pool = ad_pool_new(n_threads > 0 ? n_threads : ad_model_threads());
    return ts;
}

void ad_train_scratch_free(struct ad_train_scratch *ts)
{
    if (!ts)
        return;
    ad_pool_free(ts->pool);
    free(ts->buf);
    free(ts->ibuf);
    free(ts);
}

/* ==========================================================================================
 * The pass's state */

/* What the forward keeps of one layer. */
struct tape {
    float *x;            /* [T, E] the layer's input */
    float *q, *k, *v;    /* [T, Hq], [T, KVd] x 2: rotated q and k, v */
    float *att;          /* [T, Hq] attention output (the o site's input) */
    float *lse;          /* [T, H] log-sum-exp of each head's scores */
    float *xmid;         /* [T, E] the residual after attention */
    float *pre_a, *pre_b; /* [T, F] MLP pre-activations: gate and up (Llama), fc (GPT-2: a) */
    float *r1, *m1, *r2, *m2; /* [T] 1 / rms (or 1 / std) and mean (LayerNorm) of each norm */
    float *yb[AD_ROLE_COUNT]; /* base outputs of sites whose hooks want them, else NULL */
    float *y_in[2];      /* sub-layer outputs before the hooks (attention, MLP), or NULL */
};

struct pass {
    const struct ad_model *m;
    const struct ad_model_config *c;
    const struct ad_hooks *h; /* NULL when ctx is */
    void *ctx;
    struct ad_model_grads *g;
    struct ad_pool *pool;
    int T, E, Hq, KVd, F, hd, n_prefix, n_virtual;
    int n_seq;
    int *seq_row, *seq_len; /* [n_seq]: first row and rows (virtual tokens included) */
    int32_t *tok, *tgt, *pos; /* [T]: token (virtual: -1 - v), target (-1: none), position */
    float *cos_, *sin_, *nsin; /* [T, hd / 2] */
    struct tape *tape;   /* [n_layer] */
    float *xf;           /* [T, E] the residual after the last layer */
    float *dx;           /* [T, E] the gradient of the residual stream */
    float *rf, *mf;      /* [T] the final norm's statistics */
    float *tmp;          /* work space: tmp_len floats */
    size_t tmp_len;
    float *att_tmp;      /* per thread: attention work space of att_len floats */
    size_t att_len;
    float *prefix_g;     /* per sequence: [2][n_prefix][KVd] prefix gradients of a layer, summed
                          * in sequence order (the same sums whatever thread ran which item) */
};

static bool hooked(const struct pass *p)
{
    return p->ctx != NULL;
}

/* ==========================================================================================
 * Norms */

/* out[r] = norm(x[r]) for T rows, with (w, b) the parameters in effect; keeps 1/rms (1/std)
 * in rs and the mean in ms (LayerNorm). out may be NULL (statistics only). */
static void norm_fwd(const struct pass *p, const float *w, const float *b, const float *x,
                     float *out, float *rs, float *ms)
{
    int E = p->E;
    bool ln = p->m->arch->layer_norm;
    for (int r = 0; r < p->T; r++) {
        const float *xr = x + (size_t)r * E;
        double mean = 0, var = 0;
        if (ln) {
            for (int i = 0; i < E; i++)
                mean += xr[i];
            mean /= E;
        }
        for (int i = 0; i < E; i++)
            var += ((double)xr[i] - mean) * ((double)xr[i] - mean);
        float rstd = (float)(1.0 / sqrt(var / E + p->c->norm_eps));
        rs[r] = rstd;
        if (ms)
            ms[r] = (float)mean;
        if (!out)
            continue;
        float *o = out + (size_t)r * E;
        for (int i = 0; i < E; i++)
            o[i] = ln ? ((float)(xr[i] - mean)) * rstd * w[i] + b[i] : xr[i] * rstd * w[i];
    }
}

/* The same output from the kept statistics (as layernorm()/rmsnorm() of forward.c compute it,
 * so the backward sees the forward's values). */
static void norm_apply(const struct pass *p, const float *w, const float *b, const float *x,
                       const float *rs, const float *ms, float *out)
{
    int E = p->E;
    bool ln = p->m->arch->layer_norm;
    for (int r = 0; r < p->T; r++) {
        const float *xr = x + (size_t)r * E;
        float *o = out + (size_t)r * E;
        for (int i = 0; i < E; i++)
            o[i] = ln ? (xr[i] - ms[r]) * rs[r] * w[i] + b[i] : xr[i] * rs[r] * w[i];
    }
}

/* Backward of a norm: dy [T, E] the gradient of its output; adds the gradient of its input to
 * dx and those of (w, b) to dw, db (when non-NULL). */
static void norm_bwd(const struct pass *p, const float *w, const float *x, const float *rs,
                     const float *ms, const float *dy, float *dx, float *dw, float *db)
{
    int E = p->E;
    bool ln = p->m->arch->layer_norm;
    for (int r = 0; r < p->T; r++) {
        const float *xr = x + (size_t)r * E, *dyr = dy + (size_t)r * E;
        float *dxr = dx + (size_t)r * E, rstd = rs[r], mu = ln ? ms[r] : 0;
        double sum_g = 0, sum_gx = 0;
        for (int i = 0; i < E; i++) {
            double xhat = (double)(xr[i] - mu) * rstd, gi = (double)dyr[i] * w[i];
            sum_g += gi;
            sum_gx += gi * xhat;
            if (dw)
                dw[i] += dyr[i] * (float)xhat;
            if (db)
                db[i] += dyr[i];
        }
        double mg = ln ? sum_g / E : 0, mgx = sum_gx / E;
        for (int i = 0; i < E; i++) {
            double xhat = (double)(xr[i] - mu) * rstd, gi = (double)dyr[i] * w[i];
            dxr[i] += (float)(rstd * (gi - mg - xhat * mgx));
        }
    }
}

/* The parameters of a norm in effect for the pass (the base's, or the hooks'). */
static void norm_params(const struct pass *p, int layer, enum ad_norm_slot slot, const float **w,
                        const float **b)
{
    const struct ad_model *m = p->m;
    const struct ad_layer *L = layer >= 0 ? &m->layers[layer] : NULL;
    *w = slot == AD_NORM_FINAL ? m->final_norm_w : slot == AD_NORM_ATTN ? L->norm1_w : L->norm2_w;
    *b = slot == AD_NORM_FINAL ? m->final_norm_b : slot == AD_NORM_ATTN ? L->norm1_b : L->norm2_b;
    if (hooked(p) && p->h->norm)
        p->h->norm(p->ctx, layer, slot, w, b);
}

/* The base gradients of a norm's parameters, or NULL. */
static void norm_grads(const struct pass *p, int layer, enum ad_norm_slot slot, float **dw,
                       float **db)
{
    const struct ad_model_grads *g = p->g;
    *dw = *db = NULL;
    if (!g)
        return;
    *dw = slot == AD_NORM_FINAL ? g->final_norm_w : g->norm_w[2 * layer + (int)slot];
    *db = slot == AD_NORM_FINAL ? g->final_norm_b : g->norm_b[2 * layer + (int)slot];
}

/* A norm's backward, through the hooks: the gradients of its parameters go to the base (full
 * fine-tuning) or to the hooks (who replace them), computed only when someone wants them. */
static void norm_backward(struct pass *p, int layer, enum ad_norm_slot slot, const float *x,
                          const float *rs, const float *ms, const float *dy, float *dx)
{
    const float *w, *b;
    float *dw, *db;
    norm_params(p, layer, slot, &w, &b);
    norm_grads(p, layer, slot, &dw, &db);
    bool hook = hooked(p) && p->h->norm_grad;
    size_t E = (size_t)p->E;
    float *hw = NULL, *hb = NULL;
    if (hook) {
        hw = p->tmp;
        hb = b ? p->tmp + E : NULL;
        memset(p->tmp, 0, 2 * E * sizeof(float));
    }
    norm_bwd(p, w, x, rs, ms, dy, dx, hook ? hw : dw, hook ? hb : (b ? db : NULL));
    if (hook)
        p->h->norm_grad(p->ctx, layer, slot, hw, hb);
}

/* ==========================================================================================
 * Sites */

/* y[T, n_out] = x W^T (+ b), the base linear, on the pool. */
static void linear_fwd(const struct pass *p, const struct ad_site *s, const float *x, int ldx,
                       float *y, int ldy)
{
    gemm(p->pool, false, !s->w_in_out, p->T, s->n_out, s->n_in, 1.0f, x, ldx, s->w,
         s->w_in_out ? s->n_out : s->n_in, 0.0f, y, ldy);
    if (s->b)
        for (int r = 0; r < p->T; r++)
            for (int j = 0; j < s->n_out; j++)
                y[(size_t)r * ldy + j] += s->b[j];
}

/* A site over every row: the hooks' input side (on a copy of x), the linear, the hooks'
 * output side; keeps the base's output in yb_keep if given. */
static void site_fwd(struct pass *p, const struct ad_site *s, const float *x, int ldx, float *y,
                     int ldy, float *yb_keep)
{
    const float *in = x;
    int ld_in = ldx;
    bool scaled = false;
    if (hooked(p) && p->h->site_pre) {
        float *copy = p->tmp;
        for (int r = 0; r < p->T; r++)
            memcpy(copy + (size_t)r * s->n_in, x + (size_t)r * ldx, (size_t)s->n_in * sizeof(float));
        scaled = p->h->site_pre(p->ctx, s, copy, s->n_in, p->T);
        if (scaled) {
            in = copy;
            ld_in = s->n_in;
        }
    }
    linear_fwd(p, s, in, ld_in, y, ldy);
    if (yb_keep)
        for (int r = 0; r < p->T; r++)
            memcpy(yb_keep + (size_t)r * s->n_out, y + (size_t)r * ldy,
                   (size_t)s->n_out * sizeof(float));
    if (hooked(p) && p->h->site_post)
        p->h->site_post(p->ctx, s, x, ldx, scaled, y, ldy, p->T, NULL, 0);
}

/* The backward of site_fwd: dy [T, n_out] (overwritten) the gradient of its output, x its
 * input as site_fwd got it, yb what it kept; adds the gradient of x to dx. */
static void site_bwd(struct pass *p, const struct ad_site *s, const float *x, int ldx,
                     const float *yb, float *dy, int ldy, float *dx, int lddx)
{
    int T = p->T;
    if (hooked(p) && p->h->site_post_grad &&
        !p->h->site_post_grad(p->ctx, s, x, ldx, yb, dy, ldy, dx, lddx, T))
        return; /* a replaced module: the base's W is not on the path */
    if (p->g) { /* full fine-tuning (no hooks): dW += dy^T x, db += sum dy */
        float *gw = p->g->site_w[s - p->m->sites], *gb = p->g->site_b[s - p->m->sites];
        if (s->w_in_out) /* W [in, out] */
            gemm(p->pool, true, false, s->n_in, s->n_out, T, 1.0f, x, ldx, dy, ldy, 1.0f, gw,
                 s->n_out);
        else
            gemm(p->pool, true, false, s->n_out, s->n_in, T, 1.0f, dy, ldy, x, ldx, 1.0f, gw,
                 s->n_in);
        for (int r = 0; gb && r < T; r++)
            for (int j = 0; j < s->n_out; j++)
                gb[j] += dy[(size_t)r * ldy + j];
    }
    /* dx += dy W (through site_pre's backward when the hooks have an input side) */
    bool pre = hooked(p) && p->h->site_pre_grad;
    float *gx = pre ? p->tmp : dx;
    int ldg = pre ? s->n_in : lddx;
    gemm(p->pool, false, s->w_in_out, T, s->n_in, s->n_out, 1.0f, dy, ldy, s->w,
         s->w_in_out ? s->n_out : s->n_in, pre ? 0.0f : 1.0f, gx, ldg);
    if (pre) {
        p->h->site_pre_grad(p->ctx, s, x, ldx, gx, ldg, T);
        for (int r = 0; r < T; r++)
            for (int i = 0; i < s->n_in; i++)
                dx[(size_t)r * lddx + i] += gx[(size_t)r * ldg + i];
    }
}

static bool wants_yb(const struct pass *p, const struct ad_site *s)
{
    return hooked(p) && p->h->site_wants_yb && p->h->site_wants_yb(p->ctx, s);
}

/* ==========================================================================================
 * Attention: one item per (sequence, KV head) */

struct att_job {
    struct pass *p;
    int layer;
    const float *q, *k, *v, *att, *lse; /* the layer's, [T, Hq] / [T, KVd] */
    float *out, *lse_out;               /* forward */
    const float *datt;                  /* backward: the gradient of att */
    float *dq, *dk, *dv;
    const float *pk, *pv;               /* the layer's prefix keys, values [P, KVd], or NULL */
};

/* The first key position a query at position p sees (forward.c's first_key). */
static int first_key(int p, int W)
{
    return W > 0 && p - W + 1 > 0 ? p - W + 1 : 0;
}

/* Gathers the keys (or values) one KV head sees for a sequence: prefix then the sequence's
 * rows, [P + n, hd]. */
static void gather_kv(const struct pass *p, const float *pre, const float *rows, int r0, int n,
                      int kvh, float *dst)
{
    int hd = p->hd, KVd = p->KVd, P = p->n_prefix;
    for (int j = 0; j < P; j++)
        memcpy(dst + (size_t)j * hd, pre + (size_t)j * KVd + (size_t)kvh * hd,
               (size_t)hd * sizeof(float));
    for (int j = 0; j < n; j++)
        memcpy(dst + (size_t)(P + j) * hd, rows + (size_t)(r0 + j) * KVd + (size_t)kvh * hd,
               (size_t)hd * sizeof(float));
}

/* S [n, P + n] = scale q k^T with the causal (and sliding window) mask as -inf; query i is at
 * position P + i, key j at position j. */
static void scores(const struct pass *p, const float *q, int ldq, const float *kc, int n, float *S)
{
    int P = p->n_prefix, nk = P + n, hd = p->hd, W = p->c->sliding_window;
    float scale = 1.0f / sqrtf((float)hd);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nk, hd, scale, q, ldq, kc, hd, 0.0f,
                S, nk);
    for (int i = 0; i < n; i++) {
        int lo = first_key(P + i, W), hi = P + i + 1;
        float *row = S + (size_t)i * nk;
        for (int j = 0; j < lo; j++)
            row[j] = -INFINITY;
        for (int j = hi; j < nk; j++)
            row[j] = -INFINITY;
    }
}

static void att_fwd_item(void *ctx, int item, int thread)
{
    const struct att_job *j = ctx;
    const struct pass *p = j->p;
    int n_kv = p->c->n_kv_head, s = item / n_kv, kvh = item % n_kv;
    int r0 = p->seq_row[s], n = p->seq_len[s], P = p->n_prefix, nk = P + n, hd = p->hd;
    int group = p->c->n_head / n_kv, H = p->c->n_head;
    float *w = p->att_tmp + (size_t)thread * p->att_len;
    float *kc = w, *vc = kc + (size_t)nk * hd, *S = vc + (size_t)nk * hd;
    gather_kv(p, j->pk, j->k, r0, n, kvh, kc);
    gather_kv(p, j->pv, j->v, r0, n, kvh, vc);
    for (int g = 0; g < group; g++) {
        int h = kvh * group + g;
        const float *q = j->q + (size_t)r0 * p->Hq + (size_t)h * hd;
        scores(p, q, p->Hq, kc, n, S);
        for (int i = 0; i < n; i++) {
            float *row = S + (size_t)i * nk, mx = -INFINITY;
            for (int t = 0; t < nk; t++)
                mx = row[t] > mx ? row[t] : mx;
            double sum = 0;
            for (int t = 0; t < nk; t++) {
                row[t] = expf(row[t] - mx);
                sum += row[t];
            }
            float inv = (float)(1.0 / sum);
            for (int t = 0; t < nk; t++)
                row[t] *= inv;
            j->lse_out[(size_t)(r0 + i) * H + h] = mx + (float)log(sum);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, nk, 1.0f, S, nk, vc, hd,
                    0.0f, j->out + (size_t)r0 * p->Hq + (size_t)h * hd, p->Hq);
    }
}

static void att_bwd_item(void *ctx, int item, int thread)
{
    const struct att_job *j = ctx;
    const struct pass *p = j->p;
    int n_kv = p->c->n_kv_head, s = item / n_kv, kvh = item % n_kv;
    int r0 = p->seq_row[s], n = p->seq_len[s], P = p->n_prefix, nk = P + n, hd = p->hd;
    int group = p->c->n_head / n_kv, H = p->c->n_head, Hq = p->Hq, KVd = p->KVd;
    float scale = 1.0f / sqrtf((float)hd);
    float *w = p->att_tmp + (size_t)thread * p->att_len;
    float *kc = w, *vc = kc + (size_t)nk * hd, *S = vc + (size_t)nk * hd;
    float *dP = S + (size_t)n * nk, *dkc = dP + (size_t)n * nk, *dvc = dkc + (size_t)nk * hd;
    gather_kv(p, j->pk, j->k, r0, n, kvh, kc);
    gather_kv(p, j->pv, j->v, r0, n, kvh, vc);
    memset(dkc, 0, 2 * (size_t)nk * hd * sizeof(float)); /* dkc, dvc */
    for (int g = 0; g < group; g++) {
        int h = kvh * group + g;
        const float *q = j->q + (size_t)r0 * Hq + (size_t)h * hd;
        const float *o = j->att + (size_t)r0 * Hq + (size_t)h * hd;
        const float *dO = j->datt + (size_t)r0 * Hq + (size_t)h * hd;
        scores(p, q, Hq, kc, n, S);
        for (int i = 0; i < n; i++) { /* the probabilities again, from the kept lse */
            float lse = j->lse[(size_t)(r0 + i) * H + h], *row = S + (size_t)i * nk;
            for (int t = 0; t < nk; t++)
                row[t] = expf(row[t] - lse);
        }
        /* dV += P^T dO; dP = dO V^T; dS = P (dP - rowsum(dO o)); dQ = scale dS K;
         * dK += scale dS^T Q */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, n, 1.0f, S, nk, dO, Hq,
                    1.0f, dvc, hd);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nk, hd, 1.0f, dO, Hq, vc, hd,
                    0.0f, dP, nk);
        for (int i = 0; i < n; i++) {
            double d = 0;
            for (int t = 0; t < hd; t++)
                d += (double)dO[(size_t)i * Hq + t] * o[(size_t)i * Hq + t];
            float *pr = S + (size_t)i * nk, *dr = dP + (size_t)i * nk;
            for (int t = 0; t < nk; t++)
                dr[t] = pr[t] * (dr[t] - (float)d);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, nk, scale, dP, nk, kc, hd,
                    0.0f, j->dq + (size_t)r0 * Hq + (size_t)h * hd, Hq);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, nk, hd, n, scale, dP, nk, q, Hq,
                    1.0f, dkc, hd);
    }
    for (int t = 0; t < n; t++) {
        memcpy(j->dk + (size_t)(r0 + t) * KVd + (size_t)kvh * hd, dkc + (size_t)(P + t) * hd,
               (size_t)hd * sizeof(float));
        memcpy(j->dv + (size_t)(r0 + t) * KVd + (size_t)kvh * hd, dvc + (size_t)(P + t) * hd,
               (size_t)hd * sizeof(float));
    }
    if (P > 0) { /* this sequence's prefix gradients, its head's columns */
        float *pg = p->prefix_g + (size_t)s * 2 * (size_t)P * KVd;
        for (int t = 0; t < P; t++)
            for (int i = 0; i < hd; i++) {
                pg[(size_t)t * KVd + (size_t)kvh * hd + i] += dkc[(size_t)t * hd + i];
                pg[((size_t)P + t) * KVd + (size_t)kvh * hd + i] += dvc[(size_t)t * hd + i];
            }
    }
}

/* ==========================================================================================
 * The MLP's elementwise maths, on the pool: each item a contiguous span of the T * F elements,
 * every element computed with the same expressions as in one loop, so the results do not
 * depend on the threads */

struct act_job {
    enum ad_act act;
    size_t n;
    int items;
    const float *a, *b;  /* pre-activations: gate (or fc) and up (NULL: not gated) */
    const float *dh;     /* backward: the gradient of h */
    float *h, *da, *db;  /* forward: h; backward: the gradients of a and b */
};

static int act_items(const struct pass *p)
{
    int threads = ad_pool_threads(p->pool);
    return threads > 1 ? 4 * threads : 1;
}

static void act_span(const struct act_job *j, int item, size_t *lo, size_t *hi)
{
    *lo = j->n * (size_t)item / (size_t)j->items / 16 * 16;
    *hi = item + 1 == j->items ? j->n : j->n * (size_t)(item + 1) / (size_t)j->items / 16 * 16;
}

/* h = act(a) b, or act(a) */
static void act_fwd_item(void *ctx, int item, int thread)
{
    const struct act_job *j = ctx;
    size_t lo, hi;
    (void)thread;
    act_span(j, item, &lo, &hi);
    for (size_t i = lo; i < hi; i++)
        j->h[i] = j->b ? ad_act(j->act, j->a[i]) * j->b[i] : ad_act(j->act, j->a[i]);
}

static float act_grad(enum ad_act a, float x);

/* da = dh b act'(a), db = dh act(a) (gated), or da = dh act'(a). SiLU shares its exp between
 * act and act' (the same values as ad_act and act_grad compute). */
static void act_bwd_item(void *ctx, int item, int thread)
{
    const struct act_job *j = ctx;
    size_t lo, hi;
    (void)thread;
    act_span(j, item, &lo, &hi);
    if (j->act == AD_ACT_SILU && j->b) {
        for (size_t i = lo; i < hi; i++) {
            float a = j->a[i], e = expf(-a), sg = 1.0f / (1.0f + e);
            j->da[i] = j->dh[i] * j->b[i] * (sg * (1.0f + a * (1.0f - sg)));
            j->db[i] = j->dh[i] * (a / (1.0f + e));
        }
    } else if (j->b) {
        for (size_t i = lo; i < hi; i++) {
            float a = j->a[i];
            j->da[i] = j->dh[i] * j->b[i] * act_grad(j->act, a);
            j->db[i] = j->dh[i] * ad_act(j->act, a);
        }
    } else {
        for (size_t i = lo; i < hi; i++)
            j->da[i] = j->dh[i] * act_grad(j->act, j->a[i]);
    }
}

/* ==========================================================================================
 * Layers */

/* The layer's forward from t->x; writes its output (the next layer's input) to x_out. */
static void layer_fwd(struct pass *p, int l, float *x_out)
{
    const struct ad_model *m = p->m;
    const struct ad_layer *L = &m->layers[l];
    struct tape *t = &p->tape[l];
    int T = p->T, E = p->E, Hq = p->Hq, KVd = p->KVd, F = p->F, half = p->hd / 2;
    size_t TE = (size_t)T * E;
    const float *w, *b;
    float *xn = p->tmp + (size_t)T * (size_t)(F > Hq + 2 * KVd ? F : Hq + 2 * KVd);
    float *y = xn + TE;

    /* attention */
    norm_params(p, l, AD_NORM_ATTN, &w, &b);
    norm_fwd(p, w, b, t->x, xn, t->r1, t->m1);
    if (L->site[AD_ROLE_QKV]) { /* GPT-2: [q | k | v] */
        float *qkv = y + TE;
        site_fwd(p, L->site[AD_ROLE_QKV], xn, E, qkv, Hq + 2 * KVd, t->yb[AD_ROLE_QKV]);
        for (int r = 0; r < T; r++) {
            const float *row = qkv + (size_t)r * (Hq + 2 * KVd);
            memcpy(t->q + (size_t)r * Hq, row, (size_t)Hq * sizeof(float));
            memcpy(t->k + (size_t)r * KVd, row + Hq, (size_t)KVd * sizeof(float));
            memcpy(t->v + (size_t)r * KVd, row + Hq + KVd, (size_t)KVd * sizeof(float));
        }
    } else {
        site_fwd(p, L->site[AD_ROLE_Q], xn, E, t->q, Hq, t->yb[AD_ROLE_Q]);
        site_fwd(p, L->site[AD_ROLE_K], xn, E, t->k, KVd, t->yb[AD_ROLE_K]);
        site_fwd(p, L->site[AD_ROLE_V], xn, E, t->v, KVd, t->yb[AD_ROLE_V]);
    }
    if (m->rope_inv_freq)
        for (int r = 0; r < T; r++) {
            ad_rope(t->q + (size_t)r * Hq, p->c->n_head, p->hd, p->cos_ + (size_t)r * half,
                    p->sin_ + (size_t)r * half);
            ad_rope(t->k + (size_t)r * KVd, p->c->n_kv_head, p->hd, p->cos_ + (size_t)r * half,
                    p->sin_ + (size_t)r * half);
        }
    struct att_job aj = {.p = p, .layer = l, .q = t->q, .k = t->k, .v = t->v, .out = t->att,
                         .lse_out = t->lse};
    if (p->n_prefix) {
        aj.pk = p->h->prefix(p->ctx, l, 0);
        aj.pv = p->h->prefix(p->ctx, l, 1);
    }
    ad_pool_run(p->pool, p->n_seq * p->c->n_kv_head, att_fwd_item, &aj);
    site_fwd(p, L->site[AD_ROLE_O], t->att, Hq, y, E, t->yb[AD_ROLE_O]);
    if (t->y_in[0]) {
        memcpy(t->y_in[0], y, TE * sizeof(float));
        p->h->sublayer(p->ctx, l, AD_NORM_ATTN, t->x, y, T, NULL, 0);
    }
    for (size_t i = 0; i < TE; i++)
        t->xmid[i] = t->x[i] + y[i];

    /* MLP */
    norm_params(p, l, AD_NORM_MLP, &w, &b);
    norm_fwd(p, w, b, t->xmid, xn, t->r2, t->m2);
    float *h = y + TE;
    bool gated = L->site[AD_ROLE_GATE] != NULL;
    if (gated) {
        site_fwd(p, L->site[AD_ROLE_GATE], xn, E, t->pre_a, F, t->yb[AD_ROLE_GATE]);
        site_fwd(p, L->site[AD_ROLE_UP], xn, E, t->pre_b, F, t->yb[AD_ROLE_UP]);
    } else {
        site_fwd(p, L->site[AD_ROLE_UP], xn, E, t->pre_a, F, t->yb[AD_ROLE_UP]);
    }
    struct act_job act = {.act = p->c->act, .n = (size_t)T * F, .items = act_items(p),
                          .a = t->pre_a, .b = gated ? t->pre_b : NULL, .h = h};
    ad_pool_run(p->pool, act.items, act_fwd_item, &act);
    site_fwd(p, L->site[AD_ROLE_DOWN], h, F, y, E, t->yb[AD_ROLE_DOWN]);
    if (t->y_in[1]) {
        memcpy(t->y_in[1], y, TE * sizeof(float));
        p->h->sublayer(p->ctx, l, AD_NORM_MLP, t->xmid, y, T, NULL, 0);
    }
    for (size_t i = 0; i < TE; i++)
        x_out[i] = t->xmid[i] + y[i];
}

/* d act(x) / dx */
static float act_grad(enum ad_act a, float x)
{
    switch (a) {
    case AD_ACT_SILU: {
        float sg = 1.0f / (1.0f + expf(-x));
        return sg * (1.0f + x * (1.0f - sg));
    }
    case AD_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f;
        float u = k * (x + 0.044715f * x * x * x), th = tanhf(u);
        return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * k * (1.0f + 3 * 0.044715f * x * x);
    }
    default:
        return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) +
               x * 0.3989422804014327f * expf(-0.5f * x * x);
    }
}

/* Floats at the start of p->tmp that site_bwd (the gradient of a site's input) and
 * norm_backward (2 n_embd) use for themselves. */
static size_t bwd_first(const struct pass *p)
{
    int widest = p->F > p->E ? p->F : p->E;
    widest = p->Hq > widest ? p->Hq : widest;
    return (size_t)p->T * (size_t)widest + 2 * (size_t)p->E;
}

/* The layer's backward: dx [T, E] holds the gradient of its output and becomes the gradient of
 * its input. Work buffers: p->tmp. */
static void layer_bwd(struct pass *p, int l, float *dx)
{
    const struct ad_model *m = p->m;
    const struct ad_layer *L = &m->layers[l];
    struct tape *t = &p->tape[l];
    int T = p->T, E = p->E, Hq = p->Hq, KVd = p->KVd, F = p->F, half = p->hd / 2;
    size_t TE = (size_t)T * E, TF = (size_t)T * F;
    const float *w, *b;
    /* work space after the floats site_bwd and norm_backward use themselves (bwd_first) */
    size_t first = bwd_first(p);
    float *xn = p->tmp + first, *dy = xn + TE, *dmid = dy + TE, *h = dmid + TE, *dh = h + TF;
    float *da = dh + TF, *db = da + TF;

    /* MLP: x_out = xmid + y2; dy2 = dx, dxmid = dx */
    memcpy(dmid, dx, TE * sizeof(float));
    memcpy(dy, dx, TE * sizeof(float));
    if (t->y_in[1])
        p->h->sublayer_grad(p->ctx, l, AD_NORM_MLP, t->xmid, t->y_in[1], dy, dmid, T);
    norm_params(p, l, AD_NORM_MLP, &w, &b);
    norm_apply(p, w, b, t->xmid, t->r2, t->m2, xn);
    bool gated = L->site[AD_ROLE_GATE] != NULL;
    struct act_job act = {.act = p->c->act, .n = TF, .items = act_items(p), .a = t->pre_a,
                          .b = gated ? t->pre_b : NULL, .dh = dh, .h = h, .da = da, .db = db};
    ad_pool_run(p->pool, act.items, act_fwd_item, &act); /* h again */
    memset(dh, 0, TF * sizeof(float));
    site_bwd(p, L->site[AD_ROLE_DOWN], h, F, t->yb[AD_ROLE_DOWN], dy, E, dh, F);
    float *dxn = dy; /* dy is spent: the gradient of the MLP's normed input */
    memset(dxn, 0, TE * sizeof(float));
    ad_pool_run(p->pool, act.items, act_bwd_item, &act);
    if (gated) {
        site_bwd(p, L->site[AD_ROLE_GATE], xn, E, t->yb[AD_ROLE_GATE], da, F, dxn, E);
        site_bwd(p, L->site[AD_ROLE_UP], xn, E, t->yb[AD_ROLE_UP], db, F, dxn, E);
    } else {
        site_bwd(p, L->site[AD_ROLE_UP], xn, E, t->yb[AD_ROLE_UP], da, F, dxn, E);
    }
    norm_backward(p, l, AD_NORM_MLP, t->xmid, t->r2, t->m2, dxn, dmid);

    /* attention: xmid = x + y1 */
    memcpy(dx, dmid, TE * sizeof(float));
    memcpy(dy, dmid, TE * sizeof(float));
    if (t->y_in[0])
        p->h->sublayer_grad(p->ctx, l, AD_NORM_ATTN, t->x, t->y_in[0], dy, dx, T);
    float *datt = h, *dq = datt + (size_t)T * Hq, *dk = dq + (size_t)T * Hq;
    float *dv = dk + (size_t)T * KVd;
    memset(datt, 0, (size_t)T * Hq * sizeof(float));
    site_bwd(p, L->site[AD_ROLE_O], t->att, Hq, t->yb[AD_ROLE_O], dy, E, datt, Hq);
    struct att_job aj = {.p = p, .layer = l, .q = t->q, .k = t->k, .v = t->v, .att = t->att,
                         .lse = t->lse, .datt = datt, .dq = dq, .dk = dk, .dv = dv};
    size_t P = (size_t)p->n_prefix;
    if (P) {
        aj.pk = p->h->prefix(p->ctx, l, 0);
        aj.pv = p->h->prefix(p->ctx, l, 1);
        memset(p->prefix_g, 0, (size_t)p->n_seq * 2 * P * KVd * sizeof(float));
    }
    ad_pool_run(p->pool, p->n_seq * p->c->n_kv_head, att_bwd_item, &aj);
    if (P && p->h->prefix_grad) {
        for (int s = 1; s < p->n_seq; s++)
            for (size_t i = 0; i < 2 * P * KVd; i++)
                p->prefix_g[i] += p->prefix_g[(size_t)s * 2 * P * KVd + i];
        p->h->prefix_grad(p->ctx, l, 0, p->prefix_g);
        p->h->prefix_grad(p->ctx, l, 1, p->prefix_g + P * KVd);
    }
    if (m->rope_inv_freq)
        for (int r = 0; r < T; r++) {
            ad_rope(dq + (size_t)r * Hq, p->c->n_head, p->hd, p->cos_ + (size_t)r * half,
                    p->nsin + (size_t)r * half);
            ad_rope(dk + (size_t)r * KVd, p->c->n_kv_head, p->hd, p->cos_ + (size_t)r * half,
                    p->nsin + (size_t)r * half);
        }
    norm_params(p, l, AD_NORM_ATTN, &w, &b);
    norm_apply(p, w, b, t->x, t->r1, t->m1, xn);
    float *dxn1 = dmid; /* spent too */
    memset(dxn1, 0, TE * sizeof(float));
    if (L->site[AD_ROLE_QKV]) {
        float *dqkv = dv + (size_t)T * KVd;
        for (int r = 0; r < T; r++) {
            float *row = dqkv + (size_t)r * (Hq + 2 * KVd);
            memcpy(row, dq + (size_t)r * Hq, (size_t)Hq * sizeof(float));
            memcpy(row + Hq, dk + (size_t)r * KVd, (size_t)KVd * sizeof(float));
            memcpy(row + Hq + KVd, dv + (size_t)r * KVd, (size_t)KVd * sizeof(float));
        }
        site_bwd(p, L->site[AD_ROLE_QKV], xn, E, t->yb[AD_ROLE_QKV], dqkv, Hq + 2 * KVd, dxn1,
                 E);
    } else {
        site_bwd(p, L->site[AD_ROLE_Q], xn, E, t->yb[AD_ROLE_Q], dq, Hq, dxn1, E);
        site_bwd(p, L->site[AD_ROLE_K], xn, E, t->yb[AD_ROLE_K], dk, KVd, dxn1, E);
        site_bwd(p, L->site[AD_ROLE_V], xn, E, t->yb[AD_ROLE_V], dv, KVd, dxn1, E);
    }
    norm_backward(p, l, AD_NORM_ATTN, t->x, t->r1, t->m1, dxn1, dx);
}

/* ==========================================================================================
 * Loss: the final norm and lm_head over the rows that have a target, a block of rows at once
 * (the logits of a whole batch would not fit) */

#define LOSS_ROWS 64

/* One row of a loss block: its -log p(target) into terms[i], and (loss_scale != 0) the
 * gradient of its logits in their place. A pool item per row. */
struct loss_job {
    float *logits;
    const int32_t *tgt;
    const int *rows;
    double *terms;
    int V;
    float loss_scale;
};

static void loss_row_item(void *ctx, int i, int thread)
{
    const struct loss_job *j = ctx;
    int V = j->V;
    float *lg = j->logits + (size_t)i * V, mx = -INFINITY;
    (void)thread;
    for (int k = 0; k < V; k++)
        mx = lg[k] > mx ? lg[k] : mx;
    double sum = 0;
    for (int k = 0; k < V; k++)
        sum += exp((double)(lg[k] - mx));
    int target = j->tgt[j->rows[i]];
    j->terms[i] = (double)mx + log(sum) - (double)lg[target];
    if (j->loss_scale == 0)
        return;
    /* d loss / d logits = scale (softmax - onehot) */
    float inv = (float)(1.0 / sum);
    for (int k = 0; k < V; k++)
        lg[k] = j->loss_scale * expf(lg[k] - mx) * inv;
    lg[target] -= j->loss_scale;
}

static void loss_pass(struct pass *p, float loss_scale, double *ret_loss, int64_t *ret_n,
                      float *dxf)
{
    const struct ad_model *m = p->m;
    const struct ad_site *head = &m->sites[m->n_sites - 1];
    int E = p->E, V = p->c->n_vocab;
    const float *w, *b;
    norm_params(p, -1, AD_NORM_FINAL, &w, &b);
    float *xn = p->tmp + (size_t)LOSS_ROWS * ((size_t)V + (size_t)E) + 2 * (size_t)E;
    float *logits = xn + (size_t)LOSS_ROWS * E, *yb = logits + (size_t)LOSS_ROWS * V;
    float *dxn = yb + (size_t)LOSS_ROWS * V, *dxr = dxn + (size_t)LOSS_ROWS * E;
    float *x_rows = dxr + (size_t)LOSS_ROWS * E;
    int rows[LOSS_ROWS];
    (void)dxf;
    bool keep = wants_yb(p, head);
    struct pass sub = *p; /* the same pass over a block of rows */

    for (int r = 0; r < p->T;) {
        int n = 0;
        for (; r < p->T && n < LOSS_ROWS; r++)
            if (p->tgt[r] >= 0)
                rows[n++] = r;
        if (n == 0)
            continue;
        sub.T = n;
        float rs[LOSS_ROWS], ms[LOSS_ROWS];
        for (int i = 0; i < n; i++)
            memcpy(x_rows + (size_t)i * E, p->xf + (size_t)rows[i] * E, (size_t)E * sizeof(float));
        norm_fwd(&sub, w, b, x_rows, xn, rs, ms);
        sub.tmp = p->tmp; /* site_fwd's own copy of x, if it needs one */
        site_fwd(&sub, head, xn, E, logits, V, keep ? yb : NULL);
        double terms[LOSS_ROWS];
        struct loss_job lj = {.logits = logits, .tgt = p->tgt, .rows = rows, .terms = terms,
                              .V = V, .loss_scale = loss_scale};
        ad_pool_run(p->pool, n, loss_row_item, &lj);
        for (int i = 0; i < n; i++) { /* in row order, as one loop adds them */
            *ret_loss += terms[i];
            (*ret_n)++;
        }
        if (loss_scale == 0)
            continue;
        memset(dxn, 0, (size_t)n * E * sizeof(float));
        site_bwd(&sub, head, xn, E, keep ? yb : NULL, logits, V, dxn, E);
        memset(dxr, 0, (size_t)n * E * sizeof(float));
        sub.tmp = p->tmp + (size_t)LOSS_ROWS * ((size_t)V + (size_t)E);
        norm_backward(&sub, -1, AD_NORM_FINAL, x_rows, rs, ms, dxn, dxr);
        for (int i = 0; i < n; i++)
            memcpy(dxf + (size_t)rows[i] * E, dxr + (size_t)i * E, (size_t)E * sizeof(float));
    }
}

/* ==========================================================================================
 * The pass */

size_t ad_train_floats_per_row(const struct ad_model *m, const struct ad_hooks *hooks,
                               const void *ctx)
{
    const struct ad_model_config *c = &m->cfg;
    size_t E = (size_t)c->n_embd, Hq = (size_t)c->n_head * (size_t)c->head_dim;
    size_t KVd = (size_t)c->n_kv_head * (size_t)c->head_dim, F = (size_t)c->n_ff;
    size_t per_layer = 2 * E + Hq * 2 + 2 * KVd + (size_t)c->n_head + 2 * F + 4;
    size_t extra = 0;
    for (int l = 0; ctx && hooks && l < c->n_layer; l++) {
        for (int role = 0; role < AD_ROLE_LM_HEAD; role++) {
            const struct ad_site *s = m->layers[l].site[role];
            if (s && hooks->site_wants_yb && hooks->site_wants_yb(ctx, s))
                extra += (size_t)s->n_out;
        }
        if (hooks->sublayer)
            extra += 2 * E;
    }
    /* the layers' tapes, the last residual, positions, RoPE and the backward's work space */
    return (size_t)c->n_layer * per_layer + extra + E + 3 * (size_t)c->head_dim / 2 + 4 +
           8 * (E > F ? E : F) + 2 * (Hq + 2 * KVd);
}

/* Sets up rows, positions and the pass's buffers. Returns 0 or -errno. */
static int setup(struct pass *p, const struct ad_train_batch *b, struct ad_train_scratch *ts,
                 struct ad_err *err)
{
    const struct ad_model *m = p->m;
    const struct ad_model_config *c = &m->cfg;
    p->E = c->n_embd;
    p->hd = c->head_dim;
    p->Hq = c->n_head * c->head_dim;
    p->KVd = c->n_kv_head * c->head_dim;
    p->F = c->n_ff;
    p->n_prefix = hooked(p) && p->h->n_prefix ? p->h->n_prefix(p->ctx) : 0;
    p->n_virtual = hooked(p) && p->h->n_virtual ? p->h->n_virtual(p->ctx) : 0;
    p->n_seq = b->n_seq;
    if (b->n_seq < 1)
        return ad_err_set(err, -EINVAL, "the batch has no sequence");
    size_t T = 0, max_n = 0;
    for (int s = 0; s < b->n_seq; s++) {
        int n = b->n_tokens[s] + p->n_virtual;
        if (b->n_tokens[s] < 1 || n + p->n_prefix > c->n_ctx_max)
            return ad_err_set(err, -EINVAL, "sequence %d: %d tokens (with %d virtual and %d "
                              "prefix positions) do not fit the context of %d", s,
                              b->n_tokens[s], p->n_virtual, p->n_prefix, c->n_ctx_max);
        for (int i = 0; i < b->n_tokens[s]; i++)
            if (b->tokens[s][i] < 0 || b->tokens[s][i] >= c->n_vocab ||
                b->targets[s][i] < -1 || b->targets[s][i] >= c->n_vocab)
                return ad_err_set(err, -EINVAL, "sequence %d, token %d: an id outside the "
                                  "vocabulary of %d", s, i, c->n_vocab);
        T += (size_t)n;
        max_n = (size_t)n > max_n ? (size_t)n : max_n;
    }
    p->T = (int)T;

    size_t E = (size_t)p->E, Hq = (size_t)p->Hq, KVd = (size_t)p->KVd, F = (size_t)p->F;
    size_t half = (size_t)p->hd / 2, L = (size_t)c->n_layer, V = (size_t)c->n_vocab;
    size_t P = (size_t)p->n_prefix, nk = P + max_n, hd = (size_t)p->hd;
    size_t threads = (size_t)ad_pool_threads(ts->pool);
    /* work space: the layers' forward and backward, the loss blocks */
    size_t wide = F > Hq + 2 * KVd ? F : Hq + 2 * KVd;
    size_t tail = 4 * T * F > T * (3 * Hq + 4 * KVd) ? 4 * T * F : T * (3 * Hq + 4 * KVd);
    size_t layer_tmp = bwd_first(p) + 3 * T * E + tail + T * wide;
    if (layer_tmp < T * wide + 2 * T * E + T * wide) /* the forward's */
        layer_tmp = T * wide + 2 * T * E + T * wide;
    size_t loss_tmp = LOSS_ROWS * (2 * V + 5 * E) + 4 * E + LOSS_ROWS * (V + E);
    p->tmp_len = layer_tmp > loss_tmp ? layer_tmp : loss_tmp;
    p->att_len = 4 * nk * hd + 2 * max_n * nk;
    size_t per_layer = 2 * E + 2 * Hq + 2 * KVd + (size_t)c->n_head + 2 * F + 4;
    size_t extra = 0;
    bool sub = hooked(p) && p->h->sublayer;
    for (size_t l = 0; l < L; l++) {
        for (int role = 0; role < AD_ROLE_LM_HEAD; role++) {
            const struct ad_site *s = m->layers[l].site[role];
            extra += s && wants_yb(p, s) ? T * (size_t)s->n_out : 0;
        }
        extra += sub ? 2 * T * E : 0;
    }
    size_t total = L * per_layer * T + extra + 2 * T * E + 3 * T * half + 2 * T + p->tmp_len +
                   threads * p->att_len + (size_t)b->n_seq * 2 * P * KVd + 64;
    if (total > ts->cap) {
        free(ts->buf);
        ts->buf = malloc(total * sizeof(float));
        ts->cap = ts->buf ? total : 0;
        if (!ts->buf)
            return ad_err_set(err, -ENOMEM, "out of memory for a training batch of %zu rows", T);
    }
    size_t ineed = 3 * T + 2 * (size_t)b->n_seq;
    if (ineed > ts->icap) {
        free(ts->ibuf);
        ts->ibuf = malloc(ineed * sizeof(int32_t));
        ts->icap = ts->ibuf ? ineed : 0;
        if (!ts->ibuf)
            return ad_err_set(err, -ENOMEM, "out of memory for a training batch of %zu rows", T);
    }
    p->tape = calloc(L, sizeof(*p->tape));
    if (!p->tape)
        return ad_err_set(err, -ENOMEM, "out of memory");

    float *f = ts->buf;
#define TAKE(n) (f += (n), f - (n))
    for (size_t l = 0; l < L; l++) {
        struct tape *t = &p->tape[l];
        t->x = TAKE(T * E);
        t->q = TAKE(T * Hq);
        t->k = TAKE(T * KVd);
        t->v = TAKE(T * KVd);
        t->att = TAKE(T * Hq);
        t->lse = TAKE(T * (size_t)c->n_head);
        t->xmid = TAKE(T * E);
        t->pre_a = TAKE(T * F);
        t->pre_b = TAKE(T * F);
        t->r1 = TAKE(T);
        t->m1 = TAKE(T);
        t->r2 = TAKE(T);
        t->m2 = TAKE(T);
        for (int role = 0; role < AD_ROLE_LM_HEAD; role++) {
            const struct ad_site *s = m->layers[l].site[role];
            t->yb[role] = s && wants_yb(p, s) ? TAKE(T * (size_t)s->n_out) : NULL;
        }
        t->y_in[0] = sub ? TAKE(T * E) : NULL;
        t->y_in[1] = sub ? TAKE(T * E) : NULL;
    }
    p->xf = TAKE(T * E);
    p->dx = TAKE(T * E);
    p->cos_ = TAKE(T * half);
    p->sin_ = TAKE(T * half);
    p->nsin = TAKE(T * half);
    p->rf = TAKE(T);
    p->mf = TAKE(T);
    p->tmp = TAKE(p->tmp_len);
    p->att_tmp = TAKE(threads * p->att_len);
    p->prefix_g = TAKE((size_t)b->n_seq * 2 * P * KVd);
#undef TAKE

    int32_t *ib = ts->ibuf;
    p->tok = ib;
    p->tgt = ib + T;
    p->pos = ib + 2 * T;
    p->seq_row = ib + 3 * T;
    p->seq_len = ib + 3 * T + (size_t)b->n_seq;
    for (int s = 0, r = 0; s < b->n_seq; s++) {
        p->seq_row[s] = r;
        p->seq_len[s] = b->n_tokens[s] + p->n_virtual;
        for (int i = 0; i < p->seq_len[s]; i++, r++) {
            int k = i - p->n_virtual; /* index among the real tokens */
            p->tok[r] = k < 0 ? -1 - i : b->tokens[s][k];
            p->tgt[r] = k < 0 ? -1 : b->targets[s][k];
            p->pos[r] = p->n_prefix + i;
        }
    }
    for (size_t r = 0; m->rope_inv_freq && r < T; r++)
        for (size_t k = 0; k < half; k++) {
            double a = (double)p->pos[r] * (double)m->rope_inv_freq[k];
            p->cos_[r * half + k] = (float)cos(a);
            p->sin_[r * half + k] = (float)sin(a);
            p->nsin[r * half + k] = -p->sin_[r * half + k];
        }
    return 0;
}

int ad_model_train(const struct ad_model *m, const struct ad_train_batch *b,
                   const struct ad_hooks *hooks, void *ctx, struct ad_model_grads *g,
                   float loss_scale, struct ad_train_scratch *ts, double *ret_loss,
                   int64_t *ret_n_targets, struct ad_err *err)
{
    struct pass p = {.m = m, .c = &m->cfg, .h = ctx ? hooks : NULL, .ctx = ctx,
                     .g = loss_scale != 0 ? g : NULL, .pool = ts->pool};
    if (ctx && !hooks)
        return ad_err_set(err, -EINVAL, "a context without hooks");
    int rc = setup(&p, b, ts, err);
    if (rc < 0) {
        free(p.tape);
        return rc;
    }
    struct ad_pool *outer = current_pool;
    current_pool = ts->pool;
    ad_pool_spin(ts->pool, true);
    int E = p.E, T = p.T;
    size_t TE = (size_t)T * E;

    /* embeddings: tokens, the hooks' virtual tokens, learned positions */
    float *x = p.tape[0].x;
    for (int r = 0; r < T; r++) {
        const float *e = p.tok[r] < 0 ? p.h->virtual_embedding(ctx, -1 - p.tok[r])
                         : hooked(&p) && p.h->embedding ? p.h->embedding(ctx, p.tok[r]) : NULL;
        memcpy(x + (size_t)r * E, e ? e : m->tok_embd + (size_t)p.tok[r] * E,
               (size_t)E * sizeof(float));
        const float *pe = hooked(&p) && p.h->position ? p.h->position(ctx, p.pos[r]) : NULL;
        if (m->pos_embd)
            for (int i = 0; i < E; i++)
                x[(size_t)r * E + i] += pe ? pe[i] : m->pos_embd[(size_t)p.pos[r] * E + i];
    }
    int L = m->cfg.n_layer;
    for (int l = 0; l < L; l++)
        layer_fwd(&p, l, l + 1 < L ? p.tape[l + 1].x : p.xf);

    /* the loss, and its gradient at the last residual; then back through the layers */
    float *dx = p.dx;
    memset(dx, 0, TE * sizeof(float));
    loss_pass(&p, loss_scale, ret_loss, ret_n_targets, dx);
    if (loss_scale == 0)
        goto out;
    for (int l = L - 1; l >= 0; l--)
        layer_bwd(&p, l, dx);

    /* embeddings' gradients */
    for (int r = 0; r < T; r++) {
        const float *d = dx + (size_t)r * E;
        if (p.tok[r] < 0) {
            if (p.h->virtual_grad)
                p.h->virtual_grad(ctx, -1 - p.tok[r], d);
            continue;
        }
        if (!p.g)
            continue;
        float *ge = p.g->tok_embd + (size_t)p.tok[r] * E;
        for (int i = 0; i < E; i++)
            ge[i] += d[i];
        if (p.g->pos_embd) {
            float *gp = p.g->pos_embd + (size_t)p.pos[r] * E;
            for (int i = 0; i < E; i++)
                gp[i] += d[i];
        }
    }
out:
    ad_pool_spin(ts->pool, false);
    current_pool = outer;
    free(p.tape);
    return rc;
}
