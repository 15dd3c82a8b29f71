/* Export parity: for a case written by reference.py, merges each run's adapters into a copy of
 * the base with the real adapterd-export binary, loads the merged model and checks that its
 * prefill logits WITHOUT any adapter equal PyTorch's logits of base + adapters. Runs whose
 * adapters cannot be merged (prefix, prompt, bottleneck) must fail with a one-line error and
 * leave no output directory. Variants of the base derived here cover what the fixtures do not:
 * GPT-2 tensor names without "transformer.", a tied lm_head that modules_to_save unties, a
 * family (Mistral) whose config cannot declare the biases a bias set adds, an existing --out.
 *
 *   test-export [--export PATH] CASE_DIR   (PATH defaults to $ADAPTERD_EXPORT, set by meson)
 * One line per run; exit 1 on any failure. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../check.h"
#include "../reference.h"
#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/safetensors.h"
#include "adapterd/util.h"

#define TOL 1e-4
#define MAX_RUNS 64
#define MAX_SEQS 8
#define MAX_LOADED 64

extern char **environ;

static const char *export_bin, *case_dir;
static char tmp[4096];
static int n_seq, V;
static int32_t *prompts[MAX_SEQS];
static int prompt_len[MAX_SEQS];
static size_t total_prompt;

/* ==========================================================================================
 * Helpers */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    return remove(path);
}

