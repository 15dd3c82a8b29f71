/* Vector kernels of the forward pass: matrix-vector products for small batches, the dot
 * products and sums of decode attention, exp for softmax and SiLU, and the LoRA deltas of a
 * few rows (include/adapterd/kernels.h).
 *
 * The project is built for baseline x86-64 (SSE2), so each kernel exists in three builds,
 * picked once at run time: AVX-512, AVX2 with FMA, and plain C for any other CPU (or another
 * architecture). The environment variable ADAPTERD_KERNELS=avx512|avx2|c forces one (tests,
 * benchmarks); a build the CPU cannot run is never picked.
 *
 * exp is a Cephes-style polynomial: range reduction by ln 2, a degree-5 polynomial, relative
 * error about 2e-7 over the clamped range [-87.3, 88.4]. Outside it the result saturates (about
 * 1e-38 and 2e38), which SiLU and softmax do not notice; NaN stays NaN. */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define AD_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define AD_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define AD_AVX512BF16 __attribute__((target("avx512f,avx512bf16,avx2,fma,f16c")))
#define AD_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#define EXP_LO -87.3365448f /* exp(EXP_LO) is still a normal float */
#define EXP_HI 88.3762627f  /* round(EXP_HI * log2(e)) = 127: 2^n stays finite */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f /* ln 2 = LN2_HI + LN2_LO, LN2_HI exact in few bits */
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

/* ==========================================================================================
 * Plain C */

static void matvec_c(const float *w, int n_in, const float *x, int ldx, int n_x, float *y,
                     int ldy, int j0, int j1)
{
    for (int j = j0; j < j1; j++) {
        const float *wj = w + (size_t)j * (size_t)n_in;
        for (int m = 0; m < n_x; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int i = 0;
            for (; i + 4 <= n_in; i += 4) {
                s0 += wj[i] * xm[i];
                s1 += wj[i + 1] * xm[i + 1];
                s2 += wj[i + 2] * xm[i + 2];
                s3 += wj[i + 3] * xm[i + 3];
            }
            for (; i < n_in; i++)
                s0 += wj[i] * xm[i];
            y[(size_t)m * (size_t)ldy + j] = (s0 + s1) + (s2 + s3);
        }
    }
}

static float dot_c(const float *a, const float *b, int n)
{
    float s = 0;
    for (int i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static void axpy_c(float a, const float *x, float *y, int n)
{
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

static float exp_sum_c(float *x, int n, float sub)
{
    float sum = 0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - sub);
        sum += x[i];
    }
    return sum;
}

static void silu_mul_c(float *a, const float *g, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float v = g ? g[i] : a[i];
        float s = v / (1.0f + expf(-v));
        a[i] = g ? a[i] * s : s;
    }
}

static void lora_a_c(const struct ad_lora_factors *f, float scale, const float *x, int ldx,
                     int n_x, float *t)
{
    for (int m = 0; m < n_x; m++) {
        const float *xm = x + (size_t)m * (size_t)ldx;
        for (int r = 0; r < f->rank; r++) {
            float s = 0;
            for (int i = 0; i < f->n_in; i++)
                s += ad_lora_elem(f->a, (size_t)r * (size_t)f->n_in + (size_t)i, f->type) * xm[i];
            t[m * f->rank + r] = scale * (f->a_scale ? s * f->a_scale[r] * f->b_scale[r] : s);
        }
    }
}

static void lora_b_c(const struct ad_lora_factors *f, int n_x, const float *t, float *y, int ldy,
                     int o0, int o1)
{
    for (int m = 0; m < n_x; m++) {
        float *ym = y + (size_t)m * (size_t)ldy;
        for (int o = o0; o < o1; o++) {
            size_t p = (size_t)(o / AD_LORA_PANEL) * (size_t)f->rank * AD_LORA_PANEL +
                       (size_t)(o % AD_LORA_PANEL);
            float s = 0;
            for (int r = 0; r < f->rank; r++)
                s += t[m * f->rank + r] *
                     ad_lora_elem(f->bp, p + (size_t)r * AD_LORA_PANEL, f->type);
            ym[o] += s;
        }
    }
}

static void lora_c(const struct ad_lora_factors *f, float scale, const float *x, int ldx,
                   int n_x, float *y, int ldy, float *t)
{
    lora_a_c(f, scale, x, ldx, n_x, t);
    lora_b_c(f, n_x, t, y, ldy, 0, f->n_out);
}

/* One head's online softmax over a run's scores sc[0..m): if the run raises the head's maximum
 * mx, what it has summed is rescaled (sum here; the caller's output by the returned factor, 1
 * when nothing changed); then sc becomes exp(sc - mx) and adds to sum. exp_sum is the build's,
 * inlined. */
static inline __attribute__((always_inline)) float
attn_softmax_run(float *sc, int m, float *mx, float *sum, float (*exp_sum)(float *, int, float))
{
    float run = -INFINITY, f = 1;
    for (int i = 0; i < m; i++)
        run = sc[i] > run ? sc[i] : run;
    if (run > *mx) {
        f = *sum > 0 ? expf(*mx - run) : 0;
        *sum *= f;
        *mx = run;
    }
    *sum += exp_sum(sc, m, *mx);
    return f;
}

/* The body of every build's attn, with that build's dot, axpy and exp_sum inlined: per head,
 * the scores of up to ATTN_RUN positions, the maximum (rescaling what is summed when it
 * grows), exp, and the weighted values. The run's K and V rows are read from memory by the
 * first head and from L1 by the others. */
#define ATTN_RUN 16

static inline __attribute__((always_inline)) void
attn_body(const float *q, int g, int hd, const float *k, const float *v, size_t ld, int n,
          float scale, float *mx, float *sum, float *out,
          float (*dot)(const float *, const float *, int),
          void (*axpy)(float, const float *, float *, int), float (*exp_sum)(float *, int, float))
{
    float sc[ATTN_RUN];
    for (int i0 = 0; i0 < n; i0 += ATTN_RUN) {
        int m = n - i0 < ATTN_RUN ? n - i0 : ATTN_RUN;
        const float *kr = k + (size_t)i0 * ld, *vr = v + (size_t)i0 * ld;
        for (int h = 0; h < g; h++) {
            const float *qh = q + (size_t)h * (size_t)hd;
            float *oh = out + (size_t)h * (size_t)hd;
            for (int i = 0; i < m; i++)
                sc[i] = dot(qh, kr + (size_t)i * ld, hd) * scale;
            float f = attn_softmax_run(sc, m, &mx[h], &sum[h], exp_sum);
            if (f != 1)
                for (int d = 0; d < hd; d++)
                    oh[d] *= f;
            for (int i = 0; i < m; i++)
                axpy(sc[i], vr + (size_t)i * ld, oh, hd);
        }
    }
}

static void attn_c(const float *q, int g, int hd, const float *k, const float *v, size_t ld,
                   int n, float scale, float *mx, float *sum, float *out)
{
    attn_body(q, g, hd, k, v, ld, n, scale, mx, sum, out, dot_c, axpy_c, exp_sum_c);
}

/* Element c of a weight row of type T (a constant once inlined); sc: an I8 row's scales. */
static inline __attribute__((always_inline)) float wel(const void *row, const enum ad_wtype T,
                                                       int c, const float *sc)
{
    switch (T) {
    case AD_WT_F32:
        return ((const float *)row)[c];
    case AD_WT_BF16:
        return ad_bf16_to_f32(((const uint16_t *)row)[c]);
    case AD_WT_F16:
        return ad_f16_to_f32(((const uint16_t *)row)[c]);
    default:
        return (float)((const int8_t *)row)[c] * sc[c / AD_WQ_BLOCK];
    }
}

/* Row r of w and its I8 scales (NULL for other types). */
static inline const void *wrow(const struct ad_weight *w, int r, const float **sc)
{
    size_t nb = ((size_t)w->cols + AD_WQ_BLOCK - 1) / AD_WQ_BLOCK;
    *sc = w->scale ? w->scale + (size_t)r * nb : NULL;
    return (const char *)w->data + (size_t)r * (size_t)w->cols * ad_wtype_size(w->type);
}

