/* Unit tests of the tokenizer on small in-memory tokenizer.json files: loading errors, added
 * tokens, byte fallback, decoding, streaming, invalid UTF-8, concurrent use. Parity with the
 * Hugging Face library on real files is parity.js's job. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

static int failures;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);          \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

#define CHECK_INT(a, b)                                                                       \
    do {                                                                                      \
        long long va_ = (long long)(a), vb_ = (long long)(b);                                 \
        if (va_ != vb_) {                                                                     \
            fprintf(stderr, "%s:%d: %s == %lld, expected %s == %lld\n", __FILE__, __LINE__,   \
                    #a, va_, #b, vb_);                                                        \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

#define CHECK_STR(a, b)                                                                       \
    do {                                                                                      \
        const char *sa_ = (a), *sb_ = (b);                                                    \
        if (!sa_ || strcmp(sa_, sb_) != 0) {                                                  \
            fprintf(stderr, "%s:%d: %s == '%s', expected '%s'\n", __FILE__, __LINE__, #a,     \
                    sa_ ? sa_ : "(null)", sb_);                                               \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

/* A tiny byte-level BPE: "h e l l o" merges, GPT-2 style, with added tokens. */
static const char BYTELEVEL[] =
    "{\"version\":\"1.0\",\"added_tokens\":["
    "{\"id\":0,\"content\":\"<|end|>\",\"special\":true,\"normalized\":false},"
    "{\"id\":99,\"content\":\"<mask>\",\"special\":true,\"lstrip\":true,\"normalized\":false}],"
    "\"normalizer\":null,"
    "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true},"
    "\"post_processor\":{\"type\":\"TemplateProcessing\","
    "\"single\":[{\"SpecialToken\":{\"id\":\"<|end|>\",\"type_id\":0}},"
    "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],"
    "\"special_tokens\":{\"<|end|>\":{\"id\":\"<|end|>\",\"ids\":[0],\"tokens\":[\"<|end|>\"]}}},"
    "\"decoder\":{\"type\":\"ByteLevel\"},"
    "\"model\":{\"type\":\"BPE\",\"vocab\":{\"<|end|>\":0,\"h\":1,\"e\":2,\"l\":3,\"o\":4,"
    "\"he\":5,\"ll\":6,\"hell\":7,\"hello\":8,\"\xc4\xa0\":9,\"\xc3\xa4\":10,\"\xc3\x83\":11,"
    "\"\xc2\xa4\":12,\"\xc3\x83\xc2\xa4\":13},"
    "\"merges\":[\"h e\",\"l l\",\"he ll\",[\"hell\",\"o\"],\"\xc3\x83 \xc2\xa4\"]}}";

/* A SentencePiece-style BPE with byte fallback. */
static const char SPM[] =
    "{\"added_tokens\":[{\"id\":0,\"content\":\"<unk>\",\"special\":true},"
    "{\"id\":1,\"content\":\"<s>\",\"special\":true,\"normalized\":false}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":"
    "\"\xe2\x96\x81\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":"
    "\"\xe2\x96\x81\"}]},\"pre_tokenizer\":null,"
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"
    "{\"String\":\"\xe2\x96\x81\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":"
    "\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,"
    "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"<0xE4>\":2,\"<0xBD>\":3,\"<0xA0>\":4,\"\xe2\x96\x81\":5,"
    "\"a\":6,\"b\":7,\"\xe2\x96\x81""a\":8,\"ab\":9,\"\xe2\x96\x81""ab\":10},"
    "\"merges\":[\"\xe2\x96\x81 a\",\"\xe2\x96\x81""a b\",\"a b\"]}}";

static const char CONFIG[] = "{\"bos_token\":{\"content\":\"<|end|>\"},\"eos_token\":\"<mask>\","
                             "\"add_bos_token\":true,\"chat_template\":\"{{ messages }}\"}";

static struct ad_tokenizer *load(const char *json, const char *cfg)
{
    struct ad_tokenizer *tok = NULL;
    struct ad_err err = {0};
    int r = ad_tokenizer_load_json(json, strlen(json), cfg, cfg ? strlen(cfg) : 0, &tok, &err);

    if (r < 0) {
        fprintf(stderr, "load failed: %d %s\n", r, err.msg);
        failures++;
        return NULL;
    }
    return tok;
}

static size_t encode(const struct ad_tokenizer *tok, const char *s, size_t len, bool special,
                     int32_t *out, size_t cap)
{
    int32_t *ids;
    size_t n;
    struct ad_err err;

    if (ad_tokenizer_encode(tok, s, len, special, &ids, &n, &err) < 0) {
        fprintf(stderr, "encode failed: %s\n", err.msg);
        failures++;
        return 0;
    }
    memcpy(out, ids, (n < cap ? n : cap) * sizeof(*ids));
    free(ids);
    return n;
}

