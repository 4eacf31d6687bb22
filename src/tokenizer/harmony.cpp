// Harmony rendering and parsing. The rendering facts (header order, the system and developer
// templates, the JSON-schema-to-TypeScript rules) are those of openai/harmony src/encoding.rs,
// whose test-data/ fixtures are our golden strings; which analysis messages are dropped
// follows harmony's docs/format.md (RenderOptions::drop_analysis says where the code differs).
#include "tokenizer/harmony.h"

#include <fmt/format.h>

#include <array>
#include <charconv>
#include <set>
#include <utility>

#include "core/error.h"

namespace ossrl::harmony {
namespace {

using Json = nlohmann::ordered_json;

// A conversation is built and parsed as a list of pieces: special tokens and runs of text.
// Rendering goes through pieces so that text and tokens come from one code path, and so
// that each text run is encoded on its own, as harmony does (BPE across a boundary such as
// "assistant" | " to=functions.f" could otherwise merge differently).
constexpr TokenId kTextPiece = -1;
constexpr TokenId kInvalidPiece = -2;  // a token id outside the vocabulary (parsing only)

struct Piece {
  TokenId special = kTextPiece;
  std::string text;  // the text, or the special token's name
};

void add_special(std::vector<Piece>& pieces, TokenId id) { pieces.push_back({id, special_token_name(id)}); }

void add_text(std::vector<Piece>& pieces, std::string text) {
  if (!text.empty()) pieces.push_back({kTextPiece, std::move(text)});
}

std::string join(const std::vector<std::string>& parts, std::string_view separator) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += separator;
    out += parts[i];
  }
  return out;
}

// Rust's str::lines(): split on '\n', drop a trailing '\r', no final empty line.
std::vector<std::string> lines(std::string_view text) {
  std::vector<std::string> out;
  while (!text.empty()) {
    size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    if (line.ends_with('\r')) line.remove_suffix(1);
    out.emplace_back(line);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
  }
  return out;
}

// ---- JSON schema -> TypeScript, as harmony's json_schema_to_typescript ----

const Json* member(const Json& schema, const char* key) {
  if (!schema.is_object()) return nullptr;
  auto it = schema.find(key);
  return it == schema.end() ? nullptr : &*it;
}

const std::string* string_member(const Json& schema, const char* key) {
  const Json* value = member(schema, key);
  return value && value->is_string() ? value->get_ptr<const std::string*>() : nullptr;
}

bool is_enum(const Json& schema) {
  const Json* values = member(schema, "enum");
  return values && values->is_array() && !values->empty();
}

// `nullable: true` adds `| null` unless the type already says null.
std::string with_null(std::string type, const Json& schema) {
  const Json* nullable = member(schema, "nullable");
  if (nullable && nullable->is_boolean() && nullable->get<bool>() && type.find("null") == std::string::npos) {
    type += " | null";
  }
  return type;
}

// A default in a comment: strings are quoted, except an enum's (its type already lists
// the quoted values).
std::string format_default(const Json& value, bool of_enum) {
  if (!value.is_string()) return value.dump();
  const auto& text = value.get_ref<const std::string&>();
  return of_enum ? text : fmt::format("\"{}\"", text);
}

std::string typescript_type(const Json& schema, const std::string& indent);

// A property whose schema is `oneOf`: its variants one per line after the name.
void typescript_one_of_property(std::string& out, const std::string& key, const char* optional_mark,
                                const Json& property, const Json& variants, const std::string& indent) {
  const std::string* description = string_member(property, "description");
  // The description goes above the name, unless the first variant repeats it.
  bool repeated = description && !variants.empty() && string_member(variants[0], "description") &&
                  *string_member(variants[0], "description") == *description;
  bool description_above = description && !repeated;
  if (description_above) out += fmt::format("{}// {}\n", indent, *description);
  if (const Json* value = member(property, "default")) {
    out += fmt::format("{}// default: {}\n", indent, format_default(*value, is_enum(property)));
  }
  out += fmt::format("{}{}{}:\n", indent, key, optional_mark);
  for (size_t i = 0; i < variants.size(); ++i) {
    const Json& variant = variants[i];
    out += fmt::format("{} | {}", indent, with_null(typescript_type(variant, indent + "   "), variant));
    std::vector<std::string> comments;
    const std::string* variant_description = string_member(variant, "description");
    if (!(i == 0 && description_above) && variant_description &&
        !(description && *variant_description == *description)) {
      comments.push_back(*variant_description);
    }
    if (const Json* value = member(variant, "default")) {
      comments.push_back("default: " + format_default(*value, is_enum(variant)));
    }
    if (!comments.empty()) out += " // " + join(comments, " ");
    out += '\n';
  }
  out += indent + ",\n";
}

