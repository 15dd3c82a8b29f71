/* Fuzz harness for the HTTP API: the real server of src/http over a tiny Llama (tests/tiny.c),
 * a small SentencePiece-style tokenizer under each chat template family, one engine and one
 * registry, all in-process; each fuzz input becomes one raw HTTP/1.1 request on a socket, and
 * the answer is checked (see fuzz-http.h). */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <jansson.h>

#include "adapterd/engine.h"
#include "adapterd/http.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/tokenizer.h"
#include "adapterd/train.h"
#include "adapterd/util.h"
#include "../../src/http/internal.h" /* struct ad_http: waits for in_flight to drain */
#include "../tiny.h"
#include "fuzz-http.h"

#define API_KEY "fuzz-api-key-0123456789"
#define ADMIN_KEY "fuzz-admin-key-0123456789"
#define TIMEOUT_MS 60000

/* ==========================================================================================
 * Fixtures */

/* SentencePiece-style BPE with byte fallback, ids below the tiny model's vocabulary (40). */
static const char TOKENIZER[] =
    "{\"added_tokens\":["
    "{\"id\":0,\"content\":\"<unk>\",\"special\":true,\"normalized\":false},"
    "{\"id\":1,\"content\":\"<s>\",\"special\":true,\"normalized\":false},"
    "{\"id\":2,\"content\":\"</s>\",\"special\":true,\"normalized\":false},"
    "{\"id\":3,\"content\":\"<|im_start|>\",\"special\":true,\"normalized\":false},"
    "{\"id\":4,\"content\":\"<|im_end|>\",\"special\":true,\"normalized\":false}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":"
    "\"\xe2\x96\x81\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":"
    "\"\xe2\x96\x81\"}]},\"pre_tokenizer\":null,"
    "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":"
    "\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":"
    "{\"<s>\":{\"id\":\"<s>\",\"ids\":[1],\"tokens\":[\"<s>\"]}}},"
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"
    "{\"String\":\"\xe2\x96\x81\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},{\"type\":"
    "\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,\"stop\":0}]},"
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,\"byte_fallback\":true,"
    "\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2,\"<|im_start|>\":3,\"<|im_end|>\":4,"
    "\"<0x0A>\":5,\"\xe2\x96\x81\":6,\"a\":7,\"b\":8,\"c\":9,\"d\":10,\"e\":11,\"f\":12,"
    "\"g\":13,\"h\":14,\"i\":15,\"j\":16,\"k\":17,\"l\":18,\"m\":19,\"n\":20,\"o\":21,\"p\":22,"
    "\"q\":23,\"r\":24,\"s\":25,\"t\":26,\"u\":27,\"v\":28,\"w\":29,\"x\":30,\"y\":31,\"z\":32,"
    "\"\xe2\x96\x81t\":33,\"he\":34,\"\xe2\x96\x81the\":35,\"<0xC3>\":36,\"<0xA9>\":37},"
    "\"merges\":[\"\xe2\x96\x81 t\",\"h e\",\"\xe2\x96\x81t he\"]}}";

/* The chat templates of servers 0 to 13 (tests/chat/templates/NAME.json: chat_template,
 * bos_token, eos_token). */
static const char *const TEMPLATES[FZ_NO_TEMPLATE] = {
    "openhermes-2.5-chatml", "qwen2.5-instruct", "qwen3", "llama3-8b-instruct", "llama2-chat",
    "mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.2-system", "mistral-7b-instruct-v0.3",
    "zephyr-7b-beta", "tinyllama-1.1b-chat", "gemma2-it", "gemma3-it", "smollm2-instruct",
    "unsupported-phi3-mini",
};

static struct {
    char model_dir[64], registry_dir[64], state_dir[64];
    struct ad_jobs *jobs; /* server FZ_CHATML's fine-tuning */
    char file_id[64];     /* a training file that validates (fz_http_file_id) */
    struct ad_model *model;
    struct ad_tokenizer *tok[FZ_N_SERVERS];
    struct ad_registry *registry;
    struct ad_engine *engine;
    struct ad_http *http[FZ_N_SERVERS];
    int port[FZ_N_SERVERS];
    char *lora_config[2], *lora_weights[2]; /* the fixture adapters "lora" and "lora2" */
    size_t lora_len[2];
    const struct fz_request *req; /* being sent, for the report */
} fz;

