/* The HTTP server: libmicrohttpd with one thread per connection (a handler may block on the
 * engine), request bodies with size caps, authentication, routing, JSON errors, access log. */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "adapterd/registry.h"
#include "internal.h"

/* ==========================================================================================
 * Responses */

enum MHD_Result http_json(struct conn *c, unsigned status, json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!text) { /* out of memory, or a string that is not UTF-8: still answer */
        static const char oops[] = "{\"error\":{\"message\":\"internal error: cannot encode the "
                                   "response\",\"type\":\"server_error\",\"code\":500}}";
        text = strdup(oops);
        status = 500;
        if (!text)
            return MHD_NO;
    }
    size_t n = strlen(text);
    struct MHD_Response *r = MHD_create_response_from_buffer(n, text, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "application/json");
    MHD_add_response_header(r, "X-Request-Id", c->id);
    if (status == 429)
        MHD_add_response_header(r, "Retry-After", "1");
    c->status = (int)status;
    enum MHD_Result ret = MHD_queue_response(c->mc, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* Replaces each byte that does not start a complete, valid UTF-8 sequence with '?': messages
 * quote what the client sent (names, URLs, JSON error context) and may cut a character, and
 * jansson refuses to build a string that is not UTF-8. */
static void utf8_scrub(char *s)
{
    unsigned char *p = (unsigned char *)s;
    while (*p) {
        int n = *p < 0x80 ? 1 : (*p & 0xe0) == 0xc0 ? 2 : (*p & 0xf0) == 0xe0 ? 3
                : (*p & 0xf8) == 0xf0 ? 4 : 0;
        uint32_t cp = *p & (0x7fu >> n);
        int i = 1;
        while (i < n && (p[i] & 0xc0) == 0x80)
            cp = cp << 6 | (p[i++] & 0x3fu);
        uint32_t min = n == 2 ? 0x80 : n == 3 ? 0x800 : 0x10000; /* shorter: overlong */
        bool ok = n == 1 || (n > 1 && i == n && cp >= min && cp <= 0x10ffff &&
                             (cp < 0xd800 || cp > 0xdfff));
        if (!ok)
            *p = '?';
        p += ok ? n : 1;
    }
}

enum MHD_Result http_error(struct conn *c, unsigned status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    const char *type = status == 401 || status == 403 ? "authentication_error"
                       : status == 404                ? "not_found_error"
                       : status == 409                ? "conflict_error"
                       : status == 413                ? "request_too_large"
                       : status == 429                ? "rate_limit_error"
                       : status >= 500                ? "server_error"
                                                      : "invalid_request_error";
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    utf8_scrub(msg);
    return http_json(c, status,
                     json_pack("{s:{s:s, s:s, s:i}}", "error", "message", msg, "type", type,
                               "code", (int)status));
}

unsigned http_status_of(int rc)
{
    switch (rc) {
    case -EINVAL:
    case -ENOTSUP:
    case -E2BIG: /* the core's E2BIG is a context limit: a bad request, not a large body */
        return 400;
    case -ENOENT:
        return 404;
    case -EEXIST:
        return 409;
    case -EBUSY:
        return 429;
    case -ENOMEM:
    case -ESHUTDOWN:
    case -EAGAIN: /* e.g. a staging directory that vanished: retry */
    case -ENOSPC:
        return 503;
    default:
        return 500;
    }
}

json_t *http_body_json(struct conn *c, enum MHD_Result *ret)
{
    json_error_t jerr;
    json_t *j = c->body ? json_loadb(c->body, c->len, JSON_REJECT_DUPLICATES, &jerr) : NULL;
    if (!c->body) {
        *ret = http_error(c, 400, "the request needs a JSON body");
        return NULL;
    }
    if (!j) {
        *ret = http_error(c, 400, "malformed JSON at line %d, column %d: %s", jerr.line,
                          jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        *ret = http_error(c, 400, "the body must be a JSON object");
        return NULL;
    }
    return j;
}

bool http_client_gone(struct conn *c)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(c->mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci)
        return false;
    struct pollfd p = {.fd = ci->connect_fd, .events = POLLIN | POLLRDHUP};
    if (poll(&p, 1, 0) <= 0)
        return false;
    if (p.revents & (POLLRDHUP | POLLHUP | POLLERR))
        return true;
    char b;
    return (p.revents & POLLIN) && recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* ==========================================================================================
 * Metrics */

void metrics_init(struct metrics *m)
{
    memset(m, 0, sizeof(*m));
    pthread_mutex_init(&m->lock, NULL);
}

void metrics_fini(struct metrics *m)
{
    free(m->per_adapter);
    pthread_mutex_destroy(&m->lock);
}

void metrics_adapter(struct metrics *m, const char *name, uint64_t requests, uint64_t tokens)
{
    pthread_mutex_lock(&m->lock);
    size_t i;
    for (i = 0; i < m->n_adapters; i++)
        if (!strcmp(m->per_adapter[i].name, name))
            break;
    if (i == m->n_adapters && m->n_adapters < 100000) {
        if (m->n_adapters == m->cap_adapters) {
            size_t cap = m->cap_adapters ? 2 * m->cap_adapters : 16;
            struct adapter_count *p = realloc(m->per_adapter, cap * sizeof(*p));
            if (!p) {
                pthread_mutex_unlock(&m->lock);
                return;
            }
            m->per_adapter = p;
            m->cap_adapters = cap;
        }
        memset(&m->per_adapter[i], 0, sizeof(m->per_adapter[i]));
        snprintf(m->per_adapter[i].name, sizeof(m->per_adapter[i].name), "%s", name);
        m->n_adapters++;
    }
    if (i < m->n_adapters) {
        m->per_adapter[i].requests += requests;
        m->per_adapter[i].tokens += tokens;
    }
    pthread_mutex_unlock(&m->lock);
}

void metrics_completion(struct metrics *m, uint64_t prompt_tokens, uint64_t generated)
{
    pthread_mutex_lock(&m->lock);
    m->completions++;
    m->prompt_tokens += prompt_tokens;
    m->generated_tokens += generated;
    pthread_mutex_unlock(&m->lock);
}

static void metrics_request(struct metrics *m, int status, double seconds)
{
    static const double bounds[N_LATENCY_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                     0.5,   1,    2.5,   5,    10,  30};
    pthread_mutex_lock(&m->lock);
    if (status >= 100 && status < 600)
        m->requests[status / 100]++;
    int b = 0;
    while (b < N_LATENCY_BUCKETS && seconds > bounds[b])
        b++;
    m->latency_buckets[b]++;
    m->latency_sum += seconds;
    m->latency_count++;
    pthread_mutex_unlock(&m->lock);
}

/* ==========================================================================================
 * Dispatch */

/* Whether the request carries `Authorization: Bearer <want>` (the scheme in any case, RFC 9110
 * 11.1). Both keys are hashed to 32 bytes first and compared in constant time, so neither the
 * comparison nor the keys' lengths show through timing. */
static bool key_ok(struct conn *c, const char *want)
{
    unsigned char hw[32], hg[32];
    if (!want)
        return true;
    const char *auth = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "Authorization");
    if (!auth || strncasecmp(auth, "Bearer ", 7))
        return false;
    const char *got = auth + 7;
    while (*got == ' ')
        got++;
    crypto_generichash(hw, sizeof(hw), (const unsigned char *)want, strlen(want), NULL, 0);
    crypto_generichash(hg, sizeof(hg), (const unsigned char *)got, strlen(got), NULL, 0);
    return sodium_memcmp(hw, hg, sizeof(hw)) == 0;
}

static bool is_admin_route(const char *method, const char *url)
{
    return (!strncmp(url, "/v1/adapters/", 13) && strcmp(method, "GET")) ||
           !strcmp(url, "/v1/load_lora_adapter") || !strcmp(url, "/v1/unload_lora_adapter") ||
           !strncmp(url, "/v1/fine_tuning", 15) || !strcmp(url, "/v1/files") ||
           !strncmp(url, "/v1/files/", 10);
}

/* Answered without a key, and while the model loads: /health, and the dashboard's page (it
 * holds no data; the API calls it makes carry the key it asks for). */
static bool is_public(const char *method, const char *url)
{
    return !strcmp(url, "/health") || (!strcmp(url, "/") && !strcmp(method, "GET"));
}

/* 0 when the request may go on, else 401 (no valid key) or 403 (not the admin key). */
static int auth_status(struct conn *c, const char *method, const char *url)
{
    struct ad_http *h = c->h;
    if (!is_public(method, url) && !key_ok(c, h->cfg.api_key) && !key_ok(c, h->cfg.admin_key))
        return 401;
    if (is_admin_route(method, url) &&
        !key_ok(c, h->cfg.admin_key ? h->cfg.admin_key : h->cfg.api_key))
        return 403;
    return 0;
}

static enum MHD_Result dispatch(struct conn *c, const char *url, const char *method)
{
    bool get = !strcmp(method, "GET"), post = !strcmp(method, "POST");
    struct ad_http *h = c->h;

    int denied = auth_status(c, method, url);
    if (denied == 401)
        return http_error(c, 401, "missing or wrong API key (Authorization: Bearer ...)");
    if (denied == 403)
        return http_error(c, 403, "this route needs the admin key");
    if (!atomic_load(&h->ready) && !is_public(method, url))
        return http_error(c, 503, "the model is still loading");

    if (!strcmp(url, "/health") && get)
        return route_health(c);
    if (!strcmp(url, "/") && get)
        return route_dashboard(c);
    if (!strcmp(url, "/metrics") && get)
        return route_metrics(c);
    if (!strcmp(url, "/v1/models") && get)
        return route_models(c);
    if (!strcmp(url, "/v1/completions") && post)
        return route_completions(c, false);
    if (!strcmp(url, "/v1/chat/completions") && post)
        return route_completions(c, true);
    if (!strcmp(url, "/tokenize") && post)
        return route_tokenize(c);
    if (!strcmp(url, "/detokenize") && post)
        return route_detokenize(c);
    if (!strcmp(url, "/v1/adapters") && get)
        return route_adapters_list(c);
    if (!strncmp(url, "/v1/files", 9) || !strncmp(url, "/v1/fine_tuning/", 16))
        return route_finetune(c, url, method);
    if (!strncmp(url, "/v1/adapters/", 13) && strstr(url + 13, "/files/") && get) {
        char name[80];
        const char *files = strstr(url + 13, "/files/");
        snprintf(name, sizeof(name), "%.*s", (int)(files - url - 13 < 79 ? files - url - 13 : 79),
                 url + 13);
        return route_adapter_file(c, name, files + 7);
    }
    if (!strncmp(url, "/v1/adapters/", 13) && url[13]) {
        const char *name = url + 13;
        if (get)
            return route_adapter_get(c, name);
        if (!strcmp(method, "DELETE"))
            return route_adapter_delete(c, name);
        if (!strcmp(method, "PUT"))
            return route_adapter_put(c, name);
        return http_error(c, 405, "method %s is not allowed on %s", method, url);
    }
    if (!strcmp(url, "/v1/load_lora_adapter") && post)
        return route_vllm_load(c);
    if (!strcmp(url, "/v1/unload_lora_adapter") && post)
        return route_vllm_unload(c);
    return http_error(c, 404, "no route %s %s", method, url);
}

/* Counts a request's Content-Length and Transfer-Encoding headers. */
struct framing {
    int n_length, n_coding;
    const char *coding;
};

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    struct framing *f = cls;
    (void)kind;
    if (!strcasecmp(key, "Content-Length"))
        f->n_length++;
    if (!strcasecmp(key, "Transfer-Encoding")) {
        f->n_coding++;
        f->coding = value;
    }
    return MHD_YES;
}

