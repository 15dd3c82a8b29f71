/* The client handle, one HTTP exchange over libcurl (errors from the transport and from the
 * server's answer), and the routes that are one JSON request each. */
#include "adapterd-client.h" /* first: the header compiles alone */

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define USER_AGENT "adapterd-client/" ADC_VERSION

/* ==========================================================================================
 * Errors and buffers */

int adcp_error(struct adc_error *err, int rc, long status, const char *fmt, ...)
{
    if (!err)
        return rc;
    va_list ap;
    memset(err, 0, sizeof(*err));
    err->rc = rc;
    err->status = status;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
    return rc;
}

int adcp_buf_add(struct adcp_buf *b, const void *p, size_t n, size_t max)
{
    if (n > max || b->len > max - n)
        return -E2BIG;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return -ENOMEM;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int adcp_status_rc(long status)
{
    switch (status) {
    case 400:
        return -EINVAL;
    case 401:
        return -EACCES;
    case 403:
        return -EPERM;
    case 404:
        return -ENOENT;
    case 405:
        return -EOPNOTSUPP;
    case 409:
        return -EEXIST;
    case 413:
        return -E2BIG;
    case 429:
        return -EBUSY;
    case 503:
        return -EAGAIN;
    default:
        return status >= 400 && status < 500 ? -EINVAL : -EIO;
    }
}

int adcp_error_object(struct adc_error *err, long status, const json_t *e)
{
    int rc = adcp_status_rc(status);
    const char *msg = json_string_value(json_is_object(e) ? json_object_get(e, "message") : e);
    adcp_error(err, rc, status, "%s", msg ? msg : "an error without a message");
    if (err && json_is_object(e)) {
        json_t *type = json_object_get(e, "type"), *code = json_object_get(e, "code");
        if (json_is_string(type))
            snprintf(err->type, sizeof(err->type), "%s", json_string_value(type));
        if (json_is_integer(code))
            snprintf(err->code, sizeof(err->code), "%lld", (long long)json_integer_value(code));
        else if (json_is_string(code))
            snprintf(err->code, sizeof(err->code), "%s", json_string_value(code));
    }
    return rc;
}

/* Fills err from an error answer: {"error": {"message", "type", "code"}} (OpenAI, adapterd),
 * {"detail": "..."} (FastAPI servers), else the text itself. */
static int answer_error(const struct adcp_call *k, struct adc_error *err)
{
    int rc = adcp_status_rc(k->status);
    json_t *j = k->answer.len ? json_loadb(k->answer.data, k->answer.len, 0, NULL) : NULL;
    json_t *e = json_object_get(j, "error");
    const char *detail = json_string_value(json_object_get(j, "detail"));
    if (e)
        adcp_error_object(err, k->status, e);
    else if (detail)
        adcp_error(err, rc, k->status, "%s", detail);
    else if (k->answer.len && !j)
        adcp_error(err, rc, k->status, "HTTP %ld: %.200s", k->status, k->answer.data);
    else
        adcp_error(err, rc, k->status, "HTTP %ld from %s %s", k->status, k->method, k->path);
    json_decref(j);
    return rc;
}

/* The errno for a transfer that failed without an answer. */
static int transport_rc(struct adc_client *c, CURLcode cc)
{
    long os_errno = 0;
    switch (cc) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
        return -EINVAL;
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return -EHOSTUNREACH;
    case CURLE_COULDNT_CONNECT:
        curl_easy_getinfo(c->curl, CURLINFO_OS_ERRNO, &os_errno);
        return os_errno > 0 ? -(int)os_errno : -ECONNREFUSED;
    case CURLE_OPERATION_TIMEDOUT:
        return -ETIMEDOUT;
    case CURLE_OUT_OF_MEMORY:
        return -ENOMEM;
    case CURLE_ABORTED_BY_CALLBACK:
        return -ECANCELED;
    case CURLE_GOT_NOTHING:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
        return -ECONNRESET;
    case CURLE_PARTIAL_FILE:
        return -EPROTO;
    default:
        return -EIO;
    }
}

/* ==========================================================================================
 * The client */