/* The body of a build's typed entry: calls fn with the element type T as a constant, so that
 * each type is compiled on its own. */
#define WTYPE_DISPATCH(t, fn, ...)                                                             \
    switch (t) {                                                                               \
    case AD_WT_F32: fn(AD_WT_F32, __VA_ARGS__); break;                                         \
    case AD_WT_BF16: fn(AD_WT_BF16, __VA_ARGS__); break;                                       \
    case AD_WT_F16: fn(AD_WT_F16, __VA_ARGS__); break;                                         \
    default: fn(AD_WT_I8, __VA_ARGS__); break;                                                 \
    }

/* Weight matrices of any type (kernels.h): each element widened as it is read. */
static void widen_c(const struct ad_weight *w, int r0, int r1, int c0, int c1, float *dst,
                    size_t ld)
{
    for (int r = r0; r < r1; r++) {
        float *d = dst + (size_t)(r - r0) * ld;
        if (w->type == AD_WT_BF16) { /* a loop the compiler vectorises */
            const uint16_t *src = (const uint16_t *)w->data + (size_t)r * (size_t)w->cols;
            for (int c = c0; c < c1; c++) {
                uint32_t bits = (uint32_t)src[c] << 16;
                memcpy(&d[c - c0], &bits, 4);
            }
        } else {
            for (int c = c0; c < c1; c++)
                d[c - c0] = ad_weight_at(w, (size_t)r, (size_t)c);
        }
    }
}

static void linear_c(const struct ad_weight *w, const float *x, int ldx, int n_x, float *y,
                     int ldy, int j0, int j1)
{
    if (w->type == AD_WT_F32) {
        matvec_c(w->data, w->cols, x, ldx, n_x, y, ldy, j0, j1);
        return;
    }
    float row[256];
    int n_in = w->cols;
    for (int j = j0; j < j1; j++) {
        for (int m = 0; m < n_x; m++)
            y[(size_t)m * (size_t)ldy + j] = 0;
        for (int i0 = 0; i0 < n_in; i0 += 256) { /* a piece of the row at a time, widened */
            int n = n_in - i0 < 256 ? n_in - i0 : 256;
            widen_c(w, j, j + 1, i0, i0 + n, row, 256);
            for (int m = 0; m < n_x; m++) {
                const float *xm = x + (size_t)m * (size_t)ldx + i0;
                float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                int i = 0;
                for (; i + 4 <= n; i += 4) {
                    s0 += row[i] * xm[i];
                    s1 += row[i + 1] * xm[i + 1];
                    s2 += row[i + 2] * xm[i + 2];
                    s3 += row[i + 3] * xm[i + 3];
                }
                for (; i < n; i++)
                    s0 += row[i] * xm[i];
                y[(size_t)m * (size_t)ldy + j] += (s0 + s1) + (s2 + s3);
            }
        }
    }
}

static void linear_t_c(const struct ad_weight *w, const float *x, int ldx, int n_x, float *y,
                       int ldy, int j0, int j1)
{
    float row[256];
    for (int m = 0; m < n_x; m++)
        memset(y + (size_t)m * (size_t)ldy + j0, 0, (size_t)(j1 - j0) * sizeof(float));
    for (int c0 = j0; c0 < j1; c0 += 256) {
        int n = j1 - c0 < 256 ? j1 - c0 : 256;
        for (int i = 0; i < w->rows; i++) { /* y += x_i w[i, c0 .. c0 + n) */
            widen_c(w, i, i + 1, c0, c0 + n, row, 256);
            for (int m = 0; m < n_x; m++)
                axpy_c(x[(size_t)m * (size_t)ldx + i], row, y + (size_t)m * (size_t)ldy + c0, n);
        }
    }
}

static const struct ad_kernels kernels_c = {
    "c",    matvec_c,   exp_sum_c,  silu_mul_c, attn_c,   lora_c,
    lora_a_c, lora_b_c, widen_c,    linear_c,   linear_t_c,
};

#ifdef AD_X86
/* ==========================================================================================
 * AVX2 + FMA */

AD_AVX2 static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AD_AVX2 static inline __m256 exp256(__m256 x)
{
    /* max/min return their second operand when one is NaN: x goes second, NaN survives. */
    x = _mm256_min_ps(_mm256_set1_ps(EXP_HI), _mm256_max_ps(_mm256_set1_ps(EXP_LO), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                  23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* One row of w at a time (one sequential stream, see matvec_avx512) against each row of x. */
AD_AVX2 static void matvec_avx2(const float *w, int n_in, const float *x, int ldx, int n_x,
                                float *y, int ldy, int j0, int j1)
{
    int n32 = n_in & ~31;
    for (int j = j0; j < j1; j++) {
        const float *wj = w + (size_t)j * (size_t)n_in;
        for (int m = 0; m < n_x; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int i = 0;
            for (; i < n32; i += 32) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i), _mm256_loadu_ps(xm + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i + 8), _mm256_loadu_ps(xm + i + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i + 16), _mm256_loadu_ps(xm + i + 16),
                                     a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i + 24), _mm256_loadu_ps(xm + i + 24),
                                     a3);
            }
            for (; i + 8 <= n_in; i += 8)
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wj + i), _mm256_loadu_ps(xm + i), a0);
            float sum = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; i < n_in; i++)
                sum += wj[i] * xm[i];
            y[(size_t)m * (size_t)ldy + j] = sum;
        }
    }
}

AD_AVX2 static float dot_avx2(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

AD_AVX2 static void axpy_avx2(float a, const float *x, float *y, int n)
{
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += a * x[i];
}

AD_AVX2 static float exp_sum_avx2(float *x, int n, float sub)
{
    __m256 subv = _mm256_set1_ps(sub), acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), subv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum256(acc);
    if (i < n) { /* the tail through the same polynomial, so every entry is rounded alike */
        float t[8] = {0};
        memcpy(t, x + i, (size_t)(n - i) * sizeof(float));
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(t), subv));
        _mm256_storeu_ps(t, e);
        for (int k = 0; k < n - i; k++) {
            x[i + k] = t[k];
            sum += t[k];
        }
    }
    return sum;
}

AD_AVX2 static void silu_mul_avx2(float *a, const float *g, size_t n)
{
    __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g ? g + i : a + i);
        __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, v))));
        _mm256_storeu_ps(a + i, g ? _mm256_mul_ps(_mm256_loadu_ps(a + i), s) : s);
    }
    if (i < n)
        silu_mul_c(a + i, g ? g + i : NULL, n - i);
}

/* The body of a build's lora entry: calls fn(f, NX, T, ...) with the row count NX and the
 * element type T as constants, so that each combination is compiled on its own. */
#define LORA_CASE(fn, nx, type, ...)                                                           \
    case (nx) * 4 + (int)(type): fn(f, nx, type, __VA_ARGS__); break
#define LORA_CASES(fn, nx, ...)                                                                \
    LORA_CASE(fn, nx, AD_LORA_F32, __VA_ARGS__);                                               \
    LORA_CASE(fn, nx, AD_LORA_BF16, __VA_ARGS__);                                              \
    LORA_CASE(fn, nx, AD_LORA_F16, __VA_ARGS__);                                               \
    LORA_CASE(fn, nx, AD_LORA_I8, __VA_ARGS__)
#define LORA_DISPATCH(fn, ...)                                                                 \
    switch (n_x * 4 + (int)f->type) {                                                          \
        LORA_CASES(fn, 1, __VA_ARGS__);                                                        \
        LORA_CASES(fn, 2, __VA_ARGS__);                                                        \
        LORA_CASES(fn, 3, __VA_ARGS__);                                                        \
        LORA_CASES(fn, 4, __VA_ARGS__);                                                        \
    default: break; /* n_x outside [1, AD_LORA_ROWS] */                                        \
    }

