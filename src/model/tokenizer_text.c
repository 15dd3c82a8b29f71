/* Tokenizer helpers: buffers, hash maps, UTF-8 and Unicode character classes, the byte-level
 * alphabet. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer_internal.h"

/* ==========================================================================================
 * Buffers */

int tk_buf_reserve(struct tk_buf *b, size_t extra)
{
    size_t need, ncap;
    char *np;

    if (extra > SIZE_MAX / 2 - b->len)
        return -ENOMEM;
    need = b->len + extra + 1; /* room for a NUL terminator */
    if (need <= b->cap)
        return 0;
    ncap = b->cap ? b->cap : 64;
    while (ncap < need)
        ncap *= 2;
    np = realloc(b->p, ncap);
    if (!np)
        return -ENOMEM;
    b->p = np;
    b->cap = ncap;
    return 0;
}

int tk_buf_put(struct tk_buf *b, const void *s, size_t n)
{
    int r = tk_buf_reserve(b, n);

    if (r < 0)
        return r;
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

void tk_buf_fini(struct tk_buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

int tk_ids_push(struct tk_ids *a, int32_t id)
{
    if (a->n == a->cap) {
        size_t ncap = a->cap ? a->cap * 2 : 64;
        int32_t *nv = realloc(a->v, ncap * sizeof(*nv));
        if (!nv)
            return -ENOMEM;
        a->v = nv;
        a->cap = ncap;
    }
    a->v[a->n++] = id;
    return 0;
}

/* ==========================================================================================
 * String hash map */

uint32_t tk_hash(const void *s, size_t n)
{
    /* FNV-1a, 32 bits, with a final avalanche */
    const unsigned char *p = s;
    uint32_t h = 2166136261u;

    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    return h;
}

static int map_grow(struct tk_map *m)
{
    uint32_t nsize = m->mask ? (m->mask + 1) * 2 : 1024;
    uint32_t *ns;

    if (nsize == 0 || nsize > (1u << 30))
        return -ENOMEM;
    ns = calloc(nsize, sizeof(*ns));
    if (!ns)
        return -ENOMEM;
    for (uint32_t i = 0; i < m->n; i++) {
        uint32_t j = m->ents[i].hash & (nsize - 1);
        while (ns[j])
            j = (j + 1) & (nsize - 1);
        ns[j] = i + 1;
    }
    free(m->slots);
    m->slots = ns;
    m->mask = nsize - 1;
    return 0;
}

int tk_map_put(struct tk_map *m, const char *pool, uint32_t off, uint32_t len, int32_t val)
{
    uint32_t h = tk_hash(pool + off, len), j;
    int r;

    if (!m->slots || (m->n + 1) * 2 > m->mask + 1) {
        r = map_grow(m);
        if (r < 0)
            return r;
    }
    for (j = h & m->mask; m->slots[j]; j = (j + 1) & m->mask) {
        struct tk_map_ent *e = &m->ents[m->slots[j] - 1];
        if (e->hash == h && e->len == len && memcmp(pool + e->off, pool + off, len) == 0) {
            e->val = val;
            return 0;
        }
    }
    if (m->n == m->cap) {
        uint32_t ncap = m->cap ? m->cap * 2 : 1024;
        struct tk_map_ent *ne = realloc(m->ents, (size_t)ncap * sizeof(*ne));
        if (!ne)
            return -ENOMEM;
        m->ents = ne;
        m->cap = ncap;
    }
    m->ents[m->n] = (struct tk_map_ent){.off = off, .len = len, .hash = h, .val = val};
    m->slots[j] = ++m->n;
    return 0;
}

int32_t tk_map_get(const struct tk_map *m, const char *pool, const char *s, size_t len)
{
    uint32_t h, j;

    if (!m->slots || len > UINT32_MAX)
        return -1;
    h = tk_hash(s, len);
    for (j = h & m->mask; m->slots[j]; j = (j + 1) & m->mask) {
        const struct tk_map_ent *e = &m->ents[m->slots[j] - 1];
        if (e->hash == h && e->len == len && memcmp(pool + e->off, s, len) == 0)
            return e->val;
    }
    return -1;
}

void tk_map_fini(struct tk_map *m)
{
    free(m->slots);
    free(m->ents);
    memset(m, 0, sizeof(*m));
}

/* ==========================================================================================
 * UTF-8 */

/* Length of the well-formed sequence at s, 0 if ill-formed or incomplete; then *valid_prefix
 * is the length of its maximal valid subpart (0 if the first byte cannot start a sequence). */
static size_t utf8_seq(const unsigned char *s, size_t len, size_t *valid_prefix)
{
    unsigned char c = s[0];
    size_t n;
    unsigned char lo = 0x80, hi = 0xbf;

    *valid_prefix = 0;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        n = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else
        return 0;
    for (size_t i = 1; i < n; i++) {
        if (i >= len) {
            *valid_prefix = i; /* truncated but valid so far */
            return 0;
        }
        unsigned char b = s[i];
        if (b < lo || b > hi) {
            *valid_prefix = i; /* maximal subpart: bytes 0..i-1 */
            return 0;
        }
        lo = 0x80;
        hi = 0xbf;
    }
    return n;
}

size_t tk_utf8_valid_prefix(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, vp;

    while (i < len) {
        /* ASCII fast path, 8 bytes at a time */
        while (i + 8 <= len) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (w & 0x8080808080808080ull)
                break;
            i += 8;
        }
        if (i >= len)
            break;
        size_t n = utf8_seq(p + i, len - i, &vp);
        if (!n)
            break;
        i += n;
    }
    return i;
}

size_t tk_utf8_next(const char *s, size_t len, uint32_t *cp)
{
    const unsigned char *p = (const unsigned char *)s;
    unsigned char c = p[0];

    if (c < 0x80 || len < 2) {
        *cp = c;
        return 1;
    }
    if (c < 0xe0) {
        *cp = ((uint32_t)(c & 0x1f) << 6) | (p[1] & 0x3f);
        return 2;
    }
    if (c < 0xf0 || len < 4) {
        if (len < 3) {
            *cp = c;
            return 1;
        }
        *cp = ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(p[1] & 0x3f) << 6) | (p[2] & 0x3f);
        return 3;
    }
    *cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(p[1] & 0x3f) << 12) |
          ((uint32_t)(p[2] & 0x3f) << 6) | (p[3] & 0x3f);
    return 4;
}