int adc_client_new(const char *url, const char *api_key, struct adc_client **ret,
                   struct adc_error *err)
{
    struct adc_client *c = NULL;
    CURLU *u = NULL;
    char *scheme = NULL;
    int rc;

    if (!url || !*url)
        return adcp_error(err, -EINVAL, 0, "no server URL");
    rc = -ENOMEM;
    u = curl_url();
    if (!u)
        goto fail;
    CURLUcode uc = curl_url_set(u, CURLUPART_URL, url, 0);
    if (uc == CURLUE_OK)
        uc = curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
    if (uc == CURLUE_OUT_OF_MEMORY)
        goto fail;
    if (uc != CURLUE_OK || (strcmp(scheme, "http") && strcmp(scheme, "https"))) {
        rc = adcp_error(err, -EINVAL, 0, "'%.200s' is not an http:// or https:// URL%s%s", url,
                        uc != CURLUE_OK ? ": " : "", uc != CURLUE_OK ? curl_url_strerror(uc) : "");
        goto fail;
    }
    rc = -ENOMEM;
    c = calloc(1, sizeof(*c));
    if (!c)
        goto fail;
    curl_global_init(CURL_GLOBAL_DEFAULT); /* counted: adc_client_free() undoes it */
    c->connect_ms = 10000;
    atomic_init(&c->cancelled, 0);
    c->curl = curl_easy_init();
    c->multi = curl_multi_init();
    c->base = strdup(url);
    if (!c->curl || !c->multi || !c->base)
        goto fail;
    /* the API's paths start at the root: drop a trailing '/' and "/v1" */
    size_t n = strlen(c->base);
    while (n > 0 && c->base[n - 1] == '/')
        c->base[--n] = '\0';
    if (n >= 3 && !strcmp(c->base + n - 3, "/v1"))
        c->base[n -= 3] = '\0';
    if (api_key && *api_key) {
        size_t len = strlen(api_key) + 32;
        c->auth = malloc(len);
        if (!c->auth)
            goto fail;
        snprintf(c->auth, len, "Authorization: Bearer %s", api_key);
    }
    curl_free(scheme);
    curl_url_cleanup(u);
    *ret = c;
    return 0;
fail:
    adc_client_free(c);
    curl_free(scheme);
    curl_url_cleanup(u);
    return rc == -ENOMEM ? adcp_error(err, rc, 0, "out of memory") : rc;
}

void adc_client_free(struct adc_client *c)
{
    if (!c)
        return;
    if (c->multi)
        curl_multi_cleanup(c->multi);
    if (c->curl)
        curl_easy_cleanup(c->curl);
    if (c->auth) /* the key should not linger in freed memory */
        memset(c->auth, 0, strlen(c->auth));
    free(c->auth);
    free(c->base);
    free(c);
    curl_global_cleanup();
}

void adc_client_set_timeouts(struct adc_client *c, long connect_ms, long total_ms)
{
    c->connect_ms = connect_ms;
    c->total_ms = total_ms;
}

void adc_client_cancel(struct adc_client *c)
{
    atomic_store(&c->cancelled, 1);
}

void adc_client_clear_cancel(struct adc_client *c)
{
    atomic_store(&c->cancelled, 0);
}

/* ==========================================================================================
 * One exchange */

static size_t on_write(char *data, size_t size, size_t nmemb, void *ud)
{
    struct adcp_call *k = ud;
    size_t n = size * nmemb;
    if (atomic_load(&k->c->cancelled))
        return 0;
    if (!k->status)
        curl_easy_getinfo(k->c->curl, CURLINFO_RESPONSE_CODE, &k->status);
    if (k->sink && k->status >= 200 && k->status < 300) {
        int rc = k->sink(k->sink_ud, data, n);
        if (rc < 0) {
            k->stop_rc = rc;
            return 0;
        }
        return n;
    }
    int rc = adcp_buf_add(&k->answer, data, n, ADCP_MAX_ANSWER);
    if (rc < 0) {
        k->stop_rc = adcp_error(k->err, rc, k->status,
                                rc == -E2BIG ? "the answer is larger "
                                               "than %zu MiB"
                                             : "out of memory",
                                ADCP_MAX_ANSWER >> 20);
        return 0;
    }
    return n;
}

