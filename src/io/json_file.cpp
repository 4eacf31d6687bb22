#include "io/json_file.h"

#include <fstream>

#include "core/error.h"

namespace ossrl {

nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path);
  OSSRL_CHECK(in.good(), "{}: cannot open", path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }
}

nlohmann::json parse_json_object(const std::string& line, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON ({})", where, e.what());
  }
  OSSRL_CHECK(j.is_object(), "{}: expected a JSON object", where);
  return j;
}

}  // namespace ossrl
