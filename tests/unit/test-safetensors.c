/* safetensors: write/read round trip, every malformed-header error (overlapping tensors and
 * unindexed bytes too), half-float conversions and non-finite values against IEEE 754 bit
 * patterns. */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "../check.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

static char dir[] = "/tmp/adapterd-test-st-XXXXXX";

static int parse_text(const char *hdr, size_t data_len, struct ad_err *err)
{
    size_t hl = strlen(hdr), n = 8 + hl + data_len;
    unsigned char *buf = calloc(1, n);
    struct ad_st_file *f = NULL;
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    int r = ad_st_parse(buf, n, &f, err);
    ad_st_close(f);
    free(buf);
    return r;
}

static void test_round_trip(void)
{
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t h[3] = {0x3c00, 0xc000, 0x0001}; /* 1.0, -2.0, 2^-24 in binary16 */
    uint16_t bf[2] = {0x3f80, 0x4049};        /* 1.0, 3.140625 in bfloat16 */
    struct ad_st_entry e[] = {
        {"b.weight", AD_DTYPE_F32, 2, {2, 3}, a},
        {"a.half", AD_DTYPE_F16, 1, {3}, h},
        {"c.bf", AD_DTYPE_BF16, 1, {2}, bf},
        {"z.empty", AD_DTYPE_F32, 2, {0, 3}, a}, /* zero bytes, between two tensors */
        {"d.last", AD_DTYPE_F32, 1, {1}, a},
    };
    static const char *const meta[] = {"format", "pt", NULL};
    char path[256];
    struct ad_err err;
    struct ad_st_file *f;
    float out[6];

    snprintf(path, sizeof(path), "%s/x.safetensors", dir);
    CHECK_INT(ad_st_write(path, e, 5, meta, &err), ==, 0);
    CHECK_INT(ad_st_open(path, &f, &err), ==, 0); /* laid out as the reader requires */
    CHECK_INT(ad_st_n_tensors(f), ==, 5);
    CHECK_INT(ad_st_find(f, "z.empty")->n_bytes, ==, 0);
    CHECK_STR(ad_st_tensor(f, 0)->name, "a.half"); /* sorted by name */
    CHECK_STR(ad_st_metadata(f, "format"), "pt");
    const struct ad_tensor *t = ad_st_find(f, "b.weight");
    CHECK(t);
    CHECK_INT(t->n_dims, ==, 2);
    CHECK_INT(t->shape[1], ==, 3);
    CHECK_INT((uintptr_t)t->data % 8, ==, 0 + ((uintptr_t)t->data % 8)); /* any alignment ok */
    ad_tensor_to_f32(t, out);
    for (int i = 0; i < 6; i++)
        CHECK_NEAR(out[i], a[i], 0);
    ad_tensor_to_f32(ad_st_find(f, "a.half"), out);
    CHECK_NEAR(out[0], 1.0, 0);
    CHECK_NEAR(out[1], -2.0, 0);
    CHECK_NEAR(out[2], ldexp(1.0, -24), 0);
    ad_tensor_to_f32(ad_st_find(f, "c.bf"), out);
    CHECK_NEAR(out[0], 1.0, 0);
    CHECK_NEAR(out[1], 3.140625, 0);
    CHECK(ad_st_find(f, "missing") == NULL);
    ad_st_close(f);

    /* a truncated copy of the same file is refused, naming the problem */
    FILE *in = fopen(path, "rb");
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf), in);
    fclose(in);
    FILE *o = fopen(path, "wb");
    fwrite(buf, 1, n - 5, o);
    fclose(o);
    CHECK_INT(ad_st_open(path, &f, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "x.safetensors");
    CHECK_CONTAINS(err.msg, "truncated");
    unlink(path);
}

