/* The batched forward pass: every chunk of every sequence in one pass, each linear (site) one
 * matrix product for all rows, attention per sequence over its paged KV cache.
 *
 * Row layout: the batch's T rows are the chunks' tokens, chunk after chunk. The q, k and v of a
 * row sit side by side in one buffer ([q | k | v], row stride ld_qkv), which is also what GPT-2's
 * fused c_attn produces, so both families share the attention code. */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/adapter.h"
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
    BUF_KG,  /* [ctx, KVd] gathered keys of one sequence */
    BUF_VG,  /* [ctx, KVd] */
    BUF_S,   /* [chunk, ctx] attention scores */
    BUF_XO,  /* [n_logits, E] rows that produce logits */
    BUF_TMP, /* adapter deltas' work space */
    N_BUF,
};

/* A run of rows that share one mix of adapters. */
struct group {
    int r0, n;
    const struct ad_mix *mix;
    bool x_scaled; /* set by site_groups for the site in progress */
};

struct ad_scratch {
    float *buf[N_BUF];
    size_t cap[N_BUF];
    int32_t *pos; /* [T] */
    size_t pos_cap;
    struct group *groups;
    size_t groups_cap;
    int n_groups;
};

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

/* y[n, n_out] (row stride ldy) = x[n, n_in] (row stride ldx) W^T + b, one BLAS call. */
static void linear(const struct ad_site *s, const float *x, int ldx, int n, float *y, int ldy)
{
    if (n == 1) {
        if (s->w_in_out)
            cblas_sgemv(CblasRowMajor, CblasTrans, s->n_in, s->n_out, 1.0f, s->w, s->n_out, x, 1,
                        0.0f, y, 1);
        else
            cblas_sgemv(CblasRowMajor, CblasNoTrans, s->n_out, s->n_in, 1.0f, s->w, s->n_in, x,
                        1, 0.0f, y, 1);
    } else if (s->w_in_out) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, s->n_out, s->n_in, 1.0f, x, ldx,
                    s->w, s->n_out, 0.0f, y, ldy);
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, s->n_out, s->n_in, 1.0f, x, ldx,
                    s->w, s->n_in, 0.0f, y, ldy);
    }
    if (s->b)
        for (int i = 0; i < n; i++) {
            float *row = y + (size_t)i * (size_t)ldy;
            for (int j = 0; j < s->n_out; j++)
                row[j] += s->b[j];
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
        if (G->mix)
            ad_mix_norm(G->mix, layer, slot, &w, &b);
        norm_rows(m, w, b, x + (size_t)G->r0 * E, G->n, out + (size_t)G->r0 * E);
    }
}

/* A site over every row: one matrix product for the whole batch, then each group's adapter
 * deltas on its own rows. x_exclusive: no other site reads x, so input-side deltas may scale it
 * in place. */
static void site_groups(const struct ad_site *site, struct ad_scratch *s, float *x, int ldx,
                        bool x_exclusive, int T, float *y, int ldy)
{
    for (int g = 0; g < s->n_groups; g++) {
        struct group *G = &s->groups[g];
        G->x_scaled = x_exclusive && G->mix &&
                      ad_mix_site_pre(G->mix, site, x + (size_t)G->r0 * ldx, ldx, G->n);
    }
    linear(site, x, ldx, T, y, ldy);
    for (int g = 0; g < s->n_groups; g++) {
        const struct group *G = &s->groups[g];
        if (G->mix)
            ad_mix_site_post(G->mix, site, x + (size_t)G->r0 * ldx, ldx, G->x_scaled,
                             y + (size_t)G->r0 * ldy, ldy, G->n, s->buf[BUF_TMP],
                             s->cap[BUF_TMP]);
    }
}

static void sublayer_groups(const struct ad_model *m, struct ad_scratch *s, int layer,
                            enum ad_norm_slot slot, const float *x, float *y)
{
    size_t E = (size_t)m->cfg.n_embd;
    for (int g = 0; g < s->n_groups; g++) {
        const struct group *G = &s->groups[g];
        if (G->mix)
            ad_mix_sublayer(G->mix, layer, slot, x + (size_t)G->r0 * E, y + (size_t)G->r0 * E,
                            G->n, s->buf[BUF_TMP], s->cap[BUF_TMP]);
    }
}

