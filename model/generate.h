// Text generation over token ids: prefill the prompt, then decode token by token with the KV
// cache; greedy or seeded temperature / top-k / top-p sampling; stop at EOS, the token limit or
// the config's max_position_embeddings.
#ifndef MOEKIT_MODEL_GENERATE_H_
#define MOEKIT_MODEL_GENERATE_H_

#include <cstdint>
#include <random>
#include <vector>

#include "model/model.h"

namespace moekit::m2 {

struct SamplingParams {
  float temperature = 0.0f;  // <= 0: greedy (argmax, ties to the lower id)
  int64_t top_k = 0;         // 0: no top-k cut
  float top_p = 1.0f;        // 1: no nucleus cut
  uint64_t seed = 0;
};

// Chooses the next token from a row of logits. The same seed gives the same tokens on every
// platform (the random numbers come from mt19937_64's specified output).
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  int32_t next(const float* logits, int64_t vocab);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  SamplingParams sampling;
  bool stop_at_eos = true;        // the config's eos ids
  bool keep_step_logits = false;  // fill GenerateResult::step_logits
};

struct GenerateResult {
  std::vector<int32_t> new_ids;
  std::vector<float> step_logits;  // [new tokens, vocab]: the logits that chose each token
  bool stopped_at_eos = false;
  // The prompt and the new tokens reached the config's max_position_embeddings before
  // max_new_tokens (positions beyond it are outside what the model was trained on).
  bool stopped_at_position_limit = false;
  int64_t prompt_tokens = 0;  // tokens the prefill ran: 0 when it did not run
  int64_t decode_steps = 0;   // forward calls after the prefill
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Throws ModelError for a prompt id outside the vocabulary or a prompt longer than
// max_position_embeddings, even when max_new_tokens < 1 (which runs no forward).
GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options);

}  // namespace moekit::m2

#endif  // MOEKIT_MODEL_GENERATE_H_
