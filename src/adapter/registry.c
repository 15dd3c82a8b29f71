/* The adapter registry: a sorted table of names, each with its resident adapter (or none, when
 * evicted or not yet loaded), persisted as directories under the adapters directory.
 *
 * Writes are crash-safe: a new version is staged in a hidden directory, fsync'd and validated,
 * then swapped with the old one by one renameat2(RENAME_EXCHANGE), so the name always holds a
 * complete adapter. Hidden leftovers of interrupted writes (a crash, or another process sharing
 * the store that died) are removed by a scan once nothing has touched them for STALE_SECONDS;
 * a staging directory this process is still writing is never touched. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "adapterd/registry.h"
#include "adapterd/util.h"

#define STAGE_PREFIX ".stage-"
#define TRASH_PREFIX ".trash-"
#define STALE_SECONDS 600
#define MAX_LIVE_STAGES 4096

struct entry {
    char name[65];
    struct ad_adapter *a; /* resident reference, or NULL */
    uint64_t version;     /* bumped by every install, so a load that raced one is retried */
    uint64_t last_use;    /* LRU clock */
    uint64_t uses;
    size_t bytes;
    enum ad_adapter_kind kind;
    int rank;
    bool seen; /* scan mark */
};

struct ad_registry {
    const struct ad_model *m;
    char dir[2048];
    size_t budget;
    unsigned load_flags; /* AD_ADAPTER_* for every load */
    pthread_mutex_t lock; /* guards everything below */
    struct entry *entries; /* sorted by name */
    size_t n, cap;
    uint64_t clock;
    size_t resident;
    char (*live)[16]; /* names of this process's staging directories still in use */
    size_t n_live;
};

/* ==========================================================================================
 * Table (callers hold the lock) */

