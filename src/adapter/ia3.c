/* (IA)^3 (PEFT "IA3"): learned vectors that scale a module's output (bias included), or, for
 * feedforward_modules, its input. */
#include <cblas.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SUFFIX ".ia3_l"

static int ad_ia3_load(struct load_ctx *c)
{
    json_t *ff = json_object_get(c->cfg, "feedforward_modules");
    int r;

    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        const char *key = ctx_strip(t->name);
        size_t n = strlen(key), k = strlen(SUFFIX);
        char module[256];

        if (n <= k || strcmp(key + n - k, SUFFIX) || n - k >= sizeof(module))
            continue;
        memcpy(module, key, n - k);
        module[n - k] = '\0';
        c->used[i] = true;
        const struct ad_site *s = ad_model_find_site(c->m, module);
        if (!s)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': '%s' is not a linear layer of the "
                              "model", t->name, module);
        r = ctx_targeted(json_object_get(c->cfg, "target_modules"), module, true, c->err);
        if (r <= 0)
            return r < 0 ? r : ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' is not in "
                                          "target_modules", t->name, module);
        /* PEFT matches feedforward_modules by plain suffix (no dot), or a full regex. */
        r = ff && !json_is_null(ff) ? ctx_targeted(ff, module, false, c->err) : 0;
        if (r < 0)
            return r;
        struct ad_site_delta *d = ctx_delta(c, s);
        if (r) {
            if (t->n_dims != 2 || t->shape[0] != 1)
                return ad_err_set(c->err, -EINVAL, "tensor '%s': a feed-forward IA3 vector is "
                                  "[1, %d]", t->name, s->n_in);
            r = ctx_f32(c, t, s->n_in, -1, &d->ia3_in);
        } else {
            if (t->n_dims != 2 || t->shape[1] != 1)
                return ad_err_set(c->err, -EINVAL, "tensor '%s': an IA3 vector is [%d, 1]",
                                  t->name, s->n_out);
            r = ctx_f32(c, t, s->n_out, -1, &d->ia3_out);
        }
        if (r < 0)
            return r;
    }
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++)
        if (!c->used[i] && (r = ctx_replacement(c, ad_st_tensor(c->st, i))) < 0)
            return r;
    return 0;
}

/* ==========================================================================================
 * Serving */

bool ad_ia3_in_apply(const struct ad_site_delta *d, float *x, int ldx, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d->site->n_in; j++)
            x[(size_t)i * ldx + j] *= d->ia3_in[j];
    return true;
}

void ad_ia3_in_delta(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                     int n, float *tmp, size_t tmp_len)
{
    const struct ad_site *s = d->site;
    int block = (int)(tmp_len / (size_t)s->n_in);
    for (int r0 = 0; r0 < n; r0 += block) {
        int nb = n - r0 < block ? n - r0 : block;
        for (int i = 0; i < nb; i++)
            for (int j = 0; j < s->n_in; j++)
                tmp[(size_t)i * s->n_in + j] = x[(size_t)(r0 + i) * ldx + j] * (d->ia3_in[j] - 1);
        if (s->w_in_out)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, s->n_out, s->n_in, 1.0f,
                        tmp, s->n_in, s->w, s->n_out, 1.0f, y + (size_t)r0 * ldy, ldy);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, s->n_out, s->n_in, 1.0f,
                        tmp, s->n_in, s->w, s->n_in, 1.0f, y + (size_t)r0 * ldy, ldy);
    }
}

void ad_ia3_out_apply(const struct ad_site_delta *d, float *y, int ldy, int n)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < d->site->n_out; j++)
            y[(size_t)i * ldy + j] *= d->ia3_out[j];
}

/* ==========================================================================================
 * Training: the vectors as f32 parameters (initialised to ones, as PEFT's init_ia3_weights);
 * output scaling y = yb l (its gradient needs the base's output yb), input scaling of the
 * feed-forward modules y = W (l x) + b. */

struct ia3_train {
    float **l, **gl; /* [n_sites]: the site's vector and its gradient, or NULL */
    bool *ff;        /* [n_sites]: input scaling */
};

static bool ia3_t_site_pre(const void *ctx, const struct ad_site *s, float *x, int ldx, int n)
{
    const struct ad_trainable *t = ctx;
    const struct ia3_train *it = t->priv;
    size_t i = (size_t)(s - t->m->sites);
    if (!it->l[i] || !it->ff[i])
        return false;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < s->n_in; j++)
            x[(size_t)r * ldx + j] *= it->l[i][j];
    return true;
}

static void ia3_t_site_post(const void *ctx, const struct ad_site *s, const float *x, int ldx,
                            bool x_scaled, float *y, int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_trainable *t = ctx;
    const struct ia3_train *it = t->priv;
    size_t i = (size_t)(s - t->m->sites);
    (void)x, (void)ldx, (void)x_scaled, (void)tmp, (void)tmp_len;
    if (!it->l[i] || it->ff[i])
        return;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < s->n_out; j++)
            y[(size_t)r * ldy + j] *= it->l[i][j];
}

