/* Reading adapter directories as Hugging Face PEFT (adapter_config.json +
 * adapter_model.safetensors) and AdapterHub (adapter.safetensors) write them, and the helpers
 * every kind's loader shares. shared/PEFT-FORMATS.md has the layouts and their sources. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "internal.h"

#define MAX_CONFIG_BYTES (1u << 20)

/* ==========================================================================================
 * Context helpers */

const char *ctx_strip(const char *key)
{
    static const char pfx[] = "base_model.model.";
    return strncmp(key, pfx, sizeof(pfx) - 1) ? key : key + sizeof(pfx) - 1;
}

const struct ad_tensor *ctx_take(struct load_ctx *c, const char *key)
{
    const struct ad_tensor *t = ad_st_find(c->st, key);
    if (t)
        c->used[t - ad_st_tensor(c->st, 0)] = true;
    return t;
}

/* n bytes owned by the adapter, zeroed or not (a tensor about to be converted into it). From
 * 2 MB on in huge pages (ad_alloc_large): a batch of many adapters streams their LoRA factors
 * every step, and with 4 KB pages each 9.8 MB adapter costs 2,500 TLB misses per step
 * (measured: 5-8% faster streaming). */
static void *own(struct load_ctx *c, size_t n, bool zero)
{
    struct ad_adapter *a = c->a;
    void *p = ad_alloc_large(n);
    if (p && zero)
        memset(p, 0, n);
    void **o = p ? realloc(a->owned, sizeof(*o) * (size_t)(a->n_owned + 1)) : NULL;
    if (!o) {
        free(p);
        return NULL;
    }
    a->owned = o;
    a->owned[a->n_owned++] = p;
    a->bytes += n;
    return p;
}

float *ctx_alloc(struct load_ctx *c, size_t n)
{
    return own(c, n * sizeof(float), true);
}

void *ctx_alloc_bytes(struct load_ctx *c, size_t n)
{
    return own(c, n, false);
}

int ctx_check(struct load_ctx *c, const struct ad_tensor *t, int64_t d0, int64_t d1)
{
    bool ok;
    if (d1 == -1) /* a vector stored as [n], [n, 1] or [1, n] */
        ok = (t->n_dims == 1 && t->shape[0] == d0) ||
             (t->n_dims == 2 && ((t->shape[0] == d0 && t->shape[1] == 1) ||
                                 (t->shape[0] == 1 && t->shape[1] == d0)));
    else if (d1 == 0)
        ok = t->n_dims == 1 && t->shape[0] == d0;
    else
        ok = t->n_dims == 2 && t->shape[0] == d0 && t->shape[1] == d1;
    if (!ok) {
        char got[64] = "";
        for (int i = 0; i < t->n_dims && i < 4; i++)
            snprintf(got + strlen(got), sizeof(got) - strlen(got), "%s%lld", i ? ", " : "",
                     (long long)t->shape[i]);
        if (d1 > 0)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': expected shape [%lld, %lld], found "
                              "[%s]", t->name, (long long)d0, (long long)d1, got);
        return ad_err_set(c->err, -EINVAL, "tensor '%s': expected %lld values, found [%s]",
                          t->name, (long long)d0, got);
    }
    if (!ad_dtype_is_float(t->dtype))
        return ad_err_set(c->err, -EINVAL, "tensor '%s': dtype %s is not supported (F32, F16, "
                          "BF16)", t->name, ad_dtype_name(t->dtype));
    /* Checked as stored, before any conversion: 16-bit LoRA factors are kept as they are. */
    int64_t bad = ad_tensor_find_nonfinite(t);
    if (bad >= 0) {
        struct ad_tensor one = *t;
        float v;
        one.data = (const unsigned char *)t->data + (size_t)bad * ad_dtype_size(t->dtype);
        one.n_elems = 1;
        ad_tensor_to_f32(&one, &v);
        return ad_err_set(c->err, -EINVAL, "tensor '%s': element %lld is %s (values must be "
                          "finite)", t->name, (long long)bad, isnan(v) ? "NaN" : v > 0 ? "inf"
                          : "-inf");
    }
    return 0;
}

int ctx_f32(struct load_ctx *c, const struct ad_tensor *t, int64_t d0, int64_t d1, float **ret)
{
    int r = ctx_check(c, t, d0, d1);
    if (r < 0)
        return r;
    float *p = own(c, (size_t)t->n_elems * sizeof(float), false);
    if (!p)
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    ad_tensor_to_f32(t, p);
    *ret = p;
    return 0;
}

