// deform_conv2d forward for depthwise layers (groups == c == k): no GEMM, each output
// (pixel, channel) is a sum over taps of weight * mask * bilinear sample of its own channel.
// A thread owns one output pixel and VEC channels: in nhwc those channels are one 16-byte
// vector per corner; in nchw they are VEC planes, threads running along pixels so that
// offsets, masks and outputs are coalesced. A sampling point is computed once per
// (pixel, tap) and reused for all VEC channels of the thread (one offset group).
//
// The 16-byte vector path (channels-last input, VEC * sizeof(T) a multiple of 16 bytes):
//  - a point's four corners lie at fixed distances from its (y0, x0) corner (0, C, W * C,
//    (W + 1) * C elements): one address a point (the corner clamped into the image, H, W >= 2),
//    four 16-byte loads without predicates, weights zero for the rows / columns that are no
//    corner of the point;
//  - W_VEC: the block's weights are staged in shared memory as [tap][channel], so that a thread
//    reads its VEC weights of a tap as 16-byte vectors (instead of VEC scalar global loads);
//  - OUT_VEC (nhwc output): the VEC results leave through a 16-byte vector (a 16-byte aligned
//    output; NVVM emits the union's store as 4-byte pieces, four STG.32 for f16).
//
// Constants from codegen: THREADS, VEC, CH_PER_BLOCK (channels per block),
// PIX_PER_BLOCK (output pixels per block), W_VEC, OUT_VEC.

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int TPC = CH_PER_BLOCK / VEC;  // threads per pixel
constexpr bool VEC_PATH = X_NHWC && VEC > 1 && (VEC * sizeof(T)) % 16 == 0 && H >= 2 && W >= 2;
static_assert(!W_VEC || VEC_PATH, "weight vectors");
static_assert(!OUT_VEC || (VEC_PATH && NHWC), "output vectors");

// The vector path's sampling point of (ho, wo), tap t, as a 2 x 2 block of pixels (first row
// yb, first column xb) and the four weights of its pixels. The block starts at the point's
// top-left corner clamped into the image (so that its four loads are in bounds, with no
// predicate), and each row and column takes the weight of the corner it is, zero where it is
// none: a corner outside the image, like a point outside it (or at a NaN position), reads some
// pixel of the image with weight zero, as deft_point_from's corners do.
__device__ __forceinline__ void deft_dw_block(const PointInput& in, int ho, int wo, int t,
                                              Acc (&w)[4], int& yb, int& xb) {
  // (VEC_PATH: H, W >= 2, so the 2 x 2 block fits)
  const int i = t / S, j = t % S;
  const Pos y = Pos(ho * SH - PH + i * DH) + in.dy;
  const Pos xx = Pos(wo * SW - PW + j * DW) + in.dx;
  // Written so that NaN positions fail the test: NaN samples read zero.
  const bool inside = y > Pos(-1) && xx > Pos(-1) && y < Pos(H) && xx < Pos(W);
  const Pos ys = inside ? y : Pos(0), xs = inside ? xx : Pos(0);
  const Pos yf = floor(ys), xf = floor(xs);
  const int y0 = int(yf), x0 = int(xf);  // -1 .. H - 1, -1 .. W - 1
  const Acc ly = Acc(ys - yf), lx = Acc(xs - xf);
  const Acc mod = inside ? in.mod : Acc(0);
  // the block's first row and column, and the weight of each (the corner row y0 has 1 - ly,
  // y0 + 1 has ly)
  yb = y0 < 0 ? 0 : (y0 > H - 2 ? H - 2 : y0);
  xb = x0 < 0 ? 0 : (x0 > W - 2 ? W - 2 : x0);
  const Acc wy0 = yb == y0 ? Acc(1) - ly : (yb == y0 + 1 ? ly : Acc(0));
  const Acc wy1 = yb + 1 == y0 ? Acc(1) - ly : (yb + 1 == y0 + 1 ? ly : Acc(0));
  const Acc wx0 = xb == x0 ? Acc(1) - lx : (xb == x0 + 1 ? lx : Acc(0));
  const Acc wx1 = xb + 1 == x0 ? Acc(1) - lx : (xb + 1 == x0 + 1 ? lx : Acc(0));
  w[0] = wy0 * wx0 * mod;
  w[1] = wy0 * wx1 * mod;
  w[2] = wy1 * wx0 * mod;
  w[3] = wy1 * wx1 * mod;
}