/* LoRA, in two passes over the factors. A x: A row after row, one sequential stream (measured
 * on 32 distinct adapters, one row each: 30% faster than four rows of A side by side), each row
 * against every row of x with two partial sums per row of x. B t: B's panels are one sequential
 * stream too; per panel, each row of y accumulates in two registers per half of the panel (even
 * and odd r). NX (rows) and T (the element type) are constants in every expansion of the
 * inline functions, so the accumulators stay in registers. I8: the scales of each rank
 * component (A's row, B's column) multiply its element of t, so B t has no scale to apply. */
AD_AVX2 static inline __m256 lora_ld8(const void *w, size_t i, enum ad_lora_type t)
{
    if (t == AD_LORA_F32)
        return _mm256_loadu_ps((const float *)w + i);
    if (t == AD_LORA_I8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (t == AD_LORA_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AD_AVX2 static inline __attribute__((always_inline)) void
lora_ax_avx2(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T, float scale,
             const float *x, int ldx, float *t)
{
    int n_in = f->n_in, n16 = n_in & ~15, n8 = n_in & ~7;
    for (int r = 0; r < f->rank; r++) {
        size_t row = (size_t)r * (size_t)n_in;
        __m256 acc[AD_LORA_ROWS][2];
        for (int m = 0; m < NX; m++)
            acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        int i = 0;
        for (; i < n16; i += 16) {
            __m256 w0 = lora_ld8(f->a, row + (size_t)i, T);
            __m256 w1 = lora_ld8(f->a, row + (size_t)i + 8, T);
            for (int m = 0; m < NX; m++) {
                const float *xm = x + (size_t)m * (size_t)ldx + (size_t)i;
                acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
            }
        }
        if (i < n8) {
            __m256 w0 = lora_ld8(f->a, row + (size_t)i, T);
            for (int m = 0; m < NX; m++)
                acc[m][0] = _mm256_fmadd_ps(
                    w0, _mm256_loadu_ps(x + (size_t)m * (size_t)ldx + (size_t)i), acc[m][0]);
        }
        for (int m = 0; m < NX; m++) {
            float sum = hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
            for (int j = n8; j < n_in; j++)
                sum += ad_lora_elem(f->a, row + (size_t)j, T) *
                       x[(size_t)m * (size_t)ldx + (size_t)j];
            t[m * f->rank + r] =
                scale * (T == AD_LORA_I8 ? sum * f->a_scale[r] * f->b_scale[r] : sum);
        }
    }
}

AD_AVX2 static inline __attribute__((always_inline)) void
lora_bt_avx2(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T,
             const float *t, float *y, int ldy, int o_begin, int o_end)
{
    int rank = f->rank;
    for (int o0 = o_begin; o0 < o_end; o0 += AD_LORA_PANEL) {
        size_t p = (size_t)(o0 / AD_LORA_PANEL) * (size_t)rank * AD_LORA_PANEL;
        __m256 lo[AD_LORA_ROWS][2], hi[AD_LORA_ROWS][2];
        for (int m = 0; m < NX; m++)
            lo[m][0] = lo[m][1] = hi[m][0] = hi[m][1] = _mm256_setzero_ps();
        for (int r = 0; r < rank; r++) {
            __m256 w0 = lora_ld8(f->bp, p + (size_t)r * AD_LORA_PANEL, T);
            __m256 w1 = lora_ld8(f->bp, p + (size_t)r * AD_LORA_PANEL + 8, T);
            for (int m = 0; m < NX; m++) {
                __m256 tv = _mm256_set1_ps(t[m * rank + r]);
                lo[m][r & 1] = _mm256_fmadd_ps(tv, w0, lo[m][r & 1]);
                hi[m][r & 1] = _mm256_fmadd_ps(tv, w1, hi[m][r & 1]);
            }
        }
        int n = o_end - o0 < AD_LORA_PANEL ? o_end - o0 : AD_LORA_PANEL;
        for (int m = 0; m < NX; m++) {
            float *ym = y + (size_t)m * (size_t)ldy + (size_t)o0;
            __m256 l = _mm256_add_ps(lo[m][0], lo[m][1]), h = _mm256_add_ps(hi[m][0], hi[m][1]);
            if (n == AD_LORA_PANEL) {
                _mm256_storeu_ps(ym, _mm256_add_ps(_mm256_loadu_ps(ym), l));
                _mm256_storeu_ps(ym + 8, _mm256_add_ps(_mm256_loadu_ps(ym + 8), h));
            } else {
                float v[AD_LORA_PANEL];
                _mm256_storeu_ps(v, l);
                _mm256_storeu_ps(v + 8, h);
                for (int j = 0; j < n; j++)
                    ym[j] += v[j];
            }
        }
    }
}

AD_AVX2 static inline __attribute__((always_inline)) void
lora_rows_avx2(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T,
               float scale, const float *x, int ldx, float *y, int ldy, float *t)
{
    lora_ax_avx2(f, NX, T, scale, x, ldx, t);
    lora_bt_avx2(f, NX, T, t, y, ldy, 0, f->n_out);
}

AD_AVX2 static void lora_avx2(const struct ad_lora_factors *f, float scale, const float *x,
                              int ldx, int n_x, float *y, int ldy, float *t)
{
    LORA_DISPATCH(lora_rows_avx2, scale, x, ldx, y, ldy, t);
}

AD_AVX2 static void lora_a_avx2(const struct ad_lora_factors *f, float scale, const float *x,
                                int ldx, int n_x, float *t)
{
    LORA_DISPATCH(lora_ax_avx2, scale, x, ldx, t);
}

AD_AVX2 static void lora_b_avx2(const struct ad_lora_factors *f, int n_x, const float *t,
                                float *y, int ldy, int o0, int o1)
{
    LORA_DISPATCH(lora_bt_avx2, t, y, ldy, o0, o1);
}

/* attn for a head_dim of C vectors (C a constant: 8 or 16, head_dim 64 or 128). Sixteen
 * registers do not hold a head's query and output: the query is read from L1 for each score,
 * and the output is accumulated in registers 64 values at a time over the run. */
AD_AVX2 static inline __attribute__((always_inline)) void
attn_hd_avx2(const float *q, int g, const int C, const float *k, const float *v, size_t ld,
             int n, float scale, float *mx, float *sum, float *out)
{
    float sc[ATTN_RUN];
    for (int i0 = 0; i0 < n; i0 += ATTN_RUN) {
        int m = n - i0 < ATTN_RUN ? n - i0 : ATTN_RUN;
        const float *kr = k + (size_t)i0 * ld, *vr = v + (size_t)i0 * ld;
        for (int h = 0; h < g; h++) {
            const float *qh = q + (size_t)h * (size_t)C * 8;
            float *oh = out + (size_t)h * (size_t)C * 8;
            for (int i = 0; i < m; i++) {
                const float *ki = kr + (size_t)i * ld;
                __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(ki));
                __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(qh + 8), _mm256_loadu_ps(ki + 8));
                for (int c = 2; c < C; c += 2) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8), _mm256_loadu_ps(ki + c * 8),
                                         a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + c * 8 + 8),
                                         _mm256_loadu_ps(ki + c * 8 + 8), a1);
                }
                sc[i] = hsum256(_mm256_add_ps(a0, a1)) * scale;
            }
            float f = attn_softmax_run(sc, m, &mx[h], &sum[h], exp_sum_avx2);
            for (int c0 = 0; c0 < C; c0 += 8) {
                __m256 o[8];
                for (int c = 0; c < 8; c++)
                    o[c] = _mm256_mul_ps(_mm256_loadu_ps(oh + (c0 + c) * 8), _mm256_set1_ps(f));
                for (int i = 0; i < m; i++) {
                    __m256 p = _mm256_set1_ps(sc[i]);
                    const float *vi = vr + (size_t)i * ld + c0 * 8;
                    for (int c = 0; c < 8; c++)
                        o[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vi + c * 8), o[c]);
                }
                for (int c = 0; c < 8; c++)
                    _mm256_storeu_ps(oh + (c0 + c) * 8, o[c]);
            }
        }
    }
}

