/* Encoding: added tokens, normalizers, pre-tokenizers, the BPE model and the post-processor,
 * in Hugging Face's order (TokenizerImpl::encode_single_sequence):
 *   1. split the raw text on the added tokens that match unnormalized text;
 *   2. normalize each remaining piece, then split it on the normalized added tokens;
 *   3. pre-tokenize each remaining piece into words;
 *   4. run the model on each word;
 *   5. add the post-processor's special tokens.
 * Pieces are (offset, length) views into one growing buffer of the call. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer_internal.h"

/* ==========================================================================================
 * Freeing components */

void tk_pattern_fini(struct tk_pattern *p)
{
    free(p->str);
    if (p->re)
        pcre2_code_free(p->re);
    memset(p, 0, sizeof(*p));
}

static void norm_fini(struct tk_norm *n)
{
    tk_pattern_fini(&n->pat);
    free(n->content);
    for (size_t i = 0; i < n->n_subs; i++)
        norm_fini(&n->subs[i]);
    free(n->subs);
}

void tk_norm_free(struct tk_norm *n)
{
    if (!n)
        return;
    norm_fini(n);
    free(n);
}

static void pre_fini(struct tk_pre *p)
{
    tk_pattern_fini(&p->pat);
    for (size_t i = 0; i < p->n_subs; i++)
        pre_fini(&p->subs[i]);
    free(p->subs);
}

void tk_pre_free(struct tk_pre *p)
{
    if (!p)
        return;
    pre_fini(p);
    free(p);
}

static void dec_fini(struct tk_dec *d)
{
    free(d->pat);
    free(d->content);
    for (size_t i = 0; i < d->n_subs; i++)
        dec_fini(&d->subs[i]);
    free(d->subs);
}

void tk_dec_free(struct tk_dec *d)
{
    if (!d)
        return;
    dec_fini(d);
    free(d);
}

/* ==========================================================================================
 * Added-token trie */

int tk_trie_add(struct tk_trie *t, const char *s, size_t len, int32_t term)
{
    int32_t cur = 0;

    if (!t->nodes) {
        t->nodes = malloc(64 * sizeof(*t->nodes));
        if (!t->nodes)
            return -ENOMEM;
        t->cap = 64;
        t->n = 1;
        t->nodes[0] = (struct tk_trie_node){.child = -1, .sibling = -1, .term = -1};
    }
    if (len == 0)
        return 0;
    t->first[(unsigned char)s[0] >> 3] |= (uint8_t)(1u << ((unsigned char)s[0] & 7));
    for (size_t i = 0; i < len; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = t->nodes[cur].child;
        while (c >= 0 && t->nodes[c].byte != b)
            c = t->nodes[c].sibling;
        if (c < 0) {
            if (t->n == t->cap) {
                struct tk_trie_node *nn = realloc(t->nodes, t->cap * 2 * sizeof(*nn));
                if (!nn)
                    return -ENOMEM;
                t->nodes = nn;
                t->cap *= 2;
            }
            if (t->n >= INT32_MAX)
                return -ENOMEM;
            c = (int32_t)t->n++;
            t->nodes[c] = (struct tk_trie_node){
                .child = -1, .sibling = t->nodes[cur].child, .term = -1, .byte = b};
            t->nodes[cur].child = c;
        }
        cur = c;
    }
    t->nodes[cur].term = term;
    return 0;
}

void tk_trie_fini(struct tk_trie *t)
{
    free(t->nodes);
    memset(t, 0, sizeof(*t));
}

/* Longest added token starting at s; returns its length (0 = none), *term its index. */
static size_t trie_longest(const struct tk_trie *t, const char *s, size_t len, int32_t *term)
{
    int32_t cur = 0;
    size_t best = 0;

    for (size_t i = 0; i < len; i++) {
        int32_t c = t->nodes[cur].child;
        while (c >= 0 && t->nodes[c].byte != (uint8_t)s[i])
            c = t->nodes[c].sibling;
        if (c < 0)
            break;
        cur = c;
        if (t->nodes[cur].term >= 0) {
            best = i + 1;
            *term = t->nodes[cur].term;
        }
    }
    return best;
}

/* ==========================================================================================
 * Work state of one encode() call */

struct tk_piece {
    size_t off, len;
    int32_t id;    /* >= 0: an added token, final */
    bool at_start; /* starts at offset 0 of the original text */
    bool bl;       /* raw bytes standing for their byte-level characters */
};

