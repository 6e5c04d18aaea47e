#pragma once
//! \file
//! Command-line handling shared by dr2net's own programs (tools, examples, benchmarks), over
//! CLI11. Not part of the library: the library never depends on CLI11.
//!
//! What every program gets from parse(): `--help` generated from the options (exit status 0),
//! unknown arguments refused, every option and every flag accepted at most once (CLI11 lets a
//! repeated flag through by default; here it is an error like a repeated option), and a usage
//! error reported as one line on stderr, `<program>: <CLI11's message, naming the flag> (see
//! --help)`, with exit status 2.
//!
//! Numbers are checked strictly: integer() takes decimal digits only and a range, so that an
//! overflowing (4294967297 for an int), fractional (2.5) or out-of-range value is refused
//! rather than wrapped, truncated or clamped (CLI11 2.1 saturates 64-bit overflow and wraps
//! negative unsigned values); finite() refuses nan and inf; list options (`a,b,c`) are taken
//! as one string, checked element by element, and split after parsing.

#include <CLI/CLI.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <vector>

namespace dr2net_cli {

namespace detail {

//! The comma-separated items of `text` (an empty item stays, to be refused by its check).
inline std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> items;
  std::string item;
  std::stringstream ss(text);
  while (std::getline(ss, item, ',')) items.push_back(item);
  if (!text.empty() && text.back() == ',') items.emplace_back();
  return items;
}

//! `text` as an integer of type T in [lo, hi]: decimal digits with an optional leading '-'
//! only (no '+', spaces, fractions, exponents or hexadecimal); nullopt otherwise.
template <class T>
std::optional<T> to_integer(const std::string& text, T lo, T hi) {
  T value{};
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const auto [end, ec] = std::from_chars(first, last, value, 10);
  if (text.empty() || ec != std::errc{} || end != last || value < lo || value > hi) return std::nullopt;
  return value;
}

//! `text` as a finite double; nullopt otherwise.
inline std::optional<double> to_finite(const std::string& text) {
  double value = 0;
  if (!CLI::detail::lexical_cast(text, value) || !std::isfinite(value)) return std::nullopt;
  return value;
}

inline std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

}  // namespace detail

//! An integer of type T in [lo, hi], written in decimal.
template <class T>
CLI::Validator integer(T lo, T hi = std::numeric_limits<T>::max()) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>, "integer() checks integers");
  const std::string range = "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  return CLI::Validator(
      [lo, hi, range](std::string& text) -> std::string {
        if (detail::to_integer<T>(text, lo, hi)) return "";
        return "expects an integer in " + range + ", got '" + text + "'";
      },
      range);
}

//! A finite number (not nan, not inf), optionally in [lo, hi] or, with open_low, in (lo, hi].
inline CLI::Validator finite(double lo = -std::numeric_limits<double>::infinity(),
                             double hi = std::numeric_limits<double>::infinity(), bool open_low = false) {
  std::string range;
  if (std::isfinite(lo) || std::isfinite(hi))
    range = std::string(open_low || !std::isfinite(lo) ? "(" : "[") +
            (std::isfinite(lo) ? detail::number_text(lo) : "-inf") + ", " +
            (std::isfinite(hi) ? detail::number_text(hi) + "]" : std::string("inf)"));  // infinities are refused
  return CLI::Validator(
      [lo, hi, open_low, range](std::string& text) -> std::string {
        const auto v = detail::to_finite(text);
        if (v && (open_low ? *v > lo : *v >= lo) && *v <= hi) return "";
        return "expects a finite number" + (range.empty() ? std::string() : " in " + range) + ", got '" + text + "'";
      },
      range.empty() ? "FINITE" : range);
}

//! A finite number > 0.
inline CLI::Validator positive() { return finite(0.0, std::numeric_limits<double>::infinity(), true); }

//! A comma-separated list of at least one item, every item passing `item` (its message names
//! the item's position).
inline CLI::Validator list_of(CLI::Validator item) {
  const std::string what = "LIST of " + item.get_description();
  return CLI::Validator(
      [item](std::string& text) -> std::string {
        const auto items = detail::split(text);
        if (items.empty()) return "expects a comma-separated list, got '" + text + "'";
        for (std::size_t k = 0; k < items.size(); ++k) {
          std::string copy = items[k];
          const std::string why = item(copy);
          if (!why.empty()) return "item " + std::to_string(k + 1) + " of '" + text + "': " + why;
        }
        return "";
      },
      what);
}

//! The items of a list option checked by list_of(integer<T>(...)).
template <class T>
std::vector<T> integers(const std::string& text) {
  std::vector<T> out;
  for (const auto& item : detail::split(text))
    out.push_back(*detail::to_integer<T>(item, std::numeric_limits<T>::lowest(), std::numeric_limits<T>::max()));
  return out;
}

//! The items of a list option checked by list_of(finite(...)).
inline std::vector<double> numbers(const std::string& text) {
  std::vector<double> out;
  for (const auto& item : detail::split(text)) out.push_back(*detail::to_finite(item));
  return out;
}

//! The items of a list option checked by list_of(CLI::IsMember(...)).
inline std::vector<std::string> words(const std::string& text) { return detail::split(text); }

//! Adds an integer option of type T in [lo, hi] bound to `value` (its default shown in --help).
template <class T>
CLI::Option* add_integer(CLI::App& app, const std::string& name, T& value, T lo, T hi, const std::string& help) {
  // Taken as text and converted here: CLI11's own conversion saturates or wraps.
  return app
      .add_option_function<std::string>(
          name, [&value, lo, hi](const std::string& text) { value = *detail::to_integer<T>(text, lo, hi); }, help)
      ->check(integer<T>(lo, hi))
      ->type_name(std::is_signed_v<T> ? "INT" : "UINT")
      ->default_str(std::to_string(value));
}

//! Every option and every flag of `app` at most once (CLI11's flags take the last by default).
inline void once_each(CLI::App& app) {
  for (CLI::Option* o : app.get_options()) {
    if (o == app.get_help_ptr()) continue;
    o->multi_option_policy(CLI::MultiOptionPolicy::Throw);
    if (o->get_expected_max() == 0) o->disable_flag_override();  // a flag takes no "=value"
  }
}

//! Parses the command line. Returns nullopt when the program should run; otherwise the exit
//! status: 0 after --help (printed on stdout), 2 after a usage error (one line on stderr).
inline std::optional<int> parse(CLI::App& app, int argc, const char* const* argv) {
  once_each(app);
  // Unknown arguments are collected and reported here, before a missing required option:
  // "--wieghts w" should say that --wieghts is unknown, not that --weights is missing.
  app.allow_extras();
  const auto fail = [&](std::string line) {
    for (char& c : line)
      if (c == '\n' || c == '\r') c = ' ';
    std::cerr << app.get_name() << ": " << line << " (see --help)" << std::endl;
    return 2;
  };
  const auto unknown = [&] {
    auto extras = app.remaining();  // CLI11 collects them last first
    std::reverse(extras.begin(), extras.end());
    std::string line = extras.size() == 1 ? "unknown argument:" : "unknown arguments:";
    for (const auto& x : extras) line += " " + x;
    return fail(line);
  };
  try {
    app.parse(argc, argv);
    if (!app.remaining().empty()) return unknown();
    return std::nullopt;
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::RequiredError& e) {
    if (!app.remaining().empty()) return unknown();
    return fail(e.what());
  } catch (const CLI::ParseError& e) {
    return fail(e.what());
  }
}

}  // namespace dr2net_cli