/* Whether this request's body streams to disk (a multipart adapter upload) rather than to
 * memory. */
static bool is_multipart(struct conn *c)
{
    const char *ct = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "Content-Type");
    return ct && !strncasecmp(ct, "multipart/form-data", 19);
}

static bool is_upload(struct conn *c, const char *method, const char *url)
{
    return !strcmp(method, "PUT") && !strncmp(url, "/v1/adapters/", 13) && is_multipart(c);
}

/* A training file's upload (POST /v1/files), streamed to the jobs module. */
static bool is_file_upload(struct conn *c, const char *method, const char *url)
{
    return !strcmp(method, "POST") && !strcmp(url, "/v1/files") && is_multipart(c);
}

#define SMALL_REFUSED_BODY (1u << 20)

/* The answer to a request that has a body, decided from its headers before libmicrohttpd reads
 * the body or sends "100 Continue": framing that could be read two ways (RFC 9112 6.3: several
 * Content-Length headers, or one beside Transfer-Encoding, the ground of request smuggling
 * behind a proxy), a transfer coding other than chunked (501), a declared length above the
 * route's limit (413), a missing key (401/403), a model still loading (503). A response
 * queued in the first call closes the connection after it, and the body is never read.
 * Returns 0 when the request may go on, else the HTTP status it got. A missing key with a body
 * of at most SMALL_REFUSED_BODY bytes is answered after the body, which is dropped. */
