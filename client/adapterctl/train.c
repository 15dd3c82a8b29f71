/* adapterctl train: uploads the training (and validation) file, creates a fine-tuning job and,
 * with --follow, follows it to its end (ctl_follow, also `jobs events ID --follow`): a live
 * progress bar on a terminal, a line per event otherwise. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

/* ==========================================================================================
 * Following a job */

struct watch {
    bool json; /* each event's JSON on a line */
    bool bar;  /* a bar on stderr (a terminal), the other events as lines above it */
    bool shown;
    long long step, total;
    double loss, valid, tps; /* valid: NaN until an evaluation */
    /* the ETA: the time per step since a reference (the first metrics after any other event:
     * a start, a resume, a checkpoint), the longer of the server's clock (created_at, in
     * seconds: right for events replayed at once) and ours (right for steps under a second) */
    bool have_ref;
    long long ref_at, ref_step, at;
    double ref_t;
};

static void bar_clear(struct watch *w)
{
    if (w->shown)
        fputs("\r\033[K", stderr);
    w->shown = false;
}

static void bar_draw(struct watch *w)
{
    char eta[32] = "-", valid[48] = "";
    long long steps = w->step - w->ref_step;
    double secs = fmax((double)(w->at - w->ref_at), ctl_now() - w->ref_t);
    if (w->have_ref && steps > 0 && secs > 0) {
        long long left = llround(secs / (double)steps * (double)(w->total - w->step));
        if (left >= 3600)
            snprintf(eta, sizeof(eta), "%lld:%02lld:%02lld", left / 3600, left / 60 % 60,
                     left % 60);
        else
            snprintf(eta, sizeof(eta), "%lld:%02lld", left / 60, left % 60);
    }
    if (!isnan(w->valid))
        snprintf(valid, sizeof(valid), "  valid %.4f", w->valid);
    int pct = w->total > 0 ? (int)(100 * w->step / w->total) : 0;
    fprintf(stderr, "\rtraining  step %lld/%lld  %3d%%  loss %.4f%s  %.1f tokens/s  ETA %s\033[K",
            w->step, w->total, pct, w->loss, valid, w->tps, eta);
    fflush(stderr);
    w->shown = true;
}

static double num(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_number(v) ? json_number_value(v) : NAN;
}

static long long integer(const json_t *o, const char *key)
{
    return (long long)json_integer_value(json_object_get(o, key)); /* 0 if it is none */
}

static int on_event(void *ud, const json_t *ev)
{
    struct watch *w = ud;
    const char *type = ctl_str(ev, "type", ""), *level = ctl_str(ev, "level", "info");
    json_t *data = json_object_get(ev, "data");
    bool metrics = !strcmp(type, "metrics");
    if (w->json) {
        ctl_print_json_line(ev);
        fflush(stdout);
        return 0;
    }
    if (!metrics) {
        bar_clear(w);
        w->have_ref = false;
        FILE *f = w->bar ? stderr : stdout;
        fprintf(f, "%s%s%s\n", strcmp(level, "info") ? level : "",
                strcmp(level, "info") ? ": " : "", ctl_str(ev, "message", ""));
        fflush(f);
        return 0;
    }
    w->step = integer(data, "step");
    w->total = integer(data, "total_steps");
    w->loss = num(data, "train_loss");
    w->tps = num(data, "tokens_per_second");
    if (!isnan(num(data, "valid_loss")))
        w->valid = num(data, "valid_loss");
    w->at = integer(ev, "created_at");
    if (!w->have_ref) {
        w->have_ref = true;
        w->ref_at = w->at;
        w->ref_step = w->step;
        w->ref_t = ctl_now();
    }
    if (w->bar) {
        bar_draw(w);
        return 0;
    }
    char valid[48] = "";
    if (!isnan(num(data, "valid_loss")))
        snprintf(valid, sizeof(valid), "  valid_loss %.4f", num(data, "valid_loss"));
    printf("step %lld/%lld  train_loss %.4f%s  learning_rate %g  tokens/s %.1f\n", w->step,
           w->total, w->loss, valid, num(data, "learning_rate"), w->tps);
    fflush(stdout);
    return 0;
}

