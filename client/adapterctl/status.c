/* adapterctl health, and metrics: a short summary of the Prometheus text of GET /metrics. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

/* ==========================================================================================
 * health */

static int health_run(struct ctl *ctl, int argc, char **argv)
{
    struct adc_error e;
    json_t *j;
    ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 0, 0);
    struct adc_client *c = ctl_client(ctl);
    if (!c)
        return CTL_FAILED;
    if (adc_health(c, &j, &e) < 0)
        return ctl_fail(ctl, &e);
    if (ctl->json)
        ctl_print_json(j);
    else
        printf("%s\n", ctl_str(j, "status", "ok"));
    json_decref(j);
    return CTL_OK;
}

const struct ctl_command ctl_health = {
    .name = "health",
    .args = "",
    .summary = "is the server up and serving? (GET /health)",
    .help = "Prints 'ok' and exits 0 when the server serves; exits 1 with 'adapterd is loading'\n"
            "(or 'stopping') on stderr otherwise, or when it cannot be reached.\n",
    .run = health_run,
};

/* ==========================================================================================
 * The Prometheus text format: `name{label="value",...} value [timestamp]` lines, '#' lines
 * for HELP and TYPE. */

struct sample {
    char name[96];
    char labels[192]; /* between the braces, as written */
    double value;
};

struct samples {
    struct sample *v;
    size_t n, cap;
};

/* Reads every sample of text; lines that do not parse are skipped. 0 or -1 (out of memory). */
static int parse(const char *text, struct samples *s)
{
    for (const char *p = text; *p;) {
        const char *end = strchr(p, '\n');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        const char *q = p, *stop = p + len;
        p += end ? len + 1 : len;
        if (len == 0 || *q == '#')
            continue;
        struct sample x = {.value = 0};
        size_t n = strspn(q, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:");
        if (n == 0 || n >= sizeof(x.name) || q + n > stop)
            continue;
        memcpy(x.name, q, n);
        q += n;
        if (*q == '{') { /* up to the '}' outside quotes */
            const char *b = ++q;
            bool quoted = false;
            while (q < stop && (quoted || *q != '}')) {
                if (*q == '\\' && q + 1 < stop)
                    q++;
                else if (*q == '"')
                    quoted = !quoted;
                q++;
            }
            if (q >= stop || (size_t)(q - b) >= sizeof(x.labels))
                continue;
            memcpy(x.labels, b, (size_t)(q - b));
            q++;
        }
        char *vend;
        x.value = strtod(q, &vend);
        if (vend == q || vend > stop)
            continue;
        if (s->n == s->cap) {
            size_t cap = s->cap ? 2 * s->cap : 64;
            struct sample *v = realloc(s->v, cap * sizeof(*v));
            if (!v)
                return -1;
            s->v = v;
            s->cap = cap;
        }
        s->v[s->n++] = x;
    }
    return 0;
}

static const struct sample *find(const struct samples *s, const char *name, const char *labels)
{
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].name, name) && !strcmp(s->v[i].labels, labels))
            return &s->v[i];
    return NULL;
}

/* The value of label key (unescaped) into out; false if there is none. */
static bool label(const char *labels, const char *key, char *out, size_t size)
{
    size_t k = strlen(key), o = 0;
    for (const char *p = labels; (p = strstr(p, key)); p++) {
        if ((p != labels && p[-1] != ',' && p[-1] != ' ') || strncmp(p + k, "=\"", 2))
            continue;
        for (p += k + 2; *p && *p != '"' && o + 1 < size; p++) {
            if (*p == '\\' && p[1]) {
                p++;
                out[o++] = *p == 'n' ? '\n' : *p;
            } else
                out[o++] = *p;
        }
        out[o] = '\0';
        return true;
    }
    return false;
}

/* ==========================================================================================
 * metrics: the summary is JSON first (--json prints it), the text is written from it */

static json_t *number(double v)
{
    if (v == floor(v) && fabs(v) < 9e15)
        return json_integer((json_int_t)v);
    return json_real(v);
}

/* o[key] = the sample's value, when the server has it. */
static void put(json_t *o, const char *key, const struct samples *s, const char *name,
                const char *labels)
{
    const struct sample *x = find(s, name, labels);
    if (x)
        json_object_set_new(o, key, number(x->value));
}

/* An object of the values of one metric by one label (requests by code, adapters by name). */
static json_t *by_label(const struct samples *s, const char *name, const char *key)
{
    json_t *o = json_object();
    char v[128];
    for (size_t i = 0; i < s->n; i++)
        if (!strcmp(s->v[i].name, name) && label(s->v[i].labels, key, v, sizeof(v)))
            json_object_set_new(o, v, number(s->v[i].value));
    return o;
}

