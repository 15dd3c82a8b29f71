/* bench-serve: the real daemon over HTTP: decode throughput with and without adapters, 2,000
 * registered adapters under a resident budget, adapters of every kind in one batch, and the
 * prefix cache on a shared system prompt.
 *
 *   bench-serve --adapterd PATH [--mkmodel PATH] [--work DIR] [--model-src DIR]
 *               [--rounds N] [--zipf-rounds N] [--prompt N] [--tokens N] [--window S]
 *               [--zipf-streams N]
 *               [--kinds-streams N] [--part all|streams|int8|zipf|kinds|prefix]
 *
 * It prepares, once, under --work (default /tmp/adapterd-bench-serve):
 *   - a model directory whose config.json and model.safetensors are symlinks to the
 *     SmolLM2-135M-shaped random model in --model-src (default /tmp/adapterd-bench-135m,
 *     generated with adapterd-mkmodel if missing), plus a tokenizer.json written here: a BPE
 *     vocabulary of one token per id, each the id as 5 digits. The random model has no
 *     tokenizer, and without one the daemon streams no text until the end; with this one every
 *     token is 5 bytes of text, so each SSE chunk says how many tokens it carries;
 *   - 32 distinct rank-16 LoRA weight files (q, k, v, o, gate, up, down of every layer, BF16),
 *     and adapter stores: "store-a" (lora-00..31, and 8 each of IA3, prefix tuning, prompt
 *     tuning, bias sets and Houlsby bottleneck adapters) and "store-z" (z0000..z1999: 2,000
 *     adapter directories whose files are hard links to 20 of the weight files; the daemon
 *     loads each directory on its own).
 * Then it starts the daemon (fork + exec, 127.0.0.1, a free port) on store-a, measures, stops
 * it, starts it again on store-z with adapter_budget_mb set to hold 10% of the 2,000, measures,
 * and stops it (part 1b, int8, does part 1 again on a daemon started with lora_dtype=int8 on
 * store-a). Every request is a /v1/completions stream ("stream": true) of --prompt random
 * token ids with max_tokens --tokens, ignore_eos and temperature 0, so every stream produces
 * exactly --tokens tokens; arrival times are taken in the client (libcurl multi, one thread)
 * when each SSE chunk arrives. Last, the prefix part starts the daemon on store-a twice, with
 * prefix_cache=1 and then 0, and sends prompts of one shared 512-token "system prompt" and 32
 * random tokens: one request at a time, then 16 streams (8 base, 8 on one LoRA) in a closed
 * loop. docs/bench.md says what every number means. */
#include <cblas.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "adapterd/blas.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"
#include "bench.h"

/* stamp written when the work directory is complete (v2: store-a has bottleneck adapters) */
#define BS_PREPARED "prepared-v2"
#define BS_MODEL_NAME "smollm2-135m-random"
#define BS_TOKEN_WIDTH 5          /* bytes of text per token ("%05d") */
#define BS_RANK 16
#define BS_N_LORA 32              /* distinct LoRA weight files */
#define BS_N_ZIPF 2000            /* adapters in store-z */
#define BS_N_ZIPF_FILES 20        /* distinct weight files behind them */
#define BS_N_KIND 8               /* adapters of each small kind in store-a */
#define BS_N_VIRTUAL 16           /* virtual tokens of the prefix and prompt adapters */
#define BS_BN_REDUCTION 16        /* bottleneck width = hidden / this (36 for 576) */
#define BS_ZIPF_S 1.0
#define BS_RESIDENT_SHARE 0.10    /* of the 2,000 adapters */
#define BS_BUDGET_A 2048          /* adapter_budget_mb on store-a: every adapter fits */
#define BS_MAX_STREAMS 64
#define BS_LOOP_WARM 8.0 /* seconds of each closed loop before its window */
#define BS_LRU_WARM 1200 /* tiny Zipf requests before the first window */
/* A measurement during which other processes used less than this many cores is "clean". */
#define BS_CLEAN 0.10
#define BS_MAX_EXTRA 2 /* extra rounds for a burst measurement whose rounds were all disturbed */
/* The prefix part: a shared head ("system prompt") and a random tail per request. */
#define BS_PREFIX_HEAD 512
#define BS_PREFIX_TAIL 32
#define BS_PREFIX_TOKENS 32  /* max_tokens (the closed loop: 16 to 48) */
#define BS_PREFIX_WARM 2     /* one at a time: untimed requests, then */
#define BS_PREFIX_REQS 12    /* timed ones */
#define BS_PREFIX_STREAMS 16 /* the closed loop: half base, half BS_PREFIX_LORA */
#define BS_PREFIX_LORA "lora-00"

static const enum ad_role bs_roles[] = {AD_ROLE_Q,    AD_ROLE_K,  AD_ROLE_V,   AD_ROLE_O,
                                        AD_ROLE_GATE, AD_ROLE_UP, AD_ROLE_DOWN};
#define BS_N_ROLES ((int)(sizeof(bs_roles) / sizeof(bs_roles[0])))
static const char *const bs_role_names[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                            "gate_proj", "up_proj", "down_proj"};
static const char *const bs_kinds[] = {"lora", "ia3", "prefix", "prompt", "bitfit", "bottleneck"};
#define BS_N_KINDS ((int)(sizeof(bs_kinds) / sizeof(bs_kinds[0])))

struct bs_opts {
    const char *adapterd, *mkmodel, *work, *model_src;
    int rounds;        /* repetitions of each burst measurement; the best is printed */
    int zipf_rounds;   /* repetitions of the closed loops */
    int zipf_fixed;    /* the comparison: uniform over this many of the most popular */
    int prompt;        /* prompt tokens per request */
    int tokens;        /* generated tokens per request */
    double window;     /* seconds of each closed-loop measurement */
    int zipf_streams;  /* concurrent streams of the closed loops */
    int kinds_streams; /* concurrent streams of the mixed-kinds burst */
    bool streams, int8, zipf, kinds, prefix;
};

/* ==========================================================================================
 * Helpers */

static uint64_t bs_rng = 0x2545f4914f6cdd1dull;

static uint32_t bs_rand32(void)
{
    return bench_rand32(&bs_rng);
}

/* Uniform in [0, 1). */
static double bs_rand01(void)
{
    return (double)bs_rand32() / 4294967296.0;
}

/* Uniform in [-a, a). */
static float bs_rand_float(float a)
{
    return a * (2.0f * (float)bs_rand01() - 1.0f);
}

static int bs_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The q-quantile (0..1) of v[0..n) by nearest rank; sorts v. NAN when n is 0. */
static double bs_quantile(double *v, int n, double q)
{
    if (n <= 0)
        return NAN;
    qsort(v, (size_t)n, sizeof(double), bs_cmp_double);
    int k = (int)ceil(q * n) - 1;
    return v[k < 0 ? 0 : k >= n ? n - 1 : k];
}

static void bs_sleep(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static int bs_join(char *buf, size_t size, const char *dir, const char *name)
{
    if (ad_path_join(buf, size, dir, name) < 0) {
        fprintf(stderr, "bench-serve: path too long: %s/%s\n", dir, name);
        return -ENAMETOOLONG;
    }
    return 0;
}

static int bs_mkdir(const char *path)
{
    if (mkdir(path, 0755) < 0 && errno != EEXIST) {
        int e = errno;
        fprintf(stderr, "bench-serve: mkdir '%s': %s\n", path, strerror(e));
        return -e;
    }
    return 0;
}

static bool bs_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* ==========================================================================================
 * Preparing the model and the adapters (once; a stamp file marks a complete work directory) */

/* Runs argv to completion with stdout sent to stderr. Returns 0 if it exited 0. */
static int bs_spawn_wait(char *const argv[])
{
    pid_t pid = fork();
    if (pid < 0)
        return -errno;
    if (pid == 0) {
        dup2(2, 1);
        execv(argv[0], argv);
        _exit(127);
    }
    int status;
    if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "bench-serve: '%s' failed\n", argv[0]);
        return -EIO;
    }
    return 0;
}

static int bs_ensure_source_model(const struct bs_opts *o)
{
    char cfg[PATH_MAX], st[PATH_MAX], tmp[PATH_MAX];
    if (bs_join(cfg, sizeof(cfg), o->model_src, "config.json") < 0 ||
        bs_join(st, sizeof(st), o->model_src, "model.safetensors") < 0)
        return -ENAMETOOLONG;
    if (bs_exists(cfg) && bs_exists(st))
        return 0;
    if (!o->mkmodel) {
        fprintf(stderr, "bench-serve: no model in '%s' and no adapterd-mkmodel\n", o->model_src);
        return -ENOENT;
    }
    int len = snprintf(tmp, sizeof(tmp), "%s.tmp-%ld", o->model_src, (long)getpid());
    if (len < 0 || (size_t)len >= sizeof(tmp))
        return -ENAMETOOLONG;
    fprintf(stderr, "bench-serve: generating the model into '%s' (once)...\n", o->model_src);
    char *argv[] = {(char *)o->mkmodel, "--preset", "smollm2-135m", tmp, NULL};
    int r = bs_spawn_wait(argv);
    if (r < 0)
        return r;
    if (rename(tmp, o->model_src) < 0) {
        int e = errno;
        fprintf(stderr, "bench-serve: rename '%s': %s\n", tmp, strerror(e));
        return -e;
    }
    return 0;
}

/* The tokenizer: a BPE vocabulary "00000".."NNNNN" (id -> its digits), no merges, the ByteLevel
 * decoder (digits decode to themselves). Only decoding is used: prompts are token ids. */
static int bs_write_tokenizer(const char *path, int n_vocab)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return -errno;
    fprintf(f, "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, "
               "\"added_tokens\": [], \"normalizer\": null, \"pre_tokenizer\": null, "
               "\"post_processor\": null, \"decoder\": {\"type\": \"ByteLevel\", "
               "\"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}, "
               "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, "
               "\"continuing_subword_prefix\": null, \"end_of_word_suffix\": null, "
               "\"fuse_unk\": false, \"byte_fallback\": false, \"ignore_merges\": false, "
               "\"vocab\": {");
    for (int i = 0; i < n_vocab; i++)
        fprintf(f, "%s\"%0*d\": %d", i ? ", " : "", BS_TOKEN_WIDTH, i, i);
    fprintf(f, "}, \"merges\": []}}\n");
    int bad = ferror(f);
    if (fclose(f) != 0 || bad)
        return -EIO;
    return 0;
}

static int bs_write_json(const char *dir, json_t *cfg)
{
    char path[PATH_MAX];
    int r = -ENOMEM;
    if (cfg && bs_join(path, sizeof(path), dir, "adapter_config.json") == 0)
        r = json_dump_file(cfg, path, JSON_INDENT(2) | JSON_SORT_KEYS) == 0 ? 0 : -EIO;
    json_decref(cfg);
    return r;
}

