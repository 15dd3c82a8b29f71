/* The vector kernels (kernels.h), every build this CPU runs (C, AVX2, AVX-512), against plain
 * double-precision loops: matrix-vector products and LoRA on 1 to 4 rows, F32, BF16 and F16
 * factors, shapes with and without vector-width tails, B packed in panels with a partial last
 * panel.
 * Each result also has to leave the rows around it untouched. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "adapterd/kernels.h"
#include "../check.h"

static float frand(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return (float)((*state >> 8) & 0xffff) / 32768.0f - 1.0f;
}

/* v as the factor type stores it (the value the kernel must see) into w[i]. */
static float store(void *w, size_t i, enum ad_lora_type t, float v)
{
    if (t == AD_LORA_F32) {
        ((float *)w)[i] = v;
        return v;
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
    size_t es = type == AD_LORA_F32 ? 4 : 2, n_bp = (size_t)panels * (size_t)rank * AD_LORA_PANEL;
    float *a32 = malloc((size_t)rank * n_in * sizeof(float));
    float *b32 = malloc((size_t)n_out * rank * sizeof(float)); /* [n_out, rank] as in PEFT */
    void *a = malloc((size_t)rank * n_in * es), *bp = calloc(n_bp, es);
    float *x = malloc((size_t)n_x * ldx * sizeof(float));
    float *y = malloc((size_t)n_x * ldy * sizeof(float)), *y0 = malloc((size_t)n_x * ldy * 4);
    float *t = malloc((size_t)n_x * rank * sizeof(float));
    float scale = 0.625f;
    CHECK(a32 && b32 && a && bp && x && y && y0 && t);

    for (int i = 0; i < rank * n_in; i++)
        a32[i] = store(a, (size_t)i, type, frand(&seed));
    for (int o = 0; o < n_out; o++)
        for (int r = 0; r < rank; r++) {
            size_t at = ((size_t)(o / AD_LORA_PANEL) * rank + r) * AD_LORA_PANEL +
                        o % AD_LORA_PANEL;
            b32[(size_t)o * rank + r] = store(bp, at, type, frand(&seed));
        }
    for (int i = 0; i < n_x * ldx; i++)
        x[i] = frand(&seed);
    for (int i = 0; i < n_x * ldy; i++)
        y[i] = y0[i] = frand(&seed);

    struct ad_lora_factors f = {rank, n_in, n_out, type, a, bp};
    for (int o = 0; o < n_out; o++) /* the accessors read the layout the test wrote */
        for (int r = 0; r < rank; r++)
            CHECK(ad_lora_b_at(&f, o, r) == b32[(size_t)o * rank + r]);
    k->lora(&f, scale, x, ldx, n_x, y, ldy, t);

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

int main(void)
{
    static const char *const names[] = {"c", "avx2", "avx512"};
    static const int shapes[][3] = {/* rank, n_in, n_out */
                                    {16, 576, 1536}, {16, 1536, 576}, {5, 37, 23},
                                    {1, 8, 16},      {8, 24, 17},     {3, 100, 33}, {64, 64, 64}};
    int n_builds = 0;
    for (int b = 0; b < 3; b++) {
        const struct ad_kernels *k = ad_kernels_named(names[b]);
        if (!k) {
            printf("%s: not on this CPU\n", names[b]);
            continue;
        }
        n_builds++;
        CHECK_STR(k->name, names[b]);
        for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
            for (int n_x = 1; n_x <= AD_LORA_ROWS; n_x++)
                for (int t = AD_LORA_F32; t <= AD_LORA_F16; t++)
                    check_lora(k, shapes[s][0], shapes[s][1], shapes[s][2], n_x,
                               (enum ad_lora_type)t, (unsigned)(s * 31 + n_x * 7 + t));
        for (int n_x = 1; n_x <= 4; n_x++) {
            check_matvec(k, 576, 40, n_x, 1u + n_x);
            check_matvec(k, 37, 9, n_x, 2u + n_x);
        }
        printf("%s: ok\n", names[b]);
    }
    CHECK(n_builds >= 1);
    CHECK(ad_kernels_named("nonsense") == NULL);
    return 0;
}