struct ad_site_delta *ctx_delta(struct load_ctx *c, const struct ad_site *s)
{
    size_t i = (size_t)(s - c->m->sites);
    if (!c->a->by_site[i]) {
        c->a->by_site[i] = &c->a->deltas[i];
        c->a->deltas[i].site = s;
        c->a->n_deltas++;
    }
    return c->a->by_site[i];
}

static bool ends_with(const char *s, const char *suffix, size_t *ret_head)
{
    size_t n = strlen(s), k = strlen(suffix);
    if (n < k || strcmp(s + n - k, suffix))
        return false;
    *ret_head = n - k;
    return true;
}

int ctx_replacement(struct load_ctx *c, const struct ad_tensor *t)
{
    const char *key = ctx_strip(t->name);
    char module[256];
    size_t head;
    bool is_bias;

    if (ends_with(key, ".base_layer.bias", &head) || ends_with(key, ".bias", &head))
        is_bias = true;
    else if (ends_with(key, ".weight", &head))
        is_bias = false;
    else
        return 0;
    if (head >= sizeof(module))
        return 0;
    memcpy(module, key, head);
    module[head] = '\0';

    const struct ad_site *s = ad_model_find_site(c->m, module);
    if (s) {
        struct ad_site_delta *d = ctx_delta(c, s);
        int r;
        c->used[t - ad_st_tensor(c->st, 0)] = true;
        if (is_bias ? d->b_new != NULL : d->w_new != NULL) /* ".bias" and ".base_layer.bias" */
            return ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' has a replacement %s "
                              "twice", t->name, module, is_bias ? "bias" : "weight");
        if (is_bias) {
            r = ctx_f32(c, t, s->n_out, 0, &d->b_new);
        } else if (s->w_in_out) { /* stored as the base stores it, [in, out]: held [out, in] */
            float *w;
            r = ctx_f32(c, t, s->n_in, s->n_out, &w);
            d->w_new = r >= 0 ? ctx_alloc(c, (size_t)s->n_in * (size_t)s->n_out) : NULL;
            if (r >= 0 && !d->w_new)
                r = ad_err_set(c->err, -ENOMEM, "out of memory");
            for (int i = 0; r >= 0 && i < s->n_in; i++)
                for (int o = 0; o < s->n_out; o++)
                    d->w_new[(size_t)o * s->n_in + i] = w[(size_t)i * s->n_out + o];
        } else {
            r = ctx_f32(c, t, s->n_out, s->n_in, &d->w_new);
        }
        return r < 0 ? r : 1;
    }

    int which = ad_model_find_embedding(c->m, module);
    if (which >= 0 && !is_bias) {
        const struct ad_model_config *mc = &c->m->cfg;
        float **dst = which ? &c->a->pos_embed : &c->a->embed;
        c->used[t - ad_st_tensor(c->st, 0)] = true;
        if (*dst)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': the embedding is replaced twice",
                              t->name);
        int r = ctx_f32(c, t, which ? mc->n_ctx_max : mc->n_vocab, mc->n_embd, dst);
        if (r < 0)
            return r;
        const struct ad_site *out = &c->m->sites[c->m->n_sites - 1];
        if (!which && out->w == c->m->tok_embd) { /* tied: the output layer changes too */
            struct ad_site_delta *d = ctx_delta(c, out);
            if (d->w_new)
                return ad_err_set(c->err, -EINVAL, "tensor '%s': the tied lm_head is replaced "
                                  "twice", t->name);
            d->w_new = *dst;
        }
        return 1;
    }

    int layer;
    enum ad_norm_slot slot;
    if (ad_model_find_norm(c->m, module, &layer, &slot) == 0) {
        int n_embd = c->m->cfg.n_embd;
        if (!c->a->norms) {
            c->a->norms = calloc((size_t)c->m->cfg.n_layer * 2 + 1, sizeof(*c->a->norms));
            if (!c->a->norms)
                return ad_err_set(c->err, -ENOMEM, "out of memory");
        }
        struct ad_norm_delta *nd =
            &c->a->norms[layer < 0 ? c->m->cfg.n_layer * 2 : layer * 2 + (int)slot];
        float *p;
        c->used[t - ad_st_tensor(c->st, 0)] = true;
        int r = ctx_f32(c, t, n_embd, 0, &p);
        if (r < 0)
            return r;
        if (is_bias) {
            if (!c->m->final_norm_b)
                return ad_err_set(c->err, -EINVAL, "tensor '%s': the model's norms have no "
                                  "bias", t->name);
            nd->b = p;
        } else {
            nd->w = p;
        }
        return 1;
    }
    return 0;
}

int ctx_check_all_used(struct load_ctx *c)
{
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++)
        if (!c->used[i])
            return ad_err_set(c->err, -EINVAL, "tensor '%s' matches nothing in the model or this "
                              "adapter kind", ad_st_tensor(c->st, i)->name);
    return 0;
}

