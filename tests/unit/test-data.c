/* Datasets (src/train/data.c) on two small tokenizers made here: a byte-level BPE with ChatML
 * (special tokens <|im_start|> <|im_end|>, EOS <|endoftext|>, a post-processor that prepends
 * <|bos|>) and a SentencePiece-style BPE (a normalizer that prepends "▁", byte fallback, <s>
 * prepended) with the Llama 2 chat template, where pieces encoded alone differ from the whole.
 *   - every bad line is refused with its line number and the field (ad_data_check_line, and
 *     through ad_dataset_load), and a file with one bad line loads nothing;
 *   - prompt/completion, text and messages (system, several turns, weights 0 and 1, text parts)
 *     give the tokens and targets expected from the tokenizer's own encoding of the pieces;
 *   - truncation at max_seq_len (counted; an example left with nothing to learn dropped),
 *     packing into sequences of max_seq_len with the targets carried along;
 *   - a BOM, CRLF and blank lines; no chat template; a template that cannot mark the turns. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../check.h"
#include "adapterd/tokenizer.h"
#include "adapterd/train.h"
#include "adapterd/util.h"

#include <jansson.h>

static char tmpdir[64];

/* ==========================================================================================
 * Tokenizers */

static const char CHATML[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* Llama-2-chat's template, verbatim (tests/chat/templates/llama2-chat.json) */
static const char LLAMA2[] =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + "
    "system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = "
    "message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
    "content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

/* GPT-2's printable stand-in for each byte (bytes_to_unicode) as UTF-8. */
static void byte_char(int b, char out[3])
{
    int n = 0, cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))) {
        for (int k = 0; k < b; k++)
            n += !((k >= 33 && k <= 126) || (k >= 161 && k <= 172) || (k >= 174 && k <= 255));
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        out[1] = 0;
    } else {
        out[0] = (char)(0xc0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3f));
        out[2] = 0;
    }
}

static json_t *added(int id, const char *s)
{
    return json_pack("{s:i, s:s, s:b, s:b}", "id", id, "content", s, "special", 1,
                     "normalized", 0);
}

static struct ad_tokenizer *load(json_t *tj, json_t *cfg)
{
    char *a = json_dumps(tj, JSON_COMPACT), *b = cfg ? json_dumps(cfg, JSON_COMPACT) : NULL;
    struct ad_tokenizer *tok = NULL;
    struct ad_err err = {0};
    int rc = ad_tokenizer_load_json(a, strlen(a), b, b ? strlen(b) : 0, &tok, &err);
    if (rc < 0)
        fprintf(stderr, "tokenizer: %s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    free(a);
    free(b);
    json_decref(tj);
    json_decref(cfg);
    return tok;
}

/* Byte-level BPE: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>, 3 <|bos|>, then the 256 byte
 * characters, then a few merges. template: the chat template (NULL: none). */
static struct ad_tokenizer *chatml_tokenizer(const char *tmpl)
{
    static const char *merges[][2] = {{"H", "e"}, {"l", "l"}, {"He", "ll"}, {"Hell", "o"},
                                      {"\xc4\xa0", "t"}, {"a", "s"}, {"i", "s"}, {"\xc4\xa0", "a"}};
    json_t *vocab = json_object(), *m = json_array();
    int id = 4;
    char c[3];

