/* Bias sets (BitFit). adapterd's layout, in the PEFT container: adapter_config.json with
 * "peft_type": "BITFIT", and adapter_model.safetensors holding replacement biases keyed by
 * module path, "base_model.model.<module>.bias" ([out] for a linear, [hidden] for a LayerNorm).
 * A linear without a base bias (Llama) gets the bias added. The same tensors in a LoRA file
 * saved with bias="all" are read by the same code (peft_io.c, ctx_replacement). */
#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int ad_bias_load(struct load_ctx *c)
{
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        int r = ctx_replacement(c, t);
        if (r < 0)
            return r;
        if (r == 0)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': a bias set holds only "
                              "'<module>.bias' tensors of the model's modules", t->name);
    }
    return 0;
}

/* ==========================================================================================
 * Serving: replaced biases and modules (bias sets, bias="all", modules_to_save) */

const float *ad_bias_of(const struct ad_site_delta *d)
{
    return d->b_new ? d->b_new : d->site->b;
}

void ad_replaced_apply(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                       int n)
{
    const struct ad_site *s = d->site;
    const float *b = ad_bias_of(d);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, s->n_out, s->n_in, 1.0f, x, ldx,
                d->w_new, s->n_in, 0.0f, y, ldy);
    for (int i = 0; b && i < n; i++)
        for (int j = 0; j < s->n_out; j++)
            y[(size_t)i * ldy + j] += b[j];
}

void ad_bias_swap(const struct ad_site_delta *d, float *y, int ldy, int n)
{
    const struct ad_site *s = d->site;
    for (int i = 0; i < n; i++) {
        float *row = y + (size_t)i * ldy;
        for (int j = 0; j < s->n_out; j++)
            row[j] += d->b_new[j] - (s->b ? s->b[j] : 0.0f);
    }
}

/* ==========================================================================================
 * Training: every bias of the model's linears (added where the base has none) and of its
 * LayerNorms, as replacement vectors initialised to the base's (or zeros); target_modules may
 * restrict the linears. */

struct bias_train {
    float **b, **gb;     /* [n_sites] */
    float **nb, **gnb;   /* [2 n_layer + 1]: norms (layer l: 2 l attention, 2 l + 1 MLP; final) */
};

static int bias_norm_index(const struct ad_model *m, int layer, enum ad_norm_slot slot)
{
    return slot == AD_NORM_FINAL ? 2 * m->cfg.n_layer : 2 * layer + (int)slot;
}

static void bias_t_site_post(const void *ctx, const struct ad_site *s, const float *x, int ldx,
                             bool x_scaled, float *y, int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_trainable *t = ctx;
    const struct bias_train *bt = t->priv;
    const float *b = bt->b[s - t->m->sites];
    (void)x, (void)ldx, (void)x_scaled, (void)tmp, (void)tmp_len;
    for (int r = 0; b && r < n; r++)
        for (int j = 0; j < s->n_out; j++)
            y[(size_t)r * ldy + j] += b[j] - (s->b ? s->b[j] : 0.0f);
}

static bool bias_t_site_post_grad(void *ctx, const struct ad_site *s, const float *x, int ldx,
                                  const float *yb, float *dy, int ldy, float *dx, int lddx, int n)
{
    struct ad_trainable *t = ctx;
    struct bias_train *bt = t->priv;
    float *g = bt->gb[s - t->m->sites];
    (void)x, (void)ldx, (void)yb, (void)dx, (void)lddx;
    for (int r = 0; g && r < n; r++)
        for (int j = 0; j < s->n_out; j++)
            g[j] += dy[(size_t)r * ldy + j];
    return true;
}

static void bias_t_norm(const void *ctx, int layer, enum ad_norm_slot slot, const float **w,
                        const float **b)
{
    const struct ad_trainable *t = ctx;
    const struct bias_train *bt = t->priv;
    const float *nb = bt->nb[bias_norm_index(t->m, layer, slot)];
    (void)w;
    if (nb)
        *b = nb;
}

static void bias_t_norm_grad(void *ctx, int layer, enum ad_norm_slot slot, const float *dw,
                             const float *db)
{
    struct ad_trainable *t = ctx;
    struct bias_train *bt = t->priv;
    float *g = bt->gnb[bias_norm_index(t->m, layer, slot)];
    (void)dw;
    for (int i = 0; g && db && i < t->m->cfg.n_embd; i++)
        g[i] += db[i];
}

