/* Private to src/train: the trainer's state, shared by trainer.c, child.c and save.c. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "adapterd/train.h"

struct ad_model;
struct ad_model_grads;
struct ad_param;
struct ad_trainable;
struct ad_train_scratch;

struct ad_trainer {
    struct ad_train_opts o; /* its pointers cleared: only numbers are kept */
    char base_dir[4096];
    const struct ad_model *base;
    const struct ad_model *m;         /* what the passes run: the base, or the copy */
    struct ad_model *own;             /* full fine-tuning: the copy being trained */
    struct ad_model_grads *grads;     /* its gradients */
    struct ad_trainable *ad;          /* an adapter being trained, or NULL */
    struct ad_param *params;          /* sorted by name: the adapter's, or views of own */
    int n_params;
    size_t n_values;                  /* elements over all parameters */
    float *exp_avg, *exp_avg_sq;      /* AdamW's moments, parameter after parameter */
    uint8_t *mask;                    /* child-tuning D: 0/1 per element (maskable parameters;
                                       * elements of the others are 1), or NULL */
    const struct ad_dataset *train, *valid;
    struct ad_train_scratch *ts;
    uint32_t *order;                  /* this epoch's order of the training examples */
    int epoch;
    size_t pos;                       /* examples of the epoch already used */
    int64_t step, total_steps, warmup;
    int64_t tokens;
    double seconds, last_loss, last_lr, last_norm, valid_loss;
    int64_t valid_step; /* the step of the last evaluation (0: none) */
};

/* Runs examples idx[0, n) of d through training passes that fit the activation budget, adding
 * their loss and targets; loss_scale 0: forward only (trainer.c). */
int trainer_passes(struct ad_trainer *t, const struct ad_dataset *d, const uint32_t *idx,
                   size_t n, float loss_scale, double *loss, int64_t *n_targets,
                   struct ad_err *err);

/* Epoch e's order of the training examples into t->order: a Fisher-Yates shuffle drawn from
 * the seed (trainer.c). */
void trainer_shuffle(struct ad_trainer *t, int e);

/* Child-tuning (child.c). D's mask from the Fisher information of the training data; then, at
 * every step after clipping and before the optimizer, the mask (D) or a fresh Bernoulli one
 * scaled by 1 / reserve_p (F) applied to the maskable parameters' gradients. */
int child_fisher_mask(struct ad_trainer *t, const struct ad_dataset *d, int batch,
                      struct ad_err *err);
void child_mask_grads(struct ad_trainer *t);
