// deform_conv2d backward_weight on Hopper's warpgroup tensor cores (wgmma, sm_90a), f16 and
// bf16 (and f32 in tf32 math, below), channels-last input (nhwc layers, or the transpose
// pre-pass). Same contract and grid
// as deform_conv_bwd_weight.cuh: a block owns BO output channels x BN input channels of one
// tap and conv group over one range of pixels, and writes its partial sums, tap-major
// (PARTIAL_TAP_MAJOR: [split][t][k][c], whole rows of channels); deft_bwd_weight_reduce adds
// the SPLITS partials in a fixed order. No atomics: the result is the same every run. The GEMM
//   grad_weight[o][c] = sum over pixels p of grad_out[p][o] * col[p][c],
//   col[p][c] = mask * bilinear sample of channel c at p's sampling point,
// runs as wgmma.m64nBNk16 with M = output channels (one warpgroup per 64), K = pixels. B, the
// sampled columns, is gathered as 16-byte channel vectors (8 channels, one load per corner)
// into shared memory in the MN-major core layout (8 pixels x 8 channels = 128 contiguous
// bytes per core; cores along the channels 128 bytes apart (SBO), along the pixels BN * 16
// bytes (LBO)), read with the transpose bit. Two forms:
//
// Register form (WS 0, producers=0; opt-in): every thread gathers, and A, grad_out, goes
// from global memory straight into each thread's register fragment; chunks of KP = 64 pixels
// (four k steps) are double-buffered: chunk i + 1's gathers and A loads are issued while chunk
// i's wgmmas run. The pixels of a k step are permuted against their k slots so that thread t's
// four A slots (2t, 2t+1, 2t+8, 2t+9) are four neighbouring pixels (4t .. 4t+3): one 8-byte
// load per row for an nchw grad_out.
//
// Warp-specialised form (WS 1, producers=P; the sm_90 default, docs/perf-notes.md rounds
// B8-B10): P producer warpgroups gather whole chunks into a ring of NSTAGE shared-memory
// stages (warpgroup w fills chunks w, w + P, ...; each keeps its next chunk's sampling points
// in flight), and the BO / 64 consumer warpgroups copy their grad_out chunks into stages of
// their own (cp.async, AST - 1 chunks ahead) and issue the wgmmas, A and B both from
// descriptors, pixels in their own order. Per ring slot a "full" mbarrier (one arrival per
// producer warp, after its proxy fence) and an "empty" one (one per consumer warp, once its
// wgmmas of the slot retired).
//
// f32 in tf32 math (TF32, warp-specialised form only; docs/perf-notes.md round B20): wgmma
// m64nBNk8, whose tf32 operands are both K-major. A chunk is 32 pixels (128 bytes of k a core
// row, as for 16-bit elements: the same shared-memory plan), B cores are 8 channel rows of 4
// pixels (the producers store each sampled 4-channel vector as four scalars, transposed,
// rounded to the nearest tf32), and A cores 8 output-channel rows of 4 pixels: nchw grad_out
// copied 16 bytes (4 pixels of a plane) at a time, nhwc grad_out transposed by 4-byte copies;
// each consumer thread rounds the pieces it copied once they land.
//
// Constants from codegen: BO (64 per warpgroup), BN (64 or 128), THREADS (2 * BO + 128 *
// PRODUCERS), SPLITS, SPLIT_PIX (a multiple of 64), MIN_BLOCKS, WS, PRODUCERS (0 without WS),
// NSTAGE, MAX_BATCH and GOUT_COPY (WS), PARTIAL_TAP_MAJOR (1), TF32, and the wgmma wrapper for
// BN: deft_wgmma_kstep() (register A) or deft_wgmma_ss() (WS).

