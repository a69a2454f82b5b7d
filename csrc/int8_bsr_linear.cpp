// W8A8 block-sparse Linear and MLP for CPUs: y = dequantize(quantize(x) @ Wq.T) + bias, W stored as its kept blocks.
//
// Weights are int8, symmetric, one scale per output channel, each kept block stored for the dot-product instructions
// as (blocksize/4, blocksize, 4): four consecutive inputs of one output side by side. Activations are quantized
// inside the op, per token: q = round(x * 127 / amax) in [-127, 127], stored shifted by +128 as uint8, because
// VPDPBUSD (and AMX's u8s8 product) multiplies unsigned by signed bytes. The shift adds 128 * (sum of the weight
// row) to every product; that sum, the "compensation", is computed once at packing and subtracted in the epilogue,
// which also applies both scales and the bias: y = float(acc - comp) * (token scale * channel scale) + bias.
//
// Work items are (tile of tokens, output block-row) as in fused_bsr_linear.cpp; each accumulates in int32 over its
// row's kept blocks and is computed by one thread from start to end, so results are the same bit for bit whatever
// the thread count. Two micro-kernels compute an item's integer products:
// - "vnni": our own, AVX-512 VNNI intrinsics (function target attributes, so the file builds on any x86 CPU): up to
//   24 token rows x 64 outputs of int32 accumulators held in registers across all the kept blocks of a block-row.
// - "amx": our own AMX tile kernel (amx_tiles.h) for blocks of a multiple of 32: the int32 accumulators stay in
//   tile registers across the row's blocks. Blocks of 16 take ATen's cpublas::brgemm u8s8 overload (oneDNN's AMX
//   kernels), one call per row (its blocks' input columns gathered into a panel unless they are adjacent).
// The caller picks one (blocksparse_int8.py measures both where both run, and self-checks AMX at first use).
//
// int8_bsr_mlp runs a whole Linear -> activation -> Linear pair per tile of tokens: the first Linear's outputs for
// the hidden blocks the second one reads are dequantized into a float buffer of the thread's own, the bias and
// activation applied there, the result quantized per token once more, and the second Linear reads it in cache.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#include <immintrin.h>

#include "amx_tiles.h"
#include "avx512_float.h"
#include "block_index.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

using superblock::Activation;
using superblock::activate16;
using superblock::activation_of;
using superblock::first_lanes;
using superblock::load16;
using superblock::store16;

#define SUPERBLOCK_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// The micro-kernel computes up to this many token rows at a time; row buffers hold this many rows beyond their
// last, so a partial group of rows reads and writes memory of its own (the extra rows are never stored).
constexpr int64_t kSpareRows = 24;

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

bool has_amx() {
  static const bool yes = has_vnni() && at::native::cpublas::could_pack(at::kChar);
  return yes;
}

enum class Isa { vnni, amx };

Isa isa_of(c10::string_view name) {
  const std::string isa(name);
  TORCH_CHECK(isa == "vnni" || isa == "amx", "int8 block-sparse ops: isa must be 'vnni' or 'amx', not '", isa, "'");
  if (isa == "vnni") {
    TORCH_CHECK(has_vnni(), "int8 block-sparse ops: isa 'vnni' needs AVX-512 VNNI, which this CPU lacks");
    return Isa::vnni;
  }
  TORCH_CHECK(has_amx(), "int8 block-sparse ops: isa 'amx' needs AMX (int8), which this CPU lacks");
  return Isa::amx;
}

// ---- Per-token quantization ----