    json_object_set_new(vocab, "<|endoftext|>", json_integer(0));
    json_object_set_new(vocab, "<|im_start|>", json_integer(1));
    json_object_set_new(vocab, "<|im_end|>", json_integer(2));
    json_object_set_new(vocab, "<|bos|>", json_integer(3));
    for (int b = 0; b < 256; b++) {
        byte_char(b, c);
        json_object_set_new(vocab, c, json_integer(id++));
    }
    for (size_t k = 0; k < sizeof(merges) / sizeof(merges[0]); k++) {
        char joined[16];
        snprintf(joined, sizeof(joined), "%s%s", merges[k][0], merges[k][1]);
        json_object_set_new(vocab, joined, json_integer(id++));
        json_array_append_new(m, json_pack("[s, s]", merges[k][0], merges[k][1]));
    }
    json_t *tj = json_pack(
        "{s:s, s:[o, o, o, o], s:n, s:{s:s, s:b, s:b}, "
        "s:{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:{s:{s:s, s:[i], s:[s]}}}, "
        "s:{s:s}, s:{s:s, s:o, s:o}}",
        "version", "1.0", "added_tokens", added(0, "<|endoftext|>"), added(1, "<|im_start|>"),
        added(2, "<|im_end|>"), added(3, "<|bos|>"), "normalizer", "pre_tokenizer", "type",
        "ByteLevel", "add_prefix_space", 0, "use_regex", 1, "post_processor", "type",
        "TemplateProcessing", "single", "SpecialToken", "id", "<|bos|>", "type_id", 0, "Sequence",
        "id", "A", "type_id", 0, "special_tokens", "<|bos|>", "id", "<|bos|>", "ids", 3, "tokens",
        "<|bos|>", "decoder", "type", "ByteLevel", "model", "type", "BPE", "vocab", vocab,
        "merges", m);
    CHECK(tj != NULL);
    json_t *cfg = json_pack("{s:s, s:s}", "bos_token", "<|bos|>", "eos_token", "<|endoftext|>");
    if (tmpl)
        json_object_set_new(cfg, "chat_template", json_string(tmpl));
    return load(tj, cfg);
}

/* SentencePiece-style: 0 <unk>, 1 <s>, 2 </s>, bytes <0x00>.. from 3, "▁" 259, letters. */
static struct ad_tokenizer *spm_tokenizer(void)
{
    json_t *vocab = json_object(), *m = json_array();
    char name[8];
    int id = 3;

    json_object_set_new(vocab, "<unk>", json_integer(0));
    json_object_set_new(vocab, "<s>", json_integer(1));
    json_object_set_new(vocab, "</s>", json_integer(2));
    for (int b = 0; b < 256; b++) {
        snprintf(name, sizeof(name), "<0x%02X>", b);
        json_object_set_new(vocab, name, json_integer(id++));
    }
    json_object_set_new(vocab, "\xe2\x96\x81", json_integer(id++));
    for (char ch = 'a'; ch <= 'z'; ch++) {
        char s[2] = {ch, 0};
        json_object_set_new(vocab, s, json_integer(id++));
    }
    json_object_set_new(vocab, "\xe2\x96\x81h", json_integer(id++));
    json_array_append_new(m, json_pack("[s, s]", "\xe2\x96\x81", "h"));
    json_t *tj = json_pack(
        "{s:[o, o, o], s:{s:s, s:[{s:s, s:s}, {s:s, s:{s:s}, s:s}]}, s:n, "
        "s:{s:s, s:[{s:{s:s, s:i}}, {s:{s:s, s:i}}], s:{s:{s:s, s:[i], s:[s]}}}, "
        "s:{s:s, s:s, s:b, s:b, s:o, s:o}}",
        "added_tokens", added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), "normalizer",
        "type", "Sequence", "normalizers", "type", "Prepend", "prepend", "\xe2\x96\x81", "type",
        "Replace", "pattern", "String", " ", "content", "\xe2\x96\x81", "pre_tokenizer",
        "post_processor", "type", "TemplateProcessing", "single", "SpecialToken", "id", "<s>",
        "type_id", 0, "Sequence", "id", "A", "type_id", 0, "special_tokens", "<s>", "id", "<s>",
        "ids", 1, "tokens", "<s>", "model", "type", "BPE", "unk_token", "<unk>", "byte_fallback",
        1, "fuse_unk", 1, "vocab", vocab, "merges", m);
    CHECK(tj != NULL);
    return load(tj, json_pack("{s:s, s:s, s:s}", "bos_token", "<s>", "eos_token", "</s>",
                              "chat_template", LLAMA2));
}

/* ==========================================================================================
 * Expectations: pieces encoded by the tokenizer itself, each a loss piece or not */

struct expect {
    int32_t ids[4096];
    bool loss[4096];
    int n;
};

static void piece(struct expect *x, const struct ad_tokenizer *tok, const char *s, bool special,
                  bool loss)
{
    int32_t *ids;
    size_t n;
    struct ad_err err;
    CHECK_INT(ad_tokenizer_encode(tok, s, strlen(s), special, &ids, &n, &err), ==, 0);
    CHECK(x->n + (int)n <= 4096);
    for (size_t i = 0; i < n; i++) {
        x->ids[x->n] = ids[i];
        x->loss[x->n++] = loss;
    }
    free(ids);
}