bool ad_registry_name_ok(const char *name)
{
    size_t n = strlen(name);
    if (n < 1 || n > 64 || name[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static int bad_name(const char *name, struct ad_err *err)
{
    return ad_err_set(err, -EINVAL, "'%.80s' is not a valid adapter name (1-64 of A-Z a-z 0-9 "
                      ". _ -, not starting with '.')", name);
}

static size_t lower_bound(const struct ad_registry *r, const char *name)
{
    size_t lo = 0, hi = r->n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (strcmp(r->entries[mid].name, name) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static struct entry *find(struct ad_registry *r, const char *name)
{
    size_t i = lower_bound(r, name);
    return i < r->n && !strcmp(r->entries[i].name, name) ? &r->entries[i] : NULL;
}

static struct entry *insert(struct ad_registry *r, const char *name)
{
    size_t i = lower_bound(r, name);
    if (r->n == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 64;
        struct entry *e = realloc(r->entries, cap * sizeof(*e));
        if (!e)
            return NULL;
        r->entries = e;
        r->cap = cap;
    }
    memmove(&r->entries[i + 1], &r->entries[i], (r->n - i) * sizeof(*r->entries));
    r->n++;
    memset(&r->entries[i], 0, sizeof(r->entries[i]));
    snprintf(r->entries[i].name, sizeof(r->entries[i].name), "%s", name);
    return &r->entries[i];
}

/* Removes e, returning its resident adapter (the caller unrefs it outside the lock). */
static struct ad_adapter *remove_entry(struct ad_registry *r, struct entry *e)
{
    struct ad_adapter *a = e->a;
    if (a)
        r->resident -= e->bytes;
    size_t i = (size_t)(e - r->entries);
    memmove(&r->entries[i], &r->entries[i + 1], (r->n - i - 1) * sizeof(*r->entries));
    r->n--;
    return a;
}

static void set_resident(struct ad_registry *r, struct entry *e, struct ad_adapter *a)
{
    e->a = a;
    e->bytes = a->bytes;
    e->kind = a->kind;
    e->rank = 0;
    for (int i = 0; i < a->model->n_sites; i++)
        if (a->by_site[i] && a->by_site[i]->lora.rank > e->rank)
            e->rank = a->by_site[i]->lora.rank;
    r->resident += a->bytes;
}

/* Drops least recently used adapters that nobody else holds until the budget is met. The
 * dropped references are appended to out (freed by the caller outside the lock). */
static size_t evict(struct ad_registry *r, struct ad_adapter **out, size_t max_out)
{
    size_t n_out = 0;
    while (r->budget && r->resident > r->budget && n_out < max_out) {
        struct entry *victim = NULL;
        for (size_t i = 0; i < r->n; i++) {
            struct entry *e = &r->entries[i];
            if (e->a && atomic_load(&e->a->refs) == 1 &&
                (!victim || e->last_use < victim->last_use))
                victim = e;
        }
        if (!victim)
            break; /* everything resident is in use: over budget until released */
        out[n_out++] = victim->a;
        r->resident -= victim->bytes;
        victim->a = NULL;
    }
    return n_out;
}

static void unref_all(struct ad_adapter **list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ad_adapter_unref(list[i]);
}

/* ==========================================================================================
 * Lifetime and scan */

int ad_registry_new(const struct ad_model *m, const char *dir, size_t byte_budget,
                    unsigned load_flags, struct ad_registry **ret, struct ad_err *err)
{
    struct ad_registry *r;

    if (mkdir(dir, 0755) < 0 && errno != EEXIST)
        return ad_err_set(err, -errno, "%s: %s", dir, strerror(errno));
    r = calloc(1, sizeof(*r));
    if (!r)
        return ad_err_set(err, -ENOMEM, "out of memory");
    if (snprintf(r->dir, sizeof(r->dir), "%s", dir) >= (int)sizeof(r->dir)) {
        free(r);
        return ad_err_set(err, -ENAMETOOLONG, "%s: path too long", dir);
    }
    r->m = m;
    r->budget = byte_budget;
    r->load_flags = load_flags;
    pthread_mutex_init(&r->lock, NULL);
    *ret = r;
    return 0;
}

void ad_registry_free(struct ad_registry *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->n; i++)
        ad_adapter_unref(r->entries[i].a);
    free(r->entries);
    free(r->live);
    pthread_mutex_destroy(&r->lock);
    free(r);
}

/* The kind and rank an adapter directory's adapter_config.json declares, without loading the
 * weights (those are checked when the adapter is first used). */
static int peek_config(const char *dir, enum ad_adapter_kind *kind, int *rank, struct ad_err *err)
{
    char path[4200];
    *kind = AD_ADAPTER_KIND_COUNT;
    *rank = 0;
    json_error_t jerr;
    snprintf(path, sizeof(path), "%s/adapter_config.json", dir);
    json_t *cfg = json_load_file(path, 0, &jerr);
    if (!json_is_object(cfg)) {
        json_decref(cfg);
        return ad_err_set(err, -EINVAL, "%.200s: %s", path, cfg ? "not a JSON object" : jerr.text);
    }
    const char *pt = json_string_value(json_object_get(cfg, "peft_type"));
    *kind = ad_adapter_config_kind(pt);
    json_t *r = json_object_get(cfg, "r");
    *rank = json_is_integer(r) ? (int)json_integer_value(r) : 0;
    int rc = *kind == AD_ADAPTER_KIND_COUNT
                 ? ad_err_set(err, -ENOTSUP, "adapter_config.json: peft_type '%.40s' is not "
                              "supported", pt)
                 : 0;
    json_decref(cfg);
    return rc;
}

static bool is_live(struct ad_registry *r, const char *name)
{
    bool live = false;
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n_live && !live; i++)
        live = !strcmp(r->live[i], name);
    pthread_mutex_unlock(&r->lock);
    return live;
}

/* The newest modification time of a directory and the files in it. */
static time_t newest_mtime(const char *path)
{
    struct stat st;
    time_t t = stat(path, &st) == 0 ? st.st_mtime : 0;
    DIR *d = opendir(path);
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (strcmp(de->d_name, "..") &&
            fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_mtime > t)
            t = st.st_mtime;
    if (d)
        closedir(d);
    return t;
}

/* A staging or trash directory nobody writes: not one of this process's, and untouched for
 * STALE_SECONDS (another process sharing the store may be writing it). */
static bool is_stale(struct ad_registry *r, const char *path, const char *name)
{
    return !is_live(r, name) && time(NULL) - newest_mtime(path) > STALE_SECONDS;
}

int ad_registry_scan(struct ad_registry *r, ad_registry_error_fn on_error, void *ud)
{
    DIR *d = opendir(r->dir);
    struct dirent *de;
    char path[4096];
    int n_ok = 0;
    size_t loaded = 0; /* bytes this scan loaded: eager loading stops at the budget */

    if (!d)
        return -errno;
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n; i++)
        r->entries[i].seen = false;
    pthread_mutex_unlock(&r->lock);

    while ((de = readdir(d))) {
        const char *name = de->d_name;
        if (!strncmp(name, STAGE_PREFIX, strlen(STAGE_PREFIX)) ||
            !strncmp(name, TRASH_PREFIX, strlen(TRASH_PREFIX))) {
            /* an interrupted write (the name still holds a whole adapter), or one in progress */
            if (ad_path_join(path, sizeof(path), r->dir, name) == 0 && is_stale(r, path, name))
                ad_rm_rf(path);
            continue;
        }
        if (!ad_registry_name_ok(name) || ad_path_join(path, sizeof(path), r->dir, name) < 0)
            continue;
        struct stat st;
        if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode))
            continue;

        pthread_mutex_lock(&r->lock);
        struct entry *e = find(r, name);
        if (e)
            e->seen = true;
        pthread_mutex_unlock(&r->lock);
        if (e) {
            n_ok++;
            continue;
        }
        /* New. While the budget has room: load it (validated now, resident). Beyond: register
         * it from its config alone, to be loaded and validated when first asked for, so a
         * store of thousands of adapters is served within a second of starting. */
        if (r->budget && loaded >= r->budget) {
            enum ad_adapter_kind kind = AD_ADAPTER_KIND_COUNT;
            int rank = 0;
            struct ad_err err;
            if (peek_config(path, &kind, &rank, &err) < 0) {
                if (on_error) /* as a failed load: a later scan may see it whole */
                    on_error(ud, name, &err);
                continue;
            }
            pthread_mutex_lock(&r->lock);
            e = find(r, name) ? NULL : insert(r, name);
            if (e) {
                e->kind = kind;
                e->rank = rank;
                e->seen = true;
                n_ok++;
            }
            pthread_mutex_unlock(&r->lock);
            continue;
        }
        struct ad_adapter *a;
        struct ad_err err;
        if (ad_adapter_load(r->m, path, name, r->load_flags, &a, &err) < 0) {
            if (on_error)
                on_error(ud, name, &err);
            continue;
        }
        loaded += a->bytes;
        struct ad_adapter *drop[64];
        size_t n_drop = 0;
        pthread_mutex_lock(&r->lock);
        e = find(r, name) ? NULL : insert(r, name);
        if (e) {
            set_resident(r, e, a);
            e->seen = true;
            e->last_use = ++r->clock;
            a = NULL;
            n_drop = evict(r, drop, 64);
            n_ok++;
        }
        pthread_mutex_unlock(&r->lock);
        ad_adapter_unref(a);
        unref_all(drop, n_drop);
    }
    closedir(d);

    /* Forget adapters whose directories vanished. */
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n;) {
        if (r->entries[i].seen) {
            i++;
            continue;
        }
        struct ad_adapter *a = remove_entry(r, &r->entries[i]);
        pthread_mutex_unlock(&r->lock);
        ad_adapter_unref(a);
        pthread_mutex_lock(&r->lock);
    }
    pthread_mutex_unlock(&r->lock);
    return n_ok;
}

