/* Bottleneck adapters as AdapterHub ("adapters" 1.2) writes them: Houlsby (double_seq_bn, after
 * attention and after the MLP) and Pfeiffer (seq_bn, after the MLP). For the pre-LN models here
 * (PEFT-FORMATS.md 7.4), with h the sub-layer output and x its residual input:
 *   Houlsby:  out = x + h + f(h)          Pfeiffer: out = x + h + f(x + h)
 *   f(z) = W_up act(W_down z + b_down) + b_up */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Options whose non-default values change the maths: refused by name. */
static int check_options(json_t *bc, struct ad_err *err)
{
    static const struct {
        const char *key;
        bool want;
    } fixed[] = {
        {"original_ln_after", true}, {"residual_before_ln", true},
        {"adapter_residual_before_ln", false}, {"ln_before", false}, {"ln_after", false},
        {"use_gating", false}, {"is_parallel", false}, {"phm_layer", false},
    };
    for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
        json_t *v = json_object_get(bc, fixed[i].key);
        if (v && (!json_is_boolean(v) || json_is_true(v) != fixed[i].want))
            return ad_err_set(err, -ENOTSUP, "adapter_config.json: config.%s other than %s is "
                              "not supported", fixed[i].key, fixed[i].want ? "true" : "false");
    }
    json_t *sc = json_object_get(bc, "scaling");
    if (sc && !(json_is_number(sc) && json_number_value(sc) == 1.0))
        return ad_err_set(err, -ENOTSUP, "adapter_config.json: config.scaling other than 1.0 "
                          "is not supported");
    json_t *inv = json_object_get(bc, "inv_adapter");
    if (inv && !json_is_null(inv))
        return ad_err_set(err, -ENOTSUP, "adapter_config.json: config.inv_adapter is not "
                          "supported");
    return 0;
}

static int parse_act(json_t *bc, bool versioned, int *act, struct ad_err *err)
{
    const char *a = json_string_value(json_object_get(bc, "non_linearity"));
    if (!a)
        return ad_err_set(err, -EINVAL, "adapter_config.json: config.non_linearity missing");
    if (!strcasecmp(a, "relu"))
        *act = AD_BN_ACT_RELU;
    else if (!strcasecmp(a, "swish") || !strcasecmp(a, "silu"))
        *act = AD_ACT_SILU;
    else if (!strcasecmp(a, "gelu_new") || (!versioned && !strcasecmp(a, "gelu")))
        *act = AD_ACT_GELU_TANH; /* unversioned configs rename gelu to gelu_new */
    else if (!strcasecmp(a, "gelu") || !strcasecmp(a, "gelu_orig"))
        *act = AD_ACT_GELU;
    else
        return ad_err_set(err, -ENOTSUP, "adapter_config.json: non_linearity '%.30s' is not "
                          "supported (relu, swish, gelu, gelu_new)", a);
    return 0;
}

/* reduction_factor: a number, or {"<layer>": f, "default": f}. */
static int width_of(const struct ad_model *m, json_t *bc, int layer, int *ret,
                    struct ad_err *err)
{
    json_t *rf = json_object_get(bc, "reduction_factor");
    if (json_is_object(rf)) {
        char k[16];
        snprintf(k, sizeof(k), "%d", layer);
        json_t *v = json_object_get(rf, k);
        rf = v ? v : json_object_get(rf, "default");
    }
    if (!json_is_number(rf) || !(json_number_value(rf) > 0))
        return ad_err_set(err, -EINVAL, "adapter_config.json: config.reduction_factor must "
                          "be a positive number or a mapping with 'default'");
    /* in doubles: the width of a tiny factor is no int */
    double w = floor(m->cfg.n_embd / json_number_value(rf));
    if (!(w >= 1 && w <= INT32_MAX))
        return ad_err_set(err, -EINVAL, "adapter_config.json: config.reduction_factor %g "
                          "gives a width of %g (hidden size / factor)", json_number_value(rf), w);
    *ret = (int)w;
    return 0;
}

