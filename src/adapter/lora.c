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
static int pattern_value(json_t *cfg, const char *field, const char *module, double *ret,
                         struct ad_err *err)
{
    json_t *obj = json_object_get(cfg, field), *v;
    const char *k;
    if (!json_is_object(obj))
        return 0;
    json_object_foreach(obj, k, v) {
        char re[512];
        snprintf(re, sizeof(re), "(.*\\.)?(%s)$", k);
        int r = ctx_regex_match(re, module, false, err);
        if (r < 0)
            return r;
        if (r) {
            if (!json_is_number(v))
                return ad_err_set(err, -EINVAL, "adapter_config.json: %s['%s'] is not a "
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
    r = ctx_targeted(json_object_get(cfg, "target_modules"), module, true, c->err);
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
    if ((r = pattern_value(cfg, "rank_pattern", module, &rank, c->err)) < 0 ||
        (r = pattern_value(cfg, "alpha_pattern", module, &alpha, c->err)) < 0)
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

/* DoRA, on y = W x + b_base: y = k (W x + scale B A x) + b, b the bias in effect. PEFT
 * (lora/dora.py, DoraLinearLayer.forward) subtracts base_layer.bias, which under bias="all" is
 * the replacement, and adds it back unscaled; here the base's bias is what y holds. */
void ad_dora_apply(const struct ad_site_delta *d, float weight, const float *x, int ldx, float *y,
                   int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_site *s = d->site;
    const float *b = ad_bias_of(d);
    for (int i = 0; s->b && i < n; i++)
        for (int j = 0; j < s->n_out; j++)
            y[(size_t)i * ldy + j] -= s->b[j];
    ad_lora_apply(d, weight, x, ldx, y, ldy, n, tmp, tmp_len);
    for (int i = 0; i < n; i++) {
        float *row = y + (size_t)i * ldy;
        for (int j = 0; j < s->n_out; j++)
            row[j] = row[j] * d->dora_k[j] + (b ? b[j] : 0.0f);
    }
}

static int ad_lora_load(struct load_ctx *c)
{
    struct arena ar = {0};
    int r = plan_arena(c, &ar);
    if (r == 0)
        r = load_modules(c, &ar);
    free(ar.off);
    return r;
}

/* ==========================================================================================
 * Training: the factors as f32 parameters, forward and backward over a training batch
 * (model.h's training hooks). y += s B (A d(x)), d: dropout (training only); DoRA: y = k (W x +
 * s B A x) + b with k = m / |W + s B A|_row, the norm held constant in the backward, as PEFT
 * does (lora/dora.py: weight_norm.detach()). bias="all" trains every base bias as a
 * replacement, modules_to_save whole modules. */

struct lora_tsite {
    int rank;
    float scale;
    float *a, *ga, *b, *gb;     /* [rank, n_in], [n_out, rank] (or NULL: not adapted) */
    float *mag, *gmag, *norm;   /* DoRA: [n_out] magnitude, its gradient, |W + s B A| */
    float *b_new, *gb_new;      /* a replacement bias (bias="all"), or NULL */
    float *w_new, *gw_new;      /* modules_to_save: the module's weight [n_out, n_in] */
};

struct lora_train {
    struct lora_tsite *site;    /* [n_sites] */
    int n_sites;
    float **norm_b, **norm_gb;  /* [2 n_layer + 1] (norm_index): replacement norm biases */
    double dropout;
    float *t, *dt, *xd, *u;     /* work space, grown on demand */
    size_t t_cap, xd_cap, u_cap;
};

static int norm_index(const struct ad_model *m, int layer, enum ad_norm_slot slot)
{
    return slot == AD_NORM_FINAL ? 2 * m->cfg.n_layer : 2 * layer + (int)slot;
}

static float *grow(float **p, size_t *cap, size_t n)
{
    if (n > *cap) {
        free(*p);
        *p = malloc(n * sizeof(float));
        *cap = *p ? n : 0;
    }
    return *p;
}

/* x with dropout (each element kept with probability 1 - p, kept ones scaled by 1 / (1 - p)),
 * the same mask in the forward and the backward of a batch: into the work space. */
static const float *dropped(struct ad_trainable *t, struct lora_train *lt, const struct ad_site *s,
                            const float *x, int ldx, int n)
{
    if (!t->train || lt->dropout <= 0)
        return x;
    float *xd = grow(&lt->xd, &lt->xd_cap, (size_t)n * (size_t)s->n_in);
    uint64_t key = tr_stream(t, (uint64_t)(s - t->m->sites));
    float keep = (float)(1 / (1 - lt->dropout));
    for (int r = 0; r < n; r++)
        for (int i = 0; i < s->n_in; i++) {
            size_t e = (size_t)r * (size_t)s->n_in + (size_t)i;
            xd[e] = ad_unit(ad_splitmix64(key + e)) >= lt->dropout ? x[(size_t)r * ldx + i] * keep
                                                                  : 0;
        }
    return xd;
}

/* W as [n_out, n_in] element (o, i), whichever way the site stores it. */
static float w_at(const struct ad_site *s, int o, int i)
{
    return s->w_in_out ? s->w[(size_t)i * s->n_out + o] : s->w[(size_t)o * s->n_in + i];
}

/* DoRA: |W + s B A| per output row, for this batch's factors. */
static void dora_norms(const struct ad_site *s, struct lora_tsite *ls)
{
    for (int o = 0; o < s->n_out; o++) {
        double sum = 0;
        for (int i = 0; i < s->n_in; i++) {
            double v = w_at(s, o, i);
            for (int k = 0; k < ls->rank; k++)
                v += (double)ls->scale * ls->b[(size_t)o * ls->rank + k] *
                     ls->a[(size_t)k * s->n_in + i];
            sum += v * v;
        }
        ls->norm[o] = (float)sqrt(sum);
    }
}

static void lora_t_site_post(const void *ctx, const struct ad_site *s, const float *x, int ldx,
                             bool x_scaled, float *y, int ldy, int n, float *tmp, size_t tmp_len)
{
    struct ad_trainable *t = (void *)ctx; /* a training ctx is mutable: its work space */
    struct lora_train *lt = t->priv;
    struct lora_tsite *ls = &lt->site[s - t->m->sites];
    (void)x_scaled, (void)tmp, (void)tmp_len;
    if (ls->w_new) { /* modules_to_save: y = x W'^T + b' */
        ad_train_sgemm(false, true, n, s->n_out, s->n_in, 1.0f, x, ldx, ls->w_new, s->n_in, 0.0f,
                       y, ldy);
        const float *b = ls->b_new ? ls->b_new : s->b;
        for (int r = 0; b && r < n; r++)
            for (int j = 0; j < s->n_out; j++)
                y[(size_t)r * ldy + j] += b[j];
        return;
    }
    const float *b_eff = ls->b_new ? ls->b_new : s->b;
    if (ls->mag) { /* DoRA: y = k (y - b_base + s B A x) + b_eff */
        dora_norms(s, ls);
        for (int r = 0; s->b && r < n; r++)
            for (int j = 0; j < s->n_out; j++)
                y[(size_t)r * ldy + j] -= s->b[j];
    } else if (ls->b_new) {
        for (int r = 0; r < n; r++)
            for (int j = 0; j < s->n_out; j++)
                y[(size_t)r * ldy + j] += ls->b_new[j] - (s->b ? s->b[j] : 0.0f);
    }
    if (ls->a) {
        const float *xd = dropped(t, lt, s, x, ldx, n);
        int ldd = xd == x ? ldx : s->n_in;
        float *tt = grow(&lt->t, &lt->t_cap, (size_t)n * (size_t)ls->rank);
        ad_train_sgemm(false, true, n, ls->rank, s->n_in, 1.0f, xd, ldd, ls->a, s->n_in, 0.0f,
                       tt, ls->rank);
        ad_train_sgemm(false, true, n, s->n_out, ls->rank, ls->scale, tt, ls->rank, ls->b,
                       ls->rank, 1.0f, y, ldy);
    }
    if (ls->mag)
        for (int r = 0; r < n; r++)
            for (int j = 0; j < s->n_out; j++) {
                float *v = &y[(size_t)r * ldy + j];
                *v = *v * (ls->mag[j] / ls->norm[j]) + (b_eff ? b_eff[j] : 0.0f);
            }
}

static bool lora_t_wants_yb(const void *ctx, const struct ad_site *s)
{
    const struct ad_trainable *t = ctx;
    const struct lora_train *lt = t->priv;
    return lt->site[s - t->m->sites].mag != NULL;
}

static bool lora_t_site_post_grad(void *ctx, const struct ad_site *s, const float *x, int ldx,
                                  const float *yb, float *dy, int ldy, float *dx, int lddx, int n)
{
    struct ad_trainable *t = ctx;
    struct lora_train *lt = t->priv;
    struct lora_tsite *ls = &lt->site[s - t->m->sites];
    if (ls->w_new) { /* the replaced module: dW' = dy^T x, db' = sum dy, dx += dy W' */
        ad_train_sgemm(true, false, s->n_out, s->n_in, n, 1.0f, dy, ldy, x, ldx, 1.0f, ls->gw_new,
                       s->n_in);
        for (int r = 0; ls->gb_new && r < n; r++)
            for (int j = 0; j < s->n_out; j++)
                ls->gb_new[j] += dy[(size_t)r * ldy + j];
        ad_train_sgemm(false, false, n, s->n_in, s->n_out, 1.0f, dy, ldy, ls->w_new, s->n_in,
                       1.0f, dx, lddx);
        return false;
    }
    for (int r = 0; ls->gb_new && r < n; r++) /* the bias in effect: its gradient is dy's */
        for (int j = 0; j < s->n_out; j++)
            ls->gb_new[j] += dy[(size_t)r * ldy + j];
    if (!ls->a)
        return true;
    const float *xd = dropped(t, lt, s, x, ldx, n);
    int ldd = xd == x ? ldx : s->n_in;
    float *tt = grow(&lt->t, &lt->t_cap, 2 * (size_t)n * (size_t)ls->rank);
    float *dt = tt + (size_t)n * (size_t)ls->rank;
    ad_train_sgemm(false, true, n, ls->rank, s->n_in, 1.0f, xd, ldd, ls->a, s->n_in, 0.0f, tt,
                   ls->rank);
    if (ls->mag) {
        /* u = yb - b + s t B^T; dm += sum dy u / norm; then dy <- dy k (the gradient of u,
         * which flows to W x and to the LoRA path) */
        float *u = grow(&lt->u, &lt->u_cap, (size_t)n * (size_t)s->n_out);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < s->n_out; j++)
                u[(size_t)r * s->n_out + j] = yb[(size_t)r * s->n_out + j] - (s->b ? s->b[j] : 0);
        ad_train_sgemm(false, true, n, s->n_out, ls->rank, ls->scale, tt, ls->rank, ls->b,
                       ls->rank, 1.0f, u, s->n_out);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < s->n_out; j++) {
                float *d = &dy[(size_t)r * ldy + j];
                ls->gmag[j] += *d * u[(size_t)r * s->n_out + j] / ls->norm[j];
                *d *= ls->mag[j] / ls->norm[j];
            }
    }
    /* dB += s dy^T t; dt = s dy B; dA += dt^T d(x); dx += d'(dt A) */
    ad_train_sgemm(true, false, s->n_out, ls->rank, n, ls->scale, dy, ldy, tt, ls->rank, 1.0f,
                   ls->gb, ls->rank);
    ad_train_sgemm(false, false, n, ls->rank, s->n_out, ls->scale, dy, ldy, ls->b, ls->rank,
                   0.0f, dt, ls->rank);
    ad_train_sgemm(true, false, ls->rank, s->n_in, n, 1.0f, dt, ls->rank, xd, ldd, 1.0f, ls->ga,
                   s->n_in);
    if (xd == x) {
        ad_train_sgemm(false, false, n, s->n_in, ls->rank, 1.0f, dt, ls->rank, ls->a, s->n_in,
                       1.0f, dx, lddx);
    } else { /* through the dropout: the same mask and scale */
        float *g = (float *)xd; /* spent: reuse its space for d(dropped x) */
        ad_train_sgemm(false, false, n, s->n_in, ls->rank, 1.0f, dt, ls->rank, ls->a, s->n_in,
                       0.0f, g, s->n_in);
        uint64_t key = tr_stream(t, (uint64_t)(s - t->m->sites));
        float keep = (float)(1 / (1 - lt->dropout));
        for (int r = 0; r < n; r++)
            for (int i = 0; i < s->n_in; i++) {
                size_t e = (size_t)r * (size_t)s->n_in + (size_t)i;
                if (ad_unit(ad_splitmix64(key + e)) >= lt->dropout)
                    dx[(size_t)r * lddx + i] += g[e] * keep;
            }
    }
    return true;
}

static void lora_t_norm(const void *ctx, int layer, enum ad_norm_slot slot, const float **w,
                        const float **b)
{
    const struct ad_trainable *t = ctx;
    const struct lora_train *lt = t->priv;
    (void)w;
    float *nb = lt->norm_b[norm_index(t->m, layer, slot)];
    if (nb)
        *b = nb;
}

static void lora_t_norm_grad(void *ctx, int layer, enum ad_norm_slot slot, const float *dw,
                             const float *db)
{
    struct ad_trainable *t = ctx;
    struct lora_train *lt = t->priv;
    (void)dw;
    float *g = lt->norm_gb[norm_index(t->m, layer, slot)];
    for (int i = 0; g && db && i < t->m->cfg.n_embd; i++)
        g[i] += db[i];
}

static const struct ad_hooks lora_train_hooks = {
    .norm = lora_t_norm,
    .site_post = lora_t_site_post,
    .norm_grad = lora_t_norm_grad,
    .site_wants_yb = lora_t_wants_yb,
    .site_post_grad = lora_t_site_post_grad,
};

static void lora_t_free(void *priv)
{
    struct lora_train *lt = priv;
    if (!lt)
        return;
    for (int i = 0; lt->site && i < lt->n_sites; i++)
        free(lt->site[i].norm);
    free(lt->site);
    free(lt->norm_b);
    free(lt->norm_gb);
    free(lt->t);
    free(lt->xd);
    free(lt->u);
    free(lt);
}

/* A module listed in modules_to_save: a list of names matched as PEFT does (the module's path
 * or a suffix after a dot). */
static int in_modules_to_save(json_t *list, const char *path, struct ad_err *err)
{
    if (!list || json_is_null(list))
        return 0;
    if (!json_is_array(list))
        return ad_err_set(err, -EINVAL, "adapter config: modules_to_save must be a list");
    return ctx_targeted(list, path, true, err);
}

static int lora_t_init(struct ad_trainable *t, json_t *cfg, const int32_t *ids, int n_ids,
                       struct ad_err *err)
{
    const struct ad_model *m = t->m;
    struct lora_train *lt = calloc(1, sizeof(*lt));
    char name[224];
    (void)ids, (void)n_ids;
    if (!lt)
        return ad_err_set(err, -ENOMEM, "out of memory");
    t->priv = lt;
    lt->site = calloc((size_t)m->n_sites, sizeof(*lt->site));
    lt->n_sites = m->n_sites;
    lt->norm_b = calloc(2 * (size_t)m->cfg.n_layer + 1, sizeof(float *));
    lt->norm_gb = calloc(2 * (size_t)m->cfg.n_layer + 1, sizeof(float *));
    if (!lt->site || !lt->norm_b || !lt->norm_gb)
        return ad_err_set(err, -ENOMEM, "out of memory");

    for (size_t i = 0; i < sizeof(unsupported) / sizeof(unsupported[0]); i++)
        if (is_set(json_object_get(cfg, unsupported[i])))
            return ad_err_set(err, -ENOTSUP, "adapter config: '%s' is not supported",
                              unsupported[i]);
    json_t *init = json_object_get(cfg, "init_lora_weights");
    bool gaussian = json_is_string(init) && !strcmp(json_string_value(init), "gaussian");
    if (init && !json_is_boolean(init) && !gaussian)
        return ad_err_set(err, -ENOTSUP, "adapter config: init_lora_weights must be true, false "
                          "or \"gaussian\" to train");
    json_t *targets = json_object_get(cfg, "target_modules");
    if (!targets || json_is_null(targets)) { /* PEFT's default per architecture */
        targets = m->cfg.family == AD_FAMILY_GPT2 ? json_pack("[s]", "c_attn")
                                                  : json_pack("[s, s]", "q_proj", "v_proj");
        json_object_set_new(cfg, "target_modules", targets);
    }
    json_t *dr = json_object_get(cfg, "lora_dropout");
    lt->dropout = json_is_number(dr) ? json_number_value(dr) : 0;
    if (!(lt->dropout >= 0 && lt->dropout < 1))
        return ad_err_set(err, -EINVAL, "adapter config: lora_dropout must be in [0, 1)");
    bool dora = json_is_true(json_object_get(cfg, "use_dora"));
    bool rs = json_is_true(json_object_get(cfg, "use_rslora"));
    if (dora && lt->dropout > 0)
        return ad_err_set(err, -ENOTSUP, "adapter config: use_dora with lora_dropout > 0 is not "
                          "supported for training (set lora_dropout 0)");
    const char *bias = json_string_value(json_object_get(cfg, "bias"));
    bias = bias ? bias : "none";
    if (strcmp(bias, "none") && strcmp(bias, "all") && strcmp(bias, "lora_only"))
        return ad_err_set(err, -EINVAL, "adapter config: bias must be \"none\", \"all\" or "
                          "\"lora_only\"");
    json_t *mts = json_object_get(cfg, "modules_to_save");

    for (int si = 0; si < m->n_sites; si++) {
        const struct ad_site *s = &m->sites[si];
        struct lora_tsite *ls = &lt->site[si];
        int r = tr_targeted(t, targets, s, err), keep;
        if (r < 0 || (keep = in_modules_to_save(mts, s->path, err)) < 0)
            return r < 0 ? r : keep;
        if (r && s->layer >= 0 && !in_layers(json_object_get(cfg, "layers_to_transform"), s->layer))
            r = 0;
        if (r && keep)
            return ad_err_set(err, -EINVAL, "adapter config: module '%s' is both targeted and in "
                              "modules_to_save", s->path);
        struct ad_param *p;
        if (keep) {
            if (s->w_in_out)
                return ad_err_set(err, -ENOTSUP, "adapter config: modules_to_save of a Conv1D "
                                  "module ('%s') is not supported", s->path);
            snprintf(name, sizeof(name), "base_model.model.%s.weight", s->path);
            if (!(p = tr_add(t, name, 2, s->n_out, s->n_in, true, true, err)))
                return -ENOMEM;
            memcpy(p->w, s->w, p->n * sizeof(float));
            ls->w_new = p->w;
            ls->gw_new = p->g;
            if (s->b) {
                snprintf(name, sizeof(name), "base_model.model.%s.bias", s->path);
                if (!(p = tr_add(t, name, 1, s->n_out, 0, false, true, err)))
                    return -ENOMEM;
                memcpy(p->w, s->b, p->n * sizeof(float));
                ls->b_new = p->w;
                ls->gb_new = p->g;
            }
            continue;
        }
        if (s->b && (!strcmp(bias, "all") || (r && !strcmp(bias, "lora_only")))) {
            snprintf(name, sizeof(name), "base_model.model.%s.%s", s->path,
                     r ? "base_layer.bias" : "bias");
            if (!(p = tr_add(t, name, 1, s->n_out, 0, false, true, err)))
                return -ENOMEM;
            memcpy(p->w, s->b, p->n * sizeof(float));
            ls->b_new = p->w;
            ls->gb_new = p->g;
        }
        if (!r)
            continue;
        double rank = json_is_integer(json_object_get(cfg, "r"))
                          ? (double)json_integer_value(json_object_get(cfg, "r")) : 8;
        double alpha = json_is_number(json_object_get(cfg, "lora_alpha"))
                           ? json_number_value(json_object_get(cfg, "lora_alpha")) : 8;
        if ((r = pattern_value(cfg, "rank_pattern", s->path, &rank, err)) < 0 ||
            (r = pattern_value(cfg, "alpha_pattern", s->path, &alpha, err)) < 0)
            return r;
        if (!(rank >= 1 && rank <= AD_HOOK_LOCAL_TMP / AD_LORA_ROWS))
            return ad_err_set(err, -EINVAL, "adapter config: r = %g for '%s' is out of range (1 "
                              "to %d)", rank, s->path, AD_HOOK_LOCAL_TMP / AD_LORA_ROWS);
        ls->rank = (int)rank;
        ls->scale = (float)(rs ? alpha / sqrt(rank) : alpha / rank);
        if (!isfinite(ls->scale))
            return ad_err_set(err, -EINVAL, "adapter config: lora_alpha / r is not finite");
        snprintf(name, sizeof(name), "base_model.model.%s.lora_A.weight", s->path);
        if (!(p = tr_add(t, name, 2, ls->rank, s->n_in, true, true, err)))
            return -ENOMEM;
        if (json_is_false(init))
            tr_uniform(t, p, 1.0 / sqrt((double)s->n_in));
        else if (gaussian)
            tr_normal(t, p, 1.0 / rank);
        else /* kaiming_uniform_(a = sqrt(5)): bound = gain sqrt(3 / fan_in) = 1 / sqrt(fan_in) */
            tr_uniform(t, p, 1.0 / sqrt((double)s->n_in));
        ls->a = p->w;
        ls->ga = p->g;
        snprintf(name, sizeof(name), "base_model.model.%s.lora_B.weight", s->path);
        if (!(p = tr_add(t, name, 2, s->n_out, ls->rank, true, true, err)))
            return -ENOMEM;
        if (json_is_false(init))
            tr_uniform(t, p, 1.0 / sqrt(rank));
        ls->b = p->w; /* zeros: the adapter starts as the base */
        ls->gb = p->g;
        if (dora) {
            snprintf(name, sizeof(name), "base_model.model.%s.lora_magnitude_vector", s->path);
            if (!(p = tr_add(t, name, 1, s->n_out, 0, true, true, err)))
                return -ENOMEM;
            ls->mag = p->w;
            ls->gmag = p->g;
            ls->norm = calloc((size_t)s->n_out, sizeof(float));
            if (!ls->norm)
                return ad_err_set(err, -ENOMEM, "out of memory");
            dora_norms(s, ls); /* m = |W + s B A| (B = 0: |W|) */
            memcpy(ls->mag, ls->norm, (size_t)s->n_out * sizeof(float));
        }
    }
    if (json_is_string(targets) && !strcmp(json_string_value(targets), "all-linear")) {
        /* saved as PEFT saves it: the modules' names it resolved to */
        json_t *names = json_array();
        for (int si = 0; si < m->n_sites; si++) {
            const char *dot = strrchr(m->sites[si].path, '.');
            const char *leaf = dot ? dot + 1 : m->sites[si].path;
            bool seen = false;
            for (size_t k = 0; k < json_array_size(names) && !seen; k++)
                seen = !strcmp(json_string_value(json_array_get(names, k)), leaf);
            if (lt->site[si].a && !seen)
                json_array_append_new(names, json_string(leaf));
        }
        json_object_set_new(cfg, "target_modules", names);
    }
    if (!strcmp(bias, "all") && m->final_norm_b) { /* LayerNorm biases too (GPT-2) */
        for (int k = 0; k <= 2 * m->cfg.n_layer; k++) {
            bool fin = k == 2 * m->cfg.n_layer;
            const struct ad_layer *L = fin ? NULL : &m->layers[k / 2];
            const float *b = fin ? m->final_norm_b : k % 2 ? L->norm2_b : L->norm1_b;
            char mod[128];
            struct ad_param *p;
            ad_model_norm_path(m, fin ? -1 : k / 2, fin ? AD_NORM_FINAL : (enum ad_norm_slot)(k % 2),
                               mod, sizeof(mod));
            snprintf(name, sizeof(name), "base_model.model.%s.bias", mod);
            if (!(p = tr_add(t, name, 1, m->cfg.n_embd, 0, false, false, err)))
                return -ENOMEM;
            memcpy(p->w, b, p->n * sizeof(float));
            lt->norm_b[k] = p->w;
            lt->norm_gb[k] = p->g;
        }
    }
    return 0;
}

static const struct train_kind ad_lora_train = {
    .kind = AD_ADAPTER_LORA,
    .init = lora_t_init,
    .hooks = &lora_train_hooks,
    .free = lora_t_free,
};

const struct kind_ops ad_lora_ops = {
    .kind = AD_ADAPTER_LORA,
    .name = "lora",
    .peft_types = {"LORA"},
    .load = ad_lora_load,
    .train = &ad_lora_train,
};
