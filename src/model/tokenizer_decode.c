/* Decoding: ids -> token strings -> the decoder chain (Hugging Face's decode_chain, decoder by
 * decoder) -> one string; and the streaming detokenizer. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

/* ==========================================================================================
 * A list of strings in one buffer */

struct strlist {
    struct tk_buf buf;
    size_t *off, *len;
    size_t n, cap;
};

static int sl_add(struct strlist *l, const char *s, size_t len)
{
    int r;

    if (l->n == l->cap) {
        size_t ncap = l->cap ? l->cap * 2 : 64;
        size_t *no = realloc(l->off, ncap * sizeof(*no));
        if (!no)
            return -ENOMEM;
        l->off = no;
        size_t *nl = realloc(l->len, ncap * sizeof(*nl));
        if (!nl)
            return -ENOMEM;
        l->len = nl;
        l->cap = ncap;
    }
    l->off[l->n] = l->buf.len;
    l->len[l->n] = len;
    r = tk_buf_put(&l->buf, len ? s : "", len);
    if (r < 0)
        return r;
    l->n++;
    return 0;
}

/* Starts a new entry that the caller fills with tk_buf_put(&l->buf, ...) then sl_end(). */
static int sl_begin(struct strlist *l)
{
    return sl_add(l, "", 0);
}

static void sl_end(struct strlist *l)
{
    l->len[l->n - 1] = l->buf.len - l->off[l->n - 1];
}

static void sl_fini(struct strlist *l)
{
    tk_buf_fini(&l->buf);
    free(l->off);
    free(l->len);
    memset(l, 0, sizeof(*l));
}

static void sl_swap(struct strlist *a, struct strlist *b)
{
    struct strlist t = *a;
    *a = *b;
    *b = t;
}

/* ==========================================================================================
 * Decoders */

