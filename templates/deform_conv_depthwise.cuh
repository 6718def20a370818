// deform_conv2d forward for depthwise layers (groups == c == k): no GEMM, each output
// (pixel, channel) is a sum over taps of weight * mask * bilinear sample of its own channel.
// A thread owns one output pixel and VEC channels: in nhwc those channels are one 16-byte
// vector per corner; in nchw they are VEC planes, threads running along pixels so that
// offsets, masks and outputs are coalesced. A sampling point is computed once per
// (pixel, tap) and reused for all VEC channels of the thread (one offset group).
//
// Constants from codegen: THREADS, VEC, CH_PER_BLOCK (channels per block),
// PIX_PER_BLOCK (output pixels per block).

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TPC = CH_PER_BLOCK / VEC;  // threads per pixel

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ out) {
  const int tid = threadIdx.x;
  const int c_base = blockIdx.y * CH_PER_BLOCK + (tid % TPC) * VEC;
  const long long m = (long long)blockIdx.x * PIX_PER_BLOCK + tid / TPC;
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
      DeftCornerVec<VEC> x[4];
      deft_load_corners(image + c_base, p, x);
      Acc s[VEC];
#if HALF2_COMBINE
      // f16: corners combined in packed half2 arithmetic, taps accumulated in f32.
      __half2 s2[VEC / 2 > 0 ? VEC / 2 : 1];  // (VEC = 1 never reaches this branch, but the array must exist)
#pragma unroll
      for (int e = 0; e < VEC / 2; ++e) s2[e] = __float2half2_rn(0.f);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const __half2 w2 = __float2half2_rn(p.w[q]);
        const __half2* x2 = reinterpret_cast<const __half2*>(x[q].u);
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
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s[e] += p.w[q] * Acc(deft_widen(x[q].t[e]));
#endif
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        acc[e] += Acc(deft_widen(weight[(long long)(c_base + e) * (R * S) + tap])) * s[e];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < nvec)
          acc[e] += Acc(deft_widen(weight[(long long)(c_base + e) * (R * S) + tap])) *
                    deft_sample_channel(offset, mask, image, n, ho, wo, tap, c_base + e, og, p);
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
