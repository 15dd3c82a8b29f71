/* Test helper: a tiny Llama with fixed pseudo-random weights (2 layers, hidden 16, 4 heads, 2 KV heads, ff 24,
 * vocab 40, tied), written as a Hugging Face directory. */
#pragma once

#include <stdint.h>

struct ad_model;

/* Writes the model into a new temp directory (path in dir, 64 bytes) and loads it. Aborts on
 * failure. */
struct ad_model *tiny_model(char dir[64]);
/* A LoRA adapter for it (q_proj of both layers, rank r), as PEFT writes it, into path. */
void tiny_lora(const char *path, int r, float value);
/* A prefix-tuning adapter for m, as PEFT writes it, into path: its n virtual keys and values are
 * the base's own K/V of tokens[0, n) at positions 0 .. n - 1, so that a sequence x with it gets
 * the logits the base gives x after those tokens. */
void tiny_prefix(const struct ad_model *m, const char *path, const int32_t *tokens, int n);
