// deft public C++ API: describe a layer, compile it once, launch it on your stream.
//
//   deft::LayerDesc d = deft::parse_layer_desc("deform_conv2d n=8 c=64 ...");
//   deft::Kernel k = deft::compile(d);
//   k.forward({.input = x, .offset = off, .mask = m, .weight = w, .output = y}, stream);
//
// Pointers are device pointers to contiguous tensors in the description's layout and dtype.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "deft/ir.hpp"

typedef struct CUstream_st* CUstream;  // the same type as cudaStream_t

namespace deft {

struct CompileOptions {
  // Run this variant instead of the tuned or heuristic one.
  std::optional<Variant> variant;
  // Compile for this architecture (e.g. 90 for sm_90) instead of the current device's.
  // A kernel compiled for another architecture can be inspected but not launched.
  std::optional<int> arch;
  // Database file; default: $DEFT_CACHE_DIR/deft.db, else $XDG_CACHE_HOME/deft/deft.db,
  // else ~/.cache/deft/deft.db. "" disables the persistent cache.
  std::optional<std::string> cache_path;
  // Extra NVRTC options appended after deft's own (they are part of the cache key).
  std::vector<std::string> nvrtc_options;
};

// What forward() reads and writes. Shapes come from the LayerDesc; mask and bias may be null
// only when the description has mask=0 / bias=0.
struct ForwardArgs {
  const void* input = nullptr;
  const void* offset = nullptr;
  const void* mask = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* output = nullptr;
};

// The shape each tensor of a description must have, in the description's layout.
struct TensorShapes {
  std::vector<int64_t> input, offset, mask, weight, bias, output;
};
TensorShapes tensor_shapes(const LayerDesc&);

// Where a compiled kernel came from, for logs, the CLI and tests.
struct CompileInfo {
  std::string source;           // generated CUDA
  std::string source_path;      // where the generated source was saved (for error reports)
  std::string ptx;              // empty when the cubin came from the cache
  std::vector<char> cubin;
  std::string resource_report;  // ptxas -v lines (registers, shared memory, spills)
  std::string kernel_name;
  std::string cache_key;
  bool from_cache = false;      // cubin loaded from the database, NVRTC not called
  int arch = 0;
  double compile_seconds = 0;
};

class KernelImpl;

// A compiled, loaded kernel for one layer. Cheap to copy (shared). Thread-safe to launch.
class Kernel {
 public:
  Kernel() = default;
  explicit Kernel(std::shared_ptr<KernelImpl> impl) : impl_(std::move(impl)) {}

  const LayerDesc& desc() const;
  const Variant& variant() const;
  const CompileInfo& info() const;
  // Launches on `stream` (nullptr: the legacy default stream) in the current CUDA context
  // (the primary context of device 0 is made current if none is). Checks argument presence.
  void forward(const ForwardArgs& args, CUstream stream = nullptr) const;
  bool valid() const { return impl_ != nullptr; }
  const KernelImpl* impl() const { return impl_.get(); }

 private:
  std::shared_ptr<KernelImpl> impl_;
};

// Generates, compiles (or loads from the cache) and loads the kernel for `desc`.
// Thread-safe; the same (desc, options) in one process returns the same loaded kernel.
Kernel compile(const LayerDesc& desc, const CompileOptions& options = {});

// Generates and compiles for an explicit architecture without touching a GPU (CLI, tests).
CompileInfo compile_offline(const LayerDesc& desc, const CompileOptions& options);

// The CUDA source deft generates for (desc, variant): what NVRTC compiles.
std::string generate_source(const LayerDesc& desc, const Variant& variant);

// PTX for the description (NVRTC, virtual architecture compute_<arch>); no GPU needed.
std::string emit_ptx(const LayerDesc& desc, const CompileOptions& options);

// Process-wide counters (for tests and logs).
struct Stats {
  int64_t nvrtc_compiles = 0;   // programs NVRTC compiled in this process
  int64_t cache_hits = 0;       // cubins loaded from the database
  int64_t kernels_loaded = 0;   // modules loaded into a context
};
Stats stats();

// Library version string, part of every cache key.
const char* version();

// True when a CUDA driver and at least one device are present.
bool gpu_available();

}  // namespace deft