/* A growing list of tensors to write; the names and data are owned here. */
struct bs_tensors {
    struct ad_st_entry e[1024];
    char *names[1024];
    void *data[1024];
    size_t n;
};

static int bs_tensor_add(struct bs_tensors *t, const char *name, enum ad_dtype dtype, int n_dims,
                         int64_t d0, int64_t d1, float scale, float offset)
{
    if (t->n == sizeof(t->e) / sizeof(t->e[0]))
        return -E2BIG;
    size_t cnt = (size_t)d0 * (size_t)(n_dims > 1 ? d1 : 1);
    t->names[t->n] = strdup(name);
    t->data[t->n] = malloc(cnt * ad_dtype_size(dtype));
    if (!t->names[t->n] || !t->data[t->n]) {
        free(t->names[t->n]);
        free(t->data[t->n]);
        return -ENOMEM;
    }
    for (size_t j = 0; j < cnt; j++) {
        float v = offset + bs_rand_float(scale);
        if (dtype == AD_DTYPE_BF16)
            ((uint16_t *)t->data[t->n])[j] = ad_f32_to_bf16(v);
        else
            ((float *)t->data[t->n])[j] = v;
    }
    t->e[t->n] = (struct ad_st_entry){.name = t->names[t->n], .dtype = dtype, .n_dims = n_dims,
                                      .shape = {d0, d1}, .data = t->data[t->n]};
    t->n++;
    return 0;
}

/* pt_meta: the {"format": "pt"} metadata PEFT writes (AdapterHub writes none). */
static int bs_tensors_write(struct bs_tensors *t, const char *path, bool pt_meta)
{
    static const char *const meta[] = {"format", "pt", NULL};
    struct ad_err err = {0};
    int r = ad_st_write(path, t->e, t->n, pt_meta ? meta : NULL, &err);
    if (r < 0)
        fprintf(stderr, "bench-serve: %s\n", err.msg);
    for (size_t i = 0; i < t->n; i++) {
        free(t->names[i]);
        free(t->data[i]);
    }
    t->n = 0;
    return r;
}

static bool bs_is_target(const struct ad_site *s)
{
    for (int i = 0; i < BS_N_ROLES; i++)
        if (s->role == bs_roles[i])
            return s->layer >= 0;
    return false;
}

/* A rank-16 LoRA on the seven projections of every layer, BF16, to path (a weights file). */
static int bs_write_lora_weights(const struct ad_model *m, const char *path)
{
    struct bs_tensors *t = calloc(1, sizeof(*t));
    char name[256];
    int r = t ? 0 : -ENOMEM;
    for (int i = 0; r == 0 && i < m->n_sites; i++) {
        const struct ad_site *s = &m->sites[i];
        if (!bs_is_target(s))
            continue;
        snprintf(name, sizeof(name), "base_model.model.%s.lora_A.weight", s->path);
        r = bs_tensor_add(t, name, AD_DTYPE_BF16, 2, BS_RANK, s->n_in, 1.0f / (float)s->n_in, 0);
        snprintf(name, sizeof(name), "base_model.model.%s.lora_B.weight", s->path);
        if (r == 0)
            r = bs_tensor_add(t, name, AD_DTYPE_BF16, 2, s->n_out, BS_RANK, 0.01f, 0);
    }
    if (r == 0)
        r = bs_tensors_write(t, path, true);
    if (t)
        for (size_t i = 0; i < t->n; i++) {
            free(t->names[i]);
            free(t->data[i]);
        }
    free(t);
    return r;
}

static json_t *bs_lora_config(const struct ad_model *m)
{
    json_t *targets = json_array();
    for (int i = 0; targets && i < BS_N_ROLES; i++)
        json_array_append_new(targets, json_string(bs_role_names[i]));
    return json_pack("{s:s, s:s, s:b, s:i, s:i, s:f, s:s, s:o, s:s}", "peft_type", "LORA",
                     "task_type", "CAUSAL_LM", "inference_mode", 1, "r", BS_RANK, "lora_alpha",
                     2 * BS_RANK, "lora_dropout", 0.0, "bias", "none", "target_modules", targets,
                     "base_model_name_or_path", m->id);
}

/* A Houlsby bottleneck adapter (AdapterHub "double_seq_bn": after attention and after the MLP of
 * every layer, swish, reduction factor 16) as adapters 1.2 save_adapter(use_safetensors=True)
 * writes it and tests/adapters/reference.py copies: the full BnConfig under "config", no
 * peft_type, the adapter's name (aname) in the keys. Its tensors go into t; returns the config. */
static json_t *bs_bottleneck(const struct ad_model *m, const char *aname, struct bs_tensors *t,
                             int *ret)
{
    static const char *const places[] = {"attention_adapters", "output_adapters"};
    const struct ad_model_config *c = &m->cfg;
    int E = c->n_embd, d = E / BS_BN_REDUCTION, r = 0;
    char name[256];

    for (int l = 0; r == 0 && l < c->n_layer; l++)
        for (int k = 0; r == 0 && k < 2; k++) {
            /* down [d, E], down bias [d], up [E, d], up bias [E], small random */
            static const char *const params[] = {"adapter_down.0.weight", "adapter_down.0.bias",
                                                 "adapter_up.weight", "adapter_up.bias"};
            const int shape[4][3] = {{2, d, E}, {1, d, 0}, {2, E, d}, {1, E, 0}};
            const float scale[4] = {0.05f, 0.02f, 0.02f, 0.02f};
            for (int q = 0; r == 0 && q < 4; q++) {
                snprintf(name, sizeof(name), "model.layers.%d.%s.adapters.%.32s.%s", l, places[k],
                         aname, params[q]);
                r = bs_tensor_add(t, name, AD_DTYPE_F32, shape[q][0], shape[q][1], shape[q][2],
                                  scale[q], 0);
            }
        }
    *ret = r;
    json_t *bn = json_pack(
        "{s:b, s:b, s:f, s:b, s:b, s:s, s:s, s:n, s:n, s:n, s:b, s:b, s:[], s:b, s:b, s:b, s:s, "
        "s:b, s:b, s:b, s:b, s:s, s:i, s:f, s:b, s:i, s:i, s:b, s:f, s:b, s:b, s:f, s:b}",
        "adapter_residual_before_ln", 0, "cross_adapter", 0, "dropout", 0.0, "factorized_phm_W",
        1, "factorized_phm_rule", 0, "hypercomplex_nonlinearity", "glorot-uniform",
        "init_weights", "bert", "init_weights_seed", "inv_adapter",
        "inv_adapter_reduction_factor", "is_parallel", 0, "learn_phm", 1, "leave_out",
        "ln_after", 0, "ln_before", 0, "mh_adapter", 1, "non_linearity", "swish",
        "original_ln_after", 1, "original_ln_before", 0, "output_adapter", 1, "phm_bias", 1,
        "phm_c_init", "normal", "phm_dim", 4, "phm_init_range", 0.0001, "phm_layer", 0,
        "phm_rank", 1, "reduction_factor", BS_BN_REDUCTION, "residual_before_ln", 1, "scaling", 1.0,
        "shared_W_phm", 0, "shared_phm_rule", 1, "stochastic_depth", 0.0, "use_gating", 0);
    return bn ? json_pack("{s:o, s:i, s:s, s:s, s:s, s:s, s:s}", "config", bn, "hidden_size", E,
                          "model_class", c->architecture, "model_name", m->id, "model_type",
                          c->model_type, "name", aname, "version", "adapters.1.2.0")
              : NULL;
}

/* One adapter of a small kind (ia3, prefix, prompt, bitfit, bottleneck) into dir, F32, as
 * tests/integration/lib.js (bottleneck: tests/adapters/reference.py) writes them. */
static int bs_write_small(const struct ad_model *m, const char *kind, const char *dir)
{
    const struct ad_model_config *c = &m->cfg;
    int L = c->n_layer, kvd = c->n_kv_head * c->head_dim, r = 0;
    struct bs_tensors *t = calloc(1, sizeof(*t));
    char name[256], path[PATH_MAX];
    const char *wfile = "adapter_model.safetensors";
    json_t *cfg = NULL;

    if (!t)
        return -ENOMEM;
    if (!strcmp(kind, "bottleneck")) {
        const char *base = strrchr(dir, '/');
        cfg = bs_bottleneck(m, base ? base + 1 : dir, t, &r);
        wfile = "adapter.safetensors"; /* AdapterHub's name */
    } else if (!strcmp(kind, "ia3")) {
        for (int l = 0; r == 0 && l < L; l++) {
            snprintf(name, sizeof(name), "base_model.model.model.layers.%d.self_attn.k_proj.ia3_l",
                     l);
            r = bs_tensor_add(t, name, AD_DTYPE_F32, 2, kvd, 1, 0.2f, 1.0f);
            snprintf(name, sizeof(name), "base_model.model.model.layers.%d.self_attn.v_proj.ia3_l",
                     l);
            if (r == 0)
                r = bs_tensor_add(t, name, AD_DTYPE_F32, 2, kvd, 1, 0.2f, 1.0f);
            snprintf(name, sizeof(name), "base_model.model.model.layers.%d.mlp.down_proj.ia3_l", l);
            if (r == 0)
                r = bs_tensor_add(t, name, AD_DTYPE_F32, 2, 1, c->n_ff, 0.2f, 1.0f);
        }
        cfg = json_pack("{s:s, s:s, s:[sss], s:[s], s:b, s:s}", "peft_type", "IA3", "task_type",
                        "CAUSAL_LM", "target_modules", "k_proj", "v_proj", "down_proj",
                        "feedforward_modules", "down_proj", "fan_in_fan_out", 0,
                        "base_model_name_or_path", m->id);
    } else if (!strcmp(kind, "prefix")) {
        r = bs_tensor_add(t, "prompt_embeddings", AD_DTYPE_F32, 2, BS_N_VIRTUAL,
                          (int64_t)L * 2 * kvd, 1.0f, 0);
        cfg = json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:b, s:s}", "peft_type",
                        "PREFIX_TUNING", "task_type", "CAUSAL_LM", "num_virtual_tokens",
                        BS_N_VIRTUAL, "token_dim", kvd, "num_transformer_submodules", 1,
                        "num_attention_heads", c->n_kv_head, "num_layers", L,
                        "encoder_hidden_size", kvd, "prefix_projection", 0,
                        "base_model_name_or_path", m->id);
    } else if (!strcmp(kind, "prompt")) {
        r = bs_tensor_add(t, "prompt_embeddings", AD_DTYPE_F32, 2, BS_N_VIRTUAL, c->n_embd, 0.05f,
                          0);
        cfg = json_pack("{s:s, s:s, s:i, s:i, s:i, s:i, s:i, s:s, s:s}", "peft_type",
                        "PROMPT_TUNING", "task_type", "CAUSAL_LM", "num_virtual_tokens",
                        BS_N_VIRTUAL, "token_dim", c->n_embd, "num_transformer_submodules", 1,
                        "num_attention_heads", c->n_head, "num_layers", L, "prompt_tuning_init",
                        "RANDOM", "base_model_name_or_path", m->id);
    } else { /* bitfit: replacement biases of q_proj and down_proj */
        for (int l = 0; r == 0 && l < L; l++) {
            snprintf(name, sizeof(name), "base_model.model.model.layers.%d.self_attn.q_proj.bias",
                     l);
            r = bs_tensor_add(t, name, AD_DTYPE_F32, 1, c->n_head * c->head_dim, 0, 0.1f, 0);
            snprintf(name, sizeof(name), "base_model.model.model.layers.%d.mlp.down_proj.bias", l);
            if (r == 0)
                r = bs_tensor_add(t, name, AD_DTYPE_F32, 1, c->n_embd, 0, 0.02f, 0);
        }
        cfg = json_pack("{s:s, s:s, s:b, s:s}", "peft_type", "BITFIT", "task_type", "CAUSAL_LM",
                        "inference_mode", 1, "base_model_name_or_path", m->id);
    }
    if (r == 0)
        r = bs_mkdir(dir);
    if (r == 0)
        r = bs_join(path, sizeof(path), dir, wfile);
    if (r == 0)
        r = bs_tensors_write(t, path, strcmp(kind, "bottleneck") != 0);
    else
        json_decref(cfg);
    if (r == 0)
        r = bs_write_json(dir, cfg);
    for (size_t i = 0; i < t->n; i++) {
        free(t->names[i]);
        free(t->data[i]);
    }
    free(t);
    return r;
}

