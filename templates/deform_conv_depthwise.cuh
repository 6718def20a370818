// deform_conv2d forward for depthwise layers (groups == c == k): no GEMM, each output
// (pixel, channel) is a sum over taps of weight * mask * bilinear sample of its own channel.
// A thread owns one output pixel and VEC channels: in nhwc those channels are one 16-byte
// vector per corner; in nchw they are VEC planes, threads running along pixels so that
// offsets, masks and outputs are coalesced. A sampling point is computed once per
// (pixel, tap) and reused for all VEC channels of the thread (one offset group).
// COOP (channels-last vectors, the TPC threads of a pixel inside one warp): the block's
// weights are staged in shared memory as [tap][channel] (one vector load per tap), and the
// TPC threads of a pixel split its taps' sampling points between them and broadcast them with
// warp shuffles, instead of each computing all of them.
//
// Constants from codegen: THREADS, VEC, CH_PER_BLOCK (channels per block),
// PIX_PER_BLOCK (output pixels per block), COOP.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TPC = CH_PER_BLOCK / VEC;  // threads per pixel

#if COOP
constexpr int TAP_BATCH_C = R * S < 9 ? R * S : 9;
constexpr int PTS_PER_LANE = (TAP_BATCH_C + TPC - 1) / TPC;
constexpr int CHUNKS_C = VEC * sizeof(T) / 16;

__device__ __forceinline__ void deft_depthwise_coop(const T* __restrict__ input,
                                                    const T* __restrict__ offset,
                                                    const T* __restrict__ mask,
                                                    const T* __restrict__ weight,
                                                    const T* __restrict__ bias,
                                                    T* __restrict__ out, int tid, int c_base,
                                                    long long m) {
  // The block's weights as [tap][channel].
  __shared__ __align__(16) T wsm[R * S * CH_PER_BLOCK];
  const int c_block = blockIdx.y * CH_PER_BLOCK;
  for (int i = tid; i < R * S * CH_PER_BLOCK; i += THREADS) {
    const int cl = i / (R * S), tap = i % (R * S);  // coalesced global reads
    wsm[tap * CH_PER_BLOCK + cl] =
        c_block + cl < C ? weight[(long long)(c_block + cl) * (R * S) + tap] : deft_from<T>(0.f);
  }
  __syncthreads();

  const bool active = m < M_TOTAL && c_base < C;
  const long long mc = m < M_TOTAL ? m : M_TOTAL - 1;  // inactive lanes still share points
  const long long n = mc / (HO * WO);
  const int rem = int(mc - n * (HO * WO));
  const int ho = rem / WO, wo = rem % WO;
  const T* image = input + n * ((long long)C * H * W);
  const int lane = tid % 32, j = tid % TPC, group = lane - j;
  const int og = (c_base < C ? c_base : c_block) / CPOG;
  const int c_local = c_base - c_block;

  Acc acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = Acc(0);

#pragma unroll 1
  for (int t0 = 0; t0 < R * S; t0 += TAP_BATCH_C) {
    // This lane's share of the batch's sampling points: taps t0 + j, t0 + j + TPC, ...
    SamplePoint mine[PTS_PER_LANE];
#pragma unroll
    for (int k = 0; k < PTS_PER_LANE; ++k) {
      const int tap = t0 + j + k * TPC;
      if (j + k * TPC < TAP_BATCH_C && tap < R * S)
        mine[k] = deft_sample_point(offset, mask, n, ho, wo, tap, og);
    }
#pragma unroll
    for (int b = 0; b < TAP_BATCH_C; ++b) {
      const int tap = t0 + b;
      if (tap >= R * S) break;
      // Broadcast the point from the lane that computed it.
      const int src = group + b % TPC;
      SamplePoint p;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        p.off[q] = __shfl_sync(0xffffffffu, mine[b / TPC].off[q], src);
        p.w[q] = __shfl_sync(0xffffffffu, mine[b / TPC].w[q], src);
      }
      if (!active) continue;
      union Vec {
        uint4 u[CHUNKS_C];
        T t[VEC];
      };
      Acc sv[VEC];
#if HALF2_COMBINE
      __half2 s2[VEC / 2];
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) s2[e] = __float2half2_rn(0.f);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec x;
        const uint4* src4 = reinterpret_cast<const uint4*>(image + c_base + p.off[q]);
#pragma unroll
        for (int u = 0; u < CHUNKS_C; ++u) x.u[u] = __ldg(src4 + u);
        const __half2 w2 = __float2half2_rn(p.w[q]);
        const __half2* x2 = reinterpret_cast<const __half2*>(x.u);
#pragma unroll
        for (int e = 0; e < VEC / 2; ++e) s2[e] = __hfma2(w2, x2[e], s2[e]);
      }
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) {
        const float2 f = __half22float2(s2[e]);
        sv[2 * e] = f.x;
        sv[2 * e + 1] = f.y;
      }
#else
#pragma unroll
      for (int e = 0; e < VEC; ++e) sv[e] = Acc(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec x;
        const uint4* src4 = reinterpret_cast<const uint4*>(image + c_base + p.off[q]);
#pragma unroll
        for (int u = 0; u < CHUNKS_C; ++u) x.u[u] = __ldg(src4 + u);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sv[e] += p.w[q] * Acc(deft_widen(x.t[e]));
      }
