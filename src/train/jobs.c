/* Fine-tuning jobs: OpenAI's files and jobs over the trainer (train.h: the state directory's
 * layout). One worker thread runs the jobs one at a time, oldest first, at SCHED_IDLE priority
 * (so are the threads of its passes, which inherit it): serving's threads always come first,
 * and with no request in flight training has every core.
 *
 * Durability: every object is written to a temporary name, fsync'd and renamed; a checkpoint is
 * written to step-N.tmp and renamed when complete; the job's record names its last complete
 * checkpoint only after that. So kill -9 at any moment leaves every record whole, and a job that
 * was running resumes from its last checkpoint, losing at most the steps after it. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/tokenizer.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#define MAX_LINE (1u << 20)
/* A suffix names the result and its checkpoints, <suffix>-step-N: within the 64 characters of
 * an adapter's name for N up to 10 digits. */
#define MAX_SUFFIX 48

enum status { S_VALIDATING, S_QUEUED, S_RUNNING, S_PAUSED, S_SUCCEEDED, S_FAILED, S_CANCELLED };

const char *const ad_job_status_names[7] = {"validating_files", "queued", "running", "paused",
                                            "succeeded", "failed", "cancelled"};

struct job {
    char id[40];
    json_t *obj;          /* the job object as clients see it (and job.json holds it) */
    json_t *events;       /* oldest first */
    json_t *checkpoints;  /* oldest first */
    enum status status;
    bool cancel, pause;   /* asked for, while running */
    double tokens_per_s, loss;
};

struct ad_jobs {
    struct ad_jobs_config cfg;
    char state[4096], files[4200], jobs_dir[4200];
    pthread_mutex_t lock; /* guards everything below */
    pthread_cond_t cond;  /* the queue changed, an event was added, a job ended */
    struct job **job;     /* oldest first */
    size_t n_jobs, cap_jobs;
    bool stop;
    uint64_t trained_tokens;
    pthread_t worker;
    bool worker_started;

    /* The idle runner (idle_run): the trainer's computations at SCHED_IDLE. */
    pthread_mutex_t idle_lock; /* guards idle_call and idle_quit; taken by nothing else */
    pthread_cond_t idle_cond;
    struct idle_call *idle_call; /* to run; NULL when done */
    bool idle_quit;
    pthread_t idle;
    bool idle_started;
    /* Taken (before lock) around installing a job's adapters and dropping a cancelled job's,
     * so that a checkpoint finished as its job is cancelled is never left installed. */
    pthread_mutex_t install_lock;
};

/* ==========================================================================================
 * Files on disk */

/* snprintf for paths (a path that does not fit is cut, and then simply not found). */
__attribute__((format(printf, 3, 4))) static void pathf(char *buf, size_t size, const char *fmt,
                                                        ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
}

static void new_id(char *buf, size_t size, const char *prefix)
{
    unsigned char r[12];
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) { /* no entropy: time and a counter */
        static unsigned long long n;
        unsigned long long x = ad_splitmix64((unsigned long long)time(NULL) ^ ++n);
        memcpy(r, &x, 8);
        x = ad_splitmix64(x);
        memcpy(r + 8, &x, 4);
    }
    int k = snprintf(buf, size, "%s-", prefix);
    for (size_t i = 0; i < sizeof(r) && (size_t)k + 2 < size; i++)
        k += snprintf(buf + k, size - (size_t)k, "%02x", r[i]);
}

/* Writes j to path atomically (a temporary name, fsync, rename, fsync of the directory). */
static int write_json(const char *path, const json_t *j)
{
    char tmp[4300], dir[4300];
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_SORT_KEYS);
    if (!text)
        return -ENOMEM;
    pathf(tmp, sizeof(tmp), "%s.tmp", path);
    int r = ad_write_file(tmp, text, strlen(text));
    free(text);
    if (r == 0 && rename(tmp, path) < 0)
        r = -errno;
    pathf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    if (r == 0)
        ad_fsync_dir(dir);
    return r;
}

static json_t *read_json(const char *path)
{
    json_error_t e;
    return json_load_file(path, 0, &e);
}

