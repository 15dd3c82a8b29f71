/* bench-forward: how fast the base model's forward pass runs, against what this machine can do.
 *
 *   bench-forward [--prompt N] [--steps N] [--batch N] [--phase all|prefill|decode]
 *                 [--no-roofline] [MODEL_DIR]
 *
 * In one run it measures the machine (cblas_sgemm GFLOP/s at 2048^3, multi-threaded streaming
 * read bandwidth), then prefill and decode at batch 1, 8 and 32 on a model with SmolLM2-135M's
 * shapes, and prints each against its bound: prefill GFLOP/s against the sgemm peak, batch-1
 * decode weight bytes/s against the read bandwidth. Without MODEL_DIR the model is generated
 * once into /tmp/adapterd-bench-135m by the adapterd-mkmodel found next to this binary.
 * docs/bench.md says what every number means. */
#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "adapterd/blas.h"
#include "adapterd/model.h"
#include "adapterd/util.h"
#include "bench.h"

#define AD_BENCH_DEFAULT_DIR "/tmp/adapterd-bench-135m"
#define AD_BENCH_SGEMM_N 2048
#define AD_BENCH_BW_BYTES ((size_t)1 << 30)
#define AD_BENCH_BLOCK 16

static const int ad_batches[] = {1, 8, 32};
#define AD_N_BATCHES ((int)(sizeof(ad_batches) / sizeof(ad_batches[0])))

struct ad_bench_opts {
    int prompt;      /* prompt tokens per sequence */
    int steps;       /* timed decode steps */
    int only_batch;  /* 0: every batch size */
    bool prefill, decode, roofline;
    const char *dir; /* NULL: generate */
};

/* ==========================================================================================
 * Helpers */

static uint64_t ad_rng = 0x9e3779b97f4a7c15ull;

static int32_t ad_rand_token(int n_vocab)
{
    return (int32_t)((bench_rand32(&ad_rng) >> 1) % (uint32_t)n_vocab);
}

/* ==========================================================================================
 * The machine: sgemm peak and read bandwidth */

static double ad_bench_sgemm(void)
{
    size_t n = AD_BENCH_SGEMM_N, nn = n * n;
    float *a = malloc(nn * sizeof(float)), *b = malloc(nn * sizeof(float));
    float *c = malloc(nn * sizeof(float));
    double best = 0;

    if (!a || !b || !c)
        goto out;
    for (size_t i = 0; i < nn; i++) {
        a[i] = (float)(i % 7) * 0.25f - 0.75f;
        b[i] = (float)(i % 5) * 0.5f - 1.0f;
    }
    memset(c, 0, nn * sizeof(float));
    for (int rep = 0; rep < 4; rep++) { /* the first one is a warm-up */
        double t0 = ad_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)n, (int)n, 1.0f, a,
                    (int)n, b, (int)n, 0.0f, c, (int)n);
        double dt = ad_now() - t0;
        double gflops = 2.0 * (double)n * (double)n * (double)n / dt * 1e-9;
        if (rep > 0 && gflops > best)
            best = gflops;
    }
out:
    free(a);
    free(b);
    free(c);
    return best;
}

struct ad_bw_job {
    const uint64_t *p;
    size_t n; /* words */
    int cpu;
    pthread_barrier_t *barrier;
    uint64_t sum;
    double t0, t1;
};

static void *ad_bw_thread(void *arg)
{
    struct ad_bw_job *j = arg;
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(j->cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set); /* best effort */
    pthread_barrier_wait(j->barrier);
    j->t0 = ad_now();
    /* Eight independent integer sums: vectorised by the compiler, no FP dependency chain. */
    uint64_t s[8] = {0};
    const uint64_t *p = j->p;
    size_t i = 0;
    for (; i + 8 <= j->n; i += 8)
        for (int k = 0; k < 8; k++)
            s[k] += p[i + k];
    for (; i < j->n; i++)
        s[0] += p[i];
    j->t1 = ad_now();
    j->sum = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    return NULL;
}

static volatile uint64_t ad_bench_sink; /* keeps the bandwidth threads' sums alive */

/* Best-of-reps GB/s of n_threads threads (one per core) each summing its slice of a buffer much
 * larger than the caches. Time is first start to last finish. */
