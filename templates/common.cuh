// Device helpers shared by every deft kernel: element conversion, activations, and the
// bilinear sampling point of torchvision's deform_conv2d. The code generator defines, before
// this text: T (storage type), Acc (accumulator), Pos (sampling-position arithmetic) and the
// layer's geometry as constexpr values (see compiler/codegen.cpp).

// Programmatic dependent launch (sm_90 and later): the runtime launches deft's kernels with
// programmatic stream serialisation, so a kernel's blocks may start while the kernel before it
// in the stream is still running. Every kernel therefore calls this first, before it touches
// global memory: griddepcontrol.wait returns once the preceding grid has completed and its
// writes are visible (at once for a grid launched without the attribute), and
// launch_dependents then lets the next kernel's blocks be scheduled as this grid's finish, so
// that its launch overlaps this grid's tail instead of following it. Before sm_90: nothing.
__device__ __forceinline__ void deft_grid_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float deft_widen(float v) { return v; }
__device__ __forceinline__ float deft_widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float deft_widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double deft_widen(double v) { return v; }

template <typename To>
__device__ __forceinline__ To deft_from(float v);
template <>
__device__ __forceinline__ float deft_from<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half deft_from<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 deft_from<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ double deft_from<double>(float v) { return v; }

template <typename To>
__device__ __forceinline__ To deft_cast(Acc v) {
  return deft_from<To>(static_cast<float>(v));
}
template <>
__device__ __forceinline__ double deft_cast<double>(Acc v) { return static_cast<double>(v); }

__device__ __forceinline__ Acc deft_activate(Acc x) {
  if (ACT == 1) return x > Acc(0) ? x : Acc(0);
  if (ACT == 2) return Acc(0.5) * x * (Acc(1) + erf(x * Acc(0.70710678118654752440)));
  return x;
}

// One sampling point: the element offsets of its four corners relative to the start of a
// channel plane (nchw) or of the image (nhwc, channel added by the caller), and their
// weights with the modulation mask folded in. Corners outside the image get weight 0 and
// offset 0, so every address formed from them stays inside the tensor.
struct SamplePoint {
  Off off[4];
  Acc w[4];
};

// Input pixel (y, x) -> element offset from the plane/image start.
__device__ __forceinline__ Off deft_pixel_offset(long long y, long long x) {
  return Off(X_NHWC ? (y * W + x) * (long long)C : y * W + x);
}

// The raw inputs of one sampling point: (dy, dx) and the modulation of output pixel
// (n, ho, wo), tap t, offset group og, read from the offset and mask tensors.
struct PointInput {
  Pos dy, dx;
  Acc mod;
};

__device__ __forceinline__ PointInput deft_point_input(const T* __restrict__ offset,
                                                       const T* __restrict__ mask, long long n,
                                                       int ho, int wo, int t, int og) {
  long long dy_idx, dx_idx, m_idx;
  if (NHWC) {
    const long long pix = (n * HO + ho) * WO + wo;
    dy_idx = pix * (2 * OG * R * S) + og * 2 * R * S + 2 * t;
    dx_idx = dy_idx + 1;
    m_idx = pix * (OG * R * S) + og * R * S + t;
  } else {
    dy_idx = ((n * (2 * OG * R * S) + og * 2 * R * S + 2 * t) * HO + ho) * WO + wo;
    dx_idx = dy_idx + (long long)HO * WO;
    m_idx = ((n * (OG * R * S) + og * R * S + t) * HO + ho) * WO + wo;
  }
  PointInput in;
  in.dy = Pos(deft_widen(offset[dy_idx]));
  in.dx = Pos(deft_widen(offset[dx_idx]));
  in.mod = HAS_MASK ? Acc(deft_widen(mask[m_idx])) : Acc(1);
  return in;
}