constexpr int VEC = 16 / (int)sizeof(T);     // channels per 16-byte vector
constexpr int KP = 8 * VEC;                  // pixels per chunk (64, tf32 32)
constexpr int NV = BN / VEC;                 // vectors per pixel row of a chunk
constexpr int CHUNK_BYTES = KP * BN * (int)sizeof(T);
static_assert(TF32 == (sizeof(T) == 4), "32-bit elements run in tf32");
static_assert(sizeof(T) == 2 || (TF32 && WS), "16-bit elements, or tf32 in the warp-specialised form");
static_assert(THREADS == 2 * BO + 128 * PRODUCERS && BO % 64 == 0,
              "one warpgroup per 64 output channels, plus the producer warpgroups");
static_assert(SPLIT_PIX % KP == 0, "whole chunks per split");
static_assert(CG % BN == 0 && CPOG % BN == 0, "a channel tile inside one group and offset group");

#if !TF32
__device__ __forceinline__ unsigned short deft_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned short deft_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned deft_pack2(T lo, T hi) {
  return (unsigned)deft_bits(lo) | ((unsigned)deft_bits(hi) << 16);
}
__device__ __forceinline__ uint4 deft_pack8(const T (&v)[8]) {
  return make_uint4(deft_pack2(v[0], v[1]), deft_pack2(v[2], v[3]), deft_pack2(v[4], v[5]),
                    deft_pack2(v[6], v[7]));
}
#endif

#if !WS
constexpr bool GOUT_VEC = !NHWC && (HO * WO) % 4 == 0;  // 8-byte grad_out loads (4 pixels)
// Pixel (0 .. 15) of k slot s inside a k step: slot 8b + 2a + c holds pixel 4a + 2b + c.
__device__ __forceinline__ int deft_slot_pixel(int s) {
  return 4 * ((s % 8) / 2) + 2 * (s / 8) + s % 2;
}

// Gathers the sampled columns of the KP pixels p0 .. of this block's tap t (offset group og,
// input channels c0 ..) into the chunk buffer dst, by GW warps (this one: warp, lane).
// Layout: k row (slot order) r = (warp % 8) * 8 + lane % 8 (+ 8 GW per pass), vectors lane / 8
// + 4 (vgroup + VGROUPS j): 8 lanes of a store phase write 8 rows of one core.
template <int GW>
__device__ __forceinline__ void deft_gather_columns(const T* __restrict__ input,
                                                    const T* __restrict__ offset,
                                                    const T* __restrict__ mask, unsigned char* dst,
                                                    long long p0, long long p_end, int t, int og,
                                                    long long c0, int warp, int lane) {
  constexpr int PASSES = GW >= 8 ? 1 : 8 / GW;  // pixel passes of the gather
  constexpr int VGROUPS = GW >= 8 ? GW / 8 : 1;  // warps sharing a pixel's vectors
  constexpr int VPT = NV / (4 * VGROUPS);        // vectors per thread per pass
  static_assert(VPT * 4 * VGROUPS == NV && PASSES * GW * 8 >= KP, "gather layout");
  const int grow = (warp % 8) * 8 + lane % 8;
  const int vbase = lane / 8 + 4 * (GW >= 8 ? warp / 8 : 0);
#pragma unroll
  for (int pass = 0; pass < PASSES; ++pass) {
    const int r = grow + pass * GW * 8;
    if (r >= KP) break;
    const long long m = p0 + (r / 16) * 16 + deft_slot_pixel(r % 16);
    SamplePoint sp;
#pragma unroll
    for (int q = 0; q < 4; ++q) sp.off[q] = 0, sp.w[q] = 0.f;
    long long n = 0;
    if (m < p_end) {
      n = m / (HO * WO);
      const int rem = int(m - n * (HO * WO));
      sp = deft_sample_point(offset, mask, n, rem / WO, rem % WO, t, og);
    }
    const T* image = input + n * ((long long)H * W * C) + c0;
    unsigned char* row = dst + (r / 8) * (BN * 16) + (r % 8) * 16;
    uint4 raw[VPT][4];
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = vbase + 4 * VGROUPS * j;
#pragma unroll
      for (int q = 0; q < 4; ++q)
        raw[j][q] = __ldg(reinterpret_cast<const uint4*>(image + sp.off[q] + VEC * v));
    }
    const float w[4] = {sp.w[0], sp.w[1], sp.w[2], sp.w[3]};
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const int v = vbase + 4 * VGROUPS * j;
      *reinterpret_cast<uint4*>(row + v * 128) = deft_combine8(raw[j], w[0], w[1], w[2], w[3]);
    }
  }
}

