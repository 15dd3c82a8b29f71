/* The HTTP server's lifecycle: listening before the model is loaded (/health 503 "loading", every
 * other route 503 with an error body), then serving once ad_http_serve hands it the model. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../check.h"
#include "../tiny.h"
#include "adapterd/engine.h"
#include "adapterd/http.h"
#include "adapterd/model.h"
#include "adapterd/registry.h"
#include "adapterd/util.h"

/* One GET with HTTP/1.0 (the server closes after the response); the whole response in buf. */
static int get(int port, const char *path, char *buf, size_t size)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(fd >= 0);
    CHECK_INT(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    CHECK_INT(write(fd, req, (size_t)n), ==, n);
    size_t len = 0;
    ssize_t r;
    while (len + 1 < size && (r = read(fd, buf + len, size - 1 - len)) > 0)
        len += (size_t)r;
    buf[len] = '\0';
    close(fd);
    int status = 0;
    CHECK_INT(sscanf(buf, "HTTP/1.%*d %d", &status), ==, 1);
    return status;
}

int main(void)
{
    struct ad_http *h;
    struct ad_err err;
    char buf[8192];
    struct ad_http_config cfg = {.host = "127.0.0.1", .port = 0, .listen_fd = -1,
                                 .max_body = 1 << 20, .max_upload = 1 << 20,
                                 .max_connections = 8, .max_tokens_default = 16};

    ad_log_set_level(AD_LOG_WARN);
    CHECK_INT(ad_http_start(&cfg, NULL, &h, &err), ==, 0);
    int port = ad_http_port(h);
    CHECK(port > 0);

    /* loading */
    CHECK_INT(get(port, "/health", buf, sizeof(buf)), ==, 503);
    CHECK(strstr(buf, "\"status\":\"loading\""));
    CHECK_INT(get(port, "/v1/models", buf, sizeof(buf)), ==, 503);
    CHECK(strstr(buf, "\"error\"") && strstr(buf, "loading"));
    CHECK_INT(get(port, "/metrics", buf, sizeof(buf)), ==, 503);

    /* loaded */
    char mdir[64], adir[96];
    struct ad_model *m = tiny_model(mdir);
    snprintf(adir, sizeof(adir), "%s/adapters", mdir);
    struct ad_registry *reg;
    CHECK_INT(ad_registry_new(m, adir, 0, 0, &reg, &err), ==, 0);
    struct ad_engine *e;
    struct ad_engine_config ec = {.kv_blocks = 16, .kv_block_size = 4, .max_batch_tokens = 64,
                                  .max_seqs = 4, .max_queue = 4, .prefix_cache = true};
    CHECK_INT(ad_engine_new(m, &ec, &e, &err), ==, 0);
    struct ad_http_deps deps = {.model = m, .registry = reg, .engine = e};
    ad_http_serve(h, &deps);
    CHECK_INT(get(port, "/health", buf, sizeof(buf)), ==, 200);
    CHECK(strstr(buf, "\"status\":\"ok\""));
    CHECK_INT(get(port, "/v1/models", buf, sizeof(buf)), ==, 200);
    CHECK(strstr(buf, m->id));
    CHECK_INT(get(port, "/metrics", buf, sizeof(buf)), ==, 200);
    CHECK(strstr(buf, "adapterd_kv_blocks_leaked 0"));
    CHECK(strstr(buf, "adapterd_prefix_cache_hits_total 0"));

    ad_http_stop(h, 1.0);
    ad_engine_free(e);
    ad_registry_free(reg);
    ad_model_free(m);
    ad_rm_rf(mdir);
    printf("http: ok\n");
    return 0;
}