static void rm_tree(const char *path)
{
    nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Hidden entries of dir: the tool's temporary directories, if it left any. */
static int n_hidden(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;
    CHECK(d);
    while ((e = readdir(d)))
        n += e->d_name[0] == '.' && strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

/* Runs the export binary with argv (NULL-terminated, argv[0] included); stdout and stderr go
 * to msg (the last line, without its newline). Returns the exit status, or -1 on a signal. */
static int run_export(char **argv, char *msg, size_t msg_size, int *ret_lines)
{
    char log[4096 + 16], *text = NULL;
    posix_spawn_file_actions_t fa;
    pid_t pid;
    int status, lines = 0;

    snprintf(log, sizeof(log), "%s/export.log", tmp);
    CHECK(posix_spawn_file_actions_init(&fa) == 0);
    CHECK(posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC, 0644) == 0);
    CHECK(posix_spawn_file_actions_adddup2(&fa, 1, 2) == 0);
    CHECK_INT(posix_spawn(&pid, export_bin, &fa, NULL, argv, environ), ==, 0);
    posix_spawn_file_actions_destroy(&fa);
    CHECK(waitpid(pid, &status, 0) == pid);

    size_t len = 0;
    struct ad_err err;
    CHECK(ad_read_file(log, 1 << 20, &text, &len, &err) == 0);
    while (len && text[len - 1] == '\n')
        text[--len] = '\0';
    const char *last = text;
    for (size_t i = 0; i < len; i++)
        if (text[i] == '\n') {
            lines++;
            last = text + i + 1;
        }
    snprintf(msg, msg_size, "%s", last);
    *ret_lines = len ? lines + 1 : 0;
    free(text);
    unlink(log);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The export command line for a run: --model base --adapter DIR:W ... --out out. */
struct cmd {
    char *argv[8 + 2 * AD_MIX_MAX];
    char buf[AD_MIX_MAX][4200];
    int n;
};

static void cmd_init(struct cmd *c, const char *model_dir, const char *out)
{
    c->n = 0;
    c->argv[c->n++] = (char *)export_bin;
    c->argv[c->n++] = "--model";
    c->argv[c->n++] = (char *)model_dir;
    c->argv[c->n++] = "--out";
    c->argv[c->n++] = (char *)out;
    c->argv[c->n] = NULL;
}

static void cmd_adapter(struct cmd *c, const char *name, double weight)
{
    int k = (c->n - 5) / 2;
    CHECK(k < AD_MIX_MAX);
    snprintf(c->buf[k], sizeof(c->buf[k]), "%s/adapters/%s:%.9g", case_dir, name, weight);
    c->argv[c->n++] = "--adapter";
    c->argv[c->n++] = c->buf[k];
    c->argv[c->n] = NULL;
}

/* Prefill of every prompt in one batch with no adapter; returns max |diff| against want. */
static double prefill_diff(const struct ad_model *m, const float *want)
{
    struct ad_kv kv;
    struct ad_err err;
    struct ad_scratch *scr = ad_scratch_new();
    struct ad_kv_seq seqs[MAX_SEQS] = {{0}};
    struct ad_chunk chunks[MAX_SEQS];
    float *logits = calloc(total_prompt * (size_t)V, sizeof(float));

    CHECK(scr && logits);
    CHECK_INT(m->cfg.n_vocab, ==, V);
    CHECK_INT(ad_kv_init(&kv, &m->cfg, 256, 4), ==, 0);
    for (int s = 0; s < n_seq; s++)
        chunks[s] = (struct ad_chunk){.seq = &seqs[s], .tokens = prompts[s],
                                      .n_tokens = prompt_len[s], .all_logits = true};
    if (ad_model_forward(m, &kv, chunks, n_seq, &ad_mix_hooks, scr, logits, &err) < 0) {
        fprintf(stderr, "forward: %s\n", err.msg);
        exit(1);
    }
    double d = max_diff(logits, want, total_prompt * (size_t)V);
    for (int s = 0; s < n_seq; s++)
        ad_kv_seq_release(&kv, &seqs[s]);
    ad_kv_fini(&kv);
    ad_scratch_free(scr);
    free(logits);
    return d;
}

/* Every tensor of the base is in the merged file under the same name and shape. Returns the
 * number of tensors missing or reshaped (and prints the first). */
static int check_names(const struct ad_model *base, const struct ad_model *merged)
{
    int bad = 0;
    CHECK_INT(merged->n_files, ==, 1);
    for (int f = 0; f < base->n_files; f++)
        for (size_t i = 0; i < ad_st_n_tensors(base->files[f]); i++) {
            const struct ad_tensor *t = ad_st_tensor(base->files[f], i);
            const struct ad_tensor *u = ad_st_find(merged->files[0], t->name);
            bool ok = u && u->n_dims == t->n_dims;
            for (int d = 0; ok && d < t->n_dims; d++)
                ok = u->shape[d] == t->shape[d];
            if (!ok && !bad++)
                fprintf(stderr, "merged file: tensor '%s' %s\n", t->name,
                        u ? "has another shape" : "is missing");
        }
    return bad;
}

/* ==========================================================================================
 * Derived bases */

enum variant {
    VARIANT_NO_ROOT, /* GPT-2 tensor names without "transformer." */
    VARIANT_TIED,    /* lm_head.weight dropped, tie_word_embeddings true */
    VARIANT_MISTRAL, /* the same weights as a MistralForCausalLM */
};

/* Writes a variant of base (loaded from case_dir) into dir. */
static void derive_base(const struct ad_model *base, enum variant v, const char *dir)
{
    char path[4200];
    struct ad_err err;
    json_error_t jerr;
    const char *root = ad_model_root(base);
    size_t rl = strlen(root), n = 0, cap = 0;
    struct ad_st_entry *e = NULL;

    CHECK(mkdir(dir, 0755) == 0);
    for (int f = 0; f < base->n_files; f++)
        for (size_t i = 0; i < ad_st_n_tensors(base->files[f]); i++) {
            const struct ad_tensor *t = ad_st_tensor(base->files[f], i);
            if (v == VARIANT_TIED && !strcmp(t->name, "lm_head.weight"))
                continue;
            if (n == cap) {
                cap = cap ? 2 * cap : 64;
                e = realloc(e, cap * sizeof(*e));
                CHECK(e);
            }
            e[n] = (struct ad_st_entry){.name = t->name, .dtype = t->dtype,
                                        .n_dims = t->n_dims, .data = t->data};
            if (v == VARIANT_NO_ROOT && !strncmp(t->name, root, rl))
                e[n].name = t->name + rl;
            memcpy(e[n].shape, t->shape, sizeof(e[n].shape));
            n++;
        }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    CHECK(ad_st_write(path, e, n, NULL, &err) == 0);
    free(e);

    snprintf(path, sizeof(path), "%s/config.json", case_dir);
    json_t *cfg = json_load_file(path, 0, &jerr);
    CHECK(cfg);
    if (v == VARIANT_TIED)
        json_object_set_new(cfg, "tie_word_embeddings", json_true());
    if (v == VARIANT_MISTRAL) {
        json_object_set_new(cfg, "architectures", json_pack("[s]", "MistralForCausalLM"));
        json_object_set_new(cfg, "model_type", json_string("mistral"));
    }
    snprintf(path, sizeof(path), "%s/config.json", dir);
    CHECK(json_dump_file(cfg, path, JSON_INDENT(2)) == 0);
    json_decref(cfg);
}

/* ==========================================================================================
 * Runs */

struct run {
    const char *name;
    int n;
    const char *adapter[AD_MIX_MAX];
    double weight[AD_MIX_MAX];
    struct ad_adapter *a[AD_MIX_MAX];
    bool mergeable;
    bool replaces_head; /* a single adapter that replaces the whole lm_head */
};

/* Exports run r against model_dir into a new dir under tmp, loads it and returns the logits'
 * max |diff| from want (INFINITY with a message on failure). */
static double export_and_compare(const struct run *r, const char *model_dir, const char *tag,
                                 const float *want, const char *check_root, char *msg,
                                 size_t msg_size)
{
    char out[4200];
    struct cmd c;
    struct ad_model *base = NULL, *merged = NULL;
    struct ad_err err;
    int lines;
    double d = INFINITY;

    snprintf(out, sizeof(out), "%s/%s-%s", tmp, r->name, tag);
    cmd_init(&c, model_dir, out);
    for (int k = 0; k < r->n; k++)
        cmd_adapter(&c, r->adapter[k], r->weight[k]);
    int rc = run_export(c.argv, msg, msg_size, &lines);
    if (rc != 0)
        return INFINITY; /* msg holds the tool's error */
    snprintf(msg, msg_size, "the merged model's logits differ");
    if (ad_model_load(out, &merged, &err) < 0 || ad_model_load(model_dir, &base, &err) < 0) {
        snprintf(msg, msg_size, "load: %s", err.msg);
        goto out;
    }
    if (check_names(base, merged)) {
        snprintf(msg, msg_size, "tensor names or shapes differ from the base");
        goto out;
    }
    if (base->cfg.tie_embeddings && ad_st_find(merged->files[0], "lm_head.weight") &&
        merged->cfg.tie_embeddings) {
        snprintf(msg, msg_size, "lm_head.weight written but config.json still ties it");
        goto out;
    }
    if (check_root) { /* no name may have gained the prefix */
        for (size_t i = 0; i < ad_st_n_tensors(merged->files[0]); i++)
            if (!strncmp(ad_st_tensor(merged->files[0], i)->name, check_root,
                         strlen(check_root))) {
                snprintf(msg, msg_size, "tensor '%s' gained the prefix",
                         ad_st_tensor(merged->files[0], i)->name);
                goto out;
            }
    }
    d = prefill_diff(merged, want);
out:
    ad_model_free(base);
    ad_model_free(merged);
    rm_tree(out);
    return d;
}

/* A run that must be refused: non-zero exit, one line, no output, no temporary left over. */
static bool expect_refusal(const struct run *r, const char *model_dir, const char *tag,
                           const char *must_say, char *msg, size_t msg_size)
{
    char out[4200], said[512];
    struct cmd c;
    int lines;

    snprintf(out, sizeof(out), "%s/%s-%s", tmp, r->name, tag);
    cmd_init(&c, model_dir, out);
    for (int k = 0; k < r->n; k++)
        cmd_adapter(&c, r->adapter[k], r->weight[k]);
    int rc = run_export(c.argv, said, sizeof(said), &lines);
    bool ok = rc > 0 && lines == 1 && access(out, F_OK) != 0 && n_hidden(tmp) == 0 &&
              !strncmp(said, "adapterd-export: error: ", 24) && strstr(said, must_say);
    snprintf(msg, msg_size, "exit %d, %d line%s, output %s: %s", rc, lines, lines == 1 ? "" : "s",
             access(out, F_OK) ? "absent" : "PRESENT", said);
    rm_tree(out);
    return ok;
}

int main(int argc, char **argv)
{
    static struct run runs[MAX_RUNS];
    struct ad_adapter *loaded[MAX_LOADED];
    struct ad_model *m;
    struct ad_err err;
    json_error_t jerr;
    char path[4200], msg[1024];
    int n_loaded = 0, fail = 0, n_merged = 0, n_refused = 0;

    if (argc == 4 && !strcmp(argv[1], "--export")) {
        export_bin = argv[2];
        case_dir = argv[3];
    } else if (argc == 2) {
        export_bin = getenv("ADAPTERD_EXPORT");
        case_dir = argv[1];
    }
    if (!export_bin || !case_dir) {
        fprintf(stderr, "usage: test-export [--export PATH] CASE_DIR (or set ADAPTERD_EXPORT)\n");
        return 2;
    }
    if (ad_model_load(case_dir, &m, &err) < 0) {
        fprintf(stderr, "load: %s\n", err.msg);
        return 1;
    }
    V = m->cfg.n_vocab;
    snprintf(tmp, sizeof(tmp), "%s/test-export-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR")
                                                                          : "/tmp");
    CHECK(mkdtemp(tmp));

    CHECK(ad_path_join(path, sizeof(path), case_dir, "ref.json") == 0);
    json_t *ref = json_load_file(path, 0, &jerr);
    if (!ref) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return 1;
    }
    json_t *jp = json_object_get(ref, "prompts");
    n_seq = (int)json_array_size(jp);
    CHECK(n_seq > 0 && n_seq <= MAX_SEQS);
    for (int s = 0; s < n_seq; s++) {
        json_t *p = json_array_get(jp, (size_t)s);
        prompt_len[s] = (int)json_array_size(p);
        prompts[s] = calloc((size_t)prompt_len[s], sizeof(int32_t));
        CHECK(prompts[s]);
        for (int j = 0; j < prompt_len[s]; j++)
            prompts[s][j] = (int32_t)json_integer_value(json_array_get(p, (size_t)j));
        total_prompt += (size_t)prompt_len[s];
    }

    /* The runs and their adapters' kinds. */
    json_t *jruns = json_object_get(ref, "runs");
    int n_runs = (int)json_array_size(jruns);
    CHECK(n_runs > 0 && n_runs <= MAX_RUNS);
    for (int i = 0; i < n_runs; i++) {
        json_t *jr = json_array_get(jruns, (size_t)i), *ja = json_object_get(jr, "adapters");
        struct run *r = &runs[i];
        r->name = json_string_value(json_object_get(jr, "name"));
        r->mergeable = true;
        CHECK(json_array_size(ja) <= AD_MIX_MAX);
        for (size_t k = 0; k < json_array_size(ja); k++) {
            json_t *e = json_array_get(ja, k);
            const char *an = json_string_value(json_object_get(e, "name"));
            struct ad_adapter *a = NULL;
            for (int j = 0; j < n_loaded && !a; j++)
                if (!strcmp(loaded[j]->name, an))
                    a = loaded[j];
            if (!a) {
                char dir[4200];
                snprintf(dir, sizeof(dir), "%s/adapters/%s", case_dir, an);
                if (ad_adapter_load(m, dir, an, 0, &a, &err) < 0) {
                    fprintf(stderr, "%s: %s\n", an, err.msg);
                    return 1;
                }
                CHECK(n_loaded < MAX_LOADED);
                loaded[n_loaded++] = a;
            }
            r->a[r->n] = a;
            r->adapter[r->n] = an;
            r->weight[r->n++] = json_number_value(json_object_get(e, "weight"));
            r->mergeable &= a->kind == AD_ADAPTER_LORA || a->kind == AD_ADAPTER_IA3 ||
                            a->kind == AD_ADAPTER_BIAS;
        }
        const struct ad_site_delta *hd = r->n == 1 ? r->a[0]->by_site[m->n_sites - 1] : NULL;
        r->replaces_head = hd && hd->w_new;
    }

    /* Derived bases, written once. */
    char noroot[4200], tied[4200], mistral[4200];
    bool gpt2 = m->cfg.family == AD_FAMILY_GPT2;
    bool llama = m->cfg.family == AD_FAMILY_LLAMA && !m->cfg.qkv_bias;
    snprintf(noroot, sizeof(noroot), "%s/base-noroot", tmp);
    snprintf(tied, sizeof(tied), "%s/base-tied", tmp);
    snprintf(mistral, sizeof(mistral), "%s/base-mistral", tmp);
    if (gpt2)
        derive_base(m, VARIANT_NO_ROOT, noroot);
    if (!m->cfg.tie_embeddings)
        derive_base(m, VARIANT_TIED, tied);
    if (llama)
        derive_base(m, VARIANT_MISTRAL, mistral);

    for (int i = 0; i < n_runs; i++) {
        struct run *r = &runs[i];
        json_t *jr = json_array_get(jruns, (size_t)i);
        if (r->n == 0) {
            printf("%-6s %-16s skipped (no adapter to merge)\n", m->id, r->name);
            continue;
        }
        const char *dtype = json_string_value(json_object_get(jr, "lora_dtype"));
        CHECK(!dtype || !strcmp(dtype, "auto") || !strcmp(dtype, "int8"));
        if (dtype && !strcmp(dtype, "int8")) { /* the daemon's in-memory form, not the files' */
            printf("%-6s %-16s skipped (lora_dtype %s: export merges the files as they are)\n",
                   m->id, r->name, dtype);
            continue;
        }
        if (!r->mergeable) {
            bool ok = expect_refusal(r, case_dir, "merged", "cannot be merged", msg, sizeof(msg));
            printf("%-6s %-16s refused %s (%s)\n", m->id, r->name, ok ? "ok" : "FAIL", msg);
            fail |= !ok;
            n_refused++;
            continue;
        }
        float *want = read_f32(case_dir, json_string_value(json_object_get(jr, "prefill")),
                               total_prompt * (size_t)V);
        double d = export_and_compare(r, case_dir, "merged", want, NULL, msg, sizeof(msg));
        bool ok = d <= TOL;
        printf("%-6s %-16s merged max |diff| %.3g", m->id, r->name, d);
        if (!ok)
            printf(" (%s)", msg);
        if (gpt2) { /* the same on a checkpoint without "transformer." */
            double d2 = export_and_compare(r, noroot, "noroot", want, ad_model_root(m), msg,
                                           sizeof(msg));
            printf(", names without '%s' %.3g", ad_model_root(m), d2);
            if (!(d2 <= TOL))
                printf(" (%s)", msg);
            ok &= d2 <= TOL;
        }
        if (r->replaces_head && !m->cfg.tie_embeddings) { /* lm_head replaced: untied */
            double d2 = export_and_compare(r, tied, "tied", want, NULL, msg, sizeof(msg));
            printf(", tied base untied %.3g", d2);
            if (!(d2 <= TOL))
                printf(" (%s)", msg);
            ok &= d2 <= TOL;
        }
        if (llama && r->a[0]->kind == AD_ADAPTER_BIAS) { /* new biases Mistral cannot declare */
            bool ok2 = expect_refusal(r, mistral, "mistral", "cannot declare", msg, sizeof(msg));
            printf(", as Mistral refused %s (%s)", ok2 ? "ok" : "FAIL", msg);
            ok &= ok2;
        }
        printf(" %s\n", ok ? "ok" : "FAIL");
        fail |= !ok;
        n_merged++;
        free(want);
    }

    /* An existing --out is refused and left alone. */
    {
        char out[4200], keep[4300];
        struct cmd c;
        int lines;
        int first = -1;
        for (int i = 0; i < n_runs && first < 0; i++)
            if (runs[i].n && runs[i].mergeable)
                first = i;
        CHECK(first >= 0);
        snprintf(out, sizeof(out), "%s/exists", tmp);
        snprintf(keep, sizeof(keep), "%s/keep", out);
        CHECK(mkdir(out, 0755) == 0);
        FILE *f = fopen(keep, "w");
        CHECK(f);
        fclose(f);
        cmd_init(&c, case_dir, out);
        cmd_adapter(&c, runs[first].adapter[0], 1.0);
        int rc = run_export(c.argv, msg, sizeof(msg), &lines);
        struct stat st;
        bool ok = rc > 0 && lines == 1 && stat(keep, &st) == 0 && n_hidden(tmp) == 0 &&
                  strstr(msg, "already exists");
        printf("%-6s %-16s existing --out refused %s (%s)\n", m->id, "-", ok ? "ok" : "FAIL",
               msg);
        fail |= !ok;
        rm_tree(out);
    }
    printf("%-6s export: %d runs merged, %d refused%s\n", m->id, n_merged, n_refused,
           fail ? ", FAILED" : "");

    rm_tree(tmp);
    for (int j = 0; j < n_loaded; j++)
        ad_adapter_unref(loaded[j]);
    for (int s = 0; s < n_seq; s++)
        free(prompts[s]);
    json_decref(ref);
    ad_model_free(m);
    return fail;
}
