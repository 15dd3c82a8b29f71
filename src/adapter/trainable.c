/* Trainable adapters: the parameters, their initialisation and saving, common to every kind;
 * each kind's file adds its own parameters and hooks (struct train_kind). */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

/* ==========================================================================================
 * Parameters */

struct ad_param *tr_add(struct ad_trainable *t, const char *name, int n_dims, int64_t d0,
                        int64_t d1, bool decay, bool maskable, struct ad_err *err)
{
    if (t->n_params == t->cap) {
        int cap = t->cap ? 2 * t->cap : 32;
        struct ad_param *p = realloc(t->params, (size_t)cap * sizeof(*p));
        if (!p) {
            ad_err_set(err, -ENOMEM, "out of memory");
            return NULL;
        }
        t->params = p;
        t->cap = cap;
    }
    size_t n = (size_t)d0 * (size_t)(n_dims == 2 ? d1 : 1);
    struct ad_param *p = &t->params[t->n_params];
    memset(p, 0, sizeof(*p));
    if (snprintf(p->name, sizeof(p->name), "%s", name) >= (int)sizeof(p->name)) {
        ad_err_set(err, -EINVAL, "parameter name '%.60s...' too long", name);
        return NULL;
    }
    p->n_dims = n_dims;
    p->shape[0] = d0;
    p->shape[1] = n_dims == 2 ? d1 : 0;
    p->n = n;
    p->decay = decay;
    p->maskable = maskable;
    p->w = calloc(n ? n : 1, sizeof(float));
    p->g = calloc(n ? n : 1, sizeof(float));
    if (!p->w || !p->g) {
        free(p->w);
        free(p->g);
        ad_err_set(err, -ENOMEM, "out of memory for parameter '%s'", name);
        return NULL;
    }
    t->n_params++;
    return p;
}

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

static uint64_t param_key(const struct ad_trainable *t, const struct ad_param *p)
{
    return ad_splitmix64(ad_splitmix64(t->seed) ^ name_hash(p->name));
}

void tr_uniform(const struct ad_trainable *t, struct ad_param *p, double bound)
{
    uint64_t key = param_key(t, p);
    for (size_t i = 0; i < p->n; i++)
        p->w[i] = (float)((2 * ad_unit(ad_splitmix64(key + i)) - 1) * bound);
}

void tr_normal(const struct ad_trainable *t, struct ad_param *p, double std)
{
    uint64_t key = param_key(t, p);
    for (size_t i = 0; i < p->n; i++) { /* Box-Muller on two draws per value */
        double u1 = ad_unit(ad_splitmix64(key + 2 * i)), u2 = ad_unit(ad_splitmix64(key + 2 * i + 1));
        p->w[i] = (float)(std * sqrt(-2 * log(1 - u1)) * cos(2 * M_PI * u2));
    }
}

uint64_t tr_stream(const struct ad_trainable *t, uint64_t what)
{
    uint64_t k = ad_splitmix64(ad_splitmix64(t->seed ^ 0x5eedull) + t->step);
    return ad_splitmix64(k + (uint64_t)t->micro * 0x100000001b3ull + (what << 40));
}

int tr_targeted(const struct ad_trainable *t, json_t *targets, const struct ad_site *s,
                struct ad_err *err)
{
    const char *root = ad_model_root(t->m);
    const char *path = s->path; /* with the root: "model.layers.0.self_attn.q_proj" */
    if (json_is_string(targets) && !strcmp(json_string_value(targets), "all-linear"))
        return s->layer >= 0; /* PEFT: every linear layer but the output layer */
    if (!targets || json_is_null(targets))
        return 0;
    int r = ctx_targeted(targets, path, true, err);
    if (r == 0 && !strncmp(path, root, strlen(root))) /* a regex written without the root */
        r = ctx_targeted(targets, path + strlen(root), true, err);
    return r;
}

static int by_name(const void *a, const void *b)
{
    return strcmp(((const struct ad_param *)a)->name, ((const struct ad_param *)b)->name);
}

/* ==========================================================================================
 * Lifetime */

static const struct train_kind *kind_of(json_t *cfg)
{
    const struct kind_ops *k = ad_kind_of_config(cfg);
    return k ? k->train : NULL;
}