static bool id_ok(const char *id, const char *prefix)
{
    size_t n = strlen(prefix);
    if (strncmp(id, prefix, n) || id[n] != '-' || strlen(id) != n + 25)
        return false;
    for (const char *p = id + n + 1; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
            return false;
    return true;
}

/* ==========================================================================================
 * File uploads */

struct ad_file_upload {
    struct ad_jobs *j;
    char tmp[4300], filename[256];
    int fd;
    size_t bytes, line_no, lines;
    char *line; /* the line in progress */
    size_t len;
    bool failed;
};

int ad_files_begin(struct ad_jobs *j, const char *filename, struct ad_file_upload **ret,
                   struct ad_err *err)
{
    struct ad_file_upload *u = calloc(1, sizeof(*u));
    if (!u || !(u->line = malloc(MAX_LINE + 1))) {
        free(u);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    u->j = j;
    snprintf(u->filename, sizeof(u->filename), "%s", filename ? filename : "upload.jsonl");
    snprintf(u->tmp, sizeof(u->tmp), "%s/.upload-XXXXXX", j->files);
    u->fd = mkstemp(u->tmp);
    if (u->fd < 0) {
        int e = errno;
        free(u->line);
        free(u);
        return ad_err_set(err, e == ENOSPC ? -ENOSPC : -EIO, "cannot store the file: %s",
                          strerror(e));
    }
    *ret = u;
    return 0;
}

static int check_line(struct ad_file_upload *u, struct ad_err *err)
{
    u->line_no++;
    size_t n = u->len;
    while (n > 0 && (u->line[n - 1] == '\r' || u->line[n - 1] == ' ' || u->line[n - 1] == '\t'))
        n--;
    u->len = 0;
    const char *line = u->line;
    if (u->line_no == 1 && n >= 3 && !memcmp(line, "\xEF\xBB\xBF", 3)) { /* a BOM, as the loader */
        line += 3;
        n -= 3;
    }
    if (n == 0)
        return 0;
    u->lines++;
    return ad_data_check_line(line, n, u->line_no, err);
}

int ad_files_write(struct ad_file_upload *u, const void *data, size_t len, struct ad_err *err)
{
    const char *p = data;
    if (u->failed)
        return -EINVAL;
    if (u->bytes + len > u->j->cfg.max_file_bytes) {
        u->failed = true;
        return ad_err_set(err, -E2BIG, "the file is larger than %zu bytes",
                          u->j->cfg.max_file_bytes);
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = write(u->fd, p + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            u->failed = true;
            return ad_err_set(err, -EIO, "cannot store the file: %s", strerror(errno));
        }
        off += (size_t)w;
    }
    u->bytes += len;
    for (size_t i = 0; i < len; i++) {
        if (p[i] == '\n') {
            int r = check_line(u, err);
            if (r < 0) {
                u->failed = true;
                return r;
            }
            continue;
        }
        if (u->len == MAX_LINE) {
            u->failed = true;
            return ad_err_set(err, -EINVAL, "line %zu: longer than %u bytes", u->line_no + 1,
                              MAX_LINE);
        }
        u->line[u->len++] = p[i];
    }
    return 0;
}

void ad_files_abort(struct ad_file_upload *u)
{
    if (!u)
        return;
    if (u->fd >= 0)
        close(u->fd);
    unlink(u->tmp);
    free(u->line);
    free(u);
}

static json_t *file_object(const char *id, size_t bytes, const char *filename,
                           const char *purpose, size_t lines)
{
    return json_pack("{s:s, s:s, s:I, s:I, s:s, s:s, s:s, s:n, s:n, s:I}", "id", id, "object",
                     "file", "bytes", (json_int_t)bytes, "created_at", (json_int_t)time(NULL),
                     "filename", filename, "purpose", purpose, "status", "processed",
                     "status_details", "expires_at", "lines", (json_int_t)lines);
}

int ad_files_finish(struct ad_file_upload *u, const char *purpose, json_t **ret,
                    struct ad_err *err)
{
    struct ad_jobs *j = u->j;
    char id[40], path[4400];
    int r = 0;
    if (u->len > 0)
        r = check_line(u, err); /* the last line, without a newline */
    if (r >= 0 && u->lines == 0)
        r = ad_err_set(err, -EINVAL, "the file has no example");
    if (r >= 0 && (!purpose || strcmp(purpose, "fine-tune")))
        r = ad_err_set(err, -EINVAL, "'purpose' must be \"fine-tune\"");
    if (r >= 0 && fsync(u->fd) < 0)
        r = ad_err_set(err, -EIO, "cannot store the file: %s", strerror(errno));
    close(u->fd);
    u->fd = -1;
    json_t *obj = NULL;
    if (r >= 0) {
        new_id(id, sizeof(id), "file");
        pathf(path, sizeof(path), "%s/%s.jsonl", j->files, id);
        if (rename(u->tmp, path) < 0)
            r = ad_err_set(err, -EIO, "cannot store the file: %s", strerror(errno));
    }
    if (r >= 0) { /* the object last: a content without one is an interrupted upload */
        obj = file_object(id, u->bytes, u->filename, purpose, u->lines);
        pathf(path, sizeof(path), "%s/%s.json", j->files, id);
        if (!obj || (r = write_json(path, obj)) < 0)
            r = ad_err_set(err, r < 0 ? r : -ENOMEM, "cannot store the file");
    }
    if (r < 0) {
        json_decref(obj);
        unlink(u->tmp);
    } else {
        *ret = obj;
    }
    free(u->line);
    free(u);
    return r;
}

int ad_files_get(struct ad_jobs *j, const char *id, json_t **ret, struct ad_err *err)
{
    char path[4400];
    if (!id_ok(id, "file"))
        return ad_err_set(err, -ENOENT, "no file '%.40s'", id);
    pathf(path, sizeof(path), "%s/%s.json", j->files, id);
    json_t *o = read_json(path);
    if (!o)
        return ad_err_set(err, -ENOENT, "no file '%s'", id);
    *ret = o;
    return 0;
}

int ad_files_path(struct ad_jobs *j, const char *id, char *buf, size_t size, struct ad_err *err)
{
    json_t *o;
    int r = ad_files_get(j, id, &o, err);
    if (r < 0)
        return r;
    json_decref(o);
    snprintf(buf, size, "%s/%s.jsonl", j->files, id);
    return 0;
}

static int by_created_desc(const void *a, const void *b)
{
    json_int_t x = json_integer_value(json_object_get(*(json_t *const *)a, "created_at"));
    json_int_t y = json_integer_value(json_object_get(*(json_t *const *)b, "created_at"));
    return x < y ? 1 : x > y ? -1 : 0;
}

int ad_files_list(struct ad_jobs *j, json_t **ret)
{
    DIR *d = opendir(j->files);
    struct dirent *de;
    json_t *all[4096];
    size_t n = 0;
    while (d && (de = readdir(d)) && n < 4096) {
        size_t len = strlen(de->d_name);
        char id[64];
        if (len < 6 || strcmp(de->d_name + len - 5, ".json") || len - 5 >= sizeof(id))
            continue;
        snprintf(id, sizeof(id), "%.*s", (int)(len - 5), de->d_name);
        json_t *o;
        if (ad_files_get(j, id, &o, NULL) == 0)
            all[n++] = o;
    }
    if (d)
        closedir(d);
    qsort(all, n, sizeof(all[0]), by_created_desc);
    json_t *data = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(data, all[i]);
    *ret = json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", 0);
    return 0;
}

static bool job_active(const struct job *jb)
{
    return jb->status == S_VALIDATING || jb->status == S_QUEUED || jb->status == S_RUNNING ||
           jb->status == S_PAUSED;
}

int ad_files_delete(struct ad_jobs *j, const char *id, struct ad_err *err)
{
    char path[4400];
    json_t *o;
    int r = ad_files_get(j, id, &o, err);
    if (r < 0)
        return r;
    json_decref(o);
    pthread_mutex_lock(&j->lock);
    for (size_t i = 0; i < j->n_jobs && r == 0; i++) {
        const struct job *jb = j->job[i];
        const char *tf = json_string_value(json_object_get(jb->obj, "training_file"));
        const char *vf = json_string_value(json_object_get(jb->obj, "validation_file"));
        if (job_active(jb) && ((tf && !strcmp(tf, id)) || (vf && !strcmp(vf, id))))
            r = ad_err_set(err, -EBUSY, "file '%s' is used by job '%s', which has not ended",
                           id, jb->id);
    }
    pthread_mutex_unlock(&j->lock);
    if (r < 0)
        return r;
    pathf(path, sizeof(path), "%s/%s.json", j->files, id);
    unlink(path); /* the object first: without it the content is a leftover */
    pathf(path, sizeof(path), "%s/%s.jsonl", j->files, id);
    unlink(path);
    ad_fsync_dir(j->files);
    return 0;
}

/* ==========================================================================================
 * Jobs: records */

static struct job *find_job(struct ad_jobs *j, const char *id)
{
    for (size_t i = 0; i < j->n_jobs; i++)
        if (!strcmp(j->job[i]->id, id))
            return j->job[i];
    return NULL;
}

static void job_dir(const struct ad_jobs *j, const struct job *jb, char *buf, size_t size)
{
    snprintf(buf, size, "%s/%s", j->jobs_dir, jb->id);
}

/* Writes the job's record (the lock held). */
static int save_job(struct ad_jobs *j, struct job *jb)
{
    char path[4400];
    json_object_set_new(jb->obj, "status", json_string(ad_job_status_names[jb->status]));
    pathf(path, sizeof(path), "%s/%s/job.json", j->jobs_dir, jb->id);
    return write_json(path, jb->obj);
}

static void set_status(struct ad_jobs *j, struct job *jb, enum status s)
{
    jb->status = s;
    if (s >= S_SUCCEEDED)
        json_object_set_new(jb->obj, "finished_at", json_integer((json_int_t)time(NULL)));
    save_job(j, jb);
    pthread_cond_broadcast(&j->cond);
}

/* Appends an event (the lock held): to memory and to events.jsonl. data (stolen) may be NULL. */
static void add_event(struct ad_jobs *j, struct job *jb, const char *level, const char *msg,
                      json_t *data)
{
    char id[40], path[4400];
    new_id(id, sizeof(id), "ftevent");
    json_t *ev = json_pack("{s:s, s:s, s:I, s:s, s:s, s:s}", "id", id, "object",
                           "fine_tuning.job.event", "created_at", (json_int_t)time(NULL),
                           "level", level, "message", msg, "type", data ? "metrics" : "message");
    if (!ev) {
        json_decref(data);
        return;
    }
    /* the daemon's log has every event but the steps' metrics (those at debug) */
    ad_log(!strcmp(level, "error") ? AD_LOG_ERROR : data ? AD_LOG_DEBUG : AD_LOG_INFO, "%s: %s",
           jb->id, msg);
    json_object_set_new(ev, "data", data ? data : json_object());
    json_array_append(jb->events, ev);
    char *line = json_dumps(ev, JSON_COMPACT);
    json_decref(ev);
    pathf(path, sizeof(path), "%s/%s/events.jsonl", j->jobs_dir, jb->id);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0 && line) {
        size_t n = strlen(line);
        line[n] = '\n'; /* json_dumps' terminator, replaced: write n + 1 bytes */
        ssize_t w = write(fd, line, n + 1);
        (void)w; /* an event lost to a full disk is not worth failing the job */
    }
    if (fd >= 0)
        close(fd);
    free(line);
    pthread_cond_broadcast(&j->cond);
}

static void save_checkpoints(struct ad_jobs *j, struct job *jb)
{
    char path[4400];
    pathf(path, sizeof(path), "%s/%s/checkpoints.json", j->jobs_dir, jb->id);
    write_json(path, jb->checkpoints);
}

/* ==========================================================================================
 * Jobs: creation (the request's fields, OpenAI's and adapterd's) */

static int unknown_fields(json_t *obj, const char *const *known, const char *where,
                          struct ad_err *err)
{
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        bool ok = false;
        for (size_t i = 0; known[i] && !ok; i++)
            ok = !strcmp(k, known[i]);
        if (!ok)
            return ad_err_set(err, -EINVAL, "unknown field '%s%.60s'", where, k);
    }
    return 0;
}

/* A number field: absent or "auto" (the default), or a number in [lo, hi]; integer if asked. */
static int num_field(json_t *obj, const char *key, const char *where, double lo, double hi,
                     bool integer, double dflt, double *out, struct ad_err *err)
{
    json_t *v = json_object_get(obj, key);
    *out = dflt;
    if (!v || json_is_null(v) || (json_is_string(v) && !strcmp(json_string_value(v), "auto")))
        return 0;
    double x = json_number_value(v);
    if (!json_is_number(v) || !(x >= lo && x <= hi) || (integer && x != floor(x)))
        return ad_err_set(err, -EINVAL, "'%s%s' must be %s%s in [%g, %g]", where, key,
                          integer ? "an integer" : "a number",
                          json_is_string(v) ? " or \"auto\"" : "", lo, hi);
    *out = x;
    return 0;
}

/* The adapter config a job trains: adapterd's shorthand kind (adapter), then the fields of
 * adapter_config over it. NULL config text: full fine-tuning. */
