/* Prefix tuning (PEFT "PREFIX_TUNING"): prompt_embeddings [P, L * 2 * D] holds, per virtual
 * token, [layer 0 K | layer 0 V | layer 1 K | ...], each D = n_heads_stored * head_dim, head-major.
 * On GQA models PEFT stores per KV head (D = n_kv_head * head_dim). The forward pass reads the
 * keys and values in place as every sequence's first P positions (keys never rotated; not copied
 * into the KV cache); real tokens start at position P. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int ad_prefix_load(struct load_ctx *c)
{
    const struct ad_model_config *mc = &c->m->cfg;
    int kvd = mc->n_kv_head * mc->head_dim, L = mc->n_layer, r;
    json_t *nv = json_object_get(c->cfg, "num_virtual_tokens");
    json_t *nl = json_object_get(c->cfg, "num_layers");
    json_t *td = json_object_get(c->cfg, "token_dim");
    json_t *nh = json_object_get(c->cfg, "num_attention_heads");

    if (!json_is_integer(nv) || json_integer_value(nv) < 1 || json_integer_value(nv) > 4096)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: num_virtual_tokens must be an "
                          "integer in [1, 4096]");
    if (json_is_integer(nl) && json_integer_value(nl) != L)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: num_layers %lld, but the model "
                          "has %d", (long long)json_integer_value(nl), L);
    if (json_is_integer(td) && json_integer_value(td) != kvd)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: token_dim %lld, but the model's "
                          "keys are %d wide (%d KV heads x %d)%s",
                          (long long)json_integer_value(td), kvd, mc->n_kv_head, mc->head_dim,
                          mc->n_kv_head != mc->n_head ? "; written by PEFT < 0.12 without GQA "
                          "support?" : "");
    if (json_is_integer(nh) && json_integer_value(nh) != mc->n_kv_head)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: num_attention_heads %lld, but "
                          "the model has %d KV heads", (long long)json_integer_value(nh),
                          mc->n_kv_head);
    if (json_is_true(json_object_get(c->cfg, "prefix_projection")) &&
        !json_is_true(json_object_get(c->cfg, "inference_mode")))
        return ad_err_set(c->err, -ENOTSUP, "prefix_projection without inference_mode: the "
                          "file holds the projection MLP, not the prefix");

    const struct ad_tensor *t = ctx_take(c, "prompt_embeddings");
    if (!t)
        return ad_err_set(c->err, -EINVAL, "no 'prompt_embeddings' tensor");
    int P = (int)json_integer_value(nv);
    float *flat;
    if ((r = ctx_f32(c, t, P, (int64_t)L * 2 * kvd, &flat)) < 0)
        return r;
    c->a->prefix_kv = ctx_alloc(c, (size_t)L * 2 * (size_t)P * (size_t)kvd);
    if (!c->a->prefix_kv)
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    for (int l = 0; l < L; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int p = 0; p < P; p++)
                memcpy(c->a->prefix_kv + (((size_t)l * 2 + kv) * P + p) * kvd,
                       flat + (size_t)p * L * 2 * kvd + ((size_t)l * 2 + kv) * kvd,
                       (size_t)kvd * sizeof(float));
    c->a->n_prefix = P;
    return 0;
}

/* ==========================================================================================
 * Training: prompt_embeddings [P, L * 2 * D] as a parameter (N(0, 1), nn.Embedding's default),
 * or, with prefix_projection, PEFT's PrefixEncoder: an Embedding(P, D) through Linear(D, H),
 * Tanh, Linear(H, L * 2 * D) (torch's default Linear init); what is saved is the MLP's output,
 * as PEFT saves it. The keys and values are laid out per layer for the hooks by prepare(), and
 * their gradients folded back into the parameters by finish(). */

struct prefix_train {
    int P, D, H, L;         /* virtual tokens, K/V width, MLP width (0: no projection), layers */
    float *flat, *gflat;    /* no projection: prompt_embeddings [P, L 2 D] */
    float *emb, *gemb;      /* projection: [P, D] */
    float *w0, *gw0, *b0, *gb0, *w2, *gw2, *b2, *gb2; /* [H, D], [H], [L 2 D, H], [L 2 D] */
    float *kv, *gkv;        /* [L][2][P][D] the keys and values, and their gradients */
    float *hid, *out;       /* projection: tanh(emb W0^T + b0) [P, H], its output [P, L 2 D] */
};

/* pkv [P, L 2 D] (flat) <-> [L][2][P][D] (kv) */
static void unflatten(const struct prefix_train *pt, const float *flat, float *kv)
{
    size_t D = (size_t)pt->D, P = (size_t)pt->P;
    for (size_t l = 0; l < (size_t)pt->L; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t p = 0; p < P; p++)
                memcpy(kv + ((l * 2 + k) * P + p) * D, flat + p * (size_t)pt->L * 2 * D +
                       (l * 2 + k) * D, D * sizeof(float));
}

