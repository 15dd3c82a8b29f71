/* LoRA, rsLoRA and DoRA (PEFT "LORA"): y += s * B (A x), s = alpha / r or alpha / sqrt(r);
 * DoRA rescales each output row by k = m / |W + s B A|_row (bias not scaled). */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define SUFFIX_A ".lora_A.weight"
#define LEN_A ((int)sizeof(SUFFIX_A) - 1)

/* Options that change the forward in ways adapterd does not implement: refused by name. */
static const char *const unsupported[] = {
    "layer_replication", "target_parameters", "trainable_token_indices",
    "alora_invocation_tokens", "arrow_config", "kasa_config", "monteclora_config",
    "velora_config", "use_qalora", "use_bdlora",
};
/* Initialisations that modify the base weights: the file only works on a mutated base. */
static const char *const mutating_inits[] = {"pissa", "olora", "corda", "lora_ga", "loftq"};

static bool is_set(json_t *v)
{
    return v && !json_is_null(v) && !json_is_false(v) &&
           !(json_is_object(v) && json_object_size(v) == 0) &&
           !(json_is_array(v) && json_array_size(v) == 0);
}

/* rank_pattern / alpha_pattern: the first key k (in file order) with re.match("(.*\.)?(k)$"). */
static int pattern_value(struct load_ctx *c, const char *field, const char *module, double *ret)
{
    json_t *obj = json_object_get(c->cfg, field), *v;
    const char *k;
    if (!json_is_object(obj))
        return 0;
    json_object_foreach(obj, k, v) {
        char re[512];
        snprintf(re, sizeof(re), "(.*\\.)?(%s)$", k);
        int r = ctx_regex_match(re, module, false, c->err);
        if (r < 0)
            return r;
        if (r) {
            if (!json_is_number(v))
                return ad_err_set(c->err, -EINVAL, "adapter_config.json: %s['%s'] is not a "
                                  "number", field, k);
            *ret = json_number_value(v);
            return 1;
        }
    }
    return 0;
}

static bool in_layers(json_t *layers, int layer)
{
    size_t i;
    json_t *v;
    if (!layers || json_is_null(layers))
        return true;
    if (json_is_integer(layers))
        return json_integer_value(layers) == layer;
    json_array_foreach(layers, i, v) {
        if (json_is_integer(v) && json_integer_value(v) == layer)
            return true;
    }
    return false;
}

/* k = m / |W + s B A| per output row (the L2 norm over the input dimension). */
static int dora_init(struct load_ctx *c, struct ad_site_delta *d, const float *m)
{
    const struct ad_site *s = d->site;
    float *row = ctx_alloc(c, (size_t)s->n_in);
    d->dora_k = ctx_alloc(c, (size_t)s->n_out);
    if (!row || !d->dora_k)
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    for (int o = 0; o < s->n_out; o++) {
        double norm = 0;
        for (int i = 0; i < s->n_in; i++) {
            double w = s->w_in_out ? s->w[(size_t)i * s->n_out + o] : s->w[(size_t)o * s->n_in + i];
            double ba = 0;
            for (int r = 0; r < d->lora.rank; r++)
                ba += (double)ad_lora_b_at(&d->lora, o, r) *
                      (double)ad_lora_a_at(&d->lora, r, i);
            row[i] = (float)(w + d->scale * ba);
            norm += (double)row[i] * row[i];
        }
        d->dora_k[o] = (float)(m[o] / sqrt(norm));
    }
    return 0;
}

static size_t bytes_a(const struct ad_lora_factors *f)
{
    return (size_t)f->rank * (size_t)f->n_in * (f->bf16 ? sizeof(uint16_t) : sizeof(float));
}

static size_t bytes_bp(const struct ad_lora_factors *f)
{
    return (size_t)(f->n_out + AD_LORA_PANEL - 1) / AD_LORA_PANEL * (size_t)f->rank *
           AD_LORA_PANEL * (f->bf16 ? sizeof(uint16_t) : sizeof(float));
}

/* A [rank, n_in] as the file has it and B [n_out, rank] packed in panels (kernels.h): BF16 when
 * both tensors are BF16 (resident exactly as stored, half the bytes a batch of many adapters
 * reads per step), else F32. Into temporary buffers that pack_factors moves into the adapter. */
