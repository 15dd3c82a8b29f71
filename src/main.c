/* adapterd: command line, configuration, wiring, signals, systemd notification.
 *
 *   adapterd [-c FILE] [--model DIR] [--adapters DIR] [--listen HOST:PORT] [--set KEY=VALUE]...
 *            [--dump-config]
 *
 * The configuration is one static table (name, type, bounds, default, help) that drives the
 * config file, --set, --dump-config and conf/adapterd.conf's comments. Threads: the libuv loop
 * (this thread: signals, timers, the adapters directory watch), libmicrohttpd's connection
 * threads, the engine thread (the forward passes: it and `threads` - 1 pool helpers, which
 * also make every BLAS call, OpenBLAS single-threaded). */
#include <errno.h>
#include <getopt.h>
#include <ini.h>
#include <limits.h>
#include <stddef.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>
#include <uv.h>

#include "adapterd/blas.h"
#include "adapterd/engine.h"
#include "adapterd/http.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/train.h"
#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

/* ==========================================================================================
 * Configuration */

struct config {
    char model[PATH_MAX];
    char adapters[PATH_MAX];
    char listen[256];
    char api_key_file[PATH_MAX];
    char admin_key_file[PATH_MAX];
    char log_level[16];
    long threads;
    long kv_cache_mb;
    long kv_block_size;
    long max_batch_tokens;
    long max_seqs;
    long max_queue;
    long max_concurrent;
    long prefix_cache;
    long adapter_budget_mb;
    char lora_dtype[8];
    long max_body_kb;
    long max_upload_mb;
    long max_connections;
    long max_connections_per_client;
    long header_timeout_s;
    long body_timeout_s;
    long body_min_rate_kb;
    long idle_timeout_s;
    long max_tokens_default;
    long shutdown_grace_s;
    char state_dir[PATH_MAX];
    long train_threads;
    long train_activation_mb;
    long max_train_file_mb;
};

enum opt_type { OPT_STR, OPT_LONG };