std::string typescript_object(const Json& schema, const std::string& indent) {
  std::string out;
  if (const std::string* description = string_member(schema, "description")) {
    out += fmt::format("{}// {}\n", indent, *description);
  }
  out += "{\n";
  const Json* properties = member(schema, "properties");
  if (properties && properties->is_object()) {
    std::set<std::string> required;
    if (const Json* names = member(schema, "required"); names && names->is_array()) {
      for (const Json& name : *names) {
        if (name.is_string()) required.insert(name.get<std::string>());
      }
    }
    for (const auto& [key, property] : properties->items()) {
      const char* optional_mark = required.contains(key) ? "" : "?";
      if (const std::string* title = string_member(property, "title")) {
        out += fmt::format("{0}// {1}\n{0}//\n", indent, *title);
      }
      const Json* one_of = member(property, "oneOf");
      if (!one_of) {
        if (const std::string* description = string_member(property, "description")) {
          out += fmt::format("{}// {}\n", indent, *description);
        }
      }
      if (const Json* examples = member(property, "examples"); examples && examples->is_array() && !examples->empty()) {
        out += indent + "// Examples:\n";
        for (const Json& example : *examples) {
          if (example.is_string()) out += fmt::format("{}// - \"{}\"\n", indent, example.get<std::string>());
        }
      }
      if (one_of && one_of->is_array()) {
        typescript_one_of_property(out, key, optional_mark, property, *one_of, indent);
        continue;
      }
      out += fmt::format("{}{}{}: {},", indent, key, optional_mark,
                         with_null(typescript_type(property, indent + "    "), property));
      if (const Json* value = member(property, "default"); value && !one_of) {
        out += " // default: " + format_default(*value, is_enum(property));
      }
      out += '\n';
    }
  }
  out += indent + "}";
  return out;
}

std::string typescript_type(const Json& schema, const std::string& indent) {
  if (const Json* variants = member(schema, "oneOf"); variants && variants->is_array()) {
    std::string out;
    for (const Json& variant : *variants) {
      out += fmt::format("\n{} | {}", indent, with_null(typescript_type(variant, indent + "   "), variant));
      std::vector<std::string> comments;
      if (const std::string* description = string_member(variant, "description")) comments.push_back(*description);
      // harmony quotes every string default here, enum or not.
      if (const Json* value = member(variant, "default")) comments.push_back("default: " + format_default(*value, false));
      if (!comments.empty()) out += " // " + join(comments, " ");
    }
    return out;
  }
  const Json* type = member(schema, "type");
  if (type && type->is_array()) {
    std::vector<std::string> names;
    for (const Json& name : *type) {
      if (name.is_string()) names.push_back(name == "integer" ? "number" : name.get<std::string>());
    }
    return names.empty() ? "any" : join(names, " | ");
  }
  if (!type || !type->is_string()) return "any";
  const auto& name = type->get_ref<const std::string&>();
  if (name == "object") return typescript_object(schema, indent);
  if (name == "string") {
    std::vector<std::string> values;
    if (const Json* options = member(schema, "enum"); options && options->is_array()) {
      for (const Json& value : *options) {
        if (value.is_string()) values.push_back(fmt::format("\"{}\"", value.get<std::string>()));
      }
    }
    return values.empty() ? "string" : join(values, " | ");
  }
  if (name == "number" || name == "integer") return "number";
  if (name == "boolean") return "boolean";
  if (name == "array") {
    const Json* items = member(schema, "items");
    return items ? typescript_type(*items, indent) + "[]" : "Array<any>";
  }
  return "any";
}