static float act(enum ad_act a, float x)
{
    switch (a) {
    case AD_ACT_SILU:
        return x / (1.0f + expf(-x));
    case AD_ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default:
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

/* Rotates each head of n_heads (head_dim hd) in place: the "rotate_half" layout of HF Llama. */
static void rope(float *x, int n_heads, int hd, const float *cos_, const float *sin_)
{
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * hd;
        for (int j = 0; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = a * cos_[j] - b * sin_[j];
            v[j + half] = b * cos_[j] + a * sin_[j];
        }
    }
}

/* Softmax of row[0..n) in place; entries outside [lo, hi) become 0. */
static void softmax_range(float *row, int n, int lo, int hi)
{
    float mx = -INFINITY, sum = 0;
    for (int j = lo; j < hi; j++)
        mx = row[j] > mx ? row[j] : mx;
    for (int j = lo; j < hi; j++) {
        row[j] = expf(row[j] - mx);
        sum += row[j];
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < lo; j++)
        row[j] = 0;
    for (int j = lo; j < hi; j++)
        row[j] *= inv;
    for (int j = hi; j < n; j++)
        row[j] = 0;
}

/* ==========================================================================================
 * Attention of one chunk in one layer */

static float *kv_slot(const struct ad_kv *kv, float *base, int layer, const struct ad_kv_seq *s,
                      int pos)
{
    size_t block = (size_t)s->blocks[pos / kv->block_size];
    size_t slot = (size_t)(pos % kv->block_size);
    size_t per_layer = (size_t)kv->n_blocks * (size_t)kv->block_size * (size_t)kv->kv_dim;
    return base + (size_t)layer * per_layer +
           (block * (size_t)kv->block_size + slot) * (size_t)kv->kv_dim;
}

/* Gathers positions [lo, hi) of a sequence's K (or V) into dst [hi - lo, KVd]. */
static void kv_gather(const struct ad_kv *kv, float *base, int layer, const struct ad_kv_seq *s,
                      int lo, int hi, float *dst)
{
    int B = kv->block_size;
    for (int p = lo; p < hi;) {
        int n = B - p % B;
        if (n > hi - p)
            n = hi - p;
        memcpy(dst, kv_slot(kv, base, layer, s, p), (size_t)n * (size_t)kv->kv_dim * sizeof(float));
        dst += (size_t)n * (size_t)kv->kv_dim;
        p += n;
    }
}

/* Rows [r0, r0 + n) of qkv hold the chunk's queries (already rotated); their keys and values are
 * already in the cache at positions [pos0, pos0 + n). Writes att rows [r0, r0 + n). */
static void attend_chunk(const struct ad_model *m, const struct ad_kv *kv, struct ad_scratch *s,
                         int layer, const struct ad_kv_seq *seq, int pos0, int n, const float *q,
                         int ld_q, float *att, int ld_att)
{
    const struct ad_model_config *c = &m->cfg;
    int hd = c->head_dim, kvd = kv->kv_dim, group = c->n_head / c->n_kv_head;
    int W = c->sliding_window;
    int hi = pos0 + n;
    int lo = W > 0 && pos0 - W + 1 > 0 ? pos0 - W + 1 : 0;
    int nk = hi - lo;
    float *kg = s->buf[BUF_KG], *vg = s->buf[BUF_VG], *S = s->buf[BUF_S];
    float scale = 1.0f / sqrtf((float)hd);

    kv_gather(kv, kv->k, layer, seq, lo, hi, kg);
    kv_gather(kv, kv->v, layer, seq, lo, hi, vg);
    for (int h = 0; h < c->n_head; h++) {
        const float *qh = q + h * hd, *kh = kg + (h / group) * hd, *vh = vg + (h / group) * hd;
        float *out = att + h * hd;
        if (n == 1) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, nk, hd, scale, kh, kvd, qh, 1, 0.0f, S, 1);
            softmax_range(S, nk, 0, nk);
            cblas_sgemv(CblasRowMajor, CblasTrans, nk, hd, 1.0f, vh, kvd, S, 1, 0.0f, out, 1);
            continue;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, nk, hd, scale, qh, ld_q, kh, kvd,
                    0.0f, S, nk);
        for (int i = 0; i < n; i++) {
            int p = pos0 + i; /* query position: sees keys (p - W, p] */
            int klo = W > 0 && p - W + 1 > lo ? p - W + 1 - lo : 0;
            softmax_range(S + (size_t)i * nk, nk, klo, p + 1 - lo);
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hd, nk, 1.0f, S, nk, vh, kvd,
                    0.0f, out, ld_att);
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

/* Tokens already cached for a chunk's sequence, counting a prefix that its first pass adds. */
static int past_of(const struct ad_chunk *ch)
{
    return ch->seq->n_tokens == 0 && ch->mix ? ad_mix_n_prefix(ch->mix) : ch->seq->n_tokens;
}

static int prepare(const struct ad_model *m, struct ad_kv *kv, const struct ad_chunk *chunks,
                   int n_chunks, struct ad_scratch *s, struct ad_err *err)
{
    const struct ad_model_config *c = &m->cfg;
    size_t T = 0, max_n = 0, max_ctx = 0, n_out = 0;
    int blocks = 0;

    for (int i = 0; i < n_chunks; i++) {
        const struct ad_chunk *ch = &chunks[i];
        int end = past_of(ch) + ch->n_tokens;
        int n_virtual = ch->mix ? ad_mix_n_virtual(ch->mix) : 0;
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
        blocks += ad_kv_blocks_for(kv, end) - ch->seq->n_blocks;
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
    size_t sizes[N_BUF] = {
        [BUF_X] = T * E,         [BUF_XN] = T * E,     [BUF_QKV] = T * (Hq + 2 * KVd),
        [BUF_ATT] = T * Hq,      [BUF_Y] = T * E,      [BUF_FA] = T * F,
        [BUF_FB] = T * F,        [BUF_COS] = T * half, [BUF_SIN] = T * half,
        [BUF_KG] = max_ctx * KVd, [BUF_VG] = max_ctx * KVd, [BUF_S] = max_n * max_ctx,
        [BUF_XO] = n_out * E,    [BUF_TMP] = T * (widest + E) + 4096,
    };
    for (int i = 0; i < N_BUF; i++)
        if (reserve(&s->buf[i], &s->cap[i], sizes[i], sizeof(float)) < 0)
            return ad_err_set(err, -ENOMEM, "out of memory for a batch of %zu tokens", T);
    if (reserve((float **)&s->pos, &s->pos_cap, T, sizeof(int32_t)) < 0 ||
        reserve((float **)&s->groups, &s->groups_cap, (size_t)n_chunks, sizeof(struct group)) < 0)
        return ad_err_set(err, -ENOMEM, "out of memory for a batch of %zu tokens", T);

    /* Row groups: runs of adjacent chunks with the same mix. */
    s->n_groups = 0;
    for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++) {
        struct group *last = s->n_groups ? &s->groups[s->n_groups - 1] : NULL;
        if (last && last->mix == chunks[i].mix)
            last->n += chunks[i].n_tokens;
        else
            s->groups[s->n_groups++] = (struct group){r, chunks[i].n_tokens, chunks[i].mix, false};
    }

    for (int i = 0; i < n_chunks; i++) {
        int r = ad_kv_seq_reserve(kv, chunks[i].seq, past_of(&chunks[i]) + chunks[i].n_tokens);
        if (r < 0)
            return ad_err_set(err, r, "KV cache: cannot reserve blocks");
    }
    return (int)T;
}

/* Writes a new sequence's prefix-tuning keys and values as its first cache positions. */
static void place_prefix(const struct ad_model *m, struct ad_kv *kv, struct ad_chunk *ch)
{
    int P = ad_mix_n_prefix(ch->mix);
    size_t KVd = (size_t)kv->kv_dim;
    for (int l = 0; l < m->cfg.n_layer; l++) {
        const float *k = ad_mix_prefix(ch->mix, l, 0), *v = ad_mix_prefix(ch->mix, l, 1);
        for (int p = 0; p < P; p++) {
            memcpy(kv_slot(kv, kv->k, l, ch->seq, p), k + (size_t)p * KVd, KVd * sizeof(float));
            memcpy(kv_slot(kv, kv->v, l, ch->seq, p), v + (size_t)p * KVd, KVd * sizeof(float));
        }
    }
    ch->seq->n_tokens = P;
}

int ad_model_forward(const struct ad_model *m, struct ad_kv *kv, struct ad_chunk *chunks,
                     int n_chunks, struct ad_scratch *s, float *logits, struct ad_err *err)
{
    const struct ad_model_config *c = &m->cfg;
    int T = prepare(m, kv, chunks, n_chunks, s, err);
    if (T < 0)
        return T;

    int E = c->n_embd, hd = c->head_dim, half = hd / 2, F = c->n_ff;
    int Hq = c->n_head * hd, KVd = kv->kv_dim, ld_qkv = Hq + 2 * KVd;
    float *x = s->buf[BUF_X], *xn = s->buf[BUF_XN], *qkv = s->buf[BUF_QKV];
    float *att = s->buf[BUF_ATT], *y = s->buf[BUF_Y], *fa = s->buf[BUF_FA], *fb = s->buf[BUF_FB];
    int32_t *pos = s->pos;

    for (int i = 0; i < n_chunks; i++)
        if (chunks[i].seq->n_tokens == 0 && chunks[i].mix && ad_mix_n_prefix(chunks[i].mix) > 0)
            place_prefix(m, kv, &chunks[i]);

    /* Embeddings (virtual tokens from the prompt adapter) and per-row positions (+ RoPE). */
    for (int i = 0, r = 0; i < n_chunks; i++)
        for (int j = 0; j < chunks[i].n_tokens; j++, r++) {
            int tok = chunks[i].tokens[j];
            const float *emb = tok >= 0 ? m->tok_embd + (size_t)tok * E
                                        : ad_mix_virtual_embedding(chunks[i].mix, -1 - tok);
            pos[r] = chunks[i].seq->n_tokens + j;
            memcpy(x + (size_t)r * E, emb, (size_t)E * sizeof(float));
            if (m->pos_embd)
                for (int e = 0; e < E; e++)
                    x[(size_t)r * E + e] += m->pos_embd[(size_t)pos[r] * E + e];
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
            site_groups(L->site[AD_ROLE_Q], s, xn, E, false, T, qkv, ld_qkv);
            site_groups(L->site[AD_ROLE_K], s, xn, E, false, T, qkv + Hq, ld_qkv);
            site_groups(L->site[AD_ROLE_V], s, xn, E, false, T, qkv + Hq + KVd, ld_qkv);
        }
        for (int i = 0, r = 0; i < n_chunks; i++)
            for (int j = 0; j < chunks[i].n_tokens; j++, r++) {
                float *row = qkv + (size_t)r * ld_qkv;
                if (m->rope_inv_freq) {
                    const float *cs = s->buf[BUF_COS] + (size_t)r * half;
                    const float *sn = s->buf[BUF_SIN] + (size_t)r * half;
                    rope(row, c->n_head, hd, cs, sn);
                    rope(row + Hq, c->n_kv_head, hd, cs, sn);
                }
                memcpy(kv_slot(kv, kv->k, l, chunks[i].seq, pos[r]), row + Hq,
                       (size_t)KVd * sizeof(float));
                memcpy(kv_slot(kv, kv->v, l, chunks[i].seq, pos[r]), row + Hq + KVd,
                       (size_t)KVd * sizeof(float));
            }
        for (int i = 0, r = 0; i < n_chunks; r += chunks[i].n_tokens, i++)
            attend_chunk(m, kv, s, l, chunks[i].seq, chunks[i].seq->n_tokens, chunks[i].n_tokens,
                         qkv + (size_t)r * ld_qkv, ld_qkv, att + (size_t)r * Hq, Hq);
        site_groups(L->site[AD_ROLE_O], s, att, Hq, true, T, y, E);
        sublayer_groups(m, s, l, AD_NORM_ATTN, x, y);
        for (size_t i = 0; i < (size_t)T * E; i++)
            x[i] += y[i];

        /* MLP: gate/up (or up alone), activation, down. */
        norm_groups(m, s, l, AD_NORM_MLP, x, xn);
        bool gated = L->site[AD_ROLE_GATE] != NULL;
        site_groups(L->site[AD_ROLE_UP], s, xn, E, !gated, T, fa, F);
        if (gated) {
            site_groups(L->site[AD_ROLE_GATE], s, xn, E, false, T, fb, F);
            for (size_t i = 0; i < (size_t)T * F; i++)
                fa[i] *= act(c->act, fb[i]);
        } else {
            for (size_t i = 0; i < (size_t)T * F; i++)
                fa[i] = act(c->act, fa[i]);
        }
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
        if (last && last->mix == chunks[i].mix)
            last->n += n;
        else
            s->groups[s->n_groups++] = (struct group){n_out, n, chunks[i].mix, false};
        n_out += n;
    }
    norm_groups(m, s, -1, AD_NORM_FINAL, xo, xo);
    site_groups(&m->sites[m->n_sites - 1], s, xo, E, true, n_out, logits, c->n_vocab);

    for (int i = 0; i < n_chunks; i++)
        chunks[i].seq->n_tokens += chunks[i].n_tokens;
    return 0;
}
