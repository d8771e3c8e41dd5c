// Fuzzes config.json parsing and validation: any bytes give a config or a Status, nothing else.
#include <cstddef>
#include <cstdint>
#include <string>

#include "services/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto cfg = moemesh::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size),
                                       "fuzz/config.json");
  if (cfg.ok()) {
    for (int layer : cfg->MoeLayers()) (void)cfg->IsMoeLayer(layer);
  }
  return 0;
}