/* dir/adapter_config.json and dir/adapter_model.safetensors as hard links to config, weights. */
static int bs_link_adapter(const char *dir, const char *config, const char *weights)
{
    char a[PATH_MAX], b[PATH_MAX];
    int r = bs_mkdir(dir);
    if (r == 0)
        r = bs_join(a, sizeof(a), dir, "adapter_config.json");
    if (r == 0)
        r = bs_join(b, sizeof(b), dir, "adapter_model.safetensors");
    if (r < 0)
        return r;
    unlink(a);
    unlink(b);
    if (link(config, a) < 0 || link(weights, b) < 0) {
        r = -errno;
        fprintf(stderr, "bench-serve: link into '%s': %s\n", dir, strerror(-r));
    }
    return r;
}

/* Paths under the work directory. */
struct bs_paths {
    char model[PATH_MAX], store_a[PATH_MAX], store_z[PATH_MAX], weights[PATH_MAX];
    char conf[PATH_MAX], log[PATH_MAX];
};

static int bs_prepare(const struct bs_opts *o, struct bs_paths *p, long long *ret_file_bytes)
{
    char path[PATH_MAX], src[PATH_MAX], dst[PATH_MAX], name[64], cfgpath[PATH_MAX];
    struct ad_model *m = NULL;
    struct ad_err err = {0};
    int r;

    if (bs_mkdir(o->work) < 0)
        return -EIO;
    if (bs_join(p->model, sizeof(p->model), o->work, BS_MODEL_NAME) < 0 ||
        bs_join(p->store_a, sizeof(p->store_a), o->work, "store-a") < 0 ||
        bs_join(p->store_z, sizeof(p->store_z), o->work, "store-z") < 0 ||
        bs_join(p->weights, sizeof(p->weights), o->work, "weights") < 0 ||
        bs_join(p->conf, sizeof(p->conf), o->work, "empty.conf") < 0 ||
        bs_join(p->log, sizeof(p->log), o->work, "adapterd.log") < 0 ||
        bs_join(path, sizeof(path), o->work, BS_PREPARED) < 0)
        return -ENAMETOOLONG;
    if (bs_join(src, sizeof(src), p->weights, "lora-00.safetensors") < 0)
        return -ENAMETOOLONG;
    if (bs_exists(path)) {
        struct stat st;
        *ret_file_bytes = stat(src, &st) == 0 ? (long long)st.st_size : 0;
        return 0;
    }
    if ((r = bs_ensure_source_model(o)) < 0)
        return r;
    fprintf(stderr, "bench-serve: writing the model directory and adapters into '%s' (once)...\n",
            o->work);
    double t0 = ad_now();
    if ((r = ad_write_file(p->conf, "", 0)) < 0)
        return r;
    /* the model: symlinks to the source files, and the tokenizer */
    if ((r = bs_mkdir(p->model)) < 0)
        return r;
    static const char *const files[] = {"config.json", "model.safetensors",
                                        "generation_config.json"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        if (bs_join(src, sizeof(src), o->model_src, files[i]) < 0 ||
            bs_join(dst, sizeof(dst), p->model, files[i]) < 0)
            return -ENAMETOOLONG;
        if (!bs_exists(src))
            continue;
        char *abs = realpath(src, NULL);
        unlink(dst);
        r = abs && symlink(abs, dst) == 0 ? 0 : -errno;
        free(abs);
        if (r < 0) {
            fprintf(stderr, "bench-serve: symlink '%s': %s\n", dst, strerror(-r));
            return r;
        }
    }
    if ((r = ad_model_load(p->model, &m, &err)) < 0) {
        fprintf(stderr, "bench-serve: %s\n", err.msg);
        return r;
    }
    if (bs_join(path, sizeof(path), p->model, "tokenizer.json") < 0 ||
        (r = bs_write_tokenizer(path, m->cfg.n_vocab)) < 0)
        goto out;
    /* LoRA weight files and their config */
    if ((r = bs_mkdir(p->weights)) < 0 || (r = bs_mkdir(p->store_a)) < 0 ||
        (r = bs_mkdir(p->store_z)) < 0)
        goto out;
    if ((r = bs_join(cfgpath, sizeof(cfgpath), p->weights, "lora.json")) < 0)
        goto out;
    json_t *cfg = bs_lora_config(m);
    r = cfg && json_dump_file(cfg, cfgpath, JSON_INDENT(2) | JSON_SORT_KEYS) == 0 ? 0 : -EIO;
    json_decref(cfg);
    for (int i = 0; r == 0 && i < BS_N_LORA; i++) {
        snprintf(name, sizeof(name), "lora-%02d.safetensors", i);
        r = bs_join(src, sizeof(src), p->weights, name);
        if (r == 0)
            r = bs_write_lora_weights(m, src);
        snprintf(name, sizeof(name), "lora-%02d", i);
        if (r == 0)
            r = bs_join(dst, sizeof(dst), p->store_a, name);
        if (r == 0)
            r = bs_link_adapter(dst, cfgpath, src);
    }
    /* the small kinds */
    for (int k = 1; r == 0 && k < BS_N_KINDS; k++)
        for (int i = 0; r == 0 && i < BS_N_KIND; i++) {
            snprintf(name, sizeof(name), "%s-%d", bs_kinds[k], i);
            r = bs_join(dst, sizeof(dst), p->store_a, name);
            if (r == 0)
                r = bs_write_small(m, bs_kinds[k], dst);
        }
    /* 2,000 adapters over 20 weight files */
    for (int i = 0; r == 0 && i < BS_N_ZIPF; i++) {
        snprintf(name, sizeof(name), "lora-%02d.safetensors", i % BS_N_ZIPF_FILES);
        r = bs_join(src, sizeof(src), p->weights, name);
        snprintf(name, sizeof(name), "z%04d", i);
        if (r == 0)
            r = bs_join(dst, sizeof(dst), p->store_z, name);
        if (r == 0)
            r = bs_link_adapter(dst, cfgpath, src);
    }
    if (r < 0)
        goto out;
    if (bs_join(src, sizeof(src), p->weights, "lora-00.safetensors") < 0 ||
        bs_join(path, sizeof(path), o->work, BS_PREPARED) < 0) {
        r = -ENAMETOOLONG;
        goto out;
    }
    struct stat st;
    *ret_file_bytes = stat(src, &st) == 0 ? (long long)st.st_size : 0;
    r = ad_write_file(path, "1\n", 2);
    fprintf(stderr, "bench-serve: prepared in %.1f s\n", ad_now() - t0);
out:
    if (r < 0)
        fprintf(stderr, "bench-serve: preparing '%s' failed: %s\n", o->work, strerror(-r));
    ad_model_free(m);
    return r;
}

/* ==========================================================================================
 * The daemon: start on a free port, wait for /health, stop */

static pid_t bs_daemon_pid = -1;

static void bs_on_signal(int sig)
{
    if (bs_daemon_pid > 0)
        kill(bs_daemon_pid, SIGKILL);
    signal(sig, SIG_DFL);
    raise(sig);
}

static int bs_free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* Fetches url into a new string (*ret, caller frees). Returns the HTTP status or -1. */
static size_t bs_collect(char *ptr, size_t size, size_t nmemb, void *ud)
{
    char **s = ud;
    size_t n = size * nmemb, old = *s ? strlen(*s) : 0;
    char *p = realloc(*s, old + n + 1);
    if (!p)
        return 0;
    memcpy(p + old, ptr, n);
    p[old + n] = '\0';
    *s = p;
    return n;
}

static long bs_get(const char *url, char **ret)
{
    CURL *h = curl_easy_init();
    long status = -1;
    char *body = NULL;
    if (!h)
        return -1;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 30L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, bs_collect);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &body);
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_cleanup(h);
    if (ret)
        *ret = body;
    else
        free(body);
    return status;
}

struct bs_daemon {
    pid_t pid;
    int port;
    char base[64]; /* http://127.0.0.1:PORT */
    double startup_s;
};

/* set: one more --set KEY=VALUE for the daemon, or NULL. */
static int bs_daemon_start(const struct bs_opts *o, const struct bs_paths *p, const char *store,
                           int budget_mb, const char *set, struct bs_daemon *d)
{
    char listen[64], budget[64], health[96];
    d->port = bs_free_port();
    if (d->port <= 0)
        return -EADDRNOTAVAIL;
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", d->port);
    snprintf(d->base, sizeof(d->base), "http://127.0.0.1:%d", d->port);
    snprintf(budget, sizeof(budget), "adapter_budget_mb=%d", budget_mb);
    snprintf(health, sizeof(health), "%s/health", d->base);
    static bool truncated; /* the log holds this run's daemons */
    int fd = open(p->log, O_WRONLY | O_CREAT | O_APPEND | (truncated ? 0 : O_TRUNC), 0644);
    truncated = true;
    if (fd < 0)
        return -errno;
    double t0 = ad_now();
    d->pid = fork();
    if (d->pid < 0) {
        close(fd);
        return -errno;
    }
    if (d->pid == 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        char *argv[] = {(char *)o->adapterd, "-c", (char *)p->conf, "--model", (char *)p->model,
                        "--adapters", (char *)store, "--listen", listen, "--set", budget,
                        set ? "--set" : NULL, (char *)set, NULL};
        execv(argv[0], argv);
        _exit(127);
    }
    close(fd);
    bs_daemon_pid = d->pid;
    for (;;) {
        int status;
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            fprintf(stderr, "bench-serve: adapterd exited during startup (see '%s')\n", p->log);
            d->pid = bs_daemon_pid = -1;
            return -EIO;
        }
        if (bs_get(health, NULL) == 200)
            break;
        if (ad_now() - t0 > 600) {
            fprintf(stderr, "bench-serve: adapterd not healthy after 600 s\n");
            return -ETIMEDOUT;
        }
        bs_sleep(0.1);
    }
    d->startup_s = ad_now() - t0;
    return 0;
}