static int load_factors(struct load_ctx *c, struct ad_site_delta *d, int rank,
                        const struct ad_tensor *ta, const struct ad_tensor *tb)
{
    const struct ad_site *s = d->site;
    struct ad_lora_factors *f = &d->lora;
    int r;

    if ((r = ctx_shape(c, ta, rank, s->n_in)) < 0 || (r = ctx_shape(c, tb, s->n_out, rank)) < 0)
        return r;
    *f = (struct ad_lora_factors){.rank = rank, .n_in = s->n_in, .n_out = s->n_out,
                                  .bf16 = ta->dtype == AD_DTYPE_BF16 &&
                                          tb->dtype == AD_DTYPE_BF16};
    void *a = malloc(bytes_a(f)), *bp = calloc(1, bytes_bp(f));
    float *b32 = f->bf16 ? NULL : malloc((size_t)tb->n_elems * sizeof(float));
    f->a = a;
    f->bp = bp;
    if (!a || !bp || (!f->bf16 && !b32)) {
        free(b32);
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    }
    if (f->bf16)
        memcpy(a, ta->data, bytes_a(f));
    else
        ad_tensor_to_f32(ta, a);
    if (b32)
        ad_tensor_to_f32(tb, b32);
    for (int o = 0; o < s->n_out; o++)
        for (int k = 0; k < rank; k++) {
            size_t from = (size_t)o * (size_t)rank + (size_t)k;
            size_t to = ((size_t)(o / AD_LORA_PANEL) * (size_t)rank + (size_t)k) * AD_LORA_PANEL +
                        (size_t)(o % AD_LORA_PANEL);
            if (f->bf16)
                memcpy((uint16_t *)bp + to, (const uint16_t *)tb->data + from, sizeof(uint16_t));
            else
                ((float *)bp)[to] = b32[from];
        }
    free(b32);
    return 0;
}

/* Moves every site's factors from load_factors' buffers into one allocation owned by the
 * adapter, in site order (a layer's q, k, v, o, gate, up, down, each A then B): the forward
 * reads one adapter's sites of a layer one after the other (forward.c, post_item), so they
 * become one sequential stream. keep false: only frees the buffers (a failed load). */
static int pack_factors(struct load_ctx *c, bool keep)
{
    struct ad_site_delta *deltas = c->a->deltas;
    size_t total = 0;
    char *arena = NULL;
    int r = 0;

    for (int i = 0; keep && i < c->m->n_sites; i++)
        if (deltas[i].lora.a)
            total += bytes_a(&deltas[i].lora) + bytes_bp(&deltas[i].lora);
    if (total && !(arena = ctx_alloc_bytes(c, total, false)))
        r = ad_err_set(c->err, -ENOMEM, "out of memory");
    for (int i = 0; i < c->m->n_sites; i++) {
        struct ad_lora_factors *f = &deltas[i].lora;
        void *a = (void *)f->a, *bp = (void *)f->bp;
        if (!a && !bp)
            continue;
        if (arena) {
            memcpy(arena, a, bytes_a(f));
            f->a = arena;
            arena += bytes_a(f);
            memcpy(arena, bp, bytes_bp(f));
            f->bp = arena;
            arena += bytes_bp(f);
        } else {
            f->a = f->bp = NULL;
        }
        free(a);
        free(bp);
    }
    return r;
}

static int load_module(struct load_ctx *c, const char *module, const struct ad_tensor *ta)
{
    json_t *cfg = c->cfg;
    const struct ad_site *s = ad_model_find_site(c->m, module);
    char key[320];
    int r;

    if (!s)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': '%s' is not a linear layer of the model",
                          ta->name, module);
    r = ctx_targeted(c, json_object_get(cfg, "target_modules"), module, true);
    if (r <= 0)
        return r < 0 ? r : ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' is not in "
                                      "target_modules", ta->name, module);
    if (s->layer >= 0 && !in_layers(json_object_get(cfg, "layers_to_transform"), s->layer))
        return ad_err_set(c->err, -EINVAL, "tensor '%s': layer %d is not in layers_to_transform",
                          ta->name, s->layer);

    double rank = json_is_integer(json_object_get(cfg, "r"))
                      ? (double)json_integer_value(json_object_get(cfg, "r")) : 8;
    double alpha = json_is_number(json_object_get(cfg, "lora_alpha"))
                       ? json_number_value(json_object_get(cfg, "lora_alpha")) : 8;
    if ((r = pattern_value(c, "rank_pattern", module, &rank)) < 0 ||
        (r = pattern_value(c, "alpha_pattern", module, &alpha)) < 0)
        return r;
    if (ta->n_dims != 2 || ta->shape[0] != (int64_t)rank)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': rank %lld, but the config says r = %g",
                          ta->name, (long long)(ta->n_dims == 2 ? ta->shape[0] : -1), rank);
    if (rank < 1 || rank > AD_MIX_LOCAL_TMP / AD_LORA_ROWS) /* t fits a thread's work space */
        return ad_err_set(c->err, -EINVAL, "tensor '%s': rank %g out of range (1 to %d)", ta->name,
                          rank, AD_MIX_LOCAL_TMP / AD_LORA_ROWS);

    struct ad_site_delta *d = ctx_delta(c, s);
    if (d->lora.a)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' appears twice", ta->name,
                          module);
    bool rs = json_is_true(json_object_get(cfg, "use_rslora"));
    d->scale = (float)(rs ? alpha / sqrt(rank) : alpha / rank);
    snprintf(key, sizeof(key), "%.*s.lora_B.weight", (int)strlen(ta->name) - LEN_A, ta->name);
    const struct ad_tensor *tb = ctx_take(c, key);
    if (!tb)
        return ad_err_set(c->err, -EINVAL, "tensor '%s' has no matching '%s'", ta->name, key);
    if ((r = load_factors(c, d, (int)rank, ta, tb)) < 0)
        return r;
    snprintf(key, sizeof(key), "%.*s.lora_B.bias", (int)strlen(ta->name) - LEN_A, ta->name);
    const struct ad_tensor *tbb = ctx_take(c, key);
    if (tbb && (r = ctx_f32(c, tbb, s->n_out, 0, &d->lora_bias)) < 0)
        return r;

    snprintf(key, sizeof(key), "%.*s.lora_magnitude_vector", (int)strlen(ta->name) - LEN_A,
             ta->name);
    const struct ad_tensor *tm = ctx_take(c, key);
    if (!tm) {
        strncat(key, ".weight", sizeof(key) - strlen(key) - 1);
        tm = ctx_take(c, key);
    }
    bool dora = json_is_true(json_object_get(cfg, "use_dora"));
    if (dora != (tm != NULL))
        return ad_err_set(c->err, -EINVAL, "module '%s': use_dora is %s but the magnitude vector "
                          "is %s", module, dora ? "true" : "false", tm ? "present" : "missing");
    if (tm) {
        float *mag;
        if (d->lora_bias)
            return ad_err_set(c->err, -ENOTSUP, "module '%s': DoRA with lora_bias", module);
        if ((r = ctx_f32(c, tm, s->n_out, -1, &mag)) < 0 || (r = dora_init(c, d, mag)) < 0)
            return r;
    }
    return 0;
}