/* "<root>?<layer_fmt>.{attention,output}_adapters.adapters.<name>.<param>" -> layer, where,
 * param. */
static int parse_key(struct load_ctx *c, const char *key, int *layer, bool *attn,
                     const char **param)
{
    const char *root = ad_model_root(c->m);
    const char *p = !strncmp(key, root, strlen(root)) ? key + strlen(root) : key;
    const char *fmt = ad_model_layer_fmt(c->m); /* "layers.%d." or "h.%d." */
    size_t stem = strcspn(fmt, "%");
    char *end;

    if (strncmp(p, fmt, stem))
        return -EINVAL;
    long l = strtol(p + stem, &end, 10);
    if (end == p + stem || *end != '.' || l < 0 || l >= c->m->cfg.n_layer)
        return -EINVAL;
    p = end + 1;
    if (!strncmp(p, "attention_adapters.adapters.", 28)) {
        *attn = true;
        p += 28;
    } else if (!strncmp(p, "output_adapters.adapters.", 25)) {
        *attn = false;
        p += 25;
    } else {
        return -EINVAL;
    }
    p = strchr(p, '.'); /* skip the adapter's name */
    if (!p)
        return -EINVAL;
    *layer = (int)l;
    *param = p + 1;
    return 0;
}

static int ad_bottleneck_load(struct load_ctx *c)
{
    json_t *bc = json_object_get(c->cfg, "config");
    bool versioned = json_is_string(json_object_get(c->cfg, "version"));
    int L = c->m->cfg.n_layer, E = c->m->cfg.n_embd, r;

    if ((r = check_options(bc, c->err)) < 0 ||
        (r = parse_act(bc, versioned, &c->a->bn_act, c->err)) < 0)
        return r;
    c->a->bn_on_sum = json_is_true(json_object_get(bc, "original_ln_before"));
    c->a->bn_attn = calloc((size_t)L, sizeof(*c->a->bn_attn));
    c->a->bn_mlp = calloc((size_t)L, sizeof(*c->a->bn_mlp));
    if (!c->a->bn_attn || !c->a->bn_mlp)
        return ad_err_set(c->err, -ENOMEM, "out of memory");

    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        const char *param;
        int layer;
        bool attn;
        if (parse_key(c, t->name, &layer, &attn, &param) < 0)
            return ad_err_set(c->err, -EINVAL, "tensor '%s' is not a bottleneck adapter "
                              "parameter of a layer of this model", t->name);
        struct ad_bottleneck *bn = attn ? &c->a->bn_attn[layer] : &c->a->bn_mlp[layer];
        if (!bn->dim && (r = width_of(c->m, bc, layer, &bn->dim, c->err)) < 0)
            return r;
        c->used[i] = true;
        if (!strcmp(param, "adapter_down.0.weight"))
            r = ctx_f32(c, t, bn->dim, E, &bn->down_w);
        else if (!strcmp(param, "adapter_down.0.bias"))
            r = ctx_f32(c, t, bn->dim, 0, &bn->down_b);
        else if (!strcmp(param, "adapter_up.weight"))
            r = ctx_f32(c, t, E, bn->dim, &bn->up_w);
        else if (!strcmp(param, "adapter_up.bias"))
            r = ctx_f32(c, t, E, 0, &bn->up_b);
        else
            r = ad_err_set(c->err, -ENOTSUP, "tensor '%s': parameter '%s' is not supported",
                           t->name, param);
        if (r < 0)
            return r;
    }
    for (int l = 0; l < L; l++) {
        struct ad_bottleneck *both[2] = {&c->a->bn_attn[l], &c->a->bn_mlp[l]};
        for (int k = 0; k < 2; k++)
            if (both[k]->dim && (!both[k]->down_w || !both[k]->down_b || !both[k]->up_w ||
                                 !both[k]->up_b))
                return ad_err_set(c->err, -EINVAL, "layer %d: the %s adapter lacks one of "
                                  "adapter_down.0.{weight,bias}, adapter_up.{weight,bias}", l,
                                  k ? "output" : "attention");
    }
    c->a->bytes += 2 * (size_t)L * sizeof(struct ad_bottleneck);
    return 0;
}