// Corners and weights of the sampling point of output pixel (ho, wo), tap t.
__device__ __forceinline__ SamplePoint deft_point_from(const PointInput& in, int ho, int wo,
                                                       int t) {
  const int i = t / S, j = t % S;
  const Pos y = Pos(ho * SH - PH + i * DH) + in.dy;
  const Pos x = Pos(wo * SW - PW + j * DW) + in.dx;
  const Acc mod = in.mod;
  SamplePoint p;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    p.off[q] = 0;
    p.w[q] = Acc(0);
  }
  // Written so that NaN positions fail the test: NaN samples read zero.
  if (y > Pos(-1) && x > Pos(-1) && y < Pos(H) && x < Pos(W)) {
    const Pos yf = floor(y), xf = floor(x);
    const int y0 = int(yf), x0 = int(xf);
    const Acc ly = Acc(y - yf), lx = Acc(x - xf);
    const Acc hy = Acc(1) - ly, hx = Acc(1) - lx;
    const bool top = y0 >= 0, bottom = y0 + 1 <= H - 1;
    const bool left = x0 >= 0, right = x0 + 1 <= W - 1;
    if (top && left) { p.off[0] = deft_pixel_offset(y0, x0); p.w[0] = hy * hx * mod; }
    if (top && right) { p.off[1] = deft_pixel_offset(y0, x0 + 1); p.w[1] = hy * lx * mod; }
    if (bottom && left) { p.off[2] = deft_pixel_offset(y0 + 1, x0); p.w[2] = ly * hx * mod; }
    if (bottom && right) { p.off[3] = deft_pixel_offset(y0 + 1, x0 + 1); p.w[3] = ly * lx * mod; }
  }
  return p;
}

// Sampling point of output pixel (n, ho, wo), tap t, offset group og.
__device__ __forceinline__ SamplePoint deft_sample_point(const T* __restrict__ offset,
                                                         const T* __restrict__ mask, long long n,
                                                         int ho, int wo, int t, int og) {
  return deft_point_from(deft_point_input(offset, mask, n, ho, wo, t, og), ho, wo, t);
}

// The sampled value of one channel, given the start of its plane (nchw) or the image plus
// the channel (nhwc).
__device__ __forceinline__ Acc deft_sample(const T* __restrict__ base, const SamplePoint& p) {
  Acc v = Acc(0);
#pragma unroll
  for (int q = 0; q < 4; ++q) v += p.w[q] * Acc(deft_widen(base[p.off[q]]));
  return v;
}

// Asynchronous global -> shared copy (cp.async, sm_80+) of BYTES = 4, 8 or 16 bytes; ok == false
// fills zeros (src unread). Templates, so that kernels for older GPUs never emit them.
template <int BYTES>
__device__ __forceinline__ void deft_cp_async(void* dst, const void* src, bool ok) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  const int n = ok ? BYTES : 0;
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n)
                 : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(s), "l"(src),
                 "n"(BYTES), "r"(n)
                 : "memory");
}
template <int = 0>
__device__ __forceinline__ void deft_cp_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void deft_cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

// One 64 x 64 tile of a [rows][cols] matrix at src -> [cols][rows] at dst (tile origin r0, c0),
// for a block of 256 threads, each moving 16 elements through shared memory, conv(S) -> D on
// the way. With even rows and cols and both pointers aligned to two elements (uniform: the
// caller decides) a thread reads and writes pairs of neighbouring elements, so that a warp's
// access is 64 elements wide on both sides (128 bytes of f16) instead of 32.
template <typename S, typename D, typename Conv>
__device__ __forceinline__ void deft_transpose_tile(const S* __restrict__ src, D* __restrict__ dst,
                                                    long long rows, long long cols, long long r0,
                                                    long long c0, bool pairs, Conv conv) {
  __shared__ D tile[64][65];  // odd row length: the column reads of the store phase spread over banks
  struct __align__(2 * sizeof(S)) SPair { S a, b; };
  struct __align__(2 * sizeof(D)) DPair { D a, b; };
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  for (int i = ty; i < 64; i += 8) {
    const long long r = r0 + i, c = c0 + 2 * tx;
    if (r >= rows) break;
    if (pairs) {
      if (c < cols) {
        const SPair v = *reinterpret_cast<const SPair*>(src + r * cols + c);
        tile[i][2 * tx] = conv(v.a);
        tile[i][2 * tx + 1] = conv(v.b);
      }
    } else {
      if (c < cols) tile[i][2 * tx] = conv(src[r * cols + c]);
      if (c + 1 < cols) tile[i][2 * tx + 1] = conv(src[r * cols + c + 1]);
    }
  }
  __syncthreads();
  for (int j = ty; j < 64; j += 8) {
    const long long c = c0 + j, r = r0 + 2 * tx;
    if (c >= cols) break;
    if (pairs) {
      if (r < rows) {
        DPair v;
        v.a = tile[2 * tx][j];
        v.b = tile[2 * tx + 1][j];
        *reinterpret_cast<DPair*>(dst + c * rows + r) = v;
      }
    } else {
      if (r < rows) dst[c * rows + r] = tile[2 * tx][j];
      if (r + 1 < rows) dst[c * rows + r + 1] = tile[2 * tx + 1][j];
    }
  }
}

