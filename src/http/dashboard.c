/* GET /: the dashboard, one page of HTML, CSS and JavaScript (src/http/ui/) compiled into the
 * binary. It holds no data, so it is served without a key (server.c); everything it shows
 * comes from the API it calls, with the key it asks for. */
#include <stdbool.h>
#include <string.h>

#include "internal.h"

/* Written at build time by ui/embed.py (dashboard_page.c in the build directory): the page's
 * bytes, its Content-Security-Policy (its own inlined style and script, nothing from
 * elsewhere) and its ETag. Immutable. */
extern const unsigned char ad_ui_page[];
extern const size_t ad_ui_page_len;
extern const char ad_ui_page_csp[], ad_ui_page_etag[];

enum MHD_Result route_dashboard(struct conn *c)
{
    const char *inm = MHD_lookup_connection_value(c->mc, MHD_HEADER_KIND, "If-None-Match");
    bool same = inm && strstr(inm, ad_ui_page_etag);
    unsigned status = same ? 304 : 200;
    /* persistent: the page is static, libmicrohttpd neither copies nor frees it */
    struct MHD_Response *r = MHD_create_response_from_buffer(
        same ? 0 : ad_ui_page_len, (void *)ad_ui_page, MHD_RESPMEM_PERSISTENT);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", "text/html; charset=utf-8");
    MHD_add_response_header(r, "Content-Security-Policy", ad_ui_page_csp);
    MHD_add_response_header(r, "ETag", ad_ui_page_etag);
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, "X-Request-Id", c->id);
    c->status = (int)status;
    enum MHD_Result ret = MHD_queue_response(c->mc, status, r);
    MHD_destroy_response(r);
    return ret;
}
