// NOTE: the MiniMax-M2 forward pass (per layer, f32 activations):
//   h  = rmsnorm(x) * input_layernorm
//   q, k, v = h Wq^T, h Wk^T, h Wv^T        one GEMM over the stacked [q; k; v] weights
//   q, k = QK-norm over the whole q / k row (not per head)
//   RoPE on the first rotary_dim dims of every head (NeoX rotate-half within them)
//   o = softmax(q k^T / sqrt(head_dim), causal) v   GQA: query head j reads KV head j / group
//   x += o Wo^T;  h2 = rmsnorm(x) * post_attention_layernorm
//   routing: s = sigmoid(h2 gate^T); top-k of s + bias; weights = s / sum(s) over the chosen
//   x += sum_e w_e * experts_e(h2)
// The residual add of one block is fused with the next norm (moekit_fused_add_rmsnorm).
#include "model/model.h"

#include <cblas.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>

#include "reference/numeric.h"

namespace moekit::m2 {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

moekit_tensor tensor2d(const void* data, moekit_dtype dtype, int64_t rows, int64_t cols,
                       int64_t row_stride) {
  moekit_tensor t{};
  t.data = const_cast<void*>(data);
  t.dtype = dtype;
  t.ndim = 2;
  t.shape[0] = rows;
  t.shape[1] = cols;
  t.strides[0] = row_stride;
  t.strides[1] = 1;
  return t;
}

moekit_tensor tensor1d(const void* data, moekit_dtype dtype, int64_t n) {
  moekit_tensor t{};
  t.data = const_cast<void*>(data);
  t.dtype = dtype;
  t.ndim = 1;
  t.shape[0] = n;
  return t;
}

void check(moekit_status s, const char* what) {
  if (s != MOEKIT_OK)
    throw ModelError(std::string(what) + " failed: " + moekit_status_name(s) + ": " +
                     moekit_last_error());
}

std::string tensor_where(const TensorInfo& t) { return *t.file + ": tensor '" + t.name + "'"; }

void expect_shape(const TensorInfo& t, const std::vector<int64_t>& shape) {
  if (t.shape != shape)
    throw ModelError(tensor_where(t) + " has shape " + shape_string(t.shape) + ", expected " +
                     shape_string(shape));
}

// Element i of 16-bit data that the file may not align to 2 bytes.
uint16_t load_u16(const unsigned char* p, int64_t i) {
  uint16_t v;
  std::memcpy(&v, p + 2 * i, sizeof v);
  return v;
}

void expect_float_dtype(const TensorInfo& t) {
  if (t.dtype != "F32" && t.dtype != "BF16" && t.dtype != "F16")
    throw ModelError(tensor_where(t) + " has dtype " + t.dtype +
                     ", expected a float dtype (F32, BF16, F16)");
}

// Widens an F32 / BF16 / F16 tensor to f32. Tensor data sits wherever the header put it,
// possibly unaligned, so every element is read through memcpy.
void widen(const TensorInfo& t, float* out) {
  const int64_t n = t.numel();
  if (t.dtype == "F32") {
    std::memcpy(out, t.data, static_cast<size_t>(n) * 4);
  } else if (t.dtype == "BF16") {
#pragma omp parallel for schedule(static) if (n > (1 << 20))
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(load_u16(t.data, i));
  } else if (t.dtype == "F16") {
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t h = load_u16(t.data, i), sign = (h >> 15) & 1, e = (h >> 10) & 0x1f,
                     m = h & 0x3ff;
      float v = e == 0    ? std::ldexp(static_cast<float>(m), -24)
                : e == 31 ? (m ? std::nanf("") : std::numeric_limits<float>::infinity())
                          : std::ldexp(1.0f + m / 1024.0f, static_cast<int>(e) - 15);
      out[i] = sign ? -v : v;
    }
  } else {
    expect_float_dtype(t);
  }
}

