/* Adapter loading rules that the PyTorch reference suite (tests/adapters) cannot show: how
 * replacement biases are represented and applied, the LoRA row kernel against the sgemm path,
 * the combinations PEFT never writes (a module saved whole and also adapted), and the values
 * refused at load (NaN and infinities in any tensor, scales that are not finite). */
#include <errno.h>
#include <sys/stat.h>

#include "../check.h"
#include "../tiny.h"
#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

static char model_dir[64];
static struct ad_model *model;

struct tensor {
    const char *name;
    int64_t d0, d1; /* d1 = 0: a vector */
    float value;    /* every element; < 0 for a ramp 0.01 * i */
};

/* The dtype load() writes tensors in (F32, BF16 or F16), and the flags it loads with. */
static enum ad_dtype load_dtype = AD_DTYPE_F32;
static unsigned load_flags;
/* If not 0 (NaN, an infinity): element 1 of tensor poison_at instead, in the file's dtype. */
static float poison;
static size_t poison_at;

/* Element j of a tensor that load() writes with value < 0 (a ramp), as the file holds it. */
static float ramp(int j)
{
    float v = 0.01f * (float)(j % 97) - 0.4f;
    return load_dtype == AD_DTYPE_F16    ? ad_f16_to_f32(ad_f32_to_f16(v))
           : load_dtype == AD_DTYPE_BF16 ? ad_bf16_to_f32(ad_f32_to_bf16(v))
                                         : v;
}

/* Writes an adapter directory under the model's and loads it. Returns the load's result. */
static int load(const char *name, const char *config, const struct tensor *t, size_t n,
                struct ad_adapter **ret, struct ad_err *err)
{
    static float data[8][24 * 24];
    static uint16_t half[8][24 * 24];
    struct ad_st_entry e[8];
    char dir[256], path[320];

    CHECK(n <= 8);
    snprintf(dir, sizeof(dir), "%s/%s", model_dir, name);
    CHECK(mkdir(dir, 0755) == 0 || errno == EEXIST);
    for (size_t i = 0; i < n; i++) {
        CHECK(t[i].d0 * (t[i].d1 ? t[i].d1 : 1) <= 24 * 24);
        for (int j = 0; j < 24 * 24; j++)
            data[i][j] = t[i].value < 0 ? 0.01f * (float)(j % 97) - 0.4f : t[i].value;
        if (poison != 0 && i == poison_at)
            data[i][1] = poison;
        for (int j = 0; j < 24 * 24; j++)
            half[i][j] = load_dtype == AD_DTYPE_F16 ? ad_f32_to_f16(data[i][j])
                                                    : ad_f32_to_bf16(data[i][j]);
        e[i] = (struct ad_st_entry){t[i].name, load_dtype, t[i].d1 ? 2 : 1, {t[i].d0, t[i].d1},
                                    load_dtype == AD_DTYPE_F32 ? (void *)data[i] : half[i]};
    }
    snprintf(path, sizeof(path), "%s/adapter_model.safetensors", dir);
    CHECK_INT(ad_st_write(path, e, n, NULL, err), ==, 0);
    snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
    FILE *f = fopen(path, "w");
    CHECK(f);
    fputs(config, f);
    fclose(f);
    return ad_adapter_load(model, dir, name, load_flags, ret, err);
}

static const struct ad_site_delta *delta(const struct ad_adapter *a, const char *module)
{
    const struct ad_site *s = ad_model_find_site(model, module);
    CHECK(s);
    return a->by_site[s - model->sites];
}