// One row of `count` values -> uint8 (round(x * 127 / amax) + 128) and its scale amax / 127, given the row's amax
// (`top`) and whether it holds inf or NaN. A row of zeros gets scale 0 (every value 128); a row holding inf or NaN
// gets scale NaN, so its outputs are NaN as nn.Linear's are.
template <typename T>
SUPERBLOCK_AVX512 void quantize_row_with(const T* x, int64_t count, float top, bool not_finite, uint8_t* q,
                                         float* scale) {
  if (not_finite || std::isinf(top)) {
    std::memset(q, 128, count);
    *scale = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  *scale = top / 127.f;
  const __m512 inverse = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127), shift = _mm512_set1_epi32(128);
  for (int64_t c = 0; c < count; c += 16) {
    const __mmask16 lanes = first_lanes(count - c);
    const __m512 scaled = _mm512_mul_round_ps(load16(x + c, lanes), inverse, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Round half to even, as torch.round does.
    __m512i v = _mm512_cvt_roundps_epi32(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, low), high), shift);
    _mm_mask_storeu_epi8(q + c, lanes, _mm512_cvtepi32_epi8(v));
  }
}

template <typename T>
SUPERBLOCK_AVX512 void quantize_row(const T* x, int64_t count, uint8_t* q, float* scale) {
  const __m512 sign = _mm512_set1_ps(-0.f);
  __m512 amax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t c = 0; c < count; c += 16) {
    const __m512 v = _mm512_andnot_ps(sign, load16(x + c, first_lanes(count - c)));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    amax = _mm512_max_ps(amax, v);  // an inf stays the maximum; a NaN may not, hence the mask
  }
  quantize_row_with<T>(x, count, _mm512_reduce_max_ps(amax), nan != 0, q, scale);
}

// Rows of a quantized matrix with kSpareRows rows to spare: data (rows + spare) x width, one scale per row.
struct QuantizedRows {
  std::unique_ptr<uint8_t[]> data;
  std::unique_ptr<float[]> scales;
  int64_t width;
  QuantizedRows(int64_t rows, int64_t width_)
      : data(new uint8_t[(rows + kSpareRows) * width_]), scales(new float[rows + kSpareRows]), width(width_) {
    std::memset(data.get() + rows * width, 128, kSpareRows * width);  // the spare rows: zeros
  }
};

template <typename T>
void quantize_rows(const T* x, int64_t x_stride, int64_t rows, int64_t width, QuantizedRows& q, bool parallel) {
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) quantize_row<T>(x + r * x_stride, width, q.data.get() + r * width, q.scales.get() + r);
  };
  if (parallel) {
    at::parallel_for(0, rows, 64, body);
  } else {
    body(0, rows);
  }
}

// ---- Integer products of one work item ----

// One block-row's kept blocks: packed int8 blocks (kept, blocksize/4, blocksize, 4), CSR offsets per block-row, the
// column block of each, and per output channel the weight scale, the +128 compensation and the bias (or null).
struct Int8Blocks {
  const int8_t* blocks;
  const int32_t* offsets;
  const int32_t* cols;
  const float* scales;
  const int32_t* compensation;
  const float* bias;
  int64_t blocksize;
};

// c (R rows x 16*NV int32, row stride ldc) = a (R rows, row stride lda) @ the row's blocks, outputs n0 .. n0+16*NV of
// each block. The accumulators stay in registers across all the row's blocks.
template <int NV, int R>
SUPERBLOCK_AVX512 void vnni_rows(const uint8_t* a, int64_t lda, const Int8Blocks& w, const int32_t* cols,
                                 int64_t first, int64_t last, int64_t n0, int32_t* c, int64_t ldc) {
  const int64_t bs = w.blocksize;
  __m512i acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t j = first; j < last; ++j) {
    const uint8_t* aj = a + int64_t(cols[j]) * bs;
    const int8_t* wj = w.blocks + j * bs * bs + n0 * 4;
    for (int64_t k = 0; k < bs; k += 4) {
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(wj + k * bs + v * 64);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, aj + r * lda + k, sizeof(four));
        const __m512i broadcast = _mm512_set1_epi32(four);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], broadcast, wv[v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_si512(c + r * ldc + v * 16, acc[r][v]);
}

template <int NV, int R>
void vnni_item(const uint8_t* a, int64_t lda, int64_t m, const Int8Blocks& w, const int32_t* cols, int64_t first,
               int64_t last, int64_t n0, int32_t* c, int64_t ldc) {
  for (int64_t r0 = 0; r0 < m; r0 += R) vnni_rows<NV, R>(a + r0 * lda, lda, w, cols, first, last, n0, c + r0 * ldc, ldc);
}

