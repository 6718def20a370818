// Shared by the backward_weight kernels (deform_conv_bwd_weight*.cuh): geometry, the
// grad_out index, the fixed-order reduction of the split partials and grad bias.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TAPS = R * S;
constexpr long long W_ELEMS = (long long)K * CG * TAPS;

__device__ __forceinline__ long long deft_gout_index(long long n, long long k, long long q) {
  return NHWC ? (n * (HO * WO) + q) * K + k : (n * K + k) * (HO * WO) + q;
}

// grad_weight = the SPLITS partials summed in order, in the weight's layout and dtype.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_weight_reduce(const Acc* __restrict__ partial, T* __restrict__ gweight) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // [k][cl][t]
  if (i >= W_ELEMS) return;
  Acc s = Acc(0);
  for (int z = 0; z < SPLITS; ++z) s += partial[(long long)z * W_ELEMS + i];
  const long long t = i % TAPS, kc = i / TAPS;
  const long long cl = kc % CG, k = kc / CG;
  gweight[W_KRSC ? (k * TAPS + t) * CG + cl : i] = deft_cast<T>(s);
}

// grad_bias[k] = sum over (n, pixel) of grad_out: one block per k, a fixed-order tree.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_bias(const T* __restrict__ gout, T* __restrict__ gbias) {
  __shared__ Acc part[256];
  const long long k = blockIdx.x;
  Acc s = Acc(0);
  for (long long mm = threadIdx.x; mm < M_TOTAL; mm += 256) {
    const long long n = mm / (HO * WO);
    s += Acc(deft_widen(gout[deft_gout_index(n, k, mm - n * (HO * WO))]));
  }
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if ((int)threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) gbias[k] = deft_cast<T>(part[0]);
}