struct tk_pieces {
    struct tk_piece *v;
    size_t n, cap;
};

struct tk_span {
    size_t start, end;
    bool match;
};

struct tk_work {
    const struct ad_tokenizer *tok;
    struct tk_buf text;
    struct tk_buf scratch;
    struct tk_pieces a, b;
    struct tk_span *spans;
    size_t n_spans, cap_spans;
    pcre2_match_data *md;
    struct tk_bpe_scratch sc;
    struct tk_ids ids;
    struct ad_err *err;
};

static int piece_add(struct tk_pieces *p, struct tk_piece pc)
{
    if (pc.len == 0 && pc.id < 0)
        return 0; /* Hugging Face drops empty splits */
    if (p->n == p->cap) {
        size_t ncap = p->cap ? p->cap * 2 : 64;
        struct tk_piece *nv = realloc(p->v, ncap * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        p->v = nv;
        p->cap = ncap;
    }
    p->v[p->n++] = pc;
    return 0;
}

static int span_add(struct tk_work *w, size_t start, size_t end, bool match)
{
    if (w->n_spans == w->cap_spans) {
        size_t ncap = w->cap_spans ? w->cap_spans * 2 : 64;
        struct tk_span *ns = realloc(w->spans, ncap * sizeof(*ns));
        if (!ns)
            return -ENOMEM;
        w->spans = ns;
        w->cap_spans = ncap;
    }
    w->spans[w->n_spans++] = (struct tk_span){start, end, match};
    return 0;
}

/* Appends s (which must not point into w->text) to w->text; *ret_off is where it went. */
static int text_put(struct tk_work *w, const char *s, size_t len, size_t *ret_off)
{
    *ret_off = w->text.len;
    return tk_buf_put(&w->text, s, len);
}

/* ==========================================================================================
 * Added tokens: AddedVocabulary::find_matches */

static size_t ws_left_extent(const char *s, size_t start)
{
    /* start of the run of whitespace that ends at start */
    size_t i = start;
    while (i > 0) {
        size_t j = i - 1;
        uint32_t cp;
        while (j > 0 && ((unsigned char)s[j] & 0xc0) == 0x80)
            j--;
        tk_utf8_next(s + j, i - j, &cp);
        if (!tk_is_whitespace(cp))
            break;
        i = j;
    }
    return i;
}

static size_t ws_right_extent(const char *s, size_t len, size_t stop)
{
    size_t i = stop;
    while (i < len) {
        uint32_t cp;
        size_t cl = tk_utf8_next(s + i, len - i, &cp);
        if (!tk_is_whitespace(cp))
            break;
        i += cl;
    }
    return i;
}

static bool ends_with_word(const char *s, size_t end)
{
    size_t j = end;
    uint32_t cp;

    if (end == 0)
        return false;
    j--;
    while (j > 0 && ((unsigned char)s[j] & 0xc0) == 0x80)
        j--;
    tk_utf8_next(s + j, end - j, &cp);
    return tk_is_word(cp);
}

static bool starts_with_word(const char *s, size_t len, size_t start)
{
    uint32_t cp;

    if (start >= len)
        return false;
    tk_utf8_next(s + start, len - start, &cp);
    return tk_is_word(cp);
}

/* Splits piece pc (non-token) on the added tokens of trie t, appending to out. */
static int split_added(struct tk_work *w, const struct tk_trie *t, struct tk_piece pc,
                       struct tk_pieces *out)
{
    const struct ad_tokenizer *tok = w->tok;
    const char *s = w->text.p + pc.off;
    size_t len = pc.len, i = 0, start_offset = 0;
    int r;

    if (!t->nodes || t->nodes[0].child < 0)
        return piece_add(out, pc);
    while (i < len) {
        int32_t term = -1;
        size_t ml;

        if (!(t->first[(unsigned char)s[i] >> 3] & (1u << ((unsigned char)s[i] & 7)))) {
            i++;
            continue;
        }
        ml = trie_longest(t, s + i, len - i, &term);
        if (!ml) {
            i++;
            continue;
        }
        /* aho-corasick's leftmost-longest iterator: the next search starts at the match end */
        size_t start = i, stop = i + ml;
        const struct tk_added *at = &tok->added[term];
        i = stop;
        if (at->single_word) {
            bool start_space = start == 0 || !ends_with_word(s, start);
            bool stop_space = stop == len || !starts_with_word(s, len, stop);
            if (!start_space || !stop_space)
                continue;
        }
        if (at->lstrip) {
            size_t ns = ws_left_extent(s, start);
            start = ns > start_offset ? ns : start_offset;
        }
        if (at->rstrip)
            stop = ws_right_extent(s, len, stop);
        if (start_offset < start) {
            r = piece_add(out, (struct tk_piece){.off = pc.off + start_offset,
                                                 .len = start - start_offset,
                                                 .id = -1,
                                                 .at_start = pc.at_start && start_offset == 0});
            if (r < 0)
                return r;
        }
        r = piece_add(out, (struct tk_piece){.off = pc.off + start,
                                             .len = stop > start ? stop - start : 0,
                                             .id = at->id});
        if (r < 0)
            return r;
        start_offset = stop;
    }
    if (start_offset < len)
        return piece_add(out, (struct tk_piece){.off = pc.off + start_offset,
                                                .len = len - start_offset,
                                                .id = -1,
                                                .at_start = pc.at_start && start_offset == 0});
    return 0;
}

/* ==========================================================================================
 * Pattern matching: the (span, is_match) list that covers a string */

/* Regex matches with the onig crate's find_iter semantics (an empty match right after the
 * previous match is skipped by one character). */
static int spans_regex(struct tk_work *w, const pcre2_code *re, const char *s, size_t len)
{
    size_t pos = 0, prev = 0;
    bool have_last = false;
    size_t last_end = 0;
    int r;

    while (pos <= len) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK, w->md,
                             w->tok->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return ad_err_set(w->err, -EINVAL,
                              "tokenizer: regular expression failed (error %d)", rc);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        size_t ms = ov[0], me = ov[1];
        if (me < ms || ms < pos || me > len)
            me = ms; /* \K tricks: treat as empty */
        if (ms > len)
            break;
        if (ms == me && have_last && last_end == me) {
            uint32_t cp;
            pos += pos < len ? tk_utf8_next(s + pos, len - pos, &cp) : 1;
            continue;
        }
        if (prev != ms) {
            r = span_add(w, prev, ms, false);
            if (r < 0)
                return r;
        }
        r = span_add(w, ms, me, true);
        if (r < 0)
            return r;
        prev = me;
        pos = me;
        have_last = true;
        last_end = me;
    }
    if (prev != len)
        return span_add(w, prev, len, false);
    return 0;
}