// c (m x blocksize int32, row stride blocksize) = a (m rows, stride lda) @ block-row `row` of w (cols may be
// renumbered). May write up to kSpareRows - 1 rows beyond m. `panel` (m x lda bytes) is brgemm's (AMX, blocks of
// 16): a row whose kept blocks are not adjacent has their input columns copied side by side there, for one brgemm
// over all of them (each call loads and stores its accumulator tiles: one call per block-row, not per block).
void item_products(Isa isa, const uint8_t* a, int64_t lda, int64_t m, const Int8Blocks& w, const int32_t* cols,
                   int64_t row, int32_t* c, uint8_t* panel) {
  const int64_t bs = w.blocksize, first = w.offsets[row], last = w.offsets[row + 1];
  if (first == last) {
    std::memset(c, 0, m * bs * sizeof(int32_t));
    return;
  }
  if (isa == Isa::amx && bs % 32 == 0 && superblock::amx_runs()) {  // our tile kernel: 1.1-1.6x brgemm's speed
    superblock::amx_block_row_product<superblock::TileProduct::u8s8>(a, lda, m, w.blocks + first * bs * bs,
                                                                     cols + first, last - first, bs, c, bs);
    return;
  }
  if (isa == Isa::amx) {
    // The row's packed blocks, one after the other, are one ((last - first) * blocksize)-deep operand.
    const signed char* blocks = reinterpret_cast<const signed char*>(w.blocks + first * bs * bs);
    const int64_t depth = (last - first) * bs;
    if (cols[last - 1] - cols[first] == last - 1 - first) {  // adjacent blocks: read the input in place
      at::native::cpublas::brgemm(m, bs, depth, lda, bs, bs, false, a + int64_t(cols[first]) * bs, blocks, c, true);
      return;
    }
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = first; j < last; ++j) {
        std::memcpy(panel + i * depth + (j - first) * bs, a + i * lda + int64_t(cols[j]) * bs, bs);
      }
    }
    at::native::cpublas::brgemm(m, bs, depth, depth, bs, bs, false, panel, blocks, c, true);
    return;
  }
  for (int64_t n0 = 0; n0 < bs; n0 += 64) {
    switch (std::min<int64_t>(4, (bs - n0) / 16)) {
      case 4: vnni_item<4, 6>(a, lda, m, w, cols, first, last, n0, c + n0, bs); break;
      case 3: vnni_item<3, 8>(a, lda, m, w, cols, first, last, n0, c + n0, bs); break;
      case 2: vnni_item<2, 12>(a, lda, m, w, cols, first, last, n0, c + n0, bs); break;
      default: vnni_item<1, 24>(a, lda, m, w, cols, first, last, n0, c + n0, bs); break;
    }
  }
}

// ---- Epilogue ----

// out (m x blocksize, stride ldo) = float(c - compensation) * (row scale * channel scale) + bias, for the outputs of
// block-row `row`. Explicit rounding intrinsics keep the compiler from fusing the multiply and add, so the result is
// the pure-PyTorch reference's bit for bit.
template <typename Out>
SUPERBLOCK_AVX512 void dequantize(const int32_t* c, int64_t m, const float* row_scales, const Int8Blocks& w,
                                  int64_t row, Out* out, int64_t ldo) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t bs = w.blocksize, o0 = row * bs;
  for (int64_t i = 0; i < m; ++i) {
    const __m512 row_scale = _mm512_set1_ps(row_scales[i]);
    for (int64_t n = 0; n < bs; n += 16) {
      const __m512i acc = _mm512_sub_epi32(_mm512_loadu_si512(c + i * bs + n), _mm512_loadu_si512(w.compensation + o0 + n));
      const __m512 scale = _mm512_mul_round_ps(row_scale, _mm512_loadu_ps(w.scales + o0 + n), kRound);
      __m512 y = _mm512_mul_round_ps(_mm512_cvtepi32_ps(acc), scale, kRound);
      if (w.bias) y = _mm512_add_round_ps(y, _mm512_loadu_ps(w.bias + o0 + n), kRound);
      store16(out + i * ldo + n, y);
    }
  }
}

