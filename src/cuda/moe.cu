// Expert matmuls of the MoE layer (cuda/moe.h) on tensor cores: mma.sync m16n8k16, bf16
// operands, fp32 accumulators.
//
// Shape of the work. The weight is the MMA's A operand (M = output features) and the
// activations its B operand (N = assignments), so a tile pads the assignments of an expert
// to a multiple of 8, not 16: decode, with a handful of rows per expert, wastes little. A CTA
// computes kRowsW features x kRowsX consecutive slots of one expert; grid.x walks the
// features (so the CTAs that share one tile of activations run together and read it from L2),
// grid.y the (expert, slot tile) pairs, found by each CTA from expert_offsets with one warp's
// prefix scan (no host sync, no scratch memory, graph capturable). K streams through a
// multi-stage cp.async pipeline of the raw weight bytes (MXFP4 codes, or bf16) and the bf16
// activation rows (gathered by token for gate_up).
//
// MXFP4 decode. Each thread decodes, straight into its A fragment registers, the codes that
// its MMAs use: one 32-bit word (8 codes of one row, k .. k+7) gives 4 bf16 pairs (k+j, k+j+4),
// cheap to build (mask, multiply, mask; the MMA only needs A and B to pair the same k), and a
// byte permute pairs the activations of a 16-byte load the same way. A code's 3 magnitude bits
// become the two low exponent bits and the top mantissa bit of a bf16 (fp4 * 2^-126, E2M1's
// subnormal 0.5 landing on the bf16 subnormal 2^-127) and exact bf16x2 multiplies by powers
// of two apply 2^126 * 2^(scale - 127): bit for bit io/mxfp4's decode, including scale 255
// (0.5 -> 2^127, zero codes 0, larger codes inf) and scale 0 (bf16 subnormals). The integer
// work is split between the ALU (masks) and the FMA pipe (multiplies): decode is ALU bound.
//
// Decode, streamed (expert_stream_kernel). With MXFP4 weights, no adapter and a few slots on
// a few experts (batch 1: 4 experts, 1 slot each), the tiled grid is too small to keep memory
// busy: a second kernel loads the mma fragments straight from global memory into registers
// (as cuda/gemv.cu does), one 16-row tile of an expert and its slots (up to 8) a work item,
// with K split over the warps of a CTA and the grid sized to the GPU (dispatch says when).
//
// Epilogues. gate_up permutes the weight rows of each 16-row MMA tile as it stages them
// (gate rows 0,2,..,14 to tile rows 0..7, up rows to 8..15), so each thread holds the gate
// and the up value of the same unit and slot and applies the clamped SwiGLU in registers,
// writing bf16 h in slot order. down adds the bias and scatters fp32 rows to y by assignment.
//
// LoRA. An expert adapter extends the reduction: r more k steps (padded to 16) multiply B_e's
// rows (the same weight rows, permuted as above) by the slots' u = scale · act · A_eᵀ, so the
// update lands in the accumulators before the epilogue; after the last K tile for decode
// tilings, before the first for the wider ones (see lora_extension). Its fragments come
// straight from global memory: r is small, and B_e's rows for a CTA are read once. The
// extension is a template flag, so the kernels without an adapter (the rollout hot path)
// compile exactly as before.
//
// u is a grouped [slots, in] x [in, r] product written in slot order by expert_lora_u_kernel
// before the matmul: per CTA one tile of an expert's slots and 16 ranks, `in` split over 16
// warps that load their mma fragments straight from global memory in 16-byte pieces (as
// cuda/gemv.cu does: one look at each activation and A value, no staging), summed over the
// warps in a fixed order. Its cost is one round trip to memory at decode and a read of the
// activations at prefill, and the matmul hides it: it streams its weights while u is computed
// and waits for u only where the extension reads it (see below).
//
// Programmatic dependent launch (cuda/launch.cuh). Every kernel here is launched as the
// dependent of the kernel before it, and what a matmul reads before its wait follows
// from what runs before it: gate_up without an adapter follows the routing kernel, so it waits first;
// down follows gate_up, which releases after its wait, so the routing (two launches back) is
// complete and down locates its tile and starts its weight pipeline (streamed: its first
// weight loads) while gate_up finishes, waiting only before h; with an adapter the u kernel
// runs in between, so the activations are two launches back as well and the matmul's only
// wait is the extension's, for u.
#include "cuda/moe.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/check.h"
#include "cuda/launch.cuh"