AD_AVX2 static void attn_avx2(const float *q, int g, int hd, const float *k, const float *v,
                              size_t ld, int n, float scale, float *mx, float *sum, float *out)
{
    if (hd == 64)
        attn_hd_avx2(q, g, 8, k, v, ld, n, scale, mx, sum, out);
    else if (hd == 128)
        attn_hd_avx2(q, g, 16, k, v, ld, n, scale, mx, sum, out);
    else
        attn_body(q, g, hd, k, v, ld, n, scale, mx, sum, out, dot_avx2, axpy_avx2, exp_sum_avx2);
}

/* Weight matrices (kernels.h), 8 lanes: each element widened in registers as it is read (BF16:
 * shifted into the upper half of an f32; F16: F16C; I8: converted and multiplied by its block's
 * scale), then f32 arithmetic. */
AD_AVX2 static inline __attribute__((always_inline)) __m256
wld8(const void *row, const enum ad_wtype T, int c, const float *sc)
{
    if (T == AD_WT_F32)
        return _mm256_loadu_ps((const float *)row + c);
    if (T == AD_WT_I8) {
        __m128i q = _mm_loadl_epi64((const __m128i *)((const int8_t *)row + c));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                             _mm256_set1_ps(sc[c / AD_WQ_BLOCK]));
    }
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + c));
    if (T == AD_WT_F16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* Columns [c0, c1) of one row into dst: 8 at a time from the first multiple of 8 on (an I8
 * block's 8 lanes then share their scale), the rest one by one. */
AD_AVX2 static inline __attribute__((always_inline)) void
widen_run_avx2(const void *row, const enum ad_wtype T, const float *sc, int c0, int c1, float *dst)
{
    int c = c0;
    for (; c < c1 && (c & 7); c++)
        dst[c - c0] = wel(row, T, c, sc);
    for (; c + 8 <= c1; c += 8)
        _mm256_storeu_ps(dst + (c - c0), wld8(row, T, c, sc));
    for (; c < c1; c++)
        dst[c - c0] = wel(row, T, c, sc);
}

#define WIDEN_AVX2(T, w, r0, r1, c0, c1, dst, ld)                                              \
    for (int r = r0; r < r1; r++) {                                                            \
        const float *sc;                                                                       \
        const void *row = wrow(w, r, &sc);                                                     \
        widen_run_avx2(row, T, sc, c0, c1, dst + (size_t)(r - r0) * ld);                       \
    }

AD_AVX2 static void widen_avx2(const struct ad_weight *w, int r0, int r1, int c0, int c1,
                               float *dst, size_t ld)
{
    WTYPE_DISPATCH(w->type, WIDEN_AVX2, w, r0, r1, c0, c1, dst, ld);
}

/* NX (<= 4) dot products of one weight row with rows of x, into out[0 .. NX): one sequential
 * stream of w (see matvec_avx512), two partial sums per row of x. */
AD_AVX2 static inline __attribute__((always_inline)) void
dots_avx2(const void *row, const float *sc, const enum ad_wtype T, const int NX, int n,
          const float *x, int ldx, float *out)
{
    int n16 = n & ~15, n8 = n & ~7;
    __m256 acc[4][2];
    for (int m = 0; m < NX; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int i = 0;
    for (; i < n16; i += 16) {
        __m256 w0 = wld8(row, T, i, sc), w1 = wld8(row, T, i + 8, sc);
        for (int m = 0; m < NX; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx + i;
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), acc[m][1]);
        }
    }
    if (i < n8) {
        __m256 w0 = wld8(row, T, i, sc);
        for (int m = 0; m < NX; m++)
            acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)m * (size_t)ldx + i),
                                        acc[m][0]);
    }
    for (int m = 0; m < NX; m++) {
        float sum = hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
        for (int j = n8; j < n; j++)
            sum += wel(row, T, j, sc) * x[(size_t)m * (size_t)ldx + j];
        out[m] = sum;
    }
}

#define DOTS_CASE(isa, T, nx, row, sc, n, x, ldx, out)                                         \
    case nx: dots_##isa(row, sc, T, nx, n, x, ldx, out); break
