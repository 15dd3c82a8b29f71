/* adapterctl models, adapters [ls | show NAME | rm NAME | download NAME DIR], upload NAME DIR. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

/* A list route: --json prints it whole, else as a table. */
static int list(struct ctl *ctl, int (*get)(struct adc_client *, json_t **, struct adc_error *),
                const char *const *fields, const char *const *head, size_t n_cols)
{
    struct adc_client *c = ctl_client(ctl);
    struct adc_error e;
    json_t *j;
    if (!c)
        return CTL_FAILED;
    if (get(c, &j, &e) < 0)
        return ctl_fail(ctl, &e);
    if (ctl->json)
        ctl_print_json(j);
    else
        ctl_print_list(j, fields, head, n_cols);
    json_decref(j);
    return CTL_OK;
}

/* ==========================================================================================
 * models */

static int models_run(struct ctl *ctl, int argc, char **argv)
{
    static const char *const fields[] = {"id", "kind", "rank", "bytes"};
    static const char *const head[] = {"ID", "KIND", "RANK", "SIZE"};
    ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 0, 0);
    return list(ctl, adc_models, fields, head, 4);
}

const struct ctl_command ctl_models = {
    .name = "models",
    .args = "",
    .summary = "list the base model and every adapter (GET /v1/models)",
    .help = "Prints a table: ID, KIND (base, lora, ia3, ...), RANK (LoRA), SIZE.\n",
    .run = models_run,
};

/* ==========================================================================================
 * adapters */

static int show(struct ctl *ctl, struct adc_client *c, const char *name)
{
    struct adc_error e;
    json_t *a;
    if (adc_adapter_get(c, name, &a, &e) < 0)
        return ctl_fail(ctl, &e);
    return ctl_answer(ctl, a, ctl_print_fields);
}

static int adapters_run(struct ctl *ctl, int argc, char **argv)
{
    static const char *const fields[] = {"id", "kind", "rank", "bytes", "resident", "uses"};
    static const char *const head[] = {"NAME", "KIND", "RANK", "SIZE", "RESIDENT", "USES"};
    int i = ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 0, 3);
    const char *sub = i < argc ? argv[i] : "ls";
    int n = argc - i - (i < argc); /* operands after the subcommand */
    struct adc_error e;

    if (!strcmp(sub, "ls") || !strcmp(sub, "list")) {
        if (n != 0)
            return ctl_usage_error(ctl, "'adapters ls' takes no operand");
        return list(ctl, adc_adapters_list, fields, head, 6);
    }
    bool is_show = !strcmp(sub, "show"), is_rm = !strcmp(sub, "rm") || !strcmp(sub, "delete");
    bool is_download = !strcmp(sub, "download");
    if (!is_show && !is_rm && !is_download)
        return ctl_usage_error(ctl, "unknown subcommand '%s' (ls, show, rm, download)", sub);
    if (n != (is_download ? 2 : 1))
        return ctl_usage_error(ctl, "usage: adapterctl adapters %s NAME%s", sub,
                               is_download ? " DIR" : "");
    const char *name = argv[i + 1];
    struct adc_client *c = ctl_client(ctl);
    if (!c)
        return CTL_FAILED;
    if (is_show)
        return show(ctl, c, name);
    if (is_rm) {
        if (adc_adapter_delete(c, name, &e) < 0)
            return ctl_fail(ctl, &e);
        if (ctl->json) {
            json_t *j = json_pack("{s:s, s:b}", "id", name, "deleted", 1);
            ctl_print_json(j);
            json_decref(j);
        } else
            printf("deleted '%s'\n", name);
        return CTL_OK;
    }
    const char *dir = argv[i + 2];
    struct ctl_progress p = {.label = "downloading"};
    bool bar = ctl_progress_wanted();
    int rc = adc_adapter_download(c, name, dir, bar ? ctl_progress_draw : NULL, &p, &e);
    ctl_progress_end(&p);
    if (rc < 0)
        return ctl_fail(ctl, &e);
    if (ctl->json) {
        json_t *j = json_pack("{s:s, s:s}", "id", name, "dir", dir);
        ctl_print_json(j);
        json_decref(j);
    } else
        printf("downloaded '%s' into %s\n", name, dir);
    return CTL_OK;
}

const struct ctl_command ctl_adapters = {
    .name = "adapters",
    .args = "[ls | show NAME | rm NAME | download NAME DIR]",
    .summary = "list, show, delete or download adapters",
    .help =
        "  ls                  a table: NAME, KIND, RANK, SIZE, RESIDENT (in memory now), USES\n"
        "                      (the default)\n"
        "  show NAME           every field the server has for the adapter\n"
        "  rm NAME             deletes it (requests in flight finish on it)\n"
        "  download NAME DIR   writes its adapter_config.json and weights into DIR\n"
        "                      (adapter_model.safetensors, or adapter.safetensors for an\n"
        "                      AdapterHub adapter), with a progress bar on a terminal\n",
    .run = adapters_run,
};

/* ==========================================================================================
 * upload */

static int upload_run(struct ctl *ctl, int argc, char **argv)
{
    int i = ctl_options(ctl, argc, argv, NULL, NULL, NULL, NULL, 2, 2);
    const char *name = argv[i], *dir = argv[i + 1];
    struct adc_client *c = ctl_client(ctl);
    struct ctl_progress p = {.label = "uploading"};
    struct adc_error e;
    json_t *a;

    if (!c)
        return CTL_FAILED;
    bool bar = ctl_progress_wanted();
    int rc = adc_adapter_upload(c, name, dir, bar ? ctl_progress_draw : NULL, &p, &a, &e);
    ctl_progress_end(&p);
    if (rc < 0)
        return ctl_fail(ctl, &e);
    if (ctl->json)
        ctl_print_json(a);
    else {
        char size[32] = "?";
        json_t *bytes = json_object_get(a, "bytes");
        if (json_is_number(bytes))
            ctl_human_bytes(size, sizeof(size), json_number_value(bytes));
        printf("%s '%s': %s, rank %lld, %s\n", rc == 1 ? "created" : "replaced", name,
               ctl_str(a, "kind", "?"), (long long)json_integer_value(json_object_get(a, "rank")),
               size);
    }
    json_decref(a);
    return CTL_OK;
}

const struct ctl_command ctl_upload = {
    .name = "upload",
    .args = "NAME DIR",
    .summary = "upload a PEFT or AdapterHub adapter directory as NAME",
    .help = "DIR holds adapter_config.json and adapter_model.safetensors (Hugging Face PEFT) or\n"
            "adapter.safetensors (AdapterHub). Sent as PUT /v1/adapters/NAME (multipart); the\n"
            "server validates it against the base before it replaces anything. A progress bar\n"
            "(bytes, percent, rate) on stderr when it is a terminal. Prints 'created' or\n"
            "'replaced', the kind, rank and size. Needs the admin key when the server has one.\n",
    .run = upload_run,
};
