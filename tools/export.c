/* adapterd-export: merges adapters into a full copy of the base model, so that the result runs
 * (here or in Hugging Face transformers) without any adapter.
 *
 *   adapterd-export --model DIR --adapter ADIR[:WEIGHT] [--adapter ...] --out OUTDIR
 *
 * Every targeted linear becomes W + sum_i w_i s_i B_i A_i (GPT-2 Conv1D weights, stored
 * [in, out], get the transposed delta); DoRA becomes k (W + s B A) with k = m / |W + s B A|_row;
 * IA3 scales W's rows (and the bias) or columns; bias sets, bias="all" and modules_to_save write
 * their tensors; replaced norms are written. Prefix, prompt and bottleneck adapters add tokens
 * or layers, not weight deltas: they are refused. Several adapters compose only as plain LoRA
 * (ad_mix_validate).
 *
 * Output: OUTDIR/model.safetensors (one file, the base's tensor names; merged tensors as F32,
 * every other tensor copied unchanged in its own dtype), config.json (edited only when the
 * merge needs a new bias or an untied lm_head), and generation_config.json and tokenizer files
 * copied when the base has them. Written to a temporary directory beside OUTDIR, fsync'd and
 * renamed: OUTDIR is never seen half-written. OUTDIR must not exist. docs/adapters.md. */
#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "adapterd/adapter.h"
#include "adapterd/blas.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

#define PROG "adapterd-export"
#define MAX_CONFIG_BYTES (64u << 20)

/* Files of the output directory besides model.safetensors: copied when the base has them. */
static const char *const copied_files[] = {
    "generation_config.json", "tokenizer.json",  "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt",
};
#define N_COPIED (sizeof(copied_files) / sizeof(copied_files[0]))

/* ==========================================================================================
 * Data structures */

struct options {
    const char *model_dir, *out_dir;
    const char *adapter_dir[AD_MIX_MAX];
    char adapter_path[AD_MIX_MAX][4096]; /* ADIR without its ":WEIGHT" */
    float weight[AD_MIX_MAX];
    int n_adapters;
};

/* The merge result of one site. */
struct merged_site {
    float *w;          /* merged weight in the stored layout, or NULL: unchanged */
    float *b;          /* merged bias [n_out], or NULL: unchanged */
    bool new_bias;     /* the base has no bias here: written as a new tensor */
    const char *wname; /* checkpoint name of the weight (borrowed from the file), or NULL */
    bool w_done, b_done;
};

struct plan {
    const struct ad_model *m;
    const struct ad_mix *mix;
    struct merged_site *ms; /* [n_sites] */
    int n_merged;           /* sites whose weight or bias changed */
    bool attention_bias, mlp_bias; /* Llama config flags to turn on */
    bool untie;                    /* lm_head written as its own tensor */

    struct ad_st_entry *e;
    size_t n_e, cap_e;
    char **names; /* names this tool allocated */
    size_t n_names;
};

/* ==========================================================================================
 * Temporary directory, removed on failure and on SIGINT/SIGTERM/SIGHUP */

static char tmp_dir[4096];
static volatile sig_atomic_t tmp_live;

static void tmp_remove(void)
{
    char path[4096 + 64];
    static const char *const own[] = {"model.safetensors", "config.json"};

    if (!tmp_live)
        return;
    /* Only names this tool writes: async-signal-safe calls, no allocation. */
    for (size_t i = 0; i < 2 + N_COPIED; i++) {
        const char *n = i < 2 ? own[i] : copied_files[i - 2];
        size_t a = strlen(tmp_dir), b = strlen(n);
        if (a + 1 + b + 1 > sizeof(path))
            continue;
        memcpy(path, tmp_dir, a);
        path[a] = '/';
        memcpy(path + a + 1, n, b + 1);
        unlink(path);
    }
    rmdir(tmp_dir);
    tmp_live = 0;
}

static void on_signal(int sig)
{
    tmp_remove();
    signal(sig, SIG_DFL);
    raise(sig);
}

static void install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
}