/* A module replaced by modules_to_save is not adapted as well (PEFT never targets it; rule 2 of
 * PEFT-FORMATS 1.4): its deltas would be defined against the base weight it no longer has. */
static int check_replaced(struct load_ctx *c)
{
    for (int i = 0; i < c->m->n_sites; i++) {
        const struct ad_site_delta *d = c->a->by_site[i];
        if (d && d->w_new && (d->lora.a || d->ia3_in || d->ia3_out))
            return ad_err_set(c->err, -EINVAL, "module '%s' is both saved whole "
                              "(modules_to_save) and adapted (%s)", d->site->path,
                              d->lora.a ? "LoRA" : "IA3");
    }
    return 0;
}

int ctx_regex_match(const char *pattern, const char *subject, bool full, struct ad_err *err)
{
    int ec;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pattern, PCRE2_ZERO_TERMINATED,
                                   PCRE2_ANCHORED | (full ? PCRE2_ENDANCHORED : 0) | PCRE2_UTF,
                                   &ec, &off, NULL);
    if (!re)
        return ad_err_set(err, -EINVAL, "bad regular expression '%.60s' at %zu", pattern,
                          (size_t)off);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    int rc = md ? pcre2_match(re, (PCRE2_SPTR)subject, PCRE2_ZERO_TERMINATED, 0, 0, md, NULL)
                : PCRE2_ERROR_NOMEMORY;
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    if (rc == PCRE2_ERROR_NOMATCH)
        return 0;
    if (rc < 0)
        return ad_err_set(err, -EINVAL, "regular expression '%.60s' failed on '%.60s'", pattern,
                          subject);
    return 1;
}

int ctx_targeted(json_t *targets, const char *module, bool dot_suffix, struct ad_err *err)
{
    if (!targets || json_is_null(targets))
        return 1; /* nothing to cross-check against */
    if (json_is_string(targets))
        return ctx_regex_match(json_string_value(targets), module, true, err);
    if (!json_is_array(targets))
        return ad_err_set(err, -EINVAL, "adapter_config.json: target_modules must be a list "
                          "or a string");
    size_t i, n = strlen(module);
    json_t *t;
    json_array_foreach(targets, i, t) {
        const char *s = json_string_value(t);
        size_t k = s ? strlen(s) : 0;
        if (!s)
            continue;
        if (!strcmp(module, s))
            return 1;
        if (n > k && !strcmp(module + n - k, s) && (!dot_suffix || module[n - k - 1] == '.'))
            return 1;
    }
    return 0;
}

/* ==========================================================================================
 * Loading */

static const struct kind_ops *const all_kinds[] = {
    &ad_lora_ops, &ad_ia3_ops, &ad_prefix_ops, &ad_prompt_ops, &ad_bias_ops, &ad_bottleneck_ops,
    &ad_sparse_ops,
};
#define N_KINDS (sizeof(all_kinds) / sizeof(all_kinds[0]))

const struct kind_ops *ad_kind_ops(enum ad_adapter_kind k)
{
    for (size_t i = 0; i < N_KINDS; i++)
        if (all_kinds[i]->kind == k)
            return all_kinds[i];
    return NULL;
}

static const struct kind_ops *kind_of_type(const char *peft_type)
{
    for (size_t i = 0; i < N_KINDS; i++)
        for (size_t j = 0; j < 3 && all_kinds[i]->peft_types[j]; j++)
            if (!strcmp(peft_type, all_kinds[i]->peft_types[j]))
                return all_kinds[i];
    return NULL;
}

const struct kind_ops *ad_kind_of_config(json_t *cfg)
{
    const char *pt = json_string_value(json_object_get(cfg, "peft_type"));
    if (pt)
        return kind_of_type(pt);
    return json_is_object(json_object_get(cfg, "config")) ? &ad_bottleneck_ops : NULL;
}

enum ad_adapter_kind ad_adapter_config_kind(const char *peft_type)
{
    const struct kind_ops *k = peft_type ? kind_of_type(peft_type) : &ad_bottleneck_ops;
    return k && (peft_type == NULL || k != &ad_bottleneck_ops) ? k->kind : AD_ADAPTER_KIND_COUNT;
}

int ad_adapter_load_mem(const struct ad_model *m, const char *config_json, const void *weights,
                        size_t weights_len, const char *name, unsigned flags,
                        struct ad_adapter **ret, struct ad_err *err)
{
    struct load_ctx c = {.m = m, .flags = flags, .err = err};
    json_error_t jerr;
    json_t *root;
    int r;