static void bs_daemon_stop(struct bs_daemon *d)
{
    if (d->pid <= 0)
        return;
    kill(d->pid, SIGTERM);
    double t0 = ad_now();
    int status;
    while (waitpid(d->pid, &status, WNOHANG) == 0) {
        if (ad_now() - t0 > 60) {
            kill(d->pid, SIGKILL);
            waitpid(d->pid, &status, 0);
            break;
        }
        bs_sleep(0.05);
    }
    d->pid = bs_daemon_pid = -1;
}

/* The resident bytes of adapter name from GET /v1/models, or -1. */
static long long bs_adapter_bytes(const struct bs_daemon *d, const char *name)
{
    char url[128], *body = NULL;
    long long bytes = -1;
    snprintf(url, sizeof(url), "%s/v1/models", d->base);
    if (bs_get(url, &body) == 200 && body) {
        json_t *root = json_loads(body, 0, NULL), *e;
        size_t i;
        json_array_foreach(json_object_get(root, "data"), i, e) {
            const char *id = json_string_value(json_object_get(e, "id"));
            if (id && !strcmp(id, name))
                bytes = json_integer_value(json_object_get(e, "bytes"));
        }
        json_decref(root);
    }
    free(body);
    return bytes;
}

/* ==========================================================================================
 * The client: streams over one libcurl multi handle */

struct bs_req {
    CURL *h;
    struct curl_slist *hdr;
    char *body;
    const char *adapter;
    char *buf; /* SSE bytes not yet parsed */
    size_t len, cap;
    char head[200]; /* the first bytes of the response, for error messages */
    size_t n_head;
    int want;         /* max_tokens: with ignore_eos, the tokens it must produce */
    double t_start, t_first;
    double *t_tok; /* arrival time of each token */
    int n_tok, cap_tok;
    int usage_tokens; /* completion_tokens of the last chunk */
    int cached;       /* its prompt_tokens_details.cached_tokens */
    bool done;        /* data: [DONE] seen */
    bool active;      /* in the multi handle */
    bool started;     /* since the last bs_loop_account */
    char errbuf[CURL_ERROR_SIZE];
};

/* Handles one SSE event (without the blank line). */
static void bs_event(struct bs_req *q, const char *ev, size_t n, double now)
{
    if (n < 6 || memcmp(ev, "data: ", 6))
        return;
    ev += 6;
    n -= 6;
    if (n == 6 && !memcmp(ev, "[DONE]", 6)) {
        q->done = true;
        return;
    }
    json_t *root = json_loadb(ev, n, 0, NULL);
    json_t *choice = json_array_get(json_object_get(root, "choices"), 0);
    json_t *usage = json_object_get(root, "usage");
    size_t len = json_string_length(json_object_get(choice, "text"));
    int k = (int)(len / BS_TOKEN_WIDTH);
    if (q->n_tok + k > q->cap_tok) {
        int cap = q->n_tok + k + 64;
        double *t = realloc(q->t_tok, (size_t)cap * sizeof(*t));
        if (!t)
            k = 0;
        else {
            q->t_tok = t;
            q->cap_tok = cap;
        }
    }
    if (k > 0 && q->n_tok == 0)
        q->t_first = now;
    for (int i = 0; i < k; i++)
        q->t_tok[q->n_tok++] = now;
    if (usage) {
        q->usage_tokens = (int)json_integer_value(json_object_get(usage, "completion_tokens"));
        q->cached = (int)json_integer_value(
            json_object_get(json_object_get(usage, "prompt_tokens_details"), "cached_tokens"));
    }
    json_decref(root);
}

static size_t bs_write(char *ptr, size_t size, size_t nmemb, void *ud)
{
    struct bs_req *q = ud;
    size_t n = size * nmemb;
    double now = ad_now();
    if (q->n_head < sizeof(q->head) - 1) {
        size_t k = n < sizeof(q->head) - 1 - q->n_head ? n : sizeof(q->head) - 1 - q->n_head;
        memcpy(q->head + q->n_head, ptr, k);
        q->n_head += k;
        q->head[q->n_head] = '\0';
    }
    if (q->len + n + 1 > q->cap) {
        size_t cap = (q->len + n + 1) * 2;
        char *b = realloc(q->buf, cap);
        if (!b)
            return 0;
        q->buf = b;
        q->cap = cap;
    }
    memcpy(q->buf + q->len, ptr, n);
    q->len += n;
    q->buf[q->len] = '\0';
    size_t off = 0;
    for (;;) {
        char *end = strstr(q->buf + off, "\n\n");
        if (!end)
            break;
        bs_event(q, q->buf + off, (size_t)(end - (q->buf + off)), now);
        off = (size_t)(end - q->buf) + 2;
    }
    memmove(q->buf, q->buf + off, q->len - off + 1);
    q->len -= off;
    return n;
}

struct bs_client {
    CURLM *multi;
    char url[128];     /* .../v1/completions */
    const char *base;  /* the base model's id */
    int prompt, tokens, n_vocab;
    const int *head;   /* n_head token ids that start every prompt, before its random ones */
    int n_head;
    struct bs_req req[BS_MAX_STREAMS];
};

/* Starts a completion stream of max_tokens on slot i for adapter (NULL: the base model). */
static int bs_start(struct bs_client *c, int i, const char *adapter, int max_tokens)
{
    struct bs_req *q = &c->req[i];
    json_t *ids = json_array();
    for (int k = 0; ids && k < c->n_head; k++)
        json_array_append_new(ids, json_integer(c->head[k]));
    for (int k = 0; ids && k < c->prompt; k++)
        json_array_append_new(ids, json_integer((json_int_t)(bs_rand32() % (uint32_t)c->n_vocab)));
    json_t *body = json_pack("{s:s, s:o, s:i, s:f, s:b, s:b}", "model", adapter ? adapter : c->base,
                             "prompt", ids, "max_tokens", max_tokens, "temperature", 0.0,
                             "ignore_eos", 1, "stream", 1);
    free(q->body);
    q->body = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!q->body)
        return -ENOMEM;
    if (!q->h) {
        q->h = curl_easy_init();
        q->hdr = curl_slist_append(NULL, "Content-Type: application/json");
        if (!q->h || !q->hdr)
            return -ENOMEM;
    }
    q->adapter = adapter;
    q->want = max_tokens;
    q->len = q->n_head = 0;
    q->head[0] = '\0';
    q->n_tok = 0;
    q->usage_tokens = q->cached = -1;
    q->done = false;
    q->t_first = NAN;
    q->started = true;
    curl_easy_setopt(q->h, CURLOPT_URL, c->url);
    curl_easy_setopt(q->h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(q->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(q->h, CURLOPT_TIMEOUT, 600L);
    curl_easy_setopt(q->h, CURLOPT_HTTPHEADER, q->hdr);
    curl_easy_setopt(q->h, CURLOPT_POSTFIELDS, q->body);
    curl_easy_setopt(q->h, CURLOPT_WRITEFUNCTION, bs_write);
    curl_easy_setopt(q->h, CURLOPT_WRITEDATA, q);
    curl_easy_setopt(q->h, CURLOPT_ERRORBUFFER, q->errbuf);
    q->errbuf[0] = '\0';
    q->t_start = ad_now();
    if (curl_multi_add_handle(c->multi, q->h) != CURLM_OK)
        return -EIO;
    q->active = true;
    return 0;
}

static void bs_stop(struct bs_client *c, int i)
{
    struct bs_req *q = &c->req[i];
    if (q->active)
        curl_multi_remove_handle(c->multi, q->h);
    q->active = false;
}

/* What a finished request reports; -EIO (and a message) if it did not produce every token. */
static int bs_check(struct bs_client *c, struct bs_req *q, CURLcode res)
{
    long status = 0;
    curl_easy_getinfo(q->h, CURLINFO_RESPONSE_CODE, &status);
    if (res == CURLE_OK && status == 200 && q->done && q->n_tok == q->want &&
        q->usage_tokens == q->want)
        return 0;
    fprintf(stderr, "bench-serve: request to '%s' failed: curl '%s', HTTP %ld, %d tokens (usage %d)"
            ", [DONE] %s: %s\n", q->adapter ? q->adapter : c->base,
            res == CURLE_OK ? "ok" : q->errbuf[0] ? q->errbuf : curl_easy_strerror(res), status,
            q->n_tok, q->usage_tokens, q->done ? "seen" : "missing", q->head);
    return -EIO;
}

/* Drives the multi handle until nothing is running or until deadline (then the requests still
 * running are dropped: the daemon cancels them). on_done runs for each finished request and may
 * start another on its slot; on_tick runs every turn, may start requests, and returns how many
 * it still means to start. Returns 0 or the first error. */
typedef int (*bs_done_fn)(struct bs_client *c, int slot, void *ud);
typedef int (*bs_tick_fn)(struct bs_client *c, void *ud);

static int bs_drive(struct bs_client *c, double deadline, bs_done_fn on_done, bs_tick_fn on_tick,
                    void *ud)
{
    int running = 1, rc = 0, pending = 0;
    while ((running > 0 || pending > 0) && rc == 0) {
        if (on_tick && (pending = on_tick(c, ud)) < 0)
            return pending;
        if (curl_multi_perform(c->multi, &running) != CURLM_OK)
            return -EIO;
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(c->multi, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            int slot = -1;
            for (int i = 0; i < BS_MAX_STREAMS; i++)
                if (c->req[i].active && c->req[i].h == msg->easy_handle)
                    slot = i;
            if (slot < 0)
                continue;
            CURLcode res = msg->data.result;
            bs_stop(c, slot);
            if (rc == 0)
                rc = bs_check(c, &c->req[slot], res);
            if (rc == 0 && on_done)
                rc = on_done(c, slot, ud);
            running = 1; /* on_done may have added a handle */
        }
        if (deadline > 0 && ad_now() >= deadline)
            break;
        if ((running > 0 || pending > 0) &&
            curl_multi_poll(c->multi, NULL, 0, pending > 0 ? 5 : 20, NULL) != CURLM_OK)
            return -EIO;
    }
    for (int i = 0; i < BS_MAX_STREAMS; i++)
        bs_stop(c, i);
    return rc;
}

/* ==========================================================================================
 * Measurements */

/* CPU time in seconds: the machine's busy time (every CPU, steal included), the daemon's and
 * this process's. What is left is what other processes used while we measured. */
struct bs_cpu {
    double wall, busy, daemon, self;
};

static double bs_proc_cpu(const char *path)
{
    char buf[1024];
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof(buf) - 1, f) : 0;
    if (f)
        fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, st = 0;
    /* after "pid (comm)": state is field 3, utime 14, stime 15 */
    if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut,
                     &st) != 2)
        return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