/* ==========================================================================================
 * Get */

int ad_registry_get(struct ad_registry *r, const char *name, struct ad_adapter **ret,
                    struct ad_err *err)
{
    for (int attempt = 0; attempt < 4; attempt++) {
        struct ad_adapter *drop[64];
        size_t n_drop;
        char path[4096];

        pthread_mutex_lock(&r->lock);
        struct entry *e = find(r, name);
        if (!e) {
            pthread_mutex_unlock(&r->lock);
            return ad_err_set(err, -ENOENT, "adapter '%s' does not exist", name);
        }
        if (e->a) {
            *ret = ad_adapter_ref(e->a);
            e->uses++;
            e->last_use = ++r->clock;
            pthread_mutex_unlock(&r->lock);
            return 0;
        }
        uint64_t version = e->version;
        pthread_mutex_unlock(&r->lock);

        /* Not resident: load outside the lock, then install unless something changed. */
        struct ad_adapter *a;
        int rc = ad_path_join(path, sizeof(path), r->dir, name);
        if (rc >= 0)
            rc = ad_adapter_load(r->m, path, name, r->load_flags, &a, err);
        if (rc < 0) {
            ad_err_prefix(err, "adapter '%s'", name);
            return rc;
        }
        pthread_mutex_lock(&r->lock);
        e = find(r, name);
        if (!e || e->version != version) {
            pthread_mutex_unlock(&r->lock);
            ad_adapter_unref(a);
            continue; /* deleted or replaced meanwhile: look again */
        }
        if (e->a) { /* another thread loaded it first */
            ad_adapter_unref(a);
        } else {
            set_resident(r, e, a);
        }
        *ret = ad_adapter_ref(e->a);
        e->uses++;
        e->last_use = ++r->clock;
        n_drop = evict(r, drop, 64);
        pthread_mutex_unlock(&r->lock);
        unref_all(drop, n_drop);
        return 0;
    }
    return ad_err_set(err, -EAGAIN, "adapter '%s' keeps changing", name);
}

