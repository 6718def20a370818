// The CUDA driver API, loaded lazily with dlopen("libcuda.so.1"), so that libdeft, the CLI and
// the CPU tests run on machines without a GPU driver. Any call without a driver throws a clear
// deft::Error. Internal to libdeft.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

namespace deft::driver {

struct Api {
  CUresult (*cuInit)(unsigned);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetAttribute)(int*, CUdevice_attribute, CUdevice);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuCtxGetDevice)(CUdevice*);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuLibraryLoadData)(CUlibrary*, const void*, CUjit_option*, void**, unsigned,
                                CUlibraryOption*, void**, unsigned);
  CUresult (*cuLibraryUnload)(CUlibrary);
  CUresult (*cuLibraryGetKernel)(CUkernel*, CUlibrary, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  CUresult (*cuKernelSetAttribute)(CUfunction_attribute, int, CUkernel, CUdevice);
  // optional (null where the driver lacks it): launches with attributes
  CUresult (*cuLaunchKernelEx)(const CUlaunchConfig*, CUfunction, void**, void**);
  CUresult (*cuMemAllocAsync)(CUdeviceptr*, size_t, CUstream);
  CUresult (*cuMemFreeAsync)(CUdeviceptr, CUstream);
  CUresult (*cuMemPoolCreate)(CUmemoryPool*, const CUmemPoolProps*);
  CUresult (*cuMemPoolSetAttribute)(CUmemoryPool, CUmemPool_attribute, void*);
  CUresult (*cuMemPoolGetAttribute)(CUmemoryPool, CUmemPool_attribute, void*);
  CUresult (*cuMemPoolTrimTo)(CUmemoryPool, size_t);
  CUresult (*cuMemAllocFromPoolAsync)(CUdeviceptr*, size_t, CUmemoryPool, CUstream);
  CUresult (*memset_d8_async)(CUdeviceptr, unsigned char, size_t, CUstream);
  // Synchronous helpers used by the tuner (names differ from cuda.h's versioning macros).
  CUresult (*mem_alloc)(CUdeviceptr*, size_t);
  CUresult (*mem_free)(CUdeviceptr);
  CUresult (*memcpy_htod)(CUdeviceptr, const void*, size_t);
  CUresult (*memcpy_dtoh)(void*, CUdeviceptr, size_t);
  CUresult (*memset_d8)(CUdeviceptr, unsigned char, size_t);
  CUresult (*event_create)(CUevent*, unsigned);
  CUresult (*event_record)(CUevent, CUstream);
  CUresult (*event_sync)(CUevent);
  CUresult (*event_elapsed)(float*, CUevent, CUevent);
  CUresult (*event_destroy)(CUevent);
  CUresult (*ctx_sync)();
  CUresult (*stream_create)(CUstream*, unsigned);
  CUresult (*stream_wait_event)(CUstream, CUevent, unsigned);
  CUresult (*stream_is_capturing)(CUstream, CUstreamCaptureStatus*);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuGetErrorName)(CUresult, const char**);
};

// The loaded and initialised driver; throws deft::Error naming the reason if there is none.
const Api& api();

// True when the driver loads, initialises and reports at least one device. Never throws.
bool available();

// Throws deft::Error "<what>: <CUDA error name>: <description>" unless r == CUDA_SUCCESS.
void check(CUresult r, const char* what);

// Launches f on stream. With `programmatic` (and a driver that has cuLaunchKernelEx) as a
// programmatic dependent launch: f may start before the previous kernel in the stream has
// finished, so f must begin with griddepcontrol.wait (deft's kernels do: deft_grid_begin in
// templates/common.cuh, on sm_90 and later). DEFT_PDL=0 in the environment turns it off.
CUresult launch_kernel(CUfunction f, const unsigned (&grid)[3], unsigned block, unsigned smem,
                       CUstream stream, void** params, bool programmatic);

// Work on an auxiliary stream that runs alongside `origin`: constructed, it orders the
// auxiliary stream after everything enqueued on origin so far (an event); join() orders origin
// after everything enqueued on the auxiliary stream since (the destructor joins if join() was
// not called). One auxiliary stream and event pair per context, created on first use and kept
// for the process; a mutex held from construction to join keeps two threads' forks apart.
// Where origin is capturing a CUDA graph, or DEFT_FORK=0 is set, nothing forks: stream() is
// origin itself. The current context must be origin's.
class Fork {
 public:
  explicit Fork(CUstream origin);
  ~Fork();
  Fork(const Fork&) = delete;
  Fork& operator=(const Fork&) = delete;
  CUstream stream() const { return aux_ ? aux_ : origin_; }
  void join();

 private:
  struct Aux;
  CUstream origin_;
  CUstream aux_ = nullptr;
  Aux* res_ = nullptr;
};

// Makes sure a context is current on this thread (the primary context of device 0 if none
// is) and returns its device.
CUdevice ensure_context();

// Stream-ordered workspace memory from a per-device pool that keeps what is freed (release
// threshold: unlimited) for the next call. The device's default pool returns its unused memory
// to the driver at every synchronisation, so a training loop that synchronises once a step
// (GradScaler does) would have every step's workspaces mapped anew. Falls back to the default
// pool where a pool cannot be created. The device is the current context's.
CUdeviceptr workspace_alloc(size_t bytes, CUstream stream, const char* what);
void workspace_free(CUdeviceptr ptr, CUstream stream);
// Bytes the pools hold from the driver, and of those in use (summed over devices).
void workspace_pool_bytes(uint64_t& reserved, uint64_t& used);
// Returns the pools' unused memory to the driver (cuMemPoolTrimTo 0); memory in use stays.
void workspace_release();

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0, sm_count = 0;
  int driver_version = 0;
  int arch() const { return cc_major * 10 + cc_minor; }
  std::string fingerprint() const;  // "NVIDIA H100 80GB HBM3|cc9.0|sm132"
};
DeviceInfo device_info(CUdevice dev);

}  // namespace deft::driver