// `# Tools` with one namespace, `functions`: the only namespace a developer message holds.
std::string render_function_tools(const std::vector<ToolDescription>& tools) {
  std::vector<std::string> lines_out = {"## functions\n", "namespace functions {\n"};
  for (const ToolDescription& tool : tools) {
    for (const std::string& line : lines(tool.description)) lines_out.push_back("// " + line);
    if (tool.parameters) {
      lines_out.push_back(fmt::format("type {} = (_: {}) => any;\n", tool.name, typescript_type(*tool.parameters, "")));
    } else {
      lines_out.push_back(fmt::format("type {} = () => any;\n", tool.name));
    }
  }
  lines_out.push_back("} // namespace functions");
  return "# Tools\n\n" + join(lines_out, "\n");
}

// ---- rendering ----

void render_message(std::vector<Piece>& pieces, const Message& message) {
  add_special(pieces, harmony_tokens::kStart);
  if (message.role == Role::Tool) {
    // A tool speaks under its own name ("functions.get_weather"), not as "tool".
    OSSRL_CHECK(!message.name.empty(), "a tool message needs the tool's name as its author");
    add_text(pieces, message.name);
  } else {
    add_text(pieces, std::string(role_name(message.role)));
    if (!message.name.empty()) add_text(pieces, ":" + message.name);
  }
  // harmony leaves out the recipient "all" (everyone): it is the default.
  if (!message.recipient.empty() && message.recipient != "all") add_text(pieces, " to=" + message.recipient);
  if (!message.channel.empty()) {
    add_special(pieces, harmony_tokens::kChannel);
    add_text(pieces, message.channel);
  }
  if (!message.content_type.empty()) {
    const std::string constrain = special_token_name(harmony_tokens::kConstrain);
    if (message.content_type.starts_with(constrain)) {
      add_text(pieces, " ");
      add_special(pieces, harmony_tokens::kConstrain);
      add_text(pieces, message.content_type.substr(constrain.size()));
    } else {
      add_text(pieces, " " + message.content_type);
    }
  }
  add_special(pieces, harmony_tokens::kMessage);
  add_text(pieces, message.content);
  // An assistant message addressed to someone is a tool call: it stops sampling.
  bool tool_call = message.role == Role::Assistant && !message.recipient.empty();
  add_special(pieces, tool_call ? harmony_tokens::kCall : harmony_tokens::kEnd);
}

std::vector<Piece> render_pieces(const Conversation& conversation, const RenderOptions& options) {
  std::vector<Piece> pieces;
  if (conversation.system) {
    bool has_function_tools = conversation.developer && !conversation.developer->tools.empty();
    render_message(pieces, {.role = Role::System,
                            .content = render_system_content(*conversation.system, has_function_tools)});
  }
  if (conversation.developer) {
    render_message(pieces, {.role = Role::Developer, .content = render_developer_content(*conversation.developer)});
  }

  // Analysis before `answered` (the last final message that a user message follows) is from
  // turns already answered.
  const std::vector<Message>& messages = conversation.messages;
  auto answered = messages.begin();
  bool user_follows = false;
  for (auto it = messages.end(); it != messages.begin();) {
    --it;
    if (it->role == Role::User) user_follows = true;
    if (user_follows && it->role == Role::Assistant && it->channel == "final") {
      answered = it;
      break;
    }
  }
  for (auto it = messages.begin(); it != messages.end(); ++it) {
    bool dropped = options.drop_analysis && it < answered && it->channel == "analysis";
    if (!dropped) render_message(pieces, *it);
  }

  if (options.mode == RenderMode::Completion) {
    add_special(pieces, harmony_tokens::kStart);
    add_text(pieces, std::string(role_name(Role::Assistant)));
  } else if (options.mode == RenderMode::Training && !messages.empty() &&
             messages.back().role == Role::Assistant && messages.back().channel == "final") {
    // The model learns to stop after its final answer: that is where it samples <|return|>.
    pieces.back() = {harmony_tokens::kReturn, special_token_name(harmony_tokens::kReturn)};
  }
  return pieces;
}