static int spans_literal(struct tk_work *w, const char *pat, size_t plen, const char *s,
                         size_t len)
{
    size_t prev = 0, i = 0;
    int r;

    if (plen == 0)
        return span_add(w, 0, len, false);
    while (i + plen <= len) {
        const char *m = memmem(s + i, len - i, pat, plen);
        if (!m)
            break;
        size_t ms = (size_t)(m - s);
        if (prev != ms) {
            r = span_add(w, prev, ms, false);
            if (r < 0)
                return r;
        }
        r = span_add(w, ms, ms + plen, true);
        if (r < 0)
            return r;
        prev = i = ms + plen;
    }
    if (prev != len)
        return span_add(w, prev, len, false);
    return 0;
}

enum tk_charclass { CC_WHITESPACE, CC_NUMERIC, CC_PUNCT, CC_BERT_PUNCT, CC_CHAR };

static bool is_numeric(uint32_t cp)
{
    if (cp < 0x80)
        return cp >= '0' && cp <= '9';
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
        return true;
    default:
        return false;
    }
}

static bool cc_test(enum tk_charclass cc, uint32_t ch, uint32_t cp)
{
    switch (cc) {
    case CC_WHITESPACE:
        return tk_is_whitespace(cp);
    case CC_NUMERIC:
        return is_numeric(cp);
    case CC_PUNCT:
    case CC_BERT_PUNCT:
        return tk_is_punct(cp);
    case CC_CHAR:
        return cp == ch;
    }
    return false;
}

/* One span per matching character, as Hugging Face's Pattern for Fn(char) -> bool. */
static int spans_chars(struct tk_work *w, enum tk_charclass cc, uint32_t ch, const char *s,
                       size_t len)
{
    size_t prev = 0, i = 0;
    int r;

    while (i < len) {
        uint32_t cp;
        size_t cl = tk_utf8_next(s + i, len - i, &cp);
        if (cc_test(cc, ch, cp)) {
            if (prev < i) {
                r = span_add(w, prev, i, false);
                if (r < 0)
                    return r;
            }
            r = span_add(w, i, i + cl, true);
            if (r < 0)
                return r;
            prev = i + cl;
        }
        i += cl;
    }
    if (prev < len)
        return span_add(w, prev, len, false);
    return 0;
}