static int byte_token(const char *s, size_t len)
{
    /* "<0xAB>": Rust's u8::from_str_radix(&s[3..5], 16) accepts a leading '+' */
    int v = 0;

    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    for (size_t i = 3; i < 5; i++) {
        char c = s[i];
        int d;
        if (i == 3 && c == '+')
            continue;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static int dec_apply(const struct tk_dec *d, struct strlist *in, struct strlist *out, bool last);

static int dec_bytelevel(struct strlist *in, struct strlist *out, bool last)
{
    struct tk_buf raw = {0};
    int r = 0;

    for (size_t i = 0; i < in->n && r >= 0; i++) {
        const char *s = in->buf.p + in->off[i];
        size_t len = in->len[i], j = 0, start = raw.len;
        bool ok = true;
        r = tk_buf_reserve(&raw, len);
        if (r < 0)
            break;
        while (j < len) {
            uint32_t cp;
            j += tk_utf8_next(s + j, len - j, &cp);
            int b = tk_cp_to_byte(cp);
            if (b < 0) {
                ok = false;
                break;
            }
            raw.p[raw.len++] = (char)b;
        }
        if (!ok) {
            raw.len = start;
            r = tk_buf_put(&raw, s, len);
        }
    }
    if (r >= 0) {
        r = sl_begin(out);
        if (r >= 0 && last)
            r = tk_buf_put(&out->buf, raw.p ? raw.p : "", raw.len);
        else if (r >= 0)
            r = tk_utf8_lossy(&out->buf, raw.p ? raw.p : "", raw.len, true, NULL);
        if (r >= 0)
            sl_end(out);
    }
    tk_buf_fini(&raw);
    return r;
}

static int dec_byte_fallback(struct strlist *in, struct strlist *out)
{
    char bytes[256];
    size_t nb = 0;
    struct tk_buf big = {0};
    int r = 0;

    for (size_t i = 0; i <= in->n && r >= 0; i++) {
        int b = i < in->n ? byte_token(in->buf.p + in->off[i], in->len[i]) : -1;
        if (b >= 0) {
            if (nb == sizeof(bytes)) {
                r = tk_buf_put(&big, bytes, nb);
                nb = 0;
            }
            bytes[nb++] = (char)b;
            continue;
        }
        if (nb || big.len) {
            r = r < 0 ? r : tk_buf_put(&big, bytes, nb);
            nb = 0;
            if (r < 0)
                break;
            if (tk_utf8_valid_prefix(big.p, big.len) == big.len) {
                r = sl_add(out, big.p, big.len);
            } else {
                for (size_t k = 0; k < big.len && r >= 0; k++)
                    r = sl_add(out, "\xef\xbf\xbd", 3);
            }
            big.len = 0;
        }
        if (i < in->n && r >= 0)
            r = sl_add(out, in->buf.p + in->off[i], in->len[i]);
    }
    tk_buf_fini(&big);
    return r;
}

static int dec_apply(const struct tk_dec *d, struct strlist *in, struct strlist *out, bool last)
{
    char enc[4];
    size_t el;
    int r = 0;

    switch (d->type) {
    case TK_DEC_BYTELEVEL:
        return dec_bytelevel(in, out, last);
    case TK_DEC_BYTE_FALLBACK:
        return dec_byte_fallback(in, out);
    case TK_DEC_FUSE:
        r = sl_begin(out);
        for (size_t i = 0; i < in->n && r >= 0; i++)
            r = tk_buf_put(&out->buf, in->buf.p + in->off[i], in->len[i]);
        if (r >= 0)
            sl_end(out);
        return r;
    case TK_DEC_METASPACE:
        el = tk_utf8_put(enc, d->ch);
        for (size_t i = 0; i < in->n && r >= 0; i++) {
            const char *s = in->buf.p + in->off[i];
            size_t len = in->len[i], j = 0;
            bool drop = i == 0 && d->prepend != TK_PREPEND_NEVER;
            r = sl_begin(out);
            while (j < len && r >= 0) {
                if (len - j >= el && memcmp(s + j, enc, el) == 0) {
                    if (!drop)
                        r = tk_buf_put(&out->buf, " ", 1);
                    j += el;
                } else {
                    r = tk_buf_put(&out->buf, s + j, 1);
                    j++;
                }
            }
            if (r >= 0)
                sl_end(out);
        }
        return r;
    case TK_DEC_REPLACE:
    case TK_DEC_BPE:
        for (size_t i = 0; i < in->n && r >= 0; i++) {
            const char *s = in->buf.p + in->off[i];
            size_t len = in->len[i], j = 0, prev = 0;
            const char *rep = d->type == TK_DEC_BPE ? (i + 1 == in->n ? "" : " ") : d->content;
            size_t rl = d->type == TK_DEC_BPE ? strlen(rep) : d->content_len;
            r = sl_begin(out);
            while (r >= 0 && d->pat_len && j + d->pat_len <= len) {
                const char *m = memmem(s + j, len - j, d->pat, d->pat_len);
                if (!m)
                    break;
                size_t ms = (size_t)(m - s);
                r = tk_buf_put(&out->buf, s + prev, ms - prev);
                if (r >= 0)
                    r = tk_buf_put(&out->buf, rep, rl);
                prev = j = ms + d->pat_len;
            }
            if (r >= 0)
                r = tk_buf_put(&out->buf, s + prev, len - prev);
            if (r >= 0)
                sl_end(out);
        }
        return r;
    case TK_DEC_STRIP:
        el = tk_utf8_put(enc, d->ch);
        for (size_t i = 0; i < in->n && r >= 0; i++) {
            const char *s = in->buf.p + in->off[i];
            size_t len = in->len[i], a = 0, b = len;
            for (size_t k = 0; k < d->start && len - a >= el && memcmp(s + a, enc, el) == 0; k++)
                a += el;
            for (size_t k = 0; k < d->stop && b - a >= el && memcmp(s + b - el, enc, el) == 0;
                 k++)
                b -= el;
            r = sl_add(out, s + a, b - a);
        }
        return r;
    case TK_DEC_SEQUENCE: {
        struct strlist t[2];
        struct strlist *src = in;
        memset(t, 0, sizeof(t));
        if (d->n_subs == 0) {
            for (size_t i = 0; i < in->n && r >= 0; i++)
                r = sl_add(out, in->buf.p + in->off[i], in->len[i]);
            return r;
        }
        for (size_t i = 0; i < d->n_subs && r >= 0; i++) {
            struct strlist *dst = i + 1 == d->n_subs ? out : &t[i % 2];
            if (dst != out) {
                dst->n = 0;
                dst->buf.len = 0;
            }
            r = dec_apply(&d->subs[i], src, dst, last && i + 1 == d->n_subs);
            src = dst;
        }
        sl_fini(&t[0]);
        sl_fini(&t[1]);
        return r;
    }
    }
    return -EINVAL;
}

static bool skipped(const struct ad_tokenizer *tok, int32_t id, bool skip_special)
{
    if (id < 0 || (size_t)id >= tok->n_vocab || !(tok->toks[id].flags & TK_PRESENT))
        return true;
    return skip_special && (tok->toks[id].flags & TK_SPECIAL);
}

int tk_decode_raw(const struct ad_tokenizer *tok, const int32_t *ids, size_t n,
                  bool skip_special, struct tk_buf *out)
{
    struct strlist a, b;
    int r = 0;

    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));

    if (tok->dec_bytelevel_only) {
        for (size_t i = 0; i < n && r >= 0; i++) {
            if (skipped(tok, ids[i], skip_special))
                continue;
            const struct tk_tok *t = &tok->toks[ids[i]];
            r = tk_buf_put(out, tok->dpool.p + t->doff, t->dlen);
        }
        return r;
    }
    for (size_t i = 0; i < n && r >= 0; i++) {
        if (skipped(tok, ids[i], skip_special))
            continue;
        const struct tk_tok *t = &tok->toks[ids[i]];
        r = sl_add(&a, tok->pool.p + t->off, t->len);
    }
    if (r >= 0 && tok->dec) {
        r = dec_apply(tok->dec, &a, &b, true);
        sl_swap(&a, &b);
    }
    for (size_t i = 0; i < a.n && r >= 0; i++) {
        if (i > 0 && !tok->dec)
            r = tk_buf_put(out, " ", 1); /* no decoder: tokens joined by spaces */
        if (r >= 0)
            r = tk_buf_put(out, a.buf.p + a.off[i], a.len[i]);
    }
    sl_fini(&a);
    sl_fini(&b);
    return r;
}

