/* adapterctl: what the commands share: the command table, options, the client, errors,
 * output helpers (JSON, tables, sizes) and the progress bar. main.c holds the table. */
#pragma once

#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd-client.h"

/* Exit statuses (adapterctl(1), EXIT STATUS). */
enum {
    CTL_OK = 0,
    CTL_FAILED = 1,        /* the server refused, or it could not be reached */
    CTL_USAGE = 2,         /* a wrong command line */
    CTL_INTERRUPTED = 130, /* SIGINT (128 + 2) */
};

struct ctl {
    const char *url;     /* --url, $ADAPTERD_URL, or the default (borrowed) */
    const char *api_key; /* --api-key or $ADAPTERD_API_KEY (borrowed), or NULL */
    bool json;           /* --json: the server's JSON (or a JSON summary) on stdout */
    const struct ctl_command *cmd;
    struct adc_client *client; /* made by ctl_client() */
};

struct ctl_command {
    const char *name;
    const char *args;    /* the operands, for the usage line: "NAME DIR" */
    const char *summary; /* one line for `adapterctl --help` */
    const char *help;    /* options and output, for `adapterctl COMMAND --help` */
    /* argv[0] is the command's name; returns an exit status */
    int (*run)(struct ctl *ctl, int argc, char **argv);
};

extern const struct ctl_command ctl_models, ctl_adapters, ctl_upload, ctl_complete, ctl_chat,
    ctl_tokenize, ctl_health, ctl_metrics, ctl_train, ctl_jobs, ctl_files;

/* The options every command takes (main.c); a command's own are letters or >= OPT_OWN. */
enum { OPT_URL = 0x100, OPT_API_KEY, OPT_JSON, OPT_OWN = 0x200 };
#define CTL_COMMON_HELP                                                                            \
    "      --url URL       the server (default $ADAPTERD_URL, else http://127.0.0.1:8080)\n"       \
    "      --api-key KEY   sent as 'Authorization: Bearer KEY' (default $ADAPTERD_API_KEY)\n"      \
    "      --json          print the server's JSON instead of text\n"                              \
    "  -h, --help          this help\n"

/* Called with each of a command's own options; returns 0, or CTL_USAGE after
 * ctl_usage_error(). */
typedef int (*ctl_option_fn)(struct ctl *ctl, void *st, int opt, const char *arg);

/* Parses a command's options (the common ones, and own: NULL-terminated, values >= OPT_OWN or
 * the letters in shortopts, each handed to on_opt), then checks that there are between
 * min_operands and max_operands (-1: no limit) operands. Exits 0 after --help and 2 after a
 * usage error (nothing is allocated yet then). Returns the index of the first operand. */
int ctl_options(struct ctl *ctl, int argc, char **argv, const char *shortopts,
                const struct option *own, ctl_option_fn on_opt, void *st, int min_operands,
                int max_operands);

/* Prints "adapterctl COMMAND: <message>" and a pointer to --help on stderr; returns
 * CTL_USAGE. */
int ctl_usage_error(struct ctl *ctl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Parse a number option, or ctl_usage_error() naming it: 0 or CTL_USAGE. */
int ctl_parse_long(struct ctl *ctl, const char *opt, const char *arg, long lo, long hi, long *ret);
int ctl_parse_double(struct ctl *ctl, const char *opt, const char *arg, double lo, double hi,
                     double *ret);

/* The client (made on first use: SIGINT then cancels its call). NULL after printing why. */
struct adc_client *ctl_client(struct ctl *ctl);

/* Prints the error on stderr: "adapterctl: MESSAGE (HTTP 404 not_found_error)". Returns the
 * exit status: CTL_INTERRUPTED after SIGINT (printing nothing), else CTL_FAILED. */
int ctl_fail(struct ctl *ctl, const struct adc_error *e);
/* True once SIGINT has come. */
bool ctl_interrupted(void);

/* Text: the operands joined by spaces, or standard input for a single "-". New string (free
 * it), or NULL after printing why. */
char *ctl_text(int argc, char **argv);

/* Output */
/* o[key] if it is a string, else dflt (borrowed from o). */
const char *ctl_str(const json_t *o, const char *key, const char *dflt);
void ctl_print_json(const json_t *j);      /* indented, on stdout, with a newline */
void ctl_print_json_line(const json_t *j); /* compact, one line (JSON Lines) */
/* An answer j (stolen): --json prints it as it is, else print does; returns CTL_OK. */
int ctl_answer(struct ctl *ctl, json_t *j, void (*print)(const json_t *));
/* "512 B", "128.0 KiB", "1.2 MiB", "3.4 GiB" (1024-based) */
void ctl_human_bytes(char *buf, size_t size, double bytes);
/* Local time "2025-01-31 12:34:56" of t, seconds since the epoch. */
void ctl_human_time(char *buf, size_t size, double t);
/* A cell of a table or a field's value for people: strings as they are, integers, reals (the
 * fewest digits that read back the same),
 * booleans yes/no; a key ("bytes", or a path ending in it) names sizes (human) and times
 * ("created_at", "*_at", "estimated_finish": local time) and losses ("*loss": 4 decimals).
 * New string, or NULL (no value, or an
 * object or array). */
char *ctl_cell(const json_t *v, const char *key);
/* Prints list.data as a table: a column per field (a key, or a path "metrics.train_loss"),
 * cells as ctl_cell() writes them. */
void ctl_print_list(const json_t *list, const char *const *fields, const char *const *head,
                    size_t n_cols);
/* Prints each field of object o on a line, "key  value": the value as ctl_cell() writes it
 * without a key (objects, arrays and null as compact JSON), then its human form when that
 * differs ("bytes  2048 (2.0 KiB)", "created_at  1767225600 (2026-01-01 00:00:00)"). */
void ctl_print_fields(const json_t *o);
/* Prints rows of n_cols cells (row-major; NULL cells print "-") under head, aligned. */
void ctl_table(const char *const *head, size_t n_cols, char *const *cells, size_t n_rows);

/* Seconds of the monotonic clock. */
double ctl_now(void);

/* Follows job id to its end (train --follow, jobs events ID --follow): on a terminal (stderr,
 * without --json) a progress bar of its metrics with its other events as lines on stderr, else
 * a line per event on stdout (--json: the event's JSON); then how it ended (--json: the job's
 * JSON). Returns the exit status: CTL_OK when it succeeded, CTL_FAILED when it failed or was
 * cancelled (the error on stderr), CTL_INTERRUPTED after SIGINT (the job goes on). */
int ctl_follow(struct ctl *ctl, struct adc_client *c, const char *id);

/* A progress bar on stderr, for adc_progress_fn: "  12.0 MiB / 45.6 MiB  26%  8.1 MiB/s".
 * Give it to the library only when stderr is a terminal (ctl_progress_wanted). */
struct ctl_progress {
    const char *label;
    double t0, drawn_at;
    uint64_t last;
    bool shown;    /* a bar is on the line */
    bool finished; /* it says 100% */
};
bool ctl_progress_wanted(void);
int ctl_progress_draw(void *ud, uint64_t done, uint64_t total);
void ctl_progress_end(struct ctl_progress *p); /* ends the bar's line */