namespace ossrl::cuda {
namespace {

constexpr int kBlockValues = 32;  // MXFP4 block: 32 values along `in`, 16 bytes + 1 scale
constexpr float kSwiGluAlpha = 1.702f;

// ---- device primitives

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without a register round trip. Where !valid nothing is read
// and the destination is zero-filled: that pads the K tail and the rows past the end.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// d[16x8] += a[16x16] * b[16x8], bf16 in, fp32 accumulate (PTX fragment layouts: a row-major
// {row g k 2t..2t+1, row g+8 same, row g k 2t+8.., row g+8 k 2t+8..}, b {k 2t.., k 2t+8..} of
// column g, d {row g cols 2t,2t+1, row g+8 same}; g = lane / 4, t = lane % 4).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Round-to-nearest bf16x2 product; subnormals are kept (bf16 arithmetic has no flush).
__device__ __forceinline__ uint32_t mul_bf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// a * b on the FMA pipe (IMAD): the decode below keeps its multiplies off the integer ALU,
// which its masks already keep busy.
__device__ __forceinline__ uint32_t mul_lo(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.lo.u32 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The two E2M1 codes selected by `mask` (one nibble in each 16-bit half of `codes`, at bits
// 4j.. of its half) as a bf16 pair equal to fp4 * 2^-126: one multiply makes two copies of each
// nibble, at 6 and at 12 bits above bit 0 of its half; the copy at 6 gives the 3 magnitude bits
// their bf16 place (the two low exponent bits and the top mantissa bit, so E2M1's subnormal 0.5
// lands on the bf16 subnormal 2^-127, exact), the copy at 12 the sign bit (bit 15).
template <uint32_t kMask, uint32_t kCopies>
__device__ __forceinline__ uint32_t fp4_pair_bits(uint32_t codes) {
  return mul_lo(codes & kMask, kCopies) & 0x81C081C0u;
}

// The 8 weights of one row in a 32-bit word of codes (element i in nibble i) sharing E8M0
// `scale`, as the bf16 pairs (w0, w4), (w1, w5), (w2, w6), (w3, w7): fp4 * 2^(scale - 127),
// exactly. The factor 2^126 * 2^(scale - 127) is split as 2^(min(scale,128) - 1) *
// 2^(max(scale,128) - 128) so both are bf16 normals; each product is exact (a power-of-two
// scaling of a value with two significant bits) except where the true value reaches 2^128,
// which rounds to inf as ldexp does. Without kAnyScale the caller guarantees scale <= 128
// (true of every real checkpoint) and the second factor, 1, is skipped.
template <bool kAnyScale>
__device__ __forceinline__ void decode_fp4_word(uint32_t (&pairs)[4], uint32_t codes, uint32_t scale) {
  const uint32_t upper = codes >> 8;  // nibbles 2, 3 and 6, 7 down to where 0, 1 and 4, 5 were
  const uint32_t bits[4] = {fp4_pair_bits<0x000F000Fu, 0x1040u>(codes), fp4_pair_bits<0x00F000F0u, 0x0104u>(codes),
                            fp4_pair_bits<0x000F000Fu, 0x1040u>(upper), fp4_pair_bits<0x00F000F0u, 0x0104u>(upper)};
  const uint32_t low = ((kAnyScale ? min(scale, 128u) : scale) + 126u) * 0x00800080u;  // exponent << 7, both halves
#pragma unroll
  for (int i = 0; i < 4; ++i) pairs[i] = mul_bf16x2(bits[i], low);
  if constexpr (kAnyScale) {
    const uint32_t high = (max(scale, 128u) - 1u) * 0x00800080u;
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = mul_bf16x2(pairs[i], high);
  }
}

// 16 bytes of read-only global memory, or zeros where !valid (then nothing is read). Not
// volatile: the loads of a batch may be scheduled together, ahead of their mmas. Every caller
// reads its bytes once (streamed weights; a CTA's adapter rows and activations), so they are
// kept out of L1.
__device__ __forceinline__ uint4 load16_or_zero(const void* p, bool valid) {
  uint4 v;
  asm("{\n"
      " .reg .pred p;\n"
      " setp.ne.b32 p, %5, 0;\n"
      " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      "}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(valid)));
  return v;
}

// The clamped SwiGLU of one unit, from its gate and up values (bias included), rounded to bf16.
__device__ __forceinline__ __nv_bfloat16 clamped_swiglu(float gate, float up, float limit) {
  // The CPU reference's std::min / std::clamp, NaN included.
  gate = limit < gate ? limit : gate;
  up = up < -limit ? -limit : (limit < up ? limit : up);
  const float glu = gate * (1.0f / (1.0f + expf(-gate * kSwiGluAlpha)));
  return __float2bfloat16_rn((up + 1.0f) * glu);
}

// body(i) for i = tid, tid + kThreads, ... < kCount, unrolled (compile-time trip count).
template <int kCount, int kThreads, class Body>
__device__ __forceinline__ void for_each_chunk(int tid, Body body) {
#pragma unroll
  for (int j = 0; j < (kCount + kThreads - 1) / kThreads; ++j) {
    const int i = tid + j * kThreads;
    if (kCount % kThreads == 0 || i < kCount) body(i);
  }
}

// ---- tiling

// A CTA: kWarpsM x kWarpsN warps, each computing kMi 16-feature tiles x kNi 8-slot tiles;
// K advances kBlocks 32-wide blocks per pipeline stage, kStages stages deep.
template <int kWarpsM_, int kWarpsN_, int kMi_, int kNi_, int kBlocks_, int kStages_, int kMinCtas_>
struct Tiling {
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kMi = kMi_, kNi = kNi_;
  static constexpr int kBlocks = kBlocks_, kStages = kStages_, kMinCtas = kMinCtas_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kRowsW = 16 * kMi * kWarpsM;  // output features per CTA
  static constexpr int kRowsX = 8 * kNi * kWarpsN;   // slots (activation rows) per CTA
  // Power of two, >= 2: the shared-memory swizzles below need it.
  static_assert(kBlocks >= 2 && (kBlocks & (kBlocks - 1)) == 0, "kBlocks must be a power of two >= 2");
  static_assert(kStages >= 2, "a pipeline needs two stages");
};

// Shared-memory swizzles (16-byte chunk c of tile row r -> physical chunk), chosen so that each
// fragment load of the main loop touches every bank once per quarter warp:
// - bf16 rows (activations; bf16 weights): a quarter warp reads chunks 4w..4w+3 of two
//   adjacent rows; flipping bit 2 on odd rows puts the two rows in opposite halves of the 8
//   bank groups (rows are multiples of 128 bytes since kBlocks >= 2).
// - MXFP4 rows (kBlocks chunks of 16 bytes, one per block): a warp reads the same chunk of
//   8 consecutive rows; the XOR spreads them over the 8 bank groups.
__device__ __forceinline__ int bf16_chunk(int r, int c) { return c ^ ((r & 1) << 2); }
template <int kChunks>
__device__ __forceinline__ int fp4_chunk(int r, int c) {
  if constexpr (kChunks >= 8) {
    return c ^ (r & 7);
  } else {
    return c ^ ((r / (8 / kChunks)) & (kChunks - 1));
  }
}

// Bytes of one pipeline stage and of the whole dynamic shared memory.
template <class T, bool kMxfp4>
struct StageLayout {
  static constexpr int kWRowBytes = kMxfp4 ? 16 * T::kBlocks : 64 * T::kBlocks;
  static constexpr int kXRowBytes = 64 * T::kBlocks;
  static constexpr int kWBytes = T::kRowsW * kWRowBytes;
  static constexpr int kStageBytes = kWBytes + T::kRowsX * kXRowBytes;
  // MXFP4 scales of the CTA's rows for all of K follow the stages.
  static size_t bytes(int nblocks) {
    const size_t scales = kMxfp4 ? (size_t(T::kRowsW) * nblocks + 15) / 16 * 16 : 0;
    return size_t(T::kStages) * kStageBytes + scales;
  }
};

struct MatmulArgs {
  const __nv_bfloat16* act;  // gate_up: x [n_tokens, in], gathered by token; down: h [n*k, in]
  const int32_t* sorted_assignments;
  const int32_t* expert_offsets;
  int k;
  ExpertWeights w;
  __nv_bfloat16* h;  // gate_up output [n*k, out/2]
  float* y;          // down output [n*k, out]
  float swiglu_limit;
};

// An expert adapter's update as the matmul reads it: B [experts, out, r] bf16 and u [n*k, r]
// bf16 in slot order. A kernel parameter of its own: growing MatmulArgs changes the register
// allocation of every kernel, LoRA or not.
struct LoraArgs {
  const __nv_bfloat16* b = nullptr;
  const __nv_bfloat16* u = nullptr;
  int r = 0;
};

struct SlotTile {
  int expert = 0;
  int begin = 0;  // first slot (index into sorted_assignments)
  int rows = 0;   // 0: past the last tile, nothing to do
};

// The list "experts in order, each cut into ceil(count / kRows) tiles of consecutive slots",
// as one warp sees it: lane l sums the tile counts of a run of experts and a warp scan gives
// each lane the index of its first tile and every lane the list's length.
template <int kRows>
struct TileList {
  int experts, tiles, exclusive, total;

  __device__ TileList(const int32_t* offsets, int experts_, int lane) : experts(experts_) {
    const int per_lane = (experts + 31) / 32, first = lane * per_lane;
    tiles = 0;
    for (int i = 0; i < per_lane; ++i) {
      const int e = first + i;
      if (e < experts) tiles += (offsets[e + 1] - offsets[e] + kRows - 1) / kRows;
    }
    int inclusive = tiles;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
      if (lane >= d) inclusive += v;
    }
    exclusive = inclusive - tiles;
    total = __shfl_sync(0xffffffffu, inclusive, 31);
  }