/* Every row j in [j0, j1) of w against every row of x, four rows of x at a time. */
#define LINEAR_BODY(isa, T, w, x, ldx, n_x, y, ldy, j0, j1)                                    \
    do {                                                                                       \
        for (int j = j0; j < j1; j++) {                                                        \
            const float *sc;                                                                   \
            const void *row = wrow(w, j, &sc);                                                 \
            for (int m0 = 0; m0 < n_x; m0 += 4) {                                              \
                float out[4];                                                                  \
                const float *xm = x + (size_t)m0 * (size_t)ldx;                                \
                switch (n_x - m0 < 4 ? n_x - m0 : 4) {                                         \
                    DOTS_CASE(isa, T, 1, row, sc, w->cols, xm, ldx, out);                      \
                    DOTS_CASE(isa, T, 2, row, sc, w->cols, xm, ldx, out);                      \
                    DOTS_CASE(isa, T, 3, row, sc, w->cols, xm, ldx, out);                      \
                    DOTS_CASE(isa, T, 4, row, sc, w->cols, xm, ldx, out);                      \
                }                                                                              \
                for (int m = m0; m < n_x && m < m0 + 4; m++)                                   \
                    y[(size_t)m * (size_t)ldy + j] = out[m - m0];                              \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* Four sums of 8 lanes each: [sum a, sum b, sum c, sum d]. */
AD_AVX2 static inline __m128 hsum4_256(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Four rows of w (j .. j + 3) against NX (<= 2) rows of x, into y[m, j .. j + 3]. The four rows
 * of w are read once for every NX rows of x (from L1 after the first), so the arithmetic, not
 * the loads, bounds a batch. */
AD_AVX2 static inline __attribute__((always_inline)) void
dots4_avx2(const struct ad_weight *w, const enum ad_wtype T, const int NX, int j, const float *x,
           int ldx, float *y, int ldy)
{
    int n = w->cols, n8 = n & ~7;
    const float *sc[4];
    const void *row[4];
    for (int r = 0; r < 4; r++)
        row[r] = wrow(w, j + r, &sc[r]);
    __m256 acc[2][4];
    for (int m = 0; m < NX; m++)
        for (int r = 0; r < 4; r++)
            acc[m][r] = _mm256_setzero_ps();
    for (int i = 0; i < n8; i += 8) {
        __m256 wv[4];
        for (int r = 0; r < 4; r++)
            wv[r] = wld8(row[r], T, i, sc[r]);
        for (int m = 0; m < NX; m++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)m * (size_t)ldx + i);
            for (int r = 0; r < 4; r++)
                acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < NX; m++) {
        float out[4];
        _mm_storeu_ps(out, hsum4_256(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
        const float *xm = x + (size_t)m * (size_t)ldx;
        for (int r = 0; r < 4; r++) {
            for (int i = n8; i < n; i++)
                out[r] += wel(row[r], T, i, sc[r]) * xm[i];
            y[(size_t)m * (size_t)ldy + j + r] = out[r];
        }
    }
}

/* Batches of more than 4 rows: blocks of four rows of w by MX rows of x; the rows of w left
 * over one at a time (dots). */
#define LINEAR_BLOCKED(isa, T, MX, w, x, ldx, n_x, y, ldy, j0, j1)                             \
    do {                                                                                       \
        int jb = j0;                                                                           \
        for (; jb + 4 <= j1; jb += 4)                                                          \
            for (int m0 = 0; m0 < n_x; m0 += MX) {                                             \
                const float *xm = x + (size_t)m0 * (size_t)ldx;                                \
                float *ym = y + (size_t)m0 * (size_t)ldy;                                      \
                switch (n_x - m0 < MX ? n_x - m0 : MX) { /* NX a constant in each */          \
                case 1: dots4_##isa(w, T, 1, jb, xm, ldx, ym, ldy); break;                     \
                case 2: dots4_##isa(w, T, 2, jb, xm, ldx, ym, ldy); break;                     \
                case 3: dots4_##isa(w, T, 3 < MX ? 3 : MX, jb, xm, ldx, ym, ldy); break;       \
                default: dots4_##isa(w, T, MX, jb, xm, ldx, ym, ldy); break;                   \
                }                                                                              \
            }                                                                                  \
        LINEAR_BODY(isa, T, w, x, ldx, n_x, y, ldy, jb, j1);                                   \
    } while (0)

#define LINEAR_AVX2(T, w, x, ldx, n_x, y, ldy, j0, j1)                                         \
    do {                                                                                       \
        if (n_x <= 4)                                                                          \
            LINEAR_BODY(avx2, T, w, x, ldx, n_x, y, ldy, j0, j1);                              \
        else                                                                                   \
            LINEAR_BLOCKED(avx2, T, 2, w, x, ldx, n_x, y, ldy, j0, j1);                        \
    } while (0)

AD_AVX2 static void linear_avx2(const struct ad_weight *w, const float *x, int ldx, int n_x,
                                float *y, int ldy, int j0, int j1)
{
    WTYPE_DISPATCH(w->type, LINEAR_AVX2, w, x, ldx, n_x, y, ldy, j0, j1);
}

/* Conv1D (w [n_in, n_out]): NX (<= 4) rows of y over 16 columns from c, in registers over all
 * of w's rows (each read at c: one short run per row of w). */
AD_AVX2 static inline __attribute__((always_inline)) void
cols_avx2(const struct ad_weight *w, const enum ad_wtype T, const int NX, const float *x, int ldx,
          float *y, int ldy, int c)
{
    __m256 acc[4][2];
    for (int m = 0; m < NX; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int i = 0; i < w->rows; i++) {
        const float *sc;
        const void *row = wrow(w, i, &sc);
        __m256 w0 = wld8(row, T, c, sc), w1 = wld8(row, T, c + 8, sc);
        for (int m = 0; m < NX; m++) {
            __m256 xb = _mm256_broadcast_ss(x + (size_t)m * (size_t)ldx + i);
            acc[m][0] = _mm256_fmadd_ps(w0, xb, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(w1, xb, acc[m][1]);
        }
    }
    for (int m = 0; m < NX; m++) {
        _mm256_storeu_ps(y + (size_t)m * (size_t)ldy + c, acc[m][0]);
        _mm256_storeu_ps(y + (size_t)m * (size_t)ldy + c + 8, acc[m][1]);
    }
}

/* A column of y by plain sums, for the columns before the first multiple of 16 and after the
 * last whole 16. */
static inline __attribute__((always_inline)) void
col_plain(const struct ad_weight *w, const enum ad_wtype T, const float *x, int ldx, int n_x,
          float *y, int ldy, int c)
{
    for (int m = 0; m < n_x; m++) {
        float sum = 0;
        for (int i = 0; i < w->rows; i++) {
            const float *sc;
            const void *row = wrow(w, i, &sc);
            sum += wel(row, T, c, sc) * x[(size_t)m * (size_t)ldx + i];
        }
        y[(size_t)m * (size_t)ldy + c] = sum;
    }
}

#define COLS_CASE(isa, T, nx, w, x, ldx, y, ldy, c)                                            \
    case nx: cols_##isa(w, T, nx, x, ldx, y, ldy, c); break
/* Columns [j0, j1) of y: by plain sums up to a multiple of 16, then 16 at a time (an I8 block's
 * lanes then share their scale), four rows of x at a time; the rest by plain sums. */
#define LINEAR_T_BODY(isa, T, w, x, ldx, n_x, y, ldy, j0, j1)                                  \
    do {                                                                                       \
        int c = j0;                                                                            \
        for (; c < j1 && (c & 15); c++)                                                        \
            col_plain(w, T, x, ldx, n_x, y, ldy, c);                                           \
        for (; c + 16 <= j1; c += 16)                                                          \
            for (int m0 = 0; m0 < n_x; m0 += 4) {                                              \
                const float *xm = x + (size_t)m0 * (size_t)ldx;                                \
                float *ym = y + (size_t)m0 * (size_t)ldy;                                      \
                switch (n_x - m0 < 4 ? n_x - m0 : 4) {                                         \
                    COLS_CASE(isa, T, 1, w, xm, ldx, ym, ldy, c);                              \
                    COLS_CASE(isa, T, 2, w, xm, ldx, ym, ldy, c);                              \
                    COLS_CASE(isa, T, 3, w, xm, ldx, ym, ldy, c);                              \
                    COLS_CASE(isa, T, 4, w, xm, ldx, ym, ldy, c);                              \
                }                                                                              \
            }                                                                                  \
        for (; c < j1; c++)                                                                    \
            col_plain(w, T, x, ldx, n_x, y, ldy, c);                                           \
    } while (0)
#define LINEAR_T_AVX2(T, ...) LINEAR_T_BODY(avx2, T, __VA_ARGS__)

AD_AVX2 static void linear_t_avx2(const struct ad_weight *w, const float *x, int ldx, int n_x,
                                  float *y, int ldy, int j0, int j1)
{
    WTYPE_DISPATCH(w->type, LINEAR_T_AVX2, w, x, ldx, n_x, y, ldy, j0, j1);
}

static const struct ad_kernels kernels_avx2 = {
    "avx2",      matvec_avx2, exp_sum_avx2, silu_mul_avx2, attn_avx2,     lora_avx2,
    lora_a_avx2, lora_b_avx2, widen_avx2,   linear_avx2,   linear_t_avx2,
};

/* ==========================================================================================
 * AVX-512 */

AD_AVX512 static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_set1_ps(EXP_HI), _mm512_max_ps(_mm512_set1_ps(EXP_LO), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n); /* p * 2^n */
}

/* Lanes [0, n) of a 16-lane vector, n in [0, 16]. */
AD_AVX512 static inline __mmask16 mask16(int n)
{
    return (__mmask16)((1u << n) - 1u);
}

/* One row of w at a time, so that w is read as one sequential stream (measured: faster than
 * four rows side by side, which the hardware prefetcher follows less well), against each row of
 * x while the row of w is in L1. Four partial sums hide the FMA latency. */
AD_AVX512 static void matvec_avx512(const float *w, int n_in, const float *x, int ldx, int n_x,
                                    float *y, int ldy, int j0, int j1)
{
    int n64 = n_in & ~63, n16 = n_in & ~15;
    __mmask16 tail = mask16(n_in - n16);
    for (int j = j0; j < j1; j++) {
        const float *wj = w + (size_t)j * (size_t)n_in;
        for (int m = 0; m < n_x; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int i = 0;
            for (; i < n64; i += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wj + i), _mm512_loadu_ps(xm + i), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wj + i + 16), _mm512_loadu_ps(xm + i + 16),
                                     a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wj + i + 32), _mm512_loadu_ps(xm + i + 32),
                                     a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wj + i + 48), _mm512_loadu_ps(xm + i + 48),
                                     a3);
            }
            for (; i < n16; i += 16)
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wj + i), _mm512_loadu_ps(xm + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, wj + n16),
                                 _mm512_maskz_loadu_ps(tail, xm + n16), a1);
            __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            y[(size_t)m * (size_t)ldy + j] = _mm512_reduce_add_ps(a);
        }
    }
}

AD_AVX512 static float dot_avx512(const float *a, const float *b, int n)
{
    __m512 s = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16)
        s = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s);
    __mmask16 k = mask16(n - i);
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), s);
    return _mm512_reduce_add_ps(s);
}

AD_AVX512 static void axpy_avx512(float a, const float *x, float *y, int n)
{
    __m512 av = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    __mmask16 k = mask16(n - i);
    _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, x + i),
                                                    _mm512_maskz_loadu_ps(k, y + i)));
}

AD_AVX512 static float exp_sum_avx512(float *x, int n, float sub)
{
    __m512 subv = _mm512_set1_ps(sub), acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = mask16(n - i < 16 ? n - i : 16);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), subv));
        _mm512_mask_storeu_ps(x + i, k, e);
        acc = _mm512_mask_add_ps(acc, k, acc, e);
    }
    return _mm512_reduce_add_ps(acc);
}