#endif  // !WS

// grad_out of channel o (of group g) at the NE pixels m .. m + NE - 1, elementwise; zero past
// p_end or the group's KG channels.
template <int NE>
__device__ __forceinline__ void deft_gout_run(const T* __restrict__ gout, T (&v)[NE], long long m,
                                              long long p_end, int g, int o) {
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const long long mm = m + e;
    v[e] = deft_from<T>(0.f);
    if (mm < p_end && o < KG) {
      const long long n = mm / (HO * WO);
      v[e] = gout[deft_gout_index(n, (long long)g * KG + o, mm - n * (HO * WO))];
    }
  }
}

#if !WS
// The A (grad_out) fragment of the chunk of pixels p0 ..: rows orow, orow + 8 (output channels
// of group g), k slots 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9 of each k step = pixels 4 tq .. 4 tq + 3
// of the step.
__device__ __forceinline__ void deft_load_gout_frag(const T* __restrict__ gout, unsigned (&a)[4][4],
                                                    long long p0, long long p_end, int g, int orow,
                                                    int tq) {
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    const long long m = p0 + ks * 16 + 4 * tq;
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows orow, orow + 8
      const int o = orow + 8 * h;
      T v[4];
      if (GOUT_VEC && m + 3 < p_end && o < KG) {
        const long long n = m / (HO * WO), q = m - n * (HO * WO);
        const uint2 u = __ldg(reinterpret_cast<const uint2*>(
            gout + (n * K + (long long)g * KG + o) * (HO * WO) + q));
        a[ks][h] = u.x;
        a[ks][2 + h] = u.y;
        continue;
      }
      deft_gout_run(gout, v, m, p_end, g, o);
      a[ks][h] = deft_pack2(v[0], v[1]);
      a[ks][2 + h] = deft_pack2(v[2], v[3]);
    }
  }
}

#endif  // !WS

// This block's partial sums, tap-major (PARTIAL_TAP_MAJOR: [split][t][k][cl]): accumulator e
// of this thread is row orow + 8 ((e / 2) % 2), column 8 (e / 4) + 2 tq + e % 2, so that pairs
// e, e + 1 are neighbouring channels: one 8-byte store, four threads a 32-byte sector.
__device__ __forceinline__ void deft_store_weight_partial(Acc* __restrict__ partial,
                                                          const float (&acc)[BN / 2], int g,
                                                          int orow, int cl0, int t, int tq) {
  static_assert(PARTIAL_TAP_MAJOR, "the wgmma kernels write tap-major partials");
  Acc* dst = partial + (long long)blockIdx.z * W_ELEMS + (long long)t * K * CG;
#pragma unroll
  for (int e = 0; e < BN / 2; e += 2) {
    const int o = orow + 8 * ((e / 2) % 2), col = 8 * (e / 4) + 2 * tq;
    if (o < KG)
      *reinterpret_cast<float2*>(dst + ((long long)g * KG + o) * CG + cl0 + col) =
          make_float2(acc[e], acc[e + 1]);
  }
}

