/* The tokenizer: loading tokenizer.json and tokenizer_config.json into immutable tables, and the
 * public accessors. Encoding is in tokenizer_encode.c, the BPE model in tokenizer_bpe.c,
 * decoding in tokenizer_decode.c, Unicode helpers in tokenizer_text.c. */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* PCRE2 limits for regular expressions that come from a file. */
#define RE_MATCH_LIMIT 10000000u
#define RE_DEPTH_LIMIT 100000u

/* The regex of the ByteLevel pre-tokenizer (GPT-2's; Hugging Face hard-codes it too). */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ==========================================================================================
 * JSON helpers: each returns 0, or -EINVAL with err naming the key */

static int j_bool(const json_t *o, const char *key, bool def, bool *ret, const char *where,
                  struct ad_err *err)
{
    const json_t *v = json_object_get(o, key);

    if (!v || json_is_null(v)) {
        *ret = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return ad_err_set(err, -EINVAL, "%s.%s: expected a boolean", where, key);
    *ret = json_is_true(v);
    return 0;
}

/* *ret = NULL if absent or null. */
static int j_str(const json_t *o, const char *key, const char **ret, size_t *ret_len,
                 const char *where, struct ad_err *err)
{
    const json_t *v = json_object_get(o, key);

    *ret = NULL;
    *ret_len = 0;
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v))
        return ad_err_set(err, -EINVAL, "%s.%s: expected a string", where, key);
    *ret = json_string_value(v);
    *ret_len = json_string_length(v);
    return 0;
}

static int j_size(const json_t *o, const char *key, size_t def, size_t *ret, const char *where,
                  struct ad_err *err)
{
    const json_t *v = json_object_get(o, key);

