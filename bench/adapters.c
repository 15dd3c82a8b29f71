/* bench-adapters: what LoRA adapters cost: loading one, the memory it holds, and the decode time
 * it adds to the base model.
 *
 *   bench-adapters [--reps N] [--steps N] [--prompt N] [--part all|load|decode]
 *                  [--batch 1|32] [MODEL_DIR]
 *
 * On a model with SmolLM2-135M's shapes (generated once into /tmp/adapterd-bench-135m by the
 * adapterd-mkmodel next to this binary, as bench-forward does), it writes PEFT LoRA adapters
 * (adapter_config.json + adapter_model.safetensors) of rank 8, 16 and 64 on all seven
 * projections (q, k, v, o, gate, up, down) of every layer, in F32 and BF16, into a temporary
 * directory, and prints:
 *   - load: the median time of ad_adapter_load over --reps loads, and the resident bytes of
 *     the loaded adapter (its tensors, and the process's RSS growth);
 *   - decode: the step time of the base and of the rank-16 adapter at batch 1 and 32 (the same
 *     adapter on every row; a different adapter on each row, from the F32 file and from the
 *     BF16 file), measured in the same run with the scenarios' steps interleaved, and their
 *     ratios.
 * docs/bench.md says what every number means. */
#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "adapterd/adapter.h"
#include "adapterd/blas.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"
#include "bench.h"

#define AD_BENCH_DEFAULT_DIR "/tmp/adapterd-bench-135m"
#define AD_BENCH_BLOCK 16
#define AD_BENCH_MAX_B 32
#define AD_BENCH_DECODE_RANK 16

static const int ad_ranks[] = {8, 16, 64};
#define AD_N_RANKS ((int)(sizeof(ad_ranks) / sizeof(ad_ranks[0])))
static const enum ad_role ad_roles[] = {AD_ROLE_Q,    AD_ROLE_K,  AD_ROLE_V,   AD_ROLE_O,
                                        AD_ROLE_GATE, AD_ROLE_UP, AD_ROLE_DOWN};
#define AD_N_ROLES ((int)(sizeof(ad_roles) / sizeof(ad_roles[0])))
static const char *const ad_role_names[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};

struct ad_bench_opts {
    int reps;          /* timed loads per adapter file */
    int steps;         /* timed decode steps per scenario */
    int prompt;        /* prompt tokens per sequence before the decode */
    bool load, decode; /* parts to run */
    int only_batch;    /* 0: batch 1 and 32 */
    const char *dir;
};

/* ==========================================================================================
 * Helpers */

static uint64_t ad_rng = 0x9e3779b97f4a7c15ull;

static uint32_t ad_rand32(void)
{
    return bench_rand32(&ad_rng);
}

/* Uniform in [-a, a). */
static float ad_rand_float(float a)
{
    return a * ((float)(ad_rand32() >> 8) / (float)(1u << 23) - 1.0f);
}

static int ad_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double ad_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), ad_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Resident set size of this process in bytes (/proc/self/statm), or 0. */
static size_t ad_rss(void)
{
    unsigned long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return 0;
    if (fscanf(f, "%lu %lu", &size, &resident) != 2)
        resident = 0;
    fclose(f);
    return (size_t)resident * (size_t)sysconf(_SC_PAGESIZE);
}

/* ==========================================================================================
 * Writing PEFT LoRA adapters */

static bool ad_is_target(const struct ad_site *s)
{
    for (int i = 0; i < AD_N_ROLES; i++)
        if (s->role == ad_roles[i])
            return s->layer >= 0;
    return false;
}

/* Writes dir/adapter_config.json and dir/adapter_model.safetensors: a LoRA of rank r
 * (lora_alpha = 2 r) on every q, k, v, o, gate, up and down projection, random A and B, stored
 * as dtype (F32 or BF16). Returns the safetensors file size in bytes, or -errno. */