// A 1-D float tensor of `n` values, as f32.
std::vector<float> load_vector(const Checkpoint& ck, const std::string& name, int64_t n) {
  const TensorInfo& t = ck.get(name);
  expect_shape(t, {n});
  std::vector<float> v(static_cast<size_t>(n));
  widen(t, v.data());
  return v;
}

std::string scale_name(const std::string& weight_name) {
  const std::string suffix = "weight";
  return weight_name.substr(0, weight_name.size() - suffix.size()) + "weight_scale_inv";
}

// The block-scale tensor of an FP8 weight [N, K], checked.
const TensorInfo& fp8_scales(const Checkpoint& ck, const ModelConfig& c, const TensorInfo& w) {
  if (!c.fp8)
    throw ModelError(
        tensor_where(w) +
        " is F8_E4M3 but config.json has no fp8 quantization_config (block size unknown)");
  const TensorInfo* s = ck.find(scale_name(w.name));
  if (!s)
    throw ModelError(tensor_where(w) + " is F8_E4M3 but its scale tensor '" + scale_name(w.name) +
                     "' is missing");
  if (s->dtype != "F32")
    throw ModelError(tensor_where(*s) + " has dtype " + s->dtype + ", expected F32");
  expect_shape(*s, {ceil_div(w.shape[0], c.block_n), ceil_div(w.shape[1], c.block_k)});
  return *s;
}

// Every tensor that load_weights reads, checked (present, shape, dtype, FP8 scale table) before
// anything is allocated: a config.json that disagrees with its checkpoint fails here, naming the
// tensor, instead of after allocating the sizes the config asks for.
void check_tensors(const Checkpoint& ck, const ModelConfig& c) {
  auto vector = [&](const std::string& name, int64_t n) {
    const TensorInfo& t = ck.get(name);
    expect_shape(t, {n});
    expect_float_dtype(t);
  };
  // Expert weights go to moekit_experts_pack, which takes no F16.
  auto matrix = [&](const std::string& name, int64_t N, int64_t K, bool expert = false) {
    const TensorInfo& t = ck.get(name);
    expect_shape(t, {N, K});
    if (t.dtype == "F8_E4M3")
      fp8_scales(ck, c, t);
    else if (expert && t.dtype != "BF16" && t.dtype != "F32")
      throw ModelError(tensor_where(t) + " has dtype " + t.dtype +
                       ", expected BF16, F32 or F8_E4M3");
    else
      expect_float_dtype(t);
  };
  const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_local_experts;
  const int64_t qw = c.q_width(), kvw = c.kv_width(), V = c.vocab_size;
  matrix("model.embed_tokens.weight", V, H);
  vector("model.norm.weight", H);
  if (!c.tie_word_embeddings) matrix("lm_head.weight", V, H);
  for (int64_t L = 0; L < c.num_hidden_layers; ++L) {
    const std::string p = "model.layers." + std::to_string(L) + ".";
    vector(p + "input_layernorm.weight", H);
    vector(p + "post_attention_layernorm.weight", H);
    if (c.use_qk_norm) {
      vector(p + "self_attn.q_norm.weight", qw);
      vector(p + "self_attn.k_norm.weight", kvw);
    }
    matrix(p + "self_attn.q_proj.weight", qw, H);
    matrix(p + "self_attn.k_proj.weight", kvw, H);
    matrix(p + "self_attn.v_proj.weight", kvw, H);
    matrix(p + "self_attn.o_proj.weight", H, qw);
    const std::string moe = p + "block_sparse_moe.";
    matrix(moe + "gate.weight", E, H);
    if (c.use_routing_bias) vector(moe + "e_score_correction_bias", E);
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = moe + "experts." + std::to_string(e) + ".";
      matrix(x + "w1.weight", I, H, true);
      matrix(x + "w3.weight", I, H, true);
      matrix(x + "w2.weight", H, I, true);
    }
  }
}