  // Tile `index` (rows 0 past the end): a ballot finds the lane holding it, which walks its
  // experts. Called by the whole warp.
  __device__ SlotTile find(const int32_t* offsets, int index, int lane) const {
    const unsigned owner = __ballot_sync(0xffffffffu, exclusive <= index && index < exclusive + tiles);
    SlotTile tile;
    if (owner == 0) return tile;
    const int src = __ffs(owner) - 1;
    if (lane == src) {
      const int per_lane = (experts + 31) / 32, first = lane * per_lane;
      int rest = index - exclusive;
      for (int i = 0; i < per_lane; ++i) {
        const int e = first + i;
        const int begin = offsets[e], count = offsets[e + 1] - begin;
        const int n = (count + kRows - 1) / kRows;
        if (rest < n) {
          tile.expert = e;
          tile.begin = begin + rest * kRows;
          tile.rows = min(kRows, count - rest * kRows);
          break;
        }
        rest -= n;
      }
    }
    tile.expert = __shfl_sync(0xffffffffu, tile.expert, src);
    tile.begin = __shfl_sync(0xffffffffu, tile.begin, src);
    tile.rows = __shfl_sync(0xffffffffu, tile.rows, src);
    return tile;
  }
};

// Tile `index` of the TileList, run by one warp.
template <int kRows>
__device__ SlotTile locate_tile(const int32_t* offsets, int experts, int index, int lane) {
  return TileList<kRows>(offsets, experts, lane).find(offsets, index, lane);
}

// 2 bytes of global memory, or 0 where !valid (then nothing is read). Predicated, not
// branched around, so the loads of a LoRA extension step issue together.
__device__ __forceinline__ uint32_t load_u16_or_zero(const void* p, bool valid) {
  uint16_t v;
  asm volatile(
      "{\n"
      " .reg .pred p;\n"
      " setp.ne.b32 p, %2, 0;\n"
      " mov.b16 %0, 0;\n"
      " @p ld.global.u16 %0, [%1];\n"
      "}\n"
      : "=h"(v)
      : "l"(p), "r"(int(valid)));
  return v;
}

// Ranks q .. q + 3 of a bf16 row of r (B_e's or u's) as the MMA pairs (q, q + 1), (q + 2,
// q + 3); 0 past r, or where !valid (a feature or slot past the tile's end).
__device__ __forceinline__ uint2 lora_quad(const __nv_bfloat16* row, int q, int r, bool valid) {
  uint32_t v[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = load_u16_or_zero(row + q + i, valid && q + i < r);
  return make_uint2(v[0] | v[1] << 16, v[2] | v[3] << 16);
}

// Tile row -> weight row (relative to the CTA's first feature). gate_up: within each
// 16-row MMA tile, rows 0..7 hold the gates 0,2,..,14 and rows 8..15 the ups 1,3,..,15.
template <bool kGateUp>
__device__ __forceinline__ int weight_row(int r) {
  if constexpr (kGateUp) {
    return (r & ~15) | ((r & 7) << 1) | ((r >> 3) & 1);
  } else {
    return r;
  }
}

// One expert matmul, either projection, either weight format (see the top of the file).
//   gate_up (kGateUp): act = x [n_tokens, in]; slot j reads row sorted_assignments[j] / k;
//                      h [n*k, out/2] bf16 = SwiGLU(act · Wᵀ + b), rows in slot order.
//   down:              act = h [n*k, in], slot j reads row j; y [n*k, out] fp32, row
//                      sorted_assignments[j] = act · Wᵀ + b.
// kLora: plus the expert adapter's update (`lora`, unread without).
template <class T, bool kMxfp4, bool kGateUp, bool kLora>
__global__ void __launch_bounds__(T::kThreads, T::kMinCtas) expert_matmul_kernel(const MatmulArgs args,
                                                                                      const LoraArgs lora) {
  using Layout = StageLayout<T, kMxfp4>;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ SlotTile s_tile;
  __shared__ int32_t s_act_row[T::kRowsX];     // activation row read by each slot of the tile
  __shared__ int32_t s_assignment[T::kRowsX];  // its assignment (t * k + s)

  // What is complete before this grid's wait (see the top of the file): the routing arrays
  // except for gate_up without an adapter, the activations only with an adapter.
  constexpr bool kRoutingEarly = kLora || !kGateUp;
  constexpr bool kActivationsEarly = kLora;
  const auto wait_and_release = [] {
    wait_for_producers();
    release_dependents();
  };
  if constexpr (!kRoutingEarly) wait_and_release();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (warp == 0) {
    const SlotTile tile = locate_tile<T::kRowsX>(args.expert_offsets, args.w.experts, blockIdx.y, lane);
    if (lane == 0) s_tile = tile;
  }
  __syncthreads();
  const SlotTile tile = s_tile;
  if (tile.rows == 0) {  // the grid is a bound on the tile count
    if constexpr (kRoutingEarly) wait_for_producers();  // every CTA waits before it leaves
    return;
  }

  const ExpertWeights& w = args.w;
  const int out = w.out, in = w.in, nblocks = in / kBlockValues;
  const int feature_begin = blockIdx.x * T::kRowsW;
  const int k_tiles = (nblocks + T::kBlocks - 1) / T::kBlocks;
  uint8_t* const s_scales = smem + T::kStages * Layout::kStageBytes;

  // MXFP4 scales of the tile's rows, all of K: one contiguous run in global memory.
  const int scale_bytes = kMxfp4 ? min(T::kRowsW, out - feature_begin) * nblocks : 0;
  if constexpr (kMxfp4) {
    const uint8_t* src = w.scales + (size_t(tile.expert) * out + feature_begin) * nblocks;
    int done = 0;
    if ((reinterpret_cast<uintptr_t>(src) & 15) == 0) {
      done = scale_bytes / 16 * 16;
      for (int i = 16 * tid; i < done; i += 16 * T::kThreads) copy16_async(s_scales + i, src + i, true);
    }
    for (int i = done + tid; i < scale_bytes; i += T::kThreads) s_scales[i] = src[i];
  }

  // Weight tile of K step `kt` into stage `stage`.
  auto load_weights = [&](int stage, int kt) {
    uint8_t* dst = smem + stage * Layout::kStageBytes;
    constexpr int kChunksPerRow = Layout::kWRowBytes / 16;
    for_each_chunk<T::kRowsW * kChunksPerRow, T::kThreads>(tid, [&](int i) {
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      const int row = feature_begin + weight_row<kGateUp>(r);
      if constexpr (kMxfp4) {
        const int kb = kt * T::kBlocks + c;
        const bool valid = row < out && kb < nblocks;
        const uint8_t* src =
            valid ? w.blocks + ((size_t(tile.expert) * out + row) * nblocks + kb) * 16 : w.blocks;
        copy16_async(dst + r * Layout::kWRowBytes + fp4_chunk<T::kBlocks>(r, c) * 16, src, valid);
      } else {
        const int kb = kt * T::kBlocks + c / 4;
        const bool valid = row < out && kb < nblocks;
        const __nv_bfloat16* src =
            valid ? w.dense + (size_t(tile.expert) * out + row) * in + kb * kBlockValues + (c % 4) * 8 : w.dense;
        copy16_async(dst + r * Layout::kWRowBytes + bf16_chunk(r, c) * 16, src, valid);
      }
    });
  };
  // Activation rows of K step `kt` into stage `stage`.
  auto load_activations = [&](int stage, int kt) {
    uint8_t* dst = smem + stage * Layout::kStageBytes + Layout::kWBytes;
    constexpr int kChunksPerRow = Layout::kXRowBytes / 16;
    for_each_chunk<T::kRowsX * kChunksPerRow, T::kThreads>(tid, [&](int i) {
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      const int kb = kt * T::kBlocks + c / 4;
      const bool valid = r < tile.rows && kb < nblocks;
      const __nv_bfloat16* src =
          valid ? args.act + size_t(s_act_row[r]) * in + kb * kBlockValues + (c % 4) * 8 : args.act;
      copy16_async(dst + r * Layout::kXRowBytes + bf16_chunk(r, c) * 16, src, valid);
    });
  };

  // The weights do not depend on the slots: start them before the slot indices arrive.
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < k_tiles) load_weights(s, s);
  }
  for (int r = tid; r < T::kRowsX; r += T::kThreads) {
    const int a = r < tile.rows ? args.sorted_assignments[tile.begin + r] : 0;
    s_assignment[r] = a;
    s_act_row[r] = r < tile.rows ? (kGateUp ? a / args.k : tile.begin + r) : 0;
  }
  __syncthreads();
  if constexpr (kRoutingEarly && !kActivationsEarly) wait_and_release();  // h, from gate_up just before
  // Group s holds stage s's activations (and, for s = 0, every prologue weight tile and the
  // scales), so waiting for group s means stage s is complete.
#pragma unroll
  for (int s = 0; s < T::kStages - 1; ++s) {
    if (s < k_tiles) load_activations(s, s);
    commit_async();
  }

  const int wm = warp % T::kWarpsM, wn = warp / T::kWarpsM;
  const int g = lane >> 2, t = lane & 3;
  const int w_row0 = wm * T::kMi * 16 + g;  // tile row of this thread's first A row
  const int x_row0 = wn * T::kNi * 8 + g;   // tile row of this thread's first B column

