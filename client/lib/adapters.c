/* Adapter files over HTTP: the multipart upload (PUT /v1/adapters/{name}, streamed from disk)
 * and the download of an adapter's files (GET /v1/adapters/{name}/files/{file}). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define CONFIG "adapter_config.json"
#define PEFT_WEIGHTS "adapter_model.safetensors"
#define HUB_WEIGHTS "adapter.safetensors" /* AdapterHub's save_adapter(use_safetensors=True) */

int adc_adapter_upload(struct adc_client *c, const char *name, const char *dir,
                       adc_progress_fn progress, void *ud, json_t **ret, struct adc_error *err)
{
    char config[PATH_MAX], weights[PATH_MAX];
    struct adcp_call k = {.method = "PUT", .progress = progress, .progress_ud = ud};
    curl_mime *mime = NULL;
    char *path = NULL;
    int rc;

    snprintf(config, sizeof(config), "%s/%s", dir, CONFIG);
    snprintf(weights, sizeof(weights), "%s/%s", dir, PEFT_WEIGHTS);
    if (access(weights, F_OK) != 0) {
        snprintf(weights, sizeof(weights), "%s/%s", dir, HUB_WEIGHTS);
        if (access(weights, F_OK) != 0)
            return adcp_error(
                err, -ENOENT, 0,
                "%s: holds neither " PEFT_WEIGHTS " (PEFT) nor " HUB_WEIGHTS " (AdapterHub)", dir);
    }
    rc = adcp_readable(config, err);
    if (rc >= 0)
        rc = adcp_readable(weights, err);
    if (rc < 0)
        return rc;
    mime = curl_mime_init(c->curl);
    path = adcp_path(c, "/v1/adapters/", name, "");
    if (!mime || !path || adcp_mime_file(mime, "config", config, "application/json") < 0 ||
        adcp_mime_file(mime, "weights", weights, "application/octet-stream") < 0) {
        rc = adcp_error(err, -ENOMEM, 0, "out of memory");
        goto out;
    }
    k.path = path;
    k.mime = mime;
    rc = adcp_json_call(c, &k, NULL, ret, err);
    if (rc >= 0)
        rc = k.status == 201;
out:
    adcp_call_fini(&k);
    curl_mime_free(mime);
    free(path);
    return rc;
}

/* ==========================================================================================
 * Download */

struct file_sink {
    int fd;
    const char *path;
    struct adc_error *err;
};

static int file_write(void *ud, const char *data, size_t n)
{
    struct file_sink *f = ud;
    while (n > 0) {
        ssize_t w = write(f->fd, data, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return adcp_error(f->err, -errno, 200, "%s: %s", f->path, strerror(errno));
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

/* GET .../files/<remote> into the file tmp (created). On failure tmp is removed. */
static int fetch(struct adc_client *c, const char *name, const char *remote, const char *tmp,
                 adc_progress_fn progress, void *ud, struct adc_error *err)
{
    char suffix[64];
    snprintf(suffix, sizeof(suffix), "/files/%s", remote);
    struct file_sink f = {.path = tmp, .err = err};
    struct adcp_call k = {.method = "GET",
                          .sink = file_write,
                          .sink_ud = &f,
                          .progress = progress,
                          .progress_ud = ud};
    char *path = adcp_path(c, "/v1/adapters/", name, suffix);
    int rc;

    if (!path)
        return adcp_error(err, -ENOMEM, 0, "out of memory");
    f.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f.fd < 0) {
        rc = adcp_error(err, -errno, 0, "%s: %s", tmp, strerror(errno));
        free(path);
        return rc;
    }
    k.path = path;
    rc = adcp_perform(c, &k, err);
    if (rc >= 0 && fsync(f.fd) < 0)
        rc = adcp_error(err, -errno, 0, "%s: %s", tmp, strerror(errno));
    if (close(f.fd) < 0 && rc >= 0)
        rc = adcp_error(err, -errno, 0, "%s: %s", tmp, strerror(errno));
    if (rc < 0)
        unlink(tmp);
    adcp_call_fini(&k);
    free(path);
    return rc;
}

/* mkdir -p dir: 0, or -errno (-ENOTDIR: something else is there). */
static int make_dirs(const char *dir)
{
    char path[PATH_MAX];
    struct stat st;
    if (snprintf(path, sizeof(path), "%s", dir) >= (int)sizeof(path))
        return -ENAMETOOLONG;
    for (char *p = path + 1;; p++) {
        bool end = *p == '\0';
        if (*p != '/' && !end)
            continue;
        *p = '\0';
        if (mkdir(path, 0755) < 0 && errno != EEXIST)
            return -errno;
        if (stat(path, &st) < 0)
            return -errno;
        if (!S_ISDIR(st.st_mode))
            return -ENOTDIR;
        if (end)
            return 0;
        *p = '/';
    }
}

int adc_adapter_download(struct adc_client *c, const char *name, const char *dir,
                         adc_progress_fn progress, void *ud, struct adc_error *ret_err)
{
    struct adc_error e, *err = &e; /* the status of a first try is needed even without ret_err */
    char config_tmp[PATH_MAX], weights_tmp[PATH_MAX], to[PATH_MAX];
    int rc;

    rc = make_dirs(dir);
    if (rc < 0)
        return adcp_error(ret_err, rc, 0, "%s: %s", dir, strerror(-rc));
    snprintf(config_tmp, sizeof(config_tmp), "%s/.%s.part", dir, CONFIG);
    rc = fetch(c, name, CONFIG, config_tmp, progress, ud, err);
    if (rc < 0) {
        if (ret_err)
            *ret_err = e;
        return rc;
    }
    /* the kind of the adapter names its weights file: PEFT's configs have a "peft_type" */
    json_t *cfg = json_load_file(config_tmp, 0, NULL);
    bool hub = json_is_object(cfg) && !json_object_get(cfg, "peft_type");
    json_decref(cfg);
    const char *local = hub ? HUB_WEIGHTS : PEFT_WEIGHTS;
    snprintf(weights_tmp, sizeof(weights_tmp), "%s/.%s.part", dir, local);
    rc = fetch(c, name, local, weights_tmp, progress, ud, err);
    if (rc == -ENOENT && e.status == 404) /* a server that serves the other name */
        rc = fetch(c, name, hub ? PEFT_WEIGHTS : HUB_WEIGHTS, weights_tmp, progress, ud, err);
    if (rc >= 0) {
        snprintf(to, sizeof(to), "%s/%s", dir, local);
        if (rename(weights_tmp, to) < 0)
            rc = adcp_error(err, -errno, 0, "%s: %s", to, strerror(errno));
    }
    if (rc >= 0) {
        snprintf(to, sizeof(to), "%s/%s", dir, CONFIG);
        if (rename(config_tmp, to) < 0)
            rc = adcp_error(err, -errno, 0, "%s: %s", to, strerror(errno));
    }
    if (rc < 0) {
        unlink(config_tmp);
        unlink(weights_tmp);
        if (ret_err)
            *ret_err = e;
    }
    return rc;
}
