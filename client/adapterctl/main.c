/* adapterctl: a command line for adapterd over libadapterd-client. main: the command table,
 * the common options and environment, SIGINT, errors and the helpers every command uses.
 *
 *   adapterctl [--url URL] [--api-key KEY] [--json] COMMAND [OPTIONS] [OPERANDS]
 *
 * Each command lives in its own file: models and adapters (adapters.c), completions and the
 * tokenizer (generate.c), health and metrics (status.c), fine-tuning: train and following a
 * job (train.c), jobs and files (jobs.c). */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"

#define DEFAULT_URL "http://127.0.0.1:8080"
#define MAX_STDIN ((size_t)16 << 20)

static const struct ctl_command *const commands[] = {
    &ctl_models, &ctl_adapters, &ctl_upload, &ctl_complete, &ctl_chat,  &ctl_tokenize,
    &ctl_health, &ctl_metrics,  &ctl_train,  &ctl_jobs,     &ctl_files,
};
#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

/* ==========================================================================================
 * SIGINT: cancels the client's call (the stream stops, the server frees its sequence); a
 * second SIGINT exits at once. */

static _Atomic(struct adc_client *) sigint_client; /* lock-free: read in the handler */
static volatile sig_atomic_t sigint_seen;

static void on_sigint(int sig)
{
    (void)sig;
    if (sigint_seen)
        _exit(CTL_INTERRUPTED);
    sigint_seen = 1;
    struct adc_client *c = atomic_load(&sigint_client);
    if (c)
        adc_client_cancel(c);
}

bool ctl_interrupted(void)
{
    return sigint_seen != 0;
}

struct adc_client *ctl_client(struct ctl *ctl)
{
    struct adc_error e;
    if (ctl->client)
        return ctl->client;
    if (adc_client_new(ctl->url, ctl->api_key, &ctl->client, &e) < 0) {
        ctl_fail(ctl, &e);
        return NULL;
    }
    atomic_store(&sigint_client, ctl->client);
    if (sigint_seen) /* before the client existed */
        adc_client_cancel(ctl->client);
    return ctl->client;
}

int ctl_fail(struct ctl *ctl, const struct adc_error *e)
{
    (void)ctl;
    if (e->rc == -ECANCELED && sigint_seen)
        return CTL_INTERRUPTED;
    if (e->status)
        fprintf(stderr, "adapterctl: %s (HTTP %ld%s%s)\n", e->message, e->status,
                e->type[0] ? " " : "", e->type);
    else
        fprintf(stderr, "adapterctl: %s\n", e->message);
    return CTL_FAILED;
}

/* ==========================================================================================
 * Options */

static const struct option common_options[] = {
    {"url", required_argument, NULL, OPT_URL},
    {"api-key", required_argument, NULL, OPT_API_KEY},
    {"json", no_argument, NULL, OPT_JSON},
    {"help", no_argument, NULL, 'h'},
};
#define N_COMMON (sizeof(common_options) / sizeof(common_options[0]))
#define MAX_OPTIONS 48

/* own's options (NULL-terminated), then the common ones, then the terminator. */
static void merge_options(struct option all[MAX_OPTIONS], const struct option *own)
{
    size_t n = 0;
    for (; own && own[n].name && n < MAX_OPTIONS - N_COMMON - 1; n++)
        all[n] = own[n];
    for (size_t i = 0; i < N_COMMON; i++)
        all[n++] = common_options[i];
    memset(&all[n], 0, sizeof(all[n]));
}

static void usage_line(FILE *f, const struct ctl_command *cmd)
{
    fprintf(f, "usage: adapterctl %s [OPTIONS]%s%s\n", cmd->name, cmd->args[0] ? " " : "",
            cmd->args);
}

int ctl_usage_error(struct ctl *ctl, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "adapterctl %s: ", ctl->cmd ? ctl->cmd->name : "");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n(adapterctl %s --help says more)\n", ctl->cmd ? ctl->cmd->name : "");
    return CTL_USAGE;
}

