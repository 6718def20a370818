// The public entry points: compile (generate -> cache or NVRTC -> load), Kernel launches,
// tensor shapes, counters. Which variant runs is decided by tuner/select.
#include <cuda.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "cache/cache.hpp"
#include "compiler/plan.hpp"
#include "deft/deft.hpp"
#include "runtime/database.hpp"
#include "runtime/driver.hpp"
#include "runtime/logging.hpp"
#include "runtime/nvrtc.hpp"
#include "tuner/select.hpp"

namespace deft {

class KernelImpl {
 public:
  LayerDesc desc;
  Variant variant;
  KernelPlan plan;
  CompileInfo info;
  CUlibrary library = nullptr;
  CUkernel kernel = nullptr;
  CUkernel transpose = nullptr;  // pre-pass (plan.transpose)
  CUkernel pack = nullptr;       // deft_pack_weight (plan.wgmma, or a packed backward weight)
  CUkernel transpose_pack = nullptr;  // deft_transpose_pack (forward on wgmma, nchw)
  // backward_data: deft_bwd_bound, deft_bwd_finish; backward_weight: reduce, bias.
  CUkernel aux[2] = {nullptr, nullptr};
  // backward_data with gin_mode 3 or 4 (the gather forms, bwd_common.cuh): deft_bwd_cells,
  // deft_bwd_scan, deft_bwd_fill, deft_bwd_gather
  CUkernel gather[4] = {nullptr, nullptr, nullptr, nullptr};
  CUkernel sort = nullptr;     // plan.gather_sorted: deft_bwd_sort (after the fill)
  CUkernel lgather = nullptr;  // gin_mode 5, 6: deft_bwd_lgather
  // plan.fused_gw: deft_bwd_fused_gw (grad weight from the split partials) and, with
  // plan.fw.cbpog > 1, deft_bwd_fused_pg (grad offset and mask from the channel blocks' parts)
  CUkernel fused[2] = {nullptr, nullptr};
  // Forward kernels: what compiled them (for the backward passes, compiled on first use),
  // and those passes once compiled: [deterministic][0 data, 1 weight].
  CompileOptions options;
  std::mutex backward_mu;
  std::shared_ptr<KernelImpl> backward[2][2];
};

namespace {

std::atomic<int64_t> g_cache_hits{0};
std::atomic<int64_t> g_loaded{0};

}  // namespace

// One open database per path for the whole process.
std::shared_ptr<cache::Database> database_for(const std::string& path) {
  static std::mutex mu;
  static std::map<std::string, std::shared_ptr<cache::Database>> open;
  std::lock_guard<std::mutex> lock(mu);
  auto& db = open[path];
  if (!db) db = cache::Database::open(path);
  return db;
}

std::string resolve_cache_path(const std::optional<std::string>& path) {
  return path ? *path : cache::default_database_path();
}

namespace {

// Variants with sm_90a instructions compile for sm_90 alone.
void require_arch_for(const Variant& v, int arch) {
  if (variant_needs_sm90a(v) && arch != 90)
    throw Error(fmt::format("algo={} uses Hopper's wgmma instructions and needs sm_90, not sm_{}",
                            to_string(v.algo), arch));
}

}  // namespace

CompileInfo compile_offline(const LayerDesc& desc, const CompileOptions& options) {
  init_logging();
  if (!options.arch) throw Error("compile_offline needs an explicit architecture (options.arch)");
  const int arch = *options.arch;
  if (arch < 70 || arch > 200) throw Error(fmt::format("arch sm_{} is not supported (sm_70 or newer)", arch));
  const Variant variant = tuner::choose_variant(desc, options);
  const KernelPlan plan = make_plan(desc, variant);
  const bool sm90a = variant_needs_sm90a(variant);
  require_arch_for(variant, arch);
  const auto t0 = std::chrono::steady_clock::now();

  CompileInfo info;
  info.source = generate_source(desc, variant);
  info.kernel_name = plan.kernel_name;
  info.arch = arch;
  info.dynamic_shared_bytes = plan.smem_bytes;
  if (plan.wgmma) {
    const int64_t stage = int64_t(variant.tile_n) * 64;
    if (plan.ws_producers > 0)
      info.shared_layout = fmt::format(
          "sampling points {} + row images {} + ring {} x (A {} + weight {}) + mbarriers {}; "
          "{} producer and {} consumer warpgroups, {} block(s) per SM",
          plan.pts_bytes, plan.ws_row_bytes, plan.nstage, int64_t(variant.tile_m) * 64, stage,
          16 * plan.nstage, plan.ws_producers, plan.ws_consumers, plan.min_blocks);
    else
      info.shared_layout = fmt::format("sampling points {} + weight ring {} x {} + mbarriers 64",
                                       plan.pts_bytes, plan.nstage, stage);
    if (plan.window)
      info.shared_layout += fmt::format(" + input window 2 x {} ({} rows x {} px x 64 B)",
                                        plan.win_bytes, plan.wrows, desc.w);
    info.shared_layout += "; the epilogue tile reuses it";
  }
  if (desc.pass == Pass::backward_data && variant.algo == Algo::gemm_wgmma) {
    const int64_t wgs = plan.block / 128, rings = wgs * plan.nstage * plan.slice_bytes;
    info.shared_layout = fmt::format(
        "grad_out tile {} ({} pixels x {} output channels) + {} weight ring(s) {} x {} + "
        "point sums {}",
        plan.gout_tile_bytes, plan.bp, plan.gout_tile_bytes / (plan.bp * dtype_size(desc.dtype)),
        wgs, plan.nstage, plan.slice_bytes, plan.smem_bytes - plan.gout_tile_bytes - rings);
  }
  info.workspace_bytes = desc.pass == Pass::forward
                             ? plan.forward_workspace()
                             : plan.workspace_bytes + plan.workspace_packed_bytes +
                                   plan.workspace_gout_bytes +
                                   (plan.gin_mode == 3 || plan.gin_mode == 4 ? gather_layout(desc, plan).bytes : 0) +
                                   plan.fw.gw_bytes + plan.fw.pg_bytes;
  cache::CubinKey key;
  key.deft_version = version();
  key.source_hash = cache::sha256_hex(info.source);
  key.options = fmt::format("{}", fmt::join(nvrtc::options_for(arch, false, options.nvrtc_options, sm90a), " "));
  key.arch = fmt::format("sm_{}", arch);
  key.nvrtc_version = nvrtc::version();
  info.cache_key = key.digest();

  const std::string db_path = resolve_cache_path(options.cache_path);
  std::shared_ptr<cache::Database> db = db_path.empty() ? nullptr : database_for(db_path);
  if (db) {
    if (auto blob = db->get_cubin(info.cache_key)) {
      info.cubin = std::move(*blob);
      info.from_cache = true;
      ++g_cache_hits;
      spdlog::debug("cache hit {} for '{}'", info.cache_key.substr(0, 12), to_string(desc));
    }
  }
  if (!info.from_cache) {
    nvrtc::Result r = nvrtc::compile(info.source, plan.kernel_name + ".cu", arch, false,
                                     options.nvrtc_options, sm90a);
    info.cubin = std::move(r.cubin);
    info.resource_report = std::move(r.log);
    if (db) {
      cache::CubinEntry meta;
      meta.kernel_name = plan.kernel_name;
      meta.desc = to_string(desc);
      meta.variant = to_string(variant);
      meta.arch = key.arch;
      db->put_cubin(info.cache_key, info.cubin, meta);
    }
    spdlog::info("compiled '{}' [{}] for sm_{} with NVRTC", to_string(desc), to_string(variant),
                 arch);
  }
  info.compile_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return info;
}

std::string emit_ptx(const LayerDesc& desc, const CompileOptions& options) {
  init_logging();
  if (!options.arch) throw Error("emit_ptx needs an explicit architecture (options.arch)");
  const Variant variant = tuner::choose_variant(desc, options);
  const KernelPlan plan = make_plan(desc, variant);
  require_arch_for(variant, *options.arch);
  return nvrtc::compile(generate_source(desc, variant), plan.kernel_name + ".cu", *options.arch,
                        true, options.nvrtc_options, variant_needs_sm90a(variant))
      .ptx;
}

Kernel compile(const LayerDesc& desc, const CompileOptions& options_in) {
  init_logging();
  validate(desc);
  require_implemented(desc);
  CompileOptions options = options_in;
  const CUdevice dev = driver::ensure_context();
  const driver::DeviceInfo dinfo = driver::device_info(dev);
  if (!options.arch) options.arch = dinfo.arch();

  const std::string db_path = resolve_cache_path(options.cache_path);
  std::shared_ptr<cache::Database> db = db_path.empty() ? nullptr : database_for(db_path);
  const tuner::DeviceKey device{dinfo.fingerprint(), std::to_string(dinfo.driver_version),
                                dinfo.arch()};
  Variant variant = tuner::choose_variant(desc, options, db.get(), &device);
  if (desc.pass != Pass::forward) variant.deterministic = options.deterministic;
  const std::string memo_key =
      fmt::format("{}|{}|{}|{}|{}|{}|{}|{}|{}", to_string(desc), to_string(variant), *options.arch,
                  resolve_cache_path(options.cache_path), fmt::join(options.nvrtc_options, " "), dev,
                  options.deterministic,
                  options.backward_data_variant ? to_string(*options.backward_data_variant) : "",
                  options.backward_weight_variant ? to_string(*options.backward_weight_variant) : "");

  static std::mutex mu;
  static std::map<std::string, std::shared_future<std::shared_ptr<KernelImpl>>> memo;
  std::promise<std::shared_ptr<KernelImpl>> promise;
  std::shared_future<std::shared_ptr<KernelImpl>> future;
  bool owner = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = memo.find(memo_key);
    if (it != memo.end()) {
      future = it->second;
    } else {
      future = promise.get_future().share();
      memo.emplace(memo_key, future);
      owner = true;
    }
  }
  if (!owner) return Kernel(future.get());