/* ==========================================================================================
 * Small file helpers */

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int fsync_path(const char *path, struct ad_err *err)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return ad_err_set(err, -errno, "%s: %s", path, strerror(errno));
    int r = fsync(fd) < 0 ? -errno : 0;
    close(fd);
    if (r < 0)
        return ad_err_set(err, r, "%s: fsync: %s", path, strerror(-r));
    return 0;
}

/* Writes len bytes to dir/name (new file) and fsyncs it. */
static int write_file(const char *dir, const char *name, const void *buf, size_t len,
                      struct ad_err *err)
{
    char path[4096];
    int r = ad_path_join(path, sizeof(path), dir, name);
    if (r < 0)
        return ad_err_set(err, r, "%s: path too long", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        return ad_err_set(err, -errno, "%s: %s", path, strerror(errno));
    r = write_all(fd, buf, len);
    if (r >= 0 && fsync(fd) < 0)
        r = -errno;
    if (close(fd) < 0 && r >= 0)
        r = -errno;
    if (r < 0)
        return ad_err_set(err, r, "%s: write: %s", path, strerror(-r));
    return 0;
}

/* Copies src_dir/name to dst_dir/name if it exists (streamed: tokenizer.json can be large). */
static int copy_if_present(const char *src_dir, const char *dst_dir, const char *name,
                           struct ad_err *err)
{
    char src[4096], dst[4096], buf[1 << 16];
    int in = -1, out = -1, r;