static const struct option_def {
    const char *name;
    enum opt_type type;
    size_t offset, size;
    long min, max;
    const char *dflt;
    bool reloadable;
    const char *help;
    const char *choices; /* OPT_STR: the values allowed, separated by spaces (NULL: any) */
} options[] = {
#define S(f) offsetof(struct config, f), sizeof(((struct config *)0)->f)
    {"model", OPT_STR, S(model), 0, 0, "models/demo", false,
     "Hugging Face model directory (config.json, *.safetensors, tokenizer.json)", NULL},
    {"adapters", OPT_STR, S(adapters), 0, 0, "adapters", false,
     "adapter store: one PEFT directory per adapter; created if missing", NULL},
    {"listen", OPT_STR, S(listen), 0, 0, "127.0.0.1:8080", false,
     "HOST:PORT to listen on ([::1]:8080 for IPv6); ignored under socket activation", NULL},
    {"api_key_file", OPT_STR, S(api_key_file), 0, 0, "", false,
     "file holding the API key for every route but /health (empty: no authentication)", NULL},
    {"admin_key_file", OPT_STR, S(admin_key_file), 0, 0, "", false,
     "file holding the key for uploads, deletes and training (empty: the API key)", NULL},
    {"log_level", OPT_STR, S(log_level), 0, 0, "info", true, "error, warn, info or debug",
     "error warn info debug"},
    {"threads", OPT_LONG, S(threads), 0, 256, "0", false,
     "threads of the engine's forward passes (0: one per core)", NULL},
    {"kv_cache_mb", OPT_LONG, S(kv_cache_mb), 1, 1 << 20, "512", false,
     "memory for the KV cache of all sequences", NULL},
    {"kv_block_size", OPT_LONG, S(kv_block_size), 1, 1024, "16", false,
     "tokens per KV cache block", NULL},
    {"max_batch_tokens", OPT_LONG, S(max_batch_tokens), 1, 1 << 20, "512", false,
     "tokens per forward pass (prefill chunks + decodes)", NULL},
    {"max_seqs", OPT_LONG, S(max_seqs), 1, 4096, "64", false, "sequences running at once", NULL},
    {"max_queue", OPT_LONG, S(max_queue), 0, 1 << 20, "1024", false,
     "requests waiting before new ones get 429", NULL},
    {"max_concurrent", OPT_LONG, S(max_concurrent), 0, 4096, "0", false,
     "sequences of one adapter running at once (0: max_seqs); free slots go to the adapter "
     "with the fewest running, so a busy adapter cannot starve the others", NULL},
    {"prefix_cache", OPT_LONG, S(prefix_cache), 0, 1, "1", false,
     "1: a prompt that starts like an earlier one (same adapters) reuses its KV cache blocks "
     "instead of computing them again; 0: off", NULL},
    {"adapter_budget_mb", OPT_LONG, S(adapter_budget_mb), 0, 1 << 20, "2048", false,
     "memory for resident adapters; unused ones are evicted LRU and reloaded (0: no bound)", NULL},
    {"lora_dtype", OPT_STR, S(lora_dtype), 0, 0, "auto", false,
     "LoRA factors in memory: auto (exactly as the file stores them) or int8 (8 bits with a "
     "scale per row: half the bytes of BF16, approximate; docs/adapters.md)", "auto int8"},
    {"max_body_kb", OPT_LONG, S(max_body_kb), 1, 1 << 20, "4096", false,
     "largest JSON request body", NULL},
    {"max_upload_mb", OPT_LONG, S(max_upload_mb), 1, 1 << 20, "4096", false,
     "largest adapter upload (streamed to disk)", NULL},
    {"max_connections", OPT_LONG, S(max_connections), 8, 900, "512", false,
     "concurrent HTTP connections; near the limit, those idle longest are closed to make room",
     NULL},
    {"max_connections_per_client", OPT_LONG, S(max_connections_per_client), 0, 900, "128", false,
     "connections from one client address (0: no cap; behind a proxy on this machine every "
     "client has the proxy's address)", NULL},
    {"header_timeout_s", OPT_LONG, S(header_timeout_s), 1, 3600, "20", false,
     "a connection that has not sent a request's headers within this time (new, or idle after "
     "a response) is closed", NULL},
    {"body_timeout_s", OPT_LONG, S(body_timeout_s), 1, 3600, "30", false,
     "time a request body may take, plus 1 s for every body_min_rate_kb KiB received", NULL},
    {"body_min_rate_kb", OPT_LONG, S(body_min_rate_kb), 1, 1 << 20, "1", false,
     "slowest body upload kept (KiB/s, after body_timeout_s)", NULL},
    {"idle_timeout_s", OPT_LONG, S(idle_timeout_s), 1, 3600, "60", false,
     "a request that neither sends nor receives a byte for this long is closed (not while the "
     "server is computing its answer)", NULL},
    {"max_tokens_default", OPT_LONG, S(max_tokens_default), 1, 1 << 20, "256", false,
     "max_tokens of a completion that gives none", NULL},
    {"shutdown_grace_s", OPT_LONG, S(shutdown_grace_s), 0, 3600, "30", false,
     "on SIGTERM, how long requests in flight may take before they are cancelled", NULL},
    {"state_dir", OPT_STR, S(state_dir), 0, 0, "state", false,
     "fine-tuning's files, jobs and checkpoints; created if missing (empty: no fine-tuning, "
     "its routes answer 503)", NULL},
    {"train_threads", OPT_LONG, S(train_threads), 0, 256, "0", false,
     "threads of a fine-tuning job (0: one per core); they run at idle priority, on what "
     "serving leaves", NULL},
    {"train_activation_mb", OPT_LONG, S(train_activation_mb), 16, 1 << 20, "512", false,
     "memory for a training pass's activations; a larger batch runs as several passes", NULL},
    {"max_train_file_mb", OPT_LONG, S(max_train_file_mb), 1, 1 << 20, "1024", false,
     "largest training file (POST /v1/files)", NULL},
#undef S
};
#define N_OPTIONS (sizeof(options) / sizeof(options[0]))