static char *decode(const struct ad_tokenizer *tok, const int32_t *ids, size_t n, bool skip)
{
    char *s = NULL;
    CHECK_INT(ad_tokenizer_decode(tok, ids, n, skip, &s, NULL), 0);
    return s;
}

static char *stream(const struct ad_tokenizer *tok, const int32_t *ids, size_t n)
{
    struct ad_detok d;
    char *all = calloc(1, 1);
    size_t len = 0;

    ad_detok_init(&d, tok, false);
    for (size_t i = 0; i <= n; i++) {
        const char *t;
        size_t tl;
        int r = i < n ? ad_detok_push(&d, ids[i], &t, &tl) : ad_detok_finish(&d, &t, &tl);
        CHECK_INT(r, 0);
        if (r < 0)
            break;
        /* every piece is whole characters: it never ends inside a UTF-8 sequence */
        if (tl) {
            size_t k = tl;
            while (k > 0 && ((unsigned char)t[k - 1] & 0xc0) == 0x80)
                k--;
            if (k > 0) {
                unsigned char c = (unsigned char)t[k - 1];
                size_t need = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
                CHECK_INT(tl - (k - 1), need);
            }
        }
        all = realloc(all, len + tl + 1);
        memcpy(all + len, t, tl);
        len += tl;
        all[len] = '\0';
    }
    ad_detok_fini(&d);
    return all;
}

static void test_bytelevel(void)
{
    struct ad_tokenizer *tok = load(BYTELEVEL, CONFIG);
    int32_t ids[64];
    size_t n;
    char *s;

    if (!tok)
        return;
    n = encode(tok, "hello", 5, false, ids, 64);
    CHECK_INT(n, 1);
    CHECK_INT(ids[0], 8);
    n = encode(tok, "hello", 5, true, ids, 64);
    CHECK_INT(n, 2);
    CHECK_INT(ids[0], 0);
    CHECK_INT(ids[1], 8);
    /* lstrip: " <mask>" takes the space; the added id follows the vocabulary size */
    n = encode(tok, "he <mask>", 9, false, ids, 64);
    CHECK_INT(n, 2);
    CHECK_INT(ids[0], 5);
    CHECK_INT(ids[1], 14);
    CHECK_INT(ad_tokenizer_token_to_id(tok, "<mask>", 6), 14);
    CHECK_INT(ad_tokenizer_n_vocab(tok), 15);
    CHECK(ad_tokenizer_is_special(tok, 14));
    CHECK(!ad_tokenizer_is_special(tok, 8));
    /* "ä" is bytes C3 A4 -> byte-level "Ã¤" -> merged */
    n = encode(tok, "\xc3\xa4", 2, false, ids, 64);
    CHECK_INT(n, 1);
    CHECK_INT(ids[0], 13);
    s = decode(tok, ids, n, false);
    CHECK_STR(s, "\xc3\xa4");
    free(s);
    /* half a character decodes to U+FFFD; the stream holds it back until the end */
    ids[0] = 11;
    s = decode(tok, ids, 1, false);
    CHECK_STR(s, "\xef\xbf\xbd");
    free(s);
    int32_t two[] = {11, 12, 8};
    s = stream(tok, two, 3);
    CHECK_STR(s, "\xc3\xa4hello");
    free(s);
    int32_t sp[] = {0, 8, 999, -5, 14};
    s = decode(tok, sp, 5, true);
    CHECK_STR(s, "hello");
    free(s);
    s = decode(tok, sp, 5, false);
    CHECK_STR(s, "<|end|>hello<mask>");
    free(s);
    /* invalid UTF-8 becomes U+FFFD, whose bytes this vocabulary lacks: without an unk_token
     * Hugging Face drops such characters */
    n = encode(tok, "\xff\xc3", 2, false, ids, 64);
    CHECK_INT(n, 0);
    CHECK_INT(ad_tokenizer_bos_id(tok), 0);
    CHECK_INT(ad_tokenizer_eos_id(tok), 14);
    CHECK(ad_tokenizer_add_bos(tok));
    CHECK(!ad_tokenizer_add_eos(tok));
    CHECK_STR(ad_tokenizer_chat_template(tok), "{{ messages }}");
    size_t tl;
    CHECK_STR(ad_tokenizer_id_to_token(tok, 7, &tl), "hell");
    CHECK_INT(tl, 4);
    CHECK(ad_tokenizer_id_to_token(tok, 12345, NULL) == NULL);
    ad_tokenizer_free(tok);
}