// deft_transpose_tile with 16-byte accesses on both sides, for 2- and 4-byte elements: a thread
// moves whole vectors of V = 16 / sizeof(E) elements (a warp: 512 bytes a side), the tile in
// shared memory as 32-bit words with an odd row length (33 or 65 words) so that the column
// reads of the store phase conflict at most 2-way. Needs rows and cols multiples of V and both
// pointers on 16 bytes (deft_transpose_vec16); a block of 256 threads, tile origin r0, c0.
template <typename E>
__device__ __forceinline__ void deft_transpose_tile16(const E* __restrict__ src, E* __restrict__ dst,
                                                      long long rows, long long cols, long long r0,
                                                      long long c0) {
  static_assert(sizeof(E) == 2 || sizeof(E) == 4, "2- or 4-byte elements");
  constexpr int V = 16 / int(sizeof(E));           // elements per vector
  constexpr int VPR = 64 / V;                      // vectors per tile row
  constexpr int LDW = 64 * int(sizeof(E)) / 4 + 1;  // words per tile row
  constexpr int LDE = LDW * 4 / int(sizeof(E));     // elements per tile row
  __shared__ unsigned tile[64 * LDW];
  for (int i = threadIdx.x; i < 64 * VPR; i += 256) {  // tile row r: columns c0 + V v ..
    const int r = i / VPR, v = i % VPR;
    const long long gr = r0 + r, gc = c0 + v * V;
    if (gr < rows && gc < cols) {
      const uint4 x = *reinterpret_cast<const uint4*>(src + gr * cols + gc);
      unsigned* t = tile + r * LDW + v * 4;
      t[0] = x.x, t[1] = x.y, t[2] = x.z, t[3] = x.w;
    }
  }
  __syncthreads();
  const E* te = reinterpret_cast<const E*>(tile);
  for (int i = threadIdx.x; i < 64 * VPR; i += 256) {  // output row c: input rows r0 + V v ..
    const int c = i / VPR, v = i % VPR;
    const long long gc = c0 + c, gr = r0 + v * V;
    if (gc < cols && gr < rows) {
      uint4 x;
      E* xe = reinterpret_cast<E*>(&x);
#pragma unroll
      for (int e = 0; e < V; ++e) xe[e] = te[(v * V + e) * LDE + c];
      *reinterpret_cast<uint4*>(dst + gc * rows + gr) = x;
    }
  }
}

// Whether deft_transpose_tile16 may move a [rows][cols] matrix (uniform: the caller decides).
template <typename E>
__device__ __forceinline__ bool deft_transpose_vec16(const E* src, const E* dst, long long rows,
                                                     long long cols) {
  constexpr int V = 16 / int(sizeof(E));
  return (sizeof(E) == 2 || sizeof(E) == 4) && rows % V == 0 && cols % V == 0 &&
         (unsigned long long)src % 16 == 0 && (unsigned long long)dst % 16 == 0;
}

// Whether deft_transpose_tile may move pairs: even extents, both pointers on two elements.
template <typename S, typename D>
__device__ __forceinline__ bool deft_transpose_pairs(const S* src, const D* dst, long long rows,
                                                     long long cols) {
  return ((rows | cols) & 1) == 0 && (unsigned long long)src % (2 * sizeof(S)) == 0 &&
         (unsigned long long)dst % (2 * sizeof(D)) == 0;
}

// An f32 value rounded to the nearest tf32: what the Hopper kernels' tf32 operands hold (the
// warpgroup MMA itself would truncate the low bits).
__device__ __forceinline__ float deft_round_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
}