static int adapter_config(const struct ad_model *m, json_t *sup, char **ret_text,
                          double *ret_lr, struct ad_err *err)
{
    const char *kind = json_string_value(json_object_get(sup, "adapter"));
    json_t *given = json_object_get(sup, "adapter_config");
    bool gpt2 = m->cfg.family == AD_FAMILY_GPT2;
    json_t *cfg = NULL;
    double lr = 2e-4;
    if (json_object_get(sup, "adapter") && !kind)
        return ad_err_set(err, -EINVAL, "'method.supervised.adapter' must be a string");
    if (given && !json_is_object(given))
        return ad_err_set(err, -EINVAL, "'method.supervised.adapter_config' must be an object");
    const char *pt = json_string_value(json_object_get(given, "peft_type"));
    if (!kind && pt && !strcmp(pt, "FULL"))
        kind = "full";
    if (!kind && (!given || !json_object_get(given, "peft_type")))
        kind = "lora"; /* LoRA rank 16 on every projection (what a config without a type adds to) */
    json_t *all = gpt2 ? json_pack("[s, s, s]", "c_attn", "c_proj", "c_fc")
                       : json_pack("[s, s, s, s, s, s, s]", "q_proj", "k_proj", "v_proj",
                                   "o_proj", "gate_proj", "up_proj", "down_proj");
    if (!kind) {
        cfg = json_object();
    } else if (!strcmp(kind, "lora") || !strcmp(kind, "dora") || !strcmp(kind, "rslora")) {
        cfg = json_pack("{s:s, s:i, s:i, s:f, s:O, s:b, s:b}", "peft_type", "LORA", "r", 16,
                        "lora_alpha", 32, "lora_dropout", strcmp(kind, "dora") ? 0.05 : 0.0,
                        "target_modules", all, "use_dora", !strcmp(kind, "dora"), "use_rslora",
                        !strcmp(kind, "rslora"));
    } else if (!strcmp(kind, "ia3")) {
        cfg = json_pack("{s:s}", "peft_type", "IA3");
        lr = 3e-3;
    } else if (!strcmp(kind, "prefix")) {
        cfg = json_pack("{s:s, s:i}", "peft_type", "PREFIX_TUNING", "num_virtual_tokens", 16);
        lr = 1e-2;
    } else if (!strcmp(kind, "prompt")) {
        cfg = json_pack("{s:s, s:i}", "peft_type", "PROMPT_TUNING", "num_virtual_tokens", 16);
        lr = 3e-2;
    } else if (!strcmp(kind, "bitfit")) {
        cfg = json_pack("{s:s}", "peft_type", "BITFIT");
        lr = 1e-3;
    } else if (!strcmp(kind, "houlsby") || !strcmp(kind, "pfeiffer")) {
        cfg = json_pack("{s:s, s:s, s:i}", "peft_type", "BOTTLENECK", "preset", kind,
                        "reduction_factor", 16);
        lr = 1e-3;
    } else if (!strcmp(kind, "full")) {
        json_decref(all);
        if (given && json_object_size(given) > (pt ? 1u : 0u))
            return ad_err_set(err, -EINVAL, "'method.supervised.adapter_config' of full "
                              "fine-tuning takes no field but peft_type FULL");
        *ret_text = NULL;
        *ret_lr = 1e-5;
        return 0;
    } else {
        json_decref(all);
        return ad_err_set(err, -EINVAL, "'method.supervised.adapter' must be lora, dora, rslora, "
                          "ia3, prefix, prompt, bitfit, houlsby, pfeiffer or full");
    }
    json_decref(all);
    if (given)
        json_object_update(cfg, given);
    pt = json_string_value(json_object_get(cfg, "peft_type"));
    if (pt && !strcmp(pt, "IA3"))
        lr = 3e-3;
    else if (pt && !strcmp(pt, "PREFIX_TUNING"))
        lr = 1e-2;
    else if (pt && !strcmp(pt, "PROMPT_TUNING"))
        lr = 3e-2;
    json_object_set_new(cfg, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(cfg, "base_model_name_or_path", json_string(m->id));
    *ret_text = json_dumps(cfg, JSON_COMPACT | JSON_SORT_KEYS);
    json_object_set_new(sup, "adapter_config", cfg); /* resolved, as the job shows it */
    *ret_lr = lr;
    return *ret_text ? 0 : ad_err_set(err, -ENOMEM, "out of memory");
}

/* The trainer's options of a job (its resolved method). */
static int train_opts(const struct ad_jobs *j, json_t *job, struct ad_train_opts *o,
                      int *ret_max_len, int *ret_ckpt, struct ad_err *err)
{
    json_t *sup = json_object_get(json_object_get(job, "method"), "supervised");
    json_t *hp = json_object_get(sup, "hyperparameters");
    ad_train_opts_default(o);
    o->n_epochs = (int)json_integer_value(json_object_get(hp, "n_epochs"));
    o->batch_size = (int)json_integer_value(json_object_get(hp, "batch_size"));
    o->lr = json_number_value(json_object_get(sup, "learning_rate"));
    o->seed = (uint64_t)json_integer_value(json_object_get(job, "seed"));
    o->warmup_steps = (int)json_integer_value(json_object_get(sup, "warmup_steps"));
    o->warmup_ratio = json_number_value(json_object_get(sup, "warmup_ratio"));
    o->weight_decay = json_number_value(json_object_get(sup, "weight_decay"));
    o->max_grad_norm = json_number_value(json_object_get(sup, "max_grad_norm"));
    o->grad_accum = (int)json_integer_value(json_object_get(sup, "gradient_accumulation_steps"));
    o->eval_every = (int)json_integer_value(json_object_get(sup, "eval_every"));
    const char *sch = json_string_value(json_object_get(sup, "lr_scheduler"));
    const char *opt = json_string_value(json_object_get(sup, "optimizer"));
    o->schedule = sch && !strcmp(sch, "linear")     ? AD_SCHED_LINEAR
                  : sch && !strcmp(sch, "constant") ? AD_SCHED_CONSTANT
                                                    : AD_SCHED_COSINE;
    o->optimizer = opt && !strcmp(opt, "sgd") ? AD_OPT_SGD : AD_OPT_ADAMW;
    json_t *ct = json_object_get(sup, "child_tuning");
    if (json_is_object(ct)) {
        const char *mode = json_string_value(json_object_get(ct, "mode"));
        o->child = mode && !strcmp(mode, "D") ? AD_CHILD_D : AD_CHILD_F;
        o->reserve_p = json_number_value(json_object_get(ct, "reserve_p"));
    }
    o->threads = j->cfg.threads;
    o->activation_bytes = j->cfg.activation_bytes;
    o->base_dir = j->cfg.model_dir;
    o->full_as_adapter = true;
    *ret_max_len = (int)json_integer_value(json_object_get(sup, "max_seq_len"));
    *ret_ckpt = (int)json_integer_value(json_object_get(sup, "checkpoint_every"));
    (void)err;
    return 0;
}

static const char *const top_fields[] = {"model", "training_file", "validation_file", "suffix",
                                         "seed", "metadata", "method", "hyperparameters",
                                         "integrations", NULL};
static const char *const sup_fields[] = {
    "hyperparameters", "adapter", "adapter_config", "learning_rate", "warmup_steps",
    "warmup_ratio", "lr_scheduler", "weight_decay", "max_grad_norm",
    "gradient_accumulation_steps", "max_seq_len", "optimizer", "child_tuning", "eval_every",
    "checkpoint_every", NULL};
static const char *const hp_fields[] = {"n_epochs", "batch_size", "learning_rate_multiplier",
                                        NULL};

static int file_lines(struct ad_jobs *j, const char *id, const char *field, size_t *ret,
                      struct ad_err *err)
{
    json_t *o;
    if (ad_files_get(j, id, &o, NULL) < 0)
        return ad_err_set(err, -EINVAL, "'%s': no file '%.40s'", field, id);
    *ret = (size_t)json_integer_value(json_object_get(o, "lines"));
    json_decref(o);
    return 0;
}

/* Validates the request and builds the job object. The lock is not held. */
static int build_job(struct ad_jobs *j, json_t *req, json_t **ret, struct ad_err *err)
{
    const struct ad_model *m = j->cfg.model;
    int r;
    if ((r = unknown_fields(req, top_fields, "", err)) < 0)
        return r;
    json_t *integ = json_object_get(req, "integrations");
    if (integ && !json_is_null(integ) && !(json_is_array(integ) && !json_array_size(integ)))
        return ad_err_set(err, -EINVAL, "'integrations' are not supported");
    const char *model = json_string_value(json_object_get(req, "model"));
    const char *tf = json_string_value(json_object_get(req, "training_file"));
    json_t *vfj = json_object_get(req, "validation_file");
    const char *vf = json_string_value(vfj);
    if (!model)
        return ad_err_set(err, -EINVAL, "'model' is a required string (the base's id, or an "
                          "adapter to continue)");
    if (!tf)
        return ad_err_set(err, -EINVAL, "'training_file' is a required string (a file id)");
    if (vfj && !json_is_null(vfj) && !vf)
        return ad_err_set(err, -EINVAL, "'validation_file' must be a file id");
    size_t n_train, n_valid;
    if ((r = file_lines(j, tf, "training_file", &n_train, err)) < 0 ||
        (vf && (r = file_lines(j, vf, "validation_file", &n_valid, err)) < 0))
        return r;
    bool cont = strcmp(model, m->id) != 0;
    if (cont && !ad_registry_name_ok(model))
        return ad_err_set(err, -EINVAL, "'model' must be '%s' or an adapter's name", m->id);
    if (cont) {
        struct ad_adapter *a;
        if (ad_registry_get(j->cfg.registry, model, &a, err) < 0)
            return ad_err_set(err, -EINVAL, "'model': no adapter '%.64s' to continue (and not "
                              "the base, '%s')", model, m->id);
        ad_adapter_unref(a);
    }
    json_t *suffix = json_object_get(req, "suffix");
    if (suffix && !json_is_null(suffix) &&
        (!json_is_string(suffix) || !ad_registry_name_ok(json_string_value(suffix)) ||
         json_string_length(suffix) > MAX_SUFFIX))
        return ad_err_set(err, -EINVAL, "'suffix' must be a valid adapter name of at most %d "
                          "characters (A-Z a-z 0-9 . _ -, not starting with '.')", MAX_SUFFIX);
    json_t *meta = json_object_get(req, "metadata");
    if (meta && !json_is_null(meta)) {
        const char *k;
        json_t *v;
        if (!json_is_object(meta) || json_object_size(meta) > 16)
            return ad_err_set(err, -EINVAL, "'metadata' must be an object of at most 16 strings");
        json_object_foreach(meta, k, v)
            if (!json_is_string(v) || strlen(k) > 64 || json_string_length(v) > 512)
                return ad_err_set(err, -EINVAL, "'metadata.%.64s' must be a string of at most "
                                  "512 characters (keys at most 64)", k);
    }
    double seed;
    unsigned long long rnd = ad_splitmix64((unsigned long long)time(NULL) ^ (uintptr_t)req);
    if ((r = num_field(req, "seed", "", 0, 2147483647, true, (double)(rnd % 2147483647), &seed,
                       err)) < 0)
        return r;

    /* method (or the legacy top-level hyperparameters) */
    json_t *method = json_deep_copy(json_object_get(req, "method"));
    if (!method)
        method = json_pack("{s:s, s:{}}", "type", "supervised", "supervised");
    if (!json_is_object(method)) {
        json_decref(method);
        return ad_err_set(err, -EINVAL, "'method' must be an object");
    }
    const char *type = json_string_value(json_object_get(method, "type"));
    json_t *sup = json_object_get(method, "supervised");
    r = 0;
    if (!type || strcmp(type, "supervised"))
        r = ad_err_set(err, -EINVAL, "'method.type' must be \"supervised\" (%s is not supported)",
                       type ? type : "none given");
    else if ((r = unknown_fields(method, (const char *const[]){"type", "supervised", NULL},
                                 "method.", err)) < 0)
        ;
    else if (sup && !json_is_object(sup))
        r = ad_err_set(err, -EINVAL, "'method.supervised' must be an object");
    if (r >= 0 && !sup) {
        sup = json_object();
        json_object_set_new(method, "supervised", sup);
    }
    if (r >= 0)
        r = unknown_fields(sup, sup_fields, "method.supervised.", err);
    json_t *hp = r >= 0 ? json_object_get(sup, "hyperparameters") : NULL;
    json_t *legacy = json_object_get(req, "hyperparameters");
    if (r >= 0 && !hp && legacy)
        json_object_set(sup, "hyperparameters", hp = legacy);
    if (r >= 0 && hp && !json_is_object(hp))
        r = ad_err_set(err, -EINVAL, "'hyperparameters' must be an object");
    if (r >= 0 && hp)
        r = unknown_fields(hp, hp_fields, "method.supervised.hyperparameters.", err);
    char *cfg_text = NULL;
    double base_lr = 2e-4, epochs, batch, mult, lr, warm_steps, warm_ratio, wd, clip, accum,
           max_len, every, ckpt;
    const char *hw = "method.supervised.hyperparameters.", *sw = "method.supervised.";
    if (r >= 0 && !cont)
        r = adapter_config(m, sup, &cfg_text, &base_lr, err);
    if (r >= 0 && cont) { /* continue an adapter: its own config */
        if (json_object_get(sup, "adapter") || json_object_get(sup, "adapter_config"))
            r = ad_err_set(err, -EINVAL, "'method.supervised.adapter_config': continuing "
                           "adapter '%s' trains its own config", model);
    }
    if (r >= 0 && json_is_number(json_object_get(hp, "learning_rate_multiplier")) &&
        json_is_number(json_object_get(sup, "learning_rate")))
        r = ad_err_set(err, -EINVAL, "give 'method.supervised.learning_rate' or "
                       "'method.supervised.hyperparameters.learning_rate_multiplier' (of the "
                       "kind's default rate), not both");
    if (r >= 0 && (r = num_field(hp, "n_epochs", hw, 1, 100, true, 3, &epochs, err)) >= 0 &&
        (r = num_field(hp, "batch_size", hw, 1, 256, true,
                       (double)(n_train < 8 ? n_train : 8), &batch, err)) >= 0 &&
        (r = num_field(hp, "learning_rate_multiplier", hw, 1e-6, 1e3, false, 1, &mult,
                       err)) >= 0 &&
        (r = num_field(sup, "learning_rate", sw, 1e-9, 10, false, base_lr * mult, &lr,
                       err)) >= 0 &&
        (r = num_field(sup, "warmup_steps", sw, 0, 1e7, true, 0, &warm_steps, err)) >= 0 &&
        (r = num_field(sup, "warmup_ratio", sw, 0, 0.999, false, 0, &warm_ratio, err)) >= 0 &&
        (r = num_field(sup, "weight_decay", sw, 0, 10, false, 0, &wd, err)) >= 0 &&
        (r = num_field(sup, "max_grad_norm", sw, 0, 1e6, false, 1, &clip, err)) >= 0 &&
        (r = num_field(sup, "gradient_accumulation_steps", sw, 1, 1024, true, 1, &accum,
                       err)) >= 0 &&
        (r = num_field(sup, "max_seq_len", sw, 8, m->cfg.n_ctx_max, true,
                       m->cfg.n_ctx_max < 1024 ? m->cfg.n_ctx_max : 1024, &max_len, err)) >= 0 &&
        (r = num_field(sup, "eval_every", sw, 0, 1e7, true, 0, &every, err)) >= 0 &&
        (r = num_field(sup, "checkpoint_every", sw, 0, 1e7, true, 0, &ckpt, err)) >= 0) {
        const char *sch = json_string_value(json_object_get(sup, "lr_scheduler"));
        const char *opt = json_string_value(json_object_get(sup, "optimizer"));
        json_t *schj = json_object_get(sup, "lr_scheduler"), *optj = json_object_get(sup, "optimizer");
        if ((schj && (!sch || (strcmp(sch, "cosine") && strcmp(sch, "linear") &&
                               strcmp(sch, "constant")))))
            r = ad_err_set(err, -EINVAL, "'method.supervised.lr_scheduler' must be cosine, "
                           "linear or constant");
        else if (optj && (!opt || (strcmp(opt, "adamw") && strcmp(opt, "sgd"))))
            r = ad_err_set(err, -EINVAL, "'method.supervised.optimizer' must be adamw or sgd");
        json_t *ct = json_object_get(sup, "child_tuning");
        if (r >= 0 && ct && !json_is_null(ct)) {
            const char *mode = json_string_value(json_object_get(ct, "mode"));
            double rp;
            if (!json_is_object(ct) || !mode || (strcmp(mode, "F") && strcmp(mode, "D")))
                r = ad_err_set(err, -EINVAL, "'method.supervised.child_tuning' must be {\"mode\": "
                               "\"F\" or \"D\", \"reserve_p\"}");
            else if ((r = unknown_fields(ct, (const char *const[]){"mode", "reserve_p", NULL},
                                         "method.supervised.child_tuning.", err)) >= 0 &&
                     (r = num_field(ct, "reserve_p", "method.supervised.child_tuning.", 1e-4, 1,
                                    false, 0.3, &rp, err)) >= 0)
                json_object_set_new(ct, "reserve_p", json_real(rp));
        }
        if (r >= 0) {
            json_object_set_new(sup, "hyperparameters",
                                json_pack("{s:i, s:i, s:f}", "n_epochs", (int)epochs,
                                          "batch_size", (int)batch, "learning_rate_multiplier",
                                          mult));
            json_object_set_new(sup, "learning_rate", json_real(lr));
            json_object_set_new(sup, "warmup_steps", json_integer((json_int_t)warm_steps));
            json_object_set_new(sup, "warmup_ratio", json_real(warm_ratio));
            json_object_set_new(sup, "weight_decay", json_real(wd));
            json_object_set_new(sup, "max_grad_norm", json_real(clip));
            json_object_set_new(sup, "gradient_accumulation_steps",
                                json_integer((json_int_t)accum));
            json_object_set_new(sup, "max_seq_len", json_integer((json_int_t)max_len));
            json_object_set_new(sup, "eval_every", json_integer((json_int_t)every));
            json_object_set_new(sup, "checkpoint_every", json_integer((json_int_t)ckpt));
            json_object_set_new(sup, "lr_scheduler", json_string(sch ? sch : "cosine"));
            json_object_set_new(sup, "optimizer", json_string(opt ? opt : "adamw"));
        }
    }
    /* a config the trainer refuses is the client's error now, not the job's later */
    if (r >= 0 && cfg_text) {
        struct ad_trainable *t;
        r = ad_trainable_new(m, cfg_text, 1, (const int32_t[]){0}, 1, &t, err);
        if (r < 0)
            ad_err_prefix(err, "'method.supervised.adapter_config'");
        else
            ad_trainable_free(t);
    }
    free(cfg_text);
    if (r < 0) {
        json_decref(method);
        return r;
    }
    char id[40];
    new_id(id, sizeof(id), "ftjob");
    json_t *hpr = json_object_get(sup, "hyperparameters");
    json_t *job = json_pack(
        "{s:s, s:s, s:I, s:n, s:s, s:n, s:s, s:s, s:O, s:s, s:o, s:[], s:n, s:I, s:I, s:o, s:n, "
        "s:n, s:o}",
        "id", id, "object", "fine_tuning.job", "created_at", (json_int_t)time(NULL),
        "finished_at", "model", model, "fine_tuned_model", "organization_id", "adapterd",
        "status", "validating_files", "hyperparameters", hpr, "training_file", tf,
        "validation_file", vf ? json_string(vf) : json_null(), "result_files", "error",
        "trained_tokens", (json_int_t)0, "seed", (json_int_t)seed, "method", method,
        "estimated_finish", "integrations", "metadata",
        meta && !json_is_null(meta) ? json_deep_copy(meta) : json_null());
    if (!job)
        return ad_err_set(err, -ENOMEM, "out of memory");
    json_object_set_new(job, "user_provided_suffix", suffix && json_is_string(suffix)
                                                         ? json_copy(suffix) : json_null());
    *ret = job;
    return 0;
}

/* The name a job's adapter gets. */
static void result_name(const struct job *jb, char *buf, size_t size)
{
    const char *suffix = json_string_value(json_object_get(jb->obj, "user_provided_suffix"));
    if (suffix)
        snprintf(buf, size, "%s", suffix);
    else
        snprintf(buf, size, "ft-%s", jb->id + 6); /* ft- and the job id's hex */
}

/* Whether a job may make adapters named name and name-step-N: none exists (a job never
 * replaces an adapter it did not make). Returns 0 or -EEXIST. */
static int name_free(struct ad_jobs *j, const char *name, struct ad_err *err)
{
    struct ad_registry_info *info;
    size_t n, len = strlen(name);
    int r = 0;
    if (ad_registry_list(j->cfg.registry, &info, &n) < 0)
        return ad_err_set(err, -ENOMEM, "out of memory");
    for (size_t i = 0; i < n && r == 0; i++)
        if (!strcmp(info[i].name, name) ||
            (!strncmp(info[i].name, name, len) && !strncmp(info[i].name + len, "-step-", 6)))
            r = ad_err_set(err, -EEXIST, "'suffix': adapter '%s' exists (delete it, or choose "
                           "another suffix)", info[i].name);
    free(info);
    return r;
}

int ad_jobs_create(struct ad_jobs *j, json_t *req, json_t **ret, struct ad_err *err)
{
    json_t *obj = NULL;
    int r = build_job(j, req, &obj, err);
    if (r < 0)
        return r;
    struct job *jb = calloc(1, sizeof(*jb));
    if (!jb) {
        json_decref(obj);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    snprintf(jb->id, sizeof(jb->id), "%s", json_string_value(json_object_get(obj, "id")));
    jb->obj = obj;
    jb->events = json_array();
    jb->checkpoints = json_array();
    jb->status = S_VALIDATING;
    jb->loss = NAN;
    char name[80], dir[4400];
    result_name(jb, name, sizeof(name));
    r = name_free(j, name, err);
    pthread_mutex_lock(&j->lock);
    for (size_t i = 0; i < j->n_jobs && r == 0; i++) {
        char other[80];
        result_name(j->job[i], other, sizeof(other));
        if (job_active(j->job[i]) && !strcmp(other, name))
            r = ad_err_set(err, -EEXIST, "'suffix': job '%s' is making '%s' already",
                           j->job[i]->id, name);
    }
    if (r == 0 && j->n_jobs == j->cap_jobs) {
        size_t cap = j->cap_jobs ? 2 * j->cap_jobs : 16;
        struct job **p = realloc(j->job, cap * sizeof(*p));
        if (!p)
            r = ad_err_set(err, -ENOMEM, "out of memory");
        else {
            j->job = p;
            j->cap_jobs = cap;
        }
    }
    job_dir(j, jb, dir, sizeof(dir));
    if (r == 0 && mkdir(dir, 0755) < 0)
        r = ad_err_set(err, -EIO, "cannot store the job: %s", strerror(errno));
    if (r == 0) {
        j->job[j->n_jobs++] = jb;
        set_status(j, jb, S_VALIDATING);
        add_event(j, jb, "info", "Validating training file", NULL);
        save_checkpoints(j, jb);
        set_status(j, jb, S_QUEUED); /* the files were checked as they were uploaded */
        add_event(j, jb, "info", "Files validated, the job is queued", NULL);
        *ret = json_incref(jb->obj);
    }
    pthread_mutex_unlock(&j->lock);
    if (r < 0) {
        json_decref(jb->obj);
        json_decref(jb->events);
        json_decref(jb->checkpoints);
        free(jb);
    }
    return r;
}

/* ==========================================================================================
 * Jobs: queries and control */

static int lookup(struct ad_jobs *j, const char *id, struct job **ret, struct ad_err *err)
{
    struct job *jb = id_ok(id, "ftjob") ? find_job(j, id) : NULL;
    if (!jb)
        return ad_err_set(err, -ENOENT, "no fine-tuning job '%.40s'", id);
    *ret = jb;
    return 0;
}

/* A page of arr (oldest first) newest first, after the element whose id is `after`. */
static json_t *page(json_t *arr, const char *after, int limit)
{
    json_t *data = json_array();
    size_t n = json_array_size(arr);
    ssize_t i = (ssize_t)n - 1;
    if (after)
        for (; i >= 0; i--)
            if (!strcmp(json_string_value(json_object_get(json_array_get(arr, (size_t)i), "id")),
                        after)) {
                i--;
                break;
            }
    for (; i >= 0 && (int)json_array_size(data) < limit; i--)
        json_array_append(data, json_array_get(arr, (size_t)i));
    return json_pack("{s:s, s:o, s:b}", "object", "list", "data", data, "has_more", i >= 0);
}

static int clamp_limit(int limit)
{
    return limit <= 0 ? 20 : limit > 100 ? 100 : limit;
}

int ad_jobs_list(struct ad_jobs *j, const char *after, int limit, json_t **ret,
                 struct ad_err *err)
{
    (void)err;
    pthread_mutex_lock(&j->lock);
    json_t *arr = json_array();
    for (size_t i = 0; i < j->n_jobs; i++)
        json_array_append(arr, j->job[i]->obj);
    *ret = page(arr, after, clamp_limit(limit));
    pthread_mutex_unlock(&j->lock);
    json_decref(arr);
    return 0;
}

int ad_jobs_get(struct ad_jobs *j, const char *id, json_t **ret, struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0)
        *ret = json_deep_copy(jb->obj);
    pthread_mutex_unlock(&j->lock);
    return r;
}

int ad_jobs_events(struct ad_jobs *j, const char *id, const char *after, int limit, json_t **ret,
                   struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0)
        *ret = page(jb->events, after, clamp_limit(limit));
    pthread_mutex_unlock(&j->lock);
    return r;
}

