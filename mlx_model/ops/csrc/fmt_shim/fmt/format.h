// MLX's CUDA headers include <fmt/format.h> (the fmt library, which MLX builds with but
// does not ship) for a few error messages in inline code. The CUDA attention extension
// (cuda_attention.cpp) includes those headers without using the messages, so this stands
// in for fmt: the message's text, with each "{}" replaced by the next argument.
#pragma once

#include <sstream>
#include <string>
#include <string_view>

namespace fmt {

namespace detail {
inline void put(std::ostringstream& out, std::string_view& rest) { out << rest; rest = {}; }

template <typename T, typename... Rest>
void put(std::ostringstream& out, std::string_view& rest, const T& value, const Rest&... more) {
  auto at = rest.find("{}");
  if (at == std::string_view::npos) {
    out << rest;
    rest = {};
    return;
  }
  out << rest.substr(0, at) << value;
  rest.remove_prefix(at + 2);
  put(out, rest, more...);
}
}  // namespace detail

template <typename... Args>
std::string format(std::string_view text, const Args&... args) {
  std::ostringstream out;
  detail::put(out, text, args...);
  return out.str();
}

}  // namespace fmt
