/* Adapter parity: loads a base written by reference.py and every adapter directory beside it
 * (PEFT's and AdapterHub's own file layouts), runs each reference run alone, then in mixed
 * batches where every sequence uses a different run's adapters, and compares all logits with
 * PyTorch's (prefill for every real token, then decode steps through the KV cache).
 *
 *   test-adapters CASE_DIR   -> one line per run and per mixed batch; exit 1 above 1e-4 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#include "../check.h"
#include "../reference.h"
#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/util.h"

#define TOL 1e-4
#define MAX_RUNS 64
#define MAX_SEQS 8

struct run {
    const char *name;
    struct ad_mix mix;
    float *prefill, *decode; /* reference logits */
};

static const char *case_dir;
static const struct ad_model *model;
static json_t *ref;
static int n_seq, n_steps, V;
static int32_t *prompts[MAX_SEQS];
static int prompt_len[MAX_SEQS];
static size_t total_prompt;

/* Runs every sequence s with runs[which[s]]'s mix in shared batches (prefill in one pass, then
 * decode steps) and returns the worst difference from each sequence's own reference. */
static double run_batch(struct run *runs, const int *which)
{
    struct ad_kv kv;
    struct ad_err err;
    struct ad_scratch *scr = ad_scratch_new();
    struct ad_kv_seq seqs[MAX_SEQS] = {{0}};
    struct ad_chunk chunks[MAX_SEQS];
    int32_t *toks[MAX_SEQS];
    int n_virt[MAX_SEQS];
    size_t rows = 0;
    double worst = 0;

    CHECK_INT(ad_kv_init(&kv, &model->cfg, 256, 4), ==, 0);
    for (int s = 0; s < n_seq; s++) {
        const struct ad_mix *mix = runs[which[s]].mix.n ? &runs[which[s]].mix : NULL;
        n_virt[s] = mix ? ad_mix_n_virtual(mix) : 0;
        toks[s] = calloc((size_t)(n_virt[s] + prompt_len[s]), sizeof(int32_t));
        for (int v = 0; v < n_virt[s]; v++)
            toks[s][v] = -1 - v; /* prompt tuning: the virtual tokens come first */
        memcpy(toks[s] + n_virt[s], prompts[s], (size_t)prompt_len[s] * sizeof(int32_t));
        chunks[s] = (struct ad_chunk){.seq = &seqs[s], .tokens = toks[s],
                                      .n_tokens = n_virt[s] + prompt_len[s], .all_logits = true,
                                      .ctx = mix};
        rows += (size_t)(n_virt[s] + prompt_len[s]);
    }
    float *logits = calloc(rows * (size_t)V, sizeof(float));
    CHECK(logits);
    if (ad_model_forward(model, &kv, chunks, n_seq, &ad_mix_hooks, scr, logits, &err) < 0) {
        fprintf(stderr, "forward: %s\n", err.msg);
        exit(1);
    }
    size_t got = 0, off = 0;
    for (int s = 0; s < n_seq; s++) {
        got += (size_t)n_virt[s]; /* the virtual tokens' logits are not compared */
        double d = max_diff(logits + got * V, runs[which[s]].prefill + off * V,
                            (size_t)prompt_len[s] * V);
        worst = d > worst ? d : worst;
        got += (size_t)prompt_len[s];
        off += (size_t)prompt_len[s];
    }

    json_t *decode = json_object_get(ref, "decode");
    int32_t step_tok[MAX_SEQS];
    for (int t = 0; t < n_steps; t++) {
        for (int s = 0; s < n_seq; s++) {
            step_tok[s] = (int32_t)json_integer_value(
                json_array_get(json_array_get(decode, (size_t)s), (size_t)t));
            chunks[s].tokens = &step_tok[s];
            chunks[s].n_tokens = 1;
            chunks[s].all_logits = false;
        }
        if (ad_model_forward(model, &kv, chunks, n_seq, &ad_mix_hooks, scr, logits, &err) < 0) {
            fprintf(stderr, "forward: %s\n", err.msg);
            exit(1);
        }
        for (int s = 0; s < n_seq; s++) {
            const float *want = runs[which[s]].decode + ((size_t)t * n_seq + (size_t)s) * V;
            double d = max_diff(logits + (size_t)s * V, want, (size_t)V);
            worst = d > worst ? d : worst;
        }
    }
    for (int s = 0; s < n_seq; s++) {
        ad_kv_seq_release(&kv, &seqs[s]);
        free(toks[s]);
    }
    CHECK_INT(kv.n_free, ==, kv.n_blocks);
    ad_kv_fini(&kv);
    ad_scratch_free(scr);
    free(logits);
    return worst;
}

