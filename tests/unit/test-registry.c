/* The adapter registry: scan (bad adapters skipped, leftovers removed), get, atomic replace and
 * delete while references are held, validation that leaves the old version in place, the byte
 * budget with reload on demand, and readers racing a writer. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../check.h"
#include "../tiny.h"
#include "adapterd/registry.h"
#include "adapterd/util.h"

static char adir[128];
static int n_errors;

static void on_error(void *ud, const char *name, const struct ad_err *err)
{
    (void)ud;
    n_errors++;
    CHECK_STR(name, "bad");
    CHECK(err->msg[0] != '\0');
}

/* Sets a path's modification time to `seconds` ago. */
static void age(const char *path, int seconds)
{
    struct timespec ts[2];
    clock_gettime(CLOCK_REALTIME, &ts[0]);
    ts[0].tv_sec -= seconds;
    ts[1] = ts[0];
    CHECK_INT(utimensat(AT_FDCWD, path, ts, 0), ==, 0);
}

static bool exists(const char *name)
{
    char p[512];
    snprintf(p, sizeof(p), "%s/%s", adir, name);
    return access(p, F_OK) == 0;
}

static int count_hidden(void)
{
    int n = 0;
    DIR *d = opendir(adir);
    struct dirent *e;
    while ((e = readdir(d)))
        n += e->d_name[0] == '.' && strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return n;
}

/* Reads an adapter's files back (to put them again under other names). */
static void read_adapter(const char *name, char **config, char **weights, size_t *len)
{
    char p[512];
    struct ad_err err;
    snprintf(p, sizeof(p), "%s/%s/adapter_config.json", adir, name);
    CHECK_INT(ad_read_file(p, 1 << 20, config, NULL, &err), ==, 0);
    snprintf(p, sizeof(p), "%s/%s/adapter_model.safetensors", adir, name);
    CHECK_INT(ad_read_file(p, 1 << 20, weights, len, &err), ==, 0);
}

struct race {
    struct ad_registry *r;
    int n_gets;
};

static void *reader(void *arg)
{
    struct race *rc = arg;
    for (int i = 0; i < 300; i++) {
        struct ad_adapter *a;
        struct ad_err err;
        if (ad_registry_get(rc->r, "hot", &a, &err) == 0) {
            /* every version is whole: A's values are all the same */
            const struct ad_site_delta *d = a->by_site[0];
            CHECK(d && d->lora.a);
            for (int j = 0; j < d->lora.rank * 16; j++)
                CHECK_NEAR(ad_lora_a_at(&d->lora, 0, j), ad_lora_a_at(&d->lora, 0, 0), 0);
            rc->n_gets++;
            ad_adapter_unref(a);
        }
    }
    return NULL;
}

