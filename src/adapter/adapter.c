/* Adapter lifetime (references), mixes (composition rules), and the hooks the forward pass
 * calls for each group of rows: they dispatch to each kind's maths. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ==========================================================================================
 * References */

struct ad_adapter *ad_adapter_ref(struct ad_adapter *a)
{
    if (a)
        atomic_fetch_add_explicit(&a->refs, 1, memory_order_relaxed);
    return a;
}

struct ad_adapter *ad_adapter_unref(struct ad_adapter *a)
{
    if (!a || atomic_fetch_sub_explicit(&a->refs, 1, memory_order_acq_rel) != 1)
        return NULL;
    for (int i = 0; i < a->n_owned; i++)
        free(a->owned[i]);
    free(a->owned);
    free(a->by_site);
    free(a->deltas);
    free(a->norms);
    free(a->bn_attn);
    free(a->bn_mlp);
    free(a);
    return NULL;
}

const char *ad_adapter_kind_name(enum ad_adapter_kind k)
{
    const struct kind_ops *ops = ad_kind_ops(k);
    return ops ? ops->name : "?";
}

/* ==========================================================================================
 * Mixes */

/* A LoRA adapter whose deltas are all linear in its weight: LoRA factors and nothing else. */
static bool is_pure_lora(const struct ad_adapter *a)
{
    if (a->kind != AD_ADAPTER_LORA || a->norms || a->embed || a->pos_embed)
        return false;
    for (int i = 0; i < a->model->n_sites; i++) {
        const struct ad_site_delta *d = a->by_site[i];
        if (d && (d->dora_k || d->w_new || d->b_new))
            return false;
    }
    return true;
}

int ad_mix_validate(const struct ad_mix *mix, struct ad_err *err)
{
    if (mix->n < 1 || mix->n > AD_MIX_MAX)
        return ad_err_set(err, -EINVAL, "a request names 1 to %d adapters", AD_MIX_MAX);
    for (int i = 0; i < mix->n; i++) {
        if (mix->a[i]->model != mix->a[0]->model)
            return ad_err_set(err, -EINVAL, "adapters of different base models");
        if (!(mix->w[i] == mix->w[i]) || mix->w[i] < -100 || mix->w[i] > 100)
            return ad_err_set(err, -EINVAL, "adapter '%s': weight must be in [-100, 100]",
                              mix->a[i]->name);
        bool pure = is_pure_lora(mix->a[i]);
        if (mix->n > 1 && !pure)
            return ad_err_set(err, -EINVAL, "adapter '%s' (%s) cannot be composed: only plain "
                              "LoRA adapters (no DoRA, biases or saved modules) add up",
                              mix->a[i]->name, ad_adapter_kind_name(mix->a[i]->kind));
        if (!pure && mix->w[i] != 1.0f)
            return ad_err_set(err, -EINVAL, "adapter '%s' (%s) runs with weight 1 only",
                              mix->a[i]->name, ad_adapter_kind_name(mix->a[i]->kind));
    }
    return 0;
}

int ad_mix_n_virtual(const struct ad_mix *mix)
{
    return mix->n == 1 ? mix->a[0]->n_virtual : 0;
}

int ad_mix_n_prefix(const struct ad_mix *mix)
{
    return mix->n == 1 ? mix->a[0]->n_prefix : 0;
}

static int hook_n_virtual(const void *ctx)
{
    return ad_mix_n_virtual(ctx);
}

static int hook_n_prefix(const void *ctx)
{
    return ad_mix_n_prefix(ctx);
}

static const float *hook_virtual_embedding(const void *ctx, int v)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    return a->prompt + (size_t)v * (size_t)a->model->cfg.n_embd;
}

static const float *hook_embedding(const void *ctx, int tok)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    return mix->n == 1 && a->embed ? a->embed + (size_t)tok * (size_t)a->model->cfg.n_embd : NULL;
}

static const float *hook_position(const void *ctx, int pos)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    return mix->n == 1 && a->pos_embed ? a->pos_embed + (size_t)pos * (size_t)a->model->cfg.n_embd
                                       : NULL;
}

static const float *hook_prefix(const void *ctx, int layer, int kv)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    const struct ad_model_config *c = &a->model->cfg;
    size_t kvd = (size_t)c->n_kv_head * (size_t)c->head_dim;
    return a->prefix_kv + ((size_t)layer * 2 + (size_t)kv) * (size_t)a->n_prefix * kvd;
}