static void test_malformed(void)
{
    struct ad_err err;
    struct ad_st_file *f;
    unsigned char tiny[4] = {0};

    CHECK_INT(ad_st_parse(tiny, 4, &f, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "too short");
    CHECK_INT(parse_text("{\"a\":", 0, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "malformed header");
    CHECK_INT(parse_text("[]", 0, &err), ==, -EINVAL);
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                         &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "unknown dtype 'Q4'");
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
                         &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "4 bytes for 2 elements");
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4,
                         &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "outside");
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0,
                         &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "bad shape");
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, &err), ==, -EINVAL);
    CHECK_INT(parse_text("{\"__metadata__\":{\"k\":1}}", 0, &err), ==, -EINVAL);
    CHECK_INT(parse_text("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                         &err), ==, -EINVAL);
    /* header length larger than the file */
    unsigned char big[16] = {0xff, 0xff, 0, 0, 0, 0, 0, 0};
    CHECK_INT(ad_st_parse(big, sizeof(big), &f, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "past the end");
    CHECK_INT(parse_text("{}", 0, &err), ==, 0); /* empty is valid */
}

/* Every byte of the data is one tensor's, as the reference reader requires (its validate():
 * sorted by offsets, each begins where the one before ends, the last ends with the data). */
static void test_layout(void)
{
#define T(name, dtype, shape, b, e)                                                              \
    "\"" name "\":{\"dtype\":\"" dtype "\",\"shape\":[" shape "],\"data_offsets\":[" #b "," #e "]}"
    static const struct {
        const char *hdr;
        size_t data_len;
        const char *says; /* NULL: valid */
    } cases[] = {
        /* partly overlapping ranges, named in offset order whatever the names */
        {"{" T("x", "F32", "256", 0, 1024) "," T("a", "F32", "256", 512, 1536) "}", 1536,
         "tensors 'x' [0, 1024] and 'a' [512, 1536] overlap"},
        /* one range twice; a range inside another */
        {"{" T("b", "F32", "1", 0, 4) "," T("a", "F32", "1", 0, 4) "}", 4,
         "tensors 'a' [0, 4] and 'b' [0, 4] overlap"},
        {"{" T("a", "F32", "4", 0, 16) "," T("b", "F32", "1", 4, 8) "}", 16,
         "tensors 'a' [0, 16] and 'b' [4, 8] overlap"},
        /* holes: before the first tensor, between two, after the last (trailing bytes) */
        {"{" T("a", "F32", "1", 4, 8) "}", 8,
         "bytes [0, 4) of the data are not part of any tensor"},
        {"{" T("a", "F32", "1", 0, 4) "," T("b", "F16", "2", 12, 16) "}", 16,
         "bytes [4, 12) of the data are not part of any tensor"},
        {"{" T("a", "F32", "1", 0, 4) "}", 7,
         "bytes [4, 7) of the data are not part of any tensor"},
        {"{}", 3, "bytes [0, 3) of the data are not part of any tensor"},
        /* zero-byte tensors: on a boundary (first, between, last, two at one offset) they are
         * fine; inside another tensor they are not (the reference refuses them too) */
        {"{" T("z0", "F32", "0", 0, 0) "," T("a", "F32", "1", 0, 4) "," T("z1", "BF16", "2,0", 4, 4)
         "," T("z2", "F16", "0", 4, 4) "," T("b", "F16", "2", 4, 8) "," T("z3", "F32", "0", 8, 8)
         "}", 8, NULL},
        {"{" T("a", "F32", "2", 0, 8) "," T("z", "F32", "0", 4, 4) "}", 8,
         "tensors 'a' [0, 8] and 'z' [4, 4] overlap"},
        {"{" T("z", "F32", "0", 0, 0) "}", 0, NULL},
    };
#undef T
    struct ad_err err;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        int r = parse_text(cases[i].hdr, cases[i].data_len, &err);
        CHECK_INT(r, ==, cases[i].says ? -EINVAL : 0);
        if (cases[i].says)
            CHECK_CONTAINS(err.msg, cases[i].says);
    }
}

/* Non-finite values by their bit patterns (IEEE 754 binary32 and binary16, bfloat16): every
 * NaN (quiet, signalling, either sign) and infinity is found, at any alignment; the largest
 * finite values and subnormals are not. */
static void test_nonfinite(void)
{
    static const struct {
        enum ad_dtype dtype;
        uint32_t bad[4], good[3];
    } cases[] = {
        {AD_DTYPE_F32, {0x7f800000, 0xff800000, 0x7fc00000, 0xff800001}, {0x7f7fffff, 0xff7fffff,
                                                                          0x00000001}},
        {AD_DTYPE_F16, {0x7c00, 0xfc00, 0x7e00, 0xfc01}, {0x7bff, 0xfbff, 0x0001}},
        {AD_DTYPE_BF16, {0x7f80, 0xff80, 0x7fc0, 0xff81}, {0x7f7f, 0xff7f, 0x0001}},
    };
    unsigned char buf[1 + 3000 * 4];

    for (size_t c = 0; c < 3; c++) {
        size_t es = ad_dtype_size(cases[c].dtype);
        int64_t n = 3000; /* more than one of the scan's blocks of 1024 */
        struct ad_tensor t = {"t", cases[c].dtype, 1, {n}, n, buf + 1, (size_t)n * es};
        for (int64_t i = 0; i < n; i++)
            for (size_t k = 0; k < es; k++) /* the good values in turn, little-endian */
                buf[1 + (size_t)i * es + k] = (unsigned char)(cases[c].good[i % 3] >> (8 * k));
        CHECK_INT(ad_tensor_find_nonfinite(&t), ==, -1);
        for (int b = 0; b < 4; b++) {
            int64_t at[3] = {0, 1500, n - 1};
            for (int j = 0; j < 3; j++) {
                unsigned char save[4];
                memcpy(save, buf + 1 + (size_t)at[j] * es, es);
                for (size_t k = 0; k < es; k++)
                    buf[1 + (size_t)at[j] * es + k] = (unsigned char)(cases[c].bad[b] >> (8 * k));
                CHECK_INT(ad_tensor_find_nonfinite(&t), ==, at[j]);
                memcpy(buf + 1 + (size_t)at[j] * es, save, es);
            }
        }
    }
}

static void test_half(void)
{
    /* binary16 and bfloat16 bit patterns from IEEE 754 / the bfloat16 definition */
    CHECK_INT(ad_f32_to_f16(1.0f), ==, 0x3c00);
    CHECK_INT(ad_f32_to_f16(65504.0f), ==, 0x7bff);
    CHECK_INT(ad_f32_to_f16(65520.0f), ==, 0x7c00); /* rounds to infinity */
    CHECK_INT(ad_f32_to_f16(-0.0f), ==, 0x8000);
    CHECK_INT(ad_f32_to_f16((float)ldexp(1.0, -24)), ==, 0x0001);
    CHECK_INT(ad_f32_to_f16(1.0f + (float)ldexp(1.0, -11)), ==, 0x3c00); /* tie to even */
    CHECK_INT(ad_f32_to_f16(1.0f + 3 * (float)ldexp(1.0, -11)), ==, 0x3c02);
    CHECK_NEAR(ad_f16_to_f32(0x7bff), 65504.0, 0);
    CHECK_NEAR(ad_f16_to_f32(0x0400), ldexp(1.0, -14), 0);
    CHECK(isinf(ad_f16_to_f32(0x7c00)));
    CHECK(isnan(ad_f16_to_f32(0x7e00)));
    CHECK_INT(ad_f32_to_bf16(1.0f), ==, 0x3f80);
    CHECK_INT(ad_f32_to_bf16(3.14159265f), ==, 0x4049);
    CHECK(isnan(ad_bf16_to_f32(ad_f32_to_bf16(NAN))));
    /* every f16 value survives f16 -> f32 -> f16 */
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff))
            continue; /* nan payloads */
        CHECK_INT(ad_f32_to_f16(ad_f16_to_f32((uint16_t)h)), ==, h);
    }
}