// ---- parsing ----

// Invalid UTF-8 (a completion cut inside a character, or garbage tokens) becomes U+FFFD,
// so parsed text can always go into JSON for a reward process.
std::string valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    unsigned char lead = byte(i);
    size_t length = lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 0;
    bool ok = length > 0 && i + length <= s.size();
    uint32_t code = length == 1 ? lead : lead & (0x7F >> length);
    for (size_t k = 1; ok && k < length; ++k) {
      ok = (byte(i + k) & 0xC0) == 0x80;
      code = (code << 6) | (byte(i + k) & 0x3F);
    }
    // Overlong forms, surrogates and code points past U+10FFFF are invalid too.
    constexpr uint32_t kMinimum[] = {0, 0, 0x80, 0x800, 0x10000};
    ok = ok && code >= kMinimum[length] && code <= 0x10FFFF && !(code >= 0xD800 && code <= 0xDFFF);
    if (ok) {
      out.append(s.substr(i, length));
      i += length;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

std::vector<std::string> split_whitespace(std::string_view text) {
  std::vector<std::string> parts;
  size_t i = 0;
  auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  while (i < text.size()) {
    while (i < text.size() && space(text[i])) ++i;
    size_t start = i;
    while (i < text.size() && !space(text[i])) ++i;
    if (i > start) parts.emplace_back(text.substr(start, i - start));
  }
  return parts;
}

bool is_known_channel(std::string_view channel) {
  return channel == "analysis" || channel == "commentary" || channel == "final";
}

// Reads a completion piece by piece. The first message's `<|start|>assistant` is the end of
// the prompt, so its header starts directly with `<|channel|>`.
class CompletionParser {
 public:
  ParsedCompletion parse(std::span<const Piece> pieces) {
    for (const Piece& piece : pieces) {
      if (state_ == State::Done) {
        malformed(fmt::format("{} after {}", describe(piece), special_token_name(terminator_)));
        break;
      }
      if (piece.special == kInvalidPiece) {
        malformed(fmt::format("token id {} is outside the vocabulary", piece.text));
        continue;
      }
      switch (state_) {
        case State::BetweenMessages: between_messages(piece); break;
        case State::Header: header(piece); break;
        case State::Content: content(piece); break;
        case State::Done: break;
      }
    }
    finish();
    return std::move(out_);
  }

 private:
  enum class State { BetweenMessages, Header, Content, Done };

  // A special token by name; text shortened, as a problem is one line.
  static std::string describe(const Piece& piece) {
    if (piece.special != kTextPiece) return piece.text;
    constexpr size_t kShown = 40;
    std::string shown = valid_utf8(piece.text.substr(0, kShown));
    return fmt::format("text '{}{}'", shown, piece.text.size() > kShown ? "..." : "");
  }

  void malformed(std::string problem) {
    if (out_.well_formed) {
      out_.well_formed = false;
      out_.problem = std::move(problem);
    }
  }

  void between_messages(const Piece& piece) {
    if (piece.special == harmony_tokens::kStart) {
      state_ = State::Header;
      role_implied_ = false;
      header_.clear();
    } else {
      malformed(fmt::format("{} between messages, where <|start|> belongs", describe(piece)));
    }
  }

  void header(const Piece& piece) {
    switch (piece.special) {
      case kTextPiece:
      case harmony_tokens::kChannel:
      case harmony_tokens::kConstrain: header_ += piece.text; return;
      case harmony_tokens::kMessage:
        message_ = parse_header(/*metadata=*/true);
        content_.clear();
        state_ = State::Content;
        return;
      case harmony_tokens::kEnd:
      case harmony_tokens::kReturn:
      case harmony_tokens::kCall:
        malformed(fmt::format("a message header ended by {} without <|message|>", piece.text));
        // Best effort, as harmony's non-strict mode: the header's words are the content.
        message_ = parse_header(/*metadata=*/false);
        end_message(piece.special);
        return;
      case harmony_tokens::kStart:
        malformed("<|start|> inside a message header");
        header_.clear();
        role_implied_ = false;
        return;
      default: malformed(fmt::format("stray {} in a message header", piece.text)); return;
    }
  }

  void content(const Piece& piece) {
    switch (piece.special) {
      case kTextPiece: content_ += piece.text; return;
      case harmony_tokens::kEnd:
      case harmony_tokens::kReturn:
      case harmony_tokens::kCall: end_message(piece.special); return;
      case harmony_tokens::kStart:
        // The model forgot to close the message; keep it and read on.
        malformed("<|start|> before the message was closed");
        end_message(harmony_tokens::kEnd);
        between_messages(piece);
        return;
      default: malformed(fmt::format("stray {} in message content", piece.text)); return;
    }
  }

  // harmony's header grammar: `[role] [to=recipient] <|channel|>name [to=recipient] [type]`,
  // where the recipient may stand before or after the channel and the type is a word or
  // `<|constrain|>word`. With metadata false the words after the role become the content.
  Message parse_header(bool metadata) {
    Message message{.role = Role::Assistant};
    std::string header = valid_utf8(header_);
    header_.clear();

    const std::string channel_marker = special_token_name(harmony_tokens::kChannel);
    if (size_t at = header.find(channel_marker); at != std::string::npos) {
      size_t start = at + channel_marker.size();
      size_t end = header.find_first_of(" \t\n\r\f\v<", start);
      if (end == std::string::npos) end = header.size();
      message.channel = header.substr(start, end - start);
      header.erase(at, end - at);
      if (header.find(channel_marker) != std::string::npos) malformed("two channels in one message header");
    }
    // `to=f<|constrain|>json` is two words.
    const std::string constrain = special_token_name(harmony_tokens::kConstrain);
    std::string spaced;
    size_t from = 0;
    for (size_t at; (at = header.find(constrain, from)) != std::string::npos; from = at + constrain.size()) {
      spaced.append(header, from, at - from).append(" ").append(constrain);
    }
    spaced.append(header, from);
    std::vector<std::string> words = split_whitespace(spaced);

    auto word = words.begin();
    if (word != words.end() && *word == role_name(Role::Assistant)) {
      ++word;
    } else if (!role_implied_) {
      if (word == words.end() || word->starts_with("to=") || word->starts_with(constrain)) {
        malformed("a message header without a role");
      } else {
        // Someone else speaking inside the completion: keep who. A name that is no role is
        // a tool's (`functions.get_weather`), as in harmony.
        malformed(fmt::format("a message from '{}', not from the assistant", *word));
        message.role = Role::Tool;
        for (Role role : {Role::System, Role::Developer, Role::User, Role::Tool}) {
          if (*word == role_name(role)) message.role = role;
        }
        if (message.role == Role::Tool) message.name = *word;
        ++word;
      }
    }
    role_implied_ = false;

    if (message.channel.empty()) {
      malformed("a message without a channel");
    } else if (!is_known_channel(message.channel)) {
      malformed(fmt::format("unknown channel '{}'", message.channel));
    }

    if (!metadata) {
      message.content = join(std::vector<std::string>(word, words.end()), " ");
      return message;
    }
    for (; word != words.end(); ++word) {
      if (word->starts_with("to=") && message.recipient.empty() && word->size() > 3) {
        message.recipient = word->substr(3);
      } else if (!word->starts_with("to=") && message.content_type.empty()) {
        message.content_type = *word;
      } else {
        malformed(fmt::format("unexpected '{}' in a message header", *word));
      }
    }
    return message;
  }

  void end_message(TokenId terminator) {
    message_.content = valid_utf8(message_.content + content_);
    content_.clear();
    if (terminator == harmony_tokens::kEnd) {
      state_ = State::BetweenMessages;
    } else {
      terminator_ = terminator;
      state_ = State::Done;
      if (terminator == harmony_tokens::kReturn) {
        out_.stop = StopReason::Return;
        if (message_.channel != "final") {
          malformed(fmt::format("<|return|> ends a message on channel '{}', not 'final'", message_.channel));
        }
      } else {
        out_.stop = StopReason::Call;
        if (message_.recipient.empty()) malformed("<|call|> ends a message that has no recipient");
      }
    }
    out_.messages.push_back(std::move(message_));
    message_ = {};
  }

  void finish() {
    switch (state_) {
      case State::Header:
        malformed(out_.messages.empty() && header_.empty() ? "empty completion" : "the completion ends inside a message header");
        break;
      case State::Content:
        malformed("the last message is never closed");
        end_message(harmony_tokens::kEnd);
        break;
      case State::BetweenMessages: malformed("the completion ends without <|return|> or <|call|>"); break;
      case State::Done: break;
    }
    for (auto it = out_.messages.rbegin(); it != out_.messages.rend(); ++it) {
      if (it->channel == "final") {
        out_.final_answer = it->content;
        break;
      }
    }
  }

  ParsedCompletion out_;
  State state_ = State::Header;
  bool role_implied_ = true;
  TokenId terminator_ = harmony_tokens::kReturn;
  std::string header_;
  std::string content_;
  Message message_;
};

}  // namespace

