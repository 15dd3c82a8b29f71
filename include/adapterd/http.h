/* adapterd: the HTTP API (libmicrohttpd, one thread per connection; handlers block on the
 * engine and poll their socket, so a client that goes away cancels its sequence). Connections
 * that send nothing, or too slowly, are cut off (header_timeout, body_timeout); when the server
 * nears max_connections, or a client its max_per_client, the connections longest idle make room
 * for new ones. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

struct ad_engine;
struct ad_err;
struct ad_model;
struct ad_registry;
struct ad_tokenizer;
struct ad_http;
struct ad_jobs;

struct ad_http_config {
    const char *host;      /* numeric IPv4/IPv6 address to listen on */
    int port;
    int listen_fd;         /* >= 0: a socket passed by systemd (LISTEN_FDS); host/port unused */
    size_t max_body;       /* JSON request bodies */
    size_t max_upload;     /* adapter uploads (streamed to disk) */
    int max_connections;
    int max_per_client;    /* connections from one client address (0: no cap) */
    double header_timeout; /* seconds a connection may wait for a request's headers, new or
                            * kept alive between requests (slow or idle clients are cut) */
    double body_timeout;   /* seconds a body may take, plus 1 s per body_min_rate bytes */
    double body_min_rate;  /* bytes per second */
    double idle_timeout;   /* seconds without a byte read or sent, mid-request */
                           /* (each timeout: 0 is none) */
    int max_tokens_default; /* max_tokens when a request gives none */
    const char *api_key;   /* NULL: no auth; else "Authorization: Bearer <key>" on every route */
    const char *admin_key; /* NULL: api_key; required for uploads, deletes and training */
};

/* What the handlers use; all borrowed, and must outlive the server. tok may be NULL (no
 * tokenizer.json: token-id prompts only). */
struct ad_http_deps {
    const struct ad_model *model;
    const struct ad_tokenizer *tok;
    struct ad_registry *registry;
    struct ad_engine *engine;
    struct ad_jobs *jobs; /* NULL: no fine-tuning (the routes answer 503) */
};

/* Listens and answers. deps NULL: loading, every route but /health answers 503 until
 * ad_http_serve; /health answers 503 {"status": "loading"}, then 200. */
int ad_http_start(const struct ad_http_config *cfg, const struct ad_http_deps *deps,
                  struct ad_http **ret, struct ad_err *err);
/* The model is loaded: start serving with deps. Call once, from any thread. */
void ad_http_serve(struct ad_http *h, const struct ad_http_deps *deps);
/* Stops accepting; waits up to grace_seconds for requests in flight, then cancels the rest and
 * stops. */
void ad_http_stop(struct ad_http *h, double grace_seconds);
/* Ends a running ad_http_stop's grace period now. Async-signal-safe. */
void ad_http_hurry(struct ad_http *h);
/* The port actually bound (for port 0). */
int ad_http_port(const struct ad_http *h);