int ad_tokenizer_decode(const struct ad_tokenizer *tok, const int32_t *ids, size_t n,
                        bool skip_special_tokens, char **ret_text, size_t *ret_len)
{
    struct tk_buf raw = {0}, out = {0};
    int r;

    r = tk_decode_raw(tok, ids, n, skip_special_tokens, &raw);
    if (r >= 0)
        r = tk_utf8_lossy(&out, raw.p ? raw.p : "", raw.len, true, NULL);
    tk_buf_fini(&raw);
    if (r < 0) {
        tk_buf_fini(&out);
        return r;
    }
    *ret_text = out.p;
    if (ret_len)
        *ret_len = out.len;
    return 0;
}

/* ==========================================================================================
 * Streaming */

static bool dec_has(const struct tk_dec *d, enum tk_dec_type type, size_t *strip_start,
                    size_t *strip_stop, uint32_t *strip_ch)
{
    bool found = false;

    if (!d)
        return false;
    if (d->type == type) {
        if (type == TK_DEC_STRIP) {
            *strip_start = d->start > *strip_start ? d->start : *strip_start;
            *strip_stop = d->stop > *strip_stop ? d->stop : *strip_stop;
            *strip_ch = d->ch;
        }
        return true;
    }
    for (size_t i = 0; i < d->n_subs; i++)
        found |= dec_has(&d->subs[i], type, strip_start, strip_stop, strip_ch);
    return found;
}

void ad_detok_init(struct ad_detok *d, const struct ad_tokenizer *tok, bool skip_special_tokens)
{
    memset(d, 0, sizeof(*d));
    d->tok = tok;
    d->skip_special_tokens = skip_special_tokens;
}

void ad_detok_fini(struct ad_detok *d)
{
    free(d->ids);
    free(d->raw);
    free(d->out);
    memset(d, 0, sizeof(*d));
}

static int window_raw(struct ad_detok *d, size_t n, size_t *ret_len)
{
    struct tk_buf b = {.p = d->raw, .len = 0, .cap = d->raw_cap};
    int r = tk_decode_raw(d->tok, d->ids, n, d->skip_special_tokens, &b);

    d->raw = b.p;
    d->raw_cap = b.cap;
    d->raw_len = b.len;
    *ret_len = b.len;
    return r;
}

/* Converts pend + raw[from..to) to text in d->out; an incomplete tail goes back to pend. */
static int emit(struct ad_detok *d, const char *s, size_t len, bool final)
{
    struct tk_buf o = {.p = d->out, .len = 0, .cap = d->out_cap};
    struct tk_buf in = {0};
    size_t used = 0;
    int r;

    if (d->n_pend) {
        r = tk_buf_put(&in, d->pend, d->n_pend);
        if (r >= 0)
            r = tk_buf_put(&in, s, len);
        if (r < 0)
            goto out;
        s = in.p;
        len = in.len;
    }
    r = tk_utf8_lossy(&o, len ? s : "", len, final, &used);
    if (r < 0)
        goto out;
    d->n_pend = len - used;
    if (d->n_pend > sizeof(d->pend)) {
        r = -EINVAL; /* cannot happen: an incomplete sequence is at most 3 bytes */
        goto out;
    }
    memcpy(d->pend, s + used, d->n_pend);
out:
    tk_buf_fini(&in);
    d->out = o.p;
    d->out_cap = o.cap;
    d->out_len = o.len;
    return r;
}

