// deform_conv2d backward_data for depthwise layers (groups == c == k): the column gradient of
// channel c is just weight[c][tap] * grad_out[c][pixel], so there is no GEMM. A block owns
// PIXB output pixels and one offset group; CL threads share a pixel and split its channels
// (nhwc: CL = 32 lanes of a warp on neighbouring channels; nchw: PIXB = 32 pixels along the
// lanes, CL warps). Per tap, each thread scatters its channels' contributions into grad input
// (as in deform_conv_bwd_data.cuh: float atomics, or 64-bit fixed point when deterministic
// with an f64 accumulator) and accumulates grad offset / grad mask partials, which the CL
// threads of a pixel then sum in a fixed order: with shuffles where they are one warp (nhwc),
// else through shared memory. GIN_MODE 3 (deterministic) and 4 (gin=gather) scatter nothing:
// deft_bwd_gather (bwd_common.cuh, GATHER_DIRECT) computes grad input per input pixel from
// grad_out, the weight and the mask. GOUT_T: grad_out is read from a channels-last copy (an
// nchw layer whose lanes run along the channels of the transposed input).
//
// With EV = 4 (nhwc reads into an f32 workspace) a lane takes 4 neighbouring channels: one
// vector load per corner and one red.global.add.v4.f32 per corner on sm_90 instead of 4
// atomics. The grad offset / grad mask sums then run over the lane's channels in a different
// order than with EV = 1 (each order fixed).
//
// DW_WINDOW (staging=window, fast mode, EV = 4, CL = 32): a block owns a TILE_H x TILE_W tile
// of output pixels and walks the offset group's channels 128 at a time (a slice: 32 lanes x 4).
// Per slice it sums the contributions whose corner falls inside the tile's input window
// (WIN_ROWS x WIN_COLS pixels: the corners of its points at zero offset, widened by WIN_HALO
// each side) in shared memory, f32 [pixel][4][32 lanes] so that a warp's 32 lanes add to 32
// consecutive words, and then flushes the window with one red.global.add.v4.f32 per (pixel,
// 4 channels) that received anything. Corners outside the window go to global memory directly.
// Small offsets (most corners inside) trade ~36 global reductions per input element for ~3
// (the windows of neighbouring tiles overlap); large ones pay the flush on top. The slice's
// weights sit in shared memory; grad_out is read once per slice instead of once per tap; the
// grad offset / grad mask partials of all taps stay in registers until the end (the sums run
// in the same order as the gather kernel's EV = 4 form).
//
// DW_WSMEM (lanes on channels, without the window): the block stages its offset group's weights
// in dynamic shared memory as [tap][channel] in the accumulator type, so that a lane reads its EV
// weights of a tap as one vector: from global memory (weight[c][tap], a lane's channels taps
// elements apart) each of them touched 32 sectors a warp (perf notes round B28).
//
// Constants from codegen: PIXB, CL, THREADS (= PIXB * CL), GIN_MODE, EV, DW_WINDOW, DW_WSMEM; with the
// window TILE_H, TILE_W, TILES_Y, TILES_X, WIN_HALO, WIN_ROWS, WIN_COLS, SMEM_BYTES.

#if GIN_MODE == 5 || GIN_MODE == 6
// gin=local (GIN_MODE 5, fast mode; 6, deterministic: both kernels in GIN_MODE 2's 64-bit fixed
// point, integer sums whose order does not matter): a point is near when it is inside and its floor corner lies within
// LG_R pixels of its tap's zero-offset position, both ways (false for NaN). deft_bwd_lgather
// sums the near points' grad input per 8 x 8 input tile (shared-memory lists, no reductions) and
// stores it; the data kernel, launched after it, reduces the far points' onto it. Both kernels
// evaluate the point with deft_bwd_pos and this test, so they split the points the same way.
// Constants from codegen: LG_TH, LG_TW, LG_TILES_X, LG_R, LG_RH x LG_RW (the output pixels whose
// near points can land in a tile's cells), LG_SLICES (128-channel slices a group), LG_SPB (of
// them a block: the binning is done once for them), LG_SMEM.
__device__ __forceinline__ bool deft_lg_near(const BwdPos& ps, int ho, int wo, int t) {
  if (!(ps.y > Pos(-1) && ps.x > Pos(-1) && ps.y < Pos(H) && ps.x < Pos(W))) return false;
  const Pos dy = floor(ps.y) - Pos(ho * SH - PH + (t / S) * DH);
  const Pos dx = floor(ps.x) - Pos(wo * SW - PW + (t % S) * DW);
  return dy >= Pos(-LG_R) && dy <= Pos(LG_R) && dx >= Pos(-LG_R) && dx <= Pos(LG_R);
}
// A far point's contributions for channels c .. c + EV_ - 1 into the channels-last workspace of
// its image (ws), as GIN_MODE 1 (5) or GIN_MODE 2 (6) would scatter them.
template <int EV_>
__device__ __forceinline__ void deft_lg_scatter(GinT* ws, const BwdCell& cell, const BwdPoint& pt,
                                                int c, const Acc* cg, double scale,
                                                bool& nonfinite) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (!((pt.valid >> q) & 1)) continue;
    GinT* dst = ws + ((long long)(cell.y0 + (q >> 1)) * W + (cell.x0 + (q & 1))) * C + c;
