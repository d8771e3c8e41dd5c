// gpu_experts_check: the GPU expert path's conformance checks and its benchmark, in one program
// that needs nothing but CUDA (it builds on a GPU machine without moemesh's other dependencies;
// scripts/gpu_check.sh builds and runs it there).
//
//   gpu_experts_check --conformance            # exit 0 pass, 1 fail, 77 no GPU (a ctest skip)
//   gpu_experts_check --bench --json OUT.json  # tables on stdout, rows in OUT.json
//   gpu_experts_check --bench --forms auto,grouped,per_expert  # each GEMM form (default auto)
//
// Conformance: for BF16, FP8 (E4M3, 128×128 block scales, partial edge blocks) and F32 expert
// groups with routed and wider shared experts, RunExperts through the device equals a plain
// double-precision reference over the dequantised weights, within a tolerance per dtype
// (normwise relative error of each output row):
//   f32   1e-5: IEEE F32 GEMMs (no TF32) against double; errors are a few F32 roundings.
//   bf16  1.5e-2: the tokens and the SiLU·mul result are rounded to BF16 (8 significant bits,
//         unit roundoff 2^-9 ≈ 2e-3) before each GEMM, and with the grouped GEMM's BF16 output
//         the gate/up and down results too; with F32 accumulation the normwise error stays a
//         small multiple of 2^-9 (3.6e-3 measured with F32 outputs), so 1.5e-2 is margin, while
//         a wrong expert, weight, slot or order gives errors of order 1.
//   fp8   1.5e-2: as BF16, plus the dequantised weights rounded to BF16 (another 2^-9).
// Each dtype runs with the grouped GEMM form and with one GEMM per expert.
// It also checks that a call gives bitwise the same result twice and from 4 threads at once,
// that an expert not held is refused with a message, and that a group larger than the device
// is refused at start with the byte counts.
//
// Bench: the cuBLAS BF16 GEMM peak (8192³, same run), then for expert groups shaped like
// Mixtral-8x7B (hidden 4096, inter 14336, 8 experts, top-2) and a DeepSeek-V3 group
// (hidden 7168, inter 2048, 32 experts, 8 per token), BF16 and FP8: per tokens-per-call,
// the expert FFN's TFLOP/s (device compute time between events), the whole call's latency
// (wall, median) and its host→device and device→host copy times.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "services/compute/cuda/cuda_experts.h"
#include "services/compute/device_experts.h"
#include "services/tensor/weight.h"