int main(void)
{
    char mdir[64], p[512];
    struct ad_model *m = tiny_model(mdir);
    struct ad_registry *r;
    struct ad_adapter *a, *a2, *held;
    struct ad_err err;
    bool created;

    snprintf(adir, sizeof(adir), "%s/adapters", mdir);
    CHECK_INT(mkdir(adir, 0755), ==, 0);
    snprintf(p, sizeof(p), "%s/a", adir);
    tiny_lora(p, 2, 0.5f);
    snprintf(p, sizeof(p), "%s/bad", adir);
    tiny_lora(p, 3, 0.5f);
    snprintf(p, sizeof(p), "%s/bad/adapter_config.json", adir);
    CHECK_INT(ad_write_file(p, "{\"peft_type\":\"LORA\",\"r\":2}", 26), ==, 0); /* rank 3 != 2 */
    /* leftovers: one untouched for an hour (a crash), one fresh (another process's, maybe) */
    snprintf(p, sizeof(p), "%s/.stage-left", adir);
    CHECK_INT(mkdir(p, 0755), ==, 0);
    age(p, 3600);
    snprintf(p, sizeof(p), "%s/.stage-fresh", adir);
    CHECK_INT(mkdir(p, 0755), ==, 0);

    /* scan */
    CHECK_INT(ad_registry_new(m, adir, 0, 0, &r, &err), ==, 0);
    CHECK_INT(ad_registry_scan(r, on_error, NULL), ==, 1);
    CHECK_INT(n_errors, ==, 1);
    CHECK(!exists(".stage-left"));
    CHECK(exists(".stage-fresh"));
    snprintf(p, sizeof(p), "%s/.stage-fresh", adir);
    CHECK_INT(rmdir(p), ==, 0);
    /* this process's staging directory is never touched by a scan, however old, until it is
     * installed or unstaged */
    char staged[4096];
    CHECK_INT(ad_registry_stage_dir(r, staged, sizeof(staged), &err), ==, 0);
    age(staged, 7200);
    CHECK_INT(ad_registry_scan(r, on_error, NULL), ==, 1);
    CHECK_INT(access(staged, F_OK), ==, 0);
    ad_registry_unstage(r, staged);
    CHECK_INT(access(staged, F_OK), ==, -1);
    CHECK_INT(ad_registry_get(r, "nope", &a, &err), ==, -ENOENT);
    CHECK_CONTAINS(err.msg, "'nope'");
    CHECK_INT(ad_registry_get(r, "a", &a, &err), ==, 0);
    CHECK_INT(a->kind, ==, AD_ADAPTER_LORA);
    CHECK_NEAR(ad_lora_a_at(&a->by_site[0]->lora, 0, 0), 0.5, 0);

    /* put: create, then replace while the old version is held */
    char *config, *weights;
    size_t wlen;
    read_adapter("a", &config, &weights, &wlen);
    CHECK_INT(ad_registry_put(r, "b", config, weights, wlen, &created, &err), ==, 0);
    CHECK(created);
    CHECK_INT(ad_registry_get(r, "b", &held, &err), ==, 0);
    snprintf(p, sizeof(p), "%s/src", mdir);
    tiny_lora(p, 2, 0.25f);
    char *config2, *weights2;
    size_t wlen2;
    snprintf(p, sizeof(p), "%s/src/adapter_config.json", mdir);
    CHECK_INT(ad_read_file(p, 1 << 20, &config2, NULL, &err), ==, 0);
    snprintf(p, sizeof(p), "%s/src/adapter_model.safetensors", mdir);
    CHECK_INT(ad_read_file(p, 1 << 20, &weights2, &wlen2, &err), ==, 0);
    CHECK_INT(ad_registry_put(r, "b", config2, weights2, wlen2, &created, &err), ==, 0);
    CHECK(!created);
    CHECK_INT(ad_registry_get(r, "b", &a2, &err), ==, 0);
    CHECK(a2 != held);
    CHECK_NEAR(ad_lora_a_at(&a2->by_site[0]->lora, 0, 0), 0.25, 0);
    CHECK_NEAR(ad_lora_a_at(&held->by_site[0]->lora, 0, 0), 0.5, 0); /* the holder keeps its version */
    ad_adapter_unref(a2);

    /* an invalid replacement changes nothing and leaves nothing behind */
    CHECK_INT(ad_registry_put(r, "b", config2, weights2, wlen2 - 7, &created, &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "truncated");
    CHECK_INT(ad_registry_put(r, "b", "{\"peft_type\":\"LORA\",\"r\":5}", weights2, wlen2, &created,
                              &err), ==, -EINVAL);
    CHECK_CONTAINS(err.msg, "rank 2");
    CHECK_INT(ad_registry_get(r, "b", &a2, &err), ==, 0);
    CHECK_NEAR(ad_lora_a_at(&a2->by_site[0]->lora, 0, 0), 0.25, 0);
    ad_adapter_unref(a2);
    CHECK_INT(count_hidden(), ==, 0);
    CHECK_INT(ad_registry_put(r, "../x", config, weights, wlen, &created, &err), ==, -EINVAL);
    CHECK_INT(ad_registry_put(r, ".hidden", config, weights, wlen, &created, &err), ==, -EINVAL);

    /* delete while held */
    CHECK_INT(ad_registry_delete(r, "b", &err), ==, 0);
    CHECK_INT(ad_registry_get(r, "b", &a2, &err), ==, -ENOENT);
    CHECK(!exists("b"));
    CHECK_NEAR(ad_lora_a_at(&held->by_site[0]->lora, 0, 0), 0.5, 0);
    ad_adapter_unref(held);
    CHECK_INT(ad_registry_delete(r, "b", &err), ==, -ENOENT);

    /* listing */
    struct ad_registry_info *info;
    size_t n;
    CHECK_INT(ad_registry_list(r, &info, &n), ==, 0);
    CHECK_INT(n, ==, 1);
    CHECK_STR(info[0].name, "a");
    CHECK_INT(info[0].rank, ==, 2);
    CHECK_INT(info[0].uses, ==, 1);
    free(info);
    size_t one = a->bytes;
    ad_adapter_unref(a);
    ad_registry_free(r);

    /* budget: room for one adapter; the other is evicted and reloaded on demand */
    CHECK_INT(ad_registry_new(m, adir, one + one / 2, 0, &r, &err), ==, 0);
    CHECK_INT(ad_registry_put(r, "c", config, weights, wlen, &created, &err), ==, 0);
    CHECK_INT(ad_registry_scan(r, NULL, NULL), ==, 2); /* "a" on disk, "c" */
    CHECK(ad_registry_resident_bytes(r) <= one + one / 2);
    for (int i = 0; i < 6; i++) {
        CHECK_INT(ad_registry_get(r, i % 2 ? "a" : "c", &a, &err), ==, 0);
        CHECK_NEAR(ad_lora_a_at(&a->by_site[0]->lora, 0, 0), 0.5, 0);
        ad_adapter_unref(a);
        CHECK(ad_registry_resident_bytes(r) <= one + one / 2);
    }
    CHECK_INT(ad_registry_get(r, "a", &a, &err), ==, 0);
    CHECK_INT(ad_registry_get(r, "c", &a2, &err), ==, 0); /* both held: over budget is allowed */
    CHECK_INT(ad_registry_resident_bytes(r), ==, 2 * one);
    ad_adapter_unref(a);
    ad_adapter_unref(a2);

    /* readers racing a writer that keeps replacing the adapter */
    CHECK_INT(ad_registry_put(r, "hot", config, weights, wlen, &created, &err), ==, 0);
    struct race rc = {r, 0};
    pthread_t t;
    CHECK_INT(pthread_create(&t, NULL, reader, &rc), ==, 0);
    for (int i = 0; i < 60; i++)
        CHECK_INT(ad_registry_put(r, "hot", i % 2 ? config : config2, i % 2 ? weights : weights2,
                                  i % 2 ? wlen : wlen2, &created, &err), ==, 0);
    pthread_join(t, NULL);
    CHECK_INT(rc.n_gets, ==, 300);
    CHECK_INT(count_hidden(), ==, 0);

    ad_registry_free(r);

    /* a budget smaller than one adapter: the first is loaded and checked at scan, the others
     * registered from their configs and loaded (and checked) when first asked for */
    CHECK_INT(ad_registry_new(m, adir, 1, 0, &r, &err), ==, 0);
    n_errors = 0;
    int n_scanned = ad_registry_scan(r, on_error, NULL);
    size_t n_info, n_resident = 0;
    char lazy[65] = "";
    CHECK_INT(ad_registry_list(r, &info, &n_info), ==, 0);
    CHECK_INT(n_info, ==, (size_t)n_scanned);
    CHECK_INT(n_info, >=, 2);
    for (size_t i = 0; i < n_info; i++) {
        CHECK_INT(info[i].kind, ==, AD_ADAPTER_LORA);
        if (info[i].bytes > 0) /* loaded at least once */
            n_resident++;
        else if (strcmp(info[i].name, "bad"))
            snprintf(lazy, sizeof(lazy), "%s", info[i].name);
    }
    free(info);
    CHECK_INT(n_resident, ==, 1);
    CHECK(lazy[0]);
    CHECK_INT(ad_registry_get(r, lazy, &a2, &err), ==, 0); /* loaded on demand */
    CHECK_INT(a2->kind, ==, AD_ADAPTER_LORA);
    ad_adapter_unref(a2);
    if (n_errors == 0) { /* 'bad' was registered unchecked: its error comes at first use */
        CHECK_INT(ad_registry_get(r, "bad", &a2, &err), ==, -EINVAL);
        CHECK_CONTAINS(err.msg, "rank");
    }
    ad_registry_free(r);
    free(config);
    free(weights);
    free(config2);
    free(weights2);
    ad_model_free(m);
    ad_rm_rf(mdir);
    printf("registry: ok\n");
    return 0;
}
