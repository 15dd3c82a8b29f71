/* adapterctl jobs [ls | show ID | events ID [--follow] | checkpoints ID | cancel ID | pause ID |
 * resume ID], files [ls | show ID | upload FILE | rm ID]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

struct page {
    const char *after;
    long limit; /* 0: the server's default */
    bool follow;
};

enum { OPT_AFTER = OPT_OWN, OPT_LIMIT, OPT_FOLLOW };

static const struct option page_options[] = {
    {"after", required_argument, NULL, OPT_AFTER},
    {"limit", required_argument, NULL, OPT_LIMIT},
    {"follow", no_argument, NULL, OPT_FOLLOW},
    {NULL, 0, NULL, 0},
};

static int page_option(struct ctl *ctl, void *st, int opt, const char *arg)
{
    struct page *p = st;
    if (opt == OPT_AFTER)
        p->after = arg;
    else if (opt == OPT_LIMIT)
        return ctl_parse_long(ctl, "--limit", arg, 1, 100, &p->limit);
    else
        p->follow = true;
    return 0;
}

/* A subcommand's operands: the subcommand (dflt when there is none) and *ret_id, the one
 * operand after it, which `needs` says it must have. CTL_USAGE after saying why, or 0. */
static int operands(struct ctl *ctl, int argc, char **argv, int i, const char *dflt,
                    const char **ret_sub, const char **ret_id, bool needs)
{
    const char *sub = i < argc ? argv[i] : dflt;
    int n = argc - i - (i < argc);
    if (n != (needs ? 1 : 0))
        return ctl_usage_error(ctl, "usage: adapterctl %s %s%s", ctl->cmd->name, sub,
                               needs ? " ID" : "");
    *ret_sub = sub;
    *ret_id = needs ? argv[i + 1] : NULL;
    return 0;
}

/* Says on stderr how to get the next page of a list that has more. */
static void more(const struct ctl *ctl, const json_t *list, const char *what)
{
    json_t *data = json_object_get(list, "data");
    const char *last = ctl_str(json_array_get(data, json_array_size(data) - 1), "id", NULL);
    if (!ctl->json && json_is_true(json_object_get(list, "has_more")) && last)
        fprintf(stderr, "(more: adapterctl %s --after %s)\n", what, last);
}

/* ==========================================================================================
 * jobs */

static void print_jobs(const json_t *list)
{
    static const char *const fields[] = {"id", "status", "model", "fine_tuned_model", "created_at"};
    static const char *const head[] = {"ID", "STATUS", "MODEL", "ADAPTER", "CREATED"};
    ctl_print_list(list, fields, head, 5);
}

static void print_checkpoints(const json_t *list)
{
    static const char *const fields[] = {"step_number", "fine_tuned_model_checkpoint",
                                         "metrics.train_loss", "metrics.valid_loss", "created_at"};
    static const char *const head[] = {"STEP", "CHECKPOINT", "TRAIN_LOSS", "VALID_LOSS", "CREATED"};
    ctl_print_list(list, fields, head, 5);
}

/* A page of events, oldest first: "time  level  message". */
static void print_events(const json_t *list)
{
    json_t *data = json_object_get(list, "data");
    for (size_t i = json_array_size(data); i-- > 0;) {
        json_t *ev = json_array_get(data, i);
        char *when = ctl_cell(json_object_get(ev, "created_at"), "created_at");
        printf("%s  %-5s  %s\n", when ? when : "-", ctl_str(ev, "level", "-"),
               ctl_str(ev, "message", ""));
        free(when);
    }
}

/* What cancel, pause and resume print: the job's status after it. */
static void print_status(const json_t *job)
{
    printf("job %s: %s\n", ctl_str(job, "id", "?"), ctl_str(job, "status", "?"));
}

static int jobs_run(struct ctl *ctl, int argc, char **argv)
{
    static const char *const subs[] = {"ls",     "list",  "show",   "events", "checkpoints",
                                       "cancel", "pause", "resume", NULL};
    struct page p = {0};
    struct adc_error e;
    const char *sub, *id = NULL;
    json_t *j;
    int i = ctl_options(ctl, argc, argv, NULL, page_options, page_option, &p, 0, 2), rc;
    size_t k = 0;
    sub = i < argc ? argv[i] : "ls";
    while (subs[k] && strcmp(subs[k], sub))
        k++;
    if (!subs[k])
        return ctl_usage_error(ctl,
                               "unknown subcommand '%s' (ls, show, events, checkpoints, "
                               "cancel, pause, resume)",
                               sub);
    bool ls = k <= 1, events = !strcmp(sub, "events"),
         pages = ls || events || !strcmp(sub, "checkpoints");
    if (operands(ctl, argc, argv, i, "ls", &sub, &id, !ls) != 0)
        return CTL_USAGE;
    if ((p.after || p.limit) && (!pages || p.follow))
        return ctl_usage_error(ctl, "--after and --limit are for ls, events and checkpoints "
                                    "(without --follow)");
    if (p.follow && !events)
        return ctl_usage_error(ctl, "--follow is for 'jobs events ID'");
    struct adc_client *c = ctl_client(ctl);
    if (!c)
        return CTL_FAILED;
    if (p.follow)
        return ctl_follow(ctl, c, id);
    void (*print)(const json_t *) = print_status; /* cancel, pause, resume */
    if (ls) {
        rc = adc_jobs_list(c, p.after, (int)p.limit, &j, &e);
        print = print_jobs;
    } else if (events) {
        rc = adc_job_events(c, id, p.after, (int)p.limit, &j, &e);
        print = print_events;
    } else if (!strcmp(sub, "checkpoints")) {
        rc = adc_job_checkpoints(c, id, p.after, (int)p.limit, &j, &e);
        print = print_checkpoints;
    } else if (!strcmp(sub, "show")) {
        rc = adc_job_get(c, id, &j, &e);
        print = ctl_print_fields;
    } else if (!strcmp(sub, "cancel"))
        rc = adc_job_cancel(c, id, &j, &e);
    else if (!strcmp(sub, "pause"))
        rc = adc_job_pause(c, id, &j, &e);
    else
        rc = adc_job_resume(c, id, &j, &e);
    if (rc < 0)
        return ctl_fail(ctl, &e);
    if (pages) {
        char what[128];
        snprintf(what, sizeof(what), "jobs %s%s%s", sub, id ? " " : "", id ? id : "");
        more(ctl, j, what);
    }
    return ctl_answer(ctl, j, print);
}

