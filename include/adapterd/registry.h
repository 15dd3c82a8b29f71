/* adapterd: the adapter registry: name -> immutable, reference-counted adapter, persisted as one
 * directory per adapter under the adapters directory, with a byte budget for resident adapters.
 *
 * Every function is thread-safe (one mutex guards the table; loading from disk happens outside
 * it). get() hands out a new reference: replace and delete never disturb a holder, who keeps the
 * version it got until it drops the reference. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/adapter.h"

struct ad_err;
struct ad_model;
struct ad_registry;

/* Creates a registry over dir (created if missing) for model m (borrowed; must outlive the
 * registry). byte_budget bounds the bytes of resident adapters (0 = no bound): unreferenced ones
 * are evicted least recently used first, and reloaded from disk when asked for. load_flags
 * (AD_ADAPTER_* of adapter.h) are passed to every load. */
int ad_registry_new(const struct ad_model *m, const char *dir, size_t byte_budget,
                    unsigned load_flags, struct ad_registry **ret, struct ad_err *err);
void ad_registry_free(struct ad_registry *r);

/* Called for each adapter directory that fails to load during a scan. */
typedef void (*ad_registry_error_fn)(void *ud, const char *name, const struct ad_err *err);

/* Reads the directory: new adapter directories are registered (and loaded while the budget
 * allows), vanished ones forgotten, leftovers of interrupted writes removed. A bad adapter is
 * reported through on_error and skipped; the others load. Returns the number registered. */
int ad_registry_scan(struct ad_registry *r, ad_registry_error_fn on_error, void *ud);

/* A new reference to the adapter called name, loading it from disk if it is not resident.
 * Returns 0, -ENOENT (unknown name) or the load error (err says why). */
int ad_registry_get(struct ad_registry *r, const char *name, struct ad_adapter **ret,
                    struct ad_err *err);

/* Installs a complete adapter directory staged by the caller inside the registry (see
 * ad_registry_stage_dir) under name: validates it against the model, then swaps it into place
 * atomically (the old version, if any, stays valid for its holders). The staged directory is
 * consumed either way (ad_registry_unstage). Returns 0 with *ret_created telling whether the name
 * is new, or -EINVAL / -ENOTSUP (validation: nothing changed), -EAGAIN (the staged directory
 * vanished: retry) or another -errno. Messages name the adapter, never a server path. */
int ad_registry_install(struct ad_registry *r, const char *name, const char *staged,
                        bool *ret_created, struct ad_err *err);

/* A new empty staging directory inside the registry, for files to install (uploads stream into
 * it). Writes its path to buf. Until ad_registry_install or ad_registry_unstage consumes it, no
 * scan touches it; leftovers of a crash are removed by a later scan. Returns 0, -ENOSPC,
 * -EAGAIN (too many in progress) or -EIO/-ENOMEM. */
int ad_registry_stage_dir(struct ad_registry *r, char *buf, size_t size, struct ad_err *err);
/* Removes a staging directory from ad_registry_stage_dir that will not be installed. */
void ad_registry_unstage(struct ad_registry *r, const char *staged);

/* Writes a config text and a weights image to a staging directory and installs them. */
int ad_registry_put(struct ad_registry *r, const char *name, const char *config_json,
                    const void *weights, size_t weights_len, bool *ret_created,
                    struct ad_err *err);

/* Removes the adapter's directory and forgets it; holders keep their reference. Returns 0 or
 * -ENOENT. */
int ad_registry_delete(struct ad_registry *r, const char *name, struct ad_err *err);

/* True if name is a valid adapter name: 1 to 64 of [A-Za-z0-9._-], not starting with '.'. */
bool ad_registry_name_ok(const char *name);

struct ad_registry_info {
    char name[65];
    bool resident;
    enum ad_adapter_kind kind; /* valid once loaded at least once */
    int rank;                  /* largest LoRA rank, 0 for other kinds */
    size_t bytes;              /* resident bytes, or the bytes it had when last loaded */
    uint64_t uses;             /* successful gets */
};

/* A snapshot of every registered adapter, sorted by name (caller frees *ret). */
int ad_registry_list(struct ad_registry *r, struct ad_registry_info **ret, size_t *ret_n);
/* The adapters directory (borrowed, valid for the registry's life). */
const char *ad_registry_dir(const struct ad_registry *r);
/* Bytes of resident adapters now. */
size_t ad_registry_resident_bytes(struct ad_registry *r);