    if (!v || json_is_null(v)) {
        *ret = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
        return ad_err_set(err, -EINVAL, "%s.%s: expected a small non-negative integer", where,
                          key);
    *ret = (size_t)json_integer_value(v);
    return 0;
}

/* A Rust char: a string of exactly one character. */
static int j_char(const json_t *o, const char *key, uint32_t def, uint32_t *ret,
                  const char *where, struct ad_err *err)
{
    const char *s;
    size_t len;
    int r = j_str(o, key, &s, &len, where, err);

    if (r < 0)
        return r;
    if (!s) {
        *ret = def;
        return 0;
    }
    if (len == 0 || tk_utf8_valid_prefix(s, len) != len || tk_utf8_next(s, len, ret) != len)
        return ad_err_set(err, -EINVAL, "%s.%s: expected a single character", where, key);
    return 0;
}

static int dup_mem(const char *s, size_t len, char **ret)
{
    char *p = malloc(len + 1);

    if (!p)
        return -ENOMEM;
    if (len)
        memcpy(p, s, len);
    p[len] = '\0';
    *ret = p;
    return 0;
}

static const char *j_type(const json_t *o)
{
    const json_t *t = json_object_get(o, "type");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

/* Oniguruma's \p{Han} is the Script property, PCRE2's (since 10.40) Script_Extensions: rewrite
 * \p{Name} to \p{sc:Name} for names that are neither general categories nor PCRE2 specials
 * or binary properties. Returns a new string, or NULL if nothing needs rewriting. */
static char *script_rewrite(const char *pat, size_t len, size_t *ret_len)
{
    static const char *const keep[] = {"Any", "L&", "Xan", "Xps", "Xsp", "Xuc", "Xwd",
                                       "Alphabetic", "Alpha", "Lowercase", "Uppercase",
                                       "White_Space", "WSpace", "Emoji", "ASCII"};
    struct tk_buf out = {0};
    bool changed = false;
    size_t i = 0;

    while (i < len) {
        if (pat[i] == '\\' && i + 1 < len && pat[i + 1] != 'p' && pat[i + 1] != 'P') {
            if (tk_buf_put(&out, pat + i, 2) < 0)
                goto fail;
            i += 2;
            continue;
        }
        if (pat[i] == '\\' && i + 2 < len && pat[i + 2] == '{') {
            const char *end = memchr(pat + i + 3, '}', len - i - 3);
            size_t nl = end ? (size_t)(end - (pat + i + 3)) : 0;
            const char *name = pat + i + 3;
            bool neg = nl && name[0] == '^', is_keep = false;
            if (neg) {
                name++;
                nl--;
            }
            for (size_t k = 0; k < sizeof(keep) / sizeof(keep[0]); k++)
                is_keep |= strlen(keep[k]) == nl && memcmp(keep[k], name, nl) == 0;
            if (end && nl > 2 && !is_keep && !memchr(name, ':', nl) && !memchr(name, '=', nl)) {
                if (tk_buf_put(&out, pat + i, 3) < 0 || (neg && tk_buf_put(&out, "^", 1) < 0) ||
                    tk_buf_put(&out, "sc:", 3) < 0 || tk_buf_put(&out, name, nl + 1) < 0)
                    goto fail;
                i = (size_t)(end - pat) + 1;
                changed = true;
                continue;
            }
        }
        if (tk_buf_put(&out, pat + i, 1) < 0)
            goto fail;
        i++;
    }
    if (!changed)
        goto fail;
    *ret_len = out.len;
    return out.p;
fail:
    tk_buf_fini(&out);
    return NULL;
}

static int compile_regex(const char *pat, size_t len, pcre2_code **ret, const char *where,
                         struct ad_err *err)
{
    const uint32_t opts = PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE;
    int ec;
    PCRE2_SIZE eo;
    pcre2_code *re = NULL;
    size_t rlen;
    char *rew;

    if (tk_utf8_valid_prefix(pat, len) != len)
        return ad_err_set(err, -EINVAL, "%s: regex is not valid UTF-8", where);
    rew = script_rewrite(pat, len, &rlen);
    if (rew) {
        re = pcre2_compile((PCRE2_SPTR)rew, rlen, opts, &ec, &eo, NULL);
        free(rew);
    }
    if (!re)
        re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &ec, &eo, NULL);
    if (!re) {
        PCRE2_UCHAR msg[120];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        return ad_err_set(err, -EINVAL, "%s: regex error at offset %zu: %s", where, (size_t)eo,
                          (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter is the fallback */
    *ret = re;
    return 0;
}

/* {"String": "..."} or {"Regex": "..."} */
static int parse_pattern(const json_t *o, struct tk_pattern *p, const char *where,
                         struct ad_err *err)
{
    const json_t *s, *re;

    if (!json_is_object(o))
        return ad_err_set(err, -EINVAL, "%s.pattern: expected an object", where);
    s = json_object_get(o, "String");
    re = json_object_get(o, "Regex");
    if (json_is_string(s)) {
        p->kind = TK_PAT_STRING;
        p->len = json_string_length(s);
        return dup_mem(json_string_value(s), p->len, &p->str);
    }
    if (json_is_string(re)) {
        p->kind = TK_PAT_REGEX;
        return compile_regex(json_string_value(re), json_string_length(re), &p->re, where, err);
    }
    return ad_err_set(err, -EINVAL, "%s.pattern: expected String or Regex", where);
}

static int unsupported(struct ad_err *err, const char *what, const char *type)
{
    return ad_err_set(err, -ENOTSUP, "tokenizer.json: %s type '%s' is not supported", what,
                      type ? type : "(none)");
}

static int parse_prepend_scheme(const json_t *o, enum tk_prepend_scheme *ret, const char *where,
                                struct ad_err *err)
{
    const json_t *aps = json_object_get(o, "add_prefix_space");
    const json_t *ps = json_object_get(o, "prepend_scheme");

    *ret = TK_PREPEND_ALWAYS;
    if (json_is_false(aps))
        *ret = TK_PREPEND_NEVER;
    if (ps && !json_is_null(ps)) {
        const char *s = json_string_value(ps);
        if (!s)
            return ad_err_set(err, -EINVAL, "%s.prepend_scheme: expected a string", where);
        if (strcmp(s, "always") == 0)
            *ret = TK_PREPEND_ALWAYS;
        else if (strcmp(s, "first") == 0)
            *ret = TK_PREPEND_FIRST;
        else if (strcmp(s, "never") == 0)
            *ret = TK_PREPEND_NEVER;
        else
            return ad_err_set(err, -EINVAL, "%s.prepend_scheme: unknown value '%s'", where, s);
    }
    return 0;
}

/* ==========================================================================================
 * Components */

#define MAX_NESTING 16

static int parse_norm(const json_t *o, struct tk_norm *n, int depth, struct ad_err *err)
{
    const char *type = j_type(o), *s;
    size_t len;
    int r;

    if (!json_is_object(o) || !type)
        return ad_err_set(err, -EINVAL, "tokenizer.json: normalizer: expected an object with a type");
    if (depth > MAX_NESTING)
        return ad_err_set(err, -EINVAL, "tokenizer.json: normalizer: nested too deeply");
    if (strcmp(type, "NFC") == 0)
        n->type = TK_NORM_NFC;
    else if (strcmp(type, "NFD") == 0)
        n->type = TK_NORM_NFD;
    else if (strcmp(type, "NFKC") == 0)
        n->type = TK_NORM_NFKC;
    else if (strcmp(type, "NFKD") == 0)
        n->type = TK_NORM_NFKD;
    else if (strcmp(type, "Lowercase") == 0)
        n->type = TK_NORM_LOWERCASE;
    else if (strcmp(type, "ByteLevel") == 0)
        n->type = TK_NORM_BYTELEVEL;
    else if (strcmp(type, "Strip") == 0) {
        n->type = TK_NORM_STRIP;
        r = j_bool(o, "strip_left", true, &n->strip_left, "normalizer", err);
        if (r >= 0)
            r = j_bool(o, "strip_right", true, &n->strip_right, "normalizer", err);
        if (r < 0)
            return r;
    } else if (strcmp(type, "Prepend") == 0 || strcmp(type, "Append") == 0) {
        bool pre = type[0] == 'P';
        n->type = pre ? TK_NORM_PREPEND : TK_NORM_APPEND;
        r = j_str(o, pre ? "prepend" : "append", &s, &len, "normalizer", err);
        if (r < 0)
            return r;
        if (!s)
            return ad_err_set(err, -EINVAL, "tokenizer.json: normalizer.%s: missing",
                              pre ? "prepend" : "append");
        n->content_len = len;
        return dup_mem(s, len, &n->content);
    } else if (strcmp(type, "Replace") == 0) {
        n->type = TK_NORM_REPLACE;
        r = parse_pattern(json_object_get(o, "pattern"), &n->pat, "normalizer", err);
        if (r >= 0)
            r = j_str(o, "content", &s, &len, "normalizer", err);
        if (r < 0)
            return r;
        if (!s)
            return ad_err_set(err, -EINVAL, "tokenizer.json: normalizer.content: missing");
        n->content_len = len;
        return dup_mem(s, len, &n->content);
    } else if (strcmp(type, "Sequence") == 0) {
        const json_t *a = json_object_get(o, "normalizers");
        n->type = TK_NORM_SEQUENCE;
        if (!json_is_array(a))
            return ad_err_set(err, -EINVAL, "tokenizer.json: normalizer.normalizers: expected an array");
        n->subs = calloc(json_array_size(a) + 1, sizeof(*n->subs));
        if (!n->subs)
            return -ENOMEM;
        for (size_t i = 0; i < json_array_size(a); i++) {
            n->n_subs = i + 1;
            r = parse_norm(json_array_get(a, i), &n->subs[i], depth + 1, err);
            if (r < 0)
                return r;
        }
    } else {
        return unsupported(err, "normalizer", type);
    }
    return 0;
}

static int parse_behavior(const json_t *o, enum tk_behavior def, enum tk_behavior *ret,
                          const char *where, struct ad_err *err)
{
    const json_t *v = json_object_get(o, "behavior");
    const char *s = json_string_value(v);

    if (!v || json_is_null(v)) {
        *ret = def;
        return 0;
    }
    if (!s)
        return ad_err_set(err, -EINVAL, "%s.behavior: expected a string", where);
    if (strcmp(s, "Removed") == 0)
        *ret = TK_SPLIT_REMOVED;
    else if (strcmp(s, "Isolated") == 0)
        *ret = TK_SPLIT_ISOLATED;
    else if (strcmp(s, "MergedWithPrevious") == 0)
        *ret = TK_SPLIT_MERGED_PREV;
    else if (strcmp(s, "MergedWithNext") == 0)
        *ret = TK_SPLIT_MERGED_NEXT;
    else if (strcmp(s, "Contiguous") == 0)
        *ret = TK_SPLIT_CONTIGUOUS;
    else
        return ad_err_set(err, -EINVAL, "%s.behavior: unknown value '%s'", where, s);
    return 0;
}

static int parse_pre(const json_t *o, struct tk_pre *p, int depth, struct ad_err *err)
{
    const char *type = j_type(o), *w = "tokenizer.json: pre_tokenizer";
    int r = 0;

    if (!json_is_object(o) || !type)
        return ad_err_set(err, -EINVAL, "%s: expected an object with a type", w);
    if (depth > MAX_NESTING)
        return ad_err_set(err, -EINVAL, "%s: nested too deeply", w);
    if (strcmp(type, "ByteLevel") == 0) {
        p->type = TK_PRE_BYTELEVEL;
        r = j_bool(o, "add_prefix_space", true, &p->add_prefix_space, w, err);
        if (r >= 0)
            r = j_bool(o, "use_regex", true, &p->use_regex, w, err);
        if (r >= 0 && p->use_regex) {
            p->pat.kind = TK_PAT_REGEX;
            r = compile_regex(GPT2_PATTERN, sizeof(GPT2_PATTERN) - 1, &p->pat.re, w, err);
        }
    } else if (strcmp(type, "Split") == 0) {
        p->type = TK_PRE_SPLIT;
        r = parse_pattern(json_object_get(o, "pattern"), &p->pat, w, err);
        if (r >= 0)
            r = parse_behavior(o, TK_SPLIT_ISOLATED, &p->behavior, w, err);
        if (r >= 0)
            r = j_bool(o, "invert", false, &p->invert, w, err);
    } else if (strcmp(type, "Metaspace") == 0) {
        p->type = TK_PRE_METASPACE;
        r = j_char(o, "replacement", 0x2581, &p->ch, w, err);
        if (r >= 0)
            r = parse_prepend_scheme(o, &p->prepend, w, err);
        if (r >= 0)
            r = j_bool(o, "split", true, &p->split, w, err);
    } else if (strcmp(type, "Digits") == 0) {
        p->type = TK_PRE_DIGITS;
        r = j_bool(o, "individual_digits", false, &p->individual_digits, w, err);
    } else if (strcmp(type, "Whitespace") == 0) {
        p->type = TK_PRE_WHITESPACE;
    } else if (strcmp(type, "WhitespaceSplit") == 0) {
        p->type = TK_PRE_WHITESPACE_SPLIT;
    } else if (strcmp(type, "Punctuation") == 0) {
        p->type = TK_PRE_PUNCTUATION;
        r = parse_behavior(o, TK_SPLIT_ISOLATED, &p->behavior, w, err);
    } else if (strcmp(type, "BertPreTokenizer") == 0) {
        p->type = TK_PRE_BERT;
    } else if (strcmp(type, "CharDelimiterSplit") == 0) {
        p->type = TK_PRE_CHAR_DELIMITER;
        r = j_char(o, "delimiter", ' ', &p->ch, w, err);
    } else if (strcmp(type, "Sequence") == 0) {
        const json_t *a = json_object_get(o, "pretokenizers");
        p->type = TK_PRE_SEQUENCE;
        if (!json_is_array(a))
            return ad_err_set(err, -EINVAL, "%s.pretokenizers: expected an array", w);
        p->subs = calloc(json_array_size(a) + 1, sizeof(*p->subs));
        if (!p->subs)
            return -ENOMEM;
        for (size_t i = 0; i < json_array_size(a) && r >= 0; i++) {
            p->n_subs = i + 1;
            r = parse_pre(json_array_get(a, i), &p->subs[i], depth + 1, err);
        }
    } else {
        return unsupported(err, "pre_tokenizer", type);
    }
    return r;
}

static int parse_dec(const json_t *o, struct tk_dec *d, int depth, struct ad_err *err)
{
    const char *type = j_type(o), *w = "tokenizer.json: decoder", *s;
    size_t len;
    int r = 0;

    if (!json_is_object(o) || !type)
        return ad_err_set(err, -EINVAL, "%s: expected an object with a type", w);
    if (depth > MAX_NESTING)
        return ad_err_set(err, -EINVAL, "%s: nested too deeply", w);
    if (strcmp(type, "ByteLevel") == 0) {
        d->type = TK_DEC_BYTELEVEL;
    } else if (strcmp(type, "ByteFallback") == 0) {
        d->type = TK_DEC_BYTE_FALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        d->type = TK_DEC_FUSE;
    } else if (strcmp(type, "Metaspace") == 0) {
        d->type = TK_DEC_METASPACE;
        r = j_char(o, "replacement", 0x2581, &d->ch, w, err);
        if (r >= 0)
            r = parse_prepend_scheme(o, &d->prepend, w, err);
    } else if (strcmp(type, "Strip") == 0) {
        d->type = TK_DEC_STRIP;
        r = j_char(o, "content", ' ', &d->ch, w, err);
        if (r >= 0)
            r = j_size(o, "start", 0, &d->start, w, err);
        if (r >= 0)
            r = j_size(o, "stop", 0, &d->stop, w, err);
    } else if (strcmp(type, "Replace") == 0) {
        const json_t *pat = json_object_get(o, "pattern");
        const json_t *ps = json_is_object(pat) ? json_object_get(pat, "String") : NULL;
        d->type = TK_DEC_REPLACE;
        if (!json_is_string(ps))
            return json_is_object(pat) && json_object_get(pat, "Regex")
                       ? unsupported(err, "decoder Replace pattern", "Regex")
                       : ad_err_set(err, -EINVAL, "%s.pattern: expected {\"String\": ...}", w);
        d->pat_len = json_string_length(ps);
        r = dup_mem(json_string_value(ps), d->pat_len, &d->pat);
        if (r >= 0)
            r = j_str(o, "content", &s, &len, w, err);
        if (r >= 0 && !s)
            r = ad_err_set(err, -EINVAL, "%s.content: missing", w);
        if (r >= 0) {
            d->content_len = len;
            r = dup_mem(s, len, &d->content);
        }
    } else if (strcmp(type, "BPEDecoder") == 0) {
        d->type = TK_DEC_BPE;
        r = j_str(o, "suffix", &s, &len, w, err);
        if (r >= 0 && !s) {
            s = "</w>";
            len = 4;
        }
        if (r >= 0) {
            d->pat_len = len;
            r = dup_mem(s, len, &d->pat);
        }
    } else if (strcmp(type, "Sequence") == 0) {
        const json_t *a = json_object_get(o, "decoders");
        d->type = TK_DEC_SEQUENCE;
        if (!json_is_array(a))
            return ad_err_set(err, -EINVAL, "%s.decoders: expected an array", w);
        d->subs = calloc(json_array_size(a) + 1, sizeof(*d->subs));
        if (!d->subs)
            return -ENOMEM;
        for (size_t i = 0; i < json_array_size(a) && r >= 0; i++) {
            d->n_subs = i + 1;
            r = parse_dec(json_array_get(a, i), &d->subs[i], depth + 1, err);
        }
    } else {
        return unsupported(err, "decoder", type);
    }
    return r;
}

/* Post-processors, flattened to one template for a single sequence. */
static int post_compose(struct ad_tokenizer *tok, const int32_t *tpl, size_t n_tpl)
{
    /* new = tpl with TK_POST_SEQ replaced by the current template */
    const int32_t seq = TK_POST_SEQ;
    const int32_t *cur = tok->post ? tok->post : &seq;
    size_t n_cur = tok->post ? tok->n_post : 1, n = 0, n_seq = 0;
    int32_t *np;

    for (size_t i = 0; i < n_tpl; i++)
        n_seq += tpl[i] == TK_POST_SEQ;
    if (n_tpl > 4096 || n_seq > 4 || n_cur > 4096)
        return -E2BIG;
    np = malloc((n_tpl + n_seq * n_cur + 1) * sizeof(*np));
    if (!np)
        return -ENOMEM;
    for (size_t i = 0; i < n_tpl; i++) {
        if (tpl[i] == TK_POST_SEQ) {
            memcpy(np + n, cur, n_cur * sizeof(*np));
            n += n_cur;
        } else {
            np[n++] = tpl[i];
        }
    }
    free(tok->post);
    tok->post = np;
    tok->n_post = n;
    return 0;
}

static int token_pair_id(const json_t *v, int32_t *ret, const char *where, struct ad_err *err)
{
    const json_t *id = json_array_get(v, 1);

    if (!json_is_array(v) || json_array_size(v) != 2 || !json_is_integer(id) ||
        json_integer_value(id) < 0 || json_integer_value(id) >= AD_TOKENIZER_MAX_VOCAB)
        return ad_err_set(err, -EINVAL, "%s: expected [\"token\", id]", where);
    *ret = (int32_t)json_integer_value(id);
    return 0;
}

static int parse_post(struct ad_tokenizer *tok, const json_t *o, int depth, struct ad_err *err)
{
    const char *type = j_type(o), *w = "tokenizer.json: post_processor";
    int32_t tpl[4096];
    size_t n = 0;
    int r = 0;

    if (!json_is_object(o) || !type)
        return ad_err_set(err, -EINVAL, "%s: expected an object with a type", w);
    if (depth > MAX_NESTING)
        return ad_err_set(err, -EINVAL, "%s: nested too deeply", w);
    if (strcmp(type, "ByteLevel") == 0) {
        tpl[n++] = TK_POST_SEQ;
    } else if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
        int32_t cls, sep;
        r = token_pair_id(json_object_get(o, "cls"), &cls, w, err);
        if (r >= 0)
            r = token_pair_id(json_object_get(o, "sep"), &sep, w, err);
        if (r < 0)
            return r;
        tpl[n++] = cls;
        tpl[n++] = TK_POST_SEQ;
        tpl[n++] = sep;
    } else if (strcmp(type, "TemplateProcessing") == 0) {
        const json_t *single = json_object_get(o, "single");
        const json_t *specials = json_object_get(o, "special_tokens");
        if (!json_is_array(single))
            return ad_err_set(err, -EINVAL, "%s.single: expected an array", w);
        for (size_t i = 0; i < json_array_size(single); i++) {
            const json_t *it = json_array_get(single, i), *st, *sq;
            st = json_object_get(it, "SpecialToken");
            sq = json_object_get(it, "Sequence");
            if (json_is_object(sq)) {
                const char *sid = json_string_value(json_object_get(sq, "id"));
                if (!sid || strcmp(sid, "A") != 0)
                    return ad_err_set(err, -EINVAL, "%s.single[%zu]: only sequence A", w, i);
                if (n >= 4)
                    return ad_err_set(err, -E2BIG, "%s.single: too many sequences", w);
                tpl[n++] = TK_POST_SEQ;
            } else if (json_is_object(st)) {
                const char *sid = json_string_value(json_object_get(st, "id"));
                const json_t *sp = sid ? json_object_get(specials, sid) : NULL;
                const json_t *ids = json_object_get(sp, "ids");
                if (!json_is_array(ids))
                    return ad_err_set(err, -EINVAL, "%s: special token '%s' is not defined", w,
                                      sid ? sid : "?");
                for (size_t k = 0; k < json_array_size(ids); k++) {
                    const json_t *v = json_array_get(ids, k);
                    if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                        json_integer_value(v) >= AD_TOKENIZER_MAX_VOCAB)
                        return ad_err_set(err, -EINVAL, "%s: special token '%s': bad id", w,
                                          sid);
                    if (n >= sizeof(tpl) / sizeof(tpl[0]))
                        return ad_err_set(err, -E2BIG, "%s.single: too long", w);
                    tpl[n++] = (int32_t)json_integer_value(v);
                }
            } else {
                return ad_err_set(err, -EINVAL, "%s.single[%zu]: expected SpecialToken or "
                                  "Sequence", w, i);
            }
        }
    } else if (strcmp(type, "Sequence") == 0) {
        const json_t *a = json_object_get(o, "processors");
        if (!json_is_array(a))
            return ad_err_set(err, -EINVAL, "%s.processors: expected an array", w);
        for (size_t i = 0; i < json_array_size(a) && r >= 0; i++)
            r = parse_post(tok, json_array_get(a, i), depth + 1, err);
        return r;
    } else {
        return unsupported(err, "post_processor", type);
    }
    r = post_compose(tok, tpl, n);
    if (r == -E2BIG)
        return ad_err_set(err, -E2BIG, "%s: template too long", w);
    return r;
}

/* ==========================================================================================
 * Vocabulary, merges, added tokens */

static int pool_put(struct ad_tokenizer *tok, const char *s, size_t len, uint32_t *ret_off)
{
    int r;

    if (tok->pool.len + len + 1 > UINT32_MAX || len > UINT32_MAX)
        return -E2BIG;
    *ret_off = (uint32_t)tok->pool.len;
    r = tk_buf_put(&tok->pool, s, len);
    if (r < 0)
        return r;
    tok->pool.len++; /* keep the NUL */
    return 0;
}

static int grow_toks(struct ad_tokenizer *tok, size_t n)
{
    struct tk_tok *nt;

    if (n <= tok->n_vocab)
        return 0;
    nt = realloc(tok->toks, n * sizeof(*nt));
    if (!nt)
        return -ENOMEM;
    memset(nt + tok->n_vocab, 0, (n - tok->n_vocab) * sizeof(*nt));
    tok->toks = nt;
    tok->n_vocab = n;
    return 0;
}

static int parse_vocab(struct ad_tokenizer *tok, const json_t *vocab, struct ad_err *err)
{
    const char *key;
    const json_t *v;
    int64_t max_id = -1;
    int r;

    if (!json_is_object(vocab))
        return ad_err_set(err, -EINVAL, "tokenizer.json: model.vocab: expected an object");
    json_object_foreach((json_t *)vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= AD_TOKENIZER_MAX_VOCAB)
            return ad_err_set(err, -EINVAL, "tokenizer.json: model.vocab['%.40s']: bad id", key);
        if (json_integer_value(v) > max_id)
            max_id = json_integer_value(v);
    }
    r = grow_toks(tok, (size_t)(max_id + 1));
    if (r < 0)
        return r;
    json_object_foreach((json_t *)vocab, key, v) {
        uint32_t off;
        size_t len = strlen(key);
        int32_t id = (int32_t)json_integer_value(v);
        r = pool_put(tok, key, len, &off);
        if (r >= 0)
            r = tk_map_put(&tok->vocab, tok->pool.p, off, (uint32_t)len, id);
        if (r < 0)
            return r;
        tok->toks[id].off = off;
        tok->toks[id].len = (uint32_t)len;
        tok->toks[id].flags |= TK_PRESENT;
    }
    return 0;
}

static int parse_merges(struct ad_tokenizer *tok, const json_t *merges, struct ad_err *err)
{
    struct tk_buf nt = {0};
    uint32_t rank = 0;
    bool meta_ok = true;
    int r;

    if (!merges || json_is_null(merges))
        return tk_merges_init(&tok->merges, 0);
    if (!json_is_array(merges))
        return ad_err_set(err, -EINVAL, "tokenizer.json: model.merges: expected an array");
    r = tk_merges_init(&tok->merges, json_array_size(merges));
    if (r < 0)
        return r;
    for (size_t i = 0; i < json_array_size(merges); i++) {
        const json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t al, bl;
        int32_t ia, ib, in;

        if (json_is_string(m)) {
            const char *s = json_string_value(m), *sp;
            size_t len = json_string_length(m);
            if (len >= 8 && memcmp(s, "#version", 8) == 0)
                continue;
            sp = memchr(s, ' ', len);
            if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp + 1 - s))) {
                r = ad_err_set(err, -EINVAL, "tokenizer.json: model.merges[%zu]: expected "
                               "\"left right\"", i);
                goto out;
            }
            a = s;
            al = (size_t)(sp - s);
            b = sp + 1;
            bl = len - al - 1;
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            al = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bl = json_string_length(json_array_get(m, 1));
        } else {
            r = ad_err_set(err, -EINVAL, "tokenizer.json: model.merges[%zu]: expected a string "
                           "or a pair of strings", i);
            goto out;
        }
        ia = tk_map_get(&tok->vocab, tok->pool.p, a, al);
        ib = tk_map_get(&tok->vocab, tok->pool.p, b, bl);
        if (ia < 0 || ib < 0 || bl < tok->prefix_len) {
            r = ad_err_set(err, -EINVAL, "tokenizer.json: model.merges[%zu]: token '%.40s' is "
                           "not in the vocabulary", i, ia < 0 ? a : b);
            goto out;
        }
        nt.len = 0;
        r = tk_buf_put(&nt, a, al);
        if (r >= 0)
            r = tk_buf_put(&nt, b + tok->prefix_len, bl - tok->prefix_len);
        if (r < 0)
            goto out;
        in = tk_map_get(&tok->vocab, tok->pool.p, nt.p, nt.len);
        if (in < 0) {
            r = ad_err_set(err, -EINVAL, "tokenizer.json: model.merges[%zu]: merged token "
                           "'%.40s' is not in the vocabulary", i, nt.p);
            goto out;
        }
        /* a merge whose right side starts with U+2581 and whose left side is not all U+2581
         * forbids cutting words before U+2581 */
        if (bl >= 3 && memcmp(b, "\xe2\x96\x81", 3) == 0) {
            for (size_t k = 0; k < al; k += 3)
                if (al - k < 3 || memcmp(a + k, "\xe2\x96\x81", 3) != 0)
                    meta_ok = false;
        }
        r = tk_merges_put(&tok->merges, ia, ib, rank++, in);
        if (r < 0)
            goto out;
    }
    r = 0;
    tok->meta_split = meta_ok && !tok->prefix && !tok->suffix && !tok->ignore_merges &&
                      tk_map_get(&tok->vocab, tok->pool.p, "\xe2\x96\x81", 3) >= 0;
