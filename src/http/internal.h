/* Private to src/http: the server, one connection's state, response helpers, metrics. */
#pragma once

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "adapterd/http.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#define N_LATENCY_BUCKETS 12

struct metrics {
    pthread_mutex_t lock; /* guards everything below */
    uint64_t requests[6]; /* by status class: 1xx..5xx, index 0 unused */
    uint64_t completions, prompt_tokens, generated_tokens;
    uint64_t latency_buckets[N_LATENCY_BUCKETS + 1];
    double latency_sum;
    uint64_t latency_count;
    struct adapter_count {
        char name[65];
        uint64_t requests, tokens;
    } *per_adapter;
    size_t n_adapters, cap_adapters;
};

/* Every connection and its state (conns.c). */
struct conns {
    pthread_mutex_t lock; /* guards everything below; taken by libmicrohttpd's listen thread */
    pthread_cond_t cond;
    struct tracked **all;
    size_t n, cap;
    bool stop;
    pthread_t reaper;
};

struct ad_http {
    struct MHD_Daemon *daemon;
    struct ad_http_config cfg;
    struct ad_http_deps deps;
    atomic_bool ready;
    atomic_bool stopping;
    atomic_bool cancel_all; /* the grace period is over: handlers cancel what they wait for */
    atomic_bool hurry;      /* end the grace period now (a second SIGTERM) */
    atomic_int in_flight;
    atomic_ullong next_id;
    struct metrics metrics;
    struct conns conns;
};

/* One HTTP request's state, from the first call of the access handler to the completed
 * notification. */
struct conn {
    struct ad_http *h;
    struct MHD_Connection *mc;
    char id[24]; /* request id for the access log and responses */
    double t0;
    int status;
    char adapter[65];
    int n_tokens;

    bool discard; /* the body is read and dropped (a small one of a request refused already) */
    char *body; /* JSON body (NUL-terminated) */
    size_t len, cap;

    /* multipart upload, streamed to a staging directory */
    struct MHD_PostProcessor *pp;
    char stage[4096];
    int fd;
    char field[32];
    size_t uploaded;
    bool has_config, has_weights, weights_hub;
    int upload_rc;
    struct ad_err upload_err;

    /* POST /v1/files: the training file, streamed to the jobs module */
    struct ad_file_upload *fup;
    char purpose[32];
};

/* Responses. The error body is {"error": {"message", "type", "code"}}. */
enum MHD_Result http_json(struct conn *c, unsigned status, json_t *body); /* steals body */
enum MHD_Result http_error(struct conn *c, unsigned status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The HTTP status for an -errno from the core (context limits are 400, not 413). */
unsigned http_status_of(int rc);
/* Parses the body as a JSON object; on failure sends 400 and returns NULL. */
json_t *http_body_json(struct conn *c, enum MHD_Result *ret);

/* True if the client has hung up (the socket is readable with EOF or in error). */
bool http_client_gone(struct conn *c);

/* Routes. Each sends exactly one response. */
enum MHD_Result route_completions(struct conn *c, bool chat);
enum MHD_Result route_tokenize(struct conn *c);
enum MHD_Result route_detokenize(struct conn *c);
enum MHD_Result route_models(struct conn *c);
enum MHD_Result route_health(struct conn *c);
enum MHD_Result route_metrics(struct conn *c);
enum MHD_Result route_dashboard(struct conn *c); /* GET /: the page (dashboard.c) */
enum MHD_Result route_adapters_list(struct conn *c);
enum MHD_Result route_adapter_get(struct conn *c, const char *name);
enum MHD_Result route_adapter_delete(struct conn *c, const char *name);
enum MHD_Result route_adapter_put(struct conn *c, const char *name);
enum MHD_Result route_vllm_load(struct conn *c);
enum MHD_Result route_vllm_unload(struct conn *c);

/* Fine-tuning (finetune.c): /v1/files... and /v1/fine_tuning/jobs...; an adapter's files. */
enum MHD_Result route_finetune(struct conn *c, const char *url, const char *method);
enum MHD_Result route_adapter_file(struct conn *c, const char *name, const char *file);

/* Multipart upload plumbing (routes.c; finetune.c for training files): called with each chunk
 * of a PUT /v1/adapters/{name} (POST /v1/files) body. upload_abort ends either. */
int upload_begin(struct conn *c, struct ad_err *err);
int files_upload_begin(struct conn *c, struct ad_err *err);
void upload_abort(struct conn *c);
void files_upload_abort(struct conn *c);

/* Connections (conns.c). conns_notify is libmicrohttpd's NOTIFY_CONNECTION callback; the others
 * say where a request is: its headers are in (the body may follow), it is being answered, it is
 * done (the connection waits for the next request). Thread-safe. */
int conns_start(struct ad_http *h);
void conns_stop_reaper(struct ad_http *h);
void conns_fini(struct ad_http *h);
void conns_notify(void *cls, struct MHD_Connection *mc, void **socket_context,
                  enum MHD_ConnectionNotificationCode code);
void conns_request_begins(struct ad_http *h, struct MHD_Connection *mc);
void conns_body(struct ad_http *h, struct MHD_Connection *mc, size_t n);
void conns_answering(struct ad_http *h, struct MHD_Connection *mc);
void conns_request_ends(struct ad_http *h, struct MHD_Connection *mc);
/* Around a handler's wait for the engine inside a response reader: no inactivity timeout while
 * the server itself is the one that is slow. */
void http_wait_begin(struct conn *c);
void http_wait_end(struct conn *c);

void metrics_init(struct metrics *m);
void metrics_fini(struct metrics *m);
void metrics_adapter(struct metrics *m, const char *name, uint64_t requests, uint64_t tokens);
void metrics_completion(struct metrics *m, uint64_t prompt_tokens, uint64_t generated);