AD_AVX512 static void silu_mul_avx512(float *a, const float *g, size_t n)
{
    __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (size_t i = 0; i < n; i += 16) {
        __mmask16 k = mask16(n - i < 16 ? (int)(n - i) : 16);
        __m512 v = _mm512_maskz_loadu_ps(k, g ? g + i : a + i);
        __m512 s = _mm512_div_ps(v, _mm512_add_ps(one, exp512(_mm512_sub_ps(zero, v))));
        if (g)
            s = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a + i), s);
        _mm512_mask_storeu_ps(a + i, k, s);
    }
}

/* LoRA as in the AVX2 build, 16 lanes wide: a panel of B is one register per row of y, with
 * four partial sums (r mod 4) for one row of y, two for more. */
AD_AVX512 static inline __m512 lora_ld16(const void *w, size_t i, enum ad_lora_type t)
{
    if (t == AD_LORA_F32)
        return _mm512_loadu_ps((const float *)w + i);
    if (t == AD_LORA_I8)
        return _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (t == AD_LORA_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AD_AVX512 static inline __attribute__((always_inline)) void
lora_ax_avx512(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T,
               float scale, const float *x, int ldx, float *t)
{
    int n_in = f->n_in, n32 = n_in & ~31, n16 = n_in & ~15;
    for (int r = 0; r < f->rank; r++) {
        size_t row = (size_t)r * (size_t)n_in;
        __m512 acc[AD_LORA_ROWS][2];
        for (int m = 0; m < NX; m++)
            acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        int i = 0;
        for (; i < n32; i += 32) {
            __m512 w0 = lora_ld16(f->a, row + (size_t)i, T);
            __m512 w1 = lora_ld16(f->a, row + (size_t)i + 16, T);
            for (int m = 0; m < NX; m++) {
                const float *xm = x + (size_t)m * (size_t)ldx + (size_t)i;
                acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
            }
        }
        if (i < n16) {
            __m512 w0 = lora_ld16(f->a, row + (size_t)i, T);
            for (int m = 0; m < NX; m++)
                acc[m][0] = _mm512_fmadd_ps(
                    w0, _mm512_loadu_ps(x + (size_t)m * (size_t)ldx + (size_t)i), acc[m][0]);
        }
        for (int m = 0; m < NX; m++) {
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
            for (int j = n16; j < n_in; j++)
                sum += ad_lora_elem(f->a, row + (size_t)j, T) *
                       x[(size_t)m * (size_t)ldx + (size_t)j];
            t[m * f->rank + r] =
                scale * (T == AD_LORA_I8 ? sum * f->a_scale[r] * f->b_scale[r] : sum);
        }
    }
}

AD_AVX512 static inline __attribute__((always_inline)) void
lora_bt_avx512(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T,
               const float *t, float *y, int ldy, int o_begin, int o_end)
{
    const int NA = NX == 1 ? 4 : 2; /* partial sums per row of y */
    int rank = f->rank;
    for (int o0 = o_begin; o0 < o_end; o0 += AD_LORA_PANEL) {
        size_t p = (size_t)(o0 / AD_LORA_PANEL) * (size_t)rank * AD_LORA_PANEL;
        __m512 acc[AD_LORA_ROWS][4];
        for (int m = 0; m < NX; m++)
            for (int k = 0; k < NA; k++)
                acc[m][k] = _mm512_setzero_ps();
        int r = 0;
        for (; r + NA <= rank; r += NA)
            for (int k = 0; k < NA; k++) {
                __m512 w = lora_ld16(f->bp, p + (size_t)(r + k) * AD_LORA_PANEL, T);
                for (int m = 0; m < NX; m++)
                    acc[m][k] = _mm512_fmadd_ps(_mm512_set1_ps(t[m * rank + r + k]), w, acc[m][k]);
            }
        for (; r < rank; r++) {
            __m512 w = lora_ld16(f->bp, p + (size_t)r * AD_LORA_PANEL, T);
            for (int m = 0; m < NX; m++)
                acc[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(t[m * rank + r]), w, acc[m][0]);
        }
        __mmask16 k = mask16(o_end - o0 < AD_LORA_PANEL ? o_end - o0 : AD_LORA_PANEL);
        for (int m = 0; m < NX; m++) {
            float *ym = y + (size_t)m * (size_t)ldy + (size_t)o0;
            __m512 sum = acc[m][0];
            for (int j = 1; j < NA; j++)
                sum = _mm512_add_ps(sum, acc[m][j]);
            _mm512_mask_storeu_ps(ym, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, ym), sum));
        }
    }
}

AD_AVX512 static inline __attribute__((always_inline)) void
lora_rows_avx512(const struct ad_lora_factors *f, const int NX, const enum ad_lora_type T,
                 float scale, const float *x, int ldx, float *y, int ldy, float *t)
{
    lora_ax_avx512(f, NX, T, scale, x, ldx, t);
    lora_bt_avx512(f, NX, T, t, y, ldy, 0, f->n_out);
}

AD_AVX512 static void lora_avx512(const struct ad_lora_factors *f, float scale, const float *x,
                                  int ldx, int n_x, float *y, int ldy, float *t)
{
    LORA_DISPATCH(lora_rows_avx512, scale, x, ldx, y, ldy, t);
}

AD_AVX512 static void lora_a_avx512(const struct ad_lora_factors *f, float scale, const float *x,
                                    int ldx, int n_x, float *t)
{
    LORA_DISPATCH(lora_ax_avx512, scale, x, ldx, t);
}

AD_AVX512 static void lora_b_avx512(const struct ad_lora_factors *f, int n_x, const float *t,
                                    float *y, int ldy, int o0, int o1)
{
    LORA_DISPATCH(lora_bt_avx512, t, y, ldy, o0, o1);
}

/* attn for a head_dim of C vectors (C a constant: 4 or 8, head_dim 64 or 128): a head's query
 * and its output stay in registers over the run, so each position costs C loads and C FMAs for
 * its score and as many for its value. */
AD_AVX512 static inline __attribute__((always_inline)) void
attn_hd_avx512(const float *q, int g, const int C, const float *k, const float *v, size_t ld,
               int n, float scale, float *mx, float *sum, float *out)
{
    float sc[ATTN_RUN];
    for (int i0 = 0; i0 < n; i0 += ATTN_RUN) {
        int m = n - i0 < ATTN_RUN ? n - i0 : ATTN_RUN;
        const float *kr = k + (size_t)i0 * ld, *vr = v + (size_t)i0 * ld;
        for (int h = 0; h < g; h++) {
            __m512 qv[8], o[8];
            float *oh = out + (size_t)h * (size_t)C * 16;
            for (int c = 0; c < C; c++)
                qv[c] = _mm512_loadu_ps(q + ((size_t)h * (size_t)C + (size_t)c) * 16);
            for (int i = 0; i < m; i++) {
                const float *ki = kr + (size_t)i * ld;
                __m512 a0 = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ki));
                __m512 a1 = _mm512_mul_ps(qv[1], _mm512_loadu_ps(ki + 16));
                for (int c = 2; c < C; c += 2) {
                    a0 = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(ki + c * 16), a0);
                    a1 = _mm512_fmadd_ps(qv[c + 1], _mm512_loadu_ps(ki + c * 16 + 16), a1);
                }
                sc[i] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * scale;
            }
            float f = attn_softmax_run(sc, m, &mx[h], &sum[h], exp_sum_avx512);
            for (int c = 0; c < C; c++)
                o[c] = _mm512_mul_ps(_mm512_loadu_ps(oh + c * 16), _mm512_set1_ps(f));
            for (int i = 0; i < m; i++) {
                __m512 p = _mm512_set1_ps(sc[i]);
                for (int c = 0; c < C; c++)
                    o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + (size_t)i * ld + c * 16), o[c]);
            }
            for (int c = 0; c < C; c++)
                _mm512_storeu_ps(oh + c * 16, o[c]);
        }
    }
}

AD_AVX512 static void attn_avx512(const float *q, int g, int hd, const float *k, const float *v,
                                  size_t ld, int n, float scale, float *mx, float *sum, float *out)
{
    if (hd == 64)
        attn_hd_avx512(q, g, 4, k, v, ld, n, scale, mx, sum, out);
    else if (hd == 128)
        attn_hd_avx512(q, g, 8, k, v, ld, n, scale, mx, sum, out);
    else
        attn_body(q, g, hd, k, v, ld, n, scale, mx, sum, out, dot_avx512, axpy_avx512,
                  exp_sum_avx512);
}