    if (ad_path_join(src, sizeof(src), src_dir, name) < 0 ||
        ad_path_join(dst, sizeof(dst), dst_dir, name) < 0)
        return ad_err_set(err, -ENAMETOOLONG, "%s: path too long", name);
    in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0)
        return errno == ENOENT ? 0 : ad_err_set(err, -errno, "%s: %s", src, strerror(errno));
    out = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (out < 0) {
        r = ad_err_set(err, -errno, "%s: %s", dst, strerror(errno));
        goto out;
    }
    for (;;) {
        ssize_t n = read(in, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            r = ad_err_set(err, -errno, "%s: read: %s", src, strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        r = write_all(out, buf, (size_t)n);
        if (r < 0) {
            ad_err_set(err, r, "%s: write: %s", dst, strerror(-r));
            goto out;
        }
    }
    r = fsync(out) < 0 ? ad_err_set(err, -errno, "%s: fsync: %s", dst, strerror(errno)) : 0;
out:
    if (out >= 0 && close(out) < 0 && r >= 0)
        r = ad_err_set(err, -errno, "%s: close: %s", dst, strerror(errno));
    close(in);
    return r;
}

/* ==========================================================================================
 * Arguments */

static void usage(FILE *f)
{
    fprintf(f, "usage: " PROG " --model DIR --adapter ADIR[:WEIGHT] [--adapter ...] "
               "--out OUTDIR\n"
               "Merges LoRA (incl. rsLoRA, DoRA), IA3 and bias-set adapters into a copy of the "
               "base model.\nSeveral adapters compose only as plain LoRA; WEIGHT defaults to 1. "
               "OUTDIR must not exist.\n");
}

/* "ADIR" or "ADIR:WEIGHT": the suffix counts as a weight only if it is a whole finite number,
 * so a directory whose name has a ':' still works (append ":1" when its tail looks numeric). */
static int parse_adapter_arg(const char *arg, char *path, size_t size, float *ret_weight,
                             struct ad_err *err)
{
    const char *colon = strrchr(arg, ':');
    size_t n = strlen(arg);
    float w = 1.0f;

    if (colon && colon[1]) {
        char *end;
        errno = 0;
        float v = strtof(colon + 1, &end);
        if (!*end && !errno && isfinite(v)) {
            w = v;
            n = (size_t)(colon - arg);
        }
    }
    if (n == 0)
        return ad_err_set(err, -EINVAL, "--adapter '%s': empty directory", arg);
    if (n >= size)
        return ad_err_set(err, -ENAMETOOLONG, "--adapter '%.60s...': path too long", arg);
    memcpy(path, arg, n);
    path[n] = '\0';
    *ret_weight = w;
    return 0;
}

static int parse_args(int argc, char **argv, struct options *o, struct ad_err *err)
{
    static const struct option opts[] = {
        {"model", required_argument, NULL, 'm'},
        {"adapter", required_argument, NULL, 'a'},
        {"out", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c, r;

    opterr = 0;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'm': o->model_dir = optarg; break;
        case 'o': o->out_dir = optarg; break;
        case 'a':
            if (o->n_adapters == AD_MIX_MAX)
                return ad_err_set(err, -EINVAL, "at most %d --adapter options", AD_MIX_MAX);
            r = parse_adapter_arg(optarg, o->adapter_path[o->n_adapters],
                                  sizeof(o->adapter_path[0]), &o->weight[o->n_adapters], err);
            if (r < 0)
                return r;
            o->adapter_dir[o->n_adapters] = o->adapter_path[o->n_adapters];
            o->n_adapters++;
            break;
        case 'h': usage(stdout); exit(0);
        default:
            return ad_err_set(err, -EINVAL, "unknown or incomplete option '%s' (see --help)",
                              argv[optind - 1]);
        }
    }
    if (optind < argc)
        return ad_err_set(err, -EINVAL, "unexpected argument '%s' (see --help)", argv[optind]);
    if (!o->model_dir || !o->out_dir || o->n_adapters == 0)
        return ad_err_set(err, -EINVAL, "--model, --out and at least one --adapter are required "
                          "(see --help)");
    return 0;
}

/* ==========================================================================================
 * Checks: what can be merged */

static const char *why_not_mergeable(enum ad_adapter_kind k)
{
    switch (k) {
    case AD_ADAPTER_PREFIX:
        return "prefix tuning adds virtual keys and values to every layer, not a weight delta";
    case AD_ADAPTER_PROMPT:
        return "prompt tuning adds virtual input tokens, not a weight delta";
    case AD_ADAPTER_BOTTLENECK:
        return "a bottleneck adapter adds layers (with a non-linearity) to the model, not a "
               "weight delta";
    default: return NULL;
    }
}

/* The name of the first adapter of the mix that touches site i (for messages). */
static const char *adapter_at(const struct ad_mix *mix, int i)
{
    for (int k = 0; k < mix->n; k++)
        if (mix->a[k]->by_site[i])
            return mix->a[k]->name;
    return "?";
}

/* A new bias on site s, where the base has none: only if the checkpoint format has a config
 * flag for it. Llama: attention_bias (q, k, v, o) and mlp_bias (gate, up, down). Mistral and
 * Qwen2 hard-code their biases; GPT-2 has every bias already; no family has an lm_head bias. */
static int allow_new_bias(struct plan *p, const struct ad_site *s, struct ad_err *err)
{
    const struct ad_model_config *c = &p->m->cfg;
    const char *who = adapter_at(p->mix, (int)(s - p->m->sites));
    bool llama = c->family == AD_FAMILY_LLAMA && !strcmp(c->architecture, "LlamaForCausalLM");

    if (llama) {
        switch (s->role) {
        case AD_ROLE_Q:
        case AD_ROLE_K:
        case AD_ROLE_V:
        case AD_ROLE_O: p->attention_bias = true; return 0;
        case AD_ROLE_GATE:
        case AD_ROLE_UP:
        case AD_ROLE_DOWN: p->mlp_bias = true; return 0;
        default: break;
        }
    }
    return ad_err_set(err, -ENOTSUP, "adapter '%s' adds a bias to '%s', which the base lacks "
                      "and a %s config cannot declare; refusing to write a checkpoint that "
                      "would load differently", who, s->path, c->architecture);
}

/* ==========================================================================================
 * Merging */

static inline size_t at(const struct ad_site *s, int o, int i)
{
    return s->w_in_out ? (size_t)i * (size_t)s->n_out + (size_t)o
                       : (size_t)o * (size_t)s->n_in + (size_t)i;
}

/* w (stored layout) += alpha * B A: [n_out, n_in], or its transpose for Conv1D. */
static int add_lora(const struct ad_site *s, const struct ad_site_delta *d, float alpha, float *w)
{
    const struct ad_lora_factors *f = &d->lora;
    float *a = malloc((size_t)f->rank * (size_t)s->n_in * sizeof(float));
    float *b = malloc((size_t)s->n_out * (size_t)f->rank * sizeof(float));
    if (!a || !b) {
        free(a);
        free(b);
        return -ENOMEM;
    }
    for (int r = 0; r < f->rank; r++) {
        for (int i = 0; i < s->n_in; i++)
            a[(size_t)r * s->n_in + i] = ad_lora_a_at(f, r, i);
        for (int o = 0; o < s->n_out; o++)
            b[(size_t)o * f->rank + r] = ad_lora_b_at(f, o, r);
    }
    if (s->w_in_out)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasTrans, s->n_in, s->n_out, f->rank, alpha, a,
                    s->n_in, b, f->rank, 1.0f, w, s->n_out);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s->n_out, s->n_in, f->rank, alpha,
                    b, f->rank, a, s->n_in, 1.0f, w, s->n_in);
    free(a);
    free(b);
    return 0;
}