    root = json_loads(config_json, 0, &jerr);
    if (!root)
        return ad_err_set(err, -EINVAL, "adapter_config.json: line %d: %s", jerr.line, jerr.text);
    if (!json_is_object(root)) {
        r = ad_err_set(err, -EINVAL, "adapter_config.json: not a JSON object");
        goto out;
    }
    r = ad_st_parse(weights, weights_len, (struct ad_st_file **)&c.st, err);
    if (r < 0) {
        ad_err_prefix(err, "adapter weights");
        goto out;
    }
    c.used = calloc(ad_st_n_tensors(c.st) + 1, sizeof(bool));
    c.a = calloc(1, sizeof(*c.a));
    if (c.a) {
        c.a->by_site = calloc((size_t)m->n_sites, sizeof(*c.a->by_site));
        c.a->deltas = calloc((size_t)m->n_sites, sizeof(*c.a->deltas));
    }
    if (!c.used || !c.a || !c.a->by_site || !c.a->deltas) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    atomic_init(&c.a->refs, 1);
    static atomic_uint_fast64_t serials;
    c.a->serial = atomic_fetch_add_explicit(&serials, 1, memory_order_relaxed) + 1;
    c.a->model = m;
    snprintf(c.a->name, sizeof(c.a->name), "%s", name);

    json_t *pt = json_object_get(root, "peft_type");
    const struct kind_ops *k = ad_kind_of_config(root);
    if (k == &ad_bottleneck_ops && json_is_string(pt))
        k = NULL; /* adapterd's training shorthand: the saved file is AdapterHub's */
    if (k) {
        c.a->kind = k->kind;
        c.cfg = root;
        r = k->load(&c);
    } else if (json_is_string(pt)) {
        r = ad_err_set(err, -ENOTSUP, "adapter_config.json: peft_type '%.40s' is not "
                       "supported (LORA, IA3, PREFIX_TUNING, PROMPT_TUNING, P_TUNING, BITFIT, "
                       "SPARSE)", json_string_value(pt));
    } else {
        r = ad_err_set(err, -EINVAL, "adapter_config.json: neither a PEFT config ('peft_type') "
                       "nor an AdapterHub config ('config')");
    }
    if (r >= 0)
        r = ctx_check_all_used(&c);
    if (r >= 0)
        r = check_replaced(&c);
    if (r >= 0 && c.a->n_deltas == 0 && !c.a->norms && !c.a->n_virtual && !c.a->n_prefix &&
        !c.a->embed && !c.a->pos_embed &&
        !c.a->bn_attn && !c.a->bn_mlp)
        r = ad_err_set(err, -EINVAL, "the adapter matches no part of the model");
out:
    if (r < 0) {
        ad_adapter_unref(c.a);
    } else {
        *ret = c.a;
    }
    ad_st_close((struct ad_st_file *)c.st);
    free(c.used);
    json_decref(root);
    return r;
}

int ad_adapter_load(const struct ad_model *m, const char *dir, const char *name, unsigned flags,
                    struct ad_adapter **ret, struct ad_err *err)
{
    static const char *const weight_files[] = {"adapter_model.safetensors", "adapter.safetensors"};
    static const char *const pickles[] = {"adapter_model.bin", "pytorch_adapter.bin"};
    struct ad_mmap map = {0};
    char *config = NULL;
    int r;

    /* Files are opened inside the directory, never through a symlink, and errors name them
     * relative to it: the caller knows (and may or may not show) where the directory is. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return ad_err_set(err, -errno, "the adapter directory: %s", strerror(errno));
    r = ad_read_file_at(dfd, "adapter_config.json", MAX_CONFIG_BYTES, &config, NULL, err);
    if (r < 0)
        goto out;
    r = -ENOENT;
    for (size_t i = 0; r == -ENOENT && i < 2; i++)
        if (faccessat(dfd, weight_files[i], F_OK, AT_SYMLINK_NOFOLLOW) == 0)
            r = ad_mmap_init_at(&map, dfd, weight_files[i], err);
    if (r == -ENOENT) {
        for (size_t i = 0; i < 2; i++)
            if (faccessat(dfd, pickles[i], F_OK, AT_SYMLINK_NOFOLLOW) == 0) {
                r = ad_err_set(err, -ENOTSUP, "%s: pickle checkpoints are not read (they can run "
                               "code); save with safe_serialization=True", pickles[i]);
                goto out;
            }
        r = ad_err_set(err, -ENOENT, "no adapter_model.safetensors");
        goto out;
    }
    if (r < 0)
        goto out;
    r = ad_adapter_load_mem(m, config, map.data, map.size, name, flags, ret, err);
out:
    ad_mmap_fini(&map);
    free(config);
    close(dfd);
    return r;
}