/* A replacement bias is kept as the file has it (b_new), and the output gets exactly it. */
static void test_bias_replacement(void)
{
    static const struct tensor t[] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.bias", 16, 0, 0.25f},
    };
    struct ad_adapter *a;
    struct ad_err err;
    CHECK_INT(load("bitfit", "{\"peft_type\": \"BITFIT\"}", t, 1, &a, &err), ==, 0);
    const struct ad_site_delta *d = delta(a, "model.layers.0.self_attn.q_proj");
    CHECK(d && d->b_new && !d->w_new && !d->lora.a);
    CHECK_NEAR(d->b_new[3], 0.25, 0);

    struct ad_mix mix = {.n = 1, .a = {a}, .w = {1}};
    float x[16] = {0}, y[2][16] = {{0}}, tmp[64];
    ad_mix_hooks.site_post(&mix, d->site, x, 16, false, y[0], 16, 2, tmp, 64);
    for (int j = 0; j < 16; j++) /* no base bias here: y = 0 + b_new */
        CHECK_NEAR(y[1][j], 0.25, 0);
    CHECK_INT(ad_mix_validate(&mix, &err), ==, 0);
    mix.w[0] = 0.5f; /* a replacement does not scale */
    CHECK_INT(ad_mix_validate(&mix, &err), ==, -EINVAL);
    ad_adapter_unref(a);

    /* ".bias" and ".base_layer.bias" of one module: two replacements, refused */
    static const struct tensor twice[] = {
        {"base_model.model.model.layers.0.self_attn.q_proj.bias", 16, 0, 0.25f},
        {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias", 16, 0, 0.5f},
    };
    CHECK_INT(load("bias-twice", "{\"peft_type\": \"BITFIT\"}", twice, 2, &a, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "replacement bias twice");
}

/* PEFT never adapts a module listed in modules_to_save, so a file that both replaces and adapts
 * one is refused rather than given a meaning (the forward and adapterd-export would disagree on
 * which weight an IA3 input scaling or a LoRA delta applies to). */
static void test_replaced_and_adapted(void)
{
    static const struct tensor ia3[] = {
        {"base_model.model.model.layers.0.mlp.down_proj.ia3_l", 1, 24, 1.5f},
        {"base_model.model.model.layers.0.mlp.down_proj.weight", 16, 24, 0.1f},
    };
    static const struct tensor lora[] = {
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 2, 16, 0.1f},
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 16, 2, 0.1f},
        {"base_model.model.model.layers.1.self_attn.q_proj.weight", 16, 16, 0.1f},
    };
    static const struct tensor ok[] = {
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", 2, 16, 0.1f},
        {"base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight", 16, 2, 0.1f},
        {"base_model.model.model.layers.1.self_attn.v_proj.weight", 8, 16, 0.1f},
        {"base_model.model.model.layers.1.self_attn.v_proj.bias", 8, 0, 0.1f},
    };
    struct ad_adapter *a;
    struct ad_err err;

    CHECK_INT(load("ia3-mts",
                   "{\"peft_type\": \"IA3\", \"target_modules\": [\"down_proj\"], "
                   "\"feedforward_modules\": [\"down_proj\"]}",
                   ia3, 2, &a, &err),
              ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "model.layers.0.mlp.down_proj");
    CHECK_CONTAINS(err.msg, "modules_to_save");
    CHECK_CONTAINS(err.msg, "IA3");
    CHECK_INT(load("lora-mts", "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4}", lora, 3,
                   &a, &err),
              ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "LoRA");
    /* replaced and adapted modules side by side are fine */
    CHECK_INT(load("lora-mts-ok", "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": 4}", ok, 4,
                   &a, &err),
              ==, 0);
    const struct ad_site_delta *d = delta(a, "model.layers.1.self_attn.v_proj");
    CHECK(d && d->w_new && d->b_new && !d->lora.a);
    ad_adapter_unref(a);
}

/* Rank component k of an int8 LoRA, A's row (of_a) or B's column: n values, value i from the
 * file's tensor element first + i * stride (ramp); the scale is their largest magnitude / 127,
 * and each held value is within half of it of the file's. */
static void check_component(const struct ad_lora_factors *f, bool of_a, int k, int n, int first,
                            int stride, float scale)
{
    float amax = 0;
    for (int i = 0; i < n; i++)
        amax = fabsf(ramp(first + i * stride)) > amax ? fabsf(ramp(first + i * stride)) : amax;
    CHECK_NEAR(scale, amax / 127, 1e-9);
    for (int i = 0; i < n; i++)
        CHECK_NEAR(of_a ? ad_lora_a_at(f, k, i) : ad_lora_b_at(f, i, k), ramp(first + i * stride),
                   scale / 2 * 1.0001);
}

/* One row at a time and eight rows at once give the deltas B A x computed here, for F32, BF16
 * and F16 files; 16-bit factors stay 16-bit (half the resident bytes: A [8, 24] and B packed in
 * one panel of 16 outputs x rank 8). With AD_ADAPTER_LORA_INT8 (flags), the factors are 8-bit
 * with a scale per rank component (A's row, B's column): each value within half a step of the
 * file's, the step the component's largest magnitude / 127. */
