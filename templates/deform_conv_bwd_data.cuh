// deform_conv2d backward_data: grad input, grad offset and grad mask in one pass, with no
// columns buffer. A block owns BP output pixels, one tap and one offset group. It walks the
// offset group's channels BC at a time; for each step it forms the column gradient
//   colgrad[c][p] = sum_k weight[k][c][tap] * grad_out[k][p]      (k over c's conv group)
// as a BC x BP tile in shared memory (register micro-tiles, CUDA-core FMA), then consumes it
// right away: every (pixel, channel) scatters colgrad * mask * bilinear weight into the four
// corners of grad input, and accumulates colgrad * sample (grad mask) and
// colgrad * mask * d sample / d position (grad offset) in registers. After the last step the
// block owns the complete sums over the offset group's channels and writes grad offset and
// grad mask directly: no atomics, the same result every run.
//
// grad input is the only scatter. GIN_MODE 0: float/double atomics into grad_input itself
// (zeroed by the launcher). 1: float atomics into a float workspace, converted by
// deft_bwd_finish (f16/bf16). 2 (deterministic): 64-bit fixed-point integer atomics into a
// workspace (integer addition is associative, so the order of the atomics does not change a
// bit), converted by deft_bwd_finish; the scale comes from deft_bwd_bound, an upper bound of
// any element's sum of |contributions|. 3 and 4 (the gather forms of the resident, wgmma and
// depthwise kernels, not this one's): bwd_common.cuh.
//
// With USE_TC the column-gradient tile is a tensor-core product instead: weight and grad_out
// slices staged in shared memory as the tensor-core input type (f16, bf16, or f32 read as
// tf32), each warp owning FPW 16x16 fragments of the BC x BP tile, accumulated in f32.
//
// Constants from codegen: BP, BC, BK, TM, TN (FMA) or WK, FPW, TC_PAD (USE_TC), THREADS,
// TPP (= THREADS / BP), GIN_MODE, EV (the epilogue's channels a thread: 1, or 4 with vec=4).

// Shared memory: the slice of weight (transposed: [BK][BC]) and of grad_out ([BK][BP]), the
// column-gradient tile [BC][BP + 1], and the final cross-thread reduction [3][THREADS].
static_assert(EV == 1 || (X_NHWC && BC % (EV * TPP) == 0),
              "epilogue channel vectors: a channels-last input, whole vectors a step");
