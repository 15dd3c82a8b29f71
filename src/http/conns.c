/* Connections that hold a slot without a request: idle, slow and crowding clients.
 *
 * libmicrohttpd gives each connection a thread and, at max_connections, stops accepting (new
 * clients wait in the kernel's backlog, /health included). So a connection that sends nothing
 * must not keep its slot. Every connection is in this table (MHD_OPTION_NOTIFY_CONNECTION),
 * in one of three states:
 *   IDLE  waiting for a request's headers (new, or kept alive after a response)
 *   BODY  the headers are in, the body is arriving
 *   BUSY  the request is being answered (a handler runs, or a response streams)
 * A reaper thread cuts IDLE connections older than header_timeout and BODY ones past their
 * deadline (body_timeout + 1 s per body_min_rate bytes received, as Apache's mod_reqtimeout),
 * which stops slow senders that the library's inactivity timeout lets live. A new connection
 * that finds the server within a few slots of its limit, or its client address at
 * max_per_client, first cuts the connection idle longest (of that address); a client at its
 * cap with nothing idle is refused. Cutting is shutdown(2): the connection's thread, inside
 * libmicrohttpd and not in a handler (only IDLE and BODY are cut), sees the socket end and
 * closes it. The descriptor stays open until the CLOSED notification, which takes the same
 * lock, so a cut never reaches a descriptor reused by another connection. */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "internal.h"

enum { CONN_IDLE, CONN_BODY, CONN_BUSY };

struct tracked {
    int fd;
    int state;
    bool cut;          /* shut down, waiting for libmicrohttpd to close it */
    double since;      /* IDLE: since when; BODY: when the body began */
    uint64_t body_bytes;
    unsigned char addr[17]; /* family, then the IPv4 or IPv6 address */
    size_t index;      /* in conns.all */
};

/* ==========================================================================================
 * Table (callers hold the lock) */

static void cut(struct tracked *t)
{
    if (!t->cut)
        shutdown(t->fd, SHUT_RDWR);
    t->cut = true;
}

/* The IDLE connection of the address (any address if addr is NULL) idle longest, or NULL. */
static struct tracked *oldest_idle(struct conns *cs, const unsigned char *addr)
{
    struct tracked *best = NULL;
    for (size_t i = 0; i < cs->n; i++) {
        struct tracked *t = cs->all[i];
        if (t->state == CONN_IDLE && !t->cut && (!addr || !memcmp(t->addr, addr, 17)) &&
            (!best || t->since < best->since))
            best = t;
    }
    return best;
}

static size_t count_live(const struct conns *cs, const unsigned char *addr)
{
    size_t n = 0;
    for (size_t i = 0; i < cs->n; i++)
        n += !cs->all[i]->cut && (!addr || !memcmp(cs->all[i]->addr, addr, 17));
    return n;
}

/* ==========================================================================================
 * Notifications */

static void address_key(struct MHD_Connection *mc, unsigned char key[17])
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    memset(key, 0, 17);
    if (!ci || !ci->client_addr)
        return;
    key[0] = (unsigned char)ci->client_addr->sa_family;
    if (ci->client_addr->sa_family == AF_INET)
        memcpy(key + 1, &((const struct sockaddr_in *)(const void *)ci->client_addr)->sin_addr, 4);
    else if (ci->client_addr->sa_family == AF_INET6)
        memcpy(key + 1, &((const struct sockaddr_in6 *)(const void *)ci->client_addr)->sin6_addr,
               16);
}

void conns_notify(void *cls, struct MHD_Connection *mc, void **socket_context,
                  enum MHD_ConnectionNotificationCode code)
{
    struct ad_http *h = cls;
    struct conns *cs = &h->conns;

    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        struct tracked *t = *socket_context;
        if (!t)
            return;
        pthread_mutex_lock(&cs->lock);
        cs->all[t->index] = cs->all[--cs->n];
        cs->all[t->index]->index = t->index;
        pthread_mutex_unlock(&cs->lock);
        free(t);
        *socket_context = NULL;
        return;
    }
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_CONNECTION_FD);
    struct tracked *t = calloc(1, sizeof(*t));
    if (!t || !ci) { /* untracked: it lives by the library's own timeout */
        free(t);
        return;
    }
    t->fd = ci->connect_fd;
    t->state = CONN_IDLE;
    t->since = ad_now();
    address_key(mc, t->addr);
    pthread_mutex_lock(&cs->lock);
    if (cs->n == cs->cap) {
        size_t cap = cs->cap ? 2 * cs->cap : 64;
        struct tracked **all = realloc(cs->all, cap * sizeof(*all));
        if (!all) {
            pthread_mutex_unlock(&cs->lock);
            free(t);
            return;
        }
        cs->all = all;
        cs->cap = cap;
    }
    /* Room for this one: within `reserve` slots of the limit, the longest idle goes. */
    int limit = h->cfg.max_connections;
    size_t reserve = (size_t)(limit / 16 > 4 ? limit / 16 : 4);
    struct tracked *victim;
    while (count_live(cs, NULL) + reserve >= (size_t)limit && (victim = oldest_idle(cs, NULL)))
        cut(victim);
    t->index = cs->n;
    cs->all[cs->n++] = t;
    if (h->cfg.max_per_client > 0 &&
        count_live(cs, t->addr) > (size_t)h->cfg.max_per_client) {
        victim = oldest_idle(cs, t->addr); /* t itself is the newest: the last resort */
        cut(victim ? victim : t);
    }
    pthread_mutex_unlock(&cs->lock);
    *socket_context = t;
}