static void token(struct expect *x, int32_t id, bool loss)
{
    x->ids[x->n] = id;
    x->loss[x->n++] = loss;
}

/* e is x's tokens [from, from + e->n_tokens) with targets: the next token where it is a loss
 * token and still in the same example of x (end: one past the example's last token). */
static void check_example(const struct ad_example *e, const struct expect *x, int from, int end)
{
    int n_targets = 0;
    for (int i = 0; i < e->n_tokens; i++) {
        int j = from + i;
        int32_t want = j + 1 < end && x->loss[j + 1] ? x->ids[j + 1] : -1;
        CHECK_INT(e->tokens[i], ==, x->ids[j]);
        if (e->targets[i] != want)
            fprintf(stderr, "token %d (of %d): target %d, want %d\n", i, e->n_tokens,
                    e->targets[i], want);
        CHECK_INT(e->targets[i], ==, want);
        n_targets += want >= 0;
    }
    CHECK_INT(e->n_targets, ==, n_targets);
}

/* ==========================================================================================
 * Files */

static const char *write_file(const char *name, const char *text)
{
    static char path[128];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    CHECK_INT(ad_write_file(path, text, strlen(text)), ==, 0);
    return path;
}

static struct ad_dataset *load_ok(const char *text, const struct ad_tokenizer *tok, int max_len,
                                  bool packing)
{
    struct ad_data_opts o = {.max_seq_len = max_len, .packing = packing};
    struct ad_dataset *d = NULL;
    struct ad_err err = {0};
    int rc = ad_dataset_load(write_file("ok.jsonl", text), tok, &o, &d, &err);
    if (rc < 0)
        fprintf(stderr, "load: %s\n", err.msg);
    CHECK_INT(rc, ==, 0);
    return d;
}

static void load_fails(const char *text, const struct ad_tokenizer *tok, int code,
                       const char *why)
{
    struct ad_data_opts o = {.max_seq_len = 4096};
    struct ad_dataset *d = (struct ad_dataset *)&o; /* must stay as it is */
    struct ad_err err = {0};
    CHECK_INT(ad_dataset_load(write_file("bad.jsonl", text), tok, &o, &d, &err), ==, code);
    CHECK(d == (struct ad_dataset *)&o);
    CHECK_INT(err.code, ==, code);
    CHECK_CONTAINS(err.msg, why);
}

/* ==========================================================================================
 * Bad lines */

static void bad(const char *line, const char *why)
{
    struct ad_err err = {0};
    CHECK_INT(ad_data_check_line(line, strlen(line), 7, &err), ==, -EINVAL);
    CHECK_INT(err.code, ==, -EINVAL);
    if (strncmp(err.msg, "line 7: ", 8) || !strstr(err.msg, why)) {
        fprintf(stderr, "'%s': '%s' lacks 'line 7: ...%s'\n", line, err.msg, why);
        abort();
    }
}

static void good(const char *line)
{
    struct ad_err err = {0};
    int rc = ad_data_check_line(line, strlen(line), 1, &err);
    if (rc < 0)
        fprintf(stderr, "'%s': %s\n", line, err.msg);
    CHECK_INT(rc, ==, 0);
}

