// Exploration micro-benchmark (perf notes, session 21): the nchw -> nhwc input transpose's
// bandwidth against a plain copy, for tile shapes other than deft_transpose_tile16's 64 x 64.
// [batch][rows][cols] -> [batch][cols][rows] (rows = C, cols = H W), 16-byte vectors on both
// sides. A block of 256 threads moves NT sub-tiles of TR x 64 elements that lie side by side
// along the columns: every thread's loads are issued before its shared-memory stores, so a
// thread has TR * NT * 64 / (V * 256) loads in flight; sub-tiles start one word apart in
// shared memory so that a warp's stores of one row hit 32 banks.
// Build and run (on the device): nvcc -O3 -arch=sm_90 scripts/transpose_bench.cu -o /tmp/tb && /tmp/tb
#include <cuda_fp16.h>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <type_traits>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); std::exit(1); } } while (0)

template <typename E, int TR, int NT>
__global__ void __launch_bounds__(256) transpose_k(const E* __restrict__ src, E* __restrict__ dst,
                                                   long long rows, long long cols) {
  constexpr int V = 16 / int(sizeof(E));
  constexpr int VPR = 64 / V;                 // vectors per sub-tile row
  constexpr int LDW = 64 * int(sizeof(E)) / 4 + 1;
  constexpr int LDE = LDW * 4 / int(sizeof(E));
  constexpr int SUB = TR * LDW + 1;           // words per sub-tile
  constexpr int LOADS = TR * VPR * NT / 256;  // per thread
  static_assert(LOADS >= 1 && TR * VPR * NT % 256 == 0, "tile");
  __shared__ unsigned tile[NT * SUB];
  const long long b = blockIdx.z;
  const E* s = src + b * rows * cols;
  E* d = dst + b * rows * cols;
  const long long r0 = (long long)blockIdx.y * TR, c0 = (long long)blockIdx.x * 64 * NT;
  uint4 x[LOADS];
#pragma unroll
  for (int l = 0; l < LOADS; ++l) {  // warp: one row, NT * 64 consecutive columns
    const int i = threadIdx.x + l * 256;
    const int r = i / (VPR * NT), sv = i % (VPR * NT);
    const long long gr = r0 + r, gc = c0 + sv * V;
    if (gr < rows && gc < cols) x[l] = *reinterpret_cast<const uint4*>(s + gr * cols + gc);
  }
#pragma unroll
  for (int l = 0; l < LOADS; ++l) {
    const int i = threadIdx.x + l * 256;
    const int r = i / (VPR * NT), sv = i % (VPR * NT);
    unsigned* t = tile + (sv / VPR) * SUB + r * LDW + (sv % VPR) * 4;
    t[0] = x[l].x, t[1] = x[l].y, t[2] = x[l].z, t[3] = x[l].w;
  }
  __syncthreads();
  constexpr int VPC = TR / V;  // vectors per output row
  constexpr int STORES = 64 * NT * VPC / 256;
#pragma unroll
  for (int l = 0; l < STORES; ++l) {
    const int i = threadIdx.x + l * 256;
    const int c = i / VPC, v = i % VPC;
    const long long gc = c0 + c, gr = r0 + v * V;
    if (gc < cols && gr < rows) {
      const E* te = reinterpret_cast<const E*>(tile + (c / 64) * SUB);
      uint4 o;
      E* oe = reinterpret_cast<E*>(&o);
#pragma unroll
      for (int e = 0; e < V; ++e) oe[e] = te[(v * V + e) * LDE + c % 64];
      *reinterpret_cast<uint4*>(d + gc * rows + gr) = o;
    }
  }
}

__global__ void copy_k(const uint4* __restrict__ s, uint4* __restrict__ d, long long n) {
  for (long long i = blockIdx.x * 256LL + threadIdx.x; i < n; i += (long long)gridDim.x * 256) d[i] = s[i];
}

template <typename E>
__global__ void check_k(const E* s, const E* d, long long rows, long long cols, long long total, int* bad) {
  for (long long i = blockIdx.x * 256LL + threadIdx.x; i < total; i += (long long)gridDim.x * 256) {
    const long long b = i / (rows * cols), rc = i % (rows * cols), r = rc / cols, c = rc % cols;
    using B = typename std::conditional<sizeof(E) == 2, unsigned short, unsigned>::type;
    const E a = s[i], z = d[b * rows * cols + c * rows + r];
    if (*reinterpret_cast<const B*>(&a) != *reinterpret_cast<const B*>(&z)) atomicAdd(bad, 1);
  }
}