static int early_answer(struct conn *c, const char *url, const char *method)
{
    struct ad_http *h = c->h;
    struct framing f = {0};
    MHD_get_connection_values(c->mc, MHD_HEADER_KIND, count_framing, &f);
    const char *cl = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "Content-Length");
    unsigned long long declared = cl ? strtoull(cl, NULL, 10) : 0;

    if (f.n_length > 1) {
        http_error(c, 400, "the request has %d Content-Length headers (RFC 9112 6.3)",
                   f.n_length);
        return 400;
    }
    if (f.n_length && f.n_coding) {
        http_error(c, 400, "the request has both Content-Length and Transfer-Encoding "
                   "(RFC 9112 6.3)");
        return 400;
    }
    if (f.n_coding > 1 || (f.n_coding && strcasecmp(f.coding, "chunked"))) {
        http_error(c, 501, "Transfer-Encoding '%.40s' is not supported (chunked is)",
                   f.n_coding > 1 ? "several" : f.coding);
        return 501;
    }
    if (declared == 0 && !f.n_coding)
        return 0; /* no body: answered in the last call, the connection kept alive */
    size_t limit = is_upload(c, method, url) || is_file_upload(c, method, url)
                       ? h->cfg.max_upload : h->cfg.max_body;
    if (declared > limit) {
        http_error(c, 413, "the request body (%llu bytes) is larger than the limit of %zu bytes",
                   declared, limit);
        return 413;
    }
    int denied = auth_status(c, method, url);
    if (denied && !f.n_coding && declared <= SMALL_REFUSED_BODY) {
        /* read and dropped, then answered (dispatch): answered now, the connection would close
         * with the body unread, and the client's TCP stack might lose the answer to the reset */
        c->discard = true;
        return 0;
    }
    if (denied) {
        http_error(c, (unsigned)denied, denied == 401
                       ? "missing or wrong API key (Authorization: Bearer ...)"
                       : "this route needs the admin key");
        return denied;
    }
    if (!atomic_load(&h->ready) && strcmp(url, "/health")) {
        http_error(c, 503, "the model is still loading");
        return 503;
    }
    return 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *mc, const char *url,
                                  const char *method, const char *version,
                                  const char *upload_data, size_t *upload_data_size,
                                  void **con_cls)
{
    struct ad_http *h = cls;
    struct conn *c = *con_cls;
    (void)version;

    if (!c) {
        c = calloc(1, sizeof(*c));
        if (!c)
            return MHD_NO;
        c->h = h;
        c->mc = mc;
        c->fd = -1;
        c->t0 = ad_now();
        snprintf(c->id, sizeof(c->id), "req-%llu",
                 (unsigned long long)atomic_fetch_add(&h->next_id, 1) + 1);
        atomic_fetch_add(&h->in_flight, 1);
        *con_cls = c;
        conns_request_begins(h, mc);
        if (early_answer(c, url, method))
            return MHD_YES;
        /* uploads stream to disk, and only from a client holding the admin key, to a valid
         * name (route_adapter_put answers the other cases) */
        if (is_upload(c, method, url) && auth_status(c, method, url) == 0 &&
            atomic_load(&h->ready) && ad_registry_name_ok(url + 13)) {
            if (upload_begin(c, &c->upload_err) < 0)
                c->upload_rc = c->upload_err.code ? c->upload_err.code : -EIO;
        }
        if (is_file_upload(c, method, url) && auth_status(c, method, url) == 0 &&
            atomic_load(&h->ready) && h->deps.jobs) {
            if (files_upload_begin(c, &c->upload_err) < 0)
                c->upload_rc = c->upload_err.code ? c->upload_err.code : -EIO;
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        size_t n = *upload_data_size;
        *upload_data_size = 0;
        conns_body(h, mc, n);
        /* Past the limit only without a declared length (chunked): no response can be sent
         * from here, so the connection is closed instead of reading on. */
        if ((c->pp ? c->uploaded : c->len) + n > (c->pp ? h->cfg.max_upload : h->cfg.max_body))
            return MHD_NO;
        if (c->discard) {
            c->len += n; /* counted against the limit, not kept */
            return MHD_YES;
        }
        if (c->pp) {
            c->uploaded += n;
            if (c->upload_rc == 0)
                MHD_post_process(c->pp, upload_data, n);
            return MHD_YES;
        }
        if (c->len + n + 1 > c->cap) {
            size_t cap = c->cap ? c->cap : 4096;
            while (cap < c->len + n + 1)
                cap *= 2;
            char *b = realloc(c->body, cap);
            if (!b)
                return MHD_NO;
            c->body = b;
            c->cap = cap;
        }
        memcpy(c->body + c->len, upload_data, n);
        c->len += n;
        c->body[c->len] = '\0';
        return MHD_YES;
    }
    conns_answering(h, mc);
    return dispatch(c, url, method);
}

static void on_completed(void *cls, struct MHD_Connection *mc, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct ad_http *h = cls;
    struct conn *c = *con_cls;
    (void)mc;
    if (!c)
        return;
    double dt = ad_now() - c->t0;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    char addr[64] = "-";
    if (ci && ci->client_addr && ci->client_addr->sa_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)ci->client_addr)->sin_addr, addr,
                  sizeof(addr));
    log_info("%s %s status=%d adapter=%s tokens=%d time=%.3fs%s", c->id, addr, c->status,
             c->adapter[0] ? c->adapter : "-", c->n_tokens, dt,
             toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? "" : " (client gone)");
    metrics_request(&h->metrics, c->status, dt);
    conns_request_ends(h, mc);
    upload_abort(c);
    free(c->body);
    free(c);
    *con_cls = NULL;
    atomic_fetch_sub(&h->in_flight, 1);
}

