// deform_conv2d backward_weight: grad weight as an implicit GEMM that re-samples the input
// instead of reading a columns buffer,
//   grad_weight[k][c][tap] = sum over (n, pixel) of grad_out[n][k][pixel] * mask * sample(c),
// and grad bias as a plain reduction. A block owns a BO x BC tile of (output channel, input
// channel) for one tap and one conv group, and a range of pixels (blockIdx.z: one of SPLITS
// ranges). For each slice of BPW pixels it computes the slice's sampling points once (BC lies
// inside one offset group), gathers the sampled BPW x BC tile and the BPW x BO grad_out tile
// into shared memory, and accumulates register micro-tiles (TMO x TNC); KSPLIT groups of
// threads take interleaved pixels of the slice and are summed at the end in a fixed order.
// Each block writes its partial sums to workspace; deft_bwd_weight_reduce adds the SPLITS
// partials in a fixed order. No atomics: the result is the same every run.
//
// With USE_TC the tile product runs on tensor cores: the two tiles are staged as the
// tensor-core input type (f16, bf16, or f32 read as tf32), each warp owns FPW 16x16 fragments
// of the BO x BC tile and accumulates them in f32 across all slices (no KSPLIT groups).
//
// Constants from codegen: BO, BC, BPW, TMO, TNC, KSPLIT (FMA) or WK, FPW, TC_PAD (USE_TC),
// THREADS, SPLITS, SPLIT_PIX.

#if !USE_TC
constexpr int BASE = (BO / TMO) * (BC / TNC);   // threads per micro-tile grid
#endif
#if USE_TC
typedef Stage TileT;  // what the shared-memory tiles hold
constexpr int A_LD = BC + TC_PAD, G_LD = BO + TC_PAD, R_LD = BC + 4;
#else
typedef Acc TileT;
constexpr int A_LD = BC + 1, G_LD = BO + 1;
#endif

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  deft_grid_begin();
  extern __shared__ __align__(128) unsigned char smem[];
#if USE_TC
  Stage* As = reinterpret_cast<Stage*>(smem);        // [BPW][A_LD]
  Stage* Gs = As + BPW * A_LD;                        // [BPW][G_LD]
#else
  Acc* As = reinterpret_cast<Acc*>(smem);            // [BPW][A_LD]
  Acc* Gs = As + BPW * A_LD;                          // [BPW][G_LD]
#endif
  Acc* Pw = reinterpret_cast<Acc*>(Gs + BPW * G_LD);  // [BPW][4] corner weights * mask
  long long* Po = reinterpret_cast<long long*>(Pw + BPW * 4);  // [BPW][4] corner element index
  Acc* Red = reinterpret_cast<Acc*>(smem);  // reuses the tiles after the main loop

  const int tid = threadIdx.x;
  const WeightTile wt = deft_weight_tile<BO, BC>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;

#if USE_TC
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, WK, float> cf[FPW];
#pragma unroll
  for (int f = 0; f < FPW; ++f) nvcuda::wmma::fill_fragment(cf[f], 0.0f);
#else
  const int base = tid % BASE, ks = tid / BASE;
  const int ox = base % (BC / TNC), oy = base / (BC / TNC);
  Acc acc[TMO][TNC];
#pragma unroll
  for (int i = 0; i < TMO; ++i)
#pragma unroll
    for (int j = 0; j < TNC; ++j) acc[i][j] = Acc(0);
#endif