/* Folds every adapter's delta on site i into (W, b), in the order ad_mix_site_post applies them
 * to the outputs: replacement, bias, LoRA or DoRA, IA3 input then output scaling. */
static int merge_site(struct plan *p, int i, struct ad_err *err)
{
    const struct ad_mix *mix = p->mix;
    const struct ad_site *s = &p->m->sites[i];
    struct merged_site *ms = &p->ms[i];
    size_t nw = (size_t)s->n_in * (size_t)s->n_out;
    bool w_changed = false, b_changed = false, has_b = s->b != NULL;
    float *w = malloc(nw * sizeof(float));
    float *b = calloc((size_t)s->n_out, sizeof(float));

    if (!w || !b) {
        free(w);
        free(b);
        return ad_err_set(err, -ENOMEM, "out of memory merging '%s'", s->path);
    }
    memcpy(w, s->w, nw * sizeof(float));
    if (s->b)
        memcpy(b, s->b, (size_t)s->n_out * sizeof(float));

    for (int k = 0; k < mix->n; k++) {
        const struct ad_site_delta *d = mix->a[k]->by_site[i];
        float wk = mix->w[k];
        if (!d)
            continue;
        if (d->w_new) { /* [n_out, n_in] whatever the base layout; nothing else on the site */
            for (int o = 0; o < s->n_out; o++)
                for (int j = 0; j < s->n_in; j++)
                    w[at(s, o, j)] = d->w_new[(size_t)o * s->n_in + j];
            w_changed = true;
        }
        if (d->b_new) { /* a replacement, not a delta; DoRA leaves it unscaled */
            memcpy(b, d->b_new, (size_t)s->n_out * sizeof(float));
            has_b = b_changed = true;
        }
        if (d->lora.a) {
            if (add_lora(s, d, wk * d->scale, w) < 0) {
                free(w);
                free(b);
                return ad_err_set(err, -ENOMEM, "out of memory merging '%s'", s->path);
            }
            w_changed = true;
            if (d->dora_k) { /* y = k (W x + s B A x) + b: the rows of W + s B A, not b */
                for (int o = 0; o < s->n_out; o++)
                    for (int j = 0; j < s->n_in; j++)
                        w[at(s, o, j)] *= d->dora_k[o];
            } else if (d->lora_bias) {
                for (int o = 0; o < s->n_out; o++)
                    b[o] += wk * d->scale * d->lora_bias[o];
                has_b = b_changed = true;
            }
        }
        if (d->ia3_in) {
            for (int o = 0; o < s->n_out; o++)
                for (int j = 0; j < s->n_in; j++)
                    w[at(s, o, j)] *= d->ia3_in[j];
            w_changed = true;
        }
        if (d->ia3_out) {
            for (int o = 0; o < s->n_out; o++) {
                for (int j = 0; j < s->n_in; j++)
                    w[at(s, o, j)] *= d->ia3_out[o];
                b[o] *= d->ia3_out[o];
            }
            w_changed = true;
            b_changed = has_b;
        }
    }
    if (!w_changed) {
        free(w);
        w = NULL;
    }
    if (!b_changed) {
        free(b);
        b = NULL;
    }
    ms->w = w;
    ms->b = b;
    ms->new_bias = b && !s->b;
    if (w || b)
        p->n_merged++;
    if (ms->new_bias)
        return allow_new_bias(p, s, err);
    return 0;
}