out:
    tk_buf_fini(&nt);
    return r;
}

static int parse_model(struct ad_tokenizer *tok, const json_t *model, struct ad_err *err)
{
    const char *type = j_type(model), *s, *w = "tokenizer.json: model";
    const json_t *dropout;
    size_t len;
    int r;

    if (!json_is_object(model))
        return ad_err_set(err, -EINVAL, "%s: expected an object", w);
    if (type && strcmp(type, "BPE") != 0)
        return unsupported(err, "model", type);
    if (!type && !json_object_get(model, "merges"))
        return unsupported(err, "model", "(untyped, not BPE)");
    dropout = json_object_get(model, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0.0)
        return ad_err_set(err, -ENOTSUP, "%s: BPE dropout is not supported", w);
    r = j_bool(model, "fuse_unk", false, &tok->fuse_unk, w, err);
    if (r >= 0)
        r = j_bool(model, "byte_fallback", false, &tok->byte_fallback, w, err);
    if (r >= 0)
        r = j_bool(model, "ignore_merges", false, &tok->ignore_merges, w, err);
    if (r >= 0)
        r = j_str(model, "continuing_subword_prefix", &s, &len, w, err);
    if (r >= 0 && s && len) {
        tok->prefix_len = len;
        r = dup_mem(s, len, &tok->prefix);
    }
    if (r >= 0)
        r = j_str(model, "end_of_word_suffix", &s, &len, w, err);
    if (r >= 0 && s && len) {
        tok->suffix_len = len;
        r = dup_mem(s, len, &tok->suffix);
    }
    if (r >= 0)
        r = parse_vocab(tok, json_object_get(model, "vocab"), err);
    if (r >= 0)
        r = j_str(model, "unk_token", &s, &len, w, err);
    if (r < 0)
        return r;
    tok->unk_id = -1;
    if (s) {
        tok->has_unk = true;
        tok->unk_id = tk_map_get(&tok->vocab, tok->pool.p, s, len);
    }
    return parse_merges(tok, json_object_get(model, "merges"), err);
}

