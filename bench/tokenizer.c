/* bench-tokenizer: encode and decode throughput (MB/s of text) of adapterd's tokenizer and of
 * the Hugging Face native binding (bench/tokenizer.js, run by this program) on the same text
 * cut into the same chunks, printed as one table.
 *
 *   bench-tokenizer TOKENIZER_DIR TEXT_FILE [CHUNK_BYTES] [--no-ref] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

#ifndef BENCH_JS
#define BENCH_JS "bench/tokenizer.js"
#endif

struct chunk {
    const char *s;
    size_t len;
    int32_t *ids;
    size_t n;
};

struct job {
    const struct ad_tokenizer *tok;
    struct chunk *c;
    size_t from, to;
    int decode;
};

static void *run(void *p)
{
    struct job *j = p;
    struct ad_err err;

    for (size_t i = j->from; i < j->to; i++) {
        struct chunk *c = &j->c[i];
        if (j->decode) {
            char *s;
            if (ad_tokenizer_decode(j->tok, c->ids, c->n, false, &s, NULL) == 0)
                free(s);
        } else {
            free(c->ids);
            c->ids = NULL;
            if (ad_tokenizer_encode(j->tok, c->s, c->len, false, &c->ids, &c->n, &err) < 0) {
                fprintf(stderr, "bench-tokenizer: %s\n", err.msg);
                exit(1);
            }
        }
    }
    return NULL;
}

/* Seconds per pass over all chunks, with `threads` threads, repeated for at least 1 s. */
static double timeit(const struct ad_tokenizer *tok, struct chunk *c, size_t n, int threads,
                     int decode)
{
    double t0 = ad_now(), t;
    int reps = 0;

    do {
        pthread_t th[8];
        struct job jobs[8];
        for (int k = 0; k < threads; k++) {
            jobs[k] = (struct job){tok, c, n * (size_t)k / (size_t)threads,
                                   n * (size_t)(k + 1) / (size_t)threads, decode};
            pthread_create(&th[k], NULL, run, &jobs[k]);
        }
        for (int k = 0; k < threads; k++)
            pthread_join(th[k], NULL);
        reps++;
        t = ad_now() - t0;
    } while (t < 1.0);
    return t / reps;
}

int main(int argc, char **argv)
{
    struct ad_tokenizer *tok;
    struct ad_err err;
    char *text, path[4200], cmd[8600], line[512];
    size_t len, n = 0, cap = 0, chunk = 4096, tokens = 0;
    struct chunk *c = NULL;
    int no_ref = argc > 1 && strcmp(argv[argc - 1], "--no-ref") == 0;
    double ref[4] = {0};
    unsigned long ref_tokens = 0;

    if (no_ref)
        argc--;
    if (argc < 3) {
        fprintf(stderr, "usage: %s TOKENIZER_DIR TEXT_FILE [CHUNK_BYTES] [--no-ref]\n",
                argv[0]);
        return 2;
    }
    if (argc > 3)
        chunk = strtoul(argv[3], NULL, 10);
    if (chunk == 0)
        chunk = 4096;
    double t_load = ad_now();
    if (ad_tokenizer_load(argv[1], &tok, &err) < 0) {
        fprintf(stderr, "bench-tokenizer: %s\n", err.msg);
        return 1;
    }
    t_load = ad_now() - t_load;
    if (ad_read_file(argv[2], 1u << 30, &text, &len, &err) < 0) {
        fprintf(stderr, "bench-tokenizer: %s\n", err.msg);
        return 1;
    }
    for (size_t start = 0; start < len;) {
        size_t end = start + chunk < len ? start + chunk : len;
        while (end < len && text[end - 1] != '\n')
            end++;
        if (n == cap) {
            cap = cap ? cap * 2 : 1024;
            c = realloc(c, cap * sizeof(*c));
            if (!c)
                return 1;
        }
        c[n++] = (struct chunk){text + start, end - start, NULL, 0};
        start = end;
    }
    double mb = (double)len / 1e6;
    double e1 = timeit(tok, c, n, 1, 0), e2 = timeit(tok, c, n, 2, 0);
    double d1 = timeit(tok, c, n, 1, 1), d2 = timeit(tok, c, n, 2, 1);
    for (size_t i = 0; i < n; i++)
        tokens += c[i].n;

    if (!no_ref) {
        FILE *p;
        if (ad_path_join(path, sizeof(path), argv[1], "tokenizer.json") < 0)
            return 1;
        snprintf(cmd, sizeof(cmd), "node '%s' '%s' '%s' %zu", BENCH_JS, path, argv[2], chunk);
        p = popen(cmd, "r");
        if (!p || !fgets(line, sizeof(line), p) ||
            sscanf(line, "ref %lf %lf %lf %lf %lu", &ref[0], &ref[1], &ref[2], &ref[3],
                   &ref_tokens) != 5) {
            fprintf(stderr, "bench-tokenizer: the reference did not run (%s)\n", cmd);
            no_ref = 1;
        }
        if (p)
            pclose(p);
    }
    printf("text: %s, %.2f MB in %zu chunks of ~%zu bytes; %zu tokens (%.2f bytes/token); "
           "load %.2f s\n", argv[2], mb, n, chunk, tokens, (double)len / (double)tokens,
           t_load);
    if (!no_ref && ref_tokens != tokens)
        printf("WARNING: the reference produced %lu tokens\n", ref_tokens);
    printf("%-36s %12s %12s\n", "MB/s of text", "encode", "decode");
    printf("%-36s %12.2f %12.2f\n", "adapterd, 1 thread", mb / e1, mb / d1);
    printf("%-36s %12.2f %12.2f\n", "adapterd, 2 threads", mb / e2, mb / d2);
    if (!no_ref) {
        printf("%-36s %12.2f %12.2f\n", "HF native binding, one call each", ref[0], ref[2]);
        printf("%-36s %12.2f %12.2f\n", "HF native binding, batch (rayon)", ref[1], ref[3]);
    }
    for (size_t i = 0; i < n; i++)
        free(c[i].ids);
    free(c);
    free(text);
    ad_tokenizer_free(tok);
    return 0;
}
