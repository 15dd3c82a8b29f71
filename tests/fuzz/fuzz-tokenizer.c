/* Fuzz target: the tokenizer. The first input byte picks the mode:
 *   odd:  the rest is a tokenizer.json, optionally followed by a NUL byte and a text; the file is
 *         loaded and, if it loads, the text (and a fixed sample) is encoded, decoded and
 *         stream-decoded;
 *   even: the rest is text (any bytes) for three fixed tokenizers (byte-level BPE, SentencePiece
 *         style BPE, and one with many components), with two invariants checked: a byte-level
 *         tokenizer with all 256 bytes round-trips any text (after U+FFFD replacement), and the
 *         streaming decode equals decode(); the bytes also serve as token ids to decode. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char SPM[] =
    "{\"added_tokens\":[{\"id\":0,\"content\":\"<unk>\",\"special\":true},"
    "{\"id\":1,\"content\":\"<s>\",\"special\":true,\"normalized\":false},"
    "{\"id\":2,\"content\":\"</s>\",\"special\":true,\"normalized\":false,\"rstrip\":true}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":"
    "\"\xe2\x96\x81\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":"
    "\"\xe2\x96\x81\"}]},\"pre_tokenizer\":null,"
    "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":"
    "\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":"
    "{\"<s>\":{\"id\":\"<s>\",\"ids\":[1],\"tokens\":[\"<s>\"]}}},"
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"
    "{\"String\":\"\xe2\x96\x81\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":"
    "\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,"
    "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2,\"<0xE4>\":3,\"<0xBD>\":4,\"<0xA0>\":5,"
    "\"<0x0A>\":6,\"\xe2\x96\x81\":7,\"a\":8,\"b\":9,\"\xe2\x96\x81""a\":10,\"ab\":11,"
    "\"\xe2\x96\x81""ab\":12},\"merges\":[\"\xe2\x96\x81 a\",\"\xe2\x96\x81""a b\",\"a b\"]}}";

static const char MANY[] =
    "{\"added_tokens\":[{\"id\":0,\"content\":\"[X]\",\"special\":true,\"lstrip\":true,"
    "\"rstrip\":true,\"normalized\":false},{\"id\":1,\"content\":\"ab\",\"single_word\":true,"
    "\"normalized\":true}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"NFKC\"},{\"type\":"
    "\"Lowercase\"},{\"type\":\"Strip\",\"strip_left\":true,\"strip_right\":false},{\"type\":"
    "\"Replace\",\"pattern\":{\"Regex\":\"\\\\s+\"},\"content\":\" \"}]},"
    "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Digits\","
    "\"individual_digits\":false},{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\p{P}+\"},"
    "\"behavior\":\"MergedWithNext\",\"invert\":false},{\"type\":\"Punctuation\"},{\"type\":"
    "\"Metaspace\",\"replacement\":\"_\",\"prepend_scheme\":\"first\",\"split\":true}]},"
    "\"post_processor\":{\"type\":\"RobertaProcessing\",\"cls\":[\"[X]\",0],\"sep\":[\"[X]\",0]},"
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Metaspace\",\"replacement\":"
    "\"_\",\"prepend_scheme\":\"always\"},{\"type\":\"BPEDecoder\",\"suffix\":\"</w>\"}]},"
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"?\",\"continuing_subword_prefix\":\"##\","
    "\"end_of_word_suffix\":\"</w>\",\"vocab\":{\"?\":2,\"_\":3,\"a\":4,\"##b\":5,\"ab\":6,"
    "\"a</w>\":7,\"##b</w>\":8,\"ab</w>\":9,\"_</w>\":10,\"1\":11,\"##2\":12,\"12\":13},"
    "\"merges\":[\"a ##b\",\"a ##b</w>\",\"1 ##2\"]}}";

static struct ad_tokenizer *fixed[3];

static char *byte_level_json(void)
{
    /* all 256 byte-level characters, a few merges, one added token */
    size_t cap = 16384, len = 0;
    char *j = malloc(cap);
    int n;

    if (!j)
        abort();
    n = snprintf(j, cap, "{\"added_tokens\":[{\"id\":260,\"content\":\"<|e|>\",\"special\":true,"
                         "\"normalized\":false}],\"pre_tokenizer\":{\"type\":\"ByteLevel\","
                         "\"add_prefix_space\":false},\"decoder\":{\"type\":\"ByteLevel\"},"
                         "\"model\":{\"type\":\"BPE\",\"vocab\":{");
    len = (size_t)n;
    for (int b = 0; b < 256; b++) {
        unsigned cp = (unsigned)b;
        if (!((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae))) {
            int k = 0;
            for (int x = 0; x < b; x++)
                k += !((x >= 0x21 && x <= 0x7e) || (x >= 0xa1 && x <= 0xac) || (x >= 0xae));
            cp = 0x100u + (unsigned)k;
        }
        n = snprintf(j + len, cap - len, "\"\\u%04x\":%d,", cp, b);
        len += (size_t)n;
    }
    /* contiguous ids: the added token takes the next one (260), as Hugging Face assigns it */
    snprintf(j + len, cap - len, "\"\\u0120t\":256,\"he\":257,\"\\u0120the\":258,"
                                 "\"\\u00c3\\u00a4\":259},\"merges\":[\"\\u0120 t\",\"h e\","
                                 "\"\\u0120t he\",\"\\u00c3 \\u00a4\"]}}");
    return j;
}