float ad_bn_act(int act, float x)
{
    switch (act) {
    case AD_BN_ACT_RELU:
        return x > 0 ? x : 0;
    case AD_ACT_SILU:
        return x / (1.0f + expf(-x));
    case AD_ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default:
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

void ad_bottleneck_apply(const struct ad_adapter *a, const struct ad_bottleneck *bn,
                         const float *x, float *y, int n, int E, float *tmp)
{
    float *z = tmp, *h = tmp + (size_t)n * E;
    const float *in = y;
    const struct ad_kernels *k = n <= AD_MATVEC_MAX_ROWS ? ad_kernels_get() : NULL;

    if (a->bn_on_sum) {
        for (size_t i = 0; i < (size_t)n * E; i++)
            z[i] = x[i] + y[i];
        in = z;
    }
    if (k)
        k->matvec(bn->down_w, E, in, E, n, h, bn->dim, 0, bn->dim);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, bn->dim, E, 1.0f, in, E,
                    bn->down_w, E, 0.0f, h, bn->dim);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < bn->dim; j++)
            h[(size_t)i * bn->dim + j] = ad_bn_act(a->bn_act, h[(size_t)i * bn->dim + j] +
                                                               bn->down_b[j]);
    if (k) { /* z = up(h), then y += z: in (z or y) is no longer needed */
        k->matvec(bn->up_w, bn->dim, h, bn->dim, n, z, E, 0, E);
        for (size_t i = 0; i < (size_t)n * E; i++)
            y[i] += z[i];
    } else {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, E, bn->dim, 1.0f, h, bn->dim,
                    bn->up_w, bn->dim, 1.0f, y, E);
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < E; j++)
            y[(size_t)i * E + j] += bn->up_b[j];
}

float ad_bn_act_grad(int act, float x)
{
    switch (act) {
    case AD_BN_ACT_RELU:
        return x > 0 ? 1.0f : 0.0f;
    case AD_ACT_SILU: {
        float s = 1.0f / (1.0f + expf(-x));
        return s * (1.0f + x * (1.0f - s));
    }
    case AD_ACT_GELU_TANH: {
        const float k = 0.7978845608028654f;
        float th = tanhf(k * (x + 0.044715f * x * x * x));
        return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * k * (1.0f + 0.134145f * x * x);
    }
    default:
        return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) +
               x * 0.3989422804014327f * expf(-0.5f * x * x);
    }
}

/* ==========================================================================================
 * Training: the adapters' four tensors per place as parameters, named as AdapterHub saves them.
 * Init as AdapterHub's init_weights: "bert" N(0, 0.02) weights and zero biases, "mam_adapter"
 * down kaiming-uniform and up zeros, "houlsby" N(0, 0.01) cut at +-0.02. The config is
 * AdapterHub's, or adapterd's shorthand {"peft_type": "BOTTLENECK", "preset": "houlsby" |
 * "pfeiffer", "reduction_factor", "non_linearity", "init_weights", "name"}, saved in AdapterHub's
 * form. */

struct bn_place {
    int dim;
    float *dw, *gdw, *db, *gdb, *uw, *guw, *ub, *gub; /* [dim, E], [dim], [E, dim], [E] */
};

struct bn_train {
    struct bn_place *attn, *mlp; /* [n_layer] */
    bool on_sum;
    int act;
    float *z, *a, *h, *d; /* work space, grown on demand */
    size_t cap;
};

static float *bn_work(struct bn_train *bt, size_t n)
{
    if (n > bt->cap) {
        free(bt->z);
        bt->z = malloc(4 * n * sizeof(float));
        bt->cap = bt->z ? n : 0;
    }
    bt->a = bt->z + n;
    bt->h = bt->a + n;
    bt->d = bt->h + n;
    return bt->z;
}

