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

static void lora_c(const struct ad_lora_factors *f, float scale, const float *x, int ldx,
                   int n_x, float *y, int ldy, float *t)
{
    for (int m = 0; m < n_x; m++) {
        const float *xm = x + (size_t)m * (size_t)ldx;
        float *ym = y + (size_t)m * (size_t)ldy;
        for (int r = 0; r < f->rank; r++) {
            float s = 0;
            for (int i = 0; i < f->n_in; i++)
                s += ad_lora_elem(f->a, (size_t)r * (size_t)f->n_in + (size_t)i, f->type) * xm[i];
            t[r] = scale * (f->a_scale ? s * f->a_scale[r] * f->b_scale[r] : s);
        }
        for (int o = 0; o < f->n_out; o++) {
            size_t p = (size_t)(o / AD_LORA_PANEL) * (size_t)f->rank * AD_LORA_PANEL +
                       (size_t)(o % AD_LORA_PANEL);
            float s = 0;
            for (int r = 0; r < f->rank; r++)
                s += t[r] * ad_lora_elem(f->bp, p + (size_t)r * AD_LORA_PANEL, f->type);
            ym[o] += s;
        }
    }
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

static const struct ad_kernels kernels_c = {
    "c", matvec_c, exp_sum_c, silu_mul_c, attn_c, lora_c,
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

/* The body of a build's lora entry: calls rows(f, NX, T, ...) with the row count NX and the
 * element type T as constants, so that each combination is compiled on its own. */
/* The body of a build's lora entry: calls rows(f, NX, T, ...) with the row count NX and the
 * element type T as constants, so that each combination is compiled on its own. */
#define LORA_CASE(rows, nx, type)                                                              \
    case (nx) * 4 + (int)(type): rows(f, nx, type, scale, x, ldx, y, ldy, t); break
#define LORA_CASES(rows, nx)                                                                   \
    LORA_CASE(rows, nx, AD_LORA_F32);                                                          \
    LORA_CASE(rows, nx, AD_LORA_BF16);                                                         \
    LORA_CASE(rows, nx, AD_LORA_F16);                                                          \
    LORA_CASE(rows, nx, AD_LORA_I8)
#define LORA_DISPATCH(rows)                                                                    \
    switch (n_x * 4 + (int)f->type) {                                                          \
        LORA_CASES(rows, 1);                                                                   \
        LORA_CASES(rows, 2);                                                                   \
        LORA_CASES(rows, 3);                                                                   \
        LORA_CASES(rows, 4);                                                                   \
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
             const float *t, float *y, int ldy)
{
    int rank = f->rank;
    for (int o0 = 0; o0 < f->n_out; o0 += AD_LORA_PANEL) {
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
        int n = f->n_out - o0 < AD_LORA_PANEL ? f->n_out - o0 : AD_LORA_PANEL;
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
    lora_bt_avx2(f, NX, T, t, y, ldy);
}

AD_AVX2 static void lora_avx2(const struct ad_lora_factors *f, float scale, const float *x,
                              int ldx, int n_x, float *y, int ldy, float *t)
{
    LORA_DISPATCH(lora_rows_avx2);
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

static const struct ad_kernels kernels_avx2 = {
    "avx2", matvec_avx2, exp_sum_avx2, silu_mul_avx2, attn_avx2, lora_avx2,
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
               const float *t, float *y, int ldy)
{
    const int NA = NX == 1 ? 4 : 2; /* partial sums per row of y */
    int rank = f->rank;
    for (int o0 = 0; o0 < f->n_out; o0 += AD_LORA_PANEL) {
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
        __mmask16 k = mask16(f->n_out - o0 < AD_LORA_PANEL ? f->n_out - o0 : AD_LORA_PANEL);
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
    lora_bt_avx512(f, NX, T, t, y, ldy);
}

AD_AVX512 static void lora_avx512(const struct ad_lora_factors *f, float scale, const float *x,
                                  int ldx, int n_x, float *y, int ldy, float *t)
{
    LORA_DISPATCH(lora_rows_avx512);
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

static const struct ad_kernels kernels_avx512 = {
    "avx512", matvec_avx512, exp_sum_avx512, silu_mul_avx512, attn_avx512, lora_avx512,
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
