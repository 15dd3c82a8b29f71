/* Datasets (include/adapterd/train.h, "Datasets"): JSONL training files checked line by line, then
 * tokenized into examples whose targets carry the loss mask, cut or packed to max_seq_len.
 *
 * The formats behave as Hugging Face TRL's SFTTrainer treats them (trl/trainer/sft_trainer.py,
 * tokenize_fn and add_eos; the collator's labels are input_ids with -100 outside the mask, shifted
 * by the model) and as OpenAI's fine-tuning files are written (chat "messages" with an optional
 * "weight" 0/1 on assistant messages):
 *   prompt/completion  tokens: prompt + completion encoded with add_special_tokens (TRL tokenizes
 *                      the prompt and prompt + completion and masks by the prompt's length), then
 *                      EOS unless the text already ends with it (TRL's add_eos); loss on the
 *                      completion's tokens and the EOS.
 *   messages           rendered with the tokenizer's chat template (add_generation_prompt =
 *                      false, ad_chat_segments); loss on the assistant turns of weight 1: each
 *                      turn's content and what the template writes to end it (TRL's
 *                      assistant_only_loss with {% generation %} blocks covers the same: its
 *                      training templates put <|im_end|>\n, <end_of_turn>\n, <|eot_id|> inside,
 *                      the header outside). No EOS is added: the template ends each turn.
 *   text               encoded with add_special_tokens, then EOS (TRL's add_eos); loss on every
 *                      token after the first.
 * targets[i] = tokens[i + 1] when token i + 1 is a loss token, else -1; the last token has none.
 *
 * Tokens at the boundaries. The pieces (prompt | completion; the text between turns | each turn)
 * are encoded one by one (add_special_tokens for the first only, and never for a rendering, whose
 * template writes BOS itself) and concatenated. When that differs from encoding the whole text
 * at once (a SentencePiece normalizer prepends "▁" to every piece, so a piece encoded alone can
 * start with a token the whole text never has), the whole text's tokens are used, each boundary
 * at the number of tokens of the text before it where those begin the whole's (TRL's prefix test
 * for prompt/completion); only where even that fails are the pieces' tokens kept. Either way the
 * mask follows the text exactly.
 *
 * Limits: a file of at most MAX_FILE bytes, a line of at most MAX_LINE bytes, MAX_MESSAGES
 * messages a conversation, max_seq_len 1 to MAX_SEQ_LEN. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#define MAX_FILE (1u << 30) /* max_train_file_mb's default */
#define MAX_LINE (1u << 20)
#define MAX_MESSAGES 256
#define MAX_SEQ_LEN (1 << 20)

enum format { PROMPT_COMPLETION, MESSAGES, TEXT };

/* ==========================================================================================
 * Checking a line: its shape, without a tokenizer */

/* Whether s[0, n) is valid UTF-8 (no overlong forms, surrogates or code points past U+10FFFF);
 * *ret_bad is the offset of the first invalid byte. */
static bool utf8_valid(const unsigned char *s, size_t n, size_t *ret_bad)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3
                   : (c & 0xf8) == 0xf0 ? 4 : 0;
        uint32_t cp = len == 2 ? c & 0x1f : len == 3 ? c & 0x0f : c & 0x07;
        bool ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++) {
            ok = (s[i + k] & 0xc0) == 0x80;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (ok && len > 1)
            ok = (len == 2 ? cp >= 0x80 : len == 3 ? cp >= 0x800 : cp >= 0x10000) &&
                 cp <= 0x10ffff && (cp < 0xd800 || cp > 0xdfff);
        if (!ok) {
            *ret_bad = i;
            return false;
        }
        i += len;
    }
    return true;
}

static bool blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n')
            return false;
    return true;
}

/* A non-empty string field: 0, or -EINVAL naming it ("line N: 'what' ..."). */
static int check_string(const json_t *v, size_t line_no, const char *what, struct ad_err *err)
{
    if (!json_is_string(v))
        return ad_err_set(err, -EINVAL, "line %zu: %s must be a string", line_no, what);
    if (json_string_length(v) == 0)
        return ad_err_set(err, -EINVAL, "line %zu: %s is empty", line_no, what);
    return 0;
}