static void test_lora_rows(enum ad_dtype dtype, unsigned flags)
{
    static const struct tensor t[] = {
        {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", 8, 24, -1},
        {"base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", 16, 8, -1},
    };
    struct ad_adapter *a;
    struct ad_err err;
    char name[64];
    bool i8 = flags & AD_ADAPTER_LORA_INT8;
    snprintf(name, sizeof(name), "lora-rows-%d%s", (int)dtype, i8 ? "-i8" : "");
    load_dtype = dtype;
    load_flags = flags;
    CHECK_INT(load(name, "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 4}", t, 2, &a,
                   &err),
              ==, 0);
    const struct ad_site_delta *d = delta(a, "model.layers.0.mlp.down_proj");
    CHECK_INT(d->lora.type, ==, i8                      ? AD_LORA_I8
                                : dtype == AD_DTYPE_BF16 ? AD_LORA_BF16
                                : dtype == AD_DTYPE_F16  ? AD_LORA_F16 : AD_LORA_F32);
    if (i8) { /* A, B, then 8 + 8 float scales, each part on its own cache line */
        CHECK_INT(a->bytes, ==, 8 * 24 + 8 * AD_LORA_PANEL + 64);
        for (int r = 0; r < 8; r++) {
            check_component(&d->lora, true, r, 24, r * 24, 1, d->lora.a_scale[r]);  /* A's row */
            check_component(&d->lora, false, r, 16, r, 8, d->lora.b_scale[r]); /* B's column */
        }
    } else {
        CHECK_INT(a->bytes, ==, (8 * 24 + 8 * AD_LORA_PANEL) * (dtype == AD_DTYPE_F32 ? 4 : 2));
    }
    load_dtype = AD_DTYPE_F32;
    load_flags = 0;
    struct ad_mix mix = {.n = 1, .a = {a}, .w = {0.75f}};
    float x[8][24], one[8][16] = {{0}}, many[8][16] = {{0}}, tmp[256];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 24; j++)
            x[i][j] = 0.05f * (float)((i * 7 + j * 3) % 11) - 0.25f;
    for (int i = 0; i < 8; i++)
        ad_mix_hooks.site_post(&mix, d->site, x[i], 24, false, one[i], 16, 1, tmp, 256);
    ad_mix_hooks.site_post(&mix, d->site, x[0], 24, false, many[0], 16, 8, tmp, 256);
    for (int i = 0; i < 8; i++)
        for (int o = 0; o < 16; o++) {
            double want = 0;
            for (int r = 0; r < 8; r++) {
                double ax = 0;
                for (int j = 0; j < 24; j++)
                    ax += (double)ad_lora_a_at(&d->lora, r, j) * x[i][j];
                want += (double)ad_lora_b_at(&d->lora, o, r) * ax;
            }
            want *= 0.75 * 0.5; /* weight * alpha / r */
            CHECK_NEAR(one[i][o], want, 1e-5);
            CHECK_NEAR(many[i][o], want, 1e-5);
        }
    ad_adapter_unref(a);
}

#define Q "base_model.model.model.layers.0.self_attn.q_proj"
#define LORA_A {Q ".lora_A.weight", 2, 16, 0.1f}
#define LORA_B {Q ".lora_B.weight", 16, 2, -1}
#define LORA_ALPHA "{\"peft_type\": \"LORA\", \"r\": 2, \"lora_alpha\": "
#define LORA LORA_ALPHA "4"
#define BN "model.layers.1.output_adapters.adapters.h."

/* A NaN or an infinity in any tensor of any kind, in each dtype (as stored: BF16 and F16 LoRA
 * factors are kept 16-bit, int8 ones quantized), is refused at load naming the tensor; the same
 * file without it loads. */
