/* adapterctl complete, chat (streamed to the terminal as the tokens come) and tokenize. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

#define MAX_ADAPTERS 8 /* the server's AD_MIX_MAX */
#define MAX_STOPS 4

/* ==========================================================================================
 * The request, from the options */

struct gen {
    bool chat;
    const char *model;
    struct {
        const char *name; /* points into argv */
        size_t len;
        double weight;
        bool weighted;
    } adapters[MAX_ADAPTERS];
    int n_adapters;
    const char *stops[MAX_STOPS];
    int n_stops;
    const char *system;
    long max_tokens, top_k, seed; /* -1: the server's default */
    double temperature, top_p;    /* < 0: the server's default */
    bool ignore_eos, usage;
    int stream; /* 1, 0, or -1: streamed unless --json */
};

enum {
    OPT_TOP_P = OPT_OWN,
    OPT_TOP_K,
    OPT_SEED,
    OPT_STOP,
    OPT_IGNORE_EOS,
    OPT_STREAM,
    OPT_NO_STREAM,
    OPT_USAGE,
    OPT_SYSTEM,
    OPT_NO_SPECIAL,
};

static const struct option gen_options[] = {
    {"model", required_argument, NULL, 'm'},
    {"adapter", required_argument, NULL, 'a'},
    {"max-tokens", required_argument, NULL, 'n'},
    {"temperature", required_argument, NULL, 't'},
    {"top-p", required_argument, NULL, OPT_TOP_P},
    {"top-k", required_argument, NULL, OPT_TOP_K},
    {"seed", required_argument, NULL, OPT_SEED},
    {"stop", required_argument, NULL, OPT_STOP},
    {"ignore-eos", no_argument, NULL, OPT_IGNORE_EOS},
    {"stream", no_argument, NULL, OPT_STREAM},
    {"no-stream", no_argument, NULL, OPT_NO_STREAM},
    {"usage", no_argument, NULL, OPT_USAGE},
    {"system", required_argument, NULL, OPT_SYSTEM}, /* chat only */
    {NULL, 0, NULL, 0},
};

#define GEN_HELP                                                                                   \
    "  -m, --model NAME          the base model's id or an adapter's name (default: the base)\n"   \
    "  -a, --adapter NAME[:W]    an adapter; several, or one with a weight W, are composed\n"      \
    "                            (\"adapters\": [{name, weight}]: LoRA deltas add)\n"              \
    "  -n, --max-tokens N        tokens to generate at most (the server's default: 16)\n"          \
    "  -t, --temperature T       0 is greedy\n"                                                    \
    "      --top-p P, --top-k K  nucleus and top-k sampling\n"                                     \
    "      --seed N              the sampler's seed, for a repeatable answer\n"                    \
    "      --stop TEXT           stop before TEXT (up to 4 times)\n"                               \
    "      --ignore-eos          go on past the end-of-sequence token\n"                           \
    "      --stream, --no-stream print the text as it comes (the default, except with --json;\n"   \
    "                            --json --stream prints each event's JSON on a line)\n"            \
    "      --usage               then the token counts and the finish reason on stderr\n"

static int gen_option(struct ctl *ctl, void *st, int opt, const char *arg)
{
    struct gen *g = st;
    switch (opt) {
    case 'm':
        g->model = arg;
        return 0;
    case 'a': {
        if (g->n_adapters == MAX_ADAPTERS)
            return ctl_usage_error(ctl, "at most %d --adapter", MAX_ADAPTERS);
        const char *colon = strrchr(arg, ':'); /* names have no ':' (A-Z a-z 0-9 . _ -) */
        g->adapters[g->n_adapters].name = arg;
        g->adapters[g->n_adapters].len = colon ? (size_t)(colon - arg) : strlen(arg);
        g->adapters[g->n_adapters].weight = 1.0;
        g->adapters[g->n_adapters].weighted = colon != NULL;
        if (colon && ctl_parse_double(ctl, "--adapter NAME:WEIGHT", colon + 1, -1e6, 1e6,
                                      &g->adapters[g->n_adapters].weight))
            return CTL_USAGE;
        g->n_adapters++;
        return 0;
    }
    case 'n':
        return ctl_parse_long(ctl, "--max-tokens", arg, 0, 1 << 24, &g->max_tokens);
    case 't':
        return ctl_parse_double(ctl, "--temperature", arg, 0, 100, &g->temperature);
    case OPT_TOP_P:
        return ctl_parse_double(ctl, "--top-p", arg, 0, 1, &g->top_p);
    case OPT_TOP_K:
        return ctl_parse_long(ctl, "--top-k", arg, 0, 1 << 24, &g->top_k);
    case OPT_SEED:
        return ctl_parse_long(ctl, "--seed", arg, 0, 0x7fffffffL, &g->seed);
    case OPT_STOP:
        if (g->n_stops == MAX_STOPS)
            return ctl_usage_error(ctl, "at most %d --stop", MAX_STOPS);
        g->stops[g->n_stops++] = arg;
        return 0;
    case OPT_IGNORE_EOS:
        g->ignore_eos = true;
        return 0;
    case OPT_STREAM:
    case OPT_NO_STREAM:
        g->stream = opt == OPT_STREAM;
        return 0;
    case OPT_USAGE:
        g->usage = true;
        return 0;
    case OPT_SYSTEM:
        g->system = arg;
        return 0;
    default:
        return CTL_USAGE;
    }
}