static double ad_bench_bandwidth(int n_threads, int reps)
{
    size_t n = AD_BENCH_BW_BYTES / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof(uint64_t));
    struct ad_bw_job jobs[8];
    pthread_t tid[8];
    pthread_barrier_t barrier;
    double best = 0;
    int ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);

    if (!buf)
        return 0;
    if (n_threads > 8)
        n_threads = 8;
    for (size_t i = 0; i < n; i++) /* fault every page in, so the timed reads are reads */
        buf[i] = i;
    for (int rep = 0; rep < reps; rep++) {
        pthread_barrier_init(&barrier, NULL, (unsigned)n_threads);
        for (int t = 0; t < n_threads; t++) {
            size_t lo = n * (size_t)t / (size_t)n_threads;
            size_t hi = n * (size_t)(t + 1) / (size_t)n_threads;
            jobs[t] = (struct ad_bw_job){
                .p = buf + lo,
                .n = hi - lo,
                .cpu = ncpu > 0 ? t % ncpu : 0,
                .barrier = &barrier,
            };
            pthread_create(&tid[t], NULL, ad_bw_thread, &jobs[t]);
        }
        double t0 = 1e300, t1 = 0;
        for (int t = 0; t < n_threads; t++) {
            pthread_join(tid[t], NULL);
            t0 = jobs[t].t0 < t0 ? jobs[t].t0 : t0;
            t1 = jobs[t].t1 > t1 ? jobs[t].t1 : t1;
            ad_bench_sink += jobs[t].sum;
        }
        pthread_barrier_destroy(&barrier);
        double gbs = (double)(n * sizeof(uint64_t)) / (t1 - t0) * 1e-9;
        best = gbs > best ? gbs : best;
    }
    free(buf);
    return best;
}

/* ==========================================================================================
 * The forward pass: prefill and decode */

struct ad_bench_run {
    struct ad_model *m;
    struct ad_kv kv;
    struct ad_scratch *scratch;
    struct ad_kv_seq seqs[32];
    struct ad_chunk chunks[32];
    int32_t *tokens; /* [32, prompt] */
    float *logits;   /* [32, n_vocab] */
    double lin_params, head_params;
};

struct ad_result {
    int batch;
    double sec;     /* prefill: best pass; decode: mean step */
    double p50_sec; /* decode: median step */
    double tok_s, gflop_s;
};

static int ad_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void ad_release_all(struct ad_bench_run *r)
{
    for (int i = 0; i < 32; i++)
        ad_kv_seq_release(&r->kv, &r->seqs[i]);
}

/* Useful FLOPs of a pass: 2 * params per row through every linear, lm_head only for the rows
 * that produce logits, and causal attention 4 * n_head * head_dim per (query, visible key). */
static double ad_pass_flops(const struct ad_bench_run *r, int batch, int ctx0, int n_new)
{
    const struct ad_model_config *c = &r->m->cfg;
    double rows = (double)batch * n_new;
    double keys = 0; /* sum over queries of the keys each one sees */
    for (int i = 0; i < n_new; i++)
        keys += ctx0 + i + 1;
    double att = 4.0 * c->n_head * c->head_dim * keys * batch * c->n_layer;
    return 2.0 * r->lin_params * rows + 2.0 * r->head_params * batch + att;
}

static int ad_forward(struct ad_bench_run *r, int batch, int n_tokens, const int32_t *tokens,
                      int stride)
{
    struct ad_err err = {0};
    for (int i = 0; i < batch; i++)
        r->chunks[i] = (struct ad_chunk){.seq = &r->seqs[i],
                                         .tokens = tokens + (size_t)i * (size_t)stride,
                                         .n_tokens = n_tokens};
    int rc = ad_model_forward(r->m, &r->kv, r->chunks, batch, NULL, r->scratch, r->logits,
                              &err);
    if (rc < 0)
        fprintf(stderr, "bench-forward: forward failed: %s\n", err.msg);
    return rc;
}

/* Prefills batch sequences of prompt tokens, each in one pass; best of up to 3 runs, fewer when
 * a run is long. Leaves the sequences prefilled for the decode that follows. */
