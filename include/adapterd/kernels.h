/* adapterd: the vector kernels of the forward pass and of the adapters' deltas (kernels.c in
 * src/model): matrix-vector products for small batches, decode attention over runs of cached
 * positions, exp for softmax and SiLU, and LoRA on a few rows. Each exists as AVX-512, AVX2 with
 * FMA and plain C, picked once at run time. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/safetensors.h"

/* Linears over at most this many rows run on the matvec kernel (the forward's passes, the
 * bottleneck adapters of a decode group); more rows go to OpenBLAS's sgemm, which packs and
 * blocks for reuse, but whose setup costs more than a product of a few rows. */
#define AD_MATVEC_MAX_ROWS 4

/* Outputs per panel of a packed LoRA B. */
#define AD_LORA_PANEL 16
/* Rows one call of the LoRA kernel takes at most. */
#define AD_LORA_ROWS 4

/* The element types of LoRA factors: float, 16-bit exactly as a BF16 or F16 file stores them
 * (BF16: the upper half of a float; F16: IEEE half), or 8-bit integers with a scale per rank
 * component: per row of A and per column of B (quantized at load, lora_dtype = int8: a quarter
 * of F32's bytes; the kernel folds both scales into t = A x, so B t costs what it does in F32). */
enum ad_lora_type { AD_LORA_F32, AD_LORA_BF16, AD_LORA_F16, AD_LORA_I8 };

/* LoRA factors as the kernel reads them. B is packed in panels of AD_LORA_PANEL
 * outputs, so that the kernel reads it as one sequential stream: element (o, r) of B [n_out,
 * rank] is at ((o / PANEL) * rank + r) * PANEL + o % PANEL, and the last panel is zero-padded.
 * An I8 element is its integer times the scale of its rank component r: a_scale[r] for A's row
 * r, b_scale[r] for B's column r. */
struct ad_lora_factors {
    int rank, n_in, n_out;
    enum ad_lora_type type;
    const void *a;        /* [rank, n_in], row-major */
    const void *bp;       /* [ceil(n_out / PANEL), rank, PANEL] */
    const float *a_scale; /* I8: [rank]; else NULL */
    const float *b_scale; /* I8: [rank]; else NULL */
};

/* Element i of a factor as stored, as a float (an I8 element without its scale). For loading,
 * export and tests, not for hot loops. */
static inline float ad_lora_elem(const void *w, size_t i, enum ad_lora_type t)
{
    if (t == AD_LORA_F32)
        return ((const float *)w)[i];
    if (t == AD_LORA_I8)
        return (float)((const int8_t *)w)[i];
    uint16_t h = ((const uint16_t *)w)[i];
    return t == AD_LORA_F16 ? ad_f16_to_f32(h) : ad_bf16_to_f32(h);
}

/* Element (r, i) of A and (o, r) of B, scales applied. */
static inline float ad_lora_a_at(const struct ad_lora_factors *f, int r, int i)
{
    float v = ad_lora_elem(f->a, (size_t)r * (size_t)f->n_in + (size_t)i, f->type);
    return f->a_scale ? v * f->a_scale[r] : v;
}

static inline float ad_lora_b_at(const struct ad_lora_factors *f, int o, int r)
{
    float v = ad_lora_elem(f->bp, ((size_t)(o / AD_LORA_PANEL) * (size_t)f->rank + (size_t)r) *
                                          AD_LORA_PANEL + (size_t)(o % AD_LORA_PANEL), f->type);
    return f->b_scale ? v * f->b_scale[r] : v;
}

struct ad_kernels {
    const char *name; /* "avx512", "avx2", "c" */
    /* y[m * ldy + j] = w[j] . x[m * ldx] for rows j in [j0, j1) of w [n_out, n_in] (row-major)
     * and m in [0, n_x): a matrix-vector product for a few vectors at once. */
    void (*matvec)(const float *w, int n_in, const float *x, int ldx, int n_x, float *y, int ldy,
                   int j0, int j1);
    /* x[i] = exp(x[i] - sub) for i in [0, n); returns the sum. */
    float (*exp_sum)(float *x, int n, float sub);
    /* a[i] *= silu(g[i]), or a[i] = silu(a[i]) when g is NULL. */
    void (*silu_mul)(float *a, const float *g, size_t n);
    /* Decode attention over a run of n positions for g query heads that share one KV head:
     * q [g, hd] (one head after another), keys and values at rows k + i ld and v + i ld. Scores
     * are scale q.k; each head's online softmax state is updated: its running maximum mx[h]
     * and sum[h] (start: -INFINITY and 0) and its unnormalized output out [g, hd] (start: 0).
     * Calling it run after run gives the softmax over all of them (divide out by sum). */
    void (*attn)(const float *q, int g, int hd, const float *k, const float *v, size_t ld, int n,
                 float scale, float *mx, float *sum, float *out);
    /* LoRA on n_x <= AD_LORA_ROWS rows: y_m += B (scale A x_m) for m in [0, n_x), x_m at
     * x + m ldx [n_in], y_m at y + m ldy [n_out]. t is work space of n_x * rank floats. */
    void (*lora)(const struct ad_lora_factors *f, float scale, const float *x, int ldx, int n_x,
                 float *y, int ldy, float *t);
};

/* The best set the CPU runs (or the one the environment variable ADAPTERD_KERNELS names: avx512,
 * avx2, c), chosen by the first call. Static; thread-safe; cheap after the first call. */
const struct ad_kernels *ad_kernels_get(void);
/* The set of that name, or NULL if this CPU (or build) cannot run it. Static; thread-safe. */
const struct ad_kernels *ad_kernels_named(const char *name);