size_t tk_utf8_put(char *out, uint32_t cp)
{
    unsigned char *o = (unsigned char *)out;

    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xc0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xe0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (unsigned char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (unsigned char)(0xf0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (unsigned char)(0x80 | (cp & 0x3f));
    return 4;
}

int tk_utf8_lossy(struct tk_buf *out, const char *s, size_t len, bool final, size_t *ret_used)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    int r;

    /* worst case: every byte becomes 3 */
    if (len > SIZE_MAX / 4)
        return -ENOMEM;
    r = tk_buf_reserve(out, len * 3);
    if (r < 0)
        return r;
    while (i < len) {
        size_t ok = tk_utf8_valid_prefix((const char *)p + i, len - i), vp;
        memcpy(out->p + out->len, p + i, ok);
        out->len += ok;
        i += ok;
        if (i >= len)
            break;
        (void)utf8_seq(p + i, len - i, &vp);
        if (!final && vp > 0 && vp == len - i)
            break; /* an incomplete sequence at the end: keep it for later */
        memcpy(out->p + out->len, "\xef\xbf\xbd", 3);
        out->len += 3;
        i += vp ? vp : 1;
    }
    out->p[out->len] = '\0';
    if (ret_used)
        *ret_used = i;
    return 0;
}

/* ==========================================================================================
 * Character classes */

bool tk_is_whitespace(uint32_t cp)
{
    if (cp < 0x80)
        return cp == ' ' || (cp >= 0x09 && cp <= 0x0d);
    switch (cp) {
    case 0x85:
    case 0xa0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202f:
    case 0x205f:
    case 0x3000:
        return true;
    default:
        return cp >= 0x2000 && cp <= 0x200a;
    }
}

bool tk_is_word(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
               cp == '_';
    if (cp == 0x200c || cp == 0x200d)
        return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_PC:
        return true;
    default:
        return false;
    }
}

bool tk_is_punct(uint32_t cp)
{
    if (cp < 0x80)
        return (cp >= 0x21 && cp <= 0x2f) || (cp >= 0x3a && cp <= 0x40) ||
               (cp >= 0x5b && cp <= 0x60) || (cp >= 0x7b && cp <= 0x7e);
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        return true;
    default:
        return false;
    }
}

/* ==========================================================================================
 * The GPT-2 byte-level alphabet: printable bytes stand for themselves, the others for
 * U+0100 + n in byte order. */

#define R4(a) (a), (a) + 1, (a) + 2, (a) + 3
#define R8(a) R4(a), R4((a) + 4)
#define R16(a) R8(a), R8((a) + 8)
#define R32(a) R16(a), R16((a) + 16)

const uint16_t tk_byte_to_cp[256] = {
    /* 0x00-0x20 -> U+0100-U+0120 */
    R32(0x100), 0x120,
    /* 0x21-0x7e -> themselves */
    0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f,
    R16(0x30), R32(0x40), R16(0x60), R8(0x70), R4(0x78), 0x7c, 0x7d, 0x7e,
    /* 0x7f-0xa0 -> U+0121-U+0142 */
    R32(0x121), 0x141, 0x142,
    /* 0xa1-0xac -> themselves */
    R8(0xa1), R4(0xa9),
    /* 0xad -> U+0143 */
    0x143,
    /* 0xae-0xff -> themselves */
    0xae, 0xaf, R16(0xb0), R32(0xc0), R32(0xe0),
};

int tk_cp_to_byte(uint32_t cp)
{
    if ((cp >= 0x21 && cp <= 0x7e) || (cp >= 0xa1 && cp <= 0xac) || (cp >= 0xae && cp <= 0xff))
        return (int)cp;
    if (cp >= 0x100 && cp <= 0x120)
        return (int)(cp - 0x100);
    if (cp >= 0x121 && cp <= 0x142)
        return (int)(cp - 0x121 + 0x7f);
    if (cp == 0x143)
        return 0xad;
    return -1;
}
