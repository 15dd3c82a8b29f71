/* adapterd: training: datasets (JSONL of prompt/completion, chat messages or plain text), the
 * optimizer and its schedule, child-tuning, and the training loop that fine-tunes a trainable
 * adapter (adapter.h) or the whole model (full fine-tuning) over the frozen base's training
 * passes (model.h, ad_model_train). Used by adapterd-train (tools/train.c) and the daemon's
 * fine-tuning jobs. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ad_err;
struct ad_model;
struct ad_tokenizer;

/* ==========================================================================================
 * Datasets (data.c)
 *
 * A JSONL file, one example per line (blank lines skipped), each an object of one of:
 *   {"prompt": "...", "completion": "..."}   loss on the completion (and the EOS after it)
 *   {"messages": [{"role", "content", "weight"?}, ...]}
 *                                            rendered with the model's chat template; loss on
 *                                            the assistant turns whose weight is 1 (the default;
 *                                            OpenAI's weight 0 leaves a turn out)
 *   {"text": "..."}                          loss on every token (and the EOS after it)
 * A line that is not one of these, or has wrong types, fails the whole file with its line number
 * and the reason; nothing is trained on a file that does not validate.
 *
 * As TRL's SFTTrainer does (src/train/data.c says how, and where the tokens of the pieces and of
 * the whole text differ): prompt/completion are prompt + completion encoded with the tokenizer's
 * special tokens, then EOS unless the text ends with it already; "messages" is the chat
 * template's rendering with add_generation_prompt = false (ad_chat_segments), no special tokens
 * added, the loss on each assistant turn's content and what ends it (e.g. "<|im_end|>\n"), not
 * its header; "text" is encoded with the special tokens, then EOS, the loss on all but the first
 * token. Roles are system, user and assistant; content a non-empty string or a non-empty list of
 * {"type": "text", "text"} parts; "weight" 0 or 1, on assistant messages only; a conversation
 * needs an assistant message of weight 1; other keys of a line are ignored, but "tools" and tool
 * calls are refused. A line is at most 1 MiB of valid UTF-8, a conversation at most 256
 * messages, a file at most 1 GiB; a UTF-8 BOM at its start, CRLF line ends and blank lines are
 * fine. */

/* One tokenized example: tokens[i] predicts targets[i] (the next token, or -1: no loss). */
struct ad_example {
    int32_t *tokens;
    int32_t *targets;
    int n_tokens;
    int n_targets; /* targets >= 0 */
};

struct ad_dataset {
    struct ad_example *ex;
    size_t n;
    size_t n_tokens, n_targets; /* over every example */
    size_t n_truncated;         /* examples cut at max_seq_len (at the right, as TRL's
                                 * keep_start); one left with no target is dropped, and only
                                 * counted here */
};

struct ad_data_opts {
    int max_seq_len; /* examples are cut to this many tokens (1 to 1 Mi) */
    bool packing;    /* concatenate examples (each ends with its EOS or end of turn) into
                      * sequences of exactly max_seq_len tokens, the last shorter; nothing is
                      * cut. Each token keeps the target it has in its example alone (an
                      * example's last token has none, so none crosses into the next example);
                      * a sequence's last token may predict the next sequence's first. A sequence
                      * with no target is left out. */
};

/* Checks one line of a JSONL training file: its shape and types (not its tokens), as
 * ad_dataset_load checks each; line (len bytes, need not be NUL-terminated) is without its line
 * end, and a blank one (spaces, tabs, CR) is fine. line_no is the 1-based line number for the
 * message. Returns 0, or -EINVAL with err "line N: reason" naming the field, e.g. "line 3:
 * 'messages'[1].role must be system, user or assistant". Thread-safe. */
int ad_data_check_line(const char *line, size_t len, size_t line_no, struct ad_err *err);

/* Reads and tokenizes a JSONL file with tok (its chat template for "messages"): every line is
 * checked first, so nothing is tokenized from a file with a bad line. Returns 0 and a new dataset
 * (ad_dataset_free), or -EINVAL (err: "line N: reason", also for a chat template that is missing,
 * refuses the conversation or cannot mark its assistant turns; a file without examples; no
 * example with a target within max_seq_len), -ENOENT, -E2BIG (a file over 1 GiB), -ENOMEM. */