static void bs_cpu_now(struct bs_cpu *c)
{
    unsigned long long v[8] = {0};
    char path[64];
    FILE *f = fopen("/proc/stat", "r");
    if (!f || fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                     &v[3], &v[4], &v[5], &v[6], &v[7]) != 8)
        memset(v, 0, sizeof(v));
    if (f)
        fclose(f);
    /* user nice system idle iowait irq softirq steal */
    c->busy = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)sysconf(_SC_CLK_TCK);
    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)bs_daemon_pid);
    c->daemon = bs_daemon_pid > 0 ? bs_proc_cpu(path) : 0;
    c->self = bs_proc_cpu("/proc/self/stat");
    c->wall = ad_now();
}

/* Cores used by other processes (and stolen by the hypervisor) between a and b. */
static double bs_cpu_others(const struct bs_cpu *a, const struct bs_cpu *b)
{
    double dt = b->wall - a->wall;
    double o = (b->busy - a->busy) - (b->daemon - a->daemon) - (b->self - a->self);
    return dt > 0 ? fmax(o, 0) / dt : 0;
}

/* A burst: n streams started together; each with its own adapter (NULL: base). */
struct bs_burst {
    double tok_s;            /* aggregate tokens/s while every stream decodes */
    double window_s;         /* length of that window */
    double ttft_p50, ttft_max;
    double others;           /* cores used by other processes meanwhile */
    long cached;             /* prompt tokens the daemon found in its prefix cache */
};

static int bs_run_burst(struct bs_client *c, int n, const char *const *adapters,
                        struct bs_burst *res)
{
    double ttft[BS_MAX_STREAMS];
    struct bs_cpu u0, u1;
    int r = 0;
    res->cached = 0;
    bs_cpu_now(&u0);
    for (int i = 0; i < n && r == 0; i++)
        r = bs_start(c, i, adapters ? adapters[i] : NULL, c->tokens);
    if (r == 0)
        r = bs_drive(c, 0, NULL, NULL, NULL);
    if (r < 0)
        return r;
    bs_cpu_now(&u1);
    res->others = bs_cpu_others(&u0, &u1);
    /* the window from the last first token to the first last token */
    double w0 = 0, w1 = INFINITY;
    for (int i = 0; i < n; i++) {
        struct bs_req *q = &c->req[i];
        w0 = fmax(w0, q->t_first);
        w1 = fmin(w1, q->t_tok[q->n_tok - 1]);
        ttft[i] = q->t_first - q->t_start;
        res->cached += q->cached;
    }
    long count = 0;
    if (w1 > w0) {
        for (int i = 0; i < n; i++)
            for (int k = 0; k < c->req[i].n_tok; k++)
                count += c->req[i].t_tok[k] > w0 && c->req[i].t_tok[k] <= w1;
    } else { /* no moment when every stream decodes: the whole span instead */
        double t0 = INFINITY, t1 = 0;
        for (int i = 0; i < n; i++) {
            t0 = fmin(t0, c->req[i].t_first);
            t1 = fmax(t1, c->req[i].t_tok[c->req[i].n_tok - 1]);
            count += c->req[i].n_tok - 1;
        }
        w0 = t0;
        w1 = t1;
    }
    res->window_s = w1 - w0;
    res->tok_s = res->window_s > 0 ? (double)count / res->window_s : NAN;
    res->ttft_max = bs_quantile(ttft, n, 1.0);
    res->ttft_p50 = bs_quantile(ttft, n, 0.5);
    return 0;
}

/* A closed loop: n streams, each starting a new request when its last one ends, for `window`
 * seconds after `warm` seconds; tokens are counted inside the window, and the time to first
 * token of every request started inside it. pick() chooses each request's adapter (NULL: the
 * base) from ud and the stream's slot. The streams start one by one over the first half of the
 * warm-up, and each request asks for a random number of tokens (--tokens / 2 to
 * 3 * --tokens / 2), so that the streams do not run in lock step (all prefilling at once, then
 * all decoding). The requests still running at the end of the window are dropped. With steady,
 * for requests that may take longer than the warm-up: the window opens when every stream has
 * finished a request (and `warm` seconds have passed), and the requests running at its end run
 * to their end (none starts then), so that every request started in the window has its time
 * to first token, however long it is. */
typedef const char *(*bs_pick_fn)(void *ud, int slot);

struct bs_loop {
    bs_pick_fn pick;
    void *ud;
    int n, n_started, n_done;
    bool steady;
    double start0, stagger, warm, window;
    double t0, t1;       /* the window */
    double *ttft;        /* of requests started in the window */
    int n_ttft, cap_ttft;
    long tokens;         /* arrived in the window */
    int n_req;           /* requests started */
    long cached;         /* cached_tokens of the n_usage requests that finished */
    int n_usage;
};

static void bs_loop_account(struct bs_loop *l, struct bs_req *q)
{
    if (!q->started)
        return;
    q->started = false;
    if (q->cached >= 0) {
        l->cached += q->cached;
        l->n_usage++;
    }
    for (int k = 0; k < q->n_tok; k++)
        l->tokens += q->t_tok[k] > l->t0 && q->t_tok[k] <= l->t1;
    if (q->t_start >= l->t0 && q->t_start < l->t1 && q->n_tok > 0) {
        if (l->n_ttft == l->cap_ttft) {
            int cap = l->cap_ttft ? 2 * l->cap_ttft : 256;
            double *t = realloc(l->ttft, (size_t)cap * sizeof(*t));
            if (!t)
                return;
            l->ttft = t;
            l->cap_ttft = cap;
        }
        l->ttft[l->n_ttft++] = q->t_first - q->t_start;
    }
}

static int bs_loop_tokens(const struct bs_client *c)
{
    return c->tokens / 2 + (int)(bs_rand32() % (uint32_t)(c->tokens + 1));
}

static int bs_loop_done(struct bs_client *c, int slot, void *ud)
{
    struct bs_loop *l = ud;
    bs_loop_account(l, &c->req[slot]);
    if (l->steady && ++l->n_done == l->n) { /* the window opens */
        l->t0 = fmax(ad_now(), l->start0 + l->warm);
        l->t1 = l->t0 + l->window;
    }
    if (ad_now() >= l->t1)
        return 0;
    l->n_req++;
    return bs_start(c, slot, l->pick(l->ud, slot), bs_loop_tokens(c));
}

static int bs_loop_tick(struct bs_client *c, void *ud)
{
    struct bs_loop *l = ud;
    while (l->n_started < l->n && ad_now() >= l->start0 + l->n_started * l->stagger) {
        int slot = l->n_started++;
        int r = bs_start(c, slot, l->pick(l->ud, slot), bs_loop_tokens(c));
        if (r < 0)
            return r;
        l->n_req++;
    }
    return l->n - l->n_started;
}

/* What the rounds of one scenario measured: tokens/s of each, the TTFT of all their requests. */
struct bs_pool {
    double best, sum;
    int rounds;
    double *ttft;
    int n_ttft, n_req;
    double others_sum; /* cores used by other processes, summed over the rounds */
    bool has_clean;    /* best is from a clean round */
    long cached;       /* cached_tokens of the n_usage requests that finished */
    int n_usage;
};

static int bs_run_loop(struct bs_client *c, int n, double warm, double window, bool steady,
                       bs_pick_fn pick, void *ud, struct bs_pool *pool)
{
    struct bs_loop l = {.pick = pick, .ud = ud, .n = n, .steady = steady, .warm = warm,
                        .window = window};
    double now = ad_now();
    l.start0 = now;
    l.stagger = warm / 2 / n;
    l.t0 = steady ? INFINITY : now + warm; /* steady: set by bs_loop_done */
    l.t1 = l.t0 + window;
    struct bs_cpu u0, u1;
    bs_cpu_now(&u0);
    int r = bs_drive(c, steady ? 0 : l.t1, bs_loop_done, bs_loop_tick, &l);
    bs_cpu_now(&u1);
    /* requests cut off at the end of the window: their tokens so far */
    for (int i = 0; i < n; i++)
        bs_loop_account(&l, &c->req[i]);
    if (r == 0 && pool) {
        double tok_s = (double)l.tokens / window;
        bool clean = bs_cpu_others(&u0, &u1) < BS_CLEAN;
        if ((clean && !pool->has_clean) || (clean == pool->has_clean && tok_s > pool->best))
            pool->best = tok_s;
        pool->has_clean |= clean;
        pool->sum += tok_s;
        pool->rounds++;
        pool->others_sum += bs_cpu_others(&u0, &u1);
        pool->n_req += l.n_req;
        pool->cached += l.cached;
        pool->n_usage += l.n_usage;
        double *t = realloc(pool->ttft, (size_t)(pool->n_ttft + l.n_ttft + 1) * sizeof(*t));
        if (t) {
            memcpy(t + pool->n_ttft, l.ttft, (size_t)l.n_ttft * sizeof(*t));
            pool->ttft = t;
            pool->n_ttft += l.n_ttft;
        }
    }
    free(l.ttft);
    bs_sleep(1.0); /* let the daemon cancel the dropped streams */
    return r;
}

/* ==========================================================================================
 * Adapter choice: a fixed set, or Zipf over 2,000 (with an LRU estimate of the misses) */

struct bs_zipf {
    double cdf[BS_N_ZIPF];
    int perm[BS_N_ZIPF]; /* popularity rank -> adapter index, so that popularity is unrelated to
                            the order in which the daemon scans the store */
    char names[BS_N_ZIPF][8];
    /* LRU simulation of the resident set: most recent first */
    int lru[BS_N_ZIPF], n_lru, lru_cap;
    long picks, misses;
    int n_fixed; /* > 0: pick uniformly among the n_fixed most popular instead */
};

static void bs_zipf_init(struct bs_zipf *z, int lru_cap)
{
    double sum = 0;
    for (int k = 0; k < BS_N_ZIPF; k++) {
        sum += 1.0 / pow(k + 1, BS_ZIPF_S);
        z->cdf[k] = sum;
        z->perm[k] = k;
        snprintf(z->names[k], sizeof(z->names[k]), "z%04d", k);
    }
    for (int k = 0; k < BS_N_ZIPF; k++)
        z->cdf[k] /= sum;
    for (int k = BS_N_ZIPF - 1; k > 0; k--) {
        int j = (int)(bs_rand32() % (uint32_t)(k + 1)), t = z->perm[k];
        z->perm[k] = z->perm[j];
        z->perm[j] = t;
    }
    z->lru_cap = lru_cap;
}

