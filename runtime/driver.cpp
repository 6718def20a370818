// Lazy loading of the CUDA driver API (see driver.hpp).
#include "runtime/driver.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "deft/ir.hpp"

namespace deft::driver {

namespace {

struct Loaded {
  Api api{};
  std::string error;  // empty when loaded
};

template <typename F>
bool bind(void* lib, F& fn, const char* name, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn && error.empty()) error = fmt::format("libcuda.so.1 lacks {}", name);
  return fn != nullptr;
}

const Loaded& loaded() {
  static const Loaded l = [] {
    Loaded r;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      r.error = fmt::format("no CUDA driver: cannot load libcuda.so.1 ({})", dlerror());
      return r;
    }
    Api& a = r.api;
    bind(lib, a.cuInit, "cuInit", r.error);
    bind(lib, a.cuDriverGetVersion, "cuDriverGetVersion", r.error);
    bind(lib, a.cuDeviceGetCount, "cuDeviceGetCount", r.error);
    bind(lib, a.cuDeviceGet, "cuDeviceGet", r.error);
    bind(lib, a.cuDeviceGetAttribute, "cuDeviceGetAttribute", r.error);
    bind(lib, a.cuDeviceGetName, "cuDeviceGetName", r.error);
    bind(lib, a.cuCtxGetCurrent, "cuCtxGetCurrent", r.error);
    bind(lib, a.cuCtxSetCurrent, "cuCtxSetCurrent", r.error);
    bind(lib, a.cuCtxGetDevice, "cuCtxGetDevice", r.error);
    bind(lib, a.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", r.error);
    bind(lib, a.cuLibraryLoadData, "cuLibraryLoadData", r.error);
    bind(lib, a.cuLibraryUnload, "cuLibraryUnload", r.error);
    bind(lib, a.cuLibraryGetKernel, "cuLibraryGetKernel", r.error);
    bind(lib, a.cuLaunchKernel, "cuLaunchKernel", r.error);
    bind(lib, a.cuKernelSetAttribute, "cuKernelSetAttribute", r.error);
    a.cuLaunchKernelEx = reinterpret_cast<decltype(a.cuLaunchKernelEx)>(dlsym(lib, "cuLaunchKernelEx"));
    bind(lib, a.cuMemAllocAsync, "cuMemAllocAsync", r.error);
    bind(lib, a.cuMemFreeAsync, "cuMemFreeAsync", r.error);
    bind(lib, a.cuMemPoolCreate, "cuMemPoolCreate", r.error);
    bind(lib, a.cuMemPoolSetAttribute, "cuMemPoolSetAttribute", r.error);
    bind(lib, a.cuMemPoolGetAttribute, "cuMemPoolGetAttribute", r.error);
    bind(lib, a.cuMemPoolTrimTo, "cuMemPoolTrimTo", r.error);
    bind(lib, a.cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", r.error);
    bind(lib, a.memset_d8_async, "cuMemsetD8Async", r.error);
    bind(lib, a.mem_alloc, "cuMemAlloc_v2", r.error);
    bind(lib, a.mem_free, "cuMemFree_v2", r.error);
    bind(lib, a.memcpy_htod, "cuMemcpyHtoD_v2", r.error);
    bind(lib, a.memcpy_dtoh, "cuMemcpyDtoH_v2", r.error);
    bind(lib, a.memset_d8, "cuMemsetD8_v2", r.error);
    bind(lib, a.event_create, "cuEventCreate", r.error);
    bind(lib, a.event_record, "cuEventRecord", r.error);
    bind(lib, a.event_sync, "cuEventSynchronize", r.error);
    // CUDA 12.8 added cuEventElapsedTime_v2; older drivers have only the first version.
    a.event_elapsed = reinterpret_cast<decltype(a.event_elapsed)>(dlsym(lib, "cuEventElapsedTime_v2"));
    if (!a.event_elapsed) bind(lib, a.event_elapsed, "cuEventElapsedTime", r.error);
    bind(lib, a.event_destroy, "cuEventDestroy_v2", r.error);
    bind(lib, a.ctx_sync, "cuCtxSynchronize", r.error);
    bind(lib, a.stream_create, "cuStreamCreate", r.error);
    bind(lib, a.stream_wait_event, "cuStreamWaitEvent", r.error);
    bind(lib, a.stream_is_capturing, "cuStreamIsCapturing", r.error);
    bind(lib, a.cuGetErrorString, "cuGetErrorString", r.error);
    bind(lib, a.cuGetErrorName, "cuGetErrorName", r.error);
    if (!r.error.empty()) return r;
    CUresult res = a.cuInit(0);
    if (res != CUDA_SUCCESS) {
      const char* name = "?";
      a.cuGetErrorName(res, &name);
      r.error = fmt::format("the CUDA driver failed to initialise: {}", name);
    }
    return r;
  }();
  return l;
}

}  // namespace

const Api& api() {
  const Loaded& l = loaded();
  if (!l.error.empty()) throw Error(l.error);
  return l.api;
}

bool available() {
  const Loaded& l = loaded();
  if (!l.error.empty()) return false;
  int count = 0;
  return l.api.cuDeviceGetCount(&count) == CUDA_SUCCESS && count > 0;
}

void check(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const Api& a = api();
  const char *name = "?", *desc = "?";
  a.cuGetErrorName(r, &name);
  a.cuGetErrorString(r, &desc);
  throw Error(fmt::format("{}: {}: {}", what, name, desc));
}

// Whether DEFT_PDL allows programmatic launches (read once; default on).
static bool programmatic_launch_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DEFT_PDL");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

CUresult launch_kernel(CUfunction f, const unsigned (&grid)[3], unsigned block, unsigned smem,
                       CUstream stream, void** params, bool programmatic) {
  const Api& a = api();
  if (!programmatic || !a.cuLaunchKernelEx || !programmatic_launch_enabled())
    return a.cuLaunchKernel(f, grid[0], grid[1], grid[2], block, 1, 1, smem, stream, params,
                            nullptr);
  CUlaunchAttribute attr{};
  attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attr.value.programmaticStreamSerializationAllowed = 1;
  CUlaunchConfig cfg{};
  cfg.gridDimX = grid[0], cfg.gridDimY = grid[1], cfg.gridDimZ = grid[2];
  cfg.blockDimX = block, cfg.blockDimY = 1, cfg.blockDimZ = 1;
  cfg.sharedMemBytes = smem;
  cfg.hStream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return a.cuLaunchKernelEx(&cfg, f, params, nullptr);
}

struct Fork::Aux {
  std::mutex mu;  // held by a Fork from construction to join
  CUstream stream = nullptr;
  CUevent fork = nullptr, join = nullptr;
};

// Whether DEFT_FORK allows auxiliary streams (read once; default on).
static bool fork_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("DEFT_FORK");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

Fork::Fork(CUstream origin) : origin_(origin) {
  if (!fork_enabled()) return;
  const Api& a = api();
  CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
  check(a.stream_is_capturing(origin, &status), "cuStreamIsCapturing");
  if (status != CU_STREAM_CAPTURE_STATUS_NONE) return;  // a graph: keep its work on origin
  CUcontext ctx = nullptr;
  check(a.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  static std::mutex mu;
  static std::map<CUcontext, std::unique_ptr<Aux>> by_context;  // kept for the process
  {
    std::lock_guard<std::mutex> lock(mu);
    auto& r = by_context[ctx];
    if (!r) {
      auto made = std::make_unique<Aux>();
      check(a.stream_create(&made->stream, CU_STREAM_NON_BLOCKING), "cuStreamCreate (auxiliary)");
      check(a.event_create(&made->fork, CU_EVENT_DISABLE_TIMING), "cuEventCreate (fork)");
      check(a.event_create(&made->join, CU_EVENT_DISABLE_TIMING), "cuEventCreate (join)");
      r = std::move(made);
    }
    res_ = r.get();
  }
  res_->mu.lock();
  const CUresult rec = a.event_record(res_->fork, origin);
  const CUresult wait = rec == CUDA_SUCCESS ? a.stream_wait_event(res_->stream, res_->fork, 0) : rec;
  if (wait != CUDA_SUCCESS) {
    res_->mu.unlock();
    res_ = nullptr;
    check(wait, rec != CUDA_SUCCESS ? "cuEventRecord (fork)" : "cuStreamWaitEvent (fork)");
  }
  aux_ = res_->stream;
}

void Fork::join() {
  if (!aux_) return;
  const Api& a = api();
  const CUresult rec = a.event_record(res_->join, aux_);
  const CUresult wait = rec == CUDA_SUCCESS ? a.stream_wait_event(origin_, res_->join, 0) : rec;
  aux_ = nullptr;
  res_->mu.unlock();
  res_ = nullptr;
  check(wait, rec != CUDA_SUCCESS ? "cuEventRecord (join)" : "cuStreamWaitEvent (join)");
}

Fork::~Fork() {
  if (!aux_) return;
  try {
    join();
  } catch (...) {  // no throw from a destructor: the error surfaces at the caller's next check
  }
}

CUdevice ensure_context() {
  const Api& a = api();
  CUcontext ctx = nullptr;
  check(a.cuCtxGetCurrent(&ctx), "cuCtxGetCurrent");
  if (!ctx) {
    int count = 0;
    check(a.cuDeviceGetCount(&count), "cuDeviceGetCount");
    if (count < 1) throw Error("no CUDA device is present");
    CUdevice dev;
    check(a.cuDeviceGet(&dev, 0), "cuDeviceGet");
    // The primary context is shared with the CUDA runtime (and PyTorch); retained for the
    // process lifetime.
    check(a.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain");
    check(a.cuCtxSetCurrent(ctx), "cuCtxSetCurrent");
  }
  CUdevice dev;
  check(a.cuCtxGetDevice(&dev), "cuCtxGetDevice");
  return dev;
}

namespace {

struct Pools {
  std::mutex mu;
  std::map<CUdevice, CUmemoryPool> by_device;  // nullptr: creation failed, use the default pool
};
Pools& pools() {
  static Pools* p = new Pools;  // never destroyed: pools live as long as the process's contexts
  return *p;
}

CUmemoryPool pool_for(const Api& a, CUdevice dev) {
  Pools& ps = pools();
  std::lock_guard<std::mutex> lock(ps.mu);
  auto it = ps.by_device.find(dev);
  if (it != ps.by_device.end()) return it->second;
  CUmemPoolProps props = {};
  props.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
  props.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  props.location.id = dev;
  CUmemoryPool pool = nullptr;
  if (a.cuMemPoolCreate(&pool, &props) == CUDA_SUCCESS) {
    cuuint64_t keep = ~cuuint64_t{0};
    if (a.cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &keep) != CUDA_SUCCESS)
      spdlog::warn("workspace pool of device {}: the release threshold could not be set; unused "
                   "workspace memory goes back to the driver at each synchronisation", int(dev));
  } else {
    pool = nullptr;
    spdlog::warn("workspace pool of device {}: cuMemPoolCreate failed; using the device's "
                 "default pool", int(dev));
  }
  ps.by_device.emplace(dev, pool);
  return pool;
}

}  // namespace

CUdeviceptr workspace_alloc(size_t bytes, CUstream stream, const char* what) {
  const Api& a = api();
  CUdevice dev;
  check(a.cuCtxGetDevice(&dev), "cuCtxGetDevice");
  CUdeviceptr ptr = 0;
  if (CUmemoryPool pool = pool_for(a, dev))
    check(a.cuMemAllocFromPoolAsync(&ptr, bytes, pool, stream), what);
  else
    check(a.cuMemAllocAsync(&ptr, bytes, stream), what);
  return ptr;
}

void workspace_free(CUdeviceptr ptr, CUstream stream) {
  if (ptr) check(api().cuMemFreeAsync(ptr, stream), "cuMemFreeAsync (workspace)");
}

void workspace_pool_bytes(uint64_t& reserved, uint64_t& used) {
  reserved = used = 0;
  Pools& ps = pools();
  std::lock_guard<std::mutex> lock(ps.mu);
  for (auto& [dev, pool] : ps.by_device) {
    if (!pool) continue;
    cuuint64_t r = 0, u = 0;
    check(api().cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &r),
          "cuMemPoolGetAttribute");
    check(api().cuMemPoolGetAttribute(pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &u),
          "cuMemPoolGetAttribute");
    reserved += r, used += u;
  }
}

void workspace_release() {
  Pools& ps = pools();
  std::lock_guard<std::mutex> lock(ps.mu);
  for (auto& [dev, pool] : ps.by_device)
    if (pool) check(api().cuMemPoolTrimTo(pool, 0), "cuMemPoolTrimTo");
}

DeviceInfo device_info(CUdevice dev) {
  const Api& a = api();
  DeviceInfo info;
  char name[256] = {};
  check(a.cuDeviceGetName(name, sizeof name, dev), "cuDeviceGetName");
  info.name = name;
  check(a.cuDeviceGetAttribute(&info.cc_major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
        "cuDeviceGetAttribute");
  check(a.cuDeviceGetAttribute(&info.cc_minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
        "cuDeviceGetAttribute");
  check(a.cuDeviceGetAttribute(&info.sm_count, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev),
        "cuDeviceGetAttribute");
  check(a.cuDriverGetVersion(&info.driver_version), "cuDriverGetVersion");
  return info;
}

std::string DeviceInfo::fingerprint() const {
  return fmt::format("{}|cc{}.{}|sm{}", name, cc_major, cc_minor, sm_count);
}

}  // namespace deft::driver