// ---- The ops ----

template <typename T>
void linear_items(Isa isa, const at::Tensor& x, const Int8Blocks& w, at::Tensor& y, int64_t tile_tokens) {
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = y.size(1);
  const int64_t block_rows = out_features / w.blocksize, tiles = (tokens + tile_tokens - 1) / tile_tokens;
  QuantizedRows q(tokens, in_features);
  quantize_rows<T>(x.const_data_ptr<T>(), x.stride(0), tokens, in_features, q, true);
  T* y_data = y.mutable_data_ptr<T>();
  at::parallel_for(0, tiles * block_rows, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<int32_t[]> c(new int32_t[(tile_tokens + kSpareRows) * w.blocksize]);
    std::unique_ptr<uint8_t[]> panel(isa == Isa::amx ? new uint8_t[tile_tokens * in_features] : nullptr);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item % block_rows, first_token = (item / block_rows) * tile_tokens;
      const int64_t m = std::min(tile_tokens, tokens - first_token);
      item_products(isa, q.data.get() + first_token * in_features, in_features, m, w, w.cols, row, c.get(),
                    panel.get());
      dequantize<T>(c.get(), m, q.scales.get() + first_token, w, row,
                    y_data + first_token * out_features + row * w.blocksize, out_features);
    }
    if (isa == Isa::amx) at::native::cpublas::brgemm_release(true);
  });
}

SUPERBLOCK_AVX512 float reduce_max16(const float* lanes) { return _mm512_reduce_max_ps(_mm512_loadu_ps(lanes)); }

// The MLP's first layer for block-row `row` into its hidden columns: out = act(float(c - compensation) * scales +
// bias), and per token the running amax of |out| in 16 lanes. (Finite scales, bias and accumulators give finite
// activations: a token's hidden row can only be non-finite through its input's NaN scale, or non-finite weights.)
template <Activation act>
SUPERBLOCK_AVX512 void dequantize_activate(const int32_t* c, int64_t m, const float* row_scales, const Int8Blocks& w,
                                           int64_t row, float* out, int64_t ldo, float* amax) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t bs = w.blocksize, o0 = row * bs;
  const int32_t* __restrict compensation = w.compensation + o0;
  const float* __restrict scales = w.scales + o0;
  const float* __restrict bias = w.bias ? w.bias + o0 : nullptr;
  for (int64_t i = 0; i < m; ++i) {
    const __m512 row_scale = _mm512_set1_ps(row_scales[i]);
    __m512 running = _mm512_loadu_ps(amax + i * 16);
    for (int64_t n = 0; n < bs; n += 16) {
      const __m512i acc = _mm512_sub_epi32(_mm512_loadu_si512(c + i * bs + n), _mm512_loadu_si512(compensation + n));
      const __m512 scale = _mm512_mul_round_ps(row_scale, _mm512_loadu_ps(scales + n), kRound);
      __m512 y = _mm512_mul_round_ps(_mm512_cvtepi32_ps(acc), scale, kRound);
      if (bias) y = _mm512_add_round_ps(y, _mm512_loadu_ps(bias + n), kRound);
      y = activate16<act>(y);
      running = _mm512_max_ps(running, _mm512_abs_ps(y));
      _mm512_storeu_ps(out + i * ldo + n, y);
    }
    _mm512_storeu_ps(amax + i * 16, running);
  }
}

// Whether a layer's weight scales or bias hold inf or NaN (then so may every hidden activation).
bool not_finite(const Int8Blocks& w, int64_t out_features) {
  for (int64_t o = 0; o < out_features; ++o) {
    if (!std::isfinite(w.scales[o]) || (w.bias && !std::isfinite(w.bias[o]))) return true;
  }
  return false;
}

