/* adapterd: the tokenizer: Hugging Face tokenizer.json (+ tokenizer_config.json), encoding text to
 * token ids and decoding them back, with the exact behaviour of the Hugging Face `tokenizers`
 * library (docs/tokenizer.md lists what is supported and how parity is tested).
 *
 * A struct ad_tokenizer is immutable after load: every function below that takes a const
 * tokenizer is thread-safe and may run concurrently with any other on the same tokenizer. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ad_err;
struct ad_tokenizer;
struct json_t; /* jansson's json_t */

/* Limits on user-controlled sizes. */
#define AD_TOKENIZER_MAX_JSON (512u << 20) /* tokenizer.json, bytes */
#define AD_TOKENIZER_MAX_TEXT (64u << 20)  /* one encode() input, bytes */
#define AD_TOKENIZER_MAX_VOCAB (1 << 22)   /* ids are < 4 Mi */

/* ==========================================================================================
 * Loading */

/* Loads dir/tokenizer.json and, if present, dir/tokenizer_config.json (bos/eos tokens,
 * add_bos_token/add_eos_token, chat_template). On success *ret_tok is a new tokenizer, owned by
 * the caller (ad_tokenizer_free). Returns 0, -ENOENT (no tokenizer.json), -EINVAL (malformed
 * file; err names the key), -ENOTSUP (a component type adapterd does not implement; err names
 * it), -E2BIG, -ENOMEM. */
int ad_tokenizer_load(const char *dir, struct ad_tokenizer **ret_tok, struct ad_err *err);

/* Same from memory: json is the tokenizer.json text (len bytes, need not be NUL-terminated);
 * config_json, if not NULL, the tokenizer_config.json text (config_len bytes). Neither buffer is
 * referenced after the call. */
int ad_tokenizer_load_json(const char *json, size_t len, const char *config_json,
                           size_t config_len, struct ad_tokenizer **ret_tok, struct ad_err *err);

/* Frees tok (NULL is fine). Returns NULL, so that `tok = ad_tokenizer_free(tok);` reads well. */
struct ad_tokenizer *ad_tokenizer_free(struct ad_tokenizer *tok);

/* ==========================================================================================
 * Encoding and decoding */

/* Encodes len bytes of text (any bytes: invalid UTF-8 sequences are first replaced by U+FFFD,
 * one per maximal ill-formed subpart, as Rust's from_utf8_lossy and JavaScript's TextDecoder
 * do). add_special_tokens applies the post-processor (e.g. a leading <s>). On success
 * *ret_ids is a new malloc'd array of *ret_n ids (caller frees; non-NULL even when empty).
 * Returns 0, -E2BIG (len > AD_TOKENIZER_MAX_TEXT), -ENOMEM, or -EINVAL (a regular expression
 * from the file hit its match limit; err says so). */
int ad_tokenizer_encode(const struct ad_tokenizer *tok, const char *text, size_t len,
                        bool add_special_tokens, int32_t **ret_ids, size_t *ret_n,
                        struct ad_err *err);

/* Decodes ids to text with the tokenizer's decoder. Ids out of range are skipped (as Hugging
 * Face does); skip_special_tokens drops special added tokens. The result is valid UTF-8. On
 * success *ret_text is a new malloc'd NUL-terminated string (caller frees) of *ret_len bytes
 * (ret_len may be NULL). Returns 0 or -ENOMEM. */
int ad_tokenizer_decode(const struct ad_tokenizer *tok, const int32_t *ids, size_t n,
                        bool skip_special_tokens, char **ret_text, size_t *ret_len);

/* ==========================================================================================
 * Vocabulary and special tokens (all borrowed from tok, valid until it is freed) */

/* One past the largest id of the model vocabulary and the added tokens. */
size_t ad_tokenizer_n_vocab(const struct ad_tokenizer *tok);

/* The id of a token string (model vocabulary or added token), or -1. */
int32_t ad_tokenizer_token_to_id(const struct ad_tokenizer *tok, const char *s, size_t len);

/* The string of a token (as stored in the vocabulary: "Ġthe", "▁the", "<0x0A>"), *ret_len bytes,
 * NUL-terminated; NULL if id has no token. */
const char *ad_tokenizer_id_to_token(const struct ad_tokenizer *tok, int32_t id,
                                     size_t *ret_len);

/* True if id is an added token marked "special" (skipped by skip_special_tokens). */
bool ad_tokenizer_is_special(const struct ad_tokenizer *tok, int32_t id);

/* bos/eos ids from tokenizer_config.json's bos_token/eos_token, -1 if none. */
int32_t ad_tokenizer_bos_id(const struct ad_tokenizer *tok);
int32_t ad_tokenizer_eos_id(const struct ad_tokenizer *tok);

/* tokenizer_config.json's add_bos_token / add_eos_token (false if absent). Informational:
 * encode() follows tokenizer.json's post-processor, as the Hugging Face library does. */
bool ad_tokenizer_add_bos(const struct ad_tokenizer *tok);
bool ad_tokenizer_add_eos(const struct ad_tokenizer *tok);