/* Whether value is one of the space-separated words of list. */
static bool word_in(const char *list, const char *value)
{
    size_t n = strlen(value);
    for (const char *p = list; *p;) {
        size_t w = strcspn(p, " ");
        if (w == n && !strncmp(p, value, n))
            return true;
        p += w + (p[w] == ' ');
    }
    return false;
}

static int set_option(struct config *cfg, const char *name, const char *value, char *msg,
                      size_t msg_len)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const struct option_def *o = &options[i];
        if (strcmp(o->name, name))
            continue;
        char *field = (char *)cfg + o->offset;
        if (o->type == OPT_STR) {
            if (strlen(value) >= o->size) {
                snprintf(msg, msg_len, "%s: value too long", name);
                return -EINVAL;
            }
            if (o->choices && !word_in(o->choices, value)) {
                snprintf(msg, msg_len, "%s: '%s' is not one of: %s", name, value, o->choices);
                return -EINVAL;
            }
            memcpy(field, value, strlen(value) + 1);
            return 0;
        }
        char *end;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (errno || end == value || *end || v < o->min || v > o->max) {
            snprintf(msg, msg_len, "%s: '%s' is not an integer in [%ld, %ld]", name, value,
                     o->min, o->max);
            return -EINVAL;
        }
        memcpy(field, &v, sizeof(v));
        return 0;
    }
    snprintf(msg, msg_len, "unknown option '%s'", name);
    return -EINVAL;
}

static void config_defaults(struct config *cfg)
{
    char msg[128];
    memset(cfg, 0, sizeof(*cfg));
    for (size_t i = 0; i < N_OPTIONS; i++)
        set_option(cfg, options[i].name, options[i].dflt, msg, sizeof(msg));
}

struct ini_ctx {
    struct config *cfg;
    char msg[300];
    int rc;
};

static int on_ini(void *user, const char *section, const char *name, const char *value)
{
    struct ini_ctx *ctx = user;
    (void)section;
    if (ctx->rc == 0)
        ctx->rc = set_option(ctx->cfg, name, value, ctx->msg, sizeof(ctx->msg));
    return ctx->rc == 0;
}

static int config_load_file(struct config *cfg, const char *path, char *msg, size_t msg_len)
{
    struct ini_ctx ctx = {.cfg = cfg};
    int r = ini_parse(path, on_ini, &ctx);
    if (r == -1) {
        snprintf(msg, msg_len, "%s: %s", path, strerror(errno));
        return -errno;
    }
    if (ctx.rc < 0 || r != 0) {
        snprintf(msg, msg_len, "%s:%d: %s", path, r, ctx.rc < 0 ? ctx.msg : "syntax error");
        return -EINVAL;
    }
    return 0;
}

static void config_dump(const struct config *cfg, FILE *f)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const struct option_def *o = &options[i];
        const char *field = (const char *)cfg + o->offset;
        fprintf(f, "# %s%s\n", o->help, o->reloadable ? " (reloaded on SIGHUP)" : "");
        if (o->type == OPT_STR)
            fprintf(f, "%s = %s\n\n", o->name, field);
        else
            fprintf(f, "%s = %ld\n\n", o->name, *(const long *)(const void *)field);
    }
}

static int read_key(const char *path, char **ret, char *msg, size_t msg_len)
{
    struct ad_err err;
    size_t len;
    *ret = NULL;
    if (!path[0])
        return 0;
    if (ad_read_file(path, 4096, ret, &len, &err) < 0) {
        snprintf(msg, msg_len, "%s", err.msg);
        return err.code;
    }
    while (len > 0 && ((*ret)[len - 1] == '\n' || (*ret)[len - 1] == '\r' ||
                       (*ret)[len - 1] == ' '))
        (*ret)[--len] = '\0';
    if (len < 16) {
        snprintf(msg, msg_len, "%s: a key must be at least 16 characters", path);
        free(*ret);
        *ret = NULL;
        return -EINVAL;
    }
    return 0;
}