static const struct ad_hooks bias_train_hooks = {
    .norm = bias_t_norm,
    .site_post = bias_t_site_post,
    .norm_grad = bias_t_norm_grad,
    .site_post_grad = bias_t_site_post_grad,
};

static void bias_t_free(void *priv)
{
    struct bias_train *bt = priv;
    if (bt) {
        free(bt->b);
        free(bt->gb);
        free(bt->nb);
        free(bt->gnb);
    }
    free(bt);
}

static int bias_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                       struct ad_err *err)
{
    const struct ad_model *m = t->m;
    size_t n_norms = 2 * (size_t)m->cfg.n_layer + 1;
    struct bias_train *bt = calloc(1, sizeof(*bt));
    char name[224], mod[160];
    (void)ids, (void)n_ids;
    if (!bt)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = bt;
    bt->b = calloc((size_t)m->n_sites, sizeof(float *));
    bt->gb = calloc((size_t)m->n_sites, sizeof(float *));
    bt->nb = calloc(n_norms, sizeof(float *));
    bt->gnb = calloc(n_norms, sizeof(float *));
    if (!bt->b || !bt->gb || !bt->nb || !bt->gnb)
        return ad_err_set(err, -ENOMEM, "out of memory");
    json_t *targets = json_object_get(cfg, "target_modules");
    bool all = !targets || json_is_null(targets);
    for (int si = 0; si < m->n_sites; si++) {
        const struct ad_site *s = &m->sites[si];
        int r = all ? s->layer >= 0 : tr_targeted(t, targets, s, err);
        if (r < 0)
            return r;
        if (!r)
            continue;
        snprintf(name, sizeof(name), "base_model.model.%s.bias", s->path);
        struct ad_param *p = tr_add(t, name, 1, s->n_out, 0, false, true, err);
        if (!p)
            return -ENOMEM;
        if (s->b)
            memcpy(p->w, s->b, p->n * sizeof(float));
        bt->b[si] = p->w;
        bt->gb[si] = p->g;
    }
    for (size_t k = 0; m->final_norm_b && k < n_norms; k++) { /* LayerNorm biases */
        bool fin = k + 1 == n_norms;
        enum ad_norm_slot slot = fin ? AD_NORM_FINAL : (enum ad_norm_slot)(k % 2);
        int layer = fin ? -1 : (int)k / 2;
        const struct ad_layer *L = fin ? NULL : &m->layers[layer];
        const float *b = fin ? m->final_norm_b : k % 2 ? L->norm2_b : L->norm1_b;
        ad_model_norm_path(m, layer, slot, mod, sizeof(mod));
        if (!all) { /* a listed norm only */
            json_t *v;
            size_t i;
            bool listed = false;
            json_array_foreach(targets, i, v) {
                const char *nm = json_string_value(v);
                size_t a = nm ? strlen(nm) : 0, lm = strlen(mod);
                listed |= nm && (!strcmp(mod, nm) ||
                                 (lm > a && !strcmp(mod + lm - a, nm) && mod[lm - a - 1] == '.'));
            }
            if (!listed)
                continue;
        }
        snprintf(name, sizeof(name), "base_model.model.%s.bias", mod);
        struct ad_param *p = tr_add(t, name, 1, m->cfg.n_embd, 0, false, false, err);
        if (!p)
            return -ENOMEM;
        memcpy(p->w, b, p->n * sizeof(float));
        bt->nb[k] = p->w;
        bt->gnb[k] = p->g;
    }
    json_object_del(cfg, "target_modules"); /* the saved file says what it holds */
    return 0;
}

static const struct train_kind ad_bias_train = {
    .kind = AD_ADAPTER_BIAS,
    .init = bias_t_init,
    .hooks = &bias_train_hooks,
    .free = bias_t_free,
};

const struct kind_ops ad_bias_ops = {
    .kind = AD_ADAPTER_BIAS,
    .name = "bias",
    .peft_types = {"BITFIT"},
    .load = ad_bias_load,
    .train = &ad_bias_train,
};