/* The Whitespace pre-tokenizer: \w+|[^\w\s]+ kept, the rest removed. */
static int spans_whitespace_words(struct tk_work *w, const char *s, size_t len)
{
    size_t i = 0, prev = 0;
    int r;

    while (i < len) {
        uint32_t cp;
        size_t cl = tk_utf8_next(s + i, len - i, &cp), j;
        if (tk_is_whitespace(cp)) {
            i += cl;
            continue;
        }
        bool word = tk_is_word(cp);
        for (j = i + cl; j < len;) {
            size_t l2 = tk_utf8_next(s + j, len - j, &cp);
            if (tk_is_whitespace(cp) || tk_is_word(cp) != word)
                break;
            j += l2;
        }
        if (prev < i) {
            r = span_add(w, prev, i, false);
            if (r < 0)
                return r;
        }
        r = span_add(w, i, j, true);
        if (r < 0)
            return r;
        prev = i = j;
    }
    if (prev < len)
        return span_add(w, prev, len, false);
    return 0;
}

/* NormalizedString::split: applies the behaviour to w->spans and appends the pieces. */
static int split_spans(struct tk_work *w, struct tk_piece pc, enum tk_behavior bh, bool invert,
                       struct tk_pieces *out)
{
    struct tk_span *sp = w->spans;
    size_t n = w->n_spans, k0 = 0, k1 = 0;
    bool prev_match = false;
    int r;

    if (invert)
        for (size_t i = 0; i < n; i++)
            sp[i].match = !sp[i].match;
    /* Fold in place; the kept spans end up in sp[k0..k1), with match meaning "remove". */
    switch (bh) {
    case TK_SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++)
            sp[i].match = false;
        k1 = n;
        break;
    case TK_SPLIT_REMOVED:
        k1 = n;
        break;
    case TK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            struct tk_span s = sp[i];
            if (k1 > 0 && s.match == prev_match)
                sp[k1 - 1].end = s.end;
            else
                sp[k1++] = (struct tk_span){s.start, s.end, false};
            prev_match = s.match;
        }
        break;
    case TK_SPLIT_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            struct tk_span s = sp[i];
            if (s.match && !prev_match && k1 > 0)
                sp[k1 - 1].end = s.end;
            else
                sp[k1++] = (struct tk_span){s.start, s.end, false};
            prev_match = s.match;
        }
        break;
    case TK_SPLIT_MERGED_NEXT:
        /* Hugging Face folds from the right */
        k0 = k1 = n;
        for (size_t i = n; i-- > 0;) {
            struct tk_span s = sp[i];
            if (s.match && !prev_match && k0 < n)
                sp[k0].start = s.start;
            else
                sp[--k0] = (struct tk_span){s.start, s.end, false};
            prev_match = s.match;
        }
        break;
    }
    for (size_t i = k0; i < k1; i++) {
        if (sp[i].match)
            continue; /* removed */
        r = piece_add(out, (struct tk_piece){.off = pc.off + sp[i].start,
                                             .len = sp[i].end - sp[i].start,
                                             .id = -1,
                                             .at_start = pc.at_start && sp[i].start == 0,
                                             .bl = pc.bl});
        if (r < 0)
            return r;
    }
    return 0;
}

/* ==========================================================================================
 * Normalizers */

static int norm_one(const struct ad_tokenizer *tok, const struct tk_norm *n, const char *s,
                    size_t len, struct tk_buf *out, pcre2_match_data *md, struct ad_err *err);

static bool all_ascii(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] >= 0x80)
            return false;
    return true;
}

static int norm_unicode(int options, const char *s, size_t len, struct tk_buf *out)
{
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t n;
    int r;

    if (all_ascii(s, len))
        return tk_buf_put(out, s, len);
    if (len > (size_t)INT32_MAX)
        return -E2BIG;
    n = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)len, &dst,
                     (utf8proc_option_t)(options | UTF8PROC_STABLE));
    if (n < 0)
        return n == UTF8PROC_ERROR_NOMEM ? -ENOMEM : -EINVAL;
    r = tk_buf_put(out, dst, (size_t)n);
    free(dst);
    return r;
}

