// bench_tokenizer: Tokenizer::Encode throughput against transformers.js on the same text.
//
//   bench_tokenizer [--node_dir build/tokenizer_node] [--tokenizers deepseek_v3,llama2,…]
//                   [--bytes 1048576] [--repeats 3] [--threads 1] [--json out.json]
//
// Needs the tokenizer fixture's build tree (`ctest -L tokenizer` or
// tests/tokenizer/make_goldens.sh build/tokenizer_node): node writes a mixed text of
// --bytes bytes (words, code, whitespace, digits, CJK, emoji, RTL, special tokens), then for
// each tokenizer both sides encode it (add_special_tokens=false) once cold and --repeats
// times warm; tokens/s is from the best warm run. The ids are compared through a hash.
// With --threads N moemesh also encodes N copies in parallel (aggregate tokens/s).
// Prints a table and, with --json, writes the rows.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "services/text/tokenizer.h"

ABSL_FLAG(std::string, node_dir, "build/tokenizer_node",
          "where make_goldens.sh installed transformers.js and wrote golden/");
ABSL_FLAG(std::string, tokenizers, "deepseek_v3,llama2,llama3,llama3_1,qwen3",
          "tokenizers to time");
ABSL_FLAG(int64_t, bytes, 1 << 20, "size of the text");
ABSL_FLAG(int, repeats, 3, "warm runs after the cold one");
ABSL_FLAG(int, threads, 4, "also time this many parallel encodes (0: skip)");
ABSL_FLAG(std::string, json, "", "write results as JSON here");

namespace {

uint32_t HashIds(const std::vector<int32_t>& ids) {
  uint32_t h = 0x811c9dc5u;
  for (int32_t id : ids) {
    for (int k = 0; k < 4; ++k) {
      h ^= (static_cast<uint32_t>(id) >> (8 * k)) & 0xff;
      h *= 0x01000193u;
    }
  }
  return h;
}

std::string Run(const std::string& cmd) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return out;
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof(buf), p)) out.append(buf, n);
  if (pclose(p) != 0) return "";
  return out;
}

double Seconds(absl::Time start) { return absl::ToDoubleSeconds(absl::Now() - start); }

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string dir = absl::GetFlag(FLAGS_node_dir);
  const std::string text_path = dir + "/bench_text.txt";
  const std::string script = dir + "/bench_encode.cjs";
  if (Run("cd '" + dir + "' && node bench_encode.cjs text " +
          std::to_string(absl::GetFlag(FLAGS_bytes)) + " bench_text.txt && echo ok")
          .empty()) {
    std::fprintf(stderr, "bench_tokenizer: cannot run node %s (run the tokenizer fixture first)\n",
                 script.c_str());
    return 1;
  }
  std::ifstream in(text_path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const int repeats = std::max(1, absl::GetFlag(FLAGS_repeats));
  const int threads = absl::GetFlag(FLAGS_threads);

  nlohmann::json rows = nlohmann::json::array();
  std::printf("text: %zu bytes\n", text.size());
  std::printf("%-12s %9s %13s %13s %13s %8s %13s %6s\n", "tokenizer", "tokens", "moemesh tok/s",
              "(cold tok/s)", "tjs tok/s", "ratio", "moemesh xN", "same");
  const std::vector<std::string> names = absl::StrSplit(absl::GetFlag(FLAGS_tokenizers), ',');
  for (const std::string& name : names) {
    auto tok = moemesh::Tokenizer::LoadDir(dir + "/golden/" + name);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s: %s\n", name.c_str(), tok.status().ToString().c_str());
      return 1;
    }
    std::vector<int32_t> ids;
    double cold = 0, best = 1e30;
    for (int r = 0; r <= repeats; ++r) {
      const absl::Time t0 = absl::Now();
      auto got = (*tok)->Encode(text, false);
      const double s = Seconds(t0);
      if (!got.ok()) {
        std::fprintf(stderr, "%s: %s\n", name.c_str(), got.status().ToString().c_str());
        return 1;
      }
      ids = *std::move(got);
      if (r == 0) {
        cold = s;
      } else {
        best = std::min(best, s);
      }
    }
    double parallel_tps = 0;
    if (threads > 0) {
      std::vector<std::thread> pool;
      const absl::Time t0 = absl::Now();
      for (int k = 0; k < threads; ++k) {
        pool.emplace_back([&] { (void)(*tok)->Encode(text, false); });
      }
      for (auto& t : pool) t.join();
      parallel_tps = static_cast<double>(ids.size()) * threads / Seconds(t0);
    }
    const std::string js = Run("cd '" + dir + "' && node bench_encode.cjs encode " + name +
                               " bench_text.txt " + std::to_string(repeats));
    nlohmann::json node;
    try {
      node = nlohmann::json::parse(js);
    } catch (const std::exception&) {
      std::fprintf(stderr, "%s: transformers.js run failed\n", name.c_str());
      return 1;
    }
    const double tps = static_cast<double>(ids.size()) / best;
    const double node_tps = node["tokens"].get<double>() / node["best_s"].get<double>();
    const bool same = node["ids_hash"].get<uint32_t>() == HashIds(ids) &&
                      node["tokens"].get<size_t>() == ids.size();
    std::printf("%-12s %9zu %13.0f %13.0f %13.0f %7.1fx %13.0f %6s\n", name.c_str(), ids.size(),
                tps, ids.size() / cold, node_tps, tps / node_tps, parallel_tps,
                same ? "yes" : "NO");
    rows.push_back({{"tokenizer", name},
                    {"bytes", text.size()},
                    {"tokens", ids.size()},
                    {"moemesh_tokens_per_s", tps},
                    {"moemesh_cold_tokens_per_s", ids.size() / cold},
                    {"moemesh_parallel_threads", threads},
                    {"moemesh_parallel_tokens_per_s", parallel_tps},
                    {"transformers_js_tokens_per_s", node_tps},
                    {"transformers_js_cold_tokens_per_s",
                     node["tokens"].get<double>() / node["cold_s"].get<double>()},
                    {"speedup", tps / node_tps},
                    {"same_ids", same}});
  }
  if (const std::string path = absl::GetFlag(FLAGS_json); !path.empty()) {
    std::ofstream(path) << nlohmann::json{{"bench", "tokenizer_encode"}, {"rows", rows}}.dump(2)
                        << "\n";
  }
  return 0;
}