static int merge_all(struct plan *p, struct ad_err *err)
{
    const struct ad_model *m = p->m;
    int r;

    for (int i = 0; i < m->n_sites; i++) {
        bool touched = false;
        for (int k = 0; k < p->mix->n && !touched; k++)
            touched = p->mix->a[k]->by_site[i] != NULL;
        if (touched && (r = merge_site(p, i, err)) < 0)
            return r;
    }
    /* A Llama config flag gives every module of its group a bias: zeros where none is merged. */
    for (int i = 0; i < m->n_sites; i++) {
        const struct ad_site *s = &m->sites[i];
        bool attn = s->role == AD_ROLE_Q || s->role == AD_ROLE_K || s->role == AD_ROLE_V ||
                    s->role == AD_ROLE_O;
        bool mlp = s->role == AD_ROLE_GATE || s->role == AD_ROLE_UP || s->role == AD_ROLE_DOWN;
        if (s->b || p->ms[i].b || !((attn && p->attention_bias) || (mlp && p->mlp_bias)))
            continue;
        p->ms[i].b = calloc((size_t)s->n_out, sizeof(float));
        if (!p->ms[i].b)
            return ad_err_set(err, -ENOMEM, "out of memory");
        p->ms[i].new_bias = true;
    }
    const struct ad_site *head = &m->sites[m->n_sites - 1];
    p->untie = head->role == AD_ROLE_LM_HEAD && p->ms[m->n_sites - 1].w && m->cfg.tie_embeddings;
    return 0;
}

/* ==========================================================================================
 * Output tensors */

static int add_entry(struct plan *p, const char *name, enum ad_dtype dtype, int n_dims,
                     const int64_t *shape, const void *data, struct ad_err *err)
{
    if (p->n_e == p->cap_e) {
        size_t cap = p->cap_e ? p->cap_e * 2 : 256;
        struct ad_st_entry *e = realloc(p->e, cap * sizeof(*e));
        if (!e)
            return ad_err_set(err, -ENOMEM, "out of memory");
        p->e = e;
        p->cap_e = cap;
    }
    for (size_t i = 0; i < p->n_e; i++) /* a name twice would corrupt the header */
        if (!strcmp(p->e[i].name, name))
            return ad_err_set(err, -EINVAL, "tensor '%s' would be written twice", name);
    struct ad_st_entry *e = &p->e[p->n_e++];
    memset(e, 0, sizeof(*e));
    e->name = name;
    e->dtype = dtype;
    e->n_dims = n_dims;
    for (int d = 0; d < n_dims; d++)
        e->shape[d] = shape[d];
    e->data = data;
    return 0;
}

static char *own_name(struct plan *p, const char *head, const char *leaf)
{
    size_t a = strlen(head), b = strlen(leaf);
    char **names = realloc(p->names, (p->n_names + 1) * sizeof(*names));
    if (!names)
        return NULL;
    p->names = names;
    char *n = malloc(a + b + 1);
    if (!n)
        return NULL;
    memcpy(n, head, a);
    memcpy(n + a, leaf, b + 1);
    p->names[p->n_names++] = n;
    return n;
}

static const struct ad_tensor *find_any(const struct ad_model *m, const char *name)
{
    for (int i = 0; i < m->n_files; i++) {
        const struct ad_tensor *t = ad_st_find(m->files[i], name);
        if (t)
            return t;
    }
    return NULL;
}

/* Is t the tensor the model loader reads for its name? The loader takes the first file that
 * has a name, and "<root><name>" before "<name>" (GPT-2 files may omit "transformer."). */
static bool is_live(const struct ad_model *m, const struct ad_tensor *t)
{
    const char *root = ad_model_root(m);
    size_t rl = strlen(root);
    char full[512];

    if (find_any(m, t->name) != t)
        return false;
    if (!strncmp(t->name, root, rl))
        return true;
    if ((size_t)snprintf(full, sizeof(full), "%s%s", root, t->name) >= sizeof(full))
        return true;
    return find_any(m, full) == NULL;
}

