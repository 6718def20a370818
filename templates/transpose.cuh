// [batch][rows][cols] -> [batch][cols][rows] in 64 x 64 tiles (deft_transpose_tile in
// common.cuh): used to turn an nchw input into nhwc (rows = C, cols = H*W) and a kcrs weight
// into krsc (rows = C/groups, cols = R*S) before the gather kernel, so that its corner loads
// are 16-byte channel vectors. Grid: (cols / 64, rows / 64, batch) rounded up; 256 threads.
// Whole 16-byte vectors on both sides where the extents and pointers allow it (the image of
// an input whose channels and pixels are multiples of 8 f16 or 4 f32), else pairs or single
// elements.
__device__ __forceinline__ void deft_transpose_block(const T* __restrict__ src, T* __restrict__ dst,
                                                     long long rows, long long cols, long long bx,
                                                     long long by, long long b) {
  const T* s = src + b * rows * cols;
  T* d = dst + b * rows * cols;
  const long long r0 = by * 64, c0 = bx * 64;
  if constexpr (sizeof(T) == 2 || sizeof(T) == 4) {
    if (deft_transpose_vec16(src, dst, rows, cols)) {  // 16-byte vectors (perf notes round 14)
      deft_transpose_tile16(s, d, rows, cols, r0, c0);
      return;
    }
  }
  deft_transpose_tile(s, d, rows, cols, r0, c0, deft_transpose_pairs(src, dst, rows, cols),
                      [](T v) { return v; });
}

#if !TRANSPOSE_PACK  // (an nchw forward on wgmma runs deft_transpose_pack instead)
extern "C" __global__ void __launch_bounds__(256)
    deft_transpose(const T* __restrict__ src, T* __restrict__ dst, long long rows,
                   long long cols) {
  deft_grid_begin();
  deft_transpose_block(src, dst, rows, cols, blockIdx.x, blockIdx.y, blockIdx.z);
}
#endif

#if TRANSPOSE_PACK
// The two pre-passes of an nchw forward on wgmma in one grid: blocks [0, TRANSPOSE_BLOCKS)
// transpose the input to nhwc (as deft_transpose: rows = C, cols = H W, batch N), the next
// PACK_BLOCKS pack the weight (deft_pack_block). Both only move memory and neither reads the
// other's output, so one grid saves a launch and lets the pack's blocks fill the transpose's
// tail (perf notes round 17).
constexpr long long TRANSPOSE_TX = (H * W + 63) / 64, TRANSPOSE_TY = (C + 63) / 64;
static_assert(TRANSPOSE_BLOCKS == TRANSPOSE_TX * TRANSPOSE_TY * N,
              "plan.transpose_blocks: 64 x 64 tiles of the input's channels x pixels");
extern "C" __global__ void __launch_bounds__(256)
    deft_transpose_pack(const T* __restrict__ src, T* __restrict__ dst,
                        const T* __restrict__ weight, T* __restrict__ packed) {
  deft_grid_begin();
  const long long b = blockIdx.x;
  if (b < TRANSPOSE_BLOCKS)
    deft_transpose_block(src, dst, C, H * W, b % TRANSPOSE_TX, b / TRANSPOSE_TX % TRANSPOSE_TY,
                         b / (TRANSPOSE_TX * TRANSPOSE_TY));
  else
    deft_pack_block(weight, packed, b - TRANSPOSE_BLOCKS);
}
#endif