  float acc[T::kMi][T::kNi][4];
#pragma unroll
  for (int mi = 0; mi < T::kMi; ++mi)
#pragma unroll
    for (int ni = 0; ni < T::kNi; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

  // LoRA: the reduction continues over the adapter's r (see the top of the file), 16 ranks a
  // step, lane t taking ranks k0 + 4t .. k0 + 4t + 3 of its B_e rows and slots: an order of the
  // k terms that A and B share, so each thread loads 4 consecutive ranks a row, all the step's
  // loads before its MMAs. u is the u kernel's output, this grid's programmatic dependency.
  // Decode tilings (<= 16 slots, one wave of CTAs streaming their weights) extend after the
  // main loop, so the u kernel runs hidden behind it; the wider ones (many waves of CTAs, the
  // u grid long over for most) extend before it, where the loads overlap the pipeline's fill
  // instead of adding a round trip to the end of every CTA.
  constexpr bool kLoraFirst = T::kRowsX > 16;
  [[maybe_unused]] auto lora_extension = [&] {
    wait_and_release();
    const int r = lora.r;
    const __nv_bfloat16* b_expert = lora.b + size_t(tile.expert) * out * r;
    for (int k0 = 0; k0 < r; k0 += 16) {
      const int q = k0 + 4 * t;
      uint2 b_rows[T::kMi][2], u_rows[T::kNi];
#pragma unroll
      for (int mi = 0; mi < T::kMi; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int f = feature_begin + weight_row<kGateUp>(w_row0 + mi * 16 + 8 * h);
          b_rows[mi][h] = lora_quad(b_expert + size_t(f) * r, q, r, f < out);
        }
      }
#pragma unroll
      for (int ni = 0; ni < T::kNi; ++ni) {
        const int slot = x_row0 + ni * 8;
        u_rows[ni] = lora_quad(lora.u + size_t(tile.begin + slot) * r, q, r, slot < tile.rows);
      }
#pragma unroll
      for (int mi = 0; mi < T::kMi; ++mi) {
        const uint32_t a[4] = {b_rows[mi][0].x, b_rows[mi][1].x, b_rows[mi][0].y, b_rows[mi][1].y};
#pragma unroll
        for (int ni = 0; ni < T::kNi; ++ni) mma_bf16(acc[mi][ni], a, u_rows[ni].x, u_rows[ni].y);
      }
    }
  };
  if constexpr (kLora) {
    if constexpr (kLoraFirst) lora_extension();
  }

  // The MMAs of stage kt. kTail: the last, partial stage, whose blocks past the end of K are
  // skipped; kAnyScale: see decode_fp4_word.
  auto compute_stage = [&](int kt, auto any_scale, auto tail) {
    [[maybe_unused]] constexpr bool kAnyScale = decltype(any_scale)::value;
    constexpr bool kTail = decltype(tail)::value;
    const uint8_t* stage_w = smem + (kt % T::kStages) * Layout::kStageBytes;
    const uint8_t* stage_x = stage_w + Layout::kWBytes;
#pragma unroll
    for (int b = 0; b < T::kBlocks; ++b) {
      const int kb = kt * T::kBlocks + b;
      if (kTail && kb >= nblocks) break;
      // A: rows r0 = w_row0 + 16 mi and r0 + 8 at k = 32 kb + 8t + (0..7), as 4 pairs each
      // (MXFP4: (k, k+4) for k = 0..3; bf16: (0,1), (2,3), (4,5), (6,7)), the first two making
      // the block's first k16 step, the last two its second.
      uint32_t a[T::kMi][2][4];
#pragma unroll
      for (int mi = 0; mi < T::kMi; ++mi) {
        const int r0 = w_row0 + mi * 16, r1 = r0 + 8;
        uint32_t p0[4], p1[4];
        if constexpr (kMxfp4) {
          const uint32_t q0 = *reinterpret_cast<const uint32_t*>(
              stage_w + r0 * Layout::kWRowBytes + fp4_chunk<T::kBlocks>(r0, b) * 16 + 4 * t);
          const uint32_t q1 = *reinterpret_cast<const uint32_t*>(
              stage_w + r1 * Layout::kWRowBytes + fp4_chunk<T::kBlocks>(r1, b) * 16 + 4 * t);
          decode_fp4_word<kAnyScale>(p0, q0, s_scales[weight_row<kGateUp>(r0) * nblocks + kb]);
          decode_fp4_word<kAnyScale>(p1, q1, s_scales[weight_row<kGateUp>(r1) * nblocks + kb]);
        } else {
          const uint4 u0 =
              *reinterpret_cast<const uint4*>(stage_w + r0 * Layout::kWRowBytes + bf16_chunk(r0, 4 * b + t) * 16);
          const uint4 u1 =
              *reinterpret_cast<const uint4*>(stage_w + r1 * Layout::kWRowBytes + bf16_chunk(r1, 4 * b + t) * 16);
          p0[0] = u0.x, p0[1] = u0.y, p0[2] = u0.z, p0[3] = u0.w;
          p1[0] = u1.x, p1[1] = u1.y, p1[2] = u1.z, p1[3] = u1.w;
        }
        a[mi][0][0] = p0[0], a[mi][0][1] = p1[0], a[mi][0][2] = p0[1], a[mi][0][3] = p1[1];
        a[mi][1][0] = p0[2], a[mi][1][1] = p1[2], a[mi][1][2] = p0[3], a[mi][1][3] = p1[3];
      }
      // B: the same k of slot column x_row0 + 8 ni (one 16-byte load), paired as A is.
#pragma unroll
      for (int ni = 0; ni < T::kNi; ++ni) {
        const int r = x_row0 + ni * 8;
        const uint4 xb =
            *reinterpret_cast<const uint4*>(stage_x + r * Layout::kXRowBytes + bf16_chunk(r, 4 * b + t) * 16);
        uint32_t bp[4] = {xb.x, xb.y, xb.z, xb.w};
        if constexpr (kMxfp4) {
          bp[0] = __byte_perm(xb.x, xb.z, 0x5410), bp[1] = __byte_perm(xb.x, xb.z, 0x7632);
          bp[2] = __byte_perm(xb.y, xb.w, 0x5410), bp[3] = __byte_perm(xb.y, xb.w, 0x7632);
        }
#pragma unroll
        for (int mi = 0; mi < T::kMi; ++mi) {
          mma_bf16(acc[mi][ni], a[mi][0], bp[0], bp[1]);
          mma_bf16(acc[mi][ni], a[mi][1], bp[2], bp[3]);
        }
      }
    }
  };
  const int full_tiles = nblocks / T::kBlocks;
  auto main_loop = [&](auto any_scale) {
    for (int kt = 0; kt < k_tiles; ++kt) {
      wait_async<T::kStages - 2>();
      __syncthreads();  // stage kt visible to all; stage kt-1 free for the refill below
      const int refill = kt + T::kStages - 1;
      if (refill < k_tiles) {
        load_weights(refill % T::kStages, refill);
        load_activations(refill % T::kStages, refill);
      }
      commit_async();
      if (kt < full_tiles) {
        compute_stage(kt, any_scale, std::false_type{});
      } else {
        compute_stage(kt, any_scale, std::true_type{});
      }
    }
  };
  // Scales above 128 (only in synthetic weights) need the two-factor decode; one look at the
  // tile's scales (group 0, with the first stage) picks the loop for the whole CTA.
  bool any_scale = false;
  if constexpr (kMxfp4) {
    wait_async<T::kStages - 2>();
    __syncthreads();
    bool above = false;
    for (int i = tid; i < (scale_bytes + 3) / 4; i += T::kThreads) {
      above |= __vcmpgtu4(reinterpret_cast<const uint32_t*>(s_scales)[i], 0x80808080u) != 0;
    }
    any_scale = __syncthreads_or(above);
  }
  if (any_scale) {
    main_loop(std::true_type{});
  } else {
    main_loop(std::false_type{});
  }