/* How the job ended: a line for people (or the job's JSON), and the exit status. */
static int result(struct ctl *ctl, const json_t *job)
{
    const char *id = ctl_str(job, "id", "?"), *status = ctl_str(job, "status", "?");
    if (ctl->json)
        ctl_print_json_line(job);
    if (!strcmp(status, "succeeded")) {
        if (!ctl->json)
            printf("succeeded: adapter '%s' (job %s, %lld trained tokens)\n",
                   ctl_str(job, "fine_tuned_model", "?"), id, integer(job, "trained_tokens"));
        return CTL_OK;
    }
    json_t *error = json_object_get(job, "error");
    if (!strcmp(status, "failed"))
        fprintf(stderr, "adapterctl: job %s failed: %s (%s)\n", id,
                ctl_str(error, "message", "no message"), ctl_str(error, "code", "no code"));
    else
        fprintf(stderr, "adapterctl: job %s is %s\n", id, status);
    return CTL_FAILED;
}

int ctl_follow(struct ctl *ctl, struct adc_client *c, const char *id)
{
    struct watch w = {.json = ctl->json, .bar = !ctl->json && ctl_progress_wanted(), .valid = NAN};
    struct adc_error e;
    json_t *job;
    int rc = adc_job_follow(c, id, on_event, &w, &e);
    bar_clear(&w);
    if (rc == -ECANCELED && ctl_interrupted()) {
        fprintf(stderr,
                "adapterctl: stopped following job %s; the job goes on (adapterctl jobs "
                "cancel %s stops it)\n",
                id, id);
        return CTL_INTERRUPTED;
    }
    if (rc < 0)
        return ctl_fail(ctl, &e);
    if (adc_job_get(c, id, &job, &e) < 0)
        return ctl_fail(ctl, &e);
    int status = result(ctl, job);
    json_decref(job);
    return status;
}

/* ==========================================================================================
 * The request, from the options */

static const char *const kinds[] = {"lora",   "dora",   "rslora",  "ia3",      "prefix",
                                    "prompt", "bitfit", "houlsby", "pfeiffer", "full"};
#define N_KINDS (sizeof(kinds) / sizeof(kinds[0]))

struct train {
    const char *data, *validation, *kind, *target_modules, *config, *base, *suffix;
    long rank, epochs, batch_size, seed, max_seq_len; /* -1: the server's default */
    double alpha, lr;                                 /* < 0: the server's default */
    bool follow;
};

enum {
    OPT_DATA = OPT_OWN,
    OPT_VALIDATION,
    OPT_KIND,
    OPT_RANK,
    OPT_ALPHA,
    OPT_TARGETS,
    OPT_EPOCHS,
    OPT_BATCH,
    OPT_LR,
    OPT_SEED,
    OPT_MAX_LEN,
    OPT_CONFIG,
    OPT_BASE,
    OPT_SUFFIX,
    OPT_FOLLOW,
};

static const struct option train_options[] = {
    {"data", required_argument, NULL, OPT_DATA},
    {"validation", required_argument, NULL, OPT_VALIDATION},
    {"kind", required_argument, NULL, OPT_KIND},
    {"rank", required_argument, NULL, OPT_RANK},
    {"alpha", required_argument, NULL, OPT_ALPHA},
    {"target-modules", required_argument, NULL, OPT_TARGETS},
    {"epochs", required_argument, NULL, OPT_EPOCHS},
    {"batch-size", required_argument, NULL, OPT_BATCH},
    {"lr", required_argument, NULL, OPT_LR},
    {"seed", required_argument, NULL, OPT_SEED},
    {"max-seq-len", required_argument, NULL, OPT_MAX_LEN},
    {"config", required_argument, NULL, OPT_CONFIG},
    {"base", required_argument, NULL, OPT_BASE},
    {"suffix", required_argument, NULL, OPT_SUFFIX},
    {"follow", no_argument, NULL, OPT_FOLLOW},
    {NULL, 0, NULL, 0},
};

