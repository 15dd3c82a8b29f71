/* Chat templates. adapterd has no Jinja interpreter: it recognises the common template
 * families by their marker tokens and renders messages the way those templates do. A
 * template of no known family is refused with a clear message.
 *
 *   ChatML (Qwen2, SmolLM, Hermes)  <|im_start|>role\ncontent<|im_end|>\n
 *   Llama 3                         <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
 *   Llama 2                         [INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
 *   Mistral                         [INST] user [/INST]answer</s>
 *   Zephyr                          <|role|>\ncontent</s>\n
 *   Gemma                           <start_of_turn>user|model\ncontent<end_of_turn>\n */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int chat_render(const char *tmpl, json_t *messages, char **ret, char *msg, size_t msg_len);

struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void put(struct sbuf *b, const char *s)
{
    size_t n = strlen(s);
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *q = realloc(b->p, cap);
        if (!q) {
            b->oom = true;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n + 1);
    b->len += n;
}

/* A message's text: a string, or a list of {"type": "text", "text"} parts. */
static int content_of(json_t *m, struct sbuf *out)
{
    json_t *c = json_object_get(m, "content");
    if (json_is_string(c)) {
        if (memchr(json_string_value(c), '\0', json_string_length(c)))
            return -EINVAL;
        put(out, json_string_value(c));
        return 0;
    }
    if (!json_is_array(c))
        return -EINVAL;
    size_t i;
    json_t *part;
    json_array_foreach(c, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        const char *text = json_string_value(json_object_get(part, "text"));
        if (!type || strcmp(type, "text") || !text)
            return -ENOTSUP;
        put(out, text);
    }
    return 0;
}

/* The template's built-in system prompt, as a ChatML template writes it literally
 * ('<|im_start|>system\nYou are ...<|im_end|>'), or NULL. */
static char *default_system(const char *tmpl)
{
    const char *k = strstr(tmpl, "<|im_start|>system\\n");
    size_t skip = 20;
    if (!k) {
        k = strstr(tmpl, "<|im_start|>system\n");
        skip = 19;
    }
    if (!k)
        return NULL;
    k += skip;
    if (*k == '\'' || *k == '"' || *k == '{' || *k == '+')
        return NULL; /* the system text comes from the messages */
    const char *end = strstr(k, "<|im_end|>");
    if (!end || end - k > 2000)
        return NULL;
    char *s = strndup(k, (size_t)(end - k));
    return s;
}

enum family { CHATML, LLAMA3, LLAMA2, MISTRAL, ZEPHYR, GEMMA, UNKNOWN };

static enum family family_of(const char *t)
{
    if (strstr(t, "<|im_start|>"))
        return CHATML;
    if (strstr(t, "<|start_header_id|>"))
        return LLAMA3;
    if (strstr(t, "<start_of_turn>"))
        return GEMMA;
    if (strstr(t, "[INST]"))
        return strstr(t, "<<SYS>>") ? LLAMA2 : MISTRAL;
    if (strstr(t, "<|user|>") && strstr(t, "<|assistant|>"))
        return ZEPHYR;
    return UNKNOWN;
}

int chat_render(const char *tmpl, json_t *messages, char **ret, char *msg, size_t msg_len)
{
    enum family f = family_of(tmpl);
    struct sbuf b = {0}, sys = {0};
    size_t i;
    json_t *m;
    int rc = 0;

    if (f == UNKNOWN) {
        snprintf(msg, msg_len, "the model's chat template is not of a supported family "
                 "(ChatML, Llama 2, Llama 3, Mistral, Zephyr, Gemma): use /v1/completions");
        return -ENOTSUP;
    }
    json_array_foreach(messages, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        if (!role || (strcmp(role, "system") && strcmp(role, "user") &&
                      strcmp(role, "assistant"))) {
            snprintf(msg, msg_len, "messages[%zu]: role must be system, user or assistant", i);
            rc = -EINVAL;
            goto out;
        }
        if (!strcmp(role, "system") && i != 0) {
            snprintf(msg, msg_len, "messages[%zu]: a system message must come first", i);
            rc = -EINVAL;
            goto out;
        }
    }

    const char *bos = f == LLAMA3 ? "<|begin_of_text|>" : f == GEMMA ? "<bos>"
                      : f == LLAMA2 || f == MISTRAL ? "<s>" : "";
    put(&b, bos);
    if (f == CHATML) {
        char *dflt = default_system(tmpl);
        const char *first = json_string_value(json_object_get(json_array_get(messages, 0),
                                                              "role"));
        if (dflt && strcmp(first, "system")) {
            put(&b, "<|im_start|>system\n");
            put(&b, dflt);
            put(&b, "<|im_end|>\n");
        }
        free(dflt);
    }
    bool first_user = true;
    json_array_foreach(messages, i, m) {
        const char *role = json_string_value(json_object_get(m, "role"));
        struct sbuf c = {0};
        if ((rc = content_of(m, &c)) < 0) {
            snprintf(msg, msg_len, "messages[%zu]: content must be a string or a list of text "
                     "parts", i);
            free(c.p);
            goto out;
        }
        const char *text = c.p ? c.p : "";
        switch (f) {
        case CHATML:
            put(&b, "<|im_start|>");
            put(&b, role);
            put(&b, "\n");
            put(&b, text);
            put(&b, "<|im_end|>\n");
            break;
        case LLAMA3:
            put(&b, "<|start_header_id|>");
            put(&b, role);
            put(&b, "<|end_header_id|>\n\n");
            put(&b, text);
            put(&b, "<|eot_id|>");
            break;
        case ZEPHYR:
            put(&b, "<|");
            put(&b, role);
            put(&b, "|>\n");
            put(&b, text);
            put(&b, "</s>\n");
            break;
        case GEMMA:
        case LLAMA2:
        case MISTRAL:
            if (!strcmp(role, "system")) {
                put(&sys, text); /* folded into the first user turn */
            } else if (!strcmp(role, "user")) {
                if (f == GEMMA) {
                    put(&b, "<start_of_turn>user\n");
                } else {
                    put(&b, "[INST] ");
                }
                if (first_user && sys.p) {
                    if (f == LLAMA2) {
                        put(&b, "<<SYS>>\n");
                        put(&b, sys.p);
                        put(&b, "\n<</SYS>>\n\n");
                    } else {
                        put(&b, sys.p);
                        put(&b, "\n\n");
                    }
                }
                put(&b, text);
                put(&b, f == GEMMA ? "<end_of_turn>\n" : " [/INST]");
                first_user = false;
            } else {
                if (f == GEMMA) {
                    put(&b, "<start_of_turn>model\n");
                    put(&b, text);
                    put(&b, "<end_of_turn>\n");
                } else {
                    put(&b, f == LLAMA2 ? " " : "");
                    put(&b, text);
                    put(&b, f == LLAMA2 ? " </s><s>" : "</s>");
                }
            }
            break;
        default:
            break;
        }
        free(c.p);
    }
    /* the generation prompt */
    switch (f) {
    case CHATML:
        put(&b, "<|im_start|>assistant\n");
        break;
    case LLAMA3:
        put(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    case ZEPHYR:
        put(&b, "<|assistant|>\n");
        break;
    case GEMMA:
        put(&b, "<start_of_turn>model\n");
        break;
    default:
        break;
    }
    if (b.oom || !b.p) {
        snprintf(msg, msg_len, "out of memory");
        rc = -ENOMEM;
        goto out;
    }
    *ret = b.p;
    b.p = NULL;
out:
    free(b.p);
    free(sys.p);
    return rc;
}
