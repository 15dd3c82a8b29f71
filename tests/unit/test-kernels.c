/* The vector kernels (kernels.h), every build this CPU runs (C, AVX2, AVX-512, AVX-512 with BF16
 * dot products), against plain double-precision loops: matrix-vector products and LoRA on 1 to
 * 4 rows (F32, BF16, F16 and I8 factors, scales per row of A and per column of B; shapes with
 * and without vector-width tails, B packed in panels with a partial last panel; its two halves
 * over split output ranges); weight matrices of every type (F32, BF16, F16, I8 with a scale per
 * block) widened and multiplied with 1 to 13 rows in both layouts ([n_out, n_in], Conv1D's
 * [n_in, n_out]); decode attention for head sizes with their own code (64, 128) and others,
 * query heads sharing a KV head, positions in runs of many lengths (the online softmax across
 * runs) and scores far apart (the rescaling when a run raises the maximum). Each result also
 * has to leave the rows around it untouched. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/kernels.h"
#include "../check.h"

static float frand(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* v as the factor type stores it into w[i]; returns the value the kernel must see. I8: v
 * rounded to a multiple of scale (|v| <= 127 scale), which multiplies it back. */
static float store(void *w, size_t i, enum ad_lora_type t, float v, float scale)
{
    if (t == AD_LORA_F32) {
        ((float *)w)[i] = v;
        return v;
    }
    if (t == AD_LORA_I8) {
        int8_t q = (int8_t)lrintf(v / scale);
        ((int8_t *)w)[i] = q;
        return (float)q * scale;
    }
    uint16_t h = t == AD_LORA_F16 ? ad_f32_to_f16(v) : ad_f32_to_bf16(v);
    ((uint16_t *)w)[i] = h;
    return t == AD_LORA_F16 ? ad_f16_to_f32(h) : ad_bf16_to_f32(h);
}

/* LoRA with rank r on [n_in] -> [n_out], n_x rows, in one build: y_m += scale B A x_m. */
static void check_lora(const struct ad_kernels *k, int rank, int n_in, int n_out, int n_x,
                       enum ad_lora_type type, unsigned seed)
{
    int panels = (n_out + AD_LORA_PANEL - 1) / AD_LORA_PANEL, ldx = n_in + 3, ldy = n_out + 5;
    size_t es = type == AD_LORA_F32 ? 4 : type == AD_LORA_I8 ? 1 : 2;
    size_t n_bp = (size_t)panels * (size_t)rank * AD_LORA_PANEL;
    float *a32 = malloc((size_t)rank * n_in * sizeof(float));
    float *b32 = malloc((size_t)n_out * rank * sizeof(float)); /* [n_out, rank] as in PEFT */
    void *a = malloc((size_t)rank * n_in * es), *bp = calloc(n_bp, es);
    float *x = malloc((size_t)n_x * ldx * sizeof(float));
    float *y = malloc((size_t)n_x * ldy * sizeof(float)), *y0 = malloc((size_t)n_x * ldy * 4);
    float *t = malloc((size_t)n_x * rank * sizeof(float));
    /* I8: a scale per rank component (A's row, B's column) */
    float *a_scale = malloc((size_t)rank * sizeof(float));
    float *b_scale = malloc((size_t)rank * sizeof(float));
    float scale = 0.625f;
    CHECK(a32 && b32 && a && bp && x && y && y0 && t && a_scale && b_scale);

    for (int r = 0; r < rank; r++) { /* components of different sizes */
        a_scale[r] = (1.5f + frand(&seed)) / 127.0f;
        b_scale[r] = (1.5f + frand(&seed)) / 127.0f;
    }
    for (int i = 0; i < rank * n_in; i++)
        a32[i] = store(a, (size_t)i, type, frand(&seed), a_scale[i / n_in]);
    for (int o = 0; o < n_out; o++)
        for (int r = 0; r < rank; r++) {
            size_t at = ((size_t)(o / AD_LORA_PANEL) * rank + r) * AD_LORA_PANEL +
                        o % AD_LORA_PANEL;
            b32[(size_t)o * rank + r] = store(bp, at, type, frand(&seed), b_scale[r]);
        }
    for (int i = 0; i < n_x * ldx; i++)
        x[i] = frand(&seed);
    for (int i = 0; i < n_x * ldy; i++)
        y[i] = y0[i] = frand(&seed);