#if GIN_MODE == 6
#pragma unroll
    for (int e = 0; e < EV_; ++e) {
      const double sc = (double)(cg[e] * pt.mod * pt.w[q]) * scale;
      if (!(fabs(sc) <= DEFT_FIXED_LIMIT)) nonfinite = true;
      else atomicAdd(dst + e, (unsigned long long)__double2ll_rn(sc));
    }
#else
    (void)scale, (void)nonfinite;
    float v[4];
#pragma unroll
    for (int e = 0; e < EV_; ++e) v[e] = float(cg[e] * pt.mod * pt.w[q]);
    if constexpr (EV_ == 4) deft_red4(dst, v);
    else
#pragma unroll
      for (int e = 0; e < EV_; ++e) atomicAdd(dst + e, v[e]);
#endif
  }
}
#endif

#if DW_WINDOW
static_assert(CL == 32 && EV == 4 && GIN_MODE == 1 && X_NHWC && PIXB == TILE_H * TILE_W,
              "staging=window: 32 lanes a pixel, 4 channels a lane, an f32 workspace");
constexpr int SLICE = CL * EV;  // channels a pass
constexpr int WIN_PIX = WIN_ROWS * WIN_COLS;

extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS) {
  deft_grid_begin();
  (void)header;
  extern __shared__ __align__(128) unsigned char smem[];  // SMEM_BYTES, set at launch
  float* win = reinterpret_cast<float*>(smem);  // [WIN_PIX][EV][CL]
  float* wsl = win + WIN_PIX * SLICE;           // the slice's weights [TAPS][SLICE]
  const int tid = threadIdx.x;
  const int p = tid / CL, lane = tid % CL;
  const int og = blockIdx.y;
  const long long n = blockIdx.x / (TILES_Y * TILES_X);
  const int tile = int(blockIdx.x % (TILES_Y * TILES_X));
  const int ty = tile / TILES_X, tx = tile % TILES_X;
  const int ho = ty * TILE_H + p / TILE_W, wo = tx * TILE_W + p % TILE_W;
  const bool pix_ok = ho < HO && wo < WO;
  const long long q_img = (long long)ho * WO + wo;
  const long long m = n * (HO * WO) + q_img;
  const int wy0 = ty * TILE_H * SH - PH - WIN_HALO, wx0 = tx * TILE_W * SW - PW - WIN_HALO;
  const T* image = input + n * (C * H * W);
  GinT* gimage = gin ? gin + n * (C * H * W) : nullptr;
  const int cend = (og + 1) * CPOG;

  for (int i = tid; i < WIN_PIX * SLICE; i += THREADS) win[i] = 0.f;
  Acc g[TAPS][3];
#pragma unroll
  for (int t = 0; t < TAPS; ++t) g[t][0] = g[t][1] = g[t][2] = Acc(0);

#pragma unroll 1
  for (int c0 = og * CPOG; c0 < cend; c0 += SLICE) {
    // the slice's weights, read along the taps (contiguous), stored [tap][channel]
    for (int i = tid; i < TAPS * SLICE; i += THREADS) {
      const int cc = i / TAPS, t = i % TAPS;
      wsl[t * SLICE + cc] =
          c0 + cc < cend ? float(deft_widen(weight[(long long)(c0 + cc) * TAPS + t])) : 0.f;
    }
    __syncthreads();  // the weights, and the window's zeros (the flush before) are in place
    const int c = c0 + lane * EV;
    if (pix_ok && c < cend) {
      Acc go[EV];
#pragma unroll
      for (int e = 0; e < EV; ++e) go[e] = Acc(deft_widen(gout[deft_gout_index(n, c + e, q_img)]));
#pragma unroll
      for (int t = 0; t < TAPS; ++t) {
        BwdCell cell{0, 0};
        const BwdPoint pt = deft_bwd_point_at(deft_bwd_pos(offset, mask, n, ho, wo, t, og), &cell);
        const float4 wv = *reinterpret_cast<const float4*>(wsl + t * SLICE + lane * EV);
        const Acc cg[EV] = {Acc(wv.x) * go[0], Acc(wv.y) * go[1], Acc(wv.z) * go[2],
                            Acc(wv.w) * go[3]};
        bool unused = false;
        deft_bwd_channels<EV>(image + c, nullptr, pt, cg, 1.0, unused, g[t]);  // g only
        if (!gimage) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (!((pt.valid >> q) & 1)) continue;
          float contrib[EV];
#pragma unroll
          for (int e = 0; e < EV; ++e) contrib[e] = float(cg[e] * pt.mod * pt.w[q]);
          const int wy = cell.y0 + (q >> 1) - wy0, wx = cell.x0 + (q & 1) - wx0;
          if ((unsigned)wy < (unsigned)WIN_ROWS && (unsigned)wx < (unsigned)WIN_COLS) {
            float* s = win + (wy * WIN_COLS + wx) * SLICE + lane;
#pragma unroll
            for (int e = 0; e < EV; ++e) atomicAdd(s + e * CL, contrib[e]);
          } else {
            deft_red4(gimage + c + pt.off[q], contrib);
          }
        }
      }
    }
    __syncthreads();  // every contribution of the slice is in the window
    // flush: one vector reduction per (window pixel inside the image, 4 channels) that got
    // anything, and the window back to zero for the next slice
    for (int i = tid; i < WIN_PIX * CL; i += THREADS) {
      const int wp = i / CL, l = i % CL;
      float* s = win + wp * SLICE + l;
      float v[EV];
#pragma unroll
      for (int e = 0; e < EV; ++e) v[e] = s[e * CL], s[e * CL] = 0.f;
      const int y = wy0 + wp / WIN_COLS, x = wx0 + wp % WIN_COLS, cc = c0 + l * EV;
      if (gimage && y >= 0 && y < H && x >= 0 && x < W && cc < cend &&
          (v[0] != 0.f || v[1] != 0.f || v[2] != 0.f || v[3] != 0.f))
        deft_red4(gimage + cc + deft_pixel_offset(y, x), v);
    }
  }
  // a pixel's lanes are one warp: a butterfly in a fixed order per tap