namespace moemesh {
namespace {

using cuda_impl::MakeCudaExperts;

// Host storage for one weight of any dtype.
struct HostWeight {
  std::vector<uint8_t> bytes;
  std::vector<float> scales;
  Weight w;
};

// A [rows, cols] weight of `dtype` with values of about `scale` in magnitude.
std::shared_ptr<HostWeight> MakeWeight(DType dtype, int64_t rows, int64_t cols, float scale,
                                       std::mt19937* rng) {
  auto h = std::make_shared<HostWeight>();
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const int64_t n = rows * cols;
  h->w.dtype = dtype;
  h->w.rows = rows;
  h->w.cols = cols;
  switch (dtype) {
    case DType::kF32: {
      h->bytes.resize(n * 4);
      float* p = reinterpret_cast<float*>(h->bytes.data());
      for (int64_t i = 0; i < n; ++i) p[i] = u(*rng) * scale;
      break;
    }
    case DType::kBF16:
    case DType::kF16: {
      h->bytes.resize(n * 2);
      uint16_t* p = reinterpret_cast<uint16_t*>(h->bytes.data());
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToBf16Bits(u(*rng) * scale);
      h->w.dtype = DType::kBF16;
      break;
    }
    case DType::kF8E4M3: {
      h->bytes.resize(n);
      std::uniform_int_distribution<int> code(0, 255);
      for (int64_t i = 0; i < n; ++i) {
        int c = code(*rng);
        if ((c & 0x7f) == 0x7f) c &= 0xfe;  // no NaN codes: quantisers never write them
        h->bytes[i] = static_cast<uint8_t>(c);
      }
      h->w.block_rows = 128;
      h->w.block_cols = 128;
      h->scales.resize(h->w.scale_rows() * h->w.scale_cols());
      // E4M3 codes span ±448; scale blocks so that values are about `scale`.
      for (float& s : h->scales) s = scale / 448.0f * (1.0f + 0.5f * u(*rng));
      h->w.scale_inv = h->scales.data();
      break;
    }
  }
  h->w.data = h->bytes.data();
  h->w.owner = h;
  return h;
}

struct Group {
  std::vector<DeviceExpertWeights> experts;
  std::vector<std::shared_ptr<HostWeight>> keep;
};

// `routed` experts of width `inter` and, when shared_inter > 0, one shared expert (id -1).
Group MakeGroup(DType dtype, int layer, int64_t hidden, int64_t inter, int routed,
                int64_t shared_inter, uint32_t seed) {
  std::mt19937 rng(seed);
  Group g;
  auto add = [&](int id, int64_t width) {
    auto w1 = MakeWeight(dtype, width, hidden, 1.0f / std::sqrt(hidden), &rng);
    auto w3 = MakeWeight(dtype, width, hidden, 1.0f / std::sqrt(hidden), &rng);
    auto w2 = MakeWeight(dtype, hidden, width, 1.0f / std::sqrt(width), &rng);
    g.experts.push_back({layer, id, w1->w, w3->w, w2->w});
    g.keep.insert(g.keep.end(), {w1, w3, w2});
  };
  for (int e = 0; e < routed; ++e) add(e, inter);
  if (shared_inter > 0) add(-1, shared_inter);
  return g;
}

struct Call {
  int layer = 0;
  int64_t hidden = 0;
  std::vector<float> x;  // [n, hidden]
  std::vector<const float*> rows;
  std::vector<int32_t> offsets, experts;
  std::vector<float> weights;
  int64_t n() const { return static_cast<int64_t>(rows.size()); }
  DeviceExpertCall View(float* out) const {
    DeviceExpertCall c;
    c.layer = layer;
    c.num_tokens = n();
    c.token_rows = rows.data();
    c.offsets = offsets.data();
    c.experts = experts.data();
    c.weights = weights.data();
    c.out = out;
    return c;
  }
};

// n tokens, each sent to k distinct routed experts (some tokens to none when `allow_empty`),
// plus the shared expert when `shared`; rows are given in a shuffled order, so the device's
// gather is exercised.
Call MakeCall(int layer, int64_t hidden, int64_t n, int routed, int k, bool shared,
              bool allow_empty, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  Call c;
  c.layer = layer;
  c.hidden = hidden;
  c.x.resize(n * hidden);
  for (float& v : c.x) v = u(rng) * 2.0f;
  std::vector<int64_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  c.offsets.push_back(0);
  std::vector<int> ids(routed);
  for (int64_t i = 0; i < n; ++i) {
    c.rows.push_back(c.x.data() + perm[i] * hidden);
    for (int e = 0; e < routed; ++e) ids[e] = e;
    std::shuffle(ids.begin(), ids.end(), rng);
    const int kk = allow_empty && rng() % 7 == 0 ? 0 : k;
    for (int j = 0; j < kk; ++j) {
      c.experts.push_back(ids[j]);
      c.weights.push_back(0.1f + 0.9f * (u(rng) + 1.0f) / 2.0f);
    }
    if (shared && kk > 0) {
      c.experts.push_back(-1);
      c.weights.push_back(1.0f);
    }
    c.offsets.push_back(static_cast<int32_t>(c.experts.size()));
  }
  return c;
}

// Reference: double precision over the dequantised weights; out[i] sums in ascending id.
std::vector<double> Reference(const Group& g, const Call& c) {
  const int64_t hidden = c.hidden;
  std::vector<double> out(c.n() * hidden, 0.0);
  for (int64_t i = 0; i < c.n(); ++i) {
    std::vector<std::pair<int32_t, float>> a;
    for (int32_t j = c.offsets[i]; j < c.offsets[i + 1]; ++j) {
      a.push_back({c.experts[j], c.weights[j]});
    }
    std::sort(a.begin(), a.end());
    for (const auto& [id, wt] : a) {
      const DeviceExpertWeights* e = nullptr;
      for (const auto& x : g.experts) {
        if (x.layer == c.layer && x.expert == id) e = &x;
      }
      const int64_t inter = e->w1.rows;
      std::vector<double> act(inter);
      for (int64_t r = 0; r < inter; ++r) {
        double gsum = 0, usum = 0;
        for (int64_t k = 0; k < hidden; ++k) {
          gsum += WeightAt(e->w1, r, k) * static_cast<double>(c.rows[i][k]);
          usum += WeightAt(e->w3, r, k) * static_cast<double>(c.rows[i][k]);
        }
        act[r] = gsum / (1.0 + std::exp(-gsum)) * usum;
      }
      for (int64_t h = 0; h < hidden; ++h) {
        double y = 0;
        for (int64_t r = 0; r < inter; ++r) y += WeightAt(e->w2, h, r) * act[r];
        out[i * hidden + h] += wt * y;
      }
    }
  }
  return out;
}

int failures = 0;
#define EXPECT_CHECK(cond, ...)                          \
  do {                                                   \
    if (!(cond)) {                                       \
      ++failures;                                        \
      std::printf("  FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                          \
      std::printf("\n");                                 \
    }                                                    \
  } while (0)

const char* DTypeName(DType d) {
  switch (d) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kF8E4M3:
      return "fp8";
  }
  return "?";
}

// The form a call ran: "grouped-bf16" / "grouped-f32" (by its output dtype) or "loop".
std::string GemmLabel(const DeviceExperts& d, bool grouped) {
  if (!grouped) return "loop";
  return d.gemm().rfind("grouped (bf16", 0) == 0 ? "grouped-bf16" : "grouped-f32";
}

using GemmForm = DeviceExpertsOptions::GemmForm;

void CheckDtype(int device, DType dtype, double tol, GemmForm form) {
  const int layer = 3;
  const int64_t hidden = 384, inter = 320, shared_inter = 640;  // 320: partial FP8 blocks
  const int routed = 6;
  Group g = MakeGroup(dtype, layer, hidden, inter, routed, shared_inter, 11);
  std::string err;
  DeviceExpertsOptions options;
  options.gemm_form = form;
  std::unique_ptr<DeviceExperts> d = MakeCudaExperts(device, g.experts, options, &err);
  EXPECT_CHECK(d != nullptr, "%s: MakeCudaExperts: %s", DTypeName(dtype), err.c_str());
  if (d == nullptr) return;
  std::printf("%s group on %s: %.2f MiB of weights, compute %s, GEMMs %s\n", DTypeName(dtype),
              d->device().c_str(), d->weight_bytes() / 1048576.0, d->compute_dtype().c_str(),
              d->gemm().c_str());
  double worst = 0;
  bool ran_grouped = false;
  for (int64_t n : {1, 2, 5, 16, 64, 130}) {
    for (bool shared : {false, true}) {
      Call c = MakeCall(layer, hidden, n, routed, 2, shared, /*allow_empty=*/n > 2,
                        static_cast<uint32_t>(n * 7 + shared));
      std::vector<float> out(n * hidden, -1.0f);
      DeviceExpertsTiming t;
      const bool ok = d->Run(c.View(out.data()), &err, &t);
      ran_grouped = ran_grouped || t.grouped;
      EXPECT_CHECK(ok, "%s n=%lld: Run: %s", DTypeName(dtype), static_cast<long long>(n),
                   err.c_str());
      if (!ok) continue;
      const std::vector<double> ref = Reference(g, c);
      for (int64_t i = 0; i < n; ++i) {
        double num = 0, den = 0;
        for (int64_t h = 0; h < hidden; ++h) {
          const double diff = out[i * hidden + h] - ref[i * hidden + h];
          num += diff * diff;
          den += ref[i * hidden + h] * ref[i * hidden + h];
        }
        const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
        worst = std::max(worst, rel);
        EXPECT_CHECK(rel <= tol, "%s n=%lld shared=%d token %lld: relative error %.3g > %.3g",
                     DTypeName(dtype), static_cast<long long>(n), shared, static_cast<long long>(i),
                     rel, tol);
      }
      // The same call again: bitwise the same.
      std::vector<float> again(n * hidden, -2.0f);
      EXPECT_CHECK(d->Run(c.View(again.data()), &err, nullptr) &&
                       std::memcmp(again.data(), out.data(), out.size() * 4) == 0,
                   "%s n=%lld: a second run differs", DTypeName(dtype), static_cast<long long>(n));
    }
  }
  std::printf("  %s, %s: worst normwise relative error %.3g (tolerance %.3g)\n", DTypeName(dtype),
              GemmLabel(*d, ran_grouped).c_str(), worst, tol);

  // Four threads at once, each its own calls, each result equal to the sequential one.
  std::vector<Call> calls;
  std::vector<std::vector<float>> expect(8), got(8);
  for (int t = 0; t < 8; ++t) {
    calls.push_back(MakeCall(layer, hidden, 20 + 9 * t, routed, 2, t % 2 == 1, true, 100 + t));
    expect[t].resize(calls[t].n() * hidden);
    got[t].assign(calls[t].n() * hidden, 0.0f);
    EXPECT_CHECK(d->Run(calls[t].View(expect[t].data()), &err, nullptr), "sequential: %s",
                 err.c_str());
  }
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 1);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 20; ++rep) {
        for (int j = t; j < 8; j += 4) {
          std::string e;
          std::vector<float> o(calls[j].n() * hidden);
          if (!d->Run(calls[j].View(o.data()), &e, nullptr) ||
              std::memcmp(o.data(), expect[j].data(), o.size() * 4) != 0) {
            ok[t] = 0;
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int t = 0; t < 4; ++t) {
    EXPECT_CHECK(ok[t], "%s: concurrent calls from thread %d differ from sequential ones",
                 DTypeName(dtype), t);
  }

  // An expert not held, and a layer not held.
  Call bad = MakeCall(layer, hidden, 3, routed, 2, false, false, 5);
  bad.experts[1] = routed + 3;
  std::vector<float> out(3 * hidden);
  EXPECT_CHECK(
      !d->Run(bad.View(out.data()), &err, nullptr) && err.find("not held") != std::string::npos,
      "%s: an expert not held was not refused (%s)", DTypeName(dtype), err.c_str());
  bad = MakeCall(layer + 1, hidden, 3, routed, 2, false, false, 5);
  EXPECT_CHECK(!d->Run(bad.View(out.data()), &err, nullptr), "%s: a layer not held ran",
               DTypeName(dtype));
}

int Conformance(int device) {
  std::printf("== conformance on cuda:%d\n", device);
  for (const GemmForm form : {GemmForm::kGrouped, GemmForm::kPerExpert}) {
    CheckDtype(device, DType::kBF16, 1.5e-2, form);
    CheckDtype(device, DType::kF8E4M3, 1.5e-2, form);
    CheckDtype(device, DType::kF32, 1e-5, form);
  }
  // A group that does not fit is refused at start, with the byte counts.
  {
    Group g = MakeGroup(DType::kBF16, 0, 256, 256, 2, 0, 3);
    DeviceExpertsOptions o;
    o.reserve_bytes = int64_t{1} << 50;  // a petabyte "reserved": no device has that
    std::string err;
    auto d = MakeCudaExperts(device, g.experts, o, &err);
    EXPECT_CHECK(d == nullptr && err.find("needs") != std::string::npos &&
                     err.find("bytes free") != std::string::npos,
                 "an oversized group was not refused with its byte counts (%s)", err.c_str());
    std::printf("oversized group refused: %s\n", err.c_str());
  }
  std::printf("%s: %d failure(s)\n", failures == 0 ? "PASS" : "FAIL", failures);
  return failures == 0 ? 0 : 1;
}

// ---- bench ---------------------------------------------------------------------------------

struct Shape {
  const char* name;
  int64_t hidden, inter;
  int experts, top_k;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Bench(int device, const std::string& json_path, const std::vector<GemmForm>& forms) {
  std::string err;
  const double peak = cuda_impl::CudaBf16GemmTflops(device, 8192, 8192, 8192, 10, &err);
  if (peak < 0) {
    std::printf("peak GEMM failed: %s\n", err.c_str());
    return 1;
  }
  std::printf("cuBLAS BF16 GEMM 8192x8192x8192 (F32 accumulate and output): %.1f TFLOP/s\n", peak);
  std::string json = "{\"peak_bf16_tflops\": " + std::to_string(peak) + ", \"rows\": [";
  bool first = true;
  const Shape shapes[] = {{"mixtral-8x7b", 4096, 14336, 8, 2}, {"deepseek-v3", 7168, 2048, 32, 8}};
  std::printf("%-13s %-5s %-12s %6s %9s %8s %10s %10s %9s %9s\n", "group", "dtype", "gemm",
              "tokens", "TFLOP/s", "of peak", "call ms", "compute ms", "H2D ms", "D2H ms");
  for (const Shape& sh : shapes) {
    for (DType dtype : {DType::kBF16, DType::kF8E4M3}) {
      for (const GemmForm form : forms) {
        // One expert's random weights, shared by all experts of the group on the host (the
        // device holds a copy per expert): the products' speed does not depend on the values.
        Group one = MakeGroup(dtype, 0, sh.hidden, sh.inter, 1, 0, 9);
        Group g;
        g.keep = one.keep;
        for (int e = 0; e < sh.experts; ++e) {
          DeviceExpertWeights w = one.experts[0];
          w.expert = e;
          g.experts.push_back(w);
        }
        DeviceExpertsOptions o;
        o.gemm_form = form;
        auto d = MakeCudaExperts(device, g.experts, o, &err);
        if (d == nullptr) {
          std::printf("%s %s: %s\n", sh.name, DTypeName(dtype), err.c_str());
          return 1;
        }
        for (int64_t n : {1, 4, 16, 64, 256, 1024, 4096}) {
          Call c = MakeCall(0, sh.hidden, n, sh.experts, sh.top_k, false, false, 1);
          std::vector<float> out(n * sh.hidden);
          const int reps = n >= 1024 ? 10 : 30;
          std::vector<double> wall, compute, h2d, d2h;
          bool grouped = false;
          for (int r = 0; r < reps + 3; ++r) {
            DeviceExpertsTiming t;
            const auto t0 = std::chrono::steady_clock::now();
            if (!d->Run(c.View(out.data()), &err, &t)) {
              std::printf("Run: %s\n", err.c_str());
              return 1;
            }
            const double s =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            if (r < 3) continue;
            wall.push_back(s);
            compute.push_back(t.compute);
            grouped = t.grouped;
            h2d.push_back(t.host_to_device);
            d2h.push_back(t.device_to_host);
          }
          const double flops =
              2.0 * static_cast<double>(c.experts.size()) * sh.hidden * 3 * sh.inter;
          const double tflops = flops / Median(compute) / 1e12;
          std::printf("%-13s %-5s %-12s %6lld %9.1f %7.1f%% %10.3f %10.3f %9.3f %9.3f\n", sh.name,
                      DTypeName(dtype), GemmLabel(*d, grouped).c_str(), static_cast<long long>(n),
                      tflops, 100 * tflops / peak, Median(wall) * 1e3, Median(compute) * 1e3,
                      Median(h2d) * 1e3, Median(d2h) * 1e3);
          char row[512];
          std::snprintf(row, sizeof(row),
                        "%s{\"group\": \"%s\", \"dtype\": \"%s\", \"gemm\": \"%s\", \"tokens\": "
                        "%lld, \"tflops\": %.3f, \"fraction_of_peak\": %.4f, \"call_ms\": %.4f, "
                        "\"compute_ms\": %.4f, \"h2d_ms\": %.4f, \"d2h_ms\": %.4f}",
                        first ? "" : ", ", sh.name, DTypeName(dtype),
                        GemmLabel(*d, grouped).c_str(), static_cast<long long>(n), tflops,
                        tflops / peak, Median(wall) * 1e3, Median(compute) * 1e3, Median(h2d) * 1e3,
                        Median(d2h) * 1e3);
          json += row;
          first = false;
        }
      }
    }
  }
  json += "]}\n";
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::printf("cannot write %s\n", json_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace moemesh

int main(int argc, char** argv) {
  bool conformance = false, bench = false;
  std::vector<moemesh::GemmForm> forms = {moemesh::GemmForm::kAuto};
  int device = 0;
  std::string json;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--conformance") {
      conformance = true;
    } else if (a == "--bench") {
      bench = true;
    } else if (a == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (a == "--forms" && i + 1 < argc) {
      forms.clear();
      for (std::string f = argv[++i]; !f.empty();) {
        const size_t comma = f.find(',');
        const std::string one = f.substr(0, comma);
        f = comma == std::string::npos ? "" : f.substr(comma + 1);
        if (one == "auto") {
          forms.push_back(moemesh::GemmForm::kAuto);
        } else if (one == "grouped") {
          forms.push_back(moemesh::GemmForm::kGrouped);
        } else if (one == "per_expert") {
          forms.push_back(moemesh::GemmForm::kPerExpert);
        } else {
          std::fprintf(stderr, "--forms: auto, grouped or per_expert, not '%s'\n", one.c_str());
          return 2;
        }
      }
    } else if (a == "--device" && i + 1 < argc) {
      device = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr,
                   "usage: %s [--conformance] [--bench] [--forms auto,grouped,per_expert] [--json "
                   "OUT] [--device N]\n",
                   argv[0]);
      return 2;
    }
  }
  if (!conformance && !bench) conformance = true;
  if (moemesh::cuda_impl::CudaVisibleDevices() <= device) {
    std::printf("no CUDA device %d is visible: skipped\n", device);
    return 77;
  }
  int rc = 0;
  if (conformance) rc |= moemesh::Conformance(device);
  if (bench) rc |= moemesh::Bench(device, json, forms);
  return rc;
}