    bool i8 = type == AD_LORA_I8;
    struct ad_lora_factors f = {rank, n_in, n_out, type, a, bp, i8 ? a_scale : NULL,
                                i8 ? b_scale : NULL};
    for (int o = 0; o < n_out; o++) /* the accessors read the layout the test wrote */
        for (int r = 0; r < rank; r++)
            CHECK(ad_lora_b_at(&f, o, r) == b32[(size_t)o * rank + r]);
    for (int r = 0; r < rank; r++)
        for (int i = 0; i < n_in; i++)
            CHECK(ad_lora_a_at(&f, r, i) == a32[(size_t)r * n_in + i]);
    /* the two halves, B over two ranges of outputs (a panel boundary between), give the same */
    float *y2 = malloc((size_t)n_x * ldy * 4);
    CHECK(y2);
    memcpy(y2, y0, (size_t)n_x * ldy * 4);
    int split = n_out > AD_LORA_PANEL ? AD_LORA_PANEL : 0;
    k->lora_a(&f, scale, x, ldx, n_x, t);
    k->lora_b(&f, n_x, t, y2, ldy, 0, split);
    k->lora_b(&f, n_x, t, y2, ldy, split, n_out);
    k->lora(&f, scale, x, ldx, n_x, y, ldy, t);
    CHECK(memcmp(y, y2, (size_t)n_x * ldy * 4) == 0);
    free(y2);

    for (int m = 0; m < n_x; m++) {
        double ax[64];
        for (int r = 0; r < rank; r++) {
            ax[r] = 0;
            for (int i = 0; i < n_in; i++)
                ax[r] += (double)a32[(size_t)r * n_in + i] * x[(size_t)m * ldx + i];
        }
        for (int o = 0; o < ldy; o++) {
            double want = y0[(size_t)m * ldy + o];
            for (int r = 0; o < n_out && r < rank; r++)
                want += scale * (double)b32[(size_t)o * rank + r] * ax[r];
            double got = y[(size_t)m * ldy + o];
            if (fabs(got - want) > 1e-4 * (1 + fabs(want))) {
                fprintf(stderr, "%s lora rank %d %dx%d rows %d type %d: row %d out %d: %g vs %g\n",
                        k->name, rank, n_in, n_out, n_x, (int)type, m, o, got, want);
                abort();
            }
        }
    }
    free(a32), free(b32), free(a), free(bp), free(x), free(y), free(y0), free(t);
    free(a_scale), free(b_scale);
}

static void check_matvec(const struct ad_kernels *k, int n_in, int n_out, int n_x, unsigned seed)
{
    int ldx = n_in + 1, ldy = n_out + 2;
    float *w = malloc((size_t)n_out * n_in * 4), *x = malloc((size_t)n_x * ldx * 4);
    float *y = calloc((size_t)n_x * ldy, 4);
    CHECK(w && x && y);
    for (int i = 0; i < n_out * n_in; i++)
        w[i] = frand(&seed);
    for (int i = 0; i < n_x * ldx; i++)
        x[i] = frand(&seed);
    k->matvec(w, n_in, x, ldx, n_x, y, ldy, 1, n_out); /* row 0 left out */
    for (int m = 0; m < n_x; m++)
        for (int j = 0; j < ldy; j++) {
            double want = 0;
            for (int i = 0; j >= 1 && j < n_out && i < n_in; i++)
                want += (double)w[(size_t)j * n_in + i] * x[(size_t)m * ldx + i];
            CHECK_NEAR(y[(size_t)m * ldy + j], want, 1e-4 * (1 + fabs(want)));
        }
    free(w), free(x), free(y);
}

/* A weight matrix [rows, cols] of type t with random values (I8: random scales per block),
 * and the values the kernels must see, as doubles. */
struct wmat {
    struct ad_weight w;
    void *data;
    float *scale;
    double *want;
};

static void wmat_init(struct wmat *m, enum ad_wtype t, int rows, int cols, unsigned seed)
{
    size_t n = (size_t)rows * cols, nb = ((size_t)cols + AD_WQ_BLOCK - 1) / AD_WQ_BLOCK;
    m->data = malloc(n * ad_wtype_size(t) + 1);
    m->scale = t == AD_WT_I8 ? malloc((size_t)rows * nb * sizeof(float)) : NULL;
    m->want = malloc(n * sizeof(double));
    CHECK(m->data && m->want && (t != AD_WT_I8 || m->scale));
    for (size_t b = 0; t == AD_WT_I8 && b < (size_t)rows * nb; b++)
        m->scale[b] = (1.5f + frand(&seed)) / 127.0f;
    for (size_t i = 0; i < n; i++) {
        float v = frand(&seed);
        switch (t) {
        case AD_WT_F32:
            ((float *)m->data)[i] = v;
            break;
        case AD_WT_BF16:
            ((uint16_t *)m->data)[i] = ad_f32_to_bf16(v);
            v = ad_bf16_to_f32(((uint16_t *)m->data)[i]);
            break;
        case AD_WT_F16:
            ((uint16_t *)m->data)[i] = ad_f32_to_f16(v);
            v = ad_f16_to_f32(((uint16_t *)m->data)[i]);
            break;
        default: {
            float sc = m->scale[(i / cols) * nb + (i % cols) / AD_WQ_BLOCK];
            int8_t q = (int8_t)lrintf(v / sc);
            ((int8_t *)m->data)[i] = q;
            v = (float)q * sc;
        }
        }
        m->want[i] = v;
    }
    m->w = (struct ad_weight){t, rows, cols, m->data, m->scale};
    for (size_t i = 0; i < n; i++) /* the accessor reads what the test wrote */
        CHECK(ad_weight_at(&m->w, i / cols, i % cols) == (float)m->want[i]);
}

