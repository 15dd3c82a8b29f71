/* ad_chat_segments() on every supported template family (the real templates of templates/),
 * against renderings and turns written out here by hand from each template: the turn is what the
 * model writes (the content and what closes the turn, e.g. <|im_end|>\n), never a header. Also
 * the conversations it must refuse: an assistant message first, Qwen3's and Mistral v0.3's
 * multi-turn conversations whose earlier turns render differently once later ones follow, an
 * unsupported template. chat.js checks the same rule against Jinja on every conversation; this
 * pins the expected text of each family.
 *
 *   test-chat-segments TEMPLATES_DIR */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"
#include "adapterd/tokenizer.h"
#include "adapterd/util.h"

static const char *dir;

struct tmpl {
    json_t *j;
    const char *text, *bos, *eos;
};

static struct tmpl load(const char *name)
{
    char path[4096];
    json_error_t je;
    struct tmpl t;

    snprintf(path, sizeof(path), "%s/%s.json", dir, name);
    t.j = json_load_file(path, 0, &je);
    if (!t.j) {
        fprintf(stderr, "%s: %s\n", path, je.text);
        abort();
    }
    t.text = json_string_value(json_object_get(t.j, "chat_template"));
    t.bos = json_string_value(json_object_get(t.j, "bos_token"));
    t.eos = json_string_value(json_object_get(t.j, "eos_token"));
    CHECK(t.text != NULL);
    return t;
}

/* messages from "role:content|role:content|..." (s: system, u: user, a: assistant) */
static json_t *conv(const char *spec)
{
    static const char *roles[] = {['s'] = "system", ['u'] = "user", ['a'] = "assistant"};
    json_t *m = json_array();

    for (const char *p = spec; *p;) {
        const char *e = strchr(p, '|');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        CHECK(len >= 2 && p[1] == ':' && roles[(unsigned char)p[0]]);
        json_array_append_new(m, json_pack("{s:s, s:s#}", "role", roles[(unsigned char)p[0]],
                                           "content", p + 2, (int)(len - 2)));
        p += e ? len + 1 : len;
    }
    return m;
}

/* Segments of spec with template name: the whole text must be `whole` and the turns, in order,
 * the NULL-terminated texts `turns`, each of the assistant message at `at[i]`. */
static void expect(const char *name, const char *spec, const char *whole, const size_t *at,
                   const char *const *turns)
{
    struct tmpl t = load(name);
    json_t *m = conv(spec);
    struct ad_err err = {0};
    struct ad_chat_turn *tv = NULL;
    size_t n = 0, want = 0;
    char *text = NULL;
    int rc = ad_chat_segments(t.text, t.bos, t.eos, m, &text, &tv, &n, &err);

    if (rc < 0)
        fprintf(stderr, "%s: %s: %s\n", name, spec, err.msg);
    CHECK_INT(rc, ==, 0);
    CHECK_STR(text, whole);
    while (turns[want])
        want++;
    CHECK_INT(n, ==, want);
    for (size_t k = 0; k < n; k++) {
        char got[512];
        CHECK_INT(tv[k].message, ==, at[k]);
        CHECK(tv[k].start <= tv[k].end && tv[k].end <= strlen(text));
        CHECK(tv[k].end - tv[k].start < sizeof(got));
        memcpy(got, text + tv[k].start, tv[k].end - tv[k].start);
        got[tv[k].end - tv[k].start] = '\0';
        CHECK_STR(got, turns[k]);
        if (k > 0)
            CHECK(tv[k].start >= tv[k - 1].end);
    }
    /* the text is what ad_chat_render gives with add_generation_prompt = false */
    char *plain = NULL;
    CHECK_INT(ad_chat_render(t.text, t.bos, t.eos, m, false, &plain, &err), ==, 0);
    CHECK_STR(plain, text);
    free(plain);
    free(text);
    free(tv);
    json_decref(m);
    json_decref(t.j);
    printf("ok %s: %s\n", name, spec);
}

static void refused(const char *name, const char *spec, int code, const char *why)
{
    struct tmpl t = load(name);
    json_t *m = conv(spec);
    struct ad_err err = {0};
    struct ad_chat_turn *tv = (struct ad_chat_turn *)&err; /* must stay as it is */
    size_t n = 12345;
    char *text = (char *)&err;

    CHECK_INT(ad_chat_segments(t.text, t.bos, t.eos, m, &text, &tv, &n, &err), ==, code);
    CHECK_INT(err.code, ==, code);
    CHECK_CONTAINS(err.msg, why);
    CHECK(text == (char *)&err && tv == (struct ad_chat_turn *)&err && n == 12345);
    json_decref(m);
    json_decref(t.j);
    printf("ok %s: %s refused: %s\n", name, spec, err.msg);
}

#define TURNS(...) (const char *const[]){__VA_ARGS__, NULL}
#define AT(...) (const size_t[]){__VA_ARGS__}

