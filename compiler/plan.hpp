// KernelPlan: everything codegen and the launcher derive from (LayerDesc, Variant) — the
// numbers a variant implies (micro-tiles, warp grid, shared memory) and the launch grid.
// Internal to libdeft.
#pragma once

#include <array>
#include <string>

#include "deft/ir.hpp"

namespace deft {

// The depthwise direct gather's grid: at most this many blocks of 8 warps (each block copies
// the weight into shared memory), a contiguous run of items a block.
constexpr int64_t kDirectGatherMaxBlocks = 1024;

struct KernelPlan {
  // storage, accumulator, sampling-position, shared-memory stage and tensor-core input types
  std::string t, acc, pos, stage, tc_in;
  bool use_tc = false;
  int a_elems = 0, b_elems = 0;   // per thread per slice
  int a_pad = 0, b_pad = 0;       // shared-memory row padding, elements
  int tm = 0, tn = 0;             // FMA micro-tile
  int wm = 0, wn = 0, fm = 0, fn = 0, wk = 0;  // tensor-core warp grid and fragments
  int smem_bytes = 0;
  int vec = 0, ch_per_block = 0, pix_per_block = 0, t_size = 0;  // depthwise
  // depthwise forward, 16-byte channel vectors: the block's weights staged in shared memory as
  // [tap][channel] (read as 16-byte vectors), and an nhwc output stored in 16-byte vectors
  bool dw_wvec = false, dw_out_vec = false;
  bool x_nhwc = false;            // the kernel reads the input channels-last
  bool w_krsc = false;            // ... and the weight as [k][r][s][c/groups]
  bool transpose = false;         // a transpose pre-pass makes them so from nchw tensors
  bool vec_a = false;             // A gathered with 16-byte vector loads (nhwc)
  bool vec_b = false;             // B (weight) loaded as 16-byte vectors, tile column-major
  bool wide_offsets = false;      // 64-bit element offsets inside one image
  std::array<unsigned, 3> grid{1, 1, 1};
  unsigned block = 0;
  std::string kernel_name = "deft_deform_conv2d_forward";
  std::string template_name;
  // Workspace the pre-pass needs (transposed input, then weight), bytes; 0 without one.
  int64_t workspace_input_bytes = 0, workspace_weight_bytes = 0;