// A weight matrix [N, K] dequantized / widened to f32 rows at `out` (N * K values).
void load_matrix_into(const Checkpoint& ck, const ModelConfig& c, const std::string& name,
                      int64_t N, int64_t K, float* out) {
  const TensorInfo& t = ck.get(name);
  expect_shape(t, {N, K});
  if (t.dtype == "F8_E4M3") {
    const TensorInfo& s = fp8_scales(ck, c, t);
    const auto* q = t.data;
    std::vector<float> scale_values(static_cast<size_t>(s.numel()));
    std::memcpy(scale_values.data(), s.data, s.bytes);
    const float* scale = scale_values.data();
    const int64_t scale_cols = ceil_div(K, c.block_k);
#pragma omp parallel for schedule(static) if (N * K > (1 << 20))
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k)
        out[n * K + k] =
            fp8_e4m3_to_f32(q[n * K + k]) * scale[(n / c.block_n) * scale_cols + k / c.block_k];
    ck.release(s);
  } else {
    widen(t, out);
  }
  ck.release(t);
}

// Progress line on stderr: layers done / total, bytes, elapsed.
class Progress {
 public:
  Progress(bool on, int64_t total_layers, size_t total_bytes)
      : on_(on), total_(total_layers), bytes_(total_bytes), t0_(Clock::now()) {}
  void update(int64_t done, size_t bytes_done) const {
    if (!on_) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * done / std::max<int64_t>(total_, 1));
    std::fprintf(stderr, "\rloading [%.*s%*s] %lld/%lld layers, %.1f/%.1f MB, %.1f s", filled,
                 "##############################", kWidth - filled, "",
                 static_cast<long long>(done), static_cast<long long>(total_), bytes_done / 1e6,
                 bytes_ / 1e6, seconds_since(t0_));
    if (done == total_) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  bool on_;
  int64_t total_;
  size_t bytes_;
  Clock::time_point t0_;
};

}  // namespace

size_t peak_rss_bytes() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<size_t>(ru.ru_maxrss) * 1024;  // Linux reports KiB
}

// ---- KV cache ------------------------------------------------------------------------------

KvCache::KvCache(const Model& model, int64_t capacity)
    : kv_width_(model.config().kv_width()),
      k_(static_cast<size_t>(model.config().num_hidden_layers)),
      v_(static_cast<size_t>(model.config().num_hidden_layers)) {
  reserve(capacity);
}

void KvCache::reserve(int64_t tokens) {
  if (tokens <= capacity_) return;
  const int64_t grown = std::max(tokens, capacity_ * 2);
  for (auto& k : k_) k.resize(static_cast<size_t>(grown * kv_width_));
  for (auto& v : v_) v.resize(static_cast<size_t>(grown * kv_width_));
  capacity_ = grown;
}

// ---- loading -------------------------------------------------------------------------------

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& options) {
  std::unique_ptr<Model> m(new Model(options.gemm));
  try {
    m->load_weights(dir, options);
  } catch (const std::bad_alloc&) {
    std::string what = dir + ": out of memory while loading the model";
    if (const size_t mib = m->stats_.checkpoint_bytes >> 20)
      what += " (its checkpoint holds " + std::to_string(mib) + " MiB)";
    throw ModelError(what);
  }
  return m;
}

Model::~Model() {
  for (Layer& l : layers_) moekit_experts_free(l.experts);
  moekit_workspace_free(ws_);
}