#pragma unroll
  for (int t = 0; t < TAPS; ++t) {
#pragma unroll
    for (int r = 0; r < 3; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) g[t][r] += __shfl_xor_sync(0xffffffffu, g[t][r], o);
    if (lane == 0 && pix_ok) deft_write_point_grads(goffset, gmask, m, n, ho, wo, t, og, g[t]);
  }
}
#elif FUSED_GW
// gw=fused (perf notes round B36): the grad-weight kernel's thread layout (FVEC channels of one
// pixel a thread, FTPC threads a pixel: lanes of one warp; FTB taps a block, grid y; FSPLIT_PIX
// pixels a block, grid z) doing the data kernel's work, so that grad weight comes from the
// corners loaded for grad offset and grad mask instead of a second gather (the separate
// grad-weight kernel reads them all again: dw512 fp16, 86 us of a 396 us step).
// Per (pixel, tap) a thread loads its four corner vectors and forms
//   grad weight:   acc[tap][e] += grad_out[e] * mask * sample[e]
//   point grads:   its channels' part of grad offset and grad mask (the corner sums of round
//                  B29 in f16 / bf16, per-channel differences otherwise), summed over the
//                  pixel's FTPC lanes by a butterfly; FCBPOG > 1 blocks share an offset group
//                  and store their parts (deft_bwd_fused_pg adds them in order)
//   grad input:    as the data kernel's GIN_MODE scatters it (gin=local: far points only;
//                  the gather forms: nothing)
// The block's grad-weight sums are reduced in a fixed order (shuffles, shared memory) into its
// split's partial [split][tap][c] (gw_partial null: not requested); deft_bwd_fused_gw adds the
// splits in order. Nothing here depends on timing: the same bits every run.
constexpr int FCPB = FTPC * FVEC;       // channels a block, inside one offset group
constexpr int FROWS = THREADS / FTPC;   // pixels a block step
constexpr int FSPAN = FTPC < 32 ? 32 : FTPC;
constexpr int FRGROUPS = THREADS / FSPAN;
constexpr bool FSUMS = sizeof(T) == 2;  // the corner-sums form, as CORNER_SUMS below
static_assert(FVEC % 4 == 0 && (FTPC & (FTPC - 1)) == 0 && FTPC <= 32 && THREADS % 32 == 0 &&
                  CPOG % FCPB == 0 && FCBPOG * FCPB == CPOG,
              "gw=fused: whole channel blocks inside an offset group");