// dequantize_activate with the activation chosen once per call.
void dequantize_activate(Activation act, const int32_t* c, int64_t m, const float* row_scales, const Int8Blocks& w,
                         int64_t row, float* out, int64_t ldo, float* amax) {
  switch (act) {
    case Activation::gelu: dequantize_activate<Activation::gelu>(c, m, row_scales, w, row, out, ldo, amax); break;
    case Activation::gelu_tanh: dequantize_activate<Activation::gelu_tanh>(c, m, row_scales, w, row, out, ldo, amax); break;
    case Activation::relu: dequantize_activate<Activation::relu>(c, m, row_scales, w, row, out, ldo, amax); break;
    default: dequantize_activate<Activation::identity>(c, m, row_scales, w, row, out, ldo, amax); break;
  }
}

template <typename T>
void mlp_items(Isa isa, const at::Tensor& x, const Int8Blocks& w1, int64_t hidden_features, const Int8Blocks& w2,
               int64_t cols2_count,
               at::Tensor& y, const std::string& activation, int64_t tile_tokens) {
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = y.size(1), bs = w1.blocksize;
  // Only the hidden blocks W2 reads are computed, side by side in the buffer: W2's columns are renumbered to them.
  int64_t max_col = -1;
  for (int64_t j = 0; j < cols2_count; ++j) max_col = std::max<int64_t>(max_col, w2.cols[j]);
  std::vector<char> read(max_col + 1, 0);
  for (int64_t j = 0; j < cols2_count; ++j) read[w2.cols[j]] = 1;
  std::vector<int32_t> position(max_col + 1, -1), live;
  for (int64_t h = 0; h <= max_col; ++h) {
    if (read[h]) {
      position[h] = int32_t(live.size());
      live.push_back(int32_t(h));
    }
  }
  std::vector<int32_t> renumbered(cols2_count);
  for (int64_t j = 0; j < cols2_count; ++j) renumbered[j] = position[w2.cols[j]];
  const int64_t width = int64_t(live.size()) * bs, block_rows = out_features / bs;
  const int64_t tiles = (tokens + tile_tokens - 1) / tile_tokens;
  QuantizedRows q(tokens, in_features);
  quantize_rows<T>(x.const_data_ptr<T>(), x.stride(0), tokens, in_features, q, true);
  T* y_data = y.mutable_data_ptr<T>();
  const Activation act = activation_of(activation);
  const bool weights_not_finite = not_finite(w1, hidden_features);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<int32_t[]> c(new int32_t[(tile_tokens + kSpareRows) * bs]);
    std::unique_ptr<float[]> hidden(new float[tile_tokens * std::max<int64_t>(width, 1)]);
    std::unique_ptr<float[]> amax(new float[tile_tokens * 16]);
    QuantizedRows hidden_q(tile_tokens, std::max<int64_t>(width, 1));
    std::unique_ptr<uint8_t[]> panel(isa == Isa::amx ? new uint8_t[tile_tokens * std::max(in_features, width)] : nullptr);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t first_token = tile * tile_tokens, m = std::min(tile_tokens, tokens - first_token);
      const uint8_t* a = q.data.get() + first_token * in_features;
      std::fill(amax.get(), amax.get() + m * 16, 0.f);
      for (size_t k = 0; k < live.size(); ++k) {
        item_products(isa, a, in_features, m, w1, w1.cols, live[k], c.get(), panel.get());
        dequantize_activate(act, c.get(), m, q.scales.get() + first_token, w1, live[k], hidden.get() + k * bs, width,
                            amax.get());
      }
      for (int64_t i = 0; i < m && width > 0; ++i) {
        quantize_row_with<float>(hidden.get() + i * width, width, reduce_max16(amax.get() + i * 16),
                                 weights_not_finite || std::isnan(q.scales[first_token + i]),
                                 hidden_q.data.get() + i * width, hidden_q.scales.get() + i);
      }
      for (int64_t row = 0; row < block_rows; ++row) {
        item_products(isa, hidden_q.data.get(), width, m, w2, renumbered.data(), row, c.get(), panel.get());
        dequantize<T>(c.get(), m, hidden_q.scales.get(), w2, row, y_data + first_token * out_features + row * bs,
                      out_features);
      }
    }
    if (isa == Isa::amx) at::native::cpublas::brgemm_release(true);
  });
}