static long long ad_write_lora(const struct ad_model *m, const char *dir, int r,
                               enum ad_dtype dtype)
{
    struct ad_st_entry *e = calloc((size_t)m->n_sites * 2, sizeof(*e));
    char **names = calloc((size_t)m->n_sites * 2, sizeof(*names));
    void **data = calloc((size_t)m->n_sites * 2, sizeof(*data));
    json_t *cfg = NULL, *targets = NULL;
    char path[PATH_MAX];
    struct ad_err err = {0};
    size_t n = 0;
    long long bytes = -ENOMEM;

    if (!e || !names || !data)
        goto out;
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
        bytes = -errno;
        goto out;
    }
    for (int i = 0; i < m->n_sites; i++) {
        const struct ad_site *s = &m->sites[i];
        if (!ad_is_target(s))
            continue;
        for (int k = 0; k < 2; k++) { /* A [r, in], B [out, r] */
            int64_t rows = k ? s->n_out : r, cols = k ? r : s->n_in;
            size_t cnt = (size_t)rows * (size_t)cols;
            size_t len = strlen(s->path) + 64;
            names[n] = malloc(len);
            data[n] = malloc(cnt * ad_dtype_size(dtype));
            if (!names[n] || !data[n])
                goto out;
            snprintf(names[n], len, "base_model.model.%s.lora_%c.weight", s->path, k ? 'B' : 'A');
            /* A like kaiming-uniform; B small but non-zero (a trained adapter). */
            float a = k ? 0.01f : 1.0f / (float)s->n_in;
            for (size_t j = 0; j < cnt; j++) {
                float v = ad_rand_float(a);
                if (dtype == AD_DTYPE_BF16)
                    ((uint16_t *)data[n])[j] = ad_f32_to_bf16(v);
                else
                    ((float *)data[n])[j] = v;
            }
            e[n] = (struct ad_st_entry){.name = names[n],
                                        .dtype = dtype,
                                        .n_dims = 2,
                                        .shape = {rows, cols},
                                        .data = data[n]};
            n++;
        }
    }
    static const char *const meta[] = {"format", "pt", NULL};
    if (ad_path_join(path, sizeof(path), dir, "adapter_model.safetensors") < 0 ||
        ad_st_write(path, e, n, meta, &err) < 0) {
        fprintf(stderr, "bench-adapters: %s\n", err.msg);
        bytes = -EIO;
        goto out;
    }
    struct stat st;
    bytes = stat(path, &st) == 0 ? (long long)st.st_size : -errno;

    targets = json_array();
    for (int i = 0; targets && i < AD_N_ROLES; i++)
        json_array_append_new(targets, json_string(ad_role_names[i]));
    cfg = json_pack("{s:s, s:s, s:b, s:i, s:i, s:f, s:s, s:O, s:b, s:b, s:s}", "peft_type", "LORA",
                    "task_type", "CAUSAL_LM", "inference_mode", 1, "r", r, "lora_alpha", 2 * r,
                    "lora_dropout", 0.0, "bias", "none", "target_modules", targets, "use_dora", 0,
                    "use_rslora", 0, "base_model_name_or_path", m->id);
    if (!cfg || ad_path_join(path, sizeof(path), dir, "adapter_config.json") < 0 ||
        json_dump_file(cfg, path, JSON_INDENT(2) | JSON_SORT_KEYS) < 0)
        bytes = -EIO;
out:
    for (size_t i = 0; names && data && i < (size_t)m->n_sites * 2; i++) {
        free(names[i]);
        free(data[i]);
    }
    free(names);
    free(data);
    free(e);
    json_decref(targets);
    json_decref(cfg);
    return bytes;
}

/* ==========================================================================================
 * Loading */

struct ad_load_result {
    int rank;
    enum ad_dtype dtype;
    long long file_bytes;
    double ms_median, ms_min, ms_max;
    size_t tensor_bytes; /* a->bytes */
    size_t rss_bytes;    /* RSS growth per loaded copy */
};

