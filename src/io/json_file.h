// Reading JSON with errors a user can act on: "<path>: cannot open",
// "<path>: not valid JSON: <parser message>", "<file>:<line>: expected a JSON object".
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace ossrl {

nlohmann::json read_json_file(const std::string& path);

// One line of a JSONL file, which must hold an object; `where` ("data.jsonl:12") starts the
// message of the Error thrown otherwise.
nlohmann::json parse_json_object(const std::string& line, const std::string& where);

}  // namespace ossrl