/* ==========================================================================================
 * Writes */

/* The base name of a staging path inside the registry's directory. */
static const char *stage_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

int ad_registry_stage_dir(struct ad_registry *r, char *buf, size_t size, struct ad_err *err)
{
    if (snprintf(buf, size, "%s/" STAGE_PREFIX "XXXXXX", r->dir) >= (int)size)
        return ad_err_set(err, -ENAMETOOLONG, "cannot stage: the adapters directory's path is "
                          "too long");
    pthread_mutex_lock(&r->lock);
    int rc = 0;
    if (!r->live) /* allocated on first use */
        r->live = malloc(MAX_LIVE_STAGES * sizeof(*r->live));
    if (!r->live)
        rc = ad_err_set(err, -ENOMEM, "cannot stage: out of memory");
    else if (r->n_live == MAX_LIVE_STAGES)
        rc = ad_err_set(err, -EAGAIN, "cannot stage: %d uploads in progress; retry later",
                        MAX_LIVE_STAGES);
    else if (!mkdtemp(buf))
        rc = ad_err_set(err, errno == ENOSPC || errno == EDQUOT ? -ENOSPC : -EIO,
                        "cannot stage: %s", strerror(errno));
    else
        snprintf(r->live[r->n_live++], sizeof(r->live[0]), "%s", stage_name(buf));
    pthread_mutex_unlock(&r->lock);
    return rc;
}

void ad_registry_unstage(struct ad_registry *r, const char *staged)
{
    ad_rm_rf(staged);
    pthread_mutex_lock(&r->lock);
    for (size_t i = 0; i < r->n_live; i++)
        if (!strcmp(r->live[i], stage_name(staged))) {
            memcpy(r->live[i], r->live[--r->n_live], sizeof(r->live[0]));
            break;
        }
    pthread_mutex_unlock(&r->lock);
}

int ad_registry_install(struct ad_registry *r, const char *name, const char *staged,
                        bool *ret_created, struct ad_err *err)
{
    struct ad_adapter *a = NULL, *old = NULL, *drop[64];
    size_t n_drop = 0;
    char target[4096];
    int rc;

    if (!ad_registry_name_ok(name)) {
        rc = bad_name(name, err);
        goto out;
    }
    rc = ad_path_join(target, sizeof(target), r->dir, name);
    if (rc < 0) {
        ad_err_set(err, rc, "cannot install '%s': the adapters directory's path is too long",
                   name);
        goto out;
    }
    /* A staging directory that vanished is the server's failure, not the client's: -EAGAIN,
     * "retry", never -ENOENT (which would read as an unknown adapter). */
    rc = ad_fsync_dir(staged);
    if (rc < 0) {
        ad_err_set(err, -EAGAIN, "cannot stage '%s' (%s); retry", name, strerror(-rc));
        rc = -EAGAIN;
        goto out;
    }
    rc = ad_adapter_load(r->m, staged, name, r->load_flags, &a, err); /* validate first */
    if (rc < 0)
        goto out;

    pthread_mutex_lock(&r->lock);
    struct entry *e = find(r, name);
    bool exists = access(target, F_OK) == 0;
    if (exists)
        rc = renameat2(AT_FDCWD, staged, AT_FDCWD, target, RENAME_EXCHANGE) < 0 ? -errno : 0;
    else
        rc = rename(staged, target) < 0 ? -errno : 0;
    if (rc == 0)
        ad_fsync_dir(r->dir);
    if (rc == 0 && !e)
        e = insert(r, name);
    if (rc == 0 && e) {
        if (e->a) {
            old = e->a;
            r->resident -= e->bytes;
        }
        set_resident(r, e, a);
        e->version++;
        e->last_use = ++r->clock;
        a = NULL;
        n_drop = evict(r, drop, 64);
        if (ret_created)
            *ret_created = !exists;
    } else if (rc == 0) {
        rc = -ENOMEM;
    }
    pthread_mutex_unlock(&r->lock);
    if (rc < 0)
        ad_err_set(err, rc, "installing '%s': %s", name, strerror(-rc));
out:
    ad_registry_unstage(r, staged); /* the old version after an exchange, or the rejected one */
    ad_adapter_unref(a);
    ad_adapter_unref(old);
    unref_all(drop, n_drop);
    return rc;
}