static void test_non_finite(void)
{
    static const struct {
        const char *config;
        struct tensor t[4];
        size_t n, bad;
    } cases[] = {
        {LORA "}", {LORA_A, LORA_B}, 2, 0},
        {LORA "}", {LORA_A, LORA_B}, 2, 1},
        {LORA "}", {LORA_A, LORA_B, {Q ".lora_B.bias", 16, 0, 0.5f}}, 3, 2},
        {LORA ", \"use_dora\": true}", {LORA_A, LORA_B, {Q ".lora_magnitude_vector", 16, 0, 1}},
         3, 2},
        {LORA ", \"use_rslora\": true}", {LORA_A, LORA_B}, 2, 0},
        /* bias="all", modules_to_save (a linear, a norm) */
        {LORA "}", {LORA_A, LORA_B, {Q ".bias", 16, 0, 0.5f}}, 3, 2},
        {LORA "}", {LORA_A, LORA_B, {"base_model.model.model.layers.1.mlp.up_proj.weight", 24, 16,
                                     -1}}, 3, 2},
        {LORA "}", {LORA_A, LORA_B, {"base_model.model.model.norm.weight", 16, 0, 1}}, 3, 2},
        {"{\"peft_type\": \"IA3\", \"target_modules\": [\"q_proj\"]}",
         {{Q ".ia3_l", 16, 1, 1.5f}}, 1, 0},
        {"{\"peft_type\": \"BITFIT\"}", {{Q ".bias", 16, 0, 0.25f}}, 1, 0},
        {"{\"peft_type\": \"PREFIX_TUNING\", \"num_virtual_tokens\": 2}",
         {{"prompt_embeddings", 2, 2 * 2 * 8, -1}}, 1, 0}, /* [P, layers x K,V x 8] */
        {"{\"peft_type\": \"PROMPT_TUNING\", \"num_virtual_tokens\": 3}",
         {{"prompt_embeddings", 3, 16, -1}}, 1, 0},
        {"{\"config\": {\"reduction_factor\": 4, \"non_linearity\": \"relu\"}}",
         {{BN "adapter_down.0.weight", 4, 16, -1}, {BN "adapter_down.0.bias", 4, 0, 0.1f},
          {BN "adapter_up.weight", 16, 4, -1}, {BN "adapter_up.bias", 16, 0, 0.1f}}, 4, 3},
    };
    static const enum ad_dtype dtypes[] = {AD_DTYPE_F32, AD_DTYPE_F16, AD_DTYPE_BF16};
    static const struct {
        float v;
        const char *says;
    } poisons[] = {{NAN, "is NaN"}, {INFINITY, "is inf"}, {-INFINITY, "is -inf"}};
    struct ad_adapter *a;
    struct ad_err err;

    for (unsigned flags = 0; flags <= AD_ADAPTER_LORA_INT8; flags += AD_ADAPTER_LORA_INT8)
        for (size_t d = 0; d < 3; d++)
            for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                const struct tensor *t = cases[i].t;
                load_dtype = dtypes[d];
                load_flags = flags;
                poison = 0;
                CHECK_INT(load("finite", cases[i].config, t, cases[i].n, &a, &err), ==, 0);
                ad_adapter_unref(a);
                for (size_t p = 0; p < 3; p++) {
                    poison = poisons[p].v;
                    poison_at = cases[i].bad;
                    CHECK_INT(load("finite", cases[i].config, t, cases[i].n, &a, &err), ==,
                              -EINVAL);
                    CHECK_CONTAINS(err.msg, t[cases[i].bad].name);
                    CHECK_CONTAINS(err.msg, "element 1 ");
                    CHECK_CONTAINS(err.msg, poisons[p].says);
                }
            }
    load_dtype = AD_DTYPE_F32;
    load_flags = 0;
    poison = 0;

    /* finite factors whose W + s B A overflows a float: DoRA's row factors m / |W + s B A| are
     * not finite, and the magnitude vector is named */
    static const struct tensor huge[] = {
        {Q ".lora_A.weight", 2, 16, 1e30f},
        {Q ".lora_B.weight", 16, 2, 1e30f},
        {Q ".lora_magnitude_vector", 16, 0, 1},
    };
    CHECK_INT(load("dora-huge", LORA ", \"use_dora\": true}", huge, 3, &a, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, Q ".lora_magnitude_vector");
    CHECK_CONTAINS(err.msg, "not finite");
}

/* The config's numbers give the scale s = alpha / r (or / sqrt(r)) the forward multiplies by as
 * a float: one that is not finite is refused naming its source; a rank that is not the
 * tensor's (however large, or fractional) is refused. */