// Checks one layer's operands; returns its block size.
int64_t check_layer(const char* op, const at::Tensor& blocks, const at::Tensor& row_offsets, const at::Tensor& cols,
                    const at::Tensor& scales, const at::Tensor& compensation, const c10::optional<at::Tensor>& bias,
                    int64_t in_features, int64_t out_features) {
  TORCH_CHECK(blocks.scalar_type() == at::kChar && blocks.dim() == 4 && blocks.size(3) == 4 &&
              blocks.size(1) * 4 == blocks.size(2) && blocks.is_contiguous(),
              op, ": blocks must be contiguous int8 of shape (kept, blocksize/4, blocksize, 4)");
  const int64_t bs = blocks.size(2);
  TORCH_CHECK(bs % 16 == 0, op, ": the block size must be a multiple of 16, not ", bs);
  TORCH_CHECK(row_offsets.scalar_type() == at::kInt && cols.scalar_type() == at::kInt && row_offsets.numel() >= 1 &&
              row_offsets.is_contiguous() && cols.is_contiguous(),
              op, ": row_offsets and cols must be contiguous int32, row_offsets of length block-rows + 1");
  const int64_t block_rows = row_offsets.numel() - 1;
  TORCH_CHECK(block_rows * bs == out_features && in_features % bs == 0, op, ": blocks of ", bs, " do not tile ",
              out_features, " outputs and ", in_features, " inputs");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == out_features &&
              compensation.scalar_type() == at::kInt && compensation.is_contiguous() &&
              compensation.numel() == out_features,
              op, ": weight_scale (float32) and compensation (int32) must hold one value per output");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                                    bias->numel() == out_features),
              op, ": bias must be float32 with one value per output");
  const bool ok = blocks.size(0) == cols.numel() &&
                  superblock::indexes_blocks(row_offsets.const_data_ptr<int32_t>(), block_rows,
                                             cols.const_data_ptr<int32_t>(), cols.numel(), in_features / bs);
  TORCH_CHECK(ok, op, ": row_offsets and cols do not index ", blocks.size(0), " blocks of a ", out_features, "x",
              in_features, " weight");
  return bs;
}

Int8Blocks blocks_of(const at::Tensor& blocks, const at::Tensor& row_offsets, const at::Tensor& cols,
                     const at::Tensor& scales, const at::Tensor& compensation, const c10::optional<at::Tensor>& bias) {
  return {blocks.const_data_ptr<int8_t>(), row_offsets.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(),
          scales.const_data_ptr<float>(), compensation.const_data_ptr<int32_t>(),
          bias.has_value() ? bias->const_data_ptr<float>() : nullptr, blocks.size(2)};
}

at::Tensor rows_contiguous(const char* op, const at::Tensor& input, int64_t tile_tokens) {
  TORCH_CHECK(input.dim() == 2, op, ": expected a 2-D input, got ", input.dim(), " dimensions");
  TORCH_CHECK(tile_tokens > 0, op, ": tile_tokens must be positive");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16 input expected, got ", input.scalar_type());
  return input.stride(1) == 1 && input.size(1) > 0 ? input : input.contiguous();
}

template <typename Body>
void with_dtype(at::ScalarType dtype, Body body) {
  if (dtype == at::kFloat) {
    body(float(0.f));
  } else {
    body(at::BFloat16(0.f));
  }
}

at::Tensor int8_bsr_linear(const at::Tensor& input, const at::Tensor& blocks, const at::Tensor& row_offsets,
                           const at::Tensor& cols, const at::Tensor& weight_scale, const at::Tensor& compensation,
                           const c10::optional<at::Tensor>& bias, int64_t out_features, int64_t tile_tokens,
                           c10::string_view isa_name) {
  const Isa isa = isa_of(isa_name);
  const at::Tensor x = rows_contiguous("int8_bsr_linear", input, tile_tokens);
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  check_layer("int8_bsr_linear", blocks, row_offsets, cols, weight_scale, compensation, bias, x.size(1), out_features);
  const Int8Blocks w = blocks_of(blocks, row_offsets, cols, weight_scale, compensation, bias);
  with_dtype(x.scalar_type(), [&](auto zero) { linear_items<decltype(zero)>(isa, x, w, y, tile_tokens); });
  return y;
}

