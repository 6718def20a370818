// deform_conv2d backward_data on Hopper's warpgroup tensor cores (wgmma, sm_90a), f16 and
// bf16 (k16), or f32 in tf32 math (k8: both operands K-major, rounded to tf32), channels-last
// input (nhwc layers, or the transpose pre-pass). Same contract and grid
// as deform_conv_bwd_data_tc.cuh: one block per BP = 64 or 128 output pixels, tap and offset
// group; grad offset and grad mask summed in the block in a fixed order (no atomics); grad
// input scattered into the workspace by GIN_MODE (1: f32 vector reductions, 2: 64-bit fixed
// point, deterministic; 3, deterministic: the points' values stored for deft_bwd_gather). The column gradient
//   colgrad[p][c] = sum_k grad_out[p][k] * weight[k][tap][c]      (k over c's conv group)
// is a wgmma.m64nBNk16 (tf32: k8) chain per 64 pixels and channel step of BN channels:
//  - A, the block's grad_out tile (BP pixels x all KG output channels of the group, zero rows
//    past KG), is copied into shared memory once, with cp.async, in no-swizzle core layout:
//    K-major (cores of 8 pixels x 16 bytes of k) for nhwc grad_out and for tf32, MN-major (8 k
//    x 16 bytes of pixels, read with the transpose bit) for nchw f16/bf16;
//  - B, the weight, is packed by a pre-pass (deft_pack_weight) into the exact shared-memory
//    image of each slice (KS = 64 output channels, 32 for tf32, x BN input channels of the
//    tap; MN-major read with the transpose bit, K-major for tf32), so a slice is a contiguous
//    run of 16-byte copies;
//  - the WGS warpgroups share the tile: warpgroup w owns pixel half w % HALVES (64 rows each,
//    HALVES = BP / 64) and takes turns with the others of its half (WPH = WGS / HALVES) over
//    the channel steps (steps w / HALVES, w / HALVES + WPH, ...), each with a ring of its own:
//    NSTAGE slices streamed with cp.async NSTAGE - 2 ahead, one warpgroup barrier per slice,
//    one wgmma group in flight across it. While one warpgroup scatters a finished step,
//    another's wgmmas run (a warpgroup cannot overlap its own: ptxas serialises its wgmmas
//    while other accumulator registers of the warp are read, docs/perf-notes.md round B12);
//  - the epilogue reads the accumulators in place: no shared-memory round trip. The slice's
//    columns are permuted (deft_col_channel) so that each lane's accumulator pairs are the
//    channels c, c + 1, c + 2, c + 3 of its pixel, twice per 32 channels, and the four lanes
//    of a quad (one pixel) cover 16 neighbouring channels: one 8-byte (tf32: 16-byte) load per
//    corner and one 16-byte reduction (red.global.add.v4.f32) per corner, as in
//    deform_conv_bwd_data_tc.cuh, with the corner loads of EB such runs issued before any is
//    used.
//
// Constants from codegen: BP (64 or 128), BN (64 or 128), THREADS (128 * WGS, 1 to 4
// warpgroups, a multiple of BP / 64), MIN_BLOCKS (2 where two blocks' shared memory fits an
// SM: registers capped to match), NSTAGE (>= 3), GV (grad_out elements per copy: KC, KC / 2
// or 1, KC = 16 bytes of elements), SMEM_BYTES, GIN_MODE, and deft_wgmma_ss (A and B from
// descriptors; f16/bf16: A transposed for nchw, B transposed; tf32: neither).

constexpr int WGS = THREADS / 128;      // warpgroups
constexpr int HALVES = BP / 64;         // pixel halves, 64 rows each
constexpr int WPH = WGS / HALVES;       // warpgroups taking turns over one half's steps
// f16/bf16 (wgmma k16), or f32 in tf32 math (wgmma k8, operands rounded to tf32). A core
// matrix row is 16 bytes: KC elements; a slice holds 128 bytes of k per row: KS elements (64
// output channels of f16, 32 of tf32), four wgmma k steps either way.
constexpr bool TF32 = sizeof(T) == 4;
constexpr int KC = 16 / (int)sizeof(T);    // elements per core row
constexpr int KS = 8 * KC;                 // output channels per weight slice
constexpr int KSL = (KG + KS - 1) / KS;    // k slices of a channel step
constexpr int KGP = KSL * KS;              // KG padded to whole slices with zero rows
constexpr int NCS = CPOG / BN;             // channel steps of the offset group
constexpr int A_KSTRIDE = BP * 16;         // bytes between the grad_out tile's cores along k
constexpr int GS_BYTES = KGP * BP * (int)sizeof(T);  // the grad_out tile
constexpr int SLICE_BYTES = 128 * BN;
// the grad_out tile's layout: MN-major (read transposed) for nchw f16/bf16, else K-major
// (tf32 has no transposed operand, so an nchw layer's tile is transposed by the copy)
constexpr bool A_MN_MAJOR = !NHWC && !TF32;
static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16-bit elements or tf32");
static_assert((BP == 64 || BP == 128) && THREADS % 128 == 0 && WGS % HALVES == 0,
              "64 or 128 pixels, whole warpgroups, as many for each half");
