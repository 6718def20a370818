// Shared by the backward_data kernels (deform_conv_bwd_data*.cuh): the grad-input
// accumulator type, the fixed-point bound and scale of deterministic mode, the sampling point
// with what its derivatives need, the writes of grad offset / grad mask, and the conversion
// of the grad-input workspace. Constants from codegen: GIN_MODE (see deform_conv_bwd_data.cuh).

// The parameters of every backward_data kernel, in the order the runtime passes them.
#define DEFT_BWD_DATA_PARAMS                                                                  \
  const T *__restrict__ input, const T *__restrict__ offset, const T *__restrict__ mask,      \
      const T *__restrict__ weight, const T *__restrict__ gout, GinT *__restrict__ gin,       \
      T *__restrict__ goffset, T *__restrict__ gmask, unsigned long long *__restrict__ header

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr long long IN_ELEMS = (long long)N * C * H * W;
constexpr int TAPS = R * S;

#if GIN_MODE == 0
typedef T GinT;
#elif GIN_MODE == 1 || GIN_MODE == 4 || GIN_MODE == 5
typedef Acc GinT;  // f32 (f64 for f64 layers) workspace; 4: f32, gathered
#else
typedef unsigned long long GinT;
#endif

// A value as the shared-memory tiles hold it (Stage: Acc for FMA, the tensor-core input's
// storage type with USE_TC).
__device__ __forceinline__ Stage deft_stage(Acc v) { return deft_cast<Stage>(v); }

// Element index of grad_output (n, k, pixel-in-image q) in the output layout (GOUT_T: in the
// channels-last copy the runtime made of an nchw grad_out).
__device__ __forceinline__ long long deft_gout_index(long long n, long long k, long long q) {
  return NHWC || GOUT_T ? (n * (HO * WO) + q) * K + k : (n * K + k) * (HO * WO) + q;
}

// workspace header (deterministic mode), as 64-bit words: [0] max |grad_out|, [1] max over
// (channel, tap) of sum_k |weight|, [2] max |mask| (doubles as ordered bits), [3] non-finite
// flag. The fixed-point data follows at word 4.
__device__ __forceinline__ void deft_atomic_max_abs(unsigned long long* slot, double v) {
  v = fabs(v);
  // Non-negative doubles (and NaN, above +inf) order like their bit patterns.
  atomicMax(slot, (unsigned long long)__double_as_longlong(v));
}

extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_bound(const T* __restrict__ mask, const T* __restrict__ weight,
                   const T* __restrict__ gout, unsigned long long* __restrict__ header) {
  deft_grid_begin();
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  double mg = 0.0, mw = 0.0, mm = HAS_MASK ? 0.0 : 1.0;
  bool bad = false;  // a NaN or infinite value: grad input becomes NaN
  auto take = [&](double& mx, double v) {
    const double a = fabs(v);
    if (!(a <= 1.0e300)) bad = true;
    else mx = fmax(mx, a);
  };
  for (long long i = tid; i < (long long)N * K * HO * WO; i += stride)
    take(mg, (double)deft_widen(gout[i]));
  for (long long i = tid; i < (long long)C * TAPS; i += stride) {
    const long long c = i / TAPS, t = i % TAPS, g = c / CG, cl = c % CG;
    double s = 0.0;
    for (int kk = 0; kk < KG; ++kk) {
      const long long k = g * KG + kk;
      s += fabs((double)deft_widen(weight[W_KRSC ? (k * TAPS + t) * CG + cl : (k * CG + cl) * TAPS + t]));
    }
    take(mw, s);
  }
  if (HAS_MASK)
    for (long long i = tid; i < (long long)N * OG * TAPS * HO * WO; i += stride)
      take(mm, (double)deft_widen(mask[i]));
  // One atomic per block and value: the block's maxima first (warp shuffles, then warp 0).
  __shared__ double part[3][8];
  __shared__ int any_bad;
  if (threadIdx.x == 0) any_bad = 0;
  __syncthreads();
  if (bad) any_bad = 1;
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) {
    mg = fmax(mg, __shfl_xor_sync(0xffffffffu, mg, s));
    mw = fmax(mw, __shfl_xor_sync(0xffffffffu, mw, s));
    mm = fmax(mm, __shfl_xor_sync(0xffffffffu, mm, s));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) part[0][warp] = mg, part[1][warp] = mw, part[2][warp] = mm;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < (int)blockDim.x / 32; ++i)
      mg = fmax(mg, part[0][i]), mw = fmax(mw, part[1][i]), mm = fmax(mm, part[2][i]);
    if (any_bad) atomicOr(&header[3], 1ull);
    deft_atomic_max_abs(&header[0], mg);
    deft_atomic_max_abs(&header[1], mw);
    deft_atomic_max_abs(&header[2], mm);
  }
}

// Scale of the fixed-point accumulation: 2^(59 - e) with bound < 2^(e+1), so that every sum of
// contributions stays below 2^60 in magnitude. A scaled contribution above DEFT_FIXED_LIMIT
// (2^60; or non-finite) sets the non-finite flag instead: grad input becomes NaN.
constexpr double DEFT_FIXED_LIMIT = 1.1529215046068470e18;
__device__ __forceinline__ double deft_fixed_scale(const unsigned long long* header) {
  const double bound = (double)(HO * WO) * TAPS * __longlong_as_double((long long)header[0]) *
                       __longlong_as_double((long long)header[1]) *
                       __longlong_as_double((long long)header[2]);
  if (!(bound > 0.0) || !(bound <= 1e300)) return 1.0;
  int e = ilogb(bound);
  e = e < -900 ? -900 : e;
  return ldexp(1.0, 59 - e);
}

