// deform_conv2d backward_data on tensor cores with grad_out resident in shared memory.
// Same contract and grid as deform_conv_bwd_data.cuh (one block per BP output pixels, tap,
// offset group; grad offset / grad mask reduced in the block without atomics; grad input
// scattered by GIN_MODE), but a different schedule for the column-gradient GEMM
//   colgrad[c][p] = sum_k weight[k][tap][c] * grad_out[p][k]      (k over c's conv group):
//  - the block's grad_out tile (BP pixels x all KG output channels of its group) is copied
//    into shared memory once, with cp.async, instead of once per channel step;
//  - the weight slices (BK output channels x BC input channels) stream through an NSTAGE-deep
//    cp.async ring, one barrier per slice, so the next slices load while this one multiplies;
//  - the epilogue reads EV consecutive channels per thread (vector corner loads, and one
//    red.global.add.v4.f32 per corner for a float accumulator).
// Needs the channels-last input and krsc weight (nhwc layers, or the transpose pre-pass) and
// an offset group inside one conv group; the plan checks both.
//
// Constants from codegen: BP, BC, BK, WK, FPW, TC_PAD, THREADS, TPP, GIN_MODE, NSTAGE, GV
// (grad_out copy vector, elements), EV (epilogue channels per vector), SMEM_BYTES.

constexpr int KSL = (KG + BK - 1) / BK;  // reduction slices per channel step
constexpr int KGP = KSL * BK;            // KG padded to whole slices with zero rows
constexpr int NCS = CPOG / BC;           // channel steps of the offset group
constexpr int WV = 16 / sizeof(Stage);   // weight copy vector, elements
// grad_out tile: Gs[p][k] for nhwc grad_out (k contiguous there), Gs[k][p] for nchw.
constexpr int GS_LD = NHWC ? KGP + TC_PAD : BP + TC_PAD;
constexpr int GS_ROWS = NHWC ? BP : KGP;
constexpr int WS_LD = BC + TC_PAD;  // weight slice Ws[k][c]
constexpr int CS_LD = BC + 16;      // column-gradient tile Cs[p][c]: 2 pixels per 32 banks
constexpr int align128(int b) { return (b + 127) / 128 * 128; }
constexpr int WS_OFF = align128(GS_ROWS * GS_LD * (int)sizeof(Stage));
constexpr int CS_OFF = WS_OFF + align128(NSTAGE * BK * WS_LD * (int)sizeof(Stage));
constexpr int RED_OFF = CS_OFF + align128(BP * CS_LD * (int)sizeof(float));
static_assert(RED_OFF + 3 * THREADS * (int)sizeof(Acc) <= SMEM_BYTES, "shared memory plan");
static_assert(BC % WV == 0 && CG % WV == 0, "16-byte weight rows");
static_assert(EV == 1 || BC % (EV * TPP) == 0, "epilogue channel vectors");

template <bool PIXEL_MAJOR>
struct DeftGsLayout {
  typedef nvcuda::wmma::row_major type;  // Gs[k][p]
};
template <>
struct DeftGsLayout<true> {
  typedef nvcuda::wmma::col_major type;  // Gs[p][k]
};

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS) {
  deft_grid_begin();
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];  // SMEM_BYTES, set at launch
  Stage* Gs = reinterpret_cast<Stage*>(smem);
  Stage* Ws = reinterpret_cast<Stage*>(smem + WS_OFF);
  float* Cs = reinterpret_cast<float*>(smem + CS_OFF);
  Acc* Red = reinterpret_cast<Acc*>(smem + RED_OFF);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const long long m0 = (long long)blockIdx.x * BP;
  const int t = blockIdx.y;
  const int og = blockIdx.z;
  const int g = og * CPOG / CG;  // the conv group holding the whole offset group
  const int cl_og = og * CPOG - g * CG;

  // grad_out tile, copied once: the first cp.async group, with the first weight slice.
  if (NHWC) {
    constexpr int PER_ROW = KGP / GV;
    for (int e = tid; e < BP * PER_ROW; e += THREADS) {
      const int p = e / PER_ROW, k = (e % PER_ROW) * GV;
      const long long m = m0 + p;
      const bool ok = m < M_TOTAL && k < KG;
      deft_cp_async<GV * (int)sizeof(T)>(Gs + p * GS_LD + k, ok ? gout + m * K + g * KG + k : gout, ok);
    }
  } else {
    constexpr int PER_ROW = BP / GV;
    for (int e = tid; e < KGP * PER_ROW; e += THREADS) {
      const int k = e / PER_ROW, p = (e % PER_ROW) * GV;
      const long long m = m0 + p;
      const bool ok = m < M_TOTAL && k < KG;
      const long long n = ok ? m / (HO * WO) : 0;
      const T* src = ok ? gout + (n * K + g * KG + k) * (HO * WO) + (m - n * (HO * WO)) : gout;
      deft_cp_async<GV * (int)sizeof(T)>(Gs + k * GS_LD + p, src, ok);
    }
  }
  // Weight slice s = (channel step s / KSL, output channels (s % KSL) * BK ...).
  auto load_w = [&](int s) {
    const int cl0 = cl_og + (s / KSL) * BC, o0 = (s % KSL) * BK;
    Stage* dst = Ws + (s % NSTAGE) * (BK * WS_LD);
    for (int e = tid; e < BK * (BC / WV); e += THREADS) {
      const int kk = e / (BC / WV), c = (e % (BC / WV)) * WV;
      const bool ok = o0 + kk < KG;
      const T* src = ok ? weight + ((long long)(g * KG + o0 + kk) * TAPS + t) * CG + cl0 + c : weight;
      deft_cp_async<16>(dst + kk * WS_LD + c, src, ok);
    }
  };
  constexpr int TOTAL = NCS * KSL;