#if !WS
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  deft_grid_begin();
  __shared__ __align__(128) unsigned char bufs[2 * CHUNK_BYTES];
  const unsigned buf_addr = (unsigned)__cvta_generic_to_shared(bufs);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WeightTile wt = deft_weight_tile<BO, BN>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;
  const int chunks = int((p_end - p_begin + KP - 1) / KP);

  // A fragment of this thread: rows o0 + 64 wg + 16 (warp % 4) + gq (+ 8).
  const int wg = warp / 4, gq = lane / 4, tq = lane % 4;
  const int orow = o0 + wg * 64 + (warp % 4) * 16 + gq;
  unsigned a[4][4];  // [k step][word]
  auto gather = [&](int chunk, int b) {
    deft_gather_columns<THREADS / 32>(input, offset, mask, bufs + b * CHUNK_BYTES,
                                      p_begin + (long long)chunk * KP, p_end, t, og, c0, warp, lane);
  };
  auto load_a = [&](int chunk) {
    deft_load_gout_frag(gout, a, p_begin + (long long)chunk * KP, p_end, g, orow, tq);
  };

  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

  if (chunks > 0) {
    gather(0, 0);
    load_a(0);
  }
#pragma unroll 1
  for (int i = 0; i < chunks; ++i) {
    // this thread's stores of chunk i visible to the tensor cores (async proxy), then every
    // thread's; chunk i - 1's wgmmas were waited for, so buffer (i + 1) % 2 is free
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const unsigned b = buf_addr + (i % 2) * CHUNK_BYTES;
    deft_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) deft_wgmma_kstep(acc, a[ks], deft_b_desc(b, ks));
    deft_wgmma_commit();
    if (i + 1 < chunks) gather(i + 1, (i + 1) % 2);
    deft_wgmma_wait<0>();
    if (i + 1 < chunks) load_a(i + 1);
  }

  deft_store_weight_partial(partial, acc, g, orow, cl0, t, tq);
}
#endif  // !WS

#if WS
// Producer side (docs/perf-notes.md round B9): per producer warpgroup a double-buffered table of
// one chunk's KP sampling points (corner offsets, weights, image). Lanes 0 .. KP - 1 of the
// warpgroup own one row each: they issue the offset and mask loads of the warpgroup's next
// chunk before this chunk's corner loads and turn them into points after its stores, so that a
// chunk costs one dependent round trip. Item it (0 .. ITEMS - 1) of a lane: core block
// pwarp + 4 (it % 2) of the chunk (rows 8 of them, lane % 8 of it), vector lane / 8 + 4 (it / 2);
// 8 lanes of a store phase write one core's 128 bytes, a warp's four phases 512 contiguous.
// tf32 (K-major cores of 8 channels x 4 pixels): lane 8 a + 4 b + p takes pixel
// 4 (pwarp + 4 (it % 2)) + p, vector 8 (it / 2) + 2 a + b (four 16-byte lines of corners for
// four pixels a warp), and stores its 4 channels as scalars, element (s + a) % 4 at store s:
// banks 16 b + 4 ((s + a) % 4) + p, all 32 distinct.
constexpr int ITEMS = KP * NV / 128;  // (row, vector) items per producer lane per chunk
constexpr int BATCH = ITEMS < MAX_BATCH ? ITEMS : MAX_BATCH;
static_assert(ITEMS % 2 == 0 && ITEMS % BATCH == 0, "whole batches of the two core blocks");
static_assert(sizeof(Off) == 4, "32-bit corner offsets in the point table");
struct ChunkPoint {
  int4 off;
  float4 w;
};
// Warpgroup barrier ids (deft_warpgroup_sync): 1 + pg for producer warpgroup pg,
// 1 + PRODUCERS + wg for consumer warpgroup wg.