static void apply_log_level(const char *level)
{
    ad_log_set_level(!strcmp(level, "error")  ? AD_LOG_ERROR
                     : !strcmp(level, "warn") ? AD_LOG_WARN
                     : !strcmp(level, "debug") ? AD_LOG_DEBUG
                                               : AD_LOG_INFO);
}

/* ==========================================================================================
 * The daemon */

struct daemon {
    uv_loop_t *loop;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_fs_event_t watch;
    uv_timer_t rescan, watchdog;
    const char *config_file; /* NULL: defaults and flags only */
    const char *const *flag_names, *const *flag_values; /* the command line's, after the file */
    int n_flags;
    struct config cfg;
    struct ad_model *model;
    struct ad_tokenizer *tok;
    struct ad_registry *registry;
    struct ad_engine *engine;
    struct ad_jobs *jobs;
    struct ad_http *http;
};

static void on_bad_adapter(void *ud, const char *name, const struct ad_err *err)
{
    (void)ud;
    log_error("adapter '%s' skipped: %s", name, err->msg);
}

static void rescan(struct daemon *d)
{
    int n = ad_registry_scan(d->registry, on_bad_adapter, NULL);
    if (n < 0)
        log_error("cannot read the adapters directory '%s': %s", d->cfg.adapters, strerror(-n));
    else
        log_debug("adapters directory scanned: %d adapters", n);
}

static void on_rescan_timer(uv_timer_t *t)
{
    rescan(t->data);
}

static void on_watch(uv_fs_event_t *h, const char *filename, int events, int status)
{
    struct daemon *d = h->data;
    (void)filename;
    (void)events;
    (void)status;
    uv_timer_start(&d->rescan, on_rescan_timer, 300, 0); /* settle: a copy takes a while */
}

static void on_watchdog(uv_timer_t *t)
{
    (void)t;
    sd_notify(0, "WATCHDOG=1");
}

static void on_signal(uv_signal_t *s, int signum)
{
    struct daemon *d = s->data;
    if (signum == SIGHUP) {
        sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu",
                   (unsigned long long)(ad_now() * 1e6));
        log_info("SIGHUP: reloading the configuration and rescanning adapters");
        if (d->config_file) {
            struct config fresh;
            char msg[400];
            config_defaults(&fresh);
            int rc = config_load_file(&fresh, d->config_file, msg, sizeof(msg));
            for (int i = 0; rc >= 0 && i < d->n_flags; i++) /* flags still override the file */
                rc = set_option(&fresh, d->flag_names[i], d->flag_values[i], msg, sizeof(msg));
            if (rc < 0) {
                log_error("%s; keeping the running configuration", msg);
            } else {
                /* the reloadable options only; the others need a restart */
                memcpy(d->cfg.log_level, fresh.log_level, sizeof(fresh.log_level));
                apply_log_level(d->cfg.log_level);
            }
        }
        rescan(d);
        sd_notify(0, "READY=1\nSTATUS=serving");
        return;
    }
    log_info("%s: stopping (grace %lds)", signum == SIGTERM ? "SIGTERM" : "SIGINT",
             d->cfg.shutdown_grace_s);
    sd_notify(0, "STOPPING=1\nSTATUS=draining");
    uv_stop(d->loop);
}

/* After the loop: a second SIGTERM/SIGINT cuts the grace period short (async-signal-safe). */
static struct ad_http *volatile stopping_http;

static void on_signal_while_stopping(int signum)
{
    (void)signum;
    if (stopping_http)
        ad_http_hurry(stopping_http);
}

