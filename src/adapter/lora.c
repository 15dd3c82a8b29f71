/* LoRA, rsLoRA and DoRA (PEFT "LORA"): y += s * B (A x), s = alpha / r or alpha / sqrt(r);
 * DoRA rescales each output row by k = m / |W + s B A|_row (bias not scaled). */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
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

/* k = m / |W + s B A| per output row (the L2 norm over the input dimension), tm the magnitude
 * tensor m came from. */
static int dora_init(struct load_ctx *c, struct ad_site_delta *d, const struct ad_tensor *tm,
                     const float *m)
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
        if (!isfinite(norm) || !isfinite(d->dora_k[o])) /* W + s B A overflows, or is 0 */
            return ad_err_set(c->err, -EINVAL, "tensor '%s': DoRA's factor m / |W + s B A| of "
                              "row %d is %g / %g, not finite", tm->name, o, (double)m[o],
                              sqrt(norm));
    }
    return 0;
}

/* Where the factors of each site go: one allocation owned by the adapter, in site order (a
 * layer's q, k, v, o, gate, up, down, each A then B). The forward reads one adapter's sites of
 * a layer one after the other (forward.c, post_item), so they become one sequential stream. */
struct arena {
    char *base;
    size_t *off; /* [n_sites]; SIZE_MAX: no factors planned for the site */
};

/* The module of a lora_A tensor (1), not a lora_A tensor (0), or a name too long (-EINVAL). */
static int a_module(const struct ad_tensor *t, char *module, size_t size)
{
    const char *key = ctx_strip(t->name);
    size_t n = strlen(key);
    if (n <= (size_t)LEN_A || strcmp(key + n - LEN_A, SUFFIX_A))
        return 0;
    if (n - LEN_A >= size)
        return -EINVAL;
    memcpy(module, key, n - LEN_A);
    module[n - LEN_A] = '\0';
    return 1;
}

/* The lora_B tensor that goes with lora_A tensor ta, marked as used if take, or NULL. */
static const struct ad_tensor *b_of(struct load_ctx *c, const struct ad_tensor *ta, bool take)
{
    char key[320];
    snprintf(key, sizeof(key), "%.*s.lora_B.weight", (int)strlen(ta->name) - LEN_A, ta->name);
    return take ? ctx_take(c, key) : ad_st_find(c->st, key);
}

/* I8 when the loader is asked to (AD_ADAPTER_LORA_INT8); else BF16 or F16 when both tensors
 * are (resident as the file stores them), else F32. */
static enum ad_lora_type type_of(const struct load_ctx *c, const struct ad_tensor *ta,
                                 const struct ad_tensor *tb)
{
    if (c->flags & AD_ADAPTER_LORA_INT8)
        return AD_LORA_I8;
    if (ta->dtype == AD_DTYPE_BF16 && tb->dtype == AD_DTYPE_BF16)
        return AD_LORA_BF16;
    if (ta->dtype == AD_DTYPE_F16 && tb->dtype == AD_DTYPE_F16)
        return AD_LORA_F16;
    return AD_LORA_F32;
}

static size_t elem_bytes(enum ad_lora_type t)
{
    return t == AD_LORA_F32 ? sizeof(float) : t == AD_LORA_I8 ? 1 : sizeof(uint16_t);
}

#define ROUND64(n) (((n) + 63) & ~(size_t)63)

/* A site's place in the arena: A, B's panels, then (I8) the scales of A's rows and of B's
 * columns; each part starts on a cache line. */
struct factor_layout {
    size_t bp, a_scale, b_scale, total; /* offsets from A's start, and the whole size */
};

static struct factor_layout factor_layout(int rank, int n_in, int n_out, enum ad_lora_type t)
{
    size_t panels = (size_t)(n_out + AD_LORA_PANEL - 1) / AD_LORA_PANEL, es = elem_bytes(t);
    struct factor_layout l;
    l.bp = ROUND64((size_t)rank * (size_t)n_in * es);
    l.a_scale = l.bp + ROUND64(panels * (size_t)rank * AD_LORA_PANEL * es);
    l.b_scale = l.a_scale + (t == AD_LORA_I8 ? (size_t)rank * sizeof(float) : 0);
    l.total = l.a_scale + (t == AD_LORA_I8 ? ROUND64(2 * (size_t)rank * sizeof(float)) : 0);
    return l;
}