  try {
    auto impl = std::make_shared<KernelImpl>();
    impl->desc = desc;
    impl->variant = variant;
    impl->plan = make_plan(desc, variant);
    CompileOptions o = options;
    o.variant = variant;
    impl->info = compile_offline(desc, o);
    const driver::Api& api = driver::api();
    driver::check(api.cuLibraryLoadData(&impl->library, impl->info.cubin.data(), nullptr, nullptr,
                                        0, nullptr, nullptr, 0),
                  "cuLibraryLoadData");
    driver::check(api.cuLibraryGetKernel(&impl->kernel, impl->library,
                                         impl->plan.kernel_name.c_str()),
                  "cuLibraryGetKernel");
    if (impl->plan.smem_bytes > 48 * 1024)
      driver::check(api.cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                             impl->plan.smem_bytes, impl->kernel, dev),
                    "cuKernelSetAttribute(max dynamic shared memory)");
    // an nchw forward on wgmma has deft_transpose_pack instead of these two
    const bool pre_merged = impl->plan.transpose_blocks > 0;
    if ((impl->plan.transpose || impl->plan.gout_t) && !pre_merged)
      driver::check(api.cuLibraryGetKernel(&impl->transpose, impl->library, "deft_transpose"),
                    "cuLibraryGetKernel(deft_transpose)");
    if ((impl->plan.wgmma || impl->plan.workspace_packed_bytes > 0) && !pre_merged)
      driver::check(api.cuLibraryGetKernel(&impl->pack, impl->library, "deft_pack_weight"),
                    "cuLibraryGetKernel(deft_pack_weight)");
    if (impl->plan.transpose_blocks > 0)
      driver::check(api.cuLibraryGetKernel(&impl->transpose_pack, impl->library,
                                           "deft_transpose_pack"),
                    "cuLibraryGetKernel(deft_transpose_pack)");
    if (desc.pass != Pass::forward) {
      const char* names[2] = {"deft_bwd_bound", "deft_bwd_finish"};
      if (desc.pass == Pass::backward_weight) names[0] = "deft_bwd_weight_reduce", names[1] = "deft_bwd_bias";
      for (int i = 0; i < 2; ++i)
        driver::check(api.cuLibraryGetKernel(&impl->aux[i], impl->library, names[i]),
                      "cuLibraryGetKernel(backward helper)");
      if (desc.pass == Pass::backward_data && impl->plan.gin_local_gather()) {
        driver::check(api.cuLibraryGetKernel(&impl->lgather, impl->library, "deft_bwd_lgather"),
                      "cuLibraryGetKernel(deft_bwd_lgather)");
        if (impl->plan.lg.smem_bytes > 48 * 1024)
          driver::check(api.cuKernelSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 int(impl->plan.lg.smem_bytes), impl->lgather, dev),
                        "cuKernelSetAttribute(deft_bwd_lgather shared memory)");
      }
      if (impl->plan.fused_gw) {
        driver::check(api.cuLibraryGetKernel(&impl->fused[0], impl->library, "deft_bwd_fused_gw"),
                      "cuLibraryGetKernel(deft_bwd_fused_gw)");
        if (impl->plan.fw.cbpog > 1)
          driver::check(api.cuLibraryGetKernel(&impl->fused[1], impl->library, "deft_bwd_fused_pg"),
                        "cuLibraryGetKernel(deft_bwd_fused_pg)");
      }
      if (desc.pass == Pass::backward_data &&
          (impl->plan.gin_mode == 3 || impl->plan.gin_mode == 4)) {
        const char* gnames[4] = {"deft_bwd_cells", "deft_bwd_scan", "deft_bwd_fill",
                                 "deft_bwd_gather"};
        for (int i = 0; i < 4; ++i)
          driver::check(api.cuLibraryGetKernel(&impl->gather[i], impl->library, gnames[i]),
                        "cuLibraryGetKernel(grad-input gather)");
        if (impl->plan.gather_sorted)
          driver::check(api.cuLibraryGetKernel(&impl->sort, impl->library, "deft_bwd_sort"),
                        "cuLibraryGetKernel(deft_bwd_sort)");
      }
    }
    impl->options = options;
    impl->options.variant.reset();
    ++g_loaded;
    promise.set_value(impl);
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mu);
      memo.erase(memo_key);  // a later call may try again
    }
    promise.set_exception(std::current_exception());
  }
  return Kernel(future.get());
}