static const char SUA[] = "s:S|u:Hi|a:Hello|u:More?|a:No.";
static const char UA[] = "u:Hi|a:Hello|u:More?|a:No.";

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    dir = argv[1];
    setvbuf(stdout, NULL, _IONBF, 0);

    /* ChatML: the turn ends with <|im_end|> and its newline (as TRL's training templates put
     * both in {% generation %}); the header <|im_start|>assistant\n is the prompt's */
    expect("openhermes-2.5-chatml", SUA,
           "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
           "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n"
           "<|im_start|>assistant\nNo.<|im_end|>\n",
           AT(2, 4), TURNS("Hello<|im_end|>\n", "No.<|im_end|>\n"));
    expect("smollm2-instruct", UA,
           "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
           "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
           "<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n",
           AT(1, 3), TURNS("Hello<|im_end|>\n", "No.<|im_end|>\n"));
    expect("qwen2.5-instruct", UA,
           "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
           "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello"
           "<|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n",
           AT(1, 3), TURNS("Hello<|im_end|>\n", "No.<|im_end|>\n"));
    expect("qwen2.5-instruct", "s:S|u:Hi|a:Hello",
           "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
           "<|im_start|>assistant\nHello<|im_end|>\n",
           AT(2), TURNS("Hello<|im_end|>\n"));
    /* Qwen3: the last turn after the last query gets a <think> block, empty if none is given */
    expect("qwen3", "u:Hi|a:Hello",
           "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
           "Hello<|im_end|>\n",
           AT(1), TURNS("<think>\n\n</think>\n\nHello<|im_end|>\n"));
    expect("qwen3", "s:S|u:Hi|a:<think>\nwhy\n</think>\n\nHello",
           "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
           "<|im_start|>assistant\n<think>\nwhy\n</think>\n\nHello<|im_end|>\n",
           AT(2), TURNS("<think>\nwhy\n</think>\n\nHello<|im_end|>\n"));
    /* Llama 3: <|eot_id|> ends the turn; the first revision's unconditional generation prompt
     * ends the text but is no turn's */
#define LLAMA3_SUA "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>" \
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>" \
                   "<|start_header_id|>user<|end_header_id|>\n\nMore?<|eot_id|>" \
                   "<|start_header_id|>assistant<|end_header_id|>\n\nNo.<|eot_id|>"
    expect("llama3-8b-instruct-genprompt", SUA, LLAMA3_SUA, AT(2, 4),
           TURNS("Hello<|eot_id|>", "No.<|eot_id|>"));
    expect("llama3-8b-instruct", SUA,
           LLAMA3_SUA "<|start_header_id|>assistant<|end_header_id|>\n\n", AT(2, 4),
           TURNS("Hello<|eot_id|>", "No.<|eot_id|>"));
    /* Llama 2: " answer </s>", the space after [/INST] is the answer's */
    expect("llama2-chat", SUA,
           "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] More? [/INST] No. "
           "</s>",
           AT(2, 4), TURNS(" Hello </s>", " No. </s>"));
    /* Mistral: v0.1 writes a space after </s>, v0.2 none, the 'v1' system template and v0.3 a
     * space before the answer */
    expect("mistral-7b-instruct-v0.1", UA,
           "<s>[INST] Hi [/INST]Hello</s> [INST] More? [/INST]No.</s> ",
           AT(1, 3), TURNS("Hello</s> ", "No.</s> "));
    expect("mistral-7b-instruct-v0.2", UA,
           "<s>[INST] Hi [/INST]Hello</s>[INST] More? [/INST]No.</s>",
           AT(1, 3), TURNS("Hello</s>", "No.</s>"));
    expect("mistral-7b-instruct-v0.2-system", SUA,
           "<s> [INST] S\n\nHi [/INST] Hello</s> [INST] More? [/INST] No.</s>",
           AT(2, 4), TURNS(" Hello</s>", " No.</s>"));
    expect("mistral-7b-instruct-v0.3", UA,
           "<s>[INST] Hi[/INST] Hello</s>[INST] More?[/INST] No.</s>",
           AT(1, 3), TURNS(" Hello</s>", " No.</s>"));
    /* Zephyr, TinyLlama (the same template): </s> and the newline after it */
    for (int k = 0; k < 2; k++)
        expect(k ? "tinyllama-1.1b-chat" : "zephyr-7b-beta", SUA,
               "<|system|>\nS</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\n"
               "More?</s>\n<|assistant|>\nNo.</s>\n",
               AT(2, 4), TURNS("Hello</s>\n", "No.</s>\n"));
    /* Gemma: <end_of_turn> and its newline; the header <start_of_turn>model\n is the prompt's */
    expect("gemma2-it", UA,
           "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
           "<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\nNo.<end_of_turn>\n",
           AT(1, 3), TURNS("Hello<end_of_turn>\n", "No.<end_of_turn>\n"));
    expect("gemma3-it", SUA,
           "<bos><start_of_turn>user\nS\n\nHi<end_of_turn>\n<start_of_turn>model\nHello"
           "<end_of_turn>\n<start_of_turn>user\nMore?<end_of_turn>\n<start_of_turn>model\nNo."
           "<end_of_turn>\n",
           AT(2, 4), TURNS("Hello<end_of_turn>\n", "No.<end_of_turn>\n"));
    /* no assistant message: no turn, the text all the same */
    expect("openhermes-2.5-chatml", "u:Hi", "<|im_start|>user\nHi<|im_end|>\n", AT(0),
           (const char *const[]){NULL});

    refused("openhermes-2.5-chatml", "a:first|u:Hi|a:Hello", -ENOTSUP,
            "cannot mark assistant turns: messages[0]");
    refused("qwen3", UA, -ENOTSUP, "cannot mark assistant turns: messages[1]");
    /* v0.3 prints the system prompt in the last message only when that is a user's: the text
     * of a conversation that ends with an answer has none */
    refused("mistral-7b-instruct-v0.3", "s:S|u:Hi|a:Hello", -ENOTSUP,
            "cannot mark assistant turns: messages[2]");
    refused("mistral-7b-instruct-v0.3", SUA, -ENOTSUP, "cannot mark assistant turns: messages[2]");
    refused("gemma2-it", SUA, -EINVAL, "the system role is not supported");
    refused("llama2-chat", "u:Hi|a:Hello|a:again", -EINVAL, "roles must alternate");
    refused("unsupported-phi4", UA, -ENOTSUP, "template is not supported");
    return 0;
}
