// Code generation: (LayerDesc, Variant) -> one CUDA translation unit. The layer's geometry and
// the variant's tile parameters become compile-time constants in a generated prelude; the
// device code itself lives in templates/*.cuh, embedded into the library at build time.
#include <map>
#include <string>

#include <fmt/format.h>

#include "compiler/codegen.hpp"
#include "compiler/plan.hpp"
#include "deft/deft.hpp"

namespace deft {

const std::map<std::string, std::string>& embedded_templates();  // generated at build time

namespace {

const std::string& template_text(const std::string& name) {
  auto& t = embedded_templates();
  auto it = t.find(name);
  if (it == t.end()) throw Error(fmt::format("internal: kernel template {} is not embedded", name));
  return it->second;
}

// The accumulator operands of an m64nBN wgmma: "%0, ..., %(BN/2 - 1)" in the instruction and
// "+f"(d[i]) in the asm statement's outputs.
struct AccOperands {
  std::string regs, outs;
};
AccOperands acc_operands(int bn) {
  AccOperands o;
  for (int i = 0; i < bn / 2; ++i) {
    o.regs += fmt::format("{}%{}", i ? ", " : "", i);
    o.outs += fmt::format("{}\"+f\"(d[{}])", i ? ", " : "", i);
  }
  return o;
}

// One wgmma.mma_async m64nBNk16 (f16, bf16) or m64nBNk8 (f32 in tf32) accumulating into acc,
// the operand list spelled out for the width, as inline PTX needs; B from a shared-memory
// descriptor, A either from registers (deft_wgmma_kstep(acc, a, desc): the register-A kernels)
// or from a second descriptor (deft_wgmma_ss(acc, da, db): the warp-specialised forward, where
// producer warps write A into shared memory; both k-major). tf32 takes no transpose operands
// (B is k-major, as the packed stages are); trans_b: B read transposed (backward_weight's
// sampled columns, channel-major).
// The wgmma wrapper for an accumulator of bn columns: A from registers (deft_wgmma_kstep) or
// from shared memory (deft_wgmma_ss); trans_a / trans_b set the transpose bits of 16-bit
// operands read from shared memory (MN-major), trans_a only with a_smem.
std::string wgmma_wrapper(const LayerDesc& d, int bn, bool trans_b, bool a_smem,
                          bool trans_a = false) {
  const bool tf32 = d.dtype == DType::f32;
  const char* ty = d.dtype == DType::bf16 ? "bf16" : tf32 ? "tf32" : "f16";
  const auto [regs, outs] = acc_operands(bn);
  const int a = bn / 2;  // the first input operand
  std::string s;
  if (a_smem) {
    s += "// wgmma with A and B in shared memory, for this consumer width (generated)\n";
    s += fmt::format("__device__ __forceinline__ void deft_wgmma_ss(float (&d)[{}], unsigned long long da,\n", bn / 2);
    s += "                                              unsigned long long db) {\n";
  } else {
    s += "// wgmma for this tile width (generated)\n";
    s += fmt::format("__device__ __forceinline__ void deft_wgmma_kstep(float (&d)[{}], const unsigned (&a)[4],\n", bn / 2);
    s += "                                                 unsigned long long desc) {\n";
  }
  s += "  asm volatile(\n";
  s += fmt::format("      \"{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{}, 0;\\n\"\n", a + (a_smem ? 2 : 5));
  s += fmt::format("      \"wgmma.mma_async.sync.aligned.m64n{}k{}.f32.{}.{} \"\n", bn, tf32 ? 8 : 16, ty, ty);
  const std::string operands =
      a_smem ? fmt::format("%{}, %{}", a, a + 1)
             : fmt::format("{{%{}, %{}, %{}, %{}}}, %{}", a, a + 1, a + 2, a + 3, a + 4);
  const std::string tail = tf32     ? ""
                           : a_smem ? fmt::format(", {}, {}", int(trans_a), int(trans_b))
                                    : fmt::format(", {}", int(trans_b));
  s += fmt::format("      \"{{{}}}, {}, p, 1, 1{};\\n}}\\n\"\n", regs, operands, tail);
  s += "      : " + outs + "\n";
  s += a_smem ? "      : \"l\"(da), \"l\"(db), \"r\"(1));\n"
              : "      : \"r\"(a[0]), \"r\"(a[1]), \"r\"(a[2]), \"r\"(a[3]), \"l\"(desc), \"r\"(1));\n";
  s += "}\n\n";
  return s;
}

// The backward_data kernels' GIN_MODE line (KernelPlan::gin_mode), with what the mode does;
// vector_reds: mode 1 reduces 16-byte vectors (the wgmma kernel).
std::string gin_mode_line(int mode, bool vector_reds) {
  const char* what = mode == 0   ? "atomics into grad_input"
                     : mode == 1 ? (vector_reds ? "f32 vector reductions into a workspace"
                                                : "f32 atomics into a workspace")
                     : mode == 2 ? "64-bit fixed-point atomics (deterministic)"
                     : mode == 3 ? "64-bit fixed point gathered per input pixel (deterministic)"
                     : mode == 4 ? "f32 sums gathered per input pixel (gin=gather)"
                     : mode == 5 ? "near points gathered per input tile, far ones reduced (gin=local)"
                                 : "gin=local in 64-bit fixed point (deterministic)";
  return fmt::format("#define GIN_MODE {}  // grad input: {}", mode, what);
}

}  // namespace

std::string generate_source(const LayerDesc& d, const Variant& v) {
  const KernelPlan p = make_plan(d, v);
  std::string s;
  auto line = [&](const std::string& l) { s += l + "\n"; };
  line("// Generated by deft " + std::string(version()) + ". Do not edit.");
  line("// layer:   " + to_string(d));
  line("// variant: " + to_string(v));
  line("#include <cuda_fp16.h>");
  line("#include <cuda_bf16.h>");
  if (p.use_tc) line("#include <mma.h>");
  line("");
  line(fmt::format("typedef {} T;        // storage", p.t));
  line(fmt::format("typedef {} Acc;      // accumulation", p.acc));
  line(fmt::format("typedef {} Pos;      // sampling positions", p.pos));
  if (!p.stage.empty()) line(fmt::format("typedef {} Stage;    // shared-memory tiles", p.stage));
  line(fmt::format("typedef {} Off;      // element offsets within one image",
                   p.wide_offsets ? "long long" : "int"));
  if (p.use_tc) {
    line(fmt::format("typedef {} TcIn;     // tensor-core operand", p.tc_in));
    if (d.dtype == DType::f32)
      line("#define TC_CONVERT(f) for (int q_ = 0; q_ < (f).num_elements; ++q_) "
           "(f).x[q_] = nvcuda::wmma::__float_to_tf32((f).x[q_])");
    else
      line("#define TC_CONVERT(f) ((void)0)");
  }
  line("");
  line("// geometry");
  auto c64 = [&](const char* name, int64_t val) {
    line(fmt::format("constexpr long long {} = {};", name, val));
  };
  auto c32 = [&](const char* name, int64_t val) {
    line(fmt::format("constexpr int {} = {};", name, val));
  };
  // the depthwise kernels' staging=window geometry (plan.dw_window: forward and grad input)
  auto dw_window = [&](const char* what) {
    line(fmt::format("#define DW_WINDOW {}  // staging=window: {}", p.dw_window ? 1 : 0, what));
    if (!p.dw_window) return;
    c32("TILE_H", p.tile_h);
    c32("TILE_W", p.tile_w);
    c32("TILES_Y", p.tiles_y);
    c32("TILES_X", p.tiles_x);
    c32("WIN_HALO", p.halo);
    c32("WIN_ROWS", p.win_rows);
    c32("WIN_COLS", p.win_cols);
    c32("SMEM_BYTES", p.smem_bytes);
  };
  c64("N", d.n);
  c64("C", d.c);
  c64("H", d.h);
  c64("W", d.w);
  c64("K", d.k);
  c64("HO", d.out_h());
  c64("WO", d.out_w());
  c32("R", d.r);
  c32("S", d.s);
  c32("SH", d.stride_h);
  c32("SW", d.stride_w);
  c32("PH", d.pad_h);
  c32("PW", d.pad_w);
  c32("DH", d.dil_h);
  c32("DW", d.dil_w);
  c32("G", d.groups);
  c32("OG", d.offset_groups);
  c32("CG", d.c_per_group());
  c32("KG", d.k_per_group());
  c32("CPOG", d.c_per_offset_group());
  line(fmt::format("constexpr bool HAS_MASK = {};", d.mask));
  line(fmt::format("constexpr bool HAS_BIAS = {};", d.bias));
  line(fmt::format("constexpr int ACT = {};  // {}", static_cast<int>(d.act), to_string(d.act)));
  line(fmt::format("constexpr bool NHWC = {};    // offset, mask, output", d.layout == Layout::nhwc));
  line(fmt::format("constexpr bool X_NHWC = {};  // input as the kernel reads it", p.x_nhwc));
  line(fmt::format("constexpr bool W_KRSC = {};  // weight as the kernel reads it", p.w_krsc));
  if (d.pass != Pass::forward)
    line(fmt::format("constexpr bool GOUT_T = {};  // grad_out read from a channels-last copy", p.gout_t));
  if (d.pass == Pass::backward_data)
    line(fmt::format("constexpr bool WS_NHWC = {};  // grad-input workspace channels-last", p.ws_nhwc));
  line("");
  line("// variant");
  if (d.pass == Pass::backward_data && v.algo == Algo::depthwise) {
    c32("PIXB", p.bp);
    c32("CL", p.tpp);
    c32("THREADS", p.block);
    c32("EV", p.ev);
    line(gin_mode_line(p.gin_mode, false));
    dw_window("corners near the tile summed in shared memory");
    line(fmt::format("#define DW_WSMEM {}  // the block's weights in shared memory [tap][channel]",
                     p.dw_wsmem ? 1 : 0));
    line(fmt::format("#define FUSED_GW {}  // gw=fused: the kernel sums grad weight too",
                     p.fused_gw ? 1 : 0));
    if (p.fused_gw) {
      c32("FVEC", p.fw.vec);
      c32("FTPC", p.fw.tpc);
      c32("FTB", p.fw.tb);
      c32("FCBPOG", p.fw.cbpog);
      c32("FSPLITS", p.fw.splits);
      c64("FSPLIT_PIX", p.fw.split_pix);
    }
    if (p.gin_local_gather()) {
      c32("LG_TH", p.lg.tile);
      c32("LG_TW", p.lg.tile);
      c32("LG_TILES_X", p.lg.tiles_x);
      c32("LG_R", p.lg.radius);
      c32("LG_RH", p.lg.rows);
      c32("LG_RW", p.lg.cols);
      c32("LG_SLICES", p.lg.slices);
      c32("LG_SPB", p.lg.per_block);
      c32("LG_THREADS", p.lg.threads);
      c64("LG_SMEM", p.lg.smem_bytes);
    }
    if (p.gather_direct) {
      line(fmt::format("#define GATHER_DIRECT 1  // the gather reads grad_out{}, weight and mask",
                       p.gout_t ? " (a channels-last copy)" : ""));
      c32("DGEV", p.gather_vec);        // its channels a lane
      c32("GSLICES", p.gather_slices);  // its warps per input pixel and offset group
      if (p.gather_out)
        line("#define GATHER_OUT 1  // the gather writes grad input itself (no finish)");
      if (p.gather_sorted)
        line("#define GATHER_SORTED 1  // deft_bwd_sort orders each cell's list (deterministic f32 sums)");
    }
  } else if (d.pass == Pass::backward_data && v.algo == Algo::gemm_wgmma) {
    c32("BP", p.bp);
    c32("BN", p.bc);
    c32("THREADS", p.block);
    c32("NSTAGE", p.nstage);
    c32("MIN_BLOCKS", p.min_blocks);
    c32("GV", p.gv);  // grad_out elements per copy
    c32("SMEM_BYTES", p.smem_bytes);
    line(gin_mode_line(p.gin_mode, true));
  } else if (d.pass == Pass::backward_data) {
    c32("BP", p.bp);
    c32("BC", p.bc);
    c32("BK", p.bk);
    if (p.use_tc) {
      c32("WK", p.wk);
      c32("FPW", p.fpw);
      c32("TC_PAD", p.a_pad);
    } else {
      c32("TM", p.tm);
      c32("TN", p.tn);
    }
    line(fmt::format("#define USE_TC {}", p.use_tc ? 1 : 0));
    c32("THREADS", p.block);
    c32("TPP", p.tpp);
    if (p.nstage > 0) {  // grad_out resident in shared memory
      c32("NSTAGE", p.nstage);
      c32("GV", p.gv);
      c32("EV", p.ev);
      c32("SMEM_BYTES", p.smem_bytes);
    } else {  // the streaming kernel's epilogue channels a thread (4 with vec=4)
      c32("EV", p.ev);
    }
    line(gin_mode_line(p.gin_mode, false));
  } else if (d.pass == Pass::backward_weight && v.algo == Algo::depthwise) {
    c32("THREADS", p.block);
    c32("VEC", p.vec);
    c32("CH_PER_BLOCK", p.ch_per_block);
    c32("TB", p.tb);
    c32("SPLITS", p.splits);
    c64("SPLIT_PIX", p.split_pix);
  } else if (d.pass == Pass::backward_weight && v.algo == Algo::gemm_wgmma) {
    c32("BO", p.bo);
    c32("BN", p.bc);
    c32("THREADS", p.block);
    c32("SPLITS", p.splits);
    c64("SPLIT_PIX", p.split_pix);
    c32("MIN_BLOCKS", 1);
    line("#define PARTIAL_TAP_MAJOR 1  // split partials [split][tap][k][c]: whole channel rows");
    line(fmt::format("#define WS {}  // warp-specialised: producer warpgroups gather the columns",
                     p.bww_producers > 0 ? 1 : 0));
    c32("PRODUCERS", p.bww_producers);
    if (p.bww_producers > 0) {
      c32("NSTAGE", p.nstage);
      // a producer lane keeps all of a chunk's corner loads in flight (8 items x 4 corners
      // with tn = 128) where the block's register cap allows it (168 a thread at 384 threads),
      // else batches of 4 items (128 at 512) or 2 (96 at 640): more spill; the variant's
      // batch (plan.bww_batch) overrides the rule
      const int cap = 65536 / int(p.block);
      c32("MAX_BATCH", p.bww_batch ? p.bww_batch : cap >= 160 ? 8 : cap >= 128 ? 4 : 2);
      c32("GOUT_COPY", p.gout_copy);  // bytes per grad_out copy
    }
    line(fmt::format("#define TF32 {}", d.dtype == DType::f32 ? 1 : 0));
  } else if (d.pass == Pass::backward_weight) {
    c32("BO", p.bo);
    c32("BC", p.bc);
    c32("BPW", p.bpw);
    if (p.use_tc) {
      c32("WK", p.wk);
      c32("FPW", p.fpw);
      c32("TC_PAD", p.a_pad);
    } else {
      c32("TMO", p.tmo);
      c32("TNC", p.tnc);
      c32("KSPLIT", p.ksplit);
    }
    line(fmt::format("#define USE_TC {}", p.use_tc ? 1 : 0));
    c32("THREADS", p.block);
    c32("SPLITS", p.splits);
    c64("SPLIT_PIX", p.split_pix);
    if (p.gv > 0) {  // vector gathers, double-buffered (deform_conv_bwd_weight_tc.cuh)
      c32("GV", p.gv);
      c32("SMEM_BYTES", p.smem_bytes);
    }
  } else if (v.algo == Algo::gemm_wgmma) {
    c32("BM", v.tile_m);
    c32("BN", v.tile_n);
    c32("THREADS", p.block);
    c32("NSTAGE", p.nstage);
    c32("KCH", (d.c_per_group() + p.wgmma_chunk - 1) / p.wgmma_chunk);
    c32("NOG", p.nog);
    c32("PTS_BYTES", p.pts_bytes);
    c32("MIN_BLOCKS", p.min_blocks);
    c32("OUT_STORE", p.out_store);  // bytes per output store
    line(fmt::format("#define TF32 {}", d.dtype == DType::f32 ? 1 : 0));
    line(fmt::format("#define WS {}  // warp-specialised: producer warpgroups sample A", p.ws_producers > 0 ? 1 : 0));
    if (p.ws_producers > 0) {
      c32("PRODUCERS", p.ws_producers);
      c32("CONSUMERS", p.ws_consumers);
      c32("CM", p.ws_cm);
      c32("BNW", p.ws_bnw);
      c32("ROW_BYTES", p.ws_row_bytes);
      // a producer lane keeps 8 items' corners (32 vectors) in flight where the register cap
      // of the block's threads allows it (setmaxnreg cannot raise the consumers' cap: ptxas
      // compiles the whole kernel to the entry count)
      c32("MAX_BATCH", 65536 / (int(p.block) * p.min_blocks) >= 128 ? 8 : 4);
    }
    line(fmt::format("#define WINDOW {}", p.window ? 1 : 0));
    // nchw: the input's transpose and the weight's pack run as one pre-pass grid (the runtime
    // launches it where the plan counts its transpose blocks)
    line(fmt::format("#define TRANSPOSE_PACK {}", p.transpose_blocks > 0 ? 1 : 0));
    if (p.window) {
      c32("HALO", v.halo);
      c32("WROWS", p.wrows);
      c32("WIN_BYTES", p.win_bytes);
    }
    // the pre-passes' grids as the runtime launches them (the templates check their formulas)
    c64("PACK_BLOCKS", p.pack_blocks);
    if (p.transpose_blocks > 0) c64("TRANSPOSE_BLOCKS", p.transpose_blocks);
  } else if (v.algo == Algo::depthwise) {
    c32("THREADS", v.threads);
    c32("VEC", p.vec);
    c32("CH_PER_BLOCK", p.ch_per_block);
    c32("PIX_PER_BLOCK", p.pix_per_block);
    c32("W_VEC", p.dw_wvec ? 1 : 0);    // the block's weights staged in shared memory
    c32("OUT_VEC", p.dw_out_vec ? 1 : 0);  // nhwc output in 16-byte stores
    dw_window("the tile's input window in shared memory");
  } else {
  c32("BM", v.tile_m);
  c32("BN", v.tile_n);
  c32("BK", v.tile_k);
  c32("THREADS", v.threads);
  c32("A_ELEMS", p.a_elems);
  c32("B_ELEMS", p.b_elems);
  c32("A_PAD", p.a_pad);
  c32("B_PAD", p.b_pad);
  c32("SMEM_BYTES", p.smem_bytes);
  // keep >= 16 warps resident per SM; FMA micro-tiles of 64 accumulator words or more take
  // the registers they need instead (a cap of 128 would spill them)
  const int acc_words = p.tm * p.tn * (p.stage == "double" ? 2 : 1);
  c32("MIN_BLOCKS", !p.use_tc && acc_words >= 64 ? 1 : std::max(1, 512 / v.threads));
  line(fmt::format("#define VEC_A {}", p.vec_a ? 1 : 0));
  line(fmt::format("#define VEC_B {}", p.vec_b ? 1 : 0));
  if (p.use_tc) {
    c32("WM", p.wm);
    c32("WN", p.wn);
    c32("FM", p.fm);
    c32("FN", p.fn);
    c32("WK", p.wk);
    line("#define USE_TC 1");
  } else {
    c32("TM", p.tm);
    c32("TN", p.tn);
    line("#define USE_TC 0");
  }
  }
  // f16: bilinear corners combined in packed half2 arithmetic (bf16's 8-bit mantissa is too
  // coarse for that; it combines in f32).
  line(fmt::format("#define HALF2_COMBINE {}", d.dtype == DType::f16 ? 1 : 0));
  line("#define KERNEL_NAME " + p.kernel_name);
  line("");
  line("// ---- templates/common.cuh ----");
  s += template_text("common.cuh");
  line("");
  if (d.pass != Pass::forward) {
    const char* common = d.pass == Pass::backward_data ? "bwd_common.cuh" : "bwd_weight_common.cuh";
    line(fmt::format("// ---- templates/{} ----", common));
    s += template_text(common);
    line("");
  }
  // the wgmma kernels: the instruction for this tile width (backward_weight reads its B, the
  // sampled columns, channel-major: transposed) and their shared helpers
  if (v.algo == Algo::gemm_wgmma) {
    // the warp-specialised grad weight: A (grad_out) from shared memory too, channel-major
    // (transposed) for nhwc
    // backward_data: A (grad_out) and B (the weight slices, channel-major) from shared memory,
    // A transposed for nchw
    const bool nchw = d.layout == Layout::nchw;
    s += p.ws_producers > 0    ? wgmma_wrapper(d, p.ws_bnw, false, true)
         : p.bww_producers > 0 ? wgmma_wrapper(d, v.tile_n, true, true, !nchw)
         : d.pass == Pass::backward_data ? wgmma_wrapper(d, v.tile_n, true, true, nchw)
                               : wgmma_wrapper(d, v.tile_n, d.pass == Pass::backward_weight, false);
    line("// ---- templates/wgmma_common.cuh ----");
    s += template_text("wgmma_common.cuh");
    line("");
  }
  line("// ---- templates/" + p.template_name + " ----");
  s += template_text(p.template_name);
  if (p.transpose || p.gout_t) {
    line("");
    line("// ---- templates/transpose.cuh ----");
    s += template_text("transpose.cuh");
  }
  return s;
}

}  // namespace deft