/* ==========================================================================================
 * Lifetime */

static int hexval(char ch)
{
    return ch >= '0' && ch <= '9'   ? ch - '0'
           : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
           : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10
                                    : -1;
}

/* Decodes %XX in a URL in place, as libmicrohttpd's own unescaper does, except %00: a NUL would
 * cut the C string the handlers see (PUT /v1/adapters/a%00b would name 'a'), so it stays as the
 * three characters and fails whatever validation the route does. Returns the new length. */
static size_t unescape(void *cls, struct MHD_Connection *mc, char *s)
{
    char *out = s;
    (void)cls;
    (void)mc;
    for (const char *p = s; *p; p++) {
        int hi, lo;
        if (p[0] == '%' && (hi = hexval(p[1])) >= 0 && (lo = hexval(p[2])) >= 0 &&
            (hi | lo) != 0) {
            *out++ = (char)(hi << 4 | lo);
            p += 2;
        } else {
            *out++ = *p;
        }
    }
    *out = '\0';
    return (size_t)(out - s);
}

/* libmicrohttpd's own messages (mostly clients that went away) at debug level. */
static void mhd_logger(void *cls, const char *fmt, va_list ap)
{
    char msg[512];
    (void)cls;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && msg[n - 1] == '\n')
        msg[--n] = '\0';
    log_debug("http: %s", msg);
}