const LayerDesc& Kernel::desc() const { return impl_->desc; }
const Variant& Kernel::variant() const { return impl_->variant; }
const CompileInfo& Kernel::info() const { return impl_->info; }

namespace {

void require_ptr(const void* p, const char* what, const char* name) {
  if (!p) throw Error(fmt::format("{}: {} is null", what, name));
}

// The tensors both passes read: input, offset, weight, and a mask exactly when the description
// has one. `what` names the call in messages.
void check_layer_inputs(const LayerDesc& d, const char* what, const void* input,
                        const void* offset, const void* mask, const void* weight) {
  require_ptr(input, what, "input");
  require_ptr(offset, what, "offset");
  require_ptr(weight, what, "weight");
  if (d.mask) require_ptr(mask, what, "mask (the description has mask=1)");
  if (!d.mask && mask)
    throw Error(fmt::format("{}: a mask was given but the description has mask=0", what));
}

// Makes a context current and checks that the kernel was compiled for its device's
// architecture (looked up once per device ordinal).
void check_device_arch(const KernelImpl& k, const char* what) {
  const CUdevice dev = driver::ensure_context();
  static std::array<std::atomic<int>, 64> arch_of{};
  int arch = dev >= 0 && dev < 64 ? arch_of[dev].load(std::memory_order_relaxed) : 0;
  if (arch == 0) {
    arch = driver::device_info(dev).arch();
    if (dev >= 0 && dev < 64) arch_of[dev].store(arch, std::memory_order_relaxed);
  }
  if (arch != k.info.arch)
    throw Error(fmt::format("{}: kernel compiled for sm_{} cannot run on this sm_{} device", what,
                            k.info.arch, arch));
}

// Every tensor of a call (`all`: pointer, name; null ones skipped) must start on its element
// size, and the ones the kernels access in vectors (`vec`: bytes from the plans'
// align_* fields, pointer, name) on the vector: a misaligned vector access would kill the CUDA
// context. `pass`: "forward" or "backward", `who`: the kernels, for the message.
void check_alignment(const char* pass, const std::string& who, size_t es,
                     std::initializer_list<std::pair<const void*, const char*>> all,
                     std::initializer_list<std::tuple<size_t, const void*, const char*>> vec) {
  auto at = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); };
  for (auto [ptr, name] : all)
    if (ptr && at(ptr) % es != 0)
      throw Error(fmt::format("{}: {} at {} is not aligned to its {}-byte elements", pass, name,
                              ptr, es));
  for (auto [bytes, ptr, name] : vec)
    if (ptr && bytes > es && at(ptr) % bytes != 0)
      throw Error(fmt::format("{}: {} at {} is not {}-byte aligned, and {} access it in {}-byte "
                              "vectors; pass a tensor that starts on a 16-byte boundary (a fresh "
                              "allocation or a contiguous copy)",
                              pass, name, ptr, bytes, who, bytes));
}

