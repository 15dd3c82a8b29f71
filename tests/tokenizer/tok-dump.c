/* tok-dump: encodes and decodes a corpus with adapterd's tokenizer, for the parity test.
 *
 *   tok-dump TOKENIZER CORPUS
 *
 * TOKENIZER is a model directory (tokenizer.json + tokenizer_config.json) or a tokenizer.json
 * file. CORPUS holds records: a 4-byte little-endian length, then that many bytes (any bytes).
 * For each record one JSON line goes to stdout:
 *   {"p":[ids without special tokens],"s":[ids with them],"d":"decode(s)","k":"decode(s,
 *    skip special)","r":"decode(p)","t":streaming decode of s equals decode(s) (0/1)}
 * or {"e":"error message"} if encoding failed. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

static void put_json_string(FILE *f, const char *s, size_t len)
{
    fputc('"', f);
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

static void put_ids(FILE *f, const int32_t *ids, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++)
        fprintf(f, i ? ",%d" : "%d", ids[i]);
    fputc(']', f);
}

static int stream_matches(const struct ad_tokenizer *tok, const int32_t *ids, size_t n,
                          const char *want, size_t want_len)
{
    struct ad_detok d;
    char *got = NULL;
    size_t len = 0;
    int ok = 0;

    ad_detok_init(&d, tok, false);
    for (size_t i = 0; i <= n; i++) {
        const char *t;
        size_t tl;
        int r = i < n ? ad_detok_push(&d, ids[i], &t, &tl) : ad_detok_finish(&d, &t, &tl);
        if (r < 0)
            goto out;
        char *ng = realloc(got, len + tl + 1);
        if (!ng)
            goto out;
        got = ng;
        memcpy(got + len, t, tl);
        len += tl;
    }
    ok = len == want_len && (len == 0 || memcmp(got, want, len) == 0);
out:
    free(got);
    ad_detok_fini(&d);
    return ok;
}

int main(int argc, char **argv)
{
    struct ad_tokenizer *tok = NULL;
    struct ad_err err = {0};
    struct stat st;
    char *corpus = NULL;
    size_t clen = 0, pos = 0;
    int r;

    if (argc != 3) {
        fprintf(stderr, "usage: %s TOKENIZER CORPUS\n", argv[0]);
        return 2;
    }
    if (stat(argv[1], &st) == 0 && S_ISDIR(st.st_mode)) {
        r = ad_tokenizer_load(argv[1], &tok, &err);
    } else {
        char *json;
        size_t len;
        r = ad_read_file(argv[1], AD_TOKENIZER_MAX_JSON, &json, &len, &err);
        if (r >= 0) {
            r = ad_tokenizer_load_json(json, len, NULL, 0, &tok, &err);
            free(json);
        }
    }
    if (r < 0) {
        fprintf(stderr, "tok-dump: %s: %s\n", argv[1], err.msg);
        return 1;
    }
    r = ad_read_file(argv[2], 1u << 30, &corpus, &clen, &err);
    if (r < 0) {
        fprintf(stderr, "tok-dump: %s\n", err.msg);
        ad_tokenizer_free(tok);
        return 1;
    }
    while (pos + 4 <= clen) {
        const unsigned char *h = (const unsigned char *)corpus + pos;
        size_t n = (size_t)h[0] | (size_t)h[1] << 8 | (size_t)h[2] << 16 | (size_t)h[3] << 24;
        int32_t *p = NULL, *s = NULL;
        size_t np = 0, ns = 0, dl = 0, kl = 0, rl = 0;
        char *d = NULL, *k = NULL, *rt = NULL;

        pos += 4;
        if (n > clen - pos) {
            fprintf(stderr, "tok-dump: truncated corpus\n");
            break;
        }
        r = ad_tokenizer_encode(tok, corpus + pos, n, false, &p, &np, &err);
        if (r >= 0)
            r = ad_tokenizer_encode(tok, corpus + pos, n, true, &s, &ns, &err);
        if (r >= 0)
            r = ad_tokenizer_decode(tok, s, ns, false, &d, &dl);
        if (r >= 0)
            r = ad_tokenizer_decode(tok, s, ns, true, &k, &kl);
        if (r >= 0)
            r = ad_tokenizer_decode(tok, p, np, false, &rt, &rl);
        if (r < 0) {
            fputs("{\"e\":", stdout);
            put_json_string(stdout, err.msg, strlen(err.msg));
            fputs("}\n", stdout);
        } else {
            fputs("{\"p\":", stdout);
            put_ids(stdout, p, np);
            fputs(",\"s\":", stdout);
            put_ids(stdout, s, ns);
            fputs(",\"d\":", stdout);
            put_json_string(stdout, d, dl);
            fputs(",\"k\":", stdout);
            put_json_string(stdout, k, kl);
            fputs(",\"r\":", stdout);
            put_json_string(stdout, rt, rl);
            fprintf(stdout, ",\"t\":%d}\n", stream_matches(tok, s, ns, d, dl));
        }
        free(p);
        free(s);
        free(d);
        free(k);
        free(rt);
        pos += n;
    }
    free(corpus);
    ad_tokenizer_free(tok);
    return fflush(stdout) == 0 ? 0 : 1;
}
