// deform_conv2d forward as an implicit GEMM per weight group:
//   out[m, kout] = sum over (tap, cl) of A[m, (tap, cl)] * B[(tap, cl), kout]
// with m an output pixel (n, ho, wo), A the bilinear sample of input channel cl at tap `tap`
// (never materialised: sampled into shared memory one BK-slice at a time) and B the weight.
// Each block computes a BM x BN tile of one group; the reduction runs tap-major so that a
// thread's sampling point (pixel, tap, offset group) stays in registers across the channel
// slices of a tap. The next slice is gathered into registers while the current one is
// multiplied. USE_TC selects the tile product: tensor cores (WMMA, f16/bf16/tf32) or FMA.
//
// Constants from codegen: BM, BN, BK, THREADS, A_ELEMS, B_ELEMS (per thread), SMEM_BYTES, and
// TM, TN (FMA micro-tile) or WM, WN, FM, FN, WK (warp grid, fragments per warp, fragment k).

constexpr long long M_TOTAL = (long long)N * HO * WO;
constexpr int K_SLICES_PER_TAP = (CG + BK - 1) / BK;
constexpr int NUM_SLICES = R * S * K_SLICES_PER_TAP;
// A tile: row-major As[m][kk] for the tensor cores (a thread's consecutive channels are one
// vector store), k-major As[kk][m] for the FMA path (conflict-free row reads).
#if USE_TC
constexpr int A_STRIDE = BK + A_PAD;
#define A_AT(k, m) ((m) * A_STRIDE + (k))
#else
constexpr int A_STRIDE = BM + A_PAD;
#define A_AT(k, m) ((k) * A_STRIDE + (m))
#endif
// B tile: column-major Bs[n][kk] when the weight is loaded in 16-byte vectors along the
// reduction (VEC_B: krsc weight, tensor cores), else row-major Bs[kk][n].
#if VEC_B
constexpr int B_STRIDE = BK + B_PAD;
#define B_AT(k, n) ((n) * B_STRIDE + (k))
constexpr int B_VEC = 16 / sizeof(T);
constexpr int B_LOADS = BN * BK / (THREADS * B_VEC);
#else
constexpr int B_STRIDE = BN + B_PAD;
#define B_AT(k, n) ((k) * B_STRIDE + (n))
#endif

// Thread -> A elements: each thread gathers KV = A_ELEMS consecutive reduction channels of
// one output pixel, so it needs one sampling point per tap. nchw: pixels fastest across
// threads (coalesced along wo); nhwc: channel groups fastest (coalesced along c).
__device__ __forceinline__ void deft_a_coord(int tid, int& m_local, int& k_base) {
  if (X_NHWC) {
    k_base = (tid % (BK / A_ELEMS)) * A_ELEMS;
    m_local = tid / (BK / A_ELEMS);
  } else {
    m_local = tid % BM;
    k_base = (tid / BM) * A_ELEMS;
  }
}

#if VEC_A
// The raw corner vectors and weights of one gathered slice: loaded before the tile product,
// combined into the A tile after it, so the loads' latency hides behind the tensor cores.
constexpr int A_CHUNKS = A_ELEMS * sizeof(T) / 16;
struct ASlice {
  uint4 raw[4][A_CHUNKS];
  Acc w[4];
};
#else
struct ASlice {
  __align__(16) Stage v[A_ELEMS];
};
#endif
#if VEC_B
struct BSlice {
  uint4 v[B_LOADS];
};
// Thread -> B vectors: B_VEC consecutive reduction channels of one output channel.
__device__ __forceinline__ void deft_b_coord(int tid, int e, int& k_base, int& n_local) {
  const int idx = tid + e * THREADS;
  k_base = (idx % (BK / B_VEC)) * B_VEC;
  n_local = idx / (BK / B_VEC);
}
#else
struct BSlice {
  Stage v[B_ELEMS];
};
// Thread -> scalar B elements: along cl fastest for a krsc weight (contiguous there), along
// kout fastest for kcrs.
__device__ __forceinline__ void deft_b_coord(int tid, int e, int& k_local, int& n_local) {
  const int idx = tid + e * THREADS;
  if (W_KRSC) {
    k_local = idx % BK;
    n_local = idx / BK;
  } else {
    n_local = idx % BN;
    k_local = idx / BN;
  }
}
#endif

// The thread's current sampling point, keyed by (tap, offset group), and the offsets and
// mask of the next tap, read one tap ahead so their latency is hidden.
struct PointCache {
  SamplePoint p;
  int key;
  PointInput next;
  int next_key;
};