/* Loads dir reps times (each copy freed before the next, as a daemon that evicts and reloads
 * adapters does) for the median load time; then keeps AD_BENCH_RSS_COPIES copies loaded at
 * once and divides the RSS growth by their number. */
#define AD_BENCH_RSS_COPIES 4
static int ad_bench_load(const struct ad_model *m, const char *dir, int reps,
                         struct ad_load_result *res)
{
    double *ms = calloc((size_t)reps, sizeof(double));
    struct ad_adapter *a[AD_BENCH_RSS_COPIES] = {NULL};
    struct ad_err err = {0};
    int rc = -1;

    if (!ms)
        goto out;
    /* One untimed load: the file comes from the page cache in every timed one. */
    for (int i = -1; i < reps; i++) {
        double t0 = ad_now();
        if (ad_adapter_load(m, dir, "bench", 0, &a[0], &err) < 0)
            goto fail;
        if (i >= 0)
            ms[i] = (ad_now() - t0) * 1e3;
        res->tensor_bytes = a[0]->bytes;
        a[0] = ad_adapter_unref(a[0]);
    }
    malloc_trim(0); /* give back what the timed loads freed, so the copies need new pages */
    size_t rss0 = ad_rss();
    for (int i = 0; i < AD_BENCH_RSS_COPIES; i++)
        if (ad_adapter_load(m, dir, "bench", 0, &a[i], &err) < 0)
            goto fail;
    size_t rss1 = ad_rss();
    res->rss_bytes = rss1 > rss0 ? (rss1 - rss0) / AD_BENCH_RSS_COPIES : 0;
    res->ms_median = ad_median(ms, reps); /* sorts ms */
    res->ms_min = ms[0];
    res->ms_max = ms[reps - 1];
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench-adapters: %s\n", err.msg);
out:
    for (int i = 0; i < AD_BENCH_RSS_COPIES; i++)
        ad_adapter_unref(a[i]);
    free(ms);
    return rc;
}

/* ==========================================================================================
 * Decode: base against LoRA, steps interleaved */

enum {
    SC_B1_BASE,
    SC_B1_LORA,
    SC_B32_BASE,
    SC_B32_SAME,
    SC_B32_DIFF,
    SC_B32_DIFF_BF16,
    SC_B32_DIFF_I8,
    N_SC
};

static const struct {
    int batch;
    const char *what;
} ad_scenarios[N_SC] = {
    [SC_B1_BASE] = {1, "base"},
    [SC_B1_LORA] = {1, "rank-16 LoRA"},
    [SC_B32_BASE] = {32, "base"},
    [SC_B32_SAME] = {32, "rank-16 LoRA, same adapter on every row"},
    [SC_B32_DIFF] = {32, "rank-16 LoRA, a different adapter per row"},
    [SC_B32_DIFF_BF16] = {32, "rank-16 LoRA, BF16 files, different per row"},
    [SC_B32_DIFF_I8] = {32, "rank-16 LoRA, lora_dtype int8, different per row"},
};

struct ad_scenario {
    struct ad_kv_seq seqs[AD_BENCH_MAX_B];
    struct ad_chunk chunks[AD_BENCH_MAX_B];
    struct ad_mix mix[AD_BENCH_MAX_B];
    double *step; /* [steps] seconds */
    double p50, mean;
};

struct ad_decode {
    const struct ad_model *m;
    struct ad_kv kv;
    struct ad_scratch *scratch;
    float *logits;
    int32_t *tokens;
    struct ad_scenario sc[N_SC];
};

static int ad_run(struct ad_decode *d, struct ad_scenario *sc, int batch, int n_tokens,
                  const int32_t *tokens)
{
    struct ad_err err = {0};
    for (int i = 0; i < batch; i++) {
        sc->chunks[i].tokens = tokens + (size_t)i * (size_t)n_tokens;
        sc->chunks[i].n_tokens = n_tokens;
    }
    int rc = ad_model_forward(d->m, &d->kv, sc->chunks, batch, &ad_mix_hooks, d->scratch,
                              d->logits, &err);
    if (rc < 0)
        fprintf(stderr, "bench-adapters: forward failed: %s\n", err.msg);
    return rc;
}

