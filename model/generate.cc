#include "model/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace moekit::m2 {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int32_t argmax(const float* logits, int64_t vocab) {
  int64_t best = 0;
  for (int64_t i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

}  // namespace

Sampler::Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

int32_t Sampler::next(const float* logits, int64_t vocab) {
  if (!(params_.temperature > 0.0f)) return argmax(logits, vocab);
  candidates_.clear();
  for (int64_t i = 0; i < vocab; ++i)
    if (!std::isnan(logits[i])) candidates_.emplace_back(logits[i], static_cast<int32_t>(i));
  if (candidates_.empty()) return 0;
  // Descending logits, ties to the lower id: the order the cuts below rely on.
  auto by_logit = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
    return x.first != y.first ? x.first > y.first : x.second < y.second;
  };
  size_t keep = candidates_.size();
  if (params_.top_k > 0) keep = std::min(keep, static_cast<size_t>(params_.top_k));
  std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit);
  candidates_.resize(keep);

  std::vector<double> probs(keep);
  const double top = candidates_[0].first;
  double sum = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((candidates_[i].first - top) / params_.temperature);
    sum += probs[i];
  }
  // Nucleus: the smallest prefix whose probability reaches top_p.
  if (params_.top_p > 0.0f && params_.top_p < 1.0f) {
    double cumulative = 0.0;
    size_t n = 0;
    while (n < keep) {
      cumulative += probs[n++] / sum;
      if (cumulative >= params_.top_p) break;
    }
    keep = n;
    sum = 0.0;
    for (size_t i = 0; i < keep; ++i) sum += probs[i];
  }
  // Uniform in [0, 1) from the top 53 bits of the generator's specified output.
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * sum;
  double cumulative = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += probs[i];
    if (u < cumulative) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

GenerateResult generate(Model& model, const std::vector<int32_t>& prompt,
                        const GenerateOptions& options) {
  const ModelConfig& c = model.config();
  const int64_t V = c.vocab_size, P = static_cast<int64_t>(prompt.size());
  const int64_t limit = c.max_position_embeddings;
  // The same checks whether or not a forward runs, so that a bad prompt fails at any token limit.
  for (int64_t t = 0; t < P; ++t)
    if (prompt[t] < 0 || prompt[t] >= V)
      throw ModelError("generate: token id " + std::to_string(prompt[t]) + " at " +
                       std::to_string(t) + " is out of range [0, " + std::to_string(V) + ")");
  if (limit > 0 && P > limit)
    throw ModelError("generate: the prompt's " + std::to_string(P) +
                     " tokens exceed max_position_embeddings (" + std::to_string(limit) + ")");
  GenerateResult r;
  // No token to generate: no prefill either (its only output would be that token's logits).
  if (P == 0 || options.max_new_tokens < 1) return r;
  // Each new token takes the next position; stop (and say so) rather than run past the limit.
  const int64_t room = limit > 0 ? limit - P : options.max_new_tokens;
  const int64_t max_new = std::min(options.max_new_tokens, room);
  const bool capped = max_new < options.max_new_tokens;
  if (max_new < 1) {
    r.stopped_at_position_limit = true;
    return r;
  }
  r.prompt_tokens = P;
  // The cache grows as needed; reserving for a huge token limit up front would fail needlessly.
  constexpr int64_t kInitialDecodeReserve = 256;
  KvCache cache(model, P + std::min(max_new, kInitialDecodeReserve));
  Sampler sampler(options.sampling);
  std::vector<float> logits(static_cast<size_t>(V));
  auto is_eos = [&](int32_t id) {
    return options.stop_at_eos &&
           std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) != c.eos_token_ids.end();
  };
  auto take = [&]() {
    const int32_t id = sampler.next(logits.data(), V);
    r.new_ids.push_back(id);
    if (options.keep_step_logits)
      r.step_logits.insert(r.step_logits.end(), logits.begin(), logits.end());
    return id;
  };

  Clock::time_point t0 = Clock::now();
  model.forward(prompt.data(), r.prompt_tokens, &cache, logits.data(), false);
  int32_t id = take();
  r.prefill_seconds = seconds_since(t0);
  if (is_eos(id)) {
    r.stopped_at_eos = true;
    return r;
  }
  t0 = Clock::now();
  while (static_cast<int64_t>(r.new_ids.size()) < max_new) {
    model.forward(&id, 1, &cache, logits.data(), false);
    ++r.decode_steps;
    id = take();
    if (is_eos(id)) {
      r.stopped_at_eos = true;
      break;
    }
  }
  r.decode_seconds = seconds_since(t0);
  r.stopped_at_position_limit = capped && !r.stopped_at_eos;
  return r;
}

}  // namespace moekit::m2