#pragma unroll 1
  for (long long p0 = p_begin; p0 < p_end; p0 += BPW) {
    for (int e = tid; e < BPW; e += THREADS) {
      const long long mm = p0 + e;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Pw[e * 4 + q] = Acc(0);
        Po[e * 4 + q] = 0;
      }
      if (mm < p_end) {
        const long long n = mm / (HO * WO);
        const int rem = int(mm - n * (HO * WO));
        const int ho = rem / WO, wo = rem % WO;
        const SamplePoint sp = deft_sample_point(offset, mask, n, ho, wo, t, og);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          Pw[e * 4 + q] = sp.w[q];
          Po[e * 4 + q] = n * (C * H * W) + (long long)sp.off[q];
        }
      }
    }
    __syncthreads();
    for (int e = tid; e < BPW * BC; e += THREADS) {
      const int cc = X_NHWC ? e % BC : e / BPW, pp = X_NHWC ? e / BC : e % BPW;
      const long long cbase = X_NHWC ? c0 + cc : (c0 + cc) * (H * W);
      Acc v = Acc(0);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const Acc w = Pw[pp * 4 + q];
        if (w != Acc(0)) v += w * Acc(deft_widen(input[cbase + Po[pp * 4 + q]]));
      }
      As[pp * A_LD + cc] = deft_cast<TileT>(v);
    }
    for (int e = tid; e < BPW * BO; e += THREADS) {
      const int oo = NHWC ? e % BO : e / BPW, pp = NHWC ? e / BO : e % BPW;
      const long long mm = p0 + pp;
      Acc v = Acc(0);
      if (mm < p_end && o0 + oo < KG) {
        const long long n = mm / (HO * WO);
        v = Acc(deft_widen(gout[deft_gout_index(n, (long long)g * KG + o0 + oo,
                                                mm - n * (HO * WO))]));
      }
      Gs[pp * G_LD + oo] = deft_cast<TileT>(v);
    }
    __syncthreads();
#if USE_TC
#pragma unroll
    for (int kk = 0; kk < BPW; kk += WK) {
#pragma unroll
      for (int f = 0; f < FPW; ++f) {
        const int fi = (tid / 32) * FPW + f, fm = fi / (BC / 16), fn = fi % (BC / 16);
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, WK, TcIn, nvcuda::wmma::col_major> a;
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, WK, TcIn, nvcuda::wmma::row_major> b;
        nvcuda::wmma::load_matrix_sync(a, Gs + kk * G_LD + fm * 16, G_LD);
        nvcuda::wmma::load_matrix_sync(b, As + kk * A_LD + fn * 16, A_LD);
        TC_CONVERT(a);
        TC_CONVERT(b);
        nvcuda::wmma::mma_sync(cf[f], a, b, cf[f]);
      }
    }
#else
#pragma unroll 4
    for (int pp = ks; pp < BPW; pp += KSPLIT) {
      Acc a[TMO], b[TNC];
#pragma unroll
      for (int i = 0; i < TMO; ++i) a[i] = Gs[pp * G_LD + oy * TMO + i];
#pragma unroll
      for (int j = 0; j < TNC; ++j) b[j] = As[pp * A_LD + ox * TNC + j];
#pragma unroll
      for (int i = 0; i < TMO; ++i)
#pragma unroll
        for (int j = 0; j < TNC; ++j) acc[i][j] += a[i] * b[j];
    }
#endif
    __syncthreads();
  }

#if USE_TC
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int fi = (tid / 32) * FPW + f, fm = fi / (BC / 16), fn = fi % (BC / 16);
    nvcuda::wmma::store_matrix_sync(Red + (fm * 16) * R_LD + fn * 16, cf[f], R_LD,
                                    nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < BO * BC; e += THREADS) {
    const int oo = e / BC, cc = e % BC;
    const int o = o0 + oo, cl = cl0 + cc;
    if (o < KG)
      partial[(long long)blockIdx.z * W_ELEMS + (((long long)g * KG + o) * CG + cl) * TAPS + t] =
          Red[oo * R_LD + cc];
  }
#else

  // Sum the KSPLIT partial tiles in a fixed order.
#pragma unroll
  for (int i = 0; i < TMO; ++i)
#pragma unroll
    for (int j = 0; j < TNC; ++j) Red[tid * (TMO * TNC) + i * TNC + j] = acc[i][j];
  __syncthreads();
  if (ks == 0) {
#pragma unroll
    for (int i = 0; i < TMO; ++i) {
#pragma unroll
      for (int j = 0; j < TNC; ++j) {
        Acc s = Acc(0);
        for (int u = 0; u < KSPLIT; ++u) s += Red[(u * BASE + base) * (TMO * TNC) + i * TNC + j];
        const int o = o0 + oy * TMO + i, cl = cl0 + ox * TNC + j;
        if (o < KG)
          partial[(long long)blockIdx.z * W_ELEMS +
                  (((long long)g * KG + o) * CG + cl) * TAPS + t] = s;
      }
    }
  }
#endif
}