static void ad_rand_tokens(int32_t *t, size_t n, int n_vocab)
{
    for (size_t i = 0; i < n; i++)
        t[i] = (int32_t)(ad_rand32() % (uint32_t)n_vocab);
}

/* Runs the scenarios in [first, last] in lock step: prefill, one untimed step each, then steps
 * rounds of one step per scenario, so that every scenario sees the same context lengths and
 * the same neighbours' load. */
static int ad_bench_decode(struct ad_decode *d, int first, int last, int prompt, int steps)
{
    int V = d->m->cfg.n_vocab;
    for (int k = first; k <= last; k++) {
        int B = ad_scenarios[k].batch;
        ad_rand_tokens(d->tokens, (size_t)B * (size_t)prompt, V);
        if (ad_run(d, &d->sc[k], B, prompt, d->tokens) < 0)
            return -1;
    }
    for (int s = -1; s < steps; s++)
        for (int k = first; k <= last; k++) {
            int B = ad_scenarios[k].batch;
            ad_rand_tokens(d->tokens, (size_t)B, V);
            double t0 = ad_now();
            if (ad_run(d, &d->sc[k], B, 1, d->tokens) < 0)
                return -1;
            if (s >= 0)
                d->sc[k].step[s] = ad_now() - t0;
        }
    for (int k = first; k <= last; k++) {
        struct ad_scenario *sc = &d->sc[k];
        double sum = 0;
        for (int s = 0; s < steps; s++)
            sum += sc->step[s];
        sc->mean = sum / steps;
        sc->p50 = ad_median(sc->step, steps);
        for (int i = 0; i < ad_scenarios[k].batch; i++)
            ad_kv_seq_release(&d->kv, &sc->seqs[i]);
    }
    return 0;
}

/* ==========================================================================================
 * Main */

static void ad_usage(FILE *f)
{
    fputs("usage: bench-adapters [--reps N] [--steps N] [--prompt N] [--part all|load|decode]\n"
          "                      [--batch 1|32] [MODEL_DIR]\n",
          f);
}

static int ad_parse_args(int argc, char **argv, struct ad_bench_opts *o)
{
    static const struct option longopts[] = {
        {"reps", required_argument, NULL, 'r'},   {"steps", required_argument, NULL, 's'},
        {"prompt", required_argument, NULL, 'p'}, {"part", required_argument, NULL, 'P'},
        {"batch", required_argument, NULL, 'b'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    int c;

    *o = (struct ad_bench_opts){9, 32, 64, true, true, 0, NULL};
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'r':
            if (bench_parse_int(optarg, 1, 1000, &o->reps) < 0)
                return -EINVAL;
            break;
        case 's':
            if (bench_parse_int(optarg, 1, 512, &o->steps) < 0)
                return -EINVAL;
            break;
        case 'p':
            if (bench_parse_int(optarg, 1, 1024, &o->prompt) < 0)
                return -EINVAL;
            break;
        case 'P':
            o->load = strcmp(optarg, "decode") != 0;
            o->decode = strcmp(optarg, "load") != 0;
            if (strcmp(optarg, "all") && strcmp(optarg, "load") && strcmp(optarg, "decode"))
                return -EINVAL;
            break;
        case 'b':
            if (bench_parse_int(optarg, 1, 32, &o->only_batch) < 0 ||
                (o->only_batch != 1 && o->only_batch != 32))
                return -EINVAL;
            break;
        case 'h':
            ad_usage(stdout);
            exit(0);
        default:
            return -EINVAL;
        }
    }
    if (optind < argc)
        o->dir = argv[optind++];
    return optind == argc ? 0 : -EINVAL;
}

static double ad_mb(double bytes)
{
    return bytes / 1e6;
}

