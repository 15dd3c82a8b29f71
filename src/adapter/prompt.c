/* Prompt tuning and P-tuning (PEFT "PROMPT_TUNING", "P_TUNING"): prompt_embeddings [P, hidden],
 * prepended to the input embeddings as virtual tokens at positions 0..P-1. For P-tuning PEFT
 * saves the encoder's output, so both kinds are one matrix here. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static int ad_prompt_load(struct load_ctx *c)
{
    json_t *nv = json_object_get(c->cfg, "num_virtual_tokens");
    json_t *sub = json_object_get(c->cfg, "num_transformer_submodules");
    json_t *td = json_object_get(c->cfg, "token_dim");
    int E = c->m->cfg.n_embd, r;

    if (!json_is_integer(nv) || json_integer_value(nv) < 1 || json_integer_value(nv) > 4096)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: num_virtual_tokens must be an "
                          "integer in [1, 4096]");
    if (json_is_integer(sub) && json_integer_value(sub) != 1)
        return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: num_transformer_submodules "
                          "%lld (encoder-decoder models) is not supported",
                          (long long)json_integer_value(sub));
    if (json_is_integer(td) && json_integer_value(td) != E)
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: token_dim %lld, but the model's "
                          "hidden size is %d", (long long)json_integer_value(td), E);
    const struct ad_tensor *t = ctx_take(c, "prompt_embeddings");
    if (!t)
        return ad_err_set(c->err, -EINVAL, "no 'prompt_embeddings' tensor");
    c->a->n_virtual = (int)json_integer_value(nv);
    r = ctx_f32(c, t, c->a->n_virtual, E, &c->a->prompt);
    return r;
}

/* ==========================================================================================
 * Training: prompt_embeddings [P, hidden] as a parameter. Init as PEFT's prompt_tuning_init:
 * RANDOM N(0, 1) (nn.Embedding's default), TEXT the embeddings of the init text's tokens
 * (repeated to P, or cut), SAMPLE_VOCAB those of P random tokens. */

struct prompt_train {
    int n;
    float *w, *g;
};

static int prompt_t_n_virtual(const void *ctx)
{
    const struct ad_trainable *t = ctx;
    return ((const struct prompt_train *)t->priv)->n;
}

static const float *prompt_t_embedding(const void *ctx, int v)
{
    const struct ad_trainable *t = ctx;
    const struct prompt_train *pt = t->priv;
    return pt->w + (size_t)v * (size_t)t->m->cfg.n_embd;
}

static void prompt_t_grad(void *ctx, int v, const float *d)
{
    struct ad_trainable *t = ctx;
    struct prompt_train *pt = t->priv;
    int E = t->m->cfg.n_embd;
    for (int i = 0; i < E; i++)
        pt->g[(size_t)v * E + i] += d[i];
}

static const struct ad_hooks prompt_train_hooks = {
    .n_virtual = prompt_t_n_virtual,
    .virtual_embedding = prompt_t_embedding,
    .virtual_grad = prompt_t_grad,
};

/* The fields PEFT fills from the model into a prompt-learning config. */
int tr_prompt_learning_fields(const struct ad_model *m, json_t *cfg, int token_dim, int heads,
                              struct ad_err *err)
{
    json_t *nv = json_object_get(cfg, "num_virtual_tokens");
    if (!json_is_integer(nv) || json_integer_value(nv) < 1 || json_integer_value(nv) > 4096)
        return ad_err_set(err, -EINVAL, "adapter config: num_virtual_tokens must be an integer "
                          "in [1, 4096]");
    json_object_set_new(cfg, "token_dim", json_integer(token_dim));
    json_object_set_new(cfg, "num_layers", json_integer(m->cfg.n_layer));
    json_object_set_new(cfg, "num_attention_heads", json_integer(heads));
    json_object_set_new(cfg, "num_transformer_submodules", json_integer(1));
    return (int)json_integer_value(nv);
}

static int prompt_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                         struct ad_err *err)
{
    const struct ad_model *m = t->m;
    int E = m->cfg.n_embd;
    int P = tr_prompt_learning_fields(m, cfg, E, m->cfg.n_head, err);
    if (P < 0)
        return P;
    struct prompt_train *pt = calloc(1, sizeof(*pt));
    if (!pt)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = pt;
    struct ad_param *p = tr_add(t, "prompt_embeddings", 2, P, E, false, false, err);
    if (!p)
        return -ENOMEM;
    pt->n = P;
    pt->w = p->w;
    pt->g = p->g;
    const char *init = json_string_value(json_object_get(cfg, "prompt_tuning_init"));
    init = init ? init : "RANDOM";
    if (!strcmp(init, "RANDOM")) {
        tr_normal(t, p, 1.0);
    } else if (!strcmp(init, "TEXT") || !strcmp(init, "SAMPLE_VOCAB")) {
        bool text = !strcmp(init, "TEXT");
        if (text && n_ids < 1)
            return ad_err_set(err, -EINVAL, "adapter config: prompt_tuning_init TEXT needs a "
                              "non-empty prompt_tuning_init_text");
        for (int v = 0; v < P; v++) {
            uint64_t r = ad_splitmix64(t->seed + (uint64_t)v);
            int32_t id = text ? ids[v % n_ids] : (int32_t)(r % (uint64_t)m->cfg.n_vocab);
            memcpy(p->w + (size_t)v * E, m->tok_embd + (size_t)id * E, (size_t)E * sizeof(float));
        }
    } else {
        return ad_err_set(err, -EINVAL, "adapter config: prompt_tuning_init must be RANDOM, TEXT "
                          "or SAMPLE_VOCAB");
    }
    return 0;
}

static const struct train_kind ad_prompt_train = {
    .kind = AD_ADAPTER_PROMPT,
    .init = prompt_t_init,
    .hooks = &prompt_train_hooks,
    .free = free,
};

const struct kind_ops ad_prompt_ops = {
    .kind = AD_ADAPTER_PROMPT,
    .name = "prompt",
    .peft_types = {"PROMPT_TUNING", "P_TUNING"},
    .load = ad_prompt_load,
    .train = &ad_prompt_train,
};