static struct bn_place *bn_place_of(const struct ad_trainable *t, int layer, enum ad_norm_slot slot)
{
    const struct bn_train *bt = t->priv;
    struct bn_place *p = slot == AD_NORM_ATTN ? &bt->attn[layer] : &bt->mlp[layer];
    return p->dim ? p : NULL;
}

/* z = y or x + y; a = z Wd^T + bd; h = act(a), for n rows (into the work space). */
static void bn_down(const struct ad_trainable *t, const struct bn_place *p, const float *x,
                    const float *y, int n)
{
    struct bn_train *bt = t->priv;
    int E = t->m->cfg.n_embd;
    size_t nE = (size_t)n * E, nd = (size_t)n * (size_t)p->dim;
    if (!bn_work(bt, nE > nd ? nE : nd))
        abort(); /* out of memory in a training pass: nothing sensible to compute */
    for (size_t i = 0; i < nE; i++)
        bt->z[i] = bt->on_sum ? x[i] + y[i] : y[i];
    ad_train_sgemm(false, true, n, p->dim, E, 1.0f, bt->z, E, p->dw, E, 0.0f, bt->a, p->dim);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < p->dim; j++) {
            float *v = &bt->a[(size_t)r * p->dim + j];
            *v += p->db[j];
            bt->h[(size_t)r * p->dim + j] = ad_bn_act(bt->act, *v);
        }
}

static void bn_t_sublayer(const void *ctx, int layer, enum ad_norm_slot slot, const float *x,
                          float *y, int n, float *tmp, size_t tmp_len)
{
    const struct ad_trainable *t = ctx;
    const struct bn_train *bt = t->priv;
    const struct bn_place *p = bn_place_of(t, layer, slot);
    int E = t->m->cfg.n_embd;
    (void)tmp, (void)tmp_len;
    if (!p)
        return;
    bn_down(t, p, x, y, n);
    ad_train_sgemm(false, true, n, E, p->dim, 1.0f, bt->h, p->dim, p->uw, p->dim, 1.0f, y, E);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < E; j++)
            y[(size_t)r * E + j] += p->ub[j];
}

static void bn_t_sublayer_grad(void *ctx, int layer, enum ad_norm_slot slot, const float *x,
                               const float *y_in, float *dy, float *dx, int n)
{
    struct ad_trainable *t = ctx;
    struct bn_train *bt = t->priv;
    struct bn_place *p = bn_place_of(t, layer, slot);
    int E = t->m->cfg.n_embd;
    if (!p)
        return;
    bn_down(t, p, x, y_in, n);
    /* out = y + up(h): dUw += dy^T h, dUb += sum dy, dh = dy Uw, da = dh act'(a),
     * dDw += da^T z, dDb += sum da, dz = da Dw; dy += dz (and dx += dz on the sum) */
    ad_train_sgemm(true, false, E, p->dim, n, 1.0f, dy, E, bt->h, p->dim, 1.0f, p->guw, p->dim);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < E; j++)
            p->gub[j] += dy[(size_t)r * E + j];
    ad_train_sgemm(false, false, n, p->dim, E, 1.0f, dy, E, p->uw, p->dim, 0.0f, bt->d, p->dim);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < p->dim; j++) {
            float *v = &bt->d[(size_t)r * p->dim + j];
            *v *= ad_bn_act_grad(bt->act, bt->a[(size_t)r * p->dim + j]);
            p->gdb[j] += *v;
        }
    ad_train_sgemm(true, false, p->dim, E, n, 1.0f, bt->d, p->dim, bt->z, E, 1.0f, p->gdw, E);
    float *dz = bt->z; /* z is spent */
    ad_train_sgemm(false, false, n, E, p->dim, 1.0f, bt->d, p->dim, p->dw, E, 0.0f, dz, E);
    for (size_t i = 0; i < (size_t)n * E; i++) {
        dy[i] += dz[i];
        if (bt->on_sum)
            dx[i] += dz[i];
    }
}