static_assert(BN % 32 == 0 && CPOG % BN == 0 && CG % CPOG == 0,
              "channel steps inside one offset group, inside one conv group");
static_assert(NSTAGE >= 3 &&
                  GS_BYTES + WGS * NSTAGE * SLICE_BYTES + (WPH - 1) * BP * 3 * (int)sizeof(Acc) <=
                      SMEM_BYTES,
              "shared memory plan");
static_assert(GV == KC || GV == KC / 2 || GV == 1, "grad_out copy width");
static_assert(NHWC || !TF32 || GV == 1, "an nchw tf32 tile is copied element by element");

// The channel (of the step's BN) that column n of a weight slice, and of the accumulator,
// holds. The accumulator gives lane q of a quad the columns 8j + 2q, 8j + 2q + 1 (j = 0 ..
// BN / 8 - 1); with this order its columns j = 4u + 2h + b hold channels 32u + 16h + 4q + 2b
// + {0, 1}: runs of four channels, quad-interleaved.
__device__ __forceinline__ int deft_col_channel(int n) {
  const int j = n / 8, q = (n % 8) / 2;
  return 32 * (j / 4) + 16 * ((j % 4) / 2) + 4 * q + 2 * (j % 2) + n % 2;
}

// The weight, packed by deft_pack_weight (a pre-pass of every call) into the shared-memory image
// of each slice: packed[g][tap][channel block cb of BN][k slice][SLICE_ELEMS elements in the
// no-swizzle core layout, columns permuted by deft_col_channel], zero rows past KG; read from
// the weight in its own layout (kcrs, or krsc for nhwc layers). A slice is then one contiguous
// run of 16-byte copies. Cores: [k core][n core], n fastest; MN-major for f16/bf16 (a core is
// 8 k rows of 8 channels, read transposed), K-major for tf32 (8 channel rows of 4 k, values
// rounded to tf32).
constexpr int SLICE_ELEMS = SLICE_BYTES / (int)sizeof(T);
constexpr int CORE_ELEMS = 128 / (int)sizeof(T);
constexpr long long PACKED_ELEMS = (long long)G * TAPS * (CG / BN) * KSL * SLICE_ELEMS;
extern "C" __global__ void __launch_bounds__(256)
    deft_pack_weight(const T* __restrict__ weight, T* __restrict__ packed) {
  deft_grid_begin();
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= PACKED_ELEMS) return;
  const int e = int(i % SLICE_ELEMS);
  long long rest = i / SLICE_ELEMS;
  const int ks = int(rest % KSL);
  rest /= KSL;
  const int cb = int(rest % (CG / BN));
  rest /= CG / BN;
  const int t = int(rest % TAPS), g = int(rest / TAPS);
  const int core = e / CORE_ELEMS, within = e % CORE_ELEMS;
  const int kc = core / (BN / 8), j = core % (BN / 8);
  // MN-major core: row within / 8 is a k, column within % 8 a channel; K-major: the reverse
  const int k = ks * KS + kc * KC + (TF32 ? within % KC : within / 8);
  const int c = cb * BN + deft_col_channel(8 * j + (TF32 ? within / KC : within % 8));
  T v = deft_from<T>(0.f);
  if (k < KG) {
    const long long ko = (long long)g * KG + k;
    v = weight[W_KRSC ? (ko * TAPS + t) * CG + c : (ko * CG + c) * TAPS + t];
    if constexpr (TF32) v = deft_round_tf32(v);
  }
  packed[i] = v;
}