int ad_dataset_load(const char *path, const struct ad_tokenizer *tok,
                    const struct ad_data_opts *opts, struct ad_dataset **ret,
                    struct ad_err *err);
void ad_dataset_free(struct ad_dataset *d);

/* ==========================================================================================
 * The trainer (trainer.c, optim.c, child.c)
 *
 * Fine-tunes a trainable adapter (adapter.h) made from a PEFT config, or every weight of the
 * model (full fine-tuning), over a dataset: examples shuffled each epoch (seeded), a step takes
 * batch_size * grad_accum of them (split into passes that fit activation_mb), its loss the mean
 * cross-entropy over all their targets (Hugging Face's Trainer with labels -100 elsewhere, and
 * its num_items_in_batch normalisation under gradient accumulation); then global gradient-norm
 * clipping, child-tuning's mask, and an AdamW (decoupled weight decay, bias correction, as
 * torch.optim.AdamW) or SGD step at the scheduled rate (warmup, then cosine, linear or
 * constant, as transformers' schedules). The same seed and data give the same parameters bit
 * for bit, also across a checkpoint and resume. */

enum ad_optimizer { AD_OPT_ADAMW, AD_OPT_SGD };
enum ad_schedule { AD_SCHED_COSINE, AD_SCHED_LINEAR, AD_SCHED_CONSTANT };
/* Child-tuning (Xu et al. 2021): F, a fresh Bernoulli(reserve_p) mask of each step's gradients
 * scaled by 1 / reserve_p; D, a fixed mask of the top reserve_p share of the Fisher information
 * (squared gradients over the training data, per-tensor clipped), unscaled. Embeddings and norms
 * are never masked. */
enum ad_child { AD_CHILD_NONE, AD_CHILD_F, AD_CHILD_D };

struct ad_train_opts {
    const char *adapter_config; /* a PEFT adapter_config.json text; NULL: full fine-tuning */
    const char *base_dir;       /* the base model's directory (full fine-tuning saves a copy) */
    const int32_t *init_ids;    /* prompt tuning's TEXT init: the text's token ids */
    int n_init_ids;
    int n_epochs;
    int batch_size;             /* examples per pass of gradients */
    int grad_accum;             /* passes per optimizer step */
    double lr, weight_decay, beta1, beta2, eps, max_grad_norm; /* max_grad_norm 0: no clipping */
    int warmup_steps;           /* or, when 0, */
    double warmup_ratio;        /* this share of the steps */
    enum ad_schedule schedule;
    enum ad_optimizer optimizer;
    enum ad_child child;
    double reserve_p;
    uint64_t seed;
    int threads;                /* 0: one per core */
    size_t activation_bytes;    /* memory for a training pass's activations (0: 512 MiB) */
    int eval_every;             /* steps between evaluations (0: once per epoch) */
    bool save_bf16;             /* full fine-tuning: save the model in bf16 (else f32) */
    bool full_as_adapter;       /* full fine-tuning: save an adapter that replaces every weight
                                 * (the "SPARSE" layout, served beside others) */
};

/* Sets the defaults: 1 epoch, batch 8, accumulation 1, lr 2e-4 (1e-5 for full fine-tuning),
 * weight decay 0, betas 0.9 / 0.999, eps 1e-8, max_grad_norm 1, no warmup, cosine, AdamW, no
 * child-tuning (reserve_p 0.3), seed 42. */
void ad_train_opts_default(struct ad_train_opts *o);

struct ad_train_progress {
    int64_t step, total_steps;  /* optimizer steps done, and in all */
    int epoch;                  /* 0-based */
    double loss;                /* the mean loss of the last step */
    double lr;                  /* its learning rate */
    double grad_norm;           /* its gradient norm before clipping */
    double valid_loss;          /* the last evaluation's, or NaN */
    int64_t valid_step;         /* the step it was made after (0: none yet) */
    int64_t tokens;             /* tokens trained on so far */
    double seconds;             /* time in training steps so far */
};

struct ad_trainer;

/* A trainer for model m (borrowed, must outlive it) over train (and valid, NULL: no
 * evaluation), both borrowed. Returns 0, or -EINVAL / -ENOTSUP (a bad config or option, err
 * says which) / -ENOMEM. */
int ad_trainer_new(const struct ad_model *m, const struct ad_train_opts *o,
                   const struct ad_dataset *train, const struct ad_dataset *valid,
                   struct ad_trainer **ret, struct ad_err *err);