/* Writes every rank x dtype file into tmp (paths in adir) and, if o->load, times its loads. */
static int ad_part_load(const struct ad_model *m, const struct ad_bench_opts *o, const char *tmp,
                        int n_targets, struct ad_load_result *load, char adir[][PATH_MAX])
{
    int n = 0;
    for (int dt = 0; dt < 2; dt++)
        for (int ri = 0; ri < AD_N_RANKS; ri++, n++) {
            struct ad_load_result *res = &load[n];
            res->rank = ad_ranks[ri];
            res->dtype = dt ? AD_DTYPE_BF16 : AD_DTYPE_F32;
            snprintf(adir[n], PATH_MAX, "%s/r%d-%s", tmp, res->rank, ad_dtype_name(res->dtype));
            res->file_bytes = ad_write_lora(m, adir[n], res->rank, res->dtype);
            if (res->file_bytes < 0) {
                fprintf(stderr, "bench-adapters: cannot write '%s': %s\n", adir[n],
                        strerror((int)-res->file_bytes));
                return -1;
            }
            if (o->load && ad_bench_load(m, adir[n], o->reps, res) < 0)
                return -1;
        }
    if (!o->load)
        return 0;
    printf("\n== load: ad_adapter_load of a LoRA on all %d projections, median of %d loads "
           "(file in the page cache)\n",
           n_targets, o->reps);
    printf("%4s %5s %10s %9s %9s %9s %12s %12s\n", "rank", "dtype", "file MB", "ms p50", "ms min",
           "ms max", "tensor MB", "RSS +MB");
    for (int i = 0; i < n; i++)
        printf("%4d %5s %10.2f %9.2f %9.2f %9.2f %12.2f %12.2f\n", load[i].rank,
               ad_dtype_name(load[i].dtype), ad_mb((double)load[i].file_bytes), load[i].ms_median,
               load[i].ms_min, load[i].ms_max, ad_mb((double)load[i].tensor_bytes),
               ad_mb((double)load[i].rss_bytes));
    fflush(stdout);
    return 0;
}

/* Loads the rank-16 files r16 (F32) and r16_bf16 32 times each (64 distinct adapters in
 * memory; BF16 factors stay BF16), and r16_bf16 32 more times with 8-bit factors
 * (AD_ADAPTER_LORA_INT8), sets up the scenarios and runs them: batch 1 (base, LoRA) in turns,
 * then batch 32 (base, same, distinct F32, distinct BF16, distinct int8). */
