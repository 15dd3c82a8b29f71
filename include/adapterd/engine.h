/* adapterd: the engine: one thread that owns the KV cache and runs the step loop (DESIGN.md).
 * Each step admits waiting requests while KV blocks last, builds one batch of prefill chunks
 * (bounded by max_batch_tokens) and decode tokens for every running request, whatever adapters
 * they use, runs one forward pass, samples, and reports tokens through each request's callback.
 *
 * Threads: submit and cancel may be called from any thread; callbacks run on the engine thread
 * and must not block. The engine thread is the only caller of BLAS while inference runs. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/adapter.h"
#include "adapterd/model.h"

struct ad_err;
struct ad_engine;
struct ad_request;

struct ad_engine_config {
    int kv_blocks;        /* KV cache pool: blocks of kv_block_size tokens */
    int kv_block_size;
    int max_batch_tokens; /* tokens per forward pass (prefill chunks + decodes) */
    int max_seqs;         /* sequences running at once */
    int max_queue;        /* waiting requests before submit says -EBUSY */
    int max_per_adapter;  /* sequences of one adapter running at once (0: max_seqs) */
    bool prefix_cache;    /* reuse the KV blocks of earlier sequences' prompts (model.h) */
};

/* What one request asks for. The engine copies what it needs; mix references are taken over by
 * the request (ad_engine_submit steals them, on failure too). */
struct ad_request_params {
    const int32_t *prompt;
    int n_prompt;
    int max_tokens;  /* tokens to generate; 0 allowed (echo/logprobs of the prompt only) */
    bool max_tokens_fit; /* max_tokens is a default: cut to what the context leaves (>= 1) */
    int min_tokens;  /* EOS is not sampled before this many tokens */
    bool ignore_eos;
    float temperature;
    int top_k;
    float top_p;
    uint64_t seed;
    int n_logprobs;      /* top-N logprobs per token, -1: none (0: the chosen token's only) */
    bool prompt_logprobs; /* report the prompt tokens (echo) with their logprobs */
    struct ad_mix mix;   /* n = 0: the base model */
};

enum ad_finish {
    AD_FINISH_NONE,
    AD_FINISH_LENGTH, /* max_tokens reached */
    AD_FINISH_STOP,   /* EOS sampled, or the caller stopped it (stop string) */
    AD_FINISH_CANCELLED,
    AD_FINISH_ERROR,
};

#define AD_MAX_LOGPROBS 20

/* One event of a request: a token (prompt token when is_prompt), or the end. */
struct ad_event {
    bool done;
    bool is_prompt;
    int32_t token;
    float logprob; /* NAN for the first prompt token, or when logprobs were not asked for */
    int n_top;
    int32_t top_ids[AD_MAX_LOGPROBS];
    float top_logprobs[AD_MAX_LOGPROBS];
    enum ad_finish finish;  /* with done */
    const char *error;      /* with AD_FINISH_ERROR */
    int n_prompt_tokens;    /* with done: usage */
    int n_cached_tokens;    /* with done: prompt tokens whose K/V came from the prefix cache */
    int n_generated;
};

typedef void (*ad_request_cb)(struct ad_request *req, const struct ad_event *ev, void *ud);

int ad_engine_new(const struct ad_model *m, const struct ad_engine_config *cfg,
                  struct ad_engine **ret, struct ad_err *err);
/* Stops the thread; requests still running get a cancelled event first. */
void ad_engine_free(struct ad_engine *e);

/* Queues a request. Returns 0 and a new reference to it (the caller unrefs it when it no longer
 * needs it; cb may still run until the done event), -EINVAL (bad params, err says which), -EBUSY
 * (queue full), or -E2BIG (prompt + max_tokens exceed the context; err gives the limit). */
int ad_engine_submit(struct ad_engine *e, const struct ad_request_params *p, ad_request_cb cb,
                     void *ud, struct ad_request **ret, struct ad_err *err);
/* Asks the engine to finish the request: its blocks are freed at the next step and it gets a
 * done event with finish (AD_FINISH_CANCELLED or AD_FINISH_STOP). Thread-safe, idempotent. */
void ad_engine_finish(struct ad_engine *e, struct ad_request *req, enum ad_finish finish);
struct ad_request *ad_request_unref(struct ad_request *req);

struct ad_engine_stats {
    int waiting, running;
    int kv_blocks_total, kv_blocks_free;
    uint64_t steps, tokens_prefilled, tokens_generated, preemptions;
    /* prefix cache: tokens looked up at admission, and those found (not computed) */
    uint64_t prefix_queries, prefix_hits;
    int kv_blocks_cached; /* blocks holding a published prefix, held or free */
    /* KV blocks not back in the pool when the engine last went idle (nothing running or
     * waiting): 0 unless a finished, cancelled or preempted sequence kept its blocks */
    int kv_blocks_leaked;
};
void ad_engine_stats(struct ad_engine *e, struct ad_engine_stats *ret);
