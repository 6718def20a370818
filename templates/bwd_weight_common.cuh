// Shared by the backward_weight kernels (deform_conv_bwd_weight*.cuh): geometry, the
// grad_out index, the fixed-order reduction of the split partials and grad bias.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TAPS = R * S;
constexpr long long W_ELEMS = (long long)K * CG * TAPS;

// A backward_weight block's share: output channels o0 .. o0 + BO_ - 1 (grid x: tile of BO_,
// then of BC_ input channels), input channels cl0 .. of group g (c0 = g CG + cl0 in the input),
// tap t and offset group og (grid y), pixels [p_begin, p_end) (grid z: split SPLIT_PIX).
struct WeightTile {
  int o0, cl0, t, g, og;
  long long c0, p_begin, p_end;
};
template <int BO_, int BC_>
__device__ __forceinline__ WeightTile deft_weight_tile() {
  constexpr int OT_ = (KG + BO_ - 1) / BO_;
  WeightTile w;
  w.o0 = int(blockIdx.x % OT_) * BO_;
  w.cl0 = int(blockIdx.x / OT_) * BC_;
  w.t = blockIdx.y % TAPS;
  w.g = blockIdx.y / TAPS;
  w.c0 = (long long)w.g * CG + w.cl0;
  w.og = int(w.c0 / CPOG);
  w.p_begin = (long long)blockIdx.z * SPLIT_PIX;
  w.p_end = w.p_begin + SPLIT_PIX < M_TOTAL ? w.p_begin + SPLIT_PIX : M_TOTAL;
  return w;
}

// Element index of grad_output (n, k, pixel-in-image q) in the output layout (GOUT_T: in the
// channels-last copy the runtime made of an nchw grad_out).
__device__ __forceinline__ long long deft_gout_index(long long n, long long k, long long q) {
  return NHWC || GOUT_T ? (n * (HO * WO) + q) * K + k : (n * K + k) * (HO * WO) + q;
}

// The partials' layout: [split][k][cl][t] (the weight's nchw order), or with
// PARTIAL_TAP_MAJOR [split][t][k][cl], where a block of one tap writes whole rows of channels
// (the wgmma kernels).
#ifndef PARTIAL_TAP_MAJOR
#define PARTIAL_TAP_MAJOR 0
#endif

// grad_weight = the SPLITS partials summed in order, in the weight's layout and dtype.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_weight_reduce(const Acc* __restrict__ partial, T* __restrict__ gweight) {
  deft_grid_begin();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // the partials' order
  if (i >= W_ELEMS) return;
  Acc s = Acc(0);
  for (int z = 0; z < SPLITS; ++z) s += partial[(long long)z * W_ELEMS + i];
  long long t, cl, k;
  if (PARTIAL_TAP_MAJOR) {
    t = i / ((long long)K * CG);
    const long long kc = i - t * ((long long)K * CG);
    cl = kc % CG, k = kc / CG;
  } else {
    t = i % TAPS;
    const long long kc = i / TAPS;
    cl = kc % CG, k = kc / CG;
  }
  gweight[W_KRSC ? (k * TAPS + t) * CG + cl : (k * CG + cl) * TAPS + t] = deft_cast<T>(s);
}

// grad_bias[k] = sum over (n, pixel) of grad_out: one block per k, a fixed-order tree.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_bias(const T* __restrict__ gout, T* __restrict__ gbias) {
  deft_grid_begin();
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