// 4 f32 channels of one bilinear sample: the four corners' 16-byte vectors c[q] weighted by w
// (x, y, z, w = corners 0 .. 3), in one fixed order of operations.
__device__ __forceinline__ float4 deft_combine4f(const uint4 (&c)[4], const float4& w) {
  const float4* x = reinterpret_cast<const float4*>(c);
  return make_float4(fmaf(w.w, x[3].x, fmaf(w.z, x[2].x, fmaf(w.y, x[1].x, w.x * x[0].x))),
                     fmaf(w.w, x[3].y, fmaf(w.z, x[2].y, fmaf(w.y, x[1].y, w.x * x[0].y))),
                     fmaf(w.w, x[3].z, fmaf(w.z, x[2].z, fmaf(w.y, x[1].z, w.x * x[0].z))),
                     fmaf(w.w, x[3].w, fmaf(w.z, x[2].w, fmaf(w.y, x[1].w, w.x * x[0].w))));
}

// Eight channels of one bilinear sample (16-bit elements) from its four corners' 16-byte
// vectors and weights w0..w3: f16 in packed half2 arithmetic (HALF2_COMBINE), else in f32,
// rounded to T. A template so that layers of other element sizes never instantiate it.
template <int Unused = 0>
__device__ __forceinline__ uint4 deft_combine8(const uint4 (&c)[4], float w0, float w1, float w2,
                                               float w3) {
  static_assert(Unused != 0 || sizeof(T) == 2, "8 channels of 16-bit elements");
  uint4 out;
#if HALF2_COMBINE
  const __half2* x0 = reinterpret_cast<const __half2*>(&c[0]);
  const __half2* x1 = reinterpret_cast<const __half2*>(&c[1]);
  const __half2* x2 = reinterpret_cast<const __half2*>(&c[2]);
  const __half2* x3 = reinterpret_cast<const __half2*>(&c[3]);
  const __half2 h0 = __float2half2_rn(w0), h1 = __float2half2_rn(w1);
  const __half2 h2 = __float2half2_rn(w2), h3 = __float2half2_rn(w3);
  __half2* o = reinterpret_cast<__half2*>(&out);
#pragma unroll
  for (int e = 0; e < 4; ++e)
    o[e] = __hfma2(h3, x3[e], __hfma2(h2, x2[e], __hfma2(h1, x1[e], __hmul2(h0, x0[e]))));
#else
  const float ws[4] = {w0, w1, w2, w3};
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const T* x = reinterpret_cast<const T*>(&c[q]);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = fmaf(ws[q], deft_widen(x[e]), acc[e]);
  }
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = deft_from<T>(acc[e]);
#endif
  return out;
}

// The VEC_ channels at each corner of a sampling point, as whole 16-byte loads (VEC_ elements
// fill one or more): deft_load_corners(base, p, x) puts corner q, read at base + p.off[q], in
// x[q] (.u the 16-byte words, .t the elements).
template <int VEC_>
struct DeftCornerVec {
  static constexpr int CHUNKS = VEC_ * int(sizeof(T)) / 16 > 0 ? VEC_ * int(sizeof(T)) / 16 : 1;
  union {
    uint4 u[CHUNKS];
    T t[VEC_];
  };
};
template <int VEC_>
__device__ __forceinline__ void deft_load_corners(const T* __restrict__ base, const SamplePoint& p,
                                                  DeftCornerVec<VEC_> (&x)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4* src = reinterpret_cast<const uint4*>(base + p.off[q]);
#pragma unroll
    for (int u = 0; u < DeftCornerVec<VEC_>::CHUNKS; ++u) x[q].u[u] = __ldg(src + u);
  }
}

// Depthwise kernels, one channel at a time: the sample of channel c at output pixel (n, ho, wo),
// tap `tap`, given the sampling point p of offset group og; p and og move to c's offset group
// first when c lies in another one. image: the input image's start.
__device__ __forceinline__ Acc deft_sample_channel(const T* __restrict__ offset,
                                                   const T* __restrict__ mask,
                                                   const T* __restrict__ image, long long n,
                                                   int ho, int wo, int tap, int c, int& og,
                                                   SamplePoint& p) {
  if (c / CPOG != og) {  // channels of another offset group: new sampling point
    og = c / CPOG;
    p = deft_sample_point(offset, mask, n, ho, wo, tap, og);
  }
  return deft_sample(X_NHWC ? image + c : image + c * ((long long)H * W), p);
}