static int on_progress(void *ud, curl_off_t dl_total, curl_off_t dl_now, curl_off_t ul_total,
                       curl_off_t ul_now)
{
    struct adcp_call *k = ud;
    if (atomic_load(&k->c->cancelled))
        return 1;
    if (!k->progress)
        return 0;
    bool up = k->mime || k->body;
    curl_off_t now = up ? ul_now : dl_now, total = up ? ul_total : dl_total;
    if (k->progress(k->progress_ud, now > 0 ? (uint64_t)now : 0, total > 0 ? (uint64_t)total : 0)) {
        k->stop_rc = adcp_error(k->err, -ECANCELED, 0, "stopped by the progress callback");
        return 1;
    }
    return 0;
}

/* Appends line to *list; false when out of memory (the list stays whole). */
static bool add_header(struct curl_slist **list, const char *line)
{
    struct curl_slist *l = curl_slist_append(*list, line);
    if (l)
        *list = l;
    return l != NULL;
}

/* Runs the transfer through the multi handle, polling at most 100 ms at a time so that a
 * cancel from another thread is seen soon (a signal interrupts the poll at once). */
static CURLcode run(struct adc_client *c)
{
    CURLcode cc = CURLE_OK;
    int running = 0;
    if (curl_multi_add_handle(c->multi, c->curl) != CURLM_OK)
        return CURLE_OUT_OF_MEMORY;
    for (;;) {
        if (curl_multi_perform(c->multi, &running) != CURLM_OK) {
            cc = CURLE_OUT_OF_MEMORY;
            break;
        }
        if (!running)
            break;
        if (atomic_load(&c->cancelled)) {
            cc = CURLE_ABORTED_BY_CALLBACK;
            break;
        }
        if (curl_multi_poll(c->multi, NULL, 0, 100, NULL) != CURLM_OK) {
            cc = CURLE_OUT_OF_MEMORY;
            break;
        }
    }
    for (int left = 1; cc == CURLE_OK && left > 0;) {
        CURLMsg *m = curl_multi_info_read(c->multi, &left);
        if (!m)
            break;
        if (m->msg == CURLMSG_DONE && m->easy_handle == c->curl)
            cc = m->data.result;
    }
    curl_multi_remove_handle(c->multi, c->curl); /* mid-transfer: the connection is closed */
    return cc;
}

int adcp_perform(struct adc_client *c, struct adcp_call *k, struct adc_error *err)
{
    struct curl_slist *headers = NULL;
    char *url = NULL;
    int rc;

    k->c = c;
    k->err = err;
    k->status = 0;
    k->stop_rc = 0;
    if (atomic_load(&c->cancelled))
        return adcp_error(err, -ECANCELED, 0, "cancelled");
    size_t len = strlen(c->base) + strlen(k->path) + 1;
    url = malloc(len);
    if (!url)
        goto oom;
    snprintf(url, len, "%s%s", c->base, k->path);
    char accept[128];
    snprintf(accept, sizeof(accept), "Accept: %s", k->accept ? k->accept : "*/*");
    if (!add_header(&headers, "User-Agent: " USER_AGENT) || !add_header(&headers, accept) ||
        (c->auth && !add_header(&headers, c->auth)) ||
        (k->body && !add_header(&headers, "Content-Type: application/json")))
        goto oom;

    CURL *e = c->curl;
    curl_easy_reset(e); /* keeps the open connection */
    c->errbuf[0] = '\0';
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, headers);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, c->errbuf);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, c->connect_ms);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, c->total_ms);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, k);
    curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(e, CURLOPT_XFERINFODATA, k);
    if (k->mime)
        curl_easy_setopt(e, CURLOPT_MIMEPOST, k->mime);
    else if (k->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, k->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)k->body_len);
    }
    if (strcmp(k->method, k->body || k->mime ? "POST" : "GET"))
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, k->method);

    CURLcode cc = run(c);
    if (!k->status)
        curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &k->status);
    if (k->stop_rc < 0) /* a sink or a callback stopped it and said why */
        rc = k->stop_rc;
    else if (cc != CURLE_OK && atomic_load(&c->cancelled))
        rc = adcp_error(err, -ECANCELED, k->status, "cancelled");
    else if (cc != CURLE_OK) {
        rc = transport_rc(c, cc);
        adcp_error(err, rc, k->status, "%s %s: %s%s%s%s", k->method, url,
                   c->errbuf[0] ? c->errbuf : curl_easy_strerror(cc),
                   cc == CURLE_COULDNT_CONNECT ? " (" : "",
                   cc == CURLE_COULDNT_CONNECT ? strerror(-rc) : "",
                   cc == CURLE_COULDNT_CONNECT ? ")" : "");
    } else if (k->status < 200 || k->status >= 300)
        rc = answer_error(k, err);
    else
        rc = 0;
    curl_slist_free_all(headers);
    free(url);
    return rc;