static void test_check_line(void)
{
    good("{\"prompt\": \"a\", \"completion\": \"b\"}");
    good("{\"text\": \"x\", \"id\": 12}"); /* other keys are ignored */
    good("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
         "\"content\": [{\"type\": \"text\", \"text\": \"a\"}], \"weight\": 1}]}");
    good("{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", "
         "\"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"weight\": 0}, "
         "{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": "
         "\"a\"}]}");
    good("   \t\r");
    good("");

    bad("{\"prompt\": ", "not valid JSON");
    bad("[1, 2]", "must be a JSON object");
    bad("\"text\"", "not valid JSON"); /* jansson wants an object or array at the top */
    bad("{}", "has none of 'messages', 'prompt' and 'completion', 'text'");
    bad("{\"text\": \"a\", \"messages\": []}", "more than one of");
    bad("{\"text\": \"a\", \"prompt\": \"p\", \"completion\": \"c\"}", "more than one of");
    bad("{\"text\": \"a\", \"text\": \"b\"}", "duplicate");
    bad("{\"prompt\": \"a\"}", "'completion' is missing");
    bad("{\"completion\": \"a\"}", "'prompt' is missing");
    bad("{\"prompt\": [{\"role\": \"user\", \"content\": \"a\"}], \"completion\": \"b\"}",
        "'prompt' and 'completion' must be strings");
    bad("{\"prompt\": \"\", \"completion\": \"b\"}", "'prompt' is empty");
    bad("{\"prompt\": \"a\", \"completion\": 3}", "'completion' must be a string");
    bad("{\"text\": 3}", "'text' must be a string");
    bad("{\"text\": \"\"}", "'text' is empty");
    bad("{\"text\": \"a\\u0000b\"}", "not valid JSON");
    bad("{\"messages\": {}}", "'messages' must be a list");
    bad("{\"messages\": []}", "'messages' is empty");
    bad("{\"messages\": [3]}", "'messages'[0] must be an object");
    bad("{\"messages\": [{\"content\": \"a\"}]}", "'messages'[0].role is missing");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"tool\", "
        "\"content\": \"a\"}]}",
        "'messages'[1].role must be system, user or assistant");
    bad("{\"messages\": [{\"role\": 1, \"content\": \"a\"}]}",
        "'messages'[0].role must be system, user or assistant");
    bad("{\"messages\": [{\"role\": \"user\"}]}", "'messages'[0].content is missing");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": 5}]}",
        "'messages'[0].content must be a string");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"\"}]}",
        "'messages'[0].content is empty");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": []}]}",
        "'messages'[0].content is an empty list");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\"}]}]}",
        "'messages'[0].content[0] must be {\"type\": \"text\"");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}",
        "'messages'[0].content[0].text must be a string");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": "
        "\"\"}]}]}",
        "'messages'[0].content[0].text is empty");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"weight\": 2}]}",
        "'messages'[1].weight must be 0 or 1");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"weight\": \"1\"}]}",
        "'messages'[1].weight must be 0 or 1");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"weight\": 1.0}]}",
        "'messages'[1].weight must be 0 or 1");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\", \"weight\": 1}, {\"role\": "
        "\"assistant\", \"content\": \"a\"}]}",
        "'messages'[0].weight is only for assistant messages");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"tool_calls\": []}]}",
        "'messages'[1]: tool calls are not supported");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"reasoning_content\": 1}]}",
        "'messages'[1].reasoning_content must be a string");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}], \"tools\": []}",
        "'tools' are not supported");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}", "no assistant turn to learn");
    bad("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\", \"weight\": 0}]}",
        "no assistant turn to learn");
    bad("{\"text\": \"\xff\"}", "invalid UTF-8 at byte 11");
    bad("{\"text\": \"\xc0\xaf\"}", "invalid UTF-8 at byte 11");           /* overlong '/' */
    bad("{\"text\": \"\xed\xa0\x80\"}", "invalid UTF-8 at byte 11");       /* a surrogate */
    bad("{\"text\": \"\xf4\x90\x80\x80\"}", "invalid UTF-8 at byte 11");   /* past U+10FFFF */
    bad("{\"text\": \"ok \xe2\x82\"}", "invalid UTF-8 at byte 14");        /* cut short */

    /* too many messages, and a line over 1 MiB */
    size_t cap = 300 * 64 + 64;
    char *s = malloc(cap), *p = s;
    p += snprintf(p, cap, "{\"messages\": [");
    for (int k = 0; k < 257; k++)
        p += snprintf(p, cap - (size_t)(p - s), "%s{\"role\": \"%s\", \"content\": \"m\"}",
                      k ? ", " : "", k % 2 ? "assistant" : "user");
    snprintf(p, cap - (size_t)(p - s), "]}");
    bad(s, "'messages' has 257 messages, more than 256");
    free(s);
    size_t big = (1u << 20) + 1;
    s = malloc(big + 1);
    memset(s, ' ', big);
    memcpy(s, "{\"text\": \"x\"}", 13);
    s[big] = 0;
    bad(s, "longer than 1048576 bytes");
    free(s);
    printf("ok check_line\n");
}