static int ad_part_decode(struct ad_decode *d, const struct ad_bench_opts *o, const char *r16,
                          const char *r16_bf16, struct ad_adapter **lora)
{
    const struct ad_model_config *c = &d->m->cfg;
    struct ad_err err = {0};

    for (int i = 0; i < 3 * AD_BENCH_MAX_B; i++) {
        char name[32];
        snprintf(name, sizeof(name), "lora-%d", i);
        unsigned flags = i >= 2 * AD_BENCH_MAX_B ? AD_ADAPTER_LORA_INT8 : 0;
        if (ad_adapter_load(d->m, i < AD_BENCH_MAX_B ? r16 : r16_bf16, name, flags, &lora[i],
                            &err) < 0) {
            fprintf(stderr, "bench-adapters: %s\n", err.msg);
            return -1;
        }
    }
    int per_seq = (o->prompt + o->steps + 1 + AD_BENCH_BLOCK - 1) / AD_BENCH_BLOCK;
    d->scratch = ad_scratch_new();
    d->logits = malloc((size_t)AD_BENCH_MAX_B * (size_t)c->n_vocab * sizeof(float));
    d->tokens = malloc((size_t)AD_BENCH_MAX_B * (size_t)o->prompt * sizeof(int32_t));
    if (!d->scratch || !d->logits || !d->tokens ||
        ad_kv_init(&d->kv, c, 5 * AD_BENCH_MAX_B * per_seq, AD_BENCH_BLOCK) < 0) {
        fprintf(stderr, "bench-adapters: out of memory\n");
        return -1;
    }
    size_t kv_bytes = (size_t)d->kv.n_layer * (size_t)d->kv.n_blocks * (size_t)d->kv.block_size *
                      (size_t)d->kv.kv_dim * sizeof(float);
    memset(d->kv.k, 0, kv_bytes); /* fault the pool in before timing */
    memset(d->kv.v, 0, kv_bytes);
    for (int k = 0; k < N_SC; k++) {
        struct ad_scenario *sc = &d->sc[k];
        bool on = k == SC_B1_LORA || k == SC_B32_SAME || k == SC_B32_DIFF ||
                  k == SC_B32_DIFF_BF16 || k == SC_B32_DIFF_I8;
        bool distinct = k == SC_B32_DIFF || k == SC_B32_DIFF_BF16 || k == SC_B32_DIFF_I8;
        /* the BF16 copies, then the int8 ones */
        int first = k == SC_B32_DIFF_BF16 ? AD_BENCH_MAX_B
                    : k == SC_B32_DIFF_I8 ? 2 * AD_BENCH_MAX_B : 0;
        sc->step = calloc((size_t)o->steps, sizeof(double));
        if (!sc->step)
            return -1;
        for (int i = 0; i < ad_scenarios[k].batch; i++) {
            sc->mix[i] = (struct ad_mix){.n = 1, .a = {lora[first + (distinct ? i : 0)]},
                                         .w = {1.0f}};
            /* one mix pointer for the whole batch makes one row group; one each, 32 groups */
            sc->chunks[i] = (struct ad_chunk){.seq = &sc->seqs[i],
                                              .ctx = on ? &sc->mix[distinct ? i : 0] : NULL};
        }
    }
    if ((o->only_batch != 32 &&
         ad_bench_decode(d, SC_B1_BASE, SC_B1_LORA, o->prompt, o->steps) < 0) ||
        (o->only_batch != 1 &&
         ad_bench_decode(d, SC_B32_BASE, SC_B32_DIFF_I8, o->prompt, o->steps) < 0))
        return -1;

    printf("\n== decode: %d-token prompts, then %d steps of one token per sequence; the "
           "scenarios of a batch size take turns step by step\n",
           o->prompt, o->steps);
    printf("LoRA weights read per step: %.1f MB per distinct adapter (F32 file), %.1f MB (BF16 "
           "file), %.1f MB (int8), base weights %.1f MB\n",
           ad_mb((double)lora[0]->bytes), ad_mb((double)lora[AD_BENCH_MAX_B]->bytes),
           ad_mb((double)lora[2 * AD_BENCH_MAX_B]->bytes), ad_mb((double)d->m->weight_bytes));
    printf("%5s  %-44s %9s %9s %11s %11s\n", "batch", "rows", "p50 ms", "mean ms", "ratio p50",
           "ratio mean");
    for (int k = 0; k < N_SC; k++) {
        const struct ad_scenario *base =
            &d->sc[ad_scenarios[k].batch == 1 ? SC_B1_BASE : SC_B32_BASE];
        if (!(d->sc[k].p50 > 0)) /* not run (--batch) */
            continue;
        printf("%5d  %-44s %9.2f %9.2f %11.3f %11.3f\n", ad_scenarios[k].batch,
               ad_scenarios[k].what, d->sc[k].p50 * 1e3, d->sc[k].mean * 1e3,
               d->sc[k].p50 / base->p50, d->sc[k].mean / base->mean);
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct ad_bench_opts o;
    struct ad_model *m = NULL;
    struct ad_decode d = {0};
    struct ad_adapter *lora[3 * AD_BENCH_MAX_B] = {NULL};
    struct ad_load_result load[AD_N_RANKS * 2] = {{0}};
    struct ad_err err = {0};
    static char adir[AD_N_RANKS * 2][PATH_MAX];
    char tmp[PATH_MAX] = "";
    int status = 1;
    struct ad_blas_choice blas;

    ad_blas_startup(argv, &blas); /* first: it may execute the benchmark again (blas.h) */
    if (ad_parse_args(argc, argv, &o) < 0) {
        ad_usage(stderr);
        return 2;
    }
    const char *dir = o.dir ? o.dir : AD_BENCH_DEFAULT_DIR;
    if (!o.dir && bench_ensure_model("bench-adapters", dir) < 0)
        return 1;

    const char *coretype = getenv("OPENBLAS_CORETYPE");
    printf("== environment\n");
    printf("nproc                 %ld\n", sysconf(_SC_NPROCESSORS_ONLN));
    printf("OPENBLAS_CORETYPE     %s\n", coretype ? coretype : "(unset)");
    printf("forward threads       %d\n", ad_model_threads());
    printf("openblas core         %s\n", openblas_get_corename());
    printf("openblas choice       %s%s\n", blas.warn ? "WARNING: " : "", blas.msg);
    bench_print_loadavg("(start) ");

    if (ad_model_load(dir, &m, &err) < 0) {
        fprintf(stderr, "bench-adapters: %s\n", err.msg);
        return 1;
    }
    const struct ad_model_config *c = &m->cfg;
    int n_targets = 0;
    for (int i = 0; i < m->n_sites; i++)
        n_targets += ad_is_target(&m->sites[i]);
    printf("\n== model\n");
    printf("dir                   %s (%s)\n", dir, c->architecture);
    printf("shape                 %d hidden, %d layers, %d/%d heads, %d ff, %d vocab\n", c->n_embd,
           c->n_layer, c->n_head, c->n_kv_head, c->n_ff, c->n_vocab);
    printf("LoRA targets          q,k,v,o,gate,up,down of every layer: %d sites\n", n_targets);
    fflush(stdout);

    snprintf(tmp, sizeof(tmp), "%s/adapterd-bench-adapters-XXXXXX",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmp)) {
        fprintf(stderr, "bench-adapters: mkdtemp '%s': %s\n", tmp, strerror(errno));
        tmp[0] = '\0';
        goto out;
    }
    if (ad_part_load(m, &o, tmp, n_targets, load, adir) < 0)
        goto out;
    d.m = m;
    int r16 = 0; /* the F32 files come first */
    while (ad_ranks[r16] != AD_BENCH_DECODE_RANK)
        r16++;
    if (o.decode && ad_part_decode(&d, &o, adir[r16], adir[r16 + AD_N_RANKS], lora) < 0)
        goto out;

    printf("\n");
    bench_print_loadavg("(end)   ");
    printf("\n== goals\n");
    for (int i = 0; o.load && i < AD_N_RANKS * 2; i++)
        if (load[i].rank == AD_BENCH_DECODE_RANK)
            printf("load rank-16 all-projection LoRA (%s): %.1f ms (goal < 20 ms): %s\n",
                   ad_dtype_name(load[i].dtype), load[i].ms_median,
                   load[i].ms_median < 20 ? "met" : "MISSED");
    for (int k = 0; o.decode && k < N_SC; k++) {
        if (k == SC_B1_BASE || k == SC_B32_BASE || !(d.sc[k].p50 > 0))
            continue;
        const struct ad_scenario *base =
            &d.sc[ad_scenarios[k].batch == 1 ? SC_B1_BASE : SC_B32_BASE];
        double ov = 100.0 * (d.sc[k].p50 / base->p50 - 1);
        printf("decode overhead, batch %d, %s: %+.1f%% (median step; goal < 10%%): %s\n",
               ad_scenarios[k].batch, ad_scenarios[k].what, ov, ov < 10 ? "met" : "MISSED");
    }
    status = 0;
out:
    for (int k = 0; k < N_SC; k++)
        free(d.sc[k].step);
    ad_kv_fini(&d.kv);
    ad_scratch_free(d.scratch);
    free(d.logits);
    free(d.tokens);
    for (int i = 0; i < 3 * AD_BENCH_MAX_B; i++)
        ad_adapter_unref(lora[i]);
    ad_model_free(m);
    if (tmp[0])
        ad_rm_rf(tmp);
    return status;
}