// Consumer side: grad_out goes through shared memory as well, AST stages of each consumer's
// 64 output channels x KP pixels, copied with cp.async AST - 1 chunks ahead (round B9: the
// register fragments, one chunk ahead, left the consumers waiting on their loads). An A stage
// holds core (ob, kb) — output channels 8 ob .., pixels 8 kb .. — at kb * 1024 + ob * 128:
// nchw, a core row is 8 pixels of one channel (K-major); nhwc, 8 channels of one pixel
// (MN-major, the wgmma's transpose bit for A). The same descriptor serves both.
// tf32: K-major for both layouts (no transpose bit): a core row is 4 pixels of one channel.
constexpr int AST = 4;                        // A stages per consumer warpgroup
constexpr int A_STAGE_BYTES = 64 * KP * (int)sizeof(T);
// GOUT_COPY from codegen (the plan, which also sets grad_out's alignment from it): 16 (nchw:
// 8 pixels of a plane, which never cross an image since chunks start at multiples of 64
// pixels; nhwc: 8 channels inside the group), 8 (nchw: 4 pixels) or 2 (elements); tf32: 16
// (nchw: 4 pixels), 8 (nchw: 2 pixels) or 4 (elements; nhwc always, transposed by the copy)
constexpr bool GOUT16 = GOUT_COPY == 16;
constexpr bool GOUT8 = GOUT_COPY == 8;
static_assert(TF32 ? (NHWC ? GOUT_COPY == 4 : (HO * WO) % (GOUT_COPY / 4) == 0)
                   : GOUT_COPY == 2 || (NHWC ? GOUT16 && K % 8 == 0 && KG % 8 == 0
                                             : (HO * WO) % (GOUT_COPY / 2) == 0),
              "grad_out copies");


// This thread's four 16-byte pieces of the grad_out chunk of pixels p0 .. (p_end excluded),
// output channels oc0 .. oc0 + 63 of group g (zero past KG or p_end), into the A stage st.
// Piece j of lane l of warp wq: in-core row l % 8, middle index l / 8 + 4 (j % 2), outer
// wq * 2 + j / 2; nchw: row = channel, middle = pixel core, outer = channel core; nhwc: row =
// pixel, middle = channel core, outer = pixel core. A warp's piece writes are 512 conflict-free
// bytes and its reads 16 full sectors.
// tf32: the nchw order for both layouts (row = channel, middle = core of 4 pixels), in copies
// of GOUT_COPY bytes (nhwc: single elements, 8 lanes reading 8 neighbouring channels).
__device__ __forceinline__ void deft_copy_gout(const T* __restrict__ gout, unsigned char* st,
                                               long long p0, long long p_end, int oc0, int g,
                                               int wq, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int inner = lane % 8, mid = lane / 8 + 4 * (j % 2), outer = wq * 2 + j / 2;
#if TF32
    constexpr int CPE = GOUT_COPY / 4;  // elements (pixels) a copy
    const int o = oc0 + outer * 8 + inner;
    unsigned char* dst = st + mid * 1024 + outer * 128 + inner * 16;
#pragma unroll
    for (int h = 0; h < 4 / CPE; ++h) {
      const long long mh = p0 + 4 * mid + CPE * h, nh = mh / (HO * WO);
      const bool ok = o < KG && mh + CPE - 1 < p_end;
      const T* src = gout + deft_gout_index(nh, (long long)g * KG + o, mh - nh * (HO * WO));
      deft_cp_async<GOUT_COPY>(dst + GOUT_COPY * h, ok ? src : gout, ok);
    }
#else
    if (!NHWC) {
      const int o = oc0 + outer * 8 + inner;
      const long long m = p0 + 8 * mid;
      unsigned char* dst = st + mid * 1024 + outer * 128 + inner * 16;
      const long long n = m / (HO * WO), q = m - n * (HO * WO);
      const T* src = gout + (n * K + (long long)g * KG + o) * (HO * WO) + q;
      if (GOUT16) {
        const bool ok = o < KG && m + 7 < p_end;
        deft_cp_async<16>(dst, ok ? src : gout, ok);
        continue;
      }
      if (GOUT8) {  // each half in its own image: h*w is a multiple of 4, not of 8
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long long mh = m + 4 * h, nh = mh / (HO * WO);
          const bool ok = o < KG && mh + 3 < p_end;
          const T* srch = gout + (nh * K + (long long)g * KG + o) * (HO * WO) + (mh - nh * (HO * WO));
          deft_cp_async<8>(dst + 8 * h, ok ? srch : gout, ok);
        }
        continue;
      }
      T v[8];
      deft_gout_run(gout, v, m, p_end, g, o);
      *reinterpret_cast<uint4*>(dst) = deft_pack8(v);
    } else {
      const long long m = p0 + outer * 8 + inner;
      const int o = oc0 + 8 * mid;
      unsigned char* dst = st + outer * 1024 + mid * 128 + inner * 16;
      if (GOUT16) {
        const bool ok = m < p_end && o < KG;
        deft_cp_async<16>(dst, ok ? gout + m * K + (long long)g * KG + o : gout, ok);
        continue;
      }
      T v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        v[e] = deft_from<T>(0.f);
        if (m < p_end && o + e < KG) v[e] = gout[m * K + (long long)g * KG + o + e];
      }
      *reinterpret_cast<uint4*>(dst) = deft_pack8(v);
    }