/* AddedVocabulary::add_tokens, including its id assignment (the "id" field of the file is
 * not what decides: the model vocabulary and the order of the list do). */
static int parse_added(struct ad_tokenizer *tok, const json_t *arr, struct ad_err *err)
{
    size_t n = json_array_size(arr);
    size_t model_size = tok->vocab.n;
    int32_t max_added = -1;
    struct tk_map seen = {0}; /* content -> index in added[] */
    int r = 0;

    if (arr && !json_is_null(arr) && !json_is_array(arr))
        return ad_err_set(err, -EINVAL, "tokenizer.json: added_tokens: expected an array");
    tok->added = calloc(n + 1, sizeof(*tok->added));
    if (!tok->added)
        return -ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const json_t *o = json_array_get(arr, i);
        char where[64];
        struct tk_added at = {0};
        const char *s;
        size_t len;
        int32_t id;
        uint32_t off;
        size_t k;

        snprintf(where, sizeof(where), "tokenizer.json: added_tokens[%zu]", i);
        if (!json_is_object(o)) {
            r = ad_err_set(err, -EINVAL, "%s: expected an object", where);
            goto out;
        }
        r = j_str(o, "content", &s, &len, where, err);
        if (r >= 0)
            r = j_bool(o, "special", false, &at.special, where, err);
        if (r >= 0)
            r = j_bool(o, "lstrip", false, &at.lstrip, where, err);
        if (r >= 0)
            r = j_bool(o, "rstrip", false, &at.rstrip, where, err);
        if (r >= 0)
            r = j_bool(o, "single_word", false, &at.single_word, where, err);
        if (r >= 0)
            r = j_bool(o, "normalized", !at.special, &at.normalized, where, err);
        if (r >= 0 && !s)
            r = ad_err_set(err, -EINVAL, "%s.content: missing", where);
        if (r < 0)
            goto out;
        if (len == 0)
            continue; /* Hugging Face ignores empty tokens */
        /* same content again: the later flags win, the id stays */
        k = tok->n_added;
        if (len <= UINT32_MAX) {
            int32_t kk = tk_map_get(&seen, tok->pool.p, s, len);
            if (kk >= 0)
                k = (size_t)kk;
        }
        if (k < tok->n_added) {
            at.id = tok->added[k].id;
            at.off = tok->added[k].off;
            at.len = tok->added[k].len;
            at.special |= tok->added[k].special; /* the special set only grows */
            tok->added[k] = at;
            continue;
        }
        id = tk_map_get(&tok->vocab, tok->pool.p, s, len);
        if (id < 0) {
            if (max_added < 0)
                id = (int32_t)model_size;
            else if ((size_t)max_added >= model_size || model_size == 0)
                id = max_added + 1;
            else
                id = (int32_t)model_size;
        }
        if (id >= AD_TOKENIZER_MAX_VOCAB) {
            r = ad_err_set(err, -E2BIG, "%s: too many tokens", where);
            goto out;
        }
        if (id > max_added)
            max_added = id;
        r = pool_put(tok, s, len, &off);
        if (r >= 0)
            r = tk_map_put(&seen, tok->pool.p, off, (uint32_t)len, (int32_t)tok->n_added);
        if (r < 0)
            goto out;
        at.id = id;
        at.off = off;
        at.len = (uint32_t)len;
        tok->added[tok->n_added++] = at;
    }
    for (size_t i = 0; i < tok->n_added; i++) {
        struct tk_added *at = &tok->added[i];
        r = grow_toks(tok, (size_t)at->id + 1);
        if (r >= 0)
            r = tk_map_put(&tok->added_map, tok->pool.p, at->off, at->len, at->id);
        if (r < 0)
            goto out;
        tok->toks[at->id].off = at->off;
        tok->toks[at->id].len = at->len;
        tok->toks[at->id].flags |= TK_PRESENT | TK_ADDED | (at->special ? TK_SPECIAL : 0);
    }