static int common_option(struct ctl *ctl, int opt, const char *arg)
{
    switch (opt) {
    case OPT_URL:
        ctl->url = arg;
        return 1;
    case OPT_API_KEY:
        ctl->api_key = arg;
        return 1;
    case OPT_JSON:
        ctl->json = true;
        return 1;
    case 'h':
        printf("adapterctl %s: %s\n", ctl->cmd->name, ctl->cmd->summary);
        usage_line(stdout, ctl->cmd);
        printf("\n%s\nCommon options:\n%s", ctl->cmd->help, CTL_COMMON_HELP);
        exit(CTL_OK);
    default:
        return 0;
    }
}

int ctl_options(struct ctl *ctl, int argc, char **argv, const char *shortopts,
                const struct option *own, ctl_option_fn on_opt, void *st, int min_operands,
                int max_operands)
{
    struct option all[MAX_OPTIONS];
    char short_all[40];

    merge_options(all, own);
    snprintf(short_all, sizeof(short_all), ":h%s", shortopts ? shortopts : "");
    opterr = 0;
    optind = 0; /* glibc: start afresh */
    for (;;) {
        int opt = getopt_long(argc, argv, short_all, all, NULL);
        if (opt == -1)
            break;
        if (opt == '?' || opt == ':') {
            const char *bad = argv[optind - 1];
            if (opt == ':')
                ctl_usage_error(ctl, "option '%s' needs a value", bad);
            else if (optopt && strncmp(bad, "--", 2))
                ctl_usage_error(ctl, "unknown option '-%c'", optopt);
            else
                ctl_usage_error(ctl, "unknown option '%s'", bad);
            exit(CTL_USAGE);
        }
        if (common_option(ctl, opt, optarg))
            continue;
        if (!on_opt || on_opt(ctl, st, opt, optarg) != 0)
            exit(CTL_USAGE);
    }
    int n_operands = argc - optind;
    if (n_operands < min_operands || (max_operands >= 0 && n_operands > max_operands)) {
        if (n_operands < min_operands)
            ctl_usage_error(ctl, "missing operand: %s", ctl->cmd->args);
        else
            ctl_usage_error(ctl, "unexpected operand '%s'", argv[optind + max_operands]);
        exit(CTL_USAGE);
    }
    return optind;
}

int ctl_parse_long(struct ctl *ctl, const char *opt, const char *arg, long lo, long hi, long *ret)
{
    char *end;
    errno = 0;
    long v = strtol(arg, &end, 10);
    if (errno || end == arg || *end || v < lo || v > hi)
        return ctl_usage_error(ctl, "%s wants a whole number from %ld to %ld, not '%s'", opt, lo,
                               hi, arg);
    *ret = v;
    return 0;
}

int ctl_parse_double(struct ctl *ctl, const char *opt, const char *arg, double lo, double hi,
                     double *ret)
{
    char *end;
    errno = 0;
    double v = strtod(arg, &end);
    if (errno || end == arg || *end || !(v >= lo && v <= hi))
        return ctl_usage_error(ctl, "%s wants a number from %g to %g, not '%s'", opt, lo, hi, arg);
    *ret = v;
    return 0;
}