int ad_detok_push(struct ad_detok *d, int32_t id, const char **ret_text, size_t *ret_len)
{
    const struct ad_tokenizer *tok = d->tok;
    size_t raw_len, stable = 0, n_stable, strip_start = 0, strip_stop = 0;
    uint32_t strip_ch = 0;
    bool fallback, bpe;
    int r;

    if (d->n_ids == d->cap_ids) {
        size_t ncap = d->cap_ids ? d->cap_ids * 2 : 16;
        int32_t *ni = realloc(d->ids, ncap * sizeof(*ni));
        if (!ni)
            return -ENOMEM;
        d->ids = ni;
        d->cap_ids = ncap;
    }
    d->ids[d->n_ids++] = id;
    fallback = dec_has(tok->dec, TK_DEC_BYTE_FALLBACK, &strip_start, &strip_stop, &strip_ch);
    bpe = dec_has(tok->dec, TK_DEC_BPE, &strip_start, &strip_stop, &strip_ch);
    if (bpe) {
        /* a BPE suffix decoder renders the last token differently from the others: such
         * (rare, legacy) tokenizers stream everything at finish() */
        d->out_len = 0;
        *ret_text = "";
        *ret_len = 0;
        return 0;
    }
    (void)dec_has(tok->dec, TK_DEC_STRIP, &strip_start, &strip_stop, &strip_ch);

    /* Hold back what later ids may still change: a trailing run of <0xXX> byte tokens (their
     * group decodes as a whole), the last token under a BPE suffix decoder, trailing
     * characters a Strip decoder may remove at the very end. */
    n_stable = d->n_ids;
    if (fallback) {
        /* ids that decode() filters out do not end a group */
        while (n_stable > d->n_ctx) {
            int32_t x = d->ids[n_stable - 1];
            if (!skipped(tok, x, d->skip_special_tokens) &&
                byte_token(tok->pool.p + tok->toks[x].off, tok->toks[x].len) < 0)
                break;
            n_stable--;
        }
    }
    if (n_stable < d->n_ids) {
        r = window_raw(d, n_stable, &stable);
        if (r < 0)
            return r;
    }
    r = window_raw(d, d->n_ids, &raw_len);
    if (r < 0)
        return r;
    if (n_stable == d->n_ids)
        stable = raw_len;
    if (bpe)
        stable = d->consumed; /* the suffix decoder renders the last token differently */
    if (stable > raw_len)
        stable = raw_len;
    if (strip_stop) {
        char enc[4];
        size_t el = tk_utf8_put(enc, strip_ch);
        for (size_t k = 0; k < strip_stop && stable >= d->consumed + el &&
                           memcmp(d->raw + stable - el, enc, el) == 0;
             k++)
            stable -= el;
    }
    if (stable < d->consumed)
        stable = d->consumed;
    r = emit(d, d->raw ? d->raw + d->consumed : "", stable - d->consumed, false);
    if (r < 0)
        return r;
    d->consumed = stable;

    /* Shrink the window to the last id when it is a safe context: a visible token that is not
     * a byte token and whose text a Strip decoder cannot cut through. */
    if (stable == raw_len && !bpe && d->n_ids > 1) {
        int32_t last = d->ids[d->n_ids - 1];
        size_t one;
        if (!skipped(tok, last, d->skip_special_tokens) &&
            byte_token(tok->pool.p + tok->toks[last].off, tok->toks[last].len) < 0) {
            int32_t keep = last;
            int32_t *save = d->ids;
            d->ids = &keep;
            r = window_raw(d, 1, &one);
            d->ids = save;
            if (r < 0)
                return r;
            /* Strip removes at most strip_start leading strip_ch: it cannot reach past a
             * context that is that long or holds another character */
            size_t chars = 0;
            bool other = false;
            for (size_t i = 0; i < one;) {
                uint32_t cp;
                i += tk_utf8_next(d->raw + i, one - i, &cp);
                chars++;
                other |= cp != strip_ch;
            }
            if (chars >= strip_start || other) {
                d->ids[0] = last;
                d->n_ids = 1;
                d->n_ctx = 1;
                d->consumed = one;
            }
        }
    } else if (stable == raw_len) {
        d->n_ctx = d->n_ids;
    }
    *ret_text = d->out ? d->out : "";
    *ret_len = d->out_len;
    return 0;
}

int ad_detok_finish(struct ad_detok *d, const char **ret_text, size_t *ret_len)
{
    size_t raw_len;
    int r = window_raw(d, d->n_ids, &raw_len);

    if (r < 0)
        return r;
    if (d->consumed > raw_len)
        d->consumed = raw_len;
    r = emit(d, d->raw ? d->raw + d->consumed : "", raw_len - d->consumed, true);
    if (r < 0)
        return r;
    d->consumed = raw_len;
    d->n_ids = 0;
    d->n_ctx = 0;
    d->consumed = 0;
    *ret_text = d->out ? d->out : "";
    *ret_len = d->out_len;
    return 0;
}