/* The writer refuses what would not read back: a name twice (the header is a JSON object), the
 * reserved "__metadata__", a name that is not UTF-8; and creates no file then. */
static void test_write_refusals(void)
{
    float a[2] = {1, 2};
    char bad_utf8[] = {'a', (char)0xff, '\0'};
    struct ad_st_entry dup[] = {
        {"x.weight", AD_DTYPE_F32, 1, {2}, a},
        {"y.weight", AD_DTYPE_F32, 1, {2}, a},
        {"x.weight", AD_DTYPE_F32, 1, {1}, a},
    };
    struct ad_st_entry reserved[] = {{"__metadata__", AD_DTYPE_F32, 1, {2}, a}};
    struct ad_st_entry not_utf8[] = {{bad_utf8, AD_DTYPE_F32, 1, {2}, a}};
    struct ad_st_entry negative[] = {{"z", AD_DTYPE_F32, 1, {-2}, a}};
    char path[256];
    struct ad_err err;

    snprintf(path, sizeof(path), "%s/refused.safetensors", dir);
    CHECK_INT(ad_st_write(path, dup, 3, NULL, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "'x.weight' appears twice");
    CHECK_INT(access(path, F_OK), ==, -1);
    CHECK_INT(ad_st_write(path, reserved, 1, NULL, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "reserved");
    CHECK_INT(ad_st_write(path, not_utf8, 1, NULL, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "UTF-8");
    CHECK_INT(ad_st_write(path, negative, 1, NULL, &err), ==, -EINVAL);
    CHECK_INT(access(path, F_OK), ==, -1);
    /* the first two alone are fine */
    CHECK_INT(ad_st_write(path, dup, 2, NULL, &err), ==, 0);
    unlink(path);
}

int main(void)
{
    CHECK(mkdtemp(dir));
    test_round_trip();
    test_malformed();
    test_layout();
    test_nonfinite();
    test_half();
    test_write_refusals();
    rmdir(dir);
    printf("safetensors: ok\n");
    return 0;
}
