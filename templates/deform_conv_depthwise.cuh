// deform_conv2d forward for depthwise layers (groups == c == k): no GEMM, each output
// (pixel, channel) is a sum over taps of weight * mask * bilinear sample of its own channel.
// A thread owns one output pixel and VEC channels: in nhwc those channels are one 16-byte
// vector per corner; in nchw they are VEC planes, threads running along pixels so that
// offsets, masks and outputs are coalesced. A sampling point is computed once per
// (pixel, tap) and reused for all VEC channels of the thread (one offset group).
//
// The 16-byte vector path (channels-last input, VEC * sizeof(T) a multiple of 16 bytes):
//  - a point's four corners lie at fixed distances from its (y0, x0) corner (0, C, W * C,
//    (W + 1) * C elements): one address a point, then a predicated 16-byte load per corner
//    that lies in the image (the others read nothing and count zero);
//  - W_VEC: the thread's VEC x R * S weights, contiguous in the depthwise weight ([c][1][r][s]),
//    are read up front as 16-byte vectors (the plan asks for a 16-byte aligned weight);
//  - OUT_VEC (nhwc output): the VEC results leave in 16-byte stores (a 16-byte aligned output).
//
// Constants from codegen: THREADS, VEC, CH_PER_BLOCK (channels per block),
// PIX_PER_BLOCK (output pixels per block), W_VEC, OUT_VEC.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TPC = CH_PER_BLOCK / VEC;  // threads per pixel
constexpr bool VEC_PATH = X_NHWC && VEC > 1 && (VEC * sizeof(T)) % 16 == 0;
static_assert(!W_VEC || (VEC_PATH && (VEC * R * S * sizeof(T)) % 16 == 0), "weight vectors");
static_assert(!OUT_VEC || (VEC_PATH && NHWC), "output vectors");

// The vector path's sampling point of (ho, wo), tap t: the four corners' weights (zero for a
// corner outside the image) and values (zero there, unread), VEC channels from base (the
// image plus the thread's first channel).
__device__ __forceinline__ void deft_dw_corners(const T* __restrict__ base, const PointInput& in,
                                                int ho, int wo, int t, Acc (&w)[4],
                                                DeftCornerVec<VEC> (&x)[4]) {
  constexpr int CH = DeftCornerVec<VEC>::CHUNKS;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    w[q] = Acc(0);
#pragma unroll
    for (int u = 0; u < CH; ++u) x[q].u[u] = make_uint4(0u, 0u, 0u, 0u);
  }
  const int i = t / S, j = t % S;
  const Pos y = Pos(ho * SH - PH + i * DH) + in.dy;
  const Pos xx = Pos(wo * SW - PW + j * DW) + in.dx;
  // Written so that NaN positions fail the test: NaN samples read zero.
  if (!(y > Pos(-1) && xx > Pos(-1) && y < Pos(H) && xx < Pos(W))) return;
  const Pos yf = floor(y), xf = floor(xx);
  const int y0 = int(yf), x0 = int(xf);
  const Acc ly = Acc(y - yf), lx = Acc(xx - xf);
  const Acc hy = Acc(1) - ly, hx = Acc(1) - lx;
  const bool top = y0 >= 0, bottom = y0 + 1 <= H - 1;
  const bool left = x0 >= 0, right = x0 + 1 <= W - 1;
  const bool ok[4] = {top && left, top && right, bottom && left, bottom && right};
  const Acc wq[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
  // element distance of each corner from (y0, x0); that corner's offset may be negative (y0
  // or x0 = -1), but only corners inside the image are read
  constexpr long long DQ[4] = {0, C, (long long)W * C, (long long)(W + 1) * C};
  const long long e0 = ((long long)y0 * W + x0) * C;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (ok[q]) {
      w[q] = wq[q] * in.mod;
      const uint4* src = reinterpret_cast<const uint4*>(base + (e0 + DQ[q]));
#pragma unroll
      for (int u = 0; u < CH; ++u) x[q].u[u] = __ldg(src + u);
    }
  }
}

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

  // W_VEC: the thread's weights [VEC][R * S], read once as 16-byte vectors
  constexpr int WV = W_VEC ? VEC * R * S : 1;
  union {
    uint4 u[(WV * sizeof(T) + 15) / 16];
    T t[WV];
  } wv;
  if constexpr (W_VEC) {
    const uint4* wsrc = reinterpret_cast<const uint4*>(weight + (long long)c_base * (R * S));
#pragma unroll
    for (int u = 0; u < (WV * (int)sizeof(T)) / 16; ++u) wv.u[u] = __ldg(wsrc + u);
  }

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
    if constexpr (VEC_PATH) {
      DeftCornerVec<VEC> x[4];
      SamplePoint p;  // (its weights; the corners are read here)
      deft_dw_corners(image + c_base, pin[b], ho, wo, tap, p.w, x);
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
      for (int e = 0; e < VEC; ++e) {
        const T wt = W_VEC ? wv.t[W_VEC ? e * (R * S) + tap : 0]
                           : weight[(long long)(c_base + e) * (R * S) + tap];
        acc[e] += Acc(deft_widen(wt)) * s[e];
      }
    } else {
      SamplePoint p = deft_point_from(pin[b], ho, wo, tap);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (e < nvec)
          acc[e] += Acc(deft_widen(weight[(long long)(c_base + e) * (R * S) + tap])) *
                    deft_sample_channel(offset, mask, image, n, ho, wo, tap, c_base + e, og, p);
      }
    }
  }

  }  // tap batches

  if constexpr (OUT_VEC) {  // nhwc: the VEC channels are contiguous
    DeftCornerVec<VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      Acc v = acc[e];
      if (HAS_BIAS) v += Acc(deft_widen(bias[c_base + e]));
      o.t[e] = deft_cast<T>(deft_activate(v));
    }
    uint4* dst = reinterpret_cast<uint4*>(out + m * C + c_base);
#pragma unroll
    for (int u = 0; u < DeftCornerVec<VEC>::CHUNKS; ++u) dst[u] = o.u[u];
    return;
  }
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