static void flatten_add(const struct prefix_train *pt, const float *kv, float *flat)
{
    size_t D = (size_t)pt->D, P = (size_t)pt->P;
    for (size_t l = 0; l < (size_t)pt->L; l++)
        for (size_t k = 0; k < 2; k++)
            for (size_t p = 0; p < P; p++)
                for (size_t j = 0; j < D; j++)
                    flat[p * (size_t)pt->L * 2 * D + (l * 2 + k) * D + j] +=
                        kv[((l * 2 + k) * P + p) * D + j];
}

/* The MLP's output for the current parameters, into pt->out (and its hidden layer). */
static void project(struct prefix_train *pt)
{
    int P = pt->P, D = pt->D, H = pt->H, O = pt->L * 2 * pt->D;
    ad_train_sgemm(false, true, P, H, D, 1.0f, pt->emb, D, pt->w0, D, 0.0f, pt->hid, H);
    for (int p = 0; p < P; p++)
        for (int h = 0; h < H; h++)
            pt->hid[(size_t)p * H + h] = tanhf(pt->hid[(size_t)p * H + h] + pt->b0[h]);
    ad_train_sgemm(false, true, P, O, H, 1.0f, pt->hid, H, pt->w2, H, 0.0f, pt->out, O);
    for (int p = 0; p < P; p++)
        for (int o = 0; o < O; o++)
            pt->out[(size_t)p * O + o] += pt->b2[o];
}

static void prefix_t_prepare(struct ad_trainable *t)
{
    struct prefix_train *pt = t->priv;
    if (pt->H)
        project(pt);
    unflatten(pt, pt->H ? pt->out : pt->flat, pt->kv);
}

static void prefix_t_finish(struct ad_trainable *t)
{
    struct prefix_train *pt = t->priv;
    int P = pt->P, D = pt->D, H = pt->H, O = pt->L * 2 * pt->D;
    if (!H) {
        flatten_add(pt, pt->gkv, pt->gflat);
    } else { /* back through the MLP: d out -> W2, b2, d hid -> tanh -> W0, b0, emb */
        float *dout = calloc((size_t)P * (size_t)O, sizeof(float));
        float *dh = malloc((size_t)P * (size_t)H * sizeof(float));
        if (!dout || !dh) { /* no gradient this step rather than a wrong one */
            free(dout);
            free(dh);
            return;
        }
        project(pt); /* the activations of these parameters */
        flatten_add(pt, pt->gkv, dout);
        ad_train_sgemm(true, false, O, H, P, 1.0f, dout, O, pt->hid, H, 1.0f, pt->gw2, H);
        for (int p = 0; p < P; p++)
            for (int o = 0; o < O; o++)
                pt->gb2[o] += dout[(size_t)p * O + o];
        ad_train_sgemm(false, false, P, H, O, 1.0f, dout, O, pt->w2, H, 0.0f, dh, H);
        for (int p = 0; p < P; p++)
            for (int h = 0; h < H; h++) {
                float y = pt->hid[(size_t)p * H + h], *d = &dh[(size_t)p * H + h];
                *d *= 1 - y * y;
                pt->gb0[h] += *d;
            }
        ad_train_sgemm(true, false, H, D, P, 1.0f, dh, H, pt->emb, D, 1.0f, pt->gw0, D);
        ad_train_sgemm(false, false, P, D, H, 1.0f, dh, H, pt->w0, D, 1.0f, pt->gemb, D);
        free(dout);
        free(dh);
    }
    memset(pt->gkv, 0, (size_t)pt->L * 2 * (size_t)P * (size_t)D * sizeof(float));
}

static int prefix_t_n(const void *ctx)
{
    const struct ad_trainable *t = ctx;
    return ((const struct prefix_train *)t->priv)->P;
}

static const float *prefix_t_kv(const void *ctx, int layer, int kv)
{
    const struct ad_trainable *t = ctx;
    const struct prefix_train *pt = t->priv;
    return pt->kv + ((size_t)layer * 2 + (size_t)kv) * (size_t)pt->P * (size_t)pt->D;
}

static void prefix_t_grad(void *ctx, int layer, int kv, const float *d)
{
    struct ad_trainable *t = ctx;
    struct prefix_train *pt = t->priv;
    size_t n = (size_t)pt->P * (size_t)pt->D;
    float *g = pt->gkv + ((size_t)layer * 2 + (size_t)kv) * n;
    for (size_t i = 0; i < n; i++)
        g[i] += d[i];
}

static const struct ad_hooks prefix_train_hooks = {
    .n_prefix = prefix_t_n,
    .prefix = prefix_t_kv,
    .prefix_grad = prefix_t_grad,
};

static void prefix_t_free(void *priv)
{
    struct prefix_train *pt = priv;
    if (pt) {
        free(pt->kv);
        free(pt->gkv);
        free(pt->hid);
        free(pt->out);
    }
    free(pt);
}

