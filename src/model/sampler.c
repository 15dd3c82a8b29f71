/* Token sampling: greedy, temperature, top-k, top-p, with a seeded per-sequence generator. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "adapterd/model.h"

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

/* xoroshiro128+: a uniform float in [0, 1). */
static float next_uniform(uint64_t s[2])
{
    uint64_t s0 = s[0], s1 = s[1], r = s0 + s1;
    s1 ^= s0;
    s[0] = rotl(s0, 24) ^ s1 ^ (s1 << 16);
    s[1] = rotl(s1, 37);
    return (float)(r >> 40) * (1.0f / 16777216.0f);
}

void ad_sampler_init(struct ad_sampler *s, float temperature, int top_k, float top_p,
                     uint64_t seed)
{
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
    s->rng[0] = splitmix64(&seed);
    s->rng[1] = splitmix64(&seed);
}

void ad_log_softmax(const float *logits, int n, float *out)
{
    float mx = -INFINITY;
    double sum = 0;
    for (int i = 0; i < n; i++)
        mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < n; i++)
        sum += exp((double)(logits[i] - mx));
    float lse = mx + (float)log(sum);
    for (int i = 0; i < n; i++)
        out[i] = logits[i] - lse;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

struct cand {
    float p;
    int id;
};

static int cmp_cand_desc(const void *a, const void *b)
{
    float pa = ((const struct cand *)a)->p, pb = ((const struct cand *)b)->p;
    if (pa != pb)
        return pa < pb ? 1 : -1;
    return ((const struct cand *)a)->id - ((const struct cand *)b)->id;
}

int ad_sampler_sample(struct ad_sampler *s, const float *logits, int n_vocab, float *work)
{
    struct cand *c = (struct cand *)work;
    float mx = -INFINITY;
    double sum = 0;
    int n = n_vocab;

    if (s->temperature <= 0.0f || s->top_k == 1)
        return argmax(logits, n_vocab);
    for (int i = 0; i < n_vocab; i++)
        mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < n_vocab; i++) {
        c[i].p = expf((logits[i] - mx) / s->temperature);
        c[i].id = i;
        sum += c[i].p;
    }
    bool truncate = (s->top_k > 0 && s->top_k < n_vocab) || s->top_p < 1.0f;
    if (truncate) {
        qsort(c, (size_t)n_vocab, sizeof(*c), cmp_cand_desc);
        if (s->top_k > 0 && s->top_k < n)
            n = s->top_k;
        if (s->top_p < 1.0f) {
            double kept = 0, total = 0;
            for (int i = 0; i < n; i++)
                total += c[i].p;
            for (int i = 0; i < n; i++) {
                kept += c[i].p;
                if (kept >= s->top_p * total) {
                    n = i + 1;
                    break;
                }
            }
        }
        sum = 0;
        for (int i = 0; i < n; i++)
            sum += c[i].p;
    }
    float u = next_uniform(s->rng) * (float)sum;
    double acc = 0;
    for (int i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc)
            return c[i].id;
    }
    return c[n - 1].id;
}