/* The request body for text (the prompt, or the user's message). NULL if out of memory. */
static json_t *gen_request(const struct gen *g, const char *text)
{
    json_t *r = json_object(), *a = NULL;
    if (!r)
        return NULL;
    if (g->chat) {
        json_t *msgs = json_array();
        if (g->system)
            json_array_append_new(msgs,
                                  json_pack("{s:s, s:s}", "role", "system", "content", g->system));
        json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "user", "content", text));
        json_object_set_new(r, "messages", msgs);
    } else
        json_object_set_new(r, "prompt", json_string(text));
    if (g->n_adapters == 1 && !g->adapters[0].weighted && !g->model)
        json_object_set_new(r, "model", json_string(g->adapters[0].name));
    else if (g->n_adapters > 0) {
        a = json_array();
        for (int i = 0; i < g->n_adapters; i++)
            json_array_append_new(a,
                                  json_pack("{s:s%, s:f}", "name", g->adapters[i].name,
                                            g->adapters[i].len, "weight", g->adapters[i].weight));
        json_object_set_new(r, "adapters", a);
    }
    if (g->model)
        json_object_set_new(r, "model", json_string(g->model));
    if (g->max_tokens >= 0)
        json_object_set_new(r, "max_tokens", json_integer(g->max_tokens));
    if (g->temperature >= 0)
        json_object_set_new(r, "temperature", json_real(g->temperature));
    if (g->top_p >= 0)
        json_object_set_new(r, "top_p", json_real(g->top_p));
    if (g->top_k >= 0)
        json_object_set_new(r, "top_k", json_integer(g->top_k));
    if (g->seed >= 0)
        json_object_set_new(r, "seed", json_integer(g->seed));
    if (g->n_stops > 0) {
        json_t *s = json_array();
        for (int i = 0; i < g->n_stops; i++)
            json_array_append_new(s, json_string(g->stops[i]));
        json_object_set_new(r, "stop", s);
    }
    if (g->ignore_eos)
        json_object_set_new(r, "ignore_eos", json_true());
    return r;
}

/* ==========================================================================================
 * Output */

struct printer {
    const struct gen *g;
    bool json;
    const char *finish; /* the last finish_reason (a copy) */
    char finish_buf[32];
    json_t *usage; /* the last usage (a reference) */
    bool wrote;    /* text went to stdout */
};

static int on_event(void *ud, const struct adc_event *ev)
{
    struct printer *p = ud;
    if (p->json) { /* each chunk once, with its first choice */
        json_t *first = json_array_get(json_object_get(ev->chunk, "choices"), 0);
        json_t *index = json_object_get(first, "index");
        if (!first || !json_is_integer(index) || json_integer_value(index) == ev->index) {
            char *line = json_dumps(ev->chunk, JSON_COMPACT);
            if (line)
                printf("%s\n", line);
            free(line);
        }
    } else if (ev->len) {
        fwrite(ev->text, 1, ev->len, stdout);
        p->wrote = true;
    }
    fflush(stdout);
    if (ev->finish_reason) {
        snprintf(p->finish_buf, sizeof(p->finish_buf), "%s", ev->finish_reason);
        p->finish = p->finish_buf;
    }
    if (ev->usage) {
        json_decref(p->usage);
        p->usage = json_incref((json_t *)ev->usage);
    }
    return 0;
}

/* The end: --usage on stderr; a finish the server cut short is a failure. */
static int finish(struct printer *p)
{
    if (p->g->usage && p->usage)
        fprintf(stderr, "%lld prompt tokens, %lld completion tokens, finish_reason %s\n",
                (long long)json_integer_value(json_object_get(p->usage, "prompt_tokens")),
                (long long)json_integer_value(json_object_get(p->usage, "completion_tokens")),
                p->finish ? p->finish : "-");
    json_decref(p->usage);
    p->usage = NULL;
    if (p->finish && (!strcmp(p->finish, "error") || !strcmp(p->finish, "abort"))) {
        fprintf(stderr, "adapterctl: the server ended the generation early (finish_reason '%s')\n",
                p->finish);
        return CTL_FAILED;
    }
    return CTL_OK;
}