std::string_view role_name(Role role) {
  switch (role) {
    case Role::System: return "system";
    case Role::Developer: return "developer";
    case Role::User: return "user";
    case Role::Assistant: return "assistant";
    case Role::Tool: return "tool";
  }
  return "?";
}

std::string_view effort_name(ReasoningEffort effort) {
  switch (effort) {
    case ReasoningEffort::Low: return "low";
    case ReasoningEffort::Medium: return "medium";
    case ReasoningEffort::High: return "high";
  }
  return "?";
}

ReasoningEffort parse_effort(std::string_view name) {
  for (ReasoningEffort effort : {ReasoningEffort::Low, ReasoningEffort::Medium, ReasoningEffort::High}) {
    if (effort_name(effort) == name) return effort;
  }
  fail("unknown reasoning effort '{}' (expected low, medium or high)", name);
}

std::string render_system_content(const SystemContent& system, bool has_function_tools) {
  std::vector<std::string> sections;
  std::vector<std::string> top;
  if (!system.model_identity.empty()) top.push_back(system.model_identity);
  if (!system.knowledge_cutoff.empty()) top.push_back("Knowledge cutoff: " + system.knowledge_cutoff);
  if (system.current_date) top.push_back("Current date: " + *system.current_date);
  if (!top.empty()) sections.push_back(join(top, "\n"));
  sections.push_back(fmt::format("Reasoning: {}", effort_name(system.reasoning_effort)));
  if (!system.valid_channels.empty()) {
    std::string channels = fmt::format("# Valid channels: {}. Channel must be included for every message.",
                                       join(system.valid_channels, ", "));
    if (has_function_tools) channels += "\nCalls to these tools must go to the commentary channel: 'functions'.";
    sections.push_back(std::move(channels));
  }
  return join(sections, "\n\n");
}