// The block's grad_out tile into shared memory (tile: its base), pixels m0 .., group g. Lane
// layout: 8 consecutive 16-byte rows of a core per 8 lanes (conflict-free stores). K-major rows
// are KC channels of one pixel (copies of GV channels for nhwc; an nchw tf32 tile element by
// element, from KC channel planes); MN-major rows (nchw f16/bf16) 8 pixels of one plane.
__device__ __forceinline__ void deft_copy_gout_tile(const T* __restrict__ gout, unsigned char* tile,
                                                    long long m0, int g) {
  constexpr int VECS = BP * KGP / KC;  // 16-byte destination rows
  constexpr int CP = GV * (int)sizeof(T);  // bytes a copy
  for (int e = threadIdx.x; e < VECS; e += THREADS) {
    const int inner = e % 8, mid = (e / 8) % 4, outer = e / 32;
    int m, k;  // tile pixel and output channel of the row's first element
    unsigned char* dst;
    if (!A_MN_MAJOR) {  // row: KC channels of one pixel
      m = (outer % (BP / 8)) * 8 + inner;
      k = ((outer / (BP / 8)) * 4 + mid) * KC;
      dst = tile + ((k / KC) * (BP / 8) + m / 8) * 128 + (m % 8) * 16;
    } else {  // row: 8 pixels of one channel plane
      m = ((outer % (BP / 32)) * 4 + mid) * 8;
      k = (outer / (BP / 32)) * 8 + inner;
      dst = tile + ((k / 8) * (BP / 8) + m / 8) * 128 + (k % 8) * 16;
    }
    const long long mg = m0 + m;
    // element i (0 .. KC - 1) of the row: pixel mg + i (MN-major) or channel k + i (K-major)
    auto src_of = [&](int i, bool& ok) -> const T* {
      const long long mm = A_MN_MAJOR ? mg + i : mg;
      const int kk = A_MN_MAJOR ? k : k + i;
      ok = mm < M_TOTAL && kk < KG;
      if (!ok) return gout;
      const long long n = mm / (HO * WO);
      return gout + deft_gout_index(n, (long long)g * KG + kk, mm - n * (HO * WO));
    };
    if constexpr (CP >= 4) {  // cp.async of 16, 8 or 4 bytes
#pragma unroll
      for (int h = 0; h < KC / GV; ++h) {
        bool ok;
        const T* src = src_of(GV * h, ok);
        deft_cp_async<CP>(dst + CP * h, src, ok);
      }
    } else {  // 16-bit elements one by one
      unsigned short v[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bool ok;
        const T* src = src_of(i, ok);
        const T x = ok ? *src : deft_from<T>(0.f);
        v[i] = *reinterpret_cast<const unsigned short*>(&x);
      }
      *reinterpret_cast<uint4*>(dst) =
          make_uint4(v[0] | (unsigned(v[1]) << 16), v[2] | (unsigned(v[3]) << 16),
                     v[4] | (unsigned(v[5]) << 16), v[6] | (unsigned(v[7]) << 16));
    }
  }
}

// tf32: the grad_out tile rounded to the nearest tf32 in place (wgmma would truncate), once
// the copies have landed and before any wgmma reads it.
__device__ __forceinline__ void deft_round_gout_tile(unsigned char* tile) {
  float4* t = reinterpret_cast<float4*>(tile);
  for (int e = threadIdx.x; e < GS_BYTES / 16; e += THREADS) {
    float4 v = t[e];
    v.x = deft_round_tf32(v.x), v.y = deft_round_tf32(v.y);
    v.z = deft_round_tf32(v.z), v.w = deft_round_tf32(v.w);
    t[e] = v;
  }
}