static int generate(struct ctl *ctl, struct gen *g, int argc, char **argv)
{
    struct adc_error e;
    struct printer p = {.g = g};
    g->max_tokens = g->top_k = g->seed = -1;
    g->temperature = g->top_p = -1;
    g->stream = -1;
    int i = ctl_options(ctl, argc, argv, "m:a:n:t:", gen_options, gen_option, g, 1, -1);
    if (g->system && !g->chat)
        return ctl_usage_error(ctl, "--system is for chat");
    p.json = ctl->json;
    bool stream = g->stream < 0 ? !ctl->json : g->stream;

    struct adc_client *c = ctl_client(ctl);
    char *text = c ? ctl_text(argc - i, argv + i) : NULL;
    json_t *req = text ? gen_request(g, text) : NULL;
    int status = CTL_FAILED, rc;
    if (!req)
        goto out;
    if (stream) {
        rc = g->chat ? adc_chat_stream(c, req, on_event, &p, &e)
                     : adc_complete_stream(c, req, on_event, &p, &e);
        /* the text's line ends, also when it was cut (not when nothing came: an error) */
        if (!ctl->json && (rc >= 0 || p.wrote || ctl_interrupted()))
            fputc('\n', stdout);
        status = rc < 0 ? ctl_fail(ctl, &e) : finish(&p);
        goto out;
    }
    json_t *answer;
    rc = g->chat ? adc_chat(c, req, &answer, &e) : adc_complete(c, req, &answer, &e);
    if (rc < 0) {
        status = ctl_fail(ctl, &e);
        goto out;
    }
    json_t *choice = json_array_get(json_object_get(answer, "choices"), 0);
    if (ctl->json)
        ctl_print_json(answer);
    else
        printf("%s\n", ctl_str(g->chat ? json_object_get(choice, "message") : choice,
                               g->chat ? "content" : "text", ""));
    p.finish = ctl_str(choice, "finish_reason", NULL);
    p.usage = json_incref(json_object_get(answer, "usage"));
    status = finish(&p);
    json_decref(answer);
out:
    json_decref(req);
    free(text);
    return status;
}

static int complete_run(struct ctl *ctl, int argc, char **argv)
{
    struct gen g = {.chat = false};
    return generate(ctl, &g, argc, argv);
}

static int chat_run(struct ctl *ctl, int argc, char **argv)
{
    struct gen g = {.chat = true};
    return generate(ctl, &g, argc, argv);
}

const struct ctl_command ctl_complete = {
    .name = "complete",
    .args = "PROMPT...",
    .summary = "complete a prompt, streamed (POST /v1/completions)",
    .help = "The words of PROMPT joined by spaces, or '-' for standard input. Prints the text\n"
            "as the server sends it; Ctrl-C stops it (the server frees the sequence), exit\n"
            "status 130.\n\n" GEN_HELP,
    .run = complete_run,
};

const struct ctl_command ctl_chat = {
    .name = "chat",
    .args = "MESSAGE...",
    .summary = "one chat turn, streamed (POST /v1/chat/completions)",
    .help = "MESSAGE is the user's turn ('-' reads it from standard input), through the model's\n"
            "chat template; prints the assistant's answer as it comes.\n\n"
            "      --system TEXT         a system message first\n" GEN_HELP,
    .run = chat_run,
};

/* ==========================================================================================
 * tokenize */

struct tok {
    const char *model;
    bool no_special;
};

static int tok_option(struct ctl *ctl, void *st, int opt, const char *arg)
{
    struct tok *t = st;
    (void)ctl;
    if (opt == 'm')
        t->model = arg;
    else
        t->no_special = true;
    return 0;
}

static int tokenize_run(struct ctl *ctl, int argc, char **argv)
{
    static const struct option opts[] = {{"model", required_argument, NULL, 'm'},
                                         {"adapter", required_argument, NULL, 'm'},
                                         {"no-special", no_argument, NULL, OPT_NO_SPECIAL},
                                         {NULL, 0, NULL, 0}};
    struct tok t = {0};
    struct adc_error e;
    json_t *j;
    int i = ctl_options(ctl, argc, argv, "m:a:", opts, tok_option, &t, 1, -1);
    struct adc_client *c = ctl_client(ctl);
    char *text = c ? ctl_text(argc - i, argv + i) : NULL;
    if (!text)
        return CTL_FAILED;
    int rc = adc_tokenize(c, t.model, text, t.no_special ? 0 : -1, &j, &e);
    free(text);
    if (rc < 0)
        return ctl_fail(ctl, &e);
    if (ctl->json)
        ctl_print_json(j);
    else {
        json_t *tokens = json_object_get(j, "tokens"), *v;
        size_t k;
        json_array_foreach(tokens, k, v)
            printf("%s%lld", k ? " " : "", (long long)json_integer_value(v));
        printf("\n");
    }
    json_decref(j);
    return CTL_OK;
}

const struct ctl_command ctl_tokenize = {
    .name = "tokenize",
    .args = "TEXT...",
    .summary = "the token ids of a text (POST /tokenize)",
    .help = "Prints the ids on one line, separated by spaces. TEXT '-' reads standard input.\n\n"
            "  -m, --model NAME    whose tokenizer (an adapter's is its base's; default the base)\n"
            "      --no-special    without the special tokens the tokenizer adds (BOS)\n",
    .run = tokenize_run,
};