char *ctl_text(int argc, char **argv)
{
    size_t len = 0, cap = 0;
    char *s = NULL;

    if (argc == 1 && !strcmp(argv[0], "-")) {
        for (;;) {
            if (len + 4096 + 1 > cap) {
                cap = cap ? 2 * cap : 65536;
                char *t = cap <= MAX_STDIN ? realloc(s, cap) : NULL;
                if (!t) {
                    fprintf(stderr, "adapterctl: standard input is larger than %zu MiB\n",
                            MAX_STDIN >> 20);
                    free(s);
                    return NULL;
                }
                s = t;
            }
            size_t n = fread(s + len, 1, cap - len - 1, stdin);
            len += n;
            if (n == 0)
                break;
        }
        if (ferror(stdin)) { /* after SIGINT (EINTR) quietly: main exits 130 */
            if (!sigint_seen)
                fprintf(stderr, "adapterctl: cannot read standard input: %s\n", strerror(errno));
            free(s);
            return NULL;
        }
        s[len] = '\0';
        return s;
    }
    for (int i = 0; i < argc; i++)
        len += strlen(argv[i]) + 1;
    s = malloc(len + 1);
    if (!s) {
        fprintf(stderr, "adapterctl: out of memory\n");
        return NULL;
    }
    s[0] = '\0';
    for (int i = 0, off = 0; i < argc; i++)
        off += snprintf(s + off, len + 1 - (size_t)off, "%s%s", i ? " " : "", argv[i]);
    return s;
}

/* ==========================================================================================
 * Output */

const char *ctl_str(const json_t *o, const char *key, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : dflt;
}

void ctl_print_json(const json_t *j)
{
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_ENCODE_ANY);
    if (text)
        printf("%s\n", text);
    free(text);
}

int ctl_answer(struct ctl *ctl, json_t *j, void (*print)(const json_t *))
{
    if (ctl->json)
        ctl_print_json(j);
    else
        print(j);
    json_decref(j);
    return CTL_OK;
}

void ctl_print_json_line(const json_t *j)
{
    char *text = json_dumps(j, JSON_COMPACT | JSON_ENCODE_ANY);
    if (text)
        printf("%s\n", text);
    free(text);
}

void ctl_human_bytes(char *buf, size_t size, double bytes)
{
    static const char *const units[] = {"KiB", "MiB", "GiB", "TiB"};
    if (bytes < 1024) {
        snprintf(buf, size, "%.0f B", bytes);
        return;
    }
    int u = -1;
    while (bytes >= 1024 && u < 3) {
        bytes /= 1024;
        u++;
    }
    snprintf(buf, size, "%.1f %s", bytes, units[u]);
}

void ctl_human_time(char *buf, size_t size, double t)
{
    time_t tt = (time_t)t;
    struct tm tm;
    if (!localtime_r(&tt, &tm) || !strftime(buf, size, "%Y-%m-%d %H:%M:%S", &tm))
        snprintf(buf, size, "%.0f", t);
}

/* A field of o by its path ("metrics.train_loss"), or NULL. */
static json_t *field(const json_t *o, const char *path)
{
    char key[64];
    for (;;) {
        const char *dot = strchr(path, '.');
        if (!dot)
            return json_object_get(o, path);
        snprintf(key, sizeof(key), "%.*s", (int)(dot - path), path);
        o = json_object_get(o, key);
        path = dot + 1;
    }
}

/* Is key a time in seconds since the epoch? (OpenAI's "created_at", "finished_at", ...) */
static bool is_time(const char *key)
{
    size_t n = strlen(key);
    return (n > 3 && !strcmp(key + n - 3, "_at")) || !strcmp(key, "estimated_finish");
}

char *ctl_cell(const json_t *v, const char *key)
{
    char buf[64];
    const char *last = strrchr(key, '.');
    last = last ? last + 1 : key;
    if (json_is_string(v))
        return strdup(json_string_value(v));
    if (!strcmp(last, "bytes") && json_is_number(v))
        ctl_human_bytes(buf, sizeof(buf), json_number_value(v));
    else if (is_time(last) && json_is_integer(v))
        ctl_human_time(buf, sizeof(buf), json_number_value(v));
    else if (json_is_integer(v))
        snprintf(buf, sizeof(buf), "%lld", (long long)json_integer_value(v));
    else if (json_is_number(v) && strlen(last) >= 4 && !strcmp(last + strlen(last) - 4, "loss"))
        snprintf(buf, sizeof(buf), "%.4f", json_number_value(v));
    else if (json_is_real(v)) /* the fewest digits that read back as the same number */
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(buf, sizeof(buf), "%.*g", prec, json_real_value(v));
            if (strtod(buf, NULL) == json_real_value(v))
                break;
        }
    else if (json_is_boolean(v))
        snprintf(buf, sizeof(buf), "%s", json_is_true(v) ? "yes" : "no");
    else
        return NULL;
    return strdup(buf);
}