// gin is never null: the runtime passes the grad-input workspace whether grad input was
// requested or not (plan.gin_always). With a null test here, a run for grad offset alone hit
// an illegal address at a reduction the test guarded, in both modes, cause not found
// (docs/perf-notes.md round B13); without grad input the scatter's result is just not read.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(DEFT_BWD_DATA_PARAMS) {
  deft_grid_begin();
  // the grad_out tile, each warpgroup's ring, the warpgroups' point-grad sums
  extern __shared__ __align__(128) unsigned char smem[];  // SMEM_BYTES, set at launch
  const unsigned gs_addr = (unsigned)__cvta_generic_to_shared(smem);
  Acc* red = reinterpret_cast<Acc*>(smem + GS_BYTES + WGS * NSTAGE * SLICE_BYTES);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = warp / 4, q = lane % 4;
  const int ph = wg % HALVES, turn = wg / HALVES;  // the warpgroup's pixel half, its turn among WPH
  unsigned char* ring = smem + GS_BYTES + wg * (NSTAGE * SLICE_BYTES);
  const unsigned ring_addr = gs_addr + GS_BYTES + wg * (NSTAGE * SLICE_BYTES);
  const long long m0 = (long long)blockIdx.x * BP;
  const int t = blockIdx.y;
  const int og = blockIdx.z;
  const int g = og * CPOG / CG;  // the conv group holding the whole offset group
  const int cl_og = og * CPOG - g * CG;
  // this warpgroup's channel steps turn, turn + WPH, ...: its slices j = 0 .. SLICES - 1 are
  // slice j % KSL of step turn + WPH * (j / KSL)
  const int SLICES = (NCS - turn + WPH - 1) / WPH * KSL;

  // The warpgroup's slice j into its ring slot j % NSTAGE: a contiguous run of the packed
  // weight, 16 bytes a lane and copy.
  const T* wpack =
      weight + ((long long)(g * TAPS + t) * (CG / BN) + cl_og / BN) * KSL * SLICE_ELEMS;
  auto load_w = [&](int j) {
    const T* src = wpack + (long long)(WPH * (j / KSL) + turn) * KSL * SLICE_ELEMS +
                   (long long)(j % KSL) * SLICE_ELEMS;
    unsigned char* slot = ring + (j % NSTAGE) * SLICE_BYTES;
#pragma unroll
    for (int u = tid % 128; u < SLICE_BYTES / 16; u += 128)
      deft_cp_async<16>(slot + u * 16, src + u * KC, true);
  };
  deft_copy_gout_tile(gout, smem, m0, g);  // the first cp.async group, with slice 0
#pragma unroll
  for (int j = 0; j < NSTAGE - 2; ++j) {
    if (j < SLICES) load_w(j);
    deft_cp_commit();  // one group per slice, empty ones too: the wait counts stay uniform
  }

  // The thread's two pixels: rows r and r + 8 of the block, its warp's 16 in the accumulator
  // of its half (the same in every warpgroup of the half).
  const int r = ph * 64 + (warp % 4) * 16 + lane / 4;
  BwdPixel px[2];
  BwdPoint pt[2];
  const T* image[2];
#if GIN_MODE != 3
  GinT* gimage[2];
#else
  // gather form (bwd_common.cuh): gin is the point values' buffer; row h of the thread's
  // point is at vbase + (r + 8 h) * VROWS + channel, written where the point has a corner in
  // the image (the gather reads no other). One base pointer, not two: registers.
  constexpr long long VROWS = (long long)OG * TAPS * CPOG;
  float* const vbase = reinterpret_cast<float*>(gin) +
                       ((m0 * OG + og) * TAPS + t) * (long long)CPOG - (long long)og * CPOG;
#endif
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    px[h] = deft_bwd_pixel(m0 + r + 8 * h);
    pt[h] = deft_bwd_pixel_point(offset, mask, px[h], t, og);
    image[h] = input + px[h].n * (C * H * W);
#if GIN_MODE != 3
    gimage[h] = gin + px[h].n * (C * H * W);
