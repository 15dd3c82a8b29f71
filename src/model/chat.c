/* Chat templates (include/adapterd/tokenizer.h, "Chat templates"). adapterd has no Jinja
 * interpreter: it recognises the chat templates of the common model families and renders messages
 * exactly as those templates do under transformers (Python's Jinja, trim_blocks and
 * lstrip_blocks), with add_generation_prompt true (serving) or false (training data), including
 * the conversations they refuse with raise_exception. tests/chat checks every variant below
 * against Hugging Face's Jinja implementation and Python's jinja2 on the real templates, with
 * both values of add_generation_prompt.
 *
 *   ChatML     <|im_start|>role\ncontent<|im_end|>\n      OpenHermes; SmolLM2, Qwen2, Qwen2.5
 *                                                        (a built-in system prompt); Qwen3
 *                                                        (<think> blocks)
 *   Llama 3    <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>
 *                                                        (the first revision prints the
 *                                                        generation prompt unconditionally)
 *   Llama 2    <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
 *   Mistral    <s>[INST] user [/INST]answer</s>          v0.1, v0.2, the later 'v1' template
 *                                                        with a system prompt, v0.3
 *   Zephyr     <|role|>\ncontent</s>\n                   Zephyr, TinyLlama
 *   Gemma      <start_of_turn>user|model\ncontent<end_of_turn>\n   Gemma 1/2, Gemma 3
 *
 * A template is recognised by the expressions it is made of, compared after normalising its
 * spelling (spaces in code, quotes, escapes, whitespace control, ['key'] versus .key): a variant
 * is a list of expressions that must all be there plus the number of {{ }} outputs it has, so a
 * template that adds or changes an output is refused as not supported, never rendered wrong.
 *
 * Content may be a string or a list of {"type": "text", "text"} parts. Gemma 3's template walks
 * the list itself; for the others the parts are joined with "\n" first (as vLLM does).
 *
 * ad_chat_segments finds the assistant turns in the rendering the way one would with Jinja
 * itself, from renderings of the conversation's prefixes (see the end of this file). */
#include <assert.h>
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

/* ==========================================================================================
 * Growing strings */

struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void putn(struct sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
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
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void put(struct sbuf *b, const char *s)
{
    putn(b, s, strlen(s));
}

/* ==========================================================================================
 * Python's string methods: str.strip() (Python's whitespace, as str.isspace()), strip(chars),
 * split. Ranges are [*a, *b) byte offsets into s, which is valid UTF-8. */

static bool py_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* The code point at s[i] and its length (invalid bytes count as themselves, length 1). */
static uint32_t cp_at(const char *s, size_t i, size_t end, size_t *len)
{
    const unsigned char *u = (const unsigned char *)s + i;
    size_t n = u[0] < 0x80 ? 1 : u[0] >= 0xf0 ? 4 : u[0] >= 0xe0 ? 3 : u[0] >= 0xc0 ? 2 : 1;
    if (i + n > end)
        n = 1;
    uint32_t c = n == 1 ? u[0] : u[0] & (0x7f >> n);
    for (size_t k = 1; k < n; k++)
        c = (c << 6) | (u[k] & 0x3f);
    *len = n;
    return c;
}

/* The start of the code point that ends at s[end). */
static size_t cp_before(const char *s, size_t start, size_t end)
{
    size_t i = end - 1;
    while (i > start && (s[i] & 0xc0) == 0x80 && end - i < 4)
        i--;
    return i;
}

/* chars NULL: Python's whitespace; else a set of ASCII characters. */
static void py_strip(const char *s, size_t *a, size_t *b, const char *chars, bool left, bool right)
{
    size_t len;
    while (left && *a < *b) {
        uint32_t c = cp_at(s, *a, *b, &len);
        if (chars ? !(c < 0x80 && strchr(chars, (int)c)) : !py_space(c))
            break;
        *a += len;
    }
    while (right && *b > *a) {
        size_t i = cp_before(s, *a, *b);
        uint32_t c = cp_at(s, i, *b, &len);
        if (i + len != *b || (chars ? !(c < 0x80 && strchr(chars, (int)c)) : !py_space(c)))
            break;
        *b = i;
    }
}

static void put_stripped(struct sbuf *out, const char *s, const char *chars, bool left,
                         bool right)
{
    size_t a = 0, b = strlen(s);
    py_strip(s, &a, &b, chars, left, right);
    putn(out, s + a, b - a);
}

/* The range of the first (last = false) or last piece of s[a, b) split at sep. */
static void py_split_end(const char *s, size_t *a, size_t *b, const char *sep, bool last)
{
    size_t n = strlen(sep);
    const char *hit = NULL;
    for (const char *p = s + *a; p + n <= s + *b; p++) {
        if (!memcmp(p, sep, n)) {
            hit = p;
            if (!last)
                break;
        }
    }
    if (!hit)
        return;
    if (last)
        *a = (size_t)(hit - s) + n;
    else
        *b = (size_t)(hit - s);
}

/* ==========================================================================================
 * Normalised templates: the same template however it is spelt. Comments go. Text outside tags
 * is kept as it renders with transformers' settings: the newline after a block tag goes
 * (trim_blocks), so do the spaces and tabs before a block tag at the start of a line
 * (lstrip_blocks), and all whitespace on the side of a '-' ({%- -%} {{- -}}). In code, spaces go,
 * every string literal is rewritten '...' with its escapes decoded (a quote or backslash inside
 * as \' or \\), and ['key'] becomes .key. */

static bool ident_char(char c, bool first)
{
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (!first && c >= '0' && c <= '9');
}

static bool is_ident(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!ident_char(s[i], i == 0))
            return false;
    return n > 0;
}