static void test_spm(void)
{
    struct ad_tokenizer *tok = load(SPM, NULL);
    int32_t ids[64];
    size_t n;
    char *s;

    if (!tok)
        return;
    n = encode(tok, "ab a", 4, true, ids, 64);
    CHECK_INT(n, 2);
    CHECK_INT(ids[0], 10);
    CHECK_INT(ids[1], 8);
    /* byte fallback for 你 (E4 BD A0), unknown (fused) for the rest */
    n = encode(tok, "\xe4\xbd\xa0zz", 5, false, ids, 64);
    CHECK_INT(n, 5);
    CHECK_INT(ids[0], 5);
    CHECK_INT(ids[1], 2);
    CHECK_INT(ids[4], 0);
    s = decode(tok, ids, n, false);
    CHECK_STR(s, "\xe4\xbd\xa0<unk>");
    free(s);
    s = stream(tok, ids, n);
    CHECK_STR(s, "\xe4\xbd\xa0<unk>");
    free(s);
    /* an incomplete byte group decodes to one U+FFFD per byte */
    int32_t half[] = {8, 2, 3};
    s = decode(tok, half, 3, false);
    CHECK_STR(s, "a\xef\xbf\xbd\xef\xbf\xbd");
    free(s);
    s = stream(tok, half, 3);
    CHECK_STR(s, "a\xef\xbf\xbd\xef\xbf\xbd");
    free(s);
    ad_tokenizer_free(tok);
}

static void test_errors(void)
{
    static const struct {
        const char *json;
        int code;
        const char *needle;
    } cases[] = {
        {"{", -EINVAL, "line"},
        {"[]", -EINVAL, "object"},
        {"{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", -ENOTSUP, "WordPiece"},
        {"{\"model\":{\"type\":\"Unigram\"}}", -ENOTSUP, "Unigram"},
        {"{\"normalizer\":{\"type\":\"Precompiled\"},\"model\":{\"type\":\"BPE\",\"vocab\":{},"
         "\"merges\":[]}}",
         -ENOTSUP, "Precompiled"},
        {"{\"pre_tokenizer\":{\"type\":\"UnicodeScripts\"},\"model\":{\"type\":\"BPE\","
         "\"vocab\":{},\"merges\":[]}}",
         -ENOTSUP, "UnicodeScripts"},
        {"{\"decoder\":{\"type\":\"WordPiece\"},\"model\":{\"type\":\"BPE\",\"vocab\":{},"
         "\"merges\":[]}}",
         -ENOTSUP, "WordPiece"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"a b\"]}}", -EINVAL,
         "merges[0]"},
        {"{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}}", -EINVAL, "bad id"},
        {"{\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},\"behavior\":"
         "\"Isolated\"},\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[]}}",
         -EINVAL, "regex"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct ad_tokenizer *tok = NULL;
        struct ad_err err = {0};
        int r = ad_tokenizer_load_json(cases[i].json, strlen(cases[i].json), NULL, 0, &tok,
                                       &err);
        CHECK_INT(r, cases[i].code);
        CHECK(tok == NULL);
        if (!strstr(err.msg, cases[i].needle)) {
            fprintf(stderr, "case %zu: message '%s' lacks '%s'\n", i, err.msg, cases[i].needle);
            failures++;
        }
    }
    struct ad_tokenizer *tok = NULL;
    struct ad_err err;
    CHECK_INT(ad_tokenizer_load("/nonexistent-dir", &tok, &err), -ENOENT);
}

struct thread_arg {
    const struct ad_tokenizer *tok;
    int ok;
};

static void *worker(void *p)
{
    struct thread_arg *a = p;
    static const char *texts[] = {"hello hello", "he ll o", "\xc3\xa4 hello<mask>", "hell he"};

    a->ok = 1;
    for (int it = 0; it < 2000; it++) {
        const char *t = texts[it % 4];
        int32_t *ids;
        size_t n;
        char *s;
        struct ad_err err;
        if (ad_tokenizer_encode(a->tok, t, strlen(t), false, &ids, &n, &err) < 0) {
            a->ok = 0;
            break;
        }
        if (ad_tokenizer_decode(a->tok, ids, n, false, &s, NULL) < 0 || strcmp(s, t) != 0)
            a->ok = 0;
        free(s);
        free(ids);
    }
    return NULL;
}

static void test_threads(void)
{
    struct ad_tokenizer *tok = load(BYTELEVEL, NULL);
    pthread_t th[4];
    struct thread_arg args[4];

    if (!tok)
        return;
    for (int i = 0; i < 4; i++) {
        args[i] = (struct thread_arg){.tok = tok};
        pthread_create(&th[i], NULL, worker, &args[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].ok);
    }
    ad_tokenizer_free(tok);
}

int main(void)
{
    test_bytelevel();
    test_spm();
    test_errors();
    test_threads();
    if (failures) {
        fprintf(stderr, "test-tokenizer: %d failures\n", failures);
        return 1;
    }
    printf("test-tokenizer: all passed\n");
    return 0;
}