  // Backward passes (templates/deform_conv_bwd_*.cuh; see Variant for the tile fields).
  int bp = 0, bc = 0, bk = 0, tpp = 0;      // backward_data: pixels, channels/step, k/slice
  // 0 atomics into grad_input, 1 f32 workspace, 2 fixed-point atomics (deterministic), 3 fixed
  // point gathered per input pixel from the points sorted by cell (deterministic, no atomics;
  // the resident WMMA, wgmma and depthwise kernels: GatherLayout below), 4 the same gather in
  // f32 (the depthwise kernel's: gin=gather in the fast mode; with gather_sorted its
  // deterministic default), 5 the depthwise local gather
  // (gin=local: near points summed per input tile, far ones reduced into the f32 workspace),
  // 6 the same in 64-bit fixed point (gin=local det=1)
  int gin_mode = 0;
  // gin_mode 5 or 6: deft_bwd_lgather runs before the data kernel
  bool gin_local_gather() const { return gin_mode == 5 || gin_mode == 6; }
  // the 64-bit fixed-point workspace of the deterministic modes, scaled by deft_bwd_bound's
  // header (gin_mode 2, 3, 6)
  bool gin_fixed_point() const { return gin_mode == 2 || gin_mode == 3 || gin_mode == 6; }
  int bo = 0, bpw = 0, tmo = 0, tnc = 0, ksplit = 0;  // backward_weight tiles
  int fpw = 0;                              // backward tensor cores: 16x16 fragments per warp
  // backward_data with grad_out resident in shared memory (deform_conv_bwd_data_tc.cuh):
  // weight ring depth, grad_out copy vector and epilogue channel vector (elements); gv also
  // marks backward_weight's vector kernel (deform_conv_bwd_weight_tc.cuh)
  int nstage = 0, gv = 0, ev = 0;
  int splits = 0;                           // backward_weight: pixel ranges (grid z)
  int tb = 0;                               // depthwise backward_weight: taps per block
  // forward on wgmma (deform_conv_wgmma.cuh): offset groups per weight group, bytes of the
  // sampling-point table, bytes per output store; the weight is packed by a pre-pass into
  // workspace_packed_bytes (after the transposed input, if any). Compiled for sm_90a.
  // wgmma_chunk: channels per main-loop stage (64 bytes: 32 of f16/bf16, 16 of f32 in tf32).
  bool wgmma = false;
  int wgmma_chunk = 0;
  // staging=window on wgmma: input rows per window and bytes of one window buffer (two are kept)
  bool window = false;
  int wrows = 0;
  int64_t win_bytes = 0;
  int nog = 0, pts_bytes = 0;
  // warp-specialised wgmma forward (variant producers > 0): producer and consumer warpgroups,
  // consumer warpgroups along the rows, output channels per consumer, bytes of the rows' image
  // table; blocks per SM the kernel is compiled for
  int ws_producers = 0, ws_consumers = 0, ws_cm = 0, ws_bnw = 0, ws_row_bytes = 0;
  // backward_data: the kernel scatters into the grad-input workspace even when grad input is
  // not requested (the wgmma kernel has no null-workspace path)
  bool gin_always = false;
  // backward_data, gin_mode 3 or 4, depthwise kernel: the gather computes each contribution
  // from grad_out, the weight and the mask itself (no values buffer)
  bool gather_direct = false;
  // gin_mode 4 in deterministic mode (the depthwise kernel's default there for f16, bf16 and
  // f32 layers): deft_bwd_sort orders each cell's list by point index after the fill, so that
  // the gather's f32 sums run in a fixed order (bitwise reproducible; perf notes round B32)
  bool gather_sorted = false;
  // gin_mode 4 on an nhwc layer: deft_bwd_gather writes grad input (the layer's dtype) itself,
  // no finish kernel, no f32 workspace (workspace_bytes: the header alone)
  bool gather_out = false;
  // depthwise backward passes of nchw layers: the kernel (the data pass also its direct
  // gather) reads grad_out through a channels-last copy of workspace_gout_bytes that the
  // transpose kernel makes, one a call for both passes (per pass it counts in
  // info.workspace_bytes)
  bool gout_t = false;
  int64_t workspace_gout_bytes = 0;
  // backward_data: the grad-input workspace is channels-last (deft_bwd_finish transposes it
  // back for an nchw layer)
  bool ws_nhwc = false;
  // the direct gather's channels a lane (8: 16-byte grad_out vectors of a 16-bit layer whose
  // gather still fills kDirectGatherMaxBlocks blocks with them, round B37; 4; or 1) and its
  // warps per input pixel and offset group (each 32 x gather_vec channels)
  int gather_vec = 1;
  int gather_slices = 1;
  // depthwise backward_data with staging=window (fast mode): a block owns a tile_h x tile_w
  // tile of output pixels (tiles_y x tiles_x tiles an image) and accumulates the corners that
  // fall in its input window (win_rows x win_cols pixels, halo each side, 128 channels at a
  // time) in shared memory, flushed with one reduction per window element; corners outside go
  // to global memory as in the gather form
  bool dw_window = false;
  // depthwise backward_data without the window, lanes on channels: the block's weights (taps x
  // the offset group's channels, accumulator type) staged in dynamic shared memory as
  // [tap][channel] (perf notes round B28)
  bool dw_wsmem = false;
  int tile_h = 0, tile_w = 0, tiles_y = 0, tiles_x = 0, win_rows = 0, win_cols = 0, halo = 0;
  // gin_mode 5 (gin=local): the local gather's geometry (deft_bwd_lgather)
  struct LocalGather {
    int tile = 8;                // input pixels a tile side
    int tiles_y = 0, tiles_x = 0;
    int radius = 0;              // R: a point is near within R pixels of its tap's position
    int rows = 0, cols = 0;      // the output pixels whose near points can land in a tile
    int slices = 0;              // 128-channel slices of an offset group
    int per_block = 0;           // of them a block (grid y: offset groups x ceil(slices / per_block))
    int threads = 0;             // a block's threads (a warp per input pixel of the tile in turn)
    int64_t smem_bytes = 0;      // dynamic shared memory
  } lg;
  // depthwise backward_data with gw=fused (FUSED_GW in deform_conv_bwd_data_dw.cuh): the data
  // kernel also sums grad weight. A thread owns `vec` channels (16 or 32 bytes) of a pixel,
  // `tpc` threads of one warp a pixel (the block's tpc * vec channels lie in one offset group,
  // `cbpog` such blocks an offset group), `tb` taps a block (grid y), `split_pix` pixels a
  // block (grid z: `splits`). Workspaces: grad weight's split partials [split][tap][c] (f32)
  // and, with cbpog > 1, the point grads' partials [cbpog][pixel][offset group][tap][3].
  struct FusedGw {
    int vec = 0, tpc = 0, tb = 0, cbpog = 0, splits = 0;
    int64_t split_pix = 0;
    int64_t gw_bytes = 0, pg_bytes = 0;
  };
  bool fused_gw = false;
  FusedGw fw;
  // backward_data on wgmma: bytes of the block's grad_out tile and of one weight slice
  int64_t gout_tile_bytes = 0, slice_bytes = 0;
  int min_blocks = 1;
  // warp-specialised wgmma backward_weight (variant producers > 0): producer warpgroups; its
  // ring depth is nstage
  int bww_producers = 0;
  int bww_batch = 0;  // ... its producer lanes' items per batch of corner loads (0: codegen's rule)
  int gout_copy = 0;  // warp-specialised grad weight: bytes per grad_out copy (16, 8, 2)
  int out_store = 0;
  int64_t workspace_packed_bytes = 0;
  // forward on wgmma: deft_pack_weight's grid (blocks of 8 output channels x one chunk), and
  // for an nchw layer the input transpose's blocks that deft_transpose_pack runs before them
  int64_t pack_blocks = 0, transpose_blocks = 0;

