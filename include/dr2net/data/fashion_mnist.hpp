#pragma once
//! \file
//! Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60 000 training and 10 000 test greyscale
//! images of 28 x 28 pixels in 10 classes, read from the four IDX files of its distribution
//! (on Debian: `apt-get install dataset-fashion-mnist`, in kFashionMnistDefaultDir).
//!
//! Also: keeping a range of classes (relabelled from 0) and deterministic subsets and
//! shuffles that are the same on every platform (std::shuffle's algorithm is unspecified,
//! so a Fisher-Yates over splitmix64 is used instead).
//!
//! Needs zlib: link ZLIB::ZLIB.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "dr2net/core/error.hpp"
#include "dr2net/data/idx.hpp"

namespace dr2net::data {

//! Where the Debian package dataset-fashion-mnist installs the files.
inline constexpr std::string_view kFashionMnistDefaultDir = "/usr/share/datasets/fashion-mnist";

//! The distribution's file names: training images and labels, test images and labels.
inline constexpr std::array<std::string_view, 4> kFashionMnistFiles = {
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz"};

//! Class names by label.
inline constexpr std::array<std::string_view, 10> kFashionMnistClasses = {
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};

//! Labelled single-channel images of one size, pixels row-major as stored (0..255).
struct LabelledImages {
  //! Rows of pixels of every image (28 for Fashion-MNIST).
  std::int64_t height = 0, width = 0;  //!< Pixels per row of every image (28 for Fashion-MNIST).
  std::vector<std::uint8_t> pixels;  //!< [size(), height, width]
  std::vector<std::uint8_t> labels;  //!< [size()]

  //! Number of images, which is the number of labels.
  std::int64_t size() const noexcept { return static_cast<std::int64_t>(labels.size()); }
  //! Bytes (one per pixel) of one image, height * width.
  std::int64_t pixels_per_image() const noexcept { return height * width; }
  //! The pixels_per_image() pixels of image i, row-major; valid while `pixels` is not resized.
  //! Throws dr2net::Error when i is not in [0, size()).
  const std::uint8_t* image(std::int64_t i) const {
    DR2NET_CHECK(i >= 0 && i < size(), "image index ", i, " out of range for a set of ", size());
    return pixels.data() + static_cast<std::size_t>(i * pixels_per_image());
  }
};

//! The dataset as load_fashion_mnist returns it: both splits, labels 0..9 (kFashionMnistClasses).
struct FashionMnist {
  //! The 60 000 training images, in file order.
  LabelledImages train, test;  //!< The 10 000 test images, in file order.
};

//! Reads an images file ([N, H, W]) and its labels file ([N]) and checks they agree; every
//! label must be below `num_classes`.
inline LabelledImages load_labelled_images(const std::string& images_path, const std::string& labels_path,
                                           int num_classes, const IdxReadOptions& options = {}) {
  IdxArray images = read_idx(images_path, options);
  IdxArray labels = read_idx(labels_path, options);
  DR2NET_CHECK(images.dims.size() == 3, "images file '", images_path, "' has dimensions ",
               detail::format_dims(images.dims), ", expected [count, height, width]");
  DR2NET_CHECK(labels.dims.size() == 1, "labels file '", labels_path, "' has dimensions ",
               detail::format_dims(labels.dims), ", expected [count]");
  DR2NET_CHECK(images.dims[0] == labels.dims[0], "images file '", images_path, "' holds ", images.dims[0],
               " images but labels file '", labels_path, "' holds ", labels.dims[0], " labels");
  for (std::size_t i = 0; i < labels.data.size(); ++i)
    DR2NET_CHECK(labels.data[i] < num_classes, "labels file '", labels_path, "': label ", int{labels.data[i]},
                 " of sample ", i, " is not below the number of classes ", num_classes);
  DR2NET_CHECK(images.dims[1] > 0 && images.dims[2] > 0, "images file '", images_path, "' has dimensions ",
               detail::format_dims(images.dims), ": images of ", images.dims[1], "x", images.dims[2],
               " pixels (height and width must be positive)");
  LabelledImages out;
  out.height = images.dims[1];
  out.width = images.dims[2];
  out.pixels = std::move(images.data);
  out.labels = std::move(labels.data);
  return out;
}

//! The files of kFashionMnistFiles that are not in `dir` as regular files (full paths: absent,
//! or something else, such as a directory, in a file's place); empty when all are.
inline std::vector<std::string> missing_fashion_mnist_files(const std::string& dir) {
  std::vector<std::string> missing;
  for (std::string_view name : kFashionMnistFiles) {
    const auto path = std::filesystem::path(dir) / name;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) missing.push_back(path.string());
  }
  return missing;
}

//! Loads the training and test sets from `dir`. Throws naming the directory or the first
//! missing file (and the Debian package that provides them), a directory where a file should
//! be ("is a directory"), or whatever read_idx and load_labelled_images find wrong.
inline FashionMnist load_fashion_mnist(const std::string& dir = std::string(kFashionMnistDefaultDir)) {
  namespace fs = std::filesystem;
  std::error_code ec;
  DR2NET_CHECK(fs::exists(dir, ec), "Fashion-MNIST directory '", dir,
               "' not found (install the Debian package dataset-fashion-mnist, or give the directory holding ",
               kFashionMnistFiles[0], " and the other files)");
  DR2NET_CHECK(fs::is_directory(dir, ec), "Fashion-MNIST directory '", dir, "' is a file, not a directory");
  const auto file = [&](std::size_t i) { return (fs::path(dir) / kFashionMnistFiles[i]).string(); };
  for (std::size_t i = 0; i < kFashionMnistFiles.size(); ++i) {
    const std::string path = file(i);
    DR2NET_CHECK(fs::exists(path, ec), "Fashion-MNIST file '", path,
                 "' not found (install the Debian package dataset-fashion-mnist, or give the directory holding ",
                 kFashionMnistFiles[0], " and the other files)");
    DR2NET_CHECK(!fs::is_directory(path, ec), "Fashion-MNIST file '", path, "' is a directory, not a file");
  }
  FashionMnist out;
  out.train = load_labelled_images(file(0), file(1), 10);
  out.test = load_labelled_images(file(2), file(3), 10);
  DR2NET_CHECK(out.train.height == out.test.height && out.train.width == out.test.width, "Fashion-MNIST in '", dir,
               "': training images ('", file(0), "') are ", out.train.height, "x", out.train.width,
               " but test images ('", file(2), "') are ", out.test.height, "x", out.test.width);
  return out;
}

//! The samples whose label lies in [first, last], in their original order, relabelled
//! label - first (so classes 5..9 become 0..4).
inline LabelledImages select_classes(const LabelledImages& set, int first, int last) {
  DR2NET_CHECK(0 <= first && first <= last && last <= 255, "select_classes: invalid class range [", first, ", ",
               last, "]");
  LabelledImages out;
  out.height = set.height;
  out.width = set.width;
  const auto ppi = static_cast<std::size_t>(set.pixels_per_image());
  for (std::int64_t i = 0; i < set.size(); ++i) {
    const int label = set.labels[static_cast<std::size_t>(i)];
    if (label < first || label > last) continue;
    out.labels.push_back(static_cast<std::uint8_t>(label - first));
    const std::uint8_t* p = set.image(i);
    out.pixels.insert(out.pixels.end(), p, p + ppi);
  }
  return out;
}

namespace detail {

//! splitmix64: a small generator whose output is fixed by its definition on every platform.
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  //! Uniform in [0, bound), without modulo bias (draws below 2^64 mod bound are rejected).
  std::uint64_t below(std::uint64_t bound) {
    const std::uint64_t reject_under = (0 - bound) % bound;
    for (;;) {
      const std::uint64_t r = next();
      if (r >= reject_under) return r % bound;
    }
  }

