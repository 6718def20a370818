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
  // Use a matching tuning record from the database when there is one (see deft::tune).
  bool use_tuning_records = true;
  // Which offset statistics the layer sees, as a bucket (see stats_bucket()).
  std::string stats_bucket = "v1:sigma~2";
  // Backward: bitwise-identical gradients from run to run. grad input is accumulated in 64-bit
  // fixed point (integer sums, which do not depend on their order) instead of float atomics,
  // or, in the depthwise kernel (f16, bf16, f32), in f32 in a fixed order (each input pixel
  // gathers its sampling points from lists sorted by point index); grad offset, mask, weight
  // and bias never use atomics in either mode.
  bool deterministic = false;
  // Run these variants for the backward passes (Kernel::backward) instead of the tuned or
  // heuristic ones; `deterministic` still decides det=.
  std::optional<Variant> backward_data_variant, backward_weight_variant;
};

// What forward() reads and writes. Shapes come from the LayerDesc; mask and bias may be null
// only when the description has mask=0 / bias=0. Every pointer must be aligned to its element
// size, and input, weight and output to 16 bytes where the kernel accesses them in 16-byte
// vectors (fresh allocations always are); forward() names a tensor that is not.
struct ForwardArgs {
  const void* input = nullptr;
  const void* offset = nullptr;
  const void* mask = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* output = nullptr;
};