void Model::load_weights(const std::string& dir, const LoadOptions& options) {
  const Clock::time_point t0 = Clock::now();
  config_ = read_config(dir);
  const ModelConfig& c = config_;
  const Checkpoint ck = Checkpoint::open(dir);
  const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_local_experts;
  const int64_t qw = c.q_width(), kvw = c.kv_width(), V = c.vocab_size;
  stats_.checkpoint_bytes = ck.total_bytes();
  check_tensors(ck, c);
  Progress progress(options.progress, c.num_hidden_layers, stats_.checkpoint_bytes);
  size_t bytes_done = 0;
  auto account = [&](const TensorInfo& t) { bytes_done += t.bytes; };

  embed_.resize(static_cast<size_t>(V * H));
  load_matrix_into(ck, c, "model.embed_tokens.weight", V, H, embed_.data());
  account(ck.get("model.embed_tokens.weight"));
  final_norm_ = load_vector(ck, "model.norm.weight", H);
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    lm_head_.resize(static_cast<size_t>(V * H));
    load_matrix_into(ck, c, "lm_head.weight", V, H, lm_head_.data());
    account(ck.get("lm_head.weight"));
  }
  progress.update(0, bytes_done);

  layers_.resize(static_cast<size_t>(c.num_hidden_layers));
  moekit_dtype expert_dtype = MOEKIT_BF16;
  for (int64_t L = 0; L < c.num_hidden_layers; ++L) {
    Layer& layer = layers_[static_cast<size_t>(L)];
    const std::string p = "model.layers." + std::to_string(L) + ".";
    layer.input_norm = load_vector(ck, p + "input_layernorm.weight", H);
    layer.post_norm = load_vector(ck, p + "post_attention_layernorm.weight", H);
    if (c.use_qk_norm) {
      layer.q_norm = load_vector(ck, p + "self_attn.q_norm.weight", qw);
      layer.k_norm = load_vector(ck, p + "self_attn.k_norm.weight", kvw);
    }
    layer.wqkv.resize(static_cast<size_t>((qw + 2 * kvw) * H));
    load_matrix_into(ck, c, p + "self_attn.q_proj.weight", qw, H, layer.wqkv.data());
    load_matrix_into(ck, c, p + "self_attn.k_proj.weight", kvw, H, layer.wqkv.data() + qw * H);
    load_matrix_into(ck, c, p + "self_attn.v_proj.weight", kvw, H,
                     layer.wqkv.data() + (qw + kvw) * H);
    layer.wo.resize(static_cast<size_t>(H * qw));
    load_matrix_into(ck, c, p + "self_attn.o_proj.weight", H, qw, layer.wo.data());
    for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj"})
      account(ck.get(p + "self_attn." + n + ".weight"));

    const std::string moe = p + "block_sparse_moe.";
    layer.gate.resize(static_cast<size_t>(E * H));
    load_matrix_into(ck, c, moe + "gate.weight", E, H, layer.gate.data());
    if (c.use_routing_bias) layer.bias = load_vector(ck, moe + "e_score_correction_bias", E);

    // Experts: point the pack call straight at the mapped checkpoint, then drop those pages.
    // Weights or FP8 scale tables that the header left misaligned for their element type are
    // copied first: packers may read them as uint16_t / float.
    std::vector<const void*> w[3];
    std::vector<const float*> s[3];
    std::vector<const TensorInfo*> used;
    std::vector<std::vector<float>> aligned_copies;
    auto aligned = [&aligned_copies](const TensorInfo& t, size_t elem) -> const void* {
      if (reinterpret_cast<uintptr_t>(t.data) % elem == 0) return t.data;
      aligned_copies.emplace_back((t.bytes + 3) / 4);
      std::memcpy(aligned_copies.back().data(), t.data, t.bytes);
      return aligned_copies.back().data();
    };
    const char* kNames[3] = {"w1", "w3", "w2"};
    std::string first_dtype;
    for (int64_t e = 0; e < E; ++e)
      for (int i = 0; i < 3; ++i) {
        // Shape and dtype were checked by check_tensors; the dtype must also be the layer's.
        const TensorInfo& t =
            ck.get(moe + "experts." + std::to_string(e) + "." + kNames[i] + ".weight");
        if (first_dtype.empty()) first_dtype = t.dtype;
        if (t.dtype != first_dtype)
          throw ModelError(tensor_where(t) + " has dtype " + t.dtype +
                           " but the layer's other experts are " + first_dtype);
        w[i].push_back(aligned(t, t.dtype == "F32" ? 4 : t.dtype == "BF16" ? 2 : 1));
        used.push_back(&t);
        account(t);
        if (t.dtype == "F8_E4M3") {
          const TensorInfo& st = fp8_scales(ck, c, t);
          s[i].push_back(static_cast<const float*>(aligned(st, 4)));
          used.push_back(&st);
        }
      }
    moekit_experts_desc d{};
    d.num_experts = E;
    d.hidden = H;
    d.inter = I;
    d.dtype = first_dtype == "F8_E4M3" ? MOEKIT_FP8_E4M3
              : first_dtype == "F32"   ? MOEKIT_F32
                                       : MOEKIT_BF16;
    d.w1 = w[0].data();
    d.w3 = w[1].data();
    d.w2 = w[2].data();
    if (d.dtype == MOEKIT_FP8_E4M3) {
      d.w1_scale = s[0].data();
      d.w3_scale = s[1].data();
      d.w2_scale = s[2].data();
      d.block_n = c.block_n;
      d.block_k = c.block_k;
    }
    std::vector<float> widened;
    std::vector<const void*> widened_ptrs[3];
    if (options.expert_precision == ExpertPrecision::kF32 && d.dtype != MOEKIT_F32) {
      // Decode every matrix to f32 rows (the FP8 block rule as in load_matrix_into).
      const size_t per_expert = static_cast<size_t>(3 * I * H);
      widened.resize(static_cast<size_t>(E) * per_expert);
      for (int64_t e = 0; e < E; ++e)
        for (int i = 0; i < 3; ++i) {
          const std::string name =
              moe + "experts." + std::to_string(e) + "." + kNames[i] + ".weight";
          float* dst = widened.data() + e * per_expert + static_cast<size_t>(i * I * H);
          const int64_t rows = i == 2 ? H : I, cols = i == 2 ? I : H;
          load_matrix_into(ck, c, name, rows, cols, dst);
          widened_ptrs[i].push_back(dst);
        }
      d.dtype = MOEKIT_F32;
      d.w1 = widened_ptrs[0].data();
      d.w3 = widened_ptrs[1].data();
      d.w2 = widened_ptrs[2].data();
      d.w1_scale = d.w3_scale = d.w2_scale = nullptr;
      d.block_n = d.block_k = 0;
    }
    check(moekit_experts_pack(&d, options.expert_layout, &layer.experts), "moekit_experts_pack");
    for (const TensorInfo* t : used) ck.release(*t);
    expert_dtype = d.dtype;
    stats_.packed_expert_bytes += moekit_experts_bytes(layer.experts);
    stats_.dense_bytes += (layer.wqkv.size() + layer.wo.size() + layer.gate.size()) * sizeof(float);
    progress.update(L + 1, bytes_done);
  }
  stats_.dense_bytes +=
      (embed_.size() + (c.tie_word_embeddings ? 0 : lm_head_.size())) * sizeof(float);
  stats_.expert_dtype = expert_dtype == MOEKIT_FP8_E4M3 ? "fp8_e4m3"
                        : expert_dtype == MOEKIT_F32    ? "f32"
                                                        : "bf16";
  stats_.expert_layout = moekit_pack_layout_name(moekit_experts_layout(layers_[0].experts));

  // RoPE inverse frequencies as the Hugging Face rotary embedding computes them (f32).
  const int64_t half = c.rotary_dim / 2;
  inv_freq_.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq_[i] = static_cast<float>(
        1.0 / std::pow(c.rope_theta, static_cast<double>(static_cast<float>(2 * i) /
                                                         static_cast<float>(c.rotary_dim))));
  stats_.seconds = seconds_since(t0);
  stats_.peak_rss_bytes = peak_rss_bytes();
}