static bool ia3_t_wants_yb(const void *ctx, const struct ad_site *s)
{
    const struct ad_trainable *t = ctx;
    const struct ia3_train *it = t->priv;
    size_t i = (size_t)(s - t->m->sites);
    return it->l[i] && !it->ff[i];
}

static bool ia3_t_site_post_grad(void *ctx, const struct ad_site *s, const float *x, int ldx,
                                 const float *yb, float *dy, int ldy, float *dx, int lddx, int n)
{
    struct ad_trainable *t = ctx;
    struct ia3_train *it = t->priv;
    size_t i = (size_t)(s - t->m->sites);
    (void)x, (void)ldx, (void)dx, (void)lddx;
    if (!it->l[i] || it->ff[i])
        return true;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < s->n_out; j++) {
            float *d = &dy[(size_t)r * ldy + j];
            it->gl[i][j] += *d * yb[(size_t)r * s->n_out + j];
            *d *= it->l[i][j];
        }
    return true;
}

static void ia3_t_site_pre_grad(void *ctx, const struct ad_site *s, const float *x, int ldx,
                                float *g, int ldg, int n)
{
    struct ad_trainable *t = ctx;
    struct ia3_train *it = t->priv;
    size_t i = (size_t)(s - t->m->sites);
    if (!it->l[i] || !it->ff[i])
        return;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < s->n_in; j++) {
            float *d = &g[(size_t)r * ldg + j];
            it->gl[i][j] += *d * x[(size_t)r * ldx + j];
            *d *= it->l[i][j];
        }
}

static const struct ad_hooks ia3_train_hooks = {
    .site_pre = ia3_t_site_pre,
    .site_post = ia3_t_site_post,
    .site_wants_yb = ia3_t_wants_yb,
    .site_post_grad = ia3_t_site_post_grad,
    .site_pre_grad = ia3_t_site_pre_grad,
};

static void ia3_t_free(void *priv)
{
    struct ia3_train *it = priv;
    if (it) {
        free(it->l);
        free(it->gl);
        free(it->ff);
    }
    free(it);
}

static int ia3_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                      struct ad_err *err)
{
    const struct ad_model *m = t->m;
    struct ia3_train *it = calloc(1, sizeof(*it));
    (void)ids, (void)n_ids;
    if (!it)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = it;
    it->l = calloc((size_t)m->n_sites, sizeof(float *));
    it->gl = calloc((size_t)m->n_sites, sizeof(float *));
    it->ff = calloc((size_t)m->n_sites, sizeof(bool));
    if (!it->l || !it->gl || !it->ff)
        return ad_err_set(err, -ENOMEM, "out of memory");
    json_t *targets = json_object_get(cfg, "target_modules");
    json_t *ff = json_object_get(cfg, "feedforward_modules");
    bool gpt2 = m->cfg.family == AD_FAMILY_GPT2;
    if (!targets || json_is_null(targets)) { /* PEFT's defaults */
        targets = gpt2 ? json_pack("[s, s]", "c_attn", "mlp.c_proj")
                       : json_pack("[s, s, s]", "k_proj", "v_proj", "down_proj");
        json_object_set_new(cfg, "target_modules", targets);
        if (!ff || json_is_null(ff)) {
            ff = gpt2 ? json_pack("[s]", "mlp.c_proj") : json_pack("[s]", "down_proj");
            json_object_set_new(cfg, "feedforward_modules", ff);
        }
    }
    json_t *init = json_object_get(cfg, "init_ia3_weights");
    if (init && !json_is_boolean(init))
        return ad_err_set(err, -EINVAL, "adapter config: init_ia3_weights must be a boolean");
    for (int si = 0; si < m->n_sites; si++) {
        const struct ad_site *s = &m->sites[si];
        int r = tr_targeted(t, targets, s, err), f;
        if (r < 0)
            return r;
        if (!r)
            continue;
        /* PEFT matches feedforward_modules by plain suffix (no dot), or a full regex */
        f = ff && !json_is_null(ff) ? ctx_targeted(ff, s->path, false, err) : 0;
        if (f < 0)
            return f;
        char name[224];
        snprintf(name, sizeof(name), "base_model.model.%s.ia3_l", s->path);
        struct ad_param *p = f ? tr_add(t, name, 2, 1, s->n_in, true, true, err)
                               : tr_add(t, name, 2, s->n_out, 1, true, true, err);
        if (!p)
            return -ENOMEM;
        for (size_t k = 0; k < p->n; k++) /* ones; init_ia3_weights false: random, for tests */
            p->w[k] = 1.0f;
        if (json_is_false(init))
            tr_normal(t, p, 1.0);
        it->l[si] = p->w;
        it->gl[si] = p->g;
        it->ff[si] = f;
    }
    return 0;
}

static const struct train_kind ad_ia3_train = {
    .kind = AD_ADAPTER_IA3,
    .init = ia3_t_init,
    .hooks = &ia3_train_hooks,
    .free = ia3_t_free,
};

const struct kind_ops ad_ia3_ops = {
    .kind = AD_ADAPTER_IA3,
    .name = "ia3",
    .peft_types = {"IA3"},
    .load = ad_ia3_load,
    .train = &ad_ia3_train,
};