struct BwdPoint {
  Off off[4];     // corner element offsets (0 for corners outside the image)
  Acc w[4];       // bilinear weights, 0 for corners outside the image
  Acc hy, hx, ly, lx;
  Acc mod;
  unsigned valid;  // bit q: corner q inside the image
};

// The sampling position of output pixel (ho, wo), tap t, offset group og, and its mask. Inside
// (some corner in the image) exactly when y > -1, x > -1, y < H, x < W (false for NaN).
struct BwdPos {
  Pos y, x;
  Acc mod;
};
__device__ __forceinline__ BwdPos deft_bwd_pos(const T* __restrict__ offset,
                                               const T* __restrict__ mask, long long n, int ho,
                                               int wo, int t, int og) {
  const PointInput in = deft_point_input(offset, mask, n, ho, wo, t, og);
  const int i = t / S, j = t % S;
  return {Pos(ho * SH - PH + i * DH) + in.dy, Pos(wo * SW - PW + j * DW) + in.dx, in.mod};
}

// The floor corner (y0, x0) of a point with some corner in the image (the window kernel's
// shared-memory test).
struct BwdCell {
  int y0, x0;
};

// The point at position ps; cell (may be null) gets its floor corner where the point is
// inside (left as it was otherwise).
__device__ __forceinline__ BwdPoint deft_bwd_point_at(const BwdPos& ps, BwdCell* cell) {
  const Pos y = ps.y, x = ps.x;
  BwdPoint p;
  p.mod = ps.mod;
  p.valid = 0;
  p.hy = p.hx = p.ly = p.lx = Acc(0);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    p.off[q] = 0;
    p.w[q] = Acc(0);
  }
  if (y > Pos(-1) && x > Pos(-1) && y < Pos(H) && x < Pos(W)) {  // false for NaN
    const Pos yf = floor(y), xf = floor(x);
    const int y0 = int(yf), x0 = int(xf);
    p.ly = Acc(y - yf);
    p.lx = Acc(x - xf);
    p.hy = Acc(1) - p.ly;
    p.hx = Acc(1) - p.lx;
    if (cell) cell->y0 = y0, cell->x0 = x0;
    const bool top = y0 >= 0, bottom = y0 + 1 <= H - 1;
    const bool left = x0 >= 0, right = x0 + 1 <= W - 1;
    if (top && left) { p.off[0] = deft_pixel_offset(y0, x0); p.w[0] = p.hy * p.hx; p.valid |= 1; }
    if (top && right) { p.off[1] = deft_pixel_offset(y0, x0 + 1); p.w[1] = p.hy * p.lx; p.valid |= 2; }
    if (bottom && left) { p.off[2] = deft_pixel_offset(y0 + 1, x0); p.w[2] = p.ly * p.hx; p.valid |= 4; }
    if (bottom && right) { p.off[3] = deft_pixel_offset(y0 + 1, x0 + 1); p.w[3] = p.ly * p.lx; p.valid |= 8; }
  }
  return p;
}

__device__ __forceinline__ BwdPoint deft_bwd_point(const T* __restrict__ offset,
                                                   const T* __restrict__ mask, long long n,
                                                   int ho, int wo, int t, int og) {
  return deft_bwd_point_at(deft_bwd_pos(offset, mask, n, ho, wo, t, og), nullptr);
}

// Output pixel m of the backward_data kernels: its image and position (zeros past the tensor),
// and its sampling point for tap t, offset group og (no valid corner past the tensor).
struct BwdPixel {
  bool ok;  // m < M_TOTAL
  long long n;
  int ho, wo;
};
__device__ __forceinline__ BwdPixel deft_bwd_pixel(long long m) {
  BwdPixel px{m < M_TOTAL, 0, 0, 0};
  if (px.ok) {
    px.n = m / (HO * WO);
    const int rem = int(m - px.n * (HO * WO));
    px.ho = rem / WO;
    px.wo = rem % WO;
  }
  return px;
}
__device__ __forceinline__ BwdPoint deft_bwd_pixel_point(const T* __restrict__ offset,
                                                         const T* __restrict__ mask,
                                                         const BwdPixel& px, int t, int og) {
  BwdPoint pt;
  if (px.ok) pt = deft_bwd_point(offset, mask, px.n, px.ho, px.wo, t, og);
  else pt.valid = 0, pt.mod = Acc(0);
  return pt;
}

// Writes the grad offset (dy, dx) and grad mask sums s[0..2] of output pixel m (n, ho, wo),
// tap t, offset group og; either pointer may be null.
__device__ __forceinline__ void deft_write_point_grads(T* __restrict__ goffset,
                                                       T* __restrict__ gmask, long long m,
                                                       long long n, int ho, int wo, int t, int og,
                                                       const Acc* s) {
  if (goffset) {
    long long dy_idx, plane;
    if (NHWC) {
      dy_idx = m * (2 * OG * TAPS) + og * 2 * TAPS + 2 * t;
      plane = 1;
    } else {
      dy_idx = ((n * (2 * OG * TAPS) + og * 2 * TAPS + 2 * t) * HO + ho) * WO + wo;
      plane = (long long)HO * WO;
    }
    goffset[dy_idx] = deft_cast<T>(s[0]);
    goffset[dy_idx + plane] = deft_cast<T>(s[1]);
  }
  if (HAS_MASK && gmask) {
    const long long m_idx = NHWC ? m * (OG * TAPS) + og * TAPS + t
                                 : ((n * (OG * TAPS) + og * TAPS + t) * HO + ho) * WO + wo;
    gmask[m_idx] = deft_cast<T>(s[2]);
  }
}