/* The replaced norm tensor for (layer, slot), or NULL: the last adapter that replaces it. */
static const float *norm_replacement(const struct plan *p, int layer, enum ad_norm_slot slot,
                                     bool bias)
{
    const float *v = NULL;
    int idx = slot == AD_NORM_FINAL ? p->m->cfg.n_layer * 2 : layer * 2 + (int)slot;
    for (int k = 0; k < p->mix->n; k++) {
        const struct ad_norm_delta *nd = p->mix->a[k]->norms ? &p->mix->a[k]->norms[idx] : NULL;
        if (nd && (bias ? nd->b : nd->w))
            v = bias ? nd->b : nd->w;
    }
    return v;
}

/* One output entry per tensor of the base (merged or copied), then the new ones. */
static int build_entries(struct plan *p, struct ad_err *err)
{
    const struct ad_model *m = p->m;
    int r;

    for (int f = 0; f < m->n_files; f++) {
        for (size_t ti = 0; ti < ad_st_n_tensors(m->files[f]); ti++) {
            const struct ad_tensor *t = ad_st_tensor(m->files[f], ti);
            const void *data = t->data;
            enum ad_dtype dtype = t->dtype;
            int64_t shape1[1];
            const int64_t *shape = t->shape;
            int n_dims = t->n_dims;
            size_t n = strlen(t->name);
            bool is_w = n > 7 && !strcmp(t->name + n - 7, ".weight");
            bool is_b = n > 5 && !strcmp(t->name + n - 5, ".bias");

            if (find_any(m, t->name) != t)
                continue; /* shadowed by an earlier shard: the loader never reads it */
            if ((is_w || is_b) && is_live(m, t)) {
                char module[512];
                size_t head = n - (is_w ? 7 : 5);
                if (head < sizeof(module)) {
                    memcpy(module, t->name, head);
                    module[head] = '\0';
                    const struct ad_site *s = ad_model_find_site(m, module);
                    int layer;
                    enum ad_norm_slot slot;
                    if (s) {
                        struct merged_site *ms = &p->ms[s - m->sites];
                        if (is_w) {
                            ms->wname = t->name;
                            ms->w_done = true;
                        }
                        const float *v = is_w ? ms->w : ms->b;
                        if (v) {
                            data = v;
                            dtype = AD_DTYPE_F32;
                            if (is_b) { /* a stray base bias the config disabled: [n_out] */
                                shape1[0] = s->n_out;
                                shape = shape1;
                                n_dims = 1;
                                ms->b_done = true;
                            }
                        }
                    } else if (ad_model_find_norm(m, module, &layer, &slot) == 0) {
                        const float *v = norm_replacement(p, layer, slot, is_b);
                        if (v) {
                            data = v;
                            dtype = AD_DTYPE_F32;
                        }
                    }
                }
            }
            if ((r = add_entry(p, t->name, dtype, n_dims, shape, data, err)) < 0)
                return r;
        }
    }

    /* New tensors: biases where the base had none, an lm_head of its own. */
    for (int i = 0; i < m->n_sites; i++) {
        const struct ad_site *s = &m->sites[i];
        struct merged_site *ms = &p->ms[i];
        if (ms->w && !ms->w_done) {
            if (s->role != AD_ROLE_LM_HEAD)
                return ad_err_set(err, -EINVAL, "no checkpoint tensor for '%s'", s->path);
            int64_t shape[2] = {s->n_out, s->n_in};
            if ((r = add_entry(p, "lm_head.weight", AD_DTYPE_F32, 2, shape, ms->w, err)) < 0)
                return r;
            ms->wname = "lm_head.weight";
        }
        if (ms->b && !ms->b_done && ms->new_bias) {
            const char *wn = ms->wname;
            if (!wn)
                return ad_err_set(err, -EINVAL, "no checkpoint tensor for '%s'", s->path);
            char stem[512];
            size_t head = strlen(wn) - 7; /* wname ends with ".weight" */
            if (head >= sizeof(stem))
                return ad_err_set(err, -ENAMETOOLONG, "tensor '%.60s...': name too long", wn);
            memcpy(stem, wn, head);
            stem[head] = '\0';
            char *name = own_name(p, stem, ".bias");
            int64_t shape[1] = {s->n_out};
            if (!name)
                return ad_err_set(err, -ENOMEM, "out of memory");
            if ((r = add_entry(p, name, AD_DTYPE_F32, 1, shape, ms->b, err)) < 0)
                return r;
        }
    }
    return 0;
}