void ctl_print_list(const json_t *list, const char *const *fields, const char *const *head,
                    size_t n_cols)
{
    json_t *data = json_object_get(list, "data");
    size_t n = json_array_size(data);
    char **cells = calloc(n * n_cols + 1, sizeof(char *));
    if (!cells)
        return;
    for (size_t r = 0; r < n; r++)
        for (size_t c = 0; c < n_cols; c++)
            cells[r * n_cols + c] = ctl_cell(field(json_array_get(data, r), fields[c]), fields[c]);
    ctl_table(head, n_cols, cells, n);
    for (size_t i = 0; i < n * n_cols; i++)
        free(cells[i]);
    free(cells);
}

void ctl_print_fields(const json_t *o)
{
    const char *key;
    json_t *v;
    size_t width = 0;
    json_object_foreach((json_t *)o, key, v) width = strlen(key) > width ? strlen(key) : width;
    json_object_foreach((json_t *)o, key, v)
    {
        char *text = ctl_cell(v, ""), *human = ctl_cell(v, key);
        char *dump = text ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        const char *value = text ? text : dump ? dump : "";
        bool extra = human && text && strcmp(human, text);
        printf("%-*s  %s%s%s%s\n", (int)width + 1, key, value, extra ? " (" : "",
               extra ? human : "", extra ? ")" : "");
        free(text);
        free(human);
        free(dump);
    }
}

void ctl_table(const char *const *head, size_t n_cols, char *const *cells, size_t n_rows)
{
    size_t width[16] = {0};
    for (size_t c = 0; c < n_cols && c < 16; c++) {
        width[c] = strlen(head[c]);
        for (size_t r = 0; r < n_rows; r++) {
            const char *s = cells[r * n_cols + c];
            size_t w = s ? strlen(s) : 1;
            width[c] = w > width[c] ? w : width[c];
        }
    }
    for (size_t r = 0; r <= n_rows; r++)
        for (size_t c = 0; c < n_cols && c < 16; c++) {
            const char *s = r == 0 ? head[c] : cells[(r - 1) * n_cols + c];
            printf("%-*s%s", c + 1 < n_cols ? (int)width[c] : 0, s ? s : "-",
                   c + 1 < n_cols ? "  " : "\n");
        }
}

double ctl_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

bool ctl_progress_wanted(void)
{
    return isatty(STDERR_FILENO);
}

int ctl_progress_draw(void *ud, uint64_t done, uint64_t total)
{
    struct ctl_progress *p = ud;
    double t = ctl_now();
    if (p->t0 == 0 || done < p->last) { /* the first call, or the next file */
        if (p->shown)
            fputc('\n', stderr);
        p->t0 = t;
        p->drawn_at = 0;
        p->shown = p->finished = false;
    }
    p->last = done;
    bool finished = total && done == total;
    if ((done == 0 && total == 0) || p->finished || (!finished && t - p->drawn_at < 0.1))
        return 0; /* nothing yet; all sent (the server validates now); drawn just now */
    char d[32], all[32], rate[32];
    ctl_human_bytes(d, sizeof(d), (double)done);
    ctl_human_bytes(all, sizeof(all), (double)total);
    ctl_human_bytes(rate, sizeof(rate), t > p->t0 ? (double)done / (t - p->t0) : 0);
    if (total)
        fprintf(stderr, "\r%s  %s / %s  %3d%%  %s/s\033[K", p->label, d, all,
                (int)(100.0 * (double)done / (double)total), rate);
    else
        fprintf(stderr, "\r%s  %s  %s/s\033[K", p->label, d, rate);
    fflush(stderr);
    p->drawn_at = t;
    p->shown = true;
    p->finished = finished;
    return 0;
}