static int ad_bench_prefill(struct ad_bench_run *r, int batch, int prompt, int max_reps,
                            struct ad_result *res)
{
    double best = 1e300, spent = 0;
    for (int rep = 0; rep < max_reps && (rep == 0 || spent < 6.0); rep++) {
        ad_release_all(r);
        for (size_t i = 0; i < (size_t)batch * (size_t)prompt; i++)
            r->tokens[i] = ad_rand_token(r->m->cfg.n_vocab);
        double t0 = ad_now();
        if (ad_forward(r, batch, prompt, r->tokens, prompt) < 0)
            return -1;
        double dt = ad_now() - t0;
        spent += dt;
        best = dt < best ? dt : best;
    }
    res->batch = batch;
    res->sec = best;
    res->tok_s = (double)batch * prompt / best;
    res->gflop_s = ad_pass_flops(r, batch, 0, prompt) / best * 1e-9;
    return 0;
}

/* From the prefilled sequences: one untimed step, then steps timed decode steps of one token
 * per sequence. Aggregate tokens/s over all steps, and the median step (which a neighbour's
 * burst of CPU use on a shared machine does not move). */
static int ad_bench_decode(struct ad_bench_run *r, int batch, int steps, struct ad_result *res)
{
    int32_t tok[32];
    double flops = 0, dt = 0;
    double *step = malloc((size_t)steps * sizeof(double));

    if (!step)
        return -1;
    for (int i = 0; i < batch; i++)
        tok[i] = ad_rand_token(r->m->cfg.n_vocab);
    if (ad_forward(r, batch, 1, tok, 1) < 0)
        goto fail;
    for (int s = 0; s < steps; s++) {
        flops += ad_pass_flops(r, batch, r->seqs[0].n_tokens, 1);
        for (int i = 0; i < batch; i++)
            tok[i] = ad_rand_token(r->m->cfg.n_vocab);
        double t0 = ad_now();
        if (ad_forward(r, batch, 1, tok, 1) < 0)
            goto fail;
        step[s] = ad_now() - t0;
        dt += step[s];
    }
    qsort(step, (size_t)steps, sizeof(double), ad_cmp_double);
    res->p50_sec = step[steps / 2];
    free(step);
    res->batch = batch;
    res->sec = dt / steps;
    res->tok_s = (double)batch * steps / dt;
    res->gflop_s = flops / dt * 1e-9;
    return 0;
fail:
    free(step);
    return -1;
}

/* ==========================================================================================
 * Main */

static void ad_usage(FILE *f)
{
    fputs("usage: bench-forward [--prompt N] [--steps N] [--batch N] "
          "[--phase all|prefill|decode]\n"
          "                     [--no-roofline] [MODEL_DIR]\n",
          f);
}

