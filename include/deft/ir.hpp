// deft IR: the description of one layer (LayerDesc) and of one kernel choice (Variant).
// Everything downstream (codegen, cache keys, CLI, logs) keys on the canonical text form
// printed by to_string(); parse_layer_desc(to_string(d)) == d for every valid d.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace deft {

// Every error deft raises. The message says what is wrong and, for descriptions, names the
// field and the rule it broke.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A description that breaks a rule. field() is the offending key of the text form.
class DescError : public Error {
 public:
  DescError(std::string field, const std::string& message)
      : Error(message), field_(std::move(field)) {}
  const std::string& field() const { return field_; }

 private:
  std::string field_;
};

// Raised for a kind or pass that the IR can describe but no kernel implements yet.
class NotImplemented : public Error {
 public:
  using Error::Error;
};

enum class OpKind { deform_conv2d, deform_aggregate, masked_conv2d };
enum class DType { f32, f16, bf16, f64 };
enum class MathMode { fp32, tf32 };  // tf32: f32 tensors multiplied on tensor cores
enum class Layout { nchw, nhwc };
enum class Pass { forward, backward_data, backward_weight };
enum class Activation { none, relu, gelu };

std::string_view to_string(OpKind);
std::string_view to_string(DType);
std::string_view to_string(MathMode);
std::string_view to_string(Layout);
std::string_view to_string(Pass);
std::string_view to_string(Activation);
int dtype_size(DType);

// One layer. Field names follow the text form:
//   deform_conv2d:    input [n,c,h,w], weight [k, c/groups, r, s] (nhwc: [k, r, s, c/groups]),
//                     offset [n, 2*offset_groups*r*s, ho, wo] as (dy, dx) per tap, row-major taps,
//                     mask [n, offset_groups*r*s, ho, wo], output [n, k, ho, wo]
//                     (nhwc: the same tensors channels-last). Semantics of
//                     torchvision.ops.deform_conv2d.
//   deform_aggregate: DCNv3/v4 aggregation, channels-last: input [n,h,w,c] with c = groups*gc,
//                     offset [n,ho,wo,groups*P*2] and tap weights [n,ho,wo,groups*P], P = r*s
//                     (minus one with remove_center); k must equal c.
//   masked_conv2d:    a dense convolution evaluated only where an input mask [n,ho,wo] is set.
struct LayerDesc {
  OpKind op = OpKind::deform_conv2d;
  int64_t n = 1, c = 1, h = 1, w = 1, k = 1;
  int r = 1, s = 1;  // kernel height, width
  int stride_h = 1, stride_w = 1;
  int pad_h = 0, pad_w = 0;
  int dil_h = 1, dil_w = 1;
  int groups = 1;
  int offset_groups = 1;
  bool mask = false;  // deform_conv2d: modulation mask (DCNv2)
  // deform_aggregate options
  bool softmax = false;
  double offset_scale = 1.0;
  bool remove_center = false;
  DType dtype = DType::f32;
  MathMode math = MathMode::fp32;
  Layout layout = Layout::nchw;
  Pass pass = Pass::forward;
  bool bias = false;
  Activation act = Activation::none;

  int64_t out_h() const { return (h + 2 * pad_h - (int64_t)dil_h * (r - 1) - 1) / stride_h + 1; }
  int64_t out_w() const { return (w + 2 * pad_w - (int64_t)dil_w * (s - 1) - 1) / stride_w + 1; }
  int taps() const { return r * s; }
  int64_t c_per_group() const { return c / groups; }
  int64_t k_per_group() const { return k / groups; }
  int64_t c_per_offset_group() const { return c / offset_groups; }

  bool operator==(const LayerDesc&) const = default;
};

// Canonical one-line text form. Fields always printed, in this order:
//   <op> n= c= h= w= k= r= s= [stride=] pad= [dilation=] groups= offset_groups= mask=
//   dtype= [math=] layout= [pass=] [bias=] [act=]
// Bracketed fields appear only when they differ from their default; a pair whose two values
// differ prints as AxB (height x width). deform_aggregate adds softmax=, offset_scale= and
// remove_center= after mask=.
std::string to_string(const LayerDesc&);

// Parses the text form (any field order, missing fields take their defaults) and validates it.
// Throws DescError naming the field on an unknown key, a malformed value or a broken rule.
LayerDesc parse_layer_desc(std::string_view text);

// Throws DescError naming the first field that breaks a rule, e.g.
// "groups=3 does not divide c=64".
void validate(const LayerDesc&);

// Throws NotImplemented when no kernel exists for the description's kind and pass.
void require_implemented(const LayerDesc&);

// ---- Variants -----------------------------------------------------------------------------

enum class Algo {
  gemm_simt,     // implicit GEMM, bilinear samples gathered into the A tile, CUDA-core FMA
  gemm_tc,       // the same with the tile product on tensor cores (f16, bf16, tf32)
  depthwise,     // groups == c == k: per (pixel, channel) accumulation, no GEMM
  gemm_wgmma,    // Hopper warpgroup tensor cores (sm_90 only; f16, bf16, tf32; channels-last
                 // input or transpose=1): forward sampling into the register A fragments, or
                 // with producers > 0 into shared memory; also backward_weight (f16,
                 // bf16; the sm_90 default there with producers) and backward_data (f16,
                 // bf16; opt-in)
};
enum class Staging {
  gather,  // each sample's four corners read straight from global memory
  window,  // the tile's input window (plus a halo) staged in shared memory; outside: global
};