#endif
  }
}

#if TF32
// The four pieces this thread copied into A stage st (deft_copy_gout's order), rounded in
// place once they have landed.
__device__ __forceinline__ void deft_round_gout(unsigned char* st, int wq, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int inner = lane % 8, mid = lane / 8 + 4 * (j % 2), outer = wq * 2 + j / 2;
    float4* q = reinterpret_cast<float4*>(st + mid * 1024 + outer * 128 + inner * 16);
    float4 v = *q;
    v.x = deft_round_tf32(v.x), v.y = deft_round_tf32(v.y);
    v.z = deft_round_tf32(v.z), v.w = deft_round_tf32(v.w);
    *q = v;
  }
}
// 4 channels of one sampled row: the corners' f32 vectors weighted, each rounded to tf32.
__device__ __forceinline__ float4 deft_combine4(const uint4 (&c)[4], const float4& w) {
  const float4 v = deft_combine4f(c, w);
  return make_float4(deft_round_tf32(v.x), deft_round_tf32(v.y), deft_round_tf32(v.z),
                     deft_round_tf32(v.w));
}
#endif

extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    KERNEL_NAME(const T* __restrict__ input, const T* __restrict__ offset,
                const T* __restrict__ mask, const T* __restrict__ gout,
                Acc* __restrict__ partial) {
  deft_grid_begin();
  constexpr int CONSUMERS = BO / 64;
  // NSTAGE chunks, 2 NSTAGE mbarriers, PRODUCERS x 2 point tables (ChunkPoint, image), then
  // CONSUMERS x AST grad_out stages
  extern __shared__ __align__(128) unsigned char ring[];
  const unsigned ring_addr = (unsigned)__cvta_generic_to_shared(ring);
  const unsigned full = ring_addr + NSTAGE * CHUNK_BYTES, empty = full + 8 * NSTAGE;
  ChunkPoint* tables = reinterpret_cast<ChunkPoint*>(ring + NSTAGE * (CHUNK_BYTES + 16));
  int* table_img = reinterpret_cast<int*>(tables + PRODUCERS * 2 * KP);
  unsigned char* a_stages = reinterpret_cast<unsigned char*>(table_img + PRODUCERS * 2 * KP);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const WeightTile wt = deft_weight_tile<BO, BN>();
  const int o0 = wt.o0, cl0 = wt.cl0, t = wt.t, g = wt.g, og = wt.og;
  const long long c0 = wt.c0, p_begin = wt.p_begin, p_end = wt.p_end;
  const int chunks = int((p_end - p_begin + KP - 1) / KP);

  if (tid == 0) {
    for (int i = 0; i < NSTAGE; ++i) {
      deft_mbar_init_count(full + 8 * i, 4);               // the producer warpgroup's warps
      deft_mbar_init_count(empty + 8 * i, 4 * CONSUMERS);  // every consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= 4 * CONSUMERS) {
    // ---- producer warpgroup pg: chunks pg, pg + PRODUCERS, ... A warpgroup runs at most one
    // round of the ring ahead (NSTAGE >= PRODUCERS), so the parity names the right phase.
    const int pg = warp / 4 - CONSUMERS, pwarp = warp % 4, ptid = tid % 128;
    ChunkPoint* tab = tables + pg * 2 * KP;
    int* tab_img = table_img + pg * 2 * KP;
    // lanes ptid < KP own row ptid of the point table: k slot ptid = pixel ptid of the chunk
    // (A and B both come from shared memory here: no fragment order to follow)
    PointInput pin;
    int pn = 0, pho = 0, pwo = 0;
    bool pvalid = false;
    auto load_point = [&](int chunk) {  // issues the row's offset and mask loads
      const long long m = p_begin + (long long)chunk * KP + ptid;
      pvalid = m < p_end;
      if (pvalid) {
        const long long n = m / (HO * WO);
        const int rem = int(m - n * (HO * WO));
        pn = int(n), pho = rem / WO, pwo = rem % WO;
        pin = deft_point_input(offset, mask, n, pho, pwo, t, og);
      }
    };
    auto store_point = [&](int buf) {  // the row's point, zero weights past the range
      ChunkPoint cp;
      cp.off = make_int4(0, 0, 0, 0);
      cp.w = make_float4(0.f, 0.f, 0.f, 0.f);
      int n = 0;
      if (pvalid) {
        const SamplePoint sp = deft_point_from(pin, pho, pwo, t);
        cp.off = make_int4(sp.off[0], sp.off[1], sp.off[2], sp.off[3]);
        cp.w = make_float4(sp.w[0], sp.w[1], sp.w[2], sp.w[3]);
        n = pn;
      }
      tab[buf * KP + ptid] = cp;
      tab_img[buf * KP + ptid] = n;
    };
    if (ptid < KP && pg < chunks) {
      load_point(pg);
      store_point(0);
    }
#if TF32
    const int r8 = lane % 4, vq = 2 * (lane / 8) + (lane / 4) % 2;  // pixel in core, vector
    const int rot = lane / 8;                                     // the stores' rotation
    auto item_row = [&](int it) { return (pwarp + 4 * (it % 2)) * 4 + r8; };
    auto item_vec = [&](int it) { return vq + 8 * (it / 2); };
#else
    const int r8 = lane % 8, vq = lane / 8;
    auto item_row = [&](int it) { return (pwarp + 4 * (it % 2)) * 8 + r8; };
    auto item_vec = [&](int it) { return vq + 4 * (it / 2); };
#endif
    int buf = 0;
    for (int i = pg; i < chunks; i += PRODUCERS, buf ^= 1) {
      const int slot = i % NSTAGE, round = i / NSTAGE;
      deft_warpgroup_sync(1 + pg);  // table buf written; every lane done reading table buf ^ 1
      const int next = i + PRODUCERS;
      if (ptid < KP && next < chunks) load_point(next);
      unsigned char* dst = ring + slot * CHUNK_BYTES;
#pragma unroll
      for (int b = 0; b < ITEMS; b += BATCH) {
        uint4 c[BATCH][4];  // the weights are read again at the combine: fewer live registers
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
          const int it = b + j, r = item_row(it), v = item_vec(it);
          const int4 off = tab[buf * KP + r].off;
          const T* base = input + (long long)tab_img[buf * KP + r] * ((long long)H * W * C) + c0 +
                          VEC * v;
          c[j][0] = __ldg(reinterpret_cast<const uint4*>(base + off.x));
          c[j][1] = __ldg(reinterpret_cast<const uint4*>(base + off.y));
          c[j][2] = __ldg(reinterpret_cast<const uint4*>(base + off.z));
          c[j][3] = __ldg(reinterpret_cast<const uint4*>(base + off.w));
        }
        // the slot is free once the consumers retired its previous round (loads in flight)
        if (b == 0 && round > 0) deft_mbar_spin(empty + 8 * slot, (round - 1) & 1);
#pragma unroll
        for (int j = 0; j < BATCH; ++j) {
          const int it = b + j, r = item_row(it), v = item_vec(it);
          const float4 w = tab[buf * KP + r].w;
#if TF32
          // channel 4 v + e of pixel r: core (r / 4, v / 2), row 4 (v % 2) + e, word r % 4
          const float4 x = deft_combine4(c[j], w);
          float* row = reinterpret_cast<float*>(dst + (r / 4) * (BN * 16) + (v / 2) * 128 +
                                                (v % 2) * 64 + r8 * 4);
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const int e = (s + rot) % 4;
            row[e * 4] = e == 0 ? x.x : e == 1 ? x.y : e == 2 ? x.z : x.w;
          }
#else
          *reinterpret_cast<uint4*>(dst + (r / 8) * (BN * 16) + r8 * 16 + v * 128) =
              deft_combine8(c[j], w.x, w.y, w.z, w.w);
#endif
        }
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for the wgmmas
      __syncwarp();
      if (lane == 0) deft_mbar_arrive(full + 8 * slot);
      if (ptid < KP && next < chunks) store_point(buf ^ 1);
    }
    return;
  }

  // ---- consumer warpgroup wg: output channels o0 + 64 wg ..
  const int wg = warp / 4, gq = lane / 4, tq = lane % 4;
  const int orow = o0 + wg * 64 + (warp % 4) * 16 + gq;
  unsigned char* my_a = a_stages + wg * (AST * A_STAGE_BYTES);
  const unsigned my_a_addr = (unsigned)__cvta_generic_to_shared(my_a);
  auto load_a = [&](int chunk) {
    deft_copy_gout(gout, my_a + (chunk % AST) * A_STAGE_BYTES, p_begin + (long long)chunk * KP,
                   p_end, o0 + wg * 64, g, warp % 4, lane);
  };
  float acc[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;
#pragma unroll
  for (int c = 0; c < AST - 1; ++c) {
    if (c < chunks) load_a(c);
    deft_cp_commit();  // one group per chunk, empty ones too: the wait counts stay uniform
  }
#pragma unroll 1
  for (int c = 0; c < chunks; ++c) {
    deft_cp_wait<AST - 2>();  // this thread's pieces of chunk c landed
#if TF32
    deft_round_gout(my_a + (c % AST) * A_STAGE_BYTES, warp % 4, lane);
#endif
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // for the wgmmas
    // the warpgroup's pieces of chunk c; every warp's wgmmas of chunk c - 1 retired, so its
    // A stage, (c + AST - 1) % AST, is free
    deft_warpgroup_sync(1 + PRODUCERS + wg);
    if (c + AST - 1 < chunks) load_a(c + AST - 1);
    deft_cp_commit();
    const int slot = c % NSTAGE;
    deft_mbar_spin(full + 8 * slot, (c / NSTAGE) & 1);  // the chunk's columns landed
    const unsigned a = my_a_addr + (c % AST) * A_STAGE_BYTES;
    const unsigned b = ring_addr + slot * CHUNK_BYTES;
    deft_wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < 4; ++ks) deft_wgmma_ss(acc, deft_smem_desc<1024>(a, ks), deft_b_desc(b, ks));
    deft_wgmma_commit();
    deft_wgmma_wait<0>();
    __syncwarp();
    if (lane == 0) deft_mbar_arrive(empty + 8 * slot);  // this warp is done with the slot
  }
  deft_store_weight_partial(partial, acc, g, orow, cl0, t, tq);
}
#endif  // WS