void ad_trainer_free(struct ad_trainer *t);

/* Starts from an adapter's tensors (a PEFT directory with adapter_model.safetensors, or a
 * safetensors file of the parameters by name: continue training an adapter), before the first
 * step. Returns 0 or -errno. */
int ad_trainer_init_from(struct ad_trainer *t, const char *path, struct ad_err *err);

/* Child-tuning D's mask from the Fisher information over d in batches of `batch` examples (the
 * first step does it over the training data in the training batches when it was not done).
 * Returns 0 or -errno. */
int ad_trainer_fisher(struct ad_trainer *t, const struct ad_dataset *d, int batch,
                      struct ad_err *err);
/* The 0/1 mask of child-tuning D for the trainer's parameters, element after element in
 * parameter order, or NULL; borrowed. */
const uint8_t *ad_trainer_mask(const struct ad_trainer *t);

/* One optimizer step (for child-tuning D, the first call computes the mask first). Returns 1
 * when that was the last step (or there was none left), 0 when there are more, or -errno.
 * Fills *p (may be NULL). */
int ad_trainer_step(struct ad_trainer *t, struct ad_train_progress *p, struct ad_err *err);
/* The mean loss over the validation set (or train if there is none) into *ret_loss. */
int ad_trainer_eval(struct ad_trainer *t, double *ret_loss, struct ad_err *err);
void ad_trainer_progress(const struct ad_trainer *t, struct ad_train_progress *p);

/* Writes what serving loads into dir (an existing empty directory): the adapter's
 * adapter_config.json and weights; for full fine-tuning a Hugging Face model directory (config,
 * weights, and the base's tokenizer and generation files); for child-tuning of the full model a
 * sparse-delta adapter (README). Returns 0 or -errno. */
int ad_trainer_save(struct ad_trainer *t, const char *dir, struct ad_err *err);
/* A checkpoint in dir (an existing empty directory): what ad_trainer_save writes, plus the
 * optimizer's state, the data order and the step (trainer_state.safetensors and .json), so that
 * ad_trainer_resume continues exactly where it stopped. */
int ad_trainer_checkpoint(struct ad_trainer *t, const char *dir, struct ad_err *err);
int ad_trainer_resume(struct ad_trainer *t, const char *dir, struct ad_err *err);

/* The parameters being trained (sorted by name) and their count; borrowed. For tests and
 * tools. */
struct ad_param;
const struct ad_param *ad_trainer_params(const struct ad_trainer *t, int *ret_n);

/* ==========================================================================================
 * Fine-tuning jobs (jobs.c): OpenAI's files and fine-tuning jobs over the trainer, persisted in a
 * state directory and run one at a time, in order, by one worker thread. The computing (data,
 * steps, checkpoints) runs on a thread of its own at idle CPU priority (SCHED_IDLE: it and its
 * pool run only when serving's threads do not want the cores) that holds no lock a request
 * takes; the worker, at normal priority, does the rest.
 *
 *   <state>/files/file-ID.jsonl, file-ID.json     a training file and its object
 *   <state>/jobs/ftjob-ID/job.json                the job object (written atomically)
 *   <state>/jobs/ftjob-ID/events.jsonl            its events, one per line
 *   <state>/jobs/ftjob-ID/checkpoints/step-N/     checkpoints (ad_trainer_checkpoint)
 *
 * A succeeded job installs its adapter in the registry under fine_tuned_model (its suffix, or
 * ft-<job id>); each checkpoint is served as <fine_tuned_model>-step-N. Objects are OpenAI's JSON
 * (file, fine_tuning.job, fine_tuning.job.event, fine_tuning.job.checkpoint); the functions
 * returning one give a new reference. Every function is thread-safe. */

struct ad_registry;
struct ad_jobs;
struct json_t;

struct ad_jobs_config {
    const char *state_dir;
    const struct ad_model *model;  /* the base (borrowed) */
    const char *model_dir;         /* its directory */
    const struct ad_tokenizer *tok;
    struct ad_registry *registry;  /* where results are installed */
    int threads;                   /* of the worker's passes (0: every core) */
    size_t activation_bytes;       /* of a training pass (0: 512 MiB) */
    size_t max_file_bytes;         /* largest training file */
};

/* Opens (creating) the state: files and jobs are as they were; a job that was running resumes
 * from its last checkpoint, queued ones wait; leftovers of interrupted writes are removed. Starts
 * the worker. Returns 0 or -errno. */
