// deform_conv2d backward_weight for depthwise layers (groups == c == k): no GEMM,
//   grad_weight[c][tap] = sum over (n, pixel) of grad_out[n][c][pixel] * mask * sample(c),
// a reduction over the pixels of each (channel, tap). The thread layout is the depthwise
// forward's (deform_conv_depthwise.cuh): a thread owns VEC channels and walks pixels of the
// block's range (blockIdx.z: one of SPLITS ranges of SPLIT_PIX pixels), TPC threads sharing a
// pixel; in nhwc the VEC channels are one 16-byte vector per corner. An nchw layer reads the
// transposed input, and with TPC > 1 a channels-last copy of grad_out (GOUT_T); with TPC = 1
// (a tuner variant) the lanes run along pixels and read the nchw grad_out coalesced.
// A block takes TB taps (blockIdx.y: tap batch), so a thread keeps TB x VEC sums in
// registers (two blocks per SM), and each sampling point is computed once per (pixel, tap)
// for all VEC channels.
// The threads' sums are reduced in a fixed order (warp shuffles, then shared memory) and
// written as the block's partial; deft_bwd_weight_reduce adds the SPLITS partials in order.
// No atomics: the result is the same every run.
//
// Constants from codegen: THREADS, VEC, CH_PER_BLOCK (channels per block), TB (taps per
// block), SPLITS, SPLIT_PIX.

constexpr int TPC = CH_PER_BLOCK / VEC;            // threads per pixel
constexpr int ROWS = THREADS / TPC;                // pixels the block walks at once
constexpr int SPAN = TPC < 32 ? 32 : TPC;          // threads per reduction row group
constexpr int RGROUPS = THREADS / SPAN;
static_assert(THREADS % 32 == 0 && THREADS % TPC == 0 && (TPC & (TPC - 1)) == 0,
              "threads per pixel: a power of two dividing the block");

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  deft_grid_begin();
  __shared__ Acc Red[RGROUPS * TPC * VEC];
  const int tid = threadIdx.x;
  const int cv = tid % TPC;
  const int c_base = blockIdx.x * CH_PER_BLOCK + cv * VEC;
  const int t0 = blockIdx.y * TB;
  const long long p_begin = (long long)blockIdx.z * SPLIT_PIX;
  const long long p_end = p_begin + SPLIT_PIX < M_TOTAL ? p_begin + SPLIT_PIX : M_TOTAL;
  // channels of this thread that exist (the last block may be partial)
  const int nvec = C - c_base < VEC ? (C - c_base > 0 ? int(C - c_base) : 0) : VEC;
  const int og0 = nvec > 0 ? c_base / CPOG : 0;

  Acc acc[TB][VEC];
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[b][e] = Acc(0);

#pragma unroll 1
  for (long long m = p_begin + tid / TPC; m < p_end && nvec > 0; m += ROWS) {
    const long long n = m / (HO * WO);
    const int rem = int(m - n * (HO * WO));
    const int ho = rem / WO, wo = rem % WO;
    const T* image = input + n * ((long long)C * H * W);
    Acc g[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      g[e] = e < nvec ? Acc(deft_widen(gout[deft_gout_index(n, c_base + e, rem)])) : Acc(0);
    PointInput pin[TB];
#pragma unroll
    for (int b = 0; b < TB; ++b)
      if (t0 + b < TAPS) pin[b] = deft_point_input(offset, mask, n, ho, wo, t0 + b, og0);
#pragma unroll
    for (int b = 0; b < TB; ++b) {
      const int tap = t0 + b;
      if (tap >= TAPS) break;
      SamplePoint p = deft_point_from(pin[b], ho, wo, tap);
      if constexpr (X_NHWC && VEC > 1 && (VEC * sizeof(T)) % 16 == 0) {
        DeftCornerVec<VEC> x[4];
        deft_load_corners(image + c_base, p, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          Acc s = Acc(0);
#pragma unroll
          for (int q = 0; q < 4; ++q) s += p.w[q] * Acc(deft_widen(x[q].t[e]));
          acc[b][e] += g[e] * s;
        }
      } else {
        int og = og0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          if (e < nvec)
            acc[b][e] += g[e] * deft_sample_channel(offset, mask, image, n, ho, wo, tap,
                                                    c_base + e, og, p);
        }
      }
    }
  }

  // Fixed-order reduction of the threads sharing channels: lanes SPAN apart within a warp
  // (butterfly), then the row groups in shared memory, summed in order by one thread per
  // channel.
  const int rg = tid / SPAN;
  const bool holder = tid % SPAN < TPC;
  Acc* dst = partial + (long long)blockIdx.z * W_ELEMS;
#pragma unroll
  for (int b = 0; b < TB; ++b) {
    if (t0 + b >= TAPS) break;  // block-uniform
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      Acc v = acc[b][e];
#pragma unroll
      for (int o = 16; o >= TPC; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (holder) Red[(rg * TPC + cv) * VEC + e] = v;
    }
    __syncthreads();
    for (int j = tid; j < CH_PER_BLOCK; j += THREADS) {
      const int c = blockIdx.x * CH_PER_BLOCK + j;
      if (c >= C) continue;
      const int jv = j / VEC, je = j % VEC;
      Acc s = Acc(0);
      for (int r = 0; r < RGROUPS; ++r) s += Red[(r * TPC + jv) * VEC + je];
      dst[(long long)c * TAPS + t0 + b] = s;
    }
    __syncthreads();
  }
}
