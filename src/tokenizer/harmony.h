// The Harmony chat format of gpt-oss: rendering conversations to the exact text and tokens
// that openai/harmony (src/encoding.rs) produces, and parsing what the model generates after
// `<|start|>assistant` back into messages.
//
//   <|start|>{role}[ to={recipient}][<|channel|>{channel}][ <|constrain|>{type}]<|message|>{content}<|end|>
//
// Structs give every field an initialiser (`{}` at least) so callers can use designated
// initialisers, `{.role = Role::User, .content = "hi"}`, without missing-field warnings.
//
// Every function here except render_conversation/parse_completion works on text, so the
// format can be tested without the tokenizer data.
#pragma once

#include <nlohmann/json.hpp>

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace ossrl::harmony {

enum class Role { System, Developer, User, Assistant, Tool };
std::string_view role_name(Role role);

enum class ReasoningEffort { Low, Medium, High };
std::string_view effort_name(ReasoningEffort effort);
// "low" | "medium" | "high"; throws an Error naming the valid values otherwise.
ReasoningEffort parse_effort(std::string_view name);

// One message. Empty strings mean "absent" for name, channel, recipient and content_type,
// as they are never meaningful when empty.
struct Message {
  Role role = Role::User;
  std::string name{};          // a tool message's author, e.g. "functions.get_weather"
  std::string channel{};       // "analysis" | "commentary" | "final" (assistant, tool results)
  std::string recipient{};     // "functions.get_weather" renders as ` to=functions.get_weather`
  std::string content_type{};  // "<|constrain|>json" (the marker is a special token) or "code"
  std::string content{};
};

// The function a model may call. `parameters` is a JSON schema; its key order is kept
// because it decides the order of fields in the rendered TypeScript type.
struct ToolDescription {
  std::string name{};
  std::string description{};
  std::optional<nlohmann::ordered_json> parameters{};
};

// The system message: model identity, dates, reasoning effort and channels. Empty
// identity or cutoff omit their line, as in harmony.
struct SystemContent {
  std::string model_identity = "You are ChatGPT, a large language model trained by OpenAI.";
  std::string knowledge_cutoff = "2024-06";
  std::optional<std::string> current_date{};  // "2025-06-28"
  ReasoningEffort reasoning_effort = ReasoningEffort::Medium;
  std::vector<std::string> valid_channels = {"analysis", "commentary", "final"};
};

// The developer message: what other formats call the system prompt, plus function tools
// (rendered as `namespace functions { ... }`).
struct DeveloperContent {
  std::string instructions{};
  std::vector<ToolDescription> tools{};
};

// A conversation is rendered as: system message, developer message (each if present), then
// the messages in order. Structured system/developer content lives here rather than in a
// Message because it is rendered from fields, not from text.
struct Conversation {
  std::optional<SystemContent> system{};
  std::optional<DeveloperContent> developer{};
  std::vector<Message> messages{};
};

enum class RenderMode {
  Completion,  // ends with `<|start|>assistant`: the prompt the model continues
  Training,    // a finished conversation; a last assistant `final` message ends in <|return|>
  Plain,       // the messages only
};

struct RenderOptions {
  RenderMode mode = RenderMode::Completion;
  // Leave out the analysis of turns already answered on `final`: an analysis message is
  // dropped when a `final` message and then a user message follow it (docs/format.md,
  // "Handling reasoning output in subsequent sampling"). Matches all harmony fixtures, but
  // harmony's code (auto_drop_analysis) differs in three cases, by design here: harmony drops
  // only analysis before the *first* final, keeps all analysis while the last assistant
  // message is not final (an ongoing tool-calling turn), and drops the current turn's
  // analysis of [user, analysis, final] in training, which would teach answers without
  // their reasoning. A tool-calling turn keeps its analysis either way: it has no final yet.
  bool drop_analysis = true;
};

std::string render_text(const Conversation& conversation, const RenderOptions& options = {});
std::vector<TokenId> render_conversation(const Tokenizer& tokenizer, const Conversation& conversation,
                                         const RenderOptions& options = {});

// The content of the system and developer messages (between <|message|> and <|end|>).
// `has_function_tools` adds the line telling the model where tool calls go.
std::string render_system_content(const SystemContent& system, bool has_function_tools);
std::string render_developer_content(const DeveloperContent& developer);

// `ossrl generate --prompt TEXT`: default system message with `effort`, one user message.
Conversation conversation_from_prompt(std::string_view user_text, ReasoningEffort effort);

// A dataset row: `[{"role": "user", "content": "..."}, ...]`. Optional keys per message:
// "name", "channel", "recipient", "content_type". A "system" or "developer" message's content
// becomes the developer instructions (harmony's system message holds no free text; this is
// what other chat formats call the system prompt). Assistant messages default to the `final`
// channel; tool messages (which need "name") default to ` to=assistant` on `commentary`.
// Throws an Error that names the offending message.
Conversation conversation_from_json(const nlohmann::json& messages, ReasoningEffort effort);

// How a completion stopped.
enum class StopReason {
  Return,     // <|return|>: the final answer is done
  Call,       // <|call|>: a tool call waits for its result
  Truncated,  // the tokens ran out before either
};

struct ParsedCompletion {
  std::vector<Message> messages{};
  std::optional<std::string> final_answer{};  // content of the last `final` message
  StopReason stop = StopReason::Truncated;
  // False when anything deviates from the format the model was trained on; `problem` then
  // says what came first. The messages are still the best reading of the tokens.
  bool well_formed = true;
  std::string problem{};
};

// Parses the tokens the model generated after `<|start|>assistant`, including the stop
// token (<|return|> or <|call|>) if one was sampled. Never throws: malformed or garbage
// input gives a best-effort parse with well_formed == false.
ParsedCompletion parse_completion(const Tokenizer& tokenizer, std::span<const TokenId> tokens);
// The same on text in which special tokens appear by name, as Tokenizer::decode writes them.
ParsedCompletion parse_completion_text(std::string_view text);

}  // namespace ossrl::harmony