void check_forward_alignment(const KernelImpl& k, const ForwardArgs& a) {
  const KernelPlan& p = k.plan;
  check_alignment("forward", fmt::format("the {} kernel's loads and stores", to_string(k.variant.algo)),
                  size_t(dtype_size(k.desc.dtype)),
                  {{a.input, "input"}, {a.offset, "offset"}, {a.mask, "mask"},
                   {a.weight, "weight"}, {a.bias, "bias"}, {a.output, "output"}},
                  {{size_t(p.align_input), a.input, "input"},
                   {size_t(p.align_weight), a.weight, "weight"},
                   {size_t(p.align_output), a.output, "output"}});
}

// Launches kernel `f` of `owner`'s module: a programmatic dependent launch where the module
// was compiled for sm_90 or later (its kernels begin with deft_grid_begin's wait) unless the
// caller asks for a plain one.
CUresult try_launch(const KernelImpl& owner, CUkernel f, std::array<unsigned, 3> grid,
                    unsigned block, unsigned smem, CUstream stream, void** params,
                    bool programmatic = true) {
  const unsigned g[3] = {grid[0], grid[1], grid[2]};
  return driver::launch_kernel(reinterpret_cast<CUfunction>(f), g, block, smem, stream, params,
                               programmatic && owner.info.arch >= 90);
}
// DEFT_PDL_EXCLUDE (a diagnostic: kernel names separated by commas, read once): these kernels
// are launched plainly, the others as try_launch decides (no names: nothing to compare). `what` names the kernel as
// "cuLaunchKernel(<name>)".
bool pdl_excluded(const char* what) {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    const char* e = std::getenv("DEFT_PDL_EXCLUDE");
    std::string s = e ? e : "";
    for (size_t b = 0; b < s.size();) {
      size_t c = s.find(',', b);
      if (c == std::string::npos) c = s.size();
      if (c > b) v.push_back("(" + s.substr(b, c - b) + ")");
      b = c + 1;
    }
    return v;
  }();
  for (const auto& n : names)
    if (std::string_view(what).find(n) != std::string_view::npos) return true;
  return false;
}
void launch(const KernelImpl& owner, CUkernel f, std::array<unsigned, 3> grid, unsigned block,
            unsigned smem, CUstream stream, void** params, const char* what,
            bool programmatic = true) {
  driver::check(try_launch(owner, f, grid, block, smem, stream, params,
                           programmatic && !pdl_excluded(what)),
                what);
}

// deft_transpose of `k`'s module: [batch][rows][cols] at src -> [batch][cols][rows] at dst.
void launch_transpose(const KernelImpl& k, const void* src, CUdeviceptr dst, long long batch,
                      long long rows, long long cols, CUstream stream) {
  void* args[] = {&src, &dst, &rows, &cols};
  launch(k, k.transpose,
         {unsigned((cols + 63) / 64), unsigned((rows + 63) / 64), unsigned(batch)}, 256, 0,
         stream, args, "cuLaunchKernel(deft_transpose)");
}

}  // namespace

void Kernel::forward(const ForwardArgs& a, CUstream stream) const {
  if (!impl_) throw Error("Kernel::forward on an empty kernel (use deft::compile)");
  const LayerDesc& d = impl_->desc;
  check_layer_inputs(d, "forward", a.input, a.offset, a.mask, a.weight);
  require_ptr(a.output, "forward", "output");
  if (d.bias) require_ptr(a.bias, "forward", "bias (the description has bias=1)");
  if (!d.bias && a.bias) throw Error("forward: a bias was given but the description has bias=0");

  check_device_arch(*impl_, "forward");
  check_forward_alignment(*impl_, a);
  const void* input = a.input;
  const void* offset = a.offset;
  const void* mask = a.mask;
  const void* weight = a.weight;
  const void* bias = a.bias;
  void* output = a.output;
  const KernelPlan& p = impl_->plan;
  CUdeviceptr workspace = 0;
  if (p.forward_workspace() > 0) {
    // Stream-ordered workspace: nhwc input, then the krsc or packed weight (256-byte aligned).
    workspace = driver::workspace_alloc(size_t(p.forward_workspace()), stream,
                                        "cuMemAllocFromPoolAsync (forward workspace)");
    CUdeviceptr w_out = workspace + CUdeviceptr(p.forward_input_workspace());
    if (p.transpose_blocks > 0) {  // wgmma, nchw: both pre-passes in one grid
      void* args[] = {&input, &workspace, &weight, &w_out};
      launch(*impl_, impl_->transpose_pack,
             {unsigned(p.transpose_blocks + p.pack_blocks), 1, 1}, 256, 0, stream, args,
             "cuLaunchKernel(deft_transpose_pack)");
      input = reinterpret_cast<const void*>(workspace);
    } else {
      if (p.transpose) {
        launch_transpose(*impl_, input, workspace, d.n, d.c, d.h * d.w, stream);
        input = reinterpret_cast<const void*>(workspace);
      }
      if (p.wgmma) {
        void* args[] = {&weight, &w_out};
        launch(*impl_, impl_->pack, {unsigned(p.pack_blocks), 1, 1}, 256, 0, stream, args,
               "cuLaunchKernel(deft_pack_weight)");
      } else if (p.transpose) {
        launch_transpose(*impl_, weight, w_out, d.k, d.c_per_group(), d.taps(), stream);
      }
    }
    if (p.wgmma || p.transpose) weight = reinterpret_cast<const void*>(w_out);
  }
  void* params[] = {&input, &offset, &mask, &weight, &bias, &output};
  const CUresult r =
      try_launch(*impl_, impl_->kernel, p.grid, p.block, unsigned(p.smem_bytes), stream, params);
  driver::workspace_free(workspace, stream);
  driver::check(r, "cuLaunchKernel");
}