int ad_jobs_new(const struct ad_jobs_config *cfg, struct ad_jobs **ret, struct ad_err *err);
/* Stops the worker (a running job checkpoints first and stays "running", to resume at the next
 * start) and frees. */
void ad_jobs_free(struct ad_jobs *j);

/* A file upload, streamed: begin, write chunks (each complete line is checked as it arrives:
 * ad_data_check_line), then finish (the file object) or abort. A bad line, or more than
 * max_file_bytes, fails the write with -EINVAL (err "line N: reason") / -E2BIG. */
struct ad_file_upload;
int ad_files_begin(struct ad_jobs *j, const char *filename, struct ad_file_upload **ret,
                   struct ad_err *err);
int ad_files_write(struct ad_file_upload *u, const void *data, size_t len, struct ad_err *err);
int ad_files_finish(struct ad_file_upload *u, const char *purpose, struct json_t **ret,
                    struct ad_err *err);
void ad_files_abort(struct ad_file_upload *u);
int ad_files_list(struct ad_jobs *j, struct json_t **ret);
int ad_files_get(struct ad_jobs *j, const char *id, struct json_t **ret, struct ad_err *err);
/* The path of a file's content into buf. Returns 0 or -ENOENT. */
int ad_files_path(struct ad_jobs *j, const char *id, char *buf, size_t size, struct ad_err *err);
/* Deletes a file (refused, -EBUSY, while a queued or running job uses it). */
int ad_files_delete(struct ad_jobs *j, const char *id, struct ad_err *err);

/* Creates a job from an OpenAI create-job request body (borrowed): validates every field (an
 * unknown or wrong one: -EINVAL naming it), the files, the model (the base's id or an adapter to
 * continue), and queues it. Returns 0 and the job object. */
int ad_jobs_create(struct ad_jobs *j, struct json_t *req, struct json_t **ret, struct ad_err *err);
/* Jobs newest first, after the job `after` (NULL: from the newest), at most limit. */
int ad_jobs_list(struct ad_jobs *j, const char *after, int limit, struct json_t **ret,
                 struct ad_err *err);
int ad_jobs_get(struct ad_jobs *j, const char *id, struct json_t **ret, struct ad_err *err);
/* Events newest first, after the event `after`, at most limit ({"object": "list", "data",
 * "has_more"}). The log only grows: after a resume, the steps since the checkpoint it resumed
 * from are logged again. */
int ad_jobs_events(struct ad_jobs *j, const char *id, const char *after, int limit,
                   struct json_t **ret, struct ad_err *err);
/* Events from the seq-th (0-based, oldest first) on, in order, into *ret (a new array); waits up
 * to timeout seconds for one when there is none. *ret_done: the job has ended (no more will
 * come). */
int ad_jobs_follow(struct ad_jobs *j, const char *id, size_t seq, double timeout,
                   struct json_t **ret, bool *ret_done, struct ad_err *err);
int ad_jobs_checkpoints(struct ad_jobs *j, const char *id, const char *after, int limit,
                        struct json_t **ret, struct ad_err *err);
/* cancel (at once, a running job too: its status reads cancelled and its checkpoints' adapters
 * are gone on return; the worker stops after the step it is in and removes the files), pause
 * (a queued job at once; a running one checkpoints and stops after its step, then reads
 * paused), resume (a paused job back in the queue; a pause not yet taken effect is called off).
 * Return the job object; -EINVAL when the job's status does not allow it. */
int ad_jobs_cancel(struct ad_jobs *j, const char *id, struct json_t **ret, struct ad_err *err);
int ad_jobs_pause(struct ad_jobs *j, const char *id, struct json_t **ret, struct ad_err *err);
int ad_jobs_resume(struct ad_jobs *j, const char *id, struct json_t **ret, struct ad_err *err);

struct ad_jobs_stats {
    int by_status[8]; /* validating_files, queued, running, paused, succeeded, failed, cancelled */
    double tokens_per_s; /* of the running job, 0 without one */
    double loss;         /* the running job's last step loss, NaN without one */
    uint64_t trained_tokens; /* over every job */
};
void ad_jobs_stats(struct ad_jobs *j, struct ad_jobs_stats *ret);
/* The status names, in by_status order. */
extern const char *const ad_job_status_names[7];