const struct ctl_command ctl_jobs = {
    .name = "jobs",
    .args = "[ls | show | events | checkpoints | cancel | pause | resume] [ID]",
    .summary = "list, show, follow and control fine-tuning jobs",
    .help =
        "  ls                  a table of the jobs, newest first: ID, STATUS, MODEL (the base,\n"
        "                      or the adapter it goes on training), ADAPTER (fine_tuned_model,\n"
        "                      once it succeeded), CREATED (the default)\n"
        "  show ID             every field of the job (status, error, hyperparameters, method)\n"
        "  events ID           its newest events, oldest first: time, level, message\n"
        "      --follow        every event from the first, until the job ends, as `train\n"
        "                      --follow` shows them; exit status 0 when it succeeded, 1 when it\n"
        "                      failed or was cancelled; Ctrl-C stops following, 130\n"
        "  checkpoints ID      a table: STEP, CHECKPOINT (served as an adapter), TRAIN_LOSS,\n"
        "                      VALID_LOSS, CREATED\n"
        "  cancel ID           stops a job that has not ended and drops its checkpoints\n"
        "  pause ID            a queued or running job (a running one checkpoints first)\n"
        "  resume ID           queues a paused job again; it goes on from its checkpoint\n\n"
        "      --limit N       ls, events, checkpoints: at most N (1-100; the server's 20)\n"
        "      --after ID      the page after the job, event or checkpoint ID (stderr says\n"
        "                      when there are more)\n",
    .run = jobs_run,
};

/* ==========================================================================================
 * files */

static void print_files(const json_t *list)
{
    static const char *const fields[] = {"id", "filename", "bytes", "purpose", "created_at"};
    static const char *const head[] = {"ID", "FILENAME", "SIZE", "PURPOSE", "CREATED"};
    ctl_print_list(list, fields, head, 5);
}

static void print_deleted(const json_t *j)
{
    printf("deleted '%s'\n", ctl_str(j, "id", "?"));
}

static void print_id(const json_t *j)
{
    printf("%s\n", ctl_str(j, "id", "?"));
}

static int files_run(struct ctl *ctl, int argc, char **argv)
{
    struct adc_error e;
    const char *sub, *id = NULL;
    json_t *j;
    int i = ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 0, 2), rc;
    sub = i < argc ? argv[i] : "ls";
    bool ls = !strcmp(sub, "ls") || !strcmp(sub, "list"), show = !strcmp(sub, "show");
    bool rm = !strcmp(sub, "rm") || !strcmp(sub, "delete"), up = !strcmp(sub, "upload");
    if (!ls && !show && !rm && !up)
        return ctl_usage_error(ctl, "unknown subcommand '%s' (ls, show, upload, rm)", sub);
    if (operands(ctl, argc, argv, i, "ls", &sub, &id, !ls) != 0)
        return CTL_USAGE;
    struct adc_client *c = ctl_client(ctl);
    if (!c)
        return CTL_FAILED;
    void (*print)(const json_t *) = print_deleted;
    if (up) {
        struct ctl_progress p = {.label = "uploading"};
        rc = adc_file_upload(c, id, ctl_progress_wanted() ? ctl_progress_draw : NULL, &p, &j, &e);
        ctl_progress_end(&p);
        print = print_id;
    } else if (ls) {
        rc = adc_files_list(c, &j, &e);
        print = print_files;
    } else if (show) {
        rc = adc_file_get(c, id, &j, &e);
        print = ctl_print_fields;
    } else
        rc = adc_file_delete(c, id, &j, &e);
    if (rc < 0)
        return ctl_fail(ctl, &e);
    return ctl_answer(ctl, j, print);
}

const struct ctl_command ctl_files = {
    .name = "files",
    .args = "[ls | show ID | upload FILE | rm ID]",
    .summary = "list, show, upload or delete training files (/v1/files)",
    .help = "  ls                  a table: ID, FILENAME, SIZE, PURPOSE, CREATED (the default)\n"
            "  show ID             every field of the file\n"
            "  upload FILE         uploads a JSONL training file (purpose fine-tune; a progress\n"
            "                      bar on a terminal) and prints its id; the server checks each\n"
            "                      line and keeps nothing of a bad file ('line N: reason')\n"
            "  rm ID               deletes it (refused while a job that has not ended uses it)\n",
    .run = files_run,
};