static const char *const FIXTURES[2] = {"lora", "lora2"};

static void cleanup(void)
{
    ad_jobs_free(fz.jobs); /* stops the worker before its directories go */
    fz.jobs = NULL;
    if (fz.state_dir[0])
        ad_rm_rf(fz.state_dir);
    ad_rm_rf(fz.registry_dir);
    ad_rm_rf(fz.model_dir);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz-http: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

static void install_fixture(int i)
{
    struct ad_err err;
    bool created;
    if (ad_registry_put(fz.registry, FIXTURES[i], fz.lora_config[i], fz.lora_weights[i],
                        fz.lora_len[i], &created, &err) < 0)
        die("cannot install the fixture adapter: %s", err.msg);
}

/* Fine-tuning for server FZ_CHATML: a state directory, and one training file that validates. */
static void start_jobs(const struct ad_tokenizer *tok)
{
    static const char line[] = "{\"prompt\": \"the\", \"completion\": \" a b\"}\n";
    struct ad_err err;
    snprintf(fz.state_dir, sizeof(fz.state_dir), "%s/adapterd-fuzz-state-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (!mkdtemp(fz.state_dir))
        die("mkdtemp: %s", strerror(errno));
    struct ad_jobs_config jc = {.state_dir = fz.state_dir, .model = fz.model,
                                .model_dir = fz.model_dir, .tok = tok, .registry = fz.registry,
                                .threads = 1, .activation_bytes = 16 << 20,
                                .max_file_bytes = 64 << 10};
    if (ad_jobs_new(&jc, &fz.jobs, &err) < 0)
        die("%s", err.msg);
    struct ad_file_upload *u;
    json_t *obj;
    if (ad_files_begin(fz.jobs, "fixture.jsonl", &u, &err) < 0 ||
        ad_files_write(u, line, sizeof(line) - 1, &err) < 0 ||
        ad_files_finish(u, "fine-tune", &obj, &err) < 0)
        die("the fixture training file: %s", err.msg);
    snprintf(fz.file_id, sizeof(fz.file_id), "%s", json_string_value(json_object_get(obj, "id")));
    json_decref(obj);
}

const char *fz_http_file_id(void)
{
    return fz.file_id;
}

const char *fz_http_model_id(void)
{
    return fz.model->id;
}

void fz_http_reset_jobs(void)
{
    json_t *list, *f;
    struct ad_err err;
    size_t i;
    /* every job ended (each has its own id: cancelled ones stay listed, as OpenAI's) */
    if (ad_jobs_list(fz.jobs, NULL, 1000, &list, &err) < 0)
        die("%s", err.msg);
    json_array_foreach(json_object_get(list, "data"), i, f) {
        const char *st = json_string_value(json_object_get(f, "status"));
        json_t *r = NULL;
        if (strcmp(st, "succeeded") && strcmp(st, "failed") && strcmp(st, "cancelled"))
            ad_jobs_cancel(fz.jobs, json_string_value(json_object_get(f, "id")), &r, &err);
        json_decref(r);
    }
    json_decref(list);
    /* every file but the fixture */
    ad_files_list(fz.jobs, &list);
    json_array_foreach(json_object_get(list, "data"), i, f) {
        const char *id = json_string_value(json_object_get(f, "id"));
        if (strcmp(id, fz.file_id))
            ad_files_delete(fz.jobs, id, &err);
    }
    json_decref(list);
}

void fz_http_init(void)
{
    struct ad_err err;
    char path[4096];

    if (fz.model)
        return;
    if (!getenv("FUZZ_VERBOSE"))
        ad_log_set_level(AD_LOG_ERROR); /* no access log */
    fz.model = tiny_model(fz.model_dir);
    for (int i = 0; i < 2; i++) { /* the fixture adapters, as files, then in memory */
        snprintf(path, sizeof(path), "%s/lora%d", fz.model_dir, i);
        tiny_lora(path, i ? 2 : 4, i ? -0.05f : 0.05f);
        char file[4200];
        snprintf(file, sizeof(file), "%s/adapter_config.json", path);
        if (ad_read_file(file, 1 << 20, &fz.lora_config[i], NULL, &err) < 0)
            die("%s", err.msg);
        snprintf(file, sizeof(file), "%s/adapter_model.safetensors", path);
        if (ad_read_file(file, 1 << 20, &fz.lora_weights[i], &fz.lora_len[i], &err) < 0)
            die("%s", err.msg);
    }
    /* tmpfs if there is one: uploads fsync */
    snprintf(fz.registry_dir, sizeof(fz.registry_dir), "%s/adapterd-fuzz-http-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    if (!mkdtemp(fz.registry_dir))
        die("mkdtemp: %s", strerror(errno));
    atexit(cleanup);
    if (ad_registry_new(fz.model, fz.registry_dir, 0, 0, &fz.registry, &err) < 0)
        die("%s", err.msg);
    install_fixture(0);
    install_fixture(1);
    struct ad_engine_config ec = {.kv_blocks = 64, .kv_block_size = 8, .max_batch_tokens = 64,
                                  .max_seqs = 4, .max_queue = 128, .prefix_cache = true};
    if (ad_engine_new(fz.model, &ec, &fz.engine, &err) < 0)
        die("%s", err.msg);
    for (int s = 0; s < FZ_N_SERVERS; s++) {
        if (s != FZ_NO_TOKENIZER) {
            json_t *cfg = json_pack("{s:s, s:s}", "bos_token", "<s>", "eos_token", "</s>");
            if (s < FZ_NO_TEMPLATE) {
                json_error_t jerr;
                snprintf(path, sizeof(path), "%s/%s.json", FZ_TEMPLATES, TEMPLATES[s]);
                json_decref(cfg);
                cfg = json_load_file(path, 0, &jerr);
                if (!cfg)
                    die("%s: %s", path, jerr.text);
            }
            char *text = json_dumps(cfg, 0);
            json_decref(cfg);
            if (!text || ad_tokenizer_load_json(TOKENIZER, sizeof(TOKENIZER) - 1, text,
                                                strlen(text), &fz.tok[s], &err) < 0)
                die("tokenizer: %s", text ? err.msg : "out of memory");
            free(text);
        }
        struct ad_http_config hc = {.host = "127.0.0.1", .port = 0, .listen_fd = -1,
                                    .max_body = 64 << 10, .max_upload = 256 << 10,
                                    .max_connections = 16, .max_tokens_default = 4,
                                    .api_key = API_KEY, .admin_key = ADMIN_KEY};
        if (s == FZ_CHATML)
            start_jobs(fz.tok[s]);
        struct ad_http_deps deps = {.model = fz.model, .tok = fz.tok[s],
                                    .registry = fz.registry, .engine = fz.engine,
                                    .jobs = s == FZ_CHATML ? fz.jobs : NULL};
        if (ad_http_start(&hc, &deps, &fz.http[s], &err) < 0)
            die("%s", err.msg);
        fz.port[s] = ad_http_port(fz.http[s]);
    }
}

void fz_http_reset(bool dirty)
{
    struct ad_registry_info *info;
    size_t n;
    struct ad_err err;
    bool have[2] = {false, false};

    if (ad_registry_list(fz.registry, &info, &n) < 0)
        die("out of memory");
    for (size_t i = 0; i < n; i++) {
        bool fixture = !strcmp(info[i].name, FIXTURES[0]) || !strcmp(info[i].name, FIXTURES[1]);
        if (fixture && !dirty)
            have[!strcmp(info[i].name, FIXTURES[1])] = true;
        else
            ad_registry_delete(fz.registry, info[i].name, &err);
    }
    free(info);
    for (int i = 0; i < 2; i++)
        if (!have[i])
            install_fixture(i);
}

/* ==========================================================================================
 * Helpers for the targets */

char *fz_clean(char *buf, size_t size, const uint8_t *s, size_t n, bool no_space)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 1 < size; i++) {
        uint8_t b = s[i];
        if (b < ' ' || b == 0x7f || (no_space && (b == ' ' || b > 0x7f)))
            continue;
        buf[k++] = (char)b;
    }
    buf[k] = '\0';
    return buf;
}

void fz_line(const uint8_t **data, size_t *size, const uint8_t **ret, size_t *ret_len)
{
    const uint8_t *nl = memchr(*data, '\n', *size);
    size_t n = nl ? (size_t)(nl - *data) : *size;
    *ret = *data;
    *ret_len = n;
    *data += nl ? n + 1 : n;
    *size -= nl ? n + 1 : n;
}

/* ==========================================================================================
 * The client */

struct buf {
    char *p;
    size_t len, cap;
};

static void put(struct buf *b, const void *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p)
            die("out of memory");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void putf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void putf(struct buf *b, const char *fmt, ...)
{
    char s[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s, sizeof(s), fmt, ap);
    va_end(ap);
    put(b, s, n < 0 ? 0 : (size_t)n < sizeof(s) ? (size_t)n : sizeof(s) - 1);
}

static void fail(const struct buf *answer, const char *why) __attribute__((noreturn));

static void fail(const struct buf *answer, const char *why)
{
    const struct fz_request *q = fz.req;
    fprintf(stderr, "fuzz-http: %s\nrequest: %s %s (auth %d, chunked %d, Content-Type %s, "
            "X-Adapter %s), %zu bytes of body:\n%.*s\nanswer:\n%.*s\n", why, q->method, q->path,
            (int)q->auth, (int)q->chunked, q->content_type ? q->content_type : "-",
            q->x_adapter ? q->x_adapter : "-", q->len, (int)(q->len < 4000 ? q->len : 4000),
            (const char *)q->body, (int)(answer && answer->len < 4000 ? answer->len : 4000),
            answer ? answer->p : "");
    abort();
}

static bool header_is(const char *head, const char *name, const char *value)
{
    size_t n = strlen(name);
    for (const char *l = strstr(head, "\r\n"); l; l = strstr(l + 2, "\r\n"))
        if (!strncasecmp(l + 2, name, n) && l[2 + n] == ':') {
            const char *v = l + 3 + n;
            while (*v == ' ')
                v++;
            return !strncasecmp(v, value, strlen(value));
        }
    return false;
}

/* Undoes chunked transfer coding in place. Returns false if malformed. */
static bool dechunk(char *body, size_t len, size_t *ret_len)
{
    size_t in = 0, out = 0;
    for (;;) {
        char *end;
        errno = 0;
        unsigned long n = strtoul(body + in, &end, 16);
        if (errno || end == body + in)
            return false;
        char *crlf = strstr(end, "\r\n");
        if (!crlf)
            return false;
        in = (size_t)(crlf - body) + 2;
        if (n == 0) {
            *ret_len = out;
            body[out] = '\0';
            return true;
        }
        if (n > len - in || len - in - n < 2 || memcmp(body + in + n, "\r\n", 2))
            return false;
        memmove(body + out, body + in, n);
        out += n;
        in += n + 2;
    }
}

static bool is_error_body(json_t *j, int status)
{
    json_t *e = json_object_get(j, "error");
    return json_is_object(e) && json_object_size(e) == 3 &&
           json_is_string(json_object_get(e, "message")) &&
           json_is_string(json_object_get(e, "type")) &&
           json_integer_value(json_object_get(e, "code")) == status;
}

/* Each "data: " event of a stream is a JSON object, the last one [DONE]. */
static bool stream_ok(const char *body)
{
    const char *p = body;
    bool done = false;
    while (*p) {
        if (done || strncmp(p, "data: ", 6))
            return false;
        const char *end = strstr(p, "\n\n");
        if (!end)
            return false;
        if (!strncmp(p + 6, "[DONE]\n\n", 8)) {
            done = true;
        } else {
            json_error_t jerr;
            json_t *j = json_loadb(p + 6, (size_t)(end - p - 6), 0, &jerr);
            bool ok = json_is_object(j) && json_is_array(json_object_get(j, "choices"));
            json_decref(j);
            if (!ok)
                return false;
        }
        p = end + 2;
    }
    return done;
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* the server closed: its answer tells why */
        p += w;
        n -= (size_t)w;
    }
}