static int parse_listen(const char *s, char *host, size_t host_len, int *port)
{
    const char *colon = strrchr(s, ':');
    if (!colon)
        return -EINVAL;
    const char *h = s;
    size_t n = (size_t)(colon - s);
    if (n >= 2 && s[0] == '[' && s[n - 1] == ']') { /* [::1]:8080 */
        h = s + 1;
        n -= 2;
    }
    if (n == 0 || n >= host_len)
        return -EINVAL;
    memcpy(host, h, n);
    host[n] = '\0';
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || end == colon + 1 || p < 0 || p > 65535)
        return -EINVAL;
    *port = (int)p;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: adapterd [-c FILE] [--model DIR] [--adapters DIR] [--listen HOST:PORT]\n"
               "                [--set KEY=VALUE]... [--dump-config] [--help]\n");
}

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", 1, 0, 'c'},   {"model", 1, 0, 'm'},       {"adapters", 1, 0, 'a'},
        {"listen", 1, 0, 'l'},   {"set", 1, 0, 's'},         {"dump-config", 0, 0, 'd'},
        {"help", 0, 0, 'h'},     {0, 0, 0, 0},
    };
    struct daemon d = {0};
    char msg[512], host[128];
    bool dump = false;
    int o, port, rc = 1;
    /* flags after the file: collect them, apply after the config file is read */
    const char *flag_names[64], *flag_values[64];
    char set_buf[64][512];
    int n_flags = 0;
    struct ad_blas_choice blas;

    ad_blas_startup(argv, &blas); /* first: it may execute adapterd again (adapterd/blas.h) */
    config_defaults(&d.cfg);
    while ((o = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
        if (n_flags >= 64) {
            fprintf(stderr, "adapterd: too many options\n");
            return 2;
        }
        switch (o) {
        case 'c': d.config_file = optarg; break;
        case 'm': flag_names[n_flags] = "model"; flag_values[n_flags++] = optarg; break;
        case 'a': flag_names[n_flags] = "adapters"; flag_values[n_flags++] = optarg; break;
        case 'l': flag_names[n_flags] = "listen"; flag_values[n_flags++] = optarg; break;
        case 's': {
            char *eq = strchr(optarg, '=');
            if (!eq || strlen(optarg) >= sizeof(set_buf[0])) {
                fprintf(stderr, "adapterd: --set takes KEY=VALUE\n");
                return 2;
            }
            memcpy(set_buf[n_flags], optarg, strlen(optarg) + 1);
            set_buf[n_flags][eq - optarg] = '\0';
            flag_names[n_flags] = set_buf[n_flags];
            flag_values[n_flags] = set_buf[n_flags] + (eq - optarg) + 1;
            n_flags++;
            break;
        }
        case 'd': dump = true; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    if (!d.config_file && access("conf/adapterd.conf", R_OK) == 0)
        d.config_file = "conf/adapterd.conf";
    if (d.config_file && config_load_file(&d.cfg, d.config_file, msg, sizeof(msg)) < 0) {
        fprintf(stderr, "adapterd: %s\n", msg);
        return 2;
    }
    for (int i = 0; i < n_flags; i++)
        if (set_option(&d.cfg, flag_names[i], flag_values[i], msg, sizeof(msg)) < 0) {
            fprintf(stderr, "adapterd: %s\n", msg);
            return 2;
        }
    if (dump) {
        config_dump(&d.cfg, stdout);
        return 0;
    }
    d.flag_names = flag_names;
    d.flag_values = flag_values;
    d.n_flags = n_flags;
    if (parse_listen(d.cfg.listen, host, sizeof(host), &port) < 0) {
        fprintf(stderr, "adapterd: listen: '%s' is not HOST:PORT\n", d.cfg.listen);
        return 2;
    }
    apply_log_level(d.cfg.log_level);
    ad_log(blas.warn ? AD_LOG_WARN : AD_LOG_INFO, "BLAS: %s", blas.msg);
    char *api_key = NULL, *admin_key = NULL;
    if (read_key(d.cfg.api_key_file, &api_key, msg, sizeof(msg)) < 0 ||
        read_key(d.cfg.admin_key_file, &admin_key, msg, sizeof(msg)) < 0) {
        log_error("%s", msg);
        return 2;
    }

    /* The engine's forward passes use `threads` cores (their own pool); OpenBLAS becomes
     * single-threaded in the whole process, here before any other thread starts. */
    ad_model_set_threads((int)d.cfg.threads);

    struct ad_err err;
    /* Listen first: while the model loads, /health answers 503 and the rest 503 too. */
    int n_fds = sd_listen_fds(1);
    struct ad_http_config hc = {
        .host = host, .port = port, .listen_fd = n_fds >= 1 ? SD_LISTEN_FDS_START : -1,
        .max_body = (size_t)d.cfg.max_body_kb << 10,
        .max_upload = (size_t)d.cfg.max_upload_mb << 20,
        .max_connections = (int)d.cfg.max_connections,
        .max_per_client = (int)d.cfg.max_connections_per_client,
        .header_timeout = (double)d.cfg.header_timeout_s,
        .body_timeout = (double)d.cfg.body_timeout_s,
        .body_min_rate = (double)d.cfg.body_min_rate_kb * 1024,
        .idle_timeout = (double)d.cfg.idle_timeout_s,
        .max_tokens_default = (int)d.cfg.max_tokens_default,
        .api_key = api_key, .admin_key = admin_key};
    if (ad_http_start(&hc, NULL, &d.http, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    if (n_fds >= 1)
        log_info("listening on the socket passed by systemd");
    else
        log_info("listening on http://%s%s%s:%d/", strchr(host, ':') ? "[" : "", host,
                 strchr(host, ':') ? "]" : "", ad_http_port(d.http));

    sd_notify(0, "STATUS=loading the model");
    double t0 = ad_now();
    if (ad_model_load(d.cfg.model, &d.model, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    log_info("model '%s': %s, %d layers, hidden %d, vocab %d, %.1f MB, loaded in %.2fs",
             d.model->id, d.model->cfg.architecture, d.model->cfg.n_layer, d.model->cfg.n_embd,
             d.model->cfg.n_vocab, (double)d.model->weight_bytes / 1e6, ad_now() - t0);
    char tpath[PATH_MAX + 32];
    snprintf(tpath, sizeof(tpath), "%s/tokenizer.json", d.cfg.model);
    if (access(tpath, R_OK) == 0) {
        if (ad_tokenizer_load(d.cfg.model, &d.tok, &err) < 0) {
            log_error("%s", err.msg);
            goto out;
        }
    } else {
        log_warn("%s has no tokenizer.json: prompts must be token ids", d.cfg.model);
    }
    unsigned load_flags = !strcmp(d.cfg.lora_dtype, "int8") ? AD_ADAPTER_LORA_INT8 : 0;
    if (ad_registry_new(d.model, d.cfg.adapters, (size_t)d.cfg.adapter_budget_mb << 20,
                        load_flags, &d.registry, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }
    rescan(&d);

    const struct ad_model_config *mc = &d.model->cfg;
    size_t per_token = 2 * (size_t)mc->n_layer * (size_t)mc->n_kv_head * (size_t)mc->head_dim *
                       sizeof(float);
    long blocks = (long)(((size_t)d.cfg.kv_cache_mb << 20) / (per_token * (size_t)d.cfg.kv_block_size));
    /* no more than max_seqs full-length sequences can use */
    long most = d.cfg.max_seqs * ((mc->n_ctx_max + d.cfg.kv_block_size - 1) / d.cfg.kv_block_size);
    if (blocks > most)
        blocks = most;
    struct ad_engine_config ec = {.kv_blocks = (int)(blocks > 0 ? blocks : 1),
                                  .kv_block_size = (int)d.cfg.kv_block_size,
                                  .max_batch_tokens = (int)d.cfg.max_batch_tokens,
                                  .max_seqs = (int)d.cfg.max_seqs,
                                  .max_queue = (int)d.cfg.max_queue,
                                  .max_per_adapter = (int)d.cfg.max_concurrent,
                                  .prefix_cache = d.cfg.prefix_cache != 0};
    if (ad_engine_new(d.model, &ec, &d.engine, &err) < 0) {
        log_error("%s", err.msg);
        goto out;
    }

    if (d.cfg.state_dir[0]) {
        struct ad_jobs_config jc = {.state_dir = d.cfg.state_dir, .model = d.model,
                                    .model_dir = d.cfg.model, .tok = d.tok,
                                    .registry = d.registry, .threads = (int)d.cfg.train_threads,
                                    .activation_bytes = (size_t)d.cfg.train_activation_mb << 20,
                                    .max_file_bytes = (size_t)d.cfg.max_train_file_mb << 20};
        if (ad_jobs_new(&jc, &d.jobs, &err) < 0) {
            log_error("%s", err.msg);
            goto out;
        }
    }

    struct ad_http_deps deps = {.model = d.model, .tok = d.tok, .registry = d.registry,
                                .engine = d.engine, .jobs = d.jobs};
    ad_http_serve(d.http, &deps);
    log_info("serving: %d KV blocks of %ld tokens, %ld sequences at most", ec.kv_blocks,
             d.cfg.kv_block_size, d.cfg.max_seqs);

    d.loop = uv_default_loop();
    uv_signal_init(d.loop, &d.sig_term);
    uv_signal_init(d.loop, &d.sig_int);
    uv_signal_init(d.loop, &d.sig_hup);
    d.sig_term.data = d.sig_int.data = d.sig_hup.data = &d;
    uv_signal_start(&d.sig_term, on_signal, SIGTERM);
    uv_signal_start(&d.sig_int, on_signal, SIGINT);
    uv_signal_start(&d.sig_hup, on_signal, SIGHUP);
    uv_timer_init(d.loop, &d.rescan);
    d.rescan.data = &d;
    if (uv_fs_event_init(d.loop, &d.watch) == 0) {
        d.watch.data = &d;
        if (uv_fs_event_start(&d.watch, on_watch, d.cfg.adapters, 0) < 0)
            log_warn("cannot watch '%s': new adapters appear on SIGHUP", d.cfg.adapters);
    }
    uint64_t wd_usec = 0;
    uv_timer_init(d.loop, &d.watchdog);
    if (sd_watchdog_enabled(0, &wd_usec) > 0 && wd_usec > 0)
        uv_timer_start(&d.watchdog, on_watchdog, wd_usec / 2000, wd_usec / 2000);
    sd_notify(0, "READY=1\nSTATUS=serving");

    uv_run(d.loop, UV_RUN_DEFAULT);

    /* Stopping. The loop's signal handles go; from here a second SIGTERM/SIGINT ends the grace
     * period at once (requests in flight are cancelled) and SIGHUP is ignored, but neither
     * kills the process before it has shut down cleanly. */
    uv_close((uv_handle_t *)&d.sig_term, NULL);
    uv_close((uv_handle_t *)&d.sig_int, NULL);
    uv_close((uv_handle_t *)&d.sig_hup, NULL);
    uv_close((uv_handle_t *)&d.rescan, NULL);
    uv_close((uv_handle_t *)&d.watchdog, NULL);
    if (uv_is_active((uv_handle_t *)&d.watch) || d.watch.type == UV_FS_EVENT)
        uv_close((uv_handle_t *)&d.watch, NULL);
    uv_run(d.loop, UV_RUN_DEFAULT);
    uv_loop_close(d.loop);
    stopping_http = d.http;
    struct sigaction sa = {.sa_handler = on_signal_while_stopping};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGHUP, &sa, NULL);
    ad_http_stop(d.http, (double)d.cfg.shutdown_grace_s);
    d.http = NULL;
    rc = 0;
    log_info("stopped");
out:
    ad_http_stop(d.http, 0);
    ad_jobs_free(d.jobs); /* a running job checkpoints, to resume at the next start */
    ad_engine_free(d.engine);
    ad_registry_free(d.registry);
    ad_tokenizer_free(d.tok);
    ad_model_free(d.model);
    free(api_key);
    free(admin_key);
    return rc;
}