int main(int argc, char **argv)
{
    static struct run runs[MAX_RUNS];
    struct ad_adapter *loaded[MAX_RUNS * AD_MIX_MAX];
    unsigned loaded_flags[MAX_RUNS * AD_MIX_MAX];
    struct ad_model *m;
    struct ad_err err;
    json_error_t jerr;
    char path[4096];
    int n_loaded = 0, fail = 0;

    if (argc != 2) {
        fprintf(stderr, "usage: test-adapters CASE_DIR\n");
        return 2;
    }
    case_dir = argv[1];
    if (ad_model_load(case_dir, &m, &err) < 0) {
        fprintf(stderr, "load: %s\n", err.msg);
        return 1;
    }
    model = m;
    V = m->cfg.n_vocab;
    CHECK(ad_path_join(path, sizeof(path), case_dir, "ref.json") == 0);
    ref = json_load_file(path, 0, &jerr);
    if (!ref) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return 1;
    }
    json_t *jp = json_object_get(ref, "prompts");
    n_seq = (int)json_array_size(jp);
    n_steps = (int)json_integer_value(json_object_get(ref, "n_steps"));
    CHECK(n_seq > 0 && n_seq <= MAX_SEQS);
    CHECK_INT(json_integer_value(json_object_get(ref, "n_vocab")), ==, V);
    for (int s = 0; s < n_seq; s++) {
        json_t *p = json_array_get(jp, (size_t)s);
        prompt_len[s] = (int)json_array_size(p);
        prompts[s] = calloc((size_t)prompt_len[s], sizeof(int32_t));
        for (int j = 0; j < prompt_len[s]; j++)
            prompts[s][j] = (int32_t)json_integer_value(json_array_get(p, (size_t)j));
        total_prompt += (size_t)prompt_len[s];
    }

    json_t *jruns = json_object_get(ref, "runs");
    int n_runs = (int)json_array_size(jruns);
    CHECK(n_runs > 0 && n_runs <= MAX_RUNS);
    for (int i = 0; i < n_runs; i++) {
        json_t *jr = json_array_get(jruns, (size_t)i), *ja = json_object_get(jr, "adapters");
        struct run *r = &runs[i];
        r->name = json_string_value(json_object_get(jr, "name"));
        const char *dtype = json_string_value(json_object_get(jr, "lora_dtype"));
        unsigned flags = dtype && !strcmp(dtype, "int8") ? AD_ADAPTER_LORA_INT8 : 0;
        for (size_t k = 0; k < json_array_size(ja); k++) {
            json_t *e = json_array_get(ja, k);
            const char *an = json_string_value(json_object_get(e, "name"));
            struct ad_adapter *a = NULL;
            for (int j = 0; j < n_loaded && !a; j++)
                if (!strcmp(loaded[j]->name, an) && loaded_flags[j] == flags)
                    a = loaded[j];
            if (!a) {
                char dir[4096];
                snprintf(dir, sizeof(dir), "%s/adapters/%s", case_dir, an);
                if (ad_adapter_load(m, dir, an, flags, &a, &err) < 0) {
                    printf("%-28s load FAIL: %s\n", r->name, err.msg);
                    fail = 1;
                    break;
                }
                loaded_flags[n_loaded] = flags;
                loaded[n_loaded++] = a;
            }
            r->mix.a[r->mix.n] = a;
            r->mix.w[r->mix.n++] = (float)json_number_value(json_object_get(e, "weight"));
        }
        if (r->mix.n && ad_mix_validate(&r->mix, &err) < 0) {
            printf("%-28s mix FAIL: %s\n", r->name, err.msg);
            fail = 1;
        }
        r->prefill = read_f32(case_dir, json_string_value(json_object_get(jr, "prefill")), total_prompt * V);
        r->decode = read_f32(case_dir, json_string_value(json_object_get(jr, "decode")),
                             (size_t)n_steps * n_seq * V);
    }
    if (fail)
        return 1;

    /* Each run alone: every sequence with the same adapters. */
    for (int i = 0; i < n_runs; i++) {
        int which[MAX_SEQS];
        for (int s = 0; s < n_seq; s++)
            which[s] = i;
        double d = run_batch(runs, which);
        printf("%-8s %-22s alone  max |diff| %.3g %s\n", m->id, runs[i].name, d,
               d <= TOL ? "ok" : "FAIL");
        fail |= !(d <= TOL);
    }
    /* Mixed batches: sequence s runs with run (s + shift) mod n_runs, so that every run meets
     * every prompt next to rows of other kinds. */
    for (int shift = 0; shift < n_runs; shift++) {
        int which[MAX_SEQS];
        for (int s = 0; s < n_seq; s++)
            which[s] = (s * 3 + shift) % n_runs;
        double d = run_batch(runs, which);
        printf("%-8s mixed batch %-2d [", m->id, shift);
        for (int s = 0; s < n_seq; s++)
            printf("%s%s", s ? ", " : "", runs[which[s]].name);
        printf("] max |diff| %.3g %s\n", d, d <= TOL ? "ok" : "FAIL");
        fail |= !(d <= TOL);
    }

    for (int i = 0; i < n_runs; i++) {
        free(runs[i].prefill);
        free(runs[i].decode);
    }
    for (int j = 0; j < n_loaded; j++)
        ad_adapter_unref(loaded[j]);
    for (int s = 0; s < n_seq; s++)
        free(prompts[s]);
    json_decref(ref);
    ad_model_free(m);
    return fail;
}
