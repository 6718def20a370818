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
// Constants from codegen: PIXB, CL, THREADS (= PIXB * CL), GIN_MODE, EV, DW_WINDOW; with the
// window TILE_H, TILE_W, TILES_Y, TILES_X, WIN_HALO, WIN_ROWS, WIN_COLS, SMEM_BYTES.

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
#else
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
  const double scale = GIN_MODE == 2 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = GIN_MODE == 2 && header[3] != 0ull;

#pragma unroll 1
  for (int t = 0; t < TAPS; ++t) {
    Acc g[3] = {Acc(0), Acc(0), Acc(0)};  // grad offset dy, dx, grad mask of this tap
    if (pix_ok) {
      const BwdPoint pt = deft_bwd_point(offset, mask, n, ho, wo, t, og);
      const T* image = input + n * (C * H * W);
      if constexpr (EV == 1) {
#pragma unroll 2
        for (int c = og * CPOG + lane; c < (og + 1) * CPOG; c += CL) {
          const Acc cg = Acc(deft_widen(weight[(long long)c * TAPS + t])) *
                         Acc(deft_widen(gout[deft_gout_index(n, c, q_img)]));
          const long long cbase = X_NHWC ? (long long)c : (long long)c * H * W;
          deft_bwd_channel(image + cbase, gin ? gin + n * (C * H * W) + cbase : nullptr, pt, cg,
                           scale, nonfinite, g);
        }
      } else {  // nhwc: EV neighbouring channels per lane, one vector load and reduction per corner
#pragma unroll 2
        for (int c = og * CPOG + lane * EV; c < (og + 1) * CPOG; c += CL * EV) {
          Acc cg[EV];
#pragma unroll
          for (int e = 0; e < EV; ++e)
            cg[e] = Acc(deft_widen(weight[(long long)(c + e) * TAPS + t])) *
                    Acc(deft_widen(gout[deft_gout_index(n, c + e, q_img)]));
          deft_bwd_channels<EV>(image + c, gin ? gin + n * (C * H * W) + c : nullptr, pt, cg,
                                scale, nonfinite, g);
        }
      }
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
