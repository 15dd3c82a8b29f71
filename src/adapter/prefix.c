/* Prefix tuning (PEFT "PREFIX_TUNING"): prompt_embeddings [P, L * 2 * D] holds, per virtual
 * token, [layer 0 K | layer 0 V | layer 1 K | ...], each D = n_heads_stored * head_dim, head-major.
 * On GQA models PEFT stores per KV head (D = n_kv_head * head_dim). The forward pass reads the
 * keys and values in place as every sequence's first P positions (keys never rotated; not copied
 * into the KV cache); real tokens start at position P. */
#include <errno.h>
#include <string.h>

#include "internal.h"

int ad_prefix_load(struct load_ctx *c)
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