namespace {

// The backward pass kernels (0 data, 1 weight) of a forward kernel that `want` names, compiled
// on first use; two missing ones compile at once, on two threads (deft::compile is thread-safe
// and shares a compile in flight through its memo), which halves a layer's first backward.
std::array<std::shared_ptr<KernelImpl>, 2> backward_kernels(KernelImpl& fwd, bool det,
                                                            std::array<bool, 2> want) {
  std::array<std::shared_ptr<KernelImpl>, 2> out;
  {
    std::lock_guard<std::mutex> lock(fwd.backward_mu);
    for (int which = 0; which < 2; ++which)
      if (want[which]) out[which] = fwd.backward[det ? 1 : 0][which];
  }
  auto build = [&fwd, det](int which) {
    LayerDesc d = fwd.desc;
    d.pass = which == 0 ? Pass::backward_data : Pass::backward_weight;
    CompileOptions o = fwd.options;
    o.deterministic = det;
    o.variant = which == 0 ? fwd.options.backward_data_variant : fwd.options.backward_weight_variant;
    o.backward_data_variant.reset();
    o.backward_weight_variant.reset();
    return compile(d, o).shared_impl();
  };
  const bool both = want[0] && want[1] && !out[0] && !out[1];
  std::future<std::shared_ptr<KernelImpl>> weight;
  if (both) weight = std::async(std::launch::async, build, 1);
  for (int which = 0; which < 2; ++which) {
    if (!want[which] || out[which]) continue;
    out[which] = both && which == 1 ? weight.get() : build(which);
  }
  std::lock_guard<std::mutex> lock(fwd.backward_mu);
  for (int which = 0; which < 2; ++which) {
    auto& slot = fwd.backward[det ? 1 : 0][which];
    if (want[which] && !slot) slot = out[which];
  }
  return out;
}

// Stream-ordered scratch memory, freed (stream-ordered) when it goes out of scope.
class Scratch {
 public:
  Scratch(size_t bytes, CUstream stream, bool zero) : stream_(stream) {
    ptr_ = driver::workspace_alloc(bytes, stream, "cuMemAllocFromPoolAsync (backward workspace)");
    if (zero) driver::check(driver::api().memset_d8_async(ptr_, 0, bytes, stream), "cuMemsetD8Async");
  }
  ~Scratch() {
    if (ptr_) driver::api().cuMemFreeAsync(ptr_, stream_);  // no throw from a destructor
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  CUdeviceptr get() const { return ptr_; }

 private:
  CUdeviceptr ptr_ = 0;
  CUstream stream_;
};

}  // namespace

// The backward passes this call runs (`data`, `weight`; null: not run) against the caller's
// tensors: check_alignment with the larger of the two plans' needs.
static void check_backward_alignment(const LayerDesc& d, const KernelImpl* data,
                                     const KernelImpl* weight, const BackwardArgs& a) {
  auto need = [&](int KernelPlan::*f) {
    return size_t(std::max(data ? data->plan.*f : 1, weight ? weight->plan.*f : 1));
  };
  check_alignment("backward", "the backward kernels", size_t(dtype_size(d.dtype)),
                  {{a.input, "input"}, {a.offset, "offset"}, {a.mask, "mask"},
                   {a.weight, "weight"}, {a.grad_output, "grad_output"},
                   {a.grad_input, "grad_input"}, {a.grad_offset, "grad_offset"},
                   {a.grad_mask, "grad_mask"}, {a.grad_weight, "grad_weight"},
                   {a.grad_bias, "grad_bias"}},
                  {{need(&KernelPlan::align_input), a.input, "input"},
                   {need(&KernelPlan::align_weight), a.weight, "weight"},
                   {need(&KernelPlan::align_gout), a.grad_output, "grad_output"}});
}

void Kernel::prepare_backward(int deterministic) const {
  if (!impl_) throw Error("Kernel::prepare_backward on an empty kernel (use deft::compile)");
  if (impl_->desc.pass != Pass::forward)
    throw Error("prepare_backward: call it on the forward kernel of the layer");
  const bool det = deterministic < 0 ? impl_->options.deterministic : deterministic != 0;
  backward_kernels(const_cast<KernelImpl&>(*impl_), det, {true, true});
}

void Kernel::backward(const BackwardArgs& a, CUstream stream, int deterministic) const {
  if (!impl_) throw Error("Kernel::backward on an empty kernel (use deft::compile)");
  const LayerDesc& d = impl_->desc;
  if (d.pass != Pass::forward)
    throw Error("backward: call it on the forward kernel of the layer");
  if (d.act != Activation::none)
    throw NotImplemented(fmt::format("backward: the layer fuses act={}; its backward is not "
                                     "implemented (apply the activation outside deft)",
                                     to_string(d.act)));
  check_layer_inputs(d, "backward", a.input, a.offset, a.mask, a.weight);
  require_ptr(a.grad_output, "backward", "grad_output");
  if (!d.mask && a.grad_mask)
    throw Error("backward: grad_mask was requested but the description has mask=0");
  if (!d.bias && a.grad_bias)
    throw Error("backward: grad_bias was requested but the description has bias=0");
  const bool det = deterministic < 0 ? impl_->options.deterministic : deterministic != 0;
  auto& self = const_cast<KernelImpl&>(*impl_);
  check_device_arch(*impl_, "backward");
  // the passes this call runs (grad bias alone runs the weight pass's bias kernel only)
  const auto [kdata, kweight] = backward_kernels(
      self, det, {a.grad_input || a.grad_offset || a.grad_mask, a.grad_weight || a.grad_bias});
  check_backward_alignment(d, kdata.get(), a.grad_weight ? kweight.get() : nullptr, a);
  const void* offset = a.offset;
  const void* mask = a.mask;
  const void* gout = a.grad_output;

  // Channels-last copies of the input (and weight) for passes planned with transpose=1, made
  // once per call and shared by both passes. Only a data pass may read a krsc weight: the
  // scratch holds one only when its plan does.
  std::unique_ptr<Scratch> tws;
  const void* x_t = nullptr;
  const void* w_t = nullptr;
  const size_t x_bytes = size_t(d.n * d.c * d.h * d.w) * dtype_size(d.dtype);
  const size_t x_round = (x_bytes + 255) / 256 * 256;
  auto transposed = [&](const KernelImpl& k) {
    if (!tws) {
      const size_t w_bytes = kdata && kdata->plan.w_krsc
                                 ? size_t(d.k * d.c_per_group() * d.taps()) * dtype_size(d.dtype)
                                 : 0;
      tws = std::make_unique<Scratch>(x_round + w_bytes, stream, false);
      launch_transpose(k, a.input, tws->get(), d.n, d.c, d.h * d.w, stream);
      x_t = reinterpret_cast<const void*>(tws->get());
    }
    if (k.plan.w_krsc && !w_t) {
      launch_transpose(k, a.weight, tws->get() + x_round, d.k, d.c_per_group(), d.taps(), stream);
      w_t = reinterpret_cast<const void*>(tws->get() + x_round);
    }
  };

  // grad_out as a pass reads it: a channels-last copy for plan.gout_t (nchw layers whose lanes
  // run along the channels), made once per call and shared by both passes
  std::unique_ptr<Scratch> gts;
  const void* gout_t = nullptr;
  auto gout_for = [&](const KernelImpl& k) {
    if (!k.plan.gout_t) return gout;
    if (!gts) {
      gts = std::make_unique<Scratch>(size_t(k.plan.workspace_gout_bytes), stream, false);
      launch_transpose(k, gout, gts->get(), d.n, d.k, d.out_h() * d.out_w(), stream);
      gout_t = reinterpret_cast<const void*>(gts->get());
    }
    return gout_t;
  };

  bool gw_fused = false;  // the data kernel has made grad weight (gw=fused)
  if (kdata) {
    const auto& k = kdata;
    const KernelPlan& p = k->plan;
    const void* input = a.input;
    const void* weight = a.weight;
    if (p.transpose) {
      transposed(*k);
      input = x_t;
      if (p.w_krsc) weight = w_t;
    }
    // zeroed: the header and the accumulators the kernel scatters into; the gather forms
    // (gin_mode 3, 4) write every accumulator, so only their header
    Scratch ws(size_t(p.workspace_bytes), stream, p.gin_mode < 3);
    CUdeviceptr header = ws.get();
    // the fixed-point forms that do not zero the whole workspace read its header (the bound's
    // scale and the non-finite flag); the f32 ones (4, 5) never touch it
    if (p.gin_mode >= 3 && p.gin_fixed_point())
      driver::check(driver::api().memset_d8_async(header, 0, 32, stream),
                    "cuMemsetD8Async (workspace header)");
    void* gin = nullptr;
    const int64_t in_elems = d.n * d.c * d.h * d.w;
    if (a.grad_input) {
      if (p.gin_mode == 0) {
        driver::check(driver::api().memset_d8_async(reinterpret_cast<CUdeviceptr>(a.grad_input),
                                                    0, size_t(in_elems) * dtype_size(d.dtype),
                                                    stream),
                      "cuMemsetD8Async (grad_input)");
        gin = a.grad_input;
      } else {
        // the workspace (plan.gather_out: the gather writes grad input itself)
        gin = p.gather_out ? a.grad_input : reinterpret_cast<void*>(ws.get() + 32);
      }
    } else if (p.gin_always) {
      // scattered into and never read (deterministic mode: unscaled, the bound not computed)
      gin = reinterpret_cast<void*>(ws.get() + 32);
    }
    if (a.grad_input && p.gin_fixed_point()) {  // the fixed-point scale
      void* params[] = {&mask, &weight, &gout, &header};
      // enough blocks to stream grad_out at full bandwidth (at least 4 elements a thread, up
      // to 1024 blocks: a small layer's few loads a thread in flight at once), one atomic per
      // block
      const int64_t gout_elems = d.n * d.k * d.out_h() * d.out_w();
      const unsigned blocks = unsigned(std::clamp<int64_t>((gout_elems + 1023) / 1024, 1, 1024));
      launch(*k, k->aux[0], {blocks, 1, 1}, 256, 0, stream, params, "cuLaunchKernel(deft_bwd_bound)");
    }
    void* goffset = a.grad_offset;
    void* gmask = a.grad_mask;
    // the wgmma kernel reads the weight as its own pre-pass packs it (after the bound above,
    // which reads the weight in its layout)
    std::unique_ptr<Scratch> packed;
    if (p.workspace_packed_bytes > 0) {
      packed = std::make_unique<Scratch>(size_t(p.workspace_packed_bytes), stream, false);
      CUdeviceptr dst = packed->get();
      void* pparams[] = {&weight, &dst};
      const int64_t elems = p.workspace_packed_bytes / dtype_size(d.dtype);
      launch(*k, k->pack, {unsigned((elems + 255) / 256), 1, 1}, 256, 0, stream, pparams,
             "cuLaunchKernel(deft_pack_weight)");
      weight = reinterpret_cast<const void*>(dst);
    }
    // Gather form (gin_mode 3, 4): the sampling points sorted by cell, then the data kernel
    // stores the points' values instead of scattering them, and deft_bwd_gather sums them
    // into the workspace (fixed point; gin_mode 4: f32), every element. Without grad input, a kernel that always
    // writes (plan.gin_always) still gets the values' buffer, and nothing sorts or gathers.
    // The depthwise kernel's direct gather (plan.gather_direct) stores no values: its gather
    // reads grad_out (as the kernel does), the weight and the mask.
    std::unique_ptr<Scratch> gs;
    void* gws = gin;  // where the gather sums
    void *values = nullptr, *frac = nullptr, *counts = nullptr, *list = nullptr;
    const void* gout_k = gout_for(*k);
    if (p.gin_local_gather() && a.grad_input) {
      // the local gather stores the near points' sums (every element); the data kernel then
      // reduces the far points' onto them
      // Launched plainly, not as a programmatic dependent launch: behind the nchw transposes
      // the early launch cost ~80 us a call (dw1024_16 nchw fp16, sigma 0.5: 283 against
      // 204 us), and launching the chain's other kernels plainly instead did not help (perf
      // notes session 21).
      void* lparams[] = {&offset, &mask, &gout_k, &weight, &gin, &header};
      launch(*k, k->lgather,
             {unsigned(p.lg.tiles_y * p.lg.tiles_x),
              unsigned(d.offset_groups * ((p.lg.slices + p.lg.per_block - 1) / p.lg.per_block)),
              unsigned(d.n)},
             unsigned(p.lg.threads), unsigned(p.lg.smem_bytes), stream, lparams, "cuLaunchKernel(deft_bwd_lgather)",
             /*programmatic=*/false);
    }
    // The direct gather's chain (cells, scan, fill, sort, gather) reads only the layer's
    // inputs and writes only its own scratch and grad input, and the data kernel then writes
    // only grad offset and grad mask: the chain runs on an auxiliary stream alongside the data
    // kernel, joined before the finish (a small layer's kernels each leave most SMs idle: perf
    // notes round B34). Declared after gs, so that gs is freed after the join.
    std::optional<driver::Fork> fork;
    CUstream cs = stream;  // the chain's stream
    if ((p.gin_mode == 3 || p.gin_mode == 4) && gin) {
      const GatherLayout g = gather_layout(d, p);
      gs = std::make_unique<Scratch>(size_t(g.bytes), stream, false);
      if (p.gather_direct && a.grad_input) cs = fork.emplace(stream).stream();
      const CUdeviceptr base = gs->get();
      values = reinterpret_cast<void*>(base + g.values);
      frac = reinterpret_cast<void*>(base + g.frac);
      counts = reinterpret_cast<void*>(base + g.counts);  // then each cell's list start
      list = reinterpret_cast<void*>(base + g.list);
      if (a.grad_input) {
        driver::check(driver::api().memset_d8_async(base, 0, size_t(g.zero_bytes), cs),
                      "cuMemsetD8Async (gather counts)");
        void* cell_of = reinterpret_cast<void*>(base + g.cell_of);
        void* rank = reinterpret_cast<void*>(base + g.rank);
        const unsigned pblocks = unsigned((g.points + 255) / 256);
        void* cparams[] = {&offset, &mask, &counts, &cell_of, &rank, &frac};
        launch(*k, k->gather[0], {pblocks, 1, 1}, 256, 0, cs, cparams,
               "cuLaunchKernel(deft_bwd_cells)");
        void* sparams[] = {&counts};
        launch(*k, k->gather[1], {1, 1, 1}, 1024, 0, cs, sparams, "cuLaunchKernel(deft_bwd_scan)");
        void* fparams[] = {&cell_of, &rank, &counts, &list};
        launch(*k, k->gather[2], {pblocks, 1, 1}, 256, 0, cs, fparams,
               "cuLaunchKernel(deft_bwd_fill)");
        if (p.gather_sorted) {
          // each cell's list ordered by point index, into the rank buffer (the fill has read
          // it): a warp per cell, at most 4096 blocks striding over the cells
          void* oparams[] = {&counts, &list, &rank};
          const unsigned oblocks = unsigned(std::clamp<int64_t>((g.cells + 7) / 8, 1, 4096));
          launch(*k, k->sort, {oblocks, 1, 1}, 256, 0, cs, oparams,
                 "cuLaunchKernel(deft_bwd_sort)");
          list = rank;
        }
      }
      gin = values;  // the data kernel stores the values here (direct: none, it scatters nothing)
    }
    // gw=fused: the kernel's split partials of grad weight (null: not requested) and, where
    // several blocks share an offset group's channels, their parts of the point grads
    std::unique_ptr<Scratch> fws;
    void *gw_part = nullptr, *pg_part = nullptr;
    if (p.fused_gw) {
      const bool want_pg = p.fw.cbpog > 1 && (goffset || gmask);
      const int64_t bytes = (a.grad_weight ? p.fw.gw_bytes : 0) + (want_pg ? p.fw.pg_bytes : 0);
      if (bytes > 0) {
        fws = std::make_unique<Scratch>(size_t(bytes), stream, false);  // every sum is written
        if (a.grad_weight) gw_part = reinterpret_cast<void*>(fws->get());
        if (want_pg)
          pg_part = reinterpret_cast<void*>(fws->get() + (a.grad_weight ? p.fw.gw_bytes : 0));
      }
    }
    void* params[] = {&input, &offset, &mask, &weight, &gout_k, &gin, &goffset, &gmask, &header,
                      &gw_part, &pg_part};
    launch(*k, k->kernel, p.grid, p.block, unsigned(p.smem_bytes), stream, params,
           "cuLaunchKernel(backward_data)");
    if (pg_part) {
      const int64_t pts = d.n * d.out_h() * d.out_w() * d.offset_groups * d.taps();
      void* rparams[] = {&pg_part, &goffset, &gmask};
      launch(*k, k->fused[1], {unsigned((pts + 255) / 256), 1, 1}, 256, 0, stream, rparams,
             "cuLaunchKernel(deft_bwd_fused_pg)");
    }
    if (gw_part) {
      void* gw = a.grad_weight;
      void* rparams[] = {&gw_part, &gw};
      launch(*k, k->fused[0], {unsigned((d.c * d.taps() + 31) / 32), 1, 1}, 256, 0, stream,
             rparams, "cuLaunchKernel(deft_bwd_fused_gw)");
      gw_fused = true;
    }
    if (gs && a.grad_input) {
      const int64_t warps = d.n * d.offset_groups * d.h * d.w * p.gather_slices;
      void* gparams[] = {&values, &frac, &counts, &list, &header, &gws};
      void* dparams[] = {&gout_k, &weight, &mask, &frac, &counts, &list, &header, &gws};
      // the direct gather: at most 1024 blocks (each copies the weight), a contiguous run of
      // items a block
      const int64_t blocks = p.gather_direct ? std::min((warps + 7) / 8, kDirectGatherMaxBlocks)
                                             : (warps + 7) / 8;
      launch(*k, k->gather[3], {unsigned(blocks), 1, 1}, 256, 0, cs,
             p.gather_direct ? dparams : gparams, "cuLaunchKernel(deft_bwd_gather)");
      if (fork) fork->join();
      gin = gws;  // the finish kernel reads the workspace
    }
    if (a.grad_input && p.gin_mode != 0 && !p.gather_out) {
      void* out = a.grad_input;
      void* fparams[] = {&gin, &header, &out};
      // deft_bwd_finish: 64 x 64 tiles where it transposes back to nchw, else four elements a
      // thread
      const bool back = p.ws_nhwc && d.layout == Layout::nchw;
      const std::array<unsigned, 3> fgrid =
          back ? std::array<unsigned, 3>{unsigned((d.h * d.w + 63) / 64), unsigned((d.c + 63) / 64),
                                         unsigned(d.n)}
               : std::array<unsigned, 3>{unsigned((in_elems + 1023) / 1024), 1, 1};
      launch(*k, k->aux[1], fgrid, 256, 0, stream, fparams,
             "cuLaunchKernel(deft_bwd_finish)");
    }
  }
  if (kweight) {
    const auto& k = kweight;
    const KernelPlan& p = k->plan;
    const void* input = a.input;
    if (p.transpose && a.grad_weight && !gw_fused) {
      transposed(*k);
      input = x_t;
    }
    if (a.grad_weight && !gw_fused) {
      Scratch ws(size_t(p.workspace_bytes), stream, false);  // every partial is written
      CUdeviceptr partial = ws.get();
      const void* gout_k = gout_for(*k);
      void* params[] = {&input, &offset, &mask, &gout_k, &partial};
      launch(*k, k->kernel, p.grid, p.block, unsigned(p.smem_bytes), stream, params,
             "cuLaunchKernel(backward_weight)");
      void* gw = a.grad_weight;
      void* rparams[] = {&partial, &gw};
      const int64_t w_elems = d.k * d.c_per_group() * d.taps();
      launch(*k, k->aux[0], {unsigned((w_elems + 255) / 256), 1, 1}, 256, 0, stream, rparams,
             "cuLaunchKernel(deft_bwd_weight_reduce)");
    }
    if (a.grad_bias) {
      void* gb = a.grad_bias;
      const void* gout_k = gout_for(*k);  // (the module's grad_out index follows its plan)
      void* bparams[] = {&gout_k, &gb};
      launch(*k, k->aux[1], {unsigned(d.k), 1, 1}, 256, 0, stream, bparams,
             "cuLaunchKernel(deft_bwd_bias)");
    }
  }
}

TensorShapes tensor_shapes(const LayerDesc& d) {
  validate(d);
  TensorShapes s;
  const int64_t ho = d.out_h(), wo = d.out_w(), rs = d.taps();
  const bool nhwc = d.layout == Layout::nhwc;
  auto nchw = [&](int64_t n, int64_t c, int64_t h, int64_t w) {
    return nhwc ? std::vector<int64_t>{n, h, w, c} : std::vector<int64_t>{n, c, h, w};
  };
  s.input = nchw(d.n, d.c, d.h, d.w);
  s.offset = nchw(d.n, 2 * d.offset_groups * rs, ho, wo);
  if (d.mask) s.mask = nchw(d.n, d.offset_groups * rs, ho, wo);
  s.weight = nhwc ? std::vector<int64_t>{d.k, d.r, d.s, d.c_per_group()}
                  : std::vector<int64_t>{d.k, d.c_per_group(), d.r, d.s};
  if (d.bias) s.bias = {d.k};
  s.output = nchw(d.n, d.k, ho, wo);
  return s;
}

Stats stats() {
  Stats s;
  s.nvrtc_compiles = nvrtc::compile_count();
  s.cache_hits = g_cache_hits.load();
  s.kernels_loaded = g_loaded.load();
  return s;
}

const char* version() { return DEFT_VERSION; }

bool gpu_available() { return driver::available(); }

WorkspaceStats workspace_stats() {
  WorkspaceStats s;
  driver::workspace_pool_bytes(s.reserved_bytes, s.used_bytes);
  return s;
}

void release_workspace() { driver::workspace_release(); }

}  // namespace deft
