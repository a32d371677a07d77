// Reading Hugging Face safetensors checkpoints through mmap: one file, or the shards named by
// model.safetensors.index.json. Every header field is checked against the file before a tensor
// is handed out, so a truncated or corrupt file gives an error naming the file and the tensor,
// never an out-of-range read.
#ifndef MOEKIT_MODEL_SAFETENSORS_H_
#define MOEKIT_MODEL_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace moekit::m2 {

// Every loading failure: the message names the file and, where there is one, the tensor.
class ModelError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One tensor of a mapped file. `data` stays valid while its SafetensorsFile lives.
struct TensorInfo {
  std::string name;
  std::string dtype;  // as written in the header: "BF16", "F32", "F8_E4M3", ...
  std::vector<int64_t> shape;
  const unsigned char* data = nullptr;
  size_t bytes = 0;
  const std::string* file = nullptr;  // path of the file holding it

  int64_t numel() const;
};

// Bytes per element of a safetensors dtype name, 0 when unknown.
size_t safetensors_dtype_size(const std::string& dtype);
std::string shape_string(const std::vector<int64_t>& shape);

// One mapped .safetensors file.
class SafetensorsFile {
 public:
  // Maps and validates `path`; throws ModelError on any problem.
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  size_t size() const { return size_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }

  // Drops the pages wholly inside [p, p + bytes) from this process (they are re-read from the
  // file if touched again), so memory holds packed weights, not the checkpoint as well.
  void release(const unsigned char* p, size_t bytes) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  unsigned char* base_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
};

// All tensors of a checkpoint folder: model.safetensors.index.json's shards, else
// model.safetensors, else every *.safetensors file in the folder.
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);

  // Throws ModelError ("missing tensor ...") when absent.
  const TensorInfo& get(const std::string& name) const;
  const TensorInfo* find(const std::string& name) const;
  // Releases a tensor's pages (see SafetensorsFile::release).
  void release(const TensorInfo& t) const;
  size_t total_bytes() const;
  std::string describe_files() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const TensorInfo*, const SafetensorsFile*>> index_;
};

}  // namespace moekit::m2

#endif  // MOEKIT_MODEL_SAFETENSORS_H_