/* Reads the string literal at s[*i] (its opening quote) into lit; *i moves past it. */
static void read_literal(const char *s, size_t *i, struct sbuf *lit)
{
    char q = s[(*i)++];
    while (s[*i] && s[*i] != q) {
        char c = s[(*i)++];
        if (c == '\\' && s[*i]) {
            c = s[(*i)++];
            c = c == 'n' ? '\n' : c == 't' ? '\t' : c == 'r' ? '\r' : c;
        }
        putn(lit, &c, 1);
    }
    if (s[*i])
        (*i)++;
    if (!lit->p)
        put(lit, "");
}

static void put_literal(struct sbuf *out, const char *lit)
{
    put(out, "'");
    for (const char *p = lit; *p; p++) {
        if (*p == '\'' || *p == '\\')
            put(out, "\\");
        putn(out, p, 1);
    }
    put(out, "'");
}

/* code: s starts inside a tag (a needle that is a bare expression). */
static char *normalize(const char *s, bool code)
{
    struct sbuf o = {0};
    size_t i = 0, raw = 0; /* raw: where the text since the last tag starts in o */
    char close = code ? '}' : 0; /* '}' in {{ }}, '%' in {% %} */
    bool skip_nl = false, skip_ws = false;

    put(&o, "");
    while (s[i]) {
        if (!close) {
            char c = s[i], n = s[i + 1];
            bool comment = c == '{' && n == '#';
            if (c == '{' && (n == '{' || n == '%' || n == '#')) {
                char m = s[i + 2];
                if (m == '-') {
                    while (o.len > raw && strchr(" \t\r\n", o.p[o.len - 1]))
                        o.len--;
                } else if (n != '{' && m != '+') {
                    size_t k = o.len;
                    while (k > raw && (o.p[k - 1] == ' ' || o.p[k - 1] == '\t'))
                        k--;
                    if ((k > raw && o.p[k - 1] == '\n') || (k == 0 && raw == 0))
                        o.len = k;
                }
                if (o.p)
                    o.p[o.len] = '\0';
                skip_nl = skip_ws = false;
            }
            if (comment) {
                const char *e = strstr(s + i + 2, "#}");
                i = e ? (size_t)(e - s) + 2 : strlen(s);
                skip_ws = e && e[-1] == '-';
                skip_nl = !skip_ws;
                raw = o.len;
            } else if (c == '{' && (n == '{' || n == '%')) {
                close = n == '{' ? '}' : '%';
                putn(&o, s + i, 2);
                i += 2;
                if (s[i] == '-' || s[i] == '+')
                    i++;
            } else if ((skip_ws && strchr(" \t\r\n", c)) || (skip_nl && c == '\n')) {
                skip_nl = false;
                i++;
            } else {
                skip_nl = skip_ws = false;
                putn(&o, s + i, 1);
                i++;
            }
            continue;
        }
        char c = s[i];
        if ((c == '-' || c == '+') && s[i + 1] == close && s[i + 2] == '}') {
            skip_ws = c == '-';
            i++;
        } else if (c == close && s[i + 1] == '}' && !code) {
            skip_nl = close == '%' && !skip_ws;
            putn(&o, s + i, 2);
            i += 2;
            close = 0;
            raw = o.len;
        } else if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
            i++;
        } else if (c == '\'' || c == '"') {
            struct sbuf lit = {0};
            read_literal(s, &i, &lit);
            put_literal(&o, lit.p ? lit.p : "");
            o.oom |= lit.oom;
            free(lit.p);
        } else if (c == '[' && (s[i + 1] == '\'' || s[i + 1] == '"')) {
            /* ['key'] -> .key */
            size_t j = i + 1;
            struct sbuf lit = {0};
            read_literal(s, &j, &lit);
            while (s[j] == ' ')
                j++;
            if (lit.p && s[j] == ']' && is_ident(lit.p, lit.len)) {
                put(&o, ".");
                put(&o, lit.p);
                i = j + 1;
            } else {
                putn(&o, s + i, 1);
                i++;
            }
            o.oom |= lit.oom;
            free(lit.p);
        } else {
            putn(&o, s + i, 1);
            i++;
        }
    }
    if (o.oom) {
        free(o.p);
        return NULL;
    }
    return o.p;
}

/* ==========================================================================================
 * The variants adapterd renders. A needle starting with '{' is template text, else code. */

