/* Sampling: greedy, seeded reproducibility, frequencies match the softmax, top-k/top-p cut. */
#include "../check.h"
#include "adapterd/model.h"

int main(void)
{
    float logits[4] = {logf(0.5f), logf(0.25f), logf(0.125f), logf(0.125f)};
    float work[8], lsm[4];
    struct ad_sampler s;
    int count[4] = {0}, n = 40000;

    ad_sampler_init(&s, 0.0f, 0, 1.0f, 1);
    CHECK_INT(ad_sampler_sample(&s, logits, 4, work), ==, 0);
    float l2[4] = {0, 3, 3, 1}; /* ties go to the lowest id */
    CHECK_INT(ad_sampler_sample(&s, l2, 4, work), ==, 1);

    ad_sampler_init(&s, 1.0f, 0, 1.0f, 42);
    for (int i = 0; i < n; i++)
        count[ad_sampler_sample(&s, logits, 4, work)]++;
    CHECK_NEAR(count[0] / (double)n, 0.5, 0.015);
    CHECK_NEAR(count[1] / (double)n, 0.25, 0.015);
    CHECK_NEAR(count[2] / (double)n, 0.125, 0.015);

    /* same seed, same sequence */
    struct ad_sampler s1, s2;
    ad_sampler_init(&s1, 0.8f, 0, 1.0f, 7);
    ad_sampler_init(&s2, 0.8f, 0, 1.0f, 7);
    for (int i = 0; i < 100; i++)
        CHECK_INT(ad_sampler_sample(&s1, logits, 4, work), ==,
                  ad_sampler_sample(&s2, logits, 4, work));

    /* top-k 2 never picks the two least likely; top-p 0.5 keeps only the first */
    ad_sampler_init(&s, 1.0f, 2, 1.0f, 3);
    for (int i = 0; i < 2000; i++)
        CHECK_INT(ad_sampler_sample(&s, logits, 4, work), <, 2);
    ad_sampler_init(&s, 1.0f, 0, 0.5f, 3);
    for (int i = 0; i < 2000; i++)
        CHECK_INT(ad_sampler_sample(&s, logits, 4, work), ==, 0);
    /* top-p 0.7 keeps tokens 0 and 1 (0.5 < 0.7 <= 0.75) */
    memset(count, 0, sizeof(count));
    ad_sampler_init(&s, 1.0f, 0, 0.7f, 5);
    for (int i = 0; i < 3000; i++)
        count[ad_sampler_sample(&s, logits, 4, work)]++;
    CHECK_INT(count[2] + count[3], ==, 0);
    CHECK_NEAR(count[0] / 3000.0, 2.0 / 3.0, 0.04);

    ad_log_softmax(logits, 4, lsm);
    CHECK_NEAR(lsm[0], log(0.5), 1e-6);
    CHECK_NEAR(lsm[3], log(0.125), 1e-6);
    printf("sampler: ok\n");
    return 0;
}
