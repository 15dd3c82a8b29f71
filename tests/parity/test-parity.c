/* Runs adapterd's forward pass over a case written by reference.py and compares the logits with
 * PyTorch's: prefill for a batch of sequences of different lengths, then 16 decode steps through
 * the KV cache. Each case runs three ways: whole prompts in one batch; prompts split into two
 * chunks over two passes (second pass mixing sequences); and with a small KV block size.
 *
 *   test-parity CASE_DIR   -> prints the max |difference| per mode; exit 1 above 1e-4 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#include "../check.h"
#include "../reference.h"
#include "adapterd/model.h"
#include "adapterd/util.h"

#define TOL 1e-4

/* mode 0: one pass; mode 1: two chunks per prompt; block size 16, or 3 in mode 2. */
static double run(const struct ad_model *m, json_t *ref, int mode, const float *want_prefill,
                  const float *want_decode)
{
    json_t *prompts = json_object_get(ref, "prompts"), *decode = json_object_get(ref, "decode");
    int n_seq = (int)json_array_size(prompts), V = m->cfg.n_vocab;
    int n_steps = (int)json_integer_value(json_object_get(ref, "n_steps"));
    struct ad_kv kv;
    struct ad_err err;
    struct ad_scratch *s = ad_scratch_new();
    struct ad_kv_seq *seqs = calloc((size_t)n_seq, sizeof(*seqs));
    struct ad_chunk *chunks = calloc((size_t)n_seq * 2, sizeof(*chunks));
    int32_t **toks = calloc((size_t)n_seq, sizeof(*toks));
    int *len = calloc((size_t)n_seq, sizeof(*len));
    size_t total = 0;
    double worst = 0;

    CHECK(s && seqs && chunks && toks && len);
    CHECK_INT(ad_kv_init(&kv, &m->cfg, 512, mode == 2 ? 3 : 16), ==, 0);
    for (int i = 0; i < n_seq; i++) {
        json_t *p = json_array_get(prompts, (size_t)i);
        len[i] = (int)json_array_size(p);
        toks[i] = calloc((size_t)len[i], sizeof(int32_t));
        for (int j = 0; j < len[i]; j++)
            toks[i][j] = (int32_t)json_integer_value(json_array_get(p, (size_t)j));
        total += (size_t)len[i];
    }
    float *logits = calloc(total * (size_t)V, sizeof(float));
    CHECK(logits);

    /* Prefill. In mode 1 the first pass takes the first half of every prompt of length > 1,
     * the second pass the rest (and the 1-token prompts). */
    int n_chunks = 0;
    if (mode == 1) {
        for (int i = 0; i < n_seq; i++)
            if (len[i] > 1)
                chunks[n_chunks++] = (struct ad_chunk){.seq = &seqs[i], .tokens = toks[i], .n_tokens = len[i] / 2, .all_logits = true};
        int n_out = ad_batch_n_logits(chunks, n_chunks);
        float *first = calloc((size_t)n_out * (size_t)V, sizeof(float));
        CHECK(first);
        if (ad_model_forward(m, &kv, chunks, n_chunks, NULL, s, first, &err) < 0) {
            fprintf(stderr, "forward: %s\n", err.msg);
            exit(1);
        }
        /* compare the first halves in place */
        size_t off = 0, got = 0;
        for (int i = 0; i < n_seq; i++) {
            if (len[i] > 1) {
                double d = max_diff(first + got * V, want_prefill + off * V,
                                    (size_t)(len[i] / 2) * V);
                worst = d > worst ? d : worst;
                got += (size_t)(len[i] / 2);
            }
            off += (size_t)len[i];
        }
        free(first);
        n_chunks = 0;
        for (int i = 0; i < n_seq; i++) {
            int done = len[i] > 1 ? len[i] / 2 : 0;
            chunks[n_chunks++] = (struct ad_chunk){.seq = &seqs[i], .tokens = toks[i] + done, .n_tokens = len[i] - done, .all_logits = true};
        }
    } else {
        for (int i = 0; i < n_seq; i++)
            chunks[n_chunks++] = (struct ad_chunk){.seq = &seqs[i], .tokens = toks[i], .n_tokens = len[i], .all_logits = true};
    }
    if (ad_model_forward(m, &kv, chunks, n_chunks, NULL, s, logits, &err) < 0) {
        fprintf(stderr, "forward: %s\n", err.msg);
        exit(1);
    }
    size_t off = 0, got = 0;
    for (int i = 0; i < n_seq; i++) {
        int done = mode == 1 && len[i] > 1 ? len[i] / 2 : 0;
        double d = max_diff(logits + got * V, want_prefill + (off + (size_t)done) * V,
                            (size_t)(len[i] - done) * V);
        worst = d > worst ? d : worst;
        got += (size_t)(len[i] - done);
        off += (size_t)len[i];
    }

    /* Decode: every sequence one token per pass, all in one batch. */
    int32_t *step_tok = calloc((size_t)n_seq, sizeof(int32_t));
    for (int t = 0; t < n_steps; t++) {
        for (int i = 0; i < n_seq; i++) {
            step_tok[i] = (int32_t)json_integer_value(
                json_array_get(json_array_get(decode, (size_t)i), (size_t)t));
            chunks[i] = (struct ad_chunk){.seq = &seqs[i], .tokens = &step_tok[i], .n_tokens = 1};
        }
        if (ad_model_forward(m, &kv, chunks, n_seq, NULL, s, logits, &err) < 0) {
            fprintf(stderr, "forward: %s\n", err.msg);
            exit(1);
        }
        double d = max_diff(logits, want_decode + (size_t)t * n_seq * V, (size_t)n_seq * V);
        worst = d > worst ? d : worst;
    }

    for (int i = 0; i < n_seq; i++) {
        ad_kv_seq_release(&kv, &seqs[i]);
        free(toks[i]);
    }
    CHECK_INT(kv.n_free, ==, kv.n_blocks); /* every block came back */
    ad_kv_fini(&kv);
    ad_scratch_free(s);
    free(step_tok);
    free(logits);
    free(seqs);
    free(chunks);
    free(toks);
    free(len);
    return worst;
}