static int train_option(struct ctl *ctl, void *st, int opt, const char *arg)
{
    struct train *t = st;
    switch (opt) {
    case OPT_DATA:
        t->data = arg;
        return 0;
    case OPT_VALIDATION:
        t->validation = arg;
        return 0;
    case OPT_KIND:
        for (size_t i = 0; i < N_KINDS; i++)
            if (!strcmp(arg, kinds[i])) {
                t->kind = kinds[i];
                return 0;
            }
        return ctl_usage_error(ctl,
                               "unknown --kind '%s' (lora, dora, rslora, ia3, prefix, "
                               "prompt, bitfit, houlsby, pfeiffer, full)",
                               arg);
    case OPT_RANK:
        return ctl_parse_long(ctl, "--rank", arg, 1, 1 << 16, &t->rank);
    case OPT_ALPHA:
        return ctl_parse_double(ctl, "--alpha", arg, 1e-6, 1e6, &t->alpha);
    case OPT_TARGETS:
        t->target_modules = arg;
        return 0;
    case OPT_EPOCHS:
        return ctl_parse_long(ctl, "--epochs", arg, 1, 1 << 20, &t->epochs);
    case OPT_BATCH:
        return ctl_parse_long(ctl, "--batch-size", arg, 1, 1 << 20, &t->batch_size);
    case OPT_LR:
        return ctl_parse_double(ctl, "--lr", arg, 1e-12, 1e3, &t->lr);
    case OPT_SEED:
        return ctl_parse_long(ctl, "--seed", arg, 0, 0x7fffffffL, &t->seed);
    case OPT_MAX_LEN:
        return ctl_parse_long(ctl, "--max-seq-len", arg, 1, 1 << 24, &t->max_seq_len);
    case OPT_CONFIG:
        t->config = arg;
        return 0;
    case OPT_BASE:
        t->base = arg;
        return 0;
    case OPT_SUFFIX:
        t->suffix = arg;
        return 0;
    case OPT_FOLLOW:
        t->follow = true;
        return 0;
    default:
        return CTL_USAGE;
    }
}

/* The options that do not fit together, or are missing: CTL_USAGE after saying why, or 0. */
static int train_check(struct ctl *ctl, const struct train *t)
{
    const char *k = t->kind;
    bool lora = !k || !strcmp(k, "lora") || !strcmp(k, "dora") || !strcmp(k, "rslora");
    if (!t->data)
        return ctl_usage_error(ctl, "--data FILE is needed (the training file, JSONL)");
    if (!t->suffix)
        return ctl_usage_error(ctl, "--suffix NAME is needed (the name of the adapter it makes)");
    if (!lora && (t->rank >= 0 || t->alpha >= 0))
        return ctl_usage_error(ctl,
                               "--%s is LoRA's (lora, dora, rslora), not %s's; --config "
                               "sets any field",
                               t->rank >= 0 ? "rank" : "alpha", k);
    if (t->target_modules && !lora && strcmp(k, "ia3"))
        return ctl_usage_error(ctl, "--target-modules is for lora, dora, rslora and ia3, not %s",
                               k);
    return 0;
}

/* method.supervised.adapter_config: --config's object with --rank, --alpha and
 * --target-modules over it; *ret NULL when there is none. 0, or CTL_FAILED after saying why. */
static int adapter_config(const struct train *t, json_t **ret)
{
    json_t *cfg = NULL;
    if (t->config) {
        json_error_t jerr;
        cfg = json_load_file(t->config, 0, &jerr);
        if (!json_is_object(cfg)) {
            fprintf(stderr, "adapterctl: %s: %s\n", t->config,
                    cfg ? "not a JSON object" : jerr.text);
            json_decref(cfg);
            return CTL_FAILED;
        }
    }
    if ((t->rank >= 0 || t->alpha >= 0 || t->target_modules) && !cfg)
        cfg = json_object();
    if (t->rank >= 0)
        json_object_set_new(cfg, "r", json_integer(t->rank));
    if (t->alpha >= 0)
        json_object_set_new(cfg, "lora_alpha",
                            t->alpha == floor(t->alpha) ? json_integer((json_int_t)t->alpha)
                                                        : json_real(t->alpha));
    if (t->target_modules) {
        json_t *mods = json_array();
        for (const char *p = t->target_modules; *p;) {
            size_t n = strcspn(p, ",");
            if (n)
                json_array_append_new(mods, json_stringn(p, n));
            p += n + (p[n] == ',');
        }
        json_object_set_new(cfg, "target_modules", mods);
    }
    *ret = cfg;
    return 0;
}