#endif
  }
  const double scale = GIN_MODE == 2 ? deft_fixed_scale(header) : 1.0;
  bool nonfinite = GIN_MODE == 2 && header[3] != 0ull;
  Acc pg[2][3] = {{Acc(0), Acc(0), Acc(0)}, {Acc(0), Acc(0), Acc(0)}};  // dy, dx, mask

  // The epilogue of channel step cs from the accumulators, batch bt of NB: groups gi = bt *
  // EB .. (row h = gi / (BN / 16), 32-channel block u = gi % (BN / 16) / 2, half hh = gi % 2;
  // four channels of one pixel a lane), first every corner load of the batch, then their use.
  // groups a batch: 16 corner loads in flight a lane, 8 where 128 registers must do
  // (tf32 corners are 16-byte vectors: half as many groups)
  constexpr int EB = (65536 / (THREADS * MIN_BLOCKS) >= 160 ? 4 : 2) / (TF32 ? 2 : 1);
  constexpr int NB = BN / 8 / EB;  // batches a channel step
  float acc[BN / 2];
  auto epilogue = [&](int cs, int bt) {
    const int c_step = og * CPOG + cs * BN;
    BwdCorners<4> cr[EB];
#pragma unroll
    for (int b = 0; b < EB; ++b) {
      const int gi = bt * EB + b, h = gi / (BN / 16), u = gi % (BN / 16) / 2, hh = gi % 2;
      cr[b] = deft_bwd_load_corners<4>(image[h] + c_step + 32 * u + 16 * hh + 4 * q, pt[h]);
    }
#pragma unroll
    for (int b = 0; b < EB; ++b) {
      const int gi = bt * EB + b, h = gi / (BN / 16), u = gi % (BN / 16) / 2, hh = gi % 2;
      Acc cgv[4];
#pragma unroll
      for (int bb = 0; bb < 2; ++bb)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          cgv[2 * bb + e] = Acc(acc[(4 * u + 2 * hh + bb) * 4 + 2 * h + e]);
      const int c = c_step + 32 * u + 16 * hh + 4 * q;
#if GIN_MODE == 3
      deft_bwd_channels_from<4>(cr[b], nullptr, pt[h], cgv, scale, nonfinite, pg[h]);
      if (pt[h].valid != 0)  // (none past the tensor) what GIN_MODE 2 scatters, before the corner weights: cg * mask
        *reinterpret_cast<float4*>(vbase + (r + 8 * h) * VROWS + c) =
            make_float4(cgv[0] * pt[h].mod, cgv[1] * pt[h].mod, cgv[2] * pt[h].mod,
                        cgv[3] * pt[h].mod);
#else
      deft_bwd_channels_from<4>(cr[b], gimage[h] + c, pt[h], cgv, scale, nonfinite, pg[h]);
#endif
    }
  };

  // the grad_out tile, copied by every thread of the block: complete (the first of the
  // NSTAGE - 2 groups committed so far) and visible to every warpgroup before any wgmma
  deft_cp_wait<NSTAGE - 3>();
  if constexpr (TF32) {
    __syncthreads();
    deft_round_gout_tile(smem);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();

#pragma unroll 1
  for (int j0 = 0; j0 < SLICES; j0 += KSL) {  // the warpgroup's channel steps
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
    deft_wgmma_fence_acc(acc);
#pragma unroll 1
    for (int s = 0; s < KSL; ++s) {
      const int j = j0 + s;
      deft_cp_wait<NSTAGE - 3>();  // this thread's pieces of slice j landed
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for the wgmmas
      // the warpgroup's pieces of slice j; its wgmmas of slice j - 2 retired, so that slice's
      // slot, (j + NSTAGE - 2) % NSTAGE, is free
      deft_warpgroup_sync(1 + wg);
      if (j + NSTAGE - 2 < SLICES) load_w(j + NSTAGE - 2);
      deft_cp_commit();
      const unsigned b = ring_addr + (j % NSTAGE) * SLICE_BYTES;
      deft_wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        deft_wgmma_ss(acc, deft_smem_desc<A_KSTRIDE>(gs_addr + ph * 1024, s * 4 + ks),
                      deft_b_desc(b, ks));
      deft_wgmma_commit();
      deft_wgmma_wait<1>();  // slice j - 1's wgmmas retired
    }
    // Channel step done: every (pixel, channel) of it scatters and adds to its point grads,
    // while the other warpgroups' wgmmas keep the tensor cores busy.
    deft_wgmma_wait<0>();
    deft_wgmma_fence_acc(acc);
#pragma unroll  // static accumulator indices: a dynamic one would copy them to local memory
    for (int bt = 0; bt < NB; ++bt) epilogue(turn + WPH * (j0 / KSL), bt);
  }
  if (nonfinite) atomicOr(&header[3], 1ull);

  // Each pixel's sums: the quad's four partials, then the warpgroups' (each summed over its
  // own channel steps), in a fixed order; lane q = 0 of the half's first warpgroup writes them.
  Acc s[2][3];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int v = 0; v < 3; ++v) {
      Acc x = pg[h][v];
      x += __shfl_xor_sync(0xffffffffu, x, 1);
      x += __shfl_xor_sync(0xffffffffu, x, 2);
      s[h][v] = x;
    }
  if (WPH > 1) {
    if (q == 0 && turn > 0)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int v = 0; v < 3; ++v) red[((turn - 1) * BP + r + 8 * h) * 3 + v] = s[h][v];
    __syncthreads();
    if (turn == 0 && q == 0)
      for (int w = 1; w < WPH; ++w)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int v = 0; v < 3; ++v) s[h][v] += red[((w - 1) * BP + r + 8 * h) * 3 + v];
  }
  if (turn == 0 && q == 0)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (px[h].ok)
        deft_write_point_grads(goffset, gmask, m0 + r + 8 * h, px[h].n, px[h].ho, px[h].wo, t,
                               og, s[h]);
}