__device__ __forceinline__ void deft_update_point(PointCache& cache, const T* __restrict__ offset,
                                                  const T* __restrict__ mask, long long n, int ho,
                                                  int wo, int tap, int og) {
  const int key = tap * OG + og;
  if (cache.key == key) return;
  const PointInput in =
      cache.next_key == key ? cache.next : deft_point_input(offset, mask, n, ho, wo, tap, og);
  if (tap + 1 < R * S) {
    cache.next = deft_point_input(offset, mask, n, ho, wo, tap + 1, og);
    cache.next_key = key + OG;
  }
  cache.p = deft_point_from(in, ho, wo, tap);
  cache.key = key;
}

__device__ __forceinline__ void deft_load_a(const T* __restrict__ input,
                                            const T* __restrict__ offset,
                                            const T* __restrict__ mask, int g, long long m0,
                                            int slice, int tid, PointCache& cache, ASlice& a) {
  const int tap = slice / K_SLICES_PER_TAP;
  const int c0 = (slice % K_SLICES_PER_TAP) * BK;
  int m_local, k_base;
  deft_a_coord(tid, m_local, k_base);
  const long long m = m0 + m_local;
  const bool m_ok = m < M_TOTAL;
  const long long n = m_ok ? m / (HO * WO) : 0;
  const int rem = int(m - n * (HO * WO));
  const int ho = rem / WO, wo = rem % WO;
  const T* image = X_NHWC ? input + n * ((long long)H * W * C) : input + n * ((long long)C * H * W);
#if VEC_A
  // nhwc, A_ELEMS channels of one offset group: each corner is A_CHUNKS 16-byte loads.
  const int cl = c0 + k_base;
  if (m_ok && cl < CG) {
    const int c = g * CG + cl;
    deft_update_point(cache, offset, mask, n, ho, wo, tap, c / CPOG);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4* src = reinterpret_cast<const uint4*>(image + c + cache.p.off[q]);
#pragma unroll
      for (int u = 0; u < A_CHUNKS; ++u) a.raw[q][u] = __ldg(src + u);
      a.w[q] = cache.p.w[q];
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int u = 0; u < A_CHUNKS; ++u) a.raw[q][u] = make_uint4(0, 0, 0, 0);
      a.w[q] = Acc(0);
    }
  }
#else
#pragma unroll
  for (int e = 0; e < A_ELEMS; ++e) {
    const int cl = c0 + k_base + e;
    Acc v = Acc(0);
    if (m_ok && cl < CG) {
      const int c = g * CG + cl;
      deft_update_point(cache, offset, mask, n, ho, wo, tap, c / CPOG);
      v = deft_sample(X_NHWC ? image + c : image + c * ((long long)H * W), cache.p);
    }
    a.v[e] = Stage(v);
  }
#endif
}

// B[(tap, cl), kout] = weight[g*KG + kout][cl][tap] (nchw) or weight[g*KG + kout][tap][cl].
__device__ __forceinline__ void deft_load_b(const T* __restrict__ weight, int g, int n0,
                                            int slice, int tid, BSlice& b) {
  const int tap = slice / K_SLICES_PER_TAP;
  const int c0 = (slice % K_SLICES_PER_TAP) * BK;
#if VEC_B
#pragma unroll
  for (int e = 0; e < B_LOADS; ++e) {
    int k_base, n_local;
    deft_b_coord(tid, e, k_base, n_local);
    const int cl = c0 + k_base, kout = n0 + n_local;
    if (cl < CG && kout < KG) {
      const long long ko = (long long)g * KG + kout;
      b.v[e] = __ldg(reinterpret_cast<const uint4*>(weight + (ko * (R * S) + tap) * CG + cl));
    } else {
      b.v[e] = make_uint4(0, 0, 0, 0);
    }
  }
#else
#pragma unroll
  for (int e = 0; e < B_ELEMS; ++e) {
    int k_local, n_local;
    deft_b_coord(tid, e, k_local, n_local);
    const int cl = c0 + k_local, kout = n0 + n_local;
    Acc v = Acc(0);
    if (cl < CG && kout < KG) {
      const long long ko = (long long)g * KG + kout;
      const long long widx = W_KRSC ? (ko * (R * S) + tap) * CG + cl : (ko * CG + cl) * (R * S) + tap;
      v = Acc(deft_widen(weight[widx]));
    }
    b.v[e] = Stage(v);
  }
#endif
}

__device__ __forceinline__ void deft_store_slices(Stage* As, Stage* Bs, int tid, const ASlice& a,
                                                  const BSlice& b) {
  int m_local, k_base;
  deft_a_coord(tid, m_local, k_base);
#if VEC_A && HALF2_COMBINE
  // f16: the bilinear combination in packed half2 arithmetic (two channels per instruction);
  // the A tile is f16 anyway.
  union Vec2 {
    uint4 u[A_CHUNKS];
    __half2 h[A_ELEMS / 2];
  };
  Vec2 sum;
#pragma unroll
  for (int e = 0; e < A_ELEMS / 2; ++e) sum.h[e] = __float2half2_rn(0.f);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    Vec2 x;
#pragma unroll
    for (int u = 0; u < A_CHUNKS; ++u) x.u[u] = a.raw[q][u];
    const __half2 w2 = __float2half2_rn(a.w[q]);
#pragma unroll
    for (int e = 0; e < A_ELEMS / 2; ++e) sum.h[e] = __hfma2(w2, x.h[e], sum.h[e]);
  }
  struct {
    __align__(16) Stage v[A_ELEMS];
  } av;