/* tokenizer_config.json's chat_template (the string form, or the template named "default" of
 * the list form), NUL-terminated, or NULL if there is none. */
const char *ad_tokenizer_chat_template(const struct ad_tokenizer *tok);

/* ==========================================================================================
 * Chat templates (chat.c). adapterd renders the chat templates of the common families (ChatML
 * and Qwen3, Llama 2, Llama 3, Mistral, Zephyr, Gemma) byte for byte as transformers'
 * apply_chat_template does with Python's Jinja; any other template is refused as not supported.
 * messages is a JSON list of {"role": "system"|"user"|"assistant", "content": a string or a list
 * of {"type": "text", "text"} parts} (Qwen3 also reads "reasoning_content"); it is borrowed, only
 * read during the call. bos/eos are the tokenizer's bos/eos token strings (NULL renders as "",
 * as an undefined bos_token does). All functions here are thread-safe. */

/* Renders messages with the chat template tmpl (e.g. ad_tokenizer_chat_template()), with
 * add_generation_prompt as given: true ends the text with the header of the assistant's next
 * turn (serving), false ends it after the last message (training data; a template that prints the
 * header whatever the flag says, as Llama 3's first revision does, prints it here too). On success
 * *ret_text is a new malloc'd NUL-terminated string (caller frees). Returns 0, -ENOTSUP (a
 * template, a content part or tool calls adapterd does not render; err says which), -EINVAL (a
 * conversation the template refuses with raise_exception, or malformed messages; err says why),
 * -ENOMEM. */
int ad_chat_render(const char *tmpl, const char *bos, const char *eos,
                   const struct json_t *messages, bool add_generation_prompt, char **ret_text,
                   struct ad_err *err);

/* One assistant turn in a rendering: bytes [start, end) of the text are what the model writes
 * for messages[message] (its content and whatever the template writes to end the turn, e.g.
 * "<|im_end|>\n", "<|eot_id|>", "</s>", "<end_of_turn>\n"; never the header that opens the turn
 * nor the next one's). */
struct ad_chat_turn {
    size_t message;
    size_t start, end;
};

/* Renders messages with add_generation_prompt = false, as ad_chat_render does, and finds each
 * assistant turn in the text: for assistant message k, with p = messages[0, k) rendered with the
 * generation prompt and q = messages[0, k] rendered without it, the turn is q less its prefix p.
 * p must begin q and q the whole text, as they do for templates that render a turn the same
 * whatever follows it. On success *ret_text is the rendering (new, NUL-terminated, caller frees)
 * and *ret_turns a new array (caller frees) of *ret_n_turns turns, one per assistant message, in
 * order, not overlapping. Returns 0, the errors of ad_chat_render, or -ENOTSUP "the chat template
 * cannot mark assistant turns" naming the message (an assistant message first, or a template that
 * renders a turn differently once later messages follow, as Qwen3 does with <think> blocks and
 * Mistral v0.3 with the system prompt). Costs two renderings of a prefix per assistant turn. */
int ad_chat_segments(const char *tmpl, const char *bos, const char *eos,
                     const struct json_t *messages, char **ret_text,
                     struct ad_chat_turn **ret_turns, size_t *ret_n_turns, struct ad_err *err);

/* ==========================================================================================
 * Streaming decode: text is emitted only in whole UTF-8 characters, and the concatenation of
 * everything push() and finish() emit equals ad_tokenizer_decode() of all the ids pushed.
 * One stream per sequence; a stream is not thread-safe, the tokenizer it reads is. */

struct ad_detok {
    const struct ad_tokenizer *tok; /* borrowed */
    bool skip_special_tokens;
    int32_t *ids;   /* the window of recent ids still needed as context */
    size_t n_ids, cap_ids;
    size_t n_ctx;   /* leading ids of the window whose text was already consumed */
    size_t consumed; /* bytes of the window's raw text already consumed */
    char *raw;      /* scratch: the window's raw decoded bytes */
    size_t raw_len, raw_cap;
    char *out;      /* the text returned by the last push()/finish() */
    size_t out_len, out_cap;
    unsigned char pend[4]; /* an incomplete UTF-8 sequence carried to the next push */
    size_t n_pend;
};

/* Initialises a caller-allocated stream over tok (borrowed: must outlive the stream). */
void ad_detok_init(struct ad_detok *d, const struct ad_tokenizer *tok, bool skip_special_tokens);

/* Adds one id. On success *ret_text points to the newly complete text (*ret_len bytes, maybe
 * 0, NUL-terminated), owned by d and valid until the next call on d. Returns 0 or -ENOMEM. */
int ad_detok_push(struct ad_detok *d, int32_t id, const char **ret_text, size_t *ret_len);

/* Ends the sequence: returns in *ret_text whatever was held back (an incomplete character
 * becomes U+FFFD, exactly as decode() would render it). Same ownership as push(). */
int ad_detok_finish(struct ad_detok *d, const char **ret_text, size_t *ret_len);

/* Frees the stream's buffers; d may be initialised again. */
void ad_detok_fini(struct ad_detok *d);