extern "C" __global__ void __launch_bounds__(THREADS, THREADS <= 256 ? 2 : 1)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS, Acc* __restrict__ gw_partial, Acc* __restrict__ pg_partial) {
  deft_grid_begin();
  __shared__ Acc Wsm[FTB][FCPB];                     // the block's taps' weights
  __shared__ Acc Red[FRGROUPS * FTPC * FVEC];        // the grad-weight reduction
  struct __align__(16) Vec { T x[FVEC]; };           // 16 or 32 bytes: one or two vector loads
  const int tid = threadIdx.x;
  const int cv = tid % FTPC, row = tid / FTPC;
  const int cb0 = blockIdx.x * FCPB;                 // the block's first channel
  const int og = cb0 / CPOG;
  const int cbk = (cb0 - og * CPOG) / FCPB;          // its channel block in the offset group
  const int c = cb0 + cv * FVEC;
  const int t0 = blockIdx.y * FTB;
  const long long p_begin = (long long)blockIdx.z * FSPLIT_PIX;
  const long long p_end = p_begin + FSPLIT_PIX < M_TOTAL ? p_begin + FSPLIT_PIX : M_TOTAL;
  const double scale = GIN_MODE == 2 || GIN_MODE == 6 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = (GIN_MODE == 2 || GIN_MODE == 6) && header[3] != 0ull;
  for (int i = tid; i < FTB * FCPB; i += THREADS) {
    const int b = i / FCPB, j = i % FCPB;
    Wsm[b][j] = t0 + b < TAPS ? Acc(deft_widen(weight[(long long)(cb0 + j) * TAPS + t0 + b])) : Acc(0);
  }
  __syncthreads();

  Acc acc[FTB][FVEC];
#pragma unroll
  for (int b = 0; b < FTB; ++b)
#pragma unroll
    for (int e = 0; e < FVEC; ++e) acc[b][e] = Acc(0);

  // every thread runs every step (the butterflies need whole warps); a row past the block's
  // range has no pixel
#pragma unroll 1
  for (long long m0 = p_begin; m0 < p_end; m0 += FROWS) {
    const long long m = m0 + row;
    const BwdPixel px = deft_bwd_pixel(m < p_end ? m : M_TOTAL);
    const bool ok = px.ok;
    const long long n = px.n;
    const int ho = px.ho, wo = px.wo;
    Acc g[FVEC];
    {
      Vec gv;
      if (ok) gv = *reinterpret_cast<const Vec*>(gout + deft_gout_index(n, c, (long long)ho * WO + wo));
#pragma unroll
      for (int e = 0; e < FVEC; ++e) g[e] = ok ? Acc(deft_widen(gv.x[e])) : Acc(0);
    }
    const T* image = input + n * (C * H * W) + c;
    GinT* gimg = gin ? gin + n * (C * H * W) : nullptr;
#pragma unroll
    for (int b = 0; b < FTB; ++b) {
      const int t = t0 + b;
      if (t >= TAPS) break;  // block-uniform
      // outside the image (no corner) where the row has no pixel
      const BwdPos ps = ok ? deft_bwd_pos(offset, mask, n, ho, wo, t, og) : BwdPos{Pos(-2), Pos(-2), Acc(0)};
      BwdCell cell{0, 0};
      const BwdPoint pt = deft_bwd_point_at(ps, &cell);
      Acc x[4][FVEC];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        Vec r;
        const bool in = (pt.valid >> q) & 1;
        if (in) r = *reinterpret_cast<const Vec*>(image + pt.off[q]);
#pragma unroll
        for (int e = 0; e < FVEC; ++e) x[q][e] = in ? Acc(deft_widen(r.x[e])) : Acc(0);
      }
      Acc cg[FVEC];
#pragma unroll
      for (int e = 0; e < FVEC; ++e) cg[e] = Wsm[b][cv * FVEC + e] * g[e];
      Acc gg[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask: this thread's part
      if constexpr (FSUMS) {
        Acc a[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
          for (int e = 0; e < FVEC; ++e) a[q] += cg[e] * x[q][e];
        deft_bwd_grads_from_sums(pt, a, gg);
      } else {
        deft_bwd_channels_math<FVEC>(x, nullptr, pt, cg, scale, nonfinite, gg);  // (no scatter)
      }
      // grad weight: grad_out x mask x the sample
#pragma unroll
      for (int e = 0; e < FVEC; ++e) {
        const Acc smp = pt.w[0] * x[0][e] + pt.w[1] * x[1][e] + pt.w[2] * x[2][e] + pt.w[3] * x[3][e];
        acc[b][e] += g[e] * pt.mod * smp;
      }
      // the pixel's lanes: a butterfly in a fixed order
#pragma unroll
      for (int r = 0; r < 3; ++r)
#pragma unroll
        for (int o = FTPC / 2; o > 0; o >>= 1) gg[r] += __shfl_xor_sync(0xffffffffu, gg[r], o);
      if (cv == 0 && ok) {
        if constexpr (FCBPOG == 1) {
          deft_write_point_grads(goffset, gmask, m, n, ho, wo, t, og, gg);
        } else if (goffset || gmask) {
          Acc* d = pg_partial + (((long long)cbk * M_TOTAL + m) * (OG * TAPS) + og * TAPS + t) * 3;
          d[0] = gg[0], d[1] = gg[1], d[2] = gg[2];
        }
      }
#if GIN_MODE >= 5
      // the local gather has summed the near points: only far ones scatter
      if (gimg && ok && !deft_lg_near(ps, ho, wo, t)) {
#pragma unroll
        for (int j = 0; j < FVEC; j += 4) deft_lg_scatter<4>(gimg, cell, pt, c + j, cg + j, scale, nonfinite);
      }
#elif GIN_MODE < 3
      if (gimg) {
#pragma unroll
        for (int j = 0; j < FVEC; j += 4) deft_bwd_scatter<4>(gimg + c + j, pt, cg + j, scale, nonfinite);
      }
#endif
    }
  }

  if (gw_partial) {  // block-uniform
    // lanes FSPAN apart share channels: a butterfly across them, then the row groups in shared
    // memory, summed in order by one thread a channel (as deform_conv_bwd_weight_dw.cuh does;
    // a helper shared by both changed the grad-weight kernel's SASS, 3710 -> 3854 instructions,
    // so each keeps its copy)
    const int rg = tid / FSPAN;
    const bool holder = tid % FSPAN < FTPC;
    Acc* dst = gw_partial + (long long)blockIdx.z * (C * TAPS);
#pragma unroll
    for (int b = 0; b < FTB; ++b) {
      if (t0 + b >= TAPS) break;  // block-uniform
#pragma unroll
      for (int e = 0; e < FVEC; ++e) {
        Acc v = acc[b][e];
#pragma unroll
        for (int o = 16; o >= FTPC; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (holder) Red[(rg * FTPC + cv) * FVEC + e] = v;
      }
      __syncthreads();
      for (int j = tid; j < FCPB; j += THREADS) {
        const int jv = j / FVEC, je = j % FVEC;
        Acc s = Acc(0);
        for (int r = 0; r < FRGROUPS; ++r) s += Red[(r * FTPC + jv) * FVEC + je];
        dst[(long long)(t0 + b) * C + cb0 + j] = s;
      }
      __syncthreads();
    }
  }
  if (nonfinite) atomicOr(&header[3], 1ull);
}

// grad weight = the FSPLITS partials [split][tap][c] summed in split order: a block per 32
// elements, its 8 warps each summing a contiguous eighth of the splits, then the eighths in
// order.
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_fused_gw(const Acc* __restrict__ partial, T* __restrict__ gweight) {
  deft_grid_begin();
  __shared__ Acc part[8][32];
  constexpr long long ELEMS = C * TAPS;
  const int lane = threadIdx.x % 32, wv = threadIdx.x / 32;
  const long long i = (long long)blockIdx.x * 32 + lane;  // [tap][c]
  constexpr int PER = (FSPLITS + 7) / 8;
  const int z0 = wv * PER, z1 = z0 + PER < FSPLITS ? z0 + PER : FSPLITS;
  Acc s = Acc(0);
  if (i < ELEMS)
    for (int z = z0; z < z1; ++z) s += partial[(long long)z * ELEMS + i];
  part[wv][lane] = s;
  __syncthreads();
  if (wv == 0 && i < ELEMS) {
    Acc tot = Acc(0);
#pragma unroll
    for (int w = 0; w < 8; ++w) tot += part[w][lane];
    const long long t = i / C, ch = i % C;
    gweight[ch * TAPS + t] = deft_cast<T>(tot);  // depthwise: [c][tap] in both layouts
  }
}

// grad offset and grad mask = the FCBPOG channel blocks' parts [block][pixel][og][tap][3],
// added in order: a thread per (pixel, offset group, tap). (Launched where FCBPOG > 1.)
extern "C" __global__ void __launch_bounds__(256)
    deft_bwd_fused_pg(const Acc* __restrict__ partial, T* __restrict__ goffset, T* __restrict__ gmask) {
  deft_grid_begin();
  constexpr long long PTS = M_TOTAL * OG * TAPS;
  const long long i = (long long)blockIdx.x * 256 + threadIdx.x;
  if (i >= PTS) return;
  Acc s[3] = {Acc(0), Acc(0), Acc(0)};
#pragma unroll
  for (int k = 0; k < FCBPOG; ++k) {
    const Acc* p = partial + ((long long)k * PTS + i) * 3;
    s[0] += p[0], s[1] += p[1], s[2] += p[2];
  }
  const long long m = i / (OG * TAPS);
  const int ot = int(i - m * (OG * TAPS));
  const BwdPixel px = deft_bwd_pixel(m);
  deft_write_point_grads(goffset, gmask, m, px.n, px.ho, px.wo, ot % TAPS, ot / TAPS, s);
}
#else
// f16 / bf16 with channel vectors (EV > 1), every form but the fixed-point atomics: the
// corner-sums form (deft_bwd_channels_sums, perf notes round B29). The float atomics took it in
// session 23 (with the corner loads predicated): 0.81-0.98x their time at sigma = 8 on dw512,
// dw1024_16, dw512_14 and dw1024_7, unchanged at sigma = 0.5. The scalar-channel kernels (nchw
// with transpose=0, odd channel counts) keep the per-channel form, which the GPU tests run there.
constexpr bool CORNER_SUMS = sizeof(T) == 2 && GIN_MODE != 2 && EV > 1;
extern "C" __global__ void __launch_bounds__(THREADS)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS) {
  deft_grid_begin();
  __shared__ Acc Red[3][THREADS];
  const int tid = threadIdx.x;
  const int p = X_NHWC ? tid / CL : tid % PIXB;
  const int lane = X_NHWC ? tid % CL : tid / PIXB;
  const int og = blockIdx.y;
  const long long m = (long long)blockIdx.x * PIXB + p;
  const BwdPixel px = deft_bwd_pixel(m);
  const bool pix_ok = px.ok;
  const long long n = px.n;
  const int ho = px.ho, wo = px.wo;
  const long long q_img = (long long)ho * WO + wo;
  const double scale = GIN_MODE == 2 || GIN_MODE == 6 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = (GIN_MODE == 2 || GIN_MODE == 6) && header[3] != 0ull;
#if DW_WSMEM
  // the offset group's weights as the accumulator type, [tap][channel]: read along the
  // channels of a tap (a warp's lanes TAPS elements apart, a few lines) and stored without
  // bank conflicts; a lane then reads its EV channels of a tap as one vector
  extern __shared__ __align__(16) unsigned char smem[];  // TAPS * CPOG * sizeof(Acc)
  Acc* wsm = reinterpret_cast<Acc*>(smem);
  for (int i = tid; i < TAPS * CPOG; i += THREADS) {
    const int t = i / CPOG, cl = i % CPOG;
    wsm[i] = Acc(deft_widen(weight[((long long)og * CPOG + cl) * TAPS + t]));
  }
  __syncthreads();
#endif

#pragma unroll 1
  for (int t = 0; t < TAPS; ++t) {
    Acc g[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask of this tap
    if (pix_ok) {
      const BwdPos ps = deft_bwd_pos(offset, mask, n, ho, wo, t, og);
#if GIN_MODE >= 5
      BwdCell cell{0, 0};
      const BwdPoint pt = deft_bwd_point_at(ps, &cell);
      // the local gather (deft_bwd_lgather) has summed the near points: only far ones scatter
      GinT* far = gin && !deft_lg_near(ps, ho, wo, t) ? gin + n * (C * H * W) : nullptr;
#else
      const BwdPoint pt = deft_bwd_point_at(ps, nullptr);
#endif
      const T* image = input + n * (C * H * W);
      Acc a[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};  // CORNER_SUMS: sum of cg x corner q
      if constexpr (EV == 1) {
#pragma unroll 2
        for (int c = og * CPOG + lane; c < (og + 1) * CPOG; c += CL) {
#if DW_WSMEM
          const Acc wc = wsm[t * CPOG + (c - og * CPOG)];
#else
          const Acc wc = Acc(deft_widen(weight[(long long)c * TAPS + t]));
#endif
          const Acc cg = wc * Acc(deft_widen(gout[deft_gout_index(n, c, q_img)]));
          const long long cbase = X_NHWC ? (long long)c : (long long)c * H * W;
          deft_bwd_channel(image + cbase, gin ? gin + n * (C * H * W) + cbase : nullptr, pt, cg,
                           scale, nonfinite, g);
#if GIN_MODE >= 5
          if (far) deft_lg_scatter<1>(far, cell, pt, c, &cg, scale, nonfinite);
#endif
        }
      } else {  // nhwc: EV neighbouring channels per lane, one vector load and reduction per corner
#pragma unroll 2
        for (int c = og * CPOG + lane * EV; c < (og + 1) * CPOG; c += CL * EV) {
          Acc cg[EV];
#if DW_WSMEM
          // grad_out is channels-last here (nhwc, or the runtime's copy): EV channels are one
          // vector, as are their weights in shared memory
          struct __align__(sizeof(T) * EV) GoVec { T x[EV]; };
          struct __align__(sizeof(Acc) * EV) WVec { Acc x[EV]; };
          const GoVec gv = *reinterpret_cast<const GoVec*>(gout + deft_gout_index(n, c, q_img));
          const WVec wv = *reinterpret_cast<const WVec*>(wsm + t * CPOG + (c - og * CPOG));
#pragma unroll
          for (int e = 0; e < EV; ++e) cg[e] = wv.x[e] * Acc(deft_widen(gv.x[e]));
#else
#pragma unroll
          for (int e = 0; e < EV; ++e)
            cg[e] = Acc(deft_widen(weight[(long long)(c + e) * TAPS + t])) *
                    Acc(deft_widen(gout[deft_gout_index(n, c + e, q_img)]));
#endif
          if constexpr (CORNER_SUMS)
            deft_bwd_channels_sums<EV>(image + c, gin ? gin + n * (C * H * W) + c : nullptr, pt,
                                       cg, scale, nonfinite, a);
          else
            deft_bwd_channels<EV>(image + c, gin ? gin + n * (C * H * W) + c : nullptr, pt, cg,
                                  scale, nonfinite, g);
#if GIN_MODE >= 5
          if (far) deft_lg_scatter<EV>(far, cell, pt, c, cg, scale, nonfinite);
#endif
        }
      }
      if constexpr (CORNER_SUMS) deft_bwd_grads_from_sums(pt, a, g);
    }
    if constexpr (X_NHWC && CL == 32) {
      // a pixel's lanes are one warp: a butterfly in a fixed order, no barrier
#pragma unroll
      for (int r = 0; r < 3; ++r)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) g[r] += __shfl_xor_sync(0xffffffffu, g[r], o);
      if (lane == 0 && pix_ok) deft_write_point_grads(goffset, gmask, m, n, ho, wo, t, og, g);
    } else {
      deft_reduce_point_grads(&Red[0][0], g, lane == 0, CL,
                              [&](int u) { return X_NHWC ? p * CL + u : u * PIXB + p; }, goffset,
                              gmask, m, px, t, og);
      __syncthreads();  // Red is rewritten for the next tap
    }
  }
  if (nonfinite) atomicOr(&header[3], 1ull);
}
#endif  // DW_WINDOW

#if GIN_MODE >= 5
// The local gather. Block: one 8 x 8 tile of input pixels (blockIdx.x), one offset group and
// LG_SPB 128-channel slices (blockIdx.y), one image (blockIdx.z); LG_THREADS threads. (1) The weight
// slices into shared memory as f32 [tap][channel]. (2) Every candidate point (pixel of the LG_RH x LG_RW
// region, tap) that is near and whose floor cell is one of the tile's (TH + 1) x (TW + 1) cells
// (rows y0 - 1 .. y0 + TH - 1) is counted per cell (shared int atomics), the counts scanned by
// one warp, and the points listed cell by cell (a second evaluation; the order within a cell is
// set by the atomics). (3) A warp per input pixel, lanes on 4 channels of each slice, walks the
// pixel's four cells' lists as the direct gather does (an entry read once for the LG_SPB
// slices: their grad_out loads are independent) and stores the sums (every in-image element of
// the slices: the workspace needs no zeroing).
struct LgEntry {
  int rt;  // region pixel * TAPS + tap
  float ly, lx, mod;
};
__device__ __forceinline__ int deft_lg_fdiv(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
extern "C" __global__ void __launch_bounds__(LG_THREADS)
    deft_bwd_lgather(const T* __restrict__ offset, const T* __restrict__ mask,
                     const T* __restrict__ gout, const T* __restrict__ weight,
                     GinT* __restrict__ ws, unsigned long long* __restrict__ header) {
  deft_grid_begin();
#if GIN_MODE == 6
  // GIN_MODE 2's fixed point: each contribution rounded as its atomics round it, summed as an
  // integer (so the order of a cell's list, set by shared atomics, does not matter)
  const double scale = deft_fixed_scale(header);
  bool nonfinite = false;
  typedef long long Sum;
#else
  (void)header;
  typedef float Sum;
#endif
  constexpr int CELLS = (LG_TH + 1) * (LG_TW + 1), REGION = LG_RH * LG_RW,
                CAND = REGION * TAPS;
  extern __shared__ __align__(16) unsigned char lg_smem[];
  LgEntry* ent = reinterpret_cast<LgEntry*>(lg_smem);
  constexpr int WCH = LG_SPB * 128;                    // a block's channels
  constexpr int LG_GROUPS = (LG_SLICES + LG_SPB - 1) / LG_SPB;
  float* wsm = reinterpret_cast<float*>(ent + CAND);  // [tap][WCH]
  int* start = reinterpret_cast<int*>(wsm + TAPS * WCH);  // CELLS + 1
  int* fill = start + CELLS + 1;                          // CELLS
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int ty0 = int(blockIdx.x / LG_TILES_X) * LG_TH, tx0 = int(blockIdx.x % LG_TILES_X) * LG_TW;
  const int og = int(blockIdx.y / LG_GROUPS), sgroup = int(blockIdx.y % LG_GROUPS);
  const long long n = blockIdx.z;
  // the output rows (cols) whose near points can have a floor cell in rows ty0 - 1 .. ty0 + TH - 1
  const int oy_lo = max(0, -deft_lg_fdiv(-(ty0 - 1 + PH - (R - 1) * DH - LG_R), SH));
  const int oy_hi = min(int(HO) - 1, deft_lg_fdiv(ty0 + LG_TH - 1 + PH + LG_R, SH));
  const int ox_lo = max(0, -deft_lg_fdiv(-(tx0 - 1 + PW - (S - 1) * DW - LG_R), SW));
  const int ox_hi = min(int(WO) - 1, deft_lg_fdiv(tx0 + LG_TW - 1 + PW + LG_R, SW));
  const int c0 = sgroup * WCH;  // the block's first channel within the group
  for (int i = tid; i < TAPS * WCH; i += LG_THREADS) {
    const int t = i / WCH, cl = c0 + i % WCH;
    wsm[i] = cl < CPOG ? float(deft_widen(weight[((long long)og * CPOG + cl) * TAPS + t])) : 0.f;
  }
  for (int i = tid; i < CELLS; i += LG_THREADS) fill[i] = 0;
  __syncthreads();
  // candidate i: its local cell (-1: not near or not this tile's), entry fields
  auto eval = [&](int i, LgEntry& e) -> int {
    int rp, t;
    if (NHWC) rp = i / TAPS, t = i % TAPS;  // neighbouring threads on neighbouring offsets
    else t = i / REGION, rp = i % REGION;
    const int oy = oy_lo + rp / LG_RW, ox = ox_lo + rp % LG_RW;
    if (oy > oy_hi || ox > ox_hi) return -1;
    const BwdPos ps = deft_bwd_pos(offset, mask, n, oy, ox, t, og);
    if (!deft_lg_near(ps, oy, ox, t)) return -1;
    const Pos yf = floor(ps.y), xf = floor(ps.x);
    const int cy = int(yf) - (ty0 - 1), cx = int(xf) - (tx0 - 1);
    if (cy < 0 || cy > LG_TH || cx < 0 || cx > LG_TW) return -1;
    e.rt = rp * TAPS + t;
    e.ly = float(Acc(ps.y - yf));
    e.lx = float(Acc(ps.x - xf));
    e.mod = float(ps.mod);
    return cy * (LG_TW + 1) + cx;
  };
  for (int i = tid; i < CAND; i += LG_THREADS) {
    LgEntry e;
    const int lc = eval(i, e);
    if (lc >= 0) atomicAdd(&fill[lc], 1);
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the counts, a run of PER cells a lane
    constexpr int PER = (CELLS + 31) / 32;
    int run = 0;
    for (int u = 0; u < PER; ++u) run += lane * PER + u < CELLS ? fill[lane * PER + u] : 0;
    int incl = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int at = incl - run;
    for (int u = 0; u < PER; ++u) {
      const int j = lane * PER + u;
      if (j < CELLS) start[j] = at, at += fill[j], fill[j] = 0;
    }
    if (lane == 31) start[CELLS] = incl;
  }
  __syncthreads();
  for (int i = tid; i < CAND; i += LG_THREADS) {
    LgEntry e;
    const int lc = eval(i, e);
    if (lc >= 0) ent[start[lc] + atomicAdd(&fill[lc], 1)] = e;
  }
  __syncthreads();
  struct __align__(sizeof(T) * 4) Vec { T x[4]; };
  // the lane's channels: 4 of each slice, from c0 + 128 sl + 4 lane within the group
  const long long cabs = (long long)og * CPOG + c0 + lane * 4;
  bool active[LG_SPB];
#pragma unroll
  for (int sl = 0; sl < LG_SPB; ++sl) active[sl] = c0 + sl * 128 + lane * 4 < CPOG;
  for (int pi = warp; pi < LG_TH * LG_TW; pi += LG_THREADS / 32) {
    const int y = ty0 + pi / LG_TW, x = tx0 + pi % LG_TW;
    if (y >= H || x >= W) continue;  // (warp-uniform)
    const int cy = y - (ty0 - 1), cx = x - (tx0 - 1);
    Sum acc[LG_SPB][4];
#pragma unroll
    for (int sl = 0; sl < LG_SPB; ++sl)
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[sl][u] = Sum(0);
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // cells (y, x), (y, x - 1), (y - 1, x), (y - 1, x - 1)
      const int lc = (cy - (q >> 1)) * (LG_TW + 1) + (cx - (q & 1));
      const int b = start[lc], e = start[lc + 1];
#pragma unroll 4
      for (int j = b; j < e; ++j) {
        const LgEntry en = ent[j];
        const int rp = en.rt / TAPS, t = en.rt % TAPS;
        const long long m = (n * HO + oy_lo + rp / LG_RW) * WO + ox_lo + rp % LG_RW;
        const Acc w = deft_corner_weight(en.ly, en.lx, q);
        Vec gv[LG_SPB];
#pragma unroll
        for (int sl = 0; sl < LG_SPB; ++sl)
          if (active[sl]) gv[sl] = *reinterpret_cast<const Vec*>(gout + m * K + cabs + sl * 128);
#pragma unroll
        for (int sl = 0; sl < LG_SPB; ++sl) {
          if (!active[sl]) continue;
          const float4 wv =
              *reinterpret_cast<const float4*>(wsm + t * WCH + sl * 128 + lane * 4);
          const float wf[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            // GIN_MODE 1's operations: cg = weight x grad_out, cg x mask x corner weight
            const Acc cg = Acc(wf[u]) * Acc(deft_widen(gv[sl].x[u]));
#if GIN_MODE == 6
            deft_fixed_add(acc[sl][u], cg * Acc(en.mod) * w, scale, nonfinite);
#else
            acc[sl][u] += float(cg * Acc(en.mod) * w);
#endif
          }
        }
      }
    }
#pragma unroll
    for (int sl = 0; sl < LG_SPB; ++sl)
      if (active[sl]) {
        GinT* dst = ws + ((n * H + y) * W + x) * C + cabs + sl * 128;
#if GIN_MODE == 6
        struct __align__(32) U4 { unsigned long long x[4]; };
        *reinterpret_cast<U4*>(dst) = U4{{(unsigned long long)acc[sl][0], (unsigned long long)acc[sl][1],
                                          (unsigned long long)acc[sl][2], (unsigned long long)acc[sl][3]}};
#else
        *reinterpret_cast<float4*>(dst) = make_float4(acc[sl][0], acc[sl][1], acc[sl][2], acc[sl][3]);
#endif
      }
  }
#if GIN_MODE == 6
  if (nonfinite) atomicOr(&header[3], 1ull);
#endif
}
#endif  // GIN_MODE >= 5