static int norm_lowercase(const char *s, size_t len, struct tk_buf *out)
{
    size_t i = 0;
    int r = tk_buf_reserve(out, len * 2);

    if (r < 0)
        return r;
    while (i < len) {
        uint32_t cp;
        size_t cl = tk_utf8_next(s + i, len - i, &cp);
        char enc[8];
        size_t el;
        if (cp < 0x80) {
            enc[0] = (char)(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp);
            el = 1;
        } else if (cp == 0x130) {
            /* the one unconditional multi-character lowercase mapping */
            el = tk_utf8_put(enc, 'i');
            el += tk_utf8_put(enc + el, 0x307);
        } else {
            el = tk_utf8_put(enc, (uint32_t)utf8proc_tolower((utf8proc_int32_t)cp));
        }
        r = tk_buf_put(out, enc, el);
        if (r < 0)
            return r;
        i += cl;
    }
    return 0;
}

static int norm_replace(const struct ad_tokenizer *tok, const struct tk_norm *n, const char *s,
                        size_t len, struct tk_buf *out, pcre2_match_data *md, struct ad_err *err)
{
    size_t prev = 0, pos = 0, last_end = 0;
    bool have_last = false;
    int r;

    if (n->pat.kind == TK_PAT_STRING) {
        if (n->pat.len == 0)
            return tk_buf_put(out, s, len);
        while (pos + n->pat.len <= len) {
            const char *m = n->pat.len == 1 ? memchr(s + pos, n->pat.str[0], len - pos)
                                             : memmem(s + pos, len - pos, n->pat.str, n->pat.len);
            if (!m)
                break;
            size_t ms = (size_t)(m - s);
            r = tk_buf_put(out, s + prev, ms - prev);
            if (r >= 0)
                r = tk_buf_put(out, n->content, n->content_len);
            if (r < 0)
                return r;
            prev = pos = ms + n->pat.len;
        }
        return tk_buf_put(out, s + prev, len - prev);
    }
    while (pos <= len) {
        int rc = pcre2_match(n->pat.re, (PCRE2_SPTR)s, len, pos, PCRE2_NO_UTF_CHECK, md,
                             tok->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0)
            return ad_err_set(err, -EINVAL, "tokenizer: regular expression failed (error %d)",
                              rc);
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me < ms || ms < pos || me > len)
            me = ms;
        if (ms > len)
            break;
        if (ms == me && have_last && last_end == me) {
            uint32_t cp;
            pos += pos < len ? tk_utf8_next(s + pos, len - pos, &cp) : 1;
            continue;
        }
        r = tk_buf_put(out, s + prev, ms - prev);
        if (r >= 0)
            r = tk_buf_put(out, n->content, n->content_len);
        if (r < 0)
            return r;
        prev = pos = me;
        have_last = true;
        last_end = me;
    }
    return tk_buf_put(out, s + prev, len - prev);
}

static int norm_one(const struct ad_tokenizer *tok, const struct tk_norm *n, const char *s,
                    size_t len, struct tk_buf *out, pcre2_match_data *md, struct ad_err *err)
{
    struct tk_buf t1 = {0}, t2 = {0};
    size_t a, b;
    int r = 0;

    switch (n->type) {
    case TK_NORM_NFC:
        return norm_unicode(UTF8PROC_COMPOSE, s, len, out);
    case TK_NORM_NFD:
        return norm_unicode(UTF8PROC_DECOMPOSE, s, len, out);
    case TK_NORM_NFKC:
        return norm_unicode(UTF8PROC_COMPOSE | UTF8PROC_COMPAT, s, len, out);
    case TK_NORM_NFKD:
        return norm_unicode(UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT, s, len, out);
    case TK_NORM_LOWERCASE:
        return norm_lowercase(s, len, out);
    case TK_NORM_STRIP:
        a = 0;
        b = len;
        if (n->strip_left) {
            a = ws_right_extent(s, len, 0);
        }
        if (n->strip_right && b > a) {
            b = ws_left_extent(s, len);
            if (b < a)
                b = a;
        }
        return tk_buf_put(out, s + a, b - a);
    case TK_NORM_PREPEND:
        if (len == 0)
            return 0;
        r = tk_buf_put(out, n->content, n->content_len);
        return r < 0 ? r : tk_buf_put(out, s, len);
    case TK_NORM_APPEND:
        if (len == 0)
            return 0;
        r = tk_buf_put(out, s, len);
        return r < 0 ? r : tk_buf_put(out, n->content, n->content_len);
    case TK_NORM_REPLACE:
        return norm_replace(tok, n, s, len, out, md, err);
    case TK_NORM_BYTELEVEL:
        r = tk_buf_reserve(out, len * 2);
        if (r < 0)
            return r;
        for (size_t i = 0; i < len; i++)
            out->len += tk_utf8_put(out->p + out->len, tk_byte_to_cp[(unsigned char)s[i]]);
        out->p[out->len] = '\0';
        return 0;
    case TK_NORM_SEQUENCE:
        if (n->n_subs == 0)
            return tk_buf_put(out, s, len);
        for (size_t i = 0; i < n->n_subs; i++) {
            struct tk_buf *dst = i + 1 == n->n_subs ? out : (i % 2 ? &t2 : &t1);
            const char *src = i == 0 ? s : (i % 2 ? t1.p : t2.p);
            size_t slen = i == 0 ? len : (i % 2 ? t1.len : t2.len);
            if (dst != out)
                dst->len = 0;
            r = norm_one(tok, &n->subs[i], src ? src : "", slen, dst, md, err);
            if (r < 0)
                break;
        }
        tk_buf_fini(&t1);
        tk_buf_fini(&t2);
        return r;
    }
    return -EINVAL;
}