enum variant {
    QWEN3,         /* ChatML with <think> blocks (tried before plain ChatML) */
    CHATML,        /* OpenHermes-2.5; with a built-in system prompt: SmolLM2, Qwen2, Qwen2.5 */
    LLAMA3,        /* Meta-Llama-3-Instruct: the revision with {% if add_generation_prompt %} */
    LLAMA3_ALWAYS, /* its first revision: the generation prompt printed whatever the flag says */
    LLAMA2,        /* Llama-2-chat */
    MISTRAL_V01,   /* Mistral-7B-Instruct-v0.1 as released: "[INST] u [/INST]a</s> " */
    MISTRAL_V02,   /* v0.2 and Mixtral-8x7B-Instruct-v0.1: "[INST] u [/INST]a</s>" */
    MISTRAL_V1SYS, /* the later 'v1' template of v0.1/v0.2: " [INST] sys\n\nu [/INST] a</s>" */
    MISTRAL_V3,    /* v0.3: "[INST] u[/INST] a</s>", the system prompt in the last user turn */
    ZEPHYR,        /* Zephyr, TinyLlama */
    GEMMA,         /* Gemma, Gemma 2: no system role */
    GEMMA3,        /* Gemma 3: the system prompt in the first user turn, content lists */
    N_VARIANTS
};

#define ALTERNATE "(message['role'] == 'user') != (loop.index0 % 2 == 0)"
#define LLAMA3_TURNS "{% set content = '<|start_header_id|>' + message['role'] + " \
                     "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}" \
                     "{% if loop.index0 == 0 %}{% set content = bos_token + content %}" \
                     "{% endif %}{{ content }}{% endfor %}"
#define LLAMA3_PROMPT "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
#define CHATML_TURN "'<|im_start|>' + message['role'] + '\\n' + message['content'] + " \
                    "'<|im_end|>' + '\\n'"