void ctl_progress_end(struct ctl_progress *p)
{
    if (p->shown)
        fputc('\n', stderr);
    p->shown = false;
}

/* ==========================================================================================
 * main */

static void help(FILE *f)
{
    fprintf(f, "usage: adapterctl [--url URL] [--api-key KEY] [--json] COMMAND [OPTIONS] "
               "[OPERANDS]\n\nA command line for adapterd, the server of one base model and many "
               "PEFT adapters.\n\nCommands:\n");
    for (size_t i = 0; i < N_COMMANDS; i++) {
        char name[80];
        snprintf(name, sizeof(name), "%s %s", commands[i]->name, commands[i]->args);
        if (strlen(name) > 20) /* on a line of its own */
            fprintf(f, "  %s\n  %-20s %s\n", name, "", commands[i]->summary);
        else
            fprintf(f, "  %-20s %s\n", name, commands[i]->summary);
    }
    fprintf(f,
            "\nCommon options (before or after the command):\n%s"
            "      --version       the version\n\n"
            "Environment: ADAPTERD_URL, ADAPTERD_API_KEY. Exit status: 0 done, 1 the server "
            "refused\n(its message on stderr) or could not be reached, 2 a wrong command line, "
            "130 interrupted.\n`adapterctl COMMAND --help` and adapterctl(1) say more.\n",
            CTL_COMMON_HELP);
}

int main(int argc, char **argv)
{
    static const struct option version[] = {{"version", no_argument, NULL, 'V'},
                                            {NULL, 0, NULL, 0}};
    struct option opts[MAX_OPTIONS];
    merge_options(opts, version);
    struct ctl ctl = {.url = getenv("ADAPTERD_URL"), .api_key = getenv("ADAPTERD_API_KEY")};
    if (!ctl.url || !*ctl.url)
        ctl.url = DEFAULT_URL;

    /* the common options before the command ('+': stop at the first operand) */
    opterr = 0;
    for (;;) {
        int opt = getopt_long(argc, argv, "+:h", opts, NULL);
        if (opt == -1)
            break;
        if (opt == 'h') {
            help(stdout);
            return CTL_OK;
        }
        if (opt == 'V') {
            printf("adapterctl %s\n", ADC_VERSION);
            return CTL_OK;
        }
        if (opt == '?' || opt == ':') {
            fprintf(stderr, "adapterctl: %s '%s'\n",
                    opt == ':' ? "a value is missing after" : "unknown option", argv[optind - 1]);
            help(stderr);
            return CTL_USAGE;
        }
        common_option(&ctl, opt, optarg);
    }
    if (optind >= argc) {
        help(stderr);
        return CTL_USAGE;
    }
    for (size_t i = 0; i < N_COMMANDS; i++)
        if (!strcmp(argv[optind], commands[i]->name))
            ctl.cmd = commands[i];
    if (!ctl.cmd) {
        fprintf(stderr, "adapterctl: unknown command '%s' (adapterctl --help lists them)\n",
                argv[optind]);
        return CTL_USAGE;
    }

    struct sigaction sa = {.sa_handler = on_sigint}; /* no SA_RESTART: the poll wakes up */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int status = ctl.cmd->run(&ctl, argc - optind, argv + optind);
    if (fflush(stdout) != 0 && status == CTL_OK) {
        fprintf(stderr, "adapterctl: cannot write the output: %s\n", strerror(errno));
        status = CTL_FAILED;
    }
    atomic_store(&sigint_client, NULL);
    adc_client_free(ctl.client);
    if (sigint_seen && status != CTL_USAGE)
        status = CTL_INTERRUPTED;
    return status;
}