/* content: a non-empty string or a non-empty list of {"type": "text", "text": non-empty}. */
static int check_content(const json_t *c, size_t line_no, size_t k, struct ad_err *err)
{
    char what[96];
    size_t i;
    json_t *part;

    snprintf(what, sizeof(what), "'messages'[%zu].content", k);
    if (!c)
        return ad_err_set(err, -EINVAL, "line %zu: %s is missing", line_no, what);
    if (!json_is_array(c))
        return check_string(c, line_no, what, err);
    if (json_array_size(c) == 0)
        return ad_err_set(err, -EINVAL, "line %zu: %s is an empty list", line_no, what);
    json_array_foreach(c, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!json_is_object(part) || !type || strcmp(type, "text"))
            return ad_err_set(err, -EINVAL, "line %zu: %s[%zu] must be {\"type\": \"text\", "
                              "\"text\": ...} (only text is supported)", line_no, what, i);
        snprintf(what, sizeof(what), "'messages'[%zu].content[%zu].text", k, i);
        int rc = check_string(json_object_get(part, "text"), line_no, what, err);
        if (rc < 0)
            return rc;
        snprintf(what, sizeof(what), "'messages'[%zu].content", k);
    }
    return 0;
}

static int check_messages(const json_t *msgs, size_t line_no, struct ad_err *err)
{
    size_t n = json_array_size(msgs), k, n_learn = 0;
    json_t *m;

    if (!json_is_array(msgs))
        return ad_err_set(err, -EINVAL, "line %zu: 'messages' must be a list", line_no);
    if (n == 0)
        return ad_err_set(err, -EINVAL, "line %zu: 'messages' is empty", line_no);
    if (n > MAX_MESSAGES)
        return ad_err_set(err, -EINVAL, "line %zu: 'messages' has %zu messages, more than %d",
                          line_no, n, MAX_MESSAGES);
    json_array_foreach(msgs, k, m) {
        if (!json_is_object(m))
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu] must be an object",
                              line_no, k);
        json_t *role = json_object_get(m, "role"), *w = json_object_get(m, "weight");
        json_t *rc = json_object_get(m, "reasoning_content");
        const char *r = json_string_value(role);
        bool assistant = r && !strcmp(r, "assistant");
        if (!role)
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu].role is missing", line_no,
                              k);
        if (!r || (strcmp(r, "system") && strcmp(r, "user") && !assistant))
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu].role must be system, user "
                              "or assistant", line_no, k);
        int e = check_content(json_object_get(m, "content"), line_no, k, err);
        if (e < 0)
            return e;
        if (json_object_get(m, "tool_calls") || json_object_get(m, "function_call"))
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu]: tool calls are not "
                              "supported", line_no, k);
        if (rc && !json_is_null(rc) && !json_is_string(rc))
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu].reasoning_content must "
                              "be a string", line_no, k);
        if (w && !assistant)
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu].weight is only for "
                              "assistant messages", line_no, k);
        if (w && (!json_is_integer(w) ||
                  (json_integer_value(w) != 0 && json_integer_value(w) != 1)))
            return ad_err_set(err, -EINVAL, "line %zu: 'messages'[%zu].weight must be 0 or 1",
                              line_no, k);
        n_learn += assistant && (!w || json_integer_value(w) == 1);
    }
    if (n_learn == 0)
        return ad_err_set(err, -EINVAL, "line %zu: no assistant turn to learn ('messages' has no "
                          "assistant message of weight 1)", line_no);
    return 0;
}

/* The line's object: which format it is, checked. */
static int check_object(const json_t *o, size_t line_no, enum format *ret_fmt,
                        struct ad_err *err)
{
    const json_t *msgs = json_object_get(o, "messages"), *text = json_object_get(o, "text");
    const json_t *prompt = json_object_get(o, "prompt"), *compl = json_object_get(o, "completion");
    int n_formats = !!msgs + !!text + (prompt || compl), rc;