#pragma unroll
  for (int e = 0; e < A_ELEMS / 2; ++e) {
    av.v[2 * e] = __low2half(sum.h[e]);
    av.v[2 * e + 1] = __high2half(sum.h[e]);
  }
#elif VEC_A
  // Bilinear combination of the four corner vectors.
  union Vec {
    uint4 u[A_CHUNKS];
    T t[A_ELEMS];
  };
  Acc acc[A_ELEMS];
#pragma unroll
  for (int e = 0; e < A_ELEMS; ++e) acc[e] = Acc(0);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    Vec x;
#pragma unroll
    for (int u = 0; u < A_CHUNKS; ++u) x.u[u] = a.raw[q][u];
#pragma unroll
    for (int e = 0; e < A_ELEMS; ++e) acc[e] += a.w[q] * Acc(deft_widen(x.t[e]));
  }
  struct {
    __align__(16) Stage v[A_ELEMS];
  } av;
#pragma unroll
  for (int e = 0; e < A_ELEMS; ++e) av.v[e] = Stage(acc[e]);
#else
  const ASlice& av = a;
#endif
#if USE_TC
  if constexpr ((A_ELEMS * sizeof(Stage)) % 16 == 0) {  // one or more 16-byte stores
    const uint4* src = reinterpret_cast<const uint4*>(av.v);
    uint4* dst = reinterpret_cast<uint4*>(As + A_AT(k_base, m_local));
#pragma unroll
    for (int u = 0; u < int(A_ELEMS * sizeof(Stage) / 16); ++u) dst[u] = src[u];
  } else
#endif
  {
#pragma unroll
    for (int e = 0; e < A_ELEMS; ++e) As[A_AT(k_base + e, m_local)] = av.v[e];
  }
#if VEC_B
#pragma unroll
  for (int e = 0; e < B_LOADS; ++e) {
    int k_base, n_local;
    deft_b_coord(tid, e, k_base, n_local);
    *reinterpret_cast<uint4*>(Bs + B_AT(k_base, n_local)) = b.v[e];
  }
#else
#pragma unroll
  for (int e = 0; e < B_ELEMS; ++e) {
    int k_local, n_local;
    deft_b_coord(tid, e, k_local, n_local);
    Bs[B_AT(k_local, n_local)] = b.v[e];
  }
#endif
}

// Writes one output element with bias and activation.
__device__ __forceinline__ void deft_store_out(T* __restrict__ out, const T* __restrict__ bias,
                                               int g, long long m, int kout, Acc v) {
  if (m >= M_TOTAL || kout >= KG) return;
  const long long ko = (long long)g * KG + kout;
  if (HAS_BIAS) v += Acc(deft_widen(bias[ko]));
  v = deft_activate(v);
  const long long n = m / (HO * WO);
  const long long pix = m - n * (HO * WO);
  const long long idx = NHWC ? m * K + ko : (n * K + ko) * (HO * WO) + pix;
  out[idx] = deft_cast<T>(v);
}

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ weight,
                const T* __restrict__ bias, T* __restrict__ out) {
  deft_grid_begin();
  const int tid = threadIdx.x;
  const long long m0 = (long long)blockIdx.x * BM;
  const int n0 = blockIdx.y * BN;
  const int g = blockIdx.z;

  // Two stages of the A and B slices; the tensor-core epilogue reuses the space as scratch.
  constexpr int A_TILE = USE_TC ? BM * A_STRIDE : BK * A_STRIDE;
  extern __shared__ __align__(128) unsigned char smem[];  // SMEM_BYTES, set at launch
  Stage (*As)[A_TILE] = reinterpret_cast<Stage (*)[A_TILE]>(smem);
  constexpr int B_TILE = VEC_B ? BN * B_STRIDE : BK * B_STRIDE;
  Stage (*Bs)[B_TILE] = reinterpret_cast<Stage (*)[B_TILE]>(smem + 2 * A_TILE * sizeof(Stage));

  PointCache cache;
  cache.key = -1;
  cache.next_key = -1;

#if USE_TC
  using namespace nvcuda;
  const int warp = tid / 32, lane = tid % 32;
  const int wm = warp % WM, wn = warp / WM;
  wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
#else
  // FMA micro-tile. Vector form (MT_VEC): the thread's rows are TM / 4 runs of 4, at
  // 4 * TY apart (TY = BM / TM threads along m), its columns TN / 4 runs of 4 at 4 * TX
  // apart; each k step reads them as 16-byte vectors (TM / 4 + TN / 4 reads for TM * TN
  // FMAs), and a warp's 4 x 8 threads read 64 + 128 contiguous bytes: no bank conflict.
  // Scalar form (small tiles): rows ty + i * TY, columns tx + j * TX.
  constexpr int TY = BM / TM, TX = BN / TN;
  constexpr bool MT_VEC = TM % 4 == 0 && TN % 4 == 0 && TY % 4 == 0 && TX % 8 == 0 &&
                          A_STRIDE % 4 == 0 && B_STRIDE % 4 == 0;
  int ty, tx;
  if constexpr (MT_VEC) {
    const int lane = tid % 32, warp = tid / 32;
    ty = (warp % (TY / 4)) * 4 + lane % 4;
    tx = (warp / (TY / 4)) * 8 + lane / 4;
  } else {
    ty = NHWC ? tid / TX : tid % TY;
    tx = NHWC ? tid % TX : tid / TY;
  }
  auto row_of = [&](int i) { return MT_VEC ? (i / 4) * (4 * TY) + ty * 4 + i % 4 : ty + i * TY; };
  auto col_of = [&](int j) { return MT_VEC ? (j / 4) * (4 * TX) + tx * 4 + j % 4 : tx + j * TX; };
  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);