static void init(void)
{
    struct ad_err err;
    char *bl = byte_level_json();
    const char *src[3] = {bl, SPM, MANY};

    for (int i = 0; i < 3; i++) {
        if (ad_tokenizer_load_json(src[i], strlen(src[i]), NULL, 0, &fixed[i], &err) < 0) {
            fprintf(stderr, "fuzz-tokenizer: fixed tokenizer %d: %s\n", i, err.msg);
            abort();
        }
    }
    free(bl);
}

/* Whether s is well-formed UTF-8 (independent of the tokenizer's own code). */
static int valid_utf8(const unsigned char *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        unsigned char c = s[i], lo = 0x80, hi = 0xbf;
        size_t n;
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c >= 0xc2 && c <= 0xdf)
            n = 2;
        else if (c >= 0xe0 && c <= 0xef) {
            n = 3;
            lo = c == 0xe0 ? 0xa0 : 0x80;
            hi = c == 0xed ? 0x9f : 0xbf;
        } else if (c >= 0xf0 && c <= 0xf4) {
            n = 4;
            lo = c == 0xf0 ? 0x90 : 0x80;
            hi = c == 0xf4 ? 0x8f : 0xbf;
        } else
            return 0;
        if (len - i < n)
            return 0;
        for (size_t k = 1; k < n; k++, lo = 0x80, hi = 0xbf)
            if (s[i + k] < lo || s[i + k] > hi)
                return 0;
        i += n;
    }
    return 1;
}

static void check_stream(const struct ad_tokenizer *tok, const int32_t *ids, size_t n)
{
    struct ad_detok d;
    char *want = NULL, *got = NULL;
    size_t wl = 0, gl = 0;

    if (ad_tokenizer_decode(tok, ids, n, false, &want, &wl) < 0)
        return;
    ad_detok_init(&d, tok, false);
    for (size_t i = 0; i <= n; i++) {
        const char *t;
        size_t tl;
        if ((i < n ? ad_detok_push(&d, ids[i], &t, &tl) : ad_detok_finish(&d, &t, &tl)) < 0)
            goto out;
        char *ng = realloc(got, gl + tl + 1);
        if (!ng)
            goto out;
        got = ng;
        memcpy(got + gl, t, tl);
        gl += tl;
    }
    if (gl != wl || (gl && memcmp(got, want, gl) != 0)) {
        fprintf(stderr, "fuzz-tokenizer: streaming decode differs from decode\n");
        abort();
    }
out:
    ad_detok_fini(&d);
    free(want);
    free(got);
}

static void exercise(const struct ad_tokenizer *tok, const char *text, size_t len, int idx)
{
    struct ad_err err;
    int32_t *ids;
    size_t n;

    for (int special = 0; special < 2; special++) {
        if (ad_tokenizer_encode(tok, text, len, special, &ids, &n, &err) < 0)
            continue;
        check_stream(tok, ids, n);
        if (idx == 0 && !special) {
            /* byte-level with every byte: decode(encode(x)) is x with U+FFFD replacements */
            char *back;
            size_t bl;
            int32_t *ids2;
            size_t n2;
            if (ad_tokenizer_decode(tok, ids, n, false, &back, &bl) == 0) {
                if (ad_tokenizer_encode(tok, back, bl, false, &ids2, &n2, &err) == 0) {
                    char *back2;
                    size_t bl2;
                    if (ad_tokenizer_decode(tok, ids2, n2, false, &back2, &bl2) == 0) {
                        if (bl2 != bl || memcmp(back, back2, bl) != 0) {
                            fprintf(stderr, "fuzz-tokenizer: round trip is not stable\n");
                            abort();
                        }
                        free(back2);
                    }
                    free(ids2);
                }
                if (valid_utf8((const unsigned char *)text, len) &&
                    (bl != len || memcmp(back, text, len) != 0)) {
                    fprintf(stderr, "fuzz-tokenizer: byte-level round trip failed\n");
                    abort();
                }
                free(back);
            }
        }
        free(ids);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!fixed[0])
        init();
    if (size == 0)
        return 0;
    if (data[0] & 1) {
        const char *json = (const char *)data + 1;
        size_t jl = size - 1, tl = 0;
        const char *nul = memchr(json, '\0', jl), *text = "Hello world! <s> 123 \xe4\xbd\xa0";
        struct ad_tokenizer *tok = NULL;
        struct ad_err err;
        if (nul) {
            text = nul + 1;
            tl = jl - (size_t)(text - json);
            jl = (size_t)(nul - json);
        } else {
            tl = strlen(text);
        }
        if (ad_tokenizer_load_json(json, jl, NULL, 0, &tok, &err) < 0)
            return 0;
        exercise(tok, text, tl, 1);
        int32_t ids[64];
        size_t n = 0;
        for (size_t i = 0; i + 1 < tl && n < 64; i += 2)
            ids[n++] = (int32_t)(((unsigned char)text[i] << 8 | (unsigned char)text[i + 1]) %
                                 (ad_tokenizer_n_vocab(tok) + 3)) - 1;
        check_stream(tok, ids, n);
        ad_tokenizer_free(tok);
        return 0;
    }
    for (int i = 0; i < 3; i++) {
        int32_t ids[128];
        size_t n = 0, nv = ad_tokenizer_n_vocab(fixed[i]);
        exercise(fixed[i], (const char *)data + 1, size - 1, i);
        for (size_t k = 1; k < size && n < 128; k++)
            ids[n++] = (int32_t)(data[k] % (nv + 2)) - 1;
        check_stream(fixed[i], ids, n);
    }
    return 0;
}