out:
    tk_map_fini(&seen);
    return r;
}

static int build_tries(struct ad_tokenizer *tok, struct ad_err *err)
{
    struct tk_buf nb = {0};
    int r = tk_trie_add(&tok->trie_raw, "", 0, -1);

    if (r >= 0)
        r = tk_trie_add(&tok->trie_norm, "", 0, -1);
    for (size_t i = 0; i < tok->n_added && r >= 0; i++) {
        struct tk_added *at = &tok->added[i];
        const char *s = tok->pool.p + at->off;
        if (!at->normalized) {
            r = tk_trie_add(&tok->trie_raw, s, at->len, (int32_t)i);
            continue;
        }
        nb.len = 0;
        if (tok->norm)
            r = tk_normalize(tok, tok->norm, s, at->len, true, &nb, err);
        else
            r = tk_buf_put(&nb, s, at->len);
        if (r >= 0 && nb.len)
            r = tk_trie_add(&tok->trie_norm, nb.p, nb.len, (int32_t)i);
    }
    tk_buf_fini(&nb);
    return r;
}

static int build_tables(struct ad_tokenizer *tok)
{
    char key[8];
    int r;

    for (int b = 0; b < 256; b++) {
        snprintf(key, sizeof(key), "<0x%02X>", b);
        tok->byte_ids[b] = tk_map_get(&tok->vocab, tok->pool.p, key, 6);
    }
    tok->bl_fast = !tok->prefix && !tok->suffix;
    for (int b = 0; b < 256; b++) {
        size_t l = tk_utf8_put(key, tk_byte_to_cp[b]);
        tok->bl_ids[b] = tk_map_get(&tok->vocab, tok->pool.p, key, l);
        if (tok->bl_ids[b] < 0)
            tok->bl_fast = false;
    }
    tok->dec_bytelevel_only = tok->dec && tok->dec->type == TK_DEC_BYTELEVEL;
    if (!tok->dec_bytelevel_only)
        return 0;
    for (size_t id = 0; id < tok->n_vocab; id++) {
        struct tk_tok *t = &tok->toks[id];
        const char *s = tok->pool.p + t->off;
        size_t start = tok->dpool.len, j = 0;
        bool ok = true;
        if (!(t->flags & TK_PRESENT))
            continue;
        r = tk_buf_reserve(&tok->dpool, t->len);
        if (r < 0)
            return r;
        while (j < t->len) {
            uint32_t cp;
            j += tk_utf8_next(s + j, t->len - j, &cp);
            int b = tk_cp_to_byte(cp);
            if (b < 0) {
                ok = false;
                break;
            }
            tok->dpool.p[tok->dpool.len++] = (char)b;
        }
        if (!ok) {
            tok->dpool.len = start;
            r = tk_buf_put(&tok->dpool, s, t->len);
            if (r < 0)
                return r;
        }
        if (tok->dpool.len > UINT32_MAX)
            return -E2BIG;
        t->doff = (uint32_t)start;
        t->dlen = (uint32_t)(tok->dpool.len - start);
    }
    return 0;
}