template <typename F>
float time_ms(F f) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  for (int i = 0; i < 10; ++i) f();
  std::vector<float> t;
  for (int i = 0; i < 50; ++i) {
    CK(cudaEventRecord(a)); f(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
    float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <typename E, int TR, int NT>
void run_one(const char* name, const E* s, E* d, long long batch, long long rows, long long cols, int* bad) {
  if constexpr (TR * NT * 64 * sizeof(E) > 40 * 1024) return;  // static shared memory: 48 KB
  else {
  if (TR > rows) return;
  dim3 grid((cols + 64 * NT - 1) / (64 * NT), (rows + TR - 1) / TR, batch);
  CK(cudaMemset(d, 0xff, batch * rows * cols * sizeof(E)));
  transpose_k<E, TR, NT><<<grid, 256>>>(s, d, rows, cols);
  CK(cudaMemset(bad, 0, 4));
  check_k<E><<<1024, 256>>>(s, d, rows, cols, batch * rows * cols, bad);
  int nbad = 0; CK(cudaMemcpy(&nbad, bad, 4, cudaMemcpyDeviceToHost));
  const float ms = time_ms([&] { transpose_k<E, TR, NT><<<grid, 256>>>(s, d, rows, cols); });
  const double bytes = 2.0 * batch * rows * cols * sizeof(E);
  std::printf("| %s | %d x %d | %.2f | %.0f | %s |\n", name, TR, 64 * NT, ms * 1e3, bytes / ms / 1e6,
              nbad ? "WRONG" : "ok");
  }
}

template <typename E>
void run_case(const char* name, long long batch, long long rows, long long cols) {
  const long long n = batch * rows * cols;
  E *s, *d; int* bad;
  CK(cudaMalloc(&s, n * sizeof(E))); CK(cudaMalloc(&d, n * sizeof(E))); CK(cudaMalloc(&bad, 4));
  std::vector<unsigned short> h(n * sizeof(E) / 2);
  for (size_t i = 0; i < h.size(); ++i) h[i] = (unsigned short)(i * 2654435761u >> 7);
  CK(cudaMemcpy(s, h.data(), n * sizeof(E), cudaMemcpyHostToDevice));
  const long long nv = n * sizeof(E) / 16;
  const float cms = time_ms([&] { copy_k<<<132 * 8, 256>>>((const uint4*)s, (uint4*)d, nv); });
  std::printf("| %s | copy | %.2f | %.0f | |\n", name, cms * 1e3, 2.0 * n * sizeof(E) / cms / 1e6);
  run_one<E, 64, 1>(name, s, d, batch, rows, cols, bad);
  run_one<E, 64, 2>(name, s, d, batch, rows, cols, bad);
  run_one<E, 64, 4>(name, s, d, batch, rows, cols, bad);
  run_one<E, 32, 4>(name, s, d, batch, rows, cols, bad);
  run_one<E, 32, 8>(name, s, d, batch, rows, cols, bad);
  if (rows >= 128) run_one<E, 128, 1>(name, s, d, batch, rows, cols, bad);
  if (rows >= 128) run_one<E, 128, 2>(name, s, d, batch, rows, cols, bad);
  CK(cudaFree(s)); CK(cudaFree(d)); CK(cudaFree(bad));
}

int main() {
  std::printf("| case | tile (rows x cols) | us | GB/s (read + write) | check |\n|---|---|--:|--:|---|\n");
  run_case<__half>("dense512/dw512 fp16 (16 x 512 x 1024)", 16, 512, 1024);
  run_case<float>("dense512 f32 (16 x 512 x 1024)", 16, 512, 1024);
  run_case<float>("resnet_res4 f32 (32 x 256 x 196)", 32, 256, 196);
  run_case<__half>("deft_64 fp16 (8 x 64 x 4096)", 8, 64, 4096);
  run_case<__half>("stride2 fp16 (32 x 128 x 3136)", 32, 128, 3136);
  return 0;
}