// The point gradients (grad dy, dx, mask) of the block's pixels from the partial sums pg of
// every thread: each thread's go to red[3][THREADS] (shared memory), and after a block barrier
// the pixel's leader (lead && px.ok) adds its `parts` partials, those of threads th(0) ..
// th(parts - 1), in that fixed order and writes them. Every thread of the block calls it.
template <class Th>
__device__ __forceinline__ void deft_reduce_point_grads(Acc* red, const Acc (&pg)[3], bool lead,
                                                        int parts, Th th, T* __restrict__ goffset,
                                                        T* __restrict__ gmask, long long m,
                                                        const BwdPixel& px, int t, int og) {
#pragma unroll
  for (int r = 0; r < 3; ++r) red[r * THREADS + threadIdx.x] = pg[r];
  __syncthreads();
  if (lead && px.ok) {
    Acc s[3] = {Acc(0), Acc(0), Acc(0)};
    for (int u = 0; u < parts; ++u) {
      const int i = th(u);
#pragma unroll
      for (int r = 0; r < 3; ++r) s[r] += red[r * THREADS + i];
    }
    deft_write_point_grads(goffset, gmask, m, px.n, px.ho, px.wo, t, og, s);
  }
}

// dst[0..3] += v[0..3] (an f32 workspace, 16-byte aligned): one vector reduction on sm_90,
// four atomics before it.
__device__ __forceinline__ void deft_red4(float* dst, const float (&v)[4]) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(v[0]), "f"(v[1]),
               "f"(v[2]), "f"(v[3])
               : "memory");
#else
#pragma unroll
  for (int e = 0; e < 4; ++e) atomicAdd(dst + e, v[e]);
#endif
}

// The scatter of EV_ channels' column gradients cg into grad input through the point's four
// corners (dst: the first channel's grad-input base; null: grad input not requested).
template <int EV_>
__device__ __forceinline__ void deft_bwd_scatter(GinT* dst, const BwdPoint& pt, const Acc* cg,
                                                 double scale, bool& nonfinite) {
#if GIN_MODE >= 3
  (void)dst, (void)pt, (void)cg, (void)scale, (void)nonfinite;  // the gather form: deft_bwd_gather sums grad input
#else
  if (!dst) return;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (!((pt.valid >> q) & 1)) continue;
    Acc contrib[EV_];
#pragma unroll
    for (int e = 0; e < EV_; ++e) contrib[e] = cg[e] * pt.mod * pt.w[q];
#if GIN_MODE == 2
#pragma unroll
    for (int e = 0; e < EV_; ++e) {
      const double sc = (double)contrib[e] * scale;
      if (!(fabs(sc) <= DEFT_FIXED_LIMIT)) nonfinite = true;
      else atomicAdd(dst + pt.off[q] + e, (unsigned long long)__double2ll_rn(sc));
    }
#else
    (void)scale;
    (void)nonfinite;
    if constexpr (EV_ == 4 && sizeof(GinT) == 4) {
      const float v[4] = {float(contrib[0]), float(contrib[1]), float(contrib[2]),
                          float(contrib[3])};
      deft_red4(reinterpret_cast<float*>(dst + pt.off[q]), v);
    } else {
#pragma unroll
      for (int e = 0; e < EV_; ++e) atomicAdd(dst + pt.off[q] + e, contrib[e]);
    }
#endif
  }
#endif
}

// The rest of deft_bwd_channels once the corners are in v (zeros outside the image): the grad
// mask and grad offset terms into g[0..2], and the scatter into grad input.
template <int EV_>
__device__ __forceinline__ void deft_bwd_channels_math(const Acc (&v)[4][EV_], GinT* dst,
                                                       const BwdPoint& pt, const Acc* cg,
                                                       double scale, bool& nonfinite, Acc* g) {
#pragma unroll
  for (int e = 0; e < EV_; ++e) {
    const Acc val = pt.w[0] * v[0][e] + pt.w[1] * v[1][e] + pt.w[2] * v[2][e] + pt.w[3] * v[3][e];
    g[2] += cg[e] * val;
    const Acc cgm = cg[e] * pt.mod;
    g[0] += cgm * (pt.hx * (v[2][e] - v[0][e]) + pt.lx * (v[3][e] - v[1][e]));
    g[1] += cgm * (pt.hy * (v[1][e] - v[0][e]) + pt.ly * (v[3][e] - v[2][e]));
  }
  deft_bwd_scatter<EV_>(dst, pt, cg, scale, nonfinite);
}

// The point grads of one channel: its column gradient cg scattered into grad input through
// the four corners (dst: the channel's grad-input base, null: grad input not requested) and
// its terms of the point's grad mask (cg * sample) and grad offset (cg * mask * d sample /
// d position) added to g[0..2] = (dy, dx, mask). src: the channel's input base.
__device__ __forceinline__ void deft_bwd_channel(const T* __restrict__ src, GinT* dst,
                                                 const BwdPoint& pt, Acc cg, double scale,
                                                 bool& nonfinite, Acc* g) {
  Acc v[4][1];
#pragma unroll
  for (int q = 0; q < 4; ++q)
    v[q][0] = (pt.valid >> q) & 1 ? Acc(deft_widen(src[pt.off[q]])) : Acc(0);
  deft_bwd_channels_math<1>(v, dst, pt, &cg, scale, nonfinite, g);
}

// deft_bwd_channel for EV_ consecutive channels at once (nhwc): one vector load per corner
// instead of EV_ scalar loads, and for a float accumulator one vector reduction
// (red.global.add.v4.f32 on sm_90+) per corner instead of EV_ atomics. src and dst must be
// aligned to EV_ elements. The sums into g[] run over the channels in order, as EV_ calls of
// deft_bwd_channel would.
template <int EV_>
__device__ __forceinline__ void deft_bwd_channels(const T* __restrict__ src, GinT* dst,
                                                  const BwdPoint& pt, const Acc* cg, double scale,
                                                  bool& nonfinite, Acc* g) {
  struct __align__(sizeof(T) * EV_) Vec { T x[EV_]; };
  Acc v[4][EV_];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    Vec r;
    if ((pt.valid >> q) & 1) r = *reinterpret_cast<const Vec*>(src + pt.off[q]);
#pragma unroll
    for (int e = 0; e < EV_; ++e) v[q][e] = (pt.valid >> q) & 1 ? Acc(deft_widen(r.x[e])) : Acc(0);
  }
  deft_bwd_channels_math<EV_>(v, dst, pt, cg, scale, nonfinite, g);
}