/* ==========================================================================================
 * Hooks */

static const struct ad_site_delta *delta_of(const struct ad_adapter *a, const struct ad_site *s)
{
    return a->by_site[s - a->model->sites];
}

static bool hook_site_pre(const void *ctx, const struct ad_site *s, float *x, int ldx, int n)
{
    const struct ad_mix *mix = ctx;
    const struct ad_site_delta *d = mix->n == 1 ? delta_of(mix->a[0], s) : NULL;
    return d && d->ia3_in && ad_ia3_in_apply(d, x, ldx, n);
}

static void hook_site_post(const void *ctx, const struct ad_site *s, const float *x, int ldx,
                           bool x_scaled, float *y, int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_mix *mix = ctx;
    for (int k = 0; k < mix->n; k++) {
        const struct ad_site_delta *d = delta_of(mix->a[k], s);
        if (!d)
            continue;
        if (d->w_new)
            ad_replaced_apply(d, x, ldx, y, ldy, n);
        else if (d->dora_k)
            ad_dora_apply(d, mix->w[k], x, ldx, y, ldy, n, tmp, tmp_len);
        else if (d->b_new)
            ad_bias_swap(d, y, ldy, n);
        if (d->lora.a && !d->dora_k)
            ad_lora_apply(d, mix->w[k], x, ldx, y, ldy, n, tmp, tmp_len);
        if (d->ia3_in && !x_scaled)
            ad_ia3_in_delta(d, x, ldx, y, ldy, n, tmp, tmp_len);
        if (d->ia3_out)
            ad_ia3_out_apply(d, y, ldy, n);
        if (d->sparse.nnz)
            ad_sparse_apply(d, x, ldx, y, ldy, n);
    }
}

static bool hook_site_post_local(const void *ctx, const struct ad_site *s, bool x_scaled)
{
    const struct ad_mix *mix = ctx;
    for (int k = 0; k < mix->n; k++) {
        const struct ad_site_delta *d = delta_of(mix->a[k], s);
        if (!d)
            continue;
        /* replaced() and ia3_in_delta() are sgemm calls */
        if (d->w_new || (d->ia3_in && !x_scaled))
            return false;
    }
    return true;
}

static void hook_norm(const void *ctx, int layer, enum ad_norm_slot slot, const float **w,
                      const float **b)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    if (mix->n != 1 || !a->norms)
        return;
    const struct ad_norm_delta *nd =
        &a->norms[slot == AD_NORM_FINAL ? a->model->cfg.n_layer * 2 : layer * 2 + (int)slot];
    if (nd->w)
        *w = nd->w;
    if (nd->b)
        *b = nd->b;
}

static void hook_sublayer(const void *ctx, int layer, enum ad_norm_slot slot, const float *x,
                          float *y, int n, float *tmp, size_t tmp_len)
{
    const struct ad_mix *mix = ctx;
    const struct ad_adapter *a = mix->a[0];
    if (mix->n != 1 || (!a->bn_attn && !a->bn_mlp))
        return;
    const struct ad_bottleneck *bn = slot == AD_NORM_ATTN ? &a->bn_attn[layer] : &a->bn_mlp[layer];
    int E = a->model->cfg.n_embd;
    if (!bn->dim)
        return;
    /* The work space holds T (widest + E) floats and dim <= E: rows in blocks that fit. */
    int block = (int)(tmp_len / (size_t)(E + bn->dim));
    for (int r0 = 0; r0 < n; r0 += block) {
        int nb = n - r0 < block ? n - r0 : block;
        ad_bottleneck_apply(a, bn, x + (size_t)r0 * E, y + (size_t)r0 * E, nb, E, tmp);
    }
}

const struct ad_hooks ad_mix_hooks = {
    .n_virtual = hook_n_virtual,
    .virtual_embedding = hook_virtual_embedding,
    .embedding = hook_embedding,
    .position = hook_position,
    .n_prefix = hook_n_prefix,
    .prefix = hook_prefix,
    .norm = hook_norm,
    .site_pre = hook_site_pre,
    .site_post = hook_site_post,
    .site_post_local = hook_site_post_local,
    .sublayer = hook_sublayer,
};