    if (!json_is_object(o))
        return ad_err_set(err, -EINVAL, "line %zu: must be a JSON object", line_no);
    if (n_formats == 0)
        return ad_err_set(err, -EINVAL, "line %zu: has none of 'messages', 'prompt' and "
                          "'completion', 'text'", line_no);
    if (n_formats > 1)
        return ad_err_set(err, -EINVAL, "line %zu: has more than one of 'messages', 'prompt' and "
                          "'completion', 'text': one format a line", line_no);
    if (json_object_get(o, "tools") || json_object_get(o, "functions"))
        return ad_err_set(err, -EINVAL, "line %zu: 'tools' are not supported", line_no);
    if (msgs) {
        rc = check_messages(msgs, line_no, err);
        *ret_fmt = MESSAGES;
    } else if (text) {
        rc = check_string(text, line_no, "'text'", err);
        *ret_fmt = TEXT;
    } else {
        if (!prompt || !compl)
            return ad_err_set(err, -EINVAL, "line %zu: '%s' is missing (it goes with '%s')",
                              line_no, prompt ? "completion" : "prompt",
                              prompt ? "prompt" : "completion");
        if (json_is_array(prompt) || json_is_array(compl))
            return ad_err_set(err, -EINVAL, "line %zu: 'prompt' and 'completion' must be strings "
                              "(for a conversation, use 'messages')", line_no);
        rc = check_string(prompt, line_no, "'prompt'", err);
        if (rc == 0)
            rc = check_string(compl, line_no, "'completion'", err);
        *ret_fmt = PROMPT_COMPLETION;
    }
    return rc;
}

/* Parses and checks one line; *ret_obj (if not NULL) gets the object (a new reference). */
static int parse_line(const char *line, size_t len, size_t line_no, json_t **ret_obj,
                      enum format *ret_fmt, struct ad_err *err)
{
    json_error_t je;
    json_t *o;
    size_t bad;
    enum format fmt = TEXT;
    int rc;

    if (len > MAX_LINE)
        return ad_err_set(err, -EINVAL, "line %zu: longer than %u bytes", line_no, MAX_LINE);
    if (!utf8_valid((const unsigned char *)line, len, &bad))
        return ad_err_set(err, -EINVAL, "line %zu: invalid UTF-8 at byte %zu", line_no, bad + 1);
    o = json_loadb(line, len, JSON_REJECT_DUPLICATES, &je);
    if (!o)
        return ad_err_set(err, -EINVAL, "line %zu: not valid JSON: %s (column %d)", line_no,
                          je.text, je.column);
    rc = check_object(o, line_no, &fmt, err);
    if (rc == 0 && ret_obj) {
        *ret_obj = o;
        *ret_fmt = fmt;
        return 0;
    }
    json_decref(o);
    return rc;
}

int ad_data_check_line(const char *line, size_t len, size_t line_no, struct ad_err *err)
{
    if (blank(line, len))
        return 0;
    return parse_line(line, len, line_no, NULL, NULL, err);
}

/* ==========================================================================================
 * Tokenizing: pieces of text, each a loss piece or not, into tokens and a loss flag each */

struct toks {
    int32_t *ids;
    uint8_t *loss;
    size_t n, cap;
};

static int toks_reserve(struct toks *t, size_t more)
{
    if (t->n + more <= t->cap)
        return 0;
    size_t cap = t->cap ? t->cap : 256;
    while (cap < t->n + more)
        cap *= 2;
    int32_t *ids = realloc(t->ids, cap * sizeof(*ids));
    if (!ids)
        return -ENOMEM;
    t->ids = ids;
    uint8_t *loss = realloc(t->loss, cap);
    if (!loss)
        return -ENOMEM;
    t->loss = loss;
    t->cap = cap;
    return 0;
}

static int toks_push(struct toks *t, const int32_t *ids, size_t n, bool loss)
{
    if (toks_reserve(t, n) < 0)
        return -ENOMEM;
    memcpy(t->ids + t->n, ids, n * sizeof(*ids));
    memset(t->loss + t->n, loss, n);
    t->n += n;
    return 0;
}

static void toks_fini(struct toks *t)
{
    free(t->ids);
    free(t->loss);
    *t = (struct toks){0};
}

struct piece {
    size_t end; /* the piece is text[previous end, end) */
    bool loss;
};

/* Tokenizes text[0, len) cut into pieces (ends increasing, the last = len) into t (appended to
 * an empty t), add_special_tokens for the whole text and its first piece (see the top). */
static int tokenize_pieces(const struct ad_tokenizer *tok, const char *text, size_t len,
                           const struct piece *pc, size_t n_pc, bool special, struct toks *t,
                           struct ad_err *err)
{
    int32_t *whole = NULL, *ids = NULL;
    size_t n_whole = 0, n_ids, *at = calloc(n_pc + 1, sizeof(*at));
    bool same;
    int rc = at ? 0 : -ENOMEM;