int ad_jobs_checkpoints(struct ad_jobs *j, const char *id, const char *after, int limit,
                        json_t **ret, struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0)
        *ret = page(jb->checkpoints, after, clamp_limit(limit));
    pthread_mutex_unlock(&j->lock);
    return r;
}

int ad_jobs_follow(struct ad_jobs *j, const char *id, size_t seq, double timeout, json_t **ret,
                   bool *ret_done, struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0 && json_array_size(jb->events) <= seq && job_active(jb) && !j->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long ns = ts.tv_nsec + (long)(timeout * 1e9);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        pthread_cond_timedwait(&j->cond, &j->lock, &ts);
    }
    if (r == 0) {
        json_t *out = json_array();
        for (size_t i = seq; i < json_array_size(jb->events); i++)
            json_array_append(out, json_array_get(jb->events, i));
        *ret = out;
        *ret_done = !job_active(jb) && json_array_size(jb->events) <= seq + json_array_size(out);
    }
    pthread_mutex_unlock(&j->lock);
    return r;
}

/* Removes a job's checkpoints and the adapters they were served as (the lock not held). */
static void drop_checkpoints(struct ad_jobs *j, const char *job_id, json_t *ckpts)
{
    char dir[4400];
    size_t i;
    json_t *c;
    json_array_foreach(ckpts, i, c) {
        const char *name = json_string_value(json_object_get(c, "fine_tuned_model_checkpoint"));
        if (name)
            ad_registry_delete(j->cfg.registry, name, NULL);
    }
    pathf(dir, sizeof(dir), "%s/%s/checkpoints", j->jobs_dir, job_id);
    ad_rm_rf(dir);
}