/* ==========================================================================================
 * Formats */

static void test_prompt_completion_and_text(const struct ad_tokenizer *tok)
{
    struct expect a = {0}, b = {0}, c = {0};
    int32_t eos = ad_tokenizer_eos_id(tok);
    struct ad_dataset *d = load_ok("{\"prompt\": \"Q: is it?\", \"completion\": \" Hello\"}\n"
                                   "{\"text\": \"Hello as is\"}\n"
                                   "{\"prompt\": \"x\", \"completion\": \"y<|endoftext|>\"}\n",
                                   tok, 4096, false);
    /* the prompt with add_special_tokens (<|bos|> first), the completion without, EOS */
    piece(&a, tok, "Q: is it?", true, false);
    CHECK_INT(a.ids[0], ==, ad_tokenizer_bos_id(tok));
    piece(&a, tok, " Hello", false, true);
    token(&a, eos, true);
    /* text: with add_special_tokens, EOS, loss on every token after the first */
    piece(&c, tok, "Hello as is", true, true);
    c.loss[0] = false;
    token(&c, eos, true);
    /* a completion that ends with the EOS gets no second one */
    piece(&b, tok, "x", true, false);
    piece(&b, tok, "y<|endoftext|>", false, true);
    CHECK_INT(b.ids[b.n - 1], ==, eos);

    CHECK_INT(d->n, ==, 3);
    check_example(&d->ex[0], &a, 0, a.n);
    CHECK_INT(d->ex[0].n_tokens, ==, a.n);
    check_example(&d->ex[1], &c, 0, c.n);
    CHECK_INT(d->ex[1].n_tokens, ==, c.n);
    check_example(&d->ex[2], &b, 0, b.n);
    CHECK_INT(d->ex[2].n_tokens, ==, b.n);
    CHECK_INT(d->ex[0].targets[d->ex[0].n_tokens - 1], ==, -1);
    CHECK_INT(d->n_tokens, ==, a.n + b.n + c.n);
    CHECK_INT(d->n_targets, ==, d->ex[0].n_targets + d->ex[1].n_targets + d->ex[2].n_targets);
    CHECK_INT(d->n_truncated, ==, 0);
    ad_dataset_free(d);
    printf("ok prompt/completion, text\n");
}