/* The request of POST /v1/fine_tuning/jobs, with cfg (stolen; may be NULL) as its
 * adapter_config; NULL after saying why. */
static json_t *train_request(const struct train *t, json_t *cfg, const char *base, const char *file,
                             const char *valid_file)
{
    json_t *sup = json_object(), *hp = json_object();
    json_t *r = json_pack("{s:s, s:s, s:s, s:{s:s, s:o}}", "model", base, "training_file", file,
                          "suffix", t->suffix, "method", "type", "supervised", "supervised", sup);
    if (!r) {
        json_decref(cfg);
        json_decref(hp);
        fprintf(stderr, "adapterctl: out of memory\n");
        return NULL;
    }
    if (valid_file)
        json_object_set_new(r, "validation_file", json_string(valid_file));
    if (t->seed >= 0)
        json_object_set_new(r, "seed", json_integer(t->seed));
    /* LoRA fields from the flags alone: LoRA's defaults under them (a config without a peft_type
     * and without "adapter" is not taken as LoRA by the server) */
    if (t->kind || (cfg && !t->config))
        json_object_set_new(sup, "adapter", json_string(t->kind ? t->kind : "lora"));
    if (cfg)
        json_object_set_new(sup, "adapter_config", cfg);
    if (t->epochs >= 0)
        json_object_set_new(hp, "n_epochs", json_integer(t->epochs));
    if (t->batch_size >= 0)
        json_object_set_new(hp, "batch_size", json_integer(t->batch_size));
    if (json_object_size(hp))
        json_object_set(sup, "hyperparameters", hp);
    json_decref(hp);
    if (t->lr >= 0)
        json_object_set_new(sup, "learning_rate", json_real(t->lr));
    if (t->max_seq_len >= 0)
        json_object_set_new(sup, "max_seq_len", json_integer(t->max_seq_len));
    return r;
}

/* ==========================================================================================
 * train */

/* The base model's id: the first model of kind "base" of GET /v1/models (a new string). */
static char *base_id(struct ctl *ctl, struct adc_client *c)
{
    struct adc_error e;
    json_t *models, *m;
    size_t i;
    char *id = NULL;
    if (adc_models(c, &models, &e) < 0) {
        ctl_fail(ctl, &e);
        return NULL;
    }
    json_array_foreach(json_object_get(models, "data"), i,
                       m) if (!id && !strcmp(ctl_str(m, "kind", ""), "base") &&
                              ctl_str(m, "id", NULL)) id = strdup(ctl_str(m, "id", NULL));
    json_decref(models);
    if (!id)
        fprintf(stderr, "adapterctl: GET /v1/models names no base model: give --base\n");
    return id;
}

/* Uploads path; its id (a new string), or NULL after saying why (*ret_status). */
static char *upload(struct ctl *ctl, struct adc_client *c, const char *path, int *ret_status)
{
    const char *slash = strrchr(path, '/');
    char label[160];
    snprintf(label, sizeof(label), "uploading %s", slash ? slash + 1 : path);
    struct ctl_progress p = {.label = label};
    struct adc_error e;
    json_t *f;
    int rc = adc_file_upload(c, path, ctl_progress_wanted() ? ctl_progress_draw : NULL, &p, &f, &e);
    ctl_progress_end(&p);
    if (rc < 0) {
        *ret_status = ctl_fail(ctl, &e);
        return NULL;
    }
    char *id = ctl_str(f, "id", NULL) ? strdup(ctl_str(f, "id", NULL)) : NULL;
    json_decref(f);
    if (!id) {
        fprintf(stderr, "adapterctl: POST /v1/files answered no file id\n");
        *ret_status = CTL_FAILED;
    }
    return id;
}