static const struct ad_hooks bn_train_hooks = {
    .sublayer = bn_t_sublayer,
    .sublayer_grad = bn_t_sublayer_grad,
};

static void bn_t_free(void *priv)
{
    struct bn_train *bt = priv;
    if (bt) {
        free(bt->attn);
        free(bt->mlp);
        free(bt->z);
    }
    free(bt);
}

/* adapterd's shorthand into AdapterHub's full config (every BnConfig field, as save_adapter
 * writes it). */
static int bn_expand(const struct ad_model *m, json_t *cfg, struct ad_err *err)
{
    const char *preset = json_string_value(json_object_get(cfg, "preset"));
    bool houlsby = preset && (!strcmp(preset, "houlsby") || !strcmp(preset, "double_seq_bn"));
    bool pfeiffer = preset && (!strcmp(preset, "pfeiffer") || !strcmp(preset, "seq_bn"));
    if (!houlsby && !pfeiffer)
        return ad_err_set(err, -EINVAL, "adapter config: preset must be \"houlsby\" "
                          "(double_seq_bn) or \"pfeiffer\" (seq_bn)");
    json_t *bc = json_pack(
        "{s:b, s:b, s:f, s:b, s:s, s:n, s:n, s:n, s:b, s:b, s:o, s:b, s:b, s:b, s:s, s:b, s:b, "
        "s:s, s:i, s:f, s:b, s:i, s:b, s:b, s:b, s:f, s:f, s:b, s:b, s:f, s:b, s:b}",
        "adapter_residual_before_ln", 0, "cross_adapter", 0, "dropout", 0.0, "factorized_phm_W",
        1, "hypercomplex_nonlinearity", "glorot-uniform", "init_weights_seed", "inv_adapter",
        "inv_adapter_reduction_factor", "is_parallel", 0, "learn_phm", 1, "leave_out",
        json_array(), "ln_after", 0, "ln_before", 0, "mh_adapter", houlsby, "phm_c_init",
        "normal", "phm_bias", 1, "factorized_phm_rule", 0, "init_weights", "bert", "phm_dim", 4,
        "phm_init_range", 0.0001, "phm_layer", 0, "phm_rank", 1, "original_ln_before", pfeiffer,
        "original_ln_after", 1, "output_adapter", 1, "reduction_factor", 16.0, "scaling", 1.0,
        "residual_before_ln", 1, "shared_W_phm", 0, "stochastic_depth", 0.0, "shared_phm_rule",
        1, "use_gating", 0);
    if (!bc)
        return ad_err_set(err, -ENOMEM, "out of memory");
    json_object_set_new(bc, "non_linearity", json_string(houlsby ? "swish" : "relu"));
    static const char *const own[] = {"reduction_factor", "non_linearity", "init_weights"};
    for (size_t i = 0; i < 3; i++) {
        json_t *v = json_object_get(cfg, own[i]);
        if (v)
            json_object_set(bc, own[i], v);
    }
    const char *name = json_string_value(json_object_get(cfg, "name"));
    json_t *full = json_pack("{s:o, s:i, s:s, s:s, s:s, s:s, s:s}", "config", bc, "hidden_size",
                             m->cfg.n_embd, "model_class", m->cfg.architecture, "model_name",
                             m->id, "model_type", m->cfg.model_type, "name",
                             name ? name : "adapter", "version", "adapters.1.2.0");
    if (!full)
        return ad_err_set(err, -ENOMEM, "out of memory");
    json_object_clear(cfg);
    json_object_update(cfg, full);
    json_decref(full);
    return 0;
}