    /* piece by piece */
    for (size_t k = 0, start = 0; rc == 0 && k < n_pc; start = pc[k++].end) {
        rc = ad_tokenizer_encode(tok, text + start, pc[k].end - start, special && k == 0, &ids,
                                 &n_ids, err);
        if (rc == 0)
            rc = toks_push(t, ids, n_ids, pc[k].loss);
        free(ids);
        ids = NULL;
    }
    if (rc == 0)
        rc = ad_tokenizer_encode(tok, text, len, special, &whole, &n_whole, err);
    same = rc == 0 && n_whole == t->n && !memcmp(whole, t->ids, n_whole * sizeof(*whole));
    if (rc == 0 && !same) {
        /* the whole text's tokens, if every boundary falls between two of them: at[k] is where
         * piece k starts */
        bool ok = true;
        at[0] = 0;
        at[n_pc] = n_whole;
        for (size_t k = 1; rc == 0 && ok && k < n_pc; k++) {
            rc = ad_tokenizer_encode(tok, text, pc[k - 1].end, special, &ids, &n_ids, err);
            ok = rc == 0 && n_ids >= at[k - 1] && n_ids <= n_whole &&
                 !memcmp(ids, whole, n_ids * sizeof(*ids));
            at[k] = n_ids;
            free(ids);
            ids = NULL;
        }
        if (rc == 0 && ok) {
            t->n = 0;
            for (size_t k = 0; rc == 0 && k < n_pc; k++)
                rc = toks_push(t, whole + at[k], at[k + 1] - at[k], pc[k].loss);
        }
    }
    if (rc == -ENOMEM)
        ad_err_set(err, -ENOMEM, "out of memory");
    free(whole);
    free(at);
    return rc;
}

/* The EOS after a text, unless it already ends with it (TRL's add_eos). */
static int push_eos(const struct ad_tokenizer *tok, struct toks *t, struct ad_err *err)
{
    int32_t eos = ad_tokenizer_eos_id(tok);
    if (eos < 0)
        return ad_err_set(err, -EINVAL, "the tokenizer has no EOS token to end the example with "
                          "(tokenizer_config.json eos_token)");
    if (t->n > 0 && t->ids[t->n - 1] == eos)
        t->loss[t->n - 1] = 1;
    else if (toks_push(t, &eos, 1, true) < 0)
        return ad_err_set(err, -ENOMEM, "out of memory");
    return 0;
}

static int tokenize_messages(const struct ad_tokenizer *tok, const json_t *msgs, size_t line_no,
                             struct toks *t, struct ad_err *err)
{
    const char *tmpl = ad_tokenizer_chat_template(tok);
    const char *bos = ad_tokenizer_id_to_token(tok, ad_tokenizer_bos_id(tok), NULL);
    const char *eos = ad_tokenizer_id_to_token(tok, ad_tokenizer_eos_id(tok), NULL);
    struct ad_chat_turn *turns = NULL;
    struct piece *pc = NULL;
    size_t n_turns = 0, n_pc = 0, len;
    char *text = NULL;
    int rc;

    if (!tmpl)
        return ad_err_set(err, -EINVAL, "line %zu: 'messages' are rendered with the model's chat "
                          "template, and it has none (tokenizer_config.json chat_template)",
                          line_no);
    rc = ad_chat_segments(tmpl, bos, eos, msgs, &text, &turns, &n_turns, err);
    if (rc < 0) { /* -ENOTSUP too: for the dataset it is a line the template cannot take */
        ad_err_prefix(err, "line %zu", line_no);
        rc = rc == -ENOMEM ? rc : -EINVAL;
        if (err)
            err->code = rc;
        return rc;
    }
    len = strlen(text);
    pc = calloc(2 * n_turns + 1, sizeof(*pc));
    if (!pc)
        rc = ad_err_set(err, -ENOMEM, "out of memory");
    for (size_t k = 0; rc == 0 && k < n_turns; k++) {
        json_t *w = json_object_get(json_array_get(msgs, turns[k].message), "weight");
        bool learn = !w || json_integer_value(w) == 1;
        if (turns[k].start > (n_pc ? pc[n_pc - 1].end : 0))
            pc[n_pc++] = (struct piece){.end = turns[k].start, .loss = false};
        if (turns[k].end > turns[k].start)
            pc[n_pc++] = (struct piece){.end = turns[k].end, .loss = learn};
    }
    if (rc == 0 && len > (n_pc ? pc[n_pc - 1].end : 0))
        pc[n_pc++] = (struct piece){.end = len, .loss = false};
    if (rc == 0)
        rc = tokenize_pieces(tok, text, len, pc, n_pc, false, t, err);
    if (rc == -EINVAL)
        ad_err_prefix(err, "line %zu", line_no);
    free(pc);
    free(turns);
    free(text);
    return rc;
}