static int train_run(struct ctl *ctl, int argc, char **argv)
{
    struct train t = {.rank = -1,
                      .epochs = -1,
                      .batch_size = -1,
                      .seed = -1,
                      .max_seq_len = -1,
                      .alpha = -1,
                      .lr = -1};
    ctl_options(ctl, argc, argv, NULL, train_options, train_option, &t, 0, 0);
    if (train_check(ctl, &t) != 0)
        return CTL_USAGE;
    json_t *cfg = NULL, *req = NULL, *job = NULL;
    if (adapter_config(&t, &cfg) != 0)
        return CTL_FAILED;
    struct adc_client *c = ctl_client(ctl);
    char *base = NULL, *file = NULL, *valid = NULL;
    struct adc_error e;
    int status = CTL_FAILED;
    if (!c) {
        json_decref(cfg);
        return CTL_FAILED;
    }
    base = t.base ? strdup(t.base) : base_id(ctl, c);
    if (!base)
        goto out;
    file = upload(ctl, c, t.data, &status);
    if (file && t.validation)
        valid = upload(ctl, c, t.validation, &status);
    if (!file || (t.validation && !valid))
        goto out;
    req = train_request(&t, cfg, base, file, valid);
    cfg = NULL;
    if (!req)
        goto out;
    if (adc_job_create(c, req, &job, &e) < 0) {
        status = ctl_fail(ctl, &e);
        goto out;
    }
    const char *id = ctl_str(job, "id", "?");
    if (ctl->json && !t.follow)
        ctl_print_json(job);
    else if (ctl->json)
        ctl_print_json_line(job);
    else
        printf("%s\n", id);
    fflush(stdout);
    status = t.follow ? ctl_follow(ctl, c, id) : CTL_OK;
out:
    if (!job) { /* nothing of a job that was not made stays behind */
        adc_client_clear_cancel(c);
        if (file)
            adc_file_delete(c, file, NULL, NULL);
        if (valid)
            adc_file_delete(c, valid, NULL, NULL);
    }
    json_decref(job);
    json_decref(req);
    json_decref(cfg);
    free(base);
    free(file);
    free(valid);
    return status;
}

const struct ctl_command ctl_train = {
    .name = "train",
    .args = "--data FILE --suffix NAME",
    .summary = "fine-tune an adapter on a JSONL file, and --follow the job",
    .help =
        "Uploads the files (a progress bar on a terminal), creates the job and prints its id.\n"
        "The server checks every line of a file as it arrives (a bad one: its 'line N: reason'\n"
        "and nothing is kept); jobs run one at a time, in order.\n\n"
        "      --data FILE          the training file: JSONL of {\"prompt\", \"completion\"},\n"
        "                           {\"messages\": [...]} or {\"text\"}\n"
        "      --validation FILE    a validation file, evaluated each epoch (valid_loss)\n"
        "      --suffix NAME        the adapter the job makes (served when it succeeds;\n"
        "                           checkpoints are served as NAME-step-N)\n"
        "      --kind KIND          lora (the server's default), dora, rslora, ia3, prefix,\n"
        "                           prompt, bitfit, houlsby, pfeiffer or full\n"
        "      --rank N, --alpha A  LoRA's r and lora_alpha (the server's: 16 and 32)\n"
        "      --target-modules M,...\n"
        "                           the modules of LoRA or IA3 (default: every projection)\n"
        "      --config FILE        a PEFT adapter_config.json, merged over the kind's defaults\n"
        "                           (--rank, --alpha, --target-modules go over it)\n"
        "      --epochs N           n_epochs (the server's default: 3)\n"
        "      --batch-size N       batch_size (default: 8, or fewer examples)\n"
        "      --lr X               the learning rate itself (default by kind: 2e-4 LoRA, ...)\n"
        "      --seed N             the seed of the data order and the initialisation\n"
        "      --max-seq-len N      tokens of a training sequence\n"
        "      --base MODEL         the model to train on: the base's id (the default) or an\n"
        "                           adapter to go on training\n"
        "      --follow             then follow the job to its end: on a terminal a progress\n"
        "                           bar (step/total, loss, tokens/s, ETA) with the other events\n"
        "                           as lines, else a line per event on stdout; then the result.\n"
        "                           Exit status 0 when it succeeded, 1 when it failed or was\n"
        "                           cancelled. Ctrl-C stops following (the job goes on), 130.\n\n"
        "--json prints the job; with --follow one JSON object per line: the job, each event as\n"
        "the server sends it, the job as it ended.\n",
    .run = train_run,
};