  if constexpr (kLora) {
    if constexpr (!kLoraFirst) lora_extension();
  }

  // Epilogue. acc[mi][ni][i]: tile row w_row0 + 16 mi + 8 (i / 2), slot x_row0 - g + 8 ni + 2t + i % 2.
  const float* bias = w.bias ? w.bias + size_t(tile.expert) * out : nullptr;
#pragma unroll
  for (int mi = 0; mi < T::kMi; ++mi) {
#pragma unroll
    for (int ni = 0; ni < T::kNi; ++ni) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = wn * T::kNi * 8 + ni * 8 + 2 * t + j;  // slot within the tile
        if (r >= tile.rows) continue;
        if constexpr (kGateUp) {
          // Rows r0 / r0 + 8 are the gate / up of unit u: weight rows 2u and 2u + 1.
          const int u = (feature_begin + wm * T::kMi * 16 + mi * 16) / 2 + g;
          if (2 * u >= out) continue;
          const float gate = acc[mi][ni][j] + (bias ? bias[2 * u] : 0.0f);
          const float up = acc[mi][ni][2 + j] + (bias ? bias[2 * u + 1] : 0.0f);
          args.h[size_t(tile.begin + r) * (out / 2) + u] = clamped_swiglu(gate, up, args.swiglu_limit);
        } else {
          const size_t y_row = size_t(s_assignment[r]) * out;
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int f = feature_begin + w_row0 + mi * 16 + 8 * half;
            if (f < out) args.y[y_row + f] = acc[mi][ni][2 * half + j] + (bias ? bias[f] : 0.0f);
          }
        }
      }
    }
  }
}

// ---- decode: MXFP4 experts with few slots each, weights streamed into registers

// The streaming kernel's shape: CTAs of kWarps warps, each warp taking up to kQuads 4-block
// runs of K (a quad: 128 values, 64 bytes of each row) per batch of loads; kMinCtas CTAs an SM.
template <int kWarps_, int kQuads_, int kMinCtas_>
struct StreamTiling {
  static constexpr int kWarps = kWarps_, kQuads = kQuads_, kMinCtas = kMinCtas_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSlots = 8;  // one mma n tile
  static_assert(kWarps >= 4, "the epilogue takes 128 threads");
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One expert matmul, MXFP4 and no adapter, for experts with few slots (decode), either
// projection; arguments and outputs as expert_matmul_kernel's. The weights are the whole
// cost, so they go from global memory straight into the registers of the lanes that decode
// them, with no staging, and the grid holds enough loads in flight to cover the memory latency
// at full bandwidth and enough warps to hide the decode behind them.
//
// Work items: (8-slot tile of an expert, 16 output features), the features fastest so that
// the CTAs sharing an expert's activations run together; each CTA of a grid sized to the GPU
// takes items blockIdx.x, + gridDim.x, ... (no CTA launched for the empty tiles of the bound
// on the tile count). Within an item the warps split K in quads: warp w takes quads w, w +
// kWarps, ..., loading kQuads of them before their mmas; their partial 16 x 8 tiles are summed
// in shared memory in warp order (deterministic).
//
// Lane (g, t) loads the 16 bytes of block 4q + t of its two A rows (tile rows g and g + 8,
// permuted by weight_row as in the tiled kernel) and of its B column (slot g), the 4 lanes of
// a row a 64-byte run. Each 32-bit word of codes (8 values) decodes to the A pairs of two
// mmas (decode_fp4_word: (k, k + 4)), and the byte permute pairs the activations alike.
//
// Where it stands (H100, 20b shape, 1 token): gate_up 23.8 µs, down 11.5 µs, ~50% of 3 TB/s.
// A CTA waits for its item's loads, then decodes them, then reduces: memory idles while the
// CTAs of an SM decode. Measured and not better overall: 3 or 4 CTAs of 8 warps (3 or 2 quads),
// 12 or 16 warps of 2 quads; asking L2 for the next items' weights (cp.async.bulk.prefetch.L2)
// before decoding one made gate_up slower (1 token 27-29 µs, 8 tokens 113-127 µs against 93).
// Nor a software pipeline (H100, 1 token, gate_up / down µs; this kernel 22.0 / 15.0 in the
// same runs): one warp a 16-row tile (two splitting K for down at 1 token) streaming all its
// quads, across items, through a ring of 2, 3 or 4 quads of codes in registers, activations
// read through L1 as each quad is decoded: 27.5 / 16.6 at every depth; with the activations
// instead copied (cp.async) kDepth quads ahead into a ring in shared memory: 57 / 16.8; the
// register ring with no activation loads at all (wrong sums, timing only): 21.5 / 13.3. So
// these many small 64-byte row pieces stream at ~1.6 TB/s however many are in flight, and
// the activations' round trip costs as much again.
template <class S, bool kGateUp>
__global__ void __launch_bounds__(S::kThreads, S::kMinCtas) expert_stream_kernel(const MatmulArgs args) {
  __shared__ float s_partial[2][S::kWarps][4][32];  // each warp's accumulators, by item parity

  // gate_up follows the routing kernel: it waits first. down follows gate_up, which releases
  // after its wait, so the routing is complete: down finds its first item and issues its first
  // weight loads, then waits before it reads h (see the top of the file). Every thread waits
  // once, in its first batch or, in a CTA with no item, at the end.
  bool waited = false;
  const auto wait_and_release = [&waited] {
    wait_for_producers();
    release_dependents();
    waited = true;
  };
  if constexpr (kGateUp) wait_and_release();

  const ExpertWeights& w = args.w;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int out = w.out, in = w.in, nblocks = in / kBlockValues, quads = (nblocks + 3) / 4;
  const int feature_tiles = (out + 15) / 16;
  const TileList<S::kSlots> list(args.expert_offsets, w.experts, lane);
  const int items = list.total * feature_tiles;  // < 2^31: checked at launch
  int parity = 0;
  for (int item = blockIdx.x; item < items; item += gridDim.x, parity ^= 1) {
    const SlotTile tile = list.find(args.expert_offsets, item / feature_tiles, lane);
    const int feature_begin = item % feature_tiles * 16;

    // A rows (tile rows g, g + 8): codes and scales from block t; B column: slot g's activations.
    // (The launch checks that a block's index fits 32 bits: fewer registers.)
    uint32_t block0[2];
    bool row_valid[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = feature_begin + weight_row<kGateUp>(g + 8 * h);
      row_valid[h] = row < out;
      block0[h] = (uint32_t(tile.expert) * out + (row_valid[h] ? row : 0)) * nblocks + t;
    }
    // Slot g's activations from block t on (gate_up: x gathered by token, after its wait).
    const bool slot_valid = g < tile.rows;
    const __nv_bfloat16* act_row = args.act;
    if (slot_valid) {
      const int j = tile.begin + g;
      act_row += size_t(kGateUp ? args.sorted_assignments[j] / args.k : j) * in + 32 * t;
    }

    float acc[4] = {};
    for (int q0 = warp;; q0 += S::kWarps * S::kQuads) {
      uint4 codes[S::kQuads][2];
      uint32_t scales[S::kQuads][2];
#pragma unroll
      for (int j = 0; j < S::kQuads; ++j) {
        const int kb = 4 * (q0 + j * S::kWarps);  // block of lane 0 (t adds the lane's)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const bool valid = row_valid[h] && kb + t < nblocks;
          codes[j][h] = load16_or_zero(w.blocks + size_t(block0[h] + kb) * 16, valid);
          scales[j][h] = valid ? __ldg(w.scales + block0[h] + kb) : 0u;
        }
      }
      if (!waited) wait_and_release();
      // Scales above 128 (only in synthetic weights) need the two-factor decode: one vote per
      // batch picks the loop for the warp.
      bool above = false;
#pragma unroll
      for (int j = 0; j < S::kQuads; ++j) above |= scales[j][0] > 128u || scales[j][1] > 128u;
      const auto multiply = [&](auto any_scale) {
        constexpr bool kAnyScale = decltype(any_scale)::value;
#pragma unroll
        for (int j = 0; j < S::kQuads; ++j) {
          const int q = q0 + j * S::kWarps;
          if (q >= quads) break;  // warp-uniform
          const bool x_valid = slot_valid && 4 * q + t < nblocks;
          const uint4* x = reinterpret_cast<const uint4*>(act_row + size_t(q) * 4 * kBlockValues);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const uint4 xb = x_valid ? __ldg(x + c) : make_uint4(0, 0, 0, 0);
            uint32_t lo[4], hi[4];
            decode_fp4_word<kAnyScale>(lo, word(codes[j][0], c), scales[j][0]);
            decode_fp4_word<kAnyScale>(hi, word(codes[j][1], c), scales[j][1]);
            const uint32_t a0[4] = {lo[0], hi[0], lo[1], hi[1]}, a1[4] = {lo[2], hi[2], lo[3], hi[3]};
            mma_bf16(acc, a0, __byte_perm(xb.x, xb.z, 0x5410), __byte_perm(xb.x, xb.z, 0x7632));
            mma_bf16(acc, a1, __byte_perm(xb.y, xb.w, 0x5410), __byte_perm(xb.y, xb.w, 0x7632));
          }
        }
      };
      if (__any_sync(0xffffffffu, above)) {
        multiply(std::true_type{});
      } else {
        multiply(std::false_type{});
      }
      if (q0 + S::kWarps * S::kQuads >= quads) break;
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) s_partial[parity][warp][i][lane] = acc[i];
    // Double-buffered by parity: a buffer is rewritten two items later, after every thread has
    // passed the next item's barrier, so its readers below are done.
    __syncthreads();
    // Entry i of lane l: tile row l / 4 + 8 (i / 2), slot 2 (l % 4) + i % 2.
    const auto entry = [&](int i, int l) {
      float sum = 0.0f;
#pragma unroll
      for (int v = 0; v < S::kWarps; ++v) sum += s_partial[parity][v][i][l];
      return sum;
    };
    const float* bias = w.bias ? w.bias + size_t(tile.expert) * out : nullptr;
    if constexpr (kGateUp) {
      // Thread (slot, unit): the unit's gate (tile row unit) and up (unit + 8) -> h, a slot's
      // 8 units in 8 consecutive threads.
      const int slot = tid / 8, unit = tid % 8;
      const int u = feature_begin / 2 + unit;
      if (tid < 64 && slot < tile.rows && 2 * u < out) {
        const int l = 4 * unit + slot / 2;
        const float gate = entry(slot % 2, l) + (bias ? bias[2 * u] : 0.0f);
        const float up = entry(2 + slot % 2, l) + (bias ? bias[2 * u + 1] : 0.0f);
        args.h[size_t(tile.begin + slot) * (out / 2) + u] = clamped_swiglu(gate, up, args.swiglu_limit);
      }
    } else {
      // Thread (slot, feature) -> y, a slot's 16 features in 16 consecutive threads.
      const int slot = tid / 16, r = tid % 16, f = feature_begin + r;
      if (tid < 128 && slot < tile.rows && f < out) {
        const float sum = entry(2 * (r / 8) + slot % 2, 4 * (r % 8) + slot / 2);
        args.y[size_t(args.sorted_assignments[tile.begin + slot]) * out + f] = sum + (bias ? bias[f] : 0.0f);
      }
    }
  }
  if (!waited) wait_and_release();
}