static int prefix_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                         struct ad_err *err)
{
    const struct ad_model *m = t->m;
    int D = m->cfg.n_kv_head * m->cfg.head_dim, L = m->cfg.n_layer;
    (void)ids, (void)n_ids;
    int P = tr_prompt_learning_fields(m, cfg, D, m->cfg.n_kv_head, err);
    if (P < 0)
        return P;
    struct prefix_train *pt = calloc(1, sizeof(*pt));
    if (!pt)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = pt;
    pt->P = P;
    pt->D = D;
    pt->L = L;
    size_t O = (size_t)L * 2 * (size_t)D;
    bool proj = json_is_true(json_object_get(cfg, "prefix_projection"));
    json_t *eh = json_object_get(cfg, "encoder_hidden_size");
    if (proj) {
        pt->H = json_is_integer(eh) ? (int)json_integer_value(eh) : D;
        if (pt->H < 1 || pt->H > 1 << 16)
            return ad_err_set(err, -EINVAL, "adapter config: encoder_hidden_size must be in [1, "
                              "65536]");
        json_object_set_new(cfg, "encoder_hidden_size", json_integer(pt->H));
    }
    bool zero = json_is_string(json_object_get(cfg, "init_weights")) &&
                !strcmp(json_string_value(json_object_get(cfg, "init_weights")), "zero");
    struct ad_param *p;
    /* the embeddings are never masked by child-tuning, the MLP's parameters are */
#define ADD(field, gfield, name, d0, d1, decay, init)                                          \
    do {                                                                                       \
        if (!(p = tr_add(t, name, (d1) ? 2 : 1, d0, d1, decay,                                 \
                         !strstr(name, "embed"), err)))                                        \
            return -ENOMEM;                                                                    \
        init;                                                                                  \
        pt->field = p->w;                                                                      \
        pt->gfield = p->g;                                                                     \
    } while (0)
    if (!proj) {
        ADD(flat, gflat, "prompt_embeddings", P, (int64_t)O, false, if (!zero) tr_normal(t, p, 1.0));
    } else { /* nn.Embedding N(0, 1); nn.Linear U(+-1/sqrt(fan_in)) weights and biases */
        double b0 = 1 / sqrt((double)D), b2 = 1 / sqrt((double)pt->H);
        ADD(emb, gemb, "prompt_encoder.embedding.weight", P, D, false, tr_normal(t, p, 1.0));
        ADD(w0, gw0, "prompt_encoder.transform.0.weight", pt->H, D, true, tr_uniform(t, p, b0));
        ADD(b0, gb0, "prompt_encoder.transform.0.bias", pt->H, 0, false, tr_uniform(t, p, b0));
        ADD(w2, gw2, "prompt_encoder.transform.2.weight", (int64_t)O, pt->H, true,
            if (!zero) tr_uniform(t, p, b2));
        ADD(b2, gb2, "prompt_encoder.transform.2.bias", (int64_t)O, 0, false,
            if (!zero) tr_uniform(t, p, b2));
        pt->hid = malloc((size_t)P * (size_t)pt->H * sizeof(float));
        pt->out = malloc((size_t)P * O * sizeof(float));
        if (!pt->hid || !pt->out)
            return ad_err_set(err, -ENOMEM, "out of memory");
    }
#undef ADD
    pt->kv = malloc((size_t)P * O * sizeof(float));
    pt->gkv = calloc((size_t)P * O, sizeof(float));
    if (!pt->kv || !pt->gkv)
        return ad_err_set(err, -ENOMEM, "out of memory");
    return 0;
}

/* What serving reads: prompt_embeddings, the MLP's output when there is one. */
static int prefix_t_saved(struct ad_trainable *t, struct ad_st_entry *e, size_t n_max,
                          float **owned, struct ad_err *err)
{
    struct prefix_train *pt = t->priv;
    size_t O = (size_t)pt->L * 2 * (size_t)pt->D;
    (void)n_max;
    const float *data = pt->flat;
    if (pt->H) {
        project(pt);
        *owned = malloc((size_t)pt->P * O * sizeof(float));
        if (!*owned)
            return ad_err_set(err, -ENOMEM, "out of memory");
        memcpy(*owned, pt->out, (size_t)pt->P * O * sizeof(float));
        data = *owned;
    }
    e[0] = (struct ad_st_entry){.name = "prompt_embeddings", .dtype = AD_DTYPE_F32, .n_dims = 2,
                                .shape = {pt->P, (int64_t)O}, .data = data};
    return 1;
}

static const struct train_kind ad_prefix_train = {
    .kind = AD_ADAPTER_PREFIX,
    .init = prefix_t_init,
    .hooks = &prefix_train_hooks,
    .prepare = prefix_t_prepare,
    .finish = prefix_t_finish,
    .saved = prefix_t_saved,
    .free = prefix_t_free,
};

const struct kind_ops ad_prefix_ops = {
    .kind = AD_ADAPTER_PREFIX,
    .name = "prefix",
    .peft_types = {"PREFIX_TUNING"},
    .load = ad_prefix_load,
    .train = &ad_prefix_train,
};