static void test_scales(void)
{
    static const struct tensor t[] = {LORA_A, LORA_B};
    static const struct {
        const char *config, *says; /* says: NULL if it loads */
    } cases[] = {
        {LORA_ALPHA "1e308}", "lora_alpha / r = 1e+308 / 2"},
        {LORA_ALPHA "1e39}", "lora_alpha / r = 1e+39 / 2"},
        {LORA_ALPHA "1e308, \"use_rslora\": true}", "lora_alpha / sqrt(r)"},
        {LORA ", \"alpha_pattern\": {\"q_proj\": 1e308}}", "alpha_pattern / r = 1e+308 / 2"},
        {LORA ", \"rank_pattern\": {\"q_proj\": 1e308}}", "rank 2, but the config says r = 1e+308"},
        {LORA ", \"rank_pattern\": {\"q_proj\": 2.5}}", "rank 2, but the config says r = 2.5"},
        {LORA_ALPHA "1e30}", NULL}, /* s = 5e29 */
    };
    struct ad_adapter *a;
    struct ad_err err;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int r = load("scale", cases[i].config, t, 2, &a, &err);
        if (!cases[i].says) {
            CHECK_INT(r, ==, 0);
            CHECK_NEAR(delta(a, "model.layers.0.self_attn.q_proj")->scale, 5e29, 5e22);
            ad_adapter_unref(a);
            continue;
        }
        CHECK_INT(r, ==, -EINVAL);
        CHECK_CONTAINS(err.msg, cases[i].says);
        if (strstr(cases[i].says, "alpha"))
            CHECK_CONTAINS(err.msg, "model.layers.0.self_attn.q_proj': the scale ");
    }
}

/* A bottleneck's width is hidden / reduction_factor rounded down, refused unless it is a positive
 * int (computed from 1e-300 it is none); a factor below 1 widens. */
static void test_bottleneck_width(void)
{
    static const struct tensor wide[] = {
        {BN "adapter_down.0.weight", 32, 16, -1}, {BN "adapter_down.0.bias", 32, 0, 0.1f},
        {BN "adapter_up.weight", 16, 32, -1}, {BN "adapter_up.bias", 16, 0, 0.1f},
    };
    static const struct tensor narrow[] = {
        {BN "adapter_down.0.weight", 1, 16, -1}, {BN "adapter_down.0.bias", 1, 0, 0.1f},
        {BN "adapter_up.weight", 16, 1, -1}, {BN "adapter_up.bias", 16, 0, 0.1f},
    };
    static const struct {
        const char *factor;
        const struct tensor *t;
        int dim; /* 0: refused */
    } cases[] = {
        {"1e-300", wide, 0}, {"17", narrow, 0}, {"16", narrow, 1}, {"0.5", wide, 32},
    };
    struct ad_adapter *a;
    struct ad_err err;
    char config[160];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(config, sizeof(config), "{\"config\": {\"reduction_factor\": %s, "
                 "\"non_linearity\": \"relu\"}}", cases[i].factor);
        int r = load("bn", config, cases[i].t, 4, &a, &err);
        if (!cases[i].dim) {
            CHECK_INT(r, ==, -EINVAL);
            CHECK_CONTAINS(err.msg, "reduction_factor");
            CHECK_CONTAINS(err.msg, "gives a width of");
            continue;
        }
        CHECK_INT(r, ==, 0);
        CHECK_INT(a->bn_mlp[1].dim, ==, cases[i].dim);
        ad_adapter_unref(a);
    }
}

int main(void)
{
    model = tiny_model(model_dir);
    test_bias_replacement();
    test_replaced_and_adapted();
    for (unsigned flags = 0; flags <= AD_ADAPTER_LORA_INT8; flags += AD_ADAPTER_LORA_INT8) {
        test_lora_rows(AD_DTYPE_F32, flags);
        test_lora_rows(AD_DTYPE_BF16, flags);
        test_lora_rows(AD_DTYPE_F16, flags);
    }
    test_non_finite();
    test_scales();
    test_bottleneck_width();
    ad_model_free(model);
    CHECK_INT(ad_rm_rf(model_dir), ==, 0);
    printf("adapter: ok\n");
    return 0;
}