// ---- forward -------------------------------------------------------------------------------

void Model::ensure_workspace(int64_t T) {
  const ModelConfig& c = config_;
  const size_t need = moekit_moe_workspace_size(T, c.num_experts_per_tok, c.hidden_size,
                                                c.intermediate_size, moekit_num_threads());
  if (ws_ && need <= ws_bytes_) return;
  moekit_workspace_free(ws_);
  ws_ = nullptr;
  check(moekit_workspace_create(need, &ws_), "moekit_workspace_create");
  ws_bytes_ = need;
}

// Attention for T new tokens whose q [T, q_width] and k, v [T, 2 kv_width] (QK-normed, not
// yet rotated) are given; writes the concatenated heads to out [T, q_width].
void Model::attention(int64_t layer, int64_t T, KvCache* cache, float* q, float* kv, float* out) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim, qw = c.q_width(), kvw = c.kv_width();
  const int64_t half = c.rotary_dim / 2, pos0 = cache->length_, Tk = pos0 + T;
  const int64_t group = c.num_attention_heads / c.num_key_value_heads;

  // RoPE on the rotary part of every q and k head: pairs (i, i + half).
  std::vector<float> cos_t(static_cast<size_t>(half)), sin_t(static_cast<size_t>(half));
  for (int64_t t = 0; t < T; ++t) {
    const float pos = static_cast<float>(pos0 + t);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq_[i];
      cos_t[i] = std::cos(angle);
      sin_t[i] = std::sin(angle);
    }
    auto rotate = [&](float* x) {
      for (int64_t i = 0; i < half; ++i) {
        const float x0 = x[i], x1 = x[i + half];
        x[i] = x0 * cos_t[i] - x1 * sin_t[i];
        x[i + half] = x1 * cos_t[i] + x0 * sin_t[i];
      }
    };
    for (int64_t head = 0; head < c.num_attention_heads; ++head) rotate(q + t * qw + head * hd);
    float* kv_row = kv + t * 2 * kvw;
    for (int64_t head = 0; head < c.num_key_value_heads; ++head) rotate(kv_row + head * hd);
    std::memcpy(cache->k_[layer].data() + (pos0 + t) * kvw, kv_row, kvw * sizeof(float));
    std::memcpy(cache->v_[layer].data() + (pos0 + t) * kvw, kv_row + kvw, kvw * sizeof(float));
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  scores_.resize(static_cast<size_t>(T * Tk));
  const float* K = cache->k_[layer].data();
  const float* Vc = cache->v_[layer].data();
  for (int64_t j = 0; j < c.num_attention_heads; ++j) {
    const int64_t g = j / group;
    float* S = scores_.data();
    // S[T, Tk] = scale * Q_j K_g^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(T),
                static_cast<blasint>(Tk), static_cast<blasint>(hd), scale, q + j * hd,
                static_cast<blasint>(qw), K + g * hd, static_cast<blasint>(kvw), 0.0f, S,
                static_cast<blasint>(Tk));
    // Causal softmax: token t (position pos0 + t) sees keys 0 .. pos0 + t.
    for (int64_t t = 0; t < T; ++t) {
      float* r = S + t * Tk;
      const int64_t visible = pos0 + t + 1;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < visible; ++s) mx = std::max(mx, r[s]);
      float sum = 0.0f;
      for (int64_t s = 0; s < visible; ++s) {
        r[s] = std::exp(r[s] - mx);
        sum += r[s];
      }
      const float inv = 1.0f / sum;
      for (int64_t s = 0; s < visible; ++s) r[s] *= inv;
      for (int64_t s = visible; s < Tk; ++s) r[s] = 0.0f;
    }
    // out_j[T, hd] = P V_g
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(T),
                static_cast<blasint>(hd), static_cast<blasint>(Tk), 1.0f, S,
                static_cast<blasint>(Tk), Vc + g * hd, static_cast<blasint>(kvw), 0.0f,
                out + j * hd, static_cast<blasint>(qw));
  }
}

