/* Fuzz target: the fine-tuning routes (training file uploads, multipart parsed by libmicrohttpd's
 * post processor and checked line by line as they stream in; job requests; reads and actions on
 * files and jobs by id), sent to the real server over a socket (fuzz-http.c checks every answer;
 * a job that validates is queued and trained on the tiny model, then cancelled). Input:
 *   byte 0: bits 0-2 the route: 0-1 POST /v1/files with the rest as the file part's content
 *           (bit 3: no purpose part), 2 POST /v1/files with the rest as the whole body (bit 3:
 *           the Content-Type is the first line of the rest), 3-5 POST /v1/fine_tuning/jobs with
 *           the rest as the JSON body, each "@F" in it replaced by a training file's id that
 *           validates and each "@M" by the base's id, 6 GET, 7 POST of the path in the first line
 *           of the rest (under /v1/files, or /v1/fine_tuning/ when it starts with 'j'; "@F"
 *           replaced too);
 *   byte 1: bits 0-1 the key (admin, API, none, wrong); bit 2 chunked transfer coding;
 *   the rest as byte 0 says. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz-http.h"

#define BOUNDARY "------------------------adapterdfuzzft"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* s[0..n) with each "@F" replaced by the fixture file's id and each "@M" by the base's id;
 * malloc'd, *ret_len its length. */
static char *with_ids(const uint8_t *s, size_t n, size_t *ret_len)
{
    const char *file = fz_http_file_id(), *model = fz_http_model_id();
    size_t most = strlen(file) > strlen(model) ? strlen(file) : strlen(model), k = 0;
    char *out = malloc(n * (most > 2 ? most - 1 : 1) + 1);
    if (!out)
        abort();
    for (size_t i = 0; i < n; i++) {
        const char *id = i + 1 < n && s[i] == '@' ? s[i + 1] == 'F' ? file
                                                   : s[i + 1] == 'M' ? model : NULL
                                                   : NULL;
        if (id) {
            memcpy(out + k, id, strlen(id));
            k += strlen(id);
            i++;
        } else {
            out[k++] = (char)s[i];
        }
    }
    out[k] = '\0';
    *ret_len = k;
    return out;
}

static uint8_t *multipart(const uint8_t *data, size_t size, bool purpose, size_t *ret_len)
{
    static const char head0[] = "--" BOUNDARY "\r\nContent-Disposition: form-data; "
                                "name=\"purpose\"\r\n\r\nfine-tune\r\n";
    static const char head1[] = "--" BOUNDARY "\r\nContent-Disposition: form-data; "
                                "name=\"file\"; filename=\"train.jsonl\"\r\n"
                                "Content-Type: application/jsonl\r\n\r\n";
    static const char tail[] = "\r\n--" BOUNDARY "--\r\n";
    size_t n0 = purpose ? sizeof(head0) - 1 : 0;
    size_t len = n0 + sizeof(head1) - 1 + size + sizeof(tail) - 1;
    uint8_t *b = malloc(len), *p = b;
    if (!b)
        abort();
    memcpy(p, head0, n0), p += n0;
    memcpy(p, head1, sizeof(head1) - 1), p += sizeof(head1) - 1;
    memcpy(p, data, size), p += size;
    memcpy(p, tail, sizeof(tail) - 1);
    *ret_len = len;
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[512], ctype[256];
    struct fz_response r;
    uint8_t *owned = NULL;
    char *text = NULL;

    if (size < 2)
        return 0;
    fz_http_init();
    int route = data[0] & 7;
    bool flag = data[0] & 8;
    struct fz_request q = {.method = "POST", .path = "/v1/files",
                           .auth = (enum fz_auth)(data[1] & 3), .chunked = data[1] & 4};
    data += 2;
    size -= 2;
    if (route <= 1) {
        q.content_type = "multipart/form-data; boundary=" BOUNDARY;
        q.body = owned = multipart(data, size, !flag, &q.len);
    } else if (route == 2) {
        q.content_type = "multipart/form-data; boundary=" BOUNDARY;
        if (flag) {
            const uint8_t *line;
            size_t n;
            fz_line(&data, &size, &line, &n);
            q.content_type = fz_clean(ctype, sizeof(ctype), line, n, false);
        }
        q.body = data;
        q.len = size;
    } else if (route <= 5) {
        q.path = "/v1/fine_tuning/jobs";
        q.content_type = "application/json";
        text = with_ids(data, size, &q.len);
        q.body = (const uint8_t *)text;
    } else {
        const uint8_t *line;
        size_t n, len;
        fz_line(&data, &size, &line, &n);
        char *p = with_ids(line, n, &len);
        char clean[400];
        fz_clean(clean, sizeof(clean), (const uint8_t *)p, len, true);
        free(p);
        /* following a job's events waits for its end: not a request a fuzz input can wait on */
        if (strstr(clean, "stream"))
            return 0;
        snprintf(path, sizeof(path), "%s%s", clean[0] == 'j' ? "/v1/fine_tuning/" : "/v1/files",
                 clean);
        q.path = path;
        q.method = route == 6 ? "GET" : "POST";
        q.content_type = "application/json";
        q.body = data;
        q.len = route == 6 ? 0 : size;
    }
    fz_http_send(FZ_CHATML, &q, &r);
    fz_response_fini(&r);
    fz_http_reset_jobs();
    fz_http_reset(true); /* a job's suffix may have replaced a fixture adapter */
    free(owned);
    free(text);
    return 0;
}