int ad_trainable_new(const struct ad_model *m, const char *config_json, uint64_t seed,
                     const int32_t *init_ids, int n_init_ids, struct ad_trainable **ret,
                     struct ad_err *err)
{
    json_error_t jerr;
    json_t *cfg = json_loads(config_json, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(cfg)) {
        json_decref(cfg);
        return ad_err_set(err, -EINVAL, "adapter config: %s", cfg ? "not a JSON object"
                                                                 : jerr.text);
    }
    const struct train_kind *k = kind_of(cfg);
    if (!k) {
        const char *pt = json_string_value(json_object_get(cfg, "peft_type"));
        int r = ad_err_set(err, -ENOTSUP, "adapter config: peft_type '%.40s' cannot be trained "
                           "(LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, BITFIT, BOTTLENECK or an "
                           "AdapterHub config)", pt ? pt : "(none)");
        json_decref(cfg); /* after: pt is cfg's */
        return r;
    }
    struct ad_trainable *t = calloc(1, sizeof(*t));
    if (!t) {
        json_decref(cfg);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    t->kind = k->kind;
    t->m = m;
    t->seed = seed;
    t->cfg = cfg;
    t->hooks = k->hooks;
    int r = k->init(t, cfg, init_ids, n_init_ids, err);
    if (r >= 0 && t->n_params == 0)
        r = ad_err_set(err, -EINVAL, "adapter config: it trains no part of the model (check "
                       "target_modules)");
    if (r < 0) {
        ad_trainable_free(t);
        return r;
    }
    qsort(t->params, (size_t)t->n_params, sizeof(*t->params), by_name);
    *ret = t;
    return 0;
}

void ad_trainable_free(struct ad_trainable *t)
{
    if (!t)
        return;
    const struct train_kind *k = kind_of(t->cfg);
    if (k && k->free)
        k->free(t->priv);
    for (int i = 0; i < t->n_params; i++) {
        free(t->params[i].w);
        free(t->params[i].g);
    }
    free(t->params);
    json_decref(t->cfg);
    free(t);
}

struct ad_param *ad_trainable_param(struct ad_trainable *t, const char *name)
{
    struct ad_param key;
    snprintf(key.name, sizeof(key.name), "%s", name);
    return bsearch(&key, t->params, (size_t)t->n_params, sizeof(key), by_name);
}

int ad_trainable_set(struct ad_trainable *t, const struct ad_st_file *f, struct ad_err *err)
{
    for (int i = 0; i < t->n_params; i++) {
        struct ad_param *p = &t->params[i];
        const struct ad_tensor *x = ad_st_find(f, p->name);
        if (!x)
            return ad_err_set(err, -EINVAL, "no tensor '%s' to continue from", p->name);
        bool ok = x->n_elems == (int64_t)p->n && ad_dtype_is_float(x->dtype) &&
                  (x->n_dims == p->n_dims || (p->n_dims == 1 && x->n_dims == 2));
        if (!ok)
            return ad_err_set(err, -EINVAL, "tensor '%s': %lld values, the parameter has %zu",
                              p->name, (long long)x->n_elems, p->n);
        if (ad_tensor_find_nonfinite(x) >= 0)
            return ad_err_set(err, -EINVAL, "tensor '%s': a value is not finite", p->name);
        ad_tensor_to_f32(x, p->w);
    }
    return 0;
}

void ad_trainable_zero_grad(struct ad_trainable *t)
{
    for (int i = 0; i < t->n_params; i++)
        memset(t->params[i].g, 0, t->params[i].n * sizeof(float));
}

void ad_trainable_prepare(struct ad_trainable *t)
{
    const struct train_kind *k = kind_of(t->cfg);
    if (k->prepare)
        k->prepare(t);
}

void ad_trainable_finish(struct ad_trainable *t)
{
    const struct train_kind *k = kind_of(t->cfg);
    if (k->finish)
        k->finish(t);
}

/* ==========================================================================================
 * Saving */

#define MAX_SAVED 4096

int ad_trainable_save(struct ad_trainable *t, const char *dir, struct ad_err *err)
{
    const struct train_kind *k = kind_of(t->cfg);
    bool hub = k->kind == AD_ADAPTER_BOTTLENECK;
    char path[4200];
    struct ad_st_entry *e = calloc(MAX_SAVED, sizeof(*e));
    float *owned = NULL;
    int r = 0;
    size_t n = 0;
    if (!e)
        return ad_err_set(err, -ENOMEM, "out of memory");
    if (k->saved) {
        r = k->saved(t, e, MAX_SAVED, &owned, err);
        n = r >= 0 ? (size_t)r : 0;
    } else {
        for (int i = 0; i < t->n_params && i < MAX_SAVED; i++, n++) {
            const struct ad_param *p = &t->params[i];
            e[n] = (struct ad_st_entry){.name = p->name, .dtype = AD_DTYPE_F32,
                                        .n_dims = p->n_dims, .data = p->w};
            e[n].shape[0] = p->shape[0];
            e[n].shape[1] = p->shape[1];
        }
    }
    /* the config as PEFT saves it: inference mode */
    json_t *cfg = json_deep_copy(t->cfg);
    if (r >= 0 && cfg && !hub)
        json_object_set_new(cfg, "inference_mode", json_true());
    char *text = cfg ? json_dumps(cfg, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
    json_decref(cfg);
    if (r >= 0 && !text)
        r = ad_err_set(err, -ENOMEM, "out of memory");
    if (r >= 0) {
        snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
        r = ad_write_file(path, text, strlen(text));
        if (r < 0)
            ad_err_set(err, r, "writing adapter_config.json: %s", strerror(-r));
    }
    if (r >= 0) {
        static const char *const meta[] = {"format", "pt", NULL};
        snprintf(path, sizeof(path), "%s/%s", dir,
                 hub ? "adapter.safetensors" : "adapter_model.safetensors");
        r = ad_st_write(path, e, n, hub ? NULL : meta, err);
    }
    free(text);
    free(owned);
    free(e);
    return r < 0 ? r : 0;
}