int tk_normalize(const struct ad_tokenizer *tok, const struct tk_norm *n, const char *s,
                 size_t len, bool at_start, struct tk_buf *out, struct ad_err *err)
{
    pcre2_match_data *md = pcre2_match_data_create(1, NULL);
    int r;

    (void)at_start;
    if (!md)
        return -ENOMEM;
    r = norm_one(tok, n, s, len, out, md, err);
    pcre2_match_data_free(md);
    return r;
}

/* ==========================================================================================
 * Pre-tokenizers */

/* Replaces a byte-level piece's raw bytes by their byte-level characters. */
static int materialize(struct tk_work *w, struct tk_piece *pc)
{
    struct tk_buf *sc = &w->scratch;
    int r;

    if (!pc->bl)
        return 0;
    sc->len = 0;
    r = tk_buf_reserve(sc, pc->len * 2);
    if (r < 0)
        return r;
    for (size_t i = 0; i < pc->len; i++)
        sc->len += tk_utf8_put(sc->p + sc->len,
                               tk_byte_to_cp[(unsigned char)w->text.p[pc->off + i]]);
    r = text_put(w, sc->p, sc->len, &pc->off);
    pc->len = sc->len;
    pc->bl = false;
    return r;
}

static int pre_apply(struct tk_work *w, const struct tk_pre *p, const struct tk_pieces *in,
                     struct tk_pieces *out);

static int pre_sequence(struct tk_work *w, const struct tk_pre *p, const struct tk_pieces *in,
                        struct tk_pieces *out)
{
    struct tk_pieces t[2] = {{0}};
    const struct tk_pieces *src = in;
    int r = 0;

    if (p->n_subs == 0) {
        for (size_t i = 0; i < in->n && r >= 0; i++)
            r = piece_add(out, in->v[i]);
        return r;
    }
    for (size_t i = 0; i < p->n_subs; i++) {
        struct tk_pieces *dst = i + 1 == p->n_subs ? out : &t[i % 2];
        dst->n = 0;
        r = pre_apply(w, &p->subs[i], src, dst);
        if (r < 0)
            break;
        src = dst;
    }
    free(t[0].v);
    free(t[1].v);
    return r;
}

static int pre_piece(struct tk_work *w, const struct tk_pre *p, struct tk_piece pc,
                     struct tk_pieces *out)
{
    struct tk_buf *sc = &w->scratch;
    char enc[4];
    size_t el;
    int r;