/* Weight matrices (kernels.h), 16 lanes, widened in registers as in the AVX2 build. */
AD_AVX512 static inline __attribute__((always_inline)) __m512
wld16(const void *row, const enum ad_wtype T, int c, const float *sc)
{
    if (T == AD_WT_F32)
        return _mm512_loadu_ps((const float *)row + c);
    if (T == AD_WT_I8) {
        __m128i q = _mm_loadu_si128((const __m128i *)((const int8_t *)row + c));
        return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)),
                             _mm512_set1_ps(sc[c / AD_WQ_BLOCK]));
    }
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c));
    if (T == AD_WT_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

AD_AVX512 static inline __attribute__((always_inline)) void
widen_run_avx512(const void *row, const enum ad_wtype T, const float *sc, int c0, int c1,
                 float *dst)
{
    int c = c0;
    for (; c < c1 && (c & 15); c++)
        dst[c - c0] = wel(row, T, c, sc);
    for (; c + 16 <= c1; c += 16)
        _mm512_storeu_ps(dst + (c - c0), wld16(row, T, c, sc));
    for (; c < c1; c++)
        dst[c - c0] = wel(row, T, c, sc);
}

#define WIDEN_AVX512(T, w, r0, r1, c0, c1, dst, ld)                                            \
    for (int r = r0; r < r1; r++) {                                                            \
        const float *sc;                                                                       \
        const void *row = wrow(w, r, &sc);                                                     \
        widen_run_avx512(row, T, sc, c0, c1, dst + (size_t)(r - r0) * ld);                     \
    }

AD_AVX512 static void widen_avx512(const struct ad_weight *w, int r0, int r1, int c0, int c1,
                                   float *dst, size_t ld)
{
    WTYPE_DISPATCH(w->type, WIDEN_AVX512, w, r0, r1, c0, c1, dst, ld);
}

/* As dots_avx2: one row of w against NX (<= 4) rows of x, four partial sums per row of x. */
AD_AVX512 static inline __attribute__((always_inline)) void
dots_avx512(const void *row, const float *sc, const enum ad_wtype T, const int NX, int n,
            const float *x, int ldx, float *out)
{
    int n64 = n & ~63, n16 = n & ~15;
    __m512 acc[4][4];
    for (int m = 0; m < NX; m++)
        for (int k = 0; k < 4; k++)
            acc[m][k] = _mm512_setzero_ps();
    int i = 0;
    for (; i < n64; i += 64) {
        __m512 w0 = wld16(row, T, i, sc), w1 = wld16(row, T, i + 16, sc);
        __m512 w2 = wld16(row, T, i + 32, sc), w3 = wld16(row, T, i + 48, sc);
        for (int m = 0; m < NX; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx + i;
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(w2, _mm512_loadu_ps(xm + 32), acc[m][2]);
            acc[m][3] = _mm512_fmadd_ps(w3, _mm512_loadu_ps(xm + 48), acc[m][3]);
        }
    }
    for (; i < n16; i += 16) {
        __m512 w0 = wld16(row, T, i, sc);
        for (int m = 0; m < NX; m++)
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (size_t)m * (size_t)ldx + i),
                                        acc[m][0]);
    }
    for (int m = 0; m < NX; m++) {
        __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                 _mm512_add_ps(acc[m][2], acc[m][3]));
        float sum = _mm512_reduce_add_ps(a);
        for (int j = n16; j < n; j++)
            sum += wel(row, T, j, sc) * x[(size_t)m * (size_t)ldx + j];
        out[m] = sum;
    }
}

/* [sum a, sum b, sum c, sum d] of four 16-lane vectors: pairs interleaved, then halves. */
AD_AVX512 static inline __m128 hsum4_512(__m512 a, __m512 b, __m512 c, __m512 d)
{
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    /* per 128-bit lane: ab = (a02, b02, a13, b13), cd likewise */
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    /* per 128-bit lane: (a, b, c, d) partial sums */
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* As dots4_avx2, four rows of w by NX (<= 4) rows of x, sixteen accumulators. */
AD_AVX512 static inline __attribute__((always_inline)) void
dots4_avx512(const struct ad_weight *w, const enum ad_wtype T, const int NX, int j,
             const float *x, int ldx, float *y, int ldy)
{
    int n = w->cols, n16 = n & ~15;
    const float *sc[4];
    const void *row[4];
    for (int r = 0; r < 4; r++)
        row[r] = wrow(w, j + r, &sc[r]);
    __m512 acc[4][4];
    for (int m = 0; m < NX; m++)
        for (int r = 0; r < 4; r++)
            acc[m][r] = _mm512_setzero_ps();
    for (int i = 0; i < n16; i += 16) {
        __m512 wv[4];
        for (int r = 0; r < 4; r++)
            wv[r] = wld16(row[r], T, i, sc[r]);
        for (int m = 0; m < NX; m++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)m * (size_t)ldx + i);
            for (int r = 0; r < 4; r++)
                acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
        }
    }
    for (int m = 0; m < NX; m++) {
        float out[4];
        _mm_storeu_ps(out, hsum4_512(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
        const float *xm = x + (size_t)m * (size_t)ldx;
        for (int r = 0; r < 4; r++) {
            for (int i = n16; i < n; i++)
                out[r] += wel(row[r], T, i, sc[r]) * xm[i];
            y[(size_t)m * (size_t)ldy + j + r] = out[r];
        }
    }
}

#define LINEAR_AVX512(T, w, x, ldx, n_x, y, ldy, j0, j1)                                       \
    do {                                                                                       \
        if (n_x <= 4)                                                                          \
            LINEAR_BODY(avx512, T, w, x, ldx, n_x, y, ldy, j0, j1);                            \
        else                                                                                   \
            LINEAR_BLOCKED(avx512, T, 4, w, x, ldx, n_x, y, ldy, j0, j1);                      \
    } while (0)

AD_AVX512 static void linear_avx512(const struct ad_weight *w, const float *x, int ldx, int n_x,
                                    float *y, int ldy, int j0, int j1)
{
    WTYPE_DISPATCH(w->type, LINEAR_AVX512, w, x, ldx, n_x, y, ldy, j0, j1);
}

/* Conv1D: as cols_avx2, one 16-lane register per row of y. */
AD_AVX512 static inline __attribute__((always_inline)) void
cols_avx512(const struct ad_weight *w, const enum ad_wtype T, const int NX, const float *x,
            int ldx, float *y, int ldy, int c)
{
    __m512 acc[4][2];
    for (int m = 0; m < NX; m++)
        acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 2 <= w->rows; i += 2) { /* two rows of w: two independent sums per row of y */
        const float *sc0, *sc1;
        const void *r0 = wrow(w, i, &sc0), *r1 = wrow(w, i + 1, &sc1);
        __m512 w0 = wld16(r0, T, c, sc0), w1 = wld16(r1, T, c, sc1);
        for (int m = 0; m < NX; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx + i;
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(xm[0]), acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(xm[1]), acc[m][1]);
        }
    }
    if (i < w->rows) {
        const float *sc0;
        const void *r0 = wrow(w, i, &sc0);
        __m512 w0 = wld16(r0, T, c, sc0);
        for (int m = 0; m < NX; m++)
            acc[m][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[(size_t)m * (size_t)ldx + i]),
                                        acc[m][0]);
    }
    for (int m = 0; m < NX; m++)
        _mm512_storeu_ps(y + (size_t)m * (size_t)ldy + c, _mm512_add_ps(acc[m][0], acc[m][1]));
}

#define LINEAR_T_AVX512(T, ...) LINEAR_T_BODY(avx512, T, __VA_ARGS__)