/* ==========================================================================================
 * Output directory */

/* config.json: the base's bytes, unless the merge needs new flags. */
static int write_config(const struct plan *p, const char *model_dir, const char *dir,
                        struct ad_err *err)
{
    char path[4096], *text = NULL, *dumped = NULL;
    json_t *root = NULL;
    int r;

    if ((r = ad_path_join(path, sizeof(path), model_dir, "config.json")) < 0)
        return ad_err_set(err, r, "%s: path too long", model_dir);
    if ((r = ad_read_file(path, MAX_CONFIG_BYTES, &text, NULL, err)) < 0)
        return r;
    if (!p->attention_bias && !p->mlp_bias && !p->untie) {
        r = write_file(dir, "config.json", text, strlen(text), err);
        goto out;
    }
    json_error_t jerr;
    root = json_loads(text, 0, &jerr);
    if (!json_is_object(root)) {
        r = ad_err_set(err, -EINVAL, "%s: not a JSON object", path);
        goto out;
    }
    if ((p->attention_bias && json_object_set_new(root, "attention_bias", json_true()) < 0) ||
        (p->mlp_bias && json_object_set_new(root, "mlp_bias", json_true()) < 0) ||
        (p->untie && json_object_set_new(root, "tie_word_embeddings", json_false()) < 0)) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    dumped = json_dumps(root, JSON_INDENT(2));
    if (!dumped) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    size_t len = strlen(dumped);
    char *nl = realloc(dumped, len + 2);
    if (!nl) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto out;
    }
    dumped = nl;
    memcpy(dumped + len, "\n", 2);
    r = write_file(dir, "config.json", dumped, len + 1, err);
out:
    free(dumped);
    json_decref(root);
    free(text);
    return r;
}

/* Writes everything into a new temporary directory beside out_dir, then renames it. */
static int write_output(const struct plan *p, const char *model_dir, const char *out_dir,
                        struct ad_err *err)
{
    static const char *const meta[] = {"format", "pt", NULL};
    char parent[4096], base[4096], path[4096];
    mode_t um;
    int r;

    if (snprintf(parent, sizeof(parent), "%s", out_dir) >= (int)sizeof(parent) ||
        snprintf(base, sizeof(base), "%s", out_dir) >= (int)sizeof(base))
        return ad_err_set(err, -ENAMETOOLONG, "--out: path too long");
    const char *pdir = dirname(parent), *bname = basename(base);
    if (snprintf(tmp_dir, sizeof(tmp_dir), "%s/.%s.export-XXXXXX", pdir, bname) >=
        (int)sizeof(tmp_dir))
        return ad_err_set(err, -ENAMETOOLONG, "--out: path too long");
    if (!mkdtemp(tmp_dir))
        return ad_err_set(err, -errno, "%s: cannot create a directory there: %s", pdir,
                          strerror(errno));
    tmp_live = 1;
    um = umask(0);
    umask(um);
    if (chmod(tmp_dir, 0777 & ~um) < 0) {
        r = ad_err_set(err, -errno, "%s: chmod: %s", tmp_dir, strerror(errno));
        goto fail;
    }

    if ((r = ad_path_join(path, sizeof(path), tmp_dir, "model.safetensors")) < 0 ||
        (r = ad_st_write(path, p->e, p->n_e, meta, err)) < 0 ||
        (r = write_config(p, model_dir, tmp_dir, err)) < 0)
        goto fail;
    for (size_t i = 0; i < N_COPIED; i++)
        if ((r = copy_if_present(model_dir, tmp_dir, copied_files[i], err)) < 0)
            goto fail;
    if ((r = fsync_path(tmp_dir, err)) < 0)
        goto fail;
    /* rename() replaces an empty directory: refuse one that appeared meanwhile. */
    if (access(out_dir, F_OK) == 0) {
        r = ad_err_set(err, -EEXIST, "'%s' appeared while exporting; not replacing it", out_dir);
        goto fail;
    }
    if (rename(tmp_dir, out_dir) < 0) {
        r = ad_err_set(err, -errno, "rename to '%s': %s", out_dir, strerror(errno));
        goto fail;
    }
    tmp_live = 0;
    return fsync_path(pdir, err);
fail:
    tmp_remove();
    return r;
}