std::string render_developer_content(const DeveloperContent& developer) {
  std::vector<std::string> sections;
  if (!developer.instructions.empty()) {
    sections.push_back("# Instructions");
    sections.push_back(developer.instructions);
  }
  if (!developer.tools.empty()) sections.push_back(render_function_tools(developer.tools));
  return join(sections, "\n\n");
}

std::string render_text(const Conversation& conversation, const RenderOptions& options) {
  std::string out;
  for (const Piece& piece : render_pieces(conversation, options)) out += piece.text;
  return out;
}

std::vector<TokenId> render_conversation(const Tokenizer& tokenizer, const Conversation& conversation,
                                         const RenderOptions& options) {
  std::vector<TokenId> tokens;
  for (const Piece& piece : render_pieces(conversation, options)) {
    if (piece.special == kTextPiece) {
      std::vector<TokenId> text = tokenizer.encode(piece.text, SpecialTokens::None);
      tokens.insert(tokens.end(), text.begin(), text.end());
    } else {
      tokens.push_back(piece.special);
    }
  }
  return tokens;
}

Conversation conversation_from_prompt(std::string_view user_text, ReasoningEffort effort) {
  return {.system = SystemContent{.reasoning_effort = effort},
          .messages = {{.role = Role::User, .content = std::string(user_text)}}};
}

