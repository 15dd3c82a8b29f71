/* (IA)^3 (PEFT "IA3"): learned vectors that scale a module's output (bias included), or, for
 * feedforward_modules, its input. */
#include <errno.h>
#include <string.h>

#include "internal.h"

#define SUFFIX ".ia3_l"

int ad_ia3_load(struct load_ctx *c)
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