int ad_jobs_cancel(struct ad_jobs *j, const char *id, json_t **ret, struct ad_err *err)
{
    struct job *jb;
    json_t *ckpts = NULL;
    bool running = false;
    /* at once, even for a running job: its worker stops after the step it is in (which, at
     * idle priority on a busy server, may take a while) and then removes what it wrote */
    pthread_mutex_lock(&j->install_lock);
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0 && !job_active(jb))
        r = ad_err_set(err, -EINVAL, "job '%s' has ended (%s): nothing to cancel", id,
                       ad_job_status_names[jb->status]);
    if (r == 0) {
        running = jb->status == S_RUNNING;
        jb->cancel = running;
        jb->pause = false;
        set_status(j, jb, S_CANCELLED);
        add_event(j, jb, "info", "The job was cancelled", NULL);
        ckpts = json_incref(jb->checkpoints);
        *ret = json_deep_copy(jb->obj);
    }
    pthread_mutex_unlock(&j->lock);
    size_t i;
    json_t *c;
    if (running) /* the adapters now; the files when the worker is done with them */
        json_array_foreach(ckpts, i, c)
            ad_registry_delete(j->cfg.registry, json_string_value(json_object_get(
                                   c, "fine_tuned_model_checkpoint")), NULL);
    else if (ckpts)
        drop_checkpoints(j, id, ckpts);
    if (r == 0) { /* a cancelled job has none */
        pthread_mutex_lock(&j->lock);
        json_array_clear(jb->checkpoints);
        save_checkpoints(j, jb);
        pthread_mutex_unlock(&j->lock);
    }
    pthread_mutex_unlock(&j->install_lock);
    json_decref(ckpts);
    return r;
}

int ad_jobs_pause(struct ad_jobs *j, const char *id, json_t **ret, struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    if (r == 0 && jb->status != S_RUNNING && jb->status != S_QUEUED)
        r = ad_err_set(err, -EINVAL, "job '%s' is %s: only a queued or running job pauses", id,
                       ad_job_status_names[jb->status]);
    if (r == 0 && jb->status == S_RUNNING) { /* paused (and checkpointed) after its step */
        jb->pause = true;
    } else if (r == 0) {
        set_status(j, jb, S_PAUSED);
        add_event(j, jb, "info", "The job was paused", NULL);
    }
    if (r == 0)
        *ret = json_deep_copy(jb->obj);
    pthread_mutex_unlock(&j->lock);
    return r;
}