static void wmat_fini(struct wmat *m)
{
    free(m->data), free(m->scale), free(m->want);
}

/* widen, linear ([n_out, n_in]) and linear_t ([n_in, n_out]) of one type against double loops:
 * rows (or columns) [1, n_out - 1) only, the others must stay. */
static void check_weights(const struct ad_kernels *k, enum ad_wtype t, int n_in, int n_out,
                          int n_x, unsigned seed)
{
    int ldx = n_in + 3, ldy = n_out + 2, j0 = 1, j1 = n_out > 2 ? n_out - 1 : n_out;
    struct wmat a, b; /* a: [n_out, n_in]; b: [n_in, n_out] */
    wmat_init(&a, t, n_out, n_in, seed);
    wmat_init(&b, t, n_in, n_out, seed + 1);
    float *x = malloc((size_t)n_x * ldx * 4), *y = malloc((size_t)n_x * ldy * 4);
    float *wide = malloc((size_t)n_out * n_in * 4);
    CHECK(x && y && wide);
    for (int i = 0; i < n_x * ldx; i++)
        x[i] = frand(&seed);

    /* widen: a block that starts and ends inside blocks of AD_WQ_BLOCK */
    int r0 = n_out / 3, r1 = n_out, c0 = n_in > 5 ? 5 : 0, c1 = n_in > 7 ? n_in - 2 : n_in;
    k->widen(&a.w, r0, r1, c0, c1, wide, (size_t)(c1 - c0));
    for (int r = r0; r < r1; r++)
        for (int c = c0; c < c1; c++)
            CHECK(wide[(size_t)(r - r0) * (c1 - c0) + (c - c0)] ==
                  (float)a.want[(size_t)r * n_in + c]);

    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < n_x * ldy; i++)
            y[i] = 7.0f;
        if (pass == 0)
            k->linear(&a.w, x, ldx, n_x, y, ldy, j0, j1);
        else
            k->linear_t(&b.w, x, ldx, n_x, y, ldy, j0, j1);
        for (int m = 0; m < n_x; m++)
            for (int j = 0; j < ldy; j++) {
                double want = 7.0, mag = 0;
                if (j >= j0 && j < j1) {
                    want = 0;
                    for (int i = 0; i < n_in; i++) {
                        double p = (pass == 0 ? a.want[(size_t)j * n_in + i]
                                              : b.want[(size_t)i * n_out + j]) *
                                   x[(size_t)m * ldx + i];
                        want += p;
                        mag += fabs(p);
                    }
                }
                /* avx512bf16 rounds x to BF16 (2^-9 relative) in BF16 products of [n_out, n_in]
                 * weights: up to 2^-9 of the sum of |w x| */
                double tol = 1e-4 * (1 + fabs(want));
                if (!strcmp(k->name, "avx512bf16") && t == AD_WT_BF16 && pass == 0)
                    tol += mag / 512;
                double got = y[(size_t)m * ldy + j];
                if (!(fabs(got - want) <= tol)) {
                    fprintf(stderr, "%s %s type %d %dx%d rows %d: row %d out %d: %g vs %g\n",
                            k->name, pass ? "linear_t" : "linear", (int)t, n_in, n_out, n_x, m,
                            j, got, want);
                    abort();
                }
            }
    }
    wmat_fini(&a), wmat_fini(&b);
    free(x), free(y), free(wide);
}

/* attn over n positions of g heads (head size hd, rows ld apart) given in runs of the lengths
 * in runs[] (cycled), against softmax(q k^T scale) v in double precision. */