/* One line's tokens and loss flags. */
static int tokenize_line(const struct ad_tokenizer *tok, const json_t *o, enum format fmt,
                         size_t line_no, struct toks *t, struct ad_err *err)
{
    if (fmt == MESSAGES)
        return tokenize_messages(tok, json_object_get(o, "messages"), line_no, t, err);

    const json_t *a = json_object_get(o, fmt == TEXT ? "text" : "prompt");
    const json_t *b = json_object_get(o, "completion");
    size_t la = json_string_length(a), lb = fmt == TEXT ? 0 : json_string_length(b);
    char *s = malloc(la + lb + 1);
    int rc = s ? 0 : ad_err_set(err, -ENOMEM, "out of memory");

    if (rc == 0) {
        memcpy(s, json_string_value(a), la);
        if (lb)
            memcpy(s + la, json_string_value(b), lb);
        struct piece pc[2] = {{.end = la, .loss = false}, {.end = la + lb, .loss = true}};
        rc = tokenize_pieces(tok, s, la + lb, pc, fmt == TEXT ? 1 : 2, true, t, err);
    }
    if (rc == 0)
        rc = push_eos(tok, t, err);
    if (rc == 0 && fmt == TEXT)
        memset(t->loss + 1, 1, t->n - 1); /* every token after the first */
    if (rc == -EINVAL)
        ad_err_prefix(err, "line %zu", line_no);
    free(s);
    return rc;
}

/* ==========================================================================================
 * Examples */

/* targets[i] for t's first n tokens (an example cut to n): the next token where it is a loss
 * token, else -1; the last has none. Returns how many are >= 0. */
static size_t make_targets(const struct toks *t, size_t n, int32_t *targets)
{
    size_t n_targets = 0;
    for (size_t i = 0; i < n; i++) {
        bool loss = i + 1 < n && t->loss[i + 1];
        targets[i] = loss ? t->ids[i + 1] : -1;
        n_targets += loss;
    }
    return n_targets;
}

struct builder {
    struct ad_dataset *d;
    size_t cap;
};

/* Adds an example of n tokens and targets (copied); one with no target is not kept. */
static int add_example(struct builder *b, const int32_t *ids, const int32_t *targets, size_t n)
{
    struct ad_example e = {0};

    for (size_t i = 0; i < n; i++)
        e.n_targets += targets[i] >= 0;
    if (e.n_targets == 0)
        return 0;
    if (b->d->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        struct ad_example *ex = realloc(b->d->ex, cap * sizeof(*ex));
        if (!ex)
            return -ENOMEM;
        b->d->ex = ex;
        b->cap = cap;
    }
    e.tokens = malloc(n * sizeof(*e.tokens));
    e.targets = malloc(n * sizeof(*e.targets));
    if (!e.tokens || !e.targets) {
        free(e.tokens);
        free(e.targets);
        return -ENOMEM;
    }
    memcpy(e.tokens, ids, n * sizeof(*ids));
    memcpy(e.targets, targets, n * sizeof(*targets));
    e.n_tokens = (int)n;
    b->d->ex[b->d->n++] = e;
    b->d->n_tokens += n;
    b->d->n_targets += (size_t)e.n_targets;
    return 1;
}

/* The examples' tokens and targets end to end, for packing. */
struct stream {
    int32_t *ids, *targets;
    size_t n, cap;
};

static int stream_push(struct stream *s, const struct toks *t)
{
    if (s->n + t->n > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->n + t->n)
            cap *= 2;
        int32_t *ids = realloc(s->ids, cap * sizeof(*ids));
        if (!ids)
            return -ENOMEM;
        s->ids = ids;
        int32_t *targets = realloc(s->targets, cap * sizeof(*targets));
        if (!targets)
            return -ENOMEM;
        s->targets = targets;
        s->cap = cap;
    }
    memcpy(s->ids + s->n, t->ids, t->n * sizeof(*t->ids));
    make_targets(t, t->n, s->targets + s->n);
    s->n += t->n;
    return 0;
}

void ad_dataset_free(struct ad_dataset *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->n; i++) {
        free(d->ex[i].tokens);
        free(d->ex[i].targets);
    }
    free(d->ex);
    free(d);
}

