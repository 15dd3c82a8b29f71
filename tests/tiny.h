/* Test helper: a tiny Llama with fixed pseudo-random weights (2 layers, hidden 16, 4 heads, 2 KV heads, ff 24,
 * vocab 40, tied), written as a Hugging Face directory. */
#pragma once

struct ad_model;

/* Writes the model into a new temp directory (path in dir, 64 bytes) and loads it. Aborts on
 * failure. */
struct ad_model *tiny_model(char dir[64]);
/* A LoRA adapter for it (q_proj of both layers, rank r), as PEFT writes it, into path. */
void tiny_lora(const char *path, int r, float value);
