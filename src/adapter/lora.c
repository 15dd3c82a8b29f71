/* LoRA, rsLoRA and DoRA (PEFT "LORA"): y += s * B (A x), s = alpha / r or alpha / sqrt(r);
 * DoRA rescales each output row by k = m / |W + s B A|_row (bias not scaled). */
#include <cblas.h>
#include <errno.h>
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
            for (int r = 0; r < d->rank; r++)
                ba += (double)d->lora_b[(size_t)o * d->rank + r] *
                      (double)d->lora_a[(size_t)r * s->n_in + i];
            row[i] = (float)(w + d->scale * ba);
            norm += (double)row[i] * row[i];
        }
        d->dora_k[o] = (float)(m[o] / sqrt(norm));
    }
    return 0;
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
    if (rank < 1 || rank > AD_MIX_LOCAL_TMP) /* lora_row's A x fits a thread's work space */
        return ad_err_set(c->err, -EINVAL, "tensor '%s': rank %g out of range", ta->name, rank);

    struct ad_site_delta *d = ctx_delta(c, s);
    if (d->lora_a)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' appears twice", ta->name,
                          module);
    d->rank = (int)rank;
    bool rs = json_is_true(json_object_get(cfg, "use_rslora"));
    d->scale = (float)(rs ? alpha / sqrt(rank) : alpha / rank);
    if ((r = ctx_f32(c, ta, d->rank, s->n_in, &d->lora_a)) < 0)
        return r;
    snprintf(key, sizeof(key), "%.*s.lora_B.weight", (int)strlen(ta->name) - LEN_A, ta->name);
    const struct ad_tensor *tb = ctx_take(c, key);
    if (!tb)
        return ad_err_set(c->err, -EINVAL, "tensor '%s' has no matching '%s'", ta->name, key);
    if ((r = ctx_f32(c, tb, s->n_out, d->rank, &d->lora_b)) < 0)
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

int ad_lora_load(struct load_ctx *c)
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

/* Rows below this many go through lora_row; from it on, two sgemm calls per block of rows.
 * For one row, sgemm pays its setup per call (and 210 sites x 2 calls per decode step), and
 * OpenBLAS's sgemv runs a rank-16 A (16 x 576 = 9216 elements, its threshold) on two threads,
 * which costs more in wake-ups than the product itself. */
#define GEMM_MIN_ROWS AD_MIX_ROW_KERNEL_ROWS

/* Sum of a[i] * b[i], eight independent partial sums: the compiler vectorises it without
 * reassociating a single sum. */
static float dot(const float *a, const float *b, int n)
{
    float acc[8] = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; k++)
            acc[k] += a[i + k] * b[i + k];
    for (; i < n; i++)
        acc[0] += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* One row: t = scale * A x, then y += B t. t holds rank floats. */
static void lora_row(const struct ad_site_delta *d, float scale, const float *x, float *y,
                     float *t)
{
    const struct ad_site *s = d->site;
    for (int r = 0; r < d->rank; r++)
        t[r] = scale * dot(d->lora_a + (size_t)r * s->n_in, x, s->n_in);
    for (int o = 0; o < s->n_out; o++)
        y[o] += dot(d->lora_b + (size_t)o * d->rank, t, d->rank);
}

void ad_lora_apply(const struct ad_site_delta *d, float weight, const float *x, int ldx, float *y,
                   int ldy, int n, float *tmp, size_t tmp_len)
{
    const struct ad_site *s = d->site;
    float scale = weight * d->scale;
    int block = (int)(tmp_len / (size_t)d->rank);

    if (block < 1)
        block = 1; /* the forward's scratch always holds one row of any rank it allows */
    for (int r0 = 0; r0 < n; r0 += block) {
        int nb = n - r0 < block ? n - r0 : block;
        const float *xb = x + (size_t)r0 * ldx;
        float *yb = y + (size_t)r0 * ldy;
        if (nb < GEMM_MIN_ROWS) {
            for (int i = 0; i < nb; i++)
                lora_row(d, scale, xb + (size_t)i * ldx, yb + (size_t)i * ldy, tmp);
        } else {
            /* tmp = x A^T: [nb, rank]; y += scale * tmp B^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, d->rank, s->n_in, 1.0f, xb,
                        ldx, d->lora_a, s->n_in, 0.0f, tmp, d->rank);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nb, s->n_out, d->rank, scale,
                        tmp, d->rank, d->lora_b, d->rank, 1.0f, yb, ldy);
        }
        if (d->lora_bias)
            for (int i = 0; i < nb; i++)
                for (int j = 0; j < s->n_out; j++)
                    yb[(size_t)i * ldy + j] += scale * d->lora_bias[j];
    }
}