/* Sizes the arena from the tensors' names and shapes before anything is loaded, so that the
 * factors are written once, in place. A tensor the loader will refuse may get no room. */
static int plan_arena(struct load_ctx *c, struct arena *ar)
{
    int n_sites = c->m->n_sites;
    size_t total = 0, *size = calloc((size_t)n_sites, sizeof(size_t));
    ar->off = malloc((size_t)n_sites * sizeof(size_t));
    if (!size || !ar->off) {
        free(size);
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *ta = ad_st_tensor(c->st, i), *tb;
        const struct ad_site *s;
        char module[256];
        if (a_module(ta, module, sizeof(module)) <= 0 || ta->n_dims != 2 ||
            ta->shape[0] < 1 || ta->shape[0] > AD_HOOK_LOCAL_TMP / AD_LORA_ROWS ||
            !(s = ad_model_find_site(c->m, module)) || !(tb = b_of(c, ta, false)))
            continue;
        size[s - c->m->sites] = factor_layout((int)ta->shape[0], s->n_in, s->n_out,
                                              type_of(c, ta, tb)).total;
    }
    for (int i = 0; i < n_sites; i++) {
        ar->off[i] = size[i] ? total : SIZE_MAX;
        total += size[i];
    }
    free(size);
    if (total && !(ar->base = ctx_alloc_bytes(c, total))) /* load_factors fills all */
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    return 0;
}

/* The scale of symmetric 8-bit quantization of v[i * stride], i < n (finite: ctx_check):
 * max |v| / 127 (0 for zeros). */
static float int8_scale(const float *v, size_t n, size_t stride)
{
    float amax = 0;
    for (size_t i = 0; i < n; i++) {
        float a = fabsf(v[i * stride]);
        amax = a > amax ? a : amax;
    }
    return amax / 127.0f;
}