/* ==========================================================================================
 * tokenizer_config.json */

static int config_token(struct ad_tokenizer *tok, const json_t *cfg, const char *key,
                        int32_t *ret)
{
    const json_t *v = json_object_get(cfg, key);

    *ret = -1;
    if (json_is_object(v))
        v = json_object_get(v, "content"); /* the old AddedToken form */
    if (!json_is_string(v))
        return 0;
    *ret = ad_tokenizer_token_to_id(tok, json_string_value(v), json_string_length(v));
    return 0;
}

static int parse_config(struct ad_tokenizer *tok, const char *text, size_t len,
                        struct ad_err *err)
{
    json_error_t je;
    json_t *cfg = json_loadb(text, len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &je), *ct;
    int r = 0;

    if (!cfg)
        return ad_err_set(err, -EINVAL, "tokenizer_config.json: line %d column %d: %s", je.line,
                          je.column, je.text);
    if (!json_is_object(cfg)) {
        r = ad_err_set(err, -EINVAL, "tokenizer_config.json: expected an object");
        goto out;
    }
    config_token(tok, cfg, "bos_token", &tok->bos_id);
    config_token(tok, cfg, "eos_token", &tok->eos_id);
    tok->add_bos = json_is_true(json_object_get(cfg, "add_bos_token"));
    tok->add_eos = json_is_true(json_object_get(cfg, "add_eos_token"));
    ct = json_object_get(cfg, "chat_template");
    if (json_is_array(ct)) {
        /* [{"name": ..., "template": ...}]: the one named "default", else the first */
        json_t *pick = NULL;
        for (size_t i = 0; i < json_array_size(ct); i++) {
            json_t *e = json_array_get(ct, i);
            const char *name = json_string_value(json_object_get(e, "name"));
            if (!pick || (name && strcmp(name, "default") == 0))
                pick = e;
        }
        ct = json_object_get(pick, "template");
    }
    if (json_is_string(ct))
        r = dup_mem(json_string_value(ct), json_string_length(ct), &tok->chat_template);
out:
    json_decref(cfg);
    return r;
}