int ad_jobs_resume(struct ad_jobs *j, const char *id, json_t **ret, struct ad_err *err)
{
    struct job *jb;
    pthread_mutex_lock(&j->lock);
    int r = lookup(j, id, &jb, err);
    bool pausing = r == 0 && jb->status == S_RUNNING && jb->pause;
    if (r == 0 && jb->status != S_PAUSED && !pausing)
        r = ad_err_set(err, -EINVAL, "job '%s' is %s: only a paused job resumes", id,
                       ad_job_status_names[jb->status]);
    if (r == 0 && pausing) { /* before the pause took effect: it goes on */
        jb->pause = false;
        add_event(j, jb, "info", "The pause was called off", NULL);
    } else if (r == 0) {
        set_status(j, jb, S_QUEUED);
        add_event(j, jb, "info", "The job was resumed and is queued", NULL);
    }
    if (r == 0)
        *ret = json_deep_copy(jb->obj);
    pthread_mutex_unlock(&j->lock);
    return r;
}

void ad_jobs_stats(struct ad_jobs *j, struct ad_jobs_stats *ret)
{
    memset(ret, 0, sizeof(*ret));
    ret->loss = NAN;
    pthread_mutex_lock(&j->lock);
    for (size_t i = 0; i < j->n_jobs; i++) {
        const struct job *jb = j->job[i];
        ret->by_status[jb->status]++;
        if (jb->status == S_RUNNING) {
            ret->tokens_per_s = jb->tokens_per_s;
            ret->loss = jb->loss;
        }
    }
    ret->trained_tokens = j->trained_tokens;
    pthread_mutex_unlock(&j->lock);
}

/* ==========================================================================================
 * The worker */

/* Installs what the trainer would save under name, through the registry's staging. */
/* ==========================================================================================
 * The idle runner: one thread at SCHED_IDLE runs the trainer's computations (tokenizing the
 * data, steps, checkpoints, saving) while the worker, at normal priority, waits for each. The
 * runner takes no lock but idle_lock, which only the worker shares with it: so no request
 * ever waits on a lock held by a thread the kernel runs only on cores serving leaves idle.
 * The training pool's threads are created by the runner (in its first step) and inherit its
 * policy. */

enum idle_op { OP_LOAD, OP_NEW, OP_INIT_FROM, OP_RESUME, OP_STEP, OP_CHECKPOINT, OP_SAVE };

struct idle_call {
    enum idle_op op;
    const char *path; /* LOAD: the data; INIT_FROM, RESUME, CHECKPOINT, SAVE: the directory */
    const struct ad_tokenizer *tok;     /* LOAD */
    const struct ad_data_opts *dopt;    /* LOAD */
    struct ad_dataset **ds;             /* LOAD */
    const struct ad_model *m;           /* NEW */
    const struct ad_train_opts *o;      /* NEW */
    const struct ad_dataset *train, *valid; /* NEW */
    struct ad_trainer **t;              /* NEW: the result; the others: the trainer */
    struct ad_train_progress *p;        /* STEP */
    int rc;
    struct ad_err err;
};

static int idle_exec(struct idle_call *c)
{
    switch (c->op) {
    case OP_LOAD: return ad_dataset_load(c->path, c->tok, c->dopt, c->ds, &c->err);
    case OP_NEW: return ad_trainer_new(c->m, c->o, c->train, c->valid, c->t, &c->err);
    case OP_INIT_FROM: return ad_trainer_init_from(*c->t, c->path, &c->err);
    case OP_RESUME: return ad_trainer_resume(*c->t, c->path, &c->err);
    case OP_STEP: return ad_trainer_step(*c->t, c->p, &c->err);
    case OP_CHECKPOINT: return ad_trainer_checkpoint(*c->t, c->path, &c->err);
    case OP_SAVE: return ad_trainer_save(*c->t, c->path, &c->err);
    }
    return -EINVAL;
}

static void *idle_runner(void *arg)
{
    struct ad_jobs *j = arg;
    struct sched_param sp = {0};
    int e = pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    if (e)
        log_warn("fine-tuning: cannot run at idle priority (%s): jobs compete with serving",
                 strerror(e));
    pthread_mutex_lock(&j->idle_lock);
    for (;;) {
        while (!j->idle_call && !j->idle_quit)
            pthread_cond_wait(&j->idle_cond, &j->idle_lock);
        struct idle_call *c = j->idle_call;
        if (!c)
            break;
        pthread_mutex_unlock(&j->idle_lock);
        c->rc = idle_exec(c);
        pthread_mutex_lock(&j->idle_lock);
        j->idle_call = NULL;
        pthread_cond_broadcast(&j->idle_cond);
    }
    pthread_mutex_unlock(&j->idle_lock);
    return NULL;
}

/* Runs c on the idle runner and waits for it; its error into err. */
static int idle_run(struct ad_jobs *j, struct idle_call *c, struct ad_err *err)
{
    pthread_mutex_lock(&j->idle_lock);
    while (j->idle_call) /* never: the worker is the only caller */
        pthread_cond_wait(&j->idle_cond, &j->idle_lock);
    j->idle_call = c;
    pthread_cond_broadcast(&j->idle_cond);
    while (j->idle_call == c)
        pthread_cond_wait(&j->idle_cond, &j->idle_lock);
    pthread_mutex_unlock(&j->idle_lock);
    if (c->rc < 0 && err)
        *err = c->err;
    return c->rc;
}

static int idle_load(struct ad_jobs *j, const char *path, const struct ad_data_opts *dopt,
                     struct ad_dataset **ds, struct ad_err *err)
{
    struct idle_call c = {.op = OP_LOAD, .path = path, .tok = j->cfg.tok, .dopt = dopt, .ds = ds};
    return idle_run(j, &c, err);
}

static int idle_on(struct ad_jobs *j, enum idle_op op, struct ad_trainer **t, const char *path,
                   struct ad_train_progress *p, struct ad_err *err)
{
    struct idle_call c = {.op = op, .t = t, .path = path, .p = p};
    return idle_run(j, &c, err);
}

/* Saves the trainer's adapter (on the idle runner) and installs it as name, unless the job has
 * been cancelled meanwhile; then, under install_lock still, done(j, jb, arg) if given (which
 * records it, j->lock taken by it). Returns 0, 1 (cancelled: nothing installed) or -errno. */
static int install(struct ad_jobs *j, struct job *jb, struct ad_trainer **t, const char *name,
                   void (*done)(struct ad_jobs *, struct job *, void *), void *arg,
                   struct ad_err *err)
{
    char stage[4096];
    bool created;
    int r = ad_registry_stage_dir(j->cfg.registry, stage, sizeof(stage), err);
    if (r < 0)
        return r;
    r = idle_on(j, OP_SAVE, t, stage, NULL, err);
    pthread_mutex_lock(&j->install_lock);
    pthread_mutex_lock(&j->lock);
    bool cancelled = jb->cancel;
    pthread_mutex_unlock(&j->lock);
    if (r < 0 || cancelled)
        ad_registry_unstage(j->cfg.registry, stage);
    else
        r = ad_registry_install(j->cfg.registry, name, stage, &created, err);
    if (r >= 0 && !cancelled && done)
        done(j, jb, arg);
    pthread_mutex_unlock(&j->install_lock);
    return r < 0 ? r : cancelled;
}

/* A checkpoint of the job at its step: the trainer's state in checkpoints/step-N (written as
 * step-N.tmp, then renamed), served as <name>-step-N, recorded. */
struct ckpt_done {
    const char *name;
    const struct ad_train_progress *p;
};

/* Records an installed checkpoint (install's done): the object, the file, the event. */
static void checkpoint_done(struct ad_jobs *j, struct job *jb, void *arg)
{
    const struct ckpt_done *d = arg;
    char id[40], msg[200];
    new_id(id, sizeof(id), "ftckpt");
    json_t *metrics = json_pack("{s:I, s:f}", "step", (json_int_t)d->p->step, "train_loss",
                                d->p->loss);
    if (!isnan(d->p->valid_loss))
        json_object_set_new(metrics, "valid_loss", json_real(d->p->valid_loss));
    json_t *c = json_pack("{s:s, s:s, s:I, s:s, s:I, s:o, s:s}", "id", id, "object",
                          "fine_tuning.job.checkpoint", "created_at", (json_int_t)time(NULL),
                          "fine_tuned_model_checkpoint", d->name, "step_number",
                          (json_int_t)d->p->step, "metrics", metrics, "fine_tuning_job_id",
                          jb->id);
    pthread_mutex_lock(&j->lock);
    json_array_append_new(jb->checkpoints, c);
    save_checkpoints(j, jb);
    snprintf(msg, sizeof(msg), "Checkpoint at step %lld: %s", (long long)d->p->step, d->name);
    add_event(j, jb, "info", msg, NULL);
    pthread_mutex_unlock(&j->lock);
}

/* Writes the trainer's state as checkpoints/step-N (atomically: written as .tmp, renamed) and
 * installs its adapter as <name>-step-N. Returns 0, 1 (the job was cancelled) or -errno. */