at::Tensor int8_bsr_mlp(const at::Tensor& input, const at::Tensor& blocks1, const at::Tensor& row_offsets1,
                        const at::Tensor& cols1, const at::Tensor& weight_scale1, const at::Tensor& compensation1,
                        const c10::optional<at::Tensor>& bias1, const at::Tensor& blocks2,
                        const at::Tensor& row_offsets2, const at::Tensor& cols2, const at::Tensor& weight_scale2,
                        const at::Tensor& compensation2, const c10::optional<at::Tensor>& bias2, int64_t out_features,
                        c10::string_view activation, int64_t tile_tokens, c10::string_view isa_name) {
  const std::string act(activation);
  TORCH_CHECK(act == "gelu" || act == "gelu_tanh" || act == "relu" || act == "identity",
              "int8_bsr_mlp: activation must be gelu, gelu_tanh, relu or identity, not ", act);
  const Isa isa = isa_of(isa_name);
  const at::Tensor x = rows_contiguous("int8_bsr_mlp", input, tile_tokens);
  auto y = at::empty({x.size(0), out_features}, x.options());
  if (x.size(0) == 0 || out_features == 0) return y;
  TORCH_CHECK(blocks1.dim() == 4, "int8_bsr_mlp: blocks1 must be (kept, blocksize/4, blocksize, 4)");
  const int64_t hidden = (row_offsets1.numel() - 1) * blocks1.size(2);
  const int64_t bs = check_layer("int8_bsr_mlp", blocks1, row_offsets1, cols1, weight_scale1, compensation1, bias1,
                                 x.size(1), hidden);
  TORCH_CHECK(check_layer("int8_bsr_mlp", blocks2, row_offsets2, cols2, weight_scale2, compensation2, bias2, hidden,
                          out_features) == bs, "int8_bsr_mlp: both Linears must have the same block size");
  const Int8Blocks w1 = blocks_of(blocks1, row_offsets1, cols1, weight_scale1, compensation1, bias1);
  const Int8Blocks w2 = blocks_of(blocks2, row_offsets2, cols2, weight_scale2, compensation2, bias2);
  with_dtype(x.scalar_type(), [&](auto zero) {
    mlp_items<decltype(zero)>(isa, x, w1, hidden, w2, cols2.numel(), y, act, tile_tokens);
  });
  return y;
}

// The instruction sets the int8 ops can use on this CPU, fastest first ("amx", "vnni"); empty where neither runs.
std::vector<std::string> int8_isas() {
  std::vector<std::string> isas;
  if (has_amx()) isas.push_back("amx");
  if (has_vnni()) isas.push_back("vnni");
  return isas;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(superblock, m) {
  m.def("int8_bsr_linear(Tensor input, Tensor blocks, Tensor row_offsets, Tensor cols, Tensor weight_scale, "
        "Tensor compensation, Tensor? bias, int out_features, int tile_tokens, str isa) -> Tensor");
  m.def("int8_bsr_mlp(Tensor input, Tensor blocks1, Tensor row_offsets1, Tensor cols1, Tensor weight_scale1, "
        "Tensor compensation1, Tensor? bias1, Tensor blocks2, Tensor row_offsets2, Tensor cols2, "
        "Tensor weight_scale2, Tensor compensation2, Tensor? bias2, int out_features, str activation, "
        "int tile_tokens, str isa) -> Tensor");
  m.def("int8_isas() -> str[]", &int8_isas);
}

TORCH_LIBRARY_IMPL(superblock, CPU, m) {
  m.impl("int8_bsr_linear", &int8_bsr_linear);
  m.impl("int8_bsr_mlp", &int8_bsr_mlp);
}