// ---- expert LoRA: u = scale · act · A_eᵀ

// A CTA of the u kernel: kSlotTiles 8-slot mma columns of one expert's slots x 16 ranks (one
// mma row tile; grid.y walks r in 16s). kWarps warps split `in`: warp w takes the 32-wide
// blocks w, w + kWarps, ..., loading kBatch blocks' fragments before their mmas.
template <int kSlotTiles_, int kWarps_, int kBatch_>
struct LoraUTiling {
  static constexpr int kSlotTiles = kSlotTiles_, kWarps = kWarps_, kBatch = kBatch_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSlots = 8 * kSlotTiles;
};

struct LoraUArgs {
  __nv_bfloat16* u;                   // [slots, r]
  const __nv_bfloat16* act;           // [rows, in]
  const int32_t* sorted_assignments;  // gate_up: slot j reads act row sorted_assignments[j] / k
  const int32_t* expert_offsets;
  const __nv_bfloat16* a;             // [experts, r, in]
  int k, experts, r, in;
  float scale;
};

// u [slots, r] bf16 = scale · act[row(j)] · A_eᵀ for each slot j, e the expert whose range of
// expert_offsets holds j; row(j) = sorted_assignments[j] / k when kGather (gate_up reads x by
// token), else j (down reads h in slot order). act [rows, in], A [experts, r, in] bf16, in a
// multiple of 32, both 16-byte aligned. Lane (g, t) loads A rows g, g + 8 of the CTA's ranks
// and the activations of slot g + 8 ni at k = 32 kb + 8t .. +7: entries of two mmas, mapped to
// the fragments' k positions as in cuda/gemv.cu (A and B alike, so the dot products are exact
// sums of the same terms). The warps' partial tiles are summed in shared memory in warp order
// (deterministic), scaled and rounded to bf16 once.
template <class U, bool kGather>
__global__ void __launch_bounds__(U::kThreads) expert_lora_u_kernel(const LoraUArgs args) {
  // Released after the wait, the matmul that reads u starts with its routing and activations
  // complete: it streams its weights meanwhile and waits for this grid before its extension.
  wait_for_producers();
  release_dependents();
  __shared__ SlotTile s_tile;
  __shared__ float s_partial[U::kWarps][U::kSlotTiles][4][32];  // each warp's accumulators, lane-minor

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (warp == 0) {
    const SlotTile tile = locate_tile<U::kSlots>(args.expert_offsets, args.experts, blockIdx.x, lane);
    if (lane == 0) s_tile = tile;
  }
  __syncthreads();
  const SlotTile tile = s_tile;
  if (tile.rows == 0) return;  // the grid is a bound on the tile count

  const int g = lane >> 2, t = lane & 3;
  const int in = args.in, r = args.r, nblocks = in / kBlockValues;
  const int rank0 = int(blockIdx.y) * 16 + g;  // this lane's A rows: rank0, rank0 + 8
  const __nv_bfloat16* a_rows[2];
  bool a_valid[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    a_valid[h] = rank0 + 8 * h < r;
    a_rows[h] = args.a + (size_t(tile.expert) * r + (a_valid[h] ? rank0 + 8 * h : 0)) * in + 8 * t;
  }
  const __nv_bfloat16* x_rows[U::kSlotTiles];
  bool x_valid[U::kSlotTiles];
#pragma unroll
  for (int ni = 0; ni < U::kSlotTiles; ++ni) {
    const int slot = g + 8 * ni;
    x_valid[ni] = slot < tile.rows;
    const int j = tile.begin + (x_valid[ni] ? slot : 0);
    x_rows[ni] = args.act + size_t(kGather ? args.sorted_assignments[j] / args.k : j) * in + 8 * t;
  }

  float acc[U::kSlotTiles][4] = {};
  for (int kb0 = warp; kb0 < nblocks; kb0 += U::kWarps * U::kBatch) {
    uint4 a[U::kBatch][2], x[U::kBatch][U::kSlotTiles];
#pragma unroll
    for (int i = 0; i < U::kBatch; ++i) {
      const int kb = kb0 + i * U::kWarps;
      const size_t offset = size_t(kb) * kBlockValues;
#pragma unroll
      for (int h = 0; h < 2; ++h) a[i][h] = load16_or_zero(a_rows[h] + offset, kb < nblocks && a_valid[h]);
#pragma unroll
      for (int ni = 0; ni < U::kSlotTiles; ++ni) {
        x[i][ni] = load16_or_zero(x_rows[ni] + offset, kb < nblocks && x_valid[ni]);
      }
    }
#pragma unroll
    for (int i = 0; i < U::kBatch; ++i) {
      if (kb0 + i * U::kWarps >= nblocks) break;  // warp-uniform
      const uint32_t a_lo[4] = {a[i][0].x, a[i][1].x, a[i][0].y, a[i][1].y};
      const uint32_t a_hi[4] = {a[i][0].z, a[i][1].z, a[i][0].w, a[i][1].w};
#pragma unroll
      for (int ni = 0; ni < U::kSlotTiles; ++ni) {
        mma_bf16(acc[ni], a_lo, x[i][ni].x, x[i][ni].y);
        mma_bf16(acc[ni], a_hi, x[i][ni].z, x[i][ni].w);
      }
    }
  }

#pragma unroll
  for (int ni = 0; ni < U::kSlotTiles; ++ni)
#pragma unroll
    for (int i = 0; i < 4; ++i) s_partial[warp][ni][i][lane] = acc[ni][i];
  __syncthreads();
  // Element (ni, i) of lane l: rank 16 blockIdx.y + l / 4 + 8 (i / 2), slot 8 ni + 2 (l % 4) + i % 2.
  for (int e = tid; e < U::kSlotTiles * 4 * 32; e += U::kThreads) {
    const int l = e % 32, i = e / 32 % 4, ni = e / 128;
    const int rank = int(blockIdx.y) * 16 + l / 4 + 8 * (i / 2), slot = 8 * ni + 2 * (l % 4) + i % 2;
    if (rank >= r || slot >= tile.rows) continue;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < U::kWarps; ++w) sum += s_partial[w][ni][i][l];
    args.u[size_t(tile.begin + slot) * r + rank] = __float2bfloat16_rn(args.scale * sum);
  }
}