 private:
  std::uint64_t state_;
};

}  // namespace detail

//! A permutation of 0..n-1 that depends only on (n, seed): Fisher-Yates over splitmix64.
inline std::vector<std::int64_t> shuffled_indices(std::int64_t n, std::uint64_t seed) {
  DR2NET_CHECK(n >= 0, "shuffled_indices: negative count ", n);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) idx[static_cast<std::size_t>(i)] = i;
  detail::SplitMix64 rng(seed);
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(i + 1)));
    std::swap(idx[static_cast<std::size_t>(i)], idx[static_cast<std::size_t>(j)]);
  }
  return idx;
}

//! `count` samples drawn without replacement, the same for the same (set, count, seed), kept
//! in their original order. count >= size() returns the whole set.
inline LabelledImages deterministic_subset(const LabelledImages& set, std::int64_t count, std::uint64_t seed) {
  DR2NET_CHECK(count >= 0, "deterministic_subset: negative count ", count);
  if (count >= set.size()) return set;
  auto idx = shuffled_indices(set.size(), seed);
  idx.resize(static_cast<std::size_t>(count));
  std::sort(idx.begin(), idx.end());
  LabelledImages out;
  out.height = set.height;
  out.width = set.width;
  const auto ppi = static_cast<std::size_t>(set.pixels_per_image());
  out.pixels.reserve(idx.size() * ppi);
  for (std::int64_t i : idx) {
    out.labels.push_back(set.labels[static_cast<std::size_t>(i)]);
    const std::uint8_t* p = set.image(i);
    out.pixels.insert(out.pixels.end(), p, p + ppi);
  }
  return out;
}

}  // namespace dr2net::data