Conversation conversation_from_json(const nlohmann::json& messages, ReasoningEffort effort) {
  OSSRL_CHECK(messages.is_array(), "a conversation must be a JSON list of messages, not {}", messages.type_name());
  Conversation conversation{.system = SystemContent{.reasoning_effort = effort}};
  std::vector<std::string> instructions;
  for (size_t i = 0; i < messages.size(); ++i) {
    const nlohmann::json& entry = messages[i];
    OSSRL_CHECK(entry.is_object(), "message {}: expected an object with \"role\" and \"content\", got {}", i,
                entry.type_name());
    auto field = [&](const char* key, bool required) -> std::string {
      auto it = entry.find(key);
      if (it == entry.end()) {
        OSSRL_CHECK(!required, "message {}: \"{}\" is missing", i, key);
        return {};
      }
      OSSRL_CHECK(it->is_string(), "message {}: \"{}\" must be a string, not {}", i, key, it->type_name());
      return it->get<std::string>();
    };
    const std::string role = field("role", true);
    Message message{.name = field("name", false),
                    .channel = field("channel", false),
                    .recipient = field("recipient", false),
                    .content_type = field("content_type", false),
                    .content = field("content", true)};
    if (role == "system" || role == "developer") {
      instructions.push_back(message.content);
      continue;
    }
    if (role == "user") {
      message.role = Role::User;
    } else if (role == "assistant") {
      message.role = Role::Assistant;
      if (message.channel.empty()) message.channel = "final";
    } else if (role == "tool") {
      OSSRL_CHECK(!message.name.empty(), "message {}: a tool message needs \"name\" (e.g. \"functions.get_weather\")", i);
      message.role = Role::Tool;
      if (message.recipient.empty()) message.recipient = "assistant";
      if (message.channel.empty()) message.channel = "commentary";
    } else {
      fail("message {}: unknown role '{}' (expected system, developer, user, assistant or tool)", i, role);
    }
    conversation.messages.push_back(std::move(message));
  }
  if (!instructions.empty()) conversation.developer = DeveloperContent{.instructions = join(instructions, "\n\n")};
  return conversation;
}

ParsedCompletion parse_completion(const Tokenizer& tokenizer, std::span<const TokenId> tokens) {
  std::vector<Piece> pieces;
  std::vector<TokenId> run;  // ordinary tokens, decoded together so multi-token characters survive
  auto flush = [&] {
    if (!run.empty()) pieces.push_back({kTextPiece, tokenizer.decode(run)});
    run.clear();
  };
  for (TokenId token : tokens) {
    if (token < 0 || token >= tokenizer.vocab_size()) {
      flush();
      pieces.push_back({kInvalidPiece, std::to_string(token)});
    } else if (tokenizer.is_special(token)) {
      flush();
      pieces.push_back({token, tokenizer.token_bytes(token)});
    } else {
      run.push_back(token);
    }
  }
  flush();
  return CompletionParser().parse(pieces);
}

ParsedCompletion parse_completion_text(std::string_view text) {
  std::vector<Piece> pieces;
  std::string run;
  size_t i = 0;
  while (i < text.size()) {
    size_t open = text.find("<|", i);
    size_t close = open == std::string_view::npos ? open : text.find("|>", open + 2);
    if (close == std::string_view::npos) {
      run += text.substr(i);
      break;
    }
    std::string_view name = text.substr(open, close + 2 - open);
    std::optional<TokenId> id = special_token_id(name);
    run += text.substr(i, open - i);
    if (id) {
      add_text(pieces, std::move(run));
      run.clear();
      pieces.push_back({*id, std::string(name)});
      i = close + 2;
    } else {
      run += "<|";  // not a token name: ordinary text; look for the next "<|" after it
      i = open + 2;
    }
  }
  add_text(pieces, std::move(run));
  return CompletionParser().parse(pieces);
}

}  // namespace ossrl::harmony