// residual [n, hidden] += Σ_s weight[t, s] · y[t*k + s], s ascending; kVec columns a thread.
// Released before its wait: the next kernel (a layer's first, or the final norm) reads only
// weights before its own, so it starts fetching them while the expert matmuls still run.
template <int kVec>
__global__ void moe_combine_kernel(float* residual, const float* y, const float* expert_weight, int n, int k,
                                   int hidden) {
  release_dependents();
  wait_for_producers();
  using Vec = std::conditional_t<kVec == 4, float4, float>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // vector index
  const int per_row = hidden / kVec;
  if (i >= int64_t(n) * per_row) return;
  const int64_t token = i / per_row;
  const int col = int(i % per_row) * kVec;
  float sum[kVec] = {};
  for (int s = 0; s < k; ++s) {
    const int64_t a = token * k + s;
    const float weight = expert_weight[a];
    const Vec v = *reinterpret_cast<const Vec*>(y + a * hidden + col);
    const float* vf = reinterpret_cast<const float*>(&v);
#pragma unroll
    for (int c = 0; c < kVec; ++c) sum[c] += weight * vf[c];
  }
  Vec r = *reinterpret_cast<Vec*>(residual + token * hidden + col);
  float* rf = reinterpret_cast<float*>(&r);
#pragma unroll
  for (int c = 0; c < kVec; ++c) rf[c] += sum[c];
  *reinterpret_cast<Vec*>(residual + token * hidden + col) = r;
}

// ---- host side

[[noreturn]] void fail_shape(const char* what) { fail_cuda(cudaErrorInvalidValue, what, __FILE__, __LINE__); }

void check_weights(const ExpertWeights& w) {
  if (w.experts <= 0 || w.out <= 0 || w.in <= 0 || w.in % kBlockValues != 0)
    fail_shape("moe: expert weights need experts, out > 0 and in a positive multiple of 32");
  if (w.mxfp4 ? (w.blocks == nullptr || w.scales == nullptr) : w.dense == nullptr)
    fail_shape("moe: expert weights missing (MXFP4 blocks/scales or bf16 dense)");
}

template <class U, bool kGather>
void launch_lora_u(const LoraUArgs& args, int slots, cudaStream_t stream) {
  const int64_t tiles = (int64_t(slots) + U::kSlots - 1) / U::kSlots + std::min(args.experts, slots);
  const LaunchShape shape{.grid = dim3(unsigned(tiles), unsigned((args.r + 15) / 16)), .block = U::kThreads};
  launch_kernel(expert_lora_u_kernel<U, kGather>, shape, stream, args);
}

// For an active adapter: checks it against the experts, writes u (expert_lora_u_kernel) and
// returns B and u for the matmul; for a null or inactive one, nothing (b null). u's tiles:
// decode (a few slots per expert) one 8-slot column, its 16 warps each loading at most 6 of
// in = 2880's 90 blocks, all at once (one round trip); prefill 32 slots a CTA (A_e is read
// once per 32 slots, and 3 blocks' fragments fill 72 registers).
template <bool kGather>
LoraArgs prepare_lora(const MatmulArgs& args, const DeviceAdapter* lora, __nv_bfloat16* lora_u, int n_tokens,
                      cudaStream_t stream) {
  if (lora == nullptr || !lora->active()) return {};
  const ExpertWeights& w = args.w;
  if (lora->experts != w.experts || lora->in != w.in || lora->out != w.out || lora->r <= 0)
    fail_shape("moe: an expert adapter's experts, in and out must be the experts' (and r > 0)");
  if (lora->a16 == nullptr || lora->b16 == nullptr || lora_u == nullptr)
    fail_shape("moe: an expert adapter needs bf16 copies of A and B and the u scratch");
  if ((reinterpret_cast<uintptr_t>(lora->a16) & 15) != 0 || (reinterpret_cast<uintptr_t>(args.act) & 15) != 0)
    fail_shape("moe: an expert adapter's bf16 A and the activations must be 16-byte aligned");
  const int slots = n_tokens * args.k;
  const LoraUArgs u_args{lora_u, args.act, args.sorted_assignments, args.expert_offsets, lora->a16,
                         args.k,  w.experts, lora->r, w.in, lora->scale};
  if ((int64_t(slots) + w.experts - 1) / w.experts <= 8) {
    launch_lora_u<LoraUTiling<1, 16, 6>, kGather>(u_args, slots, stream);
  } else {
    launch_lora_u<LoraUTiling<4, 16, 3>, kGather>(u_args, slots, stream);
  }
  return LoraArgs{lora->b16, lora_u, lora->r};
}

template <class T, bool kMxfp4, bool kGateUp, bool kLora>
void launch(const MatmulArgs& args, const LoraArgs& lora, int assignments, cudaStream_t stream) {
  auto* kernel = expert_matmul_kernel<T, kMxfp4, kGateUp, kLora>;
  const size_t smem = StageLayout<T, kMxfp4>::bytes(args.w.in / kBlockValues);
  OSSRL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // Every expert with rows adds at most one partial tile.
  const int64_t tiles = (int64_t(assignments) + T::kRowsX - 1) / T::kRowsX + std::min(args.w.experts, assignments);
  if (tiles > 65535) fail_shape("moe: too many assignments for one launch (grid.y > 65535)");
  const LaunchShape shape{.grid = dim3(unsigned((args.w.out + T::kRowsW - 1) / T::kRowsW), unsigned(tiles)),
                          .block = T::kThreads,
                          .shared_bytes = smem};
  launch_kernel(kernel, shape, stream, args, lora);
}

