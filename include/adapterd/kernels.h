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

/* ==========================================================================================
 * Weight matrices
 *
 * The element types of a model's weight matrices: as the checkpoint stores them (F32, BF16,
 * F16: read in place from the mapped file, never widened into a copy), or 8-bit integers
 * quantized at load (I8, weight_dtype = int8) with a float scale per block of AD_WQ_BLOCK
 * consecutive elements of a row. The kernels widen each element to f32 as they read it, so the
 * arithmetic is f32's on the values the matrix holds. */
enum ad_wtype { AD_WT_F32, AD_WT_BF16, AD_WT_F16, AD_WT_I8 };

/* Elements of a row that share one I8 scale. */
#define AD_WQ_BLOCK 32

/* A weight matrix [rows, cols], row-major (row stride cols). An I8 element (r, c) is its
 * integer times scale[r * ceil(cols / AD_WQ_BLOCK) + c / AD_WQ_BLOCK]. */
struct ad_weight {
    enum ad_wtype type;
    int rows, cols;
    const void *data;
    const float *scale; /* I8: [rows, ceil(cols / AD_WQ_BLOCK)]; else NULL */
};

/* "F32", "BF16", "F16", "I8". */
static inline const char *ad_wtype_name(enum ad_wtype t)
{
    return t == AD_WT_F32 ? "F32" : t == AD_WT_BF16 ? "BF16" : t == AD_WT_F16 ? "F16" : "I8";
}

/* Bytes of one element (an I8 matrix's scales not counted), and of the whole matrix (counted). */
static inline size_t ad_wtype_size(enum ad_wtype t)
{
    return t == AD_WT_F32 ? 4 : t == AD_WT_I8 ? 1 : 2;
}

static inline size_t ad_weight_bytes(const struct ad_weight *w)
{
    size_t n = (size_t)w->rows * (size_t)w->cols * ad_wtype_size(w->type);
    if (w->type == AD_WT_I8)
        n += (size_t)w->rows * (((size_t)w->cols + AD_WQ_BLOCK - 1) / AD_WQ_BLOCK) * sizeof(float);
    return n;
}

/* Element (r, c) as a float (scale applied). For loading, tests and cold paths, not hot loops. */
static inline float ad_weight_at(const struct ad_weight *w, size_t r, size_t c)
{
    size_t i = r * (size_t)w->cols + c;
    switch (w->type) {
    case AD_WT_F32:
        return ((const float *)w->data)[i];
    case AD_WT_BF16:
        return ad_bf16_to_f32(((const uint16_t *)w->data)[i]);
    case AD_WT_F16:
        return ad_f16_to_f32(((const uint16_t *)w->data)[i]);
    default: {
        size_t nb = ((size_t)w->cols + AD_WQ_BLOCK - 1) / AD_WQ_BLOCK;
        return (float)((const int8_t *)w->data)[i] * w->scale[r * nb + c / AD_WQ_BLOCK];
    }
    }
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
    /* lora's two halves, for a pass that folds the deltas into its own product: t [n_x, rank]
     * = scale A x_m (I8: both scales folded in) for n_x <= AD_LORA_ROWS rows; then y_m[o] +=
     * (B t_m)[o] for outputs o in [o0, o1), o0 a multiple of AD_LORA_PANEL, o1 <= n_out. */
    void (*lora_a)(const struct ad_lora_factors *f, float scale, const float *x, int ldx, int n_x,
                   float *t);
    void (*lora_b)(const struct ad_lora_factors *f, int n_x, const float *t, float *y, int ldy,
                   int o0, int o1);
    /* Rows [r0, r1) and columns [c0, c1) of w as floats: row r at dst + (r - r0) ld. */
    void (*widen)(const struct ad_weight *w, int r0, int r1, int c0, int c1, float *dst,
                  size_t ld);
    /* y[m * ldy + j] = w_j . x_m for rows j in [j0, j1) of w (any type; [n_out, n_in]) and m in
     * [0, n_x), any n_x: the linears of decode passes. */
    void (*linear)(const struct ad_weight *w, const float *x, int ldx, int n_x, float *y, int ldy,
                   int j0, int j1);
    /* The same for w stored [n_in, n_out] (Conv1D): y[m * ldy + j] = sum_i w[i, j] x_m[i] for
     * columns j in [j0, j1). */
    void (*linear_t)(const struct ad_weight *w, const float *x, int ldx, int n_x, float *y,
                     int ldy, int j0, int j1);
};

/* The best set the CPU runs (or the one the environment variable ADAPTERD_KERNELS names: avx512,
 * avx2, c), chosen by the first call. Static; thread-safe; cheap after the first call. */
const struct ad_kernels *ad_kernels_get(void);
/* The set of that name, or NULL if this CPU (or build) cannot run it. Static; thread-safe. */
const struct ad_kernels *ad_kernels_named(const char *name);