// The corner-sums form of deft_bwd_channels (the depthwise data kernel's f16 / bf16 layers,
// perf notes round B29): the point's grad mask and grad offset are linear in its four corner
// values, so a thread sums a[q] += cg[e] * v[q][e] over its channels (one FMA a channel and
// corner) and turns the sums into the three grads once a point (deft_bwd_grads_from_sums),
// instead of ~16 operations a channel. The scatter into grad input is deft_bwd_scatter's.
// The sums round differently from deft_bwd_channels' per-channel differences (v2 - v0, ...),
// so it serves the half-precision dtypes only, whose inputs carry 11 bits or fewer.
template <int EV_>
__device__ __forceinline__ void deft_bwd_channels_sums(const T* __restrict__ src, GinT* dst,
                                                       const BwdPoint& pt, const Acc* cg,
                                                       double scale, bool& nonfinite, Acc (&a)[4]) {
  struct __align__(sizeof(T) * EV_) Vec { T x[EV_]; };
  // a corner outside the image is not loaded (its sum stays zero): loading the first pixel in
  // its place without a predicate cost dw1024_16 up to 1.5 x at sigma = 8, where three fifths
  // of the corners are off the image (perf notes round B29)
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (!((pt.valid >> q) & 1)) continue;
    const Vec r = *reinterpret_cast<const Vec*>(src + pt.off[q]);
#pragma unroll
    for (int e = 0; e < EV_; ++e) a[q] += cg[e] * Acc(deft_widen(r.x[e]));
  }
  deft_bwd_scatter<EV_>(dst, pt, cg, scale, nonfinite);
}
// g[0..2] (dy, dx, mask) += the point's grads from a thread's corner sums a[q] = sum over its
// channels of cg * corner q (zero for corners outside the image): mask: sum_q w[q] a[q]; dy: mod (hx (a2 -
// a0) + lx (a3 - a1)); dx: mod (hy (a1 - a0) + ly (a3 - a2)). Linear in a, so the threads of
// a point may convert their partial sums before they reduce g.
__device__ __forceinline__ void deft_bwd_grads_from_sums(const BwdPoint& pt, const Acc (&a)[4],
                                                         Acc* g) {
  g[2] += pt.w[0] * a[0] + pt.w[1] * a[1] + pt.w[2] * a[2] + pt.w[3] * a[3];
  g[0] += pt.mod * (pt.hx * (a[2] - a[0]) + pt.lx * (a[3] - a[1]));
  g[1] += pt.mod * (pt.hy * (a[1] - a[0]) + pt.ly * (a[3] - a[2]));
}

// The same in two steps, for a kernel that issues several points' loads before it uses any:
// the four corner vectors of EV_ consecutive channels (read-only loads, ld.global.nc, where the
// vector has a native type: the caller's pointer may have lost the global space on its way),
// then deft_bwd_channels_from on them.
template <int EV_>
struct BwdCorners {
  struct __align__(sizeof(T) * EV_) Vec { T x[EV_]; };
  Vec v[4];
};
template <int EV_>
__device__ __forceinline__ BwdCorners<EV_> deft_bwd_load_corners(const T* __restrict__ src,
                                                                 const BwdPoint& pt) {
  typedef typename BwdCorners<EV_>::Vec Vec;
  BwdCorners<EV_> r;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (!((pt.valid >> q) & 1)) continue;
    if constexpr (sizeof(Vec) == 16) {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(src + pt.off[q]));
      memcpy(&r.v[q], &u, 16);
    } else if constexpr (sizeof(Vec) == 8) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(src + pt.off[q]));
      memcpy(&r.v[q], &u, 8);
    } else if constexpr (sizeof(Vec) == 4) {
      const unsigned u = __ldg(reinterpret_cast<const unsigned*>(src + pt.off[q]));
      memcpy(&r.v[q], &u, 4);
    } else {
      r.v[q] = *reinterpret_cast<const Vec*>(src + pt.off[q]);
    }
  }
  return r;
}
template <int EV_>
__device__ __forceinline__ void deft_bwd_channels_from(const BwdCorners<EV_>& r, GinT* dst,
                                                       const BwdPoint& pt, const Acc* cg,
                                                       double scale, bool& nonfinite, Acc* g) {
  Acc v[4][EV_];
#pragma unroll
  for (int q = 0; q < 4; ++q)
#pragma unroll
    for (int e = 0; e < EV_; ++e) v[q][e] = (pt.valid >> q) & 1 ? Acc(deft_widen(r.v[q].x[e])) : Acc(0);
  deft_bwd_channels_math<EV_>(v, dst, pt, cg, scale, nonfinite, g);
}