/* Share of the requests that go to the top `k` adapters. */
static double bs_zipf_mass(const struct bs_zipf *z, int k)
{
    return k <= 0 ? 0 : z->cdf[k < BS_N_ZIPF ? k - 1 : BS_N_ZIPF - 1];
}

static const char *bs_zipf_pick(void *ud, int slot)
{
    struct bs_zipf *z = ud;
    int rank;
    if (z->n_fixed > 0) {
        rank = (int)(bs_rand32() % (uint32_t)z->n_fixed);
    } else {
        double u = bs_rand01();
        int lo = 0, hi = BS_N_ZIPF - 1;
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (z->cdf[mid] > u)
                hi = mid;
            else
                lo = mid + 1;
        }
        rank = lo;
    }
    int idx = z->perm[rank], pos = -1;
    for (int i = 0; i < z->n_lru; i++)
        if (z->lru[i] == idx)
            pos = i;
    z->picks++;
    if (pos < 0) {
        z->misses++;
        pos = z->n_lru < z->lru_cap ? z->n_lru++ : z->n_lru - 1;
    }
    memmove(z->lru + 1, z->lru, (size_t)pos * sizeof(int));
    z->lru[0] = idx;
    return z->names[idx];
}

/* The LRU warm-up: n requests of 1 prompt token and 1 generated token, Zipf-distributed, 32 at a
 * time. Cheap for the engine; every miss loads an adapter, as in the measured loops. */
struct bs_warm {
    struct bs_zipf *z;
    int left;
};

static int bs_warm_done(struct bs_client *c, int slot, void *ud)
{
    struct bs_warm *w = ud;
    if (w->left <= 0)
        return 0;
    w->left--;
    return bs_start(c, slot, bs_zipf_pick(w->z, slot), 1);
}

static int bs_lru_warm(struct bs_client *c, struct bs_zipf *z, int n)
{
    struct bs_warm w = {z, n};
    int prompt = c->prompt, r = 0;
    c->prompt = 1;
    for (int i = 0; i < 32 && w.left > 0 && r == 0; i++) {
        w.left--;
        r = bs_start(c, i, bs_zipf_pick(z, i), 1);
    }
    if (r == 0)
        r = bs_drive(c, 0, bs_warm_done, NULL, &w);
    c->prompt = prompt;
    return r;
}

/* ==========================================================================================
 * The parts */

static void bs_print_burst_row(int n, const struct bs_burst *b, const struct bs_burst *a)
{
    printf("%7d | %10.1f | %11.1f | %10.3f | %8.0f / %6.0f | %9.0f / %6.0f | %4.2f / %4.2f\n",
           n, b->tok_s, a->tok_s, a->tok_s / b->tok_s, b->ttft_p50 * 1e3, b->ttft_max * 1e3,
           a->ttft_p50 * 1e3, a->ttft_max * 1e3, b->others, a->others);
}

/* Keeps the best round: a clean one before a disturbed one, then the higher tokens/s. */
static void bs_keep_best(struct bs_burst *best, const struct bs_burst *b)
{
    bool cb = b->others < BS_CLEAN, cbest = best->others < BS_CLEAN;
    if (best->tok_s == 0 || (cb && !cbest) || (cb == cbest && b->tok_s > best->tok_s))
        *best = *b;
}

static bool bs_pair_clean(const struct bs_burst *a, const struct bs_burst *b)
{
    return a->others < BS_CLEAN && b->others < BS_CLEAN;
}

/* Base and then the adapters (names, NULL: base) at n streams, kept in best and best_a. */
static int bs_run_pair(struct bs_client *c, int n, const char *const *names,
                       struct bs_burst *best, struct bs_burst *best_a)
{
    struct bs_burst b;
    int r = bs_run_burst(c, n, NULL, &b);
    if (r == 0) {
        bs_keep_best(best, &b);
        r = bs_run_burst(c, n, names, &b);
    }
    if (r == 0)
        bs_keep_best(best_a, &b);
    return r;
}

static const int bs_levels[] = {1, 4, 16, 32};
#define BS_N_LEVELS ((int)(sizeof(bs_levels) / sizeof(bs_levels[0])))

/* Part 1 (and 1b, the daemon with lora_dtype = int8: what says which). */
static int bs_part_streams(const struct bs_opts *o, struct bs_client *c, const char *what,
                           double ratio[])
{
    const char *names[BS_MAX_STREAMS];
    char buf[BS_MAX_STREAMS][16];
    struct bs_burst base[BS_N_LEVELS] = {{0}}, mixed[BS_N_LEVELS] = {{0}}, b;
    int r = 0;
    for (int i = 0; i < BS_N_LORA; i++) {
        snprintf(buf[i], sizeof(buf[i]), "lora-%02d", i);
        names[i] = buf[i];
    }
    /* warm-up: every adapter once, the base at the largest batch */
    if ((r = bs_run_burst(c, BS_N_LORA, names, &b)) < 0 ||
        (r = bs_run_burst(c, BS_N_LORA, NULL, &b)) < 0)
        return r;
    int extra = 0;
    for (int round = 0; round < o->rounds + BS_MAX_EXTRA; round++)
        for (int l = 0; l < BS_N_LEVELS; l++) {
            /* after the rounds, again only where every round was disturbed */
            if (round >= o->rounds && bs_pair_clean(&base[l], &mixed[l]))
                continue;
            extra += round >= o->rounds;
            /* a different set of adapters each round */
            const char *set[BS_MAX_STREAMS];
            for (int i = 0; i < bs_levels[l]; i++)
                set[i] = names[(i + round * 7) % BS_N_LORA];
            if ((r = bs_run_pair(c, bs_levels[l], set, &base[l], &mixed[l])) < 0)
                return r;
        }
    printf("\n== %s\n", what);
    printf("streams started together; aggregate tokens/s while all of them decode; best of %d "
           "rounds (+%d repeated: others >= %.2f); TTFT in ms\n", o->rounds, extra, BS_CLEAN);
    printf("streams | base tok/s | mixed tok/s | mixed/base | base TTFT p50/max | mixed TTFT "
           "p50/max | others b/m\n");
    for (int l = 0; l < BS_N_LEVELS; l++) {
        bs_print_burst_row(bs_levels[l], &base[l], &mixed[l]);
        ratio[l] = mixed[l].tok_s / base[l].tok_s;
    }
    return 0;
}

static int bs_part_kinds(const struct bs_opts *o, struct bs_client *c, double *ratio)
{
    const char *names[BS_MAX_STREAMS];
    char buf[BS_MAX_STREAMS][24];
    struct bs_burst base = {0}, kinds = {0}, b;
    int n = o->kinds_streams, r;
    for (int i = 0; i < n; i++) {
        int k = i % BS_N_KINDS, j = i / BS_N_KINDS;
        if (k == 0)
            snprintf(buf[i], sizeof(buf[i]), "lora-%02d", j);
        else
            snprintf(buf[i], sizeof(buf[i]), "%s-%d", bs_kinds[k], j % BS_N_KIND);
        names[i] = buf[i];
    }
    if ((r = bs_run_burst(c, n, names, &b)) < 0) /* warm-up */
        return r;
    int extra = 0;
    for (int round = 0; round < o->rounds + BS_MAX_EXTRA; round++) {
        if (round >= o->rounds && bs_pair_clean(&base, &kinds))
            break;
        extra += round >= o->rounds;
        if ((r = bs_run_pair(c, n, names, &base, &kinds)) < 0)
            return r;
    }
    printf("\n== 2. adapters of every kind in one batch\n");
    printf("%d streams cycling LoRA (rank 16, 7 projections), IA3 (k, v, down), prefix tuning "
           "(%d virtual tokens), prompt tuning (%d virtual tokens), bias set (q, down), "
           "bottleneck (Houlsby, reduction factor %d); best of %d rounds (+%d repeated); TTFT in "
           "ms\n", n, BS_N_VIRTUAL, BS_N_VIRTUAL, BS_BN_REDUCTION, o->rounds, extra);
    printf("streams | base tok/s | kinds tok/s | kinds/base | base TTFT p50/max | kinds TTFT "
           "p50/max | others b/k\n");
    bs_print_burst_row(n, &base, &kinds);
    *ratio = kinds.tok_s / base.tok_s;
    return 0;
}

static void bs_print_loop(const char *what, struct bs_pool *x)
{
    printf("%-22s | %11.1f | %8.1f | %5d | %12.0f | %6.0f | %6.0f | %6.2f\n", what, x->best,
           x->sum / x->rounds, x->n_ttft, bs_quantile(x->ttft, x->n_ttft, 0.5) * 1e3,
           bs_quantile(x->ttft, x->n_ttft, 0.99) * 1e3, bs_quantile(x->ttft, x->n_ttft, 1.0) * 1e3,
           x->others_sum / x->rounds);
}