// What backward() reads and writes. Inputs as for forward() plus grad_output (the output's
// shape), which some kernels read in 8- or 16-byte vectors and then need aligned so (fresh
// allocations always are; backward() names a tensor that is not). Each gradient pointer may be
// null: that gradient is not computed. Gradients have the
// shapes, layout and dtype of their tensors (grad_bias: [k]). A description with a fused
// activation (act != none) has no backward: apply the activation outside deft.
//
// Sampling points whose position is NaN, or outside (-1, h) x (-1, w), contribute nothing:
// their grad offset and grad mask entries are 0 and they scatter nothing into grad input.
// Non-finite values in grad_output, weight or mask propagate as NaN (in deterministic mode
// with fixed-point sums, grad input becomes NaN everywhere, since fixed point cannot carry
// them; the depthwise kernel's f32 sums propagate them as the fast mode does).
struct BackwardArgs {
  const void* input = nullptr;
  const void* offset = nullptr;
  const void* mask = nullptr;
  const void* weight = nullptr;
  const void* grad_output = nullptr;
  void* grad_input = nullptr;
  void* grad_offset = nullptr;
  void* grad_mask = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
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
  int dynamic_shared_bytes = 0;   // the main kernel's dynamic shared memory, set at launch
  std::string shared_layout;      // gemm_wgmma: what that memory holds ("" for other kernels)
  // forward: the pre-passes' scratch (transposed input, packed weight); backward: the
  // accumulators and partials, the packed weight, deterministic grad input's gather buffers
  int64_t workspace_bytes = 0;
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
  // Gradients of the forward pass (see BackwardArgs). The backward kernels (passes
  // backward_data and backward_weight of the same layer) are compiled, or loaded from the
  // cache, on the first call; compile them ahead with prepare_backward(). Deterministic when
  // the kernel was compiled with CompileOptions::deterministic, or when `deterministic` is 1
  // (-1: the compile option). Temporary workspace is stream-ordered (cuMemAllocAsync).
  void backward(const BackwardArgs& args, CUstream stream = nullptr, int deterministic = -1) const;
  // Compiles (or loads) the backward kernels now, so that the first backward() launches at once.
  void prepare_backward(int deterministic = -1) const;
  bool valid() const { return impl_ != nullptr; }
  const KernelImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<KernelImpl>& shared_impl() const { return impl_; }

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

// ---- Tuning ------------------------------------------------------------------------------

// The statistics bucket of offsets ~ N(0, sigma^2) px: sigma rounded to a power of two
// ("v1:sigma~2"). The "v1" is the bucketing version.
std::string stats_bucket(double offset_sigma);

// The variants the tuner tries for a layer: the heuristic default first, then every valid
// tile / vector / transpose choice of its algorithm family.
// `arch` (e.g. 90; 0: unknown) adds the variants of that architecture alone (gemm_wgmma on
// sm_90); the first variant is default_variant(desc, arch).
std::vector<Variant> search_space(const LayerDesc& desc, int arch = 0);
// A hash of search_space(desc, arch), part of a tuning record's key.
std::string search_space_hash(const LayerDesc& desc, int arch = 0);

// The space with what else it may depend on. window (sm_90): also staging=window variants of
// the wgmma tiles (the default's, 64 x 128, 128 x 64), with the halos window_halos() gives for
// the statistics bucket of offset_sigma, so that every layer of one bucket has one space.
// Off by default: the window kernel has not yet passed its GPU tests.
struct SearchOptions {
  int arch = 0;
  bool window = false;
  double offset_sigma = 2.0;
};
std::vector<Variant> search_space(const LayerDesc& desc, const SearchOptions& options);
std::string search_space_hash(const LayerDesc& desc, const SearchOptions& options);
// Halos for offsets ~ N(0, sigma^2), sigma rounded to its bucket: the window serves vertical
// offsets in [-halo, halo + 1), so ceil of the p50, p90 and p99 of |dy| (0.674, 1.645 and 2.576
// sigma), at most 16, without repeats. The p99 halo serves nearly every read; the smaller ones
// stay in the space because a smaller window (more blocks per SM) may win anyway.
std::vector<int> window_halos(double offset_sigma);
// The sigma a statistics bucket stands for (2^k, as stats_bucket rounds it).
double bucket_sigma(double offset_sigma);

struct TuneOptions {
  double offset_sigma = 2.0;      // synthetic calibration batch: offsets ~ N(0, sigma^2) px
  std::optional<std::string> cache_path;  // database, as in CompileOptions
  int max_candidates = 0;         // 0: the whole search space
  double seconds_per_candidate = 0.25;    // timing budget per candidate (after warm-up)
  bool window = false;            // search the staging=window variants too (SearchOptions)
  bool write_record = true;
  uint64_t seed = 1;
};

struct TuneCandidate {
  Variant variant;
  double median_us = -1;  // < 0: failed (error says why)
  double rel_err = -1;    // against the default variant's output
  int timed_runs = 0;     // runs behind the median (fewer when more could not change the answer)
  std::string error;
};

struct TuneResult {
  std::string desc, stats_bucket, device;
  int arch = 0;  // the GPU's compute capability as 10 * major + minor (0: simulated)
  Variant winner;
  double winner_us = 0, default_us = 0;
  std::vector<TuneCandidate> candidates;  // default first
};

// Compiles every candidate (in parallel), checks each against the default variant's output on
// random inputs, times the survivors (median of CUDA events, L2 flushed between runs, stopping
// a candidate's runs early where more cannot change the answer: timing_settled), and
// writes a tuning record that compile() then uses. Needs a GPU. Never called implicitly.
TuneResult tune(const LayerDesc& desc, const TuneOptions& options = {});

// ---- Workspace memory ------------------------------------------------------------------------

// forward() and backward() take their per-call scratch (a channels-last input, the packed
// weight, grad-input accumulators) stream-ordered from a per-device pool that keeps freed
// memory for the next call, the way PyTorch's caching allocator does: the device's default
// pool would hand it back to the driver at every synchronisation and map it again on the next
// call. The pool holds at most the largest workspaces in flight at once.
struct WorkspaceStats {
  uint64_t reserved_bytes = 0;  // held from the driver, summed over devices
  uint64_t used_bytes = 0;      // of those, in use by calls not yet completed
};
WorkspaceStats workspace_stats();
// Returns the pools' unused memory to the driver (memory of calls in flight stays).
void release_workspace();

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