// Converts the grad-input workspace into grad_input's dtype (GIN_MODE 1 to 6). An nchw layer
// with a channels-last workspace (WS_NHWC: the input read channels-last, or a gather form) gets
// its grad input transposed back here, in 64 x 64 tiles (grid: (H*W / 64, C / 64, N) rounded
// up); otherwise four elements a thread (grid: elements / 1024 rounded up), in one vector each
// way where the count and both pointers allow it (one 4-byte load and a 2-byte store a thread
// held the f16 finish to ~1.3 TB/s: dw512 nhwc 40 us, perf notes round B27).
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_finish(const GinT* __restrict__ ws, const unsigned long long* __restrict__ header,
                    T* __restrict__ gin) {
  deft_grid_begin();
#if GIN_MODE == 2 || GIN_MODE == 3 || GIN_MODE == 6
  const bool nonfinite = header[3] != 0ull;
  const double scale = deft_fixed_scale(header);
  auto conv = [=](GinT v) {
    return deft_cast<T>(nonfinite ? Acc(__longlong_as_double(0x7ff8000000000000ll))
                                  : Acc((double)(long long)v / scale));
  };
#else
  (void)header;
  auto conv = [](GinT v) { return deft_cast<T>(Acc(v)); };
#endif
  if constexpr (WS_NHWC && !NHWC) {
    const long long n = blockIdx.z;
    const GinT* s = ws + n * (C * H * W);  // [pixel][c]
    T* d = gin + n * (C * H * W);          // [c][pixel]
    deft_transpose_tile(s, d, H * W, C, (long long)blockIdx.x * 64, (long long)blockIdx.y * 64,
                        deft_transpose_pairs(ws, gin, H * W, C), conv);
  } else {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    struct __align__(4 * sizeof(GinT)) In { GinT x[4]; };
    struct __align__(4 * sizeof(T)) Out { T x[4]; };
    if (IN_ELEMS % 4 == 0 && (unsigned long long)ws % sizeof(In) == 0 &&
        (unsigned long long)gin % sizeof(Out) == 0) {  // (uniform)
      if (i < IN_ELEMS) {
        const In v = *reinterpret_cast<const In*>(ws + i);
        Out o;
#pragma unroll
        for (int e = 0; e < 4; ++e) o.x[e] = conv(v.x[e]);
        *reinterpret_cast<Out*>(gin + i) = o;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (i + e < IN_ELEMS) gin[i + e] = conv(ws[i + e]);
    }
  }
}

// Corner q's bilinear weight from a sampling point's fraction (ly, lx): hy hx, hy lx, ly hx,
// ly lx for q = 0 .. 3 (the gather forms, which recompute it per corner)
__device__ __forceinline__ Acc deft_corner_weight(float fy, float fx, int q) {
  const Acc ly = fy, lx = fx, hy = Acc(1) - ly, hx = Acc(1) - lx;
  return q == 0 ? hy * hx : q == 1 ? hy * lx : q == 2 ? ly * hx : ly * lx;
}

// One contribution added to a fixed-point sum, rounded as GIN_MODE 2's atomics round it.
__device__ __forceinline__ void deft_fixed_add(long long& acc, Acc contrib, double scale,
                                               bool& nonfinite) {
  const double sc = (double)contrib * scale;
  if (!(fabs(sc) <= DEFT_FIXED_LIMIT)) nonfinite = true;
  else acc += __double2ll_rn(sc);
}

#if GIN_MODE == 3 || GIN_MODE == 4
// Deterministic grad input in gather form. Instead of 64-bit atomics from every (point,
// corner, channel), the data kernel stores each sampling point's column gradient times its
// mask (v[point][channel], f32), and every input pixel sums what the points touching it
// contribute, in registers. The points are sorted by the cell of their floor corner
// (deft_bwd_cells counts them, deft_bwd_scan turns the counts into list starts, deft_bwd_fill
// lists them): the points touching pixel (y, x) through corner q are the points of cell
// (y, x), (y, x - 1), (y - 1, x), (y - 1, x - 1) for q = 0 .. 3. Each contribution is rounded
// to the same 64-bit fixed point as GIN_MODE 2 (deft_fixed_scale) and summed as an integer, so
// the order within a cell (set by atomics) does not matter and the result has GIN_MODE 2's
// bits. Point index: q = (pixel * OG + og) * TAPS + tap; cell index: deft_bwd_cell.
// GIN_MODE 4 (the depthwise kernel's gin=gather, fast mode): the same gather summing in f32
// into the f32 workspace, in list order (not reproducible: atomics set the order). With
// GATHER_SORTED (its deterministic default) deft_bwd_sort orders each cell's list by point
// index first, so the f32 sums run in a fixed order and give the same bits every run.
static_assert(sizeof(Acc) == 4, "the gather stores f32 column gradients");
constexpr long long G_POINTS = M_TOTAL * OG * TAPS;
constexpr long long G_CELLS = (long long)N * OG * (H + 1) * (W + 1);

// deft_bwd_point's weight of corner q from the point's fraction f = (ly, lx)
__device__ __forceinline__ Acc deft_gather_corner_weight(float2 f, int q) {
  return deft_corner_weight(f.x, f.y, q);
}

__device__ __forceinline__ long long deft_bwd_cell(long long n, int og, int y0, int x0) {
  return ((n * OG + og) * (H + 1) + (y0 + 1)) * (long long)(W + 1) + (x0 + 1);
}

// One thread per sampling point: its cell (-1: no corner inside), its rank among the cell's
// points (arbitrary order) and its fractional position.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_cells(const T* __restrict__ offset, const T* __restrict__ mask,
                   int* __restrict__ counts, int* __restrict__ cell_of, int* __restrict__ rank,
                   float2* __restrict__ frac) {
  deft_grid_begin();
  const long long q = (long long)blockIdx.x * 256 + threadIdx.x;
  if (q >= G_POINTS) return;
  const int t = int(q % TAPS), og = int(q / TAPS % OG);
  const BwdPixel px = deft_bwd_pixel(q / (TAPS * OG));
  const BwdPos ps = deft_bwd_pos(offset, mask, px.n, px.ho, px.wo, t, og);
  int cell = -1;
  if (ps.y > Pos(-1) && ps.x > Pos(-1) && ps.y < Pos(H) && ps.x < Pos(W)) {  // as deft_bwd_point
    const Pos yf = floor(ps.y), xf = floor(ps.x);
    cell = int(deft_bwd_cell(px.n, og, int(yf), int(xf)));
    frac[q] = make_float2(Acc(ps.y - yf), Acc(ps.x - xf));
    rank[q] = atomicAdd(&counts[cell], 1);
  }
  cell_of[q] = cell;
}