oom:
    curl_slist_free_all(headers);
    free(url);
    return adcp_error(err, -ENOMEM, 0, "out of memory");
}

void adcp_call_fini(struct adcp_call *k)
{
    free(k->answer.data);
    k->answer.data = NULL;
    k->answer.len = k->answer.cap = 0;
}

char *adcp_path(struct adc_client *c, const char *prefix, const char *name, const char *suffix)
{
    char *esc = curl_easy_escape(c->curl, name, 0);
    if (!esc)
        return NULL;
    size_t len = strlen(prefix) + strlen(esc) + strlen(suffix) + 1;
    char *p = malloc(len);
    if (p)
        snprintf(p, len, "%s%s%s", prefix, esc, suffix);
    curl_free(esc);
    return p;
}

int adcp_readable(const char *path, struct adc_error *err)
{
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc = fd < 0 ? -errno : fstat(fd, &st) < 0 ? -errno : S_ISREG(st.st_mode) ? 0 : -EISDIR;
    if (fd >= 0)
        close(fd);
    if (rc < 0)
        return adcp_error(err, rc, 0, "%s: %s", path,
                          rc == -EISDIR ? "not a regular file" : strerror(-rc));
    return 0;
}

int adcp_mime_file(curl_mime *mime, const char *name, const char *path, const char *type)
{
    curl_mimepart *part = curl_mime_addpart(mime);
    if (!part || curl_mime_name(part, name) != CURLE_OK ||
        curl_mime_filedata(part, path) != CURLE_OK || curl_mime_type(part, type) != CURLE_OK)
        return -ENOMEM;
    return 0;
}

json_t *adcp_with_stream(const json_t *request, bool stream, int *ret_rc)
{
    json_t *r = json_is_object(request) ? json_copy((json_t *)request) : NULL;
    *ret_rc = json_is_object(request) ? -ENOMEM : -EINVAL;
    if (r && json_object_set_new(r, "stream", json_boolean(stream)) < 0) {
        json_decref(r);
        return NULL;
    }
    return r;
}

/* ==========================================================================================
 * Any route */

int adcp_json_call(struct adc_client *c, struct adcp_call *k, const json_t *body, json_t **ret,
                   struct adc_error *err)
{
    if (!k->accept)
        k->accept = "application/json";
    char *text = NULL;
    json_t *j = NULL;
    int rc;

    if (body) {
        text = json_dumps(body, JSON_COMPACT);
        if (!text)
            return adcp_error(err, -EINVAL, 0, "the request cannot be written as JSON");
        k->body = text;
        k->body_len = strlen(text);
    }
    rc = adcp_perform(c, k, err);
    if (rc >= 0 && k->answer.len) {
        json_error_t jerr;
        j = json_loadb(k->answer.data, k->answer.len, 0, &jerr);
        if (!j)
            rc = adcp_error(err, -EPROTO, k->status, "%s %s: the answer is not JSON (%s)",
                            k->method, k->path, jerr.text);
    }
    if (rc >= 0 && ret)
        *ret = j;
    else
        json_decref(j);
    free(text);
    return rc;
}