#endif

  ASlice a;
  BSlice b;
  deft_load_a(input, offset, mask, g, m0, 0, tid, cache, a);
  deft_load_b(weight, g, n0, 0, tid, b);
  deft_store_slices(As[0], Bs[0], tid, a, b);
  __syncthreads();

  for (int slice = 0; slice < NUM_SLICES; ++slice) {
    const int cur = slice & 1;
    if (slice + 1 < NUM_SLICES) {  // gather the next slice while this one is multiplied
      deft_load_a(input, offset, mask, g, m0, slice + 1, tid, cache, a);
      deft_load_b(weight, g, n0, slice + 1, tid, b);
    }
    const Stage* as = As[cur];
    const Stage* bs = Bs[cur];
#if USE_TC
#pragma unroll
    for (int kk = 0; kk < BK; kk += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, TcIn, wmma::row_major> fa[FM];
#if VEC_B
      wmma::fragment<wmma::matrix_b, 16, 16, WK, TcIn, wmma::col_major> fb[FN];
#else
      wmma::fragment<wmma::matrix_b, 16, 16, WK, TcIn, wmma::row_major> fb[FN];
#endif
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        wmma::load_matrix_sync(fa[i], as + A_AT(kk, (wm * FM + i) * 16), A_STRIDE);
        TC_CONVERT(fa[i]);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::load_matrix_sync(fb[j], bs + B_AT(kk, (wn * FN + j) * 16), B_STRIDE);
        TC_CONVERT(fb[j]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
#else
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc av[TM], bv[TN];
      if constexpr (MT_VEC) {
        struct alignas(4 * sizeof(Stage)) Four {
          Stage x[4];
        };
#pragma unroll
        for (int i = 0; i < TM; i += 4) {
          const Four f = *reinterpret_cast<const Four*>(as + A_AT(kk, row_of(i)));
#pragma unroll
          for (int e = 0; e < 4; ++e) av[i + e] = Acc(f.x[e]);
        }
#pragma unroll
        for (int j = 0; j < TN; j += 4) {
          const Four f = *reinterpret_cast<const Four*>(bs + B_AT(kk, col_of(j)));
#pragma unroll
          for (int e = 0; e < 4; ++e) bv[j + e] = Acc(f.x[e]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = Acc(as[A_AT(kk, row_of(i))]);
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = Acc(bs[B_AT(kk, col_of(j))]);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
    }
#endif
    if (slice + 1 < NUM_SLICES) deft_store_slices(As[cur ^ 1], Bs[cur ^ 1], tid, a, b);
    __syncthreads();
  }

#if USE_TC
  // Each warp stages one 16x16 fragment at a time through its own scratch (reusing As),
  // then writes it out with pixels (nchw) or channels (nhwc) fastest across lanes.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 16 * 16;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16,
                              NHWC ? wmma::mem_row_major : wmma::mem_col_major);
      __syncwarp();
      const long long mb = m0 + (wm * FM + i) * 16;
      const int nb = n0 + (wn * FN + j) * 16;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int idx = lane + e * 32;
        const int fast = idx % 16, slow = idx / 16;
        const int ml = NHWC ? slow : fast, nl = NHWC ? fast : slow;
        deft_store_out(out, bias, g, mb + ml, nb + nl, Acc(scratch[idx]));
      }
      __syncwarp();
    }
#else
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j)
      deft_store_out(out, bias, g, m0 + row_of(i), n0 + col_of(j), acc[i][j]);
#endif
}
