/* Private to src/model: architecture descriptions. */
#pragma once

#include <math.h>
#include <stdbool.h>

#include "adapterd/kernels.h"
#include "adapterd/model.h"

/* A family's module names, as data: the checkpoint and PEFT paths are built from these. */
struct ad_arch {
    enum ad_family family;
    const char *root;      /* module path prefix inside the *ForCausalLM class: "model." */
    bool root_optional;    /* checkpoints may omit the root (original GPT-2 files) */
    const char *layer_fmt; /* "layers.%d." relative to root */
    const char *tok_embd, *pos_embd, *final_norm; /* relative to root; pos_embd may be NULL */
    const char *lm_head;   /* outside root */
    const char *norm1, *norm2;
    bool layer_norm;       /* LayerNorm with bias, else RMSNorm */
    bool conv1d;           /* linear weights stored [in, out] */
    bool rope;
    int n_modules;
    struct {
        enum ad_role role;
        const char *name; /* relative to the layer, e.g. "self_attn.q_proj" */
    } modules[8];
};

const struct ad_arch *ad_arch_for(enum ad_family family);
const char *ad_role_name(enum ad_role role);

/* ==========================================================================================
 * Helper threads of the forward pass (pool.c) */

struct ad_pool;

/* One item of a job; thread is 0 for the caller, 1 .. n - 1 for the helpers. */
typedef void ad_pool_fn(void *ctx, int item, int thread);

/* Starts n_threads - 1 helper threads (the caller is the n-th). Returns NULL when n_threads <= 1
 * or nothing could be started: every function below accepts NULL and then runs on the caller
 * alone. */
struct ad_pool *ad_pool_new(int n_threads);
/* Stops and joins the helpers. Not while a job runs. */
void ad_pool_free(struct ad_pool *p);
/* Threads that share a job, the caller included (1 for NULL). */
int ad_pool_threads(const struct ad_pool *p);
/* on: idle helpers spin (for at most about 1 ms) waiting for the next job, for a pass whose
 * jobs follow each other within microseconds. off: they sleep as soon as a job is done, so they
 * leave the CPU to others (OpenBLAS's threads) between jobs. */
void ad_pool_spin(struct ad_pool *p, bool on);
/* Runs fn(ctx, i, thread) for every i in [0, n_items) on the caller and the helpers, and returns
 * when all are done. Items may run in any order and at the same time. One caller at a time. */
void ad_pool_run(struct ad_pool *p, int n_items, ad_pool_fn *fn, void *ctx);

/* ==========================================================================================
 * Elementwise maths shared by the forward (forward.c) and training (train.c) passes */

static inline float ad_act(enum ad_act a, float x)
{
    switch (a) {
    case AD_ACT_SILU:
        return x / (1.0f + expf(-x));
    case AD_ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    default:
        return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    }
}

/* Rotates each head of n_heads (head_dim hd) in place: the "rotate_half" layout of HF Llama.
 * With sin_ negated it rotates back (the transpose: RoPE's backward). */
static inline void ad_rope(float *x, int n_heads, int hd, const float *cos_, const float *sin_)
{
    int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * hd;
        for (int j = 0; j < half; j++) {
            float a = v[j], b = v[j + half];
            v[j] = a * cos_[j] - b * sin_[j];
            v[j + half] = b * cos_[j] + a * sin_[j];
        }
    }
}