std::string_view to_string(Algo);
std::string_view to_string(Staging);

// The choices one kernel makes. Plain data: codegen turns (LayerDesc, Variant) into source.
struct Variant {
  Algo algo = Algo::gemm_simt;
  int tile_m = 64;   // output pixels per block
  int tile_n = 64;   // output channels per block
  int tile_k = 16;   // reduction slice per main-loop step
  int threads = 256;
  int vec = 1;       // channels per vector access (depthwise, nhwc)
  Staging staging = Staging::gather;
  int halo = 0;      // window staging: extra input rows/cols each side
  bool transpose = false;  // nchw gemm: transpose input to nhwc (and weight to krsc) first
  // Backward passes: bitwise-reproducible accumulation (printed as det=1 only when set).
  bool deterministic = false;
  // gemm_wgmma: depth of the weight ring in shared memory, 2 to 4 (printed as stages=N only
  // when set; 0 = the plan's choice). Fewer stages leave more of the SM's 256 KiB to L1. With
  // producers: the depth of the A + weight ring, 2 to 8, at least 4 * producers. backward_data:
  // the depth of each warpgroup's weight ring, 3 to 8.
  int stages = 0;
  // gemm_wgmma forward: producer warpgroups that sample the A tile into shared memory while
  // consumer warpgroups only issue wgmmas (printed as producers=N only when set; 0 = the
  // warpgroups sample their own rows into the register A fragments). With producers,
  // threads = 128 * (producers + consumers), consumers = tm / 64 * max(1, tn / 256).
  // gemm_wgmma backward_weight: producer warpgroups gather the sampled columns into a ring
  // while tm / 64 consumers copy grad_out into shared memory and issue the wgmmas,
  // threads = 2 * tm + 128 * producers (the sm_90 f16/bf16 default; producers=0 keeps every
  // warp gathering and the grad_out fragments in registers).
  int producers = 0;
  // gemm_wgmma backward_weight with producers: the sampled rows (items) a producer lane keeps
  // in flight, four corner loads each: 2, 4 or 8, at most a chunk's items (printed as batch=N
  // only when set; 0 = as many as the block's register share allows by the generator's rule).
  int batch = 0;
  // depthwise backward_data, fast mode: grad input gathered per input pixel (f32 sums, no
  // atomics) instead of scattered with float atomics (printed as gin=gather only when set).
  // Deterministic mode gathers wherever it can, with or without it.
  bool gin_gather = false;
  // depthwise backward_data, fast mode: grad input of the points whose floor corner lies within
  // `halo` pixels of its zero-offset position gathered per input tile in shared memory (no
  // reductions), the rest scattered with float reductions (printed as gin=local; halo is the
  // radius). Not with gin_gather. With deterministic: both kernels in 64-bit fixed point
  // (bitwise reproducible; opt-in, slower than the deterministic default).
  bool gin_local = false;
  // depthwise backward_data: grad weight computed by the data kernel itself, from the corners
  // it loads for grad offset and grad mask (printed as gw=fused only when set). Its own thread
  // layout: threads and vec (16 or 32 bytes of channels a thread; vec=1: 16 bytes) set it, tm,
  // tn and tk are not read. The backward call then runs no grad-weight kernel (grad bias
  // still has its own); a call without grad weight discards the kernel's sums.
  bool fuse_gw = false;

  bool operator==(const Variant&) const = default;
};

// "algo=gemm_simt tm=64 tn=64 tk=16 threads=256 vec=1 staging=gather halo=0 transpose=0"
// Backward passes read the tile fields as: backward_data tm = output pixels per block,
// tn = input channels per step, tk = output channels per reduction slice; backward_weight
// tm = output channels per block, tn = input channels per block, tk = pixels per slice;
// depthwise backward_weight: tn = channels per block, tm = pixels per block step
// (threads * vec / tn), tk = pixel steps per thread (a block reduces tm * tk pixels).
std::string to_string(const Variant&);
Variant parse_variant(std::string_view text);

// Throws DescError (field names of the variant text) if the variant cannot run the layer.
void validate(const LayerDesc&, const Variant&);

// The heuristic choice from the description alone (until the tuner has a record).
Variant default_variant(const LayerDesc&);
// The same for a GPU of compute capability `arch` (e.g. 90): on sm_90, forward layers that
// algo=gemm_wgmma can run take it, and so do f16/bf16 backward passes (grad weight; grad input
// in the fast mode only: `deterministic` keeps the WMMA kernel there); arch 0 means unknown
// (the portable choice above).
Variant default_variant(const LayerDesc&, int arch, bool deterministic = false);
// True when the variant's kernel runs only on exactly this architecture family (sm_90a
// instructions): algo=gemm_wgmma needs arch 90.
bool variant_needs_sm90a(const Variant&);

}  // namespace deft