// counts[0 .. G_CELLS] (the last one zero) -> exclusive prefix sums, in place: one block
// walking the array in tiles of 4096, each loaded and stored coalesced through shared memory
// (thread t's four consecutive counts read from there), scanned with warp shuffles, the
// running total carried to the next tile. (A thread's own contiguous run read straight from
// global memory made every load instruction touch 32 sectors: on one SM, 18 us for dw512's
// 17 k cells, perf notes round B33.)
extern "C" __global__ void __launch_bounds__(1024) deft_bwd_scan(int* __restrict__ counts) {
  deft_grid_begin();
  constexpr unsigned FULL = 0xffffffffu;
  constexpr long long len = G_CELLS + 1;
  __shared__ int tile[4096];
  __shared__ int wsum[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int carry = 0;  // the sum of the tiles before (< 2^31: the points of the layer)
  for (long long base = 0; base < len; base += 4096) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = base + u * 1024 + tid;
      tile[u * 1024 + tid] = i < len ? counts[i] : 0;
    }
    __syncthreads();
    int v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = tile[4 * tid + u];
    const int own = v[0] + v[1] + v[2] + v[3];
    int x = own;  // inclusive scan over the warp
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int y = __shfl_up_sync(FULL, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warps' totals
      int w = wsum[lane];
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int y = __shfl_up_sync(FULL, w, o);
        if (lane >= o) w += y;
      }
      wsum[lane] = w;
    }
    __syncthreads();
    int run = carry + (warp ? wsum[warp - 1] : 0) + x - own;
#pragma unroll
    for (int u = 0; u < 4; ++u) tile[4 * tid + u] = run, run += v[u];
    carry += wsum[31];
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = base + u * 1024 + tid;
      if (i < len) counts[i] = tile[u * 1024 + tid];
    }
    __syncthreads();  // the tile and the warp totals are rewritten next
  }
}

extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_fill(const int* __restrict__ cell_of, const int* __restrict__ rank,
                  const int* __restrict__ starts, int* __restrict__ list) {
  deft_grid_begin();
  const long long q = (long long)blockIdx.x * 256 + threadIdx.x;
  if (q >= G_POINTS) return;
  const int cell = cell_of[q];
  if (cell >= 0) list[starts[cell] + rank[q]] = int(q);
}

#if defined(GATHER_SORTED) && GATHER_SORTED
// A warp per cell (grid-stride): the cell's list, in the order the atomics of deft_bwd_cells
// gave it, into `sorted` by point index (the entries are distinct). Up to 32 entries: a
// bitonic sort across the lanes. Longer lists (crowded cells): each entry's rank counted
// against the whole list, len^2 / 32 compares a lane, 32 entries of it in registers at a time.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_sort(const int* __restrict__ starts, const int* __restrict__ list,
                  int* __restrict__ sorted) {
  deft_grid_begin();
  constexpr unsigned FULL = 0xffffffffu;
  constexpr int NONE = 0x7fffffff;  // above every point index (G_POINTS < 2^31)
  const int lane = threadIdx.x % 32;
  const long long warps = (long long)gridDim.x * 8;
  for (long long cell = (long long)blockIdx.x * 8 + threadIdx.x / 32; cell < G_CELLS; cell += warps) {
    const int b = starts[cell], len = starts[cell + 1] - b;
    if (len <= 32) {
      int v = lane < len ? list[b + lane] : NONE;
#pragma unroll
      for (int k = 2; k <= 32; k *= 2)
#pragma unroll
        for (int j = k / 2; j > 0; j /= 2) {
          const int o = __shfl_xor_sync(FULL, v, j);
          const bool up = (lane & k) == 0, low = (lane & j) == 0;
          v = low == up ? min(v, o) : max(v, o);
        }
      if (lane < len) sorted[b + lane] = v;
      continue;
    }
    for (int i0 = 0; i0 < len; i0 += 32) {
      const int mine = i0 + lane < len ? list[b + i0 + lane] : NONE;
      int rank = 0;
      for (int j0 = 0; j0 < len; j0 += 32) {
        const int other = j0 + lane < len ? list[b + j0 + lane] : NONE;
#pragma unroll 8
        for (int j = 0; j < 32; ++j) rank += __shfl_sync(FULL, other, j) < mine;
      }
      if (i0 + lane < len) sorted[b + rank] = mine;
    }
  }
}
#endif

// One warp per input pixel and offset group: lanes along the group's channels (GEV a lane
// access, GSL accesses a lane per pass), the four cells' points in turn; writes the pixel's
// fixed-point grad input (every element: the workspace needs no zeroing) in the channels-last
// layout the finish kernel reads.
constexpr int GEV = CPOG % 4 == 0 ? 4 : 1;
constexpr int GSL_MAX = 16 / GEV;  // at most 16 channels (accumulators) a lane per pass
constexpr int GSL = (CPOG + 32 * GEV - 1) / (32 * GEV) < GSL_MAX ? (CPOG + 32 * GEV - 1) / (32 * GEV)
                                                                 : GSL_MAX;