static int bs_part_zipf(const struct bs_opts *o, const struct bs_paths *p, struct bs_client *c,
                        long long adapter_bytes, double *ratio)
{
    struct bs_daemon d = {0};
    struct bs_zipf *z = calloc(1, sizeof(*z));
    struct bs_pool p5 = {0}, pz = {0};
    char before[128], after[128];
    int n = o->zipf_streams, r;
    if (!z)
        return -ENOMEM;
    int n_res = (int)(BS_N_ZIPF * BS_RESIDENT_SHARE);
    int budget_mb = (int)((adapter_bytes * n_res + (1 << 20) - 1) >> 20);
    bs_zipf_init(z, n_res);
    bench_loadavg(before, sizeof(before));
    if ((r = bs_daemon_start(o, p, p->store_z, budget_mb, NULL, &d)) < 0)
        goto out;
    snprintf(c->url, sizeof(c->url), "%s/v1/completions", d.base);
    printf("\n== 3. %d registered adapters, Zipf popularity (s = %.1f), resident budget for %d "
           "(%d%%)\n", BS_N_ZIPF, BS_ZIPF_S, n_res, (int)(BS_RESIDENT_SHARE * 100));
    printf("store: %d adapter directories, their files hard links to %d distinct weight files "
           "(to save disk); the daemon loads every directory on its own\n", BS_N_ZIPF,
           BS_N_ZIPF_FILES);
    printf("adapter_budget_mb=%d (%d x %.1f MB resident); daemon healthy %.1f s after start "
           "(loads adapters while the budget allows)\n", budget_mb, n_res,
           (double)adapter_bytes / 1e6, d.startup_s);
    printf("closed loop: %d streams, each starting a new request when its last ends (max_tokens "
           "%d to %d at random, so that they do not run in lock step); tokens/s in a %.0f s "
           "window after %.0f s of warm-up; TTFT of the requests started in the window\n", n,
           o->tokens / 2, o->tokens / 2 + o->tokens, o->window, BS_LOOP_WARM);
    printf("the top %d adapters get %.0f%% of the requests under this Zipf law\n", n_res,
           100 * bs_zipf_mass(z, n_res));

    /* warm-up: fill the resident set with popular adapters (the daemon's scan left the last
     * 200 in directory order resident), then the 5 */
    double tw = ad_now();
    if ((r = bs_lru_warm(c, z, BS_LRU_WARM)) < 0)
        goto out;
    printf("LRU warm-up: %d Zipf requests of 1 prompt and 1 generated token, 32 at a time: "
           "%.1f s; the LRU estimate misses %.0f%% of them\n", BS_LRU_WARM, ad_now() - tw,
           100.0 * (double)z->misses / (double)z->picks);
    long picks0 = 0, misses0 = 0;
    int extra = 0;
    for (int round = 0; round < o->zipf_rounds + 1; round++) {
        if (round >= o->zipf_rounds && p5.has_clean && pz.has_clean)
            break;
        extra += round >= o->zipf_rounds;
        z->n_fixed = o->zipf_fixed;
        if ((r = bs_run_loop(c, n, BS_LOOP_WARM, o->window, false, bs_zipf_pick, z, &p5)) < 0)
            goto out;
        z->n_fixed = 0;
        long pk = z->picks, ms = z->misses;
        if ((r = bs_run_loop(c, n, BS_LOOP_WARM, o->window, false, bs_zipf_pick, z, &pz)) < 0)
            goto out;
        picks0 += z->picks - pk;
        misses0 += z->misses - ms;
    }
    bench_loadavg(after, sizeof(after));
    printf("load average during this part: %s (before) -> %s (after)\n", before, after);
    printf("%d rounds (+%d repeated: others >= %.2f), taking turns; best: of the clean rounds if "
           "any; TTFT over the requests of every round\n", o->zipf_rounds, extra, BS_CLEAN);
    printf("%-22s | tok/s: best |     mean | reqs  | TTFT ms: p50 |    p99 |    max | others\n",
           "");
    char what[64];
    snprintf(what, sizeof(what), "%d adapters (uniform)", o->zipf_fixed);
    bs_print_loop(what, &p5);
    bs_print_loop("2000 adapters (Zipf)", &pz);
    printf("Zipf requests of the rounds that an LRU of %d would miss (client-side estimate of "
           "loads): %.1f%%\n", n_res, picks0 ? 100.0 * (double)misses0 / (double)picks0 : 0.0);
    *ratio = pz.best / p5.best;
out:
    bs_daemon_stop(&d);
    free(p5.ttft);
    free(pz.ttft);
    free(z);
    return r;
}

/* ==========================================================================================
 * The prefix cache: one shared system prompt, the daemon with the cache and without */

/* The value of a counter or gauge in the daemon's /metrics, or -1. */
static long long bs_metric(const struct bs_daemon *d, const char *name)
{
    char url[128], key[128], *body = NULL;
    long long v = -1;
    snprintf(url, sizeof(url), "%s/metrics", d->base);
    snprintf(key, sizeof(key), "\n%s ", name);
    if (bs_get(url, &body) == 200 && body) {
        const char *at = strstr(body, key);
        if (at)
            v = strtoll(at + strlen(key), NULL, 10);
    }
    free(body);
    return v;
}

/* Half the streams on the base, half on one LoRA adapter. */
static const char *bs_prefix_pick(void *ud, int slot)
{
    return slot % 2 ? BS_PREFIX_LORA : NULL;
}

/* What one daemon of the prefix part measured. */
struct bs_prefix {
    double ttft[BS_PREFIX_REQS]; /* one request at a time */
    double others;               /* the same: cores of other processes, mean over the requests */
    long cached;                 /* the same: cached_tokens, summed */
    struct bs_pool loop;         /* the closed loop */
    long long hits;              /* adapterd_prefix_cache_hits_total at the end */
};

/* Starts the daemon with prefix_cache=1 (on) or 0, measures into x, and stops it. */
static int bs_prefix_run(const struct bs_opts *o, const struct bs_paths *p, struct bs_client *c,
                         bool on, struct bs_prefix *x)
{
    struct bs_daemon d = {0};
    struct bs_burst b;
    int r = bs_daemon_start(o, p, p->store_a, BS_BUDGET_A, on ? "prefix_cache=1" : "prefix_cache=0",
                            &d);
    if (r == 0)
        snprintf(c->url, sizeof(c->url), "%s/v1/completions", d.base);
    for (int i = 0; r == 0 && i < BS_PREFIX_WARM + BS_PREFIX_REQS; i++) {
        r = bs_run_burst(c, 1, NULL, &b);
        if (r == 0 && i >= BS_PREFIX_WARM) {
            x->ttft[i - BS_PREFIX_WARM] = b.ttft_p50;
            x->others += b.others / BS_PREFIX_REQS;
            x->cached += b.cached;
        }
    }
    if (r == 0)
        r = bs_run_loop(c, BS_PREFIX_STREAMS, BS_LOOP_WARM, o->window, true, bs_prefix_pick, NULL,
                        &x->loop);
    if (r == 0)
        x->hits = bs_metric(&d, "adapterd_prefix_cache_hits_total");
    bs_daemon_stop(&d);
    return r;
}

/* ratio: TTFT p50 one at a time, and tokens/s of the closed loop, with / without the cache. */
static int bs_part_prefix(const struct bs_opts *o, const struct bs_paths *p, struct bs_client *c,
                          double ratio[2])
{
    struct bs_prefix x[2]; /* cache on, off */
    static const char *const what[2] = {"on", "off"};
    int head[BS_PREFIX_HEAD], prompt = c->prompt, tokens = c->tokens, r = 0;
    memset(x, 0, sizeof(x));
    for (int k = 0; k < BS_PREFIX_HEAD; k++)
        head[k] = (int)(bs_rand32() % (uint32_t)c->n_vocab);
    c->head = head;
    c->n_head = BS_PREFIX_HEAD;
    c->prompt = BS_PREFIX_TAIL;
    c->tokens = BS_PREFIX_TOKENS;
    for (int k = 0; k < 2 && r == 0; k++)
        r = bs_prefix_run(o, p, c, k == 0, &x[k]);
    c->head = NULL;
    c->n_head = 0;
    c->prompt = prompt;
    c->tokens = tokens;
    if (r < 0)
        goto out;

    printf("\n== 4. prefix cache: every prompt is one shared %d-token system prompt, then %d "
           "random tokens\n", BS_PREFIX_HEAD, BS_PREFIX_TAIL);
    printf("the daemon on store-a twice, with --set prefix_cache=1, then 0; max_tokens %d; "
           "cached tokens: usage.prompt_tokens_details.cached_tokens of the finished requests\n",
           BS_PREFIX_TOKENS);
    printf("one request at a time on the base model (%d untimed, then %d); TTFT in ms\n",
           BS_PREFIX_WARM, BS_PREFIX_REQS);
    printf("cache | TTFT p50 |    min |    max | cached tokens/request | others\n");
    for (int k = 0; k < 2; k++)
        printf("%-5s | %8.0f | %6.0f | %6.0f | %21.1f | %6.2f\n", what[k],
               bs_quantile(x[k].ttft, BS_PREFIX_REQS, 0.5) * 1e3,
               bs_quantile(x[k].ttft, BS_PREFIX_REQS, 0) * 1e3,
               bs_quantile(x[k].ttft, BS_PREFIX_REQS, 1.0) * 1e3,
               (double)x[k].cached / BS_PREFIX_REQS, x[k].others);
    printf("closed loop: %d streams, %d on the base and %d on %s (each caches its own K/V of the "
           "system prompt); max_tokens %d to %d; tokens/s in a %.0f s window that opens when "
           "every stream has finished a request (at the earliest after %.0f s); TTFT of every "
           "request started in it (after it, those in flight run to their end)\n",
           BS_PREFIX_STREAMS, BS_PREFIX_STREAMS / 2, BS_PREFIX_STREAMS / 2, BS_PREFIX_LORA,
           BS_PREFIX_TOKENS / 2, BS_PREFIX_TOKENS / 2 + BS_PREFIX_TOKENS, o->window, BS_LOOP_WARM);
    printf("%-22s | tok/s: best |     mean | reqs  | TTFT ms: p50 |    p99 |    max | others\n",
           "");
    bs_print_loop("cache on", &x[0].loop);
    bs_print_loop("cache off", &x[1].loop);
    for (int k = 0; k < 2; k++)
        printf("cache %-3s: cached tokens/request %.1f (%d requests); /metrics "
               "adapterd_prefix_cache_hits_total %lld\n", what[k],
               x[k].loop.n_usage ? (double)x[k].loop.cached / x[k].loop.n_usage : 0.0,
               x[k].loop.n_usage, x[k].hits);
    double one[2], p50[2], p99[2];
    for (int k = 0; k < 2; k++) {
        one[k] = bs_quantile(x[k].ttft, BS_PREFIX_REQS, 0.5);
        p50[k] = bs_quantile(x[k].loop.ttft, x[k].loop.n_ttft, 0.5);
        p99[k] = bs_quantile(x[k].loop.ttft, x[k].loop.n_ttft, 0.99);
    }
    ratio[0] = one[0] / one[1];
    ratio[1] = x[0].loop.best / x[1].loop.best;
    printf("on/off: one at a time TTFT p50 %.3f; %d streams tok/s %.3f, TTFT p50 %.3f, p99 "
           "%.3f\n", ratio[0], BS_PREFIX_STREAMS, ratio[1], p50[0] / p50[1], p99[0] / p99[1]);
    if (x[0].cached + x[0].loop.cached == 0 || x[1].cached + x[1].loop.cached != 0) {
        printf("FAIL: the daemon reported %ld cached tokens with the cache on (expected > 0) "
               "and %ld with it off (expected 0)\n", x[0].cached + x[0].loop.cached,
               x[1].cached + x[1].loop.cached);
        r = -EIO;
    }
out:
    free(x[0].loop.ttft);
    free(x[1].loop.ttft);
    return r;
}

/* ==========================================================================================
 * Main */

static void bs_usage(FILE *f)
{
    fprintf(f, "usage: bench-serve --adapterd PATH [--mkmodel PATH] [--work DIR] "
               "[--model-src DIR]\n"
               "                   [--rounds N] [--zipf-rounds N] [--prompt N] [--tokens N] "
               "[--window S]\n"
               "                   [--zipf-streams N] [--zipf-fixed N] [--kinds-streams N] "
               "[--part all|streams|int8|zipf|kinds|prefix]\n");
}