/* ==========================================================================================
 * Loading */

/* The next line of m after *pos: [*ret_line, + *ret_len), without its "\n" or "\r\n". */
static bool next_line(const struct ad_mmap *m, size_t *pos, const char **ret_line,
                      size_t *ret_len)
{
    const char *s = m->data, *nl;
    size_t len;

    if (*pos >= m->size)
        return false;
    nl = memchr(s + *pos, '\n', m->size - *pos);
    len = nl ? (size_t)(nl - (s + *pos)) : m->size - *pos;
    *ret_line = s + *pos;
    *pos += len + (nl != NULL);
    if (len > 0 && (*ret_line)[len - 1] == '\r')
        len--;
    *ret_len = len;
    return true;
}

int ad_dataset_load(const char *path, const struct ad_tokenizer *tok,
                    const struct ad_data_opts *opts, struct ad_dataset **ret,
                    struct ad_err *err)
{
    struct ad_mmap m = {0};
    struct builder b = {0};
    struct toks t = {0};
    struct stream st = {0};
    int32_t *targets = NULL;
    size_t pos = 0, line_no = 0, n_lines = 0, max_len;
    const char *line;
    size_t len;
    int rc;

    if (opts->max_seq_len < 1 || opts->max_seq_len > MAX_SEQ_LEN)
        return ad_err_set(err, -EINVAL, "max_seq_len must be 1 to %d, not %d", MAX_SEQ_LEN,
                          opts->max_seq_len);
    max_len = (size_t)opts->max_seq_len;
    rc = ad_mmap_init(&m, path, err);
    if (rc < 0)
        return rc;
    if (m.size > MAX_FILE) {
        ad_mmap_fini(&m);
        return ad_err_set(err, -E2BIG, "the training file is larger than %u MiB",
                          MAX_FILE >> 20);
    }
    if (m.size >= 3 && !memcmp(m.data, "\xef\xbb\xbf", 3))
        pos = 3; /* a UTF-8 byte order mark */

    /* every line is checked before anything is tokenized */
    for (size_t p = pos; rc == 0 && next_line(&m, &p, &line, &len);) {
        line_no++;
        if (blank(line, len))
            continue;
        rc = parse_line(line, len, line_no, NULL, NULL, err);
        n_lines++;
    }
    if (rc == 0 && n_lines == 0)
        rc = ad_err_set(err, -EINVAL, "the training file has no examples");
    if (rc == 0) {
        b.d = calloc(1, sizeof(*b.d));
        targets = malloc(max_len * sizeof(*targets));
        if (!b.d || !targets)
            rc = -ENOMEM;
    }

    line_no = 0;
    while (rc == 0 && next_line(&m, &pos, &line, &len)) {
        json_t *o = NULL;
        enum format fmt;
        line_no++;
        if (blank(line, len))
            continue;
        rc = parse_line(line, len, line_no, &o, &fmt, err);
        t.n = 0;
        if (rc == 0)
            rc = tokenize_line(tok, o, fmt, line_no, &t, err);
        json_decref(o);
        if (rc == 0 && opts->packing) {
            rc = stream_push(&st, &t);
        } else if (rc == 0) {
            size_t n = t.n < max_len ? t.n : max_len; /* cut at the right */
            b.d->n_truncated += n < t.n;
            make_targets(&t, n, targets);
            rc = add_example(&b, t.ids, targets, n);
            rc = rc < 0 ? rc : 0;
        }
    }
    /* packing: sequences of max_len tokens end to end, each keeping its targets */
    for (size_t from = 0; rc == 0 && from < st.n; from += max_len) {
        size_t n = st.n - from < max_len ? st.n - from : max_len;
        rc = add_example(&b, st.ids + from, st.targets + from, n);
        rc = rc < 0 ? rc : 0;
    }
    if (rc == -ENOMEM)
        ad_err_set(err, -ENOMEM, "out of memory");
    if (rc == 0 && b.d->n == 0)
        rc = ad_err_set(err, -EINVAL, "no example has a token to learn within max_seq_len = %d "
                        "tokens", opts->max_seq_len);
    toks_fini(&t);
    free(st.ids);
    free(st.targets);
    free(targets);
    ad_mmap_fini(&m);
    if (rc < 0) {
        ad_dataset_free(b.d);
        return rc;
    }
    *ret = b.d;
    return 0;
}