static int checkpoint(struct ad_jobs *j, struct job *jb, struct ad_trainer **t,
                      const struct ad_train_progress *p, const char *name, struct ad_err *err)
{
    char dir[4400], tmp[4500], ck[128];
    pathf(dir, sizeof(dir), "%s/%s/checkpoints", j->jobs_dir, jb->id);
    mkdir(dir, 0755);
    pathf(dir, sizeof(dir), "%s/%s/checkpoints/step-%lld", j->jobs_dir, jb->id,
             (long long)p->step);
    pathf(tmp, sizeof(tmp), "%s.tmp", dir);
    ad_rm_rf(tmp);
    ad_rm_rf(dir);
    if (mkdir(tmp, 0755) < 0)
        return ad_err_set(err, -EIO, "checkpoint: %s", strerror(errno));
    int r = idle_on(j, OP_CHECKPOINT, t, tmp, NULL, err);
    if (r >= 0 && rename(tmp, dir) < 0)
        r = ad_err_set(err, -EIO, "checkpoint: %s", strerror(errno));
    if (r < 0) {
        ad_rm_rf(tmp);
        return r;
    }
    pathf(ck, sizeof(ck), "%s-step-%lld", name, (long long)p->step);
    struct ckpt_done d = {.name = ck, .p = p};
    return install(j, jb, t, ck, checkpoint_done, &d, err);
}

/* The newest complete checkpoint of a job, into buf (step-N without .tmp). 0, or -ENOENT. */
static int last_checkpoint(struct ad_jobs *j, const struct job *jb, char *buf, size_t size,
                           long long *ret_step)
{
    char dir[4400];
    pathf(dir, sizeof(dir), "%s/%s/checkpoints", j->jobs_dir, jb->id);
    DIR *d = opendir(dir);
    struct dirent *de;
    long long best = -1;
    while (d && (de = readdir(d))) {
        char *end;
        if (strncmp(de->d_name, "step-", 5))
            continue;
        long long s = strtoll(de->d_name + 5, &end, 10);
        if (*end == '\0' && s > best)
            best = s;
    }
    if (d)
        closedir(d);
    if (best < 0)
        return -ENOENT;
    pathf(buf, size, "%s/step-%lld", dir, best);
    *ret_step = best;
    return 0;
}

static void fail_job(struct ad_jobs *j, struct job *jb, const char *code, const char *msg)
{
    pthread_mutex_lock(&j->lock);
    if (jb->cancel) { /* cancelled meanwhile: that is what it ended as */
        pthread_mutex_unlock(&j->lock);
        return;
    }
    json_object_set_new(jb->obj, "error", json_pack("{s:s, s:s, s:n}", "code", code, "message",
                                                    msg, "param"));
    set_status(j, jb, S_FAILED);
    add_event(j, jb, "error", msg, NULL);
    pthread_mutex_unlock(&j->lock);
}

/* Runs a job to its end, a pause, a cancel or the daemon's stop. */
static void run_job(struct ad_jobs *j, struct job *jb)
{
    struct ad_err err;
    struct ad_train_opts o;
    struct ad_dataset *train = NULL, *valid = NULL;
    struct ad_trainer *t = NULL;
    char path[4400], name[80], *cfg = NULL, ck[4400];
    int max_len, ckpt_every, r;
    pthread_mutex_lock(&j->lock);
    json_t *obj = json_deep_copy(jb->obj);
    pthread_mutex_unlock(&j->lock);
    result_name(jb, name, sizeof(name));
    train_opts(j, obj, &o, &max_len, &ckpt_every, &err);
    json_t *sup = json_object_get(json_object_get(obj, "method"), "supervised");
    json_t *ac = json_object_get(sup, "adapter_config");
    const char *model = json_string_value(json_object_get(obj, "model"));
    bool cont = strcmp(model, j->cfg.model->id) != 0;
    if (cont) { /* the adapter's own config */
        pathf(path, sizeof(path), "%s/%s/adapter_config.json", ad_registry_dir(j->cfg.registry),
                 model);
        if (ad_read_file(path, 1 << 20, &cfg, NULL, &err) < 0) {
            fail_job(j, jb, "invalid_model", "the adapter to continue is gone");
            goto out;
        }
    } else if (ac) {
        cfg = json_dumps(ac, JSON_COMPACT);
    }
    struct ad_data_opts dopt = {.max_seq_len = max_len};
    int32_t *ids = NULL;
    size_t n_ids = 0;
    json_t *cj = cfg ? json_loads(cfg, 0, NULL) : NULL;
    json_t *text = json_object_get(cj, "prompt_tuning_init_text");
    if (json_is_string(text) && j->cfg.tok)
        ad_tokenizer_encode(j->cfg.tok, json_string_value(text), json_string_length(text), true,
                            &ids, &n_ids, NULL);
    json_decref(cj);
    o.adapter_config = cfg;
    o.init_ids = ids;
    o.n_init_ids = (int)n_ids;
    r = ad_files_path(j, json_string_value(json_object_get(obj, "training_file")), path,
                      sizeof(path), &err);
    if (r >= 0)
        r = idle_load(j, path, &dopt, &train, &err);
    const char *vf = json_string_value(json_object_get(obj, "validation_file"));
    if (r >= 0 && vf && (r = ad_files_path(j, vf, path, sizeof(path), &err)) >= 0)
        r = idle_load(j, path, &dopt, &valid, &err);
    if (r < 0) {
        fail_job(j, jb, "invalid_training_file", err.msg);
        free(ids);
        goto out;
    }
    struct idle_call nc = {.op = OP_NEW, .m = j->cfg.model, .o = &o, .train = train,
                           .valid = valid, .t = &t};
    r = idle_run(j, &nc, &err);
    free(ids);
    if (r >= 0 && cont) {
        pathf(path, sizeof(path), "%s/%s", ad_registry_dir(j->cfg.registry), model);
        r = idle_on(j, OP_INIT_FROM, &t, path, NULL, &err);
    }
    long long from = 0;
    bool resumed = r >= 0 && last_checkpoint(j, jb, ck, sizeof(ck), &from) == 0;
    if (resumed)
        r = idle_on(j, OP_RESUME, &t, ck, NULL, &err);
    if (r < 0) {
        fail_job(j, jb, "training_error", err.msg);
        goto out;
    }
    struct ad_train_progress p;
    ad_trainer_progress(t, &p);
    if (ckpt_every <= 0) /* each epoch */
        ckpt_every = (int)(p.total_steps / (o.n_epochs > 0 ? o.n_epochs : 1));
    pthread_mutex_lock(&j->lock);
    char msg[256];
    snprintf(msg, sizeof(msg), resumed ? "Fine-tuning job resumed at step %lld of %lld"
                                       : "Fine-tuning job started: %lld of %lld steps",
             (long long)p.step, (long long)p.total_steps);
    add_event(j, jb, "info", msg, NULL);
    pthread_mutex_unlock(&j->lock);

    enum { GO, PAUSE, CANCEL, STOP } why = GO;
    while (why == GO) {
        r = idle_on(j, OP_STEP, &t, NULL, &p, &err);
        if (r < 0) {
            fail_job(j, jb, "training_error", err.msg);
            goto out;
        }
        double tps = p.seconds > 0 ? (double)p.tokens / p.seconds : 0;
        json_t *data = json_pack("{s:I, s:f, s:I, s:f, s:f}", "step", (json_int_t)p.step,
                                 "train_loss", p.loss, "total_steps",
                                 (json_int_t)p.total_steps, "learning_rate", p.lr,
                                 "tokens_per_second", tps);
        if (!isnan(p.valid_loss) && p.valid_step == p.step) /* evaluated after this step */
            json_object_set_new(data, "valid_loss", json_real(p.valid_loss));
        pthread_mutex_lock(&j->lock);
        snprintf(msg, sizeof(msg), "Step %lld/%lld: training loss=%.4f", (long long)p.step,
                 (long long)p.total_steps, p.loss);
        if (jb->cancel) /* the step it was in when cancelled: no more events */
            json_decref(data);
        else
            add_event(j, jb, "info", msg, data);
        jb->tokens_per_s = tps;
        jb->loss = p.loss;
        json_object_set_new(jb->obj, "trained_tokens", json_integer((json_int_t)p.tokens));
        if (p.step > 0 && p.step < p.total_steps)
            json_object_set_new(jb->obj, "estimated_finish",
                                json_integer((json_int_t)time(NULL) +
                                             (json_int_t)(p.seconds / (double)p.step *
                                                          (double)(p.total_steps - p.step))));
        why = jb->cancel ? CANCEL : jb->pause ? PAUSE : j->stop ? STOP : GO;
        pthread_mutex_unlock(&j->lock);
        if (r == 1)
            break;
        if ((why == GO && ckpt_every > 0 && p.step % ckpt_every == 0) || why == PAUSE ||
            why == STOP) {
            if ((r = checkpoint(j, jb, &t, &p, name, &err)) < 0) {
                fail_job(j, jb, "training_error", err.msg);
                goto out;
            }
            if (r == 1)
                why = CANCEL;
        }
    }
    if (why == CANCEL) { /* ad_jobs_cancel said so; what the job left on disk goes now */
        pthread_mutex_lock(&j->install_lock);
        pthread_mutex_lock(&j->lock);
        json_t *ckpts = json_incref(jb->checkpoints);
        pthread_mutex_unlock(&j->lock);
        drop_checkpoints(j, jb->id, ckpts);
        pthread_mutex_unlock(&j->install_lock);
        json_decref(ckpts);
        goto out;
    }
    if (why == PAUSE || why == STOP) {
        pthread_mutex_lock(&j->lock);
        jb->pause = false;
        if (why == PAUSE) {
            add_event(j, jb, "info", "The job was paused", NULL);
            set_status(j, jb, S_PAUSED);
        } /* STOP: stays running, to resume at the next start */
        pthread_mutex_unlock(&j->lock);
        goto out;
    }
    /* done: the result, then the final checkpoint (the state it was made from) */
    if ((r = install(j, jb, &t, name, NULL, NULL, &err)) == 0)
        r = checkpoint(j, jb, &t, &p, name, &err);
    if (r < 0) {
        fail_job(j, jb, "training_error", err.msg);
        goto out;
    }
    if (r == 1) { /* cancelled as it ended */
        pthread_mutex_lock(&j->install_lock);
        pthread_mutex_lock(&j->lock);
        json_t *ckpts = json_incref(jb->checkpoints);
        pthread_mutex_unlock(&j->lock);
        drop_checkpoints(j, jb->id, ckpts);
        ad_registry_delete(j->cfg.registry, name, NULL);
        pthread_mutex_unlock(&j->install_lock);
        json_decref(ckpts);
        goto out;
    }
    pthread_mutex_lock(&j->install_lock);
    pthread_mutex_lock(&j->lock);
    bool cancelled = jb->cancel;
    json_t *ckpts = cancelled ? json_incref(jb->checkpoints) : NULL;
    if (!cancelled) {
        json_object_set_new(jb->obj, "fine_tuned_model", json_string(name));
        json_object_set_new(jb->obj, "estimated_finish", json_null());
        j->trained_tokens += (uint64_t)p.tokens;
        snprintf(msg, sizeof(msg), "The job has successfully completed: %s", name);
        add_event(j, jb, "info", msg, NULL);
        set_status(j, jb, S_SUCCEEDED);
    }
    pthread_mutex_unlock(&j->lock);
    if (cancelled) { /* in its last moment */
        drop_checkpoints(j, jb->id, ckpts);
        ad_registry_delete(j->cfg.registry, name, NULL);
        json_decref(ckpts);
    }
    pthread_mutex_unlock(&j->install_lock);
out:
    ad_trainer_free(t);
    ad_dataset_free(train);
    ad_dataset_free(valid);
    free(cfg);
    json_decref(obj);
}