AD_AVX512 static void linear_t_avx512(const struct ad_weight *w, const float *x, int ldx, int n_x,
                                      float *y, int ldy, int j0, int j1)
{
    WTYPE_DISPATCH(w->type, LINEAR_T_AVX512, w, x, ldx, n_x, y, ldy, j0, j1);
}

static const struct ad_kernels kernels_avx512 = {
    "avx512",      matvec_avx512, exp_sum_avx512, silu_mul_avx512, attn_avx512,     lora_avx512,
    lora_a_avx512, lora_b_avx512, widen_avx512,   linear_avx512,   linear_t_avx512,
};
/* ==========================================================================================
 * AVX-512 with BF16 dot products: the AVX-512 build, but BF16 weights multiply through
 * vdpbf16ps, 32 products per instruction instead of 16 per FMA and no widening; for that the
 * rows of x are rounded to BF16 as they are read (a relative error of up to 2^-9 per element,
 * where the widening builds multiply the exact f32 values; docs/engine.md says what that costs
 * in parity). Tails of fewer than 32 elements are exact. */

/* 32 elements of a row of x from i, rounded to BF16 (round to nearest even). */
AD_AVX512BF16 static inline __m512bh xbf16(const float *x, int i)
{
    return _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
}

AD_AVX512BF16 static inline __m512bh wbf16(const void *row, int i)
{
    return (__m512bh)_mm512_loadu_si512((const uint16_t *)row + i);
}

/* As dots_avx512 for BF16 weights: one row of w against NX (<= 4) rows of x. */
AD_AVX512BF16 static inline __attribute__((always_inline)) void
dots_bf16dp(const void *row, const int NX, int n, const float *x, int ldx, float *out)
{
    int n64 = n & ~63, n32 = n & ~31;
    __m512 acc[4][2];
    for (int m = 0; m < NX; m++)
        acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int i = 0;
    for (; i < n64; i += 64) {
        __m512bh w0 = wbf16(row, i), w1 = wbf16(row, i + 32);
        for (int m = 0; m < NX; m++) {
            const float *xm = x + (size_t)m * (size_t)ldx;
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xbf16(xm, i));
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xbf16(xm, i + 32));
        }
    }
    if (i < n32) {
        __m512bh w0 = wbf16(row, i);
        for (int m = 0; m < NX; m++)
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xbf16(x + (size_t)m * (size_t)ldx, i));
    }
    for (int m = 0; m < NX; m++) {
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
        for (int j = n32; j < n; j++)
            sum += ad_bf16_to_f32(((const uint16_t *)row)[j]) * x[(size_t)m * (size_t)ldx + j];
        out[m] = sum;
    }
}

/* As dots4_avx512: four rows of w by NX (<= 4) rows of x. */
AD_AVX512BF16 static inline __attribute__((always_inline)) void
dots4_bf16dp(const struct ad_weight *w, const int NX, int j, const float *x, int ldx, float *y,
             int ldy)
{
    int n = w->cols, n32 = n & ~31;
    const float *sc;
    const void *row[4];
    for (int r = 0; r < 4; r++)
        row[r] = wrow(w, j + r, &sc);
    __m512 acc[4][4];
    for (int m = 0; m < NX; m++)
        for (int r = 0; r < 4; r++)
            acc[m][r] = _mm512_setzero_ps();
    for (int i = 0; i < n32; i += 32) {
        __m512bh wv[4];
        for (int r = 0; r < 4; r++)
            wv[r] = wbf16(row[r], i);
        for (int m = 0; m < NX; m++) {
            __m512bh xv = xbf16(x + (size_t)m * (size_t)ldx, i);
            for (int r = 0; r < 4; r++)
                acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
        }
    }
    for (int m = 0; m < NX; m++) {
        float out[4];
        _mm_storeu_ps(out, hsum4_512(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
        const float *xm = x + (size_t)m * (size_t)ldx;
        for (int r = 0; r < 4; r++) {
            for (int i = n32; i < n; i++)
                out[r] += ad_bf16_to_f32(((const uint16_t *)row[r])[i]) * xm[i];
            y[(size_t)m * (size_t)ldy + j + r] = out[r];
        }
    }
}

AD_AVX512BF16 static void linear_bf16dp(const struct ad_weight *w, const float *x, int ldx,
                                        int n_x, float *y, int ldy, int j0, int j1)
{
    if (w->type != AD_WT_BF16) {
        linear_avx512(w, x, ldx, n_x, y, ldy, j0, j1);
        return;
    }
    int j = j0;
    for (; n_x > 4 && j + 4 <= j1; j += 4)
        for (int m0 = 0; m0 < n_x; m0 += 4) {
            const float *xm = x + (size_t)m0 * (size_t)ldx;
            float *ym = y + (size_t)m0 * (size_t)ldy;
            switch (n_x - m0 < 4 ? n_x - m0 : 4) {
            case 1: dots4_bf16dp(w, 1, j, xm, ldx, ym, ldy); break;
            case 2: dots4_bf16dp(w, 2, j, xm, ldx, ym, ldy); break;
            case 3: dots4_bf16dp(w, 3, j, xm, ldx, ym, ldy); break;
            default: dots4_bf16dp(w, 4, j, xm, ldx, ym, ldy); break;
            }
        }
    for (; j < j1; j++) {
        const float *sc;
        const void *row = wrow(w, j, &sc);
        for (int m0 = 0; m0 < n_x; m0 += 4) {
            float out[4];
            const float *xm = x + (size_t)m0 * (size_t)ldx;
            int nm = n_x - m0 < 4 ? n_x - m0 : 4;
            switch (nm) {
            case 1: dots_bf16dp(row, 1, w->cols, xm, ldx, out); break;
            case 2: dots_bf16dp(row, 2, w->cols, xm, ldx, out); break;
            case 3: dots_bf16dp(row, 3, w->cols, xm, ldx, out); break;
            default: dots_bf16dp(row, 4, w->cols, xm, ldx, out); break;
            }
            for (int m = 0; m < nm; m++)
                y[(size_t)(m0 + m) * (size_t)ldy + j] = out[m];
        }
    }
}

static const struct ad_kernels kernels_avx512bf16 = {
    "avx512bf16",  matvec_avx512, exp_sum_avx512, silu_mul_avx512, attn_avx512,     lora_avx512,
    lora_a_avx512, lora_b_avx512, widen_avx512,   linear_bf16dp,   linear_t_avx512,
};
#endif /* AD_X86 */

/* ==========================================================================================
 * Dispatch */

const struct ad_kernels *ad_kernels_named(const char *name)
{
#ifdef AD_X86
    __builtin_cpu_init();
    if (!strcmp(name, "avx512") && __builtin_cpu_supports("avx512f"))
        return &kernels_avx512;
    /* AVX512_BF16: CPUID leaf 7 subleaf 1, EAX bit 5 */
    unsigned a1, b1, c1, d1;
    if (!strcmp(name, "avx512bf16") && __builtin_cpu_supports("avx512f") &&
        __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1) && (a1 & (1u << 5)))
        return &kernels_avx512bf16;
    /* F16C from CPUID: clang 14's __builtin_cpu_supports does not know "f16c" */
    unsigned a, b, c, d;
    bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    if (!strcmp(name, "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        f16c)
        return &kernels_avx2;
#endif
    return strcmp(name, "c") ? NULL : &kernels_c;
}

static const struct ad_kernels *pick(void)
{
    const char *want = getenv("ADAPTERD_KERNELS");
    const struct ad_kernels *k = want ? ad_kernels_named(want) : NULL;
    if (k)
        return k;
    if (want && !strcmp(want, "avx2")) /* a CPU without AVX2 runs the C build */
        return &kernels_c;
    if ((k = ad_kernels_named("avx512")) || (k = ad_kernels_named("avx2")))
        return k;
    return &kernels_c;
}

const struct ad_kernels *ad_kernels_get(void)
{
    static _Atomic(const struct ad_kernels *) chosen;
    const struct ad_kernels *k = atomic_load_explicit(&chosen, memory_order_relaxed);
    if (!k) { /* threads that race here all pick the same */
        k = pick();
        atomic_store_explicit(&chosen, k, memory_order_relaxed);
    }
    return k;
}
