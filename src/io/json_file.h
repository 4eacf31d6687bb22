// Reading a JSON file with errors a user can act on: "<path>: cannot open" or
// "<path>: not valid JSON: <parser message>".
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace ossrl {

nlohmann::json read_json_file(const std::string& path);

}  // namespace ossrl