int adc_request(struct adc_client *c, const char *method, const char *path, const json_t *body,
                json_t **ret, struct adc_error *err)
{
    struct adcp_call k = {.method = method, .path = path};
    int rc = adcp_json_call(c, &k, body, ret, err);
    adcp_call_fini(&k);
    return rc;
}

int adc_request_text(struct adc_client *c, const char *method, const char *path, char **ret,
                     size_t *ret_len, struct adc_error *err)
{
    struct adcp_call k = {.method = method, .path = path};
    int rc = adcp_perform(c, &k, err);
    if (rc >= 0 && !k.answer.data)
        rc = adcp_buf_add(&k.answer, "", 0, 1) < 0 ? adcp_error(err, -ENOMEM, 0, "out of memory")
                                                   : 0;
    if (rc >= 0) {
        *ret = k.answer.data;
        if (ret_len)
            *ret_len = k.answer.len;
        k.answer.data = NULL;
    }
    adcp_call_fini(&k);
    return rc;
}

/* ==========================================================================================
 * Server */

int adc_health(struct adc_client *c, json_t **ret, struct adc_error *err)
{
    struct adcp_call k = {.method = "GET", .path = "/health"};
    json_t *j = NULL;
    int rc = adcp_json_call(c, &k, NULL, &j, err);
    if (rc == -EAGAIN) { /* 503 {"status": "loading" | "stopping"} */
        json_t *b = k.answer.len ? json_loadb(k.answer.data, k.answer.len, 0, NULL) : NULL;
        const char *s = json_string_value(json_object_get(b, "status"));
        if (s)
            adcp_error(err, rc, k.status, "adapterd is %.100s", s);
        json_decref(b);
    } else if (rc >= 0) {
        const char *s = json_string_value(json_object_get(j, "status"));
        if (!s || strcmp(s, "ok"))
            rc =
                adcp_error(err, s ? -EAGAIN : -EPROTO, k.status,
                           s ? "adapterd is %.100s" : "GET /health: the answer has no \"status\"%s",
                           s ? s : "");
    }
    if (rc >= 0 && ret)
        *ret = json_incref(j);
    json_decref(j);
    adcp_call_fini(&k);
    return rc;
}

int adc_metrics(struct adc_client *c, char **ret, size_t *ret_len, struct adc_error *err)
{
    return adc_request_text(c, "GET", "/metrics", ret, ret_len, err);
}

int adc_models(struct adc_client *c, json_t **ret, struct adc_error *err)
{
    return adc_request(c, "GET", "/v1/models", NULL, ret, err);
}

int adc_tokenize(struct adc_client *c, const char *model, const char *text, int add_special,
                 json_t **ret, struct adc_error *err)
{
    json_t *req = json_pack("{s:s}", "prompt", text ? text : "");
    if (req && model)
        json_object_set_new(req, "model", json_string(model));
    if (req && add_special >= 0)
        json_object_set_new(req, "add_special_tokens", json_boolean(add_special));
    if (!req)
        return adcp_error(err, text ? -ENOMEM : -EINVAL, 0, text ? "out of memory" : "no text");
    int rc = adc_request(c, "POST", "/tokenize", req, ret, err);
    json_decref(req);
    return rc;
}

/* ==========================================================================================
 * Adapters: list, show, delete (upload and download are in adapters.c) */

int adc_adapters_list(struct adc_client *c, json_t **ret, struct adc_error *err)
{
    return adc_request(c, "GET", "/v1/adapters", NULL, ret, err);
}

/* `method /v1/adapters/<name>` */
static int adapter_call(struct adc_client *c, const char *method, const char *name, json_t **ret,
                        struct adc_error *err)
{
    char *path = adcp_path(c, "/v1/adapters/", name, "");
    if (!path)
        return adcp_error(err, -ENOMEM, 0, "out of memory");
    int rc = adc_request(c, method, path, NULL, ret, err);
    free(path);
    return rc;
}

int adc_adapter_get(struct adc_client *c, const char *name, json_t **ret, struct adc_error *err)
{
    return adapter_call(c, "GET", name, ret, err);
}

int adc_adapter_delete(struct adc_client *c, const char *name, struct adc_error *err)
{
    return adapter_call(c, "DELETE", name, NULL, err);
}