static int ad_parse_args(int argc, char **argv, struct ad_bench_opts *o)
{
    static const struct option longopts[] = {
        {"prompt", required_argument, NULL, 'p'}, {"steps", required_argument, NULL, 's'},
        {"batch", required_argument, NULL, 'b'},  {"phase", required_argument, NULL, 'P'},
        {"no-roofline", no_argument, NULL, 'R'},  {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;

    *o = (struct ad_bench_opts){128, 32, 0, true, true, true, NULL};
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'p':
            if (bench_parse_int(optarg, 1, 1024, &o->prompt) < 0)
                return -EINVAL;
            break;
        case 's':
            if (bench_parse_int(optarg, 1, 512, &o->steps) < 0)
                return -EINVAL;
            break;
        case 'b':
            if (bench_parse_int(optarg, 1, 32, &o->only_batch) < 0 ||
                (o->only_batch != 1 && o->only_batch != 8 && o->only_batch != 32))
                return -EINVAL;
            break;
        case 'P':
            o->prefill = strcmp(optarg, "decode") != 0;
            o->decode = strcmp(optarg, "prefill") != 0;
            if (strcmp(optarg, "all") && strcmp(optarg, "prefill") && strcmp(optarg, "decode"))
                return -EINVAL;
            break;
        case 'R':
            o->roofline = false;
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

int main(int argc, char **argv)
{
    struct ad_bench_opts o;
    struct ad_bench_run r = {0};
    struct ad_result pre[AD_N_BATCHES] = {{0}}, dec[AD_N_BATCHES] = {{0}};
    struct ad_err err = {0};
    double peak = 0, bw0 = 0, bw1 = 0, bw = 0;
    int status = 1;
    struct ad_blas_choice blas;

    ad_blas_startup(argv, &blas); /* first: it may execute the benchmark again (blas.h) */
    if (ad_parse_args(argc, argv, &o) < 0) {
        ad_usage(stderr);
        return 2;
    }
    const char *dir = o.dir ? o.dir : AD_BENCH_DEFAULT_DIR;
    if (!o.dir && bench_ensure_model("bench-forward", dir) < 0)
        return 1;

    const char *coretype = getenv("OPENBLAS_CORETYPE");
    const char *nthr_env = getenv("OPENBLAS_NUM_THREADS");
    const char *kern_env = getenv("ADAPTERD_KERNELS");
    printf("== environment\n");
    printf("nproc                 %ld\n", sysconf(_SC_NPROCESSORS_ONLN));
    printf("OPENBLAS_CORETYPE     %s\n", coretype ? coretype : "(unset)");
    printf("OPENBLAS_NUM_THREADS  %s\n", nthr_env ? nthr_env : "(unset)");
    printf("ADAPTERD_KERNELS      %s\n", kern_env ? kern_env : "(unset: the best the CPU runs)");
    printf("forward threads       %d (the forward pass's pool; OpenBLAS single-threaded in "
           "its items)\n", ad_model_threads());
    printf("openblas core         %s\n", openblas_get_corename());
    printf("openblas config       %s\n", openblas_get_config());
    printf("openblas choice       %s%s\n", blas.warn ? "WARNING: " : "", blas.msg);
    bench_print_loadavg("(start) ");
    fflush(stdout);

    if (o.roofline) {
        peak = ad_bench_sgemm();
        bw0 = ad_bench_bandwidth(2, 5);
        printf("\n== machine\n");
        printf("sgemm 2048^3          %.1f GFLOP/s (best of 3, %d BLAS threads)\n", peak,
               openblas_get_num_threads());
        printf("read bandwidth        %.1f GB/s (2 threads, %zu MiB, best of 5)\n", bw0,
               AD_BENCH_BW_BYTES >> 20);
        fflush(stdout);
    }

    double t_load = ad_now();
    if (ad_model_load(dir, &r.m, &err) < 0) {
        fprintf(stderr, "bench-forward: %s\n", err.msg);
        return 1;
    }
    const struct ad_model_config *c = &r.m->cfg;
    const struct ad_site *head = &r.m->sites[r.m->n_sites - 1];
    for (int i = 0; i < r.m->n_sites - 1; i++)
        r.lin_params += (double)r.m->sites[i].n_in * r.m->sites[i].n_out;
    r.head_params = (double)head->n_in * head->n_out;

    printf("\n== model\n");
    printf("dir                   %s (%s, loaded in %.1f s)\n", dir, c->architecture,
           ad_now() - t_load);
    printf("shape                 %d hidden, %d layers, %d/%d heads, %d ff, %d vocab\n",
           c->n_embd, c->n_layer, c->n_head, c->n_kv_head, c->n_ff, c->n_vocab);
    printf("params                %.1f M in linears + %.1f M lm_head%s\n", r.lin_params * 1e-6,
           r.head_params * 1e-6, c->tie_embeddings ? " (tied)" : "");
    printf("weight bytes / step   %.1f MB\n", (double)r.m->weight_bytes * 1e-6);
    fflush(stdout);

    int max_tokens = o.prompt + o.steps + 1;
    int per_seq = (max_tokens + AD_BENCH_BLOCK - 1) / AD_BENCH_BLOCK;
    r.scratch = ad_scratch_new();
    r.tokens = malloc((size_t)32 * (size_t)o.prompt * sizeof(int32_t));
    r.logits = malloc((size_t)32 * (size_t)c->n_vocab * sizeof(float));
    if (!r.scratch || !r.tokens || !r.logits ||
        ad_kv_init(&r.kv, c, 32 * per_seq, AD_BENCH_BLOCK) < 0) {
        fprintf(stderr, "bench-forward: out of memory\n");
        goto out;
    }

    /* A daemon's KV pool has been written before; fault it in now so that page faults on
     * fresh blocks do not count as forward time. */
    {
        size_t n = (size_t)r.kv.n_layer * (size_t)r.kv.n_blocks * (size_t)r.kv.block_size *
                   (size_t)r.kv.kv_dim * sizeof(float);
        memset(r.kv.k, 0, n);
        memset(r.kv.v, 0, n);
    }

    /* Warm-up: one decode step touches every weight page once. */
    {
        int32_t t = 1;
        if (ad_forward(&r, 1, 1, &t, 1) < 0)
            goto out;
        ad_release_all(&r);
    }

    for (int b = 0; b < AD_N_BATCHES; b++) {
        int B = ad_batches[b];
        if (o.only_batch && o.only_batch != B)
            continue;
        if (ad_bench_prefill(&r, B, o.prompt, o.prefill ? 3 : 1, &pre[b]) < 0)
            goto out;
        if (o.decode && ad_bench_decode(&r, B, o.steps, &dec[b]) < 0)
            goto out;
        ad_release_all(&r);
    }

    /* The bandwidth again after the forward runs: the bound is the better of the two, so a
     * neighbour's burst during the first measurement does not flatter the decode ratio. */
    if (o.roofline) {
        bw1 = ad_bench_bandwidth(2, 3);
        bw = bw0 > bw1 ? bw0 : bw1;
    }

    printf("\n== forward: %d-token prompt per sequence in one pass, then %d decode steps\n",
           o.prompt, o.steps);
    printf("%-8s %5s %9s %9s %10s %9s %7s %10s %7s\n", "phase", "batch", "ms/pass", "p50 ms",
           "tokens/s", "GFLOP/s", "%sgemm", "weights GB/s", "%bw");
    for (int b = 0; b < AD_N_BATCHES; b++) {
        if (!o.prefill || !pre[b].batch)
            continue;
        printf("%-8s %5d %9.1f %9s %10.1f %9.1f %6.1f%% %12s %7s\n", "prefill", pre[b].batch,
               pre[b].sec * 1e3, "-", pre[b].tok_s, pre[b].gflop_s,
               peak > 0 ? 100.0 * pre[b].gflop_s / peak : 0.0, "-", "-");
    }
    for (int b = 0; b < AD_N_BATCHES; b++) {
        if (!o.decode || !dec[b].batch)
            continue;
        /* Each step reads every weight once, whatever the batch. */
        double wgbs = (double)r.m->weight_bytes / dec[b].sec * 1e-9;
        printf("%-8s %5d %9.1f %9.1f %10.1f %9.1f %6.1f%% %12.1f %6.1f%%\n", "decode",
               dec[b].batch, dec[b].sec * 1e3, dec[b].p50_sec * 1e3, dec[b].tok_s,
               dec[b].gflop_s, peak > 0 ? 100.0 * dec[b].gflop_s / peak : 0.0, wgbs,
               bw > 0 ? 100.0 * wgbs / bw : 0.0);
    }
    printf("\n");
    bench_print_loadavg("(end)   ");

    if (o.roofline) {
        printf("read bandwidth        %.1f GB/s at the start, %.1f GB/s at the end: bound %.1f "
               "GB/s\n", bw0, bw1, bw);
        printf("\n== goals\n");
        if (o.decode && dec[0].batch == 1) {
            double wgbs = (double)r.m->weight_bytes / dec[0].sec * 1e-9;
            double p50 = (double)r.m->weight_bytes / dec[0].p50_sec * 1e-9;
            printf("batch-1 decode: %.0f%% of bandwidth bound (goal >= 60%%): %.1f tokens/s of "
                   "%.1f possible; median step: %.0f%%\n",
                   100.0 * wgbs / bw, dec[0].tok_s, bw * 1e9 / (double)r.m->weight_bytes,
                   100.0 * p50 / bw);
        }
        if (o.prefill) {
            int best = -1;
            for (int b = 0; b < AD_N_BATCHES; b++)
                if (pre[b].batch && (best < 0 || pre[b].gflop_s > pre[best].gflop_s))
                    best = b;
            if (best >= 0) {
                printf("prefill: %.0f%% of sgemm peak (goal >= 50%%): %.1f of %.1f GFLOP/s at "
                       "batch %d;", 100.0 * pre[best].gflop_s / peak, pre[best].gflop_s, peak,
                       pre[best].batch);
                for (int b = 0; b < AD_N_BATCHES; b++)
                    if (pre[b].batch)
                        printf(" batch %d: %.0f%%", pre[b].batch,
                               100.0 * pre[b].gflop_s / peak);
                printf("\n");
            }
        }
    }
    status = 0;
out:
    ad_release_all(&r);
    ad_kv_fini(&r.kv);
    ad_scratch_free(r.scratch);
    free(r.tokens);
    free(r.logits);
    ad_model_free(r.m);
    return status;
}