static struct tracked *tracked_of(struct MHD_Connection *mc)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(mc, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

static void conns_set(struct ad_http *h, struct MHD_Connection *mc, int state, uint64_t body_bytes)
{
    struct tracked *t = tracked_of(mc);
    if (!t)
        return;
    pthread_mutex_lock(&h->conns.lock);
    if (t->state != state)
        t->since = ad_now();
    t->state = state;
    t->body_bytes += body_bytes;
    if (state != CONN_BODY)
        t->body_bytes = 0;
    pthread_mutex_unlock(&h->conns.lock);
}

void conns_request_begins(struct ad_http *h, struct MHD_Connection *mc)
{
    conns_set(h, mc, CONN_BODY, 0);
}

void conns_body(struct ad_http *h, struct MHD_Connection *mc, size_t n)
{
    conns_set(h, mc, CONN_BODY, n);
}

void conns_answering(struct ad_http *h, struct MHD_Connection *mc)
{
    conns_set(h, mc, CONN_BUSY, 0);
}

void conns_request_ends(struct ad_http *h, struct MHD_Connection *mc)
{
    conns_set(h, mc, CONN_IDLE, 0);
}

/* ==========================================================================================
 * The reaper */

static void *reaper(void *arg)
{
    struct ad_http *h = arg;
    struct conns *cs = &h->conns;
    pthread_mutex_lock(&cs->lock);
    while (!cs->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 250 * 1000000L; /* four looks a second */
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        pthread_cond_timedwait(&cs->cond, &cs->lock, &ts);
        double now = ad_now();
        for (size_t i = 0; i < cs->n; i++) {
            struct tracked *t = cs->all[i];
            /* a timeout of 0 is none (libmicrohttpd's convention) */
            double deadline = t->state == CONN_IDLE && h->cfg.header_timeout > 0
                                  ? t->since + h->cfg.header_timeout
                              : t->state == CONN_BODY && h->cfg.body_timeout > 0
                                  ? t->since + h->cfg.body_timeout +
                                        (h->cfg.body_min_rate > 0
                                             ? (double)t->body_bytes / h->cfg.body_min_rate
                                             : 0)
                                  : INFINITY;
            if (now > deadline)
                cut(t);
        }
    }
    pthread_mutex_unlock(&cs->lock);
    return NULL;
}

int conns_start(struct ad_http *h)
{
    struct conns *cs = &h->conns;
    pthread_mutex_init(&cs->lock, NULL);
    pthread_cond_init(&cs->cond, NULL);
    if (pthread_create(&cs->reaper, NULL, reaper, h) != 0) {
        pthread_cond_destroy(&cs->cond);
        pthread_mutex_destroy(&cs->lock);
        return -EAGAIN;
    }
    return 0;
}

void conns_stop_reaper(struct ad_http *h)
{
    struct conns *cs = &h->conns;
    pthread_mutex_lock(&cs->lock);
    cs->stop = true;
    pthread_cond_signal(&cs->cond);
    pthread_mutex_unlock(&cs->lock);
    pthread_join(cs->reaper, NULL);
}

void conns_fini(struct ad_http *h)
{
    struct conns *cs = &h->conns;
    free(cs->all); /* the CLOSED notifications freed the entries */
    pthread_cond_destroy(&cs->cond);
    pthread_mutex_destroy(&cs->lock);
}

void http_wait_begin(struct conn *c)
{
    /* The library's inactivity timeout is checked right after a reader returns: a first token
     * that took longer than idle_timeout would close the stream as it arrives. */
    MHD_set_connection_option(c->mc, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
}

void http_wait_end(struct conn *c)
{
    MHD_set_connection_option(c->mc, MHD_CONNECTION_OPTION_TIMEOUT,
                              (unsigned)c->h->cfg.idle_timeout);
}