/* ==========================================================================================
 * Main */

static void plan_fini(struct plan *p)
{
    if (p->ms)
        for (int i = 0; i < p->m->n_sites; i++) {
            free(p->ms[i].w);
            free(p->ms[i].b);
        }
    free(p->ms);
    free(p->e);
    for (size_t i = 0; i < p->n_names; i++)
        free(p->names[i]);
    free(p->names);
}

static int export(const struct options *o, struct ad_err *err)
{
    struct ad_model *m = NULL;
    struct ad_mix mix = {0};
    struct plan p = {0};
    struct stat st;
    int r;

    if (lstat(o->out_dir, &st) == 0)
        return ad_err_set(err, -EEXIST, "--out '%s' already exists; give a new directory",
                          o->out_dir);
    if ((r = ad_model_load(o->model_dir, &m, err)) < 0)
        goto fail;
    for (int k = 0; k < o->n_adapters; k++) {
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s", o->adapter_dir[k]);
        size_t n = strlen(tmp);
        while (n > 1 && tmp[n - 1] == '/')
            tmp[--n] = '\0';
        if ((r = ad_adapter_load(m, o->adapter_dir[k], basename(tmp), 0, &mix.a[k], err)) < 0) {
            ad_err_prefix(err, "%s", o->adapter_dir[k]);
            goto fail;
        }
        mix.w[k] = o->weight[k];
        mix.n++;
        const char *why = why_not_mergeable(mix.a[k]->kind);
        if (why) {
            r = ad_err_set(err, -ENOTSUP, "adapter '%s' (%s) cannot be merged: %s",
                           mix.a[k]->name, ad_adapter_kind_name(mix.a[k]->kind), why);
            goto fail;
        }
    }
    if ((r = ad_mix_validate(&mix, err)) < 0)
        goto fail;

    p.m = m;
    p.mix = &mix;
    p.ms = calloc((size_t)m->n_sites, sizeof(*p.ms));
    if (!p.ms) {
        r = ad_err_set(err, -ENOMEM, "out of memory");
        goto fail;
    }
    if ((r = merge_all(&p, err)) < 0 || (r = build_entries(&p, err)) < 0 ||
        (r = write_output(&p, o->model_dir, o->out_dir, err)) < 0)
        goto fail;
    printf(PROG ": merged %d adapter%s into %d of %d linear layers%s%s%s; wrote '%s' "
           "(%zu tensors)\n", mix.n, mix.n == 1 ? "" : "s", p.n_merged, m->n_sites,
           p.attention_bias ? ", attention_bias on" : "", p.mlp_bias ? ", mlp_bias on" : "",
           p.untie ? ", lm_head untied" : "", o->out_dir, p.n_e);
    r = 0;
fail:
    plan_fini(&p);
    for (int k = 0; k < mix.n; k++)
        ad_adapter_unref(mix.a[k]);
    ad_model_free(m);
    return r;
}

int main(int argc, char **argv)
{
    static struct options o;
    struct ad_err err = {0};
    int r;
    struct ad_blas_choice blas;

    ad_blas_startup(argv, &blas); /* first: it may execute the tool again (adapterd/blas.h) */
    if (blas.warn)
        fprintf(stderr, PROG ": BLAS: %s\n", blas.msg);
    r = parse_args(argc, argv, &o, &err);
    if (r < 0) {
        fprintf(stderr, PROG ": error: %s\n", err.msg);
        return 2;
    }
    install_signals();
    r = export(&o, &err);
    if (r < 0) {
        fprintf(stderr, PROG ": error: %s\n", err.msg);
        return 1;
    }
    return 0;
}