#pragma unroll
  for (int s = 0; s < NSTAGE - 1; ++s) {
    if (s < TOTAL) load_w(s);
    deft_cp_commit<>();
  }

  // Epilogue layout: one pixel, EV-channel vectors every TPP * EV channels. nhwc: the TPP
  // threads of a pixel are adjacent lanes.
  const int ep = tid / TPP;
  const int esub = tid % TPP;
  const long long m = m0 + ep;
  const BwdPixel px = deft_bwd_pixel(m);
  const bool pix_ok = px.ok;
  const long long n = px.n;
  const int ho = px.ho, wo = px.wo;
  const BwdPoint pt = deft_bwd_pixel_point(offset, mask, px, t, og);
  const T* image = input + n * (C * H * W);
#if GIN_MODE == 3
  // gather form: gin is the point values' buffer (bwd_common.cuh), the pixel's point's row
  float* vrow = gin && pix_ok && pt.valid
                    ? reinterpret_cast<float*>(gin) + ((m * OG + og) * TAPS + t) * (long long)CPOG
                    : nullptr;
  GinT* gimage = nullptr;  // no scatter
#else
  GinT* gimage = gin ? gin + n * (C * H * W) : nullptr;
#endif
  const double scale = GIN_MODE == 2 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = GIN_MODE == 2 && header[3] != 0ull;
  Acc pg[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask of the pixel's point

  typedef typename DeftGsLayout<NHWC>::type GsLayout;
  wmma::fragment<wmma::accumulator, 16, 16, WK, float> cf[FPW];
#pragma unroll
  for (int f = 0; f < FPW; ++f) wmma::fill_fragment(cf[f], 0.0f);

#pragma unroll 1
  for (int s = 0; s < TOTAL; ++s) {
    deft_cp_wait<NSTAGE - 2>();
    __syncthreads();  // slice s (and the grad_out tile) visible; slice s - 1 fully read
    if (s + NSTAGE - 1 < TOTAL) load_w(s + NSTAGE - 1);
    deft_cp_commit<>();
    const Stage* ws = Ws + (s % NSTAGE) * (BK * WS_LD);
    const int k0 = (s % KSL) * BK;
#pragma unroll
    for (int kk = 0; kk < BK; kk += WK) {
      wmma::fragment<wmma::matrix_a, 16, 16, WK, TcIn, wmma::col_major> a;
      int a_row = -1;
#pragma unroll
      for (int f = 0; f < FPW; ++f) {
        const int fi = warp * FPW + f, fm = fi / (BP / 16), fn = fi % (BP / 16);
        if (fm != a_row) {  // warp-uniform; the fragments of a warp mostly share their row
          wmma::load_matrix_sync(a, ws + kk * WS_LD + fm * 16, WS_LD);
          TC_CONVERT(a);
          a_row = fm;
        }
        wmma::fragment<wmma::matrix_b, 16, 16, WK, TcIn, GsLayout> b;
        const Stage* gp = NHWC ? Gs + (fn * 16) * GS_LD + k0 + kk : Gs + (k0 + kk) * GS_LD + fn * 16;
        wmma::load_matrix_sync(b, gp, GS_LD);
        TC_CONVERT(b);
        wmma::mma_sync(cf[f], a, b, cf[f]);
      }
    }
    if (s % KSL != KSL - 1) continue;

    // Channel step done: the tile goes through shared memory to the epilogue layout. The
    // barrier at the top of the next slice keeps Cs until every thread has read it.
#pragma unroll
    for (int f = 0; f < FPW; ++f) {
      const int fi = warp * FPW + f, fm = fi / (BP / 16), fn = fi % (BP / 16);
      wmma::store_matrix_sync(Cs + (fn * 16) * CS_LD + fm * 16, cf[f], CS_LD, wmma::mem_col_major);
      wmma::fill_fragment(cf[f], 0.0f);
    }
    __syncthreads();
    if (pix_ok) {
      const int c0 = og * CPOG + (s / KSL) * BC;
#pragma unroll 2
      for (int cc = esub * EV; cc < BC; cc += TPP * EV) {
        Acc cg[EV];
        if constexpr (EV == 4) {
          const float4 v4 = *reinterpret_cast<const float4*>(Cs + ep * CS_LD + cc);
          cg[0] = Acc(v4.x), cg[1] = Acc(v4.y), cg[2] = Acc(v4.z), cg[3] = Acc(v4.w);
        } else {
#pragma unroll
          for (int e = 0; e < EV; ++e) cg[e] = Acc(Cs[ep * CS_LD + cc + e]);
        }
        deft_bwd_channels<EV>(image + c0 + cc, gimage ? gimage + c0 + cc : nullptr, pt, cg,
                              scale, nonfinite, pg);
#if GIN_MODE == 3
        if (vrow) {  // what GIN_MODE 2 scatters, before the corner weights: cg * mask
          float* vp = vrow + (c0 - og * CPOG) + cc;
          if constexpr (EV == 4) {
            *reinterpret_cast<float4*>(vp) =
                make_float4(cg[0] * pt.mod, cg[1] * pt.mod, cg[2] * pt.mod, cg[3] * pt.mod);
          } else {
#pragma unroll
            for (int e = 0; e < EV; ++e) vp[e] = cg[e] * pt.mod;
          }
        }
#endif
      }
    }
  }
  if (nonfinite) atomicOr(&header[3], 1ull);

  // Sum the TPP partial results of each pixel in a fixed order.
  deft_reduce_point_grads(Red, pg, esub == 0, TPP, [&](int u) { return ep * TPP + u; }, goffset,
                          gmask, m, px, t, og);
}