static int bn_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                     struct ad_err *err)
{
    const struct ad_model *m = t->m;
    int L = m->cfg.n_layer, E = m->cfg.n_embd, r;
    (void)ids, (void)n_ids;
    if (json_is_string(json_object_get(cfg, "peft_type")) && (r = bn_expand(m, cfg, err)) < 0)
        return r;
    json_t *bc = json_object_get(cfg, "config");
    bool versioned = json_is_string(json_object_get(cfg, "version"));
    struct bn_train *bt = calloc(1, sizeof(*bt));
    if (!bt)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = bt;
    if ((r = check_options(bc, err)) < 0 || (r = parse_act(bc, versioned, &bt->act, err)) < 0)
        return r;
    bt->on_sum = json_is_true(json_object_get(bc, "original_ln_before"));
    bt->attn = calloc((size_t)L, sizeof(*bt->attn));
    bt->mlp = calloc((size_t)L, sizeof(*bt->mlp));
    if (!bt->attn || !bt->mlp)
        return ad_err_set(err, -ENOMEM, "out of memory");
    const char *init = json_string_value(json_object_get(bc, "init_weights"));
    init = init ? init : "bert";
    if (strcmp(init, "bert") && strcmp(init, "mam_adapter") && strcmp(init, "houlsby"))
        return ad_err_set(err, -EINVAL, "adapter config: config.init_weights must be bert, "
                          "mam_adapter or houlsby");
    const char *name = json_string_value(json_object_get(cfg, "name"));
    name = name ? name : "adapter";
    bool places[2] = {json_is_true(json_object_get(bc, "mh_adapter")),
                      !json_is_false(json_object_get(bc, "output_adapter"))};
    char key[256], layer[64];
    for (int l = 0; l < L; l++)
        for (int k = 0; k < 2; k++) {
            if (!places[k])
                continue;
            struct bn_place *p = k ? &bt->mlp[l] : &bt->attn[l];
            if ((r = width_of(m, bc, l, &p->dim, err)) < 0)
                return r;
            snprintf(layer, sizeof(layer), ad_model_layer_fmt(m), l);
            struct ad_param *q;
            const char *where = k ? "output_adapters" : "attention_adapters";
#define BN_PARAM(field, gfield, leaf, d0, d1, decay)                                           \
    do {                                                                                       \
        snprintf(key, sizeof(key), "%s%s%s.adapters.%s.%s", ad_model_root(m), layer, where,    \
                 name, leaf);                                                                  \
        if (!(q = tr_add(t, key, (d1) ? 2 : 1, d0, d1, decay, true, err)))                     \
            return -ENOMEM;                                                                    \
        p->field = q->w;                                                                       \
        p->gfield = q->g;                                                                      \
    } while (0)
            BN_PARAM(dw, gdw, "adapter_down.0.weight", p->dim, E, true);
            if (!strcmp(init, "mam_adapter"))
                tr_uniform(t, q, 1 / sqrt((double)E));
            else if (!strcmp(init, "houlsby"))
                for (tr_normal(t, q, 0.01), r = 0; r < (int)q->n; r++)
                    q->w[r] = fmaxf(-0.02f, fminf(0.02f, q->w[r]));
            else
                tr_normal(t, q, 0.02);
            BN_PARAM(db, gdb, "adapter_down.0.bias", p->dim, 0, false);
            BN_PARAM(uw, guw, "adapter_up.weight", E, p->dim, true);
            if (!strcmp(init, "bert"))
                tr_normal(t, q, 0.02);
            else if (!strcmp(init, "houlsby"))
                for (tr_normal(t, q, 0.01), r = 0; r < (int)q->n; r++)
                    q->w[r] = fmaxf(-0.02f, fminf(0.02f, q->w[r]));
            BN_PARAM(ub, gub, "adapter_up.bias", E, 0, false);
#undef BN_PARAM
        }
    return 0;
}

static const struct train_kind ad_bottleneck_train = {
    .kind = AD_ADAPTER_BOTTLENECK,
    .init = bn_t_init,
    .hooks = &bn_train_hooks,
    .free = bn_t_free,
};

const struct kind_ops ad_bottleneck_ops = {
    .kind = AD_ADAPTER_BOTTLENECK,
    .name = "bottleneck",
    .peft_types = {"BOTTLENECK"},
    .load = ad_bottleneck_load,
    .train = &ad_bottleneck_train,
};