static const struct {
    const char *name;
    const char *needles[12];
    int n_outputs[3]; /* the number of {{ }} in the template's variants, 0-terminated */
} variants[N_VARIANTS] = {
    [CHATML] = {"ChatML",
                {CHATML_TURN, "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"},
                {2, 3, 24}},
    [QWEN3] = {"Qwen3",
               {"'<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n'",
                "message.role == 'user' and not(message.content.startswith('<tool_response>') "
                "and message.content.endswith('</tool_response>'))",
                "(message.role == 'user') or (message.role == 'system' and not loop.first)",
                CHATML_TURN,
                "message.reasoning_content is defined and message.reasoning_content is not none",
                "message.content.split('</think>')[-1].lstrip('\\n')",
                "message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1]"
                ".lstrip('\\n')",
                "loop.index0 > ns.last_query_index",
                "loop.last or (not loop.last and reasoning_content)",
                "'<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') "
                "+ '\\n</think>\\n\\n' + content.lstrip('\\n')",
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"},
               {26}},
    [LLAMA3] = {"Llama 3",
                {LLAMA3_TURNS "{% if add_generation_prompt %}" LLAMA3_PROMPT "{% endif %}"},
                {2}},
    [LLAMA3_ALWAYS] = {"Llama 3", {LLAMA3_TURNS LLAMA3_PROMPT}, {2}},
    [LLAMA2] = {"Llama 2",
                {"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
                 "{% set system_message = messages[0]['content'] %}{% else %}"
                 "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}",
                 "{% if " ALTERNATE " %}{{ raise_exception(",
                 "{% if loop.index0 == 0 and system_message != false %}{% set content = "
                 "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
                 "{% else %}{% set content = message['content'] %}{% endif %}",
                 "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
                 "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
                 "content.strip() + ' ' + eos_token }}{% endif %}"},
                {3}},
    [MISTRAL_V01] = {"Mistral",
                     {"{{ bos_token }}{% for message in messages %}{% if " ALTERNATE " %}"
                      "{{ raise_exception(",
                      "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
                      "' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                      "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception("},
                     {5}},
    [MISTRAL_V02] = {"Mistral",
                     {"{{ bos_token }}{% for message in messages %}{% if " ALTERNATE " %}"
                      "{{ raise_exception(",
                      "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + "
                      "' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                      "{{ message['content'] + eos_token }}{% else %}{{ raise_exception("},
                     {5}},
    [MISTRAL_V1SYS] = {"Mistral",
                       {"{% if messages[0]['role'] == 'system' %}{% set system_message = "
                        "messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
                        "{% else %}{% set loop_messages = messages %}{% endif %}"
                        "{{ bos_token }}{% for message in loop_messages %}{% if " ALTERNATE
                        " %}{{ raise_exception(",
                        "{% if message['role'] == 'user' %}{% if loop.first and system_message "
                        "is defined %}{{ ' [INST] ' + system_message + '\\n\\n' + "
                        "message['content'] + ' [/INST]' }}{% else %}{{ ' [INST] ' + "
                        "message['content'] + ' [/INST]' }}{% endif %}{% elif message['role'] == "
                        "'assistant' %}{{ ' ' + message['content'] + eos_token}}{% else %}"
                        "{{ raise_exception("},
                       {6}},
    [MISTRAL_V3] = {"Mistral",
                    {"{% if messages[0]['role'] == 'system' %}{% set system_message = "
                     "messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
                     "{% else %}{% set loop_messages = messages %}{% endif %}",
                     "{% for message in loop_messages %}{% if not (message.role == 'tool' or "
                     "message.role == 'tool_results' or (message.tool_calls is defined and "
                     "message.tool_calls is not none)) %}{% if (message['role'] == 'user') != "
                     "(ns.index % 2 == 0) %}{{ raise_exception(",
                     "{% if loop.last and system_message is defined %}{{ '[INST] ' + "
                     "system_message + '\\n\\n' + message['content'] + '[/INST]' }}{% else %}"
                     "{{ '[INST] ' + message['content'] + '[/INST]' }}{% endif %}",
                     "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content']|trim "
                     "+ eos_token}}",
                     "{{ bos_token }}{% for message in loop_messages %}{% if message['role'] == "
                     "'user' %}{% if tools is not none and (message == user_messages[-1]) %}"},
                    {24}},
    [ZEPHYR] = {"Zephyr",
                /* as it renders: the newline after each {% %} goes, the one after }} stays */
                {"{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
                 "{% elif message['role'] == 'system' %}"
                 "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
                 "{% elif message['role'] == 'assistant' %}"
                 "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}"
                 "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}\n"
                 "{% endif %}{% endfor %}"},
                {4}},
    [GEMMA] = {"Gemma",
               {"{% if messages[0]['role'] == 'system' %}{{ raise_exception(",
                "{% for message in messages %}{% if " ALTERNATE " %}{{ raise_exception(",
                "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
                "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' "
                "+ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"},
               {4, 5}},
    [GEMMA3] = {"Gemma 3",
                {"{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}"
                 "{%- if messages[0]['content'] is string -%}"
                 "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
                 "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
                 "{%- endif -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
                 "{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}"
                 "{%- endif -%}{%- for message in loop_messages -%}{% if " ALTERNATE " %}"
                 "{{ raise_exception(",
                 "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
                 "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
                 "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "
                 "\"\") }}{%- if message['content'] is string -%}"
                 "{{ message['content'] | trim }}{%- elif message['content'] is iterable -%}"
                 "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}"
                 "{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}"
                 "{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- else -%}"
                 "{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
                 "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
                 "{{'<start_of_turn>model\n'}}{%- endif -%}"},
                {9}},
};

/* The families, by the marker that gives them away, for the message of a refusal. */
static const struct {
    const char *marker, *family;
} families[] = {
    {"<|im_start|>", "ChatML"},       {"<|start_header_id|>", "Llama 3"},
    {"<<SYS>>", "Llama 2"},           {"[INST]", "Mistral"},
    {"<start_of_turn>", "Gemma"},     {"<|user|>", "Zephyr"},
};

static int count(const char *s, const char *what)
{
    int n = 0;
    for (const char *p = strstr(s, what); p; p = strstr(p + 1, what))
        n++;
    return n;
}

/* Whether the normalised template t has every needle of variant v (-ENOMEM on no memory). */
static int matches(const char *t, enum variant v)
{
    int n = count(t, "{{"), ok = 0;
    for (int k = 0; k < 3 && variants[v].n_outputs[k]; k++)
        ok |= n == variants[v].n_outputs[k];
    if (!ok)
        return 0;
    for (int k = 0; k < 12 && variants[v].needles[k]; k++) {
        const char *needle = variants[v].needles[k];
        char *nn = normalize(needle, needle[0] != '{');
        if (!nn)
            return -ENOMEM;
        ok = strstr(t, nn) != NULL;
        free(nn);
        if (!ok)
            return 0;
    }
    return 1;
}

/* ChatML's built-in system prompt: the text of a literal '<|im_start|>system\n...<|im_end|>\n'
 * written out whole, that the template prints when the first message is not a system one.
 * Returns 0 (*ret NULL: there is none), 1, or -ENOMEM. */
static int chatml_default_system(const char *t, char **ret)
{
    static const char head[] = "'<|im_start|>system\n";
    *ret = NULL;
    if (!strstr(t, "messages[0].role!='system'") && !strstr(t, "messages[0].role=='system'"))
        return 0;
    for (const char *p = strstr(t, head); p; p = strstr(p + 1, head)) {
        const char *a = p + strlen(head), *e = strstr(a, "<|im_end|>\n'");
        struct sbuf s = {0};
        bool whole = e && e > a;
        for (const char *q = a; whole && q < e; q++) {
            if (*q == '\'') {
                whole = false; /* not one literal */
                break;
            }
            if (*q == '\\')
                q++;
            putn(&s, q, 1);
        }
        if (s.oom)
            return -ENOMEM;
        if (whole) {
            *ret = s.p;
            return 1;
        }
        free(s.p);
    }
    return 0;
}

/* ==========================================================================================
 * Messages */

enum role { SYSTEM, USER, ASSISTANT };

struct msg {
    enum role role;
    const char *name;      /* "system", "user", "assistant" */
    char *text;            /* the content, its text parts joined with "\n" */
    json_t *parts;         /* the content when it is a list, else NULL (borrowed) */
    const char *reasoning; /* reasoning_content, if a string (borrowed) */
};

static void free_msgs(struct msg *m, size_t n)
{
    for (size_t i = 0; m && i < n; i++)
        free(m[i].text);
    free(m);
}

static int read_msgs(const json_t *messages, struct msg **ret, size_t *ret_n, struct ad_err *err)
{
    size_t n = json_array_size(messages), i;
    json_t *m;
    struct msg *out;

    if (!json_is_array(messages) || n == 0) {
        ad_err_set(err, -EINVAL, "'messages' must be a non-empty list of {role, content}");
        return -EINVAL;
    }
    out = calloc(n, sizeof(*out));
    if (!out)
        return -ENOMEM;
    json_array_foreach(messages, i, m) {
        struct msg *o = &out[i];
        const char *role = json_string_value(json_object_get(m, "role"));
        json_t *c = json_object_get(m, "content"), *tc = json_object_get(m, "tool_calls");
        json_t *rc = json_object_get(m, "reasoning_content");
        struct sbuf s = {0};

        if (role && !strcmp(role, "system")) {
            o->role = SYSTEM;
        } else if (role && !strcmp(role, "user")) {
            o->role = USER;
        } else if (role && !strcmp(role, "assistant")) {
            o->role = ASSISTANT;
        } else {
            ad_err_set(err, -EINVAL, "messages[%zu]: role must be system, user or assistant", i);
            goto einval;
        }
        o->name = role;
        if (json_array_size(tc) > 0) {
            ad_err_set(err, -ENOTSUP, "messages[%zu]: tool_calls are not supported", i);
            free_msgs(out, n);
            return -ENOTSUP;
        }
        if (rc && !json_is_null(rc)) {
            if (!json_is_string(rc) ||
                memchr(json_string_value(rc), '\0', json_string_length(rc))) {
                ad_err_set(err, -EINVAL, "messages[%zu]: reasoning_content must be a string", i);
                goto einval;
            }
            o->reasoning = json_string_value(rc);
        }
        if (json_is_string(c)) {
            if (memchr(json_string_value(c), '\0', json_string_length(c))) {
                ad_err_set(err, -EINVAL, "messages[%zu]: content has a NUL character", i);
                goto einval;
            }
            put(&s, json_string_value(c));
        } else if (json_is_array(c)) {
            size_t k;
            json_t *part;
            o->parts = c;
            put(&s, "");
            json_array_foreach(c, k, part) {
                const char *type = json_string_value(json_object_get(part, "type"));
                json_t *text = json_object_get(part, "text");
                if (!type || strcmp(type, "text")) {
                    ad_err_set(err, -ENOTSUP, "messages[%zu].content[%zu]: only parts of type "
                               "'text' are supported", i, k);
                    free(s.p);
                    free_msgs(out, n);
                    return -ENOTSUP;
                }
                if (!json_is_string(text) ||
                    memchr(json_string_value(text), '\0', json_string_length(text))) {
                    ad_err_set(err, -EINVAL, "messages[%zu].content[%zu]: 'text' must be a string",
                               i, k);
                    free(s.p);
                    goto einval;
                }
                if (k > 0)
                    put(&s, "\n");
                put(&s, json_string_value(text));
            }
        } else {
            ad_err_set(err, -EINVAL, "messages[%zu]: content must be a string or a list of text "
                       "parts", i);
            goto einval;
        }
        if (s.oom) {
            free(s.p);
            free_msgs(out, n);
            return -ENOMEM;
        }
        o->text = s.p;
    }
    *ret = out;
    *ret_n = n;
    return 0;
einval:
    free_msgs(out, n);
    return -EINVAL;
}

/* ==========================================================================================
 * Rendering, one function per template family. Each follows its template statement by
 * statement; a raise_exception of the template is a -EINVAL refusal with its reason. */

/* What follows the last message: the generation prompt (add_generation_prompt = true), what the
 * template prints with add_generation_prompt = false, or nothing at all (for ad_chat_segments: a
 * template that prints its generation prompt whatever the flag says still ends the turn before
 * it). Only LLAMA3_ALWAYS tells the last two apart. */
enum gen { GEN_PROMPT, GEN_NO_PROMPT, GEN_NOTHING };

struct chat {
    enum variant v;
    char *dflt; /* ChatML's built-in system prompt, or NULL */
    bool gemma_bos; /* Gemma's template prints bos_token */
    struct msg *m;
    size_t n_all; /* messages read */
    const char *bos, *eos;
    struct ad_err *err;
    /* one rendering: */
    struct sbuf out;
    size_t n; /* the first n messages */
    enum gen gen;
};

static int refuse(struct chat *c, const char *why)
{
    ad_err_set(c->err, -EINVAL, "the model's chat template refuses this conversation: %s", why);
    return -EINVAL;
}

/* (message.role == 'user') != (index % 2 == 0), over m[from..n) */
static int alternate(struct chat *c, size_t from, const char *why)
{
    for (size_t k = 0; from + k < c->n; k++)
        if ((c->m[from + k].role == USER) != (k % 2 == 0))
            return refuse(c, why);
    return 0;
}

static int render_chatml(struct chat *c, const char *dflt)
{
    for (size_t i = 0; i < c->n; i++) {
        if (i == 0 && dflt && c->m[0].role != SYSTEM) {
            put(&c->out, "<|im_start|>system\n");
            put(&c->out, dflt);
            put(&c->out, "<|im_end|>\n");
        }
        put(&c->out, "<|im_start|>");
        put(&c->out, c->m[i].name);
        put(&c->out, "\n");
        put(&c->out, c->m[i].text);
        put(&c->out, "<|im_end|>\n");
    }
    if (c->gen == GEN_PROMPT)
        put(&c->out, "<|im_start|>assistant\n");
    return 0;
}

static bool starts_ends(const char *s, const char *head, const char *tail)
{
    size_t n = strlen(s), h = strlen(head), t = strlen(tail);
    return n >= h && n >= t && !memcmp(s, head, h) && !memcmp(s + n - t, tail, t);
}

static int render_qwen3(struct chat *c)
{
    size_t last_query = c->n - 1;
    for (size_t k = c->n; k-- > 0;) {
        if (c->m[k].role == USER &&
            !starts_ends(c->m[k].text, "<tool_response>", "</tool_response>")) {
            last_query = k;
            break;
        }
    }
    if (c->m[0].role == SYSTEM) {
        put(&c->out, "<|im_start|>system\n");
        put(&c->out, c->m[0].text);
        put(&c->out, "<|im_end|>\n");
    }
    for (size_t i = 0; i < c->n; i++) {
        const char *s = c->m[i].text;
        if (c->m[i].role != ASSISTANT) {
            if (c->m[i].role == USER || i > 0) {
                put(&c->out, "<|im_start|>");
                put(&c->out, c->m[i].name);
                put(&c->out, "\n");
                put(&c->out, s);
                put(&c->out, "<|im_end|>\n");
            }
            continue;
        }
        /* content, and reasoning_content or the text of a <think> block */
        size_t len = strlen(s), ca = 0, cb = len, ra = 0, rb = 0;
        const char *r = "";
        if (c->m[i].reasoning) {
            r = c->m[i].reasoning;
            rb = strlen(r);
        } else if (strstr(s, "</think>")) {
            py_split_end(s, &ca, &cb, "</think>", true);
            py_strip(s, &ca, &cb, "\n", true, false);
            r = s;
            rb = len;
            py_split_end(s, &ra, &rb, "</think>", false);
            py_strip(s, &ra, &rb, "\n", false, true);
            py_split_end(s, &ra, &rb, "<think>", true);
            py_strip(s, &ra, &rb, "\n", true, false);
        }
        put(&c->out, "<|im_start|>assistant\n");
        if (i > last_query && (i == c->n - 1 || rb > ra)) {
            put(&c->out, "<think>\n");
            py_strip(r, &ra, &rb, "\n", true, true);
            putn(&c->out, r + ra, rb - ra);
            put(&c->out, "\n</think>\n\n");
            py_strip(s, &ca, &cb, "\n", true, false);
        }
        putn(&c->out, s + ca, cb - ca);
        put(&c->out, "<|im_end|>\n");
    }
    if (c->gen == GEN_PROMPT)
        put(&c->out, "<|im_start|>assistant\n");
    return 0;
}

static int render_llama3(struct chat *c)
{
    for (size_t i = 0; i < c->n; i++) {
        if (i == 0)
            put(&c->out, c->bos);
        put(&c->out, "<|start_header_id|>");
        put(&c->out, c->m[i].name);
        put(&c->out, "<|end_header_id|>\n\n");
        put_stripped(&c->out, c->m[i].text, NULL, true, true);
        put(&c->out, "<|eot_id|>");
    }
    if (c->gen == GEN_PROMPT || (c->v == LLAMA3_ALWAYS && c->gen == GEN_NO_PROMPT))
        put(&c->out, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return 0;
}

static int render_llama2(struct chat *c)
{
    size_t from = c->m[0].role == SYSTEM;
    int rc = alternate(c, from, "roles must alternate user/assistant/user/assistant/...");
    if (rc < 0)
        return rc;
    for (size_t i = from; i < c->n; i++) {
        struct sbuf content = {0};
        if (i == from && from) {
            put(&content, "<<SYS>>\n");
            put(&content, c->m[0].text);
            put(&content, "\n<</SYS>>\n\n");
        }
        put(&content, c->m[i].text);
        if (content.oom) {
            free(content.p);
            return -ENOMEM;
        }
        if (c->m[i].role == USER) {
            put(&c->out, c->bos);
            put(&c->out, "[INST] ");
            put_stripped(&c->out, content.p, NULL, true, true);
            put(&c->out, " [/INST]");
        } else if (c->m[i].role == ASSISTANT) {
            put(&c->out, " ");
            put_stripped(&c->out, content.p, NULL, true, true);
            put(&c->out, " ");
            put(&c->out, c->eos);
        }
        free(content.p);
    }
    return 0;
}

static int render_mistral(struct chat *c, enum variant v)
{
    bool sys = (v == MISTRAL_V1SYS || v == MISTRAL_V3) && c->m[0].role == SYSTEM;
    size_t from = sys;
    int rc = alternate(c, from, v == MISTRAL_V01 || v == MISTRAL_V02
                                    ? "roles must alternate user/assistant/user/assistant/..."
                                    : "after the optional system message, roles must alternate "
                                      "user/assistant/user/assistant/...");
    if (rc < 0)
        return rc;
    put(&c->out, c->bos);
    for (size_t i = from; i < c->n; i++) {
        const char *s = c->m[i].text;
        if (c->m[i].role == SYSTEM)
            return refuse(c, v == MISTRAL_V01 || v == MISTRAL_V02
                                 ? "only user and assistant roles are supported"
                                 : "a system message is supported only as the first message");
        if (c->m[i].role == USER) {
            bool with_sys = sys && (v == MISTRAL_V3 ? i == c->n - 1 : i == from);
            put(&c->out, v == MISTRAL_V1SYS ? " [INST] " : "[INST] ");
            if (with_sys) {
                put(&c->out, c->m[0].text);
                put(&c->out, "\n\n");
            }
            put(&c->out, s);
            put(&c->out, v == MISTRAL_V3 ? "[/INST]" : " [/INST]");
        } else if (v == MISTRAL_V3) {
            put(&c->out, " ");
            put_stripped(&c->out, s, NULL, true, true);
            put(&c->out, c->eos);
        } else {
            put(&c->out, v == MISTRAL_V1SYS ? " " : "");
            put(&c->out, s);
            put(&c->out, c->eos);
            put(&c->out, v == MISTRAL_V01 ? " " : "");
        }
    }
    return 0;
}

static int render_zephyr(struct chat *c)
{
    for (size_t i = 0; i < c->n; i++) {
        put(&c->out, "<|");
        put(&c->out, c->m[i].name);
        put(&c->out, "|>\n");
        put(&c->out, c->m[i].text);
        put(&c->out, c->eos);
        put(&c->out, "\n");
    }
    if (c->gen == GEN_PROMPT)
        put(&c->out, "<|assistant|>\n");
    return 0;
}

static int render_gemma(struct chat *c, enum variant v, bool bos)
{
    size_t from = 0;
    struct sbuf prefix = {0};
    int rc = 0;

    if (bos)
        put(&c->out, c->bos);
    if (c->m[0].role == SYSTEM) {
        if (v == GEMMA)
            return refuse(c, "the system role is not supported");
        from = 1;
        if (c->m[0].parts) {
            json_t *text = json_object_get(json_array_get(c->m[0].parts, 0), "text");
            if (!text) {
                ad_err_set(c->err, -EINVAL, "messages[0]: the system content is an empty list");
                return -EINVAL;
            }
            put(&prefix, json_string_value(text));
        } else {
            put(&prefix, c->m[0].text);
        }
        put(&prefix, "\n\n");
    }
    rc = alternate(c, from, "roles must alternate user/assistant/user/assistant/...");
    for (size_t i = from; rc == 0 && i < c->n; i++) {
        put(&c->out, "<start_of_turn>");
        put(&c->out, c->m[i].role == ASSISTANT ? "model" : c->m[i].name);
        put(&c->out, "\n");
        if (i == from && prefix.p)
            put(&c->out, prefix.p);
        if (v == GEMMA3 && c->m[i].parts) {
            size_t k;
            json_t *part;
            json_array_foreach(c->m[i].parts, k, part)
                put_stripped(&c->out, json_string_value(json_object_get(part, "text")), NULL,
                             true, true);
        } else {
            put_stripped(&c->out, c->m[i].text, NULL, true, true);
        }
        put(&c->out, "<end_of_turn>\n");
    }
    if (rc == 0 && c->gen == GEN_PROMPT)
        put(&c->out, "<start_of_turn>model\n");
    rc = rc == 0 && prefix.oom ? -ENOMEM : rc;
    free(prefix.p);
    return rc;
}

/* ==========================================================================================
 * Rendering: the template is recognised and the messages read once, then any prefix of the
 * conversation is rendered with any ending. */

static void chat_fini(struct chat *c)
{
    free(c->out.p);
    free_msgs(c->m, c->n_all);
    free(c->dflt);
}

static int chat_init(struct chat *c, const char *tmpl, const char *bos, const char *eos,
                     const json_t *messages, struct ad_err *err)
{
    char *t = normalize(tmpl, false);
    int rc = t ? 0 : -ENOMEM;

    *c = (struct chat){.v = N_VARIANTS, .bos = bos ? bos : "", .eos = eos ? eos : "", .err = err};
    for (int k = 0; rc == 0 && k < N_VARIANTS; k++) {
        rc = matches(t, (enum variant)k);
        if (rc > 0) {
            c->v = (enum variant)k;
            rc = 0;
            break;
        }
    }
    if (rc == 0 && c->v == CHATML && chatml_default_system(t, &c->dflt) < 0)
        rc = -ENOMEM;
    if (rc == 0 && c->v == CHATML && !c->dflt && (count(t, "{{") != 2 || strstr(t, "system")))
        c->v = N_VARIANTS; /* a system prompt adapterd did not find */
    if (rc == 0 && c->v == N_VARIANTS) {
        const char *family = NULL;
        for (size_t k = 0; k < sizeof(families) / sizeof(families[0]) && !family; k++)
            if (strstr(tmpl, families[k].marker))
                family = families[k].family;
        if (family)
            rc = ad_err_set(err, -ENOTSUP, "the model's chat template is not supported: it looks "
                            "like a %s template, but not one of the variants adapterd renders "
                            "exactly", family);
        else
            rc = ad_err_set(err, -ENOTSUP, "the model's chat template is not supported: adapterd "
                            "renders ChatML, Llama 2, Llama 3, Mistral, Zephyr and Gemma "
                            "templates");
    }
    c->gemma_bos = t && strstr(t, "{{bos_token}}") != NULL;
    free(t);
    if (rc == 0)
        rc = read_msgs(messages, &c->m, &c->n_all, err);
    if (rc == -ENOMEM)
        ad_err_set(err, -ENOMEM, "out of memory");
    return rc;
}

/* Renders the first n messages (1 <= n <= c->n_all) into c->out, replacing what it held. */
static int chat_run(struct chat *c, size_t n, enum gen gen)
{
    int rc = 0;

    c->out.len = 0;
    c->out.oom = false;
    put(&c->out, ""); /* an empty rendering is "" (Llama 2 with only a system message) */
    c->n = n;
    c->gen = gen;
    switch (c->v) {
    case CHATML:
        rc = render_chatml(c, c->dflt);
        break;
    case QWEN3:
        rc = render_qwen3(c);
        break;
    case LLAMA3:
    case LLAMA3_ALWAYS:
        rc = render_llama3(c);
        break;
    case LLAMA2:
        rc = render_llama2(c);
        break;
    case MISTRAL_V01:
    case MISTRAL_V02:
    case MISTRAL_V1SYS:
    case MISTRAL_V3:
        rc = render_mistral(c, c->v);
        break;
    case ZEPHYR:
        rc = render_zephyr(c);
        break;
    case GEMMA:
    case GEMMA3:
        rc = render_gemma(c, c->v, c->gemma_bos);
        break;
    case N_VARIANTS:
        assert(!"chat_run without a template");
        break;
    }
    if (rc == 0 && c->out.oom)
        rc = -ENOMEM;
    if (rc == -ENOMEM)
        ad_err_set(c->err, -ENOMEM, "out of memory");
    return rc;
}

/* ==========================================================================================
 * ad_chat_render */

int ad_chat_render(const char *tmpl, const char *bos, const char *eos,
                   const struct json_t *messages, bool add_generation_prompt, char **ret_text,
                   struct ad_err *err)
{
    struct chat c;
    int rc = chat_init(&c, tmpl, bos, eos, messages, err);

    if (rc == 0)
        rc = chat_run(&c, c.n_all, add_generation_prompt ? GEN_PROMPT : GEN_NO_PROMPT);
    if (rc == 0) {
        *ret_text = c.out.p;
        c.out.p = NULL;
    }
    chat_fini(&c);
    return rc;
}

/* ==========================================================================================
 * ad_chat_segments. For assistant message k, p = the first k messages rendered with the
 * generation prompt (what a server gives the model before it answers) and q = the first k + 1
 * rendered without one: the turn is q less its prefix p, i.e. what the model writes, ended by what
 * the template writes to close the turn (<|im_end|>\n, <|eot_id|>, </s>, <end_of_turn>\n),
 * never the next turn's header. q must be a prefix of the whole rendering and p of q; a template
 * that renders earlier turns differently once later ones follow (Qwen3 drops the <think> block of
 * all but the last turns, Mistral v0.3 moves the system prompt into the last user turn) cannot
 * mark them this way and is refused rather than guessed at. */

static int cannot_mark(struct ad_err *err, size_t k, const char *why)
{
    return ad_err_set(err, -ENOTSUP, "the chat template cannot mark assistant turns: "
                      "messages[%zu]: %s", k, why);
}

int ad_chat_segments(const char *tmpl, const char *bos, const char *eos,
                     const struct json_t *messages, char **ret_text,
                     struct ad_chat_turn **ret_turns, size_t *ret_n_turns, struct ad_err *err)
{
    struct chat c;
    struct ad_chat_turn *turns = NULL;
    char *all = NULL;
    size_t n_all = 0, n_turns = 0, end = 0;
    int rc = chat_init(&c, tmpl, bos, eos, messages, err);

    if (rc == 0)
        rc = chat_run(&c, c.n_all, GEN_NO_PROMPT);
    if (rc == 0) {
        all = c.out.p;
        n_all = c.out.len;
        c.out = (struct sbuf){0};
        for (size_t k = 0; k < c.n_all; k++)
            n_turns += c.m[k].role == ASSISTANT;
        turns = calloc(n_turns ? n_turns : 1, sizeof(*turns));
        if (!turns)
            rc = ad_err_set(err, -ENOMEM, "out of memory");
        n_turns = 0;
    }
    for (size_t k = 0; rc == 0 && k < c.n_all; k++) {
        size_t p_len;
        if (c.m[k].role != ASSISTANT)
            continue;
        if (k == 0) {
            rc = cannot_mark(err, k, "an assistant turn with no message before it");
            break;
        }
        rc = chat_run(&c, k, GEN_PROMPT);
        if (rc < 0)
            break;
        p_len = c.out.len;
        if (p_len < end || p_len > n_all || memcmp(c.out.p, all, p_len)) {
            rc = cannot_mark(err, k, "the conversation up to it, with the generation prompt, "
                             "does not begin the whole rendering");
            break;
        }
        rc = chat_run(&c, k + 1, GEN_NOTHING);
        if (rc < 0)
            break;
        if (c.out.len < p_len || c.out.len > n_all || memcmp(c.out.p, all, c.out.len)) {
            rc = cannot_mark(err, k, "the conversation up to its end does not begin the whole "
                             "rendering (the template renders it differently once later "
                             "messages follow)");
            break;
        }
        end = c.out.len;
        turns[n_turns++] = (struct ad_chat_turn){.message = k, .start = p_len, .end = end};
    }
    if (rc == 0) {
        *ret_text = all;
        *ret_turns = turns;
        *ret_n_turns = n_turns;
        all = NULL;
        turns = NULL;
    }
    free(all);
    free(turns);
    chat_fini(&c);
    return rc;
}