#endif
      Vec wv;
#pragma unroll
      for (int u = 0; u < CHUNKS_C; ++u)
        wv.u[u] = reinterpret_cast<const uint4*>(wsm + tap * CH_PER_BLOCK + c_local)[u];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += Acc(deft_widen(wv.t[e])) * sv[e];
    }
  }
  if (!active) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int c = c_base + e;
    Acc v = acc[e];
    if (HAS_BIAS) v += Acc(deft_widen(bias[c]));
    v = deft_activate(v);
    const long long idx = NHWC ? m * C + c : (n * C + c) * (HO * WO) + rem;
    out[idx] = deft_cast<T>(v);
  }
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ out) {
  const int tid = threadIdx.x;
  const int c_base = blockIdx.y * CH_PER_BLOCK + (tid % TPC) * VEC;
  const long long m = (long long)blockIdx.x * PIX_PER_BLOCK + tid / TPC;
#if COOP
  deft_depthwise_coop(input, offset, mask, weight, bias, out, tid, c_base, m);
  return;
#endif
  if (m >= M_TOTAL || c_base >= C) return;
  const long long n = m / (HO * WO);
  const int rem = int(m - n * (HO * WO));
  const int ho = rem / WO, wo = rem % WO;
  const T* image = input + n * ((long long)C * H * W);
  // channels of this thread that exist (the last block may be partial in nchw)
  const int nvec = C - c_base < VEC ? int(C - c_base) : VEC;

  Acc acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = Acc(0);

  // Taps go in batches: a batch's offsets and masks are read up front (independent loads in
  // flight together), then its corner loads overlap as the batch loop is unrolled.
  constexpr int TAP_BATCH = R * S < 9 ? R * S : 9;
  const int og0 = c_base / CPOG;
#pragma unroll 1
  for (int t0 = 0; t0 < R * S; t0 += TAP_BATCH) {
  PointInput pin[TAP_BATCH];
#pragma unroll
  for (int b = 0; b < TAP_BATCH; ++b)
    if (t0 + b < R * S) pin[b] = deft_point_input(offset, mask, n, ho, wo, t0 + b, og0);

#pragma unroll
  for (int b = 0; b < TAP_BATCH; ++b) {
    const int tap = t0 + b;
    if (tap >= R * S) break;
    int og = og0;
    SamplePoint p = deft_point_from(pin[b], ho, wo, tap);
    if constexpr (X_NHWC && VEC > 1 && (VEC * sizeof(T)) % 16 == 0) {
      constexpr int CHUNKS = VEC * sizeof(T) / 16 > 0 ? VEC * sizeof(T) / 16 : 1;
      union Vec {
        uint4 u[CHUNKS];
        T t[VEC];
      };
      Acc s[VEC];
#if HALF2_COMBINE
      // f16: corners combined in packed half2 arithmetic, taps accumulated in f32.
      __half2 s2[VEC / 2];
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) s2[e] = __float2half2_rn(0.f);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec x;
        const uint4* src = reinterpret_cast<const uint4*>(image + c_base + p.off[q]);
#pragma unroll
        for (int u = 0; u < CHUNKS; ++u) x.u[u] = __ldg(src + u);
        const __half2 w2 = __float2half2_rn(p.w[q]);
        const __half2* x2 = reinterpret_cast<const __half2*>(x.u);
#pragma unroll
        for (int e = 0; e < VEC / 2; ++e) s2[e] = __hfma2(w2, x2[e], s2[e]);
      }
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) {
        const float2 f = __half22float2(s2[e]);
        s[2 * e] = f.x;
        s[2 * e + 1] = f.y;
      }
#else
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[e] = Acc(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec x;
        const uint4* src = reinterpret_cast<const uint4*>(image + c_base + p.off[q]);
#pragma unroll
        for (int u = 0; u < CHUNKS; ++u) x.u[u] = __ldg(src + u);
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[e] += p.w[q] * Acc(deft_widen(x.t[e]));
      }
#endif
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        acc[e] += Acc(deft_widen(weight[(long long)(c_base + e) * (R * S) + tap])) * s[e];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < nvec) {
          const int c = c_base + e;
          if (c / CPOG != og) {  // channels of another offset group: new sampling point
            og = c / CPOG;
            p = deft_sample_point(offset, mask, n, ho, wo, tap, og);
          }
          const T* base = X_NHWC ? image + c : image + c * ((long long)H * W);
          acc[e] += Acc(deft_widen(weight[(long long)c * (R * S) + tap])) * deft_sample(base, p);
        }
      }
    }
  }

  }  // tap batches

#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (e < nvec) {
      const int c = c_base + e;
      Acc v = acc[e];
      if (HAS_BIAS) v += Acc(deft_widen(bias[c]));
      v = deft_activate(v);
      const long long idx = NHWC ? m * C + c : (n * C + c) * (HO * WO) + rem;
      out[idx] = deft_cast<T>(v);
    }
  }
}