int main(int argc, char **argv)
{
    struct ad_model *m;
    struct ad_err err;
    json_error_t jerr;
    char path[4096];

    if (argc != 2) {
        fprintf(stderr, "usage: test-parity CASE_DIR\n");
        return 2;
    }
    if (ad_model_load(argv[1], &m, &err) < 0) {
        fprintf(stderr, "load: %s\n", err.msg);
        return 1;
    }
    CHECK(ad_path_join(path, sizeof(path), argv[1], "ref.json") == 0);
    json_t *ref = json_load_file(path, 0, &jerr);
    if (!ref) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return 1;
    }
    CHECK_INT(json_integer_value(json_object_get(ref, "n_vocab")), ==, m->cfg.n_vocab);
    size_t total = 0, n_seq = json_array_size(json_object_get(ref, "prompts"));
    for (size_t i = 0; i < n_seq; i++)
        total += json_array_size(json_array_get(json_object_get(ref, "prompts"), i));
    size_t n_steps = (size_t)json_integer_value(json_object_get(ref, "n_steps"));
    float *pre = read_f32(argv[1], "prefill.f32", total * (size_t)m->cfg.n_vocab);
    float *dec = read_f32(argv[1], "decode.f32", n_steps * n_seq * (size_t)m->cfg.n_vocab);

    static const char *const modes[] = {"one pass", "two chunks", "block size 3"};
    int fail = 0;
    for (int mode = 0; mode < 3; mode++) {
        double d = run(m, ref, mode, pre, dec);
        printf("%-28s %-13s max |diff| %.3g %s\n", m->id, modes[mode], d,
               d <= TOL ? "ok" : "FAIL");
        fail |= !(d <= TOL);
    }
    free(pre);
    free(dec);
    json_decref(ref);
    ad_model_free(m);
    return fail;
}