static int bs_parse_args(int argc, char **argv, struct bs_opts *o)
{
    static const struct option longopts[] = {
        {"adapterd", 1, 0, 'a'}, {"mkmodel", 1, 0, 'm'},      {"work", 1, 0, 'w'},
        {"model-src", 1, 0, 's'}, {"rounds", 1, 0, 'r'},      {"prompt", 1, 0, 'p'},
        {"tokens", 1, 0, 't'},   {"window", 1, 0, 'W'},       {"zipf-streams", 1, 0, 'z'},
        {"kinds-streams", 1, 0, 'k'}, {"part", 1, 0, 'P'},    {"help", 0, 0, 'h'},
        {"zipf-rounds", 1, 0, 'R'},  {"zipf-fixed", 1, 0, 'F'},
        {0, 0, 0, 0},
    };
    int c, w;
    *o = (struct bs_opts){.work = "/tmp/adapterd-bench-serve",
                          .model_src = "/tmp/adapterd-bench-135m", .rounds = 3, .zipf_rounds = 3,
                          .zipf_fixed = 5, .prompt = 64, .tokens = 64, .window = 20,
                          .zipf_streams = 16, .kinds_streams = 16, .streams = true, .int8 = true,
                          .zipf = true, .kinds = true, .prefix = true};
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        int r = 0;
        switch (c) {
        case 'a': o->adapterd = optarg; break;
        case 'm': o->mkmodel = optarg; break;
        case 'w': o->work = optarg; break;
        case 's': o->model_src = optarg; break;
        case 'r': r = bench_parse_int(optarg, 1, 100, &o->rounds); break;
        case 'R': r = bench_parse_int(optarg, 1, 100, &o->zipf_rounds); break;
        case 'F': r = bench_parse_int(optarg, 1, BS_N_ZIPF / 10, &o->zipf_fixed); break;
        case 'p': r = bench_parse_int(optarg, 1, 1024, &o->prompt); break;
        case 't': r = bench_parse_int(optarg, 2, 1024, &o->tokens); break;
        case 'W': r = bench_parse_int(optarg, 1, 3600, &w); o->window = w; break;
        case 'z': r = bench_parse_int(optarg, 1, BS_MAX_STREAMS, &o->zipf_streams); break;
        case 'k': r = bench_parse_int(optarg, 1, BS_MAX_STREAMS, &o->kinds_streams); break;
        case 'P':
            o->streams = !strcmp(optarg, "all") || !strcmp(optarg, "streams");
            o->int8 = !strcmp(optarg, "all") || !strcmp(optarg, "int8");
            o->zipf = !strcmp(optarg, "all") || !strcmp(optarg, "zipf");
            o->kinds = !strcmp(optarg, "all") || !strcmp(optarg, "kinds");
            o->prefix = !strcmp(optarg, "all") || !strcmp(optarg, "prefix");
            r = o->streams || o->int8 || o->zipf || o->kinds || o->prefix ? 0 : -EINVAL;
            break;
        case 'h': bs_usage(stdout); exit(0);
        default: return -EINVAL;
        }
        if (r < 0)
            return r;
    }
    return optind == argc && o->adapterd ? 0 : -EINVAL;
}

int main(int argc, char **argv)
{
    static struct bs_client c;
    static struct bs_paths p;
    struct bs_opts o;
    struct bs_daemon d = {0};
    char mk[PATH_MAX], la0[128], la1[128];
    double ratio[BS_N_LEVELS] = {NAN, NAN, NAN, NAN}, zipf_ratio = NAN, kinds_ratio = NAN;
    double ratio8[BS_N_LEVELS] = {NAN, NAN, NAN, NAN};
    double prefix_ratio[2] = {NAN, NAN};
    long long file_bytes = 0, adapter_bytes = -1;
    int rc = 1, r = 0;
    struct ad_blas_choice blas;

    /* first: it may execute bench-serve again, and the daemon inherits the core (blas.h) */
    ad_blas_startup(argv, &blas);
    if (bs_parse_args(argc, argv, &o) < 0) {
        bs_usage(stderr);
        return 2;
    }
    if (!o.mkmodel && bench_find_tool("adapterd-mkmodel", mk, sizeof(mk)) == 0)
        o.mkmodel = mk;
    signal(SIGINT, bs_on_signal);
    signal(SIGTERM, bs_on_signal);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
        return 1;
    if (bs_prepare(&o, &p, &file_bytes) < 0)
        return 1;
    c.multi = curl_multi_init();
    if (!c.multi)
        return 1;
    c.base = BS_MODEL_NAME;
    c.prompt = o.prompt;
    c.tokens = o.tokens;
    c.n_vocab = 49152;
    {
        char cfgp[PATH_MAX], *text = NULL;
        size_t len;
        struct ad_err err = {0};
        if (bs_join(cfgp, sizeof(cfgp), p.model, "config.json") == 0 &&
            ad_read_file(cfgp, 1 << 20, &text, &len, &err) == 0) {
            json_t *j = json_loadb(text, len, 0, NULL);
            if (json_is_integer(json_object_get(j, "vocab_size")))
                c.n_vocab = (int)json_integer_value(json_object_get(j, "vocab_size"));
            json_decref(j);
        }
        free(text);
    }

    const char *coretype = getenv("OPENBLAS_CORETYPE");
    bench_loadavg(la0, sizeof(la0));
    printf("== bench-serve: adapterd over HTTP on 127.0.0.1\n");
    printf("nproc %ld; OPENBLAS_CORETYPE %s (the daemon inherits it); openblas core %s\n",
           sysconf(_SC_NPROCESSORS_ONLN), coretype ? coretype : "(unset)",
           openblas_get_corename());
    printf("openblas choice: %s%s\n", blas.warn ? "WARNING: " : "", blas.msg);
    printf("load average at start: %s\n", la0);
    printf("daemon: %s, defaults (threads = one per core, max_seqs 64, max_batch_tokens 512)\n",
           o.adapterd);
    printf("model: %s (SmolLM2-135M shapes, random f32 weights, from %s) with a generated "
           "tokenizer: token id N decodes to N as %d digits\n", p.model, o.model_src,
           BS_TOKEN_WIDTH);
    printf("adapters: rank-16 LoRA on q, k, v, o, gate, up, down of every layer, BF16 on disk "
           "(%.1f MB)\n", (double)file_bytes / 1e6);
    printf("requests: /v1/completions, stream, %d random prompt token ids, max_tokens %d, "
           "ignore_eos, temperature 0\n", o.prompt, o.tokens);
    printf("others: cores that other processes used during a measurement (/proc/stat busy time, "
           "steal included, minus the daemon's and this client's); above ~0.1 the figure is low\n");
    fflush(stdout);

    if (o.streams || o.kinds || o.zipf) {
        if ((r = bs_daemon_start(&o, &p, p.store_a, BS_BUDGET_A, NULL, &d)) < 0)
            goto out;
        snprintf(c.url, sizeof(c.url), "%s/v1/completions", d.base);
        printf("daemon on store-a (%d LoRA + %d x %d other kinds, adapter_budget_mb %d) healthy "
               "after %.1f s\n", BS_N_LORA, BS_N_KIND, BS_N_KINDS - 1, BS_BUDGET_A, d.startup_s);
        if (o.streams && (r = bs_part_streams(&o, &c, "1. decode throughput: base, and every "
                                              "stream on a different rank-16 LoRA", ratio)) < 0)
            goto out;
        fflush(stdout);
        if (o.kinds && (r = bs_part_kinds(&o, &c, &kinds_ratio)) < 0)
            goto out;
        adapter_bytes = bs_adapter_bytes(&d, "lora-00");
        bs_daemon_stop(&d);
        fflush(stdout);
    }
    if (o.int8) { /* part 1 again, the daemon holding LoRA factors in 8 bits */
        if ((r = bs_daemon_start(&o, &p, p.store_a, BS_BUDGET_A, "lora_dtype=int8", &d)) < 0)
            goto out;
        snprintf(c.url, sizeof(c.url), "%s/v1/completions", d.base);
        printf("\ndaemon on store-a with --set lora_dtype=int8 healthy after %.1f s; lora-00 "
               "resident: %.1f MB\n", d.startup_s, (double)bs_adapter_bytes(&d, "lora-00") / 1e6);
        if ((r = bs_part_streams(&o, &c, "1b. the same, the daemon with lora_dtype = int8 (8-bit "
                                 "factors)", ratio8)) < 0)
            goto out;
        bs_daemon_stop(&d);
        fflush(stdout);
    }
    if (o.zipf) {
        if (adapter_bytes <= 0) {
            fprintf(stderr, "bench-serve: cannot read lora-00's resident bytes\n");
            goto out;
        }
        if ((r = bs_part_zipf(&o, &p, &c, adapter_bytes, &zipf_ratio)) < 0)
            goto out;
        fflush(stdout);
    }
    if (o.prefix && (r = bs_part_prefix(&o, &p, &c, prefix_ratio)) < 0)
        goto out;
    bench_loadavg(la1, sizeof(la1));
    printf("\n== goals (issue 6, item 6)\n");
    if (o.zipf && o.zipf_fixed != 5)
        printf("(part 3 compared with %d adapters, not 5)\n", o.zipf_fixed);
    if (o.streams)
        for (int l = 0; l < BS_N_LEVELS; l++)
            if (bs_levels[l] >= 16)
                printf("mixed/base at %d streams: %.3f (goal >= 0.90: %s)\n", bs_levels[l],
                       ratio[l], ratio[l] >= 0.90 ? "met" : "missed");
    if (o.int8)
        for (int l = 0; l < BS_N_LEVELS; l++)
            if (bs_levels[l] >= 16)
                printf("mixed/base at %d streams, lora_dtype int8: %.3f (goal >= 0.90: %s)\n",
                       bs_levels[l], ratio8[l], ratio8[l] >= 0.90 ? "met" : "missed");
    if (o.zipf)
        printf("2000 adapters (Zipf, 10%% resident) / %d adapters: %.3f (goal >= 0.90: %s)\n",
               o.zipf_fixed, zipf_ratio, zipf_ratio >= 0.90 ? "met" : "missed");
    if (o.kinds)
        printf("mixed kinds / base at %d streams: %.3f\n", o.kinds_streams, kinds_ratio);
    if (o.prefix)
        printf("prefix cache on / off: one at a time TTFT p50 %.3f; %d streams tok/s %.3f\n",
               prefix_ratio[0], BS_PREFIX_STREAMS, prefix_ratio[1]);
    printf("load average at start: %s; at end: %s\n", la0, la1);
    rc = 0;
out:
    bs_daemon_stop(&d);
    for (int i = 0; i < BS_MAX_STREAMS; i++) {
        if (c.req[i].h)
            curl_easy_cleanup(c.req[i].h);
        curl_slist_free_all(c.req[i].hdr);
        free(c.req[i].body);
        free(c.req[i].buf);
        free(c.req[i].t_tok);
    }
    if (c.multi)
        curl_multi_cleanup(c.multi);
    curl_global_cleanup();
    return r < 0 ? 1 : rc;
}