  // Forward scratch per call: the transposed input (rounded to 256 bytes), then the krsc or
  // packed weight.
  int64_t forward_input_workspace() const {
    return transpose ? (workspace_input_bytes + 255) / 256 * 256 : 0;
  }
  int64_t forward_workspace() const {
    return forward_input_workspace() + workspace_weight_bytes + workspace_packed_bytes;
  }
  int64_t split_pix = 0;
  // backward: workspace bytes (grad-input accumulator incl. a 32-byte header / weight partials)
  int64_t workspace_bytes = 0;
  // Bytes the kernel's vector accesses need the caller's tensors aligned to (1: no more than
  // their elements); the transpose pre-pass's copies do not count. gout: grad_output.
  int align_input = 1, align_weight = 1, align_gout = 1, align_output = 1;
};

// The scratch of grad input in gather form (gin_mode 3 and 4), offsets in bytes from
// one allocation: per cell of (image, offset group, y0 + 1, x0 + 1) the count of the points
// whose floor corner it is, turned into each cell's first list entry (cells + 1 ints, zeroed
// before every call: the first `zero_bytes`); per sampling point (pixel, offset group, tap)
// its cell (-1 outside), its rank in the cell, its fractional position (ly, lx); the points
// listed cell by cell; and per point the column gradient times the mask of each of its offset
// group's channels (f32), which the gather reads once per corner (none for the depthwise
// kernel's direct gather, KernelPlan::gather_direct). With KernelPlan::gather_sorted the
// sorted lists go to the rank buffer, which the fill has read by then.
struct GatherLayout {
  int64_t points = 0, cells = 0;
  int64_t counts = 0, cell_of = 0, rank = 0, frac = 0, list = 0, values = 0, bytes = 0;
  int64_t zero_bytes = 0;
};
GatherLayout gather_layout(const LayerDesc& desc, bool direct = false);
// The layout of a plan's gather scratch (plan.gin_mode 3 or 4).
GatherLayout gather_layout(const LayerDesc& desc, const KernelPlan& plan);

// Derives the plan. Throws DescError (field of the variant text) when the variant can't run
// the layer: tile sizes that don't fit the threads, shared memory over 48 KiB, tensor cores
// for a dtype without them...
KernelPlan make_plan(const LayerDesc& desc, const Variant& variant);

// The threads an algo=gemm_wgmma variant runs: 128 for each consumer warpgroup (forward:
// tm / 64 x max(1, tn / 256), 64 x min(tn, 256) each; backward_weight: tm / 64) and for each of
// its `producers` warpgroups (templates/deform_conv_wgmma.cuh, deform_conv_bwd_weight_wgmma.cuh).
int wgmma_threads(Pass pass, int tm, int tn, int producers);

// Depthwise backward_weight (templates/deform_conv_bwd_weight_dw.cuh): the taps one block
// takes, so that a thread's sums (taps x vec channels) stay near 36 registers.
int dw_weight_taps_per_block(const LayerDesc& desc, int vec);

// staging=window on gemm_wgmma: the input rows of a block's window, for blocks of `bm` output
// pixels (consecutive in n, ho, wo order; the window serves the block's first pixel's image):
// the most output rows such a block covers, the taps' rows and the bilinear row below them,
// and `halo` more rows each side: vertical offsets in [-halo, halo + 1) stay inside.
// Block b's window starts at input row (its first pixel's ho) * stride - pad - halo.
int wgmma_window_rows(const LayerDesc& desc, int bm, int halo);

}  // namespace deft