#if defined(GATHER_DIRECT) && GATHER_DIRECT
// The depthwise kernel's gather (KernelPlan::gather_direct): no values buffer. A depthwise
// channel's column gradient is weight[c][tap] x grad_out[c][pixel], so the gather computes what
// GIN_MODE 2 would scatter, (weight x grad_out) x mask x corner weight, in the same f32
// operations, from grad_out in channels-last order (gout: the layer's own for nhwc, a
// transposed copy for nchw), the weight and the mask. An item is an input pixel, offset group
// and slice of 32 x DGEV channels (GSLICES a group; the slice is the fastest index, so that
// neighbouring warps share their pixels' lists in L1); a block takes a contiguous run of items,
// in a grid of at most 1024 blocks (the runtime's launch). Each block first copies the weight into shared
// memory as f32 [tap][channel] (WS_SMEM: where it fits 32 KiB), so that a lane's channels of
// one tap are one vector read. The warp takes the points of a cell 32 at a time: each lane
// reads one point's list entry, fraction and mask, then the warp walks them with shuffles.
// GIN_MODE 3 sums in fixed point (deterministic), 4 in f32.
constexpr bool WS_SMEM = (long long)C * TAPS * 4 <= 32768;
// GATHER_OUT (GIN_MODE 4, an nhwc layer): the sums go to grad input in the layer's dtype, not
// to the f32 workspace (which has the same channels-last layout): no finish kernel.
#ifndef GATHER_OUT
#define GATHER_OUT 0
#endif
static_assert(!GATHER_OUT || (GIN_MODE == 4 && NHWC), "the gather writes grad input: f32 sums, nhwc");
#if GATHER_OUT
typedef T GOutT;
#else
typedef GinT GOutT;
#endif
__device__ __forceinline__ long long deft_gather_mask_index(int m, int og, int t) {
  if (NHWC) return ((long long)m * OG + og) * TAPS + t;
  const long long n = m / (HO * WO), qi = m % (HO * WO);
  return ((n * OG + og) * TAPS + t) * (long long)(HO * WO) + qi;
}
__device__ __forceinline__ void deft_gather_item(
    long long wid, int lane, const T* __restrict__ gout, const T* __restrict__ weight,
    const float* wsm, const T* __restrict__ mask, const float2* __restrict__ frac,
    const int* __restrict__ starts, const int* __restrict__ list, double scale, bool& nonfinite,
    GOutT* __restrict__ ws) {
  // DGEV channels a lane: 8 (one 16-byte grad_out vector) for a 16-bit layer whose groups
  // take it (round B37), else 4 or 1; the weight's f32 row of them is one or two 16-byte reads
  struct __align__(sizeof(T) * DGEV) Vec { T x[DGEV]; };
  struct __align__(4 * DGEV > 16 ? 16 : 4 * DGEV) FVec { float x[DGEV]; };
  const int slice = int(wid % GSLICES);
  const long long pw = wid / GSLICES;
  const int x = int(pw % W), y = int(pw / W % H), og = int(pw / (W * H) % OG);
  const long long n = pw / ((long long)W * H * OG);
  const int c = slice * 32 * DGEV + lane * DGEV;  // the lane's first channel in the group
  const bool active = c < CPOG;
#if GIN_MODE == 3
  typedef long long Sum;
#else
  typedef Acc Sum;
  (void)scale, (void)nonfinite;
#endif
  const long long cell[4] = {deft_bwd_cell(n, og, y, x), deft_bwd_cell(n, og, y, x - 1),
                             deft_bwd_cell(n, og, y - 1, x), deft_bwd_cell(n, og, y - 1, x - 1)};
  Sum acc[DGEV];
#pragma unroll
  for (int e = 0; e < DGEV; ++e) acc[e] = Sum(0);
  const long long cabs = (long long)og * CPOG + c;  // absolute channel
  // A lane's share of a batch of (at most) 32 points of cell q from list position b0: the
  // point's pixel, tap, mask and corner weight.
  struct Batch {
    int m, t;
    Acc mod, w;
  };
  auto load_batch = [&](int q, int b0, int cnt) {
    Batch b{0, 0, Acc(0), Acc(0)};
    if (lane < cnt) {
      const int pt = __ldg(list + b0 + lane);
      b.w = deft_gather_corner_weight(__ldg(frac + pt), q);
      b.t = pt % TAPS;
      b.m = pt / (TAPS * OG);
      b.mod = HAS_MASK ? Acc(deft_widen(mask[deft_gather_mask_index(b.m, og, b.t)])) : Acc(1);
    }
    return b;
  };
  // The four cells' list ranges and first batches, loaded before any is walked: four
  // independent chains of loads (list start, entry, fraction and mask) in flight at once
  // instead of one after another (most cells hold fewer than 32 points).
  int beg[4], end[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) beg[q] = starts[cell[q]], end[q] = starts[cell[q] + 1];
  Batch first[4];
#pragma unroll
  for (int q = 0; q < 4; ++q)
    first[q] = load_batch(q, beg[q], end[q] - beg[q] < 32 ? end[q] - beg[q] : 32);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    for (int b0 = beg[q]; b0 < end[q]; b0 += 32) {
      const int cnt = end[q] - b0 < 32 ? end[q] - b0 : 32;
      const Batch bt = b0 == beg[q] ? first[q] : load_batch(q, b0, cnt);
      const int my_m = bt.m, my_t = bt.t;
      const Acc my_mod = bt.mod, my_w = bt.w;
#pragma unroll 4
      for (int j = 0; j < cnt; ++j) {
        const int m = __shfl_sync(0xffffffffu, my_m, j), t = __shfl_sync(0xffffffffu, my_t, j);
        const Acc mod = __shfl_sync(0xffffffffu, my_mod, j), w = __shfl_sync(0xffffffffu, my_w, j);
        if (!active) continue;
        const Vec gv = *reinterpret_cast<const Vec*>(gout + (long long)m * K + cabs);
        float wv[DGEV];
        if constexpr (WS_SMEM) {
          const FVec f = *reinterpret_cast<const FVec*>(wsm + t * C + cabs);
#pragma unroll
          for (int e = 0; e < DGEV; ++e) wv[e] = f.x[e];
        } else {
#pragma unroll
          for (int e = 0; e < DGEV; ++e) wv[e] = float(deft_widen(__ldg(weight + (cabs + e) * TAPS + t)));
        }
#pragma unroll
        for (int e = 0; e < DGEV; ++e) {
          // GIN_MODE 2's operations: cg = weight x grad_out, cgm = cg x mask, cgm x corner weight
          const Acc cg = Acc(wv[e]) * Acc(deft_widen(gv.x[e]));
          const Acc contrib = cg * mod * w;
#if GIN_MODE == 3
          deft_fixed_add(acc[e], contrib, scale, nonfinite);
#else
          acc[e] += contrib;
#endif
        }
      }
    }
  }
  if (active) {
    GOutT* out = ws + ((n * H + y) * W + x) * C + cabs;
#if GATHER_OUT
#pragma unroll
    for (int e = 0; e < DGEV; ++e) out[e] = deft_cast<T>(acc[e]);
#else
#pragma unroll
    for (int e = 0; e < DGEV; ++e) out[e] = GinT(acc[e]);
#endif
  }
}
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_gather(const T* __restrict__ gout, const T* __restrict__ weight,
                    const T* __restrict__ mask, const float2* __restrict__ frac,
                    const int* __restrict__ starts, const int* __restrict__ list,
                    unsigned long long* __restrict__ header, GOutT* __restrict__ ws) {
  deft_grid_begin();
  static_assert(CG == 1 && KG == 1, "the direct gather is the depthwise kernel's");
  static_assert(GSLICES * 32 * DGEV >= CPOG, "GSLICES slices cover the group's channels");
  __shared__ __align__(16) float wsm[WS_SMEM ? C * TAPS : 1];
  if constexpr (WS_SMEM) {
    for (int i = threadIdx.x; i < C * TAPS; i += 256)  // coalesced reads of weight[c][tap]
      wsm[(i % TAPS) * C + i / TAPS] = float(deft_widen(weight[i]));
    __syncthreads();
  }
#if GIN_MODE == 3
  const double scale = deft_fixed_scale(header);
#else
  const double scale = 1.0;
#endif
  bool nonfinite = false;
  // the block's items: a contiguous run (neighbouring pixels share cells: their points' grad_out
  // rows stay in L1), its warps taking every 8th
  const int lane = threadIdx.x % 32;
  constexpr long long ITEMS = (long long)N * OG * H * W * GSLICES;
  const long long per = (ITEMS + gridDim.x - 1) / gridDim.x;
  const long long b0 = blockIdx.x * per, b1 = b0 + per < ITEMS ? b0 + per : ITEMS;
  for (long long wid = b0 + threadIdx.x / 32; wid < b1; wid += 8)
    deft_gather_item(wid, lane, gout, weight, wsm, mask, frac, starts, list, scale, nonfinite, ws);
  if (nonfinite) atomicOr(&header[3], 1ull);
}
#else
static_assert(GIN_MODE == 3, "GIN_MODE 4 is the direct gather's");
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_gather(const float* __restrict__ values, const float2* __restrict__ frac,
                    const int* __restrict__ starts, const int* __restrict__ list,
                    unsigned long long* __restrict__ header, GinT* __restrict__ ws) {
  deft_grid_begin();
  const long long wid = ((long long)blockIdx.x * 256 + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (wid >= (long long)N * OG * H * W) return;  // whole warps
  const int x = int(wid % W), y = int(wid / W % H), og = int(wid / (W * H) % OG);
  const long long n = wid / ((long long)W * H * OG);
  const double scale = deft_fixed_scale(header);
  bool nonfinite = false;
  GinT* out = ws + ((n * H + y) * W + x) * C + (long long)og * CPOG;
  long long cell[4] = {deft_bwd_cell(n, og, y, x), deft_bwd_cell(n, og, y, x - 1),
                       deft_bwd_cell(n, og, y - 1, x), deft_bwd_cell(n, og, y - 1, x - 1)};
  int beg[4], end[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) beg[q] = starts[cell[q]], end[q] = starts[cell[q] + 1];
  for (int c0 = 0; c0 < CPOG; c0 += 32 * GEV * GSL) {
    long long acc[GSL][GEV];
#pragma unroll
    for (int s = 0; s < GSL; ++s)
#pragma unroll
      for (int e = 0; e < GEV; ++e) acc[s][e] = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      for (int i = beg[q]; i < end[q]; ++i) {
        const int pt = __ldg(list + i);
        const Acc w = deft_gather_corner_weight(__ldg(frac + pt), q);
        const float* vp = values + (long long)pt * CPOG;
#pragma unroll
        for (int s = 0; s < GSL; ++s) {
          const int c = c0 + (s * 32 + lane) * GEV;
          if (c >= CPOG) continue;
          float vv[GEV];
          if constexpr (GEV == 4) {
            const float4 v4 = __ldg(reinterpret_cast<const float4*>(vp + c));
            vv[0] = v4.x, vv[1] = v4.y, vv[2] = v4.z, vv[3] = v4.w;
          } else {
            vv[0] = __ldg(vp + c);
          }
#pragma unroll
          for (int e = 0; e < GEV; ++e) {
            // GIN_MODE 2: cgm * pt.w[q], then scaled
            deft_fixed_add(acc[s][e], vv[e] * w, scale, nonfinite);
          }
        }
      }
    }
#pragma unroll
    for (int s = 0; s < GSL; ++s) {
      const int c = c0 + (s * 32 + lane) * GEV;
      if (c >= CPOG) continue;
#pragma unroll
      for (int e = 0; e < GEV; ++e) out[c + e] = (unsigned long long)acc[s][e];
    }
  }
  if (nonfinite) atomicOr(&header[3], 1ull);
}
#endif  // GATHER_DIRECT
#endif