static void test_messages(const struct ad_tokenizer *tok)
{
    struct expect x = {0}, y = {0};
    struct ad_dataset *d = load_ok(
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", "
        "\"content\": \"Hello\"}, {\"role\": \"assistant\", \"content\": \"Hello as is\"}, "
        "{\"role\": \"user\", \"content\": \"more\"}, {\"role\": \"assistant\", \"content\": "
        "\"no\", \"weight\": 0}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", "
        "\"text\": \"is\"}, {\"type\": \"text\", \"text\": \"it\"}]}, {\"role\": \"assistant\", "
        "\"content\": [{\"type\": \"text\", \"text\": \"it is\"}], \"weight\": 1}]}\n"
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
        "\"content\": \"a\"}]}\n",
        tok, 4096, false);

    /* no BOS: the template writes what it wants; the turns end with <|im_end|>\n */
    piece(&x, tok, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                   "<|im_start|>assistant\n", false, false);
    piece(&x, tok, "Hello as is<|im_end|>\n", false, true);
    piece(&x, tok, "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n", false, false);
    piece(&x, tok, "no<|im_end|>\n", false, false); /* weight 0 */
    piece(&x, tok, "<|im_start|>user\nis\nit<|im_end|>\n<|im_start|>assistant\n", false, false);
    piece(&x, tok, "it is<|im_end|>\n", false, true);
    piece(&y, tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", false, false);
    piece(&y, tok, "a<|im_end|>\n", false, true);

    CHECK_INT(d->n, ==, 2);
    CHECK_INT(d->ex[0].n_tokens, ==, x.n);
    check_example(&d->ex[0], &x, 0, x.n);
    CHECK_INT(d->ex[1].n_tokens, ==, y.n);
    check_example(&d->ex[1], &y, 0, y.n);
    /* the target of the last header token is the answer's first token; <|im_end|> is learnt */
    CHECK(d->ex[1].targets[y.n - 3] == y.ids[y.n - 2] && y.ids[y.n - 2] == 2);
    ad_dataset_free(d);
    printf("ok messages\n");
}

/* Llama 2 on the SentencePiece tokenizer: a piece encoded alone gets a "▁" of its own, so the
 * tokens are the whole rendering's, cut where the text before each turn ends. */
static void test_whole_text_tokens(const struct ad_tokenizer *spm)
{
    static const char text[] = "<s>[INST] <<SYS>>\nbe short\n<</SYS>>\n\nhi [/INST] hello </s>"
                               "<s>[INST] more [/INST] no </s>";
    static const char *const cuts[] = {"<s>[INST] <<SYS>>\nbe short\n<</SYS>>\n\nhi [/INST]",
                                       "<s>[INST] <<SYS>>\nbe short\n<</SYS>>\n\nhi [/INST] hello "
                                       "</s>",
                                       "<s>[INST] <<SYS>>\nbe short\n<</SYS>>\n\nhi [/INST] hello "
                                       "</s><s>[INST] more [/INST]"};
    struct expect whole = {0}, alone = {0}, pc = {0};
    size_t at[4];
    struct ad_dataset *d = load_ok(
        "{\"messages\": [{\"role\": \"system\", \"content\": \"be short\"}, {\"role\": \"user\", "
        "\"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}, {\"role\": "
        "\"user\", \"content\": \"more\"}, {\"role\": \"assistant\", \"content\": \"no\"}]}\n"
        "{\"prompt\": \"question\", \"completion\": \" hello\"}\n",
        spm, 4096, false);

    piece(&whole, spm, text, false, false);
    /* the premise: encoded alone, the answer starts otherwise than within the whole */
    piece(&alone, spm, " hello </s>", false, true);
    for (int k = 0; k < 3; k++) {
        struct expect p = {0};
        piece(&p, spm, cuts[k], false, false);
        CHECK(!memcmp(p.ids, whole.ids, (size_t)p.n * sizeof(int32_t)));
        at[k] = (size_t)p.n;
    }
    at[3] = (size_t)whole.n;
    bool differs = alone.n != (int)(at[1] - at[0]) ||
                   memcmp(alone.ids, whole.ids + at[0], (size_t)alone.n * sizeof(int32_t));
    CHECK(differs);
    for (size_t i = at[0]; i < at[1]; i++)
        whole.loss[i] = true;
    for (size_t i = at[2]; i < at[3]; i++)
        whole.loss[i] = true;
    CHECK_INT(d->n, ==, 2);
    CHECK_INT(d->ex[0].n_tokens, ==, whole.n);
    check_example(&d->ex[0], &whole, 0, whole.n);

    /* prompt/completion: the tokens of prompt + completion, the loss from the prompt's end */
    struct expect pr = {0};
    piece(&pc, spm, "question hello", true, true);
    piece(&pr, spm, "question", true, false);
    CHECK(!memcmp(pr.ids, pc.ids, (size_t)pr.n * sizeof(int32_t)));
    for (int i = 0; i < pr.n; i++)
        pc.loss[i] = false;
    token(&pc, ad_tokenizer_eos_id(spm), true);
    CHECK_INT(d->ex[1].n_tokens, ==, pc.n);
    check_example(&d->ex[1], &pc, 0, pc.n);
    ad_dataset_free(d);
    printf("ok whole-text tokens at the turns' boundaries\n");
}

/* ==========================================================================================
 * Truncation and packing */

static const char THREE[] =
    "{\"text\": \"Hello as is\"}\n"
    "{\"prompt\": \"Q: is it? is it? is it?\", \"completion\": \" Hello\"}\n"
    "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", "
    "\"content\": \"a\"}]}\n";

/* THREE's examples as the tokenizer encodes them, end to end; ends[k]: one past example k. */
static void three(const struct ad_tokenizer *tok, struct expect *x, int ends[3])
{
    int32_t eos = ad_tokenizer_eos_id(tok);
    piece(x, tok, "Hello as is", true, true);
    x->loss[0] = false;
    token(x, eos, true);
    ends[0] = x->n;
    piece(x, tok, "Q: is it? is it? is it?", true, false);
    piece(x, tok, " Hello", false, true);
    token(x, eos, true);
    ends[1] = x->n;
    piece(x, tok, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", false, false);
    piece(x, tok, "a<|im_end|>\n", false, true);
    ends[2] = x->n;
}

/* The example k of THREE (tokens [from, end) of x) spans */
static int example_end(const int ends[3], int j)
{
    return j < ends[0] ? ends[0] : j < ends[1] ? ends[1] : ends[2];
}

static void test_truncation(const struct ad_tokenizer *tok)
{
    struct expect x = {0};
    int ends[3], n_dropping = 0, n_cut_kept = 0;
    three(tok, &x, ends);

    /* every max_seq_len from 1 to past the longest: each example cut at the right, its last
     * kept token without a target; one left with no target is dropped (counted as cut) */
    for (int L = 1; L <= x.n + 1; L++) {
        int kept[3], n_kept = 0, n_cut = 0, dropped = 0;
        for (int k = 0, from = 0; k < 3; from = ends[k++]) {
            int n = ends[k] - from < L ? ends[k] - from : L, n_targets = 0;
            for (int j = from; j + 1 < from + n; j++)
                n_targets += x.loss[j + 1];
            n_cut += n < ends[k] - from;
            if (n_targets)
                kept[n_kept++] = k;
            dropped += !n_targets;
        }
        if (n_kept == 0) {
            struct ad_data_opts o = {.max_seq_len = L};
            struct ad_dataset *none = NULL;
            struct ad_err err = {0};
            CHECK_INT(ad_dataset_load(write_file("three.jsonl", THREE), tok, &o, &none, &err), ==,
                      -EINVAL);
            CHECK_CONTAINS(err.msg, "no example has a token to learn within max_seq_len");
            CHECK(none == NULL);
            continue;
        }
        struct ad_dataset *d = load_ok(THREE, tok, L, false);
        CHECK_INT(d->n, ==, n_kept);
        CHECK_INT(d->n_truncated, ==, n_cut);
        for (int i = 0; i < n_kept; i++) {
            int k = kept[i], from = k ? ends[k - 1] : 0;
            int n = ends[k] - from < L ? ends[k] - from : L;
            CHECK_INT(d->ex[i].n_tokens, ==, n);
            check_example(&d->ex[i], &x, from, from + n);
            CHECK_INT(d->ex[i].targets[n - 1], ==, -1);
            n_cut_kept += n < ends[k] - from;
        }
        n_dropping += dropped > 0;
        ad_dataset_free(d);
    }
    CHECK(n_dropping > 0 && n_cut_kept > 0); /* both cases were seen */

    struct ad_data_opts o = {.max_seq_len = 0};
    struct ad_dataset *none = NULL;
    struct ad_err err = {0};
    CHECK_INT(ad_dataset_load(write_file("three.jsonl", THREE), tok, &o, &none, &err), ==,
              -EINVAL);
    CHECK_CONTAINS(err.msg, "max_seq_len must be 1 to");
    printf("ok truncation\n");
}

static void test_packing(const struct ad_tokenizer *tok)
{
    struct expect x = {0};
    int ends[3], n_crossed = 0, n_left_out = 0;
    three(tok, &x, ends);

    /* sequences of exactly L tokens (the last shorter), the examples' tokens end to end with
     * the targets each has alone: an example's last token predicts nothing, a sequence's last
     * token predicts the next sequence's first where that is a loss token of the same example;
     * a sequence with nothing to learn is left out */
    for (int L = 1; L <= x.n + 1; L++) {
        struct ad_dataset *d = load_ok(THREE, tok, L, true);
        size_t k = 0, n_tokens = 0, n_targets = 0;
        CHECK_INT(d->n_truncated, ==, 0);
        for (int from = 0; from < x.n; from += L) {
            int n = x.n - from < L ? x.n - from : L, nt = 0;
            for (int j = from; j < from + n; j++)
                nt += j + 1 < example_end(ends, j) && x.loss[j + 1];
            if (nt == 0) {
                n_left_out++;
                continue;
            }
            CHECK(k < d->n);
            CHECK_INT(d->ex[k].n_tokens, ==, n);
            CHECK_INT(d->ex[k].n_targets, ==, nt);
            for (int i = 0; i < n; i++) {
                int j = from + i;
                bool t = j + 1 < example_end(ends, j) && x.loss[j + 1];
                CHECK_INT(d->ex[k].tokens[i], ==, x.ids[j]);
                CHECK_INT(d->ex[k].targets[i], ==, t ? x.ids[j + 1] : -1);
                n_crossed += i == n - 1 && t;
            }
            n_tokens += (size_t)n;
            n_targets += (size_t)nt;
            k++;
        }
        CHECK_INT(d->n, ==, k);
        CHECK_INT(d->n_tokens, ==, n_tokens);
        CHECK_INT(d->n_targets, ==, n_targets);
        ad_dataset_free(d);
    }
    CHECK(n_crossed > 0 && n_left_out > 0); /* both cases were seen */
    printf("ok packing\n");
}

/* ==========================================================================================
 * Files as a whole */

static void test_files(const struct ad_tokenizer *tok, const struct ad_tokenizer *no_tmpl)
{
    /* a BOM, CRLF, blank lines (line numbers still count them) */
    struct ad_dataset *d = load_ok("\xef\xbb\xbf{\"text\": \"Hello\"}\r\n\r\n   \n"
                                   "{\"text\": \"as is\"}", tok, 64, false);
    struct expect a = {0};
    piece(&a, tok, "Hello", true, true);
    a.loss[0] = false;
    token(&a, ad_tokenizer_eos_id(tok), true);
    CHECK_INT(d->n, ==, 2);
    check_example(&d->ex[0], &a, 0, a.n);
    ad_dataset_free(d);
    load_fails("{\"text\": \"Hello\"}\n\n{\"text\": 1}\n", tok, -EINVAL,
               "line 3: 'text' must be a string");
    /* one bad line: nothing is tokenized, not even the lines before it (with no chat template,
     * line 1 would fail to tokenize: the error is line 4's) */
    load_fails("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": "
               "\"assistant\", \"content\": \"a\"}]}\n{\"text\": \"x\"}\n{\"text\": \"y\"}\n"
               "{\"prompt\": \"x\"}\n{\"text\": \"z\"}\n",
               no_tmpl, -EINVAL, "line 4: 'completion' is missing");
    load_fails("{\"text\": \"x\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, "
               "{\"role\": \"assistant\", \"content\": \"a\"}]}\n",
               no_tmpl, -EINVAL, "line 2: 'messages' are rendered with the model's chat template, "
                                 "and it has none (tokenizer_config.json chat_template)");
    load_fails("{\"messages\": [{\"role\": \"assistant\", \"content\": \"first\"}, {\"role\": "
               "\"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n",
               tok, -EINVAL, "line 1: the chat template cannot mark assistant turns");
    load_fails("{\"text\": \"x\"}\n\xef\xbb\xbf{\"text\": \"y\"}\n", tok, -EINVAL,
               "line 2: not valid JSON");
    load_fails("{\"text\": \"x\"}\n{\"text\": \"\xc3\"}\n", tok, -EINVAL,
               "line 2: invalid UTF-8");
    load_fails("", tok, -EINVAL, "the training file has no examples");
    load_fails("\n \n\r\n", tok, -EINVAL, "the training file has no examples");

    struct ad_data_opts o = {.max_seq_len = 16};
    struct ad_err err = {0};
    char path[128];
    snprintf(path, sizeof(path), "%s/missing.jsonl", tmpdir);
    CHECK_INT(ad_dataset_load(path, tok, &o, &d, &err), ==, -ENOENT);
    printf("ok files\n");
}

int main(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/adapterd-test-data-XXXXXX");
    CHECK(mkdtemp(tmpdir) != NULL);
    setvbuf(stdout, NULL, _IONBF, 0);

    struct ad_tokenizer *tok = chatml_tokenizer(CHATML), *plain = chatml_tokenizer(NULL);
    struct ad_tokenizer *spm = spm_tokenizer();
    test_check_line();
    test_prompt_completion_and_text(tok);
    test_messages(tok);
    test_whole_text_tokens(spm);
    test_truncation(tok);
    test_packing(tok);
    test_files(tok, plain);
    ad_tokenizer_free(tok);
    ad_tokenizer_free(plain);
    ad_tokenizer_free(spm);
    CHECK_INT(ad_rm_rf(tmpdir), ==, 0);
    return 0;
}
