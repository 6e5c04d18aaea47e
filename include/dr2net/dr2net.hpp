#pragma once
//! \file
//! Umbrella header: everything in dr2net that needs nothing beyond a C++20 compiler.
//! Checkpoint input/output lives in "dr2net/io/..." (it needs nlohmann-json, target dr2net::io).

#include "dr2net/core/config.hpp"
#include "dr2net/core/error.hpp"
#include "dr2net/core/memory_meter.hpp"
#include "dr2net/core/tensor.hpp"
#include "dr2net/backend/host/context.hpp"
#include "dr2net/precision/precision.hpp"
#include "dr2net/schedule/coefficients.hpp"
#include "dr2net/schedule/schedules.hpp"
#include "dr2net/block/combine.hpp"
#include "dr2net/block/residual_function.hpp"
#include "dr2net/block/reversible_dual_residual.hpp"
#include "dr2net/block/stack.hpp"
#include "dr2net/block/stages.hpp"