/* ==========================================================================================
 * Public API */

struct ad_tokenizer *ad_tokenizer_free(struct ad_tokenizer *tok)
{
    if (!tok)
        return NULL;
    tk_buf_fini(&tok->pool);
    tk_buf_fini(&tok->dpool);
    free(tok->toks);
    tk_map_fini(&tok->vocab);
    tk_map_fini(&tok->added_map);
    tk_merges_fini(&tok->merges);
    free(tok->prefix);
    free(tok->suffix);
    free(tok->added);
    tk_trie_fini(&tok->trie_raw);
    tk_trie_fini(&tok->trie_norm);
    tk_norm_free(tok->norm);
    tk_pre_free(tok->pre);
    tk_dec_free(tok->dec);
    free(tok->post);
    if (tok->mctx)
        pcre2_match_context_free(tok->mctx);
    tk_cache_free(tok->cache);
    free(tok->chat_template);
    free(tok);
    return NULL;
}

int ad_tokenizer_load_json(const char *json, size_t len, const char *config_json,
                           size_t config_len, struct ad_tokenizer **ret_tok, struct ad_err *err)
{
    struct ad_tokenizer *tok = NULL;
    json_error_t je;
    json_t *root = NULL, *v;
    int r;

    if (len > AD_TOKENIZER_MAX_JSON)
        return ad_err_set(err, -E2BIG, "tokenizer.json: larger than %u bytes",
                          AD_TOKENIZER_MAX_JSON);
    root = json_loadb(json, len, JSON_ALLOW_NUL, &je);
    if (!root)
        return ad_err_set(err, -EINVAL, "tokenizer.json: line %d column %d: %s", je.line,
                          je.column, je.text);
    if (!json_is_object(root)) {
        r = ad_err_set(err, -EINVAL, "tokenizer.json: expected an object");
        goto fail;
    }
    tok = calloc(1, sizeof(*tok));
    if (!tok) {
        r = -ENOMEM;
        goto fail;
    }
    tok->bos_id = tok->eos_id = tok->unk_id = -1;
    tok->mctx = pcre2_match_context_create(NULL);
    if (!tok->mctx) {
        r = -ENOMEM;
        goto fail;
    }
    pcre2_set_match_limit(tok->mctx, RE_MATCH_LIMIT);
    pcre2_set_depth_limit(tok->mctx, RE_DEPTH_LIMIT);

    v = json_object_get(root, "truncation");
    if (v && !json_is_null(v)) {
        r = ad_err_set(err, -ENOTSUP, "tokenizer.json: truncation is not supported");
        goto fail;
    }
    v = json_object_get(root, "padding");
    if (v && !json_is_null(v)) {
        r = ad_err_set(err, -ENOTSUP, "tokenizer.json: padding is not supported");
        goto fail;
    }
    r = parse_model(tok, json_object_get(root, "model"), err);
    if (r < 0)
        goto fail;
    v = json_object_get(root, "normalizer");
    if (v && !json_is_null(v)) {
        tok->norm = calloc(1, sizeof(*tok->norm));
        r = tok->norm ? parse_norm(v, tok->norm, 0, err) : -ENOMEM;
        if (r < 0)
            goto fail;
    }
    v = json_object_get(root, "pre_tokenizer");
    if (v && !json_is_null(v)) {
        tok->pre = calloc(1, sizeof(*tok->pre));
        r = tok->pre ? parse_pre(v, tok->pre, 0, err) : -ENOMEM;
        if (r < 0)
            goto fail;
    }
    v = json_object_get(root, "decoder");
    if (v && !json_is_null(v)) {
        tok->dec = calloc(1, sizeof(*tok->dec));
        r = tok->dec ? parse_dec(v, tok->dec, 0, err) : -ENOMEM;
        if (r < 0)
            goto fail;
    }
    v = json_object_get(root, "post_processor");
    if (v && !json_is_null(v)) {
        r = parse_post(tok, v, 0, err);
        if (r < 0)
            goto fail;
    }
    r = parse_added(tok, json_object_get(root, "added_tokens"), err);
    if (r < 0)
        goto fail;
    r = build_tries(tok, err);
    if (r < 0)
        goto fail;
    r = build_tables(tok);
    if (r < 0)
        goto fail;
    r = tk_cache_new(&tok->cache);
    if (r < 0)
        goto fail;
    if (config_json) {
        r = parse_config(tok, config_json, config_len, err);
        if (r < 0)
            goto fail;
    }
    json_decref(root);
    *ret_tok = tok;
    return 0;
fail:
    if (r == -ENOMEM)
        ad_err_set(err, -ENOMEM, "tokenizer.json: out of memory");
    json_decref(root);
    ad_tokenizer_free(tok);
    return r;
}