static json_t *summary(const struct samples *s)
{
    json_t *o = json_object(), *lat = json_object(), *kv = json_object(), *pc = json_object();
    json_t *ads = json_object();
    json_object_set_new(o, "requests", by_label(s, "adapterd_requests_total", "code"));
    put(lat, "count", s, "adapterd_request_duration_seconds_count", "");
    put(lat, "sum", s, "adapterd_request_duration_seconds_sum", "");
    json_object_set_new(o, "latency_seconds", lat);
    put(o, "completions", s, "adapterd_completions_total", "");
    put(o, "prompt_tokens", s, "adapterd_prompt_tokens_total", "");
    put(o, "generated_tokens", s, "adapterd_generated_tokens_total", "");
    put(o, "queue_depth", s, "adapterd_queue_depth", "");
    put(o, "running_sequences", s, "adapterd_running_sequences", "");
    put(kv, "used", s, "adapterd_kv_blocks", "state=\"used\"");
    put(kv, "total", s, "adapterd_kv_blocks", "state=\"total\"");
    put(kv, "free", s, "adapterd_kv_blocks", "state=\"free\"");
    put(kv, "cached", s, "adapterd_kv_blocks_cached", "");
    json_object_set_new(o, "kv_blocks", kv);
    put(o, "preemptions", s, "adapterd_preemptions_total", "");
    put(pc, "queries", s, "adapterd_prefix_cache_queries_total", "");
    put(pc, "hits", s, "adapterd_prefix_cache_hits_total", "");
    json_object_set_new(o, "prefix_cache", pc);
    put(o, "adapter_resident_bytes", s, "adapterd_adapter_resident_bytes", "");
    json_t *req = by_label(s, "adapterd_adapter_requests_total", "adapter");
    json_t *tok = by_label(s, "adapterd_adapter_tokens_total", "adapter");
    const char *name;
    json_t *v;
    json_object_foreach(req, name, v) json_object_set_new(
        ads, name, json_pack("{s:O, s:O*}", "requests", v, "tokens", json_object_get(tok, name)));
    json_decref(req);
    json_decref(tok);
    json_object_set_new(o, "adapters", ads);
    return o;
}

/* A number as text ("-" when it is missing). */
static const char *num(const json_t *v, char *buf, size_t size)
{
    if (json_is_integer(v))
        snprintf(buf, size, "%lld", (long long)json_integer_value(v));
    else if (json_is_number(v))
        snprintf(buf, size, "%g", json_number_value(v));
    else
        snprintf(buf, size, "-");
    return buf;
}

static void line(const char *label, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void line(const char *label, const char *fmt, ...)
{
    va_list ap;
    printf("%-18s ", label); /* one space at least */
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

static void print_summary(const json_t *o)
{
    char a[32], b[32], c[32], d[32];
    const char *key;
    json_t *v;
#define N(obj, k, buf) num(json_object_get(obj, k), buf, sizeof(buf))

    json_t *req = json_object_get(o, "requests"), *lat = json_object_get(o, "latency_seconds");
    printf("%-18s ", "requests");
    size_t i = 0;
    json_object_foreach(req, key, v) printf("%s%s %s", i++ ? ", " : "", key, num(v, a, sizeof(a)));
    printf("%s\n", i ? "" : "-");
    double n_lat = json_number_value(json_object_get(lat, "count"));
    if (n_lat > 0)
        line("mean latency", "%.3f s over %s requests",
             json_number_value(json_object_get(lat, "sum")) / n_lat, N(lat, "count", a));
    line("completions", "%s", N(o, "completions", a));
    line("prompt tokens", "%s", N(o, "prompt_tokens", a));
    line("generated tokens", "%s", N(o, "generated_tokens", a));
    line("queue depth", "%s", N(o, "queue_depth", a));
    line("running sequences", "%s", N(o, "running_sequences", a));
    json_t *kv = json_object_get(o, "kv_blocks"), *pc = json_object_get(o, "prefix_cache");
    line("kv blocks", "%s used of %s (%s free, %s cached)", N(kv, "used", a), N(kv, "total", b),
         N(kv, "free", c), N(kv, "cached", d));
    line("preemptions", "%s", N(o, "preemptions", a));
    line("prefix cache", "%s of %s prompt tokens found", N(pc, "hits", a), N(pc, "queries", b));
    ctl_human_bytes(c, sizeof(c), json_number_value(json_object_get(o, "adapter_resident_bytes")));
    line("adapters resident", "%s bytes (%s)", N(o, "adapter_resident_bytes", a), c);
    json_object_foreach(json_object_get(o, "adapters"), key, v)
    {
        char label[96];
        snprintf(label, sizeof(label), "adapter '%s'", key);
        line(label, "%s requests, %s tokens", N(v, "requests", a), N(v, "tokens", b));
    }
#undef N
}

static int metrics_run(struct ctl *ctl, int argc, char **argv)
{
    struct samples s = {0};
    struct adc_error e;
    char *text;
    ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 0, 0);
    struct adc_client *c = ctl_client(ctl);
    if (!c)
        return CTL_FAILED;
    if (adc_metrics(c, &text, NULL, &e) < 0)
        return ctl_fail(ctl, &e);
    int rc = parse(text, &s);
    free(text);
    if (rc < 0) {
        free(s.v);
        fprintf(stderr, "adapterctl: out of memory\n");
        return CTL_FAILED;
    }
    json_t *o = summary(&s);
    free(s.v);
    if (ctl->json)
        ctl_print_json(o);
    else
        print_summary(o);
    json_decref(o);
    return CTL_OK;
}

const struct ctl_command ctl_metrics = {
    .name = "metrics",
    .args = "",
    .summary = "a short summary of the server's metrics (GET /metrics)",
    .help = "Requests by status class, mean latency, completions and tokens, queue depth,\n"
            "running sequences, KV cache blocks (used of total, free, cached), preemptions,\n"
            "prefix-cache hits, resident adapter bytes, then requests and tokens per adapter.\n"
            "--json prints the same as an object. The whole text: curl URL/metrics.\n",
    .run = metrics_run,
};