static void check_attn(const struct ad_kernels *k, int g, int hd, int n, const int *runs,
                       int n_runs, float spread, unsigned seed)
{
    size_t ld = (size_t)hd * 3 + 4; /* the KV head in the middle of a wider row */
    float *q = malloc((size_t)g * hd * 4), *kv = malloc(2 * (size_t)n * ld * 4);
    float *out = malloc(((size_t)g + 1) * hd * 4), mx[8], sum[8];
    CHECK(q && kv && out && g <= 8);
    for (int i = 0; i < g * hd; i++)
        q[i] = frand(&seed) * spread;
    for (size_t i = 0; i < 2 * (size_t)n * ld; i++)
        kv[i] = frand(&seed);
    const float *kk = kv + hd, *vv = kv + (size_t)n * ld + hd;
    float scale = 1.0f / sqrtf((float)hd);
    for (int h = 0; h < g; h++) {
        mx[h] = -INFINITY;
        sum[h] = 0;
    }
    for (int i = 0; i < (g + 1) * hd; i++)
        out[i] = i < g * hd ? 0 : 7.0f; /* past the g heads: must stay */
    for (int p = 0, r = 0; p < n; r++) {
        int len = runs[r % n_runs] < n - p ? runs[r % n_runs] : n - p;
        k->attn(q, g, hd, kk + (size_t)p * ld, vv + (size_t)p * ld, ld, len, scale, mx, sum, out);
        p += len;
    }
    for (int h = 0; h < g; h++) {
        double s[512], mxd = -INFINITY, tot = 0;
        CHECK(n <= 512);
        for (int i = 0; i < n; i++) {
            s[i] = 0;
            for (int d = 0; d < hd; d++)
                s[i] += (double)q[h * hd + d] * kk[(size_t)i * ld + d];
            s[i] *= scale;
            mxd = s[i] > mxd ? s[i] : mxd;
        }
        for (int i = 0; i < n; i++)
            tot += s[i] = exp(s[i] - mxd);
        for (int d = 0; d < hd; d++) {
            double want = 0;
            for (int i = 0; i < n; i++)
                want += s[i] / tot * vv[(size_t)i * ld + d];
            CHECK_NEAR(out[h * hd + d] / sum[h], want, 2e-5);
        }
    }
    for (int i = g * hd; i < (g + 1) * hd; i++)
        CHECK(out[i] == 7.0f);
    free(q), free(kv), free(out);
}

int main(void)
{
    static const char *const names[] = {"c", "avx2", "avx512", "avx512bf16"};
    static const int shapes[][3] = {/* rank, n_in, n_out */
                                    {16, 576, 1536}, {16, 1536, 576}, {5, 37, 23},
                                    {1, 8, 16},      {8, 24, 17},     {3, 100, 33}, {64, 64, 64}};
    int n_builds = 0;
    for (int b = 0; b < 4; b++) {
        const struct ad_kernels *k = ad_kernels_named(names[b]);
        if (!k) {
            printf("%s: not on this CPU\n", names[b]);
            continue;
        }
        n_builds++;
        CHECK_STR(k->name, names[b]);
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            for (int n_x = 1; n_x <= AD_LORA_ROWS; n_x++)
                for (int t = AD_LORA_F32; t <= AD_LORA_I8; t++)
                    check_lora(k, shapes[s][0], shapes[s][1], shapes[s][2], n_x,
                               (enum ad_lora_type)t, (unsigned)(s * 31 + n_x * 7 + t));
        for (int n_x = 1; n_x <= 4; n_x++) {
            check_matvec(k, 576, 40, n_x, 1u + n_x);
            check_matvec(k, 37, 9, n_x, 2u + n_x);
        }
        static const int wshapes[][2] = {{576, 40}, {37, 9}, {64, 100}, {160, 33}, {8, 3}};
        static const int rows[] = {1, 2, 3, 4, 5, 8, 13};
        for (int t = AD_WT_F32; t <= AD_WT_I8; t++)
            for (size_t s = 0; s < sizeof(wshapes) / sizeof(wshapes[0]); s++)
                for (size_t n = 0; n < sizeof(rows) / sizeof(rows[0]); n++)
                    check_weights(k, (enum ad_wtype)t, wshapes[s][0], wshapes[s][1], rows[n],
                                  (unsigned)(t * 131 + s * 17 + n));
        static const int runs[][4] = {{16, 16, 16, 16}, {1, 5, 17, 40}, {300, 1, 1, 1}};
        static const int hds[] = {64, 128, 48, 8, 20};
        for (size_t h = 0; h < sizeof(hds) / sizeof(hds[0]); h++)
            for (int g = 1; g <= 3; g += 2)
                for (int r = 0; r < 3; r++) {
                    check_attn(k, g, hds[h], 300, runs[r], 4, 1.0f, (unsigned)(h * 9 + r));
                    /* scores tens apart: a later run raises the maximum by far */
                    check_attn(k, g, hds[h], 77, runs[r], 4, 8.0f, (unsigned)(h * 5 + r + 99));
                }
        printf("%s: ok\n", names[b]);
    }
    CHECK(n_builds >= 1);
    CHECK(ad_kernels_named("nonsense") == NULL);
    return 0;
}