/* v as an 8-bit integer of scale s: round(v / s), ties to even (|v| <= 127 s). */
static int8_t int8_of(float v, float s)
{
    float r = s > 0 ? v / s : 0;
    return (int8_t)lrintf(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}

/* Where element (o, k) of B [n_out, rank] goes in its panels (kernels.h). */
static size_t panel_index(int o, int k, int rank)
{
    return ((size_t)(o / AD_LORA_PANEL) * (size_t)rank + (size_t)k) * AD_LORA_PANEL +
           (size_t)(o % AD_LORA_PANEL);
}

/* A [rank, n_in] as the file has it and B [n_out, rank] packed in panels (kernels.h), into the
 * site's place in the arena: BF16 or F16 when both tensors are (resident exactly as stored,
 * half the bytes a batch of many adapters reads per step), I8 when asked (a scale per rank
 * component), else F32. */
static int load_factors(struct load_ctx *c, const struct arena *ar, struct ad_site_delta *d,
                        int rank, const struct ad_tensor *ta, const struct ad_tensor *tb)
{
    const struct ad_site *s = d->site;
    size_t off = ar->off[s - c->m->sites];
    int r;

    if ((r = ctx_check(c, ta, rank, s->n_in)) < 0 || (r = ctx_check(c, tb, s->n_out, rank)) < 0)
        return r;
    enum ad_lora_type type = type_of(c, ta, tb);
    bool half = type == AD_LORA_BF16 || type == AD_LORA_F16, i8 = type == AD_LORA_I8;
    if (off == SIZE_MAX) /* plan_arena skipped a tensor this function accepts: a bug */
        return ad_err_set(c->err, -EINVAL, "tensor '%s': no room planned for it", ta->name);
    struct factor_layout l = factor_layout(rank, s->n_in, s->n_out, type);
    size_t es = elem_bytes(type), n_a = (size_t)rank * (size_t)s->n_in;
    char *a = ar->base + off, *bp = a + l.bp;
    float *a_scale = i8 ? (float *)(void *)(a + l.a_scale) : NULL;
    float *b_scale = i8 ? (float *)(void *)(a + l.b_scale) : NULL;
    float *a32 = i8 ? malloc(n_a * sizeof(float)) : NULL;
    float *b32 = half ? NULL : malloc((size_t)tb->n_elems * sizeof(float));
    if ((i8 && !a32) || (!half && !b32)) {
        free(a32);
        free(b32);
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    }
    if (half)
        memcpy(a, ta->data, n_a * es);
    else
        ad_tensor_to_f32(ta, i8 ? a32 : (float *)(void *)a);
    if (b32)
        ad_tensor_to_f32(tb, b32);
    memset(bp, 0, l.a_scale - l.bp); /* B with the last panel's padding */
    if (i8) { /* a scale per rank component k: A's row k, B's column k */
        for (int k = 0; k < rank; k++) {
            const float *ak = a32 + (size_t)k * (size_t)s->n_in;
            a_scale[k] = int8_scale(ak, (size_t)s->n_in, 1);
            b_scale[k] = int8_scale(b32 + k, (size_t)s->n_out, (size_t)rank);
            int8_t *qa = (int8_t *)a + (size_t)k * (size_t)s->n_in;
            for (int i = 0; i < s->n_in; i++)
                qa[i] = int8_of(ak[i], a_scale[k]);
            for (int o = 0; o < s->n_out; o++)
                ((int8_t *)bp)[panel_index(o, k, rank)] =
                    int8_of(b32[(size_t)o * (size_t)rank + (size_t)k], b_scale[k]);
        }
    } else {
        for (int o = 0; o < s->n_out; o++)
            for (int k = 0; k < rank; k++) {
                size_t from = (size_t)o * (size_t)rank + (size_t)k, to = panel_index(o, k, rank);
                if (half)
                    memcpy((uint16_t *)(void *)bp + to, (const uint16_t *)tb->data + from,
                           sizeof(uint16_t));
                else
                    ((float *)(void *)bp)[to] = b32[from];
            }
    }
    free(a32);
    free(b32);
    d->lora = (struct ad_lora_factors){.rank = rank, .n_in = s->n_in, .n_out = s->n_out,
                                       .type = type, .a = a, .bp = bp, .a_scale = a_scale,
                                       .b_scale = b_scale};
    return 0;
}

static int load_module(struct load_ctx *c, const struct arena *ar, const char *module,
                       const struct ad_tensor *ta)
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
    const char *alpha_from = r ? "alpha_pattern" : "lora_alpha";
    /* compared as doubles: the config's value may be any number (1e308, 2.5) */
    if (ta->n_dims != 2 || (double)ta->shape[0] != rank)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': rank %lld, but the config says r = %g",
                          ta->name, (long long)(ta->n_dims == 2 ? ta->shape[0] : -1), rank);
    if (rank < 1 || rank > AD_HOOK_LOCAL_TMP / AD_LORA_ROWS) /* t fits a thread's work space */
        return ad_err_set(c->err, -EINVAL, "tensor '%s': rank %g out of range (1 to %d)", ta->name,
                          rank, AD_HOOK_LOCAL_TMP / AD_LORA_ROWS);

    struct ad_site_delta *d = ctx_delta(c, s);
    if (d->lora.a)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' appears twice", ta->name,
                          module);
    bool rs = json_is_true(json_object_get(cfg, "use_rslora"));
    d->scale = (float)(rs ? alpha / sqrt(rank) : alpha / rank);
    if (!isfinite(d->scale)) /* the float the forward multiplies by */
        return ad_err_set(c->err, -EINVAL, "adapter_config.json: module '%s': the scale %s / "
                          "%s = %g / %g is not finite as a float", module, alpha_from,
                          rs ? "sqrt(r)" : "r", alpha, rs ? sqrt(rank) : rank);
    const struct ad_tensor *tb = b_of(c, ta, true);
    if (!tb)
        return ad_err_set(c->err, -EINVAL, "tensor '%s' has no matching '%.*s.lora_B.weight'",
                          ta->name, (int)strlen(ta->name) - LEN_A, ta->name);
    if ((r = load_factors(c, ar, d, (int)rank, ta, tb)) < 0)
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
        if ((r = ctx_f32(c, tm, s->n_out, -1, &mag)) < 0 || (r = dora_init(c, d, tm, mag)) < 0)
            return r;
    }
    return 0;
}

static int load_modules(struct load_ctx *c, const struct arena *ar)
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
        char module[256];
        if (strstr(ctx_strip(t->name), "lora_embedding_"))
            return ad_err_set(c->err, -ENOTSUP, "tensor '%s': LoRA on embeddings is not "
                              "supported", t->name);
        if ((r = a_module(t, module, sizeof(module))) < 0)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': name too long", t->name);
        if (r) {
            c->used[i] = true;
            if ((r = load_module(c, ar, module, t)) < 0)
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
    struct arena ar = {0};
    int r = plan_arena(c, &ar);
    if (r == 0)
        r = load_modules(c, &ar);
    free(ar.off);
    return r;
}