int multiprocessors() {
  int device = 0, sms = 0;
  OSSRL_CUDA_CHECK(cudaGetDevice(&device));
  OSSRL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// The streaming kernel's grid: a CTA per work item, up to as many as the GPU holds at once.
template <class S, bool kGateUp>
void launch_stream(const MatmulArgs& args, int assignments, int sms, cudaStream_t stream) {
  auto* kernel = expert_stream_kernel<S, kGateUp>;
  static const int ctas_per_sm = [&] {
    int n = 0;
    OSSRL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, S::kThreads, 0));
    return n;
  }();
  // Every expert with rows adds at most one partial tile.
  const int64_t tiles = (int64_t(assignments) + S::kSlots - 1) / S::kSlots + std::min(args.w.experts, assignments);
  const int64_t items = tiles * ((args.w.out + 15) / 16);
  const int64_t blocks = int64_t(args.w.experts) * args.w.out * (args.w.in / kBlockValues);
  if (items >= (int64_t(1) << 31) || blocks >= (int64_t(1) << 32))
    fail_shape("moe: too many assignments or expert weights for the streaming kernel's 32-bit indices");
  const LaunchShape shape{.grid = unsigned(std::min<int64_t>(items, int64_t(sms) * ctas_per_sm)),
                          .block = S::kThreads};
  launch_kernel(kernel, shape, stream, args);
}

// Tile shapes by the mean number of rows per expert, the fastest measured on an H100
// (tests/cuda/moe_bench and its tuning runs, gpt-oss-20b shapes): decode (few rows) streams
// the weights with narrow slot tiles and many CTAs; prefill (many rows) uses 128x128 tiles.
// bf16 weights take 4x the bytes of MXFP4 per K block, hence fewer blocks per stage. From 5
// rows an expert (batch 64: 8 on average, often 9-12), MXFP4 takes 16-slot tiles so that an
// expert's weights are decoded once, not twice, and small stages (4 blocks) so that 5 CTAs fit
// an SM; around 32 rows (batch 256), 2-block stages, so that 3 CTAs of 128x48 fit an SM (more
// warps to hide the main loop's latency). Per call: -4% at 128 tokens, -4% at 256 (moe_bench);
// even at 64 with its uniform routing, but the engine's batch-64 decode step is 3% faster.
//
// MXFP4 without an adapter, with few slots an expert and few experts with slots, takes the
// streaming kernel: where the Narrow grid (ceil(out / 64) CTAs of 4 warps for each expert with
// slots, at most min(experts, assignments) of them) leaves fewer than ~6 CTAs an SM, which
// hide neither the memory latency nor the decode. H100, moe_bench 40 mxfp4, gate_up / down µs,
// tiled -> streaming: 1 token 26.9 / 14.8 -> 23.8 / 11.5; 2 tokens 39.5 / 21.7 -> 39.3 / 20.4;
// 4 tokens 55.0 / 31.7 -> 55.8 / 28.2 (so down only); 8 tokens 86.2 / 43.4 -> 93.1 / 46.7.
template <bool kMxfp4, bool kGateUp, bool kLora>
void dispatch(const MatmulArgs& args, const LoraArgs& lora, int assignments, cudaStream_t stream) {
  constexpr int kDecodeBlocks = kMxfp4 ? 8 : 2, kWideBlocks = kMxfp4 ? 4 : 2;
  using Narrow = Tiling<4, 1, 1, 1, kDecodeBlocks, 4, 3>;
  using Decode16 = std::conditional_t<kMxfp4, Tiling<4, 1, 1, 2, 4, 4, 4>, Tiling<4, 1, 1, 2, 2, 4, 3>>;
  using Stream = StreamTiling<6, 4, 4>;
  const int64_t per_expert = (int64_t(assignments) + args.w.experts - 1) / args.w.experts;
  if constexpr (kMxfp4 && !kLora) {
    const int sms = multiprocessors();
    const int64_t narrow_ctas =
        int64_t((args.w.out + Narrow::kRowsW - 1) / Narrow::kRowsW) * std::min(args.w.experts, assignments);
    if (per_expert <= Stream::kSlots && narrow_ctas <= 6 * int64_t(sms)) {
      launch_stream<Stream, kGateUp>(args, assignments, sms, stream);
      return;
    }
  }
  if (per_expert <= (kMxfp4 ? 4 : 8)) {
    launch<Narrow, kMxfp4, kGateUp, kLora>(args, lora, assignments, stream);
  } else if (per_expert <= 16) {
    launch<Decode16, kMxfp4, kGateUp, kLora>(args, lora, assignments, stream);
  } else if (per_expert <= 48) {
    launch<Tiling<4, 1, 2, 6, 2, 4, kMxfp4 ? 3 : 1>, kMxfp4, kGateUp, kLora>(args, lora, assignments, stream);
  } else if constexpr (kGateUp) {
    launch<Tiling<4, 2, 2, 8, kWideBlocks, 3, 1>, kMxfp4, kGateUp, kLora>(args, lora, assignments, stream);
  } else {
    launch<Tiling<2, 2, 4, 8, 2, 3, 2>, kMxfp4, kGateUp, kLora>(args, lora, assignments, stream);
  }
}

template <bool kGateUp>
void run(const MatmulArgs& args, const LoraArgs& lora, int assignments, cudaStream_t stream) {
  auto with_format = [&](auto has_lora) {
    if (args.w.mxfp4) {
      dispatch<true, kGateUp, decltype(has_lora)::value>(args, lora, assignments, stream);
    } else {
      dispatch<false, kGateUp, decltype(has_lora)::value>(args, lora, assignments, stream);
    }
  };
  if (lora.b != nullptr) {
    with_format(std::true_type{});
  } else {
    with_format(std::false_type{});
  }
}

}  // namespace

void moe_gate_up_swiglu(__nv_bfloat16* h, const __nv_bfloat16* x, const int32_t* sorted_assignments,
                        const int32_t* expert_offsets, int n_tokens, int k, const ExpertWeights& gate_up,
                        float swiglu_limit, cudaStream_t stream, const DeviceAdapter* lora,
                        __nv_bfloat16* lora_u) {
  check_weights(gate_up);
  if (gate_up.out % 2 != 0) fail_shape("moe_gate_up_swiglu: out (2 * intermediate) must be even");
  if (n_tokens <= 0 || k <= 0) return;
  const MatmulArgs args{x, sorted_assignments, expert_offsets, k, gate_up, h, nullptr, swiglu_limit};
  run<true>(args, prepare_lora<true>(args, lora, lora_u, n_tokens, stream), n_tokens * k, stream);
}

void moe_down(float* y, const __nv_bfloat16* h, const int32_t* sorted_assignments, const int32_t* expert_offsets,
              int n_tokens, int k, const ExpertWeights& down, cudaStream_t stream, const DeviceAdapter* lora,
              __nv_bfloat16* lora_u) {
  check_weights(down);
  if (n_tokens <= 0 || k <= 0) return;
  const MatmulArgs args{h, sorted_assignments, expert_offsets, k, down, nullptr, y, 0.0f};
  run<false>(args, prepare_lora<false>(args, lora, lora_u, n_tokens, stream), n_tokens * k, stream);
}

void moe_combine(float* residual, const float* y, const float* expert_weight, int n, int k, int hidden,
                 cudaStream_t stream) {
  if (n <= 0 || k <= 0 || hidden <= 0) return;
  constexpr int kThreads = 256;
  const bool vec = hidden % 4 == 0 && (reinterpret_cast<uintptr_t>(y) & 15) == 0 &&
                   (reinterpret_cast<uintptr_t>(residual) & 15) == 0;
  const int64_t threads = int64_t(n) * (vec ? hidden / 4 : hidden);
  const unsigned blocks = unsigned((threads + kThreads - 1) / kThreads);
  const LaunchShape shape{.grid = blocks, .block = kThreads};
  launch_kernel(vec ? moe_combine_kernel<4> : moe_combine_kernel<1>, shape, stream, residual, y, expert_weight, n, k,
                hidden);
}

}  // namespace ossrl::cuda
