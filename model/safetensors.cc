// safetensors: 8-byte little-endian header length N, N bytes of JSON
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data;
// offsets count from the end of the header.
#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace moekit::m2 {
namespace {

// A header larger than this is not a real checkpoint's (the largest hub headers are a few MB).
constexpr uint64_t kMaxHeaderBytes = uint64_t{256} << 20;
constexpr int64_t kMaxDim = int64_t{1} << 40;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw ModelError(path + ": " + what);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t safetensors_dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> kSizes = {
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2},    {"I64", 8},
      {"I32", 4}, {"I16", 2}, {"I8", 1},  {"U8", 1},      {"BOOL", 1},
      {"U16", 2}, {"U32", 4}, {"U64", 8}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
  };
  auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile);
  f->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "is not a regular file");
  }
  f->size_ = static_cast<size_t>(st.st_size);
  if (f->size_ < 8) {
    ::close(fd);
    fail(path, "truncated: " + std::to_string(f->size_) +
                   " bytes, shorter than the 8-byte header length");
  }
  void* p = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (p == MAP_FAILED) fail(path, std::string("cannot mmap: ") + std::strerror(map_errno));
  f->base_ = static_cast<unsigned char*>(p);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | f->base_[i];
  if (header_len > kMaxHeaderBytes || header_len > f->size_ - 8)
    fail(path, "corrupt header: header length " + std::to_string(header_len) +
                   " exceeds the file size " + std::to_string(f->size_) +
                   (header_len > kMaxHeaderBytes ? "" : " (truncated file?)"));
  const char* header = reinterpret_cast<const char*>(f->base_ + 8);
  nlohmann::json j = nlohmann::json::parse(header, header + header_len, nullptr, false);
  if (j.is_discarded()) fail(path, "corrupt header: not valid JSON");
  if (!j.is_object()) fail(path, "corrupt header: not a JSON object");

  const size_t data_start = 8 + header_len;
  const size_t data_size = f->size_ - data_start;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string where = "tensor '" + it.key() + "': ";
    const nlohmann::json& e = it.value();
    if (!e.is_object()) fail(path, where + "header entry is not an object");
    if (!e.contains("dtype") || !e["dtype"].is_string())
      fail(path, where + "header entry has no string 'dtype'");
    if (!e.contains("shape") || !e["shape"].is_array())
      fail(path, where + "header entry has no array 'shape'");
    if (!e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2)
      fail(path, where + "header entry has no 'data_offsets' pair");
    TensorInfo t;
    t.name = it.key();
    t.dtype = e["dtype"].get<std::string>();
    int64_t numel = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(kMaxDim))
        fail(path, where + "shape " + e["shape"].dump() + " is not a list of sizes");
      t.shape.push_back(d.get<int64_t>());
      if (numel > 0 && t.shape.back() > kMaxDim / numel)
        fail(path, where + "shape " + e["shape"].dump() + " is too large");
      numel *= t.shape.back();
    }
    for (const auto& o : e["data_offsets"])
      if (!o.is_number_unsigned()) fail(path, where + "data_offsets are not non-negative integers");
    const uint64_t begin = e["data_offsets"][0].get<uint64_t>();
    const uint64_t end = e["data_offsets"][1].get<uint64_t>();
    if (begin > end)
      fail(path, where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                     "] are reversed");
    if (end > data_size)
      fail(path, where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                     "] run past the end of the data (" + std::to_string(data_size) +
                     " bytes): truncated or corrupt file");
    const size_t elem = safetensors_dtype_size(t.dtype);
    if (elem != 0 && static_cast<uint64_t>(numel) * elem != end - begin)
      fail(path, where + "holds " + std::to_string(end - begin) + " bytes but " + t.dtype + " " +
                     shape_string(t.shape) + " needs " + std::to_string(numel * elem));
    t.data = f->base_ + data_start + begin;
    t.bytes = static_cast<size_t>(end - begin);
    t.file = &f->path_;
    f->tensors_.emplace(t.name, std::move(t));
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_) munmap(base_, size_);
}

void SafetensorsFile::release(const unsigned char* p, size_t bytes) const {
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

Checkpoint Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw ModelError(dir + ": not a directory");
  std::vector<std::string> paths;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;  // tensor -> shard file name
  if (fs::exists(index_path, ec)) {
    std::ifstream in(index_path);
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      throw ModelError(index_path.string() + ": not valid JSON");
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw ModelError(index_path.string() + ": has no object 'weight_map'");
    std::set<std::string> shards;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        throw ModelError(index_path.string() + ": weight_map entry '" + it.key() +
                         "' is not a file name");
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..")
        throw ModelError(index_path.string() + ": shard name '" + shard +
                         "' is not a plain file name");
      weight_map[it.key()] = shard;
      shards.insert(shard);
    }
    for (const std::string& s : shards) paths.push_back((fs::path(dir) / s).string());
  } else if (fs::exists(fs::path(dir) / "model.safetensors", ec)) {
    paths.push_back((fs::path(dir) / "model.safetensors").string());
  } else {
    for (const auto& entry : fs::directory_iterator(dir, ec))
      if (entry.path().extension() == ".safetensors") paths.push_back(entry.path().string());
    std::sort(paths.begin(), paths.end());
  }
  if (paths.empty()) throw ModelError(dir + ": no .safetensors files");

  Checkpoint c;
  for (const std::string& p : paths) {
    c.files_.push_back(SafetensorsFile::open(p));
    const SafetensorsFile* f = c.files_.back().get();
    const std::string shard_name = fs::path(p).filename().string();
    for (const auto& [name, info] : f->tensors()) {
      // With an index, a tensor belongs to the shard the index names.
      if (!weight_map.empty()) {
        auto it = weight_map.find(name);
        if (it == weight_map.end() || it->second != shard_name) continue;
      }
      if (c.index_.count(name))
        throw ModelError(p + ": tensor '" + name + "' also appears in " +
                         *c.index_[name].first->file);
      c.index_[name] = {&info, f};
    }
  }
  for (const auto& [name, shard] : weight_map)
    if (!c.index_.count(name))
      throw ModelError((fs::path(dir) / shard).string() + ": missing tensor '" + name +
                       "' (listed in model.safetensors.index.json)");
  return c;
}

const TensorInfo* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.first;
}

const TensorInfo& Checkpoint::get(const std::string& name) const {
  const TensorInfo* t = find(name);
  if (!t) throw ModelError(describe_files() + ": missing tensor '" + name + "'");
  return *t;
}

void Checkpoint::release(const TensorInfo& t) const {
  auto it = index_.find(t.name);
  if (it != index_.end()) it->second.second->release(t.data, t.bytes);
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& f : files_) n += f->size();
  return n;
}

std::string Checkpoint::describe_files() const {
  if (files_.size() == 1) return files_[0]->path();
  std::string s;
  for (size_t i = 0; i < files_.size(); ++i) s += (i ? ", " : "") + files_[i]->path();
  return s;
}

}  // namespace moekit::m2
