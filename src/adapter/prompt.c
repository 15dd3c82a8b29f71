/* Prompt tuning and P-tuning (PEFT "PROMPT_TUNING", "P_TUNING"): prompt_embeddings [P, hidden],
 * prepended to the input embeddings as virtual tokens at positions 0..P-1. For P-tuning PEFT
 * saves the encoder's output, so both kinds are one matrix here. */
#include <errno.h>

#include "internal.h"

int ad_prompt_load(struct load_ctx *c)
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