// Four 16-byte loads (VEC channels each) of a 2 x 2 block whose corners lie 0, DX, DY and
// DY + DX elements from b0 (global memory: the image's pixel strides; DW_WINDOW: the window's).
// LDG: read-only global loads (__ldg), as the gather kernel reads the image.
template <long long DX, long long DY, bool LDG = false>
__device__ __forceinline__ void deft_dw_load(const T* b0, DeftCornerVec<VEC> (&x)[4]) {
  constexpr long long DQ[4] = {0, DX, DY, DY + DX};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4* src = reinterpret_cast<const uint4*>(b0 + DQ[q]);
#pragma unroll
    for (int u = 0; u < DeftCornerVec<VEC>::CHUNKS; ++u) x[q].u[u] = LDG ? __ldg(src + u) : src[u];
  }
}

// The vector path's sampling point of (ho, wo), tap t (deft_dw_block), and its four 16-byte
// loads (VEC channels each) from global memory, at fixed distances from one address (base:
// the image plus the thread's first channel).
__device__ __forceinline__ void deft_dw_corners(const T* __restrict__ base, const PointInput& in,
                                                int ho, int wo, int t, Acc (&w)[4],
                                                DeftCornerVec<VEC> (&x)[4]) {
  int yb, xb;
  deft_dw_block(in, ho, wo, t, w, yb, xb);
  deft_dw_load<C, (long long)W * C, true>(base + ((long long)yb * W + xb) * C, x);
}

// VEC channels of one sample: the four corners x weighted by w (f16: packed half2 arithmetic,
// the weights rounded to f16; else in Acc).
__device__ __forceinline__ void deft_dw_combine(const DeftCornerVec<VEC> (&x)[4], const Acc (&w)[4],
                                                Acc (&s)[VEC]) {
#if HALF2_COMBINE
  __half2 s2[VEC / 2 > 0 ? VEC / 2 : 1];  // (VEC = 1 never reaches this, but the array must exist)
#pragma unroll
  for (int e = 0; e < VEC / 2; ++e) s2[e] = __float2half2_rn(0.f);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const __half2 w2 = __float2half2_rn(w[q]);
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
    for (int e = 0; e < VEC; ++e) s[e] += w[q] * Acc(deft_widen(x[q].t[e]));
#endif
}