int ad_tokenizer_load(const char *dir, struct ad_tokenizer **ret_tok, struct ad_err *err)
{
    char path[4096];
    char *json = NULL, *cfg = NULL;
    size_t len = 0, cfg_len = 0;
    struct ad_err cerr;
    int r;

    r = ad_path_join(path, sizeof(path), dir, "tokenizer.json");
    if (r < 0)
        return ad_err_set(err, r, "%s: path too long", dir);
    r = ad_read_file(path, AD_TOKENIZER_MAX_JSON, &json, &len, err);
    if (r < 0)
        return r;
    r = ad_path_join(path, sizeof(path), dir, "tokenizer_config.json");
    if (r >= 0) {
        r = ad_read_file(path, 64u << 20, &cfg, &cfg_len, &cerr);
        if (r < 0 && r != -ENOENT) {
            if (err)
                *err = cerr;
            goto out;
        }
    }
    r = ad_tokenizer_load_json(json, len, cfg, cfg_len, ret_tok, err);
    if (r < 0)
        ad_err_prefix(err, "%s", dir);
out:
    free(json);
    free(cfg);
    return r;
}

size_t ad_tokenizer_n_vocab(const struct ad_tokenizer *tok)
{
    return tok->n_vocab;
}

int32_t ad_tokenizer_token_to_id(const struct ad_tokenizer *tok, const char *s, size_t len)
{
    int32_t id = tk_map_get(&tok->added_map, tok->pool.p, s, len);
    return id >= 0 ? id : tk_map_get(&tok->vocab, tok->pool.p, s, len);
}

const char *ad_tokenizer_id_to_token(const struct ad_tokenizer *tok, int32_t id,
                                     size_t *ret_len)
{
    if (id < 0 || (size_t)id >= tok->n_vocab || !(tok->toks[id].flags & TK_PRESENT))
        return NULL;
    if (ret_len)
        *ret_len = tok->toks[id].len;
    return tok->pool.p + tok->toks[id].off;
}

bool ad_tokenizer_is_special(const struct ad_tokenizer *tok, int32_t id)
{
    return id >= 0 && (size_t)id < tok->n_vocab && (tok->toks[id].flags & TK_SPECIAL);
}

int32_t ad_tokenizer_bos_id(const struct ad_tokenizer *tok)
{
    return tok->bos_id;
}

int32_t ad_tokenizer_eos_id(const struct ad_tokenizer *tok)
{
    return tok->eos_id;
}

bool ad_tokenizer_add_bos(const struct ad_tokenizer *tok)
{
    return tok->add_bos;
}

bool ad_tokenizer_add_eos(const struct ad_tokenizer *tok)
{
    return tok->add_eos;
}

const char *ad_tokenizer_chat_template(const struct ad_tokenizer *tok)
{
    return tok->chat_template;
}
