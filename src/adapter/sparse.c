/* Sparse deltas (adapterd's "SPARSE" layout, README): what child-tuning of the full model
 * changed, as (indices, values) of each linear's weight, plus replacement biases and norms:
 *   base_model.model.<module>.weight.sparse_indices  I64 (or I32) [nnz], flat indices into the
 *                                                   checkpoint's tensor as stored ([out, in],
 *                                                   GPT-2's Conv1D [in, out])
 *   base_model.model.<module>.weight.sparse_values   F32/F16/BF16 [nnz], added to those elements
 *   base_model.model.<module>.bias, <norm>.weight/.bias   replacements (peft_io.c)
 * Held by output row (CSR), so y += x dW^T costs nnz multiply-adds per row. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SUFFIX_I ".weight.sparse_indices"
#define SUFFIX_V ".weight.sparse_values"

static int64_t index_at(const struct ad_tensor *t, size_t k)
{
    int64_t v;
    if (t->dtype == AD_DTYPE_I32) {
        int32_t w;
        memcpy(&w, (const char *)t->data + 4 * k, 4);
        return w;
    }
    memcpy(&v, (const char *)t->data + 8 * k, 8);
    return v;
}

static int load_site(struct load_ctx *c, const struct ad_tensor *ti, const char *module)
{
    char key[320];
    const struct ad_site *s = ad_model_find_site(c->m, module);
    if (!s)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': '%s' is not a linear layer of the model",
                          ti->name, module);
    snprintf(key, sizeof(key), "%.*s%s", (int)(strlen(ti->name) - strlen(SUFFIX_I)), ti->name,
             SUFFIX_V);
    const struct ad_tensor *tv = ctx_take(c, key);
    if (!tv)
        return ad_err_set(c->err, -EINVAL, "tensor '%s' has no matching '%s'", ti->name, key);
    if ((ti->dtype != AD_DTYPE_I64 && ti->dtype != AD_DTYPE_I32) || ti->n_dims != 1)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': indices are a vector of I64 or I32",
                          ti->name);
    int64_t nnz = ti->n_elems, total = (int64_t)s->n_in * s->n_out;
    float *val;
    int r = ctx_f32(c, tv, nnz, 0, &val);
    if (r < 0)
        return r;
    struct ad_site_delta *d = ctx_delta(c, s);
    if (d->sparse.nnz)
        return ad_err_set(c->err, -EINVAL, "tensor '%s': module '%s' appears twice", ti->name,
                          module);
    int32_t *row_ptr = ctx_alloc_bytes(c, ((size_t)s->n_out + 1) * sizeof(int32_t));
    int32_t *col = ctx_alloc_bytes(c, (size_t)(nnz ? nnz : 1) * sizeof(int32_t));
    float *v = ctx_alloc(c, (size_t)(nnz ? nnz : 1));
    if (!row_ptr || !col || !v)
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    memset(row_ptr, 0, ((size_t)s->n_out + 1) * sizeof(int32_t));
    for (int64_t k = 0; k < nnz; k++) { /* count per output row */
        int64_t i = index_at(ti, (size_t)k);
        if (i < 0 || i >= total)
            return ad_err_set(c->err, -EINVAL, "tensor '%s': index %lld is outside the %lld "
                              "elements of '%s'", ti->name, (long long)i, (long long)total,
                              module);
        int64_t o = s->w_in_out ? i % s->n_out : i / s->n_in;
        row_ptr[o + 1]++;
    }
    for (int o = 0; o < s->n_out; o++)
        row_ptr[o + 1] += row_ptr[o];
    int32_t *fill = calloc((size_t)s->n_out, sizeof(int32_t));
    if (!fill)
        return ad_err_set(c->err, -ENOMEM, "out of memory");
    for (int64_t k = 0; k < nnz; k++) {
        int64_t i = index_at(ti, (size_t)k);
        int64_t o = s->w_in_out ? i % s->n_out : i / s->n_in;
        int64_t in = s->w_in_out ? i / s->n_out : i % s->n_in;
        int32_t at = row_ptr[o] + fill[o]++;
        col[at] = (int32_t)in;
        v[at] = val[k];
    }
    free(fill);
    d->sparse = (struct ad_sparse_delta){.nnz = (int)nnz, .row_ptr = row_ptr, .col = col,
                                         .val = v};
    return 0;
}

static int ad_sparse_load(struct load_ctx *c)
{
    int r;
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++) {
        const struct ad_tensor *t = ad_st_tensor(c->st, i);
        const char *key = ctx_strip(t->name);
        size_t n = strlen(key), k = strlen(SUFFIX_I);
        char module[256];
        if (n <= k || strcmp(key + n - k, SUFFIX_I) || n - k >= sizeof(module))
            continue;
        memcpy(module, key, n - k);
        module[n - k] = '\0';
        c->used[i] = true;
        if ((r = load_site(c, t, module)) < 0)
            return r;
    }
    for (size_t i = 0; i < ad_st_n_tensors(c->st); i++)
        if (!c->used[i] && (r = ctx_replacement(c, ad_st_tensor(c->st, i))) < 0)
            return r;
    return 0;
}

void ad_sparse_apply(const struct ad_site_delta *d, const float *x, int ldx, float *y, int ldy,
                     int n)
{
    const struct ad_sparse_delta *sp = &d->sparse;
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * ldx;
        float *yr = y + (size_t)r * ldy;
        for (int o = 0; o < d->site->n_out; o++) {
            float acc = 0;
            for (int32_t k = sp->row_ptr[o]; k < sp->row_ptr[o + 1]; k++)
                acc += sp->val[k] * xr[sp->col[k]];
            yr[o] += acc;
        }
    }
}

const struct kind_ops ad_sparse_ops = {
    .kind = AD_ADAPTER_SPARSE,
    .name = "sparse",
    .peft_types = {"SPARSE"},
    .load = ad_sparse_load,
    .train = NULL,
};