    r = materialize(w, &pc);
    if (r < 0)
        return r;
    w->n_spans = 0;
    switch (p->type) {
    case TK_PRE_BYTELEVEL:
        if (p->add_prefix_space && (pc.len == 0 || w->text.p[pc.off] != ' ')) {
            sc->len = 0;
            r = tk_buf_put(sc, " ", 1);
            if (r >= 0)
                r = tk_buf_put(sc, w->text.p + pc.off, pc.len);
            if (r >= 0)
                r = text_put(w, sc->p, sc->len, &pc.off);
            if (r < 0)
                return r;
            pc.len = sc->len;
        }
        pc.bl = true;
        if (!p->use_regex)
            return piece_add(out, pc);
        r = spans_regex(w, p->pat.re, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, TK_SPLIT_ISOLATED, false, out);
    case TK_PRE_SPLIT:
        if (p->pat.kind == TK_PAT_REGEX)
            r = spans_regex(w, p->pat.re, w->text.p + pc.off, pc.len);
        else
            r = spans_literal(w, p->pat.str, p->pat.len, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, p->behavior, p->invert, out);
    case TK_PRE_METASPACE: {
        const char *s = w->text.p + pc.off;
        bool starts;
        el = tk_utf8_put(enc, p->ch);
        sc->len = 0;
        r = tk_buf_reserve(sc, pc.len * el + el);
        if (r < 0)
            return r;
        for (size_t i = 0; i < pc.len; i++) {
            if (s[i] == ' ') {
                memcpy(sc->p + sc->len, enc, el);
                sc->len += el;
            } else {
                sc->p[sc->len++] = s[i];
            }
        }
        starts = sc->len >= el && memcmp(sc->p, enc, el) == 0;
        if (!starts && (p->prepend == TK_PREPEND_ALWAYS ||
                        (p->prepend == TK_PREPEND_FIRST && pc.at_start))) {
            memmove(sc->p + el, sc->p, sc->len);
            memcpy(sc->p, enc, el);
            sc->len += el;
        }
        r = text_put(w, sc->p, sc->len, &pc.off);
        if (r < 0)
            return r;
        pc.len = sc->len;
        if (!p->split)
            return piece_add(out, pc);
        r = spans_chars(w, CC_CHAR, p->ch, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, TK_SPLIT_MERGED_NEXT, false, out);
    }
    case TK_PRE_DIGITS:
        r = spans_chars(w, CC_NUMERIC, 0, w->text.p + pc.off, pc.len);
        return r < 0 ? r
                     : split_spans(w, pc,
                                   p->individual_digits ? TK_SPLIT_ISOLATED : TK_SPLIT_CONTIGUOUS,
                                   false, out);
    case TK_PRE_WHITESPACE:
        r = spans_whitespace_words(w, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, TK_SPLIT_REMOVED, true, out);
    case TK_PRE_WHITESPACE_SPLIT:
        r = spans_chars(w, CC_WHITESPACE, 0, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, TK_SPLIT_REMOVED, false, out);
    case TK_PRE_PUNCTUATION:
        r = spans_chars(w, CC_PUNCT, 0, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, p->behavior, false, out);
    case TK_PRE_CHAR_DELIMITER:
        r = spans_chars(w, CC_CHAR, p->ch, w->text.p + pc.off, pc.len);
        return r < 0 ? r : split_spans(w, pc, TK_SPLIT_REMOVED, false, out);
    case TK_PRE_BERT: {
        struct tk_pieces tmp = {0};
        r = spans_chars(w, CC_WHITESPACE, 0, w->text.p + pc.off, pc.len);
        if (r >= 0)
            r = split_spans(w, pc, TK_SPLIT_REMOVED, false, &tmp);
        for (size_t i = 0; i < tmp.n && r >= 0; i++) {
            w->n_spans = 0;
            r = spans_chars(w, CC_BERT_PUNCT, 0, w->text.p + tmp.v[i].off, tmp.v[i].len);
            if (r >= 0)
                r = split_spans(w, tmp.v[i], TK_SPLIT_ISOLATED, false, out);
        }
        free(tmp.v);
        return r;
    }
    case TK_PRE_SEQUENCE:
        break; /* handled by pre_apply */
    }
    return -EINVAL;
}

static int pre_apply(struct tk_work *w, const struct tk_pre *p, const struct tk_pieces *in,
                     struct tk_pieces *out)
{
    int r = 0;

    if (p->type == TK_PRE_SEQUENCE)
        return pre_sequence(w, p, in, out);
    for (size_t i = 0; i < in->n && r >= 0; i++) {
        if (in->v[i].id >= 0)
            r = piece_add(out, in->v[i]);
        else
            r = pre_piece(w, p, in->v[i], out);
    }
    return r;
}

/* ==========================================================================================
 * encode() */

