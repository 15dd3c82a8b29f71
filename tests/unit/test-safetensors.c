/* safetensors: write/read round trip, every malformed-header error, half-float conversions
 * against IEEE 754 bit patterns. */
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
    };
    static const char *const meta[] = {"format", "pt", NULL};
    char path[256];
    struct ad_err err;
    struct ad_st_file *f;
    float out[6];

    snprintf(path, sizeof(path), "%s/x.safetensors", dir);
    CHECK_INT(ad_st_write(path, e, 3, meta, &err), ==, 0);
    CHECK_INT(ad_st_open(path, &f, &err), ==, 0);
    CHECK_INT(ad_st_n_tensors(f), ==, 3);
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
    test_half();
    test_write_refusals();
    rmdir(dir);
    printf("safetensors: ok\n");
    return 0;
}
