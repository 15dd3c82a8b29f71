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
static int check_options(struct load_ctx *c, json_t *bc)
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
            return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: config.%s other than %s is "
                              "not supported", fixed[i].key, fixed[i].want ? "true" : "false");
    }
    json_t *sc = json_object_get(bc, "scaling");
    if (sc && !(json_is_number(sc) && json_number_value(sc) == 1.0))
        return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: config.scaling other than 1.0 "
                          "is not supported");
    json_t *inv = json_object_get(bc, "inv_adapter");
    if (inv && !json_is_null(inv))
        return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: config.inv_adapter is not "
                          "supported");
    return 0;
}

static int parse_act(struct load_ctx *c, json_t *bc, bool versioned)
{
    const char *a = json_string_value(json_object_get(bc, "non_linearity"));
    if (!a)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: config.non_linearity missing");
    if (!strcasecmp(a, "relu"))
        c->a->bn_act = AD_BN_ACT_RELU;
    else if (!strcasecmp(a, "swish") || !strcasecmp(a, "silu"))
        c->a->bn_act = AD_ACT_SILU;
    else if (!strcasecmp(a, "gelu_new") || (!versioned && !strcasecmp(a, "gelu")))
        c->a->bn_act = AD_ACT_GELU_TANH; /* unversioned configs rename gelu to gelu_new */
    else if (!strcasecmp(a, "gelu") || !strcasecmp(a, "gelu_orig"))
        c->a->bn_act = AD_ACT_GELU;
    else
        return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: non_linearity '%.30s' is not "
                          "supported (relu, swish, gelu, gelu_new)", a);
    return 0;
}

/* reduction_factor: a number, or {"<layer>": f, "default": f}. */
static int width_of(struct load_ctx *c, json_t *bc, int layer, int *ret)
{
    json_t *rf = json_object_get(bc, "reduction_factor");
    if (json_is_object(rf)) {
        char k[16];
        snprintf(k, sizeof(k), "%d", layer);
        json_t *v = json_object_get(rf, k);
        rf = v ? v : json_object_get(rf, "default");
    }
    if (!json_is_number(rf) || !(json_number_value(rf) > 0))
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: config.reduction_factor must "
                          "be a positive number or a mapping with 'default'");
    /* in doubles: the width of a tiny factor is no int */
    double w = floor(c->m->cfg.n_embd / json_number_value(rf));
    if (!(w >= 1 && w <= INT32_MAX))
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: config.reduction_factor %g "
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

int ad_bottleneck_load(struct load_ctx *c)
{
    json_t *bc = json_object_get(c->cfg, "config");
    bool versioned = json_is_string(json_object_get(c->cfg, "version"));
    int L = c->m->cfg.n_layer, E = c->m->cfg.n_embd, r;

    if ((r = check_options(c, bc)) < 0 || (r = parse_act(c, bc, versioned)) < 0)
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
        if (!bn->dim && (r = width_of(c, bc, layer, &bn->dim)) < 0)
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

static float bn_act(int act, float x)
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
            h[(size_t)i * bn->dim + j] = bn_act(a->bn_act, h[(size_t)i * bn->dim + j] +
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