static void work_fini(struct tk_work *w)
{
    tk_buf_fini(&w->text);
    tk_buf_fini(&w->scratch);
    free(w->a.v);
    free(w->b.v);
    free(w->spans);
    if (w->md)
        pcre2_match_data_free(w->md);
    tk_bpe_scratch_fini(&w->sc);
    free(w->ids.v);
}

int ad_tokenizer_encode(const struct ad_tokenizer *tok, const char *text, size_t len,
                        bool add_special_tokens, int32_t **ret_ids, size_t *ret_n,
                        struct ad_err *err)
{
    struct tk_work w = {.tok = tok, .err = err};
    struct tk_pieces *cur, *nxt, *t;
    size_t off;
    int r;

    if (len > AD_TOKENIZER_MAX_TEXT)
        return ad_err_set(err, -E2BIG, "tokenizer: text of %zu bytes is over the limit of %u",
                          len, AD_TOKENIZER_MAX_TEXT);
    if (len && !text)
        return ad_err_set(err, -EINVAL, "tokenizer: NULL text");
    /* 0. invalid UTF-8 becomes U+FFFD */
    if (tk_utf8_valid_prefix(text, len) == len)
        r = text_put(&w, len ? text : "", len, &off);
    else
        r = tk_utf8_lossy(&w.text, text, len, true, NULL);
    if (r < 0)
        goto fail;
    w.md = pcre2_match_data_create(1, NULL);
    if (!w.md) {
        r = -ENOMEM;
        goto fail;
    }
    cur = &w.a;
    nxt = &w.b;
    r = piece_add(cur, (struct tk_piece){.off = 0, .len = w.text.len, .id = -1, .at_start = true});
    if (r < 0)
        goto fail;

    /* 1. added tokens matched on the raw text */
    for (size_t i = 0; i < cur->n; i++) {
        r = split_added(&w, &tok->trie_raw, cur->v[i], nxt);
        if (r < 0)
            goto fail;
    }
    t = cur, cur = nxt, nxt = t;
    nxt->n = 0;

    /* 2. normalizer, then the normalized added tokens */
    for (size_t i = 0; i < cur->n; i++) {
        struct tk_piece pc = cur->v[i];
        if (pc.id >= 0) {
            r = piece_add(nxt, pc);
        } else {
            if (tok->norm) {
                w.scratch.len = 0;
                r = norm_one(tok, tok->norm, w.text.p + pc.off, pc.len, &w.scratch, w.md, err);
                if (r >= 0)
                    r = text_put(&w, w.scratch.p ? w.scratch.p : "", w.scratch.len, &pc.off);
                pc.len = w.scratch.len;
                if (r < 0)
                    goto fail;
            }
            r = split_added(&w, &tok->trie_norm, pc, nxt);
        }
        if (r < 0)
            goto fail;
    }
    t = cur, cur = nxt, nxt = t;
    nxt->n = 0;

    /* 3. pre-tokenizer */
    if (tok->pre) {
        r = pre_apply(&w, tok->pre, cur, nxt);
        if (r < 0)
            goto fail;
        t = cur, cur = nxt, nxt = t;
    }

    /* 4. model, 5. post-processor */
    for (size_t k = 0; k < (add_special_tokens && tok->post ? tok->n_post : 1); k++) {
        if (add_special_tokens && tok->post && tok->post[k] != TK_POST_SEQ) {
            r = tk_ids_push(&w.ids, tok->post[k]);
            if (r < 0)
                goto fail;
            continue;
        }
        for (size_t i = 0; i < cur->n; i++) {
            const struct tk_piece *pc = &cur->v[i];
            if (pc->id >= 0)
                r = tk_ids_push(&w.ids, pc->id);
            else
                r = tk_bpe_word(tok, &w.sc, w.text.p + pc->off, pc->len, pc->bl, &w.ids);
            if (r == -EINVAL)
                r = ad_err_set(err, -EINVAL, "tokenizer: unk_token is not in the vocabulary");
            if (r < 0)
                goto fail;
        }
    }
    if (!w.ids.v) {
        w.ids.v = malloc(sizeof(int32_t));
        if (!w.ids.v) {
            r = -ENOMEM;
            goto fail;
        }
    }
    *ret_ids = w.ids.v;
    *ret_n = w.ids.n;
    w.ids.v = NULL;
    work_fini(&w);
    return 0;
fail:
    if (r == -ENOMEM)
        ad_err_set(err, -ENOMEM, "tokenizer: out of memory");
    work_fini(&w);
    return r;
}