void Model::forward(const int32_t* ids, int64_t T, KvCache* cache, float* logits, bool all_logits,
                    Trace* trace) {
  const ModelConfig& c = config_;
  if (T < 1) throw ModelError("forward: no tokens");
  if (cache->kv_width_ != c.kv_width() ||
      static_cast<int64_t>(cache->k_.size()) != c.num_hidden_layers)
    throw ModelError("forward: the KV cache was made for another model");
  const int64_t H = c.hidden_size, qw = c.q_width(), kvw = c.kv_width();
  const int64_t E = c.num_local_experts, k = c.num_experts_per_tok, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int64_t t = 0; t < T; ++t)
    if (ids[t] < 0 || ids[t] >= V)
      throw ModelError("forward: token id " + std::to_string(ids[t]) + " at " + std::to_string(t) +
                       " is out of range [0, " + std::to_string(V) + ")");
  cache->reserve(cache->length_ + T);
  ensure_workspace(T);

  auto record = [&](const std::string& name, const float* p, int64_t rows, int64_t cols,
                    int64_t stride) {
    if (!trace) return;
    std::vector<float>& v = trace->f32[name];
    v.resize(static_cast<size_t>(rows * cols));
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(&v[r * cols], p + r * stride, cols * sizeof(float));
  };

  Clock::time_point t0 = Clock::now();
  x_.resize(static_cast<size_t>(T * H));
  a_.resize(static_cast<size_t>(T * H));
  b_.resize(static_cast<size_t>(T * H));
  q_.resize(static_cast<size_t>(T * qw));
  kv_.resize(static_cast<size_t>(T * 2 * kvw));
  attn_.resize(static_cast<size_t>(T * qw));
  router_logits_.resize(static_cast<size_t>(T * E));
  topk_w_.resize(static_cast<size_t>(T * k));
  topk_ids_.resize(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t)
    std::memcpy(&x_[t * H], &embed_[static_cast<size_t>(ids[t]) * H], H * sizeof(float));
  record("hidden.embed", x_.data(), T, H, H);
  if (trace) {
    // The rotary tables as the fixture stores them: the rotary_dim / 2 frequencies twice.
    const int64_t half = c.rotary_dim / 2, pos0 = cache->length_;
    trace->f32["rope.inv_freq"] = inv_freq_;
    std::vector<float>& cs = trace->f32["rope.cos"];
    std::vector<float>& sn = trace->f32["rope.sin"];
    cs.resize(static_cast<size_t>(T * 2 * half));
    sn.resize(cs.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < 2 * half; ++i) {
        const float angle = static_cast<float>(pos0 + t) * inv_freq_[i % half];
        cs[t * 2 * half + i] = std::cos(angle);
        sn[t * 2 * half + i] = std::sin(angle);
      }
  }

  moekit_tensor x = tensor2d(x_.data(), MOEKIT_F32, T, H, H);
  moekit_tensor a = tensor2d(a_.data(), MOEKIT_F32, T, H, H);
  moekit_tensor b = tensor2d(b_.data(), MOEKIT_F32, T, H, H);
  moekit_route_params rp = moekit_route_params_default();
  rp.top_k = static_cast<int32_t>(k);
  rp.scoring = MOEKIT_SCORING_SIGMOID;
  rp.renormalize = 1;

  for (int64_t L = 0; L < c.num_hidden_layers; ++L) {
    const Layer& layer = layers_[static_cast<size_t>(L)];
    const std::string suffix = ".layer." + std::to_string(L);
    const moekit_tensor w_in = tensor1d(layer.input_norm.data(), MOEKIT_F32, H);
    if (L == 0) {
      check(moekit_rmsnorm(&x, &w_in, eps, &a), "moekit_rmsnorm");
    } else {
      check(moekit_fused_add_rmsnorm(&a, &x, &w_in, eps), "moekit_fused_add_rmsnorm");
      record("hidden.layer." + std::to_string(L - 1), x_.data(), T, H, H);
    }
    record("attn.in" + suffix, a_.data(), T, H, H);
    times_.rest += seconds_since(t0);
    t0 = Clock::now();

    // q and k go to separate buffers: moekit_qk_norm wants them apart in memory.
    gemm_.run(a_.data(), T, H, H, layer.wqkv.data(), qw, q_.data(), qw);
    gemm_.run(a_.data(), T, H, H, layer.wqkv.data() + qw * H, 2 * kvw, kv_.data(), 2 * kvw);
    if (c.use_qk_norm) {
      moekit_tensor q = tensor2d(q_.data(), MOEKIT_F32, T, qw, qw);
      moekit_tensor kk = tensor2d(kv_.data(), MOEKIT_F32, T, kvw, 2 * kvw);
      const moekit_tensor qn = tensor1d(layer.q_norm.data(), MOEKIT_F32, qw);
      const moekit_tensor kn = tensor1d(layer.k_norm.data(), MOEKIT_F32, kvw);
      check(moekit_qk_norm(&q, &kk, &qn, &kn, eps), "moekit_qk_norm");
    }
    record("attn.q_normed" + suffix, q_.data(), T, qw, qw);
    record("attn.k_normed" + suffix, kv_.data(), T, kvw, 2 * kvw);
    record("attn.v" + suffix, kv_.data() + kvw, T, kvw, 2 * kvw);
    attention(L, T, cache, q_.data(), kv_.data(), attn_.data());
    gemm_.run(attn_.data(), T, qw, qw, layer.wo.data(), H, b_.data(), H);
    record("attn.out" + suffix, b_.data(), T, H, H);
    times_.attention += seconds_since(t0);
    t0 = Clock::now();

    const moekit_tensor w_post = tensor1d(layer.post_norm.data(), MOEKIT_F32, H);
    check(moekit_fused_add_rmsnorm(&b, &x, &w_post, eps), "moekit_fused_add_rmsnorm");
    record("moe.in" + suffix, b_.data(), T, H, H);
    times_.rest += seconds_since(t0);
    t0 = Clock::now();

    const moekit_tensor gate = tensor2d(layer.gate.data(), MOEKIT_F32, E, H, H);
    const moekit_tensor bias = tensor1d(layer.bias.data(), MOEKIT_F32, E);
    moekit_tensor weights = tensor2d(topk_w_.data(), MOEKIT_F32, T, k, k);
    moekit_tensor topk_ids = tensor2d(topk_ids_.data(), MOEKIT_I32, T, k, k);
    moekit_tensor rlogits = tensor2d(router_logits_.data(), MOEKIT_F32, T, E, E);
    check(moekit_router_topk(&b, &gate, layer.bias.empty() ? nullptr : &bias, &rp, &weights,
                             &topk_ids, trace ? &rlogits : nullptr),
          "moekit_router_topk");
    if (trace) {
      record("router.logits" + suffix, router_logits_.data(), T, E, E);
      record("router.topk_weights" + suffix, topk_w_.data(), T, k, k);
      trace->i32["router.topk_ids" + suffix] = topk_ids_;
    }
    times_.routing += seconds_since(t0);
    t0 = Clock::now();

    check(moekit_fused_moe(layer.experts, &b, &weights, &topk_ids, nullptr, ws_, &a),
          "moekit_fused_moe");
    record("moe.out" + suffix, a_.data(), T, H, H);
    times_.experts += seconds_since(t0);
    t0 = Clock::now();
  }

  const moekit_tensor w_final = tensor1d(final_norm_.data(), MOEKIT_F32, H);
  check(moekit_fused_add_rmsnorm(&a, &x, &w_final, eps), "moekit_fused_add_rmsnorm");
  record("hidden.layer." + std::to_string(c.num_hidden_layers - 1), x_.data(), T, H, H);
  record("hidden.final_norm", a_.data(), T, H, H);
  const int64_t rows = all_logits ? T : 1;
  gemm_.run(a_.data() + (T - rows) * H, rows, H, H, lm_head_.data(), V, logits, V);
  cache->length_ += T;
  times_.rest += seconds_since(t0);

  for (const char* op : {"rmsnorm", "fused_add_rmsnorm", "qk_norm", "router_topk", "fused_moe"}) {
    const char* name = moekit_last_impl(op);
    if (name && *name) kernels_[op] = name;
  }
  kernels_["dense_gemm"] = gemm_backend_name(gemm_.backend());
  kernels_["attention"] = "openblas_sgemm_per_head";
}

std::map<std::string, std::string> Model::kernels() const { return kernels_; }

}  // namespace moekit::m2