#if USE_TC
constexpr int CS_LD = BP + 4;  // wmma stores need a multiple of 4 floats
#else
constexpr int CS_LD = BP + 1;
#endif

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS) {
  deft_grid_begin();
#if USE_TC
  __shared__ __align__(128) Stage Ws[BK][BC + TC_PAD];
  __shared__ __align__(128) Stage Gs[BK][BP + TC_PAD];
#else
  // (16-byte aligned rows with vec=4, so the micro-tile's runs can be read as vectors)
  __shared__ __align__(EV > 1 ? 16 : alignof(Acc)) Acc Ws[BK][BC];
  __shared__ __align__(EV > 1 ? 16 : alignof(Acc)) Acc Gs[BK][BP];
#endif
  __shared__ __align__(128) Acc Cs[BC * CS_LD];
  __shared__ Acc Red[3][THREADS];

  const int tid = threadIdx.x;
  const long long m0 = (long long)blockIdx.x * BP;
  const int t = blockIdx.y;
  const int og = blockIdx.z;

#if !USE_TC
  // GEMM thread layout: TM channels x TN pixels per thread.
  const int gx = tid % (BP / TN), gy = tid / (BP / TN);
#endif
  // Epilogue layout: one pixel, every TPP-th channel of the step. nhwc: the TPP threads of a
  // pixel are adjacent lanes (neighbouring channels); nchw: pixels run along the lanes.
  const int ep = X_NHWC ? tid / TPP : tid % BP;
  const int esub = X_NHWC ? tid % TPP : tid / BP;
  const long long m = m0 + ep;
  const BwdPixel px = deft_bwd_pixel(m);
  const bool pix_ok = px.ok;
  const long long n = px.n;
  const int ho = px.ho, wo = px.wo;
  const BwdPoint pt = deft_bwd_pixel_point(offset, mask, px, t, og);
  const T* image = input + n * (C * H * W);

  const double scale = GIN_MODE == 2 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = GIN_MODE == 2 && header[3] != 0ull;
  Acc pg[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask of the pixel's point

#pragma unroll 1
  for (int c0 = og * CPOG; c0 < (og + 1) * CPOG; c0 += BC) {
    const int g = c0 / CG;
    const int cl0 = c0 - g * CG;
#if USE_TC
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, WK, float> cf[FPW];
#pragma unroll
    for (int f = 0; f < FPW; ++f) nvcuda::wmma::fill_fragment(cf[f], 0.0f);
#else
    Acc acc[TM][TN];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TN; ++b) acc[a][b] = Acc(0);
#endif

#pragma unroll 1
    for (int o0 = 0; o0 < KG; o0 += BK) {
      for (int e = tid; e < BK * BC; e += THREADS) {
        const int kk = e / BC, cc = e % BC;
        const long long k = (long long)g * KG + o0 + kk;
        Acc v = Acc(0);
        if (o0 + kk < KG)
          v = Acc(deft_widen(weight[W_KRSC ? (k * TAPS + t) * CG + cl0 + cc
                                           : (k * CG + cl0 + cc) * TAPS + t]));
        Ws[kk][cc] = deft_stage(v);
      }
      for (int e = tid; e < BK * BP; e += THREADS) {
        const int kk = NHWC ? e % BK : e / BP, pp = NHWC ? e / BK : e % BP;
        const long long mm = m0 + pp;
        Acc v = Acc(0);
        if (o0 + kk < KG && mm < M_TOTAL) {
          const long long nn = mm / (HO * WO);
          v = Acc(deft_widen(gout[deft_gout_index(nn, (long long)g * KG + o0 + kk,
                                                  mm - nn * (HO * WO))]));
        }
        Gs[kk][pp] = deft_stage(v);
      }
      __syncthreads();
#if USE_TC
#pragma unroll
      for (int kk = 0; kk < BK; kk += WK) {
#pragma unroll
        for (int f = 0; f < FPW; ++f) {
          const int fi = (tid / 32) * FPW + f, fm = fi / (BP / 16), fn = fi % (BP / 16);
          nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, WK, TcIn, nvcuda::wmma::col_major> a;
          nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, WK, TcIn, nvcuda::wmma::row_major> b;
          nvcuda::wmma::load_matrix_sync(a, &Ws[kk][fm * 16], BC + TC_PAD);
          nvcuda::wmma::load_matrix_sync(b, &Gs[kk][fn * 16], BP + TC_PAD);
          TC_CONVERT(a);
          TC_CONVERT(b);
          nvcuda::wmma::mma_sync(cf[f], a, b, cf[f]);
        }
      }
#else
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        Acc a[TM], b[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = Ws[kk][gy * TM + i];
#pragma unroll
        for (int j = 0; j < TN; ++j) b[j] = Gs[kk][gx * TN + j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
      }
#endif
      __syncthreads();
    }
#if USE_TC
#pragma unroll
    for (int f = 0; f < FPW; ++f) {
      const int fi = (tid / 32) * FPW + f, fm = fi / (BP / 16), fn = fi % (BP / 16);
      nvcuda::wmma::store_matrix_sync(&Cs[(fm * 16) * CS_LD + fn * 16], cf[f], CS_LD,
                                      nvcuda::wmma::mem_row_major);
    }
#else
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(gy * TM + i) * CS_LD + gx * TN + j] = acc[i][j];
#endif
    __syncthreads();

    if (pix_ok) {
      if constexpr (EV > 1) {
      // vec=4: EV neighbouring channels a thread (channels-last input), one vector load and,
      // into an f32 workspace, one vector reduction per corner
#pragma unroll 2
      for (int cc = esub * EV; cc < BC; cc += TPP * EV) {
        const int c = c0 + cc;
        Acc cg[EV];
#pragma unroll
        for (int e = 0; e < EV; ++e) cg[e] = Cs[(cc + e) * CS_LD + ep];
        deft_bwd_channels<EV>(image + c, gin ? gin + n * (C * H * W) + c : nullptr, pt, cg,
                              scale, nonfinite, pg);
      }
      } else {
#pragma unroll 2
      for (int cc = esub; cc < BC; cc += TPP) {
        const int c = c0 + cc;
        const Acc cg = Cs[cc * CS_LD + ep];
        const long long cbase = X_NHWC ? (long long)c : (long long)c * H * W;
        deft_bwd_channel(image + cbase, gin ? gin + n * (C * H * W) + cbase : nullptr, pt, cg,
                         scale, nonfinite, pg);
      }
      }
    }
    __syncthreads();  // Cs is rewritten by the next step
  }
  if (nonfinite) atomicOr(&header[3], 1ull);

  // Sum the TPP partial results of each pixel in a fixed order.
  deft_reduce_point_grads(&Red[0][0], pg, esub == 0, TPP,
                          [&](int u) { return X_NHWC ? ep * TPP + u : u * BP + ep; }, goffset,
                          gmask, m, px, t, og);
}