int ad_registry_put(struct ad_registry *r, const char *name, const char *config_json,
                    const void *weights, size_t weights_len, bool *ret_created,
                    struct ad_err *err)
{
    char staged[4096], path[4200];
    /* AdapterHub configs have no peft_type; their weights file has its own name */
    const char *wname = strstr(config_json, "\"peft_type\"") ? "adapter_model.safetensors"
                                                               : "adapter.safetensors";
    int rc;

    if (!ad_registry_name_ok(name))
        return bad_name(name, err);
    rc = ad_registry_stage_dir(r, staged, sizeof(staged), err);
    if (rc < 0)
        return rc;
    snprintf(path, sizeof(path), "%s/adapter_config.json", staged);
    rc = ad_write_file(path, config_json, strlen(config_json));
    if (rc >= 0) {
        snprintf(path, sizeof(path), "%s/%s", staged, wname);
        rc = ad_write_file(path, weights, weights_len);
    }
    if (rc < 0) {
        ad_registry_unstage(r, staged);
        return ad_err_set(err, rc, "cannot stage '%s': %s", name, strerror(-rc));
    }
    return ad_registry_install(r, name, staged, ret_created, err);
}

int ad_registry_delete(struct ad_registry *r, const char *name, struct ad_err *err)
{
    char target[4096], trash[4096];
    struct ad_adapter *a = NULL;
    int rc = 0;

    if (!ad_registry_name_ok(name) || ad_path_join(target, sizeof(target), r->dir, name) < 0)
        return ad_err_set(err, -ENOENT, "adapter '%.80s' does not exist", name);
    /* The directory is renamed over a new empty one of a unique name (a rename may replace an
     * empty directory), so that deletes of the same name never share a trash directory. */
    if (snprintf(trash, sizeof(trash), "%s/" TRASH_PREFIX "XXXXXX", r->dir) >= (int)sizeof(trash))
        return ad_err_set(err, -ENAMETOOLONG, "deleting '%s': path too long", name);
    if (!mkdtemp(trash))
        return ad_err_set(err, -EIO, "deleting '%s': %s", name, strerror(errno));
    pthread_mutex_lock(&r->lock);
    struct entry *e = find(r, name);
    if (!e) {
        rc = ad_err_set(err, -ENOENT, "adapter '%s' does not exist", name);
    } else if (rename(target, trash) < 0 && errno != ENOENT) {
        rc = ad_err_set(err, -EIO, "deleting '%s': %s", name, strerror(errno));
    } else {
        ad_fsync_dir(r->dir);
        a = remove_entry(r, e);
    }
    pthread_mutex_unlock(&r->lock);
    ad_rm_rf(trash);
    ad_adapter_unref(a);
    return rc;
}

/* ==========================================================================================
 * Listing */

int ad_registry_list(struct ad_registry *r, struct ad_registry_info **ret, size_t *ret_n)
{
    pthread_mutex_lock(&r->lock);
    struct ad_registry_info *out = calloc(r->n ? r->n : 1, sizeof(*out));
    if (!out) {
        pthread_mutex_unlock(&r->lock);
        return -ENOMEM;
    }
    for (size_t i = 0; i < r->n; i++) {
        const struct entry *e = &r->entries[i];
        memcpy(out[i].name, e->name, sizeof(out[i].name));
        out[i].resident = e->a != NULL;
        out[i].kind = e->kind;
        out[i].rank = e->rank;
        out[i].bytes = e->bytes;
        out[i].uses = e->uses;
    }
    *ret_n = r->n;
    pthread_mutex_unlock(&r->lock);
    *ret = out;
    return 0;
}

size_t ad_registry_resident_bytes(struct ad_registry *r)
{
    pthread_mutex_lock(&r->lock);
    size_t n = r->resident;
    pthread_mutex_unlock(&r->lock);
    return n;
}

const char *ad_registry_dir(const struct ad_registry *r)
{
    return r->dir;
}