static void *worker(void *arg)
{
    struct ad_jobs *j = arg; /* at normal priority: the computing is the idle runner's */
    pthread_mutex_lock(&j->lock);
    for (;;) {
        struct job *next = NULL;
        for (size_t i = 0; i < j->n_jobs && !next; i++) /* a job that was running goes first */
            if (j->job[i]->status == S_RUNNING)
                next = j->job[i];
        for (size_t i = 0; i < j->n_jobs && !next; i++)
            if (j->job[i]->status == S_QUEUED)
                next = j->job[i];
        if (j->stop)
            break;
        if (!next) {
            pthread_cond_wait(&j->cond, &j->lock);
            continue;
        }
        set_status(j, next, S_RUNNING);
        pthread_mutex_unlock(&j->lock);
        run_job(j, next);
        pthread_mutex_lock(&j->lock);
        pthread_cond_broadcast(&j->cond);
    }
    pthread_mutex_unlock(&j->lock);
    return NULL;
}

/* ==========================================================================================
 * Lifetime */

/* Loads a job directory's records; NULL if it holds none (an interrupted creation). */
static struct job *load_job(const char *dir, const char *id)
{
    char path[4400];
    pathf(path, sizeof(path), "%s/job.json", dir);
    json_t *obj = read_json(path);
    if (!json_is_object(obj)) {
        json_decref(obj);
        return NULL;
    }
    struct job *jb = calloc(1, sizeof(*jb));
    if (!jb) {
        json_decref(obj);
        return NULL;
    }
    snprintf(jb->id, sizeof(jb->id), "%.39s", id);
    jb->obj = obj;
    jb->loss = NAN;
    const char *st = json_string_value(json_object_get(obj, "status"));
    for (int s = 0; s < 7; s++)
        if (st && !strcmp(st, ad_job_status_names[s]))
            jb->status = (enum status)s;
    if (jb->status == S_VALIDATING)
        jb->status = S_QUEUED;
    pathf(path, sizeof(path), "%s/checkpoints.json", dir);
    jb->checkpoints = read_json(path);
    if (!json_is_array(jb->checkpoints)) {
        json_decref(jb->checkpoints);
        jb->checkpoints = json_array();
    }
    jb->events = json_array();
    pathf(path, sizeof(path), "%s/events.jsonl", dir);
    FILE *f = fopen(path, "re");
    char *line = NULL;
    size_t cap = 0;
    while (f && getline(&line, &cap, f) > 0) { /* a torn last line is skipped */
        json_t *ev = json_loads(line, 0, NULL);
        if (json_is_object(ev))
            json_array_append(jb->events, ev);
        json_decref(ev);
    }
    free(line);
    if (f)
        fclose(f);
    return jb;
}

static int by_created(const void *a, const void *b)
{
    json_int_t x = json_integer_value(json_object_get((*(struct job *const *)a)->obj,
                                                      "created_at"));
    json_int_t y = json_integer_value(json_object_get((*(struct job *const *)b)->obj,
                                                      "created_at"));
    return x < y ? -1 : x > y ? 1 : strcmp((*(struct job *const *)a)->id,
                                           (*(struct job *const *)b)->id);
}

/* Removes leftovers of interrupted writes: uploads, file contents without their object. */
static void clean_files(struct ad_jobs *j)
{
    DIR *d = opendir(j->files);
    struct dirent *de;
    char path[4400];
    while (d && (de = readdir(d))) {
        size_t n = strlen(de->d_name);
        bool content = n > 6 && !strcmp(de->d_name + n - 6, ".jsonl");
        if (!strncmp(de->d_name, ".upload-", 8) || (n > 4 && !strcmp(de->d_name + n - 4, ".tmp"))) {
            pathf(path, sizeof(path), "%s/%s", j->files, de->d_name);
            unlink(path);
        } else if (content) {
            pathf(path, sizeof(path), "%s/%.*s.json", j->files, (int)(n - 6), de->d_name);
            if (access(path, F_OK) != 0) {
                pathf(path, sizeof(path), "%s/%s", j->files, de->d_name);
                unlink(path);
            }
        }
    }
    if (d)
        closedir(d);
}

int ad_jobs_new(const struct ad_jobs_config *cfg, struct ad_jobs **ret, struct ad_err *err)
{
    struct ad_jobs *j = calloc(1, sizeof(*j));
    if (!j)
        return ad_err_set(err, -ENOMEM, "out of memory");
    j->cfg = *cfg;
    snprintf(j->state, sizeof(j->state), "%s", cfg->state_dir);
    snprintf(j->files, sizeof(j->files), "%s/files", cfg->state_dir);
    snprintf(j->jobs_dir, sizeof(j->jobs_dir), "%s/jobs", cfg->state_dir);
    pthread_mutex_init(&j->lock, NULL);
    pthread_cond_init(&j->cond, NULL);
    pthread_mutex_init(&j->idle_lock, NULL);
    pthread_cond_init(&j->idle_cond, NULL);
    pthread_mutex_init(&j->install_lock, NULL);
    const char *dirs[3] = {j->state, j->files, j->jobs_dir};
    for (int i = 0; i < 3; i++)
        if (mkdir(dirs[i], 0750) < 0 && errno != EEXIST) {
            int e = errno;
            ad_jobs_free(j);
            return ad_err_set(err, -e, "state directory '%s': %s", dirs[i], strerror(e));
        }
    clean_files(j);
    DIR *d = opendir(j->jobs_dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char dir[4400];
        if (!id_ok(de->d_name, "ftjob"))
            continue;
        pathf(dir, sizeof(dir), "%s/%s", j->jobs_dir, de->d_name);
        struct job *jb = load_job(dir, de->d_name);
        if (!jb) {
            ad_rm_rf(dir);
            continue;
        }
        if (j->n_jobs == j->cap_jobs) {
            size_t cap = j->cap_jobs ? 2 * j->cap_jobs : 16;
            struct job **p = realloc(j->job, cap * sizeof(*p));
            if (!p)
                break;
            j->job = p;
            j->cap_jobs = cap;
        }
        j->job[j->n_jobs++] = jb;
    }
    if (d)
        closedir(d);
    if (j->n_jobs)
        qsort(j->job, j->n_jobs, sizeof(*j->job), by_created);
    if (pthread_create(&j->idle, NULL, idle_runner, j) != 0) {
        ad_jobs_free(j);
        return ad_err_set(err, -EAGAIN, "cannot start the training worker");
    }
    j->idle_started = true;
    if (pthread_create(&j->worker, NULL, worker, j) != 0) {
        ad_jobs_free(j);
        return ad_err_set(err, -EAGAIN, "cannot start the training worker");
    }
    j->worker_started = true;
    *ret = j;
    return 0;
}

void ad_jobs_free(struct ad_jobs *j)
{
    if (!j)
        return;
    pthread_mutex_lock(&j->lock);
    j->stop = true;
    pthread_cond_broadcast(&j->cond);
    pthread_mutex_unlock(&j->lock);
    if (j->worker_started)
        pthread_join(j->worker, NULL);
    pthread_mutex_lock(&j->idle_lock);
    j->idle_quit = true;
    pthread_cond_broadcast(&j->idle_cond);
    pthread_mutex_unlock(&j->idle_lock);
    if (j->idle_started)
        pthread_join(j->idle, NULL);
    for (size_t i = 0; i < j->n_jobs; i++) {
        json_decref(j->job[i]->obj);
        json_decref(j->job[i]->events);
        json_decref(j->job[i]->checkpoints);
        free(j->job[i]);
    }
    free(j->job);
    pthread_cond_destroy(&j->cond);
    pthread_mutex_destroy(&j->lock);
    pthread_cond_destroy(&j->idle_cond);
    pthread_mutex_destroy(&j->idle_lock);
    pthread_mutex_destroy(&j->install_lock);
    free(j);
}