static int load_modules(struct load_ctx *c)
{
    json_t *init = json_object_get(c->cfg, "init_lora_weights");
    int r;

    for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++)
        if (is_set(json_object_get(c->cfg, unsupported[i])))
            return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: '%s' is not supported",
                              unsupported[i]);
    for (size_t i = 0; json_is_string(init) && i < 5; i++)
        if (!strncmp(json_string_value(init), mutating_inits[i], strlen(mutating_inits[i])))
            return ad_err_set(c->err, -ENOTSUP, "adapter_config.json: init_lora_weights '%s' "
                              "adapters need a modified base; convert them with PEFT's "
                              "path_initial_model_for_weight_conversion", json_string_value(init));

    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        const char *key = ctx_strip(t->name);
        size_t n = strlen(key);
        if (strstr(key, "lora_embedding_"))
            return ad_err_set(c->err, -ENOTSUP, "tensor '%s': LoRA on embeddings is not "
                              "supported", t->name);
        if (n > (size_t)LEN_A && !strcmp(key + n - LEN_A, SUFFIX_A)) {
            char module[256];
            if (n - LEN_A >= sizeof(module))
                return ad_err_set(c->err, -EINVAL, "tensor '%s': name too long", t->name);
            memcpy(module, key, n - LEN_A);
            module[n - LEN_A] = '\0';
            c->used[i] = true;
            if ((r = load_module(c, module, t)) < 0)
                return r;
        }
    }
    /* Saved base tensors: biases (bias="all"), modules_to_save. */
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++)
        if (!c->used[i] && (r = ctx_replacement(c, ad_st_tensor(c->st, i))) < 0)
            return r;
    return 0;
}

void ad_lora_apply(const struct ad_site_delta *d, float weight, const float *x, int ldx, float *y,
                   int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_lora_factors *f = &d->lora;
    const struct ad_kernels *k = ad_kernels_get();
    float scale = weight * d->scale;
    int block = (int)(tmp_len / (size_t)f->rank);

    /* The caller's work space holds at least one row's t (the loader caps the rank). */
    block = block < 1 ? 1 : block > AD_LORA_ROWS ? AD_LORA_ROWS : block;
    for (int r0 = 0; r0 < n; r0 += block) {
        int nb = n - r0 < block ? n - r0 : block;
        float *yb = y + (size_t)r0 * ldy;
        k->lora(f, scale, x + (size_t)r0 * ldx, ldx, nb, yb, ldy, tmp);
        if (d->lora_bias)
            for (int i = 0; i < nb; i++)
                for (int j = 0; j < f->n_out; j++)
                    yb[(size_t)i * ldy + j] += scale * d->lora_bias[j];
    }
}

int ad_lora_load(struct load_ctx *c)
{
    int r = load_modules(c);
    int rp = pack_factors(c, r == 0);
    return r < 0 ? r : rp;
}