int ad_http_start(const struct ad_http_config *cfg, const struct ad_http_deps *deps,
                  struct ad_http **ret, struct ad_err *err)
{
    struct ad_http *h = calloc(1, sizeof(*h));
    struct sockaddr_storage ss = {0};
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;

    if (!h || sodium_init() < 0) {
        free(h);
        return ad_err_set(err, -ENOMEM, "out of memory");
    }
    h->cfg = *cfg;
    if (deps)
        h->deps = *deps;
    if (conns_start(h) < 0) {
        free(h);
        return ad_err_set(err, -EAGAIN, "cannot start a thread");
    }
    metrics_init(&h->metrics);
    if (cfg->listen_fd < 0) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        if (inet_pton(AF_INET, cfg->host, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET;
            s4->sin_port = htons((uint16_t)cfg->port);
        } else if (inet_pton(AF_INET6, cfg->host, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6;
            s6->sin6_port = htons((uint16_t)cfg->port);
            flags |= MHD_USE_IPv6;
        } else {
            conns_stop_reaper(h);
            conns_fini(h);
            metrics_fini(&h->metrics);
            free(h);
            return ad_err_set(err, -EINVAL, "listen address '%s' is not a numeric IPv4 or IPv6 "
                              "address", cfg->host);
        }
    }
    h->daemon = MHD_start_daemon(
        flags, (uint16_t)(cfg->listen_fd < 0 ? cfg->port : 0), NULL, NULL, on_request, h,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, h, MHD_OPTION_NOTIFY_CONNECTION,
        conns_notify, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
        MHD_OPTION_UNESCAPE_CALLBACK, unescape, NULL, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)cfg->max_connections, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)cfg->idle_timeout,
        cfg->listen_fd >= 0 ? MHD_OPTION_LISTEN_SOCKET : MHD_OPTION_SOCK_ADDR,
        cfg->listen_fd >= 0 ? (intptr_t)cfg->listen_fd : (intptr_t)&ss, MHD_OPTION_END);
    if (!h->daemon) {
        conns_stop_reaper(h);
        conns_fini(h);
        metrics_fini(&h->metrics);
        free(h);
        return ad_err_set(err, -EADDRINUSE, "cannot listen on %s:%d (in use, or not allowed)",
                          cfg->host, cfg->port);
    }
    atomic_store(&h->ready, deps != NULL);
    *ret = h;
    return 0;
}

void ad_http_stop(struct ad_http *h, double grace_seconds)
{
    if (!h)
        return;
    atomic_store(&h->stopping, true);
    MHD_quiesce_daemon(h->daemon); /* stop accepting */
    double t0 = ad_now();
    while (atomic_load(&h->in_flight) > 0 && ad_now() - t0 < grace_seconds &&
           !atomic_load(&h->hurry))
        usleep(20000);
    atomic_store(&h->cancel_all, true); /* handlers still waiting cancel their sequences */
    conns_stop_reaper(h);
    MHD_stop_daemon(h->daemon); /* joins the connection threads */
    conns_fini(h);
    metrics_fini(&h->metrics);
    free(h);
}

void ad_http_hurry(struct ad_http *h)
{
    atomic_store(&h->hurry, true);
}

int ad_http_port(const struct ad_http *h)
{
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->daemon, MHD_DAEMON_INFO_BIND_PORT);
    return di ? di->port : -1;
}

void ad_http_serve(struct ad_http *h, const struct ad_http_deps *deps)
{
    h->deps = *deps;
    atomic_store(&h->ready, true); /* publishes deps to the handler threads */
}