void fz_http_send(int server, const struct fz_request *req, struct fz_response *ret)
{
    struct buf q = {0}, a = {0};
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)fz.port[server])};
    static const char *const keys[] = {"Bearer " ADMIN_KEY, "Bearer " API_KEY, NULL,
                                       "Bearer " API_KEY "x"};

    fz.req = req;
    putf(&q, "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n", req->method,
         req->path);
    if (keys[req->auth])
        putf(&q, "Authorization: %s\r\n", keys[req->auth]);
    if (req->content_type)
        putf(&q, "Content-Type: %s\r\n", req->content_type);
    if (req->x_adapter)
        putf(&q, "X-Adapter: %s\r\n", req->x_adapter);
    if (req->chunked) {
        putf(&q, "Transfer-Encoding: chunked\r\n\r\n");
        for (size_t off = 0, k = 0; off < req->len; k++) { /* chunks of varied sizes */
            size_t n = 1 + (k * 7919) % 61;
            n = n < req->len - off ? n : req->len - off;
            putf(&q, "%zx\r\n", n);
            put(&q, req->body + off, n);
            put(&q, "\r\n", 2);
            off += n;
        }
        putf(&q, "0\r\n\r\n");
    } else {
        putf(&q, "Content-Length: %zu\r\n\r\n", req->len);
        put(&q, req->body, req->len);
    }

    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        /* interrupted (libFuzzer's timer): the connection goes on, wait for it */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        int e = errno, r;
        socklen_t n = sizeof(e);
        do
            r = poll(&p, 1, TIMEOUT_MS);
        while (e == EINTR && r < 0 && errno == EINTR);
        if (e != EINTR || r <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &n) < 0 || e)
            die("connect: %s", strerror(e));
    }
    send_all(fd, q.p, q.len);
    free(q.p);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, TIMEOUT_MS);
        if (r == 0)
            fail(&a, "no answer in 60 s");
        if (r < 0 && errno == EINTR)
            continue;
        char chunk[16384];
        ssize_t n = recv(fd, chunk, sizeof(chunk), 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno != ECONNRESET)
            die("recv: %s", strerror(errno));
        if (n <= 0)
            break;
        put(&a, chunk, (size_t)n);
    }
    close(fd);
    /* the connection's thread is done with it before the next request */
    for (int i = 0; atomic_load(&fz.http[server]->in_flight) > 0; i++) {
        if (i > TIMEOUT_MS)
            fail(&a, "the request is still in flight 60 s after its answer");
        usleep(1000);
    }
    if (!a.p)
        fail(&a, "no answer");

    int status = 0;
    char *head_end = strstr(a.p, "\r\n\r\n");
    if (strncmp(a.p, "HTTP/1.1 ", 9) || sscanf(a.p + 9, "%3d", &status) != 1 || !head_end)
        fail(&a, "not an HTTP/1.1 answer");
    *head_end = '\0';
    char *body = head_end + 4;
    size_t len = a.len - (size_t)(body - a.p);
    bool chunked = header_is(a.p, "Transfer-Encoding", "chunked");
    if (chunked && !dechunk(body, len, &len)) {
        *head_end = '\r';
        fail(&a, "malformed chunked body");
    }
    *head_end = '\r';
    if (status < 200 || status >= 500)
        fail(&a, "status not 2xx/4xx");
    /* files as stored: a training file, an adapter's weights (2xx only) */
    bool file = status < 300 && (header_is(a.p, "Content-Type", "application/jsonl") ||
                                 header_is(a.p, "Content-Type", "application/octet-stream"));
    if (status != 204 && !file && !header_is(a.p, "Content-Type", "application/json") &&
        !header_is(a.p, "Content-Type", "text/event-stream") &&
        !header_is(a.p, "Content-Type", "text/plain"))
        fail(&a, "no Content-Type");
    if (file) {
        /* its bytes, not JSON */
    } else if (header_is(a.p, "Content-Type", "text/event-stream")) {
        if (status != 200 || !stream_ok(body))
            fail(&a, "malformed event stream");
    } else if (header_is(a.p, "Content-Type", "application/json")) {
        json_error_t jerr;
        json_t *j = json_loadb(body, len, 0, &jerr);
        bool ok = json_is_object(j) && (status < 400 || is_error_body(j, status));
        json_decref(j);
        if (!ok)
            fail(&a, status < 400 ? "2xx body is not a JSON object"
                                  : "4xx body is not {\"error\": {\"message\", \"type\", "
                                    "\"code\"}}");
    } else if (status >= 400) {
        fail(&a, "4xx without a JSON error");
    }
    if (getenv("FUZZ_VERBOSE")) /* what each seed gets: FUZZ_VERBOSE=1 replay-http-json DIR */
        fprintf(stderr, "%s %s -> %d %.300s\n", req->method, req->path, status, body);
    ret->status = status;
    ret->len = len;
    ret->body = malloc(len + 1);
    if (!ret->body)
        die("out of memory");
    memcpy(ret->body, body, len);
    ret->body[len] = '\0';
    free(a.p);
    fz.req = NULL;
}

void fz_response_fini(struct fz_response *r)
{
    free(r->body);
    r->body = NULL;
}