// The thread's VEC results of output pixel m (image n, pixel rem = ho WO + wo), channels
// c_base.. (nvec of them exist): bias, activation, then one 16-byte vector (OUT_VEC) or VEC
// elements.
__device__ __forceinline__ void deft_dw_store(T* __restrict__ out, const T* __restrict__ bias,
                                              const Acc (&acc)[VEC], long long m, long long n,
                                              int rem, int c_base, int nvec) {
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

// 16-byte vectors of 16-bit elements or f32: at most 64 registers (four 256-thread blocks an
// SM, the occupancy of the kernel before round 15); uncapped, the path's corner loads were
// hoisted into more (70 to 117 registers in the forms of call 2, perf notes round 15)
constexpr int DW_MIN_BLOCKS = VEC_PATH && VEC * sizeof(T) == 16 && 1024 / THREADS > 0 ? 1024 / THREADS : 1;
#if !DW_WINDOW
extern "C" __global__ void __launch_bounds__(THREADS, DW_MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ out) {
  deft_grid_begin();
  const int tid = threadIdx.x;
  // W_VEC: the block's weights as [tap][channel of the block] (zeros past C), before any
  // thread leaves
  __shared__ __align__(16) T wsm[W_VEC ? R * S : 1][W_VEC ? CH_PER_BLOCK : 1];
  if constexpr (W_VEC) {
    const int c0 = blockIdx.y * CH_PER_BLOCK;
    for (int i = tid; i < R * S * CH_PER_BLOCK; i += THREADS) {
      const int cc = i % CH_PER_BLOCK, tt = i / CH_PER_BLOCK;
      wsm[tt][cc] = c0 + cc < C ? weight[(long long)(c0 + cc) * (R * S) + tt] : deft_from<T>(0.f);
    }
    __syncthreads();
  }
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
    if constexpr (VEC_PATH) {
      DeftCornerVec<VEC> x[4];
      SamplePoint p;  // (its weights; the corners are read here)
      deft_dw_corners(image + c_base, pin[b], ho, wo, tap, p.w, x);
      Acc s[VEC];
      deft_dw_combine(x, p.w, s);
      DeftCornerVec<VEC> wq;  // W_VEC: the thread's VEC weights of the tap
      if constexpr (W_VEC) {
        const uint4* wsrc = reinterpret_cast<const uint4*>(&wsm[tap][(tid % TPC) * VEC]);
#pragma unroll
        for (int u = 0; u < DeftCornerVec<VEC>::CHUNKS; ++u) wq.u[u] = wsrc[u];
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const T wt = W_VEC ? wq.t[e] : weight[(long long)(c_base + e) * (R * S) + tap];
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

  deft_dw_store(out, bias, acc, m, n, rem, c_base, nvec);
}
#endif  // !DW_WINDOW

#if DW_WINDOW
// staging=window (plan_fwd_dw_window): a block owns a TILE_H x TILE_W tile of output pixels of
// one image and CH_PER_BLOCK channels. It copies the tile's input window (WIN_ROWS x WIN_COLS
// pixels from (ty0 SH - PH - WIN_HALO, tx0 SW - PW - WIN_HALO), the corners of its points at
// zero offset widened by the halo) into shared memory as [pixel][channel] with cp.async, cells
// outside the image zero (never read: a 2 x 2 block lies in the image), and the block's weights
// as [tap][channel]. Then each thread takes the tile's pixels in passes (TPC threads a pixel,
// VEC channels each) and reads a point's 2 x 2 block from the window where it lies inside,
// else from global memory: the same block and weights as the gather kernel, so the same sums.
static_assert(VEC_PATH, "staging=window: the 16-byte vector path");
// (Its tap loop is the gather kernel's with the window test added; one helper for both
// changed the SASS of the gather kernel's bf16, 5 x 5 and per-channel forms, so they stay apart.)
static_assert(SMEM_BYTES == (WIN_ROWS * WIN_COLS + R * S) * CH_PER_BLOCK * (int)sizeof(T),
              "plan.smem_bytes: the window and the weights");
constexpr int WIN_CELLS = WIN_ROWS * WIN_COLS;
constexpr int PIX_PASS = THREADS / TPC;  // pixels a pass
extern "C" __global__ void __launch_bounds__(THREADS, DW_MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ out) {
  deft_grid_begin();
  extern __shared__ __align__(16) unsigned char dw_smem[];
  T* win = reinterpret_cast<T*>(dw_smem);        // [WIN_CELLS][CH_PER_BLOCK]
  T* wsm = win + WIN_CELLS * CH_PER_BLOCK;       // [R * S][CH_PER_BLOCK]
  const int tid = threadIdx.x;
  const int tile = int(blockIdx.x % (TILES_Y * TILES_X));
  const long long n = blockIdx.x / (TILES_Y * TILES_X);
  const int ty0 = tile / TILES_X * TILE_H, tx0 = tile % TILES_X * TILE_W;
  const int iy0 = ty0 * SH - PH - WIN_HALO, ix0 = tx0 * SW - PW - WIN_HALO;
  const int c0 = blockIdx.y * CH_PER_BLOCK;
  const T* image = input + n * ((long long)C * H * W);
  for (int i = tid; i < WIN_CELLS * TPC; i += THREADS) {
    const int cell = i / TPC, v = i % TPC;
    const int y = iy0 + cell / WIN_COLS, x = ix0 + cell % WIN_COLS;
    const bool ok = y >= 0 && y < H && x >= 0 && x < W && c0 + v * VEC < C;
    const T* src = ok ? image + ((long long)y * W + x) * C + c0 + v * VEC : image;
#pragma unroll
    for (int u = 0; u < DeftCornerVec<VEC>::CHUNKS; ++u)
      deft_cp_async<16>(win + cell * CH_PER_BLOCK + v * VEC + u * (16 / (int)sizeof(T)),
                        src + u * (16 / (int)sizeof(T)), ok);
  }
  deft_cp_commit();
  for (int i = tid; i < R * S * CH_PER_BLOCK; i += THREADS) {
    const int cc = i % CH_PER_BLOCK, tt = i / CH_PER_BLOCK;
    wsm[i] = c0 + cc < C ? weight[(long long)(c0 + cc) * (R * S) + tt] : deft_from<T>(0.f);
  }
  deft_cp_wait<0>();
  __syncthreads();
  const int lane_c = (tid % TPC) * VEC;
  const int c_base = c0 + lane_c;
  if (c_base >= C) return;
  const int og = c_base / CPOG;
  for (int pp = tid / TPC; pp < TILE_H * TILE_W; pp += PIX_PASS) {
    const int ho = ty0 + pp / TILE_W, wo = tx0 + pp % TILE_W;
    if (ho >= HO || wo >= WO) continue;
    const int rem = ho * WO + wo;
    const long long m = n * (HO * WO) + rem;
    Acc acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = Acc(0);
    constexpr int TAP_BATCH = R * S < 9 ? R * S : 9;
#pragma unroll 1
    for (int t0 = 0; t0 < R * S; t0 += TAP_BATCH) {
      PointInput pin[TAP_BATCH];
#pragma unroll
      for (int b = 0; b < TAP_BATCH; ++b)
        if (t0 + b < R * S) pin[b] = deft_point_input(offset, mask, n, ho, wo, t0 + b, og);
#pragma unroll
      for (int b = 0; b < TAP_BATCH; ++b) {
        const int tap = t0 + b;
        if (tap >= R * S) break;
        Acc w[4];
        int yb, xb;
        deft_dw_block(pin[b], ho, wo, tap, w, yb, xb);
        const int wy = yb - iy0, wx = xb - ix0;
        DeftCornerVec<VEC> x[4];
        if (wy >= 0 && wy <= WIN_ROWS - 2 && wx >= 0 && wx <= WIN_COLS - 2)
          deft_dw_load<CH_PER_BLOCK, (long long)WIN_COLS * CH_PER_BLOCK>(
              win + (wy * WIN_COLS + wx) * CH_PER_BLOCK + lane_c, x);
        else
          deft_dw_load<C, (long long)W * C>(image + ((long long)yb * W + xb) * C + c_base, x);
        Acc sv[VEC];
        deft_dw_combine(x, w, sv);
        DeftCornerVec<VEC> wq;  // the thread's VEC weights of the tap
        const uint4* wsrc = reinterpret_cast<const uint4*>(wsm + tap * CH_PER_BLOCK + lane_c);
#pragma unroll
        for (int u = 0; u < DeftCornerVec<VEC>::CHUNKS; ++u) wq.u[u] = wsrc[u];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += Acc(deft_widen(wq.t[e])) * sv[e];
      }
    }
    deft_dw_store(out, bias, acc, m, n, rem, c_base, VEC);
  }
}
#endif  // DW_WINDOW
