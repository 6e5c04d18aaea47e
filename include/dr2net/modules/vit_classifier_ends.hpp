#pragma once
//! \file
//! The non-reversible ends of a ViT classifier around a ReversibleStack of ViT layers:
//!
//!   images -> VitEmbedding -> h0 -> ReversibleStack -> out -> VitHead -> logits -> softmax_cross_entropy
//!
//! The ends store their activations as usual (they are two thin layers, not the depth that
//! reversibility pays off on) and count them in the context's meter. All their tensors carry
//! timm's names, so together with the stack's blocks.{i}.* they form a timm ViT state dict
//! that dr2net::io::save_parameters / load_parameters read and write module by module.

#include <string>
#include <string_view>
#include <vector>

#include "dr2net/block/stack.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/modules/cross_entropy.hpp"
#include "dr2net/modules/vit_embedding.hpp"
#include "dr2net/modules/vit_head.hpp"

namespace dr2net {

//! Appends every (name, value, grad) of `part` (anything with for_each_parameter: a stack,
//! a VitEmbedding, a VitHead) to `out`, so one optimizer can own all of a model's parameters.
template <class T, class Part>
void append_parameters(std::vector<NamedParameter<T>>& out, Part& part) {
  part.for_each_parameter([&](std::string_view name, TensorView<T> value, TensorView<T> grad) {
    out.push_back({std::string(name), value, grad});
  });
}

}  // namespace dr2net
